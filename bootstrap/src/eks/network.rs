//! The cluster's network: a VPC (10.0.0.0/16) over 2–3 availability zones, each with a
//! private subnet (a /18, for nodes and internal load balancers) and a public one (a
//! /20, for internet-facing load balancers and the NAT gateways); an internet gateway;
//! one NAT gateway with its Elastic IP for all zones (default: one costs ~$32 a month
//! plus traffic) or one per zone (`--nat-per-zone`: a zone's outage then cuts no other
//! zone's egress); a public route table to the internet gateway and one private route
//! table per zone to its NAT gateway.
//!
//! Subnets carry the tags the AWS Load Balancer Controller and the in-tree cloud
//! provider look for: `kubernetes.io/role/elb` (public), `kubernetes.io/role/internal-elb`
//! (private) and `kubernetes.io/cluster/NAME = shared`.

use std::time::Duration;

use aws_sdk_ec2::types::{
    AttributeBooleanValue, DomainType, Filter, NatGatewayState, ResourceType, Tag, TagSpecification,
};

use super::{Ctx, Error, Outcome, PLANNED, aws_error, is_planned};
use crate::progress::{self, Poll};

/// What [`ensure`] found or made.
#[derive(Debug, Clone)]
pub struct Network {
    pub vpc_id: String,
    pub zones: Vec<String>,
    pub public_subnets: Vec<String>,
    pub private_subnets: Vec<String>,
}

fn tag_filter(key: &str, value: &str) -> Filter {
    Filter::builder().name(format!("tag:{key}")).values(value).build()
}

fn filter(name: &str, value: &str) -> Filter {
    Filter::builder().name(name).values(value).build()
}

/// Filters selecting this cluster's resource named `resource`.
fn ours(ctx: &Ctx, resource: &str) -> Vec<Filter> {
    vec![tag_filter(super::CLUSTER_TAG, &ctx.name), tag_filter(super::RESOURCE_TAG, resource)]
}

fn tag_spec(ctx: &Ctx, kind: ResourceType, resource: &str, extra: &[(String, String)]) -> TagSpecification {
    let tags = ctx.tags(resource).iter().chain(extra).map(|(k, v)| Tag::builder().key(k).value(v).build()).collect();
    TagSpecification::builder().resource_type(kind).set_tags(Some(tags)).build()
}

fn has_tags(tags: &[Tag], ctx: &Ctx, resource: &str) -> bool {
    let has = |key: &str, value: &str| tags.iter().any(|t| t.key() == Some(key) && t.value() == Some(value));
    has(super::CLUSTER_TAG, &ctx.name) && has(super::RESOURCE_TAG, resource)
}

/// Finds or creates the whole network; waits for NAT gateways to become available.
pub async fn ensure(
    ctx: &Ctx,
    zone_count: usize,
    nat_per_zone: bool,
    timeout: Duration,
    resume: &str,
) -> Result<Network, Error> {
    let zones = zones(ctx, zone_count).await?;
    let vpc_id = ensure_vpc(ctx).await?;
    let igw = ensure_internet_gateway(ctx, &vpc_id).await?;

    let mut public_subnets = Vec::new();
    let mut private_subnets = Vec::new();
    for (index, zone) in zones.iter().enumerate() {
        // 10.0.0.0/18, 10.0.64.0/18, 10.0.128.0/18 private; 10.0.192.0/20, … public.
        let private = format!("10.0.{}.0/18", 64 * index);
        let public = format!("10.0.{}.0/20", 192 + 16 * index);
        public_subnets.push(ensure_subnet(ctx, &vpc_id, zone, &public, true).await?);
        private_subnets.push(ensure_subnet(ctx, &vpc_id, zone, &private, false).await?);
    }

    let nat_count = if nat_per_zone { zones.len() } else { 1 };
    let mut nats = Vec::new();
    for (index, subnet) in public_subnets.iter().take(nat_count).enumerate() {
        let allocation = ensure_address(ctx, &format!("nat-eip-{index}")).await?;
        nats.push(ensure_nat_gateway(ctx, &vpc_id, subnet, &allocation, &format!("nat-{index}")).await?);
    }
    wait_nat_gateways(ctx, &nats, timeout, resume).await?;

    let public_table = ensure_route_table(ctx, &vpc_id, "public-rt").await?;
    ensure_route(ctx, &public_table, Target::InternetGateway(&igw)).await?;
    for subnet in &public_subnets {
        ensure_association(ctx, &public_table, subnet).await?;
    }
    for (index, (zone, subnet)) in zones.iter().zip(&private_subnets).enumerate() {
        let table = ensure_route_table(ctx, &vpc_id, &format!("private-rt-{zone}")).await?;
        ensure_route(ctx, &table, Target::NatGateway(&nats[index.min(nats.len() - 1)])).await?;
        ensure_association(ctx, &table, subnet).await?;
    }
    Ok(Network { vpc_id, zones, public_subnets, private_subnets })
}

