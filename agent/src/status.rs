//! The agent's shared state: what `/status`, the metrics and the status ConfigMap
//! show, fed by the loop, the drift watch and the batch runs, and read by the HTTP
//! server. A reconcile's outcome is recorded once, by [`AppState::record`], which
//! updates all three; the drift watch and the batch runs keep their own lists here.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use serde::{Serialize, Serializer};
use tokio::sync::Notify;

use crate::apply::{Action, ApplyError, ChangeSet};
use crate::events::Events;
use crate::health::HealthStatus;
use crate::metrics::{BatchOutcome, Metrics, SyncResult};
use crate::render::RenderError;
use crate::report::StatusReport;
use crate::server::WebhookSecret;
use crate::source::SourceError;
use crate::sync::SyncError;

/// What the endpoints serve and the sync loop updates, shared as `Arc<AppState>`.
pub struct AppState {
    /// Metric-only events (fetch errors, drift, prune, batch runs) go straight here;
    /// events that also show in `/status` go through the methods of [`AppState`].
    pub metrics: Metrics,
    /// The branch the agent follows: pushes to other branches do not trigger a fetch.
    pub(crate) branch: String,
    pub(crate) webhook_secret: Option<WebhookSecret>,
    pub(crate) fetch_now: Notify,
    status: Mutex<Status>,
    /// Where reconciles' outcomes are written in the cluster, if anywhere.
    report: Option<StatusReport>,
    /// Kubernetes Events for what the agent does.
    events: Events,
    /// A replica that stands by in the leader election is ready without a sync of its
    /// own: it serves /metrics and /status, and takes over when the leader goes.
    stands_by: AtomicBool,
}

/// The body of `/status`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Status {
    /// The commit now applied; `null` until the first successful sync.
    pub revision: Option<String>,
    /// Whether this replica holds the leader lease, and so applies, corrects and runs.
    pub leader: bool,
    /// Whether someone suspended the agent: then nothing is applied, corrected,
    /// pruned or run (see [`crate::control`]).
    pub suspended: bool,
    /// `null` until the first sync ends.
    pub last_sync: Option<LastSync>,
    /// Why the last reconcile failed, one entry per problem; empty after a success.
    pub errors: Vec<ErrorEntry>,
    pub drifted: Vec<DriftedObject>,
    pub batch_runs: Vec<BatchRun>,
    /// Jobs whose runs could not be made, each as `file:line: job NAME: why`.
    pub batch_errors: Vec<String>,
    /// Jobs whose new spec waits for its run, and why.
    pub batch_waiting: Vec<BatchWaiting>,
    /// The applied revision's health; `null` until the first sync.
    pub health: Option<HealthStatus>,
    /// The applied revision's objects that are not healthy, with why.
    pub unhealthy: Vec<UnhealthyObject>,
    /// Every object the agent applies, sorted, with where it comes from and the last
    /// thing a sync did to it.
    #[serde(serialize_with = "applied_list")]
    pub applied: BTreeMap<String, AppliedObject>,
}

/// An object of the applied revision, in `/status.applied`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AppliedObject {
    pub kind: String,
    /// `None` for cluster-scoped objects.
    pub namespace: Option<String>,
    pub name: String,
    /// Relative to `--path`.
    pub file: Option<String>,
    pub line: Option<usize>,
    /// `created` or `configured` by the last sync that changed it, `unchanged` when no
    /// sync since this agent started has had to.
    pub last_action: Action,
    /// The revision of that sync (of the first sync this agent made, if unchanged).
    pub revision: String,
}

fn applied_list<S: serde::Serializer>(applied: &BTreeMap<String, AppliedObject>, s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(applied.values())
}

impl Status {
    /// Takes in what a successful sync of `revision` did.
    fn record_applied(&mut self, revision: &str, changes: &ChangeSet) {
        for change in &changes.changes {
            let key = change.id.to_string();
            if change.action == Action::Deleted {
                self.applied.remove(&key);
                continue;
            }
            let (file, line) = file_and_line(&change.origin);
            let entry = self.applied.entry(key).or_insert_with(|| AppliedObject {
                kind: change.id.kind.clone(),
                namespace: Some(change.id.namespace.clone()).filter(|n| !n.is_empty()),
                name: change.id.name.clone(),
                file: None,
                line: None,
                last_action: change.action,
                revision: revision.to_owned(),
            });
            (entry.file, entry.line) = (file, line);
            if change.action != Action::Unchanged {
                (entry.last_action, entry.revision) = (change.action, revision.to_owned());
            }
        }
    }
}

