//! What the node runs as pods from the start, from images packed here: CoreDNS behind
//! the `kube-dns` Service (`manifests/node/coredns.yaml`), and local-path-provisioner
//! behind the default StorageClass (`manifests/node/local-path.yaml`).

use std::path::Path;

use k8s_openapi::api::apps::v1::Deployment;
use kube::Api;
use kube::api::{DynamicObject, Patch, PatchParams};
use kube::discovery::{Discovery, Scope};

use super::image::{DEBIAN_IMAGE, Image, ImageFile};
use super::network::DNS_SERVICE_IP;
use super::{Binaries, Error};

/// The CoreDNS image, imported into the node's containerd.
pub const COREDNS_IMAGE: &str = "gitops.local/coredns:1.15.0";
/// The local-path-provisioner image, imported likewise.
pub const LOCAL_PATH_IMAGE: &str = "gitops.local/local-path-provisioner:0.0.30";
static COREDNS_MANIFESTS: &str = include_str!("../../../manifests/node/coredns.yaml");
static LOCAL_PATH_MANIFESTS: &str = include_str!("../../../manifests/node/local-path.yaml");
const FIELD_MANAGER: &str = "gitops-bootstrap";
/// Each add-on's Deployment, which `up` waits for.
const DEPLOYMENTS: [(&str, &str); 2] = [("kube-system", "coredns"), ("local-path-storage", "local-path-provisioner")];

/// Writes the add-ons' images (each its static binary alone) as docker-archives into
/// `dir`, as `coredns.tar` and `local-path.tar`.
pub fn write_images(binaries: &Binaries, dir: &Path) -> Result<(), Error> {
    for (reference, path, source, archive) in [
        (COREDNS_IMAGE, "/coredns", &binaries.coredns, "coredns.tar"),
        (LOCAL_PATH_IMAGE, "/local-path-provisioner", &binaries.local_path, "local-path.tar"),
    ] {
        Image {
            reference: reference.into(),
            files: vec![ImageFile { path, source: source.clone() }],
            entrypoint: vec![path.into()],
        }
        .write_archive(&dir.join(archive))?;
    }
    Ok(())
}

/// Applies the add-ons' objects; their images must be on the node already, and the
/// Debian base in `registry`. Volumes go under `storage_dir`.
pub async fn apply(client: &kube::Client, registry: &str, storage_dir: &Path) -> Result<(), Error> {
    let coredns =
        COREDNS_MANIFESTS.replace("IMAGE", COREDNS_IMAGE).replace("CLUSTER_DNS_IP", &DNS_SERVICE_IP.to_string());
    apply_yaml(client, &coredns, FIELD_MANAGER).await?;
    let local_path = LOCAL_PATH_MANIFESTS
        .replace("PROVISIONER_IMAGE", LOCAL_PATH_IMAGE)
        .replace("HELPER_IMAGE", &format!("{registry}/{DEBIAN_IMAGE}"))
        .replace("STORAGE_DIR", &storage_dir.display().to_string());
    apply_yaml(client, &local_path, FIELD_MANAGER).await.map(drop)
}

/// Whether every add-on's Deployment has a ready replica.
pub async fn ready(client: &kube::Client) -> Result<(), String> {
    for (namespace, name) in DEPLOYMENTS {
        let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
        let deployment = deployments.get(name).await.map_err(|e| e.to_string())?;
        if deployment.status.and_then(|s| s.ready_replicas).is_none_or(|ready| ready <= 0) {
            return Err(format!("no replica of {namespace}/{name} is ready yet"));
        }
    }
    Ok(())
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
