//! The inventory: which objects the agent applied, kept in the cluster so that a
//! restarted agent neither forgets an object (and leaves it orphaned) nor prunes one
//! it should keep.
//!
//! It is one ConfigMap (`gitops-inventory` in the agent's namespace), written with
//! the resourceVersion it was read at, so two writers cannot both win. A revision moves
//! it in two steps:
//!
//! 1. before any write, `pending` = everything the previous revision owned plus
//!    everything the new one will create: if the agent dies half-way, whatever it
//!    created is still listed and gets pruned or kept by the next revision;
//! 2. after apply and prune succeed, `entries` = the new revision's objects, `pending`
//!    is cleared, and `revision` names the commit.
//!
//! An entry is `namespace_name_group_kind`, Flux's inventory format (the version is
//! left out: any served version reaches the object). Entries the agent created carry a
//! `+` prefix; objects that already existed when the agent first applied them (adopted)
//! have none, and are never deleted by prune.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::{ObjectMeta, PostParams};

use crate::object::ObjectId;
use crate::write::Writer;

/// The ConfigMap's name in the agent's namespace.
pub const INVENTORY_NAME: &str = "gitops-inventory";

#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("reading inventory ConfigMap {namespace}/{name}: {source}")]
    Read { namespace: String, name: String, source: kube::Error },
    #[error("writing inventory ConfigMap {namespace}/{name}: {source}")]
    Write { namespace: String, name: String, source: crate::write::WriteError },
    #[error("inventory ConfigMap {namespace}/{name}, line {line}: malformed entry {entry:?}")]
    Malformed { namespace: String, name: String, line: usize, entry: String },
}

/// An object's line in the inventory: `namespace_name_group_kind`.
fn entry(id: &ObjectId) -> String {
    format!("{}_{}_{}_{}", id.namespace, id.name, id.group, id.kind)
}

fn parse_entry(entry: &str) -> Option<ObjectId> {
    // Names and namespaces are DNS labels/subdomains (no `_`); kinds are identifiers.
    let mut parts = entry.splitn(4, '_');
    let (namespace, name, group, kind) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    (!name.is_empty() && !kind.is_empty()).then(|| ObjectId {
        group: group.to_owned(),
        kind: kind.to_owned(),
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    })
}

/// Whether the agent created an object or found it in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Created,
    Adopted,
}

/// The objects one revision owns, by identity.
pub type Entries = BTreeMap<ObjectId, Origin>;

/// The stored inventory, as read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Inventory {
    /// The commit whose objects `entries` lists; `None` before the first sync.
    pub revision: Option<String>,
    /// Shared, as `pending` is: a copy of the inventory (the store keeps one) costs
    /// no copy of its 10,000 identities.
    pub entries: Arc<Entries>,
    /// Objects of a revision that started applying but did not finish (step 1 above).
    pub pending: Arc<Entries>,
    resource_version: Option<String>,
}

impl Inventory {
    /// Every object the agent may have written and still owns: `entries` and `pending`.
    /// Borrowed, not collected: a sync asked for it once per stage, and each time copied
    /// every identity the agent owns.
    pub fn owned(&self) -> impl Iterator<Item = (&ObjectId, Origin)> {
        let pending = self.pending.iter().filter(|(id, _)| !self.entries.contains_key(*id));
        self.entries.iter().chain(pending).map(|(id, origin)| (id, *origin))
    }

    /// How the agent came to own `id`, if it does.
    pub fn origin(&self, id: &ObjectId) -> Option<Origin> {
        // Where both list an object, `entries` knows it longer, so its origin holds.
        self.entries.get(id).or_else(|| self.pending.get(id)).copied()
    }
}

/// Reads and writes the inventory ConfigMap.
#[derive(Clone)]
pub struct Store {
    writer: Writer,
    api: Api<ConfigMap>,
    namespace: String,
    name: String,
    /// The inventory as this store last read or wrote it. A load first asks for the
    /// ConfigMap's metadata alone: when its resourceVersion is this one's, nobody wrote
    /// it since, and the entries (10,000 objects: 0.6 MB to send and parse) are reused.
    last: Arc<Mutex<Option<Inventory>>>,
}

impl Store {
    /// The agent's inventory, [`INVENTORY_NAME`].
    pub fn new(writer: Writer, namespace: &str) -> Store {
        Store::named(writer, namespace, INVENTORY_NAME)
    }

    /// An inventory of another name: one applier's objects must never be pruned by
    /// another's (gitops-bootstrap installs the agent under an inventory of its own).
    pub fn named(writer: Writer, namespace: &str, name: &str) -> Store {
        let api = Api::namespaced(writer.client().clone(), namespace);
        Store { writer, api, namespace: namespace.to_owned(), name: name.to_owned(), last: Arc::default() }
    }

    pub async fn load(&self) -> Result<Inventory, InventoryError> {
        let read = |source| InventoryError::Read { namespace: self.namespace.clone(), name: self.name.clone(), source };
        if self.last.lock().expect("not poisoned").is_some() {
            let stored = self.api.get_metadata_opt(&self.name).await.map_err(read)?;
            let stored = stored.and_then(|meta| meta.metadata.resource_version);
            let last = self.last.lock().expect("not poisoned");
            if let Some(last) = last.as_ref().filter(|last| stored.is_some() && last.resource_version == stored) {
                return Ok(last.clone());
            }
        }
        let inventory = match self.api.get_opt(&self.name).await.map_err(read)? {
            None => Inventory::default(),
            Some(cm) => {
                let data = cm.data.unwrap_or_default();
                Inventory {
                    revision: data.get("revision").filter(|r| !r.is_empty()).cloned(),
                    entries: Arc::new(self.parse(&data, "entries")?),
                    pending: Arc::new(self.parse(&data, "pending")?),
                    resource_version: cm.metadata.resource_version,
                }
            }
        };
        *self.last.lock().expect("not poisoned") = Some(inventory.clone());
        Ok(inventory)
    }

