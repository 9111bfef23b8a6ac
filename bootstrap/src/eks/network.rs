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
    AttributeBooleanValue, DomainType, Filter, NatGatewayState, ResourceType, RouteTable, Tag, TagSpecification,
};

use super::resources::{Group, Known, Lookup, Resource, Step, Wait};
use super::{Ctx, Error, UpOptions, aws_error};
use crate::progress::{self, Poll};

/// The network's entries of the resource list, in dependency order, over `zones` with
/// `nats` NAT gateways (1 or one per zone).
pub fn resources(zones: &[String], nats: usize) -> Vec<Box<dyn Resource>> {
    let mut list: Vec<Box<dyn Resource>> = vec![Box::new(Vpc), Box::new(InternetGateway), Box::new(GatewayAttachment)];
    for (index, zone) in zones.iter().enumerate() {
        list.push(Box::new(Subnet { zone: zone.clone(), index, public: true }));
        list.push(Box::new(Subnet { zone: zone.clone(), index, public: false }));
    }
    // Addresses before gateways, so that `down` deletes all NAT gateways before it waits
    // for the first to be gone.
    list.extend((0..nats).map(|index| Box::new(Address { index }) as Box<dyn Resource>));
    list.extend(
        zones
            .iter()
            .take(nats)
            .enumerate()
            .map(|(index, zone)| Box::new(NatGateway { index, zone: zone.clone() }) as _),
    );
    list.push(Box::new(RouteTableEntry { key: "public-rt".into() }));
    list.push(Box::new(Route { table: "public-rt".into(), target: "igw".into() }));
    for zone in zones {
        list.push(Box::new(Association { table: "public-rt".into(), subnet: subnet_key(zone, true) }));
    }
    for (index, zone) in zones.iter().enumerate() {
        let table = format!("private-rt-{zone}");
        list.push(Box::new(RouteTableEntry { key: table.clone() }));
        list.push(Box::new(Route { table: table.clone(), target: format!("nat-{}", index.min(nats - 1)) }));
        list.push(Box::new(Association { table, subnet: subnet_key(zone, false) }));
    }
    list
}

/// The key (and resource tag) of a zone's subnet.
pub fn subnet_key(zone: &str, public: bool) -> String {
    format!("{}-subnet-{zone}", if public { "public" } else { "private" })
}

/// The first `count` available zones of the region, by name (a stable choice, so a
/// re-run picks the same ones).
pub async fn zones(ctx: &Ctx, count: usize) -> Result<Vec<String>, Error> {
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

/// The zones this cluster's subnets are in, which are the zones `up` chose (whatever
/// their state now); everything of a zone needs its subnets, so is deleted before them.
pub async fn zones_in_use(ctx: &Ctx) -> Result<Vec<String>, Error> {
    let found = ctx
        .aws
        .ec2
        .describe_subnets()
        .filters(tag_filter(super::CLUSTER_TAG, &ctx.name))
        .send()
        .await
        .map_err(aws_error(format!("listing the subnets of cluster {}", ctx.name)))?;
    let zones: std::collections::BTreeSet<String> =
        found.subnets().iter().filter_map(|s| s.availability_zone().map(str::to_owned)).collect();
    Ok(zones.into_iter().collect())
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

fn found(id: Option<&str>) -> Lookup {
    id.map_or(Lookup::Absent, |id| Lookup::Ours(id.to_owned()))
}

struct Vpc;

impl Resource for Vpc {
    fn key(&self) -> String {
        "vpc".into()
    }
    fn name(&self) -> String {
        "VPC".into()
    }
    fn group(&self) -> Group {
        Group::Network
    }
    fn plan(&self, _options: &UpOptions) -> String {
        "10.0.0.0/16".into()
    }
    fn find<'a>(&'a self, ctx: &'a Ctx, _known: &'a Known) -> Step<'a, Lookup> {
        Box::pin(async move {
            let found = ctx
                .aws
                .ec2
                .describe_vpcs()
                .set_filters(Some(ours(ctx, "vpc")))
                .send()
                .await
                .map_err(aws_error(format!("looking for the VPC of cluster {}", ctx.name)))?;
            Ok(self::found(found.vpcs().first().and_then(|v| v.vpc_id())))
        })
    }
    fn create<'a>(&'a self, ctx: &'a Ctx, _known: &'a Known, _options: &'a UpOptions) -> Step<'a, String> {
        Box::pin(async move {
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
            Ok(id)
        })
    }
    fn delete<'a>(&'a self, ctx: &'a Ctx, _known: &'a Known, id: &'a str) -> Step<'a, ()> {
        Box::pin(async move {
            // Security groups EKS made for the cluster are deleted with it; any other but
            // the default one would make this fail with a message naming it.
            ctx.aws.ec2.delete_vpc().vpc_id(id).send().await.map_err(aws_error(format!("deleting VPC {id}")))?;
            Ok(())
        })
    }
}

