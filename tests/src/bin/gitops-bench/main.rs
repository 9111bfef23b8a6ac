//! `gitops-bench`: how fast and how lean the agent is, side by side with `kubectl apply
//! --server-side` and the API server's own ceiling, on a real local control plane.
//!
//! ```sh
//! cargo run --release -p gitops-tests --bin gitops-bench -- --out bench/results [--readme README.md]
//! ```
//!
//! Writes `OUT.json` and `OUT.md` (the table README includes) and prints the table.
//! Every figure that depends on the machine is compared with a baseline measured in the
//! same run on the same control plane; the targets are ratios, never wall-clock limits.
//!
//! What runs (see README, "Benchmarks"):
//! 1. cold sync of N objects: the API server's ceiling (a kube-rs client doing nothing
//!    but server-side apply, as many requests in flight as the agent's applier), the
//!    `gitops-agent` binary (commit pushed → revision reported applied), and `kubectl
//!    apply --server-side` of the same files; one fresh control plane per case;
//! 2. a no-op resync (a commit that changes no manifest) at 5,000 objects: the API
//!    server's request counters by verb, and the agent's CPU time;
//! 3. push → applied over a 1,000-object repository, with the webhook, a local
//!    repository (notify) and polling every second;
//! 4. drift detection latency (another manager edits an object → the agent's metric);
//! 5. batch trigger latency: a changed job spec → the run object, in the same repository
//!    and with the webhook;
//! 6. the agent's peak and steady RSS after each cold sync.

mod probe;
mod report;
mod workload;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::{StreamExt, TryStreamExt, stream};
use gitops_bootstrap::local::{Lifetime, LocalControlPlane, Options};
use gitops_tests::git::{GitDaemon, GitRepo};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::discovery::ApiResource;
use kube::runtime::watcher;
use serde_json::{Value, json};

use gitops_tests::requests::Requests;
use probe::{AgentArgs, AgentProcess};
use report::*;
use workload::Workload;

/// Requests in flight at once, for the ceiling client: the agent's applier's.
const CONCURRENCY: usize = gitops_agent::apply::CONCURRENCY;
/// How long the agent gets after a sync before its memory counts as steady: its drift
/// watchers list every kind once, then only watch.
const SETTLE: Duration = Duration::from_secs(8);
/// Ceiling: none of these waits is a measurement; they only keep a broken run from hanging.
const APPLY_TIMEOUT: Duration = Duration::from_secs(1800);
const EVENT_TIMEOUT: Duration = Duration::from_secs(60);

