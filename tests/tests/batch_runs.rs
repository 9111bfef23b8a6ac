//! Batch runs from job specs in `jobs/`, as a user meets them: a spec's first commit,
//! each change and each `git revert` starts exactly one run `<job>-<n>`; restarts and
//! racing agents start none twice; history limits and concurrency policies hold; and
//! run outcomes, through the real Job controller, reach `/metrics` and `/status`.
//!
//! Runs that must end run on the node: their container prints its message and waits
//! until the test tells it (through `kubectl exec`) which exit code to end with; the
//! kubelet and the Job controller do the rest. Tests that only count runs use the
//! API-server-only control plane: it starts in seconds and they run in parallel there.

use gitops_bootstrap::local::LocalControlPlane;
use gitops_tests::agent::{Agent, AgentConfig};
use gitops_tests::cluster::{self, eventually};
use gitops_tests::git::GitRepo;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::ListParams;
use serde_json::json;

struct Fixture {
    client: kube::Client,
    ns: String,
    repo: GitRepo,
    /// The cluster with the node, for fixtures whose runs end.
    node: Option<&'static LocalControlPlane>,
    /// The runs' image: the Debian base from the node's registry, or (where runs never
    /// start) just a name.
    image: String,
}

impl Fixture {
    /// On the API-server-only control plane: runs are created, never run.
    async fn new(prefix: &str) -> Fixture {
        let client = cluster::client().await;
        let ns = cluster::namespace(&client, prefix).await;
        Fixture { client, ns, repo: GitRepo::new(), node: None, image: "busybox".into() }
    }

    /// On the cluster with the node: runs run, and end when [`Self::finish`] says.
    async fn on_node(prefix: &str) -> Fixture {
        let node = cluster::node();
        let client = node.client().await.unwrap();
        let ns = cluster::namespace(&client, prefix).await;
        let image = format!("{}/debian:bookworm", node.registry().expect("the node's registry"));
        Fixture { client, ns, repo: GitRepo::new(), node: Some(node), image }
    }

    /// A batch/v1 Job spec named `name` whose container prints `message` and then waits for
    /// its exit code in /tmp/exit ([`Fixture::finish`]), with extra `annotations` (YAML
    /// lines, indented by four).
    fn job_spec(&self, name: &str, message: &str, annotations: &[&str]) -> String {
        let annotations = match annotations {
            [] => String::new(),
            lines => format!("  annotations:\n{}", lines.iter().map(|l| format!("    {l}\n")).collect::<String>()),
        };
        format!(
            "apiVersion: batch/v1\nkind: Job\nmetadata:\n  name: {name}\n{annotations}spec:\n  backoffLimit: 0\n  \
             template:\n    spec:\n      restartPolicy: Never\n      containers:\n      - name: batch\n        \
             image: {}\n        command: [sh, -c, 'echo {message}; until [ -e /tmp/exit ]; do sleep 0.2; done; exit $(cat /tmp/exit)']\n",
            self.image
        )
    }

    async fn agent(&self) -> Agent {
        Agent::start(
            self.client.clone(),
            AgentConfig { local_repo: Some(self.repo.path()), ..AgentConfig::new(self.repo.file_url(), &self.ns) },
        )
        .await
    }

    /// Commits `spec` as `jobs/<file>` and returns the commit.
    fn commit_spec(&self, file: &str, spec: &str) -> String {
        self.repo.write(&format!("jobs/{file}"), spec);
        self.repo.commit(&format!("spec {file}"))
    }

