//! The applied revision's health: `Progressing` until every one of its objects is
//! healthy, then `Healthy`; `Degraded` once one fails, or is not healthy within its
//! timeout (`--health-timeout`, or the object's annotation [`TIMEOUT_ANNOTATION`]).
//! Objects annotated [`HEALTH_ANNOTATION`]`: ignore` do not count.
//!
//! Computed from watches, never by polling: the drift watch's watchers, which already
//! see every change of every applied object, hand each one to [`RolloutWatch::observe`];
//! a workload's pods (which carry no managed-by label) come from one pod watcher per
//! namespace that holds a workload of the revision. Only a summary of each object is
//! kept (its own [`Health`], its selector), not the object.
//!
//! One publisher task turns changes into the revision's health, in `/status`, the
//! metrics and the status ConfigMap, and sleeps until the next object's deadline when
//! one is pending: a burst of events (the first list of thousands of objects) makes
//! one publication, not one per event. A [`RolloutWatch::track`] publishes at once, so
//! whoever waits on [`RolloutWatch::subscribe`] after it never reads the revision before.
//!
//! Sync waves: while a sync waits for wave N before applying the next
//! ([`RolloutWatch::track_wave`], [`RolloutWatch::wave_healthy`]), the objects of the
//! waves so far are followed; the revision shows `Progressing` even when they are all
//! healthy, since later waves are not applied yet.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ApiResource, DynamicObject};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use serde_json::Value;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::access;
use crate::apply::{ChangeSet, Planned};
use crate::health::{self, Health, HealthStatus, PodSummary};
use crate::object::ObjectId;
use crate::status::{AppState, UnhealthyObject};

/// Annotation that leaves an object out of the revision's health (`ignore`).
pub const HEALTH_ANNOTATION: &str = "gitops.scale.dev/health";
/// Annotation: how long the object may take to become healthy (`90s`, `10m`).
pub const TIMEOUT_ANNOTATION: &str = "gitops.scale.dev/health-timeout";
/// The shortest time between two publishes of the revision's health.
const PUBLISH_EVERY: Duration = Duration::from_millis(20);

/// The applied revision and its health, as last published.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RevisionHealth {
    pub revision: String,
    /// Of the objects followed: while `wave` is set, of the waves through it only.
    pub health: HealthStatus,
    /// The wave a sync waits for, whose later waves are not applied yet; `None` once the
    /// whole revision is.
    pub wave: Option<i32>,
}

impl RevisionHealth {
    /// Whether the whole revision is applied and healthy.
    pub fn is_healthy(&self) -> bool {
        self.wave.is_none() && self.health == HealthStatus::Healthy
    }
}

/// Follows the applied revision's health. Clones share one state.
#[derive(Clone)]
pub struct RolloutWatch {
    shared: Arc<Shared>,
}

struct Shared {
    client: kube::Client,
    state: Arc<AppState>,
    default_timeout: Duration,
    inner: Mutex<Inner>,
    /// Wakes the publisher; outside [`Inner`] so that waiting holds no lock.
    dirty: Arc<Notify>,
    published: watch::Sender<Option<RevisionHealth>>,
    /// What was last put in `/status` and the metrics.
    shown: Mutex<Option<Shown>>,
    /// `/status` changed since the status ConfigMap was last written.
    unreported: AtomicBool,
    publisher: OnceLock<JoinHandle<()>>,
}

/// The revision, the wave waited for, its health and unhealthy objects, as shown.
type Shown = (String, Option<i32>, HealthStatus, Vec<UnhealthyObject>);

