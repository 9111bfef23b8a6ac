//! Real control planes for tests, started through the bootstrap's own `local` provider.
//!
//! - [`shared`]: one control plane per test binary, started on first use; each test
//!   works in a [`namespace`] of its own, so tests run in parallel without seeing each
//!   other.
//! - [`private`]: a control plane of its own, for tests that stop or restart components.
//! - [`node`]: the cluster with the machine's one node, for tests whose pods run; one
//!   process at a time holds it, the others wait.
//!
//! Both are tied to the test process: when it exits, panics or is SIGKILLed, the kernel
//! kills the components (see `gitops_bootstrap::local::process`).

use std::path::PathBuf;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use gitops_bootstrap::local::node::WhenInUse;
use gitops_bootstrap::local::{Lifetime, LocalControlPlane, Options, stop_state_dir};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, PostParams};

/// Where this process keeps its control planes' state: `$TMPDIR/gitops-tests/PID`.
fn state_root() -> PathBuf {
    std::env::temp_dir().join("gitops-tests").join(std::process::id().to_string())
}

/// Removes the state of earlier test processes that are gone: their components died
/// with them, but their directories stay behind.
fn remove_stale_state() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir().join("gitops-tests")) else { return };
    for entry in entries.flatten() {
        let pid = entry.file_name().to_string_lossy().parse::<u32>().ok();
        if pid.is_some_and(|pid| !PathBuf::from(format!("/proc/{pid}")).exists()) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// The control plane shared by every test of this binary. The first caller starts it
/// (building the binaries if the cache lacks them); a failure to start panics with the
/// component's log.
pub fn shared() -> &'static LocalControlPlane {
    static SHARED: OnceLock<LocalControlPlane> = OnceLock::new();
    SHARED.get_or_init(|| {
        remove_stale_state();
        let options = Options::new(state_root().join("shared"), Lifetime::TiedToThisProcess);
        // Started on a runtime of its own: the callers' runtimes end with their tests.
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
            runtime.block_on(LocalControlPlane::start(&options))
        })
        .join()
        .expect("control plane start does not panic")
        .unwrap_or_else(|e| panic!("starting the shared control plane: {e}"))
    })
}

/// A control plane of the caller's own, stopped when dropped.
pub async fn private() -> LocalControlPlane {
    remove_stale_state();
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = state_root().join(format!("private-{}", NEXT.fetch_add(1, Ordering::Relaxed)));
    LocalControlPlane::start(&Options::new(dir, Lifetime::TiedToThisProcess))
        .await
        .unwrap_or_else(|e| panic!("starting a private control plane: {e}"))
}

/// The options of a cluster with the machine's one node. Another process's node (a
/// test binary of another worktree, a `gitops-bootstrap up`) is waited for, not failed on.
fn node_options(dir: PathBuf) -> Options {
    Options { when_node_in_use: WhenInUse::Wait, ..Options::with_node(dir, Lifetime::TiedToThisProcess) }
}

/// The cluster with the machine's one node, shared by every test of this binary like
/// [`shared`] (each test in a [`namespace`] of its own). Its components die with the
/// process; what the node left on the machine (bridge, iptables rules, mounts) is
/// removed when the process exits, and by whichever node starts next.
pub fn node() -> &'static LocalControlPlane {
    static NODE: OnceLock<LocalControlPlane> = OnceLock::new();
    NODE.get_or_init(|| {
        remove_stale_state();
        let options = node_options(state_root().join("node"));
        let plane = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
            runtime.block_on(LocalControlPlane::start(&options))
        })
        .join()
        .expect("node start does not panic")
        .unwrap_or_else(|e| panic!("starting the cluster with the node: {e}"));
        extern "C" fn stop_node() {
            let _ = stop_state_dir(&state_root().join("node"));
        }
        // SAFETY: registers a plain function; it runs once, as the process exits.
        unsafe { nix::libc::atexit(stop_node) };
        plane
    })
}

