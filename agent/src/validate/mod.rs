//! Validate: a rendered revision checked offline as the API server would check it.
//!
//! In: a [`Rendered`] revision and the directory it came from. Out: every problem as a
//! [`ValidationError`] at the line of the offending field (`file:line: object: message`),
//! and the objects it could not check. What it knows:
//! - the built-in API of the supported Kubernetes version ([`schema::Builtin`], from the
//!   version's published OpenAPI schema): which kinds each group/version serves, their
//!   scope, and the fields and types of each kind;
//! - the kinds the repository's own CRDs define, with their `openAPIV3Schema`;
//! - the API server's size limit of ConfigMap and Secret data.
//!
//! A kind of another group (a CRD installed by someone else) is left to the API server:
//! `gitops-agent validate --cluster` adds its dry run.

#[cfg(test)]
mod generate;
mod rejection;
pub mod schema;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::path::Path;

use base64::Engine;
use serde_json::{Map, Value};

use crate::apply::{ApplyError, Planned};
use crate::render::{Location, Manifest, Rendered, Segment};
use schema::{Builtin, Type};

/// A problem with one object, displayed as `file:line: object: message`.
#[derive(Debug, thiserror::Error)]
#[error("{at}: {object}: {problem}")]
pub struct ValidationError {
    pub at: Location,
    /// `Deployment.apps team-a/web`.
    pub object: String,
    pub problem: Problem,
}

#[derive(Debug, PartialEq, thiserror::Error)]
pub enum Problem {
    #[error("unknown kind {kind} in {api_version}{}", with_hint(.hint))]
    UnknownKind { kind: String, api_version: String, hint: Option<String> },
    #[error("{api_version} is not served by {by}{}", with_hint(.hint))]
    UnservedVersion { api_version: String, by: String, hint: Option<String> },
    #[error("{kind} is cluster-scoped; remove metadata.namespace")]
    NamespaceOnClusterScoped { kind: String },
    #[error("unknown field {path}")]
    UnknownField { path: FieldPath },
    #[error("{path} must be {expected}, found {found}")]
    WrongType { path: FieldPath, expected: &'static str, found: &'static str },
    #[error("{path} is not base64: {reason}")]
    NotBase64 { path: FieldPath, reason: String },
    #[error("{what} hold {bytes} bytes; the API server takes at most {MAX_DATA_BYTES} (1 MiB)")]
    DataTooLarge { what: &'static str, bytes: usize, field: FieldPath },
}

fn with_hint(hint: &Option<String>) -> String {
    hint.as_ref().map(|hint| format!("; {hint}")).unwrap_or_default()
}

/// The most data a ConfigMap (data and binaryData) or a Secret (data, with stringData
/// merged in, decoded) may hold: `MaxSecretSize` of k8s.io/kubernetes
/// `pkg/apis/core/types.go`, checked by `ValidateConfigMap` and `ValidateSecret` in
/// `pkg/apis/core/validation/validation.go`. Keys count for nothing there.
pub const MAX_DATA_BYTES: usize = 1024 * 1024;

/// Where a field is in an object: `spec.template.spec.containers[0].image`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldPath(pub Vec<Segment>);

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, segment) in self.0.iter().enumerate() {
            match segment {
                Segment::Key(key) if key.contains(['.', '/', '[', ']']) || key.is_empty() => write!(f, "[{key}]")?,
                Segment::Key(key) if index == 0 => f.write_str(key)?,
                Segment::Key(key) => write!(f, ".{key}")?,
                Segment::Index(i) => write!(f, "[{i}]")?,
            }
        }
        Ok(())
    }
}

impl Problem {
    /// The field the problem is about, for its line.
    fn path(&self) -> Option<FieldPath> {
        match self {
            Problem::UnknownField { path }
            | Problem::WrongType { path, .. }
            | Problem::NotBase64 { path, .. }
            | Problem::DataTooLarge { field: path, .. } => Some(path.clone()),
            Problem::NamespaceOnClusterScoped { .. } => {
                Some(FieldPath(vec![Segment::Key("metadata".into()), Segment::Key("namespace".into())]))
            }
            Problem::UnknownKind { .. } | Problem::UnservedVersion { .. } => None,
        }
    }
}

/// What a check of a revision found.
#[derive(Debug, Default)]
pub struct Report {
    /// Sorted by place.
    pub errors: Vec<ValidationError>,
    /// The objects of kinds neither built in nor defined in the repository, which only
    /// the API server can check: `ServiceMonitor.monitoring.coreos.com` → how many.
    pub unchecked: BTreeMap<String, usize>,
}