/// The first `count` available zones of the region, by name (a stable choice, so a
/// re-run picks the same ones).
async fn zones(ctx: &Ctx, count: usize) -> Result<Vec<String>, Error> {
    let answer = ctx
        .aws
        .ec2
        .describe_availability_zones()
        .filters(filter("state", "available"))
        .send()
        .await
        .map_err(aws_error(format!("listing availability zones of {}", ctx.aws.region)))?;
    let mut zones: Vec<String> =
        answer.availability_zones().iter().filter_map(|z| z.zone_name().map(str::to_owned)).collect();
    zones.sort();
    if zones.len() < 2 {
        return Err(Error::Invalid(format!(
            "region {} has {} available zones; EKS needs subnets in at least 2",
            ctx.aws.region,
            zones.len()
        )));
    }
    zones.truncate(count.clamp(2, 3));
    Ok(zones)
}

pub async fn find_vpc(ctx: &Ctx) -> Result<Option<String>, Error> {
    let found = ctx
        .aws
        .ec2
        .describe_vpcs()
        .set_filters(Some(ours(ctx, "vpc")))
        .send()
        .await
        .map_err(aws_error(format!("looking for the VPC of cluster {}", ctx.name)))?;
    Ok(found.vpcs().first().and_then(|v| v.vpc_id()).map(str::to_owned))
}

async fn ensure_vpc(ctx: &Ctx) -> Result<String, Error> {
    if let Some(id) = find_vpc(ctx).await? {
        ctx.report(Outcome::Found, "vpc", &id);
        return Ok(id);
    }
    if ctx.dry_run {
        ctx.report(Outcome::Planned, "vpc 10.0.0.0/16", "");
        return Ok(format!("{PLANNED} vpc"));
    }
    let created = ctx
        .aws
        .ec2
        .create_vpc()
        .cidr_block("10.0.0.0/16")
        .tag_specifications(tag_spec(ctx, ResourceType::Vpc, "vpc", &[]))
        .send()
        .await
        .map_err(aws_error("creating the VPC"))?;
    let id = created.vpc().and_then(|v| v.vpc_id()).unwrap_or_default().to_owned();
    // Nodes register with the API server by their private DNS names; EKS needs both.
    for hostnames in [false, true] {
        let on = AttributeBooleanValue::builder().value(true).build();
        let request = ctx.aws.ec2.modify_vpc_attribute().vpc_id(&id);
        let request = if hostnames { request.enable_dns_hostnames(on) } else { request.enable_dns_support(on) };
        request.send().await.map_err(aws_error(format!("enabling DNS on VPC {id}")))?;
    }
    ctx.report(Outcome::Created, "vpc", &id);
    Ok(id)
}

async fn ensure_internet_gateway(ctx: &Ctx, vpc_id: &str) -> Result<String, Error> {
    let found = ctx
        .aws
        .ec2
        .describe_internet_gateways()
        .set_filters(Some(ours(ctx, "igw")))
        .send()
        .await
        .map_err(aws_error("looking for the internet gateway"))?;
    let (id, attached) = match found.internet_gateways().first() {
        Some(igw) => {
            let id = igw.internet_gateway_id().unwrap_or_default().to_owned();
            ctx.report(Outcome::Found, "internet gateway", &id);
            let attached = igw.attachments().iter().any(|a| a.vpc_id() == Some(vpc_id));
            (id, attached)
        }
        None if ctx.dry_run => {
            ctx.report(Outcome::Planned, "internet gateway, attached to the VPC", "");
            return Ok(format!("{PLANNED} igw"));
        }
        None => {
            let created = ctx
                .aws
                .ec2
                .create_internet_gateway()
                .tag_specifications(tag_spec(ctx, ResourceType::InternetGateway, "igw", &[]))
                .send()
                .await
                .map_err(aws_error("creating the internet gateway"))?;
            let id = created.internet_gateway().and_then(|g| g.internet_gateway_id()).unwrap_or_default().to_owned();
            ctx.report(Outcome::Created, "internet gateway", &id);
            (id, false)
        }
    };
    if !attached {
        if ctx.dry_run || is_planned(vpc_id) {
            ctx.report(Outcome::Planned, &format!("attachment of {id} to the VPC"), "");
        } else {
            ctx.aws
                .ec2
                .attach_internet_gateway()
                .internet_gateway_id(&id)
                .vpc_id(vpc_id)
                .send()
                .await
                .map_err(aws_error(format!("attaching internet gateway {id} to VPC {vpc_id}")))?;
            ctx.report(Outcome::Created, "attachment of the internet gateway to", vpc_id);
        }
    }
    Ok(id)
}

