//! The agent's Prometheus metrics: the `gitops_*` names of the design's metrics contract.
//!
//! Input: typed events from the rest of the agent (a sync finished, a fetch failed, an
//! object drifted, a batch run ended, ...), one method per event, so no caller ever
//! spells a metric name or a label value.
//! Output: [`Metrics::encode`], the text exposition format served at `/metrics`.
//!
//! The metrics live in a registry owned by [`Metrics`], not in the process-wide default
//! one, so tests (and anything else creating several agents in one process) get
//! independent counters.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::core::Collector;
use prometheus::{
    Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use serde::Serialize;

use crate::health::HealthStatus;
use crate::stages::{Stage, StageTimes};

/// Content type of [`Metrics::encode`]'s output (Prometheus text format 0.0.4).
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// A sync usually takes seconds; a large first apply against a slow API server can take minutes.
const SYNC_BUCKETS: &[f64] = &[0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];

/// A stage of a small commit takes milliseconds; of a cold sync, up to minutes.
const STAGE_BUCKETS: &[f64] = &[0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 120.0];

/// Batch runs (Spark jobs and the like) take from seconds to several hours.
const BATCH_RUN_BUCKETS: &[f64] =
    &[10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0];

/// How a sync ended: the `result` label of `gitops_sync_total`, and the `result` of the
/// last sync in `/status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncResult {
    Success,
    Failure,
}

impl SyncResult {
    fn label(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Failure => "failure",
        }
    }
}

/// How a finished batch run ended (`gitops_batch_runs_total{result="succeeded|failed"}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BatchOutcome {
    Succeeded,
    Failed,
}

impl BatchOutcome {
    fn label(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
        }
    }
}

