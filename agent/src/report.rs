//! The agent's sync status, written into the cluster where anyone with `kubectl get`
//! (and gitops-bootstrap, which waits for the first successful sync) can read it
//! without reaching the agent's HTTP port: ConfigMap `gitops-agent-status` in the
//! agent's namespace, with
//!
//! - `revision`: the commit last applied (or attempted, when `phase` is `failed`);
//! - `phase`: `synced` or `failed`;
//! - `message`: empty when synced, else the error;
//! - `lastSyncTime`: RFC 3339 time at which this status was first reached;
//! - `health`: the applied revision's health (`Healthy`, `Progressing`, `Degraded`), and
//!   `healthMessage`: its unhealthy objects, one a line, each with its reason.
//!
//! It is written only when one of them changes: a resync of the same commit makes no
//! write request (the project counts them), so `lastSyncTime` is the time of the
//! change, not of the last poll; `/status` and the metrics have the latter.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::{Patch, PatchParams};
use tokio::sync::Mutex;

use crate::metrics::SyncResult;
use crate::write::Writer;

/// The ConfigMap's name in the agent's namespace.
pub const STATUS_NAME: &str = "gitops-agent-status";

/// The ConfigMap's `phase` of a reconcile's result.
fn phase(result: SyncResult) -> &'static str {
    match result {
        SyncResult::Success => "synced",
        SyncResult::Failure => "failed",
    }
}

/// What the ConfigMap says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Shown {
    /// Revision, phase and message; `None` before the first sync's outcome.
    sync: Option<(String, SyncResult, String)>,
    /// When `sync` last changed.
    time: String,
    health: String,
    health_message: String,
}

/// Writes the status ConfigMap when the status changes.
pub struct StatusReport {
    writer: Writer,
    api: Api<ConfigMap>,
    namespace: String,
    /// What the ConfigMap holds now (or is to hold, for a health reported before the
    /// first sync outcome), as far as this agent knows: `None` until read once, so a
    /// restarted agent that finds its own last status in place writes nothing.
    last: Mutex<Option<Shown>>,
}

impl StatusReport {
    pub fn new(writer: Writer, namespace: &str) -> StatusReport {
        StatusReport {
            api: Api::namespaced(writer.client().clone(), namespace),
            writer,
            namespace: namespace.to_owned(),
            last: Mutex::new(None),
        }
    }

    /// Records `phase` for `revision`. A failure to write is logged, not returned: the
    /// report is for people, and must never fail a sync.
    pub async fn report(&self, revision: &str, phase: SyncResult, message: &str) {
        let sync = Some((revision.to_owned(), phase, message.to_owned()));
        self.update(|shown| {
            if shown.sync != sync {
                shown.sync = sync;
                shown.time = k8s_openapi::jiff::Timestamp::now().to_string();
            }
        })
        .await;
    }

    /// Records the applied revision's health; logged, not returned, like [`Self::report`].
    pub async fn report_health(&self, health: &str, message: &str) {
        self.update(|shown| {
            shown.health = health.to_owned();
            shown.health_message = message.to_owned();
        })
        .await;
    }

    async fn update(&self, change: impl FnOnce(&mut Shown)) {
        let mut last = self.last.lock().await;
        if last.is_none() {
            *last = self.read().await;
        }
        let mut next = last.clone().unwrap_or_default();
        change(&mut next);
        if last.as_ref() == Some(&next) {
            return;
        }
        let Some((revision, phase, message)) = &next.sync else {
            // Written with the first sync outcome.
            *last = Some(next);
            return;
        };
        let status = serde_json::json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": STATUS_NAME,
                "namespace": self.namespace,
                "labels": { crate::MANAGED_BY_LABEL: crate::FIELD_MANAGER },
            },
            "data": {
                "revision": revision,
                "phase": self::phase(*phase),
                "message": message,
                "lastSyncTime": next.time,
                "health": next.health,
                "healthMessage": next.health_message,
            },
        });
        let params = PatchParams::apply(crate::FIELD_MANAGER).force();
        match self.writer.patch(&self.api, STATUS_NAME, &params, &Patch::Apply(status)).await {
            Ok(_) => *last = Some(next),
            Err(e) => {
                tracing::warn!(namespace = %self.namespace, name = STATUS_NAME, error = %e, "writing the status ConfigMap failed")
            }
        }
    }

    async fn read(&self) -> Option<Shown> {
        let data: BTreeMap<String, String> = self.api.get_opt(STATUS_NAME).await.ok()??.data?;
        let phase = match data.get("phase")?.as_str() {
            "synced" => SyncResult::Success,
            "failed" => SyncResult::Failure,
            _ => return None,
        };
        let field = |name: &str| data.get(name).cloned().unwrap_or_default();
        Some(Shown {
            sync: Some((data.get("revision")?.clone(), phase, field("message"))),
            time: field("lastSyncTime"),
            health: field("health"),
            health_message: field("healthMessage"),
        })
    }
}
