//! Drift: the live cluster differs from git between commits. Detected from watches, as
//! it happens; reported in `/status` and `gitops_drifted_resources`; corrected or left
//! alone by policy.
//!
//! After each successful sync the loop hands [`DriftWatch::track`] the revision's
//! objects. One kube-runtime watcher per kind, selecting the managed-by label, reports
//! every change; nothing is re-listed or polled at steady state, and the watchers outlive
//! syncs (a sync only holds the checks until it is done). Each changed object is checked
//! in two steps:
//!
//! 1. suspicion, with no request: the object was deleted (or left the label selector), a
//!    value git sets differs in the live object, or another field manager wrote after
//!    the agent. Status updates and the agent's own applies raise none;
//! 2. confirmation, with one server-side dry-run apply of that object (without force):
//!    if the API server would store exactly the live object, defaulting, quantities
//!    (`1000m` is `1`) and int-or-string made the difference, not a person. A conflict
//!    means another manager took a field git sets.
//!
//! The annotation `gitops.scale.dev/drift: ignore` (in git or live) exempts an object's
//! changes; its deletion is drift all the same. `gitops.scale.dev/drift: report` in git
//! reports the object's drift without correcting it, whatever `--drift` says: for a
//! field someone tunes live for a while, with the alert reminding them to commit it.
//!
//! Corrections go through the sync's [`Applier`], so a replica that lost the Lease
//! corrects nothing (it does not even check: its revision may be an old one). An object
//! corrected more than [`CONTEST_CORRECTIONS`] times within [`CONTEST_WINDOW`] has
//! another writer (an HPA, a controller, a script): it is reported as contested and
//! left alone for a while, rather than fought over every few milliseconds.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use kube::Resource;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::access::{self, Access};
use crate::apply::{Applier, ChangeSet, Planned, comparable, fingerprint};
use crate::object::ObjectId;
use crate::rollout::RolloutWatch;
use crate::status::{AppState, DriftedObject};

/// Annotation that exempts an object from drift detection (`ignore`), or from its
/// correction (`report`).
pub const DRIFT_ANNOTATION: &str = "gitops.scale.dev/drift";

/// Corrections of one object within [`CONTEST_WINDOW`] beyond which it is contested.
pub const CONTEST_CORRECTIONS: usize = 5;
pub const CONTEST_WINDOW: Duration = Duration::from_secs(60);
/// How long corrections of a contested object pause the first time; each time it is
/// contested again the pause doubles, up to [`MAX_CONTEST_PAUSE`].
const CONTEST_PAUSE: Duration = Duration::from_secs(60);
const MAX_CONTEST_PAUSE: Duration = Duration::from_secs(600);

/// What to do about drift (`--drift`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Policy {
    /// Re-apply the object from git.
    Correct,
    /// Report it until git or the cluster agree again.
    Report,
}

/// Watches the objects of the applied revision.
pub struct DriftWatch {
    shared: Arc<Shared>,
    /// One watcher per kind and namespace scope; they outlive syncs, so a sync that
    /// touches no new kind makes no list.
    watchers: Mutex<BTreeMap<WatchKey, JoinHandle<()>>>,
}

/// An object of the applied revision, kept as the JSON it is applied as: parsed, it
/// takes several times that (a small ConfigMap: ~0.5 KiB as JSON, several KiB as a
/// tree), and only an object a watch reports is needed parsed.
struct Tracked {
    resource: ApiResource,
    origin: String,
    json: Box<[u8]>,
    /// [`Planned::source`]: the same source, kind and identity make the same object.
    source: Option<Arc<str>>,
    /// The [`fingerprint`] of a live state known to hold this object: an event showing
    /// it again (a status update, a re-list) is in line without a dry run.
    settled: Option<u64>,
}

