//! Chaos: the agent keeps its promises under faults. Each test injects a bounded number
//! of faults into real components (the `gitops-agent` binary killed with SIGKILL, the
//! API server restarted, etcd stopped, git servers that break, hang or lose the branch,
//! a leader killed, a burst of commits on a 5,000-object revision), prints what it
//! injected, and asserts what a user sees afterwards: the cluster equals git's head, no
//! orphan, nothing wrongly pruned, no batch run twice, clear errors, bounded memory.
//!
//! Randomness comes from a seeded PRNG whose seed is printed; `CHAOS_SEED=N` replays it.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use gitops_tests::agent::{Agent, AgentConfig};
use gitops_tests::cluster::{self, eventually};
use gitops_tests::git::{GitDaemon, GitRepo};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const MANAGED: &str = "app.kubernetes.io/managed-by=gitops-agent";
const SUCCESS: &str = "gitops_sync_total{result=\"success\"}";
const FAILURE: &str = "gitops_sync_total{result=\"failure\"}";
const FETCH_ERRORS: &str = "gitops_source_fetch_errors_total";

// ---------------------------------------------------------------------------------------
// Fixtures: a PRNG, manifests, the agent binary as a process.

/// xorshift64*: small, seeded, good enough to pick moments and objects.
struct Rng(u64);

impl Rng {
    /// Seeded from `CHAOS_SEED`, else from the clock; prints the seed so a run replays.
    fn new(test: &str) -> Rng {
        let seed = std::env::var("CHAOS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
        });
        println!("{test}: seed {seed} (CHAOS_SEED={seed} replays it)");
        Rng(seed.max(1))
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn config_map(name: &str, value: &str) -> String {
    format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\ndata:\n  value: \"{value}\"\n")
}

/// One file holding the ConfigMaps `names`, each with its value.
fn config_maps<'a>(objects: impl IntoIterator<Item = (&'a String, &'a String)>) -> String {
    objects.into_iter().map(|(name, value)| format!("---\n{}", config_map(name, value))).collect()
}

/// A batch/v1 Job spec `name` whose container prints `message`.
fn job_spec(name: &str, message: &str) -> String {
    format!(
        "apiVersion: batch/v1\nkind: Job\nmetadata:\n  name: {name}\nspec:\n  backoffLimit: 0\n  template:\n    \
         spec:\n      restartPolicy: Never\n      containers:\n      - name: batch\n        image: busybox\n        \
         command: [echo, \"{message}\"]\n"
    )
}

/// The spec-hash label a run of `spec` carries, as the agent computes it.
fn spec_hash(spec: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("jobs")).unwrap();
    std::fs::write(dir.path().join("jobs/spec.yaml"), spec).unwrap();
    let rendered = gitops_agent::render::render(dir.path(), "default").unwrap_or_else(|e| panic!("{e:?}"));
    rendered.jobs[0].hash[..40].to_owned()
}

/// The agent's own bookkeeping in its namespace, labelled as managed but not from git.
const BOOKKEEPING: [&str; 2] = [gitops_agent::inventory::INVENTORY_NAME, gitops_agent::report::STATUS_NAME];

/// The live ConfigMaps the agent manages in `ns` from git (its bookkeeping left out), by
/// name, with their `value`.
async fn managed_config_maps(client: &kube::Client, ns: &str) -> BTreeMap<String, String> {
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let listed = cms.list(&ListParams::default().labels(MANAGED)).await.expect("listing ConfigMaps");
    listed
        .items
        .into_iter()
        .filter(|cm| cm.metadata.deletion_timestamp.is_none())
        .filter(|cm| !BOOKKEEPING.contains(&cm.metadata.name.as_deref().unwrap_or_default()))
        .map(|cm| {
            let value = cm.data.and_then(|mut d| d.remove("value")).unwrap_or_default();
            (cm.metadata.name.unwrap(), value)
        })
        .collect()
}

async fn value_of(client: &kube::Client, ns: &str, name: &str) -> Option<String> {
    let cm = Api::<ConfigMap>::namespaced(client.clone(), ns).get_opt(name).await.ok()??;
    cm.data?.remove("value")
}

async fn wait_value(client: &kube::Client, ns: &str, name: &str, value: &str) {
    eventually(&format!("ConfigMap {ns}/{name} to hold {value:?}"), || async {
        (value_of(client, ns, name).await.as_deref() == Some(value)).then_some(())
    })
    .await;
}

/// The inventory ConfigMap's `entries` and `pending`, one entry a line.
async fn inventory(client: &kube::Client, ns: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let cm = Api::<ConfigMap>::namespaced(client.clone(), ns).get("gitops-inventory").await.expect("the inventory");
    let data = cm.data.unwrap_or_default();
    let lines = |key: &str| data.get(key).map(|t| t.lines().map(str::to_owned).collect()).unwrap_or_default();
    (lines("entries"), lines("pending"))
}

/// The runs of `job` in `ns` as (number, spec-hash), by number.
async fn runs(client: &kube::Client, ns: &str, job: &str) -> Vec<(u64, String)> {
    let jobs: Api<Job> = Api::namespaced(client.clone(), ns);
    let listed = jobs.list(&ListParams::default().labels(&format!("gitops.scale.dev/job={job}"))).await.unwrap();
    let mut runs: Vec<(u64, String)> = listed
        .items
        .into_iter()
        .filter(|j| j.metadata.deletion_timestamp.is_none())
        .map(|j| {
            let labels = j.metadata.labels.unwrap_or_default();
            (labels["gitops.scale.dev/run"].parse().unwrap(), labels["gitops.scale.dev/spec-hash"].clone())
        })
        .collect();
    runs.sort();
    runs
}

