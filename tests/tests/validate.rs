//! `gitops-agent validate` against the API server it stands in for: every object of a
//! corpus of real mistakes (`tests/corpus/validate/`) is dry-run applied to the real
//! API server, as `run` applies it, and validate flags exactly the objects the API
//! server refuses; its output names each at its `file:line`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use gitops_agent::render::{self, Manifest};
use gitops_agent::validate;
use gitops_tests::cluster;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::discovery::Discovery;

fn corpus() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus/validate")
}

/// The corpus, and a ConfigMap of 1.2 MB of data (too big a file to commit), in a copy.
fn corpus_with_big_config_map() -> tempfile::TempDir {
    let copy = tempfile::tempdir().unwrap();
    let manifests = copy.path().join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    for entry in std::fs::read_dir(corpus().join("manifests")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), manifests.join(entry.file_name())).unwrap();
    }
    let big = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: big\ndata:\n  small: x\n  blob: {}\n",
        "x".repeat(1_200_000)
    );
    std::fs::write(manifests.join("big.yaml"), big).unwrap();
    copy
}

/// What the API server says to a dry-run server-side apply of `manifest` in `namespace`
/// (if namespaced), with the agent's field manager and parameters: `None` if it takes it.
async fn api_server_refusal(
    client: &kube::Client,
    discovery: &Discovery,
    namespace: &str,
    manifest: &Manifest,
) -> Option<String> {
    let gvk = manifest.gvk();
    let Some((resource, capabilities)) = discovery.resolve_gvk(&gvk) else {
        return Some(format!("{} {} is not served", manifest.api_version(), manifest.kind()));
    };
    let mut object = manifest.object.clone();
    let api: Api<DynamicObject> = if capabilities.scope == kube::discovery::Scope::Namespaced {
        object["metadata"]["namespace"] = namespace.into();
        Api::namespaced_with(client.clone(), namespace, &resource)
    } else {
        Api::all_with(client.clone(), &resource)
    };
    let params = PatchParams::apply(gitops_agent::FIELD_MANAGER).dry_run();
    api.patch(manifest.name(), &params, &Patch::Apply(&object)).await.err().map(|e| e.to_string())
}

fn flagged(root: &Path) -> (Vec<Manifest>, BTreeMap<String, Vec<String>>) {
    let rendered = render::render(root, "monitoring").unwrap_or_else(|e| panic!("{e:#?}"));
    let mut flagged: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for error in validate::check(root, &rendered).errors {
        flagged.entry(error.object.clone()).or_default().push(error.to_string());
    }
    (rendered.manifests, flagged)
}

#[tokio::test]
async fn validate_flags_exactly_what_the_api_server_refuses() {
    let client = cluster::client().await;
    let namespace = cluster::namespace(&client, "validate").await;
    let copy = corpus_with_big_config_map();
    let (manifests, flagged) = flagged(copy.path());
    // The CRD is applied for real, so that its kinds are served to the dry runs.
    let crds: Vec<&Manifest> = manifests.iter().filter(|m| m.kind() == "CustomResourceDefinition").collect();
    let crd_yaml: Vec<String> = crds.iter().map(|m| serde_json::to_string(&m.object).unwrap()).collect();
    cluster::apply_yaml(&client, &crd_yaml.join("\n---\n")).await;
    let discovery = cluster::eventually("the corpus CRD to be served", || async {
        let discovery = Discovery::new(client.clone()).run().await.ok()?;
        let gvk = kube::core::GroupVersionKind::gvk("corpus.gitops.scale.dev", "v1", "Pipeline");
        discovery.resolve_gvk(&gvk).is_some().then_some(discovery)
    })
    .await;

    let mut disagreements = Vec::new();
    for manifest in &manifests {
        let object = manifest.describe();
        let refusal = api_server_refusal(&client, &discovery, &namespace, manifest).await;
        let ours = flagged.get(&object);
        // The API server drops the namespace of a cluster-scoped object; `run` refuses
        // it (plan/scope.rs), and so does validate.
        if manifest.kind() == "ClusterRole" {
            assert!(refusal.is_none() && ours.is_some(), "{object}: {refusal:?} / {ours:?}");
            continue;
        }
        if refusal.is_some() != ours.is_some() {
            disagreements.push(format!("{object} at {}: API server {refusal:?}, validate {ours:?}", manifest.location));
        }
    }
    assert_eq!(disagreements, Vec::<String>::new());
    assert!(flagged.len() >= 12, "the corpus holds mistakes: {flagged:#?}");
    assert!(manifests.len() > flagged.len(), "and objects without one");
}

#[test]
fn validate_prints_each_mistake_at_its_line_and_fails() {
    let copy = corpus_with_big_config_map();
    let output = Command::new(gitops_tests::agent::binary()).arg("validate").arg(copy.path()).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    let expected = std::fs::read_to_string(corpus().join("expected.txt")).unwrap();
    let big = "manifests/big.yaml:5: ConfigMap big: data and binaryData hold 1200001 bytes; the API server takes at most 1048576 (1 MiB)";
    // In place order: big.yaml comes first.
    assert_eq!(stdout, format!("{big}\n{expected}"));
}