impl Tracked {
    /// `planned`, vouched for by the live state `seen`, else by what vouched for it
    /// in `previous` if that tracked the same object.
    fn new(planned: Planned, seen: Option<u64>, previous: Option<&Tracked>) -> Tracked {
        let json = match previous.filter(|old| old.has_source_of(&planned)) {
            Some(old) => old.json.clone(),
            None => serde_json::to_vec(&planned.object).expect("an object from YAML or JSON serializes").into(),
        };
        let settled = seen.or_else(|| previous.filter(|old| old.json == json).and_then(|old| old.settled));
        Tracked { resource: planned.resource, origin: planned.origin, json, source: planned.source, settled }
    }

    /// Whether `planned` is the object tracked (the same input renders the same JSON).
    fn holds(&self, planned: &Planned) -> bool {
        self.has_source_of(planned) || serde_json::to_vec(&planned.object).is_ok_and(|json| *json == *self.json)
    }

    /// Whether `planned` was rendered from the tracked object's source: a comparison of
    /// two strings, often of one pointer, where serializing every object of a revision
    /// of 10,000 to compare its JSON took 30 ms of each commit's dry-run stage.
    fn has_source_of(&self, planned: &Planned) -> bool {
        self.source.is_some() && self.source == planned.source && self.resource == planned.resource
    }

    fn planned(&self, id: &ObjectId) -> Planned {
        Planned {
            id: id.clone(),
            resource: self.resource.clone(),
            object: serde_json::from_slice(&self.json).expect("tracked JSON was serialized from an object"),
            origin: self.origin.clone(),
            source: self.source.clone(),
        }
    }
}

/// What a watch showed of one object (`live: None`: deleted, or gone from the selector),
/// with the live state's [`fingerprint`] once taken: the settled test and the check
/// need the same one, and a held sighting keeps it for after the sync.
struct Sighting {
    live: Option<DynamicObject>,
    fingerprint: Option<u64>,
}

impl Sighting {
    fn of(live: Option<DynamicObject>) -> Sighting {
        Sighting { live, fingerprint: None }
    }
}

/// `objects` as drift tracks them: each vouched for by the live state the sync saw of it
/// (`changes`), or, when git holds it as before, by what vouched for it in `previous`.
fn tracked(
    objects: Vec<Planned>,
    changes: &ChangeSet,
    previous: &HashMap<ObjectId, Tracked>,
) -> HashMap<ObjectId, Tracked> {
    let seen: HashMap<&ObjectId, u64> = changes.changes.iter().filter_map(|c| Some((&c.id, c.fingerprint?))).collect();
    objects
        .into_iter()
        .map(|planned| {
            let id = planned.id.clone();
            let tracked = Tracked::new(planned, seen.get(&id).copied(), previous.get(&id));
            (id, tracked)
        })
        .collect()
}

/// A watcher's kind (group, version, kind) and namespace (`None`: cluster-wide).
type WatchKey = (String, String, String, Option<String>);

fn watch_key(r: &ApiResource, namespace: Option<String>) -> WatchKey {
    (r.group.clone(), r.version.clone(), r.kind.clone(), namespace)
}

struct Shared {
    client: kube::Client,
    /// Corrects drift, while this replica leads.
    applier: Applier,
    /// Where to watch: the whole cluster, or the allowed namespaces.
    access: Access,
    policy: Policy,
    state: Arc<AppState>,
    /// Takes every object the watches see, for the revision's health.
    rollout: RolloutWatch,
    /// The applied revision's objects, by identity. Hashed: every sync looks up each
    /// of them, and ordered maps of 10,000 identities spent most of that comparing
    /// strings that share their group, kind and namespace.
    desired: Mutex<HashMap<ObjectId, Tracked>>,
    drifted: Mutex<BTreeMap<ObjectId, DriftedObject>>,
    /// Checks hold it shared; [`DriftWatch::pause`] takes it exclusively, so it returns
    /// only once no check (and no correction) is under way.
    gate: tokio::sync::RwLock<()>,
    /// While a sync runs: the newest state each watch saw of each object (`None`:
    /// deleted), checked against the revision that comes out of the sync.
    held: Mutex<Option<HashMap<ObjectId, Sighting>>>,
    /// Watchers whose list of their kind is done: from then on every change to its
    /// objects reaches a check.
    listed: Mutex<BTreeSet<WatchKey>>,
    /// Objects seen changed whose check could not tell (the dry run failed, the object
    /// changed again meanwhile, or this replica did not lead): not vouched for until a
    /// check or a sync looks at them.
    unchecked: Mutex<BTreeSet<ObjectId>>,
    /// Recent corrections per object, to find the contested ones.
    contests: Mutex<BTreeMap<ObjectId, Contest>>,
}

