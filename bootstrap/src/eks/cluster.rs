//! The EKS cluster, its IAM OIDC provider (through which service accounts assume roles
//! of their own, IRSA) and its managed node group.
//!
//! The API endpoint is public (limited to `--public-access-cidr`s) and private (nodes
//! and pods reach it inside the VPC). The caller gets cluster admin through
//! `bootstrapClusterCreatorAdminPermissions`, an access entry EKS makes with the
//! cluster, in authentication mode API_AND_CONFIG_MAP; a separate CreateAccessEntry
//! call would do the same, but not every EKS implementation has it (moto has not).
//! Nodes run in the private subnets.

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_eks::types::{
    AuthenticationMode, ClusterStatus, CreateAccessConfigRequest, NodegroupScalingConfig, NodegroupStatus,
    VpcConfigRequest,
};

use super::iam::{self, CLUSTER_ROLE, NODE_ROLE};
use super::network::subnet_key;
use super::resources::{Entry, Group, Known, Lookup, Resource, Step, Wait, wait_until};
use super::{Ctx, Error, UpOptions, aws_error};

/// The thumbprint of the root CA that signs EKS's OIDC endpoints (Amazon Root CA 1 via
/// Starfield), as eksctl registers it. IAM ignores thumbprints for issuers it trusts by
/// other means, but older API versions require one.
const OIDC_THUMBPRINT: &str = "9e99a48a9960b14926bb7f3b02e22da2b0ab7280";

/// What the kubeconfig needs of the cluster.
#[derive(Debug, Clone)]
pub struct ClusterInfo {
    pub name: String,
    pub arn: String,
    pub endpoint: String,
    /// Base64 PEM of the cluster's CA, as EKS gives it.
    pub certificate_authority: String,
}

/// The cluster's entries of the resource list: the cluster in the subnets of `zones`,
/// its OIDC provider and its node group.
pub fn resources(ctx: &Ctx, zones: &[String]) -> Vec<Entry> {
    let subnets = |public: bool| zones.iter().map(|z| subnet_key(z, public)).collect::<Vec<_>>();
    let (private, public) = (subnets(false), subnets(true));
    let group = format!("{}-nodes", ctx.name);
    vec![
        Entry::new(
            Group::Eks,
            "cluster",
            format!("EKS cluster {}", ctx.name),
            Cluster { private: private.clone(), public: public.clone() },
        )
        .needs(CLUSTER_ROLE.keys().into_iter().chain(private.clone()).chain(public)),
        Entry::new(Group::Eks, "oidc", "IAM OIDC provider", OidcProvider).needs(["cluster"]),
        Entry::new(
            Group::Eks,
            "nodegroup",
            format!("node group {group}"),
            NodeGroup { name: group.clone(), private: private.clone() },
        )
        .needs(std::iter::once("cluster".to_owned()).chain(NODE_ROLE.keys()).chain(private)),
    ]
}

fn tags(ctx: &Ctx, resource: &str) -> HashMap<String, String> {
    ctx.tags(resource).into_iter().collect()
}

pub async fn describe(ctx: &Ctx) -> Result<Option<aws_sdk_eks::types::Cluster>, Error> {
    match ctx.aws.eks.describe_cluster().name(&ctx.name).send().await {
        Ok(found) => Ok(found.cluster().cloned()),
        Err(e) if e.as_service_error().is_some_and(|e| e.is_resource_not_found_exception()) => Ok(None),
        Err(e) => Err(aws_error(format!("reading EKS cluster {}", ctx.name))(e)),
    }
}

/// The cluster's endpoint and CA, once `up` has made it.
pub async fn info(ctx: &Ctx) -> Result<ClusterInfo, Error> {
    let cluster = describe(ctx).await?.ok_or_else(|| Error::Invalid(format!("EKS cluster {} is gone", ctx.name)))?;
    Ok(ClusterInfo {
        name: cluster.name().unwrap_or_default().to_owned(),
        arn: cluster.arn().unwrap_or_default().to_owned(),
        endpoint: cluster.endpoint().unwrap_or_default().to_owned(),
        certificate_authority: cluster.certificate_authority().and_then(|c| c.data()).unwrap_or_default().to_owned(),
    })
}

