//! Server-side apply of planned objects, and the one vocabulary of outcomes that logs,
//! `/status`, metrics and the inventory all read: [`Action`], collected in a
//! [`ChangeSet`].
//!
//! Each verb works on a whole stage of objects at once, with bounded concurrency, and
//! returns either every outcome or every failure (so a user sees all rejected objects
//! of a revision at once, each with its `file:line`):
//! - [`Applier::dry_run`]: what the API server would make of each object (admission,
//!   defaulting, validation, field ownership), without writing anything; the live
//!   objects it compares with are listed per kind and namespace when there are many;
//! - [`Applier::apply`]: writes the objects whose dry run differs from the live object,
//!   and nothing else, so an unchanged revision makes no write request;
//! - [`Applier::delete`] prunes;
//! - [`Applier::correct`] re-applies one object that drifted from git;
//! - [`Applier::wait_established`]: waits until new CRDs serve their kinds.
//!
//! Its writes go through the [`Writer`], so a replica that does not lead writes nothing.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, stream};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PropagationPolicy};
use sha2::Digest;

use crate::object::ObjectId;
use crate::write::{WriteError, Writer};

/// Requests in flight at once per stage: enough to keep the API server busy, few
/// enough not to trip its priority-and-fairness limits for one client.
pub const CONCURRENCY: usize = 16;

/// From this many objects of one kind in one namespace on, their live state is read
/// with one list instead of one read each: a cold or unchanged revision of thousands of
/// objects then costs a handful of lists, while one Secret in a crowded namespace does
/// not pull all its neighbours.
const LIST_FROM: usize = 16;

/// How long new CRDs get to become Established before the revision fails.
const ESTABLISH_TIMEOUT: Duration = Duration::from_secs(60);

/// What happened to one object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Created,
    Configured,
    Unchanged,
    Deleted,
}

/// One object's outcome.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Change {
    #[serde(serialize_with = "display")]
    pub id: ObjectId,
    pub action: Action,
    /// `file:line` of the object in the repository (`inventory` for a pruned one).
    pub origin: String,
    /// The [`fingerprint`] of the object as the API server holds it now, when the
    /// change saw it (not for deleted objects, nor for ones vouched for unseen): the
    /// drift watch takes an event showing this state as in line without a request.
    #[serde(skip)]
    pub fingerprint: Option<u64>,
    /// `metadata.generation` of that state: the health watch takes a status as this
    /// revision's only once it is about this generation or a later one.
    #[serde(skip)]
    pub generation: Option<i64>,
    /// The object's uid, when the change wrote or deleted it: its events carry it, as
    /// `kubectl describe` finds an object's events by uid.
    #[serde(skip)]
    pub uid: Option<String>,
}

fn display<S: serde::Serializer>(id: &ObjectId, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(id)
}

/// Every outcome of one revision, in the order they happened.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ChangeSet {
    pub changes: Vec<Change>,
}

impl ChangeSet {
    pub fn extend(&mut self, changes: impl IntoIterator<Item = Change>) {
        self.changes.extend(changes);
    }

    /// How many objects got each action.
    pub fn counts(&self) -> BTreeMap<Action, usize> {
        let mut counts = BTreeMap::new();
        for change in &self.changes {
            *counts.entry(change.action).or_default() += 1;
        }
        counts
    }

    /// Whether the revision wrote anything.
    pub fn wrote(&self) -> bool {
        self.changes.iter().any(|c| c.action != Action::Unchanged)
    }
}

impl fmt::Display for ChangeSet {
    /// `2 created, 1 configured, 10 unchanged, 1 deleted`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let counts = self.counts();
        if counts.is_empty() {
            return f.write_str("no objects");
        }
        let parts: Vec<String> = counts.iter().map(|(action, n)| format!("{n} {action:?}").to_lowercase()).collect();
        f.write_str(&parts.join(", "))
    }
}

/// An object ready to apply: its identity, API, desired state and where it came from.
#[derive(Debug, Clone)]
pub struct Planned {
    pub id: ObjectId,
    pub resource: ApiResource,
    pub object: DynamicObject,
    /// `file:line` in the repository.
    pub origin: String,
    /// The manifest's [`crate::render::Manifest::source`], which with `id` and
    /// `resource` determines `object`; `None` for an object only named (to prune).
    pub source: Option<Arc<str>>,
}

