//! Batch runs: each job spec of `jobs/` ([`JobSpec`]) gets a run object `<job>-<n>`
//! whenever the spec changes.
//!
//! The cluster is the only memory. Every run carries its job's name, its number and the
//! hash of the spec it was made from (labels), and the trigger rule compares the spec's
//! hash with the newest run's. So a restart or a re-sync of the same commit triggers
//! nothing, a `git revert` of a spec does (its hash differs from the newest run's), and
//! two agents racing create one run: both pick the same next name and the API server
//! lets one of them create it.
//!
//! After each successful sync the loop calls [`BatchRuns::update`] with the revision's specs.
//! One watcher per run kind (Job, SparkApplication) follows the runs: their outcome goes
//! to `gitops_batch_runs_total`, `gitops_batch_run_duration_seconds` and `/status`,
//! and a run that ends re-evaluates the specs, which starts a run that `Forbid` held
//! back. A job whose spec cannot run (its kind is not served: no spark operator) is an
//! error of that job alone, retried until it can.
//!
//! A new run waits until the revision's objects are healthy (its database is Ready, its
//! migration Job done: [`crate::rollout`]), unless its spec is annotated
//! [`WAIT_FOR_ANNOTATION`]`: none`; a change of the revision's health re-evaluates.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use k8s_openapi::jiff::Timestamp;
use kube::Resource;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, ListParams, PostParams};
use kube::core::GroupVersionKind;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use crate::access::{self, Access};
use crate::metrics::BatchOutcome;
use crate::render::{ConcurrencyPolicy, JobSpec};
use crate::rollout::RevisionHealth;
use crate::status::{AppState, BatchRun, BatchWaiting};
use crate::write::{WriteError, Writer};

/// Label: the job a run belongs to.
pub const JOB_LABEL: &str = "gitops.scale.dev/job";
/// Label: the run's number `n` in `<job>-<n>`.
pub const RUN_LABEL: &str = "gitops.scale.dev/run";
/// Label: the hash of the spec the run was made from ([`JobSpec::hash`], shortened).
pub const SPEC_HASH_LABEL: &str = "gitops.scale.dev/spec-hash";
/// Annotation: the commit the run's spec came from.
pub const REVISION_ANNOTATION: &str = "gitops.scale.dev/revision";
/// Label values hold at most 63 characters; 160 bits of SHA-256 still never collide.
const HASH_CHARS: usize = 40;
/// Annotation of a job spec: `none` lets its runs start before the revision is healthy.
pub const WAIT_FOR_ANNOTATION: &str = "gitops.scale.dev/wait-for";
/// How soon a job that failed to reconcile is tried again.
const RETRY: Duration = Duration::from_secs(30);

/// Why a job's runs could not be brought in line with its spec.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(
        "{origin}: job {job}: the API server does not serve {kind} in {api_version}; \
         install its CustomResourceDefinition (for SparkApplication: the spark operator)"
    )]
    KindNotServed { origin: String, job: String, kind: String, api_version: String },
    #[error("{origin}: job {job}: {action} {target}: {source}")]
    Api { origin: String, job: String, action: &'static str, target: String, source: WriteError },
    #[error("{origin}: job {job}: annotation {WAIT_FOR_ANNOTATION} must be none (or left out), found {value:?}")]
    WaitFor { origin: String, job: String, value: String },
}

/// Makes and follows the runs of the applied revision's job specs.
pub struct BatchRuns {
    shared: Arc<Shared>,
    retry_task: JoinHandle<()>,
}

struct Shared {
    client: kube::Client,
    /// Only the leader makes and deletes runs, and counts their outcomes, so two
    /// replicas never count one run twice.
    writer: Writer,
    /// Where to watch runs: the whole cluster, or the allowed namespaces.
    access: Access,
    state: Arc<AppState>,
    default_namespace: String,
    /// The applied revision's specs, and that revision.
    desired: Mutex<(Vec<JobSpec>, String)>,
    /// One reconcile at a time: a run's end and a new revision may arrive together.
    reconciling: tokio::sync::Mutex<()>,
    resources: Mutex<HashMap<GroupVersionKind, ApiResource>>,
    watchers: Mutex<HashMap<GroupVersionKind, Vec<JoinHandle<()>>>>,
    /// Every run the watches have shown, by (kind, namespace, name).
    seen: Mutex<BTreeMap<(String, String, String), Seen>>,
    /// A run ended, or went away: specs may be due now.
    wake: Notify,
    /// The applied revision's health, which new runs wait for.
    health: watch::Receiver<Option<RevisionHealth>>,
}

