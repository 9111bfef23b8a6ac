//! The whole agent, wired once: [`Agent::start`] makes the writer, the sync loop, the
//! drift watch, the batch runs and the HTTP server from [`Options`], and
//! [`Agent::stop`] ends them in the order that keeps one writer. `gitops-agent run`
//! and the tests both start it this way.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::Api;
use kube::api::{ObjectMeta, PostParams};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::access::Access;
use crate::batch::BatchRuns;
use crate::drift::{self, DriftWatch};
use crate::events::Events;
use crate::leader::{LeaderError, Leadership};
use crate::reconcile::{self, Config};
use crate::render;
use crate::report::StatusReport;
use crate::rollout::RolloutWatch;
use crate::server::{self, WebhookSecret};
use crate::source::GitSource;
use crate::status::AppState;
use crate::sync::{self, Syncer};
use crate::write::Writer;

/// The Lease replicas compete for, in the agent's namespace.
pub const LEASE_NAME: &str = "gitops-agent";

/// Everything `gitops-agent run` is told.
pub struct Options {
    pub source: GitSource,
    /// The branch followed: pushes to others do not wake the loop.
    pub branch: String,
    /// The repository path holding `manifests/` (`--path`).
    pub path: PathBuf,
    pub interval: Duration,
    /// Holds the bare mirror and the checked-out trees.
    pub work_dir: PathBuf,
    /// A repository on this machine to watch for new commits.
    pub local_repo: Option<PathBuf>,
    /// How revisions are applied; `inventory_namespace` is the agent's own namespace,
    /// which also holds the Lease and the status ConfigMap.
    pub sync: sync::Options,
    pub drift: drift::Policy,
    /// How long the revision's objects get to become healthy (`--health-timeout`).
    pub health_timeout: Duration,
    pub webhook_secret: Option<WebhookSecret>,
    /// Compete for the Lease; `None`: this is the only replica.
    pub leader_election: Option<LeaderElection>,
    /// Write each reconcile's outcome into ConfigMap `gitops-agent-status`, and emit
    /// Kubernetes Events ([`crate::events`]).
    pub status_report: bool,
    /// kustomize, helm and their settings; `path_in_repo` is taken from `path`.
    pub render: render::Tools,
}

/// How this replica competes for the Lease [`LEASE_NAME`].
pub struct LeaderElection {
    /// Unique among the replicas (see [`crate::leader::default_identity`]).
    pub identity: String,
    /// How long a claim lasts without renewal: the longest a standby waits after the
    /// leader died without releasing it.
    pub lease_duration: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(
        "the agent's namespace {0:?} does not exist, and with --allow-namespaces the agent may not create it: \
         create it, or pass --namespace NAME of one that exists"
    )]
    MissingNamespace(String),
    #[error("creating the agent's namespace {namespace:?} (--namespace): {source}")]
    Namespace { namespace: String, source: kube::Error },
    #[error(transparent)]
    Leader(#[from] LeaderError),
}

/// A running agent.
pub struct Agent {
    state: Arc<AppState>,
    address: SocketAddr,
    stop: watch::Sender<bool>,
    sync_loop: JoinHandle<()>,
    server: JoinHandle<()>,
    /// Shows leadership in `/status` and `gitops_leader`.
    leader_shown: JoinHandle<()>,
    /// Follows suspend, resume and sync requests ([`crate::control`]).
    control: JoinHandle<()>,
    leadership: Leadership,
    render_stats: render::StatsHandle,
}

