//! The `gitops-bootstrap` command line: a thin layer over the library.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use gitops_bootstrap::local::{self, LocalControlPlane, Options, agent};

#[derive(Parser)]
#[command(version, about = "Bring up a cluster for the GitOps agent and install the agent")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum Provider {
    /// A control plane on this machine's loopback, built from Go modules.
    Local,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start the cluster and install the agent, then return, leaving it running.
    Up {
        #[arg(long, value_enum)]
        provider: Provider,
        /// Where the local control plane keeps its state; `DIR/kubeconfig` is written here.
        #[arg(long)]
        state_dir: PathBuf,
        /// The repository the agent follows (URL or path); default: a new git repository
        /// made from repo-template/ in `STATE_DIR/repo`.
        #[arg(long)]
        repo: Option<String>,
        /// Address of the agent's /metrics, /status and /hooks/git.
        #[arg(long, default_value = "127.0.0.1:8080")]
        agent_listen: String,
        /// Start the cluster only, without the agent.
        #[arg(long)]
        no_agent: bool,
    },
    /// Stop everything `up` started and remove its state.
    Down {
        #[arg(long, value_enum)]
        provider: Provider,
        #[arg(long)]
        state_dir: PathBuf,
    },
    /// Say what runs.
    Status {
        #[arg(long, value_enum)]
        provider: Provider,
        #[arg(long)]
        state_dir: PathBuf,
    },
    /// Build (or find in the cache) the local control plane's binaries, and exit.
    Prepare {
        #[arg(long, value_enum)]
        provider: Provider,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        // The client logs every non-2xx answer at ERROR, and waiting for /readyz gets
        // many by design; our own errors say what failed.
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,kube_client::client::builder=off".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Cmd::Up { provider: Provider::Local, state_dir, repo, agent_listen, no_agent } => {
            // A partly running control plane (one component crashed) is started afresh.
            let components = local::status(&state_dir);
            if !components.is_empty() && components.iter().all(|(_, _, alive)| *alive) {
                println!("already running from {}", state_dir.display());
                return print_status(&state_dir);
            }
            let options = Options::new(&state_dir, local::Lifetime::Detached);
            let plane = LocalControlPlane::start(&options)
                .await
                .with_context(|| format!("starting the local control plane in {}", state_dir.display()))?;
            println!("Kubernetes {} is up at {}", plane.kubernetes_version(), plane.server());
            if !no_agent {
                let repo = match repo {
                    Some(repo) => repo,
                    None => agent::repo_from_template(&state_dir.join("repo"))?.display().to_string(),
                };
                create_namespace(&plane.client().await?, agent::AGENT_NAMESPACE).await?;
                let options = agent::AgentOptions { binary: agent::find_agent_binary(), repo, listen: agent_listen };
                agent::start(plane.state_dir(), plane.kubeconfig(), &options).await.with_context(|| {
                    format!(
                        "starting gitops-agent ({}); the control plane keeps running until \
                         `gitops-bootstrap down --provider local --state-dir {}`",
                        options.binary.display(),
                        state_dir.display()
                    )
                })?;
                println!(
                    "gitops-agent follows {} and has applied its head: commit to it and watch the cluster follow.\n  \
                     status: http://{}/status   metrics: http://{}/metrics",
                    options.repo, options.listen, options.listen
                );
            }
            println!(
                "\n  export KUBECONFIG={}\n  kubectl get namespaces\n\nStop it all with: gitops-bootstrap down --provider local --state-dir {}",
                plane.kubeconfig().display(),
                state_dir.display(),
            );
            Ok(())
        }
        Cmd::Down { provider: Provider::Local, state_dir } => {
            let stopped = local::stop_state_dir(&state_dir)?;
            if stopped.is_empty() {
                println!("nothing was running from {}", state_dir.display());
            } else {
                println!("stopped {}; removed {}", stopped.join(", "), state_dir.display());
            }
            Ok(())
        }
        Cmd::Status { provider: Provider::Local, state_dir } => print_status(&state_dir),
        Cmd::Prepare { provider: Provider::Local } => {
            let cache = local::build::cache_dir();
            let binaries = tokio::task::spawn_blocking(move || local::build::ensure_built(&cache)).await??;
            println!("kube-apiserver, kube-controller-manager: {}", binaries.kube.display());
            println!("etcd: {}", binaries.etcd.display());
            Ok(())
        }
    }
}

fn print_status(state_dir: &std::path::Path) -> Result<()> {
    let components = local::status(state_dir);
    if components.is_empty() {
        println!("nothing runs from {}", state_dir.display());
        return Ok(());
    }
    for (name, pid, alive) in &components {
        println!("{name:<24} pid {pid:<8} {}", if *alive { "running" } else { "stopped" });
    }
    let kubeconfig = state_dir.join("kubeconfig");
    if kubeconfig.exists() {
        println!("kubeconfig: {}", kubeconfig.display());
    }
    Ok(())
}

/// Creates `name` with server-side apply (a no-op when it exists).
async fn create_namespace(client: &kube::Client, name: &str) -> Result<()> {
    let namespaces: kube::Api<k8s_openapi::api::core::v1::Namespace> = kube::Api::all(client.clone());
    let namespace = serde_json::json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": name } });
    namespaces
        .patch(name, &kube::api::PatchParams::apply("gitops-bootstrap"), &kube::api::Patch::Apply(namespace))
        .await
        .with_context(|| format!("creating namespace {name}"))?;
    Ok(())
}