/// A run as the watches last showed it.
struct Seen {
    run: BatchRun,
    counted: bool,
}

impl BatchRuns {
    /// `default_namespace`: where the runs of specs that name no namespace go; `health`:
    /// the applied revision's ([`crate::rollout::RolloutWatch::subscribe`]).
    pub fn new(
        writer: Writer,
        access: Access,
        state: Arc<AppState>,
        default_namespace: &str,
        health: watch::Receiver<Option<RevisionHealth>>,
    ) -> BatchRuns {
        let shared = Arc::new(Shared {
            client: writer.client().clone(),
            writer,
            access,
            state,
            default_namespace: default_namespace.to_owned(),
            desired: Mutex::default(),
            reconciling: tokio::sync::Mutex::default(),
            resources: Mutex::default(),
            watchers: Mutex::default(),
            seen: Mutex::default(),
            wake: Notify::new(),
            health,
        });
        let retry_task = tokio::spawn(shared.clone().reconcile_when_woken());
        BatchRuns { shared, retry_task }
    }

    /// Makes the runs that `specs`, from commit `revision`, call for. Errors are per
    /// job: logged, shown in `/status`, and retried.
    pub async fn update(&self, specs: Vec<JobSpec>, revision: &str) {
        *self.shared.desired.lock().unwrap() = (specs, revision.to_owned());
        self.shared.reconcile().await;
    }
}

impl Drop for BatchRuns {
    fn drop(&mut self) {
        self.retry_task.abort();
        for watcher in self.shared.watchers.lock().unwrap().values().flatten() {
            watcher.abort();
        }
    }
}

impl Shared {
    /// Reconciles again when a run ends, and while some job failed, every [`RETRY`].
    async fn reconcile_when_woken(self: Arc<Self>) {
        let mut failing = false;
        let mut health = self.health.clone();
        loop {
            tokio::select! {
                _ = self.wake.notified() => {}
                changed = health.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(RETRY), if failing => {}
            }
            if self.writer.may_write() {
                failing = !self.reconcile().await;
            }
        }
    }

    /// Brings every job in line with its spec; `false` if some job failed.
    async fn reconcile(self: &Arc<Self>) -> bool {
        let _one_at_a_time = self.reconciling.lock().await;
        let (specs, revision) = self.desired.lock().unwrap().clone();
        let (mut errors, mut waiting) = (Vec::new(), Vec::new());
        for spec in &specs {
            match self.reconcile_job(spec, &revision).await {
                Ok(waits) => waiting.extend(waits),
                Err(e) => {
                    tracing::error!(job = spec.name(), error = %e, "batch job");
                    errors.push(e.to_string());
                }
            }
        }
        let ok = errors.is_empty();
        self.state.set_batch_errors(errors);
        self.state.set_batch_waiting(waiting);
        self.publish();
        ok
    }

