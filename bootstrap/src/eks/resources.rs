//! The cluster's AWS resources as one list in dependency order, each entry a [`Resource`]
//! that knows how to find, create and delete itself. `up` walks the list forward (find,
//! else create; `--dry-run` only finds), `down` backward; both report each step through
//! [`progress::report`].
//!
//! An entry names what it needs by the others' keys ([`Resource::deps`]). That one
//! relation orders three things: an entry is created after what it needs, waited for
//! (a NAT gateway available, the cluster ACTIVE) only when something needing it comes
//! next, and deleted only once everything needing it is gone.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use super::{CLUSTER_TAG, Ctx, Error, UpOptions, cluster, iam, network};
use crate::progress::{self, Report};

/// A step's future: a resource's AWS calls.
pub type Step<'a, T> = Pin<Box<dyn Future<Output = Result<T, Error>> + 'a>>;

/// What looking for a resource found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// This cluster's, with its id (ARN, allocation id, …).
    Ours(String),
    Absent,
    /// A resource under the name this one must have, not tagged as this cluster's: it
    /// is someone else's and is never taken over or deleted.
    NotOurs,
}

/// Where the list's long waits end, and what a timeout tells the user to run.
pub struct Wait {
    pub timeout: Duration,
    pub resume: String,
}

/// The part of the cluster a resource belongs to, which the reports are grouped by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    Network,
    Iam,
    Eks,
}

impl Group {
    fn heading(self) -> &'static str {
        match self {
            Group::Network => "network:",
            Group::Iam => "IAM:",
            Group::Eks => "EKS:",
        }
    }
}

/// The ids of the resources found or created so far, by key.
#[derive(Default)]
pub struct Known(HashMap<String, String>);

impl Known {
    pub fn id(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// The id of something a create needs: the walk creates in dependency order, so it
    /// exists by then.
    pub fn get(&self, key: &str) -> &str {
        self.id(key).unwrap_or_else(|| panic!("{key} is created before what needs it"))
    }
}

/// One AWS resource of the cluster.
pub trait Resource {
    /// How other entries name it as a dependency; for EC2 resources also the value of
    /// their `gitops.scale.dev/resource` tag.
    fn key(&self) -> String;
    /// What the reports call it: `subnet public-subnet-us-west-2a`.
    fn name(&self) -> String;
    fn group(&self) -> Group;
    /// The keys of the entries it needs, all earlier in the list.
    fn deps(&self) -> Vec<String> {
        Vec::new()
    }
    /// What `--dry-run` says it would be made with, after the name.
    fn plan(&self, _options: &UpOptions) -> String {
        String::new()
    }
    fn find<'a>(&'a self, ctx: &'a Ctx, known: &'a Known) -> Step<'a, Lookup>;
    /// Creates it (tagged in the create call itself) and returns its id.
    fn create<'a>(&'a self, ctx: &'a Ctx, known: &'a Known, options: &'a UpOptions) -> Step<'a, String>;
    /// Starts deleting it; [`Resource::gone`] waits for the end.
    fn delete<'a>(&'a self, ctx: &'a Ctx, known: &'a Known, id: &'a str) -> Step<'a, ()>;
    /// Waits until what needs it can use it.
    fn ready<'a>(&'a self, _ctx: &'a Ctx, _id: &'a str, _wait: &'a Wait) -> Step<'a, ()> {
        Box::pin(async { Ok(()) })
    }
    /// Waits until its deletion is complete.
    fn gone<'a>(&'a self, _ctx: &'a Ctx, _id: &'a str, _wait: &'a Wait) -> Step<'a, ()> {
        Box::pin(async { Ok(()) })
    }
}

/// Everything `up` makes, in dependency order: the network over `zones` with `nats` NAT
/// gateways, the IAM roles, the cluster, its OIDC provider and the node group.
pub fn list(ctx: &Ctx, zones: &[String], nats: usize) -> Vec<Box<dyn Resource>> {
    let mut list = network::resources(zones, nats);
    list.extend(iam::resources(ctx));
    list.extend(cluster::resources(ctx, zones));
    list
}

