//! Kubernetes Events for what the agent does, as `kubectl get events` shows them: the
//! revision applied and each failure on the status ConfigMap, what a sync created and
//! pruned on the objects; a replica that does not lead, or a suspended one, emits none.

use gitops_agent::leader::Leadership;
use gitops_agent::write::{WriteError, Writer};
use gitops_tests::agent::{Agent, AgentConfig};
use gitops_tests::cluster::{self, eventually};
use gitops_tests::git::GitRepo;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType};

/// The lines of `kubectl get events -n NAMESPACE` (type, reason, object, message).
fn events(namespace: &str) -> String {
    cluster::kubectl(&["get", "events", "-n", namespace])
}

/// Waits until a line of `kubectl get events` holds every one of `parts`, and returns it.
async fn event_line(namespace: &str, parts: &[&str]) -> String {
    eventually(&format!("an event with {parts:?} in {namespace}"), || async {
        events(namespace).lines().find(|line| parts.iter().all(|part| line.contains(part))).map(str::to_owned)
    })
    .await
}

#[tokio::test]
async fn a_sync_shows_its_revision_and_what_it_created_and_pruned_and_a_failure_its_file_and_line() {
    let client = cluster::client().await;
    let ns = cluster::namespace(&client, "events").await;
    let repo = GitRepo::new();
    repo.write("manifests/a.yaml", &cluster::configmap("a", "\"1\""));
    repo.write("manifests/b.yaml", &cluster::configmap("b", "\"1\""));
    let first = repo.commit("a and b");
    let config =
        AgentConfig { local_repo: Some(repo.path()), status_report: true, ..AgentConfig::new(repo.file_url(), &ns) };
    let agent = Agent::start(client, config).await;
    agent.applied(&first).await;

    let synced = event_line(&ns, &["configmap/gitops-agent-status", "Synced"]).await;
    assert!(synced.contains("Normal") && synced.contains(&format!("applied revision {first}: 2 created")), "{synced}");
    let created = event_line(&ns, &["configmap/a", "Created"]).await;
    assert!(created.contains("created from manifests/a.yaml:1 at revision"), "{created}");
    // kubectl describe finds an object's events by its uid.
    let described = cluster::kubectl(&["describe", "configmap", "a", "-n", &ns]);
    assert!(described.contains("created from manifests/a.yaml:1 at revision"), "{described}");

    repo.remove("manifests/b.yaml");
    let second = repo.commit("no b");
    agent.applied(&second).await;
    let pruned = event_line(&ns, &["configmap/b", "Pruned"]).await;
    assert!(pruned.contains(&format!("pruned: not in revision {}", &second[..12])), "{pruned}");
    assert!(
        event_line(&ns, &["configmap/gitops-agent-status", "Synced", &second]).await.contains("1 deleted"),
        "the second revision's event says what it did, not the first one's"
    );

    // The second document of the file, from line 8, has no name.
    repo.write(
        "manifests/bad.yaml",
        &format!("{}---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{}}\n", cluster::configmap("c", "\"1\"")),
    );
    let bad = repo.commit("a nameless ConfigMap");
    let failed = event_line(&ns, &["configmap/gitops-agent-status", "SyncFailed"]).await;
    assert!(failed.contains("Warning") && failed.contains(&format!("revision {bad} not applied")), "{failed}");
    assert!(failed.contains("manifests/bad.yaml:8:"), "names the file and line: {failed}");
    agent.stop().await;
}

#[tokio::test]
async fn a_replica_that_does_not_lead_or_is_suspended_writes_no_event() {
    let client = cluster::client().await;
    let ns = cluster::namespace(&client, "events-standby").await;
    let regarding = ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("ConfigMap".into()),
        namespace: Some(ns.clone()),
        name: Some("gitops-agent-status".into()),
        ..ObjectReference::default()
    };
    let event = |reason: &str| Event {
        type_: EventType::Normal,
        reason: reason.into(),
        note: Some(format!("from the {reason} replica")),
        action: "Sync".into(),
        secondary: None,
    };

    let standby = Writer::new(client.clone(), Leadership::never().lead());
    let refused = standby.publish(&event("Standby"), &regarding).await;
    assert!(matches!(refused, Err(WriteError::NotLeader)), "{refused:?}");
    let suspended = Writer::sole(client.clone());
    suspended.set_suspended(true);
    let refused = suspended.publish(&event("Suspended"), &regarding).await;
    assert!(matches!(refused, Err(WriteError::Suspended)), "{refused:?}");
    // The leader's event is there, so the list below is not empty for another reason.
    Writer::sole(client).publish(&event("Leader"), &regarding).await.unwrap();

    let shown = events(&ns);
    assert!(shown.contains("from the Leader replica"), "{shown}");
    assert!(!shown.contains("Standby") && !shown.contains("Suspended"), "{shown}");
}
