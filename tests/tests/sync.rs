//! The agent's sync against a real API server and real git repositories: push to
//! deploy, rollback by `git revert`, prune, and that nothing is applied or pruned
//! from a revision that fails.

use gitops_agent::apply::Action;
use gitops_agent::source::{self, Credentials, GitSource};
use gitops_agent::sync::{Options, SyncError, Syncer};
use gitops_tests::cluster;
use gitops_tests::git::GitRepo;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::ListParams;

/// A repository, a namespace of the test's own (objects and inventory live there) and
/// a syncer for them.
struct Fixture {
    repo: GitRepo,
    ns: String,
    client: kube::Client,
    syncer: Syncer,
    work: tempfile::TempDir,
}

impl Fixture {
    async fn new(prefix: &str) -> Fixture {
        let client = cluster::client().await;
        let ns = cluster::namespace(&client, prefix).await;
        Fixture { repo: GitRepo::new(), syncer: syncer(&client, &ns), client, ns, work: tempfile::tempdir().unwrap() }
    }

    /// A fixture whose cluster holds ConfigMap `a` = 1 from a first, good commit.
    async fn with_a_good_revision(prefix: &str) -> Fixture {
        let f = Fixture::new(prefix).await;
        f.repo.write("manifests/a.yaml", &f.config_map("a", "1"));
        f.repo.commit("good");
        f.sync().await.unwrap();
        f
    }

    /// Fetches the repo's head as the agent does and syncs it.
    async fn sync(&self) -> Result<gitops_agent::apply::ChangeSet, SyncError> {
        let (head, tree) = self.checkout();
        self.syncer.sync(&tree, &head.to_string()).await.map(|synced| synced.changes)
    }

    fn checkout(&self) -> (git2::Oid, std::path::PathBuf) {
        let source = GitSource::new(&self.repo.file_url(), "main", Credentials::none());
        source::fetch_tree(&source, self.work.path()).unwrap()
    }

    fn config_map(&self, name: &str, value: &str) -> String {
        format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\ndata:\n  value: \"{value}\"\n")
    }

    /// The test namespace's ConfigMaps the agent manages, as name → value.
    async fn live(&self) -> Vec<(String, String)> {
        let cms: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.ns);
        let mut live: Vec<(String, String)> = cms
            .list(&ListParams::default().labels("app.kubernetes.io/managed-by=gitops-agent"))
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|cm| cm.metadata.name.as_deref() != Some("gitops-inventory"))
            .map(|cm| (cm.metadata.name.unwrap(), cm.data.unwrap_or_default().remove("value").unwrap_or_default()))
            .collect();
        live.sort();
        live
    }
}

fn syncer(client: &kube::Client, ns: &str) -> Syncer {
    Syncer::new(
        gitops_agent::write::Writer::sole(client.clone()),
        Options {
            default_namespace: ns.to_owned(),
            prune: true,
            force_conflicts: true,
            inventory_namespace: ns.to_owned(),
            dashboards_namespace: ns.to_owned(),
            access: gitops_agent::access::Access::Cluster,
        },
    )
}

fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
    items.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
}

#[tokio::test]
async fn a_commit_is_applied_with_the_agents_label_and_field_manager() {
    let f = Fixture::new("deploy").await;
    f.repo.write("manifests/app.yaml", &f.config_map("settings", "1"));
    f.repo.commit("first");
    let changes = f.sync().await.unwrap();
    assert_eq!(changes.counts().get(&Action::Created), Some(&1), "{changes}");
    assert_eq!(f.live().await, pairs(&[("settings", "1")]));

    let cm = Api::<ConfigMap>::namespaced(f.client.clone(), &f.ns).get("settings").await.unwrap();
    let managers: Vec<_> = cm.metadata.managed_fields.unwrap().into_iter().filter_map(|m| m.manager).collect();
    assert_eq!(managers, vec!["gitops-agent".to_owned()]);
}