/// One object's recent corrections.
#[derive(Default)]
struct Contest {
    corrected: VecDeque<Instant>,
    /// Until when corrections pause, once contested.
    paused_until: Option<Instant>,
    /// The next pause.
    pause: Duration,
}

impl DriftWatch {
    /// `applier`: the sync's, which corrects as it applies (same field manager and
    /// `--force-conflicts`, same leadership).
    pub fn new(
        applier: Applier,
        access: Access,
        policy: Policy,
        state: Arc<AppState>,
        rollout: RolloutWatch,
    ) -> DriftWatch {
        let shared = Shared {
            client: applier.writer().client().clone(),
            applier,
            access,
            policy,
            state,
            rollout,
            desired: Mutex::default(),
            drifted: Mutex::default(),
            gate: tokio::sync::RwLock::default(),
            held: Mutex::default(),
            listed: Mutex::default(),
            unchecked: Mutex::default(),
            contests: Mutex::default(),
        };
        DriftWatch { shared: Arc::new(shared), watchers: Mutex::default() }
    }

    /// Tracks a newly applied revision's objects, replacing the previous ones. A kind
    /// the revision adds gets a watcher, which starts with a list; one it no longer
    /// has loses its watcher.
    /// `changes`: what the sync saw of each object, so the first events need no dry run.
    pub fn track(&self, objects: Vec<Planned>, changes: &ChangeSet) {
        {
            let mut desired = self.shared.desired.lock().unwrap();
            let previous = std::mem::take(&mut *desired);
            *desired = tracked(objects, changes, &previous);
        }
        // The sync just applied git: what was drifted is in line again, or is found anew;
        // it also dry-ran whatever was unchecked, and a new revision is a new contest.
        self.shared.drifted.lock().unwrap().clear();
        self.shared.unchecked.lock().unwrap().clear();
        self.shared.contests.lock().unwrap().clear();
        self.shared.publish();
        self.resume();
    }

    /// A sync that stopped at a wave that did not become healthy: the waves before it
    /// are in the cluster, and measuring them against the last good revision would
    /// "correct" them back, only for the retry to apply them again. Until a revision
    /// syncs, the objects `applied` (as the sync saw them in `changes`) are what the
    /// cluster should hold, as Argo CD keeps a failed sync's earlier waves.
    pub fn adopt(&self, applied: &[Planned], changes: &ChangeSet) {
        let mut desired = self.shared.desired.lock().unwrap();
        let adopted = tracked(applied.to_vec(), changes, &desired);
        desired.extend(adopted);
    }

    /// Whether the cluster holds `planned` as the tracked revision has it, so a sync
    /// need not dry-run it again (Argo CD's live-state cache, in small): git has not
    /// changed it since the last sync, its kind's watcher has listed it, and every change
    /// the watch saw since was checked and found no drift. Anything else (a restart, a
    /// new kind, drift, a change seen during this sync) says no.
    pub fn in_line(&self, planned: &Planned) -> bool {
        let shared = &self.shared;
        let scope = match shared.access {
            Access::Cluster => None,
            Access::Namespaces(_) => Some(planned.id.namespace.clone()),
        };
        shared.listed.lock().unwrap().contains(&watch_key(&planned.resource, scope))
            && !shared.drifted.lock().unwrap().contains_key(&planned.id)
            && !shared.unchecked.lock().unwrap().contains(&planned.id)
            && !shared.held.lock().unwrap().as_ref().is_some_and(|held| held.contains_key(&planned.id))
            && shared.desired.lock().unwrap().get(&planned.id).is_some_and(|tracked| tracked.holds(planned))
    }

