//! The cluster's AWS resources as one list in dependency order: each [`Entry`] a
//! [`Resource`] (how to find, create and delete it) with its name and what it needs.
//! `up` walks the list forward (find, else create; `--dry-run` only finds), `down`
//! backward; both report each step through [`progress::report`].
//!
//! An entry names what it needs by the others' keys ([`Entry::deps`]). That one
//! relation orders three things: an entry is created after what it needs, waited for
//! (a NAT gateway available, the cluster ACTIVE) just before the first entry that needs
//! it, and deleted only once everything needing it is gone.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use super::{CLUSTER_TAG, Ctx, Error, UpOptions, cluster, iam, network};
use crate::progress::{self, Poll, Report};

/// A step's future: a resource's AWS calls.
pub type Step<'a, T> = Pin<Box<dyn Future<Output = Result<T, Error>> + 'a>>;

/// What looking for a resource found.
#[derive(Debug)]
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

/// How to find, create and delete one kind of AWS resource.
pub trait Resource {
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

/// One entry of the list: a resource, what it is called, and what it needs.
pub struct Entry {
    pub group: Group,
    /// How other entries name it; for EC2 resources also the value of their
    /// `gitops.scale.dev/resource` tag.
    pub key: String,
    /// What the reports call it: `subnet public-subnet-us-west-2a`.
    pub name: String,
    /// The keys of the entries it needs, all earlier in the list.
    pub deps: Vec<String>,
    pub resource: Box<dyn Resource>,
}

impl Entry {
    pub fn new(
        group: Group,
        key: impl Into<String>,
        name: impl Into<String>,
        resource: impl Resource + 'static,
    ) -> Entry {
        Entry { group, key: key.into(), name: name.into(), deps: Vec::new(), resource: Box::new(resource) }
    }

    pub fn needs(mut self, deps: impl IntoIterator<Item = impl Into<String>>) -> Entry {
        self.deps.extend(deps.into_iter().map(Into::into));
        self
    }
}

/// Polls `pending` every `every` until it says nothing is pending any more (`None`);
/// `Some` says where things stand, for the spinner and a timeout's message.
pub async fn wait_until<F, Fut>(what: &str, every: Duration, wait: &Wait, mut pending: F) -> Result<(), Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<String>, Error>>,
{
    progress::wait(what, wait.timeout, every, &wait.resume, || {
        let pending = pending();
        async move { Ok::<_, Error>(pending.await?.map_or(Poll::Done(()), Poll::Pending)) }
    })
    .await??;
    Ok(())
}

/// Everything `up` makes, in dependency order: the network over `zones` with `nats` NAT
/// gateways, the IAM roles, the cluster, its OIDC provider and the node group.
pub fn list(ctx: &Ctx, zones: &[String], nats: usize) -> Vec<Entry> {
    let mut list = network::resources(zones, nats);
    list.extend(iam::resources(ctx));
    list.extend(cluster::resources(ctx, zones));
    list
}

/// `up`'s walk: each resource found, else created (`--dry-run`: reported as what would
/// be), and waited for before anything that needs it. Returns how many were (or would
/// be) created.
pub async fn up(ctx: &Ctx, list: &[Entry], options: &UpOptions) -> Result<usize, Error> {
    let wait = Wait { timeout: options.timeout, resume: options.resume.clone() };
    let by_key: HashMap<&str, &dyn Resource> = list.iter().map(|e| (e.key.as_str(), e.resource.as_ref())).collect();
    let mut known = Known::default();
    let mut ready = HashSet::new();
    let mut heading = None;
    let mut created = 0;
    for entry in list {
        print_heading(&mut heading, entry.group);
        if !options.dry_run {
            for dep in &entry.deps {
                if ready.insert(dep.as_str()) {
                    by_key[dep.as_str()].ready(ctx, known.get(dep), &wait).await?;
                }
            }
        }
        match entry.resource.find(ctx, &known).await? {
            Lookup::Ours(id) => {
                progress::report(Report::Found, &entry.name, &id);
                known.0.insert(entry.key.clone(), id);
            }
            Lookup::NotOurs => {
                return Err(Error::NotOurs { what: entry.name.clone(), tag: format!("{CLUSTER_TAG}={}", ctx.name) });
            }
            Lookup::Absent if options.dry_run => {
                created += 1;
                progress::report(Report::WouldCreate, &entry.name, &entry.resource.plan(options));
            }
            Lookup::Absent => {
                let id = entry.resource.create(ctx, &known, options).await?;
                created += 1;
                progress::report(Report::Created, &entry.name, &id);
                known.0.insert(entry.key.clone(), id);
            }
        }
    }
    if !options.dry_run {
        for entry in list {
            if ready.insert(entry.key.as_str()) {
                entry.resource.ready(ctx, known.get(&entry.key), &wait).await?;
            }
        }
    }
    Ok(created)
}

/// `down`'s walk: everything found first (finding some entries takes the ids of what
/// they need), then deleted last to first, each once all that needs it is gone.
/// Whatever is absent is skipped, so it can be re-run.
pub async fn down(ctx: &Ctx, list: &[Entry], wait: &Wait) -> Result<(), Error> {
    let mut known = Known::default();
    let mut found = Vec::new();
    for entry in list {
        let lookup = entry.resource.find(ctx, &known).await?;
        if let Lookup::Ours(id) = &lookup {
            known.0.insert(entry.key.clone(), id.clone());
        }
        found.push(lookup);
    }
    // Deleted, and not yet waited for until gone.
    let mut deleting: Vec<&Entry> = Vec::new();
    let mut heading = None;
    for (index, entry) in list.iter().enumerate().rev() {
        print_heading(&mut heading, entry.group);
        let mut still = Vec::new();
        for dependent in deleting {
            if dependent.deps.contains(&entry.key) {
                dependent.resource.gone(ctx, known.get(&dependent.key), wait).await?;
            } else {
                still.push(dependent);
            }
        }
        deleting = still;
        match &found[index] {
            Lookup::Ours(id) => {
                entry.resource.delete(ctx, &known, id).await?;
                progress::report(Report::Deleted, &entry.name, id);
                deleting.push(entry);
            }
            Lookup::Absent => progress::report(Report::Absent, &entry.name, ""),
            Lookup::NotOurs => progress::report(Report::NotOurs, &entry.name, ""),
        }
    }
    for entry in deleting {
        entry.resource.gone(ctx, known.get(&entry.key), wait).await?;
    }
    Ok(())
}

fn print_heading(current: &mut Option<Group>, group: Group) {
    if *current != Some(group) {
        println!("{}", group.heading());
        *current = Some(group);
    }
}