/// A cluster with the machine's one node of the caller's own, stopped (and the node's
/// traces removed from the machine) when dropped: for the test that checks what
/// stopping leaves. It waits while [`node`] or another process holds the node.
pub async fn with_node() -> LocalControlPlane {
    remove_stale_state();
    LocalControlPlane::start(&node_options(state_root().join("own-node")))
        .await
        .unwrap_or_else(|e| panic!("starting a cluster with a node: {e}"))
}

/// An admin client of the shared control plane, for the calling test's runtime.
pub async fn client() -> kube::Client {
    shared().client().await.expect("admin client for the shared control plane")
}

/// Creates a namespace named `PREFIX-N` that no other test uses, and returns its name.
pub async fn namespace(client: &kube::Client, prefix: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let name = format!("{prefix}-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
    let ns: Namespace = serde_json::from_value(serde_json::json!({ "metadata": { "name": name } })).unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap_or_else(|e| panic!("creating namespace {name}: {e}"));
    name
}

/// Polls `check` every 100 ms until it returns `Some`, or panics after `what` has not
/// happened for two minutes. The bound only keeps a broken test from hanging CI; no
/// test asserts on how long anything took.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for {what}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Applies every object of `yaml` (server-side, as field manager `gitops-tests`),
/// rendered as the agent renders a file, in the order written.
pub async fn apply_yaml(client: &kube::Client, yaml: &str) -> Vec<gitops_agent::render::Manifest> {
    gitops_bootstrap::local::addons::apply_yaml(client, yaml, "gitops-tests").await.unwrap_or_else(|e| panic!("{e}"))
}

/// Installs the CRD stand-ins of `manifests/crds/` (SparkApplication, ServiceMonitor,
/// PrometheusRule) and waits until the API server serves them. Idempotent, so tests
/// sharing a control plane may all call it.
pub async fn install_stand_in_crds(client: &kube::Client) {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;

    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../manifests/crds");
    let mut yaml = String::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        yaml += &format!("---\n{}", std::fs::read_to_string(entry.unwrap().path()).unwrap());
    }
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for manifest in apply_yaml(client, &yaml).await {
        eventually(&format!("CRD {} to be established", manifest.name()), || async {
            let crd = crds.get(manifest.name()).await.ok()?;
            let conditions = crd.status?.conditions?;
            conditions.iter().any(|c| c.type_ == "Established" && c.status == "True").then_some(())
        })
        .await;
    }
}

/// A client of the shared control plane that authenticates as ServiceAccount
/// `namespace/name` (created if missing), with a token from the TokenRequest API:
/// what a pod running as that account gets.
pub async fn service_account_client(admin: &kube::Client, namespace: &str, name: &str) -> kube::Client {
    use k8s_openapi::api::authentication::v1::TokenRequest;
    use k8s_openapi::api::core::v1::ServiceAccount;
    use kube::config::{AuthInfo, KubeConfigOptions, Kubeconfig};

    let accounts: Api<ServiceAccount> = Api::namespaced(admin.clone(), namespace);
    let account: ServiceAccount = serde_json::from_value(serde_json::json!({ "metadata": { "name": name } })).unwrap();
    match accounts.create(&PostParams::default(), &account).await {
        Err(kube::Error::Api(status)) if status.code == 409 => {}
        Ok(_) => {}
        Err(e) => panic!("creating ServiceAccount {namespace}/{name}: {e}"),
    }
    let request: TokenRequest =
        serde_json::from_value(serde_json::json!({ "spec": { "audiences": [], "expirationSeconds": 3600 } })).unwrap();
    let issued: TokenRequest = accounts
        .create_subresource("token", name, &PostParams::default(), &request)
        .await
        .unwrap_or_else(|e| panic!("a token for {namespace}/{name}: {e}"));
    let token: String = issued.status.and_then(|s| s.token).expect("an issued token");

    let kubeconfig = Kubeconfig::read_from(shared().kubeconfig()).unwrap();
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await.unwrap();
    config.auth_info = AuthInfo { token: Some(token.into()), ..Default::default() };
    kube::Client::try_from(config).unwrap()
}

