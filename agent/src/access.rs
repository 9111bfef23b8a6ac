//! Access: what the agent may touch, the whole cluster or only some namespaces
//! (`--allow-namespaces`). Restricted, the agent refuses every object outside those
//! namespaces and every cluster-scoped object when it plans a revision, before any
//! write, and watches only inside them, so RBAC limited to those namespaces (see
//! `manifests/restricted/`) is all it needs.

use std::collections::BTreeSet;
use std::fmt;

use kube::api::{Api, ApiResource, DynamicObject};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Access {
    #[default]
    Cluster,
    /// Namespaced objects in these namespaces only.
    Namespaces(BTreeSet<String>),
}

impl Access {
    /// `--allow-namespaces`: `None` (or empty) for the whole cluster.
    pub fn new(allowed: Option<Vec<String>>) -> Access {
        match allowed {
            Some(namespaces) if !namespaces.is_empty() => Access::Namespaces(namespaces.into_iter().collect()),
            _ => Access::Cluster,
        }
    }

    /// Why an object in `namespace` (`None`: cluster-scoped) may not be applied.
    pub fn refusal(&self, namespace: Option<&str>) -> Option<Refusal> {
        let Access::Namespaces(allowed) = self else { return None };
        match namespace {
            None => Some(Refusal::ClusterScoped),
            Some(namespace) if !allowed.contains(namespace) => Some(Refusal::Namespace(namespace.to_owned())),
            Some(_) => None,
        }
    }

    /// Where to list and watch: the whole cluster (`None`), or each allowed namespace.
    pub fn watch_scopes(&self) -> Vec<Option<String>> {
        match self {
            Access::Cluster => vec![None],
            Access::Namespaces(allowed) => allowed.iter().cloned().map(Some).collect(),
        }
    }
}

/// The API of a kind in `namespace`, or cluster-wide for `None`.
pub fn api(client: &kube::Client, resource: &ApiResource, namespace: Option<&str>) -> Api<DynamicObject> {
    match namespace {
        None => Api::all_with(client.clone(), resource),
        Some(namespace) => Api::namespaced_with(client.clone(), namespace, resource),
    }
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Access::Cluster => f.write_str("the whole cluster"),
            Access::Namespaces(allowed) => {
                write!(f, "--allow-namespaces {}", allowed.iter().cloned().collect::<Vec<_>>().join(","))
            }
        }
    }
}

/// Why restricted access refuses an object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("it is cluster-scoped, and the agent may only apply objects inside its allowed namespaces")]
    ClusterScoped,
    #[error("namespace {0} is outside the agent's allowed namespaces")]
    Namespace(String),
}