    /// The runs of `job` as (name, spec-hash label, revision annotation), by number.
    async fn runs(&self, job: &str) -> Vec<(String, String, String)> {
        let jobs: Api<Job> = Api::namespaced(self.client.clone(), &self.ns);
        let listed = jobs.list(&ListParams::default().labels(&format!("gitops.scale.dev/job={job}"))).await.unwrap();
        let mut runs: Vec<(u64, (String, String, String))> = listed
            .items
            .into_iter()
            .filter(|j| j.metadata.deletion_timestamp.is_none())
            .map(|j| {
                let labels = j.metadata.labels.unwrap_or_default();
                let annotations = j.metadata.annotations.unwrap_or_default();
                let number = labels["gitops.scale.dev/run"].parse().unwrap();
                let hash = labels["gitops.scale.dev/spec-hash"].clone();
                (number, (j.metadata.name.unwrap(), hash, annotations["gitops.scale.dev/revision"].clone()))
            })
            .collect();
        runs.sort_by_key(|(number, _)| *number);
        runs.into_iter().map(|(_, run)| run).collect()
    }

    async fn run_names(&self, job: &str) -> Vec<String> {
        self.runs(job).await.into_iter().map(|(name, _, _)| name).collect()
    }

    /// Waits until the runs of `job` are exactly `names`.
    async fn wait_for_runs(&self, job: &str, names: &[&str]) {
        eventually(&format!("runs of {job} to be {names:?}"), || async {
            (self.run_names(job).await == names).then_some(())
        })
        .await;
    }

