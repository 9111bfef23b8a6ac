//! The local cluster's node is a real one: a pod from an image packed here runs on
//! containerd and runc, its log reads through the API server and the kubelet, the
//! kubelet pulls the Debian base from the node's registry, and stopping the cluster
//! leaves nothing of the node on the machine.
//!
//! One test function: the machine has one node (one kubelet, one `cni0`), so the steps
//! share it in turn rather than in parallel tests.

use std::path::PathBuf;
use std::process::Command;

use gitops_bootstrap::local::image::{Image, ImageFile};
use gitops_bootstrap::local::network::NODE_NAME;
use gitops_tests::cluster::{self, eventually};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, PostParams};
use serde_json::json;

/// Debian's busybox-static: one static binary with a shell, packed into a test image.
const BUSYBOX: &str = "/bin/busybox";
const BUSYBOX_IMAGE: &str = "gitops.local/busybox:1";

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

#[tokio::test]
async fn a_pod_runs_on_the_node_and_stopping_leaves_nothing() {
    let before = machine_sysctls();
    let mut plane = cluster::with_node().await;
    let client = plane.client().await.unwrap();
    let node = Api::<Node>::all(client.clone()).get(NODE_NAME).await.unwrap();
    let version = node.status.unwrap().node_info.unwrap().kubelet_version;
    assert_eq!(version, plane.kubernetes_version(), "the kubelet is of the control plane's build");

    // A pod from an image packed here, never pulled.
    let archive = plane.state_dir().join("busybox.tar");
    Image {
        reference: BUSYBOX_IMAGE.into(),
        files: vec![ImageFile { path: "/bin/busybox", source: PathBuf::from(BUSYBOX) }],
        entrypoint: vec!["/bin/busybox".into()],
    }
    .write_archive(&archive)
    .unwrap();
    plane.import_image(&archive).unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pod: Pod = serde_json::from_value(json!({
        "metadata": { "name": "hello" },
        "spec": {
            "restartPolicy": "Never",
            "containers": [{
                "name": "hello",
                "image": BUSYBOX_IMAGE,
                "imagePullPolicy": "Never",
                "args": ["sh", "-c", "echo hello from $(hostname) as $(id -u)"],
            }],
        },
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let phase = eventually("pod hello to finish", || async {
        let phase = pods.get("hello").await.ok()?.status?.phase?;
        matches!(phase.as_str(), "Succeeded" | "Failed").then_some(phase)
    })
    .await;
    let kubeconfig = plane.kubeconfig().display().to_string();
    let logs = command("kubectl", &["--kubeconfig", &kubeconfig, "logs", "hello"]);
    assert_eq!(phase, "Succeeded", "pod hello: {logs}");
    assert_eq!(logs.trim(), "hello from hello as 0");

    // The Debian base, pulled by the kubelet from the node's registry.
    let registry = std::fs::read_to_string(plane.state_dir().join("registry")).unwrap();
    assert_eq!(Some(registry.trim()), plane.registry(), "STATE_DIR/registry names the registry");
    let pod: Pod = serde_json::from_value(json!({
        "metadata": { "name": "debian" },
        "spec": {
            "restartPolicy": "Never",
            "containers": [{
                "name": "debian",
                "image": format!("{}/debian:bookworm", registry.trim()),
                "command": ["/bin/sh", "-c", "cat /etc/debian_version; getent hosts localhost"],
            }],
        },
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let phase = eventually("pod debian to finish", || async {
        let phase = pods.get("debian").await.ok()?.status?.phase?;
        matches!(phase.as_str(), "Succeeded" | "Failed").then_some(phase)
    })
    .await;
    let logs = command("kubectl", &["--kubeconfig", &kubeconfig, "logs", "debian"]);
    assert_eq!(phase, "Succeeded", "pod debian: {logs}");
    assert!(logs.starts_with("12."), "Debian 12's version, then localhost: {logs}");
    let events = command(
        "kubectl",
        &["--kubeconfig", &kubeconfig, "get", "events", "--field-selector", "involvedObject.name=debian"],
    );
    assert!(events.contains("Pulled"), "the kubelet pulled the image: {events}");

    // Stopping removes every trace of the node from the machine.
    let state_dir = plane.state_dir().to_owned();
    plane.stop();
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
    let node_process = |l: &&str| {
        l.contains(&state) || l.contains("containerd") || l.ends_with("/pause") || l.contains("kube-local kubelet")
    };
    let left: Vec<&str> = processes.lines().filter(node_process).collect();
    assert!(left.is_empty(), "processes of the node left: {left:?}");
    assert_eq!(sysctls(), before, "sysctls {SYSCTLS:?} are restored");
}
