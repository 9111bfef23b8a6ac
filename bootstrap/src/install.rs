//! Installing the agent into a cluster: the one code path of every provider (EKS, and
//! the local control plane, where the same manifests are applied although no kubelet
//! runs them and the agent runs as a local process instead).
//!
//! 1. Namespaces `gitops-system` and `scale`, applied by gitops-bootstrap itself: they
//!    hold data (Secrets, the agent's inventories) and must outlive a re-install.
//! 2. The git credential Secret `gitops-git` from `--git-token-file` / `--ssh-key-file`,
//!    and the Scale database Secret `scale/scale-postgres` with a generated password,
//!    created once: a second `up` keeps the password the database was set up with.
//! 3. `manifests/install/` and the PrometheusRule of `manifests/alerts/`, compiled into
//!    the binary, with the image and repository filled in, applied with the agent's own
//!    [`Syncer`] under an inventory of their own ([`INSTALL_INVENTORY`]). The agent's
//!    sync of the user's repository keeps `gitops-inventory` and prunes whatever is not
//!    in that repository: sharing it, the agent would prune itself.
//!
//! Then [`wait_synced`] reads the agent's status ConfigMap until its first successful
//! sync, and [`wait_healthy`] until the revision it applied is Healthy. The generated
//! password is never printed or logged; only its Secret holds it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use gitops_agent::apply::Action;
use gitops_agent::report::STATUS_NAME;
use gitops_agent::sync::{self, Syncer};
use include_dir::{Dir, include_dir};
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use kube::Api;
use kube::api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams, PropagationPolicy};
use serde_json::{Value, json};

use crate::progress::{self, Poll, Timeout};

/// The agent's namespace.
pub const AGENT_NAMESPACE: &str = "gitops-system";
/// The inventory of what the install applied, beside the agent's own `gitops-inventory`.
pub const INSTALL_INVENTORY: &str = "gitops-install-inventory";
/// The git credential Secret the Deployment mounts at `--git-secret-dir`.
pub const GIT_SECRET: &str = "gitops-git";
/// The Scale pipeline's database credentials: keys `username`, `password`, `database`.
pub const DB_SECRET: &str = "scale-postgres";
pub const DB_NAMESPACE: &str = "scale";
/// The image `--agent-image` defaults to.
pub const DEFAULT_IMAGE: &str = "ghcr.io/scale/gitops-agent:latest";
/// Field manager of what gitops-bootstrap applies itself (namespaces, Secrets).
const FIELD_MANAGER: &str = "gitops-bootstrap";