#[derive(Default)]
struct Inner {
    revision: Option<String>,
    /// The wave a sync waits for (see [`RevisionHealth::wave`]).
    wave: Option<i32>,
    /// The revision's objects. Hashed, as `seen` is: each sync looks up every one of
    /// them, and an ordered map compares identities that differ only in their name.
    objects: HashMap<ObjectId, Entry>,
    /// The workloads of the revision, by namespace: a pod event looks at these only.
    workloads: BTreeMap<String, BTreeSet<ObjectId>>,
    /// What the watches last said of each managed object, of the revision or not yet
    /// (a sync's own writes are seen before the revision is tracked).
    seen: HashMap<ObjectId, Observed>,
    /// Pods by namespace and name, in the namespaces of `workloads`.
    pods: BTreeMap<String, BTreeMap<String, PodSummary>>,
    pod_watchers: BTreeMap<String, JoinHandle<()>>,
    /// The revision's objects that are not healthy, and since when.
    unhealthy: BTreeMap<ObjectId, (Health, Instant)>,
}

/// One object of the revision.
struct Entry {
    ignored: bool,
    timeout: Duration,
    /// The generation the sync applied: a status about an older one is stale.
    generation: Option<i64>,
}

/// What a watch said of one object.
struct Observed {
    own: Health,
    /// `spec.selector` of a workload.
    selector: Option<Value>,
    generation: Option<i64>,
}

impl RolloutWatch {
    /// `default_timeout`: `--health-timeout`.
    /// The pod watchers go only where the revision has workloads, which `--allow-namespaces`
    /// already allowed.
    pub fn new(client: kube::Client, state: Arc<AppState>, default_timeout: Duration) -> RolloutWatch {
        let dirty = Arc::new(Notify::new());
        let shared = Arc::new(Shared {
            client,
            state,
            default_timeout,
            inner: Mutex::default(),
            dirty: dirty.clone(),
            published: watch::Sender::new(None),
            shown: Mutex::default(),
            unreported: AtomicBool::new(false),
            publisher: OnceLock::new(),
        });
        // Spawned once `shared` is whole: a task spawned while it is being built (from
        // `Arc::new_cyclic`) may run on another worker first, find nothing to upgrade
        // and end, and then no health would ever reach the status ConfigMap.
        let publisher = tokio::spawn(publish(Arc::downgrade(&shared), dirty));
        shared.publisher.set(publisher).expect("set once, here");
        RolloutWatch { shared }
    }

    /// The revision's health as published, for those who wait on it (batch runs, tests).
    pub fn subscribe(&self) -> watch::Receiver<Option<RevisionHealth>> {
        self.shared.published.subscribe()
    }

    /// Follows newly applied `revision`: its objects, with `changes` (what the sync
    /// did to each). Its objects' timeouts count from now.
    pub fn track(&self, revision: &str, objects: &[Planned], changes: &ChangeSet) {
        self.follow(revision, None, objects, changes, &[]);
    }

    /// Follows the waves of `revision` applied so far (`objects`, through wave `wave`)
    /// while a sync waits for them to be healthy before applying `later`.
    pub fn track_wave(&self, revision: &str, wave: i32, objects: &[Planned], changes: &ChangeSet, later: &[Planned]) {
        self.follow(revision, Some(wave), objects, changes, later);
    }

    /// Waits until the waves [`Self::track_wave`] follows are healthy; their unhealthy
    /// objects once one is Degraded (failed, or past its timeout).
    pub async fn wave_healthy(&self, revision: &str, wave: i32) -> Result<(), Vec<UnhealthyObject>> {
        let mut published = self.subscribe();
        let verdict = published
            .wait_for(|h| {
                h.as_ref().is_some_and(|h| {
                    h.revision == revision && h.wave == Some(wave) && h.health != HealthStatus::Progressing
                })
            })
            .await
            .expect("the sender lives as long as the watch")
            .clone()
            .expect("waited for one");
        match verdict.health {
            HealthStatus::Healthy => Ok(()),
            _ => Err(self.shared.shown.lock().unwrap().as_ref().map(|shown| shown.3.clone()).unwrap_or_default()),
        }
    }