    /// Holds drift checks while a sync applies and prunes: the old revision would take
    /// the new revision's writes and prunes for drift, and undo them. What the watches
    /// see meanwhile is checked when the sync ends.
    pub async fn pause(&self) {
        let _exclusive = self.shared.gate.write().await;
        self.shared.held.lock().unwrap().get_or_insert_default();
    }

    /// Checks again, against the tracked objects (after a sync that failed, they are
    /// still what the cluster should hold), starting with what was seen while paused.
    pub fn resume(&self) {
        let kinds = self.kinds(self.shared.desired.lock().unwrap().values().map(|tracked| &tracked.resource));
        let mut watchers = self.watchers.lock().unwrap();
        watchers.retain(|key, watcher| {
            let keep = kinds.contains_key(key);
            if !keep {
                watcher.abort();
                self.shared.listed.lock().unwrap().remove(key);
            }
            keep
        });
        drop(watchers);
        self.start_watchers(kinds);
        let Some(held) = self.shared.held.lock().unwrap().take() else { return };
        let shared = self.shared.clone();
        tokio::spawn(async move {
            for (id, sighting) in held {
                shared.see(id, sighting).await;
            }
        });
    }
}

impl DriftWatch {
    /// Starts watching the kinds of `objects` now, during a sync, so that their health
    /// is followed before the sync ends (a later sync wave waits for it). Checks stay
    /// held until [`Self::track`].
    pub fn watch(&self, objects: &[Planned]) {
        self.start_watchers(self.kinds(objects.iter().map(|planned| &planned.resource)));
    }

    /// The watchers `resources` need, in every namespace scope.
    fn kinds<'a>(&self, resources: impl Iterator<Item = &'a ApiResource>) -> BTreeMap<WatchKey, ApiResource> {
        let mut kinds = BTreeMap::new();
        for resource in resources {
            for namespace in self.shared.access.watch_scopes() {
                kinds.insert(watch_key(resource, namespace), resource.clone());
            }
        }
        kinds
    }

    fn start_watchers(&self, kinds: BTreeMap<WatchKey, ApiResource>) {
        let mut watchers = self.watchers.lock().unwrap();
        for (key, resource) in kinds {
            if let std::collections::btree_map::Entry::Vacant(entry) = watchers.entry(key) {
                let namespace = entry.key().3.clone();
                entry.insert(tokio::spawn(self.shared.clone().watch(resource, namespace)));
            }
        }
    }
}

impl Drop for DriftWatch {
    fn drop(&mut self) {
        for watcher in self.watchers.lock().unwrap().values() {
            watcher.abort();
        }
    }
}

