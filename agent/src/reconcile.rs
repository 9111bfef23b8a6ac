//! The continuous loop of `gitops-agent run`: wait for a reason to look at the source,
//! ask the remote for the branch head, and when it moved (or the last attempt failed),
//! fetch it, check it out and sync it.
//!
//! Reasons to look: the poll interval, a push webhook (`/hooks/git`), a change to a
//! local repository's refs (watched with `notify`), or the backoff after a failure.
//! One reconcile runs at a time; triggers that arrive meanwhile collapse into one, so a
//! burst of pushes applies only the newest head.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use git2::Oid;
use notify::{RecursiveMode, Watcher};
use tokio::sync::{Notify, watch};

use crate::batch::BatchRuns;
use crate::drift::DriftWatch;
use crate::render::Edits;
use crate::rollout::RolloutWatch;
use crate::source::{self, GitSource, Update, Worktree};
use crate::stages::{Stage, StageTimes};
use crate::status::{AppState, Outcome, UnhealthyObject};
use crate::sync::{AppliedWave, Synced, Syncer, WaveGate};

/// The first retry after a failure; doubled on each further failure, up to the poll
/// interval (and never beyond five minutes).
const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(300);

/// What the loop follows and where it keeps its files.
pub struct Config {
    pub source: GitSource,
    /// The repository path holding `manifests/` (`--path`).
    pub path: PathBuf,
    pub interval: Duration,
    /// Holds the bare mirror and the checked-out trees.
    pub work_dir: PathBuf,
    /// A repository on this machine to watch for new commits, if `--repo` is one.
    pub local_repo: Option<PathBuf>,
}

/// Runs until `shutdown` turns true; a sync in flight finishes first.
///
/// Reconciles only while `leader` is true (always, without leader election) and
/// `suspended` is false, and abandons a reconcile the moment either changes: another
/// replica may apply now, or someone asked that nothing be applied.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    config: Config,
    syncer: Syncer,
    drift: DriftWatch,
    rollout: RolloutWatch,
    runs: BatchRuns,
    state: Arc<AppState>,
    mut leader: watch::Receiver<bool>,
    mut suspended: watch::Receiver<bool>,
    mut shutdown: watch::Receiver<bool>,
) {
    let worktree = Arc::new(Worktree::open(config.work_dir.join("tree")));
    let config = Arc::new(config);
    let local_change = Arc::new(Notify::new());
    // Dropping the watcher stops it, so it lives as long as the loop.
    let _watcher = config.local_repo.as_deref().and_then(|repo| watch_local(repo, local_change.clone()));

    let mut applied: Option<Oid> = None;
    let mut failures = 0u32;
    loop {
        tokio::select! {
            led = leader.wait_for(|leading| *leading) => if led.is_err() { break },
            _ = shutdown.wait_for(|stop| *stop) => break,
        }
        tokio::select! {
            resumed = suspended.wait_for(|suspended| !*suspended) => if resumed.is_err() { break },
            _ = shutdown.wait_for(|stop| *stop) => break,
        }
        tokio::select! {
            outcome = reconcile(&config, &worktree, &syncer, &drift, &rollout, &runs, &state, applied) => match outcome {
                Ok(head) => {
                    applied = Some(head);
                    failures = 0;
                }
                Err(()) => failures += 1,
            },
            _ = leader.wait_for(|leading| !*leading) => {
                tracing::warn!("lost the leader lease: stopped applying");
                // The new leader may have applied since: look at everything afresh.
                applied = None;
                continue;
            }
            _ = suspended.wait_for(|suspended| *suspended) => {
                tracing::warn!("suspended: stopped applying");
                applied = None;
                continue;
            }
        }
        let wait = match failures {
            0 => config.interval,
            n => (FIRST_RETRY * 2u32.saturating_pow(n - 1)).min(config.interval).min(MAX_RETRY),
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = state.fetch_requested() => tracing::info!("asked to fetch now (webhook or gitops-agent sync)"),
            _ = local_change.notified() => tracing::debug!("local repository changed"),
            // Resumed: look at once, not after the rest of the interval.
            _ = suspended.changed() => {}
            _ = shutdown.wait_for(|stop| *stop) => break,
        }
    }
    tracing::info!("sync loop stopped");
}

