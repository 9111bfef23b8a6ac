//! What the agent asks of the API server, counted by the API server itself
//! (`apiserver_request_total`) on a control plane of the test's own, so no other test's
//! requests mix in.

use std::time::Duration;

use gitops_tests::agent::{Agent, AgentConfig};
use gitops_tests::cluster::{self, eventually};
use gitops_tests::git::GitRepo;
use gitops_tests::requests::{self, Requests};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;

const OBJECTS: usize = 40;

fn config_map(i: usize, version: &str) -> String {
    format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: cm-{i}\ndata:\n  index: \"{i}-{version}\"\n")
}

/// Once the agent runs, a commit costs requests for what it changes, not for the size of
/// the revision: the drift watch vouches for the objects git did not change and nobody
/// touched. A commit that changes no manifest makes no request for the objects (nothing
/// read, listed, dry-run or written, and the drift watch does not list again); one that
/// changes one object makes one dry run and one apply.
#[tokio::test]
async fn a_commit_costs_requests_for_what_it_changes_only() {
    let mut plane = cluster::private().await;
    // Its root-CA publisher writes a ConfigMap into every new namespace.
    plane.stop_component("kube-controller-manager").unwrap();
    let client = plane.client().await.unwrap();
    let ns = cluster::namespace(&client, "load").await;
    let repo = GitRepo::new();
    for i in 0..OBJECTS {
        repo.write(&format!("manifests/cm-{i}.yaml"), &config_map(i, "1"));
    }
    let first = repo.commit("ConfigMaps");
    let agent = Agent::start(client.clone(), AgentConfig::new(repo.file_url(), &ns)).await;
    agent.applied(&first).await;
    // The watch request follows the watcher's list, which is done by then.
    eventually("the drift watch on ConfigMaps", || async {
        (requests::open_watches(&client, "configmaps").await.unwrap() > 0).then_some(())
    })
    .await;

    repo.write("README.md", "no manifest changed\n");
    let requests = during(&client, &["configmaps"], agent.trigger_and_wait(repo.commit("README only"))).await;
    assert_eq!(requests.count("APPLY"), 0, "no dry run, no apply: {requests:?}");
    assert_eq!(requests.count("LIST"), 0, "no list, by the sync or the drift watch: {requests:?}");
    assert!(requests.count("GET") <= 1, "no read but the inventory's: {requests:?}");
    assert_eq!(requests.count("PUT"), 1, "the inventory records the revision: {requests:?}");

    repo.write("manifests/cm-7.yaml", &config_map(7, "2"));
    let requests = during(&client, &["configmaps"], agent.trigger_and_wait(repo.commit("cm-7 → 2"))).await;
    let verbs = requests.by_verb();
    assert_eq!(verbs.get("APPLY (dry run)"), Some(&1), "one dry run: {verbs:?}");
    assert_eq!(verbs.get("APPLY"), Some(&1), "one apply: {verbs:?}");
    assert_eq!(requests.count("LIST"), 0, "{verbs:?}");
    let cm = Api::<ConfigMap>::namespaced(client.clone(), &ns).get("cm-7").await.unwrap();
    assert_eq!(cm.data.unwrap()["index"], "7-2");
    agent.stop().await;
}

/// Kinds whose live objects never equal git as written (defaulted container fields,
/// Service ports: lists the API server fills in), so every watch event of theirs used
/// to cost a dry run. From the first sync on, including the watches' first lists and a
/// commit that changes no manifest, they cost no object request at all.
#[tokio::test]
async fn the_mix_costs_no_dry_run_after_its_sync_nor_for_a_commit_that_changes_nothing() {
    const EACH: usize = 334;
    let mut plane = cluster::private().await;
    plane.stop_component("kube-controller-manager").unwrap();
    let client = plane.client().await.unwrap();
    let ns = cluster::namespace(&client, "mix").await;
    let repo = GitRepo::new();
    let mut objects = String::new();
    for i in 0..EACH {
        objects.push_str(&format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: app-{i}\nspec:\n  replicas: 1\n  \
             selector:\n    matchLabels: {{app: app-{i}}}\n  template:\n    metadata:\n      labels: {{app: app-{i}}}\n    \
             spec:\n      containers:\n      - name: app\n        image: registry.example/app:1.0\n        \
             ports: [{{containerPort: 8080, name: http}}]\n        resources:\n          \
             limits: {{cpu: 100m, memory: 64Mi}}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata:\n  name: svc-{i}\nspec:\n  clusterIP: None\n  \
             selector: {{app: app-{i}}}\n  ports: [{{name: http, port: 80, targetPort: http}}]\n---\n\
             apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: sa-{i}\n---\n"
        ));
    }
    repo.write("manifests/mix.yaml", &objects);
    let first = repo.commit("the mix");
    let pod_watches = requests::open_watches(&client, "pods").await.unwrap();
    let agent = Agent::start(client.clone(), AgentConfig::new(repo.file_url(), &ns)).await;
    let kinds = ["deployments", "services", "serviceaccounts"];
    let before = Requests::scrape(&client).await.unwrap();
    agent.trigger_and_wait(first).await;
    for kind in kinds {
        eventually(&format!("the drift watch on {kind}"), || async {
            (requests::open_watches(&client, kind).await.unwrap() > 0).then_some(())
        })
        .await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let synced = Requests::scrape(&client).await.unwrap().since(&before).only(&kinds).by_verb();
    assert_eq!(synced.get("APPLY (dry run)"), Some(&(3 * EACH as u64)), "one dry run each, by the sync: {synced:?}");
    // Health reads the Deployments' pods through one watch of their namespace.
    let pods = Requests::scrape(&client).await.unwrap().since(&before).only(&["pods"]).by_verb();
    assert_eq!(pods.get("LIST"), Some(&1), "one pod list for {EACH} Deployments in one namespace: {pods:?}");
    assert_eq!(requests::open_watches(&client, "pods").await.unwrap(), pod_watches + 1, "one pod watch");

    repo.write("README.md", "no manifest changed\n");
    let watched = ["deployments", "services", "serviceaccounts", "pods"];
    let requests = during(&client, &watched, agent.trigger_and_wait(repo.commit("README only"))).await;
    assert_eq!(requests.count("APPLY"), 0, "no dry run, no apply: {:?}", requests.by_verb());
    assert_eq!(requests.count("LIST") + requests.count("GET"), 0, "{:?}", requests.by_verb());
    agent.stop().await;
}

/// The API server's requests for `resources` while `work` runs, and for three seconds
/// after (room for anything a sync sets off: a re-list or a check would come at once).
async fn during(client: &kube::Client, resources: &[&str], work: impl Future<Output = ()>) -> Requests {
    let before = Requests::scrape(client).await.unwrap();
    work.await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    Requests::scrape(client).await.unwrap().since(&before).only(resources)
}
