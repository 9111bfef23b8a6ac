//! The `gitops-agent` binary as it runs in a cluster: two replicas with leader
//! election, of which only one applies; SIGTERM makes the leader finish, release the
//! Lease and exit, and the standby takes over at once; a leader frozen past its lease
//! wakes up writing nothing; with the API server down its watches back off; out of a
//! pod it makes its own namespace, or, restricted, refuses at start-up.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use gitops_tests::cluster::{self, configmap, eventually, value};
use gitops_tests::git::{GitDaemon, GitRepo};
use gitops_tests::requests::Requests;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

struct Replica {
    child: Child,
    log: PathBuf,
}

impl Replica {
    /// Two of these compete for the Lease in `ns`, as the Deployment's replicas do.
    fn start(binary: &PathBuf, repo: &GitRepo, ns: &str, dir: &std::path::Path, name: &str) -> Replica {
        let args = [format!("--namespace={ns}"), "--leader-election=true".to_owned(), "--interval=1s".to_owned()];
        Replica::spawn(binary, cluster::shared().kubeconfig(), &repo.file_url(), ns, &args, dir, name)
    }

    /// `gitops-agent run` against the cluster of `kubeconfig`, following the repository
    /// at `url` (a commit to a local one wakes it), its objects in `ns`, with `args` added.
    fn spawn(
        binary: &PathBuf,
        kubeconfig: &std::path::Path,
        url: &str,
        ns: &str,
        args: &[String],
        dir: &std::path::Path,
        name: &str,
    ) -> Replica {
        let listen = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(binary)
            .arg("run")
            .arg(format!("--repo={url}"))
            .arg(format!("--listen={listen}"))
            .arg(format!("--default-namespace={ns}"))
            .args(args)
            .env("KUBECONFIG", kubeconfig)
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

    fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), signal).unwrap();
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
    let binary = gitops_tests::agent::binary();
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

    replicas[leader].signal(Signal::SIGTERM);
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

