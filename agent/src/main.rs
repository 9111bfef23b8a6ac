//! `gitops-agent`: the command line, a thin layer over the `gitops_agent` library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use gitops_agent::access::Access;
use gitops_agent::agent::{self, Agent};
use gitops_agent::apply::Action;
use gitops_agent::leader::{self, Leadership};
use gitops_agent::server::WebhookSecret;
use gitops_agent::source::{AllowedSigners, Credentials, GitSource};
use gitops_agent::write::Writer;
use gitops_agent::{control, drift, render, sync, validate};

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
    /// Show what `run` would change in the current cluster; exit 0 no changes, 1 changes, 2 error.
    Diff {
        /// Diff this checked-out directory (uncommitted changes included) instead of --repo's branch.
        #[arg(long, conflicts_with = "repo")]
        dir: Option<PathBuf>,
        #[command(flatten)]
        source: Option<SourceArgs>,
        #[command(flatten)]
        apply: ApplyArgs,
        #[command(flatten)]
        render: RenderArgs,
    },
    /// Ask the running agent to apply, correct, prune and run nothing until resumed.
    Suspend(AgentNamespace),
    /// Let a suspended agent go on.
    Resume(AgentNamespace),
    /// Ask the running agent to fetch now, as a push webhook would (`flux reconcile`).
    Sync(AgentNamespace),
    /// Check a checked-out repository offline: every error as `file:line: message`.
    Validate(ValidateArgs),
}

#[derive(clap::Args)]
struct ValidateArgs {
    /// The directory holding manifests/, dashboards/ and jobs/ (the repository root or its --path).
    dir: PathBuf,
    /// Also dry-run the whole revision on the cluster of KUBECONFIG, as `run` would apply it.
    #[arg(long)]
    cluster: bool,
    #[command(flatten)]
    apply: ApplyArgs,
    #[command(flatten)]
    render: RenderArgs,
}

/// The renderers of kustomizations and chart releases.
#[derive(clap::Args)]
struct RenderArgs {
    /// The kustomize binary (v5).
    #[arg(long, env = "GITOPS_KUSTOMIZE_BIN", default_value = "kustomize")]
    kustomize_bin: PathBuf,
    /// The helm binary (v3).
    #[arg(long, env = "GITOPS_HELM_BIN", default_value = "helm")]
    helm_bin: PathBuf,
    /// Where downloaded charts are kept (default: the system's temporary directory).
    #[arg(long, env = "GITOPS_CHART_CACHE_DIR")]
    chart_cache_dir: Option<PathBuf>,
    /// A mounted Secret for chart repositories and registries: files username, password.
    #[arg(long, env = "GITOPS_CHART_SECRET_DIR")]
    chart_secret_dir: Option<PathBuf>,
    /// How long one kustomize build, chart download or helm template may take.
    #[arg(long, env = "GITOPS_RENDER_TIMEOUT", default_value = "2m", value_parser = humantime::parse_duration)]
    render_timeout: Duration,
    /// The most memory (MiB of heap) one kustomize or helm run may use.
    #[arg(long, env = "GITOPS_RENDER_MEMORY_MIB", default_value_t = 2048)]
    render_memory_mib: u64,
}

impl RenderArgs {
    fn tools(self, path_in_repo: &std::path::Path) -> Result<render::Tools> {
        let defaults = render::Tools::default();
        let credentials = match &self.chart_secret_dir {
            Some(dir) => render::ChartCredentials::from_secret_dir(dir)
                .with_context(|| format!("reading --chart-secret-dir {}", dir.display()))?,
            None => render::ChartCredentials::default(),
        };
        Ok(render::Tools {
            kustomize: self.kustomize_bin,
            helm: self.helm_bin,
            limits: render::Limits { timeout: self.render_timeout, memory: self.render_memory_mib << 20 },
            chart_cache: self.chart_cache_dir.unwrap_or(defaults.chart_cache),
            credentials,
            path_in_repo: path_in_repo.to_owned(),
        })
    }
}

