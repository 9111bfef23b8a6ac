//! `--verify-signatures` with commits signed as git signs them (SSH keys, through
//! ssh-keygen): only heads signed by an allowed key are applied; an unsigned or
//! untrusted head leaves the last good state applied, and `/status` and
//! `gitops_unverified_commits_total` say why.

use std::path::{Path, PathBuf};
use std::process::Command;

use gitops_tests::agent::{Agent, AgentConfig};
use gitops_tests::cluster::{self, eventually};
use gitops_tests::git::GitRepo;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;

/// A new ed25519 key pair in `dir`; returns the private key's path.
fn key(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&path)
        .status()
        .expect("running ssh-keygen");
    assert!(status.success());
    path
}

fn config_map(value: &str) -> String {
    format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: app\ndata:\n  value: \"{value}\"\n")
}

#[tokio::test]
async fn only_heads_signed_by_an_allowed_key_are_applied() {
    let client = cluster::client().await;
    let ns = cluster::namespace(&client, "signed").await;
    let keys = tempfile::tempdir().unwrap();
    let (trusted, stranger) = (key(keys.path(), "deployer"), key(keys.path(), "stranger"));
    let public = std::fs::read_to_string(trusted.with_extension("pub")).unwrap();
    let allowed = keys.path().join("allowed_signers");
    std::fs::write(&allowed, format!("deployer@example.com namespaces=\"git\" {public}")).unwrap();

    let repo = GitRepo::new();
    repo.write("manifests/app.yaml", &config_map("1"));
    let good = repo.commit_signed("signed", &trusted);
    let agent = Agent::start(
        client.clone(),
        AgentConfig {
            local_repo: Some(repo.path()),
            allowed_signers: Some(allowed),
            ..AgentConfig::new(repo.file_url(), &ns)
        },
    )
    .await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let value = || async { cms.get_opt("app").await.unwrap().and_then(|cm| cm.data?.remove("value")) };
    eventually("the signed commit applied", || async { (value().await.as_deref() == Some("1")).then_some(()) }).await;

    for (attempt, expected) in [
        ("unsigned", "is not signed; --verify-signatures applies only signed commits"),
        ("stranger", "is signed by a key the allowed signers do not list (SHA256:"),
    ] {
        repo.write("manifests/app.yaml", &config_map(attempt));
        let head = match attempt {
            "unsigned" => repo.commit(attempt),
            _ => repo.commit_signed(attempt, &stranger),
        };
        let error = eventually(&format!("the {attempt} head refused in /status"), || async {
            let errors = agent.status().await["errors"].clone();
            errors[0]["message"].as_str().filter(|e| e.contains(&head)).map(str::to_owned)
        })
        .await;
        assert!(error.starts_with(&format!("commit {head} {expected}")), "{error}");
        assert_eq!(value().await.as_deref(), Some("1"), "{attempt}: the last good state stays");
        assert_eq!(agent.status().await["revision"], good.as_str());
    }
    let fingerprint = Command::new("ssh-keygen").arg("-lf").arg(stranger.with_extension("pub")).output().unwrap();
    let fingerprint = String::from_utf8(fingerprint.stdout).unwrap();
    let fingerprint = fingerprint.split_whitespace().nth(1).unwrap();
    let status = agent.status().await;
    assert!(status["errors"][0]["message"].as_str().unwrap().ends_with(&format!("({fingerprint})")), "{status}");
    assert!(agent.metric("gitops_unverified_commits_total").await >= 2.0);

    repo.write("manifests/app.yaml", &config_map("2"));
    let again = repo.commit_signed("signed again", &trusted);
    eventually("the next signed commit applied", || async { (value().await.as_deref() == Some("2")).then_some(()) })
        .await;
    // /status is written when the sync ends, a moment after its objects are applied.
    let status = eventually("/status to report the signed commit", || async {
        let status = agent.status().await;
        (status["revision"] == again.as_str()).then_some(status)
    })
    .await;
    assert_eq!(status["errors"], serde_json::json!([]));
    agent.stop().await;
}
