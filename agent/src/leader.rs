//! Leader election, so that of several replicas of the agent only one applies at a time.
//!
//! Replicas compete for a `coordination.k8s.io/v1` Lease through [`kube_lease_manager`]: the
//! holder renews it before it expires, the others take it over once it has expired, and
//! server-side apply makes taking it over exclusive. [`Leadership`] runs that in the background
//! and adds what the agent's safety needs on top of it:
//!
//! - it claims leadership only until the last renewal it has seen on the API server expires
//!   (less a margin for clock skew). The lease manager alone goes on claiming leadership while
//!   its renewals fail, so a replica cut off from the API server would go on applying after the
//!   others may have taken over;
//! - it watches the Lease: a standby competes as soon as the lease is released (after the
//!   leader's graceful shutdown) rather than when the released holding would have expired, and
//!   the leader stops as soon as the API server shows another holder;
//! - a lease manager never starts out holding the lease. A holding under the replica's own
//!   identity that it no longer keeps track of (left by a previous run of the same pod, or one
//!   that lapsed) is released first, guarded by its resourceVersion: while nobody renewed it,
//!   others may have started to take it over, and the lease manager would trust it without
//!   checking its expiry.
//!
//! The sync loop waits for [`Leadership::changes`] to turn `true` before each reconcile and
//! abandons the reconcile when it turns `false`:
//!
//! ```no_run
//! # async fn reconcile() {}
//! # async fn example(leadership: gitops_agent::leader::Leadership) {
//! let mut changes = leadership.changes();
//! loop {
//!     if changes.wait_for(|leader| *leader).await.is_err() {
//!         break; // the Leadership is gone
//!     }
//!     tokio::select! {
//!         () = reconcile() => {}
//!         _ = changes.wait_for(|leader| !*leader) => {} // lost the lease: stop applying now
//!     }
//! }
//! # }
//! ```
//!
//! On SIGTERM the agent stops its sync loop, then calls [`Leadership::release`].
//!
//! The agent's service account needs `get`, `list`, `watch`, `create`, `update` and `patch` on
//! `leases` in the namespace of the Lease.

use std::future::{Future, pending};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use kube::api::PostParams;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube_lease_manager::{LeaseCreateMode, LeaseManager, LeaseManagerError, LeaseParams};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// Below two seconds the holder would have to renew within a second of its last renewal, and
/// the Lease counts only whole seconds.
const MIN_LEASE_SECONDS: u64 = 2;

/// First wait after a failed call to the API server; it doubles up to [`MAX_RETRY`].
const MIN_RETRY: Duration = Duration::from_millis(500);
/// Longest wait between attempts, so a replica rejoins soon after the API server is back.
const MAX_RETRY: Duration = Duration::from_secs(30);

/// Why leader election could not start.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    /// The Lease counts whole seconds in an `int32`, and needs time to renew within it.
    #[error("lease duration {0:?}: leader election needs at least {MIN_LEASE_SECONDS}s and at most {max}s", max = i32::MAX)]
    Duration(Duration),
    /// Every candidate needs a name of its own: the Lease records who holds it.
    #[error("leader election needs a non-empty identity")]
    EmptyIdentity,
    /// A holding of this identity's was left over, and could not be released.
    #[error("releasing Lease {namespace}/{name}, left held by {identity}: {source}")]
    Stale { namespace: String, name: String, identity: String, source: Box<kube::Error> },
    /// The Lease could not be read or created.
    #[error("setting up Lease {namespace}/{name}: {source}")]
    Lease { namespace: String, name: String, source: Box<LeaseManagerError> },
}

/// This replica's candidacy for leadership, kept up in the background until it is released
/// or dropped.
///
/// Dropping it stops renewing without releasing the lease, like a crash: the others take over
/// once the lease expires. [`Leadership::release`] hands it over at once.
pub struct Leadership {
    published: Arc<Published>,
    /// Asks the background task to release the lease and end; `None` without a Lease.
    shutdown: Option<oneshot::Sender<()>>,
    /// Keeps the lease; `None` without a Lease.
    task: Option<JoinHandle<()>>,
}