/// A kind that a CRD of the repository defines.
#[derive(Debug)]
struct CustomKind {
    namespaced: bool,
    /// By version; `None` for a version that is not served.
    versions: BTreeMap<String, Option<Type>>,
}

/// Every kind the check knows.
struct Kinds<'a> {
    builtin: &'a Builtin,
    builtin_groups: BTreeSet<&'a str>,
    /// By (group, kind).
    custom: HashMap<(String, String), CustomKind>,
}

impl<'a> Kinds<'a> {
    fn new(builtin: &'a Builtin, manifests: &[&Manifest]) -> Kinds<'a> {
        let builtin_groups = builtin.kinds.keys().map(|(api_version, _)| group_of(api_version)).collect();
        let mut custom = HashMap::new();
        for manifest in manifests {
            if manifest.api_version() != "apiextensions.k8s.io/v1" || manifest.kind() != "CustomResourceDefinition" {
                continue;
            }
            let spec = &manifest.object["spec"];
            let (Some(group), Some(kind)) = (spec["group"].as_str(), spec["names"]["kind"].as_str()) else { continue };
            let versions = spec["versions"].as_array().into_iter().flatten().filter_map(|version| {
                let name = version["name"].as_str()?.to_owned();
                let served = version["served"].as_bool().unwrap_or(false);
                let schema = version["schema"].get("openAPIV3Schema").map_or(Type::Any, Type::from_openapi_v3);
                Some((name, served.then(|| custom_root(schema))))
            });
            let namespaced = spec["scope"].as_str() != Some("Cluster");
            custom.insert((group.to_owned(), kind.to_owned()), CustomKind { namespaced, versions: versions.collect() });
        }
        Kinds { builtin, builtin_groups, custom }
    }

    /// Where a kind of this name is served, for a hint: `Deployment is in apps/v1`.
    fn hint(&self, kind: &str) -> Option<String> {
        let mut names = BTreeSet::new();
        let mut places = BTreeSet::new();
        for (api_version, name) in self.builtin.kinds.keys() {
            if name.eq_ignore_ascii_case(kind) {
                names.insert(name.clone());
                places.insert(api_version.clone());
            }
        }
        for ((group, name), custom) in &self.custom {
            if name.eq_ignore_ascii_case(kind) {
                names.insert(name.clone());
                places.extend(custom.versions.iter().filter(|(_, t)| t.is_some()).map(|(v, _)| format!("{group}/{v}")));
            }
        }
        let names: Vec<String> = names.into_iter().collect();
        (!places.is_empty())
            .then(|| format!("{} is in {}", names.join(" or "), places.into_iter().collect::<Vec<_>>().join(", ")))
    }

    /// The scope and type of `manifest`'s kind, or the problem with its kind; `Ok(None)`:
    /// a kind this check does not know.
    fn of(&self, manifest: &Manifest) -> Result<Option<(bool, &Type)>, Problem> {
        let (api_version, kind) = (manifest.api_version(), manifest.kind());
        let group = group_of(api_version);
        let version = api_version.rsplit('/').next().unwrap_or(api_version);
        if let Some(custom) = self.custom.get(&(group.to_owned(), kind.to_owned())) {
            return match custom.versions.get(version) {
                Some(Some(schema)) => Ok(Some((custom.namespaced, schema))),
                _ => Err(Problem::UnservedVersion {
                    api_version: api_version.to_owned(),
                    by: format!("the repository's CRD of {kind}"),
                    hint: self.hint(kind),
                }),
            };
        }
        if let Some(builtin) = self.builtin.kinds.get(&(api_version.to_owned(), kind.to_owned())) {
            return Ok(Some((builtin.namespaced, &self.builtin.types[&builtin.type_name])));
        }
        let custom_group = self.custom.keys().any(|(custom_group, _)| custom_group == group);
        if !self.builtin_groups.contains(group) && !custom_group {
            return Ok(None);
        }
        let version_served = self.builtin.kinds.keys().any(|(served, _)| served == api_version)
            || self.custom.iter().any(|((g, _), c)| g == group && c.versions.get(version).is_some_and(Option::is_some));
        let hint = self.hint(kind);
        if version_served {
            Err(Problem::UnknownKind { kind: kind.to_owned(), api_version: api_version.to_owned(), hint })
        } else {
            let by = format!("Kubernetes {}", self.builtin.kubernetes);
            Err(Problem::UnservedVersion { api_version: api_version.to_owned(), by, hint })
        }
    }
}

/// A custom resource always has apiVersion, kind and metadata, whatever its schema says.
fn custom_root(schema: Type) -> Type {
    match schema {
        Type::Object { mut fields, rest } => {
            Type::with_object_keys(&mut fields);
            Type::Object { fields, rest }
        }
        other => other,
    }
}

fn group_of(api_version: &str) -> &str {
    api_version.split_once('/').map_or("", |(group, _)| group)
}

/// Checks every object and job template of `rendered`, rendered from `root`, against
/// the built-in API and the repository's CRDs.
pub fn check(root: &Path, rendered: &Rendered) -> Report {
    check_with(Builtin::get(), root, rendered)
}

fn check_with(builtin: &Builtin, root: &Path, rendered: &Rendered) -> Report {
    let manifests: Vec<&Manifest> =
        rendered.manifests.iter().chain(rendered.jobs.iter().map(|job| &job.template)).collect();
    let kinds = Kinds::new(builtin, &manifests);
    let mut report = Report::default();
    let mut texts = Texts::default();
    for manifest in manifests {
        let mut problems = Vec::new();
        match kinds.of(manifest) {
            Err(problem) => problems.push(problem),
            Ok(None) => {
                let gvk = manifest.gvk();
                *report.unchecked.entry(format!("{}.{}", gvk.kind, gvk.group)).or_default() += 1;
            }
            Ok(Some((namespaced, schema))) => {
                if !namespaced && manifest.namespace().is_some() {
                    problems.push(Problem::NamespaceOnClusterScoped { kind: manifest.kind().to_owned() });
                }
                Checker { types: &builtin.types, problems: &mut problems }.value(
                    &manifest.object,
                    schema,
                    &mut Vec::new(),
                );
                problems.extend(data_size(manifest));
            }
        }
        for problem in problems {
            let line = problem.path().and_then(|path| texts.line(root, &manifest.location, &path.0));
            let at = Location { file: manifest.location.file.clone(), line: line.unwrap_or(manifest.location.line) };
            report.errors.push(ValidationError { at, object: manifest.describe(), problem });
        }
    }
    report.errors.sort_by(|a, b| a.at.cmp(&b.at));
    report
}

/// The API server's rejections of objects `sent` in a dry run, each placed at the line
/// of the field its message names, where it names one: `run` and `validate --cluster`
/// both report them so.
pub fn place_rejections(root: &Path, sent: &[&Planned], errors: Vec<ApplyError>) -> Vec<ApplyError> {
    let mut texts = Texts::default();
    errors
        .into_iter()
        .map(|error| {
            let placed = sent.iter().find(|p| p.id == error.id && p.origin == error.origin).and_then(|planned| {
                let (Some(file), Some(line)) = crate::status::file_and_line(&planned.origin) else { return None };
                let at = Location { file: file.into(), line };
                let object = serde_json::to_value(&planned.object).ok()?;
                let path = rejection::field_in(&error.message, &object)?;
                let line = texts.line(root, &at, &path)?;
                Some(Location { line, ..at })
            });
            match placed {
                Some(at) => ApplyError { origin: at.to_string(), ..error },
                None => error,
            }
        })
        .collect()
}

/// The files objects came from, read again for the lines of fields.
#[derive(Default)]
struct Texts {
    files: HashMap<std::path::PathBuf, Option<String>>,
}

impl Texts {
    /// The line of `path` in the object at `at`, if it was written there: not for what
    /// kustomize, helm or a dashboard made, placed at the file that made it.
    fn line(&mut self, root: &Path, at: &Location, path: &[Segment]) -> Option<usize> {
        let file = root.join(&at.file);
        let made = at.file.starts_with("charts")
            || at.file.starts_with("dashboards")
            || file.parent().and_then(crate::render::kustomize::kustomization_file).as_deref() == Some(file.as_path());
        if made {
            return None;
        }
        let text = self.files.entry(at.file.clone()).or_insert_with(|| std::fs::read_to_string(&file).ok());
        crate::render::field_line(text.as_deref()?, at.line, path)
    }
}

/// Walks a value along its type, collecting problems.
struct Checker<'a, 'p> {
    types: &'a HashMap<String, Type>,
    problems: &'p mut Vec<Problem>,
}

impl Checker<'_, '_> {
    fn value(&mut self, value: &Value, expected: &Type, path: &mut Vec<Segment>) {
        // A null is "not set" to the API server's decoder, whatever the type.
        if value.is_null() {
            return;
        }
        let fits = match (expected, value) {
            (Type::Any, _) => true,
            (Type::Ref(name), _) => match self.types.get(name) {
                Some(named) => return self.value(value, named, path),
                None => true,
            },
            (Type::String, Value::String(_)) => true,
            (Type::Bytes, Value::String(text)) => {
                // Go's base64 decoder of []byte fields skips line breaks.
                let text: String = text.chars().filter(|c| !matches!(c, '\r' | '\n')).collect();
                if let Err(e) = base64::engine::general_purpose::STANDARD.decode(text) {
                    let path = FieldPath(path.clone());
                    self.problems.push(Problem::NotBase64 { path, reason: e.to_string() });
                }
                true
            }
            (Type::Integer, Value::Number(n)) => n.is_i64() || n.is_u64(),
            (Type::Number, Value::Number(_)) => true,
            (Type::Boolean, Value::Bool(_)) => true,
            (Type::IntOrString, Value::String(_)) => true,
            (Type::IntOrString, Value::Number(n)) => n.is_i64() || n.is_u64(),
            (Type::Quantity, Value::String(_) | Value::Number(_)) => true,
            (Type::Array(items), Value::Array(elements)) => {
                for (index, element) in elements.iter().enumerate() {
                    path.push(Segment::Index(index));
                    self.value(element, items, path);
                    path.pop();
                }
                true
            }
            (Type::Object { fields, rest }, Value::Object(entries)) => {
                self.object(entries, fields, rest.as_deref(), path);
                true
            }
            _ => false,
        };
        if !fits {
            let path = FieldPath(path.clone());
            self.problems.push(Problem::WrongType { path, expected: describe(expected), found: found(value) });
        }
    }