#[derive(clap::Args)]
struct RunArgs {
    #[command(flatten)]
    source: SourceArgs,
    #[command(flatten)]
    apply: ApplyArgs,
    #[command(flatten)]
    render: RenderArgs,
    /// How often to ask the remote for its branch head.
    #[arg(long, env = "GITOPS_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Address of /metrics, /healthz, /readyz, /status and /hooks/git.
    #[arg(long, env = "GITOPS_LISTEN", default_value = "0.0.0.0:8080")]
    listen: String,
    /// File holding the webhook's HMAC secret; unsigned pushes are refused when set.
    #[arg(long, env = "GITOPS_WEBHOOK_SECRET_FILE")]
    webhook_secret_file: Option<PathBuf>,
    /// Where the mirror and checkouts live (default: a fresh temporary directory).
    #[arg(long, env = "GITOPS_WORK_DIR")]
    work_dir: Option<PathBuf>,
    /// Apply only while holding the `gitops-agent` Lease in the agent's namespace
    /// (default: on in a pod, off elsewhere).
    #[arg(long, env = "GITOPS_LEADER_ELECTION", action = clap::ArgAction::Set)]
    leader_election: Option<bool>,
    /// What to do when the cluster drifts from git: re-apply, or report only.
    #[arg(long, env = "GITOPS_DRIFT", value_enum, default_value = "correct")]
    drift: drift::Policy,
    /// How long a revision's objects get to become healthy before it is Degraded
    /// (per object: annotation gitops.scale.dev/health-timeout).
    #[arg(long, env = "GITOPS_HEALTH_TIMEOUT", default_value = "5m", value_parser = humantime::parse_duration)]
    health_timeout: Duration,
}

/// Which agent to ask: the one whose status ConfigMap is in this namespace.
#[derive(clap::Args)]
struct AgentNamespace {
    /// The agent's namespace (its `--namespace`).
    #[arg(long, env = "GITOPS_NAMESPACE", default_value = "gitops-system")]
    namespace: String,
}

/// Which repository, branch and directory to follow.
#[derive(clap::Args)]
struct SourceArgs {
    /// https, ssh, git or file URL, or a local path.
    #[arg(long, env = "GITOPS_REPO")]
    repo: String,
    /// The branch to follow (pushes to others are ignored).
    #[arg(long, env = "GITOPS_BRANCH", default_value = "main")]
    branch: String,
    /// Subdirectory holding manifests/, dashboards/ and jobs/.
    #[arg(long, env = "GITOPS_PATH", default_value = ".")]
    path: PathBuf,
    /// A mounted Secret: files username, password or token, identity, known_hosts.
    #[arg(long, env = "GITOPS_GIT_SECRET_DIR")]
    git_secret_dir: Option<PathBuf>,
    /// How long connecting to the remote, and then each read or write, may take.
    #[arg(long, env = "GITOPS_GIT_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    git_timeout: Duration,
    /// Apply only heads SSH-signed by a key of this file (ssh-keygen's allowed signers
    /// format, as git's gpg.ssh.allowedSignersFile).
    #[arg(long, env = "GITOPS_VERIFY_SIGNATURES")]
    verify_signatures: Option<PathBuf>,
}

/// How revisions are applied.
#[derive(clap::Args)]
struct ApplyArgs {
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
    /// Where dashboards' ConfigMaps go, for Grafana's sidecar to find.
    #[arg(long, env = "GITOPS_DASHBOARDS_NAMESPACE", default_value = "monitoring")]
    dashboards_namespace: String,
    /// Apply only namespaced objects in these namespaces (comma-separated), and watch
    /// only there: for RBAC limited to them (manifests/restricted/).
    #[arg(long, env = "GITOPS_ALLOW_NAMESPACES", value_delimiter = ',')]
    allow_namespaces: Option<Vec<String>>,
}