/// `file:line` as its two parts; neither for an origin that is not one (`inventory`).
pub(crate) fn file_and_line(origin: &str) -> (Option<String>, Option<usize>) {
    match origin.rsplit_once(':') {
        Some((file, line)) if line.parse::<usize>().is_ok() => (Some(file.to_owned()), line.parse().ok()),
        _ => (None, None),
    }
}

/// An object of the applied revision that is not healthy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct UnhealthyObject {
    pub kind: String,
    /// `None` for cluster-scoped objects.
    pub namespace: Option<String>,
    pub name: String,
    pub health: HealthStatus,
    pub reason: String,
    pub message: String,
}

impl std::fmt::Display for UnhealthyObject {
    /// `Kind namespace/name: Health: reason: message`, one line of `healthMessage`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match &self.namespace {
            Some(namespace) => format!("{namespace}/{}", self.name),
            None => self.name.clone(),
        };
        write!(f, "{} {name}: {}: {}: {}", self.kind, self.health.as_str(), self.reason, self.message)
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct LastSync {
    /// When the sync ended, RFC 3339 in UTC.
    #[serde(serialize_with = "rfc3339")]
    pub time: SystemTime,
    pub result: SyncResult,
    pub duration_seconds: f64,
}

/// A managed object whose live state differs from git.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DriftedObject {
    pub kind: String,
    /// `None` for cluster-scoped objects.
    pub namespace: Option<String>,
    pub name: String,
    /// The fields that differ, as paths such as `spec.replicas`.
    pub fields: Vec<String>,
    /// Something else keeps changing it back: corrections pause for a while.
    pub contested: bool,
}

/// A run of a batch job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BatchRun {
    pub job: String,
    /// The run's object name, `<job>-<n>`.
    pub run: String,
    /// The commit whose job spec the run was made from.
    pub revision: String,
    /// `None` while the run is still going.
    pub result: Option<BatchOutcome>,
}

impl AppState {
    /// `branch`: the branch the agent follows. `webhook_secret`: when `None`, webhooks are
    /// accepted unauthenticated (harmless: the worst a forged push does is an early fetch).
    pub fn new(branch: impl Into<String>, webhook_secret: Option<WebhookSecret>) -> Self {
        Self {
            metrics: Metrics::new(),
            branch: branch.into(),
            webhook_secret,
            fetch_now: Notify::new(),
            status: Mutex::new(Status::default()),
            report: None,
            events: Events::disabled(),
            stands_by: AtomicBool::new(false),
        }
    }

    /// Also writes each outcome into the status ConfigMap.
    pub fn with_report(self, report: StatusReport) -> Self {
        Self { report: Some(report), ..self }
    }

    /// Also emits Kubernetes Events for outcomes, prunes, corrections and runs.
    pub fn with_events(self, events: Events) -> Self {
        Self { events, ..self }
    }

    pub fn events(&self) -> &Events {
        &self.events
    }