/// One look at the source. Returns the head now applied, or `Err` after recording
/// the failure (the cluster stays at the last good revision).
#[allow(clippy::too_many_arguments)]
async fn reconcile(
    config: &Arc<Config>,
    worktree: &Arc<Worktree>,
    syncer: &Syncer,
    drift: &DriftWatch,
    rollout: &RolloutWatch,
    runs: &BatchRuns,
    state: &AppState,
    applied: Option<Oid>,
) -> Result<Oid, ()> {
    let started = Instant::now();
    let fetched = tokio::task::spawn_blocking({
        let (config, worktree) = (config.clone(), worktree.clone());
        move || fetch_and_checkout(&config, &worktree, applied)
    })
    .await
    .expect("fetch does not panic");
    let (head, tree, update, fetch_stages) = match fetched {
        Ok(Some(fetched)) => fetched,
        Ok(None) => {
            // The source answered and the cluster holds its head: that is a successful
            // sync, and what `GitOpsSourceStale` watches for.
            let head = applied.expect("unchanged means applied before");
            let outcome = Outcome::Synced { revision: head.to_string(), changes: None };
            state.record(outcome, started.elapsed()).await;
            return Ok(head);
        }
        Err(e) => {
            tracing::error!(stage = "fetch", error = %e, "sync failed");
            state.record(Outcome::fetch_failed(&e), started.elapsed()).await;
            return Err(());
        }
    };

    let revision = head.to_string();
    let root = tree.join(&config.path);
    drift.pause().await;
    let gate = HealthGate { drift, rollout, revision: &revision };
    let since = match &update {
        Update::Incremental { from, edited: Some(files), .. } => Some((from.to_string(), files.as_slice())),
        _ => None,
    };
    let edits = since.as_ref().map(|(since, files)| Edits { since, files });
    let in_line = |planned: &_| drift.in_line(planned);
    let result = syncer.sync_in_line(&root, &revision, edits, &in_line, Some(&gate)).await;
    crate::release_memory();
    match result {
        Ok(Synced { changes, objects, jobs, mut stages }) => {
            stages.extend(&fetch_stages);
            rollout.track(&revision, &objects, &changes);
            drift.track(objects, &changes);
            let summary = changes.to_string();
            let outcome = Outcome::Synced { revision: revision.clone(), changes: Some(changes) };
            let recording = Instant::now();
            state.record(outcome, started.elapsed()).await;
            stages.since(Stage::Status, recording);
            state.metrics.sync_stages(&stages);
            let duration_ms = started.elapsed().as_millis() as u64;
            tracing::info!(revision, changes = summary, duration_ms, %stages, "synced");
            runs.update(jobs, &revision).await;
            Ok(head)
        }
        Err(e) => {
            tracing::error!(stage = "sync", error = %e, "sync failed");
            state.record(Outcome::sync_failed(&revision, &e), started.elapsed()).await;
            drift.resume();
            Err(())
        }
    }
}

/// Holds each sync wave until the waves before it are healthy, as the watches see them.
/// Losing the lease or being suspended drops the reconcile, and the wait with it.
struct HealthGate<'a> {
    drift: &'a DriftWatch,
    rollout: &'a RolloutWatch,
    revision: &'a str,
}

impl WaveGate for HealthGate<'_> {
    fn healthy<'a>(&'a self, wave: AppliedWave<'a>) -> BoxFuture<'a, Result<(), Vec<UnhealthyObject>>> {
        Box::pin(async move {
            // The watches report what the wave's health is made of; a kind new to the
            // revision has no watcher before the sync ends, otherwise.
            self.drift.watch(wave.applied);
            self.rollout.track_wave(self.revision, wave.number, wave.applied, wave.changes, wave.later);
            tracing::info!(revision = self.revision, wave = wave.number, "waiting for the wave to be healthy");
            let verdict = self.rollout.wave_healthy(self.revision, wave.number).await;
            if verdict.is_err() {
                self.drift.adopt(wave.applied, wave.changes);
            }
            verdict
        })
    }
}

/// Asks the remote for the head; when it differs from `applied`, fetches it and brings
/// the working tree to it (writing only what changed). `None` when there is nothing new.
fn fetch_and_checkout(
    config: &Config,
    worktree: &Worktree,
    applied: Option<Oid>,
) -> Result<Option<(Oid, PathBuf, Update, StageTimes)>, source::SourceError> {
    let mut stages = StageTimes::default();
    let started = Instant::now();
    let Some(head) = source::fetch_verified(&config.source, &config.work_dir, applied)? else { return Ok(None) };
    stages.since(Stage::Fetch, started);
    let started = Instant::now();
    let update = worktree.update(&source::mirror_of(&config.work_dir), head)?;
    tracing::debug!(?update, "checked out");
    stages.since(Stage::Checkout, started);
    Ok(Some((head, worktree.dir().to_owned(), update, stages)))
}

/// Watches a local repository's git directory (refs, packed-refs) and wakes the loop
/// on any change, so a local commit is applied without waiting for the poll.
fn watch_local(repo: &Path, changed: Arc<Notify>) -> Option<notify::RecommendedWatcher> {
    let git_dir = match git2::Repository::open(repo) {
        Ok(r) => r.path().to_owned(),
        Err(e) => {
            tracing::warn!(repo = %repo.display(), error = %e, "not watching the local repository");
            return None;
        }
    };
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Object writes come before the ref update; only refs say a commit landed. Reads
        // are events too (inotify reports opens), and the agent's own fetch reads refs:
        // waking on those would spin the loop.
        let Ok(event) = event else { return };
        let written = event.kind.is_create() || event.kind.is_modify() || event.kind.is_remove();
        let refs =
            event.paths.iter().any(|p| p.components().any(|c| c.as_os_str() == "refs") || p.ends_with("packed-refs"));
        if written && refs {
            changed.notify_one();
        }
    })
    .ok()?;
    watcher.watch(&git_dir, RecursiveMode::Recursive).ok()?;
    tracing::info!(git_dir = %git_dir.display(), "watching the local repository for commits");
    Some(watcher)
}