/// The cluster, in all its subnets; its id is its ARN.
struct Cluster {
    private: Vec<String>,
    public: Vec<String>,
}

impl Resource for Cluster {
    fn plan(&self, options: &UpOptions) -> String {
        format!(
            "(Kubernetes {}, endpoint public for {} and private)",
            options.kubernetes_version,
            options.public_access_cidrs.join(",")
        )
    }
    fn find<'a>(&'a self, ctx: &'a Ctx, _known: &'a Known) -> Step<'a, Lookup> {
        Box::pin(async move {
            Ok(describe(ctx).await?.map_or(Lookup::Absent, |c| Lookup::Ours(c.arn().unwrap_or(&ctx.name).to_owned())))
        })
    }
    fn create<'a>(&'a self, ctx: &'a Ctx, known: &'a Known, options: &'a UpOptions) -> Step<'a, String> {
        Box::pin(async move {
            let subnets = self.private.iter().chain(&self.public).map(|s| known.get(s).to_owned()).collect();
            let vpc = VpcConfigRequest::builder()
                .set_subnet_ids(Some(subnets))
                .endpoint_public_access(true)
                .endpoint_private_access(true)
                .set_public_access_cidrs(Some(options.public_access_cidrs.clone()))
                .build();
            let access = CreateAccessConfigRequest::builder()
                .authentication_mode(AuthenticationMode::ApiAndConfigMap)
                .bootstrap_cluster_creator_admin_permissions(true)
                .build();
            let created = ctx
                .aws
                .eks
                .create_cluster()
                .name(&ctx.name)
                .version(&options.kubernetes_version)
                .role_arn(known.get(CLUSTER_ROLE.key()))
                .resources_vpc_config(vpc)
                .access_config(access)
                .set_tags(Some(tags(ctx, "cluster")))
                .send()
                .await
                .map_err(aws_error(format!("creating EKS cluster {}", ctx.name)))?;
            Ok(created.cluster().and_then(|c| c.arn()).unwrap_or(&ctx.name).to_owned())
        })
    }
    fn delete<'a>(&'a self, ctx: &'a Ctx, _known: &'a Known, _arn: &'a str) -> Step<'a, ()> {
        Box::pin(async move {
            // A `down` that timed out left it deleting; a second delete call would fail.
            if describe(ctx).await?.is_some_and(|c| c.status() == Some(&ClusterStatus::Deleting)) {
                return Ok(());
            }
            let request = ctx.aws.eks.delete_cluster().name(&ctx.name).send();
            request.await.map_err(aws_error(format!("deleting EKS cluster {}", ctx.name)))?;
            Ok(())
        })
    }
    fn ready<'a>(&'a self, ctx: &'a Ctx, _arn: &'a str, wait: &'a Wait) -> Step<'a, ()> {
        Box::pin(async move {
            let what = format!("EKS cluster {} ACTIVE", ctx.name);
            wait_until(&what, Duration::from_secs(15), wait, || async {
                let cluster = describe(ctx).await?.ok_or_else(|| {
                    Error::Invalid(format!("EKS cluster {} disappeared while waiting for it", ctx.name))
                })?;
                Ok(match cluster.status() {
                    Some(ClusterStatus::Active) => None,
                    Some(ClusterStatus::Failed) => {
                        return Err(Error::Invalid(format!(
                            "EKS cluster {} is FAILED; delete it with `gitops-bootstrap down --provider eks \
                             --cluster-name {} --region {}` and run up again",
                            ctx.name, ctx.name, ctx.aws.region
                        )));
                    }
                    status => Some(format!("status {}", status.map(|s| s.as_str()).unwrap_or("unknown"))),
                })
            })
            .await
        })
    }
    fn gone<'a>(&'a self, ctx: &'a Ctx, _arn: &'a str, wait: &'a Wait) -> Step<'a, ()> {
        Box::pin(async move {
            let what = format!("EKS cluster {} deleted", ctx.name);
            wait_until(&what, Duration::from_secs(15), wait, || async {
                Ok(describe(ctx)
                    .await?
                    .map(|c| format!("status {}", c.status().map(|s| s.as_str()).unwrap_or("unknown"))))
            })
            .await
        })
    }
}

