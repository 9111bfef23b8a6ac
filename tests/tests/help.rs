//! Every flag of both binaries says what it is in `--help`: a flag added without a doc
//! comment shows in clap's long help as its name followed by only `[env: …]` or
//! `[default: …]`, which this test catches.

use std::process::Command;

/// The flags of `binary args… --help` whose help has no words of its own.
fn undocumented(binary: &std::path::Path, args: &[&str]) -> Vec<String> {
    let output = Command::new(binary).args(args).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&output.stdout).into_owned();
    let lines: Vec<&str> = help.lines().collect();
    lines
        .windows(2)
        .filter(|pair| pair[0].trim_start().starts_with("--") && !pair[0].contains("--help"))
        .filter(|pair| {
            let next = pair[1].trim();
            next.is_empty() || next.starts_with('[')
        })
        .map(|pair| format!("{} {}: {}", binary.display(), args.join(" "), pair[0].trim()))
        .collect()
}

#[test]
fn every_flag_of_both_binaries_has_a_help_line() {
    let agent = gitops_tests::agent::binary();
    let bootstrap = agent.with_file_name("gitops-bootstrap");
    let status = Command::new(env!("CARGO")).args(["build", "-q", "-p", "gitops-bootstrap"]).status().unwrap();
    assert!(status.success(), "building gitops-bootstrap");
    let mut missing = Vec::new();
    for command in ["run", "validate", "diff", "suspend", "resume", "sync"] {
        missing.extend(undocumented(&agent, &[command]));
    }
    for command in ["up", "down", "status", "prepare", "token"] {
        missing.extend(undocumented(&bootstrap, &[command]));
    }
    assert!(missing.is_empty(), "flags without a help line:\n{}", missing.join("\n"));
}

/// `status` and `prepare` serve only the local provider: their help offers no other, and
/// `--provider eks` is refused before anything runs, pointing at what shows an EKS
/// cluster's state.
#[test]
fn status_and_prepare_offer_and_take_only_the_local_provider() {
    let bootstrap = gitops_tests::agent::binary().with_file_name("gitops-bootstrap");
    let status = Command::new(env!("CARGO")).args(["build", "-q", "-p", "gitops-bootstrap"]).status().unwrap();
    assert!(status.success(), "building gitops-bootstrap");
    for command in ["status", "prepare"] {
        let help = Command::new(&bootstrap).args([command, "-h"]).output().unwrap();
        let help = String::from_utf8_lossy(&help.stdout).into_owned();
        assert!(help.contains("[possible values: local]"), "{help}");
    }
    let refused =
        Command::new(&bootstrap).args(["status", "--provider", "eks", "--state-dir", "/nonexistent"]).output().unwrap();
    assert_eq!(refused.status.code(), Some(2), "a usage error");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("invalid value 'eks' for '--provider <PROVIDER>'"), "{stderr}");
    let help = Command::new(&bootstrap).args(["status", "-h"]).output().unwrap();
    assert!(String::from_utf8_lossy(&help.stdout).contains("up --provider eks --dry-run"), "says where EKS's state is");
}
