//! The `gitops-bootstrap` command line: a thin layer over the library.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use gitops_bootstrap::eks;
use gitops_bootstrap::install::{self, InstallOptions};
use gitops_bootstrap::local::{self, LocalControlPlane, Options, agent};

#[derive(Parser)]
#[command(version, about = "Bring up a cluster for the GitOps agent and install the agent")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, PartialEq, ValueEnum)]
enum Provider {
    /// A control plane on this machine's loopback, built from Go modules.
    Local,
    /// Amazon EKS, with its VPC, IAM roles and node group.
    Eks,
}

/// The providers `status` and `prepare` serve: EKS keeps no state on this machine to
/// report or prepare (`up --provider eks --dry-run` shows an EKS cluster's state).
#[derive(Clone, Copy, PartialEq, ValueEnum)]
enum LocalProvider {
    /// A control plane on this machine's loopback, built from Go modules.
    Local,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start the cluster and install the agent, then return, leaving it running.
    Up {
        #[arg(long, value_enum)]
        provider: Provider,
        /// Local: where the control plane keeps its state; `DIR/kubeconfig` is written here.
        #[arg(long, required_if_eq("provider", "local"))]
        state_dir: Option<PathBuf>,
        /// The repository the agent follows (URL or path); local default: a new git
        /// repository made from repo-template/ in `STATE_DIR/repo`.
        #[arg(long, required_if_eq("provider", "eks"))]
        repo: Option<String>,
        /// Local, with --agent-process: address of the agent's /metrics, /status and /hooks/git.
        #[arg(long, default_value = "127.0.0.1:8080")]
        agent_listen: String,
        /// Local: run the agent as a process on this machine (for development) instead
        /// of as pods in the cluster; implied by --no-node.
        #[arg(long)]
        agent_process: bool,
        /// Local: start the cluster only, without the agent.
        #[arg(long)]
        no_agent: bool,
        /// Local: only the control plane (etcd, API server, controller manager), no node:
        /// objects are stored and reconciled, but no pod runs.
        #[arg(long)]
        no_node: bool,
        /// Local: the MIDI files the local S3 endpoint serves to the batch job (default:
        /// a small generated corpus in STATE_DIR/midi).
        #[arg(long)]
        midi_dir: Option<PathBuf>,
        /// Local: unpacked charts holding kube-prometheus-stack and the charts it depends
        /// on (`helm pull --untar`), vendored into the repository made from repo-template
        /// for its monitoring stack, since the node's pods reach no chart repository
        /// [env: GITOPS_CHARTS_DIR].
        #[arg(long)]
        charts_dir: Option<PathBuf>,
        // Boxed: the EKS and install flags would make every `Cmd` as large as this variant.
        #[command(flatten)]
        eks: Box<EksUpArgs>,
        #[command(flatten)]
        aws: AwsArgs,
        #[command(flatten)]
        install: Box<InstallArgs>,
    },
    /// Stop or delete everything `up` made.
    Down {
        #[arg(long, value_enum)]
        provider: Provider,
        /// Local: the state directory `up` was given; it is removed.
        #[arg(long, required_if_eq("provider", "local"))]
        state_dir: Option<PathBuf>,
        /// EKS: the cluster `up` made, found again by its tags.
        #[arg(long, required_if_eq("provider", "eks"))]
        cluster_name: Option<String>,
        #[command(flatten)]
        aws: AwsArgs,
        /// EKS: keep the VPC, subnets, gateways and addresses.
        #[arg(long)]
        keep_vpc: bool,
        /// EKS: remove the agent through this kubeconfig instead of the cluster's.
        #[arg(long)]
        install_kubeconfig: Option<PathBuf>,
        /// EKS: the kubeconfig `up` wrote (default ~/.kube/gitops-NAME).
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// EKS: how long each deletion may take.
        #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Say what runs.
    Status {
        /// Only local: for EKS, `up --provider eks --dry-run` shows the cluster's state.
        #[arg(long, value_enum)]
        provider: LocalProvider,
        /// The state directory `up` was given.
        #[arg(long)]
        state_dir: PathBuf,
    },
    /// Build (or find in the cache) the local cluster's binaries and base image, and exit.
    Prepare {
        /// Only local: EKS needs nothing built here.
        #[arg(long, value_enum)]
        provider: LocalProvider,
    },
    /// Print an ExecCredential with an EKS bearer token (kubectl's exec authentication).
    Token {
        #[arg(long)]
        cluster: String,
        #[command(flatten)]
        aws: AwsArgs,
    },
}

#[derive(clap::Args)]
struct AwsArgs {
    /// AWS region (else AWS_REGION or the profile's).
    #[arg(long)]
    region: Option<String>,
    /// AWS profile (else AWS_PROFILE).
    #[arg(long)]
    profile: Option<String>,
}

impl AwsArgs {
    fn options(&self) -> eks::AwsOptions {
        eks::AwsOptions { region: self.region.clone(), profile: self.profile.clone() }
    }
}

#[derive(clap::Args)]
struct EksUpArgs {
    /// EKS: the cluster's name; every AWS resource is tagged with it.
    #[arg(long, required_if_eq("provider", "eks"))]
    cluster_name: Option<String>,
    /// EKS: the cluster's Kubernetes version.
    #[arg(long, default_value = "1.33")]
    kubernetes_version: String,
    /// Availability zones to spread the subnets over (2 or 3).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(2..=3))]
    zones: u8,
    /// One NAT gateway per zone instead of one for all (more resilient, costs more).
    #[arg(long)]
    nat_per_zone: bool,
    /// CIDRs allowed to reach the cluster's public API endpoint (repeat the flag).
    #[arg(long = "public-access-cidr", default_value = "0.0.0.0/0")]
    public_access_cidrs: Vec<String>,
    /// EKS: the node group's EC2 instance type.
    #[arg(long, default_value = "t3.large")]
    instance_type: String,
    /// EKS: the node group's smallest size.
    #[arg(long, default_value_t = 2)]
    nodes_min: i32,
    /// EKS: the node group's size at creation.
    #[arg(long, default_value_t = 2)]
    nodes_desired: i32,
    /// EKS: the node group's largest size.
    #[arg(long, default_value_t = 4)]
    nodes_max: i32,
    /// Print what would be created, and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Where to write the cluster's kubeconfig (default ~/.kube/gitops-NAME).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Install the agent through this kubeconfig instead of the new cluster's.
    #[arg(long)]
    install_kubeconfig: Option<PathBuf>,
    /// Provision only; do not install the agent.
    #[arg(long)]
    no_install: bool,
    /// Return once the agent is installed, without waiting for its first sync.
    #[arg(long)]
    no_wait: bool,
    /// How long each long wait (cluster, node group, first sync) may take.
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

#[derive(clap::Args)]
struct InstallArgs {
    /// The branch the agent follows.
    #[arg(long, default_value = "main")]
    branch: String,
    /// The directory in the repository holding manifests/ (default `.`; for the
    /// repository `up --provider local` makes from repo-template: clusters/local).
    #[arg(long)]
    path: Option<String>,
    /// The agent's container image (see agent/Dockerfile).
    #[arg(long, default_value = install::DEFAULT_IMAGE)]
    agent_image: String,
    /// A file holding an HTTPS access token for the repository.
    #[arg(long)]
    git_token_file: Option<PathBuf>,
    /// The user name sent with the token.
    #[arg(long, default_value = "git")]
    git_username: String,
    /// A file holding an SSH private key for the repository.
    #[arg(long)]
    ssh_key_file: Option<PathBuf>,
    /// A known_hosts file with the SSH server's host keys (checked strictly).
    #[arg(long)]
    ssh_known_hosts_file: Option<PathBuf>,
    /// How long `up` waits, after the agent's first sync, for the revision to be Healthy.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    health_timeout: Duration,
    /// Return after the agent's first sync, without waiting for the revision to be Healthy.
    #[arg(long)]
    no_wait_healthy: bool,
}

impl InstallArgs {
    /// How long to wait for the applied revision to be Healthy; `None`: not at all.
    fn health_wait(&self) -> Option<Duration> {
        (!self.no_wait_healthy).then_some(self.health_timeout)
    }