impl SourceArgs {
    fn git_source(&self) -> Result<GitSource> {
        let credentials = match &self.git_secret_dir {
            Some(dir) => Credentials::from_secret_dir(dir)?,
            None => Credentials::none(),
        };
        let source = GitSource::new(&self.repo, &self.branch, credentials);
        Ok(match &self.verify_signatures {
            Some(path) => source.verify_signatures(AllowedSigners::from_file(path)?),
            None => source,
        })
    }
}

impl ApplyArgs {
    /// `--namespace`, else the pod's own, else `gitops-system`.
    fn namespace(&self) -> String {
        self.namespace.clone().unwrap_or_else(|| {
            std::fs::read_to_string(POD_NAMESPACE_FILE)
                .map(|ns| ns.trim().to_owned())
                .unwrap_or_else(|_| "gitops-system".to_owned())
        })
    }

    fn options(self) -> sync::Options {
        sync::Options {
            inventory_namespace: self.namespace(),
            default_namespace: self.default_namespace,
            prune: self.prune,
            force_conflicts: self.force_conflicts,
            dashboards_namespace: self.dashboards_namespace,
            access: Access::new(self.allow_namespaces),
        }
    }
}

async fn cluster_client() -> Result<kube::Client> {
    kube::Client::try_default().await.context("connecting to the cluster (KUBECONFIG or in-cluster)")
}

/// How long a leader's claim lasts without renewal: the longest a standby waits after
/// the leader dies without releasing it.
const LEASE_DURATION: Duration = Duration::from_secs(15);

/// Whether the agent runs in a pod.
fn in_cluster() -> bool {
    std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
}

/// Where a pod's service account namespace is mounted.
const POD_NAMESPACE_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

fn main() -> ExitCode {
    let cli = Cli::parse();
    // notify logs at INFO each watch descriptor the kernel already dropped, which git
    // causes on every ref update of a watched local repository.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,notify=warn".into());
    // Colour codes only for a person at a terminal: a log file or collector gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    if in_cluster() {
        logs.json().init()
    } else {
        logs.init()
    }

    let git_timeout = match &cli.command {
        Cmd::Run(args) => Some(args.source.git_timeout),
        Cmd::Diff { source, .. } => source.as_ref().map(|source| source.git_timeout),
        Cmd::Validate(_) | Cmd::Suspend(_) | Cmd::Resume(_) | Cmd::Sync(_) => None,
    };
    if let Some(timeout) = git_timeout {
        // SAFETY: no thread exists yet; the runtime starts below.
        if let Err(e) = unsafe { gitops_agent::source::set_network_timeout(timeout) } {
            eprintln!("error: setting the git network timeout: {e}");
            return ExitCode::FAILURE;
        }
    }
    let outcome = match cli.command {
        Cmd::Validate(args) => validate(args),
        Cmd::Run(args) => runtime().and_then(|rt| rt.block_on(run(*args))),
        Cmd::Suspend(agent) => runtime().and_then(|rt| rt.block_on(ask(agent, control::Request::Suspend))),
        Cmd::Resume(agent) => runtime().and_then(|rt| rt.block_on(ask(agent, control::Request::Resume))),
        Cmd::Sync(agent) => runtime().and_then(|rt| rt.block_on(ask(agent, control::Request::Sync))),
        // Like diff(1) and `kubectl diff`: 1 means "changes", so an error is 2.
        Cmd::Diff { dir, source, apply, render } => {
            match runtime().and_then(|rt| rt.block_on(diff(dir, source, apply, render))) {
                Err(e) => {
                    eprintln!("error: {e:#}");
                    return ExitCode::from(2);
                }
                done => done,
            }
        }
    };
    match outcome {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Runtime::new().context("starting the async runtime")
}

