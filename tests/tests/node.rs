//! The local cluster's node is a real one: a pod from an image packed here runs on
//! containerd and runc, its log reads through the API server and the kubelet, the
//! kubelet pulls the Debian base from the node's registry, a Service answers another
//! pod through kube-proxy (and by its DNS name, through CoreDNS) and the host on its
//! NodePort, a claim binds and keeps its data, no image is pulled from outside, no pod
//! reaches an address
//! outside the node's networks, and stopping the cluster leaves nothing of the node on
//! the machine.
//!
//! One test function: the machine has one node (one kubelet, one `cni0`), so the steps
//! share it in turn rather than in parallel tests.

use std::process::{Child, Command};

use gitops_bootstrap::local::network::{NODE_IP, NODE_NAME};
use gitops_bootstrap::local::{Lifetime, LocalControlPlane, Options};
use gitops_tests::cluster::{self, eventually, http_get};
use gitops_tests::images::{BUSYBOX, BUSYBOX_IMAGE};
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use kube::api::{Api, PostParams};
use serde_json::json;

/// The sysctls the node changes, which stopping it must put back.
const SYSCTLS: [&str; 4] = ["vm/overcommit_memory", "kernel/panic", "kernel/panic_on_oops", "net/ipv4/ip_forward"];

fn sysctls() -> Vec<String> {
    SYSCTLS
        .iter()
        .map(|s| std::fs::read_to_string(format!("/proc/sys/{s}")).unwrap_or_default().trim().to_owned())
        .collect()
}

/// The machine's own sysctls: as they are, or as an earlier node that was killed
/// before it could restore them saved them (starting the node restores those first).
fn machine_sysctls() -> Vec<String> {
    let Ok(saved) = std::fs::read_to_string("/run/gitops-local-node/sysctls") else { return sysctls() };
    let saved: Vec<(&str, &str)> = saved.lines().filter_map(|l| l.split_once('=')).collect();
    let current = sysctls();
    SYSCTLS
        .iter()
        .zip(current)
        .map(|(name, now)| saved.iter().find(|(n, _)| n == name).map_or(now, |(_, v)| v.to_string()))
        .collect()
}