/// A failed request for one object; displayed as `file:line: Kind ns/name: message`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{origin}: {id}: {message}")]
pub struct ApplyError {
    pub origin: String,
    pub id: ObjectId,
    pub message: String,
    /// The API server answered 404: the object's namespace or kind does not exist (yet).
    pub not_found: bool,
}

impl ApplyError {
    /// Reading `object` failed.
    pub fn read(object: &Planned, error: kube::Error) -> ApplyError {
        ApplyError::new(object, "read", error)
    }

    fn new(object: &Planned, action: &str, error: impl Into<WriteError>) -> ApplyError {
        let error = error.into();
        let not_found = error.is_status(404);
        let message = match error {
            // The API server's own message is what a user can act on.
            WriteError::Api(kube::Error::Api(status)) => format!("{action} rejected: {}", status.message),
            other => format!("{action} failed: {other}"),
        };
        ApplyError { origin: object.origin.clone(), id: object.id.clone(), message, not_found }
    }
}

/// What the dry run of one object says.
#[derive(Debug, Clone)]
pub struct Preview {
    /// The object as it is now, if it exists.
    pub live: Option<DynamicObject>,
    /// The object as the API server would store it.
    pub result: DynamicObject,
}

impl Preview {
    /// The action applying the object would be.
    pub fn action(&self) -> Action {
        match &self.live {
            None => Action::Created,
            Some(live) if comparable(live) == comparable(&self.result) => Action::Unchanged,
            Some(_) => Action::Configured,
        }
    }
}

/// What a sync keeps of one object's dry run: the action applying it would be, and
/// the live state's fingerprint and generation (for the drift and health watches),
/// not the objects, so a cold sync of thousands holds no copy of each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub action: Action,
    pub fingerprint: Option<u64>,
    pub generation: Option<i64>,
}

/// What a dry run is compared with: a digest of the live object's [`comparable`]
/// state, with its fingerprint and generation.
#[derive(Debug, Clone, Copy)]
struct Live {
    digest: [u8; 32],
    fingerprint: u64,
    generation: Option<i64>,
}

impl Live {
    fn of(object: &DynamicObject) -> Live {
        let value = comparable(object);
        let digest = sha2::Sha256::digest(serde_json::to_vec(&value).unwrap_or_default()).into();
        Live { digest, fingerprint: fingerprint_of(value), generation: object.metadata.generation }
    }

    /// The verdict on a dry run's `result` against this live state (`None`: there is none).
    fn verdict(live: Option<Live>, result: &DynamicObject) -> Verdict {
        let Some(live) = live else {
            return Verdict { action: Action::Created, fingerprint: None, generation: None };
        };
        let digest: [u8; 32] = sha2::Sha256::digest(serde_json::to_vec(&comparable(result)).unwrap_or_default()).into();
        let action = if digest == live.digest { Action::Unchanged } else { Action::Configured };
        Verdict { action, fingerprint: Some(live.fingerprint), generation: live.generation }
    }
}

/// An object as far as git is concerned: without what the API server changes on every
/// write or dry run (resourceVersion, generation, the timestamps of field ownership),
/// without its status (which no one applies from git), and without apiVersion and kind
/// (objects from a list or watch carry none).
pub fn comparable(object: &DynamicObject) -> serde_json::Value {
    let mut value = serde_json::to_value(object).unwrap_or_default();
    if let Some(fields) = value.as_object_mut() {
        for volatile in ["apiVersion", "kind", "status"] {
            fields.remove(volatile);
        }
    }
    if let Some(meta) = value.get_mut("metadata").and_then(|m| m.as_object_mut()) {
        meta.remove("resourceVersion");
        meta.remove("generation");
        if let Some(fields) = meta.get_mut("managedFields").and_then(|m| m.as_array_mut()) {
            for entry in fields.iter_mut().filter_map(|e| e.as_object_mut()) {
                entry.remove("time");
            }
        }
    }
    value
}

