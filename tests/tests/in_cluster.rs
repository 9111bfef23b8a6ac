//! The agent in the cluster, installed as `gitops-bootstrap up --provider local` installs
//! it: its image built from agent/Dockerfile and pulled from the node's registry,
//! `manifests/install/` (two replicas, leader election, RBAC, probes, read-only root
//! filesystem), the repository served to the pods by `git daemon` on the node's address.
//! Two pods are Ready and one leads; a commit is applied through the repository's hook;
//! `/metrics` answers through the agent's Service; deleting the leader's pod hands the
//! Lease to another replica, which applies the next commit.

use std::time::Duration;

use gitops_bootstrap::install::{self, AGENT_NAMESPACE, InstallOptions};
use gitops_bootstrap::local::Lifetime;
use gitops_bootstrap::local::agent::{InClusterOptions, install_in_cluster};
use gitops_tests::cluster::{self, configmap, eventually, value};
use gitops_tests::git::GitRepo;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use kube::Api;
use kube::api::{DeleteParams, ListParams};

/// The agent's pods, by the Deployment's label.
const SELECTOR: &str = "app.kubernetes.io/name=gitops-agent";

/// GET `path` on `host:port` from this machine, as a user's curl would.
async fn http_get(address: &str, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let status = response.lines().next()?;
    (status.split_whitespace().nth(1) == Some("200")).then_some(response)
}

/// The names of the agent's pods that are Ready.
async fn ready_pods(pods: &Api<Pod>) -> Vec<String> {
    let list = pods.list(&ListParams::default().labels(SELECTOR)).await.unwrap();
    list.items
        .into_iter()
        .filter(|pod| pod.metadata.deletion_timestamp.is_none())
        .filter(|pod| {
            let conditions = pod.status.as_ref().and_then(|s| s.conditions.as_ref());
            conditions.is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .map(|pod| pod.metadata.name.unwrap())
        .collect()
}

async fn lease_holder(leases: &Api<Lease>) -> Option<String> {
    leases.get_opt("gitops-agent").await.unwrap()?.spec?.holder_identity
}

#[tokio::test]
async fn the_agent_runs_in_the_cluster_and_its_standby_takes_over_when_the_leader_pod_goes() {
    let plane = cluster::node();
    let client = plane.client().await.unwrap();
    let repo = GitRepo::new();
    repo.write("manifests/first.yaml", &configmap("first", "one"));
    let first = repo.commit("first");

    let options = InClusterOptions {
        binary: gitops_tests::agent::binary(),
        install: InstallOptions {
            repo: repo.path().display().to_string(),
            branch: "main".into(),
            path: ".".into(),
            image: String::new(),
            git_token_file: None,
            git_username: "git".into(),
            ssh_key_file: None,
            ssh_known_hosts_file: None,
        },
        lifetime: Lifetime::TiedToThisProcess,
    };
    let installed = install_in_cluster(plane, &options).await.unwrap();
    assert!(installed.image.starts_with(plane.registry().unwrap()), "the image comes from the node's registry");
    let applied = install::wait_synced(&client, Duration::from_secs(180), "").await.unwrap();
    assert_eq!(applied, first, "the first sync applied the head");

    let pods: Api<Pod> = Api::namespaced(client.clone(), AGENT_NAMESPACE);
    let leases: Api<Lease> = Api::namespaced(client.clone(), AGENT_NAMESPACE);
    let ready = eventually("both replicas to be Ready", || async {
        let ready = ready_pods(&pods).await;
        (ready.len() == 2).then_some(ready)
    })
    .await;
    let leader = eventually("a leader", || async { lease_holder(&leases).await }).await;
    assert!(ready.contains(&leader), "the Lease is held by one of the two pods: {leader} of {ready:?}");
    // Exactly one leader, as each replica says on its own /metrics (pod IPs are reachable
    // from the node).
    let mut leaders = 0.0;
    for name in &ready {
        let ip = pods.get(name).await.unwrap().status.unwrap().pod_ip.unwrap();
        let metrics = http_get(&format!("{ip}:8080"), "/metrics").await.expect("the replica's /metrics");
        let line = metrics.lines().find(|l| l.starts_with("gitops_leader ")).expect("gitops_leader");
        leaders += line.split_whitespace().nth(1).unwrap().parse::<f64>().unwrap();
    }
    assert_eq!(leaders, 1.0, "exactly one replica leads");

    // /metrics through the agent's Service, from the host, as Prometheus would scrape it.
    let service = Api::<Service>::namespaced(client.clone(), AGENT_NAMESPACE).get("gitops-agent").await.unwrap();
    let cluster_ip = service.spec.unwrap().cluster_ip.unwrap();
    let address = format!("{cluster_ip}:8080");
    let metrics = eventually("/metrics through the Service", || http_get(&address, "/metrics")).await;
    assert!(metrics.contains("gitops_sync_total{result=\"success\"}"), "{metrics}");

    // A commit is applied through the repository's hook (the agent's poll is minutes away).
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    repo.write("manifests/second.yaml", &configmap("second", "two"));
    repo.commit("second");
    eventually("the second commit to be applied", || async { value(&cms, "second").await }).await;

    // The leader's pod goes: another replica takes the Lease (the standby, or the pod
    // the Deployment makes in its place) and applies the next commit.
    pods.delete(&leader, &DeleteParams::default()).await.unwrap();
    let successor = eventually("another replica to take the Lease", || async {
        lease_holder(&leases).await.filter(|holder| *holder != leader)
    })
    .await;
    assert!(successor.starts_with("gitops-agent-"), "a pod of the Deployment leads: {successor}");
    repo.write("manifests/third.yaml", &configmap("third", "three"));
    repo.commit("third");
    eventually("the third commit to be applied by the new leader", || async { value(&cms, "third").await }).await;
}