struct Args {
    out: PathBuf,
    readme: Option<PathBuf>,
    sizes: Vec<usize>,
    noop_size: usize,
    /// The repository sizes push → applied runs at.
    push_objects: Vec<usize>,
    commits: usize,
    edits: usize,
    phases: Vec<String>,
    /// Leave the control planes' and agents' logs in `$TMPDIR/gitops-bench/PID`.
    keep_state: bool,
    triggers: Vec<String>,
    /// Only write OUT.md (and README) again from OUT.json.
    render: bool,
    /// kubectl spends over 100 ms an object before its first request (reading the
    /// files; `-v=6` shows the gap): 10,000 objects would take it over 20 minutes, so by
    /// default it runs up to this size only.
    kubectl_max: usize,
    /// The `gitops-agent` binary to measure, instead of building this tree's.
    agent: Option<PathBuf>,
    /// Another `gitops-agent` binary (an earlier build) run side by side with it in the
    /// push phase, on the same control plane and repository, for before/after ratios.
    baseline: Option<PathBuf>,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        out: PathBuf::from("bench/results"),
        readme: None,
        sizes: vec![1_000, 5_000, 10_000],
        noop_size: 5_000,
        push_objects: vec![1_000],
        commits: 50,
        edits: 50,
        phases: vec!["cold".into(), "push".into()],
        keep_state: false,
        triggers: vec!["webhook".into(), "notify".into(), "poll".into()],
        kubectl_max: 1_000,
        render: false,
        agent: None,
        baseline: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        let list = |v: String| v.split(',').map(str::parse).collect::<Result<Vec<usize>, _>>();
        match flag.as_str() {
            "--out" => args.out = value()?.into(),
            "--readme" => args.readme = Some(value()?.into()),
            "--sizes" => args.sizes = list(value()?)?,
            "--noop-size" => args.noop_size = value()?.parse()?,
            "--push-objects" => args.push_objects = list(value()?)?,
            "--commits" => args.commits = value()?.parse()?,
            "--edits" => args.edits = value()?.parse()?,
            "--phases" => args.phases = value()?.split(',').map(str::to_owned).collect(),
            "--keep-state" => args.keep_state = true,
            "--render" => args.render = true,
            "--kubectl-max-objects" => args.kubectl_max = value()?.parse()?,
            "--triggers" => args.triggers = value()?.split(',').map(str::to_owned).collect(),
            "--agent" => args.agent = Some(value()?.into()),
            "--baseline-agent" => args.baseline = Some(value()?.into()),
            "-h" | "--help" => {
                println!(
                    "gitops-bench [--out PREFIX] [--readme README.md] [--sizes 1000,5000,10000] \
                     [--noop-size 5000] [--push-objects 1000,10000] [--commits 50] [--edits 50] [--phases cold,push] \
                     [--triggers webhook,notify,poll] [--kubectl-max-objects 1000] [--agent BIN] \
                     [--baseline-agent BIN] [--keep-state] [--render]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown flag {other} (see --help)"),
        }
    }
    Ok(args)
}

/// What every phase shares.
struct Bench {
    args: Args,
    agent: PathBuf,
    /// `$TMPDIR/gitops-bench/PID`: the control planes' and agents' state and logs.
    state: PathBuf,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = parse_args()?;
    if args.render {
        let mut results = Results::read(&args)?;
        results.write(&args)?;
        println!("{}", results.markdown());
        return Ok(());
    }
    let agent = match &args.agent {
        Some(agent) => agent.clone(),
        None => {
            eprintln!("building gitops-agent (release)");
            probe::agent_binary()?
        }
    };
    let state = std::env::temp_dir().join("gitops-bench").join(std::process::id().to_string());
    let bench = Bench { args, agent, state };
    let started = Instant::now();
    let mut results = Results::new();

    if bench.args.phases.iter().any(|p| p == "push") {
        bench.push_and_drift(&mut results).await?;
    }
    if bench.args.phases.iter().any(|p| p == "cold") {
        for workload in [Workload::ConfigMaps, Workload::Mix] {
            for &n in &bench.args.sizes {
                let noop = workload == Workload::ConfigMaps && n == bench.args.noop_size;
                let largest = bench.args.sizes.iter().max() == Some(&n);
                let (cold, memory, resync) = bench.cold_sync(workload, n, noop, largest).await?;
                results.kubernetes_version = cold.1;
                results.cold_sync.push(cold.0);
                results.memory.push(memory);
                if let Some(resync) = resync {
                    results.noop_resync = Some(resync);
                }
                results.write(&bench.args)?;
            }
        }
    }
    results.total_seconds = started.elapsed().as_secs_f64();
    results.write(&bench.args)?;
    println!("{}", results.markdown());
    if bench.args.keep_state {
        eprintln!("logs and state kept in {}", bench.state.display());
    } else {
        let _ = std::fs::remove_dir_all(&bench.state);
    }
    Ok(())
}

impl Bench {
    /// A fresh control plane in `STATE/NAME`, tied to this process.
    async fn control_plane(&self, name: &str) -> Result<LocalControlPlane> {
        eprintln!("starting a control plane ({name})");
        let options = Options::new(self.state.join(name), Lifetime::TiedToThisProcess);
        Ok(LocalControlPlane::start(&options).await?)
    }