impl Shared {
    /// Follows one kind, cluster-wide or in one namespace, through the managed-by label.
    async fn watch(self: Arc<Self>, resource: ApiResource, namespace: Option<String>) {
        let api = access::api(&self.client, &resource, namespace.as_deref());
        let selector = format!("{}={}", crate::MANAGED_BY_LABEL, crate::FIELD_MANAGER);
        let config = watcher::Config::default().labels(&selector);
        // Backing off: a watch the API server refuses (403, down) would otherwise retry at
        // once, in a loop, each time with a warning.
        let mut events = watcher::watcher(api, config).default_backoff().boxed();
        // What the list under way has shown; empty between lists.
        let mut in_list = BTreeSet::new();
        while let Some(event) = events.next().await {
            match event {
                Ok(Event::InitApply(object)) => {
                    if let Some(id) = ObjectId::of(&resource, &object) {
                        self.rollout.observe(&resource, &id, Some(&object));
                        in_list.insert(id.clone());
                        self.see(id, Sighting::of(Some(object))).await;
                    }
                }
                Ok(Event::Apply(object)) => {
                    if let Some(id) = ObjectId::of(&resource, &object) {
                        self.rollout.observe(&resource, &id, Some(&object));
                        self.see(id, Sighting::of(Some(object))).await;
                    }
                }
                Ok(Event::Delete(object)) => {
                    if let Some(id) = ObjectId::of(&resource, &object) {
                        self.rollout.observe(&resource, &id, None);
                        self.see(id, Sighting::of(None)).await;
                    }
                }
                // A (re-)list: changes made while the watch was down are not seen yet.
                Ok(Event::Init) => {
                    in_list.clear();
                    self.listed.lock().unwrap().remove(&watch_key(&resource, namespace.clone()));
                }
                // Objects of this kind that git has but the list did not show were
                // deleted (or lost the label) while nobody watched.
                Ok(Event::InitDone) => {
                    let missing: Vec<ObjectId> = self
                        .desired
                        .lock()
                        .unwrap()
                        .keys()
                        .filter(|id| id.kind == resource.kind && id.group == resource.group && !in_list.contains(*id))
                        .filter(|id| namespace.as_ref().is_none_or(|ns| *ns == id.namespace))
                        .cloned()
                        .collect();
                    in_list = BTreeSet::new();
                    for id in missing {
                        self.rollout.observe(&resource, &id, None);
                        self.see(id, Sighting::of(None)).await;
                    }
                    self.listed.lock().unwrap().insert(watch_key(&resource, namespace.clone()));
                    crate::release_memory();
                }
                // The watcher retries after a backoff; say why it had to.
                Err(e) => tracing::warn!(kind = %resource.kind, error = %e, "drift watch interrupted"),
            }
        }
    }

    /// Checks what a watch saw, or holds it while a sync runs. A state already found in
    /// line is in line still, sync or not: holding it would make the sync dry-run the
    /// object again, and a re-list that meets a sync would hold every object it shows.
    async fn see(self: &Arc<Self>, id: ObjectId, mut sighting: Sighting) {
        let _shared = self.gate.read().await;
        // Only a tracked object's state is compared, so only its fingerprint is taken.
        if let Some(live) = sighting.live.as_ref().filter(|_| sighting.fingerprint.is_none() && self.tracks(&id)) {
            sighting.fingerprint = Some(fingerprint(live));
        }
        if sighting.fingerprint.is_some_and(|print| self.is_settled(&id, print)) {
            if let Some(held) = self.held.lock().unwrap().as_mut() {
                held.remove(&id);
            }
            return self.settle(&id);
        }
        if let Some(held) = self.held.lock().unwrap().as_mut() {
            held.insert(id, sighting);
            return;
        }
        self.check(&id, sighting).await;
    }

    /// Checks one object seen by a watch.
    async fn check(self: &Arc<Self>, id: &ObjectId, sighting: Sighting) {
        let Sighting { live: seen, fingerprint: seen_fingerprint } = sighting;
        let Some(planned) = self.desired.lock().unwrap().get(id).map(|tracked| tracked.planned(id)) else { return };
        // A replica that does not lead may hold an old revision, and a suspended one
        // must not write: neither corrects nor settles, and the next sync it makes
        // dry-runs what it saw change.
        if !self.applier.writer().may_write() {
            self.unchecked.lock().unwrap().insert(id.clone());
            return;
        }
        let namespace = Some(id.namespace.as_str()).filter(|ns| !ns.is_empty());
        let api = access::api(&self.client, &planned.resource, namespace);
        // A Delete event may only mean the label was removed: look.
        let live = match seen {
            Some(object) => Some(object),
            None => match api.get_opt(&id.name).await {
                Ok(live) => live,
                Err(e) => {
                    self.unchecked.lock().unwrap().insert(id.clone());
                    return tracing::warn!(object = %id, error = %e, "drift check: cannot read");
                }
            },
        };
        // `drift: ignore` means "do not undo changes", not "do not notice it is gone"
        // (Argo CD's and Flux's meaning): a deleted object comes back all the same.
        if live.as_ref().is_some_and(|live| ignored(&planned.object) || ignored(live)) {
            return self.settle(id);
        }
        let live_fingerprint = live.as_ref().map(|live| seen_fingerprint.unwrap_or_else(|| fingerprint(live)));
        let verdict = match &live {
            None => Verdict::Drifted(Finding { fields: vec!["(deleted)".into()], by: Vec::new() }),
            Some(live) if !suspicious(&planned.object, live) => Verdict::InLine,
            Some(live) => self.confirm(&api, &planned, live).await,
        };
        match verdict {
            Verdict::InLine => {
                self.record_settled(id, live_fingerprint);
                self.settle(id)
            }
            Verdict::Drifted(finding) => self.drifted(&planned, live.as_ref(), finding).await,
            // What the object was found to be stays so until a check can tell.
            Verdict::Unknown => {
                self.unchecked.lock().unwrap().insert(id.clone());
            }
        }
    }