static INSTALL_MANIFESTS: Dir<'_> = include_dir!("$CARGO_MANIFEST_DIR/../manifests/install");
static PROMETHEUS_RULE: &str = include_str!("../../manifests/alerts/prometheusrule.yaml");
static STAND_IN_CRDS: Dir<'_> = include_dir!("$CARGO_MANIFEST_DIR/../manifests/crds");

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{action}: {source}")]
    Kube { action: String, source: kube::Error },
    #[error("reading {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("writing the install manifests to {}: {source}", path.display())]
    Write { path: PathBuf, source: std::io::Error },
    #[error("applying the agent's install manifests: {0}")]
    Sync(#[from] sync::SyncError),
    #[error("the install manifests do not render (a bug in gitops-bootstrap): {0}")]
    Render(String),
    #[error(transparent)]
    Timeout(#[from] Timeout),
    #[error("{}", unhealthy_report(.revision, .health, .waited, .unhealthy, .look))]
    Unhealthy {
        revision: String,
        /// `Degraded`, or the health it still had when the wait gave up.
        health: String,
        /// `None` when it turned Degraded; else how long it was waited for.
        waited: Option<Duration>,
        /// The status ConfigMap's `healthMessage`: the unhealthy objects, one a line.
        unhealthy: String,
        /// Commands that show more (`gitops-bootstrap status`, kubectl).
        look: String,
    },
}

fn unhealthy_report(revision: &str, health: &str, waited: &Option<Duration>, unhealthy: &str, look: &str) -> String {
    let state = match waited {
        None => format!("is {health}"),
        Some(waited) => format!("is still {health} after {}", progress::elapsed(*waited)),
    };
    let objects = match unhealthy.trim() {
        "" => "  (the agent names no unhealthy object)".to_owned(),
        lines => lines.lines().map(|line| format!("  {line}")).collect::<Vec<_>>().join("\n"),
    };
    format!(
        "the agent's revision {} {state}; its unhealthy objects:\n{objects}\nLook further with:\n{look}",
        short(revision)
    )
}

fn kube_error(action: impl Into<String>) -> impl FnOnce(kube::Error) -> InstallError {
    let action = action.into();
    move |source| InstallError::Kube { action, source }
}

/// What to install and how the agent follows its repository.
#[derive(Debug, Clone)]
pub struct InstallOptions {
    pub repo: String,
    pub branch: String,
    pub path: String,
    pub image: String,
    /// A file holding an HTTPS token (GitHub, Gitea, GitLab), with `git_username`.
    pub git_token_file: Option<PathBuf>,
    pub git_username: String,
    /// A file holding an SSH private key, and optionally the host keys to trust.
    pub ssh_key_file: Option<PathBuf>,
    pub ssh_known_hosts_file: Option<PathBuf>,
}

/// What the install did.
#[derive(Debug, Default)]
pub struct Installed {
    /// `Kind namespace/name: created|configured|unchanged`.
    pub objects: Vec<String>,
    /// Objects of APIs the cluster does not serve (the Prometheus Operator's), left out.
    pub skipped: Vec<String>,
    /// Whether the database password was generated now (else the Secret existed).
    pub generated_db_password: bool,
}

/// Installs (or updates) the agent in the cluster of `client`.
pub async fn install(client: &kube::Client, options: &InstallOptions) -> Result<Installed, InstallError> {
    for namespace in [AGENT_NAMESPACE, DB_NAMESPACE] {
        apply_namespace(client, namespace).await?;
    }
    apply_git_secret(client, options).await?;
    let generated_db_password = ensure_db_secret(client).await?;

    let work = tempfile::tempdir().map_err(|source| InstallError::Write { path: std::env::temp_dir(), source })?;
    let (objects, skipped) = render(client, options, work.path()).await?;
    let root = work.path().join("out");
    write_objects(&root, &objects)?;
    let revision = format!("gitops-bootstrap-{}", env!("CARGO_PKG_VERSION"));
    let synced = installer(client).sync(&root, &revision).await?;
    let objects = synced
        .changes
        .changes
        .iter()
        .map(|c| {
            let action = match c.action {
                Action::Created => "created",
                Action::Configured => "configured",
                Action::Unchanged => "unchanged",
                Action::Deleted => "deleted",
            };
            format!("{}: {action}", c.id)
        })
        .collect();
    Ok(Installed { objects, skipped, generated_db_password })
}

/// For a control plane without operators (the local one): the stand-in CRDs of
/// `manifests/crds/` (SparkApplication, ServiceMonitor, PrometheusRule) and the
/// `monitoring` namespace for dashboards, so a repository made from repo-template syncs
/// as it would on a cluster with kube-prometheus-stack and the spark operator.
pub async fn install_operator_stand_ins(client: &kube::Client) -> Result<(), InstallError> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;

    apply_namespace(client, "monitoring").await?;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for file in STAND_IN_CRDS.files() {
        let text = file.contents_utf8().expect("the stand-in CRDs are UTF-8");
        let rendered = gitops_agent::render::render_text(file.path(), text).map_err(|errors| {
            InstallError::Render(errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))
        })?;
        for crd in rendered {
            let name = crd.name().to_owned();
            crds.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&crd.object))
                .await
                .map_err(kube_error(format!("applying CustomResourceDefinition {name}")))?;
            println!("  CustomResourceDefinition {name} (stand-in)");
        }
    }
    Ok(())
}

/// Installs and prints what it did, one line an object: the step every provider's `up`
/// ends with, before waiting for the agent's first sync.
pub async fn install_and_report(client: &kube::Client, options: &InstallOptions) -> Result<(), InstallError> {
    println!("agent:");
    let installed = install(client, options).await?;
    for object in &installed.objects {
        println!("  {object}");
    }
    for skipped in &installed.skipped {
        println!("  skipped {skipped}");
    }
    let db = if installed.generated_db_password { "created with a generated password" } else { "kept" };
    println!("  Secret {DB_NAMESPACE}/{DB_SECRET}: {db}");
    Ok(())
}