    fn follow(&self, revision: &str, wave: Option<i32>, objects: &[Planned], changes: &ChangeSet, later: &[Planned]) {
        let generations: HashMap<&ObjectId, i64> =
            changes.changes.iter().filter_map(|c| Some((&c.id, c.generation?))).collect();
        let mut inner = self.shared.inner.lock().unwrap();
        inner.revision = Some(revision.to_owned());
        inner.wave = wave;
        // The identities of the objects followed before are kept, not copied anew.
        let mut before = std::mem::replace(&mut inner.objects, HashMap::with_capacity(objects.len()));
        inner.workloads.clear();
        for planned in objects {
            let annotations = planned.object.metadata.annotations.as_ref();
            let annotation = |name: &str| annotations.and_then(|a| a.get(name));
            let timeout = annotation(TIMEOUT_ANNOTATION)
                .and_then(|t| {
                    humantime::parse_duration(t)
                        .inspect_err(|e| {
                            tracing::warn!(object = %planned.id, value = t, error = %e,
                            "ignoring the {TIMEOUT_ANNOTATION} annotation: not a duration")
                        })
                        .ok()
                })
                .unwrap_or(self.shared.default_timeout);
            let entry = Entry {
                ignored: annotation(HEALTH_ANNOTATION).is_some_and(|v| v == "ignore"),
                timeout,
                generation: generations.get(&planned.id).copied(),
            };
            if health::selects_pods(&planned.id.group, &planned.id.kind) {
                inner.workloads.entry(planned.id.namespace.clone()).or_default().insert(planned.id.clone());
            }
            let id = before.remove_entry(&planned.id).map_or_else(|| planned.id.clone(), |(id, _)| id);
            inner.objects.insert(id, entry);
        }
        drop(before);
        // What is not the revision's is no longer news; what its later waves hold is: an
        // object they leave unchanged makes no event when they are applied.
        let later: HashSet<&ObjectId> = later.iter().map(|p| &p.id).collect();
        let Inner { seen, objects: followed, .. } = &mut *inner;
        seen.retain(|id, _| followed.contains_key(id) || later.contains(id));
        inner.unhealthy.clear();
        for planned in objects {
            inner.assess(&planned.id);
        }
        self.follow_pods(&mut inner);
        drop(inner);
        self.shared.publish(Instant::now());
        self.shared.dirty.notify_one();
    }

    /// What a watch saw of a managed object of kind `resource` (`None`: deleted).
    pub fn observe(&self, resource: &ApiResource, id: &ObjectId, live: Option<&DynamicObject>) {
        let mut inner = self.shared.inner.lock().unwrap();
        match live {
            Some(live) => {
                let value = health_view(live);
                let observed = Observed {
                    own: health::own(&resource.group, &resource.kind, &value),
                    selector: value
                        .pointer("/spec/selector")
                        .filter(|_| health::selects_pods(&resource.group, &resource.kind))
                        .cloned(),
                    generation: live.metadata.generation,
                };
                inner.seen.insert(id.clone(), observed);
            }
            None if inner.objects.contains_key(id) => {
                let gone = Health::progressing("NotFound", "not in the cluster (the agent puts it back)");
                inner.seen.insert(id.clone(), Observed { own: gone, selector: None, generation: None });
            }
            None => {
                inner.seen.remove(id);
            }
        }
        if inner.assess(id) {
            drop(inner);
            self.shared.dirty.notify_one();
        }
    }