/// The IAM OIDC provider of the cluster's service-account token issuer; its id is its ARN.
struct OidcProvider;

impl OidcProvider {
    /// The cluster's issuer, and this cluster's providers by ARN.
    async fn issuer_and_ours(&self, ctx: &Ctx) -> Result<Option<(String, Vec<String>)>, Error> {
        let issuer = describe(ctx).await?.and_then(|c| c.identity()?.oidc()?.issuer().map(str::to_owned));
        let Some(issuer) = issuer else { return Ok(None) };
        let listed = ctx
            .aws
            .iam
            .list_open_id_connect_providers()
            .send()
            .await
            .map_err(aws_error("listing IAM OIDC providers"))?;
        let mut ours = Vec::new();
        for arn in listed.open_id_connect_provider_list().iter().filter_map(|p| p.arn()) {
            let request = ctx.aws.iam.get_open_id_connect_provider().open_id_connect_provider_arn(arn).send();
            let provider = request.await.map_err(aws_error(format!("reading IAM OIDC provider {arn}")))?;
            if iam::is_ours(ctx, provider.tags()) {
                ours.push(arn.to_owned());
            }
        }
        Ok(Some((issuer, ours)))
    }
}

impl Resource for OidcProvider {
    fn plan(&self, _options: &UpOptions) -> String {
        "for the cluster's issuer".into()
    }
    fn find<'a>(&'a self, ctx: &'a Ctx, known: &'a Known) -> Step<'a, Lookup> {
        Box::pin(async move {
            if known.id("cluster").is_none() {
                return Ok(Lookup::Absent);
            }
            let Some((issuer, ours)) = self.issuer_and_ours(ctx).await? else { return Ok(Lookup::Absent) };
            // A provider's ARN ends with its URL without the scheme.
            let host_path = issuer.trim_start_matches("https://");
            Ok(ours.into_iter().find(|arn| arn.ends_with(host_path)).map_or(Lookup::Absent, Lookup::Ours))
        })
    }
    fn create<'a>(&'a self, ctx: &'a Ctx, _known: &'a Known, _options: &'a UpOptions) -> Step<'a, String> {
        Box::pin(async move {
            let issuer = describe(ctx).await?.and_then(|c| c.identity()?.oidc()?.issuer().map(str::to_owned));
            let issuer =
                issuer.ok_or_else(|| Error::Invalid(format!("EKS cluster {} has no OIDC issuer", ctx.name)))?;
            let created = ctx
                .aws
                .iam
                .create_open_id_connect_provider()
                .url(&issuer)
                .client_id_list("sts.amazonaws.com")
                .thumbprint_list(OIDC_THUMBPRINT)
                .set_tags(Some(iam::tags(ctx, "oidc")))
                .send()
                .await
                .map_err(aws_error(format!("creating IAM OIDC provider {issuer}")))?;
            Ok(created.open_id_connect_provider_arn().unwrap_or_default().to_owned())
        })
    }
    fn delete<'a>(&'a self, ctx: &'a Ctx, _known: &'a Known, arn: &'a str) -> Step<'a, ()> {
        Box::pin(async move {
            let request = ctx.aws.iam.delete_open_id_connect_provider().open_id_connect_provider_arn(arn).send();
            request.await.map_err(aws_error(format!("deleting IAM OIDC provider {arn}")))?;
            Ok(())
        })
    }
}

/// The managed node group, in the private subnets; its id is its name.
struct NodeGroup {
    name: String,
    private: Vec<String>,
}

impl NodeGroup {
    async fn describe(&self, ctx: &Ctx) -> Result<Option<aws_sdk_eks::types::Nodegroup>, Error> {
        match ctx.aws.eks.describe_nodegroup().cluster_name(&ctx.name).nodegroup_name(&self.name).send().await {
            Ok(found) => Ok(found.nodegroup().cloned()),
            Err(e) if e.as_service_error().is_some_and(|e| e.is_resource_not_found_exception()) => Ok(None),
            Err(e) => Err(aws_error(format!("reading node group {} of EKS cluster {}", self.name, ctx.name))(e)),
        }
    }