/// Every metric of the contract, registered in a registry of its own.
pub struct Metrics {
    registry: Registry,
    sync_total: IntCounterVec,
    sync_duration: Histogram,
    sync_stage_duration: HistogramVec,
    last_sync_success: Gauge,
    applied_revision: IntGaugeVec,
    /// The revision `applied_revision` holds a series for; the lock also keeps two
    /// concurrent successes from leaving two series behind.
    current_revision: Mutex<Option<String>>,
    source_fetch_errors: IntCounter,
    unverified_commits: IntCounter,
    managed_resources: IntGaugeVec,
    drifted_resources: IntGaugeVec,
    drift_detected: IntCounterVec,
    drift_corrected: IntCounterVec,
    drift_contested: IntCounterVec,
    leader: IntGauge,
    suspended: IntGauge,
    pruned_resources: IntCounterVec,
    batch_runs: IntCounterVec,
    batch_run_duration: HistogramVec,
    revision_health: IntGaugeVec,
    resources_health: IntGaugeVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let counters = |name: &str, help: &str, labels: &[&str]| {
            register(&registry, IntCounterVec::new(Opts::new(name, help), labels))
        };
        let gauges = |name: &str, help: &str, labels: &[&str]| {
            register(&registry, IntGaugeVec::new(Opts::new(name, help), labels))
        };
        let metrics = Self {
            sync_total: counters(
                "gitops_sync_total",
                "Syncs (fetch, render, apply, prune) attempted, by result.",
                &["result"],
            ),
            sync_duration: register(
                &registry,
                Histogram::with_opts(
                    HistogramOpts::new("gitops_sync_duration_seconds", "Wall-clock time of a sync, successful or not.")
                        .buckets(SYNC_BUCKETS.to_vec()),
                ),
            ),
            sync_stage_duration: register(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "gitops_sync_stage_seconds",
                        "Wall-clock time of each stage of a successful sync that applied a new commit.",
                    )
                    .buckets(STAGE_BUCKETS.to_vec()),
                    &["stage"],
                ),
            ),
            last_sync_success: register(
                &registry,
                Gauge::new(
                    "gitops_last_sync_success_timestamp_seconds",
                    "Unix time of the end of the last successful sync.",
                ),
            ),
            applied_revision: gauges(
                "gitops_applied_revision_info",
                "Always 1; its revision label is the git commit now applied to the cluster.",
                &["revision"],
            ),
            current_revision: Mutex::new(None),
            source_fetch_errors: register(
                &registry,
                IntCounter::new("gitops_source_fetch_errors_total", "Failed attempts to fetch the git repository."),
            ),
            unverified_commits: register(
                &registry,
                IntCounter::new(
                    "gitops_unverified_commits_total",
                    "Heads refused by --verify-signatures: unsigned, or not signed by an allowed key.",
                ),
            ),
            managed_resources: gauges(
                "gitops_managed_resources",
                "Objects the agent manages on the cluster, by kind.",
                &["kind"],
            ),
            drifted_resources: gauges(
                "gitops_drifted_resources",
                "Objects whose live state differs from git now, by kind and namespace \
                 (empty namespace: cluster-scoped).",
                &["kind", "namespace"],
            ),
            drift_detected: counters(
                "gitops_drift_detected_total",
                "Times a managed object was seen to differ from git.",
                &["kind"],
            ),
            drift_corrected: counters(
                "gitops_drift_corrected_total",
                "Times a drifted object was put back to its state in git.",
                &["kind"],
            ),
            drift_contested: counters(
                "gitops_drift_contested_total",
                "Times a drifted object was found contested: corrected so often that another writer \
                 must be changing it back, so the agent stopped correcting it for a while.",
                &["kind"],
            ),
            leader: register(
                &registry,
                IntGauge::new("gitops_leader", "1 while this replica holds the leader lease and may write, else 0."),
            ),
            suspended: register(
                &registry,
                IntGauge::new("gitops_suspended", "1 while the agent is suspended and writes nothing, else 0."),
            ),
            pruned_resources: counters(
                "gitops_pruned_resources_total",
                "Objects deleted because they were removed from git.",
                &["kind"],
            ),
            batch_runs: counters(
                "gitops_batch_runs_total",
                "Batch runs by job: triggered (created), then succeeded or failed.",
                &["job", "result"],
            ),
            batch_run_duration: register(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "gitops_batch_run_duration_seconds",
                        "Time from the start to the end of a finished batch run, by job.",
                    )
                    .buckets(BATCH_RUN_BUCKETS.to_vec()),
                    &["job"],
                ),
            ),
            revision_health: gauges(
                "gitops_revision_health",
                "1 for the applied revision's health (Healthy, Progressing or Degraded), 0 for the others.",
                &["revision", "health"],
            ),
            resources_health: gauges(
                "gitops_resources_health",
                "Objects of the applied revision by kind and health (objects annotated \
                 gitops.scale.dev/health: ignore left out).",
                &["kind", "health"],
            ),
            registry,
        };
        // Both results exist from the start so that rate() and alerts on failures work
        // before the first failure ever happens.
        for result in [SyncResult::Success, SyncResult::Failure] {
            metrics.sync_total.with_label_values(&[result.label()]);
        }
        metrics
    }

    /// A sync of `revision` succeeded after `duration`.
    pub fn sync_succeeded(&self, revision: &str, duration: Duration) {
        self.sync_finished(SyncResult::Success, duration);
        self.last_sync_success.set(unix_seconds(SystemTime::now()));
        let mut current = self.current_revision.lock().unwrap_or_else(|e| e.into_inner());
        if current.as_deref() != Some(revision) {
            replace_series(&self.applied_revision, BTreeMap::from([(vec![revision], 1)]));
            *current = Some(revision.to_owned());
        }
    }

    /// A sync failed after `duration`; the applied revision stays what it was.
    pub fn sync_failed(&self, duration: Duration) {
        self.sync_finished(SyncResult::Failure, duration);
    }

    fn sync_finished(&self, result: SyncResult, duration: Duration) {
        self.sync_total.with_label_values(&[result.label()]).inc();
        self.sync_duration.observe(duration.as_secs_f64());
    }

    /// Where a sync's time went, one observation per stage.
    pub fn sync_stages(&self, stages: &StageTimes) {
        for stage in Stage::ALL {
            self.sync_stage_duration.with_label_values(&[stage.label()]).observe(stages.get(stage).as_secs_f64());
        }
    }

    /// Fetching the git repository failed.
    pub fn fetch_failed(&self) {
        self.source_fetch_errors.inc();
    }

    /// Whether this replica leads now.
    pub fn set_leader(&self, leads: bool) {
        self.leader.set(i64::from(leads));
    }

    /// Whether the agent is suspended now.
    pub fn set_suspended(&self, suspended: bool) {
        self.suspended.set(i64::from(suspended));
    }

    /// A fetched head was refused for its signature.
    pub fn commit_unverified(&self) {
        self.unverified_commits.inc();
    }

    /// The objects now managed, one kind per object; replaces the previous count.
    pub fn set_managed<'a>(&self, kinds: impl IntoIterator<Item = &'a str>) {
        replace_series(&self.managed_resources, count(kinds.into_iter().map(|kind| vec![kind])));
    }

    /// The objects drifted now, one `(kind, namespace)` per object (namespace `""` for
    /// cluster-scoped ones); replaces the previous count.
    pub fn set_drifted<'a>(&self, objects: impl IntoIterator<Item = (&'a str, &'a str)>) {
        let series = objects.into_iter().map(|(kind, namespace)| vec![kind, namespace]);
        replace_series(&self.drifted_resources, count(series));
    }

    /// An object of `kind` was found to differ from git.
    pub fn drift_detected(&self, kind: &str) {
        self.drift_detected.with_label_values(&[kind]).inc();
    }

    /// A drifted object of `kind` was put back to its state in git.
    pub fn drift_corrected(&self, kind: &str) {
        self.drift_corrected.with_label_values(&[kind]).inc();
    }

    /// A drifted object of `kind` is fought over: corrections stop for a while.
    pub fn drift_contested(&self, kind: &str) {
        self.drift_contested.with_label_values(&[kind]).inc();
    }

    /// An object of `kind` was deleted because it left git.
    pub fn pruned(&self, kind: &str) {
        self.pruned_resources.with_label_values(&[kind]).inc();
    }

    /// A new run of batch job `job` was created.
    pub fn batch_run_triggered(&self, job: &str) {
        self.batch_runs.with_label_values(&[job, "triggered"]).inc();
    }

    /// A run of batch job `job` ended after `duration`.
    pub fn batch_run_finished(&self, job: &str, outcome: BatchOutcome, duration: Duration) {
        self.batch_runs.with_label_values(&[job, outcome.label()]).inc();
        self.batch_run_duration.with_label_values(&[job]).observe(duration.as_secs_f64());
    }

    /// The applied revision is `health` now: its series replace the previous revision's.
    pub fn set_revision_health(&self, revision: &str, health: HealthStatus) {
        let series = HealthStatus::ALL.map(|h| (vec![revision, h.as_str()], i64::from(h == health)));
        replace_series(&self.revision_health, series.into_iter().collect());
    }

    /// The revision's objects now, one `(kind, health)` per object; replaces the previous count.
    pub fn set_resources_health<'a>(&self, objects: impl IntoIterator<Item = (&'a str, HealthStatus)>) {
        let series = objects.into_iter().map(|(kind, health)| vec![kind, health.as_str()]);
        replace_series(&self.resources_health, count(series));
    }

    /// All metrics in the Prometheus text exposition format ([`CONTENT_TYPE`]).
    pub fn encode(&self) -> String {
        // The encoder only rejects families without metrics or without a name: gather()
        // drops the former and every name here is a non-empty constant.
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .expect("registered metric families are always encodable")
    }
}

