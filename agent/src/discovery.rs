//! The API server's kinds (discovery) and what charts are told of the cluster, kept
//! between syncs: a commit pays for discovery only when the kinds may have changed.
//!
//! The kinds change when a CustomResourceDefinition or an APIService does. A watch on
//! both (metadata only) marks the cache stale on any change after its first list, or
//! when the watch breaks (a change may have been missed); a sync that itself changed
//! one marks it stale too, without waiting for the event. A revision naming a kind the
//! cached discovery lacks gets one fresh discovery before that is an error
//! ([`Kinds::refresh`]), which covers a CRD installed an instant before the commit.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1::APIService;
use kube::Api;
use kube::core::PartialObjectMeta;
use kube::discovery::Discovery;
use kube::runtime::{WatchStreamExt, watcher};

use crate::render::Capabilities;

/// Discovery as of one moment, and the capabilities derived from it.
pub struct Known {
    pub discovery: Discovery,
    pub capabilities: Capabilities,
}

/// The cached [`Known`], refreshed when stale.
pub struct Kinds {
    client: kube::Client,
    cached: Mutex<Option<Arc<Known>>>,
    stale: Arc<AtomicBool>,
    /// The watch of CRDs and APIServices, started with the first discovery (it needs
    /// the runtime) and stopped with the cache.
    watch: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Kinds {
    pub fn new(client: kube::Client) -> Kinds {
        Kinds { client, cached: Mutex::default(), stale: Arc::default(), watch: Mutex::default() }
    }

    /// The cached discovery, or a fresh one when there is none or it is stale; `true`
    /// with it when it was just made (a missing kind is then really missing).
    pub async fn get(&self) -> Result<(Arc<Known>, bool), kube::Error> {
        self.start_watch();
        let cached = self.cached.lock().expect("not poisoned").clone();
        match cached {
            Some(known) if !self.stale.load(Ordering::Acquire) => Ok((known, false)),
            _ => self.refresh().await.map(|known| (known, true)),
        }
    }

    /// A fresh discovery, cached from now on.
    pub async fn refresh(&self) -> Result<Arc<Known>, kube::Error> {
        // Cleared first: a change seen while discovering marks the new one stale again.
        self.stale.store(false, Ordering::Release);
        let discovery = Discovery::new(self.client.clone()).run_aggregated().await;
        let version = self.client.apiserver_version().await;
        let (discovery, version) = match (discovery, version) {
            (Ok(discovery), Ok(version)) => (discovery, version),
            (Err(e), _) | (_, Err(e)) => {
                self.stale.store(true, Ordering::Release);
                return Err(e);
            }
        };
        let capabilities = capabilities(&discovery, version.git_version);
        let known = Arc::new(Known { discovery, capabilities });
        *self.cached.lock().expect("not poisoned") = Some(known.clone());
        tracing::debug!("discovered the API server's kinds");
        Ok(known)
    }

    /// The next [`Self::get`] discovers again (a sync changed a CRD or an APIService).
    pub fn invalidate(&self) {
        self.stale.store(true, Ordering::Release);
    }

    fn start_watch(&self) {
        let mut watch = self.watch.lock().expect("not poisoned");
        if watch.is_some() {
            return;
        }
        let crds: Api<PartialObjectMeta<CustomResourceDefinition>> = Api::all(self.client.clone());
        let services: Api<PartialObjectMeta<APIService>> = Api::all(self.client.clone());
        let stale = self.stale.clone();
        *watch = Some(tokio::spawn(async move {
            let config = watcher::Config::default();
            // Backoff between retries: without it a watch of an API server that is down
            // retries at once, thousands of times a second.
            let crds = changes(watcher::watcher(crds, config.clone()).default_backoff());
            let services = changes(watcher::watcher(services, config).default_backoff());
            let mut changes = futures::stream::select(crds, services);
            while let Some(changed) = changes.next().await {
                if changed {
                    stale.store(true, Ordering::Release);
                }
            }
        }));
    }
}

impl Drop for Kinds {
    fn drop(&mut self) {
        if let Some(watch) = self.watch.lock().expect("not poisoned").take() {
            watch.abort();
        }
    }
}

/// For each watch event, whether the kinds may have changed: every event but the items
/// of the first list may. The end of that list counts, since a kind added between the
/// first discovery and the list shows only as an item; a relist comes after a broken
/// watch, which may have missed a change, and so does an error.
fn changes<K: Send + 'static>(
    events: impl futures::Stream<Item = watcher::Result<watcher::Event<K>>> + Send + 'static,
) -> futures::stream::BoxStream<'static, bool> {
    let mut listed = false;
    events
        .map(move |event| match event {
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => listed,
            Ok(watcher::Event::InitDone) => {
                listed = true;
                true
            }
            Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) | Err(_) => true,
        })
        .boxed()
}

/// What charts are told of the cluster: its version and every `GROUP/VERSION` and
/// `GROUP/VERSION/Kind` it serves, as helm's own client would discover them.
pub fn capabilities(discovery: &Discovery, kube_version: String) -> Capabilities {
    let mut api_versions = std::collections::BTreeSet::new();
    for group in discovery.groups() {
        for version in group.versions() {
            for (resource, _) in group.versioned_resources(version) {
                api_versions.insert(resource.api_version.clone());
                api_versions.insert(format!("{}/{}", resource.api_version, resource.kind));
            }
        }
    }
    Capabilities { kube_version: Some(kube_version), api_versions: api_versions.into_iter().collect() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_the_first_lists_items_leave_the_kinds_trusted() {
        let events: Vec<watcher::Result<watcher::Event<()>>> = vec![
            Ok(watcher::Event::Init),
            Ok(watcher::Event::InitApply(())),
            Ok(watcher::Event::InitDone),
            Ok(watcher::Event::Apply(())),
            Ok(watcher::Event::Delete(())),
            Err(watcher::Error::NoResourceVersion),
            // The relist after the error.
            Ok(watcher::Event::Init),
            Ok(watcher::Event::InitApply(())),
            Ok(watcher::Event::InitDone),
        ];
        let seen: Vec<bool> = changes(futures::stream::iter(events)).collect().await;
        assert_eq!(seen, [false, false, true, true, true, true, true, true, true]);
    }
}