    /// Starts a pod watcher in each namespace of the revision's workloads, and stops
    /// those of namespaces it no longer has.
    fn follow_pods(&self, inner: &mut Inner) {
        let wanted: BTreeSet<String> = inner.workloads.keys().cloned().collect();
        inner.pod_watchers.retain(|namespace, watcher| {
            let keep = wanted.contains(namespace);
            if !keep {
                watcher.abort();
            }
            keep
        });
        let Inner { pods, pod_watchers, .. } = inner;
        pods.retain(|namespace, _| wanted.contains(namespace));
        for namespace in wanted {
            pod_watchers.entry(namespace.clone()).or_insert_with(|| {
                tokio::spawn(watch_pods(Arc::downgrade(&self.shared), self.shared.client.clone(), namespace))
            });
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Some(publisher) = self.publisher.get() {
            publisher.abort();
        }
        for watcher in self.inner.get_mut().unwrap().pod_watchers.values() {
            watcher.abort();
        }
    }
}

impl Inner {
    /// Works out one object's health again; whether it changed.
    fn assess(&mut self, id: &ObjectId) -> bool {
        let Some(entry) = self.objects.get(id) else { return false };
        if entry.ignored {
            return false;
        }
        let health = match self.seen.get(id) {
            None => Health::progressing("NotObserved", "waiting for the watch to report it"),
            Some(seen) if seen.generation < entry.generation => {
                Health::progressing("ApplyNotObserved", "waiting for the watch to report the applied change")
            }
            Some(seen) if health::selects_pods(&id.group, &id.kind) => {
                let pods: Vec<&PodSummary> =
                    self.pods.get(&id.namespace).into_iter().flat_map(|p| p.values()).collect();
                health::with_pods(seen.own.clone(), seen.selector.as_ref(), &pods)
            }
            Some(seen) => seen.own.clone(),
        };
        if health.status == HealthStatus::Healthy {
            return self.unhealthy.remove(id).is_some();
        }
        match self.unhealthy.get_mut(id) {
            Some((known, _)) if *known == health => false,
            Some((known, _)) => {
                *known = health;
                true
            }
            None => {
                self.unhealthy.insert(id.clone(), (health, Instant::now()));
                true
            }
        }
    }

    /// A pod of `namespace` changed: its workloads' health may have.
    fn assess_workloads(&mut self, namespace: &str) -> bool {
        let ids: Vec<ObjectId> = self.workloads.get(namespace).into_iter().flatten().cloned().collect();
        let mut changed = false;
        for id in &ids {
            changed |= self.assess(id);
        }
        changed
    }