fn command(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace of the test's own, standing for the world outside the machine:
/// reached from the host over a veth, at addresses outside the pod and service
/// networks (198.18.0.0/15 is for benchmarking, routed nowhere), serving HTTP.
struct Outside {
    server: Child,
}

const OUTSIDE_NS: &str = "gitops-test-outside";
const OUTSIDE_HOST_SIDE: &str = "gtout0";
const OUTSIDE_ADDRESS: &str = "198.18.0.2";

impl Outside {
    fn start(www: &std::path::Path) -> Outside {
        let _ = Command::new("ip").args(["netns", "delete", OUTSIDE_NS]).output();
        std::fs::write(www.join("index.html"), "outside\n").unwrap();
        for args in [
            &["netns", "add", OUTSIDE_NS][..],
            &["link", "add", OUTSIDE_HOST_SIDE, "type", "veth", "peer", "name", "gtout1", "netns", OUTSIDE_NS],
            &["addr", "add", "198.18.0.1/30", "dev", OUTSIDE_HOST_SIDE],
            &["link", "set", OUTSIDE_HOST_SIDE, "up"],
            &["-n", OUTSIDE_NS, "addr", "add", "198.18.0.2/30", "dev", "gtout1"],
            &["-n", OUTSIDE_NS, "link", "set", "gtout1", "up"],
            &["-n", OUTSIDE_NS, "link", "set", "lo", "up"],
            // A way back to anyone, pods included: only the node's rules keep them out.
            &["-n", OUTSIDE_NS, "route", "add", "default", "via", "198.18.0.1"],
        ] {
            command("ip", args);
        }
        let server = Command::new("ip")
            .args(["netns", "exec", OUTSIDE_NS, BUSYBOX, "httpd", "-f", "-p", &format!("{OUTSIDE_ADDRESS}:80"), "-h"])
            .arg(www)
            .spawn()
            .unwrap();
        Outside { server }
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = Command::new("ip").args(["netns", "delete", OUTSIDE_NS]).output();
    }
}

/// Runs a pod of one container to completion and returns its phase and log.
async fn run_pod(pods: &Api<Pod>, kubeconfig: &str, name: &str, container: serde_json::Value) -> (String, String) {
    run_pod_spec(pods, kubeconfig, name, json!({ "containers": [container] })).await
}

/// Runs a pod of `spec` in `default` to completion and returns its phase and log.
async fn run_pod_spec(pods: &Api<Pod>, kubeconfig: &str, name: &str, spec: serde_json::Value) -> (String, String) {
    cluster::run_to_completion(pods, kubeconfig, "default", name, spec).await
}

/// A container of the busybox image running `script`.
fn busybox(script: &str) -> serde_json::Value {
    json!({ "image": BUSYBOX_IMAGE, "imagePullPolicy": "Never", "args": ["sh", "-c", script] })
}

/// A container of the registry's Debian image running bash `script`. (Static busybox's
/// network applets crash without glibc's NSS libraries beside them.)
fn debian(registry: &str, script: &str) -> serde_json::Value {
    json!({ "image": format!("{registry}/debian:bookworm"), "command": ["bash", "-c", script] })
}

/// A bash script that prints the body of `GET /` from `host:port`, giving up after 5 s.
fn bash_get(host: &str, port: u16) -> String {
    format!(
        "exec 3<>/dev/tcp/{host}/{port} && printf 'GET / HTTP/1.0\\r\\n\\r\\n' >&3 && timeout 5 cat <&3 | sed '1,/^\\r$/d'"
    )
}

#[tokio::test]
async fn a_pod_runs_on_the_node_and_stopping_leaves_nothing() {
    let before = machine_sysctls();
    // Made first: `ip netns add` bind-mounts /run/netns over itself the first time,
    // which would hide the pods' namespaces mounted there before.
    let www = tempfile::tempdir().unwrap();
    let outside = Outside::start(www.path());
    let plane = cluster::with_node().await;
    let client = plane.client().await.unwrap();
    let node = Api::<Node>::all(client.clone()).get(NODE_NAME).await.unwrap();
    let version = node.status.unwrap().node_info.unwrap().kubelet_version;
    assert_eq!(version, plane.kubernetes_version(), "the kubelet is of the control plane's build");
    let kubeconfig = plane.kubeconfig().display().to_string();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");

    // A pod from an image packed here, never pulled.
    gitops_tests::images::busybox(&plane);
    let (phase, logs) = run_pod(&pods, &kubeconfig, "hello", busybox("echo hello from $(hostname) as $(id -u)")).await;
    assert_eq!(phase, "Succeeded", "pod hello: {logs}");
    assert_eq!(logs.trim(), "hello from hello as 0");

    // The Debian base, pulled by the kubelet from the node's registry.
    let registry = std::fs::read_to_string(plane.state_dir().join("registry")).unwrap();
    assert_eq!(Some(registry.trim()), plane.registry(), "STATE_DIR/registry names the registry");
    let registry = registry.trim();
    let script = "cat /etc/debian_version; getent hosts localhost";
    let (phase, logs) = run_pod(&pods, &kubeconfig, "debian", debian(registry, script)).await;
    assert_eq!(phase, "Succeeded", "pod debian: {logs}");
    assert!(logs.starts_with("12."), "Debian 12's version, then localhost: {logs}");
    let events = command(
        "kubectl",
        &["--kubeconfig", &kubeconfig, "get", "events", "--field-selector", "involvedObject.name=debian"],
    );
    assert!(events.contains("Pulled"), "the kubelet pulled the image: {events}");

    // A Service in front of a web server pod: through kube-proxy from another pod, and
    // on its NodePort from the host.
    let objects = format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{ name: web, namespace: default, labels: {{ app: web }} }}
spec:
  containers:
  - name: web
    image: {BUSYBOX_IMAGE}
    imagePullPolicy: Never
    args: [sh, -c, "mkdir /www && echo served by $(hostname) > /www/index.html && exec httpd -f -p 8080 -h /www"]
    readinessProbe: {{ tcpSocket: {{ port: 8080 }}, periodSeconds: 1 }}
---
apiVersion: v1
kind: Service
metadata: {{ name: web, namespace: default }}
spec:
  type: NodePort
  selector: {{ app: web }}
  ports: [{{ port: 80, targetPort: 8080 }}]
"#
    );
    cluster::apply_yaml(&client, &objects).await;
    eventually("pod web to be ready", || async {
        let conditions = pods.get("web").await.ok()?.status?.conditions?;
        conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True").then_some(())
    })
    .await;
    let service = Api::<Service>::namespaced(client.clone(), "default").get("web").await.unwrap();
    let spec = service.spec.unwrap();
    let cluster_ip = spec.cluster_ip.unwrap();
    assert!(cluster_ip.starts_with("10.96."), "a ClusterIP of the service network: {cluster_ip}");
    let node_port = spec.ports.unwrap()[0].node_port.unwrap();
    let node_address = format!("{NODE_IP}:{node_port}");
    let from_host = eventually("the NodePort to answer the host", || http_get(&node_address, "/")).await;
    assert_eq!(from_host.trim(), "served by web");
    let (phase, logs) = run_pod(&pods, &kubeconfig, "client", debian(registry, &bash_get(&cluster_ip, 80))).await;
    assert_eq!((phase.as_str(), logs.trim()), ("Succeeded", "served by web"), "through the Service's ClusterIP");

    // Cluster DNS: CoreDNS behind kube-dns resolves the Service's name to its ClusterIP.
    let script = "getent hosts web.default.svc.cluster.local; getent hosts web";
    let (phase, logs) = run_pod(&pods, &kubeconfig, "dns", debian(registry, script)).await;
    assert_eq!(phase, "Succeeded", "pod dns: {logs}");
    let names: Vec<&str> = logs.lines().filter_map(|l| l.split_whitespace().next()).collect();
    assert_eq!(names, [cluster_ip.as_str(); 2], "both names resolve to the ClusterIP: {logs}");

    // Storage: a claim of the default StorageClass binds, and its data outlives the pod
    // that wrote it.
    let claim = r#"