/// `gitops-agent`, built by cargo into the target directory this test runs from.
fn agent_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        let status = Command::new(env!("CARGO")).args(["build", "-q", "-p", "gitops-agent"]).status().unwrap();
        assert!(status.success(), "building gitops-agent");
        let exe = std::env::current_exe().unwrap();
        exe.parent().unwrap().parent().unwrap().join("gitops-agent")
    })
}

fn free_address() -> String {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string()
}

/// The real `gitops-agent run` as a process, its log in a file, its endpoints reachable.
struct AgentProcess {
    child: Child,
    listen: String,
    log: PathBuf,
    http: Client<HttpConnector, Full<Bytes>>,
}

impl AgentProcess {
    /// `gitops-agent run` following `repo`, with everything (objects, inventory, runs,
    /// Lease) in `ns`, plus `extra` flags; logs to `dir/<name>.log`.
    fn start(kubeconfig: &Path, repo: &str, ns: &str, extra: &[&str], dir: &Path, name: &str) -> AgentProcess {
        let listen = free_address();
        let log = dir.join(format!("{name}.log"));
        let mut command = Command::new(agent_binary());
        // SAFETY: prctl is async-signal-safe; it only asks the kernel to kill the agent
        // with this test process, so a killed test leaves no agent running.
        unsafe {
            command.pre_exec(|| nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from));
        }
        let child = command
            .arg("run")
            .arg(format!("--repo={repo}"))
            .arg(format!("--listen={listen}"))
            .arg(format!("--namespace={ns}"))
            .arg(format!("--default-namespace={ns}"))
            .arg(format!("--dashboards-namespace={ns}"))
            .args(extra)
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        AgentProcess { child, listen, log, http: Client::builder(TokioExecutor::new()).build_http() }
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    /// The identity it uses for the Lease.
    fn identity(&self) -> String {
        format!("{}-{}", nix::unistd::gethostname().unwrap().to_string_lossy(), self.child.id())
    }

    /// `None` while it does not answer (yet).
    async fn get(&self, path: &str) -> Option<String> {
        let request = hyper::Request::get(format!("http://{}{path}", self.listen)).body(Full::default()).unwrap();
        let response = tokio::time::timeout(Duration::from_secs(10), self.http.request(request)).await.ok()?.ok()?;
        let body = response.into_body().collect().await.ok()?.to_bytes();
        Some(String::from_utf8_lossy(&body).into_owned())
    }

    async fn status(&self) -> Option<serde_json::Value> {
        serde_json::from_str(&self.get("/status").await?).ok()
    }

    async fn revision(&self) -> Option<String> {
        Some(self.status().await?["revision"].as_str()?.to_owned())
    }