    /// Records how a reconcile that took `duration` ended, in the metrics, `/status`
    /// and the status ConfigMap. A success makes the agent ready.
    pub async fn record(&self, outcome: Outcome, duration: Duration) {
        let (result, revision, message) = match &outcome {
            Outcome::Synced { revision, changes } => {
                self.metrics.sync_succeeded(revision, duration);
                if let Some(changes) = changes {
                    let managed = changes.changes.iter().filter(|c| c.action != Action::Deleted);
                    self.metrics.set_managed(managed.map(|c| c.id.kind.as_str()));
                    for pruned in changes.changes.iter().filter(|c| c.action == Action::Deleted) {
                        self.metrics.pruned(&pruned.id.kind);
                    }
                }
                let mut status = self.status();
                if let Some(changes) = changes {
                    status.record_applied(revision, changes);
                }
                status.revision = Some(revision.clone());
                status.last_sync = Some(LastSync::now(SyncResult::Success, duration));
                status.errors.clear();
                (SyncResult::Success, revision.clone(), String::new())
            }
            Outcome::Failed { revision, cause, errors } => {
                self.metrics.sync_failed(duration);
                match cause {
                    Cause::Fetch => self.metrics.fetch_failed(),
                    Cause::Signature => self.metrics.commit_unverified(),
                    Cause::Sync => {}
                }
                let mut status = self.status();
                status.last_sync = Some(LastSync::now(SyncResult::Failure, duration));
                status.errors = errors.clone();
                // The ConfigMap names the revision tried, else the one still applied.
                let shown = revision.clone().or_else(|| status.revision.clone()).unwrap_or_default();
                let message = errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n");
                (SyncResult::Failure, shown, message)
            }
        };
        match &outcome {
            Outcome::Synced { revision, changes: Some(changes) } => self.events.synced(revision, changes),
            Outcome::Synced { changes: None, .. } => {}
            Outcome::Failed { revision, .. } => self.events.sync_failed(revision.as_deref(), &message),
        }
        if let Some(report) = &self.report {
            report.report(&revision, result, &message).await;
        }
    }

    /// Whether this replica leads now.
    /// Whether this replica leads now; set only where leadership is decided, so a
    /// replica that was never told stands by for nobody.
    pub fn set_leader(&self, leads: bool) {
        self.stands_by.store(!leads, Ordering::Relaxed);
        self.metrics.set_leader(leads);
        self.status().leader = leads;
    }

    /// Whether the agent is suspended now.
    pub fn set_suspended(&self, suspended: bool) {
        self.metrics.set_suspended(suspended);
        self.status().suspended = suspended;
    }

    /// The objects drifted now (replaces the previous list and the drift gauge).
    pub fn set_drifted(&self, drifted: Vec<DriftedObject>) {
        self.metrics.set_drifted(drifted.iter().map(|o| (o.kind.as_str(), o.namespace.as_deref().unwrap_or(""))));
        self.status().drifted = drifted;
    }

    /// The batch runs to show in `/status` (replaces the previous list).
    pub fn set_batch_runs(&self, runs: Vec<BatchRun>) {
        self.status().batch_runs = runs;
    }

    /// The jobs whose new run waits (replaces the previous list).
    pub fn set_batch_waiting(&self, waiting: Vec<BatchWaiting>) {
        self.status().batch_waiting = waiting;
    }

    /// Why jobs' runs could not be made (replaces the previous list; empty when all could).
    pub fn set_batch_errors(&self, errors: Vec<String>) {
        self.status().batch_errors = errors;
    }

    /// The applied revision's health now, in `/status` and the metrics. `kinds`: one
    /// `(kind, health)` per object of the revision that counts.
    pub fn set_health<'a>(
        &self,
        revision: &str,
        health: HealthStatus,
        unhealthy: Vec<UnhealthyObject>,
        kinds: impl IntoIterator<Item = (&'a str, HealthStatus)>,
    ) {
        self.metrics.set_revision_health(revision, health);
        self.metrics.set_resources_health(kinds);
        let mut status = self.status();
        status.health = Some(health);
        status.unhealthy = unhealthy;
    }

    /// Writes the health now in `/status` into the status ConfigMap, if there is one.
    pub async fn report_health(&self) {
        let Some(report) = &self.report else { return };
        let (health, message) = {
            let status = self.status();
            let Some(health) = status.health else { return };
            (health, health_message(&status.unhealthy))
        };
        report.report_health(health.as_str(), &message).await;
    }

    /// Completes when a webhook asked for a fetch. A request that arrives while nobody
    /// waits is kept (at most one), so a push during a sync still triggers the next one.
    pub async fn fetch_requested(&self) {
        self.fetch_now.notified().await;
    }

    /// Ready once a sync succeeded, or while standing by for the leader.
    pub(crate) fn is_ready(&self) -> bool {
        self.stands_by.load(Ordering::Relaxed) || self.status().revision.is_some()
    }

