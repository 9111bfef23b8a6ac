//! What the node runs as pods from the start: CoreDNS behind the `kube-dns` Service
//! (`manifests/node/coredns.yaml`), from an image packed here.

use std::path::Path;

use k8s_openapi::api::apps::v1::Deployment;
use kube::Api;
use kube::api::{DynamicObject, Patch, PatchParams};
use kube::discovery::{Discovery, Scope};

use super::Error;
use super::image::{Image, ImageFile};
use super::network::DNS_SERVICE_IP;

/// The CoreDNS image, imported into the node's containerd.
pub const COREDNS_IMAGE: &str = "gitops.local/coredns:1.15.0";
static COREDNS_MANIFESTS: &str = include_str!("../../../manifests/node/coredns.yaml");
const FIELD_MANAGER: &str = "gitops-bootstrap";

/// Writes the CoreDNS image (the static binary alone) as a docker-archive to `out`.
pub fn coredns_image(coredns: &Path, out: &Path) -> Result<(), Error> {
    Image {
        reference: COREDNS_IMAGE.into(),
        files: vec![ImageFile { path: "/coredns", source: coredns.to_owned() }],
        entrypoint: vec!["/coredns".into()],
    }
    .write_archive(out)
}

/// Applies CoreDNS's objects; its image must be on the node already.
pub async fn apply_coredns(client: &kube::Client) -> Result<(), Error> {
    let yaml = COREDNS_MANIFESTS.replace("IMAGE", COREDNS_IMAGE).replace("CLUSTER_DNS_IP", &DNS_SERVICE_IP.to_string());
    apply_yaml(client, &yaml, FIELD_MANAGER).await.map(drop)
}

/// Whether CoreDNS's Deployment has a ready replica.
pub async fn coredns_ready(client: &kube::Client) -> Result<(), String> {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "kube-system");
    let deployment = deployments.get("coredns").await.map_err(|e| e.to_string())?;
    match deployment.status.and_then(|s| s.ready_replicas) {
        Some(ready) if ready > 0 => Ok(()),
        _ => Err("no CoreDNS replica is ready yet".to_owned()),
    }
}

/// Applies every object of `yaml` (server-side, forcing ownership as `field_manager`),
/// rendered as the agent renders a file, in the order written.
pub async fn apply_yaml(
    client: &kube::Client,
    yaml: &str,
    field_manager: &str,
) -> Result<Vec<gitops_agent::render::Manifest>, Error> {
    let failed = |what: &str, message: String| Error::Apply { what: what.to_owned(), message };
    let root = tempfile::tempdir().map_err(|e| Error::io(&std::env::temp_dir(), e))?;
    let manifests = root.path().join("manifests");
    std::fs::create_dir(&manifests).map_err(|e| Error::io(&manifests, e))?;
    let file = manifests.join("objects.yaml");
    std::fs::write(&file, yaml).map_err(|e| Error::io(&file, e))?;
    let rendered =
        gitops_agent::render::render(root.path(), "default").map_err(|e| failed("rendering", format!("{e:?}")))?;
    let discovery =
        Discovery::new(client.clone()).run_aggregated().await.map_err(|e| failed("discovery", e.to_string()))?;
    for manifest in &rendered.manifests {
        let what = manifest.location.to_string();
        let (resource, caps) = discovery
            .resolve_gvk(&manifest.gvk())
            .ok_or_else(|| failed(&what, "the API server does not serve its kind".into()))?;
        let api: Api<DynamicObject> = match (caps.scope, manifest.namespace()) {
            (Scope::Namespaced, Some(namespace)) => Api::namespaced_with(client.clone(), namespace, &resource),
            _ => Api::all_with(client.clone(), &resource),
        };
        let params = PatchParams::apply(field_manager).force();
        api.patch(manifest.name(), &params, &Patch::Apply(&manifest.object))
            .await
            .map_err(|e| failed(&what, e.to_string()))?;
    }
    Ok(rendered.manifests)
}
