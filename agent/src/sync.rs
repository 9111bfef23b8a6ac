//! One revision, end to end: render → plan → dry run → staged apply → prune →
//! inventory. Batch runs come after, from the job specs it returns. The loop in [`crate::reconcile`] calls [`Syncer::sync`] for each new commit.
//!
//! A revision is applied all or nothing at the validation level: it is rendered and
//! dry-run in full before anything of it is written, so a broken file or an object the
//! API server rejects leaves the cluster at the last good revision, and nothing is
//! pruned. The one exception, as in Flux: CRDs and Namespaces the revision adds are
//! applied before the rest is dry-run, since objects of a kind or in a namespace that
//! does not exist yet cannot be.
//!
//! Sync waves ([`plan::WAVE_ANNOTATION`]) are applied in ascending order, each only once
//! the waves before it are healthy ([`WaveGate`]); the dry run still covers the whole
//! revision first. A wave that fails stops the sync there: later waves are not
//! applied and nothing is pruned.

use std::path::Path;
use std::time::Instant;

use futures::future::BoxFuture;

use crate::access::Access;
use crate::apply::{Action, Applier, ApplyError, ChangeSet, Planned, Verdict};
use crate::discovery::Kinds;
pub use crate::discovery::capabilities;
use crate::inventory::{Inventory, InventoryError, Store};
use crate::object::ObjectId;
use crate::plan::{self, Plan};
use crate::render::{self, JobSpec, Problem, RenderError, Renderer};
use crate::stages::{Stage, StageTimes};
use crate::status::UnhealthyObject;
use crate::validate;
use crate::write::Writer;

/// A file at the root of `--path` that allows a revision with no objects to prune
/// everything the agent applied; without it an empty revision is refused, because it
/// far more often means a wrong `--path` or a broken checkout than a wish to delete all.
pub const ALLOW_EMPTY_FILE: &str = ".gitops-allow-empty";

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("{}", lines(.0))]
    Render(Vec<RenderError>),
    #[error("discovering the API server's kinds: {0}")]
    Discovery(kube::Error),
    #[error("the API server rejected the revision, nothing was applied:\n{}", lines(.0))]
    Rejected(Vec<ApplyError>),
    #[error("applying the revision failed:\n{}", lines(.0))]
    Apply(Vec<ApplyError>),
    #[error("pruning failed:\n{}", lines(.0))]
    Prune(Vec<ApplyError>),
    #[error(transparent)]
    Inventory(#[from] InventoryError),
    #[error(
        "the revision has no objects; refusing to prune the {0} objects the agent applied \
         (add {ALLOW_EMPTY_FILE} next to manifests/ to allow it)"
    )]
    EmptyRevision(usize),
    #[error(
        "wave {wave} did not become healthy; later waves were not applied and nothing was pruned:\n{}",
        lines(.unhealthy)
    )]
    Wave { wave: i32, unhealthy: Vec<UnhealthyObject> },
    #[error(
        "the revision has {0} sync waves ({annotation}), which only the agent's sync loop \
         applies: it waits for each wave to be healthy",
        annotation = plan::WAVE_ANNOTATION
    )]
    WavesNeedHealth(usize),
}

/// Waits, between two sync waves, until the waves applied so far are healthy.
pub trait WaveGate: Sync {
    /// `Err`: the unhealthy objects, once one of them failed or timed out.
    fn healthy<'a>(&'a self, wave: AppliedWave<'a>) -> BoxFuture<'a, Result<(), Vec<UnhealthyObject>>>;
}

/// A wave just applied, whose next wave waits for it.
pub struct AppliedWave<'a> {
    pub number: i32,
    /// The revision's objects applied so far: this wave's and all before.
    pub applied: &'a [Planned],
    /// The later waves' objects, not applied yet.
    pub later: &'a [Planned],
    /// What the sync did so far.
    pub changes: &'a ChangeSet,
}

fn lines<E: std::fmt::Display>(errors: &[E]) -> String {
    errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n")
}

