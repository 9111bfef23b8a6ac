//! `gitops-agent`: the command line, a thin layer over the `gitops_agent` library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use gitops_agent::server::{self, AppState, WebhookSecret};
use gitops_agent::source::{Credentials, GitSource};
use gitops_agent::{render, run, sync};

#[derive(Parser)]
#[command(version, about = "Keeps a Kubernetes cluster in sync with a git repository")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Follow the repository and apply every new commit.
    Run(Box<RunArgs>),
    /// Check a checked-out repository offline: every error as `file:line: message`.
    Validate {
        /// The directory holding manifests/ (the repository root or its --path).
        dir: PathBuf,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// https, ssh, git or file URL, or a local path.
    #[arg(long, env = "GITOPS_REPO")]
    repo: String,
    #[arg(long, env = "GITOPS_BRANCH", default_value = "main")]
    branch: String,
    /// Subdirectory holding manifests/, dashboards/ and jobs/.
    #[arg(long, env = "GITOPS_PATH", default_value = ".")]
    path: PathBuf,
    /// How often to ask the remote for its branch head.
    #[arg(long, env = "GITOPS_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Address of /metrics, /healthz, /readyz, /status and /hooks/git.
    #[arg(long, env = "GITOPS_LISTEN", default_value = "0.0.0.0:8080")]
    listen: String,
    /// Delete objects removed from git.
    #[arg(long, env = "GITOPS_PRUNE", default_value_t = true, action = clap::ArgAction::Set)]
    prune: bool,
    /// Take ownership of fields another field manager set, instead of failing.
    #[arg(long, env = "GITOPS_FORCE_CONFLICTS", default_value_t = true, action = clap::ArgAction::Set)]
    force_conflicts: bool,
    /// Namespace for namespaced objects that name none.
    #[arg(long, env = "GITOPS_DEFAULT_NAMESPACE", default_value = "default")]
    default_namespace: String,
    /// The agent's own namespace, where it keeps its inventory. In a pod: its own.
    #[arg(long, env = "GITOPS_NAMESPACE")]
    namespace: Option<String>,
    /// A mounted Secret: files username, password or token, identity, known_hosts.
    #[arg(long, env = "GITOPS_GIT_SECRET_DIR")]
    git_secret_dir: Option<PathBuf>,
    /// File holding the webhook's HMAC secret; unsigned pushes are refused when set.
    #[arg(long, env = "GITOPS_WEBHOOK_SECRET_FILE")]
    webhook_secret_file: Option<PathBuf>,
    /// Where the mirror and checkouts live (default: a fresh temporary directory).
    #[arg(long, env = "GITOPS_WORK_DIR")]
    work_dir: Option<PathBuf>,
}

/// Where a pod's service account namespace is mounted.
const POD_NAMESPACE_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

fn main() -> ExitCode {
    let cli = Cli::parse();
    let in_cluster = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if in_cluster { logs.json().init() } else { logs.init() }

    let outcome = match cli.command {
        Cmd::Validate { dir } => validate(&dir),
        Cmd::Run(args) => tokio::runtime::Runtime::new().context("starting the async runtime").and_then(|rt| rt.block_on(run(*args))),
    };
    match outcome {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn validate(dir: &std::path::Path) -> Result<ExitCode> {
    match render::render(dir) {
        Ok(manifests) => {
            println!("{}: {} objects, no errors", dir.display(), manifests.len());
            Ok(ExitCode::SUCCESS)
        }
        Err(errors) => {
            for e in &errors {
                println!("{e}");
            }
            Ok(ExitCode::FAILURE)
        }
    }
}

async fn run(args: RunArgs) -> Result<ExitCode> {
    let credentials = match &args.git_secret_dir {
        Some(dir) => Credentials::from_secret_dir(dir)?,
        None => Credentials::none(),
    };
    let webhook_secret = args
        .webhook_secret_file
        .as_deref()
        .map(WebhookSecret::from_file)
        .transpose()
        .context("reading --webhook-secret-file")?;
    let namespace = match args.namespace {
        Some(ns) => ns,
        None => std::fs::read_to_string(POD_NAMESPACE_FILE)
            .map(|ns| ns.trim().to_owned())
            .unwrap_or_else(|_| "gitops-system".to_owned()),
    };
    let client = kube::Client::try_default().await.context("connecting to the cluster (KUBECONFIG or in-cluster)")?;

    let temporary;
    let work_dir = match args.work_dir {
        Some(dir) => dir,
        None => {
            temporary = tempfile::tempdir().context("creating a work directory")?;
            temporary.path().to_owned()
        }
    };
    let local_repo = std::path::Path::new(args.repo.strip_prefix("file://").unwrap_or(&args.repo));
    let config = run::Config {
        source: GitSource::new(&args.repo, &args.branch, credentials),
        path: args.path,
        interval: args.interval,
        work_dir,
        local_repo: local_repo.exists().then(|| local_repo.to_owned()),
    };
    let syncer = sync::Syncer::new(
        client,
        sync::Options {
            default_namespace: args.default_namespace,
            prune: args.prune,
            force_conflicts: args.force_conflicts,
            inventory_namespace: namespace,
        },
    );

    let state = Arc::new(AppState::new(&args.branch, webhook_secret));
    let listener = tokio::net::TcpListener::bind(&args.listen).await.with_context(|| format!("listening on {}", args.listen))?;
    tracing::info!(listen = %listener.local_addr()?, repo = %gitops_agent::source::redact_url(&args.repo), branch = %args.branch, "gitops-agent started");

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(server::serve(listener, state.clone(), {
        let mut stop = stop_rx.clone();
        async move {
            let _ = stop.wait_for(|s| *s).await;
        }
    }));
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down after the sync in flight");
        let _ = stop_tx.send(true);
    });
    run::run(config, syncer, state, stop_rx).await;
    server.await.context("HTTP server task")?;
    Ok(ExitCode::SUCCESS)
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
