//! IAM: the cluster's role (assumed by EKS) and the nodes' role (assumed by EC2), each
//! with the AWS-managed policies it needs. (The cluster's OIDC provider, also IAM, is
//! in [`super::cluster`]: it is made from the cluster.)
//!
//! Role names are unique per account, so roles are found by name; a role of that name
//! without this cluster's tag is someone else's and is never taken over.

use aws_sdk_iam::types::Tag;

use super::resources::{Entry, Group, Known, Lookup, Resource, Step};
use super::{Ctx, Error, UpOptions, aws_error};

pub struct RoleSpec {
    suffix: &'static str,
    service: &'static str,
    policies: &'static [&'static str],
}

pub const CLUSTER_ROLE: RoleSpec =
    RoleSpec { suffix: "eks-cluster", service: "eks.amazonaws.com", policies: &["AmazonEKSClusterPolicy"] };
pub const NODE_ROLE: RoleSpec = RoleSpec {
    suffix: "eks-node",
    service: "ec2.amazonaws.com",
    policies: &["AmazonEKSWorkerNodePolicy", "AmazonEKS_CNI_Policy", "AmazonEC2ContainerRegistryReadOnly"],
};

impl RoleSpec {
    pub fn key(&self) -> &'static str {
        self.suffix
    }

    /// The keys of the role's entries: the role, then its policies' attachments. What
    /// needs the role needs them all.
    pub fn keys(&self) -> Vec<String> {
        std::iter::once(self.key().to_owned()).chain(self.policies.iter().map(|p| self.attachment_key(p))).collect()
    }

    fn attachment_key(&self, policy: &str) -> String {
        format!("{}/{policy}", self.suffix)
    }
}

/// The roles' entries of the resource list, each followed by its policies' attachments.
pub fn resources(ctx: &Ctx) -> Vec<Entry> {
    let mut list = Vec::new();
    for spec in [&CLUSTER_ROLE, &NODE_ROLE] {
        let role = format!("{}-{}", ctx.name, spec.suffix);
        list.push(Entry::new(Group::Iam, spec.key(), format!("IAM role {role}"), Role { spec, name: role.clone() }));
        for policy in spec.policies {
            let name = format!("attachment of {policy} to {role}");
            let attachment = Attachment { role_key: spec.key(), role: role.clone(), policy };
            list.push(Entry::new(Group::Iam, spec.attachment_key(policy), name, attachment).needs([spec.key()]));
        }
    }
    list
}

pub fn tags(ctx: &Ctx, resource: &str) -> Vec<Tag> {
    ctx.tags(resource)
        .into_iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build().expect("key and value set"))
        .collect()
}

pub fn is_ours(ctx: &Ctx, tags: &[Tag]) -> bool {
    tags.iter().any(|t| t.key() == super::CLUSTER_TAG && t.value() == ctx.name)
}

async fn attached_policies(ctx: &Ctx, role: &str) -> Result<Vec<String>, Error> {
    let request = ctx.aws.iam.list_attached_role_policies().role_name(role).send();
    let attached = request.await.map_err(aws_error(format!("listing the policies of IAM role {role}")))?;
    Ok(attached.attached_policies().iter().filter_map(|p| p.policy_arn().map(str::to_owned)).collect())
}

async fn detach(ctx: &Ctx, role: &str, policy: &str) -> Result<(), Error> {
    let request = ctx.aws.iam.detach_role_policy().role_name(role).policy_arn(policy).send();
    request.await.map_err(aws_error(format!("detaching {policy} from IAM role {role}")))?;
    Ok(())
}

/// A role; its id is its ARN.
struct Role {
    spec: &'static RoleSpec,
    name: String,
}

impl Resource for Role {
    fn plan(&self, _options: &UpOptions) -> String {
        format!("(assumed by {})", self.spec.service)
    }
    fn find<'a>(&'a self, ctx: &'a Ctx, _known: &'a Known) -> Step<'a, Lookup> {
        Box::pin(async move {
            let role = match ctx.aws.iam.get_role().role_name(&self.name).send().await {
                Ok(found) => found.role().cloned(),
                Err(e) if e.as_service_error().is_some_and(|e| e.is_no_such_entity_exception()) => None,
                Err(e) => return Err(aws_error(format!("reading IAM role {}", self.name))(e)),
            };
            // GetRole returns the role's tags.
            Ok(match role {
                None => Lookup::Absent,
                Some(role) if is_ours(ctx, role.tags()) => Lookup::Ours(role.arn().to_owned()),
                Some(_) => Lookup::NotOurs,
            })
        })
    }
    fn create<'a>(&'a self, ctx: &'a Ctx, _known: &'a Known, _options: &'a UpOptions) -> Step<'a, String> {
        Box::pin(async move {
            let trust = serde_json::json!({
                "Version": "2012-10-17",
                "Statement": [{
                    "Effect": "Allow",
                    "Principal": { "Service": self.spec.service },
                    "Action": "sts:AssumeRole",
                }],
            });
            let created = ctx
                .aws
                .iam
                .create_role()
                .role_name(&self.name)
                .assume_role_policy_document(trust.to_string())
                .description(format!("EKS cluster {} ({}), made by gitops-bootstrap", ctx.name, self.spec.suffix))
                .set_tags(Some(tags(ctx, self.spec.suffix)))
                .send()
                .await
                .map_err(aws_error(format!("creating IAM role {}", self.name)))?;
            Ok(created.role().map(|r| r.arn().to_owned()).unwrap_or_default())
        })
    }
    /// Policies attached by hand as well as ours: IAM deletes no role with any attached.
    fn delete<'a>(&'a self, ctx: &'a Ctx, _known: &'a Known, _arn: &'a str) -> Step<'a, ()> {
        Box::pin(async move {
            for policy in attached_policies(ctx, &self.name).await? {
                detach(ctx, &self.name, &policy).await?;
            }
            let request = ctx.aws.iam.delete_role().role_name(&self.name).send();
            request.await.map_err(aws_error(format!("deleting IAM role {}", self.name)))?;
            Ok(())
        })
    }
}

/// An AWS-managed policy attached to a role; its id is the policy's ARN.
struct Attachment {
    role_key: &'static str,
    role: String,
    policy: &'static str,
}

impl Attachment {
    fn arn(&self, ctx: &Ctx) -> String {
        format!("arn:{}:iam::aws:policy/{}", ctx.partition, self.policy)
    }
}

impl Resource for Attachment {
    fn find<'a>(&'a self, ctx: &'a Ctx, known: &'a Known) -> Step<'a, Lookup> {
        Box::pin(async move {
            if known.id(self.role_key).is_none() {
                return Ok(Lookup::Absent);
            }
            let arn = self.arn(ctx);
            let attached = attached_policies(ctx, &self.role).await?.contains(&arn);
            Ok(if attached { Lookup::Ours(arn) } else { Lookup::Absent })
        })
    }
    fn create<'a>(&'a self, ctx: &'a Ctx, _known: &'a Known, _options: &'a UpOptions) -> Step<'a, String> {
        Box::pin(async move {
            let arn = self.arn(ctx);
            let request = ctx.aws.iam.attach_role_policy().role_name(&self.role).policy_arn(&arn).send();
            request.await.map_err(aws_error(format!("attaching {arn} to IAM role {}", self.role)))?;
            Ok(arn)
        })
    }
    fn delete<'a>(&'a self, ctx: &'a Ctx, _known: &'a Known, arn: &'a str) -> Step<'a, ()> {
        Box::pin(async move { detach(ctx, &self.role, arn).await })
    }
}