/// How revisions are applied.
#[derive(Debug, Clone)]
pub struct Options {
    /// Namespace for namespaced objects that name none (`--default-namespace`).
    pub default_namespace: String,
    /// Delete objects removed from git (`--prune`).
    pub prune: bool,
    /// Take fields another manager owns instead of failing (`--force-conflicts`).
    pub force_conflicts: bool,
    /// Where the inventory ConfigMap lives: the agent's own namespace.
    pub inventory_namespace: String,
    /// Where dashboards' ConfigMaps go (`--dashboards-namespace`).
    pub dashboards_namespace: String,
    /// What the agent may touch (`--allow-namespaces`).
    pub access: Access,
}

/// Applies revisions to one cluster.
pub struct Syncer {
    /// The API server's kinds, between syncs.
    kinds: Kinds,
    applier: Applier,
    store: Store,
    options: Options,
    renderer: Renderer,
}

impl Syncer {
    pub fn new(writer: Writer, options: Options) -> Syncer {
        let store = Store::new(writer.clone(), &options.inventory_namespace);
        Syncer::with_store(writer, options, store)
    }

    /// A syncer keeping its inventory in ConfigMap `inventory` (in the inventory
    /// namespace) instead of the agent's: gitops-bootstrap installs the agent this way,
    /// so the agent's own sync of the user's repository never prunes itself.
    pub fn with_inventory(writer: Writer, options: Options, inventory: &str) -> Syncer {
        let store = Store::named(writer.clone(), &options.inventory_namespace, inventory);
        Syncer::with_store(writer, options, store)
    }

    fn with_store(writer: Writer, options: Options, store: Store) -> Syncer {
        Syncer {
            kinds: Kinds::new(writer.client().clone()),
            applier: Applier::new(writer, crate::FIELD_MANAGER, options.force_conflicts),
            store,
            options,
            renderer: Renderer::new(render::Tools::default()),
        }
    }

    /// This syncer, rendering with `tools` (kustomize, helm and their settings).
    pub fn with_tools(self, tools: render::Tools) -> Syncer {
        Syncer { renderer: Renderer::new(tools), ..self }
    }

    /// What rendered so far and what came from the render cache.
    pub fn render_stats(&self) -> render::StatsHandle {
        self.renderer.stats_handle()
    }

    /// The applier this syncer writes with, for the drift watch's corrections.
    pub fn applier(&self) -> &Applier {
        &self.applier
    }

    /// Applies the tree checked out at `root` (the directory holding `manifests/`) as
    /// commit `revision`, and returns what changed.
    /// Without a [`WaveGate`], a revision with several waves is refused.
    pub async fn sync(&self, root: &Path, revision: &str) -> Result<Synced, SyncError> {
        self.sync_in_line(root, revision, None, &|_| false, None).await
    }

