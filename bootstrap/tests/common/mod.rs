//! Helpers the bootstrap's test binaries share. Each binary compiles this module on its
//! own and uses part of it, hence the allow.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

/// `up` and the install step run `gitops-agent` from beside the test's own binaries,
/// where cargo builds it; a test run of this package alone may not have built it yet.
pub fn build_agent() {
    let status = Command::new(env!("CARGO")).args(["build", "-q", "-p", "gitops-agent"]).status().unwrap();
    assert!(status.success(), "building gitops-agent");
}

/// Runs git in `dir` as a test identity; panics with git's stderr when it fails.
pub fn git(dir: &Path, args: &[&str]) {
    let output = Command::new("git")
        .args(["-c", "user.name=test", "-c", "user.email=test@localhost"])
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(output.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&output.stderr));
}

/// kubectl's standard output, with `kubeconfig`.
pub fn kubectl(kubeconfig: &Path, args: &[&str]) -> String {
    let output = Command::new("kubectl").arg("--kubeconfig").arg(kubeconfig).args(args).output().unwrap();
    String::from_utf8_lossy(&output.stdout).into_owned()
}