    /// The dry run that tells real drift from the API server's own normalisation.
    /// Without force first: a conflict means another manager took a field git sets,
    /// and a forced dry run then shows which values differ.
    async fn confirm(&self, api: &Api<DynamicObject>, planned: &Planned, live: &DynamicObject) -> Verdict {
        let by = other_writers(live);
        let dry_run = |params: PatchParams| async move {
            api.patch(&planned.id.name, &params.dry_run(), &Patch::Apply(&planned.object)).await
        };
        let result = match dry_run(PatchParams::apply(crate::FIELD_MANAGER)).await {
            Err(kube::Error::Api(status)) if status.code == 409 => {
                dry_run(PatchParams::apply(crate::FIELD_MANAGER).force()).await
            }
            other => other,
        };
        match result {
            // The object changed since the event: its newer version has an event of its
            // own, and comparing across versions would see a controller's write as drift.
            // Nor is it in line because of it: a controller writing status right after a
            // person's edit would settle the drift, and the next event detect it anew.
            Ok(result) if result.metadata.resource_version != live.metadata.resource_version => Verdict::Unknown,
            Ok(result) => {
                let (live, result) = (comparable(live), comparable(&result));
                if live == result {
                    Verdict::InLine
                } else {
                    Verdict::Drifted(Finding { fields: differing_paths(&live, &result), by })
                }
            }
            Err(e) => {
                tracing::warn!(object = %planned.id, error = %e, "drift check: dry run failed");
                Verdict::Unknown
            }
        }
    }

    async fn drifted(self: &Arc<Self>, planned: &Planned, live: Option<&DynamicObject>, finding: Finding) {
        let id = &planned.id;
        let newly = !self.drifted.lock().unwrap().contains_key(id);
        if newly {
            self.state.metrics.drift_detected(&id.kind);
            tracing::warn!(object = %id, fields = ?finding.fields, changed_by = ?finding.by, policy = ?self.policy, "drift");
        }
        let contested = self.contested(id);
        if self.policy_of(&planned.object) == Policy::Correct && !contested {
            match self.applier.correct(planned, live).await {
                Ok(change) => {
                    self.state.metrics.drift_corrected(&id.kind);
                    let object = live.unwrap_or(&planned.object).object_ref(&planned.resource);
                    self.state.events().drift_corrected(object, &planned.origin, &finding.fields);
                    tracing::info!(object = %id, action = ?change.action, "drift corrected from git");
                    self.record_settled(id, change.fingerprint);
                    self.corrected(id);
                    return self.settle(id);
                }
                Err(e) => tracing::error!(object = %id, error = %e, "drift correction failed"),
            }
        }
        let entry = DriftedObject {
            kind: id.kind.clone(),
            namespace: (!id.namespace.is_empty()).then(|| id.namespace.clone()),
            name: id.name.clone(),
            fields: finding.fields,
            contested,
        };
        self.drifted.lock().unwrap().insert(id.clone(), entry);
        self.publish();
    }