    /// [`Self::sync`], taking the objects `in_line` vouches for (unchanged in git and
    /// live since the last sync: [`crate::drift::DriftWatch::in_line`]) as unchanged
    /// without a request, so a commit that changes one object costs one dry run and
    /// one apply, whatever the size of the revision. `edits`: what changed in the tree
    /// since the revision synced before, so that only those files are read. `gate`
    /// holds each sync wave until the ones before it are healthy.
    pub async fn sync_in_line(
        &self,
        root: &Path,
        revision: &str,
        edits: Option<render::Edits<'_>>,
        in_line: &(dyn Fn(&Planned) -> bool + Sync),
        gate: Option<&dyn WaveGate>,
    ) -> Result<Synced, SyncError> {
        let mut stages = StageTimes::default();
        let (plan, mut inventory, jobs) = self.plan(root, Some(revision), edits, &mut stages).await?;
        refuse_empty(&plan, &inventory, root)?;
        let waves = plan.waves();
        if gate.is_none() && waves.len() > 1 {
            return Err(SyncError::WavesNeedHealth(waves.len()));
        }

        let mut changes = ChangeSet::default();
        let definitions = self.dry_run(root, &plan.definitions, in_line, &mut stages).await?;
        let planned = plan::new_entries(&plan.definitions, |i| exists(&definitions[i]), &inventory);
        self.begin(&mut inventory, &planned, &mut stages).await?;
        let started = Instant::now();
        changes.extend(self.applier.apply(&plan.definitions, &definitions).await.map_err(SyncError::Apply)?);
        self.applier.wait_established(&plan.crds()).await.map_err(SyncError::Apply)?;
        stages.since(Stage::Apply, started);
        // Roles before the bindings' dry runs, which look them up (see `plan`).
        let roles = self.dry_run(root, &plan.roles, in_line, &mut stages).await?;
        let planned = plan::new_entries(&plan.roles, |i| exists(&roles[i]), &inventory);
        self.begin(&mut inventory, &planned, &mut stages).await?;
        let started = Instant::now();
        changes.extend(self.applier.apply(&plan.roles, &roles).await.map_err(SyncError::Apply)?);
        stages.since(Stage::Apply, started);

        // Everything else is dry-run before any of it is written.
        let rest = || plan.cluster_scoped.iter().chain(&plan.namespaced);
        let verdicts = self.dry_run(root, rest(), in_line, &mut stages).await?;
        let planned = plan::new_entries(rest(), |i| exists(&verdicts[i]), &inventory);
        self.begin(&mut inventory, &planned, &mut stages).await?;
        let (mut cluster_scoped, mut namespaced) = verdicts.split_at(plan.cluster_scoped.len());
        let (mut applied_cluster_scoped, mut applied_namespaced) = (0, 0);
        for (i, wave) in waves.iter().enumerate() {
            let started = Instant::now();
            let (verdicts, rest) = cluster_scoped.split_at(wave.cluster_scoped.len());
            cluster_scoped = rest;
            changes.extend(self.applier.apply(wave.cluster_scoped, verdicts).await.map_err(SyncError::Apply)?);
            let (verdicts, rest) = namespaced.split_at(wave.namespaced.len());
            namespaced = rest;
            changes.extend(self.applier.apply(wave.namespaced, verdicts).await.map_err(SyncError::Apply)?);
            stages.since(Stage::Apply, started);
            applied_cluster_scoped += wave.cluster_scoped.len();
            applied_namespaced += wave.namespaced.len();
            // The wait for a wave's health is no stage: it is the workloads' time, not the agent's.
            let Some(gate) = gate.filter(|_| i + 1 < waves.len()) else { continue };
            let (applied, later) = plan.split_applied(applied_cluster_scoped, applied_namespaced);
            let wave = AppliedWave { number: wave.number, applied: &applied, later: &later, changes: &changes };
            let number = wave.number;
            gate.healthy(wave).await.map_err(|unhealthy| SyncError::Wave { wave: number, unhealthy })?;
        }

        let started = Instant::now();
        let mut owned = plan::entries(plan.objects(), |_| true, &inventory);
        if self.options.prune {
            for stage in &plan.prune {
                changes.extend(self.applier.delete(stage).await.map_err(SyncError::Prune)?);
            }
        } else {
            // Kept while pruning is off, and still owned: a later revision may prune them.
            owned.extend(plan.prune.iter().flatten().map(|p| (p.id.clone(), crate::inventory::Origin::Created)));
        }
        stages.since(Stage::Prune, started);
        let started = Instant::now();
        self.store.commit(&mut inventory, revision, owned).await?;
        stages.since(Stage::Inventory, started);
        if changes.changes.iter().any(|c| c.action != Action::Unchanged && changes_kinds(&c.id)) {
            self.kinds.invalidate();
        }
        Ok(Synced { changes, objects: plan.into_objects(), jobs, stages })
    }

    /// Records the objects a stage will create as pending in the inventory.
    async fn begin(
        &self,
        inventory: &mut Inventory,
        planned: &crate::inventory::Entries,
        stages: &mut StageTimes,
    ) -> Result<(), SyncError> {
        let started = Instant::now();
        self.store.begin(inventory, planned).await?;
        stages.since(Stage::Inventory, started);
        Ok(())
    }