/// A ConfigMap `name` whose `data.value` is `value`, as a manifest file holds it.
pub fn configmap(name: &str, value: &str) -> String {
    format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\ndata:\n  value: {value}\n")
}

/// ConfigMap `name`'s `data.value`, if it exists.
pub async fn value(cms: &Api<k8s_openapi::api::core::v1::ConfigMap>, name: &str) -> Option<String> {
    cms.get_opt(name).await.ok()??.data?.remove("value")
}

/// `kubectl ARGS` against the shared control plane, as a user runs it: its output.
pub fn kubectl(args: &[&str]) -> String {
    let output = std::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(shared().kubeconfig())
        .args(args)
        .output()
        .expect("kubectl runs");
    assert!(output.status.success(), "kubectl {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs pod `name` of `spec` (its first container named after it, never restarted) in
/// `namespace` to completion, and returns its phase and its log (`kubectl logs`).
pub async fn run_to_completion(
    pods: &Api<k8s_openapi::api::core::v1::Pod>,
    kubeconfig: &str,
    namespace: &str,
    name: &str,
    mut spec: serde_json::Value,
) -> (String, String) {
    spec["restartPolicy"] = serde_json::json!("Never");
    spec["containers"][0]["name"] = serde_json::json!(name);
    let pod = serde_json::from_value(serde_json::json!({ "metadata": { "name": name }, "spec": spec })).unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let phase = eventually(&format!("pod {name} to finish"), || async {
        let phase = pods.get(name).await.ok()?.status?.phase?;
        matches!(phase.as_str(), "Succeeded" | "Failed").then_some(phase)
    })
    .await;
    let logs = std::process::Command::new("kubectl")
        .args(["--kubeconfig", kubeconfig, "-n", namespace, "logs", name])
        .output()
        .expect("kubectl runs");
    (phase, String::from_utf8_lossy(&logs.stdout).into_owned() + &String::from_utf8_lossy(&logs.stderr))
}

/// The body of a `200` answer to `GET path` from `address` (`host:port`), as a user's
/// curl from this machine would get it; `None` for no answer within 5 s or another status.
pub async fn http_get(address: &str, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
        stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").as_bytes()).await.ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await.ok()?;
        Some(response)
    };
    let response = tokio::time::timeout(std::time::Duration::from_secs(5), exchange).await.ok()??;
    let (head, body) = response.split_once("\r\n\r\n")?;
    (head.lines().next()?.split_whitespace().nth(1) == Some("200")).then(|| body.to_owned())
}

/// Whether `pod` reports its Ready condition True (the kubelet's word).
pub fn is_ready(pod: &k8s_openapi::api::core::v1::Pod) -> bool {
    let conditions = pod.status.as_ref().and_then(|s| s.conditions.as_ref());
    conditions.is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The names of the pods matching `labels` that are Ready and not being deleted.
pub async fn ready_pods(pods: &Api<k8s_openapi::api::core::v1::Pod>, labels: &str) -> Vec<String> {
    let listed = pods.list(&kube::api::ListParams::default().labels(labels)).await.unwrap();
    listed
        .items
        .into_iter()
        .filter(|pod| pod.metadata.deletion_timestamp.is_none() && is_ready(pod))
        .map(|pod| pod.metadata.name.unwrap())
        .collect()
}

/// How a test installs the agent in the node's cluster, as `up` does: following `repo`
/// (a local path) at `path`, on `main`, with no credentials, stopped with the test.
pub fn in_cluster_options(repo: &std::path::Path, path: &str) -> gitops_bootstrap::local::agent::InClusterOptions {
    gitops_bootstrap::local::agent::InClusterOptions {
        binary: crate::agent::binary(),
        install: gitops_bootstrap::install::InstallOptions {
            repo: repo.display().to_string(),
            branch: "main".into(),
            path: path.into(),
            image: String::new(),
            git_token_file: None,
            git_username: "git".into(),
            ssh_key_file: None,
            ssh_known_hosts_file: None,
        },
        lifetime: Lifetime::TiedToThisProcess,
    }
}