struct InternetGateway;

impl Resource for InternetGateway {
    fn key(&self) -> String {
        "igw".into()
    }
    fn name(&self) -> String {
        "internet gateway".into()
    }
    fn group(&self) -> Group {
        Group::Network
    }
    fn find<'a>(&'a self, ctx: &'a Ctx, _known: &'a Known) -> Step<'a, Lookup> {
        Box::pin(async move {
            let found = ctx
                .aws
                .ec2
                .describe_internet_gateways()
                .set_filters(Some(ours(ctx, "igw")))
                .send()
                .await
                .map_err(aws_error("looking for the internet gateway"))?;
            Ok(self::found(found.internet_gateways().first().and_then(|g| g.internet_gateway_id())))
        })
    }
    fn create<'a>(&'a self, ctx: &'a Ctx, _known: &'a Known, _options: &'a UpOptions) -> Step<'a, String> {
        Box::pin(async move {
            let created = ctx
                .aws
                .ec2
                .create_internet_gateway()
                .tag_specifications(tag_spec(ctx, ResourceType::InternetGateway, "igw", &[]))
                .send()
                .await
                .map_err(aws_error("creating the internet gateway"))?;
            Ok(created.internet_gateway().and_then(|g| g.internet_gateway_id()).unwrap_or_default().to_owned())
        })
    }
    fn delete<'a>(&'a self, ctx: &'a Ctx, _known: &'a Known, id: &'a str) -> Step<'a, ()> {
        Box::pin(async move {
            ctx.aws
                .ec2
                .delete_internet_gateway()
                .internet_gateway_id(id)
                .send()
                .await
                .map_err(aws_error(format!("deleting internet gateway {id}")))?;
            Ok(())
        })
    }
}

/// The internet gateway's attachment to the VPC; its id is the VPC's.
struct GatewayAttachment;

impl Resource for GatewayAttachment {
    fn key(&self) -> String {
        "igw-attachment".into()
    }
    fn name(&self) -> String {
        "attachment of the internet gateway to the VPC".into()
    }
    fn group(&self) -> Group {
        Group::Network
    }
    fn deps(&self) -> Vec<String> {
        vec!["igw".into(), "vpc".into()]
    }
    fn find<'a>(&'a self, ctx: &'a Ctx, known: &'a Known) -> Step<'a, Lookup> {
        Box::pin(async move {
            let (Some(igw), Some(vpc)) = (known.id("igw"), known.id("vpc")) else { return Ok(Lookup::Absent) };
            let found = ctx
                .aws
                .ec2
                .describe_internet_gateways()
                .internet_gateway_ids(igw)
                .send()
                .await
                .map_err(aws_error(format!("reading internet gateway {igw}")))?;
            let attached =
                found.internet_gateways().iter().flat_map(|g| g.attachments()).any(|a| a.vpc_id() == Some(vpc));
            Ok(if attached { Lookup::Ours(vpc.to_owned()) } else { Lookup::Absent })
        })
    }
    fn create<'a>(&'a self, ctx: &'a Ctx, known: &'a Known, _options: &'a UpOptions) -> Step<'a, String> {
        Box::pin(async move {
            let (igw, vpc) = (known.get("igw"), known.get("vpc"));
            ctx.aws
                .ec2
                .attach_internet_gateway()
                .internet_gateway_id(igw)
                .vpc_id(vpc)
                .send()
                .await
                .map_err(aws_error(format!("attaching internet gateway {igw} to VPC {vpc}")))?;
            Ok(vpc.to_owned())
        })
    }
    fn delete<'a>(&'a self, ctx: &'a Ctx, known: &'a Known, vpc: &'a str) -> Step<'a, ()> {
        Box::pin(async move {
            let igw = known.get("igw");
            ctx.aws
                .ec2
                .detach_internet_gateway()
                .internet_gateway_id(igw)
                .vpc_id(vpc)
                .send()
                .await
                .map_err(aws_error(format!("detaching internet gateway {igw} from VPC {vpc}")))?;
            Ok(())
        })
    }
}