/// What identifies an object's state as far as drift goes: [`comparable`], without the
/// field ownership of its status (written by controllers as status changes, which no
/// one applies from git). Two states with the same fingerprint hold the same values
/// and owners of everything git can set.
pub fn fingerprint(object: &DynamicObject) -> u64 {
    fingerprint_of(comparable(object))
}

/// [`fingerprint`] of an object's [`comparable`] value.
fn fingerprint_of(mut value: serde_json::Value) -> u64 {
    use std::hash::{Hash, Hasher};
    if let Some(fields) = value.pointer_mut("/metadata/managedFields").and_then(|m| m.as_array_mut()) {
        fields.retain(|entry| entry.get("subresource").and_then(|s| s.as_str()) != Some("status"));
    }
    let mut hasher = std::hash::DefaultHasher::new();
    serde_json::to_vec(&value).unwrap_or_default().hash(&mut hasher);
    hasher.finish()
}

/// Server-side apply as one field manager.
#[derive(Clone)]
pub struct Applier {
    writer: Writer,
    field_manager: String,
    /// Take ownership of fields another manager set (`--force-conflicts`).
    force: bool,
}

impl Applier {
    pub fn new(writer: Writer, field_manager: &str, force: bool) -> Applier {
        Applier { writer, field_manager: field_manager.to_owned(), force }
    }

    pub fn writer(&self) -> &Writer {
        &self.writer
    }

    pub fn api(&self, object: &Planned) -> Api<DynamicObject> {
        let client = self.writer.client().clone();
        match object.object.metadata.namespace.as_deref() {
            Some(ns) => Api::namespaced_with(client, ns, &object.resource),
            None => Api::all_with(client, &object.resource),
        }
    }

    fn params(&self) -> PatchParams {
        let params = PatchParams::apply(&self.field_manager);
        if self.force { params.force() } else { params }
    }

    /// Reads each object and dry-runs its apply; keeps only each [`Verdict`]. Fails
    /// with every rejection when any object is rejected; nothing is written either way.
    pub async fn dry_run(&self, objects: &[&Planned]) -> Result<Vec<Verdict>, Vec<ApplyError>> {
        let keep = |live: DynamicObject| Live::of(&live);
        let mut listed = self.list_live(objects, keep).await;
        // Built in a loop, not a closure: a closure here makes the future not Send
        // (rust-lang/rust#102211), and the sync loop runs on a multi-threaded runtime.
        let mut requests = Vec::with_capacity(objects.len());
        for object in objects {
            let dry_run = self.dry_run_one(object, listed.remove(&object.id), keep);
            requests.push(async move { dry_run.await.map(|(live, result)| Live::verdict(live, &result)) });
        }
        split(concurrently(requests).await)
    }

    /// Each object's dry run on its own, with the objects, for `diff`, which shows what it can.
    pub async fn previews(&self, objects: &[&Planned]) -> Vec<Result<Preview, ApplyError>> {
        let keep = |live: DynamicObject| live;
        let mut listed = self.list_live(objects, keep).await;
        let mut requests = Vec::with_capacity(objects.len());
        for object in objects {
            let dry_run = self.dry_run_one(object, listed.remove(&object.id), keep);
            requests.push(async move { dry_run.await.map(|(live, result)| Preview { live, result }) });
        }
        concurrently(requests).await
    }

    /// What `keep` takes of the live state of the objects that come [`LIST_FROM`] or
    /// more of a kind to a namespace, by one paged list per kind and namespace, page by
    /// page: `Ok(None)` for one that does not exist. The others are left out, to be read
    /// one by one.
    async fn list_live<T>(
        &self,
        objects: &[&Planned],
        keep: impl Fn(DynamicObject) -> T,
    ) -> HashMap<ObjectId, Result<Option<T>, ApplyError>> {
        let mut groups: BTreeMap<(&str, &str, &str, Option<&str>), Vec<&Planned>> = BTreeMap::new();
        for &object in objects {
            let r = &object.resource;
            let key =
                (r.group.as_str(), r.version.as_str(), r.kind.as_str(), object.object.metadata.namespace.as_deref());
            groups.entry(key).or_default().push(object);
        }
        let mut live = HashMap::new();
        for members in groups.into_values().filter(|members| members.len() >= LIST_FROM) {
            match self.list(members[0], &keep).await {
                Ok(mut listed) => {
                    live.extend(members.iter().map(|m| (m.id.clone(), Ok(listed.remove(&m.id.name)))));
                }
                Err(e) => {
                    let error = ApplyError::new(members[0], "list", e);
                    live.extend(members.iter().map(|m| {
                        (m.id.clone(), Err(ApplyError { origin: m.origin.clone(), id: m.id.clone(), ..error.clone() }))
                    }));
                }
            }
        }
        live
    }