impl Leadership {
    /// Competes for the Lease `namespace/lease_name` (created if missing) as `identity`.
    ///
    /// Returns once the Lease exists, still not leader: leadership comes later, through
    /// [`Leadership::changes`]. Every replica must use the same `lease_duration` and a different
    /// `identity` (see [`default_identity`]).
    pub async fn start(
        client: kube::Client,
        namespace: &str,
        lease_name: &str,
        identity: &str,
        lease_duration: Duration,
    ) -> Result<Leadership, LeaderError> {
        let election = Election::new(client, namespace, lease_name, identity, lease_duration)?;
        let manager = election.manager().await?;
        let published = Arc::new(Published::new(false));
        let (shutdown, stop) = oneshot::channel();
        let driver = Driver::new(election, manager, published.clone());
        let task = tokio::spawn(driver.run(stop));
        Ok(Leadership { published, shutdown: Some(shutdown), task: Some(task) })
    }

    /// Leadership without a Lease, for `--leader-election=false`: the operator runs a single
    /// replica and vouches that no other applies.
    pub fn always() -> Leadership {
        Leadership { published: Arc::new(Published::new(true)), shutdown: None, task: None }
    }

    /// Leadership that never leads, for commands that must write nothing (`diff`).
    pub fn never() -> Leadership {
        Leadership { published: Arc::new(Published::new(false)), shutdown: None, task: None }
    }

    /// Whether this replica may apply now.
    pub fn is_leader(&self) -> bool {
        self.published.leads()
    }

    /// A handle on [`Leadership::is_leader`] for the one writer ([`crate::write::Writer`]),
    /// which asks it before every request.
    pub fn lead(&self) -> Lead {
        Lead { published: self.published.clone() }
    }

    /// Follows [`Leadership::is_leader`]. The value turns `false` when this replica stops being
    /// leader, is released or dropped; once the [`Leadership`] is gone, `changed` fails.
    pub fn changes(&self) -> watch::Receiver<bool> {
        self.published.sender.subscribe()
    }

    /// Stops being leader and frees the lease, so that a standby takes over at once instead of
    /// when the lease would have expired. Call it once the sync loop has stopped applying.
    ///
    /// A failure to release is only logged: the lease then expires as after a crash.
    pub async fn release(mut self) {
        self.published.stop();
        let (Some(shutdown), Some(task)) = (self.shutdown.take(), self.task.take()) else {
            return;
        };
        if shutdown.send(()).is_ok()
            && let Err(e) = task.await
        {
            warn!(error = %e, "leader election task failed before releasing the lease");
        }
    }
}

impl std::fmt::Debug for Leadership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leadership").field("leader", &self.is_leader()).finish_non_exhaustive()
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.published.stop();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// This replica's name among the candidates: the pod name in a cluster, `HOST-PID` elsewhere.
///
/// In a pod `HOSTNAME` is the pod name, unique among the replicas and what someone reading the
/// Lease recognises. Outside a cluster several agents may share a host; the pid tells them apart.
pub fn default_identity() -> String {
    let non_empty = |name: String| Some(name.trim().to_owned()).filter(|name| !name.is_empty());
    let hostname = std::env::var("HOSTNAME")
        .ok()
        .and_then(non_empty)
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok().and_then(non_empty))
        .unwrap_or_else(|| "localhost".to_owned());
    // The kubelet sets this in every container, and nothing else usually does.
    if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
        hostname
    } else {
        format!("{hostname}-{}", std::process::id())
    }
}

/// Whether this replica leads, asked right before each write. Unlike the value of
/// [`Leadership::changes`], which the background task updates when it gets to run, it
/// also checks the claim's expiry on the clock: a replica that was frozen (SIGSTOP, a
/// stalled VM) past its lease wakes up with the task's last word still `true`, and its
/// watches may deliver events before the task has run.
#[derive(Clone)]
pub struct Lead {
    published: Arc<Published>,
}

impl Lead {
    /// The lead of a writer that is the only one by construction (gitops-bootstrap's
    /// installer, a test), with no Leadership behind it.
    pub fn sole() -> Lead {
        Lead { published: Arc::new(Published::new(true)) }
    }

    pub fn holds(&self) -> bool {
        self.published.leads()
    }

    /// When this replica began to lead, while it does.
    pub fn since(&self) -> Option<SystemTime> {
        self.holds().then(|| *self.published.since.lock().unwrap_or_else(|poisoned| poisoned.into_inner())).flatten()
    }
}

impl std::fmt::Debug for Lead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lead").field("holds", &self.holds()).finish()
    }
}

/// The leadership the sync loop sees.
struct Published {
    sender: watch::Sender<bool>,
    /// Set when the [`Leadership`] is released or dropped: the value stays `false` from then on,
    /// whatever the background task still does before it ends.
    stopped: AtomicBool,
    /// When the claim published as `true` lapses; `None`: never (without a Lease).
    until: std::sync::Mutex<Option<SystemTime>>,
    /// When the value last turned `true`.
    since: std::sync::Mutex<Option<SystemTime>>,
}