async fn ensure_subnet(ctx: &Ctx, vpc_id: &str, zone: &str, cidr: &str, public: bool) -> Result<String, Error> {
    let resource = format!("{}-subnet-{zone}", if public { "public" } else { "private" });
    let found = ctx
        .aws
        .ec2
        .describe_subnets()
        .set_filters(Some(ours(ctx, &resource)))
        .send()
        .await
        .map_err(aws_error(format!("looking for subnet {resource}")))?;
    if let Some(id) = found.subnets().first().and_then(|s| s.subnet_id()) {
        ctx.report(Outcome::Found, &format!("subnet {resource}"), id);
        return Ok(id.to_owned());
    }
    if ctx.dry_run || is_planned(vpc_id) {
        ctx.report(Outcome::Planned, &format!("subnet {resource} {cidr}"), "");
        return Ok(format!("{PLANNED} {resource}"));
    }
    let role = if public { "kubernetes.io/role/elb" } else { "kubernetes.io/role/internal-elb" };
    let extra =
        [(role.to_owned(), "1".to_owned()), (format!("kubernetes.io/cluster/{}", ctx.name), "shared".to_owned())];
    let created = ctx
        .aws
        .ec2
        .create_subnet()
        .vpc_id(vpc_id)
        .cidr_block(cidr)
        .availability_zone(zone)
        .tag_specifications(tag_spec(ctx, ResourceType::Subnet, &resource, &extra))
        .send()
        .await
        .map_err(aws_error(format!("creating subnet {resource} ({cidr}) in VPC {vpc_id}")))?;
    let id = created.subnet().and_then(|s| s.subnet_id()).unwrap_or_default().to_owned();
    ctx.report(Outcome::Created, &format!("subnet {resource}"), &id);
    Ok(id)
}

/// An Elastic IP for a NAT gateway; returns its allocation id.
async fn ensure_address(ctx: &Ctx, resource: &str) -> Result<String, Error> {
    let found = ctx
        .aws
        .ec2
        .describe_addresses()
        .set_filters(Some(ours(ctx, resource)))
        .send()
        .await
        .map_err(aws_error(format!("looking for Elastic IP {resource}")))?;
    if let Some(id) = found.addresses().first().and_then(|a| a.allocation_id()) {
        ctx.report(Outcome::Found, &format!("Elastic IP {resource}"), id);
        return Ok(id.to_owned());
    }
    if ctx.dry_run {
        ctx.report(Outcome::Planned, &format!("Elastic IP {resource}"), "");
        return Ok(format!("{PLANNED} {resource}"));
    }
    let created = ctx
        .aws
        .ec2
        .allocate_address()
        .domain(DomainType::Vpc)
        .tag_specifications(tag_spec(ctx, ResourceType::ElasticIp, resource, &[]))
        .send()
        .await
        .map_err(aws_error(format!("allocating Elastic IP {resource}")))?;
    let id = created.allocation_id().unwrap_or_default().to_owned();
    ctx.report(Outcome::Created, &format!("Elastic IP {resource}"), &id);
    Ok(id)
}

/// This cluster's NAT gateways that are not deleted or being deleted. Selected by tag
/// here rather than by a filter: not every EC2 implementation filters NAT gateways by tag.
async fn nat_gateways(ctx: &Ctx, vpc_id: Option<&str>) -> Result<Vec<aws_sdk_ec2::types::NatGateway>, Error> {
    let mut request = ctx.aws.ec2.describe_nat_gateways();
    if let Some(vpc_id) = vpc_id {
        request = request.filter(filter("vpc-id", vpc_id));
    }
    let found = request.send().await.map_err(aws_error("listing NAT gateways"))?;
    Ok(found
        .nat_gateways()
        .iter()
        .filter(|n| !matches!(n.state(), Some(NatGatewayState::Deleted | NatGatewayState::Deleting)))
        .filter(|n| n.tags().iter().any(|t| t.key() == Some(super::CLUSTER_TAG) && t.value() == Some(&ctx.name)))
        .cloned()
        .collect())
}