/// Removes the agent: its Deployment first (so no replica re-creates anything), then the
/// rest of the install, then its namespace with the Secrets and inventories in it.
/// The `scale` namespace and its database Secret stay: they belong to the workload.
/// Returns false when the agent was not installed.
pub async fn uninstall(client: &kube::Client) -> Result<bool, InstallError> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    if namespaces.get_opt(AGENT_NAMESPACE).await.map_err(kube_error("reading namespace gitops-system"))?.is_none() {
        return Ok(false);
    }
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), AGENT_NAMESPACE);
    let foreground = DeleteParams { propagation_policy: Some(PropagationPolicy::Foreground), ..Default::default() };
    match deployments.delete("gitops-agent", &foreground).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => return Err(kube_error("deleting Deployment gitops-system/gitops-agent")(e)),
    }
    // A revision with no objects, allowed to be empty, prunes everything the install
    // created; the namespace itself was there before (step 1) and is deleted below.
    let empty = tempfile::tempdir().map_err(|source| InstallError::Write { path: std::env::temp_dir(), source })?;
    let manifests = empty.path().join("manifests");
    std::fs::create_dir_all(&manifests).map_err(|source| InstallError::Write { path: manifests.clone(), source })?;
    let allow = empty.path().join(sync::ALLOW_EMPTY_FILE);
    std::fs::write(&allow, "").map_err(|source| InstallError::Write { path: allow, source })?;
    installer(client).sync(empty.path(), "uninstall").await?;
    match namespaces.delete(AGENT_NAMESPACE, &DeleteParams::default()).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => return Err(kube_error("deleting namespace gitops-system")(e)),
    }
    Ok(true)
}

/// Waits until the agent reports a successful sync in its status ConfigMap, and
/// returns the revision it applied.
pub async fn wait_synced(client: &kube::Client, timeout: Duration, resume: &str) -> Result<String, InstallError> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), AGENT_NAMESPACE);
    let outcome = progress::wait("the agent's first sync", timeout, Duration::from_secs(1), resume, || async {
        let status = api
            .get_opt(STATUS_NAME)
            .await
            .map_err(kube_error(format!("reading ConfigMap {AGENT_NAMESPACE}/{STATUS_NAME}")))?;
        let data = status.and_then(|cm| cm.data).unwrap_or_default();
        let get = |key: &str| data.get(key).cloned().unwrap_or_default();
        Ok::<_, InstallError>(match get("phase").as_str() {
            "synced" => Poll::Done(get("revision")),
            "" => Poll::Pending(format!("no {STATUS_NAME} yet (is the agent running?)")),
            phase => Poll::Pending(format!("{phase} at {}: {}", short(&get("revision")), get("message"))),
        })
    })
    .await?;
    Ok(outcome?)
}

/// What the status ConfigMap says of the revision the agent applied last.
struct Reported {
    phase: String,
    revision: String,
    message: String,
    health: String,
    health_message: String,
}

async fn reported(api: &Api<ConfigMap>) -> Result<Reported, InstallError> {
    let status = api
        .get_opt(STATUS_NAME)
        .await
        .map_err(kube_error(format!("reading ConfigMap {AGENT_NAMESPACE}/{STATUS_NAME}")))?;
    let data = status.and_then(|cm| cm.data).unwrap_or_default();
    let get = |key: &str| data.get(key).cloned().unwrap_or_default();
    Ok(Reported {
        phase: get("phase"),
        revision: get("revision"),
        message: get("message"),
        health: get("health"),
        health_message: get("healthMessage"),
    })
}

/// Waits until the revision the agent applied is Healthy, as its status ConfigMap says,
/// showing what it waits for. A Degraded revision ends the wait at once; either that or
/// `timeout` is an [`InstallError::Unhealthy`] naming the unhealthy objects with their
/// reasons, and `look` (commands that show more).
pub async fn wait_healthy(client: &kube::Client, timeout: Duration, look: &str) -> Result<String, InstallError> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), AGENT_NAMESPACE);
    let unhealthy = |now: Reported, waited| InstallError::Unhealthy {
        revision: now.revision,
        health: if now.health.is_empty() { "not assessed".to_owned() } else { now.health },
        waited,
        unhealthy: now.health_message,
        look: look.to_owned(),
    };
    let outcome = progress::wait("the revision to be Healthy", timeout, Duration::from_secs(1), look, || async {
        let now = reported(&api).await?;
        let first = |text: &str| text.lines().next().unwrap_or_default().to_owned();
        Ok::<_, InstallError>(match (now.phase.as_str(), now.health.as_str()) {
            (_, "Degraded") => Poll::Done(Err(unhealthy(now, None))),
            ("synced", "Healthy") => Poll::Done(Ok(now.revision)),
            ("failed", _) => {
                Poll::Pending(format!("the sync of {} failed: {}", short(&now.revision), first(&now.message)))
            }
            (_, "") => Poll::Pending(format!("{} not assessed yet", short(&now.revision))),
            (_, health) => {
                let count = now.health_message.lines().count();
                Poll::Pending(format!("{health}, {count} unhealthy: {}", first(&now.health_message)))
            }
        })
    })
    .await?;
    match outcome {
        Ok(done) => done,
        Err(_timeout) => Err(unhealthy(reported(&api).await?, Some(timeout))),
    }
}

