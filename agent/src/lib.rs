//! The GitOps agent: keeps a Kubernetes cluster in sync with a git repository.
//!
//! Each stage of a sync is a module with one job, fed by the one before it:
//! - [`source`] finds and fetches the commit to apply (git over file, git, HTTP(S), SSH);
//! - [`render`] turns its files into validated objects, each error as `file:line`;
//! - [`validate`] checks them offline against the API's schema (`gitops-agent validate`);
//! - [`plan`] orders them in stages against the API server's discovery and picks what to prune;
//! - [`apply`] dry-runs, applies and deletes them with server-side apply;
//! - [`inventory`] keeps, in the cluster, what the agent owns;
//! - [`sync`] runs those stages for one revision; [`run`] is the loop around it;
//! - [`drift`] watches the applied objects between commits;
//! - [`health`] says how one live object is doing; [`rollout`] follows the applied revision's health;
//! - [`jobs`] makes a batch run of each job spec that changed, and follows it;
//! - [`report`] writes each sync's outcome into a ConfigMap, for `kubectl get` and gitops-bootstrap;
//! - [`events`] emits Kubernetes Events for what the agent does, for `kubectl get events`;
//! - [`status`] holds what the agent shows, recorded once per outcome; [`metrics`] and
//!   [`server`] report it over HTTP;
//! - [`access`] says what the agent may touch: the cluster, or some namespaces;
//! - [`write`] is the one way anything is written, and only while this replica leads ([`leader`]);
//! - [`control`] takes requests through the API server: suspend, resume, sync now;
//! - [`agent`] wires it all together: [`agent::Agent::start`].

pub mod access;
pub mod agent;
pub mod apply;
pub mod batch;
pub mod control;
pub mod discovery;
pub mod drift;
pub mod events;
pub mod health;
pub mod inventory;
pub mod leader;
pub mod metrics;
pub mod object;
pub mod plan;
pub mod reconcile;
pub mod render;
pub mod report;
pub mod rollout;
pub mod server;
pub mod source;
pub mod stages;
pub mod status;
pub mod sync;
pub mod validate;
pub mod write;

/// The field manager of every apply, and the value of the managed-by label.
pub const FIELD_MANAGER: &str = "gitops-agent";
/// Label on everything the agent manages.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Annotation that keeps an object when it is removed from git (`disabled`).
pub const PRUNE_ANNOTATION: &str = "gitops.scale.dev/prune";

/// Hands freed memory back to the kernel. A sync of thousands of objects holds several
/// copies of each for a moment (desired, live, dry-run result), and a drift watcher's
/// first list passes each of its objects through once; glibc keeps freed pages in its
/// per-thread arenas, so without this the agent's resident size stays at its peak.
pub(crate) fn release_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory of the allocator to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}