impl Published {
    fn new(leader: bool) -> Published {
        Published {
            sender: watch::Sender::new(leader),
            stopped: AtomicBool::new(false),
            until: Default::default(),
            since: std::sync::Mutex::new(leader.then(SystemTime::now)),
        }
    }

    fn leads(&self) -> bool {
        let until = *self.until.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        *self.sender.borrow() && until.is_none_or(|until| SystemTime::now() < until)
    }

    /// Returns whether the value changed. `until`: when a `true` lapses.
    fn set(&self, leader: bool, until: Option<SystemTime>) -> bool {
        *self.until.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = until;
        // Checked under the channel's lock, which `stop` takes too: a `true` cannot land after it.
        self.sender.send_if_modified(|current| {
            if self.stopped.load(Ordering::SeqCst) || *current == leader {
                return false;
            }
            *current = leader;
            *self.since.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = leader.then(SystemTime::now);
            true
        })
    }

    fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        self.sender.send_replace(false);
    }
}

/// One replica's candidacy for one Lease.
struct Election {
    client: kube::Client,
    api: Api<Lease>,
    namespace: String,
    name: String,
    identity: String,
    /// Whole seconds, as the Lease records them.
    duration: u64,
    /// How long before expiry the holder renews.
    grace: u64,
}

impl Election {
    fn new(
        client: kube::Client,
        namespace: &str,
        name: &str,
        identity: &str,
        lease_duration: Duration,
    ) -> Result<Election, LeaderError> {
        if identity.is_empty() {
            return Err(LeaderError::EmptyIdentity);
        }
        let duration = lease_duration.as_secs() + u64::from(lease_duration.subsec_nanos() > 0);
        if !(MIN_LEASE_SECONDS..=i32::MAX as u64).contains(&duration) {
            return Err(LeaderError::Duration(lease_duration));
        }
        Ok(Election {
            api: Api::namespaced(client.clone(), namespace),
            client,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            identity: identity.to_owned(),
            duration,
            // Renewing half-way through leaves, of the second half, a quarter of the lease for a
            // slow renewal to show up and a quarter for clock skew (see `valid_until`).
            grace: duration.div_ceil(2),
        })
    }

    /// One per replica: taking the lease over is exclusive only because server-side apply
    /// refuses to let one field manager overwrite the holder another one set.
    fn field_manager(&self) -> String {
        format!("{}-leader-{}", crate::FIELD_MANAGER, self.identity)
    }

    /// A lease manager that does not hold the lease, with the Lease created if missing.
    async fn manager(&self) -> Result<LeaseManager, LeaderError> {
        self.release_stale().await.map_err(|source| LeaderError::Stale {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            identity: self.identity.clone(),
            source: Box::new(source),
        })?;
        let params =
            LeaseParams::new(self.identity.clone(), self.duration, self.grace).with_field_manager(self.field_manager());
        LeaseManager::new(self.client.clone(), &self.name, &self.namespace, params, LeaseCreateMode::AutoCreate)
            .await
            .map_err(|source| LeaderError::Lease {
                namespace: self.namespace.clone(),
                name: self.name.clone(),
                source: Box::new(source),
            })
    }