async fn ensure_nat_gateway(
    ctx: &Ctx,
    vpc_id: &str,
    subnet: &str,
    allocation: &str,
    resource: &str,
) -> Result<String, Error> {
    if !is_planned(vpc_id) {
        let existing = nat_gateways(ctx, Some(vpc_id)).await?;
        // A failed NAT gateway is replaced: it never becomes usable.
        if let Some(nat) =
            existing.iter().find(|n| has_tags(n.tags(), ctx, resource) && n.state() != Some(&NatGatewayState::Failed))
        {
            let id = nat.nat_gateway_id().unwrap_or_default();
            ctx.report(Outcome::Found, &format!("NAT gateway {resource}"), id);
            return Ok(id.to_owned());
        }
    }
    if ctx.dry_run || is_planned(subnet) || is_planned(allocation) {
        ctx.report(Outcome::Planned, &format!("NAT gateway {resource}"), "");
        return Ok(format!("{PLANNED} {resource}"));
    }
    let created = ctx
        .aws
        .ec2
        .create_nat_gateway()
        .subnet_id(subnet)
        .allocation_id(allocation)
        .tag_specifications(tag_spec(ctx, ResourceType::Natgateway, resource, &[]))
        .send()
        .await
        .map_err(aws_error(format!("creating NAT gateway {resource} in subnet {subnet}")))?;
    let id = created.nat_gateway().and_then(|n| n.nat_gateway_id()).unwrap_or_default().to_owned();
    ctx.report(Outcome::Created, &format!("NAT gateway {resource}"), &id);
    Ok(id)
}

async fn wait_nat_gateways(ctx: &Ctx, ids: &[String], timeout: Duration, resume: &str) -> Result<(), Error> {
    let ids: Vec<String> = ids.iter().filter(|id| !is_planned(id)).cloned().collect();
    if ids.is_empty() {
        return Ok(());
    }
    progress::wait("NAT gateways available", timeout, Duration::from_secs(5), resume, || async {
        let found = ctx
            .aws
            .ec2
            .describe_nat_gateways()
            .set_nat_gateway_ids(Some(ids.clone()))
            .send()
            .await
            .map_err(aws_error("reading the NAT gateways' state"))?;
        let states: Vec<String> = found
            .nat_gateways()
            .iter()
            .map(|n| format!("{} {}", n.nat_gateway_id().unwrap_or("?"), n.state().map(|s| s.as_str()).unwrap_or("?")))
            .collect();
        if let Some(failed) = found.nat_gateways().iter().find(|n| n.state() == Some(&NatGatewayState::Failed)) {
            return Err(Error::Invalid(format!(
                "NAT gateway {} failed: {}",
                failed.nat_gateway_id().unwrap_or("?"),
                failed.failure_message().unwrap_or("no reason given")
            )));
        }
        let available = found.nat_gateways().iter().all(|n| n.state() == Some(&NatGatewayState::Available));
        Ok::<_, Error>(if available { Poll::Done(()) } else { Poll::Pending(states.join(", ")) })
    })
    .await??;
    Ok(())
}

async fn ensure_route_table(ctx: &Ctx, vpc_id: &str, resource: &str) -> Result<String, Error> {
    let found = ctx
        .aws
        .ec2
        .describe_route_tables()
        .set_filters(Some(ours(ctx, resource)))
        .send()
        .await
        .map_err(aws_error(format!("looking for route table {resource}")))?;
    if let Some(id) = found.route_tables().first().and_then(|t| t.route_table_id()) {
        ctx.report(Outcome::Found, &format!("route table {resource}"), id);
        return Ok(id.to_owned());
    }
    if ctx.dry_run || is_planned(vpc_id) {
        ctx.report(Outcome::Planned, &format!("route table {resource}"), "");
        return Ok(format!("{PLANNED} {resource}"));
    }
    let created = ctx
        .aws
        .ec2
        .create_route_table()
        .vpc_id(vpc_id)
        .tag_specifications(tag_spec(ctx, ResourceType::RouteTable, resource, &[]))
        .send()
        .await
        .map_err(aws_error(format!("creating route table {resource}")))?;
    let id = created.route_table().and_then(|t| t.route_table_id()).unwrap_or_default().to_owned();
    ctx.report(Outcome::Created, &format!("route table {resource}"), &id);
    Ok(id)
}