    /// Step 1: records `planned` as pending on top of what `current` owns.
    pub async fn begin(&self, current: &mut Inventory, planned: &Entries) -> Result<(), InventoryError> {
        // Objects `entries` already lists are safe; only new ones need recording. Most
        // syncs add none: the inventory is copied only when one does.
        let owned = |id: &ObjectId| current.entries.contains_key(id) || current.pending.contains_key(id);
        if planned.keys().all(owned) {
            return Ok(());
        }
        let mut next = current.clone();
        for (id, origin) in planned.iter().filter(|(id, _)| !current.entries.contains_key(*id)) {
            Arc::make_mut(&mut next.pending).entry(id.clone()).or_insert(*origin);
        }
        self.save(current, next).await
    }

    /// Step 2: `revision` now owns exactly `applied`.
    pub async fn commit(
        &self,
        current: &mut Inventory,
        revision: &str,
        applied: Entries,
    ) -> Result<(), InventoryError> {
        let next = Inventory {
            revision: Some(revision.to_owned()),
            entries: Arc::new(applied),
            pending: Arc::default(),
            resource_version: current.resource_version.clone(),
        };
        if next == *current {
            return Ok(());
        }
        self.save(current, next).await
    }

    /// Writes `next` if nobody changed the ConfigMap since `current` was read, and
    /// makes `current` the stored state.
    async fn save(&self, current: &mut Inventory, next: Inventory) -> Result<(), InventoryError> {
        let write =
            |source| InventoryError::Write { namespace: self.namespace.clone(), name: self.name.clone(), source };
        let mut cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                namespace: Some(self.namespace.clone()),
                resource_version: current.resource_version.clone(),
                labels: Some(BTreeMap::from([(crate::MANAGED_BY_LABEL.to_owned(), crate::FIELD_MANAGER.to_owned())])),
                ..Default::default()
            },
            data: Some(BTreeMap::from([
                ("revision".to_owned(), next.revision.clone().unwrap_or_default()),
                ("entries".to_owned(), format_entries(&next.entries)),
                ("pending".to_owned(), format_entries(&next.pending)),
            ])),
            ..Default::default()
        };
        let stored = match &current.resource_version {
            None => self.writer.create(&self.api, &PostParams::default(), &cm).await.map_err(write)?,
            Some(_) => self.writer.replace(&self.api, &self.name, &PostParams::default(), &cm).await.map_err(write)?,
        };
        cm.metadata.resource_version = stored.metadata.resource_version;
        *current = Inventory { resource_version: cm.metadata.resource_version, ..next };
        *self.last.lock().expect("not poisoned") = Some(current.clone());
        Ok(())
    }

    fn parse(&self, data: &BTreeMap<String, String>, key: &str) -> Result<Entries, InventoryError> {
        parse_entries(data.get(key).map(String::as_str).unwrap_or_default()).map_err(|(line, entry)| {
            InventoryError::Malformed { namespace: self.namespace.clone(), name: self.name.clone(), line, entry }
        })
    }
}

/// One entry a line; on failure, the 1-based line number and the line.
fn parse_entries(text: &str) -> Result<Entries, (usize, String)> {
    let mut entries = Entries::new();
    for (index, line) in text.lines().enumerate().filter(|(_, l)| !l.is_empty()) {
        let (origin, entry) = match line.strip_prefix('+') {
            Some(rest) => (Origin::Created, rest),
            None => (Origin::Adopted, line),
        };
        let id = parse_entry(entry).ok_or_else(|| (index + 1, line.to_owned()))?;
        entries.insert(id, origin);
    }
    Ok(entries)
}

fn format_entries(entries: &Entries) -> String {
    entries
        .iter()
        .map(|(id, origin)| match origin {
            Origin::Created => format!("+{}\n", entry(id)),
            Origin::Adopted => format!("{}\n", entry(id)),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_through_their_text_form() {
        let id = |group: &str, kind: &str, ns: &str, name: &str| ObjectId {
            group: group.into(),
            kind: kind.into(),
            namespace: ns.into(),
            name: name.into(),
        };
        let entries = Entries::from([
            (id("", "ConfigMap", "app", "settings"), Origin::Created),
            (id("apps", "Deployment", "app", "web"), Origin::Adopted),
            (id("", "Namespace", "", "app"), Origin::Created),
            (id("apiextensions.k8s.io", "CustomResourceDefinition", "", "widgets.example.com"), Origin::Created),
        ]);
        assert_eq!(parse_entries(&format_entries(&entries)), Ok(entries));
        assert_eq!(parse_entries("+_a_\nbroken"), Err((1, "+_a_".to_owned())));
        assert_eq!(id("apps", "Deployment", "app", "web").to_string(), "Deployment.apps app/web");
        assert_eq!(id("", "Namespace", "", "app").to_string(), "Namespace app");
    }
}
