//! The EKS cluster and its managed node group.
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

use super::iam::Roles;
use super::network::Network;
use super::{Ctx, Error, Outcome, UpOptions, aws_error, is_planned};
use crate::progress::{self, Poll};

/// What the kubeconfig and the OIDC provider need of the cluster.
#[derive(Debug, Clone, Default)]
pub struct ClusterInfo {
    pub name: String,
    pub arn: String,
    pub endpoint: String,
    /// Base64 PEM of the cluster's CA, as EKS gives it.
    pub certificate_authority: String,
    pub oidc_issuer: Option<String>,
}

fn node_group_name(ctx: &Ctx) -> String {
    format!("{}-nodes", ctx.name)
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

fn info(cluster: &aws_sdk_eks::types::Cluster) -> ClusterInfo {
    ClusterInfo {
        name: cluster.name().unwrap_or_default().to_owned(),
        arn: cluster.arn().unwrap_or_default().to_owned(),
        endpoint: cluster.endpoint().unwrap_or_default().to_owned(),
        certificate_authority: cluster.certificate_authority().and_then(|c| c.data()).unwrap_or_default().to_owned(),
        oidc_issuer: cluster.identity().and_then(|i| i.oidc()).and_then(|o| o.issuer()).map(str::to_owned),
    }
}

pub async fn ensure_cluster(
    ctx: &Ctx,
    options: &UpOptions,
    net: &Network,
    roles: &Roles,
) -> Result<ClusterInfo, Error> {
    match describe(ctx).await? {
        Some(cluster) => {
            if cluster.status() == Some(&ClusterStatus::Failed) {
                return Err(Error::Invalid(format!(
                    "EKS cluster {} is FAILED; delete it with `gitops-bootstrap down --provider eks --cluster-name {} \
                     --region {}` and run up again",
                    ctx.name, ctx.name, ctx.aws.region
                )));
            }
            ctx.report(Outcome::Found, "EKS cluster", cluster.arn().unwrap_or(&ctx.name));
        }
        None if ctx.dry_run => {
            ctx.report(
                Outcome::Planned,
                &format!(
                    "EKS cluster {} (Kubernetes {}, endpoint public for {} and private)",
                    ctx.name,
                    options.kubernetes_version,
                    options.public_access_cidrs.join(",")
                ),
                "",
            );
            return Ok(ClusterInfo { name: ctx.name.clone(), oidc_issuer: None, ..Default::default() });
        }
        None => {
            let subnets: Vec<String> = net.private_subnets.iter().chain(&net.public_subnets).cloned().collect();
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
                .role_arn(&roles.cluster)
                .resources_vpc_config(vpc)
                .access_config(access)
                .set_tags(Some(tags(ctx, "cluster")))
                .send()
                .await
                .map_err(aws_error(format!("creating EKS cluster {}", ctx.name)))?;
            ctx.report(Outcome::Created, "EKS cluster", created.cluster().and_then(|c| c.arn()).unwrap_or(&ctx.name));
        }
    }
    let cluster = progress::wait(
        &format!("EKS cluster {} ACTIVE", ctx.name),
        options.timeout,
        Duration::from_secs(15),
        &options.resume,
        || async {
            let cluster = describe(ctx)
                .await?
                .ok_or_else(|| Error::Invalid(format!("EKS cluster {} disappeared while waiting for it", ctx.name)))?;
            Ok::<_, Error>(match cluster.status() {
                Some(ClusterStatus::Active) => Poll::Done(cluster),
                Some(ClusterStatus::Failed) => {
                    return Err(Error::Invalid(format!("EKS cluster {} became FAILED", ctx.name)));
                }
                status => Poll::Pending(format!("status {}", status.map(|s| s.as_str()).unwrap_or("unknown"))),
            })
        },
    )
    .await??;
    Ok(info(&cluster))
}

async fn describe_node_group(ctx: &Ctx) -> Result<Option<aws_sdk_eks::types::Nodegroup>, Error> {
    let name = node_group_name(ctx);
    match ctx.aws.eks.describe_nodegroup().cluster_name(&ctx.name).nodegroup_name(&name).send().await {
        Ok(found) => Ok(found.nodegroup().cloned()),
        Err(e) if e.as_service_error().is_some_and(|e| e.is_resource_not_found_exception()) => Ok(None),
        Err(e) => Err(aws_error(format!("reading node group {name} of EKS cluster {}", ctx.name))(e)),
    }
}

pub async fn ensure_node_group(ctx: &Ctx, options: &UpOptions, net: &Network, roles: &Roles) -> Result<(), Error> {
    let name = node_group_name(ctx);
    let planned = ctx.dry_run && (is_planned(&roles.node) || describe(ctx).await?.is_none());
    let existing = if planned { None } else { describe_node_group(ctx).await? };
    match existing {
        Some(group) => {
            if group.status() == Some(&NodegroupStatus::CreateFailed) {
                return Err(Error::Invalid(format!(
                    "node group {name} is CREATE_FAILED ({:?}); run `down` and `up` again",
                    group.health().map(|h| h.issues())
                )));
            }
            ctx.report(Outcome::Found, "node group", &name);
        }
        None if ctx.dry_run => {
            ctx.report(
                Outcome::Planned,
                &format!(
                    "node group {name} ({} × {}..{}, {} desired, in the private subnets)",
                    options.instance_type, options.nodes_min, options.nodes_max, options.nodes_desired
                ),
                "",
            );
            return Ok(());
        }
        None => {
            let scaling = NodegroupScalingConfig::builder()
                .min_size(options.nodes_min)
                .desired_size(options.nodes_desired)
                .max_size(options.nodes_max)
                .build();
            ctx.aws
                .eks
                .create_nodegroup()
                .cluster_name(&ctx.name)
                .nodegroup_name(&name)
                .node_role(&roles.node)
                .set_subnets(Some(net.private_subnets.clone()))
                .scaling_config(scaling)
                .instance_types(&options.instance_type)
                .set_tags(Some(tags(ctx, "nodegroup")))
                .send()
                .await
                .map_err(aws_error(format!("creating node group {name}")))?;
            ctx.report(Outcome::Created, "node group", &name);
        }
    }
    progress::wait(
        &format!("node group {name} ACTIVE"),
        options.timeout,
        Duration::from_secs(15),
        &options.resume,
        || async {
            let group = describe_node_group(ctx)
                .await?
                .ok_or_else(|| Error::Invalid(format!("node group {name} disappeared while waiting for it")))?;
            Ok::<_, Error>(match group.status() {
                Some(NodegroupStatus::Active) => Poll::Done(()),
                Some(NodegroupStatus::CreateFailed | NodegroupStatus::Degraded) => {
                    return Err(Error::Invalid(format!(
                        "node group {name} became {}: {:?}",
                        group.status().map(|s| s.as_str()).unwrap_or_default(),
                        group.health().map(|h| h.issues())
                    )));
                }
                status => Poll::Pending(format!("status {}", status.map(|s| s.as_str()).unwrap_or("unknown"))),
            })
        },
    )
    .await??;
    Ok(())
}

pub async fn delete_node_group(ctx: &Ctx, timeout: Duration, resume: &str) -> Result<(), Error> {
    let name = node_group_name(ctx);
    let Some(group) = (if describe(ctx).await?.is_some() { describe_node_group(ctx).await? } else { None }) else {
        println!("  no node group {name}");
        return Ok(());
    };
    if group.status() != Some(&NodegroupStatus::Deleting) {
        ctx.aws
            .eks
            .delete_nodegroup()
            .cluster_name(&ctx.name)
            .nodegroup_name(&name)
            .send()
            .await
            .map_err(aws_error(format!("deleting node group {name}")))?;
    }
    progress::wait(&format!("node group {name} deleted"), timeout, Duration::from_secs(15), resume, || async {
        Ok::<_, Error>(match describe_node_group(ctx).await? {
            None => Poll::Done(()),
            Some(group) => Poll::Pending(format!("status {}", group.status().map(|s| s.as_str()).unwrap_or("unknown"))),
        })
    })
    .await??;
    Ok(())
}

pub async fn delete_cluster(ctx: &Ctx, timeout: Duration, resume: &str) -> Result<(), Error> {
    let Some(cluster) = describe(ctx).await? else {
        println!("  no EKS cluster {}", ctx.name);
        return Ok(());
    };
    if cluster.status() != Some(&ClusterStatus::Deleting) {
        ctx.aws
            .eks
            .delete_cluster()
            .name(&ctx.name)
            .send()
            .await
            .map_err(aws_error(format!("deleting EKS cluster {}", ctx.name)))?;
    }
    progress::wait(&format!("EKS cluster {} deleted", ctx.name), timeout, Duration::from_secs(15), resume, || async {
        Ok::<_, Error>(match describe(ctx).await? {
            None => Poll::Done(()),
            Some(c) => Poll::Pending(format!("status {}", c.status().map(|s| s.as_str()).unwrap_or("unknown"))),
        })
    })
    .await??;
    Ok(())
}
