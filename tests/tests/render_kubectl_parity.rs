//! The agent reads manifests as kubectl reads them.
//!
//! Every file of `tests/data/yaml-parity/` (see its README) goes through the agent's
//! `render` and `resolve_scope`, with scopes from the API server's discovery, and through
//! `kubectl create --dry-run=client -o json -f FILE` against the same API server; the
//! objects must be identical, or both must refuse the file, or (for `divergent/`) kubectl
//! accepts what the agent refuses on purpose. Edge values sit in objects of a CRD that
//! preserves unknown fields, so kubectl passes them through unvalidated.

use std::path::{Path, PathBuf};
use std::process::Command;

use gitops_agent::render::{self, Manifest};
use gitops_tests::cluster::{self, eventually};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, PostParams};
use kube::core::GroupVersionKind;
use kube::discovery::{Discovery, Scope};
use serde_json::{Value, json};

const CORPUS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/data/yaml-parity");

/// The objects a file yields, or why it yields none.
type Outcome = Result<Vec<Value>, String>;

#[tokio::test]
async fn the_agent_decodes_every_case_as_kubectl_does() {
    let discovery = discovery_with_probes().await;
    let kubectl = Kubectl::new();
    let mut failures = Vec::new();
    let cases = cases();
    for case in &cases {
        let name = case.strip_prefix(CORPUS).unwrap().display().to_string();
        let agent = agent(case, &discovery);
        let kubectl = kubectl.create_dry_run(case);
        let verdict = match (expectation(case), &agent, &kubectl) {
            (Expect::Same, Ok(agent), Ok(kubectl)) if agent == kubectl => Ok(format!("{} objects", agent.len())),
            (Expect::Same, Ok(agent), Ok(kubectl)) => Err(differences(agent, kubectl)),
            (Expect::BothRefuse, Err(agent), Err(kubectl)) => Ok(format!("agent: {agent}\n    kubectl: {kubectl}")),
            (Expect::AgentRefuses, Err(agent), Ok(_)) => Ok(format!("agent: {agent}")),
            (expected, agent, kubectl) => {
                Err(format!("expected {expected:?}\nagent: {agent:#?}\nkubectl: {kubectl:#?}"))
            }
        };
        match verdict {
            Ok(summary) => println!("ok   {name}: {summary}"),
            Err(mismatch) => {
                println!("FAIL {name}");
                failures.push(format!("{name}:\n{mismatch}"));
            }
        }
    }
    assert!(cases.len() > 50, "the corpus is there: {} cases", cases.len());
    assert!(failures.is_empty(), "{} of {} cases differ:\n\n{}", failures.len(), cases.len(), failures.join("\n\n"));
}

/// Where the agent's objects differ from kubectl's, one line per JSON path.
fn differences(agent: &[Value], kubectl: &[Value]) -> String {
    fn walk(path: String, agent: Option<&Value>, kubectl: Option<&Value>, found: &mut Vec<String>) {
        match (agent, kubectl) {
            (Some(Value::Object(a)), Some(Value::Object(k))) => {
                for key in a.keys().chain(k.keys().filter(|key| !a.contains_key(*key))) {
                    walk(format!("{path}.{key}"), a.get(key), k.get(key), found);
                }
            }
            (Some(Value::Array(a)), Some(Value::Array(k))) => {
                for i in 0..a.len().max(k.len()) {
                    walk(format!("{path}[{i}]"), a.get(i), k.get(i), found);
                }
            }
            (a, k) if a != k => found.push(format!("{path}: agent {a:?}, kubectl {k:?}")),
            _ => {}
        }
    }
    let mut found = Vec::new();
    for i in 0..agent.len().max(kubectl.len()) {
        walk(format!("object {i}"), agent.get(i), kubectl.get(i), &mut found);
    }
    found.join("\n")
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    Same,
    BothRefuse,
    AgentRefuses,
}

fn expectation(case: &Path) -> Expect {
    if case.parent().unwrap().ends_with("divergent") {
        Expect::AgentRefuses
    } else if case.file_name().unwrap().to_string_lossy().starts_with("reject-") {
        Expect::BothRefuse
    } else {
        Expect::Same
    }
}

