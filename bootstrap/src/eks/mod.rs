//! The `eks` provider: a VPC, IAM roles, an EKS cluster with a managed node group and
//! an OIDC provider on AWS, then the agent installed into it.
//!
//! Every resource carries the tag `gitops.scale.dev/cluster = NAME` and one naming its
//! place (`gitops.scale.dev/resource = vpc`, `public-subnet-us-west-2a`, …), and is
//! looked for by those tags first (IAM roles and EKS objects by their names, which are
//! unique): a second `up` finds everything and creates nothing, an `up` after a failure
//! resumes at the first missing resource, and `--dry-run` prints what would be created.
//! Tags are set in the create call itself (`TagSpecifications`), so there is no window
//! in which a resource exists untagged.
//!
//! Modules: [`resources`] (the list of resources and its walks, forward for `up`,
//! backward for `down`), whose entries are in [`network`] (VPC, subnets, gateways,
//! addresses, routes), [`iam`] (roles and their policies) and [`cluster`] (EKS cluster,
//! OIDC provider, node group); [`token`] (the bearer token of `gitops-bootstrap
//! token`), [`kubeconfig`].

pub mod cluster;
pub mod iam;
pub mod kubeconfig;
pub mod network;
pub mod resources;
pub mod token;

use std::path::{Path, PathBuf};
use std::time::Duration;

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_sts::operation::get_caller_identity::GetCallerIdentityOutput;

use crate::install::{self, InstallError, InstallOptions};
use crate::progress::Timeout;

/// Tag naming the cluster a resource belongs to.
pub const CLUSTER_TAG: &str = "gitops.scale.dev/cluster";
/// Tag naming a resource's place in the cluster's network, to find it again.
pub const RESOURCE_TAG: &str = "gitops.scale.dev/resource";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An AWS call failed: which call, on what, and AWS's full message.
    #[error("{action}: {message}")]
    Aws { action: String, message: String },
    #[error("{0}")]
    Invalid(String),
    #[error(
        "{what} exists but is not tagged {tag}: it is not this cluster's, and is left alone; delete or rename it, \
         or choose another --cluster-name"
    )]
    NotOurs { what: String, tag: String },
    #[error(transparent)]
    Timeout(#[from] Timeout),
    #[error("writing kubeconfig {}: {source}", path.display())]
    Kubeconfig { path: PathBuf, source: std::io::Error },
    #[error("installing the agent: {0}")]
    Install(#[from] InstallError),
    #[error("connecting to the cluster through {}: {message}", path.display())]
    Connect { path: PathBuf, message: String },
}

/// Maps an AWS SDK error to [`Error::Aws`] naming `action`, with the SDK's whole chain
/// of causes (its `Display` alone says only "service error").
pub fn aws_error<E: std::error::Error + 'static>(action: impl Into<String>) -> impl FnOnce(E) -> Error {
    let action = action.into();
    move |e| Error::Aws { action, message: aws_sdk_ec2::error::DisplayErrorContext(&e).to_string() }
}

/// Where and as whom to talk to AWS.
#[derive(Debug, Clone, Default)]
pub struct AwsOptions {
    /// `--region`; else the SDK's (AWS_REGION, the profile's).
    pub region: Option<String>,
    /// `--profile`; else AWS_PROFILE or `default`.
    pub profile: Option<String>,
}

/// The SDK's configuration: its standard credential chain and settings
/// (`AWS_ENDPOINT_URL` included, which the tests point at moto), with `--region` and
/// `--profile` on top, and an HTTPS client on rustls with ring (as kube uses).
pub async fn sdk_config(options: &AwsOptions) -> Result<SdkConfig, Error> {
    let mut loader = aws_config::defaults(BehaviorVersion::latest()).http_client(http_client());
    if let Some(region) = &options.region {
        loader = loader.region(Region::new(region.clone()));
    }
    if let Some(profile) = &options.profile {
        loader = loader.profile_name(profile);
    }
    let config = loader.load().await;
    if config.region().is_none() {
        return Err(Error::Invalid("no AWS region: pass --region or set AWS_REGION".into()));
    }
    Ok(config)
}

/// The SDK's HTTP client: hyper on rustls with ring, the crypto provider kube already
/// brings (the SDK's default, aws-lc, would add a C library build).
pub fn http_client() -> aws_sdk_ec2::config::SharedHttpClient {
    aws_smithy_http_client::Builder::new()
        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
            aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https()
}

/// One client per service, sharing a configuration.
#[derive(Clone)]
pub struct Aws {
    pub ec2: aws_sdk_ec2::Client,
    pub iam: aws_sdk_iam::Client,
    pub eks: aws_sdk_eks::Client,
    pub sts: aws_sdk_sts::Client,
    pub region: String,
}