/// `up`'s walk: each resource found, else created (`--dry-run`: reported as what would
/// be), and waited for before anything that needs it. Returns how many were (or would
/// be) created.
pub async fn up(ctx: &Ctx, list: &[Box<dyn Resource>], options: &UpOptions) -> Result<usize, Error> {
    let wait = Wait { timeout: options.timeout, resume: options.resume.clone() };
    let by_key: HashMap<String, &dyn Resource> = list.iter().map(|r| (r.key(), r.as_ref())).collect();
    let mut known = Known::default();
    let mut ready = HashSet::new();
    let mut heading = None;
    let mut created = 0;
    for resource in list {
        print_heading(&mut heading, resource.group());
        let name = resource.name();
        if !options.dry_run {
            for dep in resource.deps() {
                if ready.insert(dep.clone()) {
                    by_key[&dep].ready(ctx, known.get(&dep), &wait).await?;
                }
            }
        }
        match resource.find(ctx, &known).await? {
            Lookup::Ours(id) => {
                progress::report(Report::Found, &name, &id);
                known.0.insert(resource.key(), id);
            }
            Lookup::NotOurs => {
                return Err(Error::NotOurs { what: name, tag: format!("{CLUSTER_TAG}={}", ctx.name) });
            }
            Lookup::Absent if options.dry_run => {
                created += 1;
                let plan = resource.plan(options);
                progress::report(Report::WouldCreate, &name, &plan);
            }
            Lookup::Absent => {
                let id = resource.create(ctx, &known, options).await?;
                created += 1;
                progress::report(Report::Created, &name, &id);
                known.0.insert(resource.key(), id);
            }
        }
    }
    if !options.dry_run {
        for resource in list {
            if ready.insert(resource.key()) {
                resource.ready(ctx, known.get(&resource.key()), &wait).await?;
            }
        }
    }
    Ok(created)
}

/// `down`'s walk: everything found first (finding some entries takes the ids of what
/// they need), then deleted last to first, each once all that needs it is gone.
/// Whatever is absent is skipped, so it can be re-run.
pub async fn down(ctx: &Ctx, list: &[Box<dyn Resource>], wait: &Wait) -> Result<(), Error> {
    let mut known = Known::default();
    let mut found = Vec::new();
    for resource in list {
        let lookup = resource.find(ctx, &known).await?;
        if let Lookup::Ours(id) = &lookup {
            known.0.insert(resource.key(), id.clone());
        }
        found.push(lookup);
    }
    // Deleted, and not yet waited for until gone.
    let mut deleting: Vec<usize> = Vec::new();
    let mut heading = None;
    for (index, resource) in list.iter().enumerate().rev() {
        print_heading(&mut heading, resource.group());
        let key = resource.key();
        let mut still = Vec::new();
        for dependent in deleting {
            if list[dependent].deps().contains(&key) {
                let dependent = &list[dependent];
                dependent.gone(ctx, known.get(&dependent.key()), wait).await?;
            } else {
                still.push(dependent);
            }
        }
        deleting = still;
        let name = resource.name();
        match &found[index] {
            Lookup::Ours(id) => {
                resource.delete(ctx, &known, id).await?;
                progress::report(Report::Deleted, &name, id);
                deleting.push(index);
            }
            Lookup::Absent => progress::report(Report::Absent, &name, ""),
            Lookup::NotOurs => progress::report(Report::NotOurs, &name, ""),
        }
    }
    for index in deleting {
        list[index].gone(ctx, known.get(&list[index].key()), wait).await?;
    }
    Ok(())
}

fn print_heading(current: &mut Option<Group>, group: Group) {
    if *current != Some(group) {
        println!("{}", group.heading());
        *current = Some(group);
    }
}
