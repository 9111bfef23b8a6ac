//! The install step, shared by every provider, against a real local control plane:
//! manifests applied under their own inventory, Secrets made once, the agent (a local
//! process here: there is no kubelet) reports its first sync in its status ConfigMap,
//! its own sync of the user's repository leaves the install alone, and uninstall
//! removes it.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use gitops_bootstrap::install::{self, InstallOptions};
use gitops_bootstrap::local::{self, LocalControlPlane, Options, agent};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use kube::Api;

mod common;
use common::{build_agent, git};

#[tokio::test(flavor = "multi_thread")]
async fn install_applies_manifests_and_secrets_and_the_agent_reports_synced() {
    build_agent();
    let dir = tempfile::tempdir().unwrap();
    let plane = LocalControlPlane::start(&Options::new(dir.path().join("plane"), local::Lifetime::TiedToThisProcess))
        .await
        .unwrap();
    let client = plane.client().await.unwrap();

    // The user's repository: one ConfigMap.
    let repo = dir.path().join("repo");
    std::fs::create_dir_all(repo.join("manifests")).unwrap();
    std::fs::write(
        repo.join("manifests/app.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: app\n  namespace: default\ndata:\n  value: one\n",
    )
    .unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-q", "-m", "first"]);

    let key = dir.path().join("id_ed25519");
    std::fs::write(&key, "-----BEGIN OPENSSH PRIVATE KEY-----\nnot a real key\n-----END OPENSSH PRIVATE KEY-----\n")
        .unwrap();
    let options = InstallOptions {
        repo: repo.display().to_string(),
        branch: "main".into(),
        path: ".".into(),
        image: "registry.example.com/gitops-agent:1".into(),
        git_token_file: None,
        git_username: "git".into(),
        ssh_key_file: Some(key.clone()),
        ssh_known_hosts_file: None,
    };
    let installed = install::install(&client, &options).await.unwrap();
    assert!(installed.generated_db_password);
    let applied = installed.objects.join("\n");
    for object in [
        "Namespace gitops-system",
        "ServiceAccount gitops-system/gitops-agent",
        "ClusterRole.rbac.authorization.k8s.io gitops-agent",
        "ClusterRoleBinding.rbac.authorization.k8s.io gitops-agent",
        "Role.rbac.authorization.k8s.io gitops-system/gitops-agent-leader-election",
        "Deployment.apps gitops-system/gitops-agent",
        "Service gitops-system/gitops-agent",
    ] {
        assert!(applied.contains(object), "{object} missing from:\n{applied}");
    }
    // No Prometheus Operator here: its kinds are left out, and said so.
    let skipped = installed.skipped.join("\n");
    assert!(
        skipped.contains("ServiceMonitor gitops-agent") && skipped.contains("PrometheusRule gitops-agent"),
        "{skipped}"
    );

    let deployments: Api<Deployment> = Api::namespaced(client.clone(), install::AGENT_NAMESPACE);
    let deployment = deployments.get("gitops-agent").await.unwrap();
    let pod = deployment.spec.template.spec.unwrap();
    let container = &pod.containers[0];
    assert_eq!(container.image.as_deref(), Some("registry.example.com/gitops-agent:1"));
    let security = container.security_context.as_ref().unwrap();
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(security.capabilities.as_ref().unwrap().drop.as_deref(), Some(&["ALL".to_owned()][..]));
    assert_eq!(pod.security_context.unwrap().run_as_non_root, Some(true));
    let env = container.env.as_ref().unwrap();
    let value = |name: &str| env.iter().find(|e| e.name == name).and_then(|e| e.value.clone());
    assert_eq!(value("GITOPS_REPO"), Some(repo.display().to_string()));
    assert_eq!(value("GITOPS_LEADER_ELECTION").as_deref(), Some("true"));

    let secrets: Api<Secret> = Api::namespaced(client.clone(), install::AGENT_NAMESPACE);
    let git_secret = secrets.get(install::GIT_SECRET).await.unwrap().data.unwrap();
    assert_eq!(git_secret["identity"].0, std::fs::read(&key).unwrap(), "the key keeps its final newline");
    let db: Api<Secret> = Api::namespaced(client.clone(), install::DB_NAMESPACE);
    let db_secret = db.get(install::DB_SECRET).await.unwrap().data.unwrap();
    assert_eq!(db_secret["username"].0, b"scale");
    assert_eq!(db_secret["database"].0, b"scale");
    let password = db_secret["password"].0.clone();
    assert_eq!(password.len(), 32);

    // The agent, as `up --provider local` runs it, reports its first sync.
    let listen = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    // Where cargo built it: beside gitops-bootstrap (this test runs from deps/).
    let binary = Path::new(env!("CARGO_BIN_EXE_gitops-bootstrap")).with_file_name("gitops-agent");
    let agent_options = agent::AgentOptions { binary, repo: repo.display().to_string(), path: ".".into(), listen };
    let process = agent::start(plane.state_dir(), plane.kubeconfig(), &agent_options).await.unwrap();
    let revision = install::wait_synced(&client, Duration::from_secs(60), "rerun").await.unwrap();
    let head =
        String::from_utf8(Command::new("git").args(["rev-parse", "HEAD"]).current_dir(&repo).output().unwrap().stdout)
            .unwrap();
    assert_eq!(revision, head.trim());
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), install::AGENT_NAMESPACE);
    let status = configmaps.get("gitops-agent-status").await.unwrap().data.unwrap();
    assert_eq!(status["phase"], "synced");
    assert_eq!(status["message"], "");
    assert!(!status["lastSyncTime"].is_empty());

    // Reporting the same status again writes nothing, also from a reporter that has
    // just started (an agent restarted at the same commit): it reads before it writes.
    let version = configmaps.get("gitops-agent-status").await.unwrap().metadata.resource_version;
    let reporter = gitops_agent::report::StatusReport::new(
        gitops_agent::write::Writer::sole(client.clone()),
        install::AGENT_NAMESPACE,
    );
    reporter.report(&revision, gitops_agent::metrics::SyncResult::Success, "").await;
    reporter.report(&revision, gitops_agent::metrics::SyncResult::Success, "").await;
    assert_eq!(configmaps.get("gitops-agent-status").await.unwrap().metadata.resource_version, version);

    // A broken commit: the status says failed, with the error.
    std::fs::write(repo.join("manifests/broken.yaml"), "apiVersion: v1\nkind: ConfigMap\nmetadata: {}\n").unwrap();
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-q", "-m", "broken"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let status = configmaps.get("gitops-agent-status").await.unwrap().data.unwrap();
        if status["phase"] == "failed" {
            assert!(status["message"].contains("broken.yaml"), "{status:?}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the status never turned failed: {status:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The agent's own sync kept its inventory apart and pruned nothing of the install;
    // a second install changes nothing and keeps the password.
    assert!(deployments.get_opt("gitops-agent").await.unwrap().is_some());
    assert!(configmaps.get_opt("gitops-inventory").await.unwrap().is_some());
    assert!(configmaps.get_opt(install::INSTALL_INVENTORY).await.unwrap().is_some());
    let again = install::install(&client, &options).await.unwrap();
    assert!(!again.generated_db_password);
    assert!(again.objects.iter().all(|o| o.ends_with("unchanged")), "{:?}", again.objects);
    assert_eq!(db.get(install::DB_SECRET).await.unwrap().data.unwrap()["password"].0, password);

    process.stop();
    assert!(install::uninstall(&client).await.unwrap());
    assert!(deployments.get_opt("gitops-agent").await.unwrap().is_none());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let namespace = namespaces.get_opt(install::AGENT_NAMESPACE).await.unwrap();
    assert!(namespace.is_none_or(|n| n.metadata.deletion_timestamp.is_some()), "gitops-system is being deleted");
    assert!(db.get_opt(install::DB_SECRET).await.unwrap().is_some(), "the workload's Secret stays");
}