    pub(crate) fn status(&self) -> MutexGuard<'_, Status> {
        // A panic while holding the lock leaves a Status that is still well-formed, and
        // the status endpoint must keep answering.
        self.status.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// `healthMessage` of the status ConfigMap: the unhealthy objects, one a line, the first
/// [`HEALTH_MESSAGE_LINES`] of them (a ConfigMap is for a glance; `/status` has all).
fn health_message(unhealthy: &[UnhealthyObject]) -> String {
    let mut lines: Vec<String> = unhealthy.iter().take(HEALTH_MESSAGE_LINES).map(ToString::to_string).collect();
    if unhealthy.len() > HEALTH_MESSAGE_LINES {
        lines.push(format!("and {} more (see /status)", unhealthy.len() - HEALTH_MESSAGE_LINES));
    }
    lines.join("\n")
}

const HEALTH_MESSAGE_LINES: usize = 10;

impl LastSync {
    fn now(result: SyncResult, duration: Duration) -> Self {
        Self { time: SystemTime::now(), result, duration_seconds: duration.as_secs_f64() }
    }
}

fn rfc3339<S: Serializer>(time: &SystemTime, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(&humantime::format_rfc3339_seconds(*time))
}

/// A job spec whose new run is held back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BatchWaiting {
    pub job: String,
    /// The commit whose spec waits.
    pub revision: String,
    pub reason: String,
    /// The runs it waits for.
    pub waits_for: Vec<String>,
}

/// How a reconcile ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// The cluster holds `revision`: `changes` is what this sync did, `None` when the
    /// head had not moved and nothing was synced.
    Synced { revision: String, changes: Option<ChangeSet> },
    /// Nothing was applied; the cluster stays at the last good revision. `revision`:
    /// the commit tried, if it got that far.
    Failed { revision: Option<String>, cause: Cause, errors: Vec<ErrorEntry> },
}

/// Where a reconcile failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// Reaching or reading the git source.
    Fetch,
    /// The head's signature is missing or not trusted.
    Signature,
    /// Rendering, planning or applying the revision.
    Sync,
}

impl Outcome {
    /// The source could not be read at all; `applied` stays.
    pub fn fetch_failed(error: &SourceError) -> Outcome {
        let cause = if matches!(error, SourceError::Signature(_)) { Cause::Signature } else { Cause::Fetch };
        Outcome::Failed { revision: None, cause, errors: vec![ErrorEntry::message(error.to_string())] }
    }

    /// Commit `revision` could not be synced.
    pub fn sync_failed(revision: &str, error: &SyncError) -> Outcome {
        let errors = match error {
            SyncError::Render(errors) => errors.iter().map(ErrorEntry::render).collect(),
            SyncError::Rejected(errors) | SyncError::Apply(errors) | SyncError::Prune(errors) => {
                errors.iter().map(ErrorEntry::apply).collect()
            }
            SyncError::Wave { wave, unhealthy } => {
                unhealthy.iter().map(|object| ErrorEntry::message(format!("wave {wave}: {object}"))).collect()
            }
            other => vec![ErrorEntry::message(other.to_string())],
        };
        Outcome::Failed { revision: Some(revision.to_owned()), cause: Cause::Sync, errors }
    }
}

/// One problem of a failed reconcile, in `/status.errors`: where in the repository
/// (when it is about a file), which object (when it is about one), and what.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ErrorEntry {
    /// Relative to `--path`.
    pub file: Option<String>,
    pub line: Option<usize>,
    /// `Kind[.group] [namespace/]name`.
    pub object: Option<String>,
    pub message: String,
}

impl ErrorEntry {
    fn message(message: String) -> ErrorEntry {
        ErrorEntry { file: None, line: None, object: None, message }
    }

    fn render(error: &RenderError) -> ErrorEntry {
        ErrorEntry {
            file: Some(error.at.file.display().to_string()),
            line: Some(error.at.line),
            object: None,
            message: error.problem.to_string(),
        }
    }

    fn apply(error: &ApplyError) -> ErrorEntry {
        // `file:line`, or `inventory` for an object only the inventory knows.
        let (file, line) = file_and_line(&error.origin);
        ErrorEntry { file, line, object: Some(error.id.to_string()), message: error.message.clone() }
    }
}

impl std::fmt::Display for ErrorEntry {
    /// `file:line: object: message`, leaving out what is unknown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{file}:{}: ", self.line.unwrap_or(1))?;
        }
        if let Some(object) = &self.object {
            write!(f, "{object}: ")?;
        }
        f.write_str(&self.message)
    }
}