    /// What `keep` takes of every object of `like`'s kind in its namespace, by name.
    async fn list<T>(
        &self,
        like: &Planned,
        keep: impl Fn(DynamicObject) -> T,
    ) -> Result<HashMap<String, T>, kube::Error> {
        let api = self.api(like);
        let mut objects = HashMap::new();
        let mut params = ListParams::default().limit(500);
        loop {
            let page = api.list(&params).await?;
            objects.extend(page.items.into_iter().filter_map(|o| Some((o.metadata.name.clone()?, keep(o)))));
            match page.metadata.continue_.filter(|token| !token.is_empty()) {
                Some(token) => params = params.continue_token(&token),
                None => return Ok(objects),
            }
        }
    }

    /// Applies the objects whose dry run differs from the live object. No verdict: the
    /// caller knows the object is in line, unchanged without a request.
    pub async fn apply(
        &self,
        objects: &[Planned],
        verdicts: &[Option<Verdict>],
    ) -> Result<Vec<Change>, Vec<ApplyError>> {
        let mut requests = Vec::with_capacity(objects.len());
        for (object, verdict) in objects.iter().zip(verdicts) {
            requests.push(self.apply_one(object, *verdict));
        }
        all(requests).await
    }

    /// Deletes the objects (in the background: their dependents go through garbage
    /// collection), except those annotated `gitops.scale.dev/prune: disabled`. One that
    /// is already gone counts as deleted.
    pub async fn delete(&self, objects: &[Planned]) -> Result<Vec<Change>, Vec<ApplyError>> {
        let mut requests = Vec::with_capacity(objects.len());
        for object in objects {
            requests.push(self.delete_one(object));
        }
        let deleted = all(requests).await?;
        Ok(deleted.into_iter().flatten().collect())
    }

    /// Reads the object, unless [`Self::list_live`] did (`listed`), and dry-runs its
    /// apply: what `keep` takes of the live object (`None` if there is none), and the
    /// object as the API server would store it.
    async fn dry_run_one<T>(
        &self,
        object: &Planned,
        listed: Option<Result<Option<T>, ApplyError>>,
        keep: impl Fn(DynamicObject) -> T,
    ) -> Result<(Option<T>, DynamicObject), ApplyError> {
        let api = self.api(object);
        let name = &object.id.name;
        let live = match listed {
            Some(listed) => listed?,
            None => api.get_opt(name).await.map_err(|e| ApplyError::new(object, "read", e))?.map(keep),
        };
        let result = api
            .patch(name, &self.params().dry_run(), &Patch::Apply(&object.object))
            .await
            .map_err(|e| ApplyError::new(object, "dry-run apply", e))?;
        Ok((live, result))
    }

    /// Re-applies an object the drift watch found changed (`live`) or deleted (`None`)
    /// out of band.
    pub async fn correct(&self, object: &Planned, live: Option<&DynamicObject>) -> Result<Change, ApplyError> {
        let stored = self.write(object).await?;
        let action = if live.is_some() { Action::Configured } else { Action::Created };
        Ok(Change {
            id: object.id.clone(),
            action,
            origin: object.origin.clone(),
            fingerprint: Some(fingerprint(&stored)),
            generation: stored.metadata.generation,
            uid: stored.metadata.uid,
        })
    }

