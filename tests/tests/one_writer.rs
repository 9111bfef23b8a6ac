//! One writer: a replica that does not hold the Lease writes nothing, not even a drift
//! correction; a drift check that could not tell leaves the object to the next sync's
//! dry run; an object something else keeps changing back is reported contested and no
//! longer fought over. Against the real API server, with each agent's own requests
//! counted as they leave it.

use std::time::Duration;

use gitops_agent::agent::LeaderElection;
use gitops_agent::drift::{CONTEST_CORRECTIONS, Policy};
use gitops_tests::agent::{Agent, AgentConfig};
use gitops_tests::cluster::{self, configmap, eventually, value};
use gitops_tests::git::GitRepo;
use gitops_tests::requests::counting_client;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::{Patch, PatchParams};

/// Changes `name`'s value as a person (or another controller) would: not as the agent.
async fn edit(cms: &Api<ConfigMap>, name: &str, value: &str, manager: &str) {
    let params = PatchParams { field_manager: Some(manager.to_owned()), ..PatchParams::default() };
    let patch = serde_json::json!({ "data": { "value": value } });
    cms.patch(name, &params, &Patch::Merge(&patch)).await.unwrap_or_else(|e| panic!("editing {name}: {e}"));
}

async fn wait_for_value(cms: &Api<ConfigMap>, name: &str, wanted: &str) {
    eventually(&format!("{name} to hold {wanted:?}"), || async { (value(cms, name).await? == wanted).then_some(()) })
        .await;
}

fn replica(repo: &GitRepo, ns: &str, identity: &str) -> AgentConfig {
    let mut config = AgentConfig::new(repo.file_url(), ns);
    config.local_repo = Some(repo.path());
    config.leader_election =
        Some(LeaderElection { identity: identity.to_owned(), lease_duration: Duration::from_secs(3) });
    config
}

#[tokio::test]
async fn a_replica_whose_lease_is_taken_corrects_no_drift_and_the_new_leader_does() {
    let admin = cluster::client().await;
    let ns = cluster::namespace(&admin, "one-writer").await;
    let cms: Api<ConfigMap> = Api::namespaced(admin.clone(), &ns);
    let leases: Api<Lease> = Api::namespaced(admin.clone(), &ns);
    let repo = GitRepo::new();
    repo.write("manifests/x.yaml", &configmap("x", "from-git"));
    let head = repo.commit("x");

    let (client_a, sent_a) = counting_client(cluster::shared().kubeconfig()).await;
    let a = Agent::start(client_a, replica(&repo, &ns, "replica-a")).await;
    a.applied(&head).await;
    let b = Agent::start(admin.clone(), replica(&repo, &ns, "replica-b")).await;

    // Someone else takes the Lease, for far longer than the test: A must stop writing
    // at once, and B cannot lead yet.
    let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(k8s_openapi::jiff::Timestamp::now());
    let taken = serde_json::json!({ "spec": {
        "holderIdentity": "intruder", "leaseDurationSeconds": 3600, "acquireTime": now, "renewTime": now,
    }});
    leases.patch("gitops-agent", &PatchParams::default(), &Patch::Merge(&taken)).await.unwrap();
    eventually("A to step down", || async { (a.status().await["leader"] == false).then_some(()) }).await;
    let writes_before = sent_a.writes();

    edit(&cms, "x", "edited", "person").await;
    // A's drift watch sees the edit within milliseconds; nobody may undo it now.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(value(&cms, "x").await.as_deref(), Some("edited"), "no replica leads, so nothing corrects x");
    assert_eq!(sent_a.writes(), writes_before, "the deposed replica wrote after losing the Lease");
    assert_eq!(b.status().await["leader"], false);
    a.stop().await;
    assert_eq!(sent_a.writes(), writes_before, "the deposed replica wrote while stopping");

    // The intruder lets go: B leads, syncs git over the edit, and corrects the next one.
    let released = serde_json::json!({ "spec": { "holderIdentity": null, "renewTime": null, "acquireTime": null }});
    leases.patch("gitops-agent", &PatchParams::default(), &Patch::Merge(&released)).await.unwrap();
    b.applied(&head).await;
    wait_for_value(&cms, "x", "from-git").await;
    edit(&cms, "x", "edited again", "person").await;
    wait_for_value(&cms, "x", "from-git").await;
    assert!(b.metric("gitops_drift_corrected_total{kind=\"ConfigMap\"}").await >= 1.0);
    assert_eq!(b.metric("gitops_leader").await, 1.0);
    b.stop().await;
}