    /// Brings one job in line with its spec; `Some` when its new run has to wait.
    async fn reconcile_job(self: &Arc<Self>, spec: &JobSpec, revision: &str) -> Result<Option<BatchWaiting>, JobError> {
        let job = spec.name();
        let origin = spec.template.location.to_string();
        let api_error = |action, target: &str| {
            let (origin, job, target) = (origin.clone(), job.to_owned(), target.to_owned());
            move |source: WriteError| JobError::Api { origin, job, action, target, source }
        };
        let resource = self.resource(spec).await?;
        self.watch(&resource);
        let namespace = spec.template.namespace().unwrap_or(&self.default_namespace);
        let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), namespace, &resource);

        let listed = api
            .list(&ListParams::default().labels(&format!("{JOB_LABEL}={job}")))
            .await
            .map_err(WriteError::from)
            .map_err(api_error("listing the runs of", job))?;
        let mut runs: Vec<Run> = listed.items.iter().filter_map(Run::read).collect();
        runs.sort_by_key(|run| run.number);
        let hash = &spec.hash[..HASH_CHARS];

        let newest = runs.last();
        let mut waits = None;
        let waits_for_health = match spec.template.object["metadata"]["annotations"][WAIT_FOR_ANNOTATION].as_str() {
            None => true,
            Some("none") => false,
            Some(other) => return Err(JobError::WaitFor { origin, job: job.to_owned(), value: other.to_owned() }),
        };
        if newest.is_none_or(|run| run.hash != hash)
            && waits_for_health
            && let Some(unhealthy) = self.held_for_health(spec, revision)
        {
            waits = Some(unhealthy);
        } else if newest.is_none_or(|run| run.hash != hash) {
            let running: Vec<&Run> = runs.iter().filter(|run| !run.finished && !run.deleting).collect();
            match spec.concurrency {
                ConcurrencyPolicy::Forbid if !running.is_empty() => {
                    let waits_for: Vec<String> = running.iter().map(|run| run.name.clone()).collect();
                    tracing::info!(job, ?waits_for, "spec changed; the new run waits (concurrency policy Forbid)");
                    waits = Some(BatchWaiting {
                        job: job.to_owned(),
                        revision: revision.to_owned(),
                        reason: "concurrency policy Forbid: the spec changed while a run is going".to_owned(),
                        waits_for,
                    });
                }
                policy => {
                    if policy == ConcurrencyPolicy::Replace {
                        for run in &running {
                            self.delete(&api, &run.name).await.map_err(api_error("deleting the running", &run.name))?;
                            tracing::info!(job, run = run.name, "deleted the running run (concurrency policy Replace)");
                        }
                    }
                    let number = newest.map_or(1, |run| run.number + 1);
                    let object = run_object(spec, number, namespace, revision, &resource);
                    let name = object.metadata.name.clone().expect("runs are named");
                    let params = PostParams { field_manager: Some(crate::FIELD_MANAGER.to_owned()), dry_run: false };
                    match self.writer.create(&api, &params, &object).await {
                        Ok(run) => {
                            self.state.metrics.batch_run_triggered(job);
                            self.state.events().run_started(run.object_ref(&resource), job, revision);
                            tracing::info!(job, run = name, revision, "started a batch run");
                        }
                        // Another replica made this run first: the one run of this change.
                        Err(e) if e.is_status(409) => {
                            tracing::info!(job, run = name, "batch run already started by another agent");
                        }
                        Err(e) => return Err(api_error("creating", &name)(e)),
                    }
                }
            }
        }

        // Finished runs beyond the history limit go, oldest first; the newest stays.
        let finished = runs.iter().rev().filter(|run| run.finished && !run.deleting);
        for run in finished.skip(spec.history_limit) {
            self.delete(&api, &run.name).await.map_err(api_error("deleting the old", &run.name))?;
            tracing::info!(job, run = run.name, "deleted a run beyond the history limit");
        }
        Ok(waits)
    }

    /// Why a new run of `spec` must wait for revision `revision` to be healthy; `None`
    /// once it is.
    fn held_for_health(&self, spec: &JobSpec, revision: &str) -> Option<BatchWaiting> {
        let health = self.health.borrow().clone().filter(|h| h.revision == revision);
        if health.as_ref().is_some_and(RevisionHealth::is_healthy) {
            return None;
        }
        let now = match &health {
            None => "not assessed yet",
            Some(h) if h.wave.is_some() => "waiting for its sync waves",
            Some(h) => h.health.as_str(),
        };
        let waits_for = self.state.status().unhealthy.iter().map(|o| format!("{} {}", o.kind, o.name)).collect();
        tracing::info!(job = spec.name(), revision, health = now, "the new run waits for the revision to be healthy");
        Some(BatchWaiting {
            job: spec.name().to_owned(),
            revision: revision.to_owned(),
            reason: format!("waits for the revision's objects to be healthy (now {now})"),
            waits_for,
        })
    }

    /// Deletes a run and, in the background, what it made (a Job's pods). One that is
    /// gone already was deleted by another replica, or a person.
    async fn delete(&self, api: &Api<DynamicObject>, name: &str) -> Result<(), WriteError> {
        self.writer.delete(api, name, &DeleteParams::background()).await
    }

    /// The API resource of the spec's kind, from discovery (once per kind).
    async fn resource(&self, spec: &JobSpec) -> Result<ApiResource, JobError> {
        let gvk = spec.template.gvk();
        if let Some(resource) = self.resources.lock().unwrap().get(&gvk) {
            return Ok(resource.clone());
        }
        let not_served = || JobError::KindNotServed {
            origin: spec.template.location.to_string(),
            job: spec.name().to_owned(),
            kind: gvk.kind.clone(),
            api_version: spec.template.api_version().to_owned(),
        };
        let resource = match kube::discovery::pinned_kind(&self.client, &gvk).await {
            Ok((resource, _)) => resource,
            Err(kube::Error::Api(status)) if status.code == 404 => return Err(not_served()),
            Err(kube::Error::Discovery(_)) => return Err(not_served()),
            Err(source) => {
                let (origin, job) = (spec.template.location.to_string(), spec.name().to_owned());
                return Err(JobError::Api {
                    origin,
                    job,
                    action: "discovering",
                    target: gvk.kind.clone(),
                    source: source.into(),
                });
            }
        };
        self.resources.lock().unwrap().insert(gvk, resource.clone());
        Ok(resource)
    }

    /// Starts following the runs of a kind, once.
    fn watch(self: &Arc<Self>, resource: &ApiResource) {
        let gvk = GroupVersionKind::gvk(&resource.group, &resource.version, &resource.kind);
        let mut watchers = self.watchers.lock().unwrap();
        watchers.entry(gvk).or_insert_with(|| {
            let scopes = self.access.watch_scopes().into_iter();
            scopes.map(|namespace| tokio::spawn(self.clone().follow(resource.clone(), namespace))).collect()
        });
    }

    /// Follows every run of one kind, cluster-wide or in one namespace, through the
    /// job label.
    async fn follow(self: Arc<Self>, resource: ApiResource, namespace: Option<String>) {
        let api = access::api(&self.client, &resource, namespace.as_deref());
        // Backing off, as the drift watch does: a refused watch would otherwise spin.
        let mut events = watcher::watcher(api, watcher::Config::default().labels(JOB_LABEL)).default_backoff().boxed();
        let key = |object: &DynamicObject| {
            let (namespace, name) = (object.metadata.namespace.clone(), object.metadata.name.clone());
            (resource.kind.clone(), namespace.unwrap_or_default(), name.unwrap_or_default())
        };
        let mut listed = Vec::new();
        while let Some(event) = events.next().await {
            match event {
                Ok(Event::Apply(object)) => self.saw(key(&object), &object),
                Ok(Event::InitApply(object)) => {
                    listed.push(key(&object));
                    self.saw(key(&object), &object);
                }
                Ok(Event::Delete(object)) => self.gone(|k| *k == key(&object)),
                Ok(Event::Init) => listed.clear(),
                Ok(Event::InitDone) => self.gone(|k| {
                    let watched = k.0 == resource.kind && namespace.as_ref().is_none_or(|ns| *ns == k.1);
                    watched && !listed.contains(k)
                }),
                // The watcher retries with backoff by itself; say why it had to.
                Err(e) => tracing::warn!(kind = %resource.kind, error = %e, "batch run watch interrupted"),
            }
        }
    }

    /// A run was created or changed.
    fn saw(&self, key: (String, String, String), object: &DynamicObject) {
        let Some(run) = Run::read(object) else { return };
        let mut seen = self.seen.lock().unwrap();
        let entry = seen.entry(key.clone()).or_insert_with(|| Seen {
            run: BatchRun { job: run.job.clone(), run: run.name.clone(), revision: run.revision.clone(), result: None },
            counted: false,
        });
        let mut ended = false;
        if let Some((outcome, finished_at)) = run.outcome
            && entry.run.result.is_none()
        {
            entry.run.result = Some(outcome);
            ended = true;
            // Counted once, by the replica that led when it ended: a standby that takes
            // over lists the runs that ended under the leader before, which counted them.
            // A Job's completionTime has whole seconds, so a run that ended in the
            // second of the handover may count for both.
            let whole_seconds = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs();
            let led = self.writer.leading_since().map(whole_seconds);
            let news = led.is_some_and(|since| finished_at.is_none_or(|at| whole_seconds(at) >= since));
            if !entry.counted && news && self.ours(&key.1, &run.job) {
                entry.counted = true;
                let duration = finished_at.and_then(|end| end.duration_since(run.started_at?).ok());
                self.state.metrics.batch_run_finished(&run.job, outcome, duration.unwrap_or_default());
                tracing::info!(job = run.job, run = run.name, ?outcome, "batch run ended");
            }
        }
        drop(seen);
        self.publish();
        if ended {
            self.wake.notify_one();
        }
    }

    /// Runs were deleted.
    fn gone(&self, which: impl Fn(&(String, String, String)) -> bool) {
        let before = self.seen.lock().unwrap().len();
        self.seen.lock().unwrap().retain(|key, _| !which(key));
        if self.seen.lock().unwrap().len() != before {
            self.publish();
            self.wake.notify_one();
        }
    }

    /// Whether job `job` in `namespace` is one of the applied revision's: the watches
    /// see every run in the cluster, and the agent speaks only of its own.
    fn ours(&self, namespace: &str, job: &str) -> bool {
        let desired = self.desired.lock().unwrap();
        desired
            .0
            .iter()
            .any(|spec| spec.name() == job && spec.template.namespace().unwrap_or(&self.default_namespace) == namespace)
    }

    fn publish(&self) {
        let runs = self
            .seen
            .lock()
            .unwrap()
            .iter()
            .filter(|((_, namespace, _), seen)| self.ours(namespace, &seen.run.job))
            .map(|(_, seen)| seen.run.clone())
            .collect();
        self.state.set_batch_runs(runs);
    }
}