    /// Ends run `run`: its container, once running, exits with 0 (`Succeeded`) or 1
    /// (`Failed`).
    async fn finish(&self, run: &str, phase: &str) {
        let node = self.node.expect("runs end only on the node");
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.ns);
        let pod = eventually(&format!("the pod of {run} to run"), || async {
            let listed = pods.list(&ListParams::default().labels(&format!("job-name={run}"))).await.ok()?;
            let pod = listed.items.into_iter().next()?;
            let running = pod.status.as_ref()?.phase.as_deref() == Some("Running");
            running.then_some(pod.metadata.name?)
        })
        .await;
        let exit_code = if phase == "Succeeded" { 0 } else { 1 };
        let kubeconfig = node.kubeconfig().display().to_string();
        let script = format!("echo {exit_code} > /tmp/exit");
        let exec = ["--kubeconfig", &kubeconfig, "-n", &self.ns, "exec", &pod, "--", "sh", "-c", &script];
        let out = std::process::Command::new("kubectl").args(exec).output().unwrap();
        assert!(out.status.success(), "kubectl exec into {pod}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

/// Waits until the agent has applied `commit`.
async fn synced(agent: &Agent, commit: &str) {
    agent.applied(commit).await;
}

#[tokio::test]
async fn each_spec_change_and_revert_starts_one_run_and_restarts_start_none() {
    let f = Fixture::new("runs").await;
    let first = f.commit_spec("midi.yaml", &f.job_spec("midi", "one", &[]));
    let agent = f.agent().await;
    synced(&agent, &first).await;
    f.wait_for_runs("midi", &["midi-1"]).await;
    let runs = f.runs("midi").await;
    assert_eq!(runs[0].2, first, "the run names the commit of its spec");
    let first_hash = runs[0].1.clone();
    assert_eq!(agent.metric("gitops_batch_runs_total{job=\"midi\",result=\"triggered\"}").await, 1.0);

    // A commit that leaves the spec alone, and a restarted agent: no new run.
    f.repo.write("manifests/other.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: other\n");
    let unrelated = f.repo.commit("unrelated");
    synced(&agent, &unrelated).await;
    agent.stop().await;
    let agent = f.agent().await;
    synced(&agent, &unrelated).await;
    assert_eq!(f.run_names("midi").await, ["midi-1"]);
    assert_eq!(agent.metric("gitops_batch_runs_total{job=\"midi\",result=\"triggered\"}").await, 0.0);

    let second = f.commit_spec("midi.yaml", &f.job_spec("midi", "two", &[]));
    synced(&agent, &second).await;
    f.wait_for_runs("midi", &["midi-1", "midi-2"]).await;

    let reverted = f.repo.revert_head();
    synced(&agent, &reverted).await;
    f.wait_for_runs("midi", &["midi-1", "midi-2", "midi-3"]).await;
    let runs = f.runs("midi").await;
    assert_eq!((runs[2].1.as_str(), runs[2].2.as_str()), (first_hash.as_str(), reverted.as_str()), "run 3 is spec 1");
    assert_ne!(runs[1].1, first_hash);

    // The template itself is never applied as an object.
    let jobs: Api<Job> = Api::namespaced(f.client.clone(), &f.ns);
    assert!(jobs.get_opt("midi").await.unwrap().is_none());
    agent.stop().await;
}

#[tokio::test]
async fn outcomes_reach_metrics_and_status_through_the_job_controller() {
    let f = Fixture::on_node("outcome").await;
    f.commit_spec("ok.yaml", &f.job_spec("ok", "fine", &[]));
    let commit = f.commit_spec("bad.yaml", &f.job_spec("bad", "broken", &[]));
    let agent = f.agent().await;
    synced(&agent, &commit).await;
    f.wait_for_runs("ok", &["ok-1"]).await;
    f.wait_for_runs("bad", &["bad-1"]).await;
    f.finish("ok-1", "Succeeded").await;
    f.finish("bad-1", "Failed").await;

    eventually("both outcomes in /metrics", || async {
        let ok = agent.metric("gitops_batch_runs_total{job=\"ok\",result=\"succeeded\"}").await;
        let bad = agent.metric("gitops_batch_runs_total{job=\"bad\",result=\"failed\"}").await;
        (ok == 1.0 && bad == 1.0).then_some(())
    })
    .await;
    assert_eq!(agent.metric("gitops_batch_run_duration_seconds_count{job=\"ok\"}").await, 1.0);
    let status = agent.status().await;
    let mut runs: Vec<_> = status["batch_runs"].as_array().unwrap().clone();
    runs.sort_by_key(|r| r["run"].as_str().unwrap().to_owned());
    assert_eq!(
        runs,
        [
            json!({ "job": "bad", "run": "bad-1", "revision": commit, "result": "failed" }),
            json!({ "job": "ok", "run": "ok-1", "revision": commit, "result": "succeeded" }),
        ]
    );
    agent.stop().await;
}

#[tokio::test]
async fn the_history_limit_deletes_the_oldest_finished_runs() {
    let f = Fixture::on_node("history").await;
    let limit = ["gitops.scale.dev/history-limit: \"1\""];
    let commit = f.commit_spec("h.yaml", &f.job_spec("h", "one", &limit));
    let agent = f.agent().await;
    synced(&agent, &commit).await;
    f.wait_for_runs("h", &["h-1"]).await;
    f.finish("h-1", "Succeeded").await;

    let commit = f.commit_spec("h.yaml", &f.job_spec("h", "two", &limit));
    synced(&agent, &commit).await;
    f.wait_for_runs("h", &["h-1", "h-2"]).await;
    // h-1 is the one finished run kept while h-2 goes; when h-2 ends, h-1 must go.
    f.finish("h-2", "Failed").await;
    f.wait_for_runs("h", &["h-2"]).await;
    agent.stop().await;
}

#[tokio::test]
async fn forbid_holds_the_new_spec_until_the_running_run_ends() {
    let f = Fixture::on_node("forbid").await;
    let policy = ["gitops.scale.dev/concurrency-policy: Forbid"];
    let commit = f.commit_spec("f.yaml", &f.job_spec("f", "one", &policy));
    let agent = f.agent().await;
    synced(&agent, &commit).await;
    f.wait_for_runs("f", &["f-1"]).await;

    f.commit_spec("f.yaml", &f.job_spec("f", "two", &policy));
    let newest = f.commit_spec("f.yaml", &f.job_spec("f", "three", &policy));
    synced(&agent, &newest).await;
    assert_eq!(f.run_names("f").await, ["f-1"], "no second run while f-1 runs");
    let waiting = agent.status().await["batch_waiting"].clone();
    assert_eq!(waiting[0]["job"], "f", "/status says which spec waits: {waiting}");
    assert_eq!(waiting[0]["revision"], newest.as_str(), "{waiting}");
    assert_eq!(waiting[0]["waits_for"], serde_json::json!(["f-1"]), "and for which run: {waiting}");
    assert!(waiting[0]["reason"].as_str().unwrap().contains("Forbid"), "{waiting}");

    f.finish("f-1", "Succeeded").await;
    f.wait_for_runs("f", &["f-1", "f-2"]).await;
    assert_eq!(f.runs("f").await[1].2, newest, "the run waiting is of the newest spec");
    eventually("nothing to wait for", || async {
        (agent.status().await["batch_waiting"] == serde_json::json!([])).then_some(())
    })
    .await;
    agent.stop().await;
}

#[tokio::test]
async fn replace_deletes_the_running_run_and_allow_runs_beside_it() {
    let f = Fixture::new("replace").await;
    let replace = ["gitops.scale.dev/concurrency-policy: Replace"];
    f.commit_spec("r.yaml", &f.job_spec("r", "one", &replace));
    let commit = f.commit_spec("a.yaml", &f.job_spec("a", "one", &[]));
    let agent = f.agent().await;
    synced(&agent, &commit).await;
    f.wait_for_runs("r", &["r-1"]).await;
    f.wait_for_runs("a", &["a-1"]).await;

    f.commit_spec("r.yaml", &f.job_spec("r", "two", &replace));
    let commit = f.commit_spec("a.yaml", &f.job_spec("a", "two", &[]));
    synced(&agent, &commit).await;
    f.wait_for_runs("r", &["r-2"]).await;
    f.wait_for_runs("a", &["a-1", "a-2"]).await;
    agent.stop().await;
}

#[tokio::test]
async fn two_agents_racing_on_a_spec_change_start_one_run() {
    let f = Fixture::new("race").await;
    let first = f.commit_spec("race.yaml", &f.job_spec("race", "one", &[]));
    // Leader election off: both apply every commit.
    let (a, b) = (f.agent().await, f.agent().await);
    synced(&a, &first).await;
    synced(&b, &first).await;
    f.wait_for_runs("race", &["race-1"]).await;

    let second = f.commit_spec("race.yaml", &f.job_spec("race", "two", &[]));
    synced(&a, &second).await;
    synced(&b, &second).await;
    f.wait_for_runs("race", &["race-1", "race-2"]).await;
    let triggered = a.metric("gitops_batch_runs_total{job=\"race\",result=\"triggered\"}").await
        + b.metric("gitops_batch_runs_total{job=\"race\",result=\"triggered\"}").await;
    assert_eq!(triggered, 2.0, "one agent created each run, the other found it made");
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_spec_of_a_kind_the_cluster_lacks_is_an_error_of_that_job_only() {
    let f = Fixture::new("nocrd").await;
    let spark = "apiVersion: sparkoperator.k8s.io/v1beta2\nkind: SparkApplication\nmetadata:\n  name: spark\nspec:\n  type: Python\n  mode: cluster\n";
    f.commit_spec("spark.yaml", spark);
    let commit = f.commit_spec("plain.yaml", &f.job_spec("plain", "one", &[]));
    let agent = f.agent().await;
    synced(&agent, &commit).await;
    f.wait_for_runs("plain", &["plain-1"]).await;
    let errors = eventually("the job's error in /status", || async {
        let errors = agent.status().await["batch_errors"].clone();
        (!errors.as_array()?.is_empty()).then_some(errors)
    })
    .await;
    assert_eq!(
        errors,
        json!(["jobs/spark.yaml:1: job spark: the API server does not serve SparkApplication in \
             sparkoperator.k8s.io/v1beta2; install its CustomResourceDefinition (for SparkApplication: the spark operator)"])
    );
    assert_eq!(agent.status().await["errors"], json!([]), "the sync itself succeeded");
    agent.stop().await;
}