/// A zone's subnet: the `index`th zone's private /18 (10.0.0.0/18, 10.0.64.0/18, …) for
/// nodes and internal load balancers, or public /20 (10.0.192.0/20, 10.0.208.0/20, …).
struct Subnet {
    zone: String,
    index: usize,
    public: bool,
}

impl Subnet {
    fn cidr(&self) -> String {
        if self.public {
            format!("10.0.{}.0/20", 192 + 16 * self.index)
        } else {
            format!("10.0.{}.0/18", 64 * self.index)
        }
    }
}

impl Resource for Subnet {
    fn key(&self) -> String {
        subnet_key(&self.zone, self.public)
    }
    fn name(&self) -> String {
        format!("subnet {}", self.key())
    }
    fn group(&self) -> Group {
        Group::Network
    }
    fn deps(&self) -> Vec<String> {
        vec!["vpc".into()]
    }
    fn plan(&self, _options: &UpOptions) -> String {
        self.cidr()
    }
    fn find<'a>(&'a self, ctx: &'a Ctx, _known: &'a Known) -> Step<'a, Lookup> {
        Box::pin(async move {
            let resource = self.key();
            let found = ctx
                .aws
                .ec2
                .describe_subnets()
                .set_filters(Some(ours(ctx, &resource)))
                .send()
                .await
                .map_err(aws_error(format!("looking for subnet {resource}")))?;
            Ok(self::found(found.subnets().first().and_then(|s| s.subnet_id())))
        })
    }
    fn create<'a>(&'a self, ctx: &'a Ctx, known: &'a Known, _options: &'a UpOptions) -> Step<'a, String> {
        Box::pin(async move {
            let (resource, cidr, vpc) = (self.key(), self.cidr(), known.get("vpc"));
            let role = if self.public { "kubernetes.io/role/elb" } else { "kubernetes.io/role/internal-elb" };
            let extra = [
                (role.to_owned(), "1".to_owned()),
                (format!("kubernetes.io/cluster/{}", ctx.name), "shared".to_owned()),
            ];
            let created = ctx
                .aws
                .ec2
                .create_subnet()
                .vpc_id(vpc)
                .cidr_block(&cidr)
                .availability_zone(&self.zone)
                .tag_specifications(tag_spec(ctx, ResourceType::Subnet, &resource, &extra))
                .send()
                .await
                .map_err(aws_error(format!("creating subnet {resource} ({cidr}) in VPC {vpc}")))?;
            Ok(created.subnet().and_then(|s| s.subnet_id()).unwrap_or_default().to_owned())
        })
    }
    fn delete<'a>(&'a self, ctx: &'a Ctx, _known: &'a Known, id: &'a str) -> Step<'a, ()> {
        Box::pin(async move {
            let resource = self.key();
            ctx.aws
                .ec2
                .delete_subnet()
                .subnet_id(id)
                .send()
                .await
                .map_err(aws_error(format!("deleting subnet {resource} {id}")))?;
            Ok(())
        })
    }
}

/// The Elastic IP of NAT gateway `index`; its id is the allocation id.
struct Address {
    index: usize,
}

impl Resource for Address {
    fn key(&self) -> String {
        format!("nat-eip-{}", self.index)
    }
    fn name(&self) -> String {
        format!("Elastic IP {}", self.key())
    }
    fn group(&self) -> Group {
        Group::Network
    }
    fn find<'a>(&'a self, ctx: &'a Ctx, _known: &'a Known) -> Step<'a, Lookup> {
        Box::pin(async move {
            let resource = self.key();
            let found = ctx
                .aws
                .ec2
                .describe_addresses()
                .set_filters(Some(ours(ctx, &resource)))
                .send()
                .await
                .map_err(aws_error(format!("looking for Elastic IP {resource}")))?;
            Ok(self::found(found.addresses().first().and_then(|a| a.allocation_id())))
        })
    }
    fn create<'a>(&'a self, ctx: &'a Ctx, _known: &'a Known, _options: &'a UpOptions) -> Step<'a, String> {
        Box::pin(async move {
            let resource = self.key();
            let created = ctx
                .aws
                .ec2
                .allocate_address()
                .domain(DomainType::Vpc)
                .tag_specifications(tag_spec(ctx, ResourceType::ElasticIp, &resource, &[]))
                .send()
                .await
                .map_err(aws_error(format!("allocating Elastic IP {resource}")))?;
            Ok(created.allocation_id().unwrap_or_default().to_owned())
        })
    }
    fn delete<'a>(&'a self, ctx: &'a Ctx, _known: &'a Known, id: &'a str) -> Step<'a, ()> {
        Box::pin(async move {
            let resource = self.key();
            ctx.aws
                .ec2
                .release_address()
                .allocation_id(id)
                .send()
                .await
                .map_err(aws_error(format!("releasing Elastic IP {resource} {id}")))?;
            Ok(())
        })
    }
}