#[tokio::test]
async fn a_drift_check_whose_dry_run_fails_leaves_the_object_to_the_next_syncs_dry_run() {
    let admin = cluster::client().await;
    let ns = cluster::namespace(&admin, "unchecked").await;
    let cms: Api<ConfigMap> = Api::namespaced(admin.clone(), &ns);
    let repo = GitRepo::new();
    repo.write("manifests/x.yaml", &configmap("x", "from-git"));
    repo.write("manifests/other.yaml", &configmap("other", "one"));
    let head = repo.commit("x and other");
    let (client, sent) = counting_client(cluster::shared().kubeconfig()).await;
    // Report only: nothing but a sync may put x back.
    let mut config = AgentConfig::new(repo.file_url(), &ns);
    config.drift = Policy::Report;
    let agent = Agent::start(client, config).await;
    agent.trigger_and_wait(head).await;

    // An admission policy refuses dry runs of x (a webhook or quota that is down would
    // do the same), so the drift watch's confirmation of the next edit fails.
    let policy = format!("refuse-dry-runs-{ns}");
    cluster::apply_yaml(
        &admin,
        &format!(
            r#"apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicy
metadata:
  name: {policy}
spec:
  failurePolicy: Fail
  matchConstraints:
    resourceRules:
    - apiGroups: [""]
      apiVersions: ["v1"]
      operations: ["UPDATE"]
      resources: ["configmaps"]
  matchConditions:
  - name: dry-runs-of-x
    expression: "request.dryRun == true && request.name == 'x'"
  validations:
  - expression: "false"
    message: dry runs of x are refused for this test
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicyBinding
metadata:
  name: {policy}
spec:
  policyName: {policy}
  validationActions: [Deny]
  matchResources:
    namespaceSelector:
      matchLabels:
        kubernetes.io/metadata.name: {ns}
"#
        ),
    )
    .await;
    let probe = |refused: bool| {
        let cms = cms.clone();
        async move {
            let params = PatchParams::apply("gitops-tests-probe").dry_run();
            let patch = serde_json::json!({ "apiVersion": "v1", "kind": "ConfigMap", "metadata": { "name": "x" } });
            (cms.patch("x", &params, &Patch::Apply(&patch)).await.is_err() == refused).then_some(())
        }
    };
    eventually("the policy to refuse dry runs of x", || probe(true)).await;

    let dry_runs = sent.dry_runs();
    edit(&cms, "x", "edited", "person").await;
    eventually("the drift watch to try its dry run of x", || async { (sent.dry_runs() > dry_runs).then_some(()) })
        .await;
    assert_eq!(agent.status().await["drifted"], serde_json::json!([]), "a check that failed found nothing");

    for kind in ["ValidatingAdmissionPolicyBinding", "ValidatingAdmissionPolicy"] {
        let gvk = kube::api::GroupVersionKind::gvk("admissionregistration.k8s.io", "v1", kind);
        let api: Api<kube::api::DynamicObject> = Api::all_with(admin.clone(), &kube::api::ApiResource::from_gvk(&gvk));
        api.delete(&policy, &Default::default()).await.unwrap();
    }
    eventually("dry runs of x to pass again", || probe(false)).await;

    // A commit that changes only the other object: the sync must not take x as in line unchecked.
    repo.write("manifests/other.yaml", &configmap("other", "two"));
    agent.trigger_and_wait(repo.commit("other")).await;
    assert_eq!(value(&cms, "other").await.as_deref(), Some("two"));
    assert_eq!(value(&cms, "x").await.as_deref(), Some("from-git"), "the sync dry-ran x and put it back");
    agent.stop().await;
}

#[tokio::test]
async fn an_object_another_writer_keeps_changing_back_is_contested_not_fought_over() {
    let admin = cluster::client().await;
    let ns = cluster::namespace(&admin, "contested").await;
    let cms: Api<ConfigMap> = Api::namespaced(admin.clone(), &ns);
    let repo = GitRepo::new();
    repo.write("manifests/x.yaml", &configmap("x", "from-git"));
    let head = repo.commit("x");
    let agent = Agent::start(admin.clone(), AgentConfig::new(repo.file_url(), &ns)).await;
    agent.trigger_and_wait(head).await;

    // Another controller sets its own value whenever the agent has put git's back.
    let rounds = CONTEST_CORRECTIONS + 4;
    let mut corrected = 0;
    for round in 0..rounds {
        edit(&cms, "x", &format!("theirs-{round}"), "other-controller").await;
        let back = tokio::time::timeout(Duration::from_secs(3), async {
            while value(&cms, "x").await.as_deref() != Some("from-git") {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        corrected += usize::from(back.is_ok());
    }
    assert_eq!(corrected, CONTEST_CORRECTIONS + 1, "corrections stop once the object is contested");
    assert_eq!(agent.metric("gitops_drift_contested_total{kind=\"ConfigMap\"}").await, 1.0);
    assert_eq!(agent.metric("gitops_drift_corrected_total{kind=\"ConfigMap\"}").await, corrected as f64);
    let drifted = agent.status().await["drifted"].clone();
    assert_eq!(drifted[0]["name"], "x", "{drifted}");
    assert_eq!(drifted[0]["contested"], true, "{drifted}");
    agent.stop().await;
}