    /// The revision's health at `now`, its unhealthy objects, and the next deadline of
    /// an object not yet past it.
    fn health(&self, now: Instant) -> (HealthStatus, Vec<UnhealthyObject>, Option<Instant>) {
        let mut overall = HealthStatus::Healthy;
        let mut next: Option<Instant> = None;
        let mut unhealthy = Vec::with_capacity(self.unhealthy.len());
        for (id, (health, since)) in &self.unhealthy {
            let timeout = self.objects.get(id).map_or(Duration::ZERO, |e| e.timeout);
            let deadline = *since + timeout;
            let (status, message) = if now >= deadline && health.status != HealthStatus::Degraded {
                let timeout = humantime::format_duration(timeout);
                (HealthStatus::Degraded, format!("not healthy within {timeout}: {}", health.message))
            } else {
                if now < deadline {
                    next = Some(next.map_or(deadline, |n| n.min(deadline)));
                }
                (health.status, health.message.clone())
            };
            overall = overall.max(status);
            unhealthy.push(UnhealthyObject {
                kind: id.kind.clone(),
                namespace: (!id.namespace.is_empty()).then(|| id.namespace.clone()),
                name: id.name.clone(),
                health: status,
                reason: health.reason.clone(),
                message,
            });
        }
        (overall, unhealthy, next)
    }
}

impl Shared {
    /// Puts the revision's health at `now` in `/status`, the metrics and the channel,
    /// if it changed; the next deadline of an object not yet past it.
    fn publish(&self, now: Instant) -> Option<Instant> {
        let inner = self.inner.lock().unwrap();
        let revision = inner.revision.clone()?;
        let (health, unhealthy, next) = inner.health(now);
        let mut shown = self.shown.lock().unwrap();
        let changed =
            shown.as_ref().is_none_or(|(r, w, h, u)| (r, w, h, u) != (&revision, &inner.wave, &health, &unhealthy));
        if !changed {
            return next;
        }
        let by_status: HashMap<&ObjectId, HealthStatus> =
            unhealthy.iter().zip(inner.unhealthy.keys()).map(|(shown, id)| (id, shown.health)).collect();
        let kinds: Vec<(&str, HealthStatus)> = inner
            .objects
            .iter()
            .filter(|(_, entry)| !entry.ignored)
            .map(|(id, _)| (id.kind.as_str(), by_status.get(id).copied().unwrap_or(HealthStatus::Healthy)))
            .collect();
        // Waves still to apply: healthy so far is not healthy yet.
        let revision_health = match (inner.wave, health) {
            (Some(_), HealthStatus::Healthy) => HealthStatus::Progressing,
            _ => health,
        };
        self.state.set_health(&revision, revision_health, unhealthy.clone(), kinds);
        if shown.as_ref().is_none_or(|(r, w, h, _)| *r != revision || *w != inner.wave || *h != health) {
            tracing::info!(
                revision,
                wave = inner.wave,
                health = health.as_str(),
                unhealthy = unhealthy.len(),
                "revision health"
            );
        }
        let wave = inner.wave;
        *shown = Some((revision.clone(), wave, health, unhealthy));
        self.unreported.store(true, Ordering::Release);
        self.published.send_replace(Some(RevisionHealth { revision, health, wave }));
        next
    }
}

/// Publishes the revision's health whenever it may have changed or a deadline passes,
/// and writes it to the status ConfigMap. At most once per [`PUBLISH_EVERY`]: a watch's
/// first list of 10,000 objects is 10,000 changes, and each publish goes over every
/// unhealthy object; what changes in between is published together.
async fn publish(shared: Weak<Shared>, dirty: Arc<Notify>) {
    loop {
        let next = {
            let Some(shared) = shared.upgrade() else { return };
            let next = shared.publish(Instant::now());
            if shared.unreported.swap(false, Ordering::AcqRel) {
                shared.state.report_health().await;
            }
            next
        };
        tokio::time::sleep(PUBLISH_EVERY).await;
        match next {
            Some(deadline) => tokio::select! {
                _ = dirty.notified() => {}
                _ = tokio::time::sleep_until(deadline) => {}
            },
            None => dirty.notified().await,
        }
    }
}

/// Follows the pods of one namespace into [`Inner::pods`], re-assessing its workloads.
async fn watch_pods(shared: Weak<Shared>, client: kube::Client, namespace: String) {
    let resource = ApiResource::erase::<Pod>(&());
    let api = access::api(&client, &resource, Some(&namespace));
    let mut events = watcher::watcher(api, watcher::Config::default()).default_backoff().boxed();
    // A re-list's pods, until it is done: then they replace what was known.
    let mut listing: BTreeMap<String, PodSummary> = BTreeMap::new();
    while let Some(event) = events.next().await {
        let Some(shared) = shared.upgrade() else { return };
        let summary = |pod: &DynamicObject| PodSummary::of(&serde_json::to_value(pod).unwrap_or_default());
        let mut inner = shared.inner.lock().unwrap();
        let changed = match event {
            Ok(Event::Init) => {
                listing.clear();
                false
            }
            Ok(Event::InitApply(pod)) => {
                if let Some(pod) = summary(&pod) {
                    listing.insert(pod.name.clone(), pod);
                }
                false
            }
            Ok(Event::InitDone) => {
                inner.pods.insert(namespace.clone(), std::mem::take(&mut listing));
                inner.assess_workloads(&namespace)
            }
            Ok(Event::Apply(pod)) => {
                let Some(pod) = summary(&pod) else { continue };
                let pods = inner.pods.entry(namespace.clone()).or_default();
                if pods.get(&pod.name) == Some(&pod) {
                    continue;
                }
                pods.insert(pod.name.clone(), pod);
                inner.assess_workloads(&namespace)
            }
            Ok(Event::Delete(pod)) => {
                let Some(name) = pod.metadata.name else { continue };
                inner.pods.entry(namespace.clone()).or_default().remove(&name);
                inner.assess_workloads(&namespace)
            }
            Err(e) => {
                tracing::warn!(namespace, error = %e, "pod watch for health interrupted");
                false
            }
        };
        drop(inner);
        if changed {
            shared.dirty.notify_one();
        }
    }
}

/// What health reads of a managed object: its name and generation, spec and status. A
/// copy of only these for every event of every managed object, not of the whole object
/// with its managed fields (a watch's first list of 10,000 objects is 10,000 events).
fn health_view(live: &DynamicObject) -> Value {
    let mut view = serde_json::Map::new();
    let metadata = serde_json::json!({ "name": live.metadata.name, "generation": live.metadata.generation });
    view.insert("metadata".to_owned(), metadata);
    for field in ["spec", "status"] {
        if let Some(value) = live.data.get(field) {
            view.insert(field.to_owned(), value.clone());
        }
    }
    Value::Object(view)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(kind: &str, name: &str) -> ObjectId {
        ObjectId { group: "apps".into(), kind: kind.into(), namespace: "shop".into(), name: name.into() }
    }

    fn inner_with(objects: &[(ObjectId, Duration)]) -> Inner {
        let mut inner = Inner::default();
        for (id, timeout) in objects {
            inner.objects.insert(id.clone(), Entry { ignored: false, timeout: *timeout, generation: Some(2) });
        }
        inner
    }

    fn see(inner: &mut Inner, id: &ObjectId, own: Health, generation: i64) -> bool {
        inner.seen.insert(id.clone(), Observed { own, selector: None, generation: Some(generation) });
        inner.assess(id)
    }

    #[test]
    fn a_status_of_the_generation_before_the_apply_is_not_taken() {
        let web = id("StatefulSet", "web");
        let mut inner = inner_with(&[(web.clone(), Duration::from_secs(60))]);
        assert!(inner.assess(&web));
        assert_eq!(inner.unhealthy[&web].0.reason, "NotObserved");
        assert!(see(&mut inner, &web, Health::healthy(), 1));
        assert_eq!(inner.unhealthy[&web].0.reason, "ApplyNotObserved");
        assert!(see(&mut inner, &web, Health::healthy(), 2));
        assert_eq!(inner.health(Instant::now()).0, HealthStatus::Healthy);
    }

    #[test]
    fn an_object_past_its_timeout_degrades_the_revision() {
        let (web, db) = (id("Deployment", "web"), id("StatefulSet", "db"));
        let mut inner = inner_with(&[(web.clone(), Duration::from_secs(60)), (db.clone(), Duration::from_secs(600))]);
        see(&mut inner, &web, Health::progressing("RolloutInProgress", "0 of 1 updated replicas available"), 2);
        see(&mut inner, &db, Health::healthy(), 2);
        let start = inner.unhealthy[&web].1;
        let (health, unhealthy, next) = inner.health(start);
        assert_eq!((health, next), (HealthStatus::Progressing, Some(start + Duration::from_secs(60))));
        assert_eq!(unhealthy[0].name, "web");
        let (health, unhealthy, next) = inner.health(start + Duration::from_secs(61));
        assert_eq!((health, next), (HealthStatus::Degraded, None));
        assert_eq!(unhealthy[0].message, "not healthy within 1m: 0 of 1 updated replicas available");
        assert_eq!(unhealthy[0].reason, "RolloutInProgress");
    }

    #[test]
    fn ignored_objects_do_not_count() {
        let web = id("Deployment", "web");
        let mut inner = inner_with(&[(web.clone(), Duration::from_secs(60))]);
        inner.objects.get_mut(&web).unwrap().ignored = true;
        assert!(!see(&mut inner, &web, Health::degraded("CrashLoopBackOff", "pod web-1: container app"), 2));
        assert_eq!(inner.health(Instant::now()).0, HealthStatus::Healthy);
    }
}