    /// The install of `repo`, whose `--path` is `default_path` unless given.
    fn options(&self, repo: String, default_path: &str) -> InstallOptions {
        InstallOptions {
            repo,
            branch: self.branch.clone(),
            path: self.path.clone().unwrap_or_else(|| default_path.to_owned()),
            image: self.agent_image.clone(),
            git_token_file: self.git_token_file.clone(),
            git_username: self.git_username.clone(),
            ssh_key_file: self.ssh_key_file.clone(),
            ssh_known_hosts_file: self.ssh_known_hosts_file.clone(),
        }
    }
}

/// `~/.kube/gitops-NAME`.
fn default_kubeconfig(cluster: &str) -> PathBuf {
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".kube").join(format!("gitops-{cluster}"))
}

/// This invocation as a command line, for "run … to resume" messages.
fn this_command() -> String {
    let quote = |a: String| if a.contains([' ', '"', '\'']) { format!("'{}'", a.replace('\'', "'\\''")) } else { a };
    std::iter::once("gitops-bootstrap".to_owned())
        .chain(std::env::args().skip(1).map(quote))
        .collect::<Vec<_>>()
        .join(" ")
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
        Cmd::Up {
            provider: Provider::Local,
            state_dir,
            repo,
            agent_listen,
            agent_process,
            no_agent,
            no_node,
            midi_dir,
            charts_dir,
            install,
            ..
        } => {
            let state_dir = state_dir.expect("clap requires --state-dir for local");
            let agent = match (no_agent, agent_process || no_node) {
                (true, _) => LocalAgent::None,
                (false, true) => LocalAgent::Process { listen: agent_listen },
                (false, false) => LocalAgent::InCluster,
            };
            up_local(&state_dir, repo, agent, !no_node, midi_dir, charts_dir, &install).await
        }
        Cmd::Up { provider: Provider::Eks, repo, eks: args, aws, install, .. } => {
            let args = *args;
            let cluster_name = args.cluster_name.expect("clap requires --cluster-name for eks");
            if !(1 <= args.nodes_min && args.nodes_min <= args.nodes_desired && args.nodes_desired <= args.nodes_max) {
                bail!("node counts must satisfy 1 <= --nodes-min <= --nodes-desired <= --nodes-max");
            }
            let options = eks::UpOptions {
                kubeconfig: args.kubeconfig.unwrap_or_else(|| default_kubeconfig(&cluster_name)),
                cluster_name,
                aws: aws.options(),
                kubernetes_version: args.kubernetes_version,
                zones: args.zones.into(),
                nat_per_zone: args.nat_per_zone,
                public_access_cidrs: args.public_access_cidrs,
                instance_type: args.instance_type,
                nodes_min: args.nodes_min,
                nodes_desired: args.nodes_desired,
                nodes_max: args.nodes_max,
                dry_run: args.dry_run,
                install_kubeconfig: args.install_kubeconfig,
                no_install: args.no_install,
                no_wait: args.no_wait,
                health_wait: install.health_wait(),
                install: install.options(repo.expect("clap requires --repo for eks"), "."),
                timeout: args.timeout,
                resume: this_command(),
            };
            eks::up(&options).await.with_context(|| format!("up --provider eks (cluster {})", options.cluster_name))?;
            Ok(())
        }
        Cmd::Down { provider: Provider::Local, state_dir, .. } => {
            let state_dir = state_dir.expect("clap requires --state-dir for local");
            let stopped = local::stop_state_dir(&state_dir)?;
            if stopped.is_empty() {
                println!("nothing was running from {}", state_dir.display());
            } else {
                println!("stopped {}; removed {}", stopped.join(", "), state_dir.display());
            }
            Ok(())
        }
        Cmd::Down {
            provider: Provider::Eks,
            cluster_name,
            aws,
            keep_vpc,
            install_kubeconfig,
            kubeconfig,
            timeout,
            ..
        } => {
            let cluster_name = cluster_name.expect("clap requires --cluster-name for eks");
            let options = eks::DownOptions {
                kubeconfig: kubeconfig.unwrap_or_else(|| default_kubeconfig(&cluster_name)),
                cluster_name,
                aws: aws.options(),
                keep_vpc,
                install_kubeconfig,
                timeout,
                resume: this_command(),
            };
            eks::down(&options)
                .await
                .with_context(|| format!("down --provider eks (cluster {})", options.cluster_name))?;
            println!("cluster {} is gone", options.cluster_name);
            Ok(())
        }
        Cmd::Status { provider: LocalProvider::Local, state_dir } => print_status(&state_dir).await,
        Cmd::Prepare { provider: LocalProvider::Local } => {
            let cache = local::build::cache_dir();
            let agent_binary = agent::find_agent_binary();
            let (binaries, tools, base, agent_image) = tokio::task::spawn_blocking(move || {
                let (binaries, base) = (local::build::ensure_built(&cache)?, local::image::debian_base(&cache)?);
                let tools = local::build::ensure_render_tools(&cache)?;
                let agent_image = agent_binary
                    .is_file()
                    .then(|| local::dockerfile::build(&cache, &base, &local::dockerfile::agent(&agent_binary, &tools)?))
                    .transpose()?;
                for built in local::dockerfile::build_local_cluster(&cache)? {
                    println!("{} image: {}", built.name, built.archive.display());
                }
                Ok::<_, local::Error>((binaries, tools, base, agent_image))
            })
            .await??;
            println!(
                "kube-apiserver, -controller-manager, -scheduler, kubelet, kube-proxy: {}",
                binaries.kube.display()
            );
            println!("etcd: {}", binaries.etcd.display());
            println!("pause: {}", binaries.pause.display());
            println!("registry: {}", binaries.registry.display());
            println!("kustomize: {}", tools.kustomize.display());
            println!("helm: {}", tools.helm.display());
            println!("debian:bookworm base image: {}", base.display());
            match agent_image {
                Some(image) => println!("gitops-agent image: {}", image.archive.display()),
                None => {
                    println!("gitops-agent image: not built, no gitops-agent beside this binary (cargo build --bins)")
                }
            }
            Ok(())
        }
        Cmd::Token { cluster, aws } => {
            let token = eks::token::token(&cluster, &aws.options()).await.context("making an EKS token")?;
            println!("{}", eks::token::exec_credential(&token));
            Ok(())
        }
    }
}