    /// Whether `live` is the state last found to hold git, and this replica may say so
    /// (one that may not write neither corrects nor settles).
    fn is_settled(&self, id: &ObjectId, fingerprint: u64) -> bool {
        let settled = self.desired.lock().unwrap().get(id).and_then(|tracked| tracked.settled);
        settled == Some(fingerprint) && self.applier.writer().may_write()
    }

    fn tracks(&self, id: &ObjectId) -> bool {
        self.desired.lock().unwrap().contains_key(id)
    }

    /// `fingerprint`'s state holds git.
    fn record_settled(&self, id: &ObjectId, fingerprint: Option<u64>) {
        if let Some(tracked) = self.desired.lock().unwrap().get_mut(id) {
            tracked.settled = fingerprint;
        }
    }

    /// What to do about `desired`'s drift: `--drift`, unless git's annotation says
    /// `report`. Only git's: an annotation anyone may add live must not stop corrections.
    fn policy_of(&self, desired: &DynamicObject) -> Policy {
        if drift_annotation(desired) == Some("report") { Policy::Report } else { self.policy }
    }

    /// Whether corrections of `id` pause because it is contested.
    fn contested(&self, id: &ObjectId) -> bool {
        let contests = self.contests.lock().unwrap();
        contests.get(id).and_then(|c| c.paused_until).is_some_and(|until| Instant::now() < until)
    }

    /// Counts a correction of `id`; past [`CONTEST_CORRECTIONS`] in [`CONTEST_WINDOW`]
    /// corrections pause, and the object is looked at again when the pause ends.
    fn corrected(self: &Arc<Self>, id: &ObjectId) {
        let now = Instant::now();
        let pause = {
            let mut contests = self.contests.lock().unwrap();
            let contest = contests.entry(id.clone()).or_default();
            contest.corrected.push_back(now);
            while contest.corrected.front().is_some_and(|&at| now.duration_since(at) > CONTEST_WINDOW) {
                contest.corrected.pop_front();
            }
            if contest.corrected.len() <= CONTEST_CORRECTIONS {
                return;
            }
            let pause = contest.pause.max(CONTEST_PAUSE);
            contest.pause = (pause * 2).min(MAX_CONTEST_PAUSE);
            contest.paused_until = Some(now + pause);
            contest.corrected.clear();
            pause
        };
        self.state.metrics.drift_contested(&id.kind);
        tracing::warn!(object = %id, corrections = CONTEST_CORRECTIONS + 1, within = ?CONTEST_WINDOW, ?pause,
            "contested: something else keeps changing this object back; not correcting it for a while");
        let (shared, id) = (self.clone(), id.clone());
        tokio::spawn(async move {
            tokio::time::sleep(pause).await;
            let Some(resource) = shared.desired.lock().unwrap().get(&id).map(|t| t.resource.clone()) else { return };
            let namespace = Some(id.namespace.as_str()).filter(|ns| !ns.is_empty());
            match access::api(&shared.client, &resource, namespace).get_opt(&id.name).await {
                Ok(live) => shared.see(id, Sighting::of(live)).await,
                Err(e) => tracing::warn!(object = %id, error = %e, "drift check after a contest: cannot read"),
            }
        });
    }

    /// The object agrees with git (again).
    fn settle(&self, id: &ObjectId) {
        self.unchecked.lock().unwrap().remove(id);
        if self.drifted.lock().unwrap().remove(id).is_some() {
            tracing::info!(object = %id, "no longer drifted");
            self.publish();
        }
    }

    fn publish(&self) {
        let drifted: Vec<DriftedObject> = self.drifted.lock().unwrap().values().cloned().collect();
        self.state.set_drifted(drifted);
    }
}

/// What a check of one object found.
enum Verdict {
    /// The cluster holds what git says.
    InLine,
    Drifted(Finding),
    /// The check could not tell: the object changed again meanwhile, or the dry run failed.
    Unknown,
}

/// What a confirmed drift is: the differing field paths and who wrote last.
struct Finding {
    fields: Vec<String>,
    by: Vec<String>,
}

fn ignored(object: &DynamicObject) -> bool {
    drift_annotation(object) == Some("ignore")
}