apiVersion: v1
kind: PersistentVolumeClaim
metadata: { name: data, namespace: default }
spec:
  accessModes: [ReadWriteOnce]
  resources: { requests: { storage: 16Mi } }
"#;
    cluster::apply_yaml(&client, claim).await;
    let mut logs = Vec::new();
    for (name, script) in [("writer", "echo kept > /data/file"), ("reader", "cat /data/file")] {
        let mut container = debian(registry, script);
        container["volumeMounts"] = json!([{ "name": "data", "mountPath": "/data" }]);
        let spec = json!({
            "containers": [container],
            "volumes": [{ "name": "data", "persistentVolumeClaim": { "claimName": "data" } }],
        });
        let (phase, log) = run_pod_spec(&pods, &kubeconfig, name, spec).await;
        assert_eq!(phase, "Succeeded", "pod {name}: {log}");
        logs.push(log);
    }
    assert_eq!(logs[1].trim(), "kept", "the volume kept what the writer wrote");
    let claims: Api<k8s_openapi::api::core::v1::PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    let bound = claims.get("data").await.unwrap().status.unwrap();
    assert_eq!(bound.phase.as_deref(), Some("Bound"), "claim data binds through local-path");

    // Containment: a server outside the node's networks answers the host, not a pod.
    let outside_address = format!("{OUTSIDE_ADDRESS}:80");
    let from_host = eventually("the outside server to answer the host", || http_get(&outside_address, "/")).await;
    assert_eq!(from_host.trim(), "outside");
    let script = format!("timeout 3 bash -c 'exec 3<>/dev/tcp/{OUTSIDE_ADDRESS}/80' && echo reached || echo blocked");
    let (_, logs) = run_pod(&pods, &kubeconfig, "escape", debian(registry, &script)).await;
    assert_eq!(logs.trim().lines().last(), Some("blocked"), "a pod reached {OUTSIDE_ADDRESS}: {logs}");
    let dropped = command("iptables", &["-w", "-t", "mangle", "-L", "GITOPS-CONTAIN", "-v", "-n", "-x"]);
    assert!(
        dropped.lines().any(|l| l.contains("DROP") && l.split_whitespace().next().is_some_and(|n| n != "0")),
        "the containment chain dropped the pod's packets:\n{dropped}"
    );
    drop(outside);

    // A public image is never fetched: containerd's pull goes to a proxy that is not
    // there, before any DNS query or connection to the registry named.
    let public: Pod = serde_json::from_value(json!({
        "metadata": { "name": "public" },
        "spec": { "containers": [{ "name": "public", "image": "docker.io/library/busybox:1.36" }] },
    }))
    .unwrap();
    pods.create(&PostParams::default(), &public).await.unwrap();
    eventually("the public image's pull to fail at the dead proxy", || async {
        let events = command(
            "kubectl",
            &["--kubeconfig", &kubeconfig, "get", "events", "--field-selector", "involvedObject.name=public"],
        );
        events.contains("proxyconnect tcp: dial tcp 127.0.0.1:9: connect: connection refused").then_some(())
    })
    .await;

    // The machine has one node: a second cluster that wants it is refused, and told
    // which cluster holds it.
    let other = tempfile::tempdir().unwrap();
    let refused = LocalControlPlane::start(&Options::with_node(other.path(), Lifetime::TiedToThisProcess))
        .await
        .expect_err("a second node on the machine");
    let holder = format!("in use by the cluster in {}", plane.state_dir().display());
    assert!(refused.to_string().contains(&holder), "the refusal names the holder: {refused}");

    // Stopping as `down` does (from the state directory alone) removes every trace of
    // the node from the machine.
    let state_dir = plane.state_dir().to_owned();
    let stopped = gitops_bootstrap::local::stop_state_dir(&state_dir).unwrap();
    assert!(stopped.contains(&"kubelet".to_owned()), "down stops the node's components: {stopped:?}");
    assert!(!state_dir.exists(), "down removes the state directory");
    let links = command("ip", &["-o", "link"]);
    assert!(!links.contains("cni0") && !links.contains("veth"), "interfaces left:\n{links}");
    for program in ["iptables-save", "ip6tables-save"] {
        let rules = command(program, &[]);
        for chain in ["KUBE-", "CNI-", "GITOPS-"] {
            assert!(!rules.contains(chain), "{program} still has {chain} chains:\n{rules}");
        }
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    for dir in ["/var/lib/kubelet", "/run/containerd", "/run/netns/cni-", state_dir.to_str().unwrap()] {
        assert!(!mounts.contains(dir), "mounts left under {dir}:\n{mounts}");
    }
    for dir in ["/var/lib/kubelet", "/var/log/pods", "/run/containerd", "/var/lib/cni"] {
        assert!(!std::path::Path::new(dir).exists(), "{dir} is left");
    }
    for cgroup in ["memory/kubepods", "cpu/kubepods", "pids/kubepods", "memory/k8s.io"] {
        assert!(!std::path::Path::new("/sys/fs/cgroup").join(cgroup).exists(), "cgroup {cgroup} is left");
    }
    let processes = command("ps", &["-eo", "pid,args"]);
    let state = state_dir.display().to_string();
    // An exited child of this process stays a zombie until its handle (in `plane`) reaps it.
    let node_process = |l: &&str| {
        let ours =
            l.contains(&state) || l.contains("containerd") || l.ends_with("/pause") || l.contains("kube-local kubelet");
        ours && !l.ends_with("<defunct>")
    };
    let left: Vec<&str> = processes.lines().filter(node_process).collect();
    assert!(left.is_empty(), "processes of the node left: {left:?}");
    assert_eq!(sysctls(), before, "sysctls {SYSCTLS:?} are restored");
    drop(plane);
}
