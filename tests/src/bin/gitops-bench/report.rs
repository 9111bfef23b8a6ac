//! The benchmark's results: JSON for machines, a Markdown table for README, and the
//! targets of issues 9 and 18 checked as ratios.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::Args;
use crate::workload::Workload;

/// Between these lines README holds the table; `--readme` replaces what is between.
pub const README_BEGIN: &str = "<!-- gitops-bench:begin -->";
pub const README_END: &str = "<!-- gitops-bench:end -->";

#[derive(Debug, Serialize, Deserialize)]
pub struct Results {
    pub command: String,
    pub machine: Machine,
    pub kubernetes_version: String,
    pub concurrency: usize,
    pub cold_sync: Vec<ColdSync>,
    pub noop_resync: Option<NoopResync>,
    pub push_to_applied: Vec<PushLatency>,
    pub drift: Option<Drift>,
    pub batch_trigger: Option<BatchTrigger>,
    pub memory: Vec<Memory>,
    pub targets: Vec<Target>,
    pub total_seconds: f64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Machine {
    pub cores: usize,
    pub memory_gib: f64,
    pub kernel: String,
    pub date: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ColdSync {
    pub workload: Workload,
    pub objects: usize,
    /// Before and after the agent's run.
    pub ceiling_seconds: [f64; 2],
    /// A bare client making the agent's requests: a list per kind, a dry-run apply of
    /// each object, then the applies (run at the largest size only).
    pub ceiling_agent_requests_seconds: Option<f64>,
    /// Push → the agent reports the revision applied.
    pub agent_seconds: f64,
    /// `gitops_sync_duration_seconds` of that sync: the agent's own view.
    pub agent_sync_seconds: f64,
    pub agent_cpu_seconds: f64,
    /// `None` above `--kubectl-max-objects`.
    pub kubectl_seconds: Option<f64>,
    /// The agent's requests for the workload's resources during the sync.
    pub agent_requests: BTreeMap<String, u64>,
    /// `gitops_sync_stage_seconds` of that sync, by stage (ms).
    #[serde(default)]
    pub stages_ms: BTreeMap<String, f64>,
}

impl ColdSync {
    pub fn ceiling(&self) -> f64 {
        self.ceiling_seconds[0].min(self.ceiling_seconds[1])
    }
    pub fn agent_vs_ceiling(&self) -> f64 {
        self.agent_seconds / self.ceiling()
    }
    pub fn kubectl_vs_agent(&self) -> Option<f64> {
        Some(self.kubectl_seconds? / self.agent_seconds)
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct NoopResync {
    pub objects: usize,
    pub seconds: f64,
    pub agent_cpu_seconds: f64,
    /// ConfigMap requests (the objects and the inventory) by verb.
    pub requests: BTreeMap<String, u64>,
    /// The benchmark's objects whose resourceVersion changed.
    pub object_writes: u64,
    /// Every other write to ConfigMaps: the agent's inventory and status ConfigMaps.
    pub bookkeeping_writes: u64,
    pub lists: u64,
}

impl NoopResync {
    /// Writes: applies, patches, updates, creates, deletes that were not dry runs
    /// (those are counted as `VERB (dry run)`).
    pub fn writes(requests: &BTreeMap<String, u64>) -> u64 {
        requests
            .iter()
            .filter(|(verb, _)| matches!(verb.as_str(), "APPLY" | "PATCH" | "PUT" | "POST" | "DELETE"))
            .map(|(_, n)| n)
            .sum()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Trigger {
    Webhook = 0,
    Notify = 1,
    Poll = 2,
}

impl Trigger {
    fn label(self) -> &'static str {
        match self {
            Trigger::Webhook => "webhook (`POST /hooks/git` after the push)",
            Trigger::Notify => "local repository (`notify` on its refs)",
            Trigger::Poll => "polling, `--interval 1s`",
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct PushLatency {
    pub trigger: Trigger,
    pub objects: usize,
    pub commits: usize,
    pub latency: Stats,
    /// `agent` (the one under test) or `baseline` (`--baseline-agent`).
    #[serde(default = "agent_label")]
    pub agent: String,
    /// Mean milliseconds per commit in each stage (`gitops_sync_stage_seconds`); empty
    /// for a baseline built before that metric.
    #[serde(default)]
    pub stages_ms: BTreeMap<String, f64>,
}

fn agent_label() -> String {
    "agent".to_owned()
}

/// The stages of `gitops_sync_stage_seconds`, in the order a sync runs them.
const STAGES: [&str; 9] = ["fetch", "checkout", "render", "plan", "dry_run", "apply", "prune", "inventory", "status"];

#[derive(Debug, Serialize, Deserialize)]
pub struct Drift {
    pub objects: usize,
    pub edits: usize,
    pub detected: Stats,
    pub corrected: Stats,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Memory {
    pub workload: Workload,
    pub objects: usize,
    pub peak_mib: f64,
    pub steady_mib: f64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct BatchTrigger {
    pub objects: usize,
    pub commits: usize,
    pub latency: Stats,
}

/// Milliseconds; p99 is nearest-rank, so over 50 samples it is the largest.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stats {
    pub samples: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

impl Stats {
    pub fn of(samples: &[Duration]) -> Stats {
        let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
        ms.sort_by(f64::total_cmp);
        let rank = |p: f64| ms[((p * ms.len() as f64).ceil() as usize).clamp(1, ms.len()) - 1];
        Stats {
            samples: ms.len(),
            p50_ms: rank(0.50),
            p99_ms: rank(0.99),
            max_ms: *ms.last().unwrap_or(&0.0),
            mean_ms: ms.iter().sum::<f64>() / ms.len().max(1) as f64,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Target {
    pub target: String,
    pub measured: String,
    pub met: bool,
}

impl Results {
    pub fn new() -> Results {
        Results {
            command: format!(
                "cargo run --release -p gitops-tests --bin gitops-bench -- {}",
                std::env::args().skip(1).collect::<Vec<_>>().join(" ")
            )
            .trim_end()
            .to_owned(),
            machine: Machine::this(),
            kubernetes_version: String::new(),
            concurrency: crate::CONCURRENCY,
            cold_sync: Vec::new(),
            noop_resync: None,
            push_to_applied: Vec::new(),
            drift: None,
            batch_trigger: None,
            memory: Vec::new(),
            targets: Vec::new(),
            total_seconds: 0.0,
        }
    }

    /// Checks the targets of issue 9 against what was measured so far.
    fn check_targets(&mut self) {
        let mut targets = Vec::new();
        for c in &self.cold_sync {
            let what = format!("{} {}", c.objects, c.workload.name());
            targets.push(Target {
                target: format!("cold sync {what}: agent within 1.5× of the API server's ceiling"),
                measured: format!("{:.2}×", c.agent_vs_ceiling()),
                met: c.agent_vs_ceiling() <= 1.5,
            });
            if let Some(ratio) = c.kubectl_vs_agent() {
                targets.push(Target {
                    target: format!("cold sync {what}: agent ≥ 3× faster than kubectl SSA"),
                    measured: format!("{ratio:.2}×"),
                    met: ratio >= 3.0,
                });
            }
        }
        if let Some(r) = &self.noop_resync {
            targets.push(Target {
                target: format!("no-op resync at {}: zero writes to objects", r.objects),
                measured: format!("{} object writes (+{} bookkeeping)", r.object_writes, r.bookkeeping_writes),
                met: r.object_writes == 0,
            });
            targets.push(Target {
                target: format!("no-op resync at {}: no re-list", r.objects),
                measured: format!("{} LIST", r.lists),
                met: r.lists == 0,
            });
        }
        let pushes = || self.push_to_applied.iter().filter(|p| p.trigger != Trigger::Poll && p.agent == "agent");
        for p in pushes() {
            let limit = if p.objects >= 50_000 { 1000.0 } else { 500.0 };
            targets.push(Target {
                target: format!("push → applied p99 < {limit:.0} ms at {}, {:?}", p.objects, p.trigger).to_lowercase(),
                measured: format!("{:.0} ms", p.latency.p99_ms),
                met: p.latency.p99_ms < limit,
            });
        }
        for large in pushes().filter(|p| p.objects == 10_000) {
            let Some(small) = pushes().find(|p| p.objects == 1_000 && p.trigger == large.trigger) else { continue };
            let ratio = large.latency.p50_ms / small.latency.p50_ms;
            targets.push(Target {
                target: format!("push → applied p50 at 10,000 within 1.2× of 1,000, {:?}", large.trigger)
                    .to_lowercase(),
                measured: format!("{ratio:.2}×"),
                met: ratio <= 1.2,
            });
        }
        if let Some(d) = &self.drift {
            targets.push(Target {
                target: "drift detection p99 < 1 s".to_owned(),
                measured: format!("{:.0} ms", d.detected.p99_ms),
                met: d.detected.p99_ms < 1000.0,
            });
        }
        for m in self.memory.iter().filter(|m| m.objects == 10_000) {
            targets.push(Target {
                target: format!("peak RSS < 128 MiB at 10,000 {}", m.workload.name()),
                measured: format!("{:.1} MiB", m.peak_mib),
                met: m.peak_mib < 128.0,
            });
            targets.push(Target {
                target: format!("steady RSS < 64 MiB at 10,000 {}", m.workload.name()),
                measured: format!("{:.1} MiB", m.steady_mib),
                met: m.steady_mib < 64.0,
            });
        }
        self.targets = targets;
    }

    /// Reads `OUT.json` back, to write `OUT.md` and README's table again (`--render`).
    pub fn read(args: &Args) -> Result<Results> {
        let json = args.out.with_extension("json");
        let results: Results =
            serde_json::from_str(&std::fs::read_to_string(&json).with_context(|| json.display().to_string())?)?;
        Ok(results)
    }

    /// Writes `OUT.json` and `OUT.md`, and README's table when asked.
    pub fn write(&mut self, args: &Args) -> Result<()> {
        self.check_targets();
        if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let json = args.out.with_extension("json");
        std::fs::write(&json, serde_json::to_string_pretty(self)? + "\n")
            .with_context(|| json.display().to_string())?;
        let markdown = self.markdown();
        let md = args.out.with_extension("md");
        std::fs::write(&md, &markdown).with_context(|| md.display().to_string())?;
        if let Some(readme) = &args.readme {
            let text = std::fs::read_to_string(readme).with_context(|| readme.display().to_string())?;
            let (before, rest) = text.split_once(README_BEGIN).context("README has no gitops-bench:begin marker")?;
            let (_, after) = rest.split_once(README_END).context("README has no gitops-bench:end marker")?;
            let updated = format!("{before}{README_BEGIN}\n{markdown}{README_END}{after}");
            std::fs::write(readme, updated)?;
        }
        Ok(())
    }

    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let m = &self.machine;
        out.push_str(&format!(
            "Measured {} on {} cores, {:.0} GiB (Linux {}), Kubernetes {} on loopback, {:.0} min in all; \
             agent and ceiling keep {} requests in flight. Ratios compare figures of the same run.\n\n",
            m.date,
            m.cores,
            m.memory_gib,
            m.kernel,
            self.kubernetes_version,
            self.total_seconds / 60.0,
            self.concurrency
        ));

        if !self.cold_sync.is_empty() {
            out.push_str(
                "**Cold sync**, commit pushed → all objects applied (seconds). Ceiling: a kube-rs client doing \
                 nothing but server-side apply, best of two runs. Agent's requests: the same client making the \
                 agent's requests (a list per kind, a dry-run apply of each object, then the applies), at the largest size. kubectl \
                 spends most of its time before its first request (300 ConfigMaps: 40 s of 48 s, reading the \
                 files; its requests then take ~5 ms each), so it runs up to `--kubectl-max-objects` only.\n\n",
            );
            out.push_str(
                "| objects | kind | ceiling | agent's requests | agent | kubectl SSA | agent ÷ ceiling (≤ 1.5) | \
                 kubectl ÷ agent (≥ 3) | agent objects/s | agent CPU |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
            );
            for c in &self.cold_sync {
                let or_not =
                    |v: Option<f64>, f: &dyn Fn(f64) -> String| v.map(f).unwrap_or_else(|| "not run".to_owned());
                out.push_str(&format!(
                    "| {} | {} | {:.1} | {} | {:.1} | {} | {:.2}× {} | {} | {:.0} | {:.1} s |\n",
                    c.objects,
                    c.workload.name(),
                    c.ceiling(),
                    or_not(c.ceiling_agent_requests_seconds, &|s| format!("{s:.1}")),
                    c.agent_seconds,
                    or_not(c.kubectl_seconds, &|s| format!("{s:.1}")),
                    c.agent_vs_ceiling(),
                    mark(c.agent_vs_ceiling() <= 1.5),
                    or_not(c.kubectl_vs_agent(), &|r| format!("{r:.2}× {}", mark(r >= 3.0))),
                    c.objects as f64 / c.agent_seconds,
                    c.agent_cpu_seconds,
                ));
            }
            let measured: Vec<&ColdSync> = self.cold_sync.iter().filter(|c| !c.stages_ms.is_empty()).collect();
            if !measured.is_empty() {
                out.push_str("\nWhere the cold sync's time goes in the agent (`gitops_sync_stage_seconds`, ms):\n\n");
                out.push_str(&stage_table(
                    measured.iter().map(|c| (format!("{} {}", c.objects, c.workload.name()), &c.stages_ms)),
                ));
            }
            if let Some(c) = self.cold_sync.iter().max_by_key(|c| (c.workload == Workload::ConfigMaps, c.objects)) {
                out.push_str(&format!(
                    "\nThe agent's requests for {} {} (API server's counters): {}.\n",
                    c.objects,
                    c.workload.name(),
                    verbs(&c.agent_requests)
                ));
            }
            out.push('\n');
        }

        if let Some(r) = &self.noop_resync {
            out.push_str(&format!(
                "**No-op resync** of {} ConfigMaps (a commit that changes no manifest): {:.1} s, agent CPU {:.1} s; \
                 ConfigMap requests until the drift watches settled: {}; objects written (changed resourceVersion): {}; \
                 the agent's bookkeeping (its inventory and status ConfigMaps): {} writes.\n\n",
                r.objects,
                r.seconds,
                r.agent_cpu_seconds,
                verbs(&r.requests),
                r.object_writes,
                r.bookkeeping_writes
            ));
        }

        if !self.push_to_applied.is_empty() {
            out.push_str(
                "**Push → applied**, one ConfigMap changed per commit, from the start of `git push` until a watch \
                 sees the new value (ms; p99 of 50 is the largest). `baseline` is `--baseline-agent`, run just before the agent on the same \
                 control plane and repository; ÷ baseline compares their p50:\n\n\
                 | trigger | objects | agent | commits | p50 | p99 | mean | ÷ baseline |\n|---|---:|---|---:|---:|---:|---:|---:|\n",
            );
            for p in &self.push_to_applied {
                let baseline = self.push_to_applied.iter().find(|b| {
                    b.agent == "baseline" && p.agent != "baseline" && b.trigger == p.trigger && b.objects == p.objects
                });
                let ratio = baseline.map_or(String::new(), |b| format!("{:.2}×", p.latency.p50_ms / b.latency.p50_ms));
                out.push_str(&format!(
                    "| {} | {} | {} | {} | {:.0} | {:.0} | {:.0} | {} |\n",
                    p.trigger.label(),
                    p.objects,
                    p.agent,
                    p.commits,
                    p.latency.p50_ms,
                    p.latency.p99_ms,
                    p.latency.mean_ms,
                    ratio
                ));
            }
            out.push('\n');
            let measured: Vec<&PushLatency> = self.push_to_applied.iter().filter(|p| !p.stages_ms.is_empty()).collect();
            if !measured.is_empty() {
                out.push_str(
                    "Where a commit's time goes in the agent (`gitops_sync_stage_seconds`, mean ms per commit):\n\n",
                );
                out.push_str(&stage_table(
                    measured.iter().map(|p| (format!("{} {} {:?}", p.objects, p.agent, p.trigger), &p.stages_ms)),
                ));
                out.push('\n');
            }
        }

        if let Some(d) = &self.drift {
            out.push_str(&format!(
                "**Drift**, another field manager patches a value git sets in one of {} ConfigMaps → \
                 `gitops_drift_detected_total` moves: p50 {:.0} ms, p99 {:.0} ms; → `gitops_drift_corrected_total` \
                 moves: p50 {:.0} ms, p99 {:.0} ms ({} edits, `--drift correct`).\n\n",
                d.objects, d.detected.p50_ms, d.detected.p99_ms, d.corrected.p50_ms, d.corrected.p99_ms, d.edits
            ));
        }

        if let Some(b) = &self.batch_trigger {
            out.push_str(&format!(
                "**Batch trigger**, a changed `jobs/bench.yaml` (a batch/v1 Job) in a repository of {} ConfigMaps, \
                 from the start of `git push` (webhook) until a watch sees the run `bench-<n>`: \
                 p50 {:.0} ms, p99 {:.0} ms, mean {:.0} ms ({} commits).\n\n",
                b.objects, b.latency.p50_ms, b.latency.p99_ms, b.latency.mean_ms, b.commits
            ));
        }

        if !self.memory.is_empty() {
            out.push_str(
                "**Agent memory** (`gitops-agent` process; peak: VmHWM, steady: VmRSS once the drift watches run):\n\n\
                 | objects | kind | peak MiB | steady MiB |\n|---:|---|---:|---:|\n",
            );
            for m in &self.memory {
                out.push_str(&format!(
                    "| {} | {} | {:.1} | {:.1} |\n",
                    m.objects,
                    m.workload.name(),
                    m.peak_mib,
                    m.steady_mib
                ));
            }
            out.push('\n');
        }

        if !self.targets.is_empty() {
            out.push_str("**Targets** (issues 9 and 18):\n\n| target | measured | met |\n|---|---:|---|\n");
            for t in &self.targets {
                out.push_str(&format!(
                    "| {} | {} | {} |\n",
                    t.target,
                    t.measured,
                    if t.met { "yes" } else { "**no**" }
                ));
            }
        }
        out
    }
}

/// One row a run: each stage's milliseconds, and their sum.
fn stage_table<'a>(rows: impl Iterator<Item = (String, &'a BTreeMap<String, f64>)>) -> String {
    let mut out = format!("| run | {} | sum |\n|---|{}---:|\n", STAGES.join(" | "), "---:|".repeat(STAGES.len()));
    for (run, stages) in rows {
        let cells: Vec<String> = STAGES.iter().map(|s| format!("{:.1}", stages.get(*s).unwrap_or(&0.0))).collect();
        let sum: f64 = stages.values().sum();
        out.push_str(&format!("| {run} | {} | {sum:.1} |\n", cells.join(" | ")));
    }
    out
}

fn mark(met: bool) -> &'static str {
    if met { "" } else { "✗" }
}

fn verbs(counts: &BTreeMap<String, u64>) -> String {
    counts.iter().map(|(verb, n)| format!("{verb} {n}")).collect::<Vec<_>>().join(", ")
}

impl Machine {
    fn this() -> Machine {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let kib: f64 = meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0.0);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned();
        let date = std::process::Command::new("date")
            .args(["-u", "+%Y-%m-%d"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default();
        Machine {
            cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            memory_gib: kib / (1024.0 * 1024.0),
            kernel,
            date,
        }
    }
}