fn drift_annotation(object: &DynamicObject) -> Option<&str> {
    object.metadata.annotations.as_ref().and_then(|a| a.get(DRIFT_ANNOTATION)).map(String::as_str)
}

/// Whether the live object may differ from git: a value git sets differs as written,
/// or a manager other than the agent wrote after it (outside the status subresource).
fn suspicious(desired: &DynamicObject, live: &DynamicObject) -> bool {
    let mut desired = serde_json::to_value(desired).unwrap_or_default();
    // Objects from a list carry no apiVersion and kind; the watch knows them anyway.
    if let Some(fields) = desired.as_object_mut() {
        fields.remove("apiVersion");
        fields.remove("kind");
    }
    let live_value = serde_json::to_value(live).unwrap_or_default();
    if !contains(&live_value, &desired) {
        return true;
    }
    let fields = live.metadata.managed_fields.as_deref().unwrap_or_default();
    let ours = fields
        .iter()
        .filter(|f| f.manager.as_deref() == Some(crate::FIELD_MANAGER))
        .filter_map(|f| f.time.as_ref())
        .max();
    fields.iter().any(|f| {
        f.manager.as_deref() != Some(crate::FIELD_MANAGER)
            && f.subresource.as_deref() != Some("status")
            && f.time.as_ref().zip(ours).is_some_and(|(theirs, ours)| theirs.0 > ours.0)
    })
}

/// Whether every value set in `wanted` is in `actual` (lists compared whole).
fn contains(actual: &serde_json::Value, wanted: &serde_json::Value) -> bool {
    match (actual, wanted) {
        (serde_json::Value::Object(actual), serde_json::Value::Object(wanted)) => {
            wanted.iter().all(|(k, w)| actual.get(k).is_some_and(|a| contains(a, w)))
        }
        (actual, wanted) => actual == wanted,
    }
}

/// The dotted paths where two objects differ, for `/status` (managedFields left out).
fn differing_paths(live: &serde_json::Value, desired: &serde_json::Value) -> Vec<String> {
    fn walk(path: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
        match (a, b) {
            (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
                let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
                for key in keys {
                    let null = serde_json::Value::Null;
                    let child = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
                    if child == "metadata.managedFields" {
                        continue;
                    }
                    walk(&child, a.get(key.as_str()).unwrap_or(&null), b.get(key.as_str()).unwrap_or(&null), out);
                }
            }
            (a, b) if a != b => out.push(path.to_owned()),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk("", live, desired, &mut out);
    if out.is_empty() {
        // Only field ownership differs.
        out.push("metadata.managedFields".to_owned());
    }
    out
}

/// Managers other than the agent that wrote the object, newest first, for the log line
/// that says who changed what.
fn other_writers(live: &DynamicObject) -> Vec<String> {
    let mut fields: Vec<_> = live
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|f| f.manager.as_deref() != Some(crate::FIELD_MANAGER))
        .collect();
    fields.sort_by(|a, b| b.time.as_ref().map(|t| t.0).cmp(&a.time.as_ref().map(|t| t.0)));
    fields.into_iter().filter_map(|f| f.manager.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn containment_compares_what_git_sets_only() {
        let live = json!({ "metadata": { "name": "a", "uid": "x" }, "spec": { "replicas": 3, "paused": false } });
        assert!(contains(&live, &json!({ "metadata": { "name": "a" }, "spec": { "replicas": 3 } })));
        assert!(!contains(&live, &json!({ "spec": { "replicas": 2 } })));
        assert!(!contains(&live, &json!({ "spec": { "minReadySeconds": 5 } })));
    }

    #[test]
    fn differing_paths_name_the_leaves() {
        let live = json!({ "data": { "a": "1", "b": "2" }, "metadata": { "labels": { "x": "y" } } });
        let git = json!({ "data": { "a": "1", "b": "3" }, "metadata": {} });
        assert_eq!(differing_paths(&live, &git), vec!["data.b", "metadata.labels"]);
    }
}
