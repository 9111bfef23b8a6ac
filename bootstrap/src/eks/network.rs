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

use super::resources::{Entry, Group, Known, Lookup, Resource, Step, Wait, wait_until};
use super::{Ctx, Error, UpOptions, aws_error};

/// The network's entries of the resource list, in dependency order, over `zones` with
/// `nats` NAT gateways (1 or one per zone).
pub fn resources(zones: &[String], nats: usize) -> Vec<Entry> {
    let tagged = |key: &str, name: String, kind: Kind| {
        let needs = if matches!(kind, Kind::Subnet { .. } | Kind::RouteTable) { vec!["vpc"] } else { vec![] };
        Entry::new(Group::Network, key, name, Tagged { resource: key.to_owned(), kind }).needs(needs)
    };
    let mut list = vec![
        tagged("vpc", "VPC".into(), Kind::Vpc),
        tagged("igw", "internet gateway".into(), Kind::InternetGateway),
        Entry::new(
            Group::Network,
            "igw-attachment",
            "attachment of the internet gateway to the VPC",
            GatewayAttachment,
        )
        .needs(["igw", "vpc"]),
    ];
    for (index, zone) in zones.iter().enumerate() {
        // 10.0.192.0/20, 10.0.208.0/20, … public; 10.0.0.0/18, 10.0.64.0/18, … private.
        for (public, cidr) in
            [(true, format!("10.0.{}.0/20", 192 + 16 * index)), (false, format!("10.0.{}.0/18", 64 * index))]
        {
            let key = subnet_key(zone, public);
            list.push(tagged(&key, format!("subnet {key}"), Kind::Subnet { zone: zone.clone(), cidr, public }));
        }
    }
    // Addresses before gateways, so that `down` deletes all NAT gateways before it waits
    // for the first to be gone.
    for index in 0..nats {
        let key = format!("nat-eip-{index}");
        list.push(tagged(&key, format!("Elastic IP {key}"), Kind::Address));
    }
    for (index, zone) in zones.iter().take(nats).enumerate() {
        let (key, subnet) = (format!("nat-{index}"), subnet_key(zone, true));
        let nat = NatGateway { resource: key.clone(), subnet: subnet.clone(), address: format!("nat-eip-{index}") };
        list.push(
            Entry::new(Group::Network, &key, format!("NAT gateway {key}"), nat)
                .needs([subnet, format!("nat-eip-{index}")]),
        );
    }
    // One public table to the internet gateway for all public subnets; one private table
    // per zone to its NAT gateway, or to the one for all.
    let public = ("public-rt".to_owned(), "igw".to_owned(), zones.iter().map(|z| subnet_key(z, true)).collect());
    let private = zones.iter().enumerate().map(|(index, zone)| {
        (
            format!("private-rt-{zone}"),
            format!("nat-{}", index.min(nats.saturating_sub(1))),
            vec![subnet_key(zone, false)],
        )
    });
    for (table, target, subnets) in std::iter::once(public).chain(private) {
        list.push(tagged(&table, format!("route table {table}"), Kind::RouteTable));
        let via = if target == "igw" { "the internet gateway".to_owned() } else { format!("NAT gateway {target}") };
        let route = Route { table: table.clone(), target: target.clone() };
        let name = format!("default route of {table} through {via}");
        list.push(Entry::new(Group::Network, format!("{table}-default-route"), name, route).needs([&table, &target]));
        for subnet in subnets {
            let name = format!("association of {subnet} with {table}");
            let association = Association { table: table.clone(), subnet: subnet.clone() };
            list.push(
                Entry::new(Group::Network, format!("{table}/{subnet}"), name, association).needs([&table, &subnet]),
            );
        }
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

/// The EC2 resources found by their tags alone and deleted by their ids.
enum Kind {
    Vpc,
    InternetGateway,
    /// A private subnet holds nodes and internal load balancers; a public one
    /// internet-facing load balancers and the NAT gateways.
    Subnet {
        zone: String,
        cidr: String,
        public: bool,
    },
    /// An Elastic IP of a NAT gateway; its id is the allocation id.
    Address,
    RouteTable,
}

/// A resource of a [`Kind`], tagged `gitops.scale.dev/resource = resource`.
struct Tagged {
    resource: String,
    kind: Kind,
}

impl Tagged {
    fn what(&self) -> String {
        let kind = match self.kind {
            Kind::Vpc => "VPC",
            Kind::InternetGateway => "internet gateway",
            Kind::Subnet { .. } => "subnet",
            Kind::Address => "Elastic IP",
            Kind::RouteTable => "route table",
        };
        format!("{kind} {}", self.resource)
    }
}

impl Resource for Tagged {
    fn plan(&self, _options: &UpOptions) -> String {
        match &self.kind {
            Kind::Vpc => "10.0.0.0/16".into(),
            Kind::Subnet { cidr, .. } => cidr.clone(),
            _ => String::new(),
        }
    }
    fn find<'a>(&'a self, ctx: &'a Ctx, _known: &'a Known) -> Step<'a, Lookup> {
        Box::pin(async move {
            let (ec2, filters) = (&ctx.aws.ec2, Some(ours(ctx, &self.resource)));
            let failed = format!("looking for {} of cluster {}", self.what(), ctx.name);
            let id = match self.kind {
                Kind::Vpc => {
                    let found = ec2.describe_vpcs().set_filters(filters).send().await.map_err(aws_error(failed))?;
                    found.vpcs().first().and_then(|v| v.vpc_id()).map(str::to_owned)
                }
                Kind::InternetGateway => {
                    let found = ec2.describe_internet_gateways().set_filters(filters).send();
                    let found = found.await.map_err(aws_error(failed))?;
                    found.internet_gateways().first().and_then(|g| g.internet_gateway_id()).map(str::to_owned)
                }
                Kind::Subnet { .. } => {
                    let found = ec2.describe_subnets().set_filters(filters).send().await.map_err(aws_error(failed))?;
                    found.subnets().first().and_then(|s| s.subnet_id()).map(str::to_owned)
                }
                Kind::Address => {
                    let found =
                        ec2.describe_addresses().set_filters(filters).send().await.map_err(aws_error(failed))?;
                    found.addresses().first().and_then(|a| a.allocation_id()).map(str::to_owned)
                }
                Kind::RouteTable => {
                    let found = ec2.describe_route_tables().set_filters(filters).send();
                    let found = found.await.map_err(aws_error(failed))?;
                    found.route_tables().first().and_then(|t| t.route_table_id()).map(str::to_owned)
                }
            };
            Ok(found(id.as_deref()))
        })
    }
    fn create<'a>(&'a self, ctx: &'a Ctx, known: &'a Known, _options: &'a UpOptions) -> Step<'a, String> {
        Box::pin(async move {
            let ec2 = &ctx.aws.ec2;
            let failed = format!("creating {}", self.what());
            let tags = |kind, extra: &[(String, String)]| tag_spec(ctx, kind, &self.resource, extra);
            let id = match &self.kind {
                Kind::Vpc => {
                    let created =
                        ec2.create_vpc().cidr_block("10.0.0.0/16").tag_specifications(tags(ResourceType::Vpc, &[]));
                    let created = created.send().await.map_err(aws_error(failed))?;
                    let id = created.vpc().and_then(|v| v.vpc_id()).unwrap_or_default().to_owned();
                    // Nodes register with the API server by their private DNS names; EKS needs both.
                    for hostnames in [false, true] {
                        let on = AttributeBooleanValue::builder().value(true).build();
                        let request = ec2.modify_vpc_attribute().vpc_id(&id);
                        let request =
                            if hostnames { request.enable_dns_hostnames(on) } else { request.enable_dns_support(on) };
                        request.send().await.map_err(aws_error(format!("enabling DNS on VPC {id}")))?;
                    }
                    id
                }
                Kind::InternetGateway => {
                    let created =
                        ec2.create_internet_gateway().tag_specifications(tags(ResourceType::InternetGateway, &[]));
                    let created = created.send().await.map_err(aws_error(failed))?;
                    created.internet_gateway().and_then(|g| g.internet_gateway_id()).unwrap_or_default().to_owned()
                }
                Kind::Subnet { zone, cidr, public } => {
                    let role = if *public { "kubernetes.io/role/elb" } else { "kubernetes.io/role/internal-elb" };
                    let extra = [
                        (role.to_owned(), "1".to_owned()),
                        (format!("kubernetes.io/cluster/{}", ctx.name), "shared".to_owned()),
                    ];
                    let vpc = known.get("vpc");
                    let created = ec2
                        .create_subnet()
                        .vpc_id(vpc)
                        .cidr_block(cidr)
                        .availability_zone(zone)
                        .tag_specifications(tags(ResourceType::Subnet, &extra));
                    let created = created.send().await.map_err(aws_error(format!("{failed} ({cidr}) in VPC {vpc}")))?;
                    created.subnet().and_then(|s| s.subnet_id()).unwrap_or_default().to_owned()
                }
                Kind::Address => {
                    let created = ec2
                        .allocate_address()
                        .domain(DomainType::Vpc)
                        .tag_specifications(tags(ResourceType::ElasticIp, &[]));
                    let created = created.send().await.map_err(aws_error(failed))?;
                    created.allocation_id().unwrap_or_default().to_owned()
                }
                Kind::RouteTable => {
                    let created = ec2
                        .create_route_table()
                        .vpc_id(known.get("vpc"))
                        .tag_specifications(tags(ResourceType::RouteTable, &[]));
                    let created = created.send().await.map_err(aws_error(failed))?;
                    created.route_table().and_then(|t| t.route_table_id()).unwrap_or_default().to_owned()
                }
            };
            Ok(id)
        })
    }
    fn delete<'a>(&'a self, ctx: &'a Ctx, _known: &'a Known, id: &'a str) -> Step<'a, ()> {
        Box::pin(async move {
            let ec2 = &ctx.aws.ec2;
            let failed = format!("deleting {} {id}", self.what());
            match self.kind {
                // Security groups EKS made for the cluster are deleted with it; any other
                // but the default one would make this fail with a message naming it.
                Kind::Vpc => drop(ec2.delete_vpc().vpc_id(id).send().await.map_err(aws_error(failed))?),
                Kind::InternetGateway => drop(
                    ec2.delete_internet_gateway().internet_gateway_id(id).send().await.map_err(aws_error(failed))?,
                ),
                Kind::Subnet { .. } => drop(ec2.delete_subnet().subnet_id(id).send().await.map_err(aws_error(failed))?),
                Kind::Address => drop(ec2.release_address().allocation_id(id).send().await.map_err(aws_error(failed))?),
                Kind::RouteTable => {
                    drop(ec2.delete_route_table().route_table_id(id).send().await.map_err(aws_error(failed))?)
                }
            }
            Ok(())
        })
    }
}