#[tokio::test]
async fn git_revert_restores_the_previous_state_exactly() {
    // (Not `y`: YAML 1.1, like kubectl, reads a bare `y` as true.)
    let f = Fixture::new("revert").await;
    f.repo.write("manifests/x.yaml", &f.config_map("cm-x", "a"));
    f.repo.write("manifests/y.yaml", &f.config_map("cm-y", "a"));
    f.repo.commit("A");
    f.sync().await.unwrap();
    assert_eq!(f.live().await, pairs(&[("cm-x", "a"), ("cm-y", "a")]));

    f.repo.write("manifests/x.yaml", &f.config_map("cm-x", "b"));
    f.repo.remove("manifests/y.yaml");
    f.repo.write("manifests/z.yaml", &f.config_map("cm-z", "b"));
    f.repo.commit("B");
    let changes = f.sync().await.unwrap();
    assert_eq!(f.live().await, pairs(&[("cm-x", "b"), ("cm-z", "b")]));
    assert_eq!(changes.to_string(), "1 created, 1 configured, 1 deleted");

    f.repo.revert_head();
    f.sync().await.unwrap();
    assert_eq!(f.live().await, pairs(&[("cm-x", "a"), ("cm-y", "a")]), "X restored, Y back, Z pruned");
}

#[tokio::test]
async fn an_unchanged_revision_writes_nothing() {
    let f = Fixture::new("noop").await;
    f.repo.write("manifests/app.yaml", &f.config_map("a", "1"));
    f.repo.commit("first");
    f.sync().await.unwrap();
    let again = f.sync().await.unwrap();
    assert!(!again.wrote(), "a resync of the same commit changes nothing: {again}");
    assert_eq!(again.counts().get(&Action::Unchanged), Some(&1));
}

#[tokio::test]
async fn a_broken_file_applies_nothing_and_prunes_nothing() {
    let f = Fixture::with_a_good_revision("broken").await;

    // One new object that is fine, one file that is not YAML, and `a` removed.
    f.repo.remove("manifests/a.yaml");
    f.repo.write("manifests/b.yaml", &f.config_map("b", "1"));
    f.repo.write("manifests/c.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c\ndata: [unclosed\n");
    f.repo.commit("bad");
    let error = f.sync().await.unwrap_err();
    assert!(matches!(error, SyncError::Render(_)), "{error}");
    assert!(error.to_string().contains("manifests/c.yaml:"), "the error names the file and line: {error}");
    assert_eq!(f.live().await, pairs(&[("a", "1")]), "the cluster stays at the last good revision");
}

#[tokio::test]
async fn an_object_the_api_server_rejects_applies_nothing_and_prunes_nothing() {
    let f = Fixture::with_a_good_revision("rejected").await;

    f.repo.remove("manifests/a.yaml");
    f.repo.write("manifests/b.yaml", &f.config_map("b", "1"));
    // ConfigMap keys must be valid: the API server's validation refuses this one.
    f.repo.write(
        "manifests/c.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c\ndata:\n  \"not a key!\": x\n",
    );
    f.repo.commit("rejected");
    let error = f.sync().await.unwrap_err();
    assert!(matches!(error, SyncError::Rejected(_)), "{error}");
    let message = error.to_string();
    assert!(message.contains("manifests/c.yaml:6: ConfigMap"), "the line of the key the API server names: {message}");
    assert_eq!(f.live().await, pairs(&[("a", "1")]), "the cluster stays at the last good revision");
}

#[tokio::test]
async fn an_empty_revision_does_not_prune_everything_unless_allowed() {
    let f = Fixture::with_a_good_revision("empty").await;

    f.repo.remove("manifests/a.yaml");
    f.repo.write("README.md", "nothing here\n");
    f.repo.commit("emptied");
    let error = f.sync().await.unwrap_err();
    assert!(matches!(error, SyncError::EmptyRevision(1)), "{error}");
    assert_eq!(f.live().await, pairs(&[("a", "1")]));

    f.repo.write(gitops_agent::sync::ALLOW_EMPTY_FILE, "");
    f.repo.commit("allow empty");
    f.sync().await.unwrap();
    assert_eq!(f.live().await, pairs(&[]));
}