    fn object(
        &mut self,
        entries: &Map<String, Value>,
        fields: &BTreeMap<String, Type>,
        rest: Option<&Type>,
        path: &mut Vec<Segment>,
    ) {
        for (key, value) in entries {
            path.push(Segment::Key(key.clone()));
            match fields.get(key).or(rest) {
                Some(field) => self.value(value, field, path),
                None => self.problems.push(Problem::UnknownField { path: FieldPath(path.clone()) }),
            }
            path.pop();
        }
    }
}

fn describe(expected: &Type) -> &'static str {
    match expected {
        Type::String => "a string",
        Type::Bytes => "a base64 string",
        Type::Integer => "an integer",
        Type::Number => "a number",
        Type::Boolean => "a boolean",
        Type::IntOrString => "an integer or a string",
        Type::Quantity => "a quantity (a string or a number)",
        Type::Array(_) => "a sequence",
        Type::Object { .. } => "a mapping",
        Type::Any | Type::Ref(_) => "a value",
    }
}

fn found(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a fraction",
        Value::Number(_) => "an integer",
        Value::String(_) => "a string",
        Value::Array(_) => "a sequence",
        Value::Object(_) => "a mapping",
    }
}

/// A ConfigMap or Secret holding more data than the API server takes.
fn data_size(manifest: &Manifest) -> Option<Problem> {
    let strings = |field: &str| manifest.object[field].as_object().into_iter().flatten();
    let decoded = |value: &Value| {
        let text: String = value.as_str().unwrap_or_default().chars().filter(|c| !matches!(c, '\r' | '\n')).collect();
        base64::engine::general_purpose::STANDARD.decode(text).map_or(0, |bytes| bytes.len())
    };
    let text_len = |value: &Value| value.as_str().map_or(0, str::len);
    let (what, bytes, fields) = match (manifest.api_version(), manifest.kind()) {
        ("v1", "ConfigMap") => (
            "data and binaryData",
            strings("data").map(|(_, v)| text_len(v)).sum::<usize>()
                + strings("binaryData").map(|(_, v)| decoded(v)).sum::<usize>(),
            ["data", "binaryData"],
        ),
        ("v1", "Secret") => {
            // The API server writes stringData over data, key by key, before it checks.
            let mut sizes: HashMap<&String, usize> = strings("data").map(|(k, v)| (k, decoded(v))).collect();
            sizes.extend(strings("stringData").map(|(k, v)| (k, text_len(v))));
            ("data and stringData", sizes.values().sum(), ["data", "stringData"])
        }
        _ => return None,
    };
    let field = fields.into_iter().find(|field| manifest.object.get(field).is_some()).unwrap_or(fields[0]);
    let field = FieldPath(vec![Segment::Key(field.to_owned())]);
    (bytes > MAX_DATA_BYTES).then_some(Problem::DataTooLarge { what, bytes, field })
}

#[cfg(test)]
mod tests;