/// Registers `metric`. Definitions are constants, so an error is a programming mistake
/// (a bad or duplicate name) that the unit tests catch.
fn register<M: Collector + Clone + 'static>(registry: &Registry, metric: prometheus::Result<M>) -> M {
    let metric = metric.expect("metric definition is valid");
    registry.register(Box::new(metric.clone())).expect("metric names are unique");
    metric
}

/// How many times each label-value tuple occurs.
fn count<'a>(series: impl Iterator<Item = Vec<&'a str>>) -> BTreeMap<Vec<&'a str>, i64> {
    let mut counts = BTreeMap::new();
    for labels in series {
        *counts.entry(labels).or_insert(0) += 1;
    }
    counts
}

/// Makes `gauges` hold exactly the series of `values` (label values in the vec's label
/// order). It sets the new series first and removes the stale ones after, rather than
/// reset-then-set, so a scrape in between never sees the family empty.
fn replace_series(gauges: &IntGaugeVec, values: BTreeMap<Vec<&str>, i64>) {
    for (labels, value) in &values {
        gauges.with_label_values(labels).set(*value);
    }
    let names = &gauges.desc()[0].variable_labels;
    for family in gauges.collect() {
        for metric in family.get_metric() {
            // Collected label pairs are sorted by name, not in the vec's label order.
            let by_name: HashMap<&str, &str> =
                metric.get_label().iter().map(|pair| (pair.name(), pair.value())).collect();
            let labels: Vec<&str> = names.iter().map(|name| by_name[name.as_str()]).collect();
            if !values.contains_key(&labels) {
                // Only fails if the series is already gone, which is the goal.
                let _ = gauges.remove_label_values(&labels);
            }
        }
    }
}

