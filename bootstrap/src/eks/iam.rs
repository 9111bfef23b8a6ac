//! IAM: the cluster's role (assumed by EKS), the nodes' role (assumed by EC2), each
//! with the AWS-managed policies it needs, and the cluster's OIDC provider, through
//! which service accounts assume roles of their own (IRSA).
//!
//! Role names are unique per account, so roles are found by name; a role of that name
//! without this cluster's tag is someone else's and is never taken over.

use aws_sdk_iam::types::Tag;

use super::{Ctx, Error, Outcome, PLANNED, aws_error, is_planned};

/// The thumbprint of the root CA that signs EKS's OIDC endpoints (Amazon Root CA 1 via
/// Starfield), as eksctl registers it. IAM ignores thumbprints for issuers it trusts by
/// other means, but older API versions require one.
const OIDC_THUMBPRINT: &str = "9e99a48a9960b14926bb7f3b02e22da2b0ab7280";

/// The two roles' ARNs.
#[derive(Debug, Clone)]
pub struct Roles {
    pub cluster: String,
    pub node: String,
}

struct RoleSpec {
    suffix: &'static str,
    service: &'static str,
    policies: &'static [&'static str],
}

const CLUSTER_ROLE: RoleSpec =
    RoleSpec { suffix: "eks-cluster", service: "eks.amazonaws.com", policies: &["AmazonEKSClusterPolicy"] };
const NODE_ROLE: RoleSpec = RoleSpec {
    suffix: "eks-node",
    service: "ec2.amazonaws.com",
    policies: &["AmazonEKSWorkerNodePolicy", "AmazonEKS_CNI_Policy", "AmazonEC2ContainerRegistryReadOnly"],
};

pub fn role_name(ctx: &Ctx, suffix: &str) -> String {
    format!("{}-{suffix}", ctx.name)
}

fn tags(ctx: &Ctx, resource: &str) -> Vec<Tag> {
    ctx.tags(resource)
        .into_iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build().expect("key and value set"))
        .collect()
}

fn is_ours(ctx: &Ctx, tags: &[Tag]) -> bool {
    tags.iter().any(|t| t.key() == super::CLUSTER_TAG && t.value() == ctx.name)
}

pub async fn ensure_roles(ctx: &Ctx, partition: &str) -> Result<Roles, Error> {
    Ok(Roles {
        cluster: ensure_role(ctx, partition, &CLUSTER_ROLE).await?,
        node: ensure_role(ctx, partition, &NODE_ROLE).await?,
    })
}

async fn get_role(ctx: &Ctx, name: &str) -> Result<Option<aws_sdk_iam::types::Role>, Error> {
    match ctx.aws.iam.get_role().role_name(name).send().await {
        Ok(found) => Ok(found.role().cloned()),
        Err(e) if e.as_service_error().is_some_and(|e| e.is_no_such_entity_exception()) => Ok(None),
        Err(e) => Err(aws_error(format!("reading IAM role {name}"))(e)),
    }
}

async fn ensure_role(ctx: &Ctx, partition: &str, spec: &RoleSpec) -> Result<String, Error> {
    let name = role_name(ctx, spec.suffix);
    let arn = match get_role(ctx, &name).await? {
        Some(role) => {
            // GetRole returns the role's tags.
            if !is_ours(ctx, role.tags()) {
                return Err(Error::Invalid(format!(
                    "IAM role {name} exists but is not tagged {}={}: it is not this cluster's, and is left alone; \
                     delete or rename it, or choose another --cluster-name",
                    super::CLUSTER_TAG,
                    ctx.name
                )));
            }
            ctx.report(Outcome::Found, "IAM role", &name);
            role.arn().to_owned()
        }
        None if ctx.dry_run => {
            ctx.report(Outcome::Planned, &format!("IAM role {name} (assumed by {})", spec.service), "");
            for policy in spec.policies {
                ctx.report(Outcome::Planned, &format!("attachment of {policy} to {name}"), "");
            }
            return Ok(format!("{PLANNED} {name}"));
        }
        None => {
            let trust = serde_json::json!({
                "Version": "2012-10-17",
                "Statement": [{
                    "Effect": "Allow",
                    "Principal": { "Service": spec.service },
                    "Action": "sts:AssumeRole",
                }],
            });
            let created = ctx
                .aws
                .iam
                .create_role()
                .role_name(&name)
                .assume_role_policy_document(trust.to_string())
                .description(format!("EKS cluster {} ({}), made by gitops-bootstrap", ctx.name, spec.suffix))
                .set_tags(Some(tags(ctx, spec.suffix)))
                .send()
                .await
                .map_err(aws_error(format!("creating IAM role {name}")))?;
            ctx.report(Outcome::Created, "IAM role", &name);
            created.role().map(|r| r.arn().to_owned()).unwrap_or_default()
        }
    };
    let attached = ctx
        .aws
        .iam
        .list_attached_role_policies()
        .role_name(&name)
        .send()
        .await
        .map_err(aws_error(format!("listing the policies of IAM role {name}")))?;
    for policy in spec.policies {
        let policy_arn = format!("arn:{partition}:iam::aws:policy/{policy}");
        if attached.attached_policies().iter().any(|p| p.policy_arn() == Some(&policy_arn)) {
            continue;
        }
        if ctx.dry_run {
            ctx.report(Outcome::Planned, &format!("attachment of {policy} to {name}"), "");
            continue;
        }
        ctx.aws
            .iam
            .attach_role_policy()
            .role_name(&name)
            .policy_arn(&policy_arn)
            .send()
            .await
            .map_err(aws_error(format!("attaching {policy_arn} to IAM role {name}")))?;
        ctx.report(Outcome::Created, &format!("attachment to {name} of"), policy);
    }
    Ok(arn)
}