#[tokio::test]
async fn prune_keeps_annotated_objects_and_objects_the_agent_did_not_create() {
    let f = Fixture::new("keep").await;
    // `adopted` exists before the agent first applies it, with the managed-by label.
    let cms: Api<ConfigMap> = Api::namespaced(f.client.clone(), &f.ns);
    let existing: ConfigMap = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "adopted", "labels": { "app.kubernetes.io/managed-by": "gitops-agent" } },
        "data": { "value": "0" }
    }))
    .unwrap();
    cms.create(&Default::default(), &existing).await.unwrap();

    f.repo.write("manifests/adopted.yaml", &f.config_map("adopted", "1"));
    f.repo.write("manifests/plain.yaml", &f.config_map("plain", "1"));
    f.repo.write(
        "manifests/kept.yaml",
        &f.config_map("kept", "1")
            .replace("  name: kept\n", "  name: kept\n  annotations:\n    gitops.scale.dev/prune: disabled\n"),
    );
    f.repo.commit("three");
    f.sync().await.unwrap();
    assert_eq!(f.live().await, pairs(&[("adopted", "1"), ("kept", "1"), ("plain", "1")]));

    for file in ["adopted", "plain", "kept"] {
        f.repo.remove(&format!("manifests/{file}.yaml"));
    }
    f.repo.write("manifests/other.yaml", &f.config_map("other", "1"));
    f.repo.commit("all removed");
    let changes = f.sync().await.unwrap();
    assert_eq!(changes.counts().get(&Action::Deleted), Some(&1), "only `plain` is pruned: {changes}");
    assert_eq!(f.live().await, pairs(&[("adopted", "1"), ("kept", "1"), ("other", "1")]));
}

#[tokio::test]
async fn a_restart_remembers_what_was_applied() {
    let f = Fixture::new("restart").await;
    f.repo.write("manifests/a.yaml", &f.config_map("a", "1"));
    f.repo.write("manifests/b.yaml", &f.config_map("b", "1"));
    f.repo.commit("two");
    f.sync().await.unwrap();

    // A new agent process: nothing in memory, the inventory in the cluster.
    f.repo.remove("manifests/b.yaml");
    f.repo.commit("one");
    let (head, tree) = f.checkout();
    let changes = syncer(&f.client, &f.ns).sync(&tree, &head.to_string()).await.unwrap().changes;
    assert_eq!(changes.to_string(), "1 unchanged, 1 deleted");
    assert_eq!(f.live().await, pairs(&[("a", "1")]));
}

#[tokio::test]
async fn an_inventory_another_replica_wrote_is_read_again() {
    // This syncer keeps the inventory it wrote; a replica that led meanwhile adds `b`.
    let f = Fixture::with_a_good_revision("replica").await;
    f.repo.write("manifests/b.yaml", &f.config_map("b", "1"));
    f.repo.commit("b, by the other replica");
    let (head, tree) = f.checkout();
    syncer(&f.client, &f.ns).sync(&tree, &head.to_string()).await.unwrap();

    // Back with this syncer: `b` is gone from git, and the inventory it kept does not list it.
    f.repo.remove("manifests/b.yaml");
    f.repo.commit("b removed");
    let changes = f.sync().await.unwrap();
    assert_eq!(changes.to_string(), "1 unchanged, 1 deleted", "b, which the other replica created, is pruned");
    assert_eq!(f.live().await, pairs(&[("a", "1")]));
}