/// Where `up --provider local` runs the agent.
enum LocalAgent {
    None,
    /// Pods of the cluster, installed from manifests/install/ as on EKS.
    InCluster,
    /// A process beside the cluster, answering on `listen`.
    Process {
        listen: String,
    },
}

/// How many songs the corpus has that `up` generates when given no `--midi-dir`.
const GENERATED_SONGS: usize = 40;

async fn up_local(
    state_dir: &std::path::Path,
    repo: Option<String>,
    agent: LocalAgent,
    node: bool,
    midi_dir: Option<PathBuf>,
    charts_dir: Option<PathBuf>,
    install_args: &InstallArgs,
) -> Result<()> {
    // A partly running control plane (one component crashed) is started afresh.
    let components = local::status(state_dir);
    if !components.is_empty() && components.iter().all(|(_, _, alive)| *alive) {
        println!("already running from {}", state_dir.display());
        return print_status(state_dir).await;
    }
    let options = Options { node, ..Options::new(state_dir, local::Lifetime::Detached) };
    let plane = LocalControlPlane::start(&options)
        .await
        .with_context(|| format!("starting the local cluster in {}", state_dir.display()))?;
    println!("Kubernetes {} is up at {}", plane.kubernetes_version(), plane.server());
    let mut images = Vec::new();
    if node {
        println!("node {} is Ready", local::network::NODE_NAME);
        // The Scale pipeline's and the monitoring stack's images, for the repository's
        // workloads to pull.
        let cache = local::build::cache_dir();
        let built = tokio::task::spawn_blocking(move || local::dockerfile::build_local_cluster(&cache))
            .await?
            .context("building the local cluster's images")?;
        for built in built {
            println!("image {} in the node's registry", plane.push_built(&built)?);
            images.push((built.name.to_owned(), built.tag));
        }
    }
    let resume = format!("gitops-bootstrap down --provider local --state-dir {}", state_dir.display());
    if !matches!(agent, LocalAgent::None) {
        let (repo, default_path) = match repo {
            Some(repo) => (repo, "."),
            None => {
                let midi_dir = match midi_dir {
                    Some(dir) => dir.canonicalize().with_context(|| format!("--midi-dir {}", dir.display()))?,
                    None => {
                        let dir = state_dir.canonicalize()?.join("midi");
                        local::corpus::write(&dir, GENERATED_SONGS)?;
                        dir
                    }
                };
                local::corpus::check_readable(&midi_dir)?;
                let charts = charts_dir.or_else(local::charts::charts_dir_from_env).context(
                    "the repository made from repo-template installs kube-prometheus-stack: \
                     give --charts-dir DIR (or GITOPS_CHARTS_DIR) holding it and its dependencies, unpacked",
                )?;
                let settings = agent::LocalSettings {
                    registry: plane.registry().map(str::to_owned),
                    images,
                    midi_dir: Some(midi_dir),
                    charts,
                };
                let repo = agent::repo_from_template(&state_dir.join("repo"), &settings)?;
                (repo.display().to_string(), agent::LOCAL_CLUSTER_PATH)
            }
        };
        let client = plane.client().await?;
        install::install_operator_stand_ins(&client).await.context("installing the stand-in CRDs")?;
        let binary = agent::find_agent_binary();
        let in_cluster = matches!(agent, LocalAgent::InCluster);
        let follows = match agent {
            LocalAgent::InCluster => {
                let options = agent::InClusterOptions {
                    binary,
                    install: install_args.options(repo.clone(), default_path),
                    lifetime: local::Lifetime::Detached,
                };
                let installed = agent::install_in_cluster(&plane, &options).await.with_context(|| {
                    format!("installing the agent in the cluster; it keeps running until `{resume}`")
                })?;
                format!(
                    "gitops-agent runs in the cluster ({}) and follows {} (as {})",
                    installed.image, repo, installed.repo_url
                )
            }
            LocalAgent::Process { listen } => {
                // The same install as on EKS, but with no node its pods never start:
                // the agent runs beside the control plane instead.
                install::install_and_report(&client, &install_args.options(repo.clone(), default_path))
                    .await
                    .context("installing the agent's manifests")?;
                let path = install_args.options(repo.clone(), default_path).path;
                let options = agent::AgentOptions { binary, repo: repo.clone(), path, listen };
                agent::start(plane.state_dir(), plane.kubeconfig(), &options).await.with_context(|| {
                    format!(
                        "starting gitops-agent ({}); the control plane keeps running until `{resume}`",
                        options.binary.display(),
                    )
                })?;
                format!(
                    "gitops-agent runs as a process and follows {repo}\n  status: http://{0}/status   metrics: http://{0}/metrics",
                    options.listen
                )
            }
            LocalAgent::None => unreachable!("handled above"),
        };
        let revision = match install::wait_synced(&client, Duration::from_secs(180), &resume).await {
            Ok(revision) => revision,
            Err(e) if in_cluster => {
                let pods = agent::pod_problems(&client).await.join("\n  ");
                return Err(
                    anyhow::anyhow!(e).context(format!("waiting for the agent's first sync; its pods:\n  {pods}"))
                );
            }
            Err(e) => return Err(anyhow::anyhow!(e).context("waiting for the agent's first sync")),
        };
        println!("{follows}\nIt has applied {revision}: commit to the repository and watch the cluster follow.");
        if let Some(timeout) = install_args.health_wait() {
            let kubeconfig = plane.kubeconfig().display();
            let look = format!(
                "  gitops-bootstrap status --provider local --state-dir {}\n  \
                 kubectl --kubeconfig {kubeconfig} get pods -A\n  \
                 kubectl --kubeconfig {kubeconfig} -n NAMESPACE describe KIND NAME\n\
                 The cluster keeps running; stop it with: {resume}",
                state_dir.display()
            );
            let healthy = install::wait_healthy(&client, timeout, &look).await?;
            println!("{healthy} is Healthy.");
        }
    }
    println!(
        "\n  export KUBECONFIG={}\n  kubectl get nodes\n\nStop it all with: {resume}",
        plane.kubeconfig().display(),
    );
    Ok(())
}