fn short(revision: &str) -> &str {
    &revision[..revision.len().min(12)]
}

fn installer(client: &kube::Client) -> Syncer {
    Syncer::with_inventory(
        gitops_agent::write::Writer::sole(client.clone()),
        sync::Options {
            default_namespace: AGENT_NAMESPACE.to_owned(),
            prune: true,
            force_conflicts: true,
            inventory_namespace: AGENT_NAMESPACE.to_owned(),
            dashboards_namespace: AGENT_NAMESPACE.to_owned(),
            // The install's objects are cluster-scoped too (ClusterRole, Namespace).
            access: gitops_agent::access::Access::new(None),
        },
        INSTALL_INVENTORY,
    )
}

async fn apply_namespace(client: &kube::Client, name: &str) -> Result<(), InstallError> {
    let api: Api<Namespace> = Api::all(client.clone());
    let namespace = json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": name } });
    api.patch(name, &PatchParams::apply(FIELD_MANAGER), &Patch::Apply(namespace))
        .await
        .map_err(kube_error(format!("creating namespace {name}")))?;
    Ok(())
}

/// Applies `gitops-git` from the credential files given; without any, leaves it alone
/// (a public repository needs none, and a re-run without the flags keeps the old one).
async fn apply_git_secret(client: &kube::Client, options: &InstallOptions) -> Result<(), InstallError> {
    let mut data = BTreeMap::new();
    if let Some(path) = &options.git_token_file {
        data.insert("username".to_owned(), options.git_username.clone());
        data.insert("token".to_owned(), read_trimmed(path)?);
    }
    if let Some(path) = &options.ssh_key_file {
        // Keys need their final newline; only tokens are trimmed.
        data.insert("identity".to_owned(), read(path)?);
    }
    if let Some(path) = &options.ssh_known_hosts_file {
        data.insert("known_hosts".to_owned(), read(path)?);
    }
    if data.is_empty() {
        return Ok(());
    }
    let secret = json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": { "name": GIT_SECRET, "namespace": AGENT_NAMESPACE },
        "type": "Opaque",
        "stringData": data,
    });
    let api: Api<Secret> = Api::namespaced(client.clone(), AGENT_NAMESPACE);
    api.patch(GIT_SECRET, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(secret))
        .await
        .map_err(kube_error(format!("applying Secret {AGENT_NAMESPACE}/{GIT_SECRET}")))?;
    Ok(())
}

/// Creates the database Secret unless it exists. Returns whether it generated one.
async fn ensure_db_secret(client: &kube::Client) -> Result<bool, InstallError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), DB_NAMESPACE);
    let what = format!("Secret {DB_NAMESPACE}/{DB_SECRET}");
    if api.get_opt(DB_SECRET).await.map_err(kube_error(format!("reading {what}")))?.is_some() {
        return Ok(false);
    }
    let data = BTreeMap::from([
        ("username".to_owned(), ByteString(b"scale".to_vec())),
        ("database".to_owned(), ByteString(b"scale".to_vec())),
        ("password".to_owned(), ByteString(generate_password().into_bytes())),
    ]);
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(DB_SECRET.to_owned()),
            namespace: Some(DB_NAMESPACE.to_owned()),
            labels: Some(BTreeMap::from([("app.kubernetes.io/part-of".to_owned(), "scale".to_owned())])),
            ..Default::default()
        },
        data: Some(data),
        type_: Some("Opaque".to_owned()),
        ..Default::default()
    };
    // Create, not apply: if another `up` raced us, its password stands and ours is dropped.
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(kube_error(format!("creating {what}"))(e)),
    }
}

/// 32 characters from [A-Za-z0-9] (about 190 bits) from the OS's CSPRNG: safe in a
/// connection URL and a shell without quoting.
fn generate_password() -> String {
    use rand::RngExt;
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..32).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char).collect()
}

fn read(path: &Path) -> Result<String, InstallError> {
    std::fs::read_to_string(path).map_err(|source| InstallError::Read { path: path.to_owned(), source })
}