fn cases() -> Vec<PathBuf> {
    let files = |dir: &Path| {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| path.extension().is_some_and(|ext| ext == "yaml" || ext == "json"))
            .collect::<Vec<_>>()
    };
    let corpus = Path::new(CORPUS);
    let mut cases = [files(corpus), files(&corpus.join("divergent"))].concat();
    cases.sort();
    cases
}

/// The agent's objects for one file, rendered from a repository holding only it.
fn agent(case: &Path, discovery: &Discovery) -> Outcome {
    let repo = tempfile::tempdir().unwrap();
    std::fs::create_dir(repo.path().join("manifests")).unwrap();
    std::fs::copy(case, repo.path().join("manifests").join(case.file_name().unwrap())).unwrap();
    let lines =
        |errors: Vec<render::RenderError>| errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
    let mut manifests = render::render(repo.path(), "default").map_err(lines)?.manifests;
    let namespaced = |m: &Manifest| discovery.resolve_gvk(&m.gvk()).map(|(_, caps)| caps.scope == Scope::Namespaced);
    gitops_agent::plan::resolve_scope(&mut manifests, namespaced, "default", &gitops_agent::access::Access::Cluster)
        .map_err(lines)?;
    Ok(manifests.into_iter().map(|m: Manifest| m.object).collect())
}

/// kubectl, pointed at the shared control plane, with a discovery cache of its own.
struct Kubectl {
    cache: tempfile::TempDir,
}

impl Kubectl {
    fn new() -> Kubectl {
        Kubectl { cache: tempfile::tempdir().unwrap() }
    }

    fn create_dry_run(&self, case: &Path) -> Outcome {
        let output = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(cluster::shared().kubeconfig())
            .arg("--cache-dir")
            .arg(self.cache.path())
            .args(["create", "--dry-run=client", "-o", "json", "-f"])
            .arg(case)
            .output()
            .expect("kubectl runs");
        if !output.status.success() {
            return Err(String::from_utf8_lossy(&output.stderr).trim().to_owned());
        }
        // One JSON object per created object, one after another (a List in some versions).
        let mut objects = Vec::new();
        for value in serde_json::Deserializer::from_slice(&output.stdout).into_iter::<Value>() {
            match value.expect("kubectl prints JSON") {
                Value::Object(mut list) if list.get("kind") == Some(&json!("List")) => {
                    objects.extend(list.remove("items").and_then(|items| items.as_array().cloned()).unwrap_or_default())
                }
                object => objects.push(object),
            }
        }
        Ok(objects.into_iter().map(int64_or_float64).collect())
    }
}

/// Numbers as Kubernetes holds them, an int64 or else a float64: kubectl prints the
/// float64 1e19 as `10000000000000000000`, which serde_json would read as a u64. The
/// agent's values must already be in this form, so they are compared untouched.
fn int64_or_float64(value: Value) -> Value {
    match value {
        Value::Number(n) if n.as_i64().is_none() => Value::from(n.as_f64().expect("a JSON number is a float64")),
        Value::Array(items) => items.into_iter().map(int64_or_float64).collect(),
        Value::Object(fields) => Value::Object(fields.into_iter().map(|(k, v)| (k, int64_or_float64(v))).collect()),
        other => other,
    }
}

/// Installs the `Probe` kind, which keeps any field as written, and returns discovery
/// once the API server serves it.
async fn discovery_with_probes() -> Discovery {
    let client = cluster::client().await;
    let crd: CustomResourceDefinition = serde_json::from_value(json!({
        "metadata": { "name": "probes.parity.test.scale.dev" },
        "spec": {
            "group": "parity.test.scale.dev",
            "scope": "Namespaced",
            "names": { "plural": "probes", "singular": "probe", "kind": "Probe", "listKind": "ProbeList" },
            "versions": [{
                "name": "v1", "served": true, "storage": true,
                "schema": { "openAPIV3Schema": { "type": "object", "x-kubernetes-preserve-unknown-fields": true } }
            }]
        }
    }))
    .unwrap();
    Api::<CustomResourceDefinition>::all(client.clone()).create(&PostParams::default(), &crd).await.unwrap();
    let probe = GroupVersionKind::gvk("parity.test.scale.dev", "v1", "Probe");
    eventually("the Probe kind to be served", || async {
        let discovery = Discovery::new(client.clone()).run().await.ok()?;
        discovery.resolve_gvk(&probe).is_some().then_some(discovery)
    })
    .await
}