    fn status(group: &aws_sdk_eks::types::Nodegroup) -> String {
        format!("status {}", group.status().map(|s| s.as_str()).unwrap_or("unknown"))
    }
}

impl Resource for NodeGroup {
    fn plan(&self, options: &UpOptions) -> String {
        format!(
            "({} × {}..{}, {} desired, in the private subnets)",
            options.instance_type, options.nodes_min, options.nodes_max, options.nodes_desired
        )
    }
    fn find<'a>(&'a self, ctx: &'a Ctx, known: &'a Known) -> Step<'a, Lookup> {
        Box::pin(async move {
            if known.id("cluster").is_none() {
                return Ok(Lookup::Absent);
            }
            Ok(self.describe(ctx).await?.map_or(Lookup::Absent, |_| Lookup::Ours(self.name.clone())))
        })
    }
    fn create<'a>(&'a self, ctx: &'a Ctx, known: &'a Known, options: &'a UpOptions) -> Step<'a, String> {
        Box::pin(async move {
            let scaling = NodegroupScalingConfig::builder()
                .min_size(options.nodes_min)
                .desired_size(options.nodes_desired)
                .max_size(options.nodes_max)
                .build();
            ctx.aws
                .eks
                .create_nodegroup()
                .cluster_name(&ctx.name)
                .nodegroup_name(&self.name)
                .node_role(known.get(NODE_ROLE.key()))
                .set_subnets(Some(self.private.iter().map(|s| known.get(s).to_owned()).collect()))
                .scaling_config(scaling)
                .instance_types(&options.instance_type)
                .set_tags(Some(tags(ctx, "nodegroup")))
                .send()
                .await
                .map_err(aws_error(format!("creating node group {}", self.name)))?;
            Ok(self.name.clone())
        })
    }
    fn delete<'a>(&'a self, ctx: &'a Ctx, _known: &'a Known, _name: &'a str) -> Step<'a, ()> {
        Box::pin(async move {
            // A `down` that timed out left it deleting; a second delete call would fail.
            if self.describe(ctx).await?.is_some_and(|g| g.status() == Some(&NodegroupStatus::Deleting)) {
                return Ok(());
            }
            let request = ctx.aws.eks.delete_nodegroup().cluster_name(&ctx.name).nodegroup_name(&self.name).send();
            request.await.map_err(aws_error(format!("deleting node group {}", self.name)))?;
            Ok(())
        })
    }
    fn ready<'a>(&'a self, ctx: &'a Ctx, _name: &'a str, wait: &'a Wait) -> Step<'a, ()> {
        Box::pin(async move {
            let what = format!("node group {} ACTIVE", self.name);
            wait_until(&what, Duration::from_secs(15), wait, || async {
                let group = self.describe(ctx).await?.ok_or_else(|| {
                    Error::Invalid(format!("node group {} disappeared while waiting for it", self.name))
                })?;
                Ok(match group.status() {
                    Some(NodegroupStatus::Active) => None,
                    Some(status @ (NodegroupStatus::CreateFailed | NodegroupStatus::Degraded)) => {
                        return Err(Error::Invalid(format!(
                            "node group {} is {} ({:?}); run `down` and `up` again",
                            self.name,
                            status.as_str(),
                            group.health().map(|h| h.issues())
                        )));
                    }
                    _ => Some(Self::status(&group)),
                })
            })
            .await
        })
    }
    fn gone<'a>(&'a self, ctx: &'a Ctx, _name: &'a str, wait: &'a Wait) -> Step<'a, ()> {
        Box::pin(async move {
            let what = format!("node group {} deleted", self.name);
            wait_until(&what, Duration::from_secs(15), wait, || async {
                Ok(self.describe(ctx).await?.as_ref().map(Self::status))
            })
            .await
        })
    }
}