    /// Renders the tree (of `revision`, changed by its edits) and plans it against the
    /// cluster and the stored inventory.
    async fn plan(
        &self,
        root: &Path,
        revision: Option<&str>,
        edits: Option<render::Edits<'_>>,
        stages: &mut StageTimes,
    ) -> Result<(Plan, Inventory, Vec<JobSpec>), SyncError> {
        let started = Instant::now();
        let (mut known, mut fresh) = self.kinds.get().await.map_err(SyncError::Discovery)?;
        stages.since(Stage::Plan, started);
        let options = &self.options;
        let (jobs, inventory, plan) = loop {
            let started = Instant::now();
            let rendered = self
                .renderer
                .render_revision(root, &options.dashboards_namespace, &known.capabilities, revision, edits)
                .map_err(SyncError::Render)?;
            stages.since(Stage::Render, started);
            let started = Instant::now();
            let inventory = self.store.load().await?;
            stages.since(Stage::Inventory, started);
            let started = Instant::now();
            let (manifests, jobs) = (rendered.manifests, rendered.jobs);
            let planned =
                plan::plan(manifests, &known.discovery, &options.default_namespace, &options.access, &inventory);
            stages.since(Stage::Plan, started);
            match planned {
                // A kind the cached discovery lacks may be one installed since: look again, once.
                Err(errors) if !fresh && errors.iter().any(|e| matches!(e.problem, Problem::UnknownKind { .. })) => {
                    let started = Instant::now();
                    known = self.kinds.refresh().await.map_err(SyncError::Discovery)?;
                    fresh = true;
                    stages.since(Stage::Plan, started);
                }
                planned => break (jobs, inventory, planned.map_err(SyncError::Render)?),
            }
        };
        let started = Instant::now();
        // Runs go where their spec says, so the spec is checked like an object.
        let refused: Vec<RenderError> = jobs
            .iter()
            .filter_map(|spec| {
                let namespace = spec.template.namespace().unwrap_or(&options.default_namespace);
                let refusal = options.access.refusal(Some(namespace))?;
                let object = format!("job {} (runs in namespace {namespace})", spec.name());
                Some(RenderError { at: spec.template.location.clone(), problem: Problem::Refused { object, refusal } })
            })
            .collect();
        stages.since(Stage::Plan, started);
        if !refused.is_empty() {
            return Err(SyncError::Render(refused));
        }
        Ok((plan, inventory, jobs))
    }

    /// What [`Self::sync`] would change, without writing anything: every object that
    /// would be created, configured or pruned. Objects in a namespace, or of a kind,
    /// that the revision itself adds cannot be dry-run before it is applied; they are
    /// reported as created.
    pub async fn diff(&self, root: &Path) -> Result<Vec<Difference>, SyncError> {
        let (plan, inventory, _) = self.plan(root, None, None, &mut StageTimes::default()).await?;
        refuse_empty(&plan, &inventory, root)?;
        let objects: Vec<&Planned> = plan.objects().collect();
        let mut differences = Vec::new();
        let mut rejected = Vec::new();
        for (object, preview) in objects.iter().zip(self.applier.previews(&objects).await) {
            let (action, live, desired) = match preview {
                Ok(preview) => (preview.action(), preview.live.as_ref().map(shown), Some(shown(&preview.result))),
                // Only what `sync` creates first (a Namespace, a CRD's kind) may be missing.
                Err(e) if e.not_found && plan.defines_home_of(object) => {
                    (Action::Created, None, Some(shown(&object.object)))
                }
                Err(e) => {
                    rejected.push(e);
                    continue;
                }
            };
            if action != Action::Unchanged {
                differences.push(Difference {
                    id: object.id.clone(),
                    origin: object.origin.clone(),
                    action,
                    live,
                    desired,
                });
            }
        }
        if !rejected.is_empty() {
            return Err(SyncError::Rejected(validate::place_rejections(root, &objects, rejected)));
        }
        if self.options.prune {
            for object in plan.prune.iter().flatten() {
                // As `sync` prunes: what is gone already, or annotated to stay, is left.
                let live = self.applier.api(object).get_opt(&object.id.name).await;
                let live = live.map_err(|e| SyncError::Prune(vec![ApplyError::read(object, e)]))?;
                if live.is_none_or(|live| crate::apply::keeps(&live)) {
                    continue;
                }
                let action = Action::Deleted;
                differences.push(Difference {
                    id: object.id.clone(),
                    origin: object.origin.clone(),
                    action,
                    live: None,
                    desired: None,
                });
            }
        }
        Ok(differences)
    }

