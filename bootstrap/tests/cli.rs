//! The `gitops-bootstrap` command line as a user runs it: `up`, then kubectl against
//! the kubeconfig it wrote, `status`, and `down`, which leaves no process behind.

use std::path::Path;
use std::process::{Command, Output};

fn bootstrap(args: &[&str]) -> Output {
    let output = Command::new(env!("CARGO_BIN_EXE_gitops-bootstrap")).args(args).output().unwrap();
    assert!(output.status.success(), "gitops-bootstrap {args:?} failed:\n{}", String::from_utf8_lossy(&output.stderr));
    output
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn running(pid: &str) -> bool {
    // A zombie has exited; whoever inherited it reaps it.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| stat.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')))
}

#[test]
fn up_kubectl_status_down() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let state_arg = state.to_str().unwrap();
    let local = ["--provider", "local", "--state-dir", state_arg];

    let up = bootstrap(&[&["up"][..], &local, &["--no-agent"]].concat());
    assert!(stdout(&up).contains(&format!("KUBECONFIG={}", state.join("kubeconfig").display())), "{}", stdout(&up));

    let kubectl = Command::new("kubectl")
        .args(["--kubeconfig", state.join("kubeconfig").to_str().unwrap(), "get", "namespaces", "-o", "name"])
        .output()
        .unwrap();
    let namespaces = stdout(&kubectl);
    assert!(namespaces.contains("namespace/default") && namespaces.contains("namespace/kube-system"), "{namespaces}");

    let status = stdout(&bootstrap(&[&["status"][..], &local].concat()));
    let pids: Vec<String> = status
        .lines()
        .filter(|line| line.ends_with("running"))
        .filter_map(|line| line.split_whitespace().nth(2).map(str::to_owned))
        .collect();
    assert_eq!(pids.len(), 3, "etcd, kube-apiserver and kube-controller-manager run:\n{status}");

    let again = stdout(&bootstrap(&[&["up"][..], &local, &["--no-agent"]].concat()));
    assert!(again.contains("already running"), "a second `up` changes nothing: {again}");

    let down = stdout(&bootstrap(&[&["down"][..], &local].concat()));
    assert!(down.contains("stopped etcd, kube-apiserver, kube-controller-manager"), "{down}");
    for pid in &pids {
        assert!(!running(pid), "process {pid} survived `down`");
    }
    assert!(!Path::new(&state).exists(), "`down` removes the state directory");
}