/// A run as read from the cluster.
struct Run {
    job: String,
    name: String,
    number: u64,
    hash: String,
    revision: String,
    finished: bool,
    deleting: bool,
    outcome: Option<(BatchOutcome, Option<SystemTime>)>,
    started_at: Option<SystemTime>,
}

impl Run {
    /// `None` for an object without the labels of a run.
    fn read(object: &DynamicObject) -> Option<Run> {
        let labels = object.metadata.labels.as_ref()?;
        let status = &object.data["status"];
        let time = |value: &serde_json::Value| value.as_str()?.parse::<Timestamp>().ok().map(SystemTime::from);
        let outcome = outcome(status).map(|(outcome, at)| (outcome, time(at)));
        Some(Run {
            job: labels.get(JOB_LABEL)?.clone(),
            name: object.metadata.name.clone()?,
            number: labels.get(RUN_LABEL)?.parse().ok()?,
            hash: labels.get(SPEC_HASH_LABEL).cloned().unwrap_or_default(),
            revision: object.metadata.annotations.as_ref()?.get(REVISION_ANNOTATION).cloned().unwrap_or_default(),
            finished: outcome.is_some(),
            deleting: object.metadata.deletion_timestamp.is_some(),
            outcome,
            // A Job's startTime; a SparkApplication's submission; else its creation.
            started_at: time(&status["startTime"])
                .or_else(|| time(&status["lastSubmissionAttemptTime"]))
                .or_else(|| object.metadata.creation_timestamp.as_ref().map(|t| SystemTime::from(t.0))),
        })
    }
}