/// The write war of a deposed leader, as measured once: the leader is frozen (SIGSTOP)
/// until the standby has taken the Lease and applied a new commit, then thawed. Its
/// drift watch wakes with its old revision and would "correct" the object back, each
/// correction undone by the new leader, every few milliseconds. It must write nothing.
/// A race, so run twice, the roles swapping.
#[tokio::test]
async fn a_leader_frozen_past_its_lease_wakes_up_writing_nothing() {
    let binary = gitops_tests::agent::binary();
    let client = cluster::client().await;
    let ns = cluster::namespace(&client, "frozen").await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let repo = GitRepo::new();
    repo.write("manifests/x.yaml", &configmap("x", "v1"));
    repo.commit("v1");
    let dir = tempfile::tempdir().unwrap();
    let replicas =
        [Replica::start(&binary, &repo, &ns, dir.path(), "a"), Replica::start(&binary, &repo, &ns, dir.path(), "b")];
    eventually("x applied", || async { (value(&cms, "x").await? == "v1").then_some(()) }).await;

    for round in 2..=3 {
        let leader = eventually("one replica to hold the Lease", || async {
            let holder = holder(&client, &ns).await?;
            replicas.iter().position(|r| r.identity() == holder)
        })
        .await;
        replicas[leader].signal(Signal::SIGSTOP);
        let wanted = format!("v{round}");
        repo.write("manifests/x.yaml", &configmap("x", &wanted));
        repo.commit(&wanted);
        eventually("the standby to take over and apply the commit", || async {
            (value(&cms, "x").await? == wanted).then_some(())
        })
        .await;
        let thawed_log = replicas[leader].log().len();
        replicas[leader].signal(Signal::SIGCONT);

        let mut old = 0;
        for _ in 0..100 {
            if value(&cms, "x").await.as_deref() != Some(wanted.as_str()) {
                old += 1;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        let since_thaw = replicas[leader].log()[thawed_log..].to_owned();
        assert_eq!(old, 0, "round {round}: {old} of 100 samples of x were not {wanted}; after the thaw:\n{since_thaw}");
        assert!(!since_thaw.contains("drift corrected"), "round {round}: the thawed replica corrected:\n{since_thaw}");
    }
}

/// With the API server gone for 30 s, each watcher (three drift kinds and the batch
/// runs') retries with a backoff instead of at once: a handful of warnings, not
/// thousands. When it is back, commits apply and drift is corrected again.
#[tokio::test]
async fn with_the_api_server_down_the_watches_back_off_and_recover() {
    let binary = gitops_tests::agent::binary();
    let mut plane = cluster::private().await;
    let client = plane.client().await.unwrap();
    let ns = cluster::namespace(&client, "backoff").await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let repo = GitRepo::new();
    repo.write("manifests/x.yaml", &configmap("x", "v1"));
    repo.write("manifests/more.yaml", "apiVersion: v1\nkind: Secret\nmetadata:\n  name: s\nstringData:\n  a: b\n---\napiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: sa\n");
    repo.write(
        "jobs/hello.yaml",
        "apiVersion: batch/v1\nkind: Job\nmetadata:\n  name: hello\nspec:\n  template:\n    spec:\n      restartPolicy: Never\n      containers:\n      - name: hello\n        image: debian:bookworm\n",
    );
    repo.commit("v1");
    let dir = tempfile::tempdir().unwrap();
    let args = [format!("--namespace={ns}"), "--leader-election=false".to_owned()];
    let agent = Replica::spawn(&binary, plane.kubeconfig(), &repo.file_url(), &ns, &args, dir.path(), "agent");
    eventually("x applied", || async { (value(&cms, "x").await? == "v1").then_some(()) }).await;
    eventually("the batch run started", || async { agent.log().contains("started a batch run").then_some(()) }).await;

    plane.stop_component("kube-apiserver").unwrap();
    let before = agent.log().len();
    tokio::time::sleep(std::time::Duration::from_secs(30)).await;
    let during = agent.log()[before..].to_owned();
    let interrupted = during.lines().filter(|l| l.contains("watch interrupted")).count();
    let lines = during.lines().count();
    plane.start_component("kube-apiserver").unwrap();
    plane.wait_ready().await.unwrap();
    eprintln!("API server down 30 s: {interrupted} watch warnings, {lines} log lines");
    assert!(interrupted > 0, "the watches noticed the API server was gone:\n{during}");
    // Four watchers; an exponential backoff from 0.8 s allows about six tries each in 30 s.
    assert!(interrupted <= 4 * 10, "{interrupted} watch warnings in 30 s:\n{}", &during[..during.len().min(4000)]);
    assert!(lines <= 100, "{lines} log lines in 30 s:\n{}", &during[..during.len().min(4000)]);

    repo.write("manifests/x.yaml", &configmap("x", "v2"));
    repo.commit("v2");
    eventually("the commit applied after the outage", || async { (value(&cms, "x").await? == "v2").then_some(()) })
        .await;
    let params = kube::api::PatchParams { field_manager: Some("person".to_owned()), ..Default::default() };
    let patch = serde_json::json!({ "data": { "value": "edited" } });
    eventually("an edit after the outage to be corrected", || async {
        cms.patch("x", &params, &kube::api::Patch::Merge(&patch)).await.ok()?;
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        (value(&cms, "x").await? == "v2").then_some(())
    })
    .await;
}

/// Out of a pod the agent's namespace is `gitops-system` unless told otherwise; on a
/// fresh cluster it does not exist. With the whole cluster the agent's, it creates it
/// and syncs; restricted to some namespaces, it may not, and says so once, at start-up.
#[tokio::test]
async fn out_of_a_pod_the_agent_makes_its_namespace_or_refuses_at_start_up() {
    let binary = gitops_tests::agent::binary();
    let client = cluster::client().await;
    let apps = cluster::namespace(&client, "own-ns").await;
    let own = format!("{apps}-agent");
    let repo = GitRepo::new();
    repo.write("manifests/x.yaml", &configmap("x", "v1"));
    repo.commit("v1");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = cluster::shared().kubeconfig();

    let args = [format!("--namespace={own}"), "--leader-election=true".to_owned()];
    let agent = Replica::spawn(&binary, kubeconfig, &repo.file_url(), &apps, &args, dir.path(), "cluster");
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &apps);
    eventually("x applied", || async { (value(&cms, "x").await? == "v1").then_some(()) }).await;
    let inventory: Api<ConfigMap> = Api::namespaced(client.clone(), &own);
    assert!(inventory.get_opt("gitops-inventory").await.unwrap().is_some(), "{}", agent.log());
    assert!(agent.log().contains("created the agent's namespace"), "{}", agent.log());
    drop(agent);

    let missing = format!("{apps}-missing");
    let args = [format!("--namespace={missing}"), format!("--allow-namespaces={apps}")];
    let mut restricted = Replica::spawn(&binary, kubeconfig, &repo.file_url(), &apps, &args, dir.path(), "restricted");
    let status = restricted.child.wait().unwrap();
    let log = restricted.log();
    assert!(!status.success(), "{log}");
    assert!(log.contains(&format!("the agent's namespace \"{missing}\" does not exist")), "{log}");
    assert!(log.contains("--namespace"), "{log}");
    assert_eq!(log.lines().filter(|l| l.contains("error")).count(), 1, "one clear line:\n{log}");
    assert!(!log.contains('\u{1b}'), "no colour codes in a log file:\n{log}");
}

/// `gitops-agent diff` exits as diff(1) and `kubectl diff` do: 0 when nothing would
/// change, 1 when something would, 2 on an error (here: a revision `run` would refuse).
#[tokio::test]
async fn diff_exits_0_for_no_change_1_for_changes_2_for_an_error() {
    let binary = gitops_tests::agent::binary();
    let client = cluster::client().await;
    let ns = cluster::namespace(&client, "diff-exit").await;
    let repo = GitRepo::new();
    repo.write("manifests/x.yaml", &configmap("x", "v1"));
    repo.commit("v1");
    let diff = || {
        let output = Command::new(&binary)
            .args(["diff", &format!("--repo={}", repo.file_url()), &format!("--namespace={ns}")])
            .arg(format!("--default-namespace={ns}"))
            .env("KUBECONFIG", cluster::shared().kubeconfig())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
        (output.status.code(), text)
    };
    let (code, out) = diff();
    assert_eq!(code, Some(1), "x would be created:\n{out}");
    assert!(out.contains("+ ConfigMap") && out.contains("created"), "{out}");

    let dir = tempfile::tempdir().unwrap();
    let args = [format!("--namespace={ns}"), "--leader-election=false".to_owned()];
    let agent =
        Replica::spawn(&binary, cluster::shared().kubeconfig(), &repo.file_url(), &ns, &args, dir.path(), "agent");
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    eventually("x applied", || async { (value(&cms, "x").await? == "v1").then_some(()) }).await;
    drop(agent);
    let (code, out) = diff();
    assert_eq!(code, Some(0), "nothing would change:\n{out}");

    repo.write(
        "manifests/x.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n  namespace: nowhere-at-all\n",
    );
    repo.commit("nowhere");
    let (code, out) = diff();
    assert_eq!(code, Some(2), "a revision run would refuse is an error:\n{out}");
    assert!(out.contains("manifests/x.yaml:1") && out.contains("nowhere-at-all"), "{out}");
}

/// `gitops-agent suspend|resume|sync`, through the API server as `flux suspend` and
/// `flux reconcile`: while suspended the agent writes nothing (counted by the API
/// server) though commits land and objects drift; resumed, it catches up; asked to
/// sync, it fetches at once rather than at its next poll, an hour away.
#[tokio::test]
async fn suspend_writes_nothing_resume_catches_up_and_sync_fetches_now() {
    let binary = gitops_tests::agent::binary();
    let mut plane = cluster::private().await;
    // Its controllers write (a root CA ConfigMap per namespace, Job status): only the
    // agent may write what is counted.
    plane.stop_component("kube-controller-manager").unwrap();
    let client = plane.client().await.unwrap();
    let ns = cluster::namespace(&client, "suspend").await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let repo = GitRepo::new();
    let job = |version: &str| {
        format!(
            "apiVersion: batch/v1\nkind: Job\nmetadata:\n  name: hello\nspec:\n  template:\n    spec:\n      \
                 restartPolicy: Never\n      containers:\n      - name: hello\n        image: debian:bookworm\n        \
                 args: [echo, {version}]\n"
        )
    };
    repo.write("manifests/x.yaml", &configmap("x", "v1"));
    repo.write("jobs/hello.yaml", &job("v1"));
    repo.commit("v1");
    let daemon = GitDaemon::serve(&repo.root());
    let dir = tempfile::tempdir().unwrap();
    let args = [format!("--namespace={ns}"), "--leader-election=false".to_owned(), "--interval=1h".to_owned()];
    let agent = Replica::spawn(&binary, plane.kubeconfig(), &daemon.url(repo.name()), &ns, &args, dir.path(), "agent");
    eventually("x applied", || async { (value(&cms, "x").await? == "v1").then_some(()) }).await;
    eventually("the status ConfigMap", || async { cms.get_opt("gitops-agent-status").await.ok()?.map(|_| ()) }).await;
    let jobs: Api<k8s_openapi::api::batch::v1::Job> = Api::namespaced(client.clone(), &ns);
    // The run comes after the sync is recorded: suspending before it would hold it back.
    eventually("the first spec's run", || async { jobs.get_opt("hello-1").await.ok()?.map(|_| ()) }).await;
    let ask = |verb: &str| {
        let output = Command::new(&binary)
            .args([verb, &format!("--namespace={ns}")])
            .env("KUBECONFIG", plane.kubeconfig())
            .output()
            .unwrap();
        assert!(output.status.success(), "gitops-agent {verb}: {}", String::from_utf8_lossy(&output.stderr));
    };

    ask("suspend");
    eventually("the agent to suspend", || async { agent.log().contains("suspended: applying nothing").then_some(()) })
        .await;
    let before = Requests::scrape(&client).await.unwrap();
    repo.write("manifests/x.yaml", &configmap("x", "v2"));
    repo.write("jobs/hello.yaml", &job("v2"));
    repo.commit("v2");
    ask("sync");
    let params = kube::api::PatchParams { field_manager: Some("person".to_owned()), ..Default::default() };
    let edited = serde_json::json!({ "data": { "value": "edited" } });
    cms.patch("x", &params, &kube::api::Patch::Merge(&edited)).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    let during = Requests::scrape(&client).await.unwrap().since(&before).only(&["configmaps", "jobs"]);
    let writes: u64 = ["APPLY", "CREATE", "UPDATE", "DELETE"].iter().map(|verb| during.count(verb)).sum();
    assert_eq!(writes, 0, "written while suspended: {:?}", during.by_verb());
    assert_eq!(value(&cms, "x").await.as_deref(), Some("edited"), "neither synced nor corrected");

    ask("resume");
    eventually("the commit applied once resumed", || async { (value(&cms, "x").await? == "v2").then_some(()) }).await;
    eventually("the new spec's run", || async { jobs.get_opt("hello-2").await.ok()?.map(|_| ()) }).await;

    repo.write("manifests/x.yaml", &configmap("x", "v3"));
    repo.commit("v3");
    ask("sync");
    eventually("the commit fetched at once", || async { (value(&cms, "x").await? == "v3").then_some(()) }).await;
}

/// `gitops-agent diff --dir` diffs the working tree, uncommitted changes included, and
/// says so; `--repo` still diffs what is committed.
#[tokio::test]
async fn diff_dir_diffs_the_working_tree_with_its_uncommitted_changes() {
    let binary = gitops_tests::agent::binary();
    let client = cluster::client().await;
    let ns = cluster::namespace(&client, "diff-dir").await;
    let repo = GitRepo::new();
    repo.write("manifests/x.yaml", &configmap("x", "v1"));
    repo.commit("v1");
    // Not committed: a new object, then a broken file.
    repo.write("manifests/later.yaml", &configmap("later", "v1"));
    let diff = |source: &[String]| {
        let output = Command::new(&binary)
            .arg("diff")
            .args(source)
            .args([format!("--namespace={ns}"), format!("--default-namespace={ns}")])
            .env("KUBECONFIG", cluster::shared().kubeconfig())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
        (output.status.code(), text)
    };
    let work_tree = repo.work_tree().display().to_string();
    let (code, out) = diff(&[format!("--dir={work_tree}")]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.starts_with(&format!("diffing the working tree {work_tree} (uncommitted changes included)\n")),
        "{out}"
    );
    assert!(out.contains(&format!("+ ConfigMap {ns}/x (manifests/x.yaml:1): created")), "{out}");
    assert!(out.contains(&format!("+ ConfigMap {ns}/later (manifests/later.yaml:1): created")), "{out}");
    assert!(out.ends_with(&format!("2 objects would change at working tree {work_tree}\n")), "{out}");

    let (code, out) = diff(&[format!("--repo={}", repo.file_url())]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        !out.contains(&format!("ConfigMap {ns}/later")) && out.contains("1 objects would change at "),
        "committed only: {out}"
    );

    repo.write("manifests/broken.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: b\n   labels: x\n");
    let (code, out) = diff(&[format!("--dir={work_tree}")]);
    assert_eq!(code, Some(2), "an uncommitted broken file is an error: {out}");
    assert!(out.contains("manifests/broken.yaml:5: invalid YAML"), "{out}");
}