#[test]
fn a_relative_directory_in_a_repository_is_validated_as_an_absolute_one() {
    // The working directory holds .git: the search for the repository root, which a
    // kustomization's bases need, used to stop there and find the files nowhere.
    let dir = tempfile::tempdir().unwrap();
    let repo = gitops_tests::render::template_repository(dir.path(), "127.0.0.1:5999");
    let tools = gitops_tests::render::binaries();
    let output = Command::new(gitops_tests::agent::binary())
        .current_dir(&repo)
        .args(["validate", "clusters/local", "--kustomize-bin"])
        .arg(&tools.kustomize)
        .arg("--helm-bin")
        .arg(&tools.helm)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.starts_with("clusters/local: ") && stdout.ends_with(" no errors\n"), "{stdout}");
}

#[tokio::test]
async fn validate_cluster_adds_the_api_servers_dry_run_at_the_line_of_the_field() {
    let client = cluster::client().await;
    let namespace = cluster::namespace(&client, "validate-cluster").await;
    let repo = tempfile::tempdir().unwrap();
    let manifests = repo.path().join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    // Offline these are fine; only the API server's validation knows better.
    let deployment = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  selector:\n    matchLabels: {app: web}\n  template:\n    metadata:\n      labels:\n        app: other\n    spec:\n      containers:\n      - name: web\n        image: nginx:1.27\n";
    let service =
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  type: Bogus\n  ports:\n  - port: 80\n";
    std::fs::write(manifests.join("deployment.yaml"), deployment).unwrap();
    std::fs::write(manifests.join("service.yaml"), service).unwrap();
    let validate = |args: &[&str]| {
        let output = Command::new(gitops_tests::agent::binary())
            .arg("validate")
            .arg(repo.path())
            .args(args)
            .args(["--default-namespace", &namespace, "--namespace", &namespace])
            .env("KUBECONFIG", cluster::shared().kubeconfig())
            .output()
            .unwrap();
        (output.status.code(), String::from_utf8_lossy(&output.stdout).into_owned())
    };

    let (code, offline) = validate(&[]);
    assert_eq!(code, Some(0), "{offline}");
    let (code, stdout) = validate(&["--cluster"]);
    assert_eq!(code, Some(1), "{stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], offline.trim_end(), "the offline check first");
    assert_eq!(lines[1], "the API server rejects the revision in a dry run:");
    assert!(
        lines[2].starts_with(&format!(
            "manifests/deployment.yaml:10: Deployment.apps {namespace}/web: dry-run apply rejected: "
        )),
        "the line of spec.template.metadata.labels: {stdout}"
    );
    assert!(lines[2].contains("`selector` does not match template `labels`"), "{stdout}");
    assert!(
        lines[3].starts_with(&format!("manifests/service.yaml:6: Service {namespace}/web: dry-run apply rejected: ")),
        "the line of spec.type: {stdout}"
    );
    assert_eq!(lines.len(), 4, "{stdout}");

    std::fs::write(manifests.join("deployment.yaml"), deployment.replace("app: other", "app: web")).unwrap();
    std::fs::write(manifests.join("service.yaml"), service.replace("Bogus", "ClusterIP")).unwrap();
    let (code, stdout) = validate(&["--cluster"]);
    assert_eq!(code, Some(0), "{stdout}");
    assert!(stdout.ends_with("the cluster's dry run accepts every object; 2 would change\n"), "{stdout}");
    let deployments: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        &namespace,
        &kube::api::ApiResource::erase::<k8s_openapi::api::apps::v1::Deployment>(&()),
    );
    assert!(deployments.get_opt("web").await.unwrap().is_none(), "a dry run writes nothing");
}

/// `run`'s own dry-run gate places the API server's rejection as `validate --cluster`
/// does: `/status` names the line of the field, not the start of the document.
#[tokio::test]
async fn run_reports_the_api_servers_rejection_at_the_line_of_the_field() {
    use gitops_tests::agent::{Agent, AgentConfig};
    let client = cluster::client().await;
    let namespace = cluster::namespace(&client, "run-rejected").await;
    let repo = gitops_tests::git::GitRepo::new();
    repo.write(
        "manifests/service.yaml",
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  type: Bogus\n  ports:\n  - port: 80\n",
    );
    let rejected = repo.commit("a Service of a type that does not exist");
    let agent = Agent::start(client, AgentConfig::new(repo.file_url(), &namespace)).await;
    let errors = cluster::eventually("the sync to fail", || async {
        let status = agent.status().await;
        let errors = status["errors"].as_array().filter(|errors| !errors.is_empty())?.clone();
        Some(errors)
    })
    .await;
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0]["file"], "manifests/service.yaml", "{errors:?}");
    assert_eq!(errors[0]["line"], 6, "the line of spec.type: {errors:?}");
    assert_eq!(errors[0]["object"], format!("Service {namespace}/web"), "{errors:?}");
    assert!(errors[0]["message"].as_str().unwrap().contains("spec.type"), "{errors:?}");
    assert!(agent.status().await["revision"].is_null(), "{rejected} was not applied");
    agent.stop().await;
}