    /// Item 1 (and 6, and 2 when `noop`): one workload at one size.
    async fn cold_sync(
        &self,
        workload: Workload,
        n: usize,
        noop: bool,
        agent_pattern: bool,
    ) -> Result<((ColdSync, String), Memory, Option<NoopResync>)> {
        let name = format!("cold-{}-{n}", workload.short());
        let mut plane = self.control_plane(&name).await?;
        // No controller reacts to what the contenders create (Deployments would get
        // ReplicaSets and Pods), so one contender's aftermath cannot slow the next.
        plane.stop_component("kube-controller-manager")?;
        let client = plane.client().await?;
        for ns in ["warmup", "ceiling-1", "ceiling-2", "ceiling-agent-requests", "agent", "kubectl"] {
            create_namespace(&client, ns).await?;
        }
        let objects: Vec<Value> = (0..n).map(|i| workload.object(i, "1")).collect();

        let repo = GitRepo::new();
        repo.write("README.md", "benchmark repository\n");
        let empty = repo.commit("no objects yet");
        for (i, object) in objects.iter().enumerate() {
            repo.write(&workload.file_name(i), &workload::to_yaml(object));
        }
        repo.commit_unpushed(&format!("{n} objects"));
        let daemon = GitDaemon::serve(&repo.root());

        eprintln!("[{name}] ceiling");
        ceiling(&client, &objects[..n.min(200)], "warmup", false).await?;
        let ceiling_1 = ceiling(&client, &objects, "ceiling-1", false).await?;

        eprintln!("[{name}] agent");
        let agent = AgentProcess::start(
            &self.agent,
            plane.kubeconfig(),
            AgentArgs { repo: &daemon.url(repo.name()), namespace: "agent", interval: "1h" },
            plane.state_dir(),
            "gitops-agent",
        )
        .await?;
        agent.wait_applied(&empty, EVENT_TIMEOUT).await?;
        let requests_before = Requests::scrape(&client).await?;
        let cpu_before = agent.cpu()?;
        let sync_seconds_before = agent.metric("gitops_sync_duration_seconds_sum").await?;
        let stages_before = agent.stage_seconds().await?;
        let revision = repo.push();
        let t0 = Instant::now();
        agent.webhook().await?;
        let applied = agent.wait_applied(&revision, APPLY_TIMEOUT).await?;
        let agent_time = applied - t0;
        let agent_cpu = agent.cpu()? - cpu_before;
        let agent_sync = agent.metric("gitops_sync_duration_seconds_sum").await? - sync_seconds_before;
        let agent_requests = Requests::scrape(&client).await?.since(&requests_before);
        let stages_ms = agent.stage_seconds().await?.mean_ms_since(&stages_before);
        check_applied(&client, workload, "agent", n).await?;

        // Memory: the peak is the sync's; steady is after the drift watchers' first list.
        let mut rss = Vec::new();
        let settle_until = Instant::now() + SETTLE;
        while Instant::now() < settle_until {
            rss.push(agent.memory()?.0);
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let (steady, peak) = agent.memory()?;
        let memory = Memory { workload, objects: n, peak_mib: mib(peak), steady_mib: mib(steady) };
        eprintln!(
            "[{name}] agent {agent_time:?}, peak {:.1} MiB, steady {:.1} MiB",
            memory.peak_mib, memory.steady_mib
        );

        let resync = if noop { Some(noop_resync(&client, &agent, &repo, n).await?) } else { None };
        drop(agent);

        eprintln!("[{name}] ceiling again, then the agent's request pattern, then kubectl");
        let ceiling_2 = ceiling(&client, &objects, "ceiling-2", false).await?;
        let agent_pattern = match agent_pattern {
            true => Some(ceiling(&client, &objects, "ceiling-agent-requests", true).await?),
            false => None,
        };
        let kubectl = match n <= self.args.kubectl_max {
            true => {
                let dir = repo.work_tree().join("manifests");
                let time = probe::kubectl_apply(plane.kubeconfig(), &dir, "kubectl")?;
                check_applied(&client, workload, "kubectl", n).await?;
                Some(time)
            }
            false => None,
        };
        eprintln!(
            "[{name}] ceiling {ceiling_1:?} / {ceiling_2:?}, agent pattern {agent_pattern:?}, kubectl {kubectl:?}"
        );

        let cold = ColdSync {
            workload,
            objects: n,
            ceiling_seconds: [ceiling_1.as_secs_f64(), ceiling_2.as_secs_f64()],
            ceiling_agent_requests_seconds: agent_pattern.map(|d| d.as_secs_f64()),
            agent_seconds: agent_time.as_secs_f64(),
            agent_sync_seconds: agent_sync,
            agent_cpu_seconds: agent_cpu.as_secs_f64(),
            kubectl_seconds: kubectl.map(|d| d.as_secs_f64()),
            agent_requests: agent_requests.only(&workload_resources(workload)).by_verb(),
            stages_ms,
        };
        Ok(((cold, plane.kubernetes_version().to_owned()), memory, resync))
    }

    /// Items 3, 4 and 5: one repository of each `--push-objects` size, one control plane
    /// each; the baseline agent (`--baseline-agent`), if any, runs before this one on
    /// the same repository, so their figures compare within the hour.
    async fn push_and_drift(&self, results: &mut Results) -> Result<()> {
        for &n in &self.args.push_objects {
            self.push_at(n, results).await?;
        }
        Ok(())
    }

    async fn push_at(&self, n: usize, results: &mut Results) -> Result<()> {
        let plane = self.control_plane(&format!("push-{n}")).await?;
        let client = plane.client().await?;
        let ns = "push";
        create_namespace(&client, ns).await?;
        let repo = GitRepo::new();
        for i in 0..n {
            repo.write(&Workload::ConfigMaps.file_name(i), &workload::to_yaml(&workload::config_map(i, "0")));
        }
        let mut head = repo.commit(&format!("{n} objects"));
        let daemon = GitDaemon::serve(&repo.root());
        let seen = SeenVersions::watch(client.clone(), ns, &ApiResource::erase::<ConfigMap>(&()), |cm| {
            cm.data["data"]["version"].as_str().unwrap_or_default().to_owned()
        });
        results.kubernetes_version = plane.kubernetes_version().to_owned();
        let agents: Vec<(&str, &PathBuf)> =
            self.args.baseline.iter().map(|b| ("baseline", b)).chain([("agent", &self.agent)]).collect();
        for mode in [Trigger::Webhook, Trigger::Notify, Trigger::Poll] {
            if !self.args.triggers.iter().any(|t| t.eq_ignore_ascii_case(&format!("{mode:?}"))) {
                continue;
            }
            let (url, interval) = match mode {
                Trigger::Webhook => (daemon.url(repo.name()), "1h"),
                // A local path: the agent watches its refs.
                Trigger::Notify => (repo.path().display().to_string(), "1h"),
                Trigger::Poll => (daemon.url(repo.name()), "1s"),
            };
            for (label, binary) in &agents {
                eprintln!("[push {n}] {mode:?}, {label}");
                let agent = AgentProcess::start(
                    binary,
                    plane.kubeconfig(),
                    AgentArgs { repo: &url, namespace: ns, interval },
                    plane.state_dir(),
                    &format!("gitops-agent-{label}-{mode:?}").to_lowercase(),
                )
                .await?;
                agent.wait_applied(&head, APPLY_TIMEOUT).await?;
                tokio::time::sleep(SETTLE).await;
                let stages_before = agent.stage_seconds().await?;
                let mut latencies = Vec::new();
                for k in 0..self.args.commits {
                    let i = (k * 37 + mode as usize * 11) % n;
                    let version = format!("{label}-{mode:?}-{k}");
                    let name = workload::config_map_name(i);
                    repo.write(
                        &Workload::ConfigMaps.file_name(i),
                        &workload::to_yaml(&workload::config_map(i, &version)),
                    );
                    repo.commit_unpushed(&format!("{name} → {version}"));
                    let t0 = Instant::now();
                    head = repo.push();
                    if mode == Trigger::Webhook {
                        agent.webhook().await?;
                    }
                    let at = seen.wait_for(&name, &version, EVENT_TIMEOUT).await?;
                    latencies.push(at - t0);
                    // The next push finds the agent idle, as after any single push.
                    agent.wait_applied(&head, EVENT_TIMEOUT).await?;
                }
                let stages_ms = agent.stage_seconds().await?.mean_ms_since(&stages_before);
                let stats = Stats::of(&latencies);
                eprintln!("[push {n}] {mode:?}, {label}: {stats:?}, stages {stages_ms:?}");
                results.push_to_applied.push(PushLatency {
                    trigger: mode,
                    objects: n,
                    commits: latencies.len(),
                    latency: stats,
                    agent: label.to_string(),
                    stages_ms,
                });
                // The batch trigger and drift are measured once, with the agent under test.
                let last = *label == "agent" && Some(&n) == self.args.push_objects.first();
                if last && mode == Trigger::Webhook {
                    results.batch_trigger = Some(self.batch_trigger(&client, &agent, &repo, &mut head, ns, n).await?);
                }
                if last && mode == Trigger::Notify {
                    results.drift = Some(self.drift(&client, &agent, ns, n).await?);
                }
                results.write(&self.args)?;
            }
        }
        Ok(())
    }

    /// Item 5: a commit changes the job spec `jobs/bench.yaml` (a suspended batch/v1 Job,
    /// so no pod runs); time from the push until a watch sees run `bench-<n>`. `head`
    /// follows the commits, for the next trigger's agent to wait for.
    async fn batch_trigger(
        &self,
        client: &kube::Client,
        agent: &AgentProcess,
        repo: &GitRepo,
        head: &mut String,
        ns: &str,
        n: usize,
    ) -> Result<BatchTrigger> {
        eprintln!("[batch] {} spec changes", self.args.commits);
        let runs = SeenVersions::watch(client.clone(), ns, &ApiResource::erase::<Job>(&()), |_| String::new());
        let mut latencies = Vec::new();
        for k in 1..=self.args.commits {
            repo.write("jobs/bench.yaml", &workload::to_yaml(&workload::job("bench", &format!("spec-{k}"))));
            repo.commit_unpushed(&format!("job spec {k}"));
            let t0 = Instant::now();
            *head = repo.push();
            agent.webhook().await?;
            let at = runs.wait_for(&format!("bench-{k}"), "", EVENT_TIMEOUT).await?;
            latencies.push(at - t0);
            agent.wait_applied(head, EVENT_TIMEOUT).await?;
        }
        let stats = Stats::of(&latencies);
        eprintln!("[batch] {stats:?}");
        Ok(BatchTrigger { objects: n, commits: latencies.len(), latency: stats })
    }

    /// Item 4: another manager changes a value git sets, as `kubectl edit` does; time
    /// until the agent's `gitops_drift_detected_total` moves, and until it corrected it.
    async fn drift(&self, client: &kube::Client, agent: &AgentProcess, ns: &str, n: usize) -> Result<Drift> {
        eprintln!("[drift] {} edits", self.args.edits);
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
        let mut detected = Vec::new();
        let mut corrected = Vec::new();
        for k in 0..self.args.edits {
            let name = workload::config_map_name((k * 53 + 5) % n);
            let detected_before = agent.metric("gitops_drift_detected_total").await?;
            let corrected_before = agent.metric("gitops_drift_corrected_total").await?;
            let patch = json!({ "data": { "version": format!("edited-{k}") } });
            let t0 = Instant::now();
            api.patch(
                &name,
                &PatchParams { field_manager: Some("kubectl-edit".into()), ..Default::default() },
                &Patch::Merge(&patch),
            )
            .await?;
            let mut detected_at = None;
            let deadline = t0 + EVENT_TIMEOUT;
            loop {
                let metrics = agent.get("/metrics").await?;
                let now = Instant::now();
                if detected_at.is_none() && probe::sum_series(&metrics, "gitops_drift_detected_total") > detected_before
                {
                    detected_at = Some(now);
                }
                if probe::sum_series(&metrics, "gitops_drift_corrected_total") > corrected_before {
                    detected.push(detected_at.unwrap_or(now) - t0);
                    corrected.push(now - t0);
                    break;
                }
                if now > deadline {
                    bail!("edit of {name} not detected and corrected within {EVENT_TIMEOUT:?}");
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(Drift {
            objects: n,
            edits: detected.len(),
            detected: Stats::of(&detected),
            corrected: Stats::of(&corrected),
        })
    }
}

/// Item 2: a commit that changes no manifest, so every object is checked and none
/// written. Requests are counted from the API server's metrics, from before the push
/// until the agent's drift watchers have settled again; writes to the benchmark's own
/// objects from their resourceVersions, since the counters also hold the agent's
/// bookkeeping in the same resource (its inventory and status ConfigMaps).
async fn noop_resync(client: &kube::Client, agent: &AgentProcess, repo: &GitRepo, n: usize) -> Result<NoopResync> {
    eprintln!("[noop] resync of {n} unchanged objects");
    let versions_before = resource_versions(client, "agent").await?;
    let before = Requests::scrape(client).await?;
    let cpu_before = agent.cpu()?;
    repo.write("README.md", "benchmark repository, edited\n");
    repo.commit_unpushed("README only");
    let revision = repo.push();
    let t0 = Instant::now();
    agent.webhook().await?;
    let applied = agent.wait_applied(&revision, APPLY_TIMEOUT).await?;
    let duration = applied - t0;
    tokio::time::sleep(SETTLE).await;
    let cpu = agent.cpu()? - cpu_before;
    let requests = Requests::scrape(client).await?.since(&before).only(&["configmaps"]);
    let versions_after = resource_versions(client, "agent").await?;
    let object_writes = versions_after.iter().filter(|(name, rv)| versions_before.get(*name) != Some(*rv)).count();
    Ok(NoopResync {
        objects: n,
        seconds: duration.as_secs_f64(),
        agent_cpu_seconds: cpu.as_secs_f64(),
        requests: requests.by_verb(),
        object_writes: object_writes as u64,
        bookkeeping_writes: NoopResync::writes(&requests.by_verb()),
        lists: requests.count("LIST"),
    })
}

/// The resourceVersion of each benchmark ConfigMap in `ns`.
async fn resource_versions(client: &kube::Client, ns: &str) -> Result<HashMap<String, String>> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let list = api.list_metadata(&ListParams::default().labels("app=bench")).await?;
    Ok(list.items.into_iter().filter_map(|o| Some((o.metadata.name?, o.metadata.resource_version?))).collect())
}

/// The resources a workload's objects are (for counting the agent's requests).
fn workload_resources(workload: Workload) -> Vec<&'static str> {
    match workload {
        Workload::ConfigMaps => vec!["configmaps"],
        Workload::Mix => vec!["deployments", "services", "serviceaccounts", "configmaps"],
    }
}

/// The API server's ceiling: a client doing nothing but server-side apply of the
/// objects into `ns`, `CONCURRENCY` requests in flight, objects parsed beforehand.
/// With `agent_requests`, the agent's request pattern of a cold sync instead: a list
/// per kind, a dry-run apply of every object, and only then every apply.
async fn ceiling(client: &kube::Client, objects: &[Value], ns: &str, agent_requests: bool) -> Result<Duration> {
    let discovery = kube::discovery::Discovery::new(client.clone()).run_aggregated().await?;
    let mut requests = Vec::with_capacity(objects.len());
    for object in objects {
        let object: DynamicObject = serde_json::from_value(object.clone())?;
        let types = object.types.clone().context("apiVersion and kind")?;
        let gvk = kube::api::GroupVersionKind::try_from(&types)?;
        let (resource, _) = discovery.resolve_gvk(&gvk).context("a served kind")?;
        requests.push((resource, object));
    }
    let params = PatchParams::apply("bench-ceiling").force();
    let started = Instant::now();
    if agent_requests {
        let kinds: HashMap<&str, &ApiResource> = requests.iter().map(|(r, _)| (r.kind.as_str(), r)).collect();
        for resource in kinds.into_values() {
            Api::<DynamicObject>::namespaced_with(client.clone(), ns, resource)
                .list(&ListParams::default().limit(500))
                .await?;
        }
        apply_each(client, ns, &requests, &params.clone().dry_run()).await?;
    }
    apply_each(client, ns, &requests, &params).await?;
    Ok(started.elapsed())
}

/// Server-side applies each object into `ns` with `params`, `CONCURRENCY` at a time.
async fn apply_each(
    client: &kube::Client,
    ns: &str,
    requests: &[(ApiResource, DynamicObject)],
    params: &PatchParams,
) -> Result<()> {
    stream::iter(requests)
        .map(|(resource, object)| async move {
            let api = Api::<DynamicObject>::namespaced_with(client.clone(), ns, resource);
            let name = object.metadata.name.as_deref().unwrap_or_default();
            api.patch(name, params, &Patch::Apply(object)).await
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect::<Vec<_>>()
        .await?;
    Ok(())
}

async fn create_namespace(client: &kube::Client, name: &str) -> Result<()> {
    let ns: Namespace = serde_json::from_value(json!({ "metadata": { "name": name } }))?;
    Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await?;
    Ok(())
}

/// Fails unless all `n` objects of the workload are in `ns`: no contender is timed
/// for less than the whole job.
async fn check_applied(client: &kube::Client, workload: Workload, ns: &str, n: usize) -> Result<()> {
    let mut found = 0;
    let kinds: &[(&str, &str, &str)] = match workload {
        Workload::ConfigMaps => &[("", "v1", "ConfigMap")],
        Workload::Mix => &[("apps", "v1", "Deployment"), ("", "v1", "Service"), ("", "v1", "ServiceAccount")],
    };
    for (group, version, kind) in kinds {
        let resource = ApiResource::from_gvk(&kube::api::GroupVersionKind::gvk(group, version, kind));
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &resource);
        let selector = match workload {
            Workload::ConfigMaps => "app=bench",
            Workload::Mix => "tier=bench",
        };
        found += api.list_metadata(&ListParams::default().labels(selector)).await?.items.len();
    }
    if found != n {
        bail!("{ns}: {found} of {n} objects applied");
    }
    Ok(())
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// When each object of one kind in a namespace was first seen with each version (what
/// `version` reads from it): a watch in the benchmark, so "applied" means the API server
/// stored it and told a watcher.
struct SeenVersions {
    seen: Arc<Mutex<HashMap<(String, String), Instant>>>,
    _task: tokio::task::JoinHandle<()>,
}

impl SeenVersions {
    fn watch(
        client: kube::Client,
        ns: &str,
        resource: &ApiResource,
        version: fn(&DynamicObject) -> String,
    ) -> SeenVersions {
        let seen: Arc<Mutex<HashMap<(String, String), Instant>>> = Arc::default();
        let api: Api<DynamicObject> = Api::namespaced_with(client, ns, resource);
        let task = tokio::spawn({
            let seen = seen.clone();
            async move {
                let mut events = watcher::watcher(api, watcher::Config::default()).boxed();
                while let Some(event) = events.next().await {
                    let now = Instant::now();
                    let object = match event {
                        Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => o,
                        _ => continue,
                    };
                    let name = object.metadata.name.clone().unwrap_or_default();
                    seen.lock().unwrap().entry((name, version(&object))).or_insert(now);
                }
            }
        });
        SeenVersions { seen, _task: task }
    }

    async fn wait_for(&self, name: &str, version: &str, timeout: Duration) -> Result<Instant> {
        let deadline = Instant::now() + timeout;
        let key = (name.to_owned(), version.to_owned());
        loop {
            if let Some(at) = self.seen.lock().unwrap().get(&key) {
                return Ok(*at);
            }
            if Instant::now() > deadline {
                bail!("{name} never had version {version} within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}