#[tokio::test]
async fn a_sync_killed_half_way_leaves_no_orphan() {
    let f = Fixture::new("killed").await;
    for i in 0..60 {
        f.repo.write(&format!("manifests/cm-{i:02}.yaml"), &f.config_map(&format!("cm-{i:02}"), "1"));
    }
    f.repo.commit("sixty");
    let (head, tree) = f.checkout();

    // Stop the sync as soon as it has written some objects but (likely) not all.
    let sync = tokio::spawn({
        let syncer = syncer(&f.client, &f.ns);
        async move { syncer.sync(&tree, &head.to_string()).await }
    });
    cluster::eventually("the sync to write its first objects", || async { (!f.live().await.is_empty()).then_some(()) })
        .await;
    sync.abort();
    let _ = sync.await;

    // The next revision keeps only the first ten: the other fifty, whether or not the
    // killed sync got to them, must not stay behind.
    for i in 10..60 {
        f.repo.remove(&format!("manifests/cm-{i:02}.yaml"));
    }
    f.repo.commit("ten");
    f.sync().await.unwrap();
    let expected: Vec<(String, String)> = (0..10).map(|i| (format!("cm-{i:02}"), "1".to_owned())).collect();
    assert_eq!(f.live().await, expected);
}

/// Write requests the API server has served for ConfigMaps, from its own metrics
/// (dry runs excluded).
async fn configmap_writes(client: &kube::Client) -> u64 {
    let request = http::Request::get("/metrics").body(Vec::new()).unwrap();
    let metrics = client.request_text(request).await.unwrap();
    metrics
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{") && l.contains("resource=\"configmaps\""))
        .filter(|l| !l.contains("dry_run=\"All\""))
        .filter(|l| {
            ["APPLY", "PATCH", "POST", "PUT", "DELETE", "CREATE", "UPDATE"]
                .iter()
                .any(|v| l.contains(&format!("verb=\"{v}\"")))
        })
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap() as u64)
        .sum()
}

#[tokio::test]
async fn a_resync_of_the_same_commit_makes_no_write_request() {
    // A control plane of its own: the request counters must see this test only.
    let plane = cluster::private().await;
    let client = plane.client().await.unwrap();
    let ns = cluster::namespace(&client, "quiet").await;
    let repo = GitRepo::new();
    for i in 0..20 {
        repo.write(
            &format!("manifests/cm-{i}.yaml"),
            &format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: cm-{i}\ndata:\n  value: \"{i}\"\n"),
        );
    }
    repo.commit("twenty");
    let work = tempfile::tempdir().unwrap();
    let source = GitSource::new(&repo.file_url(), "main", Credentials::none());
    let (head, tree) = source::fetch_tree(&source, work.path()).unwrap();
    let syncer = syncer(&client, &ns);
    let first = syncer.sync(&tree, &head.to_string()).await.unwrap().changes;
    assert_eq!(first.counts().get(&Action::Created), Some(&20));

    let before = configmap_writes(&client).await;
    assert!(before >= 20, "the first sync's writes are counted: {before}");
    let again = syncer.sync(&tree, &head.to_string()).await.unwrap().changes;
    assert_eq!(again.counts().get(&Action::Unchanged), Some(&20));
    assert_eq!(configmap_writes(&client).await, before, "no write request, the inventory's included");
}

#[tokio::test]
async fn diff_shows_what_a_sync_would_change_and_changes_nothing() {
    let f = Fixture::new("diff").await;
    f.repo.write("manifests/x.yaml", &f.config_map("cm-x", "a"));
    f.repo.write("manifests/y.yaml", &f.config_map("cm-y", "a"));
    f.repo.commit("A");
    f.sync().await.unwrap();

    f.repo.write("manifests/x.yaml", &f.config_map("cm-x", "b"));
    f.repo.remove("manifests/y.yaml");
    f.repo.write("manifests/z.yaml", &f.config_map("cm-z", "b"));
    f.repo.commit("B");
    let (_, tree) = f.checkout();
    let mut diff: Vec<(String, Action)> =
        f.syncer.diff(&tree).await.unwrap().into_iter().map(|d| (d.id.name, d.action)).collect();
    diff.sort();
    assert_eq!(
        diff,
        vec![("cm-x".into(), Action::Configured), ("cm-y".into(), Action::Deleted), ("cm-z".into(), Action::Created)]
    );
    assert_eq!(f.live().await, pairs(&[("cm-x", "a"), ("cm-y", "a")]), "diff writes nothing");
}