fn validate(args: ValidateArgs) -> Result<ExitCode> {
    let dir = args.dir.as_path();
    // `validate repo/manifests` would find nothing to check and pass.
    let kustomization = render::kustomize::kustomization_file(dir).is_some();
    if !kustomization && !render::SOURCE_DIRS.iter().any(|source| dir.join(source).is_dir()) {
        let named = dir.file_name().and_then(|name| name.to_str()).filter(|name| render::SOURCE_DIRS.contains(name));
        let hint = match (named, dir.parent()) {
            (Some(_), Some(parent)) => format!("; did you mean {}?", parent.display()),
            _ => String::new(),
        };
        let sources = render::SOURCE_DIRS.map(|source| format!("{source}/")).join(", ");
        println!(
            "{}: holds no kustomization and none of {sources}, so there is nothing to validate{hint}",
            dir.display()
        );
        return Ok(ExitCode::FAILURE);
    }
    let (dir, path_in_repo) = &in_repository(dir)?;
    let tools = args.render.tools(path_in_repo)?;
    let renderer = render::Renderer::new(tools.clone());
    let rendered = match renderer.render(dir, &args.apply.dashboards_namespace, &render::Capabilities::default()) {
        Ok(rendered) => rendered,
        Err(errors) => {
            for e in &errors {
                println!("{e}");
            }
            return Ok(ExitCode::FAILURE);
        }
    };
    let report = validate::check(dir, &rendered);
    for e in &report.errors {
        println!("{e}");
    }
    if !report.unchecked.is_empty() && !args.cluster {
        let kinds: Vec<String> = report.unchecked.iter().map(|(kind, n)| format!("{kind} ({n})")).collect();
        eprintln!(
            "note: not built into Kubernetes {} nor defined by a CRD in the repository, so only --cluster checks: {}",
            validate::schema::Builtin::get().kubernetes,
            kinds.join(", ")
        );
    }
    if !report.errors.is_empty() {
        return Ok(ExitCode::FAILURE);
    }
    let (objects, jobs) = (rendered.manifests.len(), rendered.jobs.len());
    println!("{}: {objects} objects, {jobs} batch jobs, no errors", args.dir.display());
    if !args.cluster {
        return Ok(ExitCode::SUCCESS);
    }
    runtime()?.block_on(dry_run_on_cluster(dir, args.apply, tools))
}

/// A checked-out directory as an absolute path, and where it is in its repository: bases
/// and values files may come from anywhere in the repository that holds it. The search
/// goes up from the absolute path, as a relative one ends at the working directory (and
/// `""` joined with `.git` is the working directory's).
fn in_repository(dir: &std::path::Path) -> Result<(PathBuf, PathBuf)> {
    let dir = std::path::absolute(dir).with_context(|| format!("resolving {}", dir.display()))?;
    let repo = dir.ancestors().find(|d| d.join(".git").exists()).unwrap_or(&dir);
    let path_in_repo = dir.strip_prefix(repo).map_or_else(|_| PathBuf::from("."), std::path::Path::to_owned);
    Ok((dir, path_in_repo))
}

/// `validate --cluster`: the revision through `run`'s checks and dry run, writing nothing.
async fn dry_run_on_cluster(dir: &std::path::Path, apply: ApplyArgs, tools: render::Tools) -> Result<ExitCode> {
    // A writer that never leads: nothing is written, whatever happens.
    let writer = Writer::new(cluster_client().await?, Leadership::never().lead());
    let syncer = sync::Syncer::new(writer, apply.options()).with_tools(tools);
    match syncer.diff(dir).await {
        Ok(differences) => {
            println!("the cluster's dry run accepts every object; {} would change", differences.len());
            Ok(ExitCode::SUCCESS)
        }
        Err(sync::SyncError::Rejected(errors)) => {
            println!("the API server rejects the revision in a dry run:");
            for e in errors {
                println!("{e}");
            }
            Ok(ExitCode::FAILURE)
        }
        Err(e @ (sync::SyncError::Render(_) | sync::SyncError::EmptyRevision(_))) => {
            println!("{e}");
            Ok(ExitCode::FAILURE)
        }
        Err(e) => Err(e.into()),
    }
}