impl Aws {
    pub fn new(config: &SdkConfig) -> Aws {
        Aws {
            ec2: aws_sdk_ec2::Client::new(config),
            iam: aws_sdk_iam::Client::new(config),
            eks: aws_sdk_eks::Client::new(config),
            sts: aws_sdk_sts::Client::new(config),
            region: config.region().map(|r| r.to_string()).unwrap_or_default(),
        }
    }
}

/// Everything `up --provider eks` takes.
#[derive(Debug, Clone)]
pub struct UpOptions {
    pub cluster_name: String,
    pub aws: AwsOptions,
    /// Kubernetes version of the control plane (`--kubernetes-version`).
    pub kubernetes_version: String,
    /// Availability zones to spread over (2 or 3).
    pub zones: usize,
    /// One NAT gateway per zone (resilient) instead of one for all (cheap).
    pub nat_per_zone: bool,
    /// CIDRs allowed to reach the public API endpoint.
    pub public_access_cidrs: Vec<String>,
    pub instance_type: String,
    pub nodes_min: i32,
    pub nodes_desired: i32,
    pub nodes_max: i32,
    pub dry_run: bool,
    /// Where to write the new cluster's kubeconfig.
    pub kubeconfig: PathBuf,
    /// Install through this kubeconfig instead of the new cluster's.
    pub install_kubeconfig: Option<PathBuf>,
    /// Provision only.
    pub no_install: bool,
    pub no_wait: bool,
    /// How long to wait, after the first sync, for the revision to be Healthy (`None`: not).
    pub health_wait: Option<Duration>,
    pub install: InstallOptions,
    /// How long the cluster and node group may take to become ACTIVE, each.
    pub timeout: Duration,
    /// The command line that resumes this `up`, for timeout messages.
    pub resume: String,
}

/// What every resource's calls need: the clients and the cluster's name.
pub struct Ctx {
    pub aws: Aws,
    pub name: String,
    /// The caller's AWS partition (`aws`, `aws-cn`, …), for the ARNs of AWS-managed policies.
    pub partition: String,
}

impl Ctx {
    /// The clients, and who we are according to STS (which fails first when no
    /// credentials are set).
    async fn new(options: &AwsOptions, name: &str) -> Result<(Ctx, GetCallerIdentityOutput), Error> {
        let aws = Aws::new(&sdk_config(options).await?);
        let caller = aws
            .sts
            .get_caller_identity()
            .send()
            .await
            .map_err(aws_error("asking STS who we are (are AWS credentials set?)"))?;
        let partition = caller.arn().and_then(|a| a.split(':').nth(1)).filter(|p| !p.is_empty()).unwrap_or("aws");
        Ok((Ctx { partition: partition.to_owned(), aws, name: name.to_owned() }, caller))
    }

    /// The tags every resource of this cluster carries, plus `resource`.
    pub fn tags(&self, resource: &str) -> Vec<(String, String)> {
        vec![
            (CLUSTER_TAG.to_owned(), self.name.clone()),
            (RESOURCE_TAG.to_owned(), resource.to_owned()),
            ("Name".to_owned(), format!("{}-{resource}", self.name)),
        ]
    }
}

/// `up --provider eks`: provisions what is missing, writes the kubeconfig, installs the
/// agent and (unless `--no-wait`) waits for its first sync.
pub async fn up(options: &UpOptions) -> Result<(), Error> {
    let (ctx, caller) = Ctx::new(&options.aws, &options.cluster_name).await?;
    println!(
        "AWS account {} as {}, region {}",
        caller.account().unwrap_or("?"),
        caller.arn().unwrap_or_default(),
        ctx.aws.region
    );
    if options.dry_run {
        println!("dry run: nothing is changed; what `up` would do:");
    }
    let zones = network::zones(&ctx, options.zones).await?;
    let nats = if options.nat_per_zone { zones.len() } else { 1 };
    let created = resources::up(&ctx, &resources::list(&ctx, &zones, nats), options).await?;

    if options.dry_run {
        println!(
            "dry run: {created} resources would be created; then the kubeconfig is written and the agent installed"
        );
        return Ok(());
    }
    let cluster = cluster::info(&ctx).await?;
    let kubeconfig =
        kubeconfig::write(&options.kubeconfig, &ctx.name, &ctx.aws.region, options.aws.profile.as_deref(), &cluster)?;
    println!("kubeconfig: {} (export KUBECONFIG={})", kubeconfig.display(), kubeconfig.display());
    if created == 0 {
        println!("AWS: everything was in place, nothing created");
    }
    if options.no_install {
        return Ok(());
    }
    let target = options.install_kubeconfig.clone().unwrap_or(kubeconfig);
    let client = crate::local::client_from_kubeconfig(&target)
        .await
        .map_err(|e| Error::Connect { path: target.clone(), message: e.to_string() })?;
    install_agent(&client, options, &target).await
}

