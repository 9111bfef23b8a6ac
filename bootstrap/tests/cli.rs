//! The `gitops-bootstrap` command line as a user runs it: `up`, then kubectl against
//! the kubeconfig it wrote, `status`, and `down`, which leaves no process behind.
//! `--no-node`: these run beside each other, and the machine has one node
//! (tests/tests/node.rs has it).

use std::path::Path;
use std::process::{Command, Output};

use gitops_bootstrap::local::process::is_running;

mod common;
use common::{build_agent, git, kubectl};

fn bootstrap(args: &[&str]) -> Output {
    let output = Command::new(env!("CARGO_BIN_EXE_gitops-bootstrap")).args(args).output().unwrap();
    assert_success(args, output)
}

fn assert_success(args: &[&str], output: Output) -> Output {
    assert!(output.status.success(), "gitops-bootstrap {args:?} failed:\n{}", String::from_utf8_lossy(&output.stderr));
    output
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The pids `status` reports as running.
fn running_pids(state: &Path) -> Vec<i32> {
    let status = stdout(&bootstrap(&["status", "--provider", "local", "--state-dir", state.to_str().unwrap()]));
    status
        .lines()
        .filter(|line| line.ends_with("running"))
        .filter_map(|line| line.split_whitespace().nth(2)?.parse().ok())
        .collect()
}

/// `down`, then none of `pids` runs and the state is gone.
fn down_leaves_nothing(state: &Path, pids: &[i32]) -> String {
    let down = stdout(&bootstrap(&["down", "--provider", "local", "--state-dir", state.to_str().unwrap()]));
    for pid in pids {
        assert!(!is_running(*pid), "process {pid} survived `down`");
    }
    assert!(!state.exists(), "`down` removes the state directory");
    down
}

#[test]
fn up_kubectl_status_down() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let state_arg = state.to_str().unwrap();
    let local = ["--provider", "local", "--state-dir", state_arg];

    let up = bootstrap(&[&["up"][..], &local, &["--no-agent", "--no-node"]].concat());
    assert!(stdout(&up).contains(&format!("KUBECONFIG={}", state.join("kubeconfig").display())), "{}", stdout(&up));

    let kubectl = Command::new("kubectl")
        .args(["--kubeconfig", state.join("kubeconfig").to_str().unwrap(), "get", "namespaces", "-o", "name"])
        .output()
        .unwrap();
    let namespaces = stdout(&kubectl);
    assert!(namespaces.contains("namespace/default") && namespaces.contains("namespace/kube-system"), "{namespaces}");

    let pids = running_pids(&state);
    assert_eq!(pids.len(), 3, "etcd, kube-apiserver and kube-controller-manager run: {pids:?}");

    let again = stdout(&bootstrap(&[&["up"][..], &local, &["--no-agent", "--no-node"]].concat()));
    assert!(again.contains("already running"), "a second `up` changes nothing: {again}");

    let down = down_leaves_nothing(&state, &pids);
    assert!(down.contains("stopped etcd, kube-apiserver, kube-controller-manager"), "{down}");
}

/// Polls `kubectl get configmap app -o jsonpath={.data.value}` until it prints `want`.
fn wait_for_value(kubeconfig: &Path, want: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let got = kubectl(kubeconfig, &["get", "configmap", "app", "-o", "jsonpath={.data.value}"]);
        if got == want {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "ConfigMap app never held {want:?} (last: {got:?})");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

#[test]
fn up_with_a_repo_deploys_each_commit_and_reverts() {
    build_agent();
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    std::fs::create_dir_all(repo.join("manifests")).unwrap();
    let write = |value: &str| {
        let cm = format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: app\ndata:\n  value: {value}\n");
        std::fs::write(repo.join("manifests/app.yaml"), cm).unwrap();
    };
    write("first");
    git(&repo, &["init", "-q", "-b", "main"]);
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-q", "-m", "first"]);

    let state = dir.path().join("state");
    let listen = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let args = [
        "up",
        "--provider",
        "local",
        "--state-dir",
        state.to_str().unwrap(),
        "--repo",
        repo.to_str().unwrap(),
        "--agent-listen",
        &listen,
        "--no-node",
    ];
    let up = bootstrap(&args);
    assert!(stdout(&up).contains("It has applied "), "{}", stdout(&up));
    let kubeconfig = state.join("kubeconfig");
    wait_for_value(&kubeconfig, "first");

    write("second");
    git(&repo, &["commit", "-q", "-am", "second"]);
    wait_for_value(&kubeconfig, "second");

    git(&repo, &["revert", "--no-edit", "HEAD"]);
    wait_for_value(&kubeconfig, "first");
    // The agent records the revision just after applying it.
    let head = stdout(&Command::new("git").arg("-C").arg(&repo).args(["rev-parse", "HEAD"]).output().unwrap());
    let synced = format!("agent: synced at {}", head.trim());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        let status = stdout(&bootstrap(&["status", "--provider", "local", "--state-dir", state.to_str().unwrap()]));
        if status.contains(&synced) || std::time::Instant::now() > deadline {
            break status;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert!(status.contains(&synced), "status names what the agent applied: {status}");
    assert!(status.contains(&format!("logs: {}", state.join("logs").display())), "{status}");

    let pids = running_pids(&state);
    assert_eq!(pids.len(), 4, "the control plane and the agent run: {pids:?}");
    down_leaves_nothing(&state, &pids);
}

#[test]
fn up_reports_a_revision_that_does_not_become_healthy_and_fails() {
    build_agent();
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    std::fs::create_dir_all(repo.join("manifests")).unwrap();
    // No node: its pod is never scheduled, and the rollout passes its progress deadline.
    let web = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  progressDeadlineSeconds: 3\n  \
               selector:\n    matchLabels: {app: web}\n  template:\n    metadata:\n      labels: {app: web}\n    \
               spec:\n      containers: [{name: app, image: busybox}]\n";
    std::fs::write(repo.join("manifests/web.yaml"), web).unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-q", "-m", "web"]);

    let state = dir.path().join("state");
    let listen = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let args = [
        "up",
        "--provider",
        "local",
        "--state-dir",
        state.to_str().unwrap(),
        "--repo",
        repo.to_str().unwrap(),
        "--agent-listen",
        &listen,
        "--no-node",
    ];
    let up = Command::new(env!("CARGO_BIN_EXE_gitops-bootstrap")).args(args).output().unwrap();
    let (out, err) = (stdout(&up), String::from_utf8_lossy(&up.stderr).into_owned());
    assert!(!up.status.success(), "up succeeded with a Degraded revision:\n{out}");
    assert!(out.contains("It has applied "), "the first sync is reported before health: {out}");
    assert!(err.contains("is Degraded; its unhealthy objects:"), "{err}");
    let web = err.lines().find(|line| line.contains("/web: Degraded: ")).unwrap_or_else(|| panic!("{err}"));
    assert!(web.trim_start().starts_with("Deployment "), "{err}");
    assert!(web.contains("ProgressDeadlineExceeded"), "the reason: {err}");
    assert!(
        err.contains(&format!("gitops-bootstrap status --provider local --state-dir {}", state.display())),
        "{err}"
    );
    assert!(err.contains("get pods -A"), "{err}");

    let pids = running_pids(&state);
    assert_eq!(pids.len(), 4, "the cluster and the agent keep running to be looked at: {pids:?}");
    down_leaves_nothing(&state, &pids);
}