/// The internet gateway's attachment to the VPC; its id is the VPC's.
struct GatewayAttachment;

impl Resource for GatewayAttachment {
    fn find<'a>(&'a self, ctx: &'a Ctx, known: &'a Known) -> Step<'a, Lookup> {
        Box::pin(async move {
            let (Some(igw), Some(vpc)) = (known.id("igw"), known.id("vpc")) else { return Ok(Lookup::Absent) };
            let found = ctx.aws.ec2.describe_internet_gateways().internet_gateway_ids(igw).send();
            let found = found.await.map_err(aws_error(format!("reading internet gateway {igw}")))?;
            let attached =
                found.internet_gateways().iter().flat_map(|g| g.attachments()).any(|a| a.vpc_id() == Some(vpc));
            Ok(if attached { Lookup::Ours(vpc.to_owned()) } else { Lookup::Absent })
        })
    }
    fn create<'a>(&'a self, ctx: &'a Ctx, known: &'a Known, _options: &'a UpOptions) -> Step<'a, String> {
        Box::pin(async move {
            let (igw, vpc) = (known.get("igw"), known.get("vpc"));
            let attach = ctx.aws.ec2.attach_internet_gateway().internet_gateway_id(igw).vpc_id(vpc).send();
            attach.await.map_err(aws_error(format!("attaching internet gateway {igw} to VPC {vpc}")))?;
            Ok(vpc.to_owned())
        })
    }
    fn delete<'a>(&'a self, ctx: &'a Ctx, known: &'a Known, vpc: &'a str) -> Step<'a, ()> {
        Box::pin(async move {
            let igw = known.get("igw");
            let detach = ctx.aws.ec2.detach_internet_gateway().internet_gateway_id(igw).vpc_id(vpc).send();
            detach.await.map_err(aws_error(format!("detaching internet gateway {igw} from VPC {vpc}")))?;
            Ok(())
        })
    }
}