/// NAT gateway `index`, in the public subnet of `zone`, with Elastic IP `index`.
struct NatGateway {
    index: usize,
    zone: String,
}

impl NatGateway {
    async fn state(&self, ctx: &Ctx, id: &str) -> Result<Option<aws_sdk_ec2::types::NatGateway>, Error> {
        let found = ctx
            .aws
            .ec2
            .describe_nat_gateways()
            .nat_gateway_ids(id)
            .send()
            .await
            .map_err(aws_error(format!("reading the state of NAT gateway {} {id}", self.key())))?;
        Ok(found.nat_gateways().first().cloned())
    }
}

impl Resource for NatGateway {
    fn key(&self) -> String {
        format!("nat-{}", self.index)
    }
    fn name(&self) -> String {
        format!("NAT gateway {}", self.key())
    }
    fn group(&self) -> Group {
        Group::Network
    }
    fn deps(&self) -> Vec<String> {
        vec![subnet_key(&self.zone, true), format!("nat-eip-{}", self.index)]
    }
    fn plan(&self, _options: &UpOptions) -> String {
        format!("in {}", subnet_key(&self.zone, true))
    }
    /// Selected by tag here rather than by a filter: not every EC2 implementation filters
    /// NAT gateways by tag. One deleted, being deleted or failed does not count: a failed
    /// one never becomes usable, and is replaced.
    fn find<'a>(&'a self, ctx: &'a Ctx, _known: &'a Known) -> Step<'a, Lookup> {
        Box::pin(async move {
            let resource = self.key();
            let found = ctx
                .aws
                .ec2
                .describe_nat_gateways()
                .send()
                .await
                .map_err(aws_error(format!("looking for NAT gateway {resource}")))?;
            let usable = found.nat_gateways().iter().find(|n| {
                !matches!(
                    n.state(),
                    Some(NatGatewayState::Deleted | NatGatewayState::Deleting | NatGatewayState::Failed)
                ) && has_tags(n.tags(), ctx, &resource)
            });
            Ok(self::found(usable.and_then(|n| n.nat_gateway_id())))
        })
    }
    fn create<'a>(&'a self, ctx: &'a Ctx, known: &'a Known, _options: &'a UpOptions) -> Step<'a, String> {
        Box::pin(async move {
            let resource = self.key();
            let deps = self.deps();
            let (subnet, allocation) = (known.get(&deps[0]), known.get(&deps[1]));
            let created = ctx
                .aws
                .ec2
                .create_nat_gateway()
                .subnet_id(subnet)
                .allocation_id(allocation)
                .tag_specifications(tag_spec(ctx, ResourceType::Natgateway, &resource, &[]))
                .send()
                .await
                .map_err(aws_error(format!("creating NAT gateway {resource} in subnet {subnet}")))?;
            Ok(created.nat_gateway().and_then(|n| n.nat_gateway_id()).unwrap_or_default().to_owned())
        })
    }
    fn delete<'a>(&'a self, ctx: &'a Ctx, _known: &'a Known, id: &'a str) -> Step<'a, ()> {
        Box::pin(async move {
            let resource = self.key();
            ctx.aws
                .ec2
                .delete_nat_gateway()
                .nat_gateway_id(id)
                .send()
                .await
                .map_err(aws_error(format!("deleting NAT gateway {resource} {id}")))?;
            Ok(())
        })
    }
    fn ready<'a>(&'a self, ctx: &'a Ctx, id: &'a str, wait: &'a Wait) -> Step<'a, ()> {
        Box::pin(async move {
            let what = format!("{} {id} available", self.name());
            progress::wait(&what, wait.timeout, Duration::from_secs(5), &wait.resume, || async {
                let nat = self.state(ctx, id).await?;
                Ok::<_, Error>(match nat.as_ref().and_then(|n| n.state()) {
                    Some(NatGatewayState::Available) => Poll::Done(()),
                    Some(NatGatewayState::Failed) => {
                        return Err(Error::Invalid(format!(
                            "{} {id} failed: {}",
                            self.name(),
                            nat.as_ref().and_then(|n| n.failure_message()).unwrap_or("no reason given")
                        )));
                    }
                    state => Poll::Pending(format!("state {}", state.map(|s| s.as_str()).unwrap_or("unknown"))),
                })
            })
            .await??;
            Ok(())
        })
    }
    /// Until then it holds its address and its subnet.
    fn gone<'a>(&'a self, ctx: &'a Ctx, id: &'a str, wait: &'a Wait) -> Step<'a, ()> {
        Box::pin(async move {
            let what = format!("{} {id} deleted", self.name());
            progress::wait(&what, wait.timeout, Duration::from_secs(5), &wait.resume, || async {
                let nat = self.state(ctx, id).await?;
                Ok::<_, Error>(match nat.as_ref().and_then(|n| n.state()) {
                    None | Some(NatGatewayState::Deleted) => Poll::Done(()),
                    Some(state) => Poll::Pending(format!("state {}", state.as_str())),
                })
            })
            .await??;
            Ok(())
        })
    }
}

