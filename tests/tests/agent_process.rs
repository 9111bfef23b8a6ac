//! The `gitops-agent` binary as it runs in a cluster: two replicas with leader
//! election, of which only one applies; SIGTERM makes the leader finish, release the
//! Lease and exit, and the standby takes over at once.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use gitops_tests::cluster::{self, eventually};
use gitops_tests::git::GitRepo;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// `gitops-agent`, built by cargo into the target directory this test runs from.
fn agent_binary() -> PathBuf {
    let status = Command::new(env!("CARGO")).args(["build", "-q", "-p", "gitops-agent"]).status().unwrap();
    assert!(status.success(), "building gitops-agent");
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().join("gitops-agent")
}

struct Replica {
    child: Child,
    log: PathBuf,
}

impl Replica {
    fn start(binary: &PathBuf, repo: &GitRepo, ns: &str, dir: &std::path::Path, name: &str) -> Replica {
        let listen = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(binary)
            .args(["run", "--leader-election=true", "--interval=1s"])
            .arg(format!("--repo={}", repo.file_url()))
            .arg(format!("--listen={listen}"))
            .arg(format!("--namespace={ns}"))
            .arg(format!("--default-namespace={ns}"))
            .env("KUBECONFIG", cluster::shared().kubeconfig())
            .env("RUST_LOG", "info")
            .stderr(std::fs::File::create(&log).unwrap())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        Replica { child, log }
    }

    fn identity(&self) -> String {
        format!("{}-{}", nix::unistd::gethostname().unwrap().to_string_lossy(), self.child.id())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn holder(client: &kube::Client, ns: &str) -> Option<String> {
    Api::<Lease>::namespaced(client.clone(), ns).get_opt("gitops-agent").await.ok()??.spec?.holder_identity
}

#[tokio::test]
async fn one_replica_applies_and_sigterm_hands_over_at_once() {
    let binary = agent_binary();
    let client = cluster::client().await;
    let ns = cluster::namespace(&client, "replicas").await;
    let repo = GitRepo::new();
    repo.write("manifests/app.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: app\ndata:\n  value: one\n");
    repo.commit("one");
    let dir = tempfile::tempdir().unwrap();
    let mut replicas =
        [Replica::start(&binary, &repo, &ns, dir.path(), "a"), Replica::start(&binary, &repo, &ns, dir.path(), "b")];

    let leader = eventually("one replica to hold the Lease", || async {
        let holder = holder(&client, &ns).await?;
        replicas.iter().position(|r| r.identity() == holder)
    })
    .await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    eventually("the leader to apply the commit", || async { cms.get_opt("app").await.ok()?.map(|_| ()) }).await;
    let standby = 1 - leader;
    assert!(
        !replicas[standby].log().contains("synced"),
        "the standby applies nothing while the other leads:\n{}",
        replicas[standby].log()
    );

    kill(Pid::from_raw(replicas[leader].child.id() as i32), Signal::SIGTERM).unwrap();
    let status = replicas[leader].child.wait().unwrap();
    assert!(status.success(), "SIGTERM ends the agent cleanly: {status}\n{}", replicas[leader].log());
    assert!(replicas[leader].log().contains("shutting down"), "{}", replicas[leader].log());

    // The Lease is released, not left to expire: the standby takes it and syncs.
    let standby_identity = replicas[standby].identity();
    eventually("the standby to hold the Lease", || async {
        (holder(&client, &ns).await? == standby_identity).then_some(())
    })
    .await;
    eventually("the standby to sync", || async { replicas[standby].log().contains("synced").then_some(()) }).await;
    replicas.iter_mut().for_each(|r| {
        let _ = r.child.kill();
    });
}