    /// The value of a series such as `gitops_sync_total{result="success"}`; 0 when the
    /// agent answers without it, `None` when it does not answer.
    async fn metric(&self, series: &str) -> Option<f64> {
        let text = self.get("/metrics").await?;
        Some(text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok()).unwrap_or(0.0))
    }

    async fn wait_revision(&self, commit: &str) {
        eventually(&format!("the agent to apply {commit}"), || async {
            (self.revision().await.as_deref() == Some(commit)).then_some(())
        })
        .await;
    }

    /// [`Self::wait_revision`] with a bound of its own, for revisions of thousands of
    /// objects on a loaded machine.
    async fn wait_revision_within(&self, commit: &str, bound: Duration) {
        let deadline = Instant::now() + bound;
        while self.revision().await.as_deref() != Some(commit) {
            assert!(Instant::now() < deadline, "{commit} not applied within {bound:?}:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Peak resident memory so far (`VmHWM`), in KiB.
    fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).expect("VmHWM in /proc/PID/status");
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn sigkill(&mut self) {
        let _ = kill(self.pid(), Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.sigkill();
    }
}

// ---------------------------------------------------------------------------------------
// 1. SIGKILL during syncs of a 500-object revision.

/// 525 names in 21 files of 25; one file at a time is left out of a revision, so each
/// commit swaps 25 objects out (pruned) and 25 in (created) and holds 500.
const FILES: usize = 21;
const PER_FILE: usize = 25;
const KILLS: usize = 50;
/// The kill loop stops early, and says so, if a very loaded machine makes 50 kills take
/// longer than this: the suite must stay bounded.
const KILL_BUDGET: Duration = Duration::from_secs(240);

/// The desired state of the 500-object repository at some step.
struct Desired {
    /// Per file, its objects' values.
    values: Vec<BTreeMap<String, String>>,
    /// The file left out.
    absent: usize,
    /// Which files the work tree holds now.
    on_disk: Vec<bool>,
    spec: String,
}

impl Desired {
    fn new() -> Desired {
        let values = (0..FILES)
            .map(|f| (0..PER_FILE).map(|i| (format!("cm-{:03}", f * PER_FILE + i), "0".to_owned())).collect())
            .collect();
        Desired { values, absent: FILES - 1, on_disk: vec![false; FILES], spec: job_spec("batch", "spec-0") }
    }

    /// Step `step`: the next file leaves, the one out comes back, two others change
    /// values, and every fifth step (on average) the job spec changes.
    fn advance(&mut self, step: usize, rng: &mut Rng) -> (usize, usize, bool) {
        self.absent = (self.absent + 1) % FILES;
        let mut changed = 0;
        for _ in 0..2 {
            let file = rng.below(FILES as u64) as usize;
            for value in self.values[file].values_mut() {
                *value = step.to_string();
                changed += 1;
            }
        }
        let spec_changed = rng.below(5) == 0;
        if spec_changed {
            self.spec = job_spec("batch", &format!("spec-{step}"));
        }
        (changed, PER_FILE, spec_changed)
    }

    fn write(&mut self, repo: &GitRepo) {
        for (file, objects) in self.values.iter().enumerate() {
            let path = format!("manifests/part-{file:02}.yaml");
            if file != self.absent {
                repo.write(&path, &config_maps(objects));
                self.on_disk[file] = true;
            } else if self.on_disk[file] {
                repo.remove(&path);
                self.on_disk[file] = false;
            }
        }
        repo.write("jobs/batch.yaml", &self.spec);
    }

    fn objects(&self) -> BTreeMap<String, String> {
        let present = self.values.iter().enumerate().filter(|(f, _)| *f != self.absent);
        present.flat_map(|(_, objects)| objects.clone()).collect()
    }
}

#[tokio::test]
async fn sigkill_during_syncs_of_500_objects_loses_nothing_and_runs_each_spec_once() {
    let mut rng = Rng::new("sigkill");
    let client = cluster::client().await;
    let ns = cluster::namespace(&client, "chaos-kill").await;
    let kubeconfig = cluster::shared().kubeconfig();
    let logs = tempfile::tempdir().unwrap();
    let repo = GitRepo::new();
    // An object the agent never managed, in the same namespace: it must survive.
    let bystander_yaml = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: bystander\n  namespace: {ns}\ndata:\n  value: mine\n"
    );
    cluster::apply_yaml(&client, &bystander_yaml).await;
    let bystander = |client: kube::Client, ns: String| async move { value_of(&client, &ns, "bystander").await };
    let agent =
        |name: &str| AgentProcess::start(kubeconfig, &repo.file_url(), &ns, &["--interval=30s"], logs.path(), name);

    let mut desired = Desired::new();
    desired.write(&repo);
    let mut head = repo.commit("500 objects");
    let mut commits = 1;
    let mut spec_changes = 1;
    let started = Instant::now();
    let mut first = agent("first");
    first.wait_revision(&head).await;
    // The spec of each head an agent was seen to sync, in order: the only specs that
    // may have runs.
    let mut applied_specs = vec![spec_hash(&desired.spec)];
    println!("sigkill: first sync of {} objects took {:?}", desired.objects().len(), started.elapsed());

    // How long an agent takes from its start to the end of one incremental sync: kills
    // land anywhere in that span (and a little beyond).
    desired.advance(1, &mut rng);
    desired.write(&repo);
    head = repo.commit("step 1");
    commits += 1;
    first.sigkill();
    let started = Instant::now();
    let mut second = agent("measure");
    second.wait_revision(&head).await;
    let span = started.elapsed();
    applied_specs.push(spec_hash(&desired.spec));
    second.sigkill();
    // Wide enough that about a third of the kills come after the sync ended (just before
    // or while the agent makes the batch run), the rest during it.
    let window = span * 8 / 5;
    println!("sigkill: one incremental sync (start to synced) took {span:?}; kills land in 0..{window:?}");

    let (mut mid_sync, mut after_sync, mut checks, mut kills) = (0, 0, 0, 0);
    let (mut swapped, mut changed) = (0, 0);
    let loop_started = Instant::now();
    while kills < KILLS && loop_started.elapsed() < KILL_BUDGET {
        let kill = kills;
        kills += 1;
        // What is live now: the agent killed before may have left the revision half
        // applied, so only objects that exist can be checked for being kept.
        let before = managed_config_maps(&client, &ns).await;
        // Usually one commit before the start, sometimes two.
        for _ in 0..1 + usize::from(rng.below(4) == 0) {
            let step = commits + 1;
            let (values, swaps, spec_changed) = desired.advance(step, &mut rng);
            changed += values;
            swapped += swaps;
            spec_changes += usize::from(spec_changed);
            desired.write(&repo);
            head = repo.commit(&format!("step {step}"));
            commits += 1;
        }
        let delay = Duration::from_millis(rng.below(window.as_millis() as u64));
        let mut process = agent(&format!("kill-{kill}"));
        let synced = |process: &AgentProcess| process.log().lines().any(|l| l.contains(" synced") && l.contains(&head));
        // Killed at the chosen moment, or as soon as the sync is done if that is sooner
        // (waiting longer would only idle).
        let started = Instant::now();
        while started.elapsed() < delay && !synced(&process) {
            tokio::time::sleep(Duration::from_millis(20).min(delay.saturating_sub(started.elapsed()))).await;
        }
        if synced(&process) {
            // Somewhere while it makes the batch run, or just after.
            tokio::time::sleep(Duration::from_millis(rng.below(300))).await;
        }
        process.sigkill();
        if synced(&process) {
            applied_specs.push(spec_hash(&desired.spec));
            after_sync += 1;
        } else {
            mid_sync += 1;
        }
        // Nothing that was live and that the head holds may be gone, whatever moment the
        // agent died at.
        let live = managed_config_maps(&client, &ns).await;
        let head_objects = desired.objects();
        for name in before.keys().filter(|name| head_objects.contains_key(*name)) {
            assert!(live.contains_key(name), "kill {kill} (after {delay:?}): {name} was wrongly pruned");
            checks += 1;
        }
        assert_eq!(bystander(client.clone(), ns.clone()).await.as_deref(), Some("mine"), "kill {kill}");
    }
    println!(
        "sigkill: {kills} SIGKILLs in {:?} ({mid_sync} before the head was synced, {after_sync} right after) over \
         {commits} commits: {swapped} objects swapped in and out, {changed} values changed, {spec_changes} job spec \
         versions; {checks} still-wanted objects checked present after kills",
        loop_started.elapsed()
    );
    if kills < KILLS {
        println!("sigkill: stopped after {kills} of {KILLS} kills: the {KILL_BUDGET:?} budget ran out on this machine");
    }
    assert!(kills >= 20, "at least 20 kills within the budget, got {kills}");

    // Once more, left alone: it converges to the head exactly.
    let last = agent("last");
    last.wait_revision(&head).await;
    applied_specs.push(spec_hash(&desired.spec));
    applied_specs.dedup();
    let want = desired.objects();
    let live = managed_config_maps(&client, &ns).await;
    assert_eq!(live, want, "the live managed ConfigMaps are git's head, names and values, no orphan");
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    for job in jobs.list(&ListParams::default().labels(MANAGED)).await.unwrap() {
        let labels = job.metadata.labels.unwrap_or_default();
        assert!(
            labels.contains_key("gitops.scale.dev/job"),
            "a managed Job that is not a run: {:?}",
            job.metadata.name
        );
    }
    let (entries, pending) = inventory(&client, &ns).await;
    assert!(pending.is_empty(), "nothing left pending: {pending:?}");
    let inventoried: BTreeSet<String> = want.keys().map(|name| format!("+{ns}_{name}__ConfigMap")).collect();
    assert_eq!(entries, inventoried, "the inventory lists exactly the head's objects");
    assert_eq!(bystander(client.clone(), ns.clone()).await.as_deref(), Some("mine"), "the bystander is untouched");

    // Each spec version the agent applied ran once: never the same spec twice in a row,
    // and the newest run is the head's spec.
    let head_hash = spec_hash(&desired.spec);
    eventually("the newest run to be of the head's spec", || async {
        (runs(&client, &ns, "batch").await.last()?.1 == head_hash).then_some(())
    })
    .await;
    let runs = runs(&client, &ns, "batch").await;
    for pair in runs.windows(2) {
        assert_ne!(pair[0].1, pair[1].1, "runs {} and {} are of the same spec: {runs:?}", pair[0].0, pair[1].0);
    }
    // Runs follow the specs the agent applied, in order, each at most once.
    let mut applied = applied_specs.iter();
    for (number, hash) in &runs {
        assert!(applied.any(|h| h == hash), "run {number} is of no spec applied after the run before: {runs:?}");
    }
    let numbers: Vec<u64> = runs.iter().map(|(n, _)| *n).collect();
    assert_eq!(numbers, (1..=runs.len() as u64).collect::<Vec<_>>(), "run numbers without gaps");
    println!(
        "sigkill: converged to {head}: {} objects equal to git, inventory exact, nothing pending; {} runs for \
         {spec_changes} spec versions committed and {} seen applied, none twice in a row",
        want.len(),
        runs.len(),
        applied_specs.len()
    );
}

// ---------------------------------------------------------------------------------------
// 2. kube-apiserver restarted and etcd stopped in the middle of a sync.

/// Waits until the first object of the revision (`cm-000`, applied first) holds
/// `value`: the agent is writing the revision, most of it still to come.
async fn first_write(client: &kube::Client, ns: &str, value: &str) {
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let cm = cms.get_opt("cm-000").await.ok().flatten();
        if cm.and_then(|cm| cm.data?.remove("value")).as_deref() == Some(value) {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for the agent to write {value}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn apiserver_restart_and_etcd_outage_mid_sync_are_retried_and_converge() {
    const OBJECTS: usize = 400;
    let mut plane = cluster::private().await;
    let client = plane.client().await.unwrap();
    let ns = cluster::namespace(&client, "chaos-cp").await;
    let repo = GitRepo::new();
    let revision = |value: &str| {
        let names: Vec<String> = (0..OBJECTS).map(|i| format!("cm-{i:03}")).collect();
        let values = vec![value.to_owned(); OBJECTS];
        repo.write("manifests/objects.yaml", &config_maps(names.iter().zip(&values)));
        repo.commit(value)
    };
    let first = revision("1");
    let agent = Agent::start(
        client.clone(),
        AgentConfig {
            local_repo: Some(repo.path()),
            interval: Duration::from_secs(5),
            ..AgentConfig::new(repo.file_url(), &ns)
        },
    )
    .await;
    let synced = |commit: String| {
        let agent = &agent;
        async move { agent.applied(&commit).await }
    };
    synced(first).await;

    // The API server goes away while the agent writes revision 2, and comes back.
    let second = revision("2");
    first_write(&client, &ns, "2").await;
    plane.stop_component("kube-apiserver").unwrap();
    let during = answers(&client, &ns).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    plane.start_component("kube-apiserver").unwrap();
    plane.wait_ready().await.unwrap();
    synced(second).await;
    let after_apiserver = agent.metric(FAILURE).await;
    let errors_seen = agent.status().await;
    println!(
        "control plane: kube-apiserver stopped mid-sync (listing during the outage: {during}), restarted: \
         {after_apiserver} failed syncs, then converged"
    );
    assert!(after_apiserver >= 1.0, "the interrupted sync counts as a failure");
    assert!(after_apiserver < 30.0, "retries back off instead of spinning: {after_apiserver} failures");
    assert!(errors_seen["errors"].as_array().unwrap().is_empty(), "errors clear after success: {errors_seen}");

    // etcd stops for 10 s while the agent writes revision 3.
    let third = revision("3");
    first_write(&client, &ns, "3").await;
    plane.stop_component("etcd").unwrap();
    let stopped = Instant::now();
    let mut failures_during = BTreeSet::new();
    while stopped.elapsed() < Duration::from_secs(10) {
        failures_during.insert(agent.metric(FAILURE).await as u64);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    plane.start_component("etcd").unwrap();
    plane.wait_ready().await.unwrap();
    synced(third).await;
    let after_etcd = agent.metric(FAILURE).await;
    let live = managed_config_maps(&client, &ns).await;
    assert_eq!(live.len(), OBJECTS, "every object");
    assert!(live.values().all(|value| value == "3"), "all at revision 3");
    let (_, pending) = inventory(&client, &ns).await;
    assert!(pending.is_empty(), "{pending:?}");
    println!(
        "control plane: etcd stopped 10 s mid-sync: {} more failed syncs (failure counter seen at {:?}), then \
         converged to revision 3 with all {OBJECTS} objects",
        after_etcd - after_apiserver,
        failures_during
    );
    assert!(after_etcd < 60.0, "retries back off instead of spinning: {after_etcd} failures");

    // The watches survived both outages: an out-of-band change is corrected again.
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let patch = serde_json::json!({ "data": { "value": "tampered" } });
    cms.patch("cm-007", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    wait_value(&client, &ns, "cm-007", "3").await;
    println!("control plane: drift corrected after the outages; {SUCCESS} = {}", agent.metric(SUCCESS).await);
    agent.stop().await;
}

/// Whether the API server answers a list right now.
async fn answers(client: &kube::Client, ns: &str) -> &'static str {
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    match tokio::time::timeout(Duration::from_secs(5), cms.list(&ListParams::default().limit(1))).await {
        Ok(Ok(_)) => "answered",
        _ => "refused",
    }
}

// ---------------------------------------------------------------------------------------
// 3. Git faults: corrupt and truncated objects, a deleted branch, unrelated history, a
// remote that never answers.

/// A directory `git daemon` serves, published from a [`GitRepo`] by copying its bare
/// repository, so a fault can be made in the copy before anyone can fetch it.
struct Served {
    root: tempfile::TempDir,
    daemon: GitDaemon,
}

impl Served {
    fn new() -> Served {
        let root = tempfile::tempdir().unwrap();
        let daemon = GitDaemon::serve(root.path());
        Served { root, daemon }
    }

    fn url(&self) -> String {
        self.daemon.url("repo.git")
    }

    /// Replaces the served repository with a copy of `repo`'s, after `fault` changed the
    /// copy. Returns what the fault did.
    fn publish(&self, repo: &GitRepo, fault: impl FnOnce(&Path) -> String) -> String {
        let staging = self.root.path().join("staging.git");
        let _ = std::fs::remove_dir_all(&staging);
        run("cp", &["-a", repo.path().to_str().unwrap(), staging.to_str().unwrap()], self.root.path());
        let what = fault(&staging);
        let served = self.root.path().join("repo.git");
        let old = self.root.path().join("old.git");
        let _ = std::fs::rename(&served, &old);
        std::fs::rename(&staging, &served).unwrap();
        let _ = std::fs::remove_dir_all(&old);
        what
    }
}

fn run(program: &str, args: &[&str], dir: &Path) -> String {
    let output = Command::new(program)
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .output()
        .unwrap();
    assert!(output.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// Garbles the loose object of the head's `manifests/app.yaml` in bare repository `git`.
fn corrupt_loose_blob(git: &Path) -> String {
    let blob = run("git", &["rev-parse", "main:manifests/app.yaml"], git);
    let file = git.join("objects").join(&blob[..2]).join(&blob[2..]);
    let mut bytes = std::fs::read(&file).expect("the blob is a loose object (receive.unpackLimit is high)");
    let middle = bytes.len() / 2;
    for byte in &mut bytes[middle.saturating_sub(4)..] {
        *byte ^= 0x5a;
    }
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    std::fs::write(&file, bytes).unwrap();
    format!("garbled loose object {blob}")
}

/// Packs bare repository `git` into one pack and cuts the pack to 60 %.
fn truncate_pack(git: &Path) -> String {
    run("git", &["repack", "-a", "-d", "-q"], git);
    let pack = std::fs::read_dir(git.join("objects/pack"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "pack"))
        .expect("a pack");
    let size = std::fs::metadata(&pack).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&pack).unwrap().set_len(size * 6 / 10).unwrap();
    format!("truncated {} from {size} to {} bytes", pack.file_name().unwrap().to_string_lossy(), size * 6 / 10)
}

/// Waits until the agent has failed to fetch `more` more times than `before` and
/// `/status` says why; returns the error.
async fn fetch_failures(agent: &Agent, before: f64, more: f64) -> String {
    eventually(&format!("{more} more fetch failures"), || async {
        let count = agent.metric(FETCH_ERRORS).await;
        let status = agent.status().await;
        let error = status["errors"].as_array()?.first()?["message"].as_str()?.to_owned();
        (count >= before + more).then_some(error)
    })
    .await
}

#[tokio::test]
async fn git_faults_keep_the_last_good_state_and_recover_by_themselves() {
    let client = cluster::client().await;
    let ns = cluster::namespace(&client, "chaos-git").await;
    let repo = GitRepo::new();
    // Every push arrives as loose objects, so one object can be garbled alone.
    run("git", &["config", "receive.unpackLimit", "100000"], &repo.path());
    let served = Served::new();
    let url = served.url();
    let commit = |app: &str| {
        repo.write("manifests/app.yaml", &config_map("app", app));
        repo.write("manifests/keep.yaml", &config_map("keep", "kept"));
        repo.commit(app)
    };
    let good = commit("1");
    served.publish(&repo, |_| String::new());
    let agent = Agent::start(
        client.clone(),
        AgentConfig { interval: Duration::from_secs(2), ..AgentConfig::new(url.clone(), &ns) },
    )
    .await;
    let synced = |commit: String| {
        let agent = &agent;
        async move { agent.applied(&commit).await }
    };
    synced(good.clone()).await;
    let mut report = Vec::new();

    // A garbled object, then a truncated pack: the fetch fails, the last good state stays.
    for (value, fault) in [("2", corrupt_loose_blob as fn(&Path) -> String), ("3", truncate_pack)] {
        let next = commit(value);
        let before = agent.metric(FETCH_ERRORS).await;
        let what = served.publish(&repo, fault);
        let error = fetch_failures(&agent, before, 2.0).await;
        assert!(error.contains(&url), "the error names the remote: {error}");
        let previous = (value.parse::<u32>().unwrap() - 1).to_string();
        assert_eq!(value_of(&client, &ns, "app").await.as_deref(), Some(previous.as_str()), "last good state stays");
        assert_eq!(value_of(&client, &ns, "keep").await.as_deref(), Some("kept"), "nothing pruned");
        assert_ne!(agent.status().await["revision"], next.as_str());
        served.publish(&repo, |_| String::new());
        synced(next).await;
        wait_value(&client, &ns, "app", value).await;
        report.push(format!(
            "{what}: {} fetch errors, then recovered; error: {error}",
            agent.metric(FETCH_ERRORS).await - before
        ));
    }

    // The branch is deleted: a clear error, nothing pruned; a new push brings it back.
    let before = agent.metric(FETCH_ERRORS).await;
    repo.delete_branch();
    served.publish(&repo, |_| String::new());
    let error = fetch_failures(&agent, before, 2.0).await;
    assert!(error.contains("\"main\" does not exist on the remote"), "{error}");
    assert_eq!(value_of(&client, &ns, "app").await.as_deref(), Some("3"), "last good state stays");
    assert_eq!(value_of(&client, &ns, "keep").await.as_deref(), Some("kept"), "a missing branch prunes nothing");
    let back = commit("4");
    served.publish(&repo, |_| String::new());
    synced(back).await;
    wait_value(&client, &ns, "app", "4").await;
    report.push(format!(
        "branch deleted: {} fetch errors, then pushed again and recovered; error: {error}",
        agent.metric(FETCH_ERRORS).await - before
    ));

    // Unrelated history force-pushed: that is the new head, followed, and what it lacks pruned.
    let rewritten = repo.force_push_unrelated_history(&[("manifests/other.yaml", &config_map("other", "new"))]);
    served.publish(&repo, |_| String::new());
    synced(rewritten).await;
    wait_value(&client, &ns, "other", "new").await;
    let live = managed_config_maps(&client, &ns).await;
    assert_eq!(live.keys().collect::<Vec<_>>(), ["other"], "the new history is the state");
    report.push("unrelated history force-pushed: followed, app and keep pruned".to_owned());
    for line in &report {
        println!("git faults: {line}");
    }
    agent.stop().await;
}

/// A loopback listener that accepts connections and never answers.
struct BlackHole {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<usize>>,
}

impl BlackHole {
    fn bind(port: u16) -> BlackHole {
        use std::sync::atomic::Ordering;
        // The git daemon that had the port may take a moment to let go of it.
        let deadline = Instant::now() + Duration::from_secs(20);
        let listener = loop {
            match std::net::TcpListener::bind(("127.0.0.1", port)) {
                Ok(listener) => break listener,
                Err(e) if Instant::now() > deadline => panic!("binding the silent port {port}: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        listener.set_nonblocking(true).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut held = Vec::new();
            while !stopped.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => held.push(stream),
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
            held.len()
        });
        BlackHole { stop, thread: Some(thread) }
    }

    /// Stops listening; returns how many connections it swallowed.
    fn close(mut self) -> usize {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap()
    }
}

#[tokio::test]
async fn a_remote_that_never_answers_times_out_and_the_loop_goes_on() {
    let client = cluster::client().await;
    let ns = cluster::namespace(&client, "chaos-slow").await;
    let logs = tempfile::tempdir().unwrap();
    let repo = GitRepo::new();
    repo.write("manifests/app.yaml", &config_map("app", "1"));
    let good = repo.commit("one");
    let port: u16 = free_address().rsplit(':').next().unwrap().parse().unwrap();
    let daemon = GitDaemon::serve_on(&repo.root(), port);
    let url = daemon.url(repo.name());
    let agent = AgentProcess::start(
        cluster::shared().kubeconfig(),
        &url,
        &ns,
        &["--interval=1s", "--git-timeout=2s"],
        logs.path(),
        "slow",
    );
    agent.wait_revision(&good).await;

    // The remote now accepts connections and says nothing.
    drop(daemon);
    let hole = BlackHole::bind(port);
    repo.write("manifests/app.yaml", &config_map("app", "2"));
    let next = repo.commit("two");
    let error = eventually("three timed-out fetches", || async {
        let errors = agent.metric(FETCH_ERRORS).await?;
        let status = agent.status().await?;
        let error = status["errors"].as_array()?.first()?["message"].as_str()?.to_owned();
        (errors >= 3.0).then_some(error)
    })
    .await;
    assert!(error.contains(&url) && error.to_lowercase().contains("timed out"), "a clear timeout error: {error}");
    assert!(agent.get("/healthz").await.is_some(), "the server answers while fetches hang");
    assert_eq!(value_of(&client, &ns, "app").await.as_deref(), Some("1"), "the last good state stays");
    let failures = agent.metric(FETCH_ERRORS).await.unwrap();
    let swallowed = hole.close();

    // The server is back: recovery needs nobody.
    let _daemon = GitDaemon::serve_on(&repo.root(), port);
    agent.wait_revision(&next).await;
    wait_value(&client, &ns, "app", "2").await;
    println!(
        "slow remote: {swallowed} connections swallowed, {failures} fetches timed out after 2 s each, then \
         recovered; error: {error}"
    );
}

// ---------------------------------------------------------------------------------------
// 4. Leader failover with SIGKILL.

async fn lease(client: &kube::Client, ns: &str) -> Option<k8s_openapi::api::coordination::v1::LeaseSpec> {
    Api::<Lease>::namespaced(client.clone(), ns).get_opt("gitops-agent").await.ok()??.spec
}

#[tokio::test]
async fn sigkill_of_the_leader_hands_over_within_the_lease_and_never_two_write() {
    let client = cluster::client().await;
    let ns = cluster::namespace(&client, "chaos-leader").await;
    let logs = tempfile::tempdir().unwrap();
    let repo = GitRepo::new();
    repo.write("manifests/app.yaml", &config_map("app", "1"));
    let first = repo.commit("one");
    let flags = ["--leader-election=true", "--interval=1s"];
    let kubeconfig = cluster::shared().kubeconfig();
    let mut replicas = [
        AgentProcess::start(kubeconfig, &repo.file_url(), &ns, &flags, logs.path(), "a"),
        AgentProcess::start(kubeconfig, &repo.file_url(), &ns, &flags, logs.path(), "b"),
    ];
    let identities = [replicas[0].identity(), replicas[1].identity()];
    let leader = eventually("one replica to hold the Lease", || async {
        let holder = lease(&client, &ns).await?.holder_identity?;
        identities.iter().position(|i| *i == holder)
    })
    .await;
    let standby = 1 - leader;
    replicas[leader].wait_revision(&first).await;

    // While the leader lives, the standby writes nothing and the Lease names one holder.
    let mut polls = 0;
    let mut last_renew = None;
    while polls < 30 {
        let spec = lease(&client, &ns).await.expect("the Lease");
        assert_eq!(spec.holder_identity.as_deref(), Some(identities[leader].as_str()), "poll {polls}");
        last_renew = spec.renew_time.map(|t| t.0);
        let standby_syncs = replicas[standby].metric(SUCCESS).await;
        assert!(standby_syncs.is_none_or(|n| n == 0.0), "the standby synced while the leader lives");
        polls += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(replicas[standby].status().await.unwrap()["revision"], serde_json::Value::Null);

    // The leader dies without releasing the Lease; a commit waits for the standby.
    replicas[leader].sigkill();
    let killed = Instant::now();
    repo.write("manifests/app.yaml", &config_map("app", "2"));
    let second = repo.commit("two");
    let mut waiting_polls = 0;
    let spec = eventually("the standby to take the Lease", || {
        waiting_polls += 1;
        async {
            let spec = lease(&client, &ns).await?;
            if spec.holder_identity.as_deref() == Some(identities[standby].as_str()) {
                return Some(spec);
            }
            let syncs = replicas[standby].metric(SUCCESS).await.unwrap_or(0.0);
            assert_eq!(syncs, 0.0, "the standby synced before it held the Lease");
            None
        }
    })
    .await;
    let took = killed.elapsed();
    replicas[standby].wait_revision(&second).await;
    wait_value(&client, &ns, "app", "2").await;
    let acquired = spec.acquire_time.or(spec.renew_time).expect("an acquire time").0;
    let renewed = last_renew.expect("the leader renewed");
    let gap = acquired.duration_since(renewed).unsigned_abs();
    println!(
        "leader: {polls} polls with one holder and no standby sync; leader SIGKILLed; standby took the Lease \
         {took:?} later ({waiting_polls} polls meanwhile, no sync), {gap:?} after the dead leader's last renewal \
         (lease 15 s), and applied the new commit"
    );
    let lease_seconds = spec.lease_duration_seconds.unwrap_or(15) as u64;
    // The lease duration, the standby's retry, and slack for a loaded machine.
    assert!(
        gap < Duration::from_secs(2 * lease_seconds),
        "takeover {gap:?} after the last renewal, lease {lease_seconds} s"
    );
}

// ---------------------------------------------------------------------------------------
// 5. Pressure: 5,000 objects, then a burst of 100 commits.

/// Commits `files` (name, contents) into `manifests/` of bare repository `bare`'s `main`,
/// on top of its head, and returns the commit.
fn commit_manifests(bare: &Path, files: &[(String, String)], message: &str) -> String {
    let repo = git2::Repository::open_bare(bare).unwrap();
    let parent = repo.find_reference("refs/heads/main").unwrap().peel_to_commit().unwrap();
    let root = parent.tree().unwrap();
    let manifests = root.get_name("manifests").unwrap().to_object(&repo).unwrap().peel_to_tree().unwrap();
    let mut builder = repo.treebuilder(Some(&manifests)).unwrap();
    for (name, contents) in files {
        builder.insert(name, repo.blob(contents.as_bytes()).unwrap(), 0o100644).unwrap();
    }
    let manifests = builder.write().unwrap();
    let mut builder = repo.treebuilder(Some(&root)).unwrap();
    builder.insert("manifests", manifests, 0o040000).unwrap();
    let tree = repo.find_tree(builder.write().unwrap()).unwrap();
    let author = git2::Signature::now("Test Author", "author@example.com").unwrap();
    let commit = repo.commit(Some("refs/heads/main"), &author, &author, message, &tree, &[&parent]).unwrap();
    commit.to_string()
}

#[tokio::test]
async fn a_burst_of_100_commits_on_5000_objects_applies_the_newest_in_bounded_memory() {
    const FILES: usize = 50;
    const PER_FILE: usize = 100;
    const BURST: usize = 100;
    let client = cluster::client().await;
    let ns = cluster::namespace(&client, "chaos-pressure").await;
    let logs = tempfile::tempdir().unwrap();
    let repo = GitRepo::new();
    for file in 0..FILES {
        let names: Vec<String> = (0..PER_FILE).map(|i| format!("cm-{:04}", file * PER_FILE + i)).collect();
        let values = vec!["0".to_owned(); PER_FILE];
        repo.write(&format!("manifests/part-{file:02}.yaml"), &config_maps(names.iter().zip(&values)));
    }
    repo.write("manifests/burst.yaml", &config_map("burst", "0"));
    let first = repo.commit("5,000 objects");
    let agent = AgentProcess::start(
        cluster::shared().kubeconfig(),
        &repo.file_url(),
        &ns,
        &["--interval=30s"],
        logs.path(),
        "p",
    );
    let started = Instant::now();
    agent.wait_revision_within(&first, Duration::from_secs(300)).await;
    let first_sync = started.elapsed();
    let peak_after_first = agent.peak_rss_kib();
    let successes_before = agent.metric(SUCCESS).await.unwrap();

    // Committed straight into the repository the agent follows (as a push would land),
    // so the 100 commits take a few seconds at most even on a loaded machine.
    let started = Instant::now();
    let mut last = String::new();
    for i in 1..=BURST {
        let mut files = vec![("burst.yaml".to_owned(), config_map("burst", &i.to_string()))];
        // Every tenth commit also changes a file of 100 objects.
        if i % 10 == 0 {
            let file = i / 10;
            let names: Vec<String> = (0..PER_FILE).map(|n| format!("cm-{:04}", file * PER_FILE + n)).collect();
            let values = vec![i.to_string(); PER_FILE];
            files.push((format!("part-{file:02}.yaml"), config_maps(names.iter().zip(&values))));
        }
        last = commit_manifests(&repo.path(), &files, &format!("burst {i}"));
    }
    let burst = started.elapsed();
    agent.wait_revision_within(&last, Duration::from_secs(300)).await;
    wait_value(&client, &ns, "burst", &BURST.to_string()).await;
    let syncs = agent.metric(SUCCESS).await.unwrap() - successes_before;
    let peak_after_burst = agent.peak_rss_kib();
    let live = managed_config_maps(&client, &ns).await;
    assert_eq!(live.len(), FILES * PER_FILE + 1, "5,000 objects and burst");
    assert_eq!(live["cm-1000"], BURST.to_string(), "the last commit's values");
    let ratio = peak_after_burst as f64 / peak_after_first as f64;
    println!(
        "pressure: first sync of {} objects took {first_sync:?} (peak RSS {peak_after_first} KiB); {BURST} commits \
         in {burst:?} were applied in {syncs} successful syncs; peak RSS after the burst {peak_after_burst} KiB \
         (ratio {ratio:.2})",
        FILES * PER_FILE + 1
    );
    assert!(syncs < (BURST / 4) as f64, "a burst collapses into few syncs, not one per commit: {syncs}");
    assert!(ratio < 2.0, "memory stays bounded: peak {peak_after_first} KiB then {peak_after_burst} KiB");
    assert!(agent.log().contains("synced"));
}
