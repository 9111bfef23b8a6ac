//! Control through the API server, as `flux suspend` and `flux reconcile` do it: the
//! agent watches annotations on its own status ConfigMap (`gitops-agent-status`), which
//! anyone allowed to patch it can set (`gitops-agent suspend|resume|sync`), in a pod
//! as well as out of one, without reaching the agent's port.
//!
//! - [`SUSPEND_ANNOTATION`] `"true"`: nothing is applied, corrected, pruned or run
//!   until it is removed; `/status.suspended` and `gitops_suspended` say so;
//! - [`SYNC_ANNOTATION`] changed: fetch now, as a push webhook would.

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::{Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};

use crate::report::STATUS_NAME;
use crate::status::AppState;
use crate::write::Writer;

/// `"true"` on the status ConfigMap: the agent writes nothing.
pub const SUSPEND_ANNOTATION: &str = "gitops.scale.dev/suspend";
/// A new value (the CLI sets the time) on the status ConfigMap: fetch now.
pub const SYNC_ANNOTATION: &str = "gitops.scale.dev/sync-requested-at";

/// Follows the status ConfigMap in `namespace` until aborted: suspends and resumes the
/// `writer` (and so every clone of it), and wakes the loop on a sync request.
pub async fn follow(writer: Writer, namespace: String, state: Arc<AppState>) {
    let api: Api<ConfigMap> = Api::namespaced(writer.client().clone(), &namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={STATUS_NAME}"));
    let mut events = watcher::watcher(api, config).default_backoff().boxed();
    // The request seen when the agent started is no news.
    let mut last_request: Option<Option<String>> = None;
    while let Some(event) = events.next().await {
        let annotations = match event {
            Ok(Event::Apply(cm) | Event::InitApply(cm)) => cm.metadata.annotations.unwrap_or_default(),
            Ok(Event::Delete(_)) => Default::default(),
            Ok(Event::Init | Event::InitDone) => continue,
            Err(e) => {
                tracing::warn!(namespace, name = STATUS_NAME, error = %e, "status ConfigMap watch interrupted");
                continue;
            }
        };
        let suspended = annotations.get(SUSPEND_ANNOTATION).is_some_and(|v| v == "true");
        if suspended != *writer.suspension().borrow() {
            if suspended {
                tracing::warn!(namespace, annotation = SUSPEND_ANNOTATION, "suspended: applying nothing until resumed");
            } else {
                tracing::info!(namespace, "resumed");
            }
        }
        writer.set_suspended(suspended);
        state.set_suspended(suspended);
        let request = annotations.get(SYNC_ANNOTATION).cloned();
        if last_request.as_ref().is_some_and(|last| *last != request) && request.is_some() {
            tracing::info!(namespace, requested = request.as_deref(), "sync requested");
            state.fetch_now.notify_one();
        }
        last_request = Some(request);
    }
}

/// What `gitops-agent suspend|resume|sync` asks of a running agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Suspend,
    Resume,
    Sync,
}

#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("no agent status ConfigMap {namespace}/{STATUS_NAME}: is an agent running with --namespace {namespace}?")]
    NoAgent { namespace: String },
    #[error("annotating ConfigMap {namespace}/{STATUS_NAME}: {source}")]
    Api { namespace: String, source: kube::Error },
}

/// Sets the annotation that asks the agent of `namespace` for `request`.
pub async fn request(client: kube::Client, namespace: &str, request: Request) -> Result<(), RequestError> {
    let api: Api<ConfigMap> = Api::namespaced(client, namespace);
    let value = match request {
        Request::Suspend => serde_json::json!({ SUSPEND_ANNOTATION: "true" }),
        Request::Resume => serde_json::json!({ SUSPEND_ANNOTATION: null }),
        Request::Sync => serde_json::json!({ SYNC_ANNOTATION: k8s_openapi::jiff::Timestamp::now().to_string() }),
    };
    let patch = serde_json::json!({ "metadata": { "annotations": value } });
    let params = PatchParams { field_manager: Some("gitops-agent-cli".to_owned()), ..PatchParams::default() };
    match api.patch(STATUS_NAME, &params, &Patch::Merge(&patch)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => {
            Err(RequestError::NoAgent { namespace: namespace.to_owned() })
        }
        Err(source) => Err(RequestError::Api { namespace: namespace.to_owned(), source }),
    }
}