/// A NAT gateway in a public subnet, with its Elastic IP.
struct NatGateway {
    resource: String,
    subnet: String,
    address: String,
}

impl NatGateway {
    async fn state(&self, ctx: &Ctx, id: &str) -> Result<Option<aws_sdk_ec2::types::NatGateway>, Error> {
        let found = ctx.aws.ec2.describe_nat_gateways().nat_gateway_ids(id).send();
        let found =
            found.await.map_err(aws_error(format!("reading the state of NAT gateway {} {id}", self.resource)))?;
        Ok(found.nat_gateways().first().cloned())
    }
}

impl Resource for NatGateway {
    fn plan(&self, _options: &UpOptions) -> String {
        format!("in {}", self.subnet)
    }
    /// Selected by tag here rather than by a filter: not every EC2 implementation filters
    /// NAT gateways by tag. One deleted, being deleted or failed does not count: a failed
    /// one never becomes usable, and is replaced.
    fn find<'a>(&'a self, ctx: &'a Ctx, _known: &'a Known) -> Step<'a, Lookup> {
        Box::pin(async move {
            let listed = ctx.aws.ec2.describe_nat_gateways().send();
            let listed = listed.await.map_err(aws_error(format!("looking for NAT gateway {}", self.resource)))?;
            let usable = listed.nat_gateways().iter().find(|n| {
                let gone = [NatGatewayState::Deleted, NatGatewayState::Deleting, NatGatewayState::Failed];
                !n.state().is_some_and(|s| gone.contains(s)) && has_tags(n.tags(), ctx, &self.resource)
            });
            Ok(found(usable.and_then(|n| n.nat_gateway_id())))
        })
    }
    fn create<'a>(&'a self, ctx: &'a Ctx, known: &'a Known, _options: &'a UpOptions) -> Step<'a, String> {
        Box::pin(async move {
            let (subnet, allocation) = (known.get(&self.subnet), known.get(&self.address));
            let created = ctx
                .aws
                .ec2
                .create_nat_gateway()
                .subnet_id(subnet)
                .allocation_id(allocation)
                .tag_specifications(tag_spec(ctx, ResourceType::Natgateway, &self.resource, &[]))
                .send()
                .await
                .map_err(aws_error(format!("creating NAT gateway {} in subnet {subnet}", self.resource)))?;
            Ok(created.nat_gateway().and_then(|n| n.nat_gateway_id()).unwrap_or_default().to_owned())
        })
    }
    fn delete<'a>(&'a self, ctx: &'a Ctx, _known: &'a Known, id: &'a str) -> Step<'a, ()> {
        Box::pin(async move {
            let delete = ctx.aws.ec2.delete_nat_gateway().nat_gateway_id(id).send();
            delete.await.map_err(aws_error(format!("deleting NAT gateway {} {id}", self.resource)))?;
            Ok(())
        })
    }
    fn ready<'a>(&'a self, ctx: &'a Ctx, id: &'a str, wait: &'a Wait) -> Step<'a, ()> {
        Box::pin(async move {
            let what = format!("NAT gateway {} {id} available", self.resource);
            wait_until(&what, Duration::from_secs(5), wait, || async {
                let nat = self.state(ctx, id).await?;
                Ok(match nat.as_ref().and_then(|n| n.state()) {
                    Some(NatGatewayState::Available) => None,
                    Some(NatGatewayState::Failed) => {
                        return Err(Error::Invalid(format!(
                            "NAT gateway {} {id} failed: {}",
                            self.resource,
                            nat.as_ref().and_then(|n| n.failure_message()).unwrap_or("no reason given")
                        )));
                    }
                    state => Some(format!("state {}", state.map(|s| s.as_str()).unwrap_or("unknown"))),
                })
            })
            .await
        })
    }
    /// Until then it holds its address and its subnet.
    fn gone<'a>(&'a self, ctx: &'a Ctx, id: &'a str, wait: &'a Wait) -> Step<'a, ()> {
        Box::pin(async move {
            let what = format!("NAT gateway {} {id} deleted", self.resource);
            wait_until(&what, Duration::from_secs(5), wait, || async {
                let state = self.state(ctx, id).await?.and_then(|n| n.state().cloned());
                Ok(state.filter(|s| *s != NatGatewayState::Deleted).map(|s| format!("state {}", s.as_str())))
            })
            .await
        })
    }
}