fn unix_seconds(time: SystemTime) -> f64 {
    // A clock before 1970 is broken anyway; 0 reads as "never" on dashboards.
    time.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The exposition lines of `name`'s series (not its HELP/TYPE comments).
    fn series(metrics: &Metrics, name: &str) -> Vec<String> {
        let prefix_braces = format!("{name}{{");
        let prefix_space = format!("{name} ");
        metrics
            .encode()
            .lines()
            .filter(|line| line.starts_with(&prefix_braces) || line.starts_with(&prefix_space))
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn applied_revision_has_one_series_for_the_latest_success() {
        let metrics = Metrics::new();
        assert!(series(&metrics, "gitops_applied_revision_info").is_empty());
        metrics.sync_succeeded("aaa", Duration::from_secs(1));
        metrics.sync_succeeded("bbb", Duration::from_secs(1));
        metrics.sync_failed(Duration::from_secs(1));
        assert_eq!(
            series(&metrics, "gitops_applied_revision_info"),
            ["gitops_applied_revision_info{revision=\"bbb\"} 1"]
        );
    }

    #[test]
    fn sync_results_exist_before_any_sync() {
        assert_eq!(
            series(&Metrics::new(), "gitops_sync_total"),
            ["gitops_sync_total{result=\"failure\"} 0", "gitops_sync_total{result=\"success\"} 0"]
        );
    }

    #[test]
    fn snapshots_replace_the_previous_counts() {
        let metrics = Metrics::new();
        metrics.set_managed(["Deployment", "Service", "Deployment"]);
        metrics.set_drifted([("Deployment", "web"), ("Namespace", "")]);
        metrics.set_managed(["Service", "ConfigMap"]);
        metrics.set_drifted([("Deployment", "web"), ("Deployment", "web")]);
        assert_eq!(
            series(&metrics, "gitops_managed_resources"),
            ["gitops_managed_resources{kind=\"ConfigMap\"} 1", "gitops_managed_resources{kind=\"Service\"} 1",]
        );
        assert_eq!(
            series(&metrics, "gitops_drifted_resources"),
            ["gitops_drifted_resources{kind=\"Deployment\",namespace=\"web\"} 2"]
        );
        metrics.set_drifted([]);
        assert!(series(&metrics, "gitops_drifted_resources").is_empty());
    }

    #[test]
    fn revision_health_has_the_current_revisions_three_series() {
        let metrics = Metrics::new();
        metrics.set_revision_health("aaa", HealthStatus::Progressing);
        metrics.set_revision_health("bbb", HealthStatus::Degraded);
        assert_eq!(
            series(&metrics, "gitops_revision_health"),
            [
                "gitops_revision_health{health=\"Degraded\",revision=\"bbb\"} 1",
                "gitops_revision_health{health=\"Healthy\",revision=\"bbb\"} 0",
                "gitops_revision_health{health=\"Progressing\",revision=\"bbb\"} 0",
            ]
        );
        metrics.set_resources_health([("Deployment", HealthStatus::Degraded), ("Service", HealthStatus::Healthy)]);
        metrics.set_resources_health([("Deployment", HealthStatus::Healthy)]);
        assert_eq!(
            series(&metrics, "gitops_resources_health"),
            ["gitops_resources_health{health=\"Healthy\",kind=\"Deployment\"} 1"]
        );
    }
}
