use std::path::PathBuf;

use crate::render::{self, tests::repo_at_root};

use super::*;

fn errors(root: &Path) -> Vec<String> {
    let rendered = render::render(root, "monitoring").unwrap_or_else(|e| panic!("{e:#?}"));
    check(root, &rendered).errors.iter().map(ToString::to_string).collect()
}

fn config_map(data: &str) -> String {
    format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: big\ndata:\n  blob: {data}\n")
}

#[test]
fn the_corpus_of_real_mistakes_gives_each_its_line_and_message() {
    let corpus = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/corpus/validate");
    let expected = std::fs::read_to_string(corpus.join("expected.txt")).unwrap();
    assert_eq!(errors(&corpus), expected.lines().collect::<Vec<_>>());
}

#[test]
fn configmap_and_secret_data_is_limited_as_the_api_server_limits_it() {
    let at_limit = "x".repeat(MAX_DATA_BYTES);
    let dir = repo_at_root(&[("manifests/cm.yaml", config_map(&at_limit).as_str())]);
    assert_eq!(errors(dir.path()), Vec::<String>::new(), "1 MiB exactly is taken");

    let over = "x".repeat(1_200_000);
    let dir = repo_at_root(&[("manifests/cm.yaml", config_map(&over).as_str())]);
    assert_eq!(
        errors(dir.path()),
        [
            "manifests/cm.yaml:5: ConfigMap big: data and binaryData hold 1200000 bytes; the API server takes at most 1048576 (1 MiB)"
        ]
    );

    // A Secret's data counts decoded; stringData replaces data of the same key.
    let encoded = base64::engine::general_purpose::STANDARD.encode("y".repeat(700_000));
    let secret = format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: s\ndata:\n  a: {encoded}\nstringData:\n  a: short\n  b: {}\n",
        "z".repeat(400_000)
    );
    let dir = repo_at_root(&[("manifests/s.yaml", secret.as_str())]);
    assert_eq!(errors(dir.path()), Vec::<String>::new(), "{} bytes after the merge", 5 + 400_000);
    let secret = secret.replace("  a: short\n", "");
    let dir = repo_at_root(&[("manifests/s.yaml", secret.as_str())]);
    assert_eq!(
        errors(dir.path()),
        [
            "manifests/s.yaml:5: Secret s: data and stringData hold 1100000 bytes; the API server takes at most 1048576 (1 MiB)"
        ]
    );
}

#[test]
fn json_files_and_job_specs_point_at_the_field_too() {
    let json = "{\n  \"apiVersion\": \"v1\",\n  \"kind\": \"ConfigMap\",\n  \"metadata\": {\"name\": \"j\"},\n  \"data\": {\n    \"n\": 1\n  }\n}\n";
    let job = "apiVersion: batch/v1\nkind: Job\nmetadata:\n  name: run\nspec:\n  backoffLimit: many\n  template:\n    spec:\n      restartPolicy: Never\n      containers: [{name: run, image: busybox}]\n";
    let dir = repo_at_root(&[("manifests/j.json", json), ("jobs/run.yaml", job)]);
    assert_eq!(
        errors(dir.path()),
        [
            "jobs/run.yaml:6: Job.batch run: spec.backoffLimit must be an integer, found a string",
            "manifests/j.json:6: ConfigMap j: data.n must be a string, found an integer",
        ]
    );
}

#[test]
fn kinds_of_other_groups_are_left_to_the_api_server() {
    let monitor =
        "apiVersion: monitoring.coreos.com/v1\nkind: ServiceMonitor\nmetadata:\n  name: m\nspec:\n  anything: 1\n";
    let dir = repo_at_root(&[("manifests/m.yaml", monitor)]);
    let rendered = render::render(dir.path(), "monitoring").unwrap();
    let report = check(dir.path(), &rendered);
    assert_eq!(report.errors.len(), 0, "{:?}", report.errors);
    assert_eq!(report.unchecked, BTreeMap::from([("ServiceMonitor.monitoring.coreos.com".to_owned(), 1)]));
}

#[test]
fn the_builtin_api_knows_scopes_and_removed_versions() {
    let builtin = Builtin::get();
    let kind = |api_version: &str, kind: &str| builtin.kinds.get(&(api_version.to_owned(), kind.to_owned()));
    assert_eq!(kind("apps/v1", "Deployment").map(|k| k.namespaced), Some(true));
    assert_eq!(kind("rbac.authorization.k8s.io/v1", "ClusterRole").map(|k| k.namespaced), Some(false));
    assert_eq!(kind("v1", "Namespace").map(|k| k.namespaced), Some(false));
    assert_eq!(kind("apps/v1beta1", "Deployment"), None);
    assert_eq!(kind("policy/v1beta1", "PodSecurityPolicy"), None);
    assert_eq!(kind("v1", "Pod").map(|k| k.type_name.as_str()), Some("io.k8s.api.core.v1.Pod"));
}