async fn route_table(ctx: &Ctx, id: &str) -> Result<Option<RouteTable>, Error> {
    let request = ctx.aws.ec2.describe_route_tables().route_table_ids(id).send();
    let found = request.await.map_err(aws_error(format!("reading route table {id}")))?;
    Ok(found.route_tables().first().cloned())
}

/// The route table keyed `table` and the id of `other`, where both exist.
async fn table_and<'k>(
    ctx: &Ctx,
    known: &'k Known,
    table: &str,
    other: &str,
) -> Result<Option<(RouteTable, &'k str)>, Error> {
    let (Some(table), Some(other)) = (known.id(table), known.id(other)) else { return Ok(None) };
    Ok(route_table(ctx, table).await?.map(|table| (table, other)))
}

/// The default route (0.0.0.0/0) of `table` through `target`, the internet gateway or a
/// NAT gateway; its id is the target's.
struct Route {
    table: String,
    target: String,
}

impl Resource for Route {
    /// A default route to anything else (a NAT gateway replaced after it failed) counts
    /// as absent, and is replaced.
    fn find<'a>(&'a self, ctx: &'a Ctx, known: &'a Known) -> Step<'a, Lookup> {
        Box::pin(async move {
            let Some((table, target)) = table_and(ctx, known, &self.table, &self.target).await? else {
                return Ok(Lookup::Absent);
            };
            let default = table.routes().iter().find(|r| r.destination_cidr_block() == Some("0.0.0.0/0"));
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
            let failed = format!("setting the default route of route table {} ({table}) to {target}", self.table);
            let igw = self.target == "igw";
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
            let request = ctx.aws.ec2.delete_route().route_table_id(table).destination_cidr_block("0.0.0.0/0").send();
            let failed = format!("deleting the default route of route table {} ({table})", self.table);
            request.await.map_err(aws_error(failed))?;
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
    fn find<'a>(&'a self, ctx: &'a Ctx, known: &'a Known) -> Step<'a, Lookup> {
        Box::pin(async move {
            let Some((table, subnet)) = table_and(ctx, known, &self.table, &self.subnet).await? else {
                return Ok(Lookup::Absent);
            };
            let association = table.associations().iter().find(|a| a.subnet_id() == Some(subnet));
            Ok(found(association.and_then(|a| a.route_table_association_id())))
        })
    }
    fn create<'a>(&'a self, ctx: &'a Ctx, known: &'a Known, _options: &'a UpOptions) -> Step<'a, String> {
        Box::pin(async move {
            let (table, subnet) = (known.get(&self.table), known.get(&self.subnet));
            let request = ctx.aws.ec2.associate_route_table().route_table_id(table).subnet_id(subnet).send();
            let associated =
                request.await.map_err(aws_error(format!("associating subnet {subnet} with route table {table}")))?;
            Ok(associated.association_id().unwrap_or_default().to_owned())
        })
    }
    fn delete<'a>(&'a self, ctx: &'a Ctx, _known: &'a Known, id: &'a str) -> Step<'a, ()> {
        Box::pin(async move {
            let request = ctx.aws.ec2.disassociate_route_table().association_id(id).send();
            let failed = format!("disassociating {} from route table {} ({id})", self.subnet, self.table);
            request.await.map_err(aws_error(failed))?;
            Ok(())
        })
    }
}