/// The OIDC providers tagged as this cluster's, by ARN.
async fn our_oidc_providers(ctx: &Ctx) -> Result<Vec<String>, Error> {
    let listed =
        ctx.aws.iam.list_open_id_connect_providers().send().await.map_err(aws_error("listing IAM OIDC providers"))?;
    let mut ours = Vec::new();
    for arn in listed.open_id_connect_provider_list().iter().filter_map(|p| p.arn()) {
        let provider = ctx
            .aws
            .iam
            .get_open_id_connect_provider()
            .open_id_connect_provider_arn(arn)
            .send()
            .await
            .map_err(aws_error(format!("reading IAM OIDC provider {arn}")))?;
        if is_ours(ctx, provider.tags()) {
            ours.push(arn.to_owned());
        }
    }
    Ok(ours)
}

/// Registers the cluster's service-account token issuer with IAM, unless it is.
pub async fn ensure_oidc_provider(ctx: &Ctx, issuer: Option<&str>) -> Result<(), Error> {
    let Some(issuer) = issuer.filter(|i| !is_planned(i)) else {
        ctx.report(Outcome::Planned, "IAM OIDC provider for the cluster's issuer", "");
        return Ok(());
    };
    // A provider's ARN ends with its URL without the scheme.
    let host_path = issuer.trim_start_matches("https://");
    let existing = our_oidc_providers(ctx).await?;
    if let Some(arn) = existing.iter().find(|arn| arn.ends_with(host_path)) {
        ctx.report(Outcome::Found, "IAM OIDC provider", arn);
        return Ok(());
    }
    if ctx.dry_run {
        ctx.report(Outcome::Planned, &format!("IAM OIDC provider {issuer}"), "");
        return Ok(());
    }
    let created = ctx
        .aws
        .iam
        .create_open_id_connect_provider()
        .url(issuer)
        .client_id_list("sts.amazonaws.com")
        .thumbprint_list(OIDC_THUMBPRINT)
        .set_tags(Some(tags(ctx, "oidc")))
        .send()
        .await
        .map_err(aws_error(format!("creating IAM OIDC provider {issuer}")))?;
    ctx.report(Outcome::Created, "IAM OIDC provider", created.open_id_connect_provider_arn().unwrap_or_default());
    Ok(())
}

pub async fn delete_oidc_provider(ctx: &Ctx) -> Result<(), Error> {
    for arn in our_oidc_providers(ctx).await? {
        ctx.aws
            .iam
            .delete_open_id_connect_provider()
            .open_id_connect_provider_arn(&arn)
            .send()
            .await
            .map_err(aws_error(format!("deleting IAM OIDC provider {arn}")))?;
        println!("  deleted IAM OIDC provider {arn}");
    }
    Ok(())
}

/// Detaches the roles' policies and deletes them; roles not tagged as ours stay.
pub async fn delete_roles(ctx: &Ctx) -> Result<(), Error> {
    for spec in [&NODE_ROLE, &CLUSTER_ROLE] {
        let name = role_name(ctx, spec.suffix);
        let Some(role) = get_role(ctx, &name).await? else { continue };
        if !is_ours(ctx, role.tags()) {
            println!("  IAM role {name} is not tagged as this cluster's: left alone");
            continue;
        }
        let attached = ctx
            .aws
            .iam
            .list_attached_role_policies()
            .role_name(&name)
            .send()
            .await
            .map_err(aws_error(format!("listing the policies of IAM role {name}")))?;
        for policy in attached.attached_policies().iter().filter_map(|p| p.policy_arn()) {
            ctx.aws
                .iam
                .detach_role_policy()
                .role_name(&name)
                .policy_arn(policy)
                .send()
                .await
                .map_err(aws_error(format!("detaching {policy} from IAM role {name}")))?;
        }
        ctx.aws
            .iam
            .delete_role()
            .role_name(&name)
            .send()
            .await
            .map_err(aws_error(format!("deleting IAM role {name}")))?;
        println!("  deleted IAM role {name}");
    }
    Ok(())
}