    async fn apply_one(&self, object: &Planned, verdict: Option<Verdict>) -> Result<Change, ApplyError> {
        let action = verdict.map_or(Action::Unchanged, |v| v.action);
        let (fingerprint, generation, uid) = match verdict {
            Some(_) if action != Action::Unchanged => {
                let stored = self.write(object).await?;
                (Some(fingerprint(&stored)), stored.metadata.generation, stored.metadata.uid)
            }
            Some(verdict) => (verdict.fingerprint, verdict.generation, None),
            None => (None, None, None),
        };
        Ok(Change { id: object.id.clone(), action, origin: object.origin.clone(), fingerprint, generation, uid })
    }

    /// Applies `object`; returns it as the API server stored it.
    async fn write(&self, object: &Planned) -> Result<DynamicObject, ApplyError> {
        let patch = Patch::Apply(&object.object);
        self.writer
            .patch(&self.api(object), &object.id.name, &self.params(), &patch)
            .await
            .map_err(|e| ApplyError::new(object, "apply", e))
    }

    async fn delete_one(&self, object: &Planned) -> Result<Option<Change>, ApplyError> {
        let api = self.api(object);
        let live = api.get_opt(&object.id.name).await.map_err(|e| ApplyError::new(object, "read", e))?;
        let Some(live) = live else {
            return Ok(Some(Change {
                id: object.id.clone(),
                action: Action::Deleted,
                origin: object.origin.clone(),
                fingerprint: None,
                generation: None,
                uid: None,
            }));
        };
        if keeps(&live) {
            tracing::info!(object = %object.id, "not pruned: annotated {}: disabled", crate::PRUNE_ANNOTATION);
            return Ok(None);
        }
        let params = DeleteParams { propagation_policy: Some(PropagationPolicy::Background), ..Default::default() };
        self.writer.delete(&api, &object.id.name, &params).await.map_err(|e| ApplyError::new(object, "delete", e))?;
        Ok(Some(Change {
            id: object.id.clone(),
            action: Action::Deleted,
            origin: object.origin.clone(),
            fingerprint: None,
            generation: None,
            uid: live.metadata.uid,
        }))
    }

    /// Waits until every named CRD is Established, so objects of its kinds can be
    /// dry-run and applied.
    pub async fn wait_established(&self, crds: &[Planned]) -> Result<(), Vec<ApplyError>> {
        let api: Api<CustomResourceDefinition> = Api::all(self.writer.client().clone());
        let deadline = tokio::time::Instant::now() + ESTABLISH_TIMEOUT;
        for crd in crds {
            loop {
                let established = api
                    .get_opt(&crd.id.name)
                    .await
                    .map_err(|e| vec![ApplyError::new(crd, "read", e)])?
                    .and_then(|c| c.status?.conditions)
                    .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Established" && c.status == "True"));
                if established {
                    break;
                }
                if tokio::time::Instant::now() > deadline {
                    return Err(vec![ApplyError {
                        origin: crd.origin.clone(),
                        id: crd.id.clone(),
                        message: format!("not Established after {ESTABLISH_TIMEOUT:?}"),
                        not_found: false,
                    }]);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }
}

/// Whether `live` is annotated `gitops.scale.dev/prune: disabled`, never to be pruned.
pub fn keeps(live: &DynamicObject) -> bool {
    live.metadata.annotations.as_ref().and_then(|a| a.get(crate::PRUNE_ANNOTATION)).is_some_and(|v| v == "disabled")
}

/// Runs the requests concurrently; all results, or all errors if there is any.
async fn all<T>(requests: Vec<impl Future<Output = Result<T, ApplyError>>>) -> Result<Vec<T>, Vec<ApplyError>> {
    split(concurrently(requests).await)
}

/// Runs the requests, `CONCURRENCY` at a time, keeping their order.
async fn concurrently<T>(requests: Vec<impl Future<Output = T>>) -> Vec<T> {
    stream::iter(requests).buffered(CONCURRENCY).collect().await
}

/// All values, or all errors if there is any.
fn split<T>(results: Vec<Result<T, ApplyError>>) -> Result<Vec<T>, Vec<ApplyError>> {
    let (mut ok, mut errors) = (Vec::new(), Vec::new());
    for result in results {
        match result {
            Ok(value) => ok.push(value),
            Err(error) => errors.push(error),
        }
    }
    if errors.is_empty() { Ok(ok) } else { Err(errors) }
}
