//! The agent in the cluster, installed as `gitops-bootstrap up --provider local` installs
//! it: its image built from agent/Dockerfile and pulled from the node's registry,
//! `manifests/install/` (two replicas, leader election, RBAC, probes, read-only root
//! filesystem), the repository served to the pods by `git daemon` on the node's address.
//! Two pods are Ready and one leads; a commit is applied through the repository's hook;
//! `/metrics` answers through the agent's Service; deleting the leader's pod hands the
//! Lease to another replica, which applies the next commit. And the Scale pipeline's
//! images, built from repo-template's Dockerfiles the same way, run there.

use std::time::Duration;

use gitops_bootstrap::install::{self, AGENT_NAMESPACE};
use gitops_bootstrap::local::agent::install_in_cluster;
use gitops_bootstrap::local::dockerfile;
use gitops_tests::cluster::{self, configmap, eventually, http_get, value};
use gitops_tests::git::GitRepo;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams};
use serde_json::json;

/// The agent's pods, by the Deployment's label.
const SELECTOR: &str = "app.kubernetes.io/name=gitops-agent";

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

    let options = cluster::in_cluster_options(&repo.path(), ".");
    let installed = install_in_cluster(plane, &options).await.unwrap();
    assert!(installed.image.starts_with(plane.registry().unwrap()), "the image comes from the node's registry");
    let applied = install::wait_synced(&client, Duration::from_secs(180), "").await.unwrap();
    assert_eq!(applied, first, "the first sync applied the head");

    let pods: Api<Pod> = Api::namespaced(client.clone(), AGENT_NAMESPACE);
    let leases: Api<Lease> = Api::namespaced(client.clone(), AGENT_NAMESPACE);
    let ready = eventually("both replicas to be Ready", || async {
        let ready = cluster::ready_pods(&pods, SELECTOR).await;
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

    // An image the registry lacks: what `up` prints when the agent never syncs names
    // the pod and the kubelet's reason.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), AGENT_NAMESPACE);
    let missing = format!("{}/gitops-agent:missing", plane.registry().unwrap());
    let patch =
        json!({ "spec": { "template": { "spec": { "containers": [{ "name": "agent", "image": missing }] } } } });
    deployments.patch("gitops-agent", &PatchParams::default(), &Patch::Strategic(&patch)).await.unwrap();
    let problems = eventually("the new pod's pull to fail", || async {
        let problems = gitops_bootstrap::local::agent::pod_problems(&client).await;
        problems.iter().any(|p| p.contains("ImagePullBackOff") || p.contains("ErrImagePull")).then_some(problems)
    })
    .await;
    assert!(problems.iter().any(|p| p.contains("running")), "the old pods still run: {problems:?}");
}

#[tokio::test]
async fn the_scale_images_built_from_their_dockerfiles_run_on_the_node() {
    let plane = cluster::node();
    let client = plane.client().await.unwrap();
    let ns = cluster::namespace(&client, "scale-images").await;
    let cache = gitops_bootstrap::local::build::cache_dir();
    let built = tokio::task::spawn_blocking(move || dockerfile::build_local_cluster(&cache)).await.unwrap().unwrap();
    let image = |name: &str| plane.push_built(built.iter().find(|b| b.name == name).unwrap()).unwrap();
    let (viewer, batch) = (image("scale-viewer"), image("scale-midi-batch"));
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let kubeconfig = plane.kubeconfig().display().to_string();

    // The batch image: Spark 4.3 on Java 17, the S3A connector, the job and its modules.
    let script = "spark-submit --version 2>&1 | grep -o 'version 4\\.3\\.[0-9]*' | head -1; \
                  ls /opt/spark/jars | grep -c -e 'hadoop-aws-' -e 'awssdk_bundle-'; \
                  python3 -c 'import midi_batch, mido, numpy, psycopg; print(\"modules ok\")'; id -u";
    let spec = json!({ "containers": [{ "image": batch, "command": ["bash", "-c", script] }] });
    let (phase, logs) = cluster::run_to_completion(&pods, &kubeconfig, &ns, "batch", spec).await;
    assert_eq!(phase, "Succeeded", "the batch image: {logs}");
    assert_eq!(logs.lines().collect::<Vec<_>>(), ["version 4.3.0", "2", "modules ok", "185"], "{logs}");

    // The viewer image: gunicorn serves the app as uid 10001; /healthz answers with no
    // database yet (it connects in the background), from the host to the pod's address.
    let pod = json!({
        "metadata": { "name": "viewer" },
        "spec": { "containers": [{
            "name": "viewer", "image": viewer,
            "env": [{ "name": "DATABASE_URL", "value": "postgresql://scale@127.0.0.1:5/scale" }],
        }]},
    });
    pods.create(&Default::default(), &serde_json::from_value(pod).unwrap()).await.unwrap();
    let ip = eventually("the viewer's pod to run", || async {
        let status = pods.get("viewer").await.ok()?.status?;
        (status.phase.as_deref() == Some("Running")).then_some(status.pod_ip?)
    })
    .await;
    let address = format!("{ip}:8000");
    let health = eventually("the viewer's /healthz", || http_get(&address, "/healthz")).await;
    assert_eq!(health, "ok\n");
}

#[tokio::test]
async fn the_monitoring_images_run_their_programs_on_the_node() {
    let plane = cluster::node();
    let client = plane.client().await.unwrap();
    let ns = cluster::namespace(&client, "monitoring-images").await;
    let cache = gitops_bootstrap::local::build::cache_dir();
    let built = tokio::task::spawn_blocking(move || dockerfile::build_local_cluster(&cache)).await.unwrap().unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let kubeconfig = plane.kubeconfig().display().to_string();
    // Started as the operator and the chart start them: the image's entrypoint with
    // arguments only. Each names the version the chart's values and go.mod pin
    // (kube-state-metrics has a subcommand for it, the others a flag).
    for (name, ask, version) in [
        ("prometheus", "--version", "version 3.14.0"),
        ("alertmanager", "--version", "version 0.25."),
        ("prometheus-operator", "--version", "version 0.93.1"),
        ("prometheus-config-reloader", "--version", "version 0.93.1"),
        ("kube-state-metrics", "version", "version v2.20.0"),
    ] {
        let image = plane.push_built(built.iter().find(|b| b.name == name).unwrap()).unwrap();
        let spec = json!({ "containers": [{ "image": image, "args": [ask] }] });
        let (phase, logs) = cluster::run_to_completion(&pods, &kubeconfig, &ns, name, spec).await;
        assert_eq!(phase, "Succeeded", "{name}: {logs}");
        assert!(logs.contains(version), "{name} {ask} says {version}: {logs}");
    }
}