impl Agent {
    /// Makes sure the agent's namespace exists, joins the leader election, and starts
    /// the loop and the HTTP server on `listener`. Returns at once: the first sync
    /// comes later, once this replica leads.
    pub async fn start(client: kube::Client, listener: TcpListener, options: Options) -> Result<Agent, StartError> {
        let namespace = options.sync.inventory_namespace.clone();
        ensure_namespace(&client, &namespace, &options.sync.access).await?;
        let leadership = match &options.leader_election {
            Some(election) => {
                tracing::info!(identity = election.identity, namespace, lease = LEASE_NAME, "leader election on");
                Leadership::start(client.clone(), &namespace, LEASE_NAME, &election.identity, election.lease_duration)
                    .await?
            }
            None => Leadership::always(),
        };
        let writer = Writer::new(client, leadership.lead());
        let state = AppState::new(&options.branch, options.webhook_secret);
        let state = Arc::new(match options.status_report {
            true => state
                .with_report(StatusReport::new(writer.clone(), &namespace))
                .with_events(Events::start(writer.clone(), &namespace)),
            false => state,
        });
        let access = options.sync.access.clone();
        let default_namespace = options.sync.default_namespace.clone();
        let tools = render::Tools { path_in_repo: options.path.clone(), ..options.render };
        let syncer = Syncer::new(writer.clone(), options.sync).with_tools(tools);
        let render_stats = syncer.render_stats();
        let rollout = RolloutWatch::new(writer.client().clone(), state.clone(), options.health_timeout);
        let drift =
            DriftWatch::new(syncer.applier().clone(), access.clone(), options.drift, state.clone(), rollout.clone());
        let runs = BatchRuns::new(writer.clone(), access, state.clone(), &default_namespace, rollout.subscribe());
        let config = Config {
            source: options.source,
            path: options.path,
            interval: options.interval,
            work_dir: options.work_dir,
            local_repo: options.local_repo,
        };

        let address = listener.local_addr().expect("a bound listener has an address");
        let (stop, stopped) = watch::channel(false);
        let mut until_stopped = stopped.clone();
        let server = tokio::spawn(server::serve(listener, state.clone(), async move {
            let _ = until_stopped.wait_for(|stop| *stop).await;
        }));
        let mut changes = leadership.changes();
        let shown = state.clone();
        let leader_shown = tokio::spawn(async move {
            loop {
                shown.set_leader(*changes.borrow_and_update());
                if changes.changed().await.is_err() {
                    return;
                }
            }
        });
        let control = tokio::spawn(crate::control::follow(writer.clone(), namespace.clone(), state.clone()));
        let (loop_state, suspension) = (state.clone(), writer.suspension());
        let sync_loop = tokio::spawn(reconcile::run(
            config,
            syncer,
            drift,
            rollout,
            runs,
            loop_state,
            leadership.changes(),
            suspension,
            stopped,
        ));
        Ok(Agent { state, address, stop, sync_loop, server, leader_shown, control, leadership, render_stats })
    }

    /// Where the HTTP server listens.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    /// How many kustomize builds, helm templates and chart downloads ran, and how many
    /// renders came from the cache.
    pub fn render_stats(&self) -> render::RenderStats {
        self.render_stats.get()
    }

    /// Finishes the sync in flight, then releases the Lease (so the standby cannot
    /// start while this replica still applies), then stops the HTTP server.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        if let Err(e) = self.sync_loop.await {
            tracing::error!(error = %e, "the sync loop failed");
        }
        self.leadership.release().await;
        self.leader_shown.abort();
        self.control.abort();
        if let Err(e) = self.server.await {
            tracing::error!(error = %e, "the HTTP server failed");
        }
    }
}

/// Creates the agent's own namespace if it is missing and the agent may (it holds the
/// Lease, the inventory and the status, so nothing works without it). This is the one
/// write that comes before leadership, which needs the namespace to exist; creating a
/// namespace that exists changes nothing, whoever leads. Restricted to some namespaces,
/// the agent may not create one: it says so at start-up instead of failing every sync.
async fn ensure_namespace(client: &kube::Client, namespace: &str, access: &Access) -> Result<(), StartError> {
    let api: Api<Namespace> = Api::all(client.clone());
    let error = |source| StartError::Namespace { namespace: namespace.to_owned(), source };
    match api.get_opt(namespace).await {
        Ok(Some(_)) => return Ok(()),
        Ok(None) => {}
        // Restricted RBAC need not let the agent read namespaces; syncs will tell.
        Err(kube::Error::Api(status)) if status.code == 403 && *access != Access::Cluster => return Ok(()),
        Err(e) => return Err(error(e)),
    }
    if *access != Access::Cluster {
        return Err(StartError::MissingNamespace(namespace.to_owned()));
    }
    let object = Namespace {
        metadata: ObjectMeta { name: Some(namespace.to_owned()), ..ObjectMeta::default() },
        ..Namespace::default()
    };
    match api
        .create(&PostParams { field_manager: Some(crate::FIELD_MANAGER.to_owned()), dry_run: false }, &object)
        .await
    {
        Ok(_) => {
            tracing::info!(namespace, "created the agent's namespace");
            Ok(())
        }
        // Another replica created it first.
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
        Err(e) => Err(error(e)),
    }
}
