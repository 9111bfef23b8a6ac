//! The one writer: every request that changes the cluster (applies, drift corrections,
//! prunes, batch runs, the inventory and the status ConfigMap) goes through a
//! [`Writer`], which asks the replica's [`Lead`] right before sending it.
//!
//! Leader election only helps if nothing writes around it. A replica that lost the
//! Lease while its drift watch or a batch-run watcher was busy would otherwise go on
//! writing its old revision over what the new leader applied: two writers, each undoing
//! the other. Reads and dry runs change nothing and need no lead; [`crate::apply`] makes
//! them itself. Events ([`crate::events`]) are writes too: a standby emits none. The one write made before leadership exists is the agent's own
//! namespace, at start-up ([`crate::agent`]): the Lease lives in it.

use std::sync::Arc;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::core::Resource;
use kube::runtime::events::{Event, Recorder, Reporter};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use crate::leader::Lead;

/// Why a write was not made.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// Another replica may be applying now; this one must not.
    #[error("not written: this replica does not hold the leader lease")]
    NotLeader,
    /// Someone suspended the agent (`gitops-agent suspend`).
    #[error("not written: the agent is suspended")]
    Suspended,
    #[error(transparent)]
    Api(#[from] kube::Error),
}

impl WriteError {
    /// The API server answered with this HTTP status.
    pub fn is_status(&self, code: u16) -> bool {
        matches!(self, WriteError::Api(kube::Error::Api(status)) if status.code == code)
    }
}

/// Writes to the cluster while this replica leads, and refuses to otherwise.
#[derive(Clone)]
pub struct Writer {
    client: kube::Client,
    lead: Lead,
    /// Shared by every clone: suspending one suspends all.
    suspended: Arc<watch::Sender<bool>>,
    /// Shared by every clone too: its cache makes repeats a series.
    recorder: Recorder,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer").field("lead", &self.lead).finish_non_exhaustive()
    }
}

impl Writer {
    pub fn new(client: kube::Client, lead: Lead) -> Writer {
        // The instance is the host name: in a pod, the pod's name.
        let recorder = Recorder::new(client.clone(), Reporter::from(crate::FIELD_MANAGER));
        Writer { client, lead, suspended: Arc::new(watch::Sender::new(false)), recorder }
    }

    /// A writer that is the only one by construction (gitops-bootstrap's installer, a
    /// test), with no leader election.
    pub fn sole(client: kube::Client) -> Writer {
        Writer::new(client, Lead::sole())
    }

    pub fn client(&self) -> &kube::Client {
        &self.client
    }

    /// Whether this replica leads now.
    pub fn leads(&self) -> bool {
        self.lead.holds()
    }

    /// When this replica began to lead, while it does.
    pub fn leading_since(&self) -> Option<std::time::SystemTime> {
        self.lead.since()
    }

    /// Whether a write would be made now: this replica leads and is not suspended.
    pub fn may_write(&self) -> bool {
        self.check().is_ok()
    }

    /// While suspended, nothing is written: not applied, corrected, pruned or run.
    pub fn set_suspended(&self, suspended: bool) {
        self.suspended.send_if_modified(|current| std::mem::replace(current, suspended) != suspended);
    }

    /// Follows [`Writer::set_suspended`].
    pub fn suspension(&self) -> watch::Receiver<bool> {
        self.suspended.subscribe()
    }

    fn check(&self) -> Result<(), WriteError> {
        if !self.lead.holds() {
            Err(WriteError::NotLeader)
        } else if *self.suspended.borrow() {
            Err(WriteError::Suspended)
        } else {
            Ok(())
        }
    }

    /// A patch (server-side apply, merge, …) that is not a dry run.
    pub async fn patch<K, P>(
        &self,
        api: &Api<K>,
        name: &str,
        params: &PatchParams,
        patch: &Patch<P>,
    ) -> Result<K, WriteError>
    where
        K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
        P: Serialize + std::fmt::Debug,
    {
        debug_assert!(!params.dry_run, "dry runs are reads: call the Api");
        self.check()?;
        Ok(api.patch(name, params, patch).await?)
    }

    pub async fn create<K>(&self, api: &Api<K>, params: &PostParams, object: &K) -> Result<K, WriteError>
    where
        K: Resource + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
    {
        self.check()?;
        Ok(api.create(params, object).await?)
    }

    pub async fn replace<K>(&self, api: &Api<K>, name: &str, params: &PostParams, object: &K) -> Result<K, WriteError>
    where
        K: Resource + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
    {
        self.check()?;
        Ok(api.replace(name, params, object).await?)
    }

    /// Deletes `name`; one that is already gone counts as deleted.
    pub async fn delete<K>(&self, api: &Api<K>, name: &str, params: &DeleteParams) -> Result<(), WriteError>
    where
        K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
    {
        self.check()?;
        match api.delete(name, params).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Emits `event` about `regarding` (in its namespace; `default` for a cluster-scoped
    /// object), or adds to the series of the same event emitted lately.
    pub async fn publish(&self, event: &Event, regarding: &ObjectReference) -> Result<(), WriteError> {
        self.check()?;
        Ok(self.recorder.publish(event, regarding).await?)
    }
}