    /// Dry-runs the objects `in_line` does not vouch for; `None` for those it does. The
    /// API server's rejections are placed at the line of the field they name.
    async fn dry_run<'a>(
        &self,
        root: &Path,
        objects: impl IntoIterator<Item = &'a Planned>,
        in_line: &(dyn Fn(&Planned) -> bool + Sync),
        stages: &mut StageTimes,
    ) -> Result<Vec<Option<Verdict>>, SyncError> {
        let started = Instant::now();
        let objects: Vec<&Planned> = objects.into_iter().collect();
        let vouched: Vec<bool> = objects.iter().map(|o| in_line(o)).collect();
        let checked: Vec<&Planned> = objects.iter().zip(&vouched).filter(|(_, v)| !**v).map(|(o, _)| *o).collect();
        let placed = |errors| SyncError::Rejected(validate::place_rejections(root, &checked, errors));
        let mut previews = self.applier.dry_run(&checked).await.map_err(placed)?.into_iter();
        stages.since(Stage::DryRun, started);
        Ok(vouched.into_iter().map(|v| if v { None } else { previews.next() }).collect())
    }
}

/// An empty revision prunes everything the agent owns: refused unless the repository
/// says it means it ([`ALLOW_EMPTY_FILE`]).
fn refuse_empty(plan: &Plan, inventory: &Inventory, root: &Path) -> Result<(), SyncError> {
    let owned = inventory.owned().count();
    if plan.objects().next().is_none() && owned > 0 && !root.join(ALLOW_EMPTY_FILE).exists() {
        return Err(SyncError::EmptyRevision(owned));
    }
    Ok(())
}

/// Whether a change to this object changes the kinds the API server serves.
fn changes_kinds(id: &ObjectId) -> bool {
    matches!(
        (id.group.as_str(), id.kind.as_str()),
        ("apiextensions.k8s.io", "CustomResourceDefinition") | ("apiregistration.k8s.io", "APIService")
    )
}

/// Whether an object exists: it does if it is in line (no preview).
fn exists(verdict: &Option<Verdict>) -> bool {
    verdict.is_none_or(|v| v.action != Action::Created)
}

/// What a sync did, the objects the revision holds now (what drift is measured
/// against), and its batch job specs (which [`crate::batch`] makes runs of).
#[derive(Debug)]
pub struct Synced {
    pub changes: ChangeSet,
    pub objects: Vec<Planned>,
    pub jobs: Vec<JobSpec>,
    /// Where the sync's time went (fetch, checkout and status are the loop's).
    pub stages: StageTimes,
}

/// One object `sync` would change.
#[derive(Debug, Clone)]
pub struct Difference {
    pub id: ObjectId,
    /// `file:line`, or `inventory` for an object to prune.
    pub origin: String,
    pub action: Action,
    /// The object now and as it would be, for created and configured objects.
    pub live: Option<serde_json::Value>,
    pub desired: Option<serde_json::Value>,
}

/// An object as a person reads it in a diff: without field-ownership bookkeeping.
fn shown(object: &kube::api::DynamicObject) -> serde_json::Value {
    let mut value = crate::apply::comparable(object);
    if let Some(meta) = value.get_mut("metadata").and_then(|m| m.as_object_mut()) {
        meta.remove("managedFields");
    }
    value
}