fn read_trimmed(path: &Path) -> Result<String, InstallError> {
    Ok(read(path)?.trim().to_owned())
}

/// Renders the compiled-in manifests with the agent's own renderer, fills in the image
/// and the repository, and leaves out objects of APIs the cluster does not serve.
async fn render(
    client: &kube::Client,
    options: &InstallOptions,
    work: &Path,
) -> Result<(Vec<Value>, Vec<String>), InstallError> {
    let source = work.join("src");
    let manifests = source.join("manifests");
    std::fs::create_dir_all(&manifests).map_err(|e| InstallError::Write { path: manifests.clone(), source: e })?;
    INSTALL_MANIFESTS.extract(&manifests).map_err(|e| InstallError::Write { path: manifests.clone(), source: e })?;
    let rule = manifests.join("prometheusrule.yaml");
    std::fs::write(&rule, PROMETHEUS_RULE).map_err(|e| InstallError::Write { path: rule, source: e })?;
    let rendered = gitops_agent::render::render(&source, AGENT_NAMESPACE)
        .map_err(|errors| InstallError::Render(errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; ")))?;

    let served = served_groups(client).await?;
    let mut objects = Vec::new();
    let mut skipped = Vec::new();
    for manifest in rendered.manifests {
        let group = manifest.gvk().group;
        if !group.is_empty() && !served.contains(&group) {
            skipped.push(format!("{} {} ({} is not served)", manifest.kind(), manifest.name(), manifest.api_version()));
            continue;
        }
        let mut object = manifest.object;
        if object["kind"] == "Deployment" && object["metadata"]["name"] == "gitops-agent" {
            configure_deployment(&mut object, options);
        }
        objects.push(object);
    }
    Ok((objects, skipped))
}

async fn served_groups(client: &kube::Client) -> Result<Vec<String>, InstallError> {
    let groups = client.list_api_groups().await.map_err(kube_error("listing the cluster's API groups"))?;
    Ok(groups.groups.into_iter().map(|g| g.name).collect())
}

/// Sets the container's image and the `GITOPS_*` variables naming the repository.
fn configure_deployment(deployment: &mut Value, options: &InstallOptions) {
    let Some(container) = deployment.pointer_mut("/spec/template/spec/containers/0") else { return };
    container["image"] = json!(options.image);
    let values = [("GITOPS_REPO", &options.repo), ("GITOPS_BRANCH", &options.branch), ("GITOPS_PATH", &options.path)];
    if let Some(env) = container["env"].as_array_mut() {
        for (name, value) in values {
            match env.iter_mut().find(|e| e["name"] == name) {
                Some(entry) => entry["value"] = json!(value),
                None => env.push(json!({ "name": name, "value": value })),
            }
        }
    }
}

fn write_objects(root: &Path, objects: &[Value]) -> Result<(), InstallError> {
    let dir = root.join("manifests");
    std::fs::create_dir_all(&dir).map_err(|source| InstallError::Write { path: dir.clone(), source })?;
    for (index, object) in objects.iter().enumerate() {
        let path = dir.join(format!("{index:02}.json"));
        let text = serde_json::to_string_pretty(object).expect("JSON values serialize");
        std::fs::write(&path, text).map_err(|source| InstallError::Write { path, source })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unhealthy_report_names_each_object_and_where_to_look() {
        let objects = "Deployment scale/db: Degraded: CrashLoopBackOff: pod db-1: container postgres\nJob scale/x: Progressing: Running: 0 of 1 complete";
        let report = unhealthy_report("0123456789abcdef", "Degraded", &None, objects, "  gitops-bootstrap status");
        assert_eq!(
            report,
            "the agent's revision 0123456789ab is Degraded; its unhealthy objects:\n  \
             Deployment scale/db: Degraded: CrashLoopBackOff: pod db-1: container postgres\n  \
             Job scale/x: Progressing: Running: 0 of 1 complete\nLook further with:\n  gitops-bootstrap status"
        );
        let waited = Some(Duration::from_secs(300));
        let report = unhealthy_report("0123456789abcdef", "Progressing", &waited, "", "  kubectl get pods -A");
        assert!(report.starts_with("the agent's revision 0123456789ab is still Progressing after 5m00s;"), "{report}");
        assert!(report.contains("(the agent names no unhealthy object)"), "{report}");
    }

    #[test]
    fn generated_passwords_are_long_and_differ() {
        let (a, b) = (generate_password(), generate_password());
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(a, b);
    }
}
