//! The repo a user starts from, `repo-template/`, synced by the agent into a real
//! control plane: every object lands; the midi batch waits for PostgreSQL to be Ready
//! (it never is here: no node) unless its spec opts out; a commit that edits `jobs/midi-batch.yaml` makes
//! exactly one new run with the commit in its annotations; a commit that adds a
//! dashboard makes its ConfigMap.
//!
//! The control plane has no operators: the stand-in CRDs of `manifests/crds/` serve
//! ServiceMonitor. Runs of the batch Job run for real in `scale_e2e` (on the node).

use std::path::{Path, PathBuf};

use gitops_tests::agent::{Agent, AgentConfig};
use gitops_tests::cluster::{self, eventually};
use gitops_tests::git::GitRepo;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DynamicObject, ListParams};
use kube::discovery::Discovery;
use serde_json::json;

fn template_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../repo-template")
}

/// Copies `dir` (relative paths from `base`) into the repository.
fn copy_into(repo: &GitRepo, base: &Path, dir: &Path) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            copy_into(repo, base, &path);
        } else if let Ok(text) = std::fs::read_to_string(&path) {
            repo.write(path.strip_prefix(base).unwrap().to_str().unwrap(), &text);
        }
    }
}

async fn synced(agent: &Agent, commit: &str) {
    eventually(&format!("the agent to apply {commit}"), || async {
        let status = agent.status().await;
        assert_eq!(status["errors"], json!([]), "the sync failed");
        (status["revision"] == commit).then_some(())
    })
    .await;
}

#[tokio::test]
async fn the_repo_template_syncs_and_a_job_spec_edit_makes_one_run() {
    let client = cluster::client().await;
    cluster::install_stand_in_crds(&client).await;
    // Bootstrap makes the agent's namespace before the agent first syncs the template.
    cluster::apply_yaml(&client, "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: gitops-system\n").await;
    let ns = cluster::namespace(&client, "template").await;
    let repo = GitRepo::new();
    copy_into(&repo, &template_dir(), &template_dir());
    let first = repo.commit("from repo-template");

    let agent = Agent::start(
        client.clone(),
        AgentConfig {
            local_repo: Some(repo.path()),
            render: gitops_tests::render::tools(&repo.path().join(".charts")),
            ..AgentConfig::new(repo.file_url(), &ns)
        },
    )
    .await;
    synced(&agent, &first).await;

    // Every object of the template is live and the agent's.
    let renderer = gitops_agent::render::Renderer::new(gitops_tests::render::tools(&repo.path().join(".charts")));
    let rendered = renderer
        .render(&template_dir(), &ns, &gitops_agent::render::Capabilities::default())
        .unwrap_or_else(|e| panic!("{e:?}"));
    let discovery = Discovery::new(client.clone()).run_aggregated().await.unwrap();
    for manifest in &rendered.manifests {
        let (resource, caps) = discovery.resolve_gvk(&manifest.gvk()).expect("a served kind");
        let api: Api<DynamicObject> = match (caps.scope, manifest.namespace()) {
            (kube::discovery::Scope::Cluster, _) => Api::all_with(client.clone(), &resource),
            (_, namespace) => Api::namespaced_with(client.clone(), namespace.unwrap_or(&ns), &resource),
        };
        let live = api.get(manifest.name()).await.unwrap_or_else(|e| panic!("{}: {e}", manifest.location));
        let labels = live.metadata.labels.unwrap_or_default();
        assert_eq!(labels.get("app.kubernetes.io/managed-by").map(String::as_str), Some("gitops-agent"));
    }
    assert!(rendered.manifests.len() >= 10, "the Scale pipeline has more than {}", rendered.manifests.len());

    // The midi batch job: run 1 at the first commit.
    let [spec] = rendered.jobs.as_slice() else { panic!("one job spec: {:?}", rendered.jobs) };
    assert_eq!(spec.name(), "midi-batch");
    let namespace = spec.template.namespace().unwrap_or(&ns).to_owned();
    let resource = discovery.resolve_gvk(&spec.template.gvk()).expect("batch/v1 Job").0;
    let apps: Api<DynamicObject> = Api::namespaced_with(client.clone(), &namespace, &resource);
    let runs = || async {
        let listed = apps.list(&ListParams::default().labels("gitops.scale.dev/job=midi-batch")).await.unwrap();
        let mut runs: Vec<(String, String)> = listed
            .items
            .into_iter()
            .map(|run| {
                let revision = run.metadata.annotations.unwrap_or_default()["gitops.scale.dev/revision"].clone();
                (run.metadata.name.unwrap(), revision)
            })
            .collect();
        runs.sort();
        runs
    };
    let waiting = eventually("midi-batch to wait for the revision's health", || async {
        let status = agent.status().await;
        let waiting = status["batch_waiting"].as_array()?.first()?.clone();
        (waiting["job"] == "midi-batch").then_some(waiting)
    })
    .await;
    assert!(waiting["waits_for"].as_array().unwrap().contains(&json!("StatefulSet postgres")), "{waiting:#}");
    assert_eq!(runs().await, [], "no run before PostgreSQL is Ready");
    // Opted out, the job runs at once; and with no node its run never ends, so the
    // next spec may start beside it (Allow) rather than wait for it (Forbid).
    let spec_path = template_dir().join("jobs/midi-batch.yaml");
    let limit = "    gitops.scale.dev/history-limit: \"5\"\n";
    let text = std::fs::read_to_string(&spec_path)
        .unwrap()
        .replace(limit, &format!("{limit}    gitops.scale.dev/wait-for: none\n"))
        .replace("concurrency-policy: Forbid", "concurrency-policy: Allow");
    repo.write("jobs/midi-batch.yaml", &text);
    let first = repo.commit("midi-batch: start without waiting for PostgreSQL");
    synced(&agent, &first).await;
    eventually("run midi-batch-1", || async { (runs().await.len() == 1).then_some(()) }).await;
    assert_eq!(runs().await, [("midi-batch-1".to_owned(), first.clone())]);

    let edited = text.replace("--threshold=0.5", "--threshold=0.6");
    assert_ne!(edited, text, "the spec passes --threshold=0.5");
    repo.write("jobs/midi-batch.yaml", &edited);
    let second = repo.commit("raise the similarity threshold");
    synced(&agent, &second).await;
    eventually("run midi-batch-2", || async { (runs().await.len() == 2).then_some(()) }).await;
    assert_eq!(runs().await, [("midi-batch-1".to_owned(), first), ("midi-batch-2".to_owned(), second.clone())]);

    repo.write(
        "dashboards/scale/extra.json",
        &serde_json::to_string_pretty(&json!({ "uid": "scale-extra", "title": "Extra", "panels": [] })).unwrap(),
    );
    let third = repo.commit("a dashboard");
    synced(&agent, &third).await;
    let cm = Api::<ConfigMap>::namespaced(client.clone(), &ns).get("dashboard-scale-extra").await.unwrap();
    assert_eq!(cm.metadata.annotations.unwrap_or_default()["grafana_folder"], "scale");
    assert_eq!(runs().await.len(), 2, "no run for a commit that leaves the spec alone");
    agent.stop().await;
}