async fn print_status(state_dir: &std::path::Path) -> Result<()> {
    let components = local::status(state_dir);
    if components.is_empty() {
        println!("nothing runs from {}", state_dir.display());
        return Ok(());
    }
    for (name, pid, alive) in &components {
        println!("{name:<24} pid {pid:<8} {}", if *alive { "running" } else { "stopped" });
    }
    println!("logs: {}", state_dir.join("logs").join("NAME.log").display());
    if let Ok(registry) = std::fs::read_to_string(state_dir.join("registry")) {
        println!("registry: {}", registry.trim());
    }
    let kubeconfig = state_dir.join("kubeconfig");
    if !kubeconfig.exists() {
        return Ok(());
    }
    println!("kubeconfig: {}", kubeconfig.display());
    // What the agent last reported, wherever it runs (pods or a process).
    let report = async {
        let client = local::client_from_kubeconfig(&kubeconfig).await.ok()?;
        let api: kube::Api<k8s_openapi::api::core::v1::ConfigMap> =
            kube::Api::namespaced(client, agent::AGENT_NAMESPACE);
        api.get_opt(gitops_agent::report::STATUS_NAME).await.ok()?.and_then(|cm| cm.data)
    };
    match tokio::time::timeout(Duration::from_secs(5), report).await.ok().flatten() {
        Some(data) => {
            let get = |key: &str| data.get(key).map(String::as_str).unwrap_or("-");
            println!(
                "agent: {} at {}, health {}{}",
                get("phase"),
                get("revision"),
                get("health"),
                data.get("healthMessage").filter(|m| !m.is_empty()).map(|m| format!(" ({m})")).unwrap_or_default()
            );
        }
        None => println!("agent: no status reported (no agent, or the API server does not answer)"),
    }
    Ok(())
}
