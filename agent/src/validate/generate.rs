//! Generates `builtin.json` from the Kubernetes OpenAPI schema, and proves the embedded
//! one is what the schema of the version the tests run gives.
//!
//! The version is the `k8s.io/kubernetes` requirement of `bootstrap/controlplane/go.mod`
//! (what the tests build the API server from), the schema that module's
//! `api/openapi-spec/swagger.json` in the Go module cache. To regenerate after a version
//! change: `GITOPS_UPDATE_SCHEMA=1 cargo test -p gitops-agent validate::generate`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;

use serde_json::Value;

use super::schema::{Builtin, BuiltinKind, Type};

/// `#/definitions/NAME` → NAME.
fn reference(value: &Value) -> Option<&str> {
    value.get("$ref")?.as_str()?.strip_prefix("#/definitions/")
}

/// What a property of the swagger (v2) schema allows.
fn property(definitions: &serde_json::Map<String, Value>, schema: &Value) -> Type {
    if let Some(name) = reference(schema) {
        let definition = &definitions[name];
        let format = definition.get("format").and_then(Value::as_str);
        return match (name, definition.get("type").and_then(Value::as_str), format) {
            ("io.k8s.apimachinery.pkg.api.resource.Quantity", ..) => Type::Quantity,
            (_, _, Some("int-or-string")) => Type::IntOrString,
            // Time and MicroTime.
            (_, Some("string"), _) => Type::String,
            _ if definition.get("properties").is_some() => Type::Ref(name.to_owned()),
            // RawExtension, FieldsV1, apiextensions' JSON: anything; an empty struct too,
            // which the check then does not look into.
            _ => Type::Any,
        };
    }
    let format = schema.get("format").and_then(Value::as_str);
    match schema.get("type").and_then(Value::as_str) {
        Some("string") if format == Some("byte") => Type::Bytes,
        Some("string") => Type::String,
        Some("integer") => Type::Integer,
        Some("number") => Type::Number,
        Some("boolean") => Type::Boolean,
        Some("array") => Type::Array(Box::new(property(definitions, &schema["items"]))),
        Some("object") => match schema.get("additionalProperties") {
            Some(values) => {
                Type::Object { fields: BTreeMap::new(), rest: Some(Box::new(property(definitions, values))) }
            }
            None => Type::Any,
        },
        _ => Type::Any,
    }
}

/// The built-in API of a swagger.json: every kind that can be created (it has a `post`
/// on a collection), namespaced if that collection is under `/namespaces/{namespace}/`,
/// and the types those kinds reach.
pub(crate) fn builtin(kubernetes: &str, swagger: &Value) -> Builtin {
    let definitions = swagger["definitions"].as_object().expect("definitions");
    let mut kinds = BTreeMap::new();
    for (path, operations) in swagger["paths"].as_object().expect("paths") {
        let Some(post) = operations.get("post") else { continue };
        let Some(gvk) = post.get("x-kubernetes-group-version-kind") else { continue };
        if path.contains("{name}") {
            continue; // a subresource (eviction, binding of a pod, token of an account)
        }
        let body = post["parameters"].as_array().into_iter().flatten().find(|p| p["in"] == "body");
        let Some(type_name) = body.and_then(|body| reference(&body["schema"])) else { continue };
        let (group, version, kind) = (gvk["group"].as_str(), gvk["version"].as_str(), gvk["kind"].as_str());
        let (Some(group), Some(version), Some(kind)) = (group, version, kind) else { continue };
        let api_version = if group.is_empty() { version.to_owned() } else { format!("{group}/{version}") };
        let namespaced = path.contains("/namespaces/{namespace}/");
        kinds.insert((api_version, kind.to_owned()), BuiltinKind { namespaced, type_name: type_name.to_owned() });
    }
    let mut types = HashMap::new();
    let mut pending: BTreeSet<String> = kinds.values().map(|kind| kind.type_name.clone()).collect();
    while let Some(name) = pending.pop_first() {
        if types.contains_key(&name) {
            continue;
        }
        let properties = definitions[&name]["properties"].as_object().into_iter().flatten();
        let fields: BTreeMap<String, Type> =
            properties.map(|(key, schema)| (key.clone(), property(definitions, schema))).collect();
        let object = Type::Object { fields, rest: None };
        references(&object, &mut pending);
        types.insert(name, object);
    }
    Builtin { kubernetes: kubernetes.to_owned(), kinds, types }
}

fn references(of: &Type, into: &mut BTreeSet<String>) {
    match of {
        Type::Ref(name) => {
            into.insert(name.clone());
        }
        Type::Array(items) => references(items, into),
        Type::Object { fields, rest } => {
            fields.values().chain(rest.as_deref()).for_each(|field| references(field, into));
        }
        _ => {}
    }
}

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The `k8s.io/kubernetes` version the tests' control plane is built from.
fn tested_version() -> String {
    let go_mod = std::fs::read_to_string(workspace().join("bootstrap/controlplane/go.mod")).expect("go.mod");
    let line = go_mod.lines().find_map(|line| line.trim().strip_prefix("k8s.io/kubernetes ")).expect("requires kube");
    line.split_whitespace().next().expect("a version").to_owned()
}

fn module_cache() -> PathBuf {
    match std::env::var_os("GOMODCACHE") {
        Some(dir) => dir.into(),
        None => std::env::var_os("GOPATH")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join("go"))
            .join("pkg/mod"),
    }
}

#[test]
fn the_embedded_schema_is_the_one_of_the_tested_kubernetes_version() {
    let version = tested_version();
    let swagger = module_cache().join(format!("k8s.io/kubernetes@{version}/api/openapi-spec/swagger.json"));
    let Ok(text) = std::fs::read_to_string(&swagger) else {
        // CI builds the control plane from this module first, so the file is there.
        eprintln!("{} is not in the module cache: only the version is compared", swagger.display());
        let embedded = Builtin::parse(super::schema::BUILTIN_JSON).expect("the embedded schema parses");
        assert_eq!(
            embedded.kubernetes, version,
            "regenerate: GITOPS_UPDATE_SCHEMA=1 cargo test -p gitops-agent validate::generate"
        );
        return;
    };
    let generated = builtin(&version, &serde_json::from_str(&text).expect("swagger.json is JSON")).to_text();
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/validate/builtin.json");
    if std::env::var_os("GITOPS_UPDATE_SCHEMA").is_some() {
        std::fs::write(&path, &generated).expect("writing builtin.json");
    }
    assert!(
        generated == super::schema::BUILTIN_JSON,
        "{} differs from what {} gives; regenerate: GITOPS_UPDATE_SCHEMA=1 cargo test -p gitops-agent validate::generate",
        path.display(),
        swagger.display()
    );
}
