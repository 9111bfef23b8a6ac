//! The shape of an object's fields: the built-in API's, from the Kubernetes OpenAPI
//! schema embedded in `builtin.json`, and a CRD's, from its `openAPIV3Schema`.
//!
//! `builtin.json` is generated (`generate.rs`) from `api/openapi-spec/swagger.json` of
//! the `k8s.io/kubernetes` module the tests build the API server from, trimmed to what
//! a check needs: per group/version/kind its scope and type, and per type the tree of
//! its properties. Descriptions, patch strategies and list types are dropped.
//!
//! The compact form, one JSON value per type:
//! - a primitive: `"string"`, `"bytes"` (base64), `"integer"`, `"number"`, `"boolean"`,
//!   `"int-or-string"`, `"quantity"` (a string or a number), `"any"`;
//! - `"@NAME"`: the type NAME of `types`;
//! - `[T]`: a sequence of T;
//! - `{"field": T, …}`: a mapping with those fields and no others; the key `"*"` gives
//!   the type of every other field (`{"*": "string"}` is a map of strings).

use std::collections::{BTreeMap, HashMap};
use std::sync::OnceLock;

use serde_json::Value;

/// The type of a value.
#[derive(Debug, Clone, PartialEq)]
pub enum Type {
    String,
    /// A base64 string (`format: byte`): Secret data.
    Bytes,
    Integer,
    Number,
    Boolean,
    IntOrString,
    /// A resource quantity: `1Gi` or `1.5`.
    Quantity,
    Any,
    /// A type of the built-in schema, by name.
    Ref(String),
    Array(Box<Type>),
    Object {
        fields: BTreeMap<String, Type>,
        /// The type of any other field; `None`: no other field is allowed.
        rest: Option<Box<Type>>,
    },
}

impl Type {
    /// Reads the compact form.
    pub(crate) fn from_compact(value: &Value) -> Result<Type, String> {
        Ok(match value {
            Value::String(name) => match name.as_str() {
                "string" => Type::String,
                "bytes" => Type::Bytes,
                "integer" => Type::Integer,
                "number" => Type::Number,
                "boolean" => Type::Boolean,
                "int-or-string" => Type::IntOrString,
                "quantity" => Type::Quantity,
                "any" => Type::Any,
                other => match other.strip_prefix('@') {
                    Some(reference) => Type::Ref(reference.to_owned()),
                    None => return Err(format!("unknown type {other:?}")),
                },
            },
            Value::Array(items) if items.len() == 1 => Type::Array(Box::new(Type::from_compact(&items[0])?)),
            Value::Object(entries) => {
                let mut fields = BTreeMap::new();
                let mut rest = None;
                for (key, value) in entries {
                    let field = Type::from_compact(value)?;
                    if key == "*" {
                        rest = Some(Box::new(field));
                    } else {
                        fields.insert(key.clone(), field);
                    }
                }
                Type::Object { fields, rest }
            }
            other => return Err(format!("not a type: {other}")),
        })
    }

    /// The compact form.
    #[cfg(test)]
    pub(crate) fn to_compact(&self) -> Value {
        let name = |name: &str| Value::String(name.to_owned());
        match self {
            Type::String => name("string"),
            Type::Bytes => name("bytes"),
            Type::Integer => name("integer"),
            Type::Number => name("number"),
            Type::Boolean => name("boolean"),
            Type::IntOrString => name("int-or-string"),
            Type::Quantity => name("quantity"),
            Type::Any => name("any"),
            Type::Ref(reference) => Value::String(format!("@{reference}")),
            Type::Array(items) => Value::Array(vec![items.to_compact()]),
            Type::Object { fields, rest } => {
                let mut entries: serde_json::Map<String, Value> =
                    fields.iter().map(|(key, field)| (key.clone(), field.to_compact())).collect();
                if let Some(rest) = rest {
                    entries.insert("*".to_owned(), rest.to_compact());
                }
                Value::Object(entries)
            }
        }
    }

    /// The keys every object has, whatever its schema says of them. metadata is the API
    /// server's ObjectMeta even where a CRD writes `metadata: {type: object}` (most
    /// generated CRDs do, kube-prometheus-stack's among them), which alone would prune
    /// every field of it.
    pub(crate) fn with_object_keys(fields: &mut BTreeMap<String, Type>) {
        for key in ["apiVersion", "kind"] {
            fields.entry(key.to_owned()).or_insert(Type::Any);
        }
        fields.insert("metadata".to_owned(), Type::Any);
    }