async fn run(args: RunArgs) -> Result<ExitCode> {
    let source = args.source.git_source()?;
    let webhook_secret = args
        .webhook_secret_file
        .as_deref()
        .map(WebhookSecret::from_file)
        .transpose()
        .context("reading --webhook-secret-file")?;
    let client = cluster_client().await?;
    let temporary;
    let work_dir = match args.work_dir {
        Some(dir) => dir,
        None => {
            temporary = tempfile::tempdir().context("creating a work directory")?;
            temporary.path().to_owned()
        }
    };
    let repo = &args.source.repo;
    let local_repo = std::path::Path::new(repo.strip_prefix("file://").unwrap_or(repo));
    let leader_election = args
        .leader_election
        .unwrap_or(in_cluster())
        .then(|| agent::LeaderElection { identity: leader::default_identity(), lease_duration: LEASE_DURATION });
    let options = agent::Options {
        source,
        branch: args.source.branch.clone(),
        path: args.source.path.clone(),
        interval: args.interval,
        work_dir,
        local_repo: local_repo.exists().then(|| local_repo.to_owned()),
        sync: args.apply.options(),
        drift: args.drift,
        health_timeout: args.health_timeout,
        webhook_secret,
        leader_election,
        status_report: true,
        render: args.render.tools(&args.source.path)?,
    };
    let listener =
        tokio::net::TcpListener::bind(&args.listen).await.with_context(|| format!("listening on {}", args.listen))?;
    let agent = Agent::start(client, listener, options).await?;
    tracing::info!(listen = %agent.address(), repo = %gitops_agent::source::redact_url(repo), branch = %args.source.branch, "gitops-agent started");
    shutdown_signal().await;
    tracing::info!("shutting down after the sync in flight");
    agent.stop().await;
    Ok(ExitCode::SUCCESS)
}

async fn ask(agent: AgentNamespace, request: control::Request) -> Result<ExitCode> {
    control::request(cluster_client().await?, &agent.namespace, request).await?;
    let asked = match request {
        control::Request::Suspend => "suspend: it applies, corrects, prunes and runs nothing until resumed",
        control::Request::Resume => "resume",
        control::Request::Sync => "fetch now",
    };
    println!("asked the agent in namespace {} to {asked}", agent.namespace);
    Ok(ExitCode::SUCCESS)
}

async fn diff(
    dir: Option<PathBuf>,
    source: Option<SourceArgs>,
    apply: ApplyArgs,
    render: RenderArgs,
) -> Result<ExitCode> {
    let work = tempfile::tempdir().context("creating a work directory")?;
    let (head, root, path_in_repo) = match (dir, source) {
        (Some(dir), _) => {
            let (root, path_in_repo) = in_repository(&dir)?;
            println!("diffing the working tree {} (uncommitted changes included)", dir.display());
            (format!("working tree {}", dir.display()), root, path_in_repo)
        }
        (None, Some(source)) => {
            let (head, tree) = gitops_agent::source::fetch_tree(&source.git_source()?, work.path())?;
            (head.to_string(), tree.join(&source.path), source.path)
        }
        (None, None) => anyhow::bail!("give --repo (a branch) or --dir (a working tree) to diff"),
    };
    // `diff` writes nothing: a writer that never leads makes sure of it.
    let writer = Writer::new(cluster_client().await?, Leadership::never().lead());
    let syncer = sync::Syncer::new(writer, apply.options()).with_tools(render.tools(&path_in_repo)?);
    let differences = syncer.diff(&root).await?;
    for d in &differences {
        match d.action {
            Action::Created => println!("+ {} ({}): created", d.id, d.origin),
            Action::Deleted => println!("- {}: pruned", d.id),
            _ => {
                println!("~ {} ({}): configured", d.id, d.origin);
                let pretty = |v: &Option<serde_json::Value>| serde_json::to_string_pretty(v).unwrap_or_default() + "\n";
                let (live, desired) = (pretty(&d.live), pretty(&d.desired));
                let text = similar::TextDiff::from_lines(&live, &desired);
                print!("{}", text.unified_diff().context_radius(3).header("live", &format!("git {head}")));
            }
        }
    }
    println!("{} objects would change at {head}", differences.len());
    Ok(if differences.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
