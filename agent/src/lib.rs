//! The GitOps agent: keeps a Kubernetes cluster in sync with a git repository.
//!
//! Each stage of the sync is a module with one job, fed by the one before it:
//! [`source`] finds and fetches the commit to apply.

pub mod source;