/// `diff` runs the checks `sync` runs: what `sync` would refuse, `diff` refuses with the
/// same error; and it lists as pruned only what `sync` would delete.
#[tokio::test]
async fn diff_refuses_what_sync_refuses_and_prunes_what_sync_prunes() {
    let f = Fixture::with_a_good_revision("diff-agrees").await;

    // An empty revision: sync refuses to prune everything; so does diff.
    f.repo.remove("manifests/a.yaml");
    f.repo.write("manifests/README.md", "nothing here\n");
    f.repo.commit("empty");
    let (_, tree) = f.checkout();
    assert!(matches!(f.syncer.diff(&tree).await, Err(SyncError::EmptyRevision(1))));
    assert!(matches!(f.sync().await, Err(SyncError::EmptyRevision(1))));

    // A namespace that does not exist: rejected by both; one the revision makes: created.
    f.repo.write("manifests/a.yaml", &f.config_map("a", "1"));
    let missing = format!("{}-missing", f.ns);
    f.repo.write(
        "manifests/lost.yaml",
        &format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: lost\n  namespace: {missing}\n"),
    );
    f.repo.commit("lost");
    let (_, tree) = f.checkout();
    let diff = f.syncer.diff(&tree).await;
    assert!(matches!(&diff, Err(SyncError::Rejected(e)) if e[0].id.name == "lost"), "{diff:?}");
    assert!(matches!(f.sync().await, Err(SyncError::Rejected(_))));
    let made = format!("{}-made", f.ns);
    f.repo.write(
        "manifests/lost.yaml",
        &format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {made}\n---\n\
             apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: found\n  namespace: {made}\n"
        ),
    );
    f.repo.commit("made");
    let (_, tree) = f.checkout();
    let mut diff: Vec<(String, Action)> =
        f.syncer.diff(&tree).await.unwrap().into_iter().map(|d| (d.id.name, d.action)).collect();
    diff.sort();
    assert_eq!(diff, vec![(made.clone(), Action::Created), ("found".into(), Action::Created)]);
    f.sync().await.unwrap();

    // An object annotated to stay is not pruned by sync, so diff does not list it.
    let cms: Api<ConfigMap> = Api::namespaced(f.client.clone(), &f.ns);
    let keep = serde_json::json!({ "metadata": { "annotations": { "gitops.scale.dev/prune": "disabled" } } });
    cms.patch("a", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&keep)).await.unwrap();
    f.repo.remove("manifests/a.yaml");
    f.repo.commit("a leaves git");
    let (_, tree) = f.checkout();
    assert!(f.syncer.diff(&tree).await.unwrap().is_empty(), "nothing would change");
    f.sync().await.unwrap();
    assert!(cms.get_opt("a").await.unwrap().is_some(), "kept, as diff said");
    Api::<k8s_openapi::api::core::v1::Namespace>::all(f.client.clone())
        .delete(&made, &Default::default())
        .await
        .unwrap();
}

/// The dashboards the agent delivers in `ns`: ConfigMap name → (folder, uid, title).
async fn dashboards(client: &kube::Client, ns: &str) -> Vec<(String, String, String, String)> {
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let listed = cms.list(&ListParams::default().labels("grafana_dashboard=1")).await.unwrap();
    let mut found: Vec<_> = listed
        .items
        .into_iter()
        .map(|cm| {
            let folder = cm.metadata.annotations.unwrap_or_default().remove("grafana_folder").unwrap_or_default();
            let (_, json) = cm.data.unwrap_or_default().into_iter().next().expect("one dashboard per ConfigMap");
            let dashboard: serde_json::Value = serde_json::from_str(&json).unwrap();
            let field = |name: &str| dashboard[name].as_str().unwrap().to_owned();
            (cm.metadata.name.unwrap(), folder, field("uid"), field("title"))
        })
        .collect();
    found.sort();
    found
}

