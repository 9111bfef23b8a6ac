//! `gitops-agent validate DIR` as a user runs it before pushing.

use std::process::Command;

fn validate(files: &[(&str, &str)]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    for (path, contents) in files {
        let path = dir.path().join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, contents).unwrap();
    }
    let output = Command::new(env!("CARGO_BIN_EXE_gitops-agent")).arg("validate").arg(dir.path()).output().unwrap();
    (output.status.success(), String::from_utf8_lossy(&output.stdout).into_owned())
}

const GOOD: &str = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: good\n";

#[test]
fn a_valid_repository_passes() {
    let (ok, out) = validate(&[("manifests/good.yaml", GOOD)]);
    assert!(ok, "{out}");
    assert!(out.contains("1 objects, 0 batch jobs, no errors"), "{out}");
}

#[test]
fn every_error_is_reported_as_file_and_line_with_exit_1() {
    let (ok, out) = validate(&[
        ("manifests/good.yaml", GOOD),
        ("manifests/nameless.yaml", "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {}\n"),
        ("manifests/twice.yaml", &format!("{GOOD}---\n{GOOD}")),
    ]);
    assert!(!ok, "exit status 1 on errors");
    assert!(out.lines().any(|l| l.starts_with("manifests/nameless.yaml:2: ")), "{out}");
    let duplicate = out.lines().find(|l| l.contains("defined twice")).unwrap_or_default();
    assert!(duplicate.contains("manifests/good.yaml:1") && duplicate.contains("manifests/twice.yaml"), "{out}");
}

#[test]
fn a_directory_without_manifests_dashboards_or_jobs_fails_naming_the_one_meant() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests).unwrap();
    std::fs::write(manifests.join("good.yaml"), GOOD).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_gitops-agent")).arg("validate").arg(&manifests).output().unwrap();
    let out = String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success(), "nothing validated is no pass: {out}");
    assert!(out.contains("holds no kustomization and none of manifests/, dashboards/, jobs/, charts/"), "{out}");
    assert!(out.contains(&format!("did you mean {}?", dir.path().display())), "{out}");
}