    /// What a CRD's `openAPIV3Schema` (or one of its nodes) allows, as the API server
    /// reads a structural schema: `x-kubernetes-preserve-unknown-fields` keeps fields the
    /// schema does not name, `x-kubernetes-int-or-string` takes both, and a node with
    /// neither a type nor properties takes anything.
    pub(crate) fn from_openapi_v3(schema: &Value) -> Type {
        let flag = |name: &str| schema.get(name).and_then(Value::as_bool).unwrap_or(false);
        if flag("x-kubernetes-int-or-string") {
            return Type::IntOrString;
        }
        let properties = schema.get("properties").and_then(Value::as_object);
        match schema.get("type").and_then(Value::as_str) {
            Some("string") if schema.get("format").and_then(Value::as_str) == Some("byte") => Type::Bytes,
            Some("string") => Type::String,
            Some("integer") => Type::Integer,
            Some("number") => Type::Number,
            Some("boolean") => Type::Boolean,
            Some("array") => Type::Array(Box::new(schema.get("items").map_or(Type::Any, Type::from_openapi_v3))),
            Some("object") | None if properties.is_some() || schema.get("additionalProperties").is_some() => {
                let mut fields: BTreeMap<String, Type> = properties
                    .into_iter()
                    .flatten()
                    .map(|(key, field)| (key.clone(), Type::from_openapi_v3(field)))
                    .collect();
                if flag("x-kubernetes-embedded-resource") {
                    Type::with_object_keys(&mut fields);
                }
                let rest = match schema.get("additionalProperties") {
                    _ if flag("x-kubernetes-preserve-unknown-fields") => Some(Box::new(Type::Any)),
                    Some(Value::Bool(true)) => Some(Box::new(Type::Any)),
                    Some(additional @ Value::Object(_)) => Some(Box::new(Type::from_openapi_v3(additional))),
                    _ => None,
                };
                Type::Object { fields, rest }
            }
            Some("object")
                if !flag("x-kubernetes-preserve-unknown-fields") && !flag("x-kubernetes-embedded-resource") =>
            {
                // An object schema without properties: the API server prunes every field.
                Type::Object { fields: BTreeMap::new(), rest: None }
            }
            _ => Type::Any,
        }
    }
}

/// One kind of the built-in API.
#[derive(Debug, Clone, PartialEq)]
pub struct BuiltinKind {
    pub namespaced: bool,
    /// Its type's name in [`Builtin::types`].
    pub type_name: String,
}

/// The built-in API of one Kubernetes version.
#[derive(Debug)]
pub struct Builtin {
    /// The Kubernetes release it was generated from, e.g. `v1.37.2`.
    pub kubernetes: String,
    /// By (`GROUP/VERSION` or `VERSION`, kind).
    pub kinds: BTreeMap<(String, String), BuiltinKind>,
    pub types: HashMap<String, Type>,
}

/// The embedded schema, generated by `generate.rs`.
pub(crate) const BUILTIN_JSON: &str = include_str!("builtin.json");

impl Builtin {
    /// The built-in API of the Kubernetes version the agent supports, read once.
    pub fn get() -> &'static Builtin {
        static BUILTIN: OnceLock<Builtin> = OnceLock::new();
        BUILTIN.get_or_init(|| Builtin::parse(BUILTIN_JSON).expect("the embedded schema is checked by its tests"))
    }

    pub(crate) fn parse(text: &str) -> Result<Builtin, String> {
        let value: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let kubernetes = value["kubernetes"].as_str().ok_or("no kubernetes version")?.to_owned();
        let mut kinds = BTreeMap::new();
        for (key, kind) in value["kinds"].as_object().ok_or("no kinds")? {
            let (api_version, name) = key.split_once(' ').ok_or_else(|| format!("kind {key:?}"))?;
            let [namespaced, type_name] = kind.as_array().map(Vec::as_slice).unwrap_or_default() else {
                return Err(format!("kind {key:?}: {kind}"));
            };
            let kind = BuiltinKind {
                namespaced: namespaced.as_str() == Some("Namespaced"),
                type_name: type_name.as_str().ok_or_else(|| format!("kind {key:?}"))?.to_owned(),
            };
            kinds.insert((api_version.to_owned(), name.to_owned()), kind);
        }
        let mut types = HashMap::new();
        for (name, compact) in value["types"].as_object().ok_or("no types")? {
            types.insert(name.clone(), Type::from_compact(compact).map_err(|e| format!("type {name}: {e}"))?);
        }
        Ok(Builtin { kubernetes, kinds, types })
    }

    /// The compact form, one kind and one type per line, so that a regenerated schema
    /// shows what changed.
    #[cfg(test)]
    pub(crate) fn to_text(&self) -> String {
        let mut text = format!("{{\"kubernetes\": {},\n\"kinds\": {{\n", Value::from(self.kubernetes.as_str()));
        let kinds: Vec<String> = self
            .kinds
            .iter()
            .map(|((api_version, kind), builtin)| {
                let scope = if builtin.namespaced { "Namespaced" } else { "Cluster" };
                format!(
                    "{}: {}",
                    Value::from(format!("{api_version} {kind}")),
                    serde_json::json!([scope, builtin.type_name])
                )
            })
            .collect();
        text += &kinds.join(",\n");
        text += "\n},\n\"types\": {\n";
        let types: BTreeMap<&String, Value> = self.types.iter().map(|(name, t)| (name, t.to_compact())).collect();
        let types: Vec<String> =
            types.iter().map(|(name, compact)| format!("{}: {compact}", Value::from(name.as_str()))).collect();
        text += &types.join(",\n");
        text += "\n}}\n";
        text
    }
}
