//! The one identity of an object, across versions of its API: what the inventory
//! records, prunes and drift watches key on, and the one form logs and errors print.

use std::fmt;

use kube::api::{ApiResource, DynamicObject};

/// An object's identity across versions of its API.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectId {
    /// Empty for the core group.
    pub group: String,
    pub kind: String,
    /// Empty for cluster-scoped objects.
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ObjectId {
    /// `kind group/namespace/name`, the form log lines and errors use.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let group = if self.group.is_empty() { String::new() } else { format!(".{}", self.group) };
        match self.namespace.as_str() {
            "" => write!(f, "{}{group} {}", self.kind, self.name),
            ns => write!(f, "{}{group} {ns}/{}", self.kind, self.name),
        }
    }
}

impl ObjectId {
    /// The identity of `object`, of kind `resource` (objects from a list or watch carry
    /// no kind of their own); `None` for an object without a name.
    pub fn of(resource: &ApiResource, object: &DynamicObject) -> Option<ObjectId> {
        Some(ObjectId {
            group: resource.group.clone(),
            kind: resource.kind.clone(),
            namespace: object.metadata.namespace.clone().unwrap_or_default(),
            name: object.metadata.name.clone()?,
        })
    }
}