    /// Frees the lease if it names this identity, unless someone wrote it in the meantime.
    async fn release_stale(&self) -> Result<(), kube::Error> {
        loop {
            let Some(mut lease) = self.api.get_opt(&self.name).await? else {
                return Ok(());
            };
            let Some(spec) = lease.spec.as_mut().filter(|spec| spec.holder_identity.as_ref() == Some(&self.identity))
            else {
                return Ok(());
            };
            // The fields the lease manager clears on release, so that it sees a free lease.
            spec.holder_identity = None;
            spec.acquire_time = None;
            spec.renew_time = None;
            spec.lease_duration_seconds = None;
            let params = PostParams { field_manager: Some(self.field_manager()), ..PostParams::default() };
            // A replace carries the resourceVersion just read: a takeover since then wins.
            match self.api.replace(&self.name, &params, &lease).await {
                Ok(_) => {
                    info!(namespace = %self.namespace, lease = %self.name, identity = %self.identity,
                        "released a holding of the lease left from before");
                    return Ok(());
                }
                Err(kube::Error::Api(status)) if status.code == 409 => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Until when this identity may act as leader, by the Lease as the API server has it.
    fn valid_until(&self, lease: &Lease) -> Option<SystemTime> {
        let spec = lease.spec.as_ref().filter(|spec| spec.holder_identity.as_ref() == Some(&self.identity))?;
        let renewed = SystemTime::from(spec.renew_time.as_ref()?.0);
        let duration = Duration::from_secs(u64::try_from(spec.lease_duration_seconds?).ok()?);
        // Others count the expiry on their own clocks; stop before theirs may be ahead of ours,
        // while leaving the renewal, due `grace` before expiry, time to show up.
        renewed.checked_add(duration)?.checked_sub(Duration::from_secs(self.grace) / 2)
    }
}

/// The next change of a lease manager's holding, after a wait.
type Change = Pin<Box<dyn Future<Output = Result<bool, LeaseManagerError>> + Send>>;

/// The background task: keeps a lease manager running and publishes what it may claim.
struct Driver {
    election: Election,
    published: Arc<Published>,
    /// `None` while a new one could not be made; [`Driver::retry_at`] says when to try again.
    manager: Option<Arc<LeaseManager>>,
    /// Kept across iterations of the loop, so that watch events do not cancel a renewal midway,
    /// which would leave the lease manager's view of the Lease behind the API server's.
    change: Change,
    /// Whether the lease manager last reported holding the lease.
    holds: bool,
    /// From the latest observation of the Lease; `None` unless it named this identity.
    valid_until: Option<SystemTime>,
    /// Whether the latest observation of the Lease named another holder: the lease manager
    /// then waits for that holding to expire, even if it is released.
    others_held: bool,
    /// When to try again to make a lease manager, after failing to.
    retry_at: Option<Instant>,
    /// The wait after the next failure.
    backoff: Duration,
}

impl Driver {
    fn new(election: Election, manager: LeaseManager, published: Arc<Published>) -> Driver {
        let manager = Arc::new(manager);
        Driver {
            election,
            published,
            change: next_change(manager.clone(), Duration::ZERO),
            manager: Some(manager),
            holds: false,
            valid_until: None,
            others_held: false,
            retry_at: None,
            backoff: MIN_RETRY,
        }
    }

    /// Runs until `stop` says to release the lease, or until aborted.
    async fn run(mut self, mut stop: oneshot::Receiver<()>) {
        let config = watcher::Config::default().fields(&format!("metadata.name={}", self.election.name));
        let mut events = watcher::watcher(self.election.api.clone(), config).default_backoff().boxed();
        loop {
            self.publish();
            let lapse = self.valid_until.filter(|_| self.holds).map(instant_at);
            tokio::select! {
                biased;
                stop = &mut stop => {
                    // An error means the Leadership was dropped: stop without releasing, like a crash.
                    if stop.is_ok() {
                        self.release().await;
                    }
                    return;
                }
                changed = &mut self.change => self.on_change(changed).await,
                event = events.next() => match event {
                    Some(Ok(Event::Apply(lease) | Event::InitApply(lease))) => {
                        if self.observe(Some(&lease)) {
                            self.rebuild().await;
                        }
                    }
                    Some(Ok(Event::Delete(_))) => {
                        if self.observe(None) {
                            self.rebuild().await;
                        }
                    }
                    Some(Ok(Event::Init | Event::InitDone)) => {}
                    Some(Err(e)) => warn!(namespace = %self.election.namespace, lease = %self.election.name,
                        error = %e, "watching the lease for leader election"),
                    // The watcher retries forever; should it end, the lease manager still works alone.
                    None => events = futures::stream::pending().boxed(),
                },
                () = wake_at(lapse) => self.on_lapse().await,
                () = wake_at(self.retry_at) => self.rebuild().await,
            }
        }
    }

    fn publish(&self) {
        let leader = self.holds && self.valid_until.is_some_and(|until| SystemTime::now() < until);
        if self.published.set(leader, self.valid_until) {
            let Election { namespace, name, identity, .. } = &self.election;
            if leader {
                info!(%namespace, lease = %name, %identity, "became leader");
            } else {
                info!(%namespace, lease = %name, %identity, "no longer leader");
            }
        }
    }

    async fn on_change(&mut self, changed: Result<bool, LeaseManagerError>) {
        let Some(manager) = self.manager.clone() else { return };
        match changed {
            Ok(holds) => {
                self.backoff = MIN_RETRY;
                self.holds = holds;
                self.valid_until = None;
                if holds {
                    // Rather than wait for the watch to show the new holding.
                    match self.election.api.get_opt(&self.election.name).await {
                        Ok(lease) => {
                            self.observe(lease.as_ref());
                        }
                        Err(e) => debug!(error = %e, "reading the lease just acquired; waiting for the watch"),
                    }
                }
                self.change = next_change(manager, Duration::ZERO);
            }
            // The lease manager creates the Lease only when it starts.
            Err(LeaseManagerError::NonexistentLease(_)) => {
                warn!(namespace = %self.election.namespace, lease = %self.election.name, "the lease was deleted");
                self.rebuild().await;
            }
            Err(e) => {
                let wait = self.next_backoff();
                warn!(namespace = %self.election.namespace, lease = %self.election.name, error = %e,
                    "leader election failed; retrying in {wait:?}");
                self.change = next_change(manager, wait);
            }
        }
    }

    /// Takes in the Lease as the API server has it (`None`: deleted); returns whether to start
    /// a new lease manager.
    fn observe(&mut self, lease: Option<&Lease>) -> bool {
        let holder = lease.and_then(|lease| lease.spec.as_ref()).and_then(|spec| spec.holder_identity.as_deref());
        match holder {
            Some(holder) if holder == self.election.identity => {
                self.valid_until = lease.and_then(|lease| self.election.valid_until(lease));
                self.others_held = false;
                false
            }
            Some(_) => {
                self.valid_until = None;
                self.others_held = true;
                false
            }
            None => {
                self.valid_until = None;
                // A standby's lease manager sleeps until the expiry of the holding it last saw;
                // a new one sees the lease free and competes at once.
                std::mem::take(&mut self.others_held) && !self.holds
            }
        }
    }

    async fn on_lapse(&mut self) {
        if self.valid_until.is_some_and(|until| SystemTime::now() < until) {
            return;
        }
        warn!(namespace = %self.election.namespace, lease = %self.election.name, identity = %self.election.identity,
            "the lease was not seen renewed before it could expire; stepping down");
        self.rebuild().await;
    }

    /// Replaces the lease manager with one that does not hold the lease.
    async fn rebuild(&mut self) {
        self.change = Box::pin(pending());
        self.manager = None;
        self.holds = false;
        self.valid_until = None;
        self.retry_at = None;
        self.publish();
        match self.election.manager().await {
            Ok(manager) => {
                let manager = Arc::new(manager);
                self.change = next_change(manager.clone(), Duration::ZERO);
                self.manager = Some(manager);
            }
            Err(e) => {
                let wait = self.next_backoff();
                warn!(error = %e, "restarting leader election; retrying in {wait:?}");
                self.retry_at = Some(Instant::now() + wait);
            }
        }
    }

    async fn release(mut self) {
        // So the lease manager cannot renew or take the lease again after it is released.
        self.change = Box::pin(pending());
        let released = match &self.manager {
            Some(manager) => manager.release().await.map_err(|e| e.to_string()),
            None => self.election.release_stale().await.map_err(|e| e.to_string()),
        };
        let Election { namespace, name, identity, .. } = &self.election;
        match released {
            Ok(()) => info!(%namespace, lease = %name, %identity, "released the lease"),
            Err(error) => warn!(%namespace, lease = %name, %identity, %error,
                "releasing the lease failed; the others take over when it expires"),
        }
    }

    fn next_backoff(&mut self) -> Duration {
        let wait = self.backoff;
        self.backoff = (wait * 2).min(MAX_RETRY);
        wait
    }
}

fn next_change(manager: Arc<LeaseManager>, after: Duration) -> Change {
    Box::pin(async move {
        tokio::time::sleep(after).await;
        manager.changed().await
    })
}

/// Never wakes for `None`.
async fn wake_at(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => pending().await,
    }
}

fn instant_at(time: SystemTime) -> Instant {
    Instant::now() + time.duration_since(SystemTime::now()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lead_says_since_when_it_holds() {
        let lead = Lead { published: Arc::new(Published::new(false)) };
        assert_eq!(lead.since(), None);
        let before = SystemTime::now();
        assert!(lead.published.set(true, None));
        assert!(lead.since().is_some_and(|since| since >= before), "{:?}", lead.since());
        let first = lead.since();
        assert!(!lead.published.set(true, None), "still leading");
        assert_eq!(lead.since(), first, "a renewal is not a new lead");
        assert!(lead.published.set(false, None));
        assert_eq!(lead.since(), None);
    }
}