async fn route_table(ctx: &Ctx, id: &str) -> Result<Option<RouteTable>, Error> {
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

struct RouteTableEntry {
    key: String,
}

impl Resource for RouteTableEntry {
    fn key(&self) -> String {
        self.key.clone()
    }
    fn name(&self) -> String {
        format!("route table {}", self.key)
    }
    fn group(&self) -> Group {
        Group::Network
    }
    fn deps(&self) -> Vec<String> {
        vec!["vpc".into()]
    }
    fn find<'a>(&'a self, ctx: &'a Ctx, _known: &'a Known) -> Step<'a, Lookup> {
        Box::pin(async move {
            let found = ctx
                .aws
                .ec2
                .describe_route_tables()
                .set_filters(Some(ours(ctx, &self.key)))
                .send()
                .await
                .map_err(aws_error(format!("looking for route table {}", self.key)))?;
            Ok(self::found(found.route_tables().first().and_then(|t| t.route_table_id())))
        })
    }
    fn create<'a>(&'a self, ctx: &'a Ctx, known: &'a Known, _options: &'a UpOptions) -> Step<'a, String> {
        Box::pin(async move {
            let created = ctx
                .aws
                .ec2
                .create_route_table()
                .vpc_id(known.get("vpc"))
                .tag_specifications(tag_spec(ctx, ResourceType::RouteTable, &self.key, &[]))
                .send()
                .await
                .map_err(aws_error(format!("creating route table {}", self.key)))?;
            Ok(created.route_table().and_then(|t| t.route_table_id()).unwrap_or_default().to_owned())
        })
    }
    fn delete<'a>(&'a self, ctx: &'a Ctx, _known: &'a Known, id: &'a str) -> Step<'a, ()> {
        Box::pin(async move {
            ctx.aws
                .ec2
                .delete_route_table()
                .route_table_id(id)
                .send()
                .await
                .map_err(aws_error(format!("deleting route table {} {id}", self.key)))?;
            Ok(())
        })
    }
}

/// The default route (0.0.0.0/0) of `table` through `target`, the internet gateway or a
/// NAT gateway; its id is the target's.
struct Route {
    table: String,
    target: String,
}

impl Route {
    fn through_internet_gateway(&self) -> bool {
        self.target == "igw"
    }
}