fn dashboard(uid: &str, title: &str) -> String {
    serde_json::to_string_pretty(&serde_json::json!({ "uid": uid, "title": title, "panels": [] })).unwrap()
}

#[tokio::test]
async fn dashboards_follow_git_as_configmaps_for_grafanas_sidecar() {
    let f = Fixture::new("dashboards").await;
    let owned = |items: &[(&str, &str, &str, &str)]| -> Vec<(String, String, String, String)> {
        items.iter().map(|(a, b, c, d)| (a.to_string(), b.to_string(), c.to_string(), d.to_string())).collect()
    };
    f.repo.write("dashboards/scale/pipeline.json", &dashboard("scale-pipeline", "Scale pipeline"));
    f.repo.write("dashboards/top.json", &dashboard("top", "Top"));
    f.repo.commit("add");
    f.sync().await.unwrap();
    assert_eq!(
        dashboards(&f.client, &f.ns).await,
        owned(&[
            ("dashboard-scale-pipeline", "scale", "scale-pipeline", "Scale pipeline"),
            ("dashboard-top", "", "top", "Top"),
        ])
    );

    f.repo.write("dashboards/scale/pipeline.json", &dashboard("scale-pipeline", "Scale pipeline, v2"));
    f.repo.commit("change");
    f.sync().await.unwrap();
    assert_eq!(dashboards(&f.client, &f.ns).await[0].3, "Scale pipeline, v2");

    // Moved to another folder: the same dashboard (same uid), filed anew.
    f.repo.remove("dashboards/scale/pipeline.json");
    f.repo.write("dashboards/music/pipeline.json", &dashboard("scale-pipeline", "Scale pipeline, v2"));
    f.repo.commit("move");
    let changes = f.sync().await.unwrap();
    assert_eq!(changes.to_string(), "1 configured, 1 unchanged");
    assert_eq!(dashboards(&f.client, &f.ns).await[0].1, "music");

    f.repo.remove("dashboards/top.json");
    f.repo.commit("remove");
    f.sync().await.unwrap();
    assert_eq!(
        dashboards(&f.client, &f.ns).await,
        owned(&[("dashboard-scale-pipeline", "music", "scale-pipeline", "Scale pipeline, v2")])
    );

    // A broken dashboard names its file, and nothing else changes.
    f.repo.write("dashboards/bad.json", "{\"uid\": \"bad\"}");
    f.repo.commit("broken");
    let error = f.sync().await.unwrap_err().to_string();
    assert_eq!(error, "dashboards/bad.json:1: missing title");
    assert_eq!(dashboards(&f.client, &f.ns).await.len(), 1);
}

#[tokio::test]
async fn a_sync_that_cannot_wait_for_health_refuses_several_waves_and_applies_nothing() {
    let f = Fixture::with_a_good_revision("waves").await;
    let second = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: b\n  annotations:\n    \
                  gitops.scale.dev/wave: \"1\"\ndata:\n  value: \"1\"\n";
    f.repo.write("manifests/b.yaml", second);
    f.repo.write("manifests/a.yaml", &f.config_map("a", "2"));
    f.repo.commit("two waves");
    let error = f.sync().await.unwrap_err();
    assert!(matches!(error, SyncError::WavesNeedHealth(2)), "{error}");
    assert!(error.to_string().contains("gitops.scale.dev/wave"), "{error}");
    assert_eq!(f.live().await, pairs(&[("a", "1")]));
}