/// Installs the agent through `kubeconfig`, then waits for its first sync and for the
/// revision it applied to be Healthy (unless told not to).
async fn install_agent(client: &kube::Client, options: &UpOptions, kubeconfig: &Path) -> Result<(), Error> {
    install::install_and_report(client, &options.install).await?;
    if options.no_wait {
        println!("agent installed; not waiting for its first sync (--no-wait)");
        return Ok(());
    }
    let revision = install::wait_synced(client, options.timeout, &options.resume).await?;
    println!("the agent has synced {revision}");
    if let Some(timeout) = options.health_wait {
        let kubeconfig = kubeconfig.display();
        let look = format!(
            "  kubectl --kubeconfig {kubeconfig} -n {namespace} get configmap {status} -o yaml\n  \
             kubectl --kubeconfig {kubeconfig} get pods -A\n  \
             kubectl --kubeconfig {kubeconfig} -n NAMESPACE describe KIND NAME",
            namespace = install::AGENT_NAMESPACE,
            status = gitops_agent::report::STATUS_NAME,
        );
        let healthy = install::wait_healthy(client, timeout, &look).await?;
        println!("{healthy} is Healthy");
    }
    Ok(())
}

/// Everything `down --provider eks` takes.
#[derive(Debug, Clone)]
pub struct DownOptions {
    pub cluster_name: String,
    pub aws: AwsOptions,
    pub keep_vpc: bool,
    pub install_kubeconfig: Option<PathBuf>,
    /// The kubeconfig `up` wrote, used to remove the agent when no other is given.
    pub kubeconfig: PathBuf,
    pub timeout: Duration,
    pub resume: String,
}

/// `down --provider eks`: the agent first (so nothing re-creates objects while the rest
/// goes), then the resources `up` makes, last to first (the network kept with
/// `--keep-vpc`), each waited for. Whatever is already gone is skipped, so it can be
/// re-run.
pub async fn down(options: &DownOptions) -> Result<(), Error> {
    let (ctx, _) = Ctx::new(&options.aws, &options.cluster_name).await?;

    println!("agent:");
    remove_agent(&ctx, options).await?;
    // `up` may have made a NAT gateway per zone.
    let zones = network::zones_in_use(&ctx).await?;
    let mut list = resources::list(&ctx, &zones, zones.len());
    if options.keep_vpc {
        list.retain(|e| e.group != resources::Group::Network);
    }
    let wait = resources::Wait { timeout: options.timeout, resume: options.resume.clone() };
    resources::down(&ctx, &list, &wait).await?;
    if options.keep_vpc {
        println!("network: kept (--keep-vpc)");
    }
    Ok(())
}

/// Through `--install-kubeconfig` a failure is an error; through the cluster's own
/// kubeconfig it is a warning, since the cluster is about to be deleted with all in it.
async fn remove_agent(ctx: &Ctx, options: &DownOptions) -> Result<(), Error> {
    let (path, strict) = match &options.install_kubeconfig {
        Some(path) => (path.clone(), true),
        None => {
            let exists = cluster::describe(ctx).await?.is_some();
            if !exists || !options.kubeconfig.exists() {
                println!("  no cluster or kubeconfig: nothing to remove");
                return Ok(());
            }
            (options.kubeconfig.clone(), false)
        }
    };
    let attempt = async {
        let client = crate::local::client_from_kubeconfig(&path)
            .await
            .map_err(|e| Error::Connect { path: path.clone(), message: e.to_string() })?;
        Ok::<_, Error>(install::uninstall(&client).await?)
    };
    match tokio::time::timeout(Duration::from_secs(60), attempt).await {
        Ok(Ok(true)) => println!("  removed the agent"),
        Ok(Ok(false)) => println!("  the agent was not installed"),
        Ok(Err(e)) if strict => return Err(e),
        Ok(Err(e)) => println!("  warning: could not remove the agent ({e}); deleting the cluster anyway"),
        Err(_) if strict => {
            return Err(Error::Connect { path, message: "no answer within 60 s while removing the agent".into() });
        }
        Err(_) => println!("  warning: the cluster did not answer within 60 s; deleting it anyway"),
    }
    Ok(())
}