impl Resource for Route {
    fn key(&self) -> String {
        format!("{}-default-route", self.table)
    }
    fn name(&self) -> String {
        let via = if self.through_internet_gateway() {
            "the internet gateway".to_owned()
        } else {
            format!("NAT gateway {}", self.target)
        };
        format!("default route of {} through {via}", self.table)
    }
    fn group(&self) -> Group {
        Group::Network
    }
    fn deps(&self) -> Vec<String> {
        vec![self.table.clone(), self.target.clone()]
    }
    /// A default route to anything else (a NAT gateway replaced after it failed) counts
    /// as absent, and is replaced.
    fn find<'a>(&'a self, ctx: &'a Ctx, known: &'a Known) -> Step<'a, Lookup> {
        Box::pin(async move {
            let (Some(table), Some(target)) = (known.id(&self.table), known.id(&self.target)) else {
                return Ok(Lookup::Absent);
            };
            let table = route_table(ctx, table).await?;
            let routes = table.as_ref().map(|t| t.routes()).unwrap_or_default();
            let default = routes.iter().find(|r| r.destination_cidr_block() == Some("0.0.0.0/0"));
            let current = default.and_then(|r| r.gateway_id().or(r.nat_gateway_id()));
            Ok(if current == Some(target) { Lookup::Ours(target.to_owned()) } else { Lookup::Absent })
        })
    }
    fn create<'a>(&'a self, ctx: &'a Ctx, known: &'a Known, _options: &'a UpOptions) -> Step<'a, String> {
        Box::pin(async move {
            let (table, target) = (known.get(&self.table), known.get(&self.target));
            let existing = route_table(ctx, table).await?;
            let replace =
                existing.iter().flat_map(|t| t.routes()).any(|r| r.destination_cidr_block() == Some("0.0.0.0/0"));
            let failed = format!("setting the {} ({table} to {target})", self.name());
            let igw = self.through_internet_gateway();
            if replace {
                let r = ctx.aws.ec2.replace_route().route_table_id(table).destination_cidr_block("0.0.0.0/0");
                let r = if igw { r.gateway_id(target) } else { r.nat_gateway_id(target) };
                r.send().await.map_err(aws_error(failed))?;
            } else {
                let r = ctx.aws.ec2.create_route().route_table_id(table).destination_cidr_block("0.0.0.0/0");
                let r = if igw { r.gateway_id(target) } else { r.nat_gateway_id(target) };
                r.send().await.map_err(aws_error(failed))?;
            }
            Ok(target.to_owned())
        })
    }
    fn delete<'a>(&'a self, ctx: &'a Ctx, known: &'a Known, _target: &'a str) -> Step<'a, ()> {
        Box::pin(async move {
            let table = known.get(&self.table);
            ctx.aws
                .ec2
                .delete_route()
                .route_table_id(table)
                .destination_cidr_block("0.0.0.0/0")
                .send()
                .await
                .map_err(aws_error(format!("deleting the {} ({table})", self.name())))?;
            Ok(())
        })
    }
}

/// A subnet's association with a route table; its id is the association's.
struct Association {
    table: String,
    subnet: String,
}

impl Resource for Association {
    fn key(&self) -> String {
        format!("{}/{}", self.table, self.subnet)
    }
    fn name(&self) -> String {
        format!("association of {} with {}", self.subnet, self.table)
    }
    fn group(&self) -> Group {
        Group::Network
    }
    fn deps(&self) -> Vec<String> {
        vec![self.table.clone(), self.subnet.clone()]
    }
    fn find<'a>(&'a self, ctx: &'a Ctx, known: &'a Known) -> Step<'a, Lookup> {
        Box::pin(async move {
            let (Some(table), Some(subnet)) = (known.id(&self.table), known.id(&self.subnet)) else {
                return Ok(Lookup::Absent);
            };
            let table = route_table(ctx, table).await?;
            let association = table.iter().flat_map(|t| t.associations()).find(|a| a.subnet_id() == Some(subnet));
            Ok(found(association.and_then(|a| a.route_table_association_id())))
        })
    }
    fn create<'a>(&'a self, ctx: &'a Ctx, known: &'a Known, _options: &'a UpOptions) -> Step<'a, String> {
        Box::pin(async move {
            let (table, subnet) = (known.get(&self.table), known.get(&self.subnet));
            let associated = ctx
                .aws
                .ec2
                .associate_route_table()
                .route_table_id(table)
                .subnet_id(subnet)
                .send()
                .await
                .map_err(aws_error(format!("associating subnet {subnet} with route table {table}")))?;
            Ok(associated.association_id().unwrap_or_default().to_owned())
        })
    }
    fn delete<'a>(&'a self, ctx: &'a Ctx, _known: &'a Known, id: &'a str) -> Step<'a, ()> {
        Box::pin(async move {
            ctx.aws
                .ec2
                .disassociate_route_table()
                .association_id(id)
                .send()
                .await
                .map_err(aws_error(format!("deleting the {} ({id})", self.name())))?;
            Ok(())
        })
    }
}
