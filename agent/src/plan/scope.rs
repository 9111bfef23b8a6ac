//! Scope: what only the API server knows about rendered objects, which kinds exist and
//! which are namespaced, applied to them as kubectl applies it.

use serde_json::Value;

use crate::access::Access;
use crate::render::{Manifest, Problem, RenderError, duplicates};

/// Checks every manifest's kind against `namespaced` (filled from API discovery: `None`
/// for a kind the server does not serve, else whether it is namespaced), gives
/// namespaced objects without a namespace `default_namespace`, and then finds the
/// objects defined twice, which only now compare equal (an object in the default
/// namespace written with and without `namespace:`), and those `access` refuses.
/// Every problem is reported; on error the manifests may be partly defaulted.
pub fn resolve_scope(
    manifests: &mut [Manifest],
    namespaced: impl Fn(&Manifest) -> Option<bool>,
    default_namespace: &str,
    access: &Access,
) -> Result<(), Vec<RenderError>> {
    let mut errors = Vec::new();
    for manifest in manifests.iter_mut() {
        let problem = match (namespaced(manifest), manifest.namespace()) {
            (None, _) => Some(Problem::UnknownKind {
                kind: manifest.kind().to_owned(),
                api_version: manifest.api_version().to_owned(),
            }),
            (Some(false), Some(_)) => Some(Problem::NamespaceOnClusterScoped { kind: manifest.kind().to_owned() }),
            (Some(false), None) | (Some(true), Some(_)) => None,
            (Some(true), None) => {
                let namespace = manifest.default_namespace.as_deref().unwrap_or(default_namespace);
                manifest.object["metadata"]["namespace"] = Value::from(namespace);
                None
            }
        }
        .or_else(|| {
            let refusal = access.refusal(manifest.namespace())?;
            Some(Problem::Refused { object: manifest.describe(), refusal })
        });
        if let Some(problem) = problem {
            errors.push(RenderError { at: manifest.location.clone(), problem });
        }
    }
    errors.extend(duplicates(manifests));
    if errors.is_empty() {
        return Ok(());
    }
    errors.sort_by(|a, b| a.at.cmp(&b.at));
    Err(errors)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::render::Location;

    fn manifest(line: usize, object: Value) -> Manifest {
        Manifest::new(object, Location { file: "manifests/a.yaml".into(), line })
    }

    fn discovery(manifest: &Manifest) -> Option<bool> {
        match manifest.kind() {
            "ConfigMap" => Some(true),
            "Namespace" => Some(false),
            _ => None,
        }
    }

    fn messages(result: Result<(), Vec<RenderError>>) -> Vec<String> {
        result.unwrap_err().iter().map(ToString::to_string).collect()
    }

    #[test]
    fn namespaced_objects_get_the_default_namespace() {
        let mut manifests = [
            manifest(1, json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"}})),
            manifest(5, json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a", "namespace": "x"}})),
            manifest(9, json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}})),
        ];
        resolve_scope(&mut manifests, discovery, "team", &Access::Cluster).unwrap();
        let namespaces: Vec<_> = manifests.iter().map(Manifest::namespace).collect();
        assert_eq!(namespaces, [Some("team"), Some("x"), None]);
    }

    #[test]
    fn wrong_scopes_and_unknown_kinds_are_errors() {
        let mut manifests = [
            manifest(1, json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x", "namespace": "y"}})),
            manifest(4, json!({"apiVersion": "example.com/v2", "kind": "Widget", "metadata": {"name": "w"}})),
        ];
        assert_eq!(
            messages(resolve_scope(&mut manifests, discovery, "default", &Access::Cluster)),
            [
                "manifests/a.yaml:1: Namespace is cluster-scoped; remove metadata.namespace",
                "manifests/a.yaml:4: unknown kind Widget in group/version example.com/v2",
            ]
        );
    }

    #[test]
    fn duplicates_are_found_after_defaulting() {
        let mut manifests = [
            manifest(
                1,
                json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a", "namespace": "default"}}),
            ),
            manifest(7, json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"}})),
        ];
        assert_eq!(
            messages(resolve_scope(&mut manifests, discovery, "default", &Access::Cluster)),
            ["manifests/a.yaml:7: ConfigMap default/a is defined twice: here and at manifests/a.yaml:1"]
        );
    }
}