enum Target<'a> {
    InternetGateway(&'a str),
    NatGateway(&'a str),
}

async fn route_table(ctx: &Ctx, id: &str) -> Result<Option<aws_sdk_ec2::types::RouteTable>, Error> {
    let found = ctx
        .aws
        .ec2
        .describe_route_tables()
        .route_table_ids(id)
        .send()
        .await
        .map_err(aws_error(format!("reading route table {id}")))?;
    Ok(found.route_tables().first().cloned())
}

/// The default route (0.0.0.0/0) of `table` through `target`.
async fn ensure_route(ctx: &Ctx, table: &str, target: Target<'_>) -> Result<(), Error> {
    let (target_id, what) = match target {
        Target::InternetGateway(id) => (id, "internet gateway"),
        Target::NatGateway(id) => (id, "NAT gateway"),
    };
    let description = format!("default route of {table} through {what} {target_id}");
    if is_planned(table) || is_planned(target_id) {
        ctx.report(Outcome::Planned, &description, "");
        return Ok(());
    }
    let existing = route_table(ctx, table).await?;
    let routes = existing.as_ref().map(|t| t.routes()).unwrap_or_default();
    let default = routes.iter().find(|r| r.destination_cidr_block() == Some("0.0.0.0/0"));
    let current = default.and_then(|r| r.gateway_id().or(r.nat_gateway_id()));
    if current == Some(target_id) {
        ctx.report(Outcome::Found, "default route of", table);
        return Ok(());
    }
    if ctx.dry_run {
        ctx.report(Outcome::Planned, &description, "");
        return Ok(());
    }
    let failed = format!("setting the {description}");
    match default {
        // A default route to something else (a NAT gateway replaced after failing).
        Some(_) => {
            let r = ctx.aws.ec2.replace_route().route_table_id(table).destination_cidr_block("0.0.0.0/0");
            let r = match target {
                Target::InternetGateway(id) => r.gateway_id(id),
                Target::NatGateway(id) => r.nat_gateway_id(id),
            };
            r.send().await.map_err(aws_error(failed))?;
        }
        None => {
            let r = ctx.aws.ec2.create_route().route_table_id(table).destination_cidr_block("0.0.0.0/0");
            let r = match target {
                Target::InternetGateway(id) => r.gateway_id(id),
                Target::NatGateway(id) => r.nat_gateway_id(id),
            };
            r.send().await.map_err(aws_error(failed))?;
        }
    }
    ctx.report(Outcome::Created, "default route of", table);
    Ok(())
}

async fn ensure_association(ctx: &Ctx, table: &str, subnet: &str) -> Result<(), Error> {
    if is_planned(table) || is_planned(subnet) {
        ctx.report(Outcome::Planned, &format!("association of {subnet} with {table}"), "");
        return Ok(());
    }
    let existing = route_table(ctx, table).await?;
    let associated = existing.iter().flat_map(|t| t.associations()).any(|a| a.subnet_id() == Some(subnet));
    if associated {
        ctx.report(Outcome::Found, &format!("association with {table} of"), subnet);
        return Ok(());
    }
    if ctx.dry_run {
        ctx.report(Outcome::Planned, &format!("association of {subnet} with {table}"), "");
        return Ok(());
    }
    ctx.aws
        .ec2
        .associate_route_table()
        .route_table_id(table)
        .subnet_id(subnet)
        .send()
        .await
        .map_err(aws_error(format!("associating subnet {subnet} with route table {table}")))?;
    ctx.report(Outcome::Created, &format!("association with {table} of"), subnet);
    Ok(())
}

/// Deletes the network in dependency order: NAT gateways (waited for: they hold their
/// addresses and subnets), their Elastic IPs, route tables, subnets, the internet
/// gateway, the VPC. Anything already gone is skipped.
pub async fn delete(ctx: &Ctx, timeout: Duration, resume: &str) -> Result<(), Error> {
    let ec2 = &ctx.aws.ec2;
    let vpc = find_vpc(ctx).await?;

    let nats: Vec<String> =
        nat_gateways(ctx, None).await?.iter().filter_map(|n| n.nat_gateway_id().map(str::to_owned)).collect();
    for id in &nats {
        ec2.delete_nat_gateway()
            .nat_gateway_id(id)
            .send()
            .await
            .map_err(aws_error(format!("deleting NAT gateway {id}")))?;
        println!("  deleting NAT gateway {id}");
    }
    if !nats.is_empty() {
        progress::wait("NAT gateways deleted", timeout, Duration::from_secs(5), resume, || async {
            let left = nat_gateways(ctx, None).await?;
            Ok::<_, Error>(if left.is_empty() {
                Poll::Done(())
            } else {
                Poll::Pending(format!("{} NAT gateway(s) still deleting", left.len()))
            })
        })
        .await??;
    }

    let addresses = ec2
        .describe_addresses()
        .filters(tag_filter(super::CLUSTER_TAG, &ctx.name))
        .send()
        .await
        .map_err(aws_error("listing Elastic IPs"))?;
    for address in addresses.addresses() {
        let id = address.allocation_id().unwrap_or_default();
        ec2.release_address()
            .allocation_id(id)
            .send()
            .await
            .map_err(aws_error(format!("releasing Elastic IP {id}")))?;
        println!("  released Elastic IP {id}");
    }

    let Some(vpc) = vpc else {
        println!("  no VPC of cluster {}", ctx.name);
        return Ok(());
    };
    let tables = ec2
        .describe_route_tables()
        .filters(filter("vpc-id", &vpc))
        .send()
        .await
        .map_err(aws_error(format!("listing route tables of VPC {vpc}")))?;
    for table in tables.route_tables() {
        let id = table.route_table_id().unwrap_or_default();
        // The VPC's main route table goes with the VPC and cannot be deleted before.
        if table.associations().iter().any(|a| a.main() == Some(true)) {
            continue;
        }
        for association in table.associations() {
            if let Some(association) = association.route_table_association_id() {
                ec2.disassociate_route_table()
                    .association_id(association)
                    .send()
                    .await
                    .map_err(aws_error(format!("disassociating route table {id}")))?;
            }
        }
        ec2.delete_route_table()
            .route_table_id(id)
            .send()
            .await
            .map_err(aws_error(format!("deleting route table {id}")))?;
        println!("  deleted route table {id}");
    }

    let subnets = ec2
        .describe_subnets()
        .filters(filter("vpc-id", &vpc))
        .send()
        .await
        .map_err(aws_error(format!("listing subnets of VPC {vpc}")))?;
    for subnet in subnets.subnets() {
        let id = subnet.subnet_id().unwrap_or_default();
        ec2.delete_subnet().subnet_id(id).send().await.map_err(aws_error(format!("deleting subnet {id}")))?;
        println!("  deleted subnet {id}");
    }

    let gateways = ec2
        .describe_internet_gateways()
        .filters(filter("attachment.vpc-id", &vpc))
        .send()
        .await
        .map_err(aws_error(format!("listing internet gateways of VPC {vpc}")))?;
    let tagged = ec2
        .describe_internet_gateways()
        .set_filters(Some(ours(ctx, "igw")))
        .send()
        .await
        .map_err(aws_error("looking for the internet gateway"))?;
    let mut seen = std::collections::BTreeSet::new();
    for igw in gateways.internet_gateways().iter().chain(tagged.internet_gateways()) {
        let id = igw.internet_gateway_id().unwrap_or_default();
        if !seen.insert(id.to_owned()) {
            continue;
        }
        if igw.attachments().iter().any(|a| a.vpc_id() == Some(&vpc)) {
            ec2.detach_internet_gateway()
                .internet_gateway_id(id)
                .vpc_id(&vpc)
                .send()
                .await
                .map_err(aws_error(format!("detaching internet gateway {id} from VPC {vpc}")))?;
        }
        ec2.delete_internet_gateway()
            .internet_gateway_id(id)
            .send()
            .await
            .map_err(aws_error(format!("deleting internet gateway {id}")))?;
        println!("  deleted internet gateway {id}");
    }

    // Security groups EKS made for the cluster are deleted with it; any other but the
    // default one would make the VPC's deletion fail with a message naming it.
    ec2.delete_vpc().vpc_id(&vpc).send().await.map_err(aws_error(format!("deleting VPC {vpc}")))?;
    println!("  deleted VPC {vpc}");
    Ok(())
}