/// How a run ended, and the status field holding when: a Job's `Complete` or `Failed`
/// condition; a SparkApplication's terminal `applicationState`.
fn outcome(status: &serde_json::Value) -> Option<(BatchOutcome, &serde_json::Value)> {
    for condition in status["conditions"].as_array().into_iter().flatten() {
        let outcome = match (condition["type"].as_str(), condition["status"].as_str()) {
            (Some("Complete"), Some("True")) => BatchOutcome::Succeeded,
            (Some("Failed"), Some("True")) => BatchOutcome::Failed,
            _ => continue,
        };
        return Some((outcome, &condition["lastTransitionTime"]));
    }
    let outcome = match status["applicationState"]["state"].as_str()? {
        "COMPLETED" => BatchOutcome::Succeeded,
        "FAILED" | "SUBMISSION_FAILED" => BatchOutcome::Failed,
        _ => return None,
    };
    Some((outcome, &status["terminationTime"]))
}

/// Run `number` of `spec`: the template under the run's name, labelled as a run.
fn run_object(spec: &JobSpec, number: u64, namespace: &str, revision: &str, resource: &ApiResource) -> DynamicObject {
    let mut object: DynamicObject =
        serde_json::from_value(spec.template.object.clone()).expect("render checked the template's metadata");
    object.types =
        Some(kube::core::TypeMeta { api_version: resource.api_version.clone(), kind: resource.kind.clone() });
    object.data.as_object_mut().map(|data| data.remove("status"));
    let meta = &mut object.metadata;
    meta.name = Some(format!("{}-{number}", spec.name()));
    meta.namespace = Some(namespace.to_owned());
    let labels = meta.labels.get_or_insert_default();
    labels.insert(JOB_LABEL.to_owned(), spec.name().to_owned());
    labels.insert(RUN_LABEL.to_owned(), number.to_string());
    labels.insert(SPEC_HASH_LABEL.to_owned(), spec.hash[..HASH_CHARS].to_owned());
    labels.insert(crate::MANAGED_BY_LABEL.to_owned(), crate::FIELD_MANAGER.to_owned());
    meta.annotations.get_or_insert_default().insert(REVISION_ANNOTATION.to_owned(), revision.to_owned());
    object
}
