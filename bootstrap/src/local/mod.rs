//! The `local` provider: a real Kubernetes cluster on this machine, built from Go
//! modules and started from a throwaway state directory.
//!
//! Without a node ([`Options::node`] false) it is a control plane on loopback (etcd,
//! kube-apiserver, kube-controller-manager): objects are stored, validated, defaulted
//! and reconciled by the real controllers (namespaces, service accounts, jobs, garbage
//! collection), but no container ever runs. With one, the scheduler, containerd, the
//! kubelet and kube-proxy join it (see [`node`]) and pods run; the API server then
//! listens on the node's address instead of loopback, so pods reach it.
//!
//! ```text
//! STATE_DIR/
//!   kubeconfig          admin access (system:masters), for kubectl and tests
//!   pki/                CA, serving and client certificates, service-account key
//!   etcd/               etcd's data
//!   node/               the node's configuration and containerd's data
//!   logs/NAME.log       each component's output
//!   pids/NAME.pid       each component's process group, for `down` and `status`
//! ```

pub mod addons;
pub mod agent;
pub mod build;
pub mod charts;
pub mod corpus;
pub mod dockerfile;
pub mod image;
pub mod network;
pub mod node;
pub mod pki;
pub mod process;

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, ServiceAccount};
use kube::Api;
use kube::config::{KubeConfigOptions, Kubeconfig};

pub use build::Binaries;
use pki::Pki;
pub use process::{Lifetime, Process};

/// How long the API server gets to become ready; a cold etcd and the API server's
/// post-start hooks take a few seconds on a laptop, much longer on a loaded CI box.
const READY_TIMEOUT: Duration = Duration::from_secs(180);
/// Lines of a failing component's log quoted in an error.
pub(crate) const LOG_TAIL_LINES: usize = 30;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("cannot start {}: {source}", program.display())]
    Spawn { program: PathBuf, source: std::io::Error },
    #[error("`go build` of {binary} failed; last lines of its output:\n{output}")]
    GoBuild { binary: &'static str, output: String },
    #[error("generating the control plane's certificates: {0}")]
    Pki(#[from] rcgen::Error),
    #[error("no free loopback port: {0}")]
    Port(std::io::Error),
    #[error("kubeconfig {}: {message}", path.display())]
    Kubeconfig { path: PathBuf, message: String },
    #[error("{component} exited ({status}) while starting; last lines of {}:\n{tail}", log.display())]
    Exited { component: String, status: String, log: PathBuf, tail: String },
    #[error("{component} was not ready after {waited:?} ({last_error}); last lines of {}:\n{tail}", log.display())]
    NotReady { component: String, waited: Duration, last_error: String, log: PathBuf, tail: String },
    #[error("git repository {}: {message}", path.display())]
    Git { path: PathBuf, message: String },
    #[error("no component named {0}")]
    UnknownComponent(String),
    #[error("{what} is missing: {fix}")]
    Missing { what: String, fix: String },
    #[error("{0}")]
    Conflict(String),
    #[error("`{command}` failed: {output}")]
    Command { command: String, output: String },
    #[error("applying {what}: {message}")]
    Apply { what: String, message: String },
    #[error("installing the agent: {0}")]
    Install(#[from] crate::install::InstallError),
}

impl Error {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Error {
        Error::Io { path: path.to_owned(), source }
    }
}

/// How to start a control plane.
#[derive(Debug, Clone)]
pub struct Options {
    /// Holds everything the control plane writes; created if missing. A previous
    /// control plane's state in it is replaced.
    pub state_dir: PathBuf,
    pub lifetime: Lifetime,
    /// Where the built binaries are cached (see [`build::cache_dir`]).
    pub cache_dir: PathBuf,
    /// Whether to run the node too, so pods run; without it, only the control plane.
    pub node: bool,
    /// What to do when another cluster holds the machine's one node.
    pub when_node_in_use: node::WhenInUse,
}

impl Options {
    /// A control plane without a node.
    pub fn new(state_dir: impl Into<PathBuf>, lifetime: Lifetime) -> Options {
        Options {
            state_dir: state_dir.into(),
            lifetime,
            cache_dir: build::cache_dir(),
            node: false,
            when_node_in_use: node::WhenInUse::Fail,
        }
    }

    /// A cluster with the node.
    pub fn with_node(state_dir: impl Into<PathBuf>, lifetime: Lifetime) -> Options {
        Options { node: true, ..Options::new(state_dir, lifetime) }
    }
}

/// One component's command line, kept so it can be restarted with the same ports.
#[derive(Debug, Clone)]
pub(crate) struct Component {
    name: &'static str,
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(&'static str, String)>,
}

/// A running local control plane. Dropping it stops it when its lifetime is
/// [`Lifetime::TiedToThisProcess`]; a detached one runs until [`stop_state_dir`].
#[derive(Debug)]
pub struct LocalControlPlane {
    state_dir: PathBuf,
    kubeconfig: PathBuf,
    server: String,
    kubernetes_version: String,
    lifetime: Lifetime,
    components: Vec<Component>,
    running: Vec<Process>,
    /// The node's files, when it has one.
    node: Option<node::NodeFiles>,
}

impl LocalControlPlane {
    /// Builds the binaries if needed, starts etcd, the API server and the controller
    /// manager, and returns once the API server is ready and the controller manager has
    /// created the `default` service account; with a node, also once the node is Ready.
    pub async fn start(options: &Options) -> Result<LocalControlPlane, Error> {
        let dir = &options.state_dir;
        fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let dir = fs::canonicalize(dir).map_err(|e| Error::io(dir, e))?;
        if options.node {
            // Claimed first: a node of ours that runs is in use, not a missing prerequisite.
            let when_in_use = options.when_node_in_use;
            let claimed = dir.clone();
            tokio::task::spawn_blocking(move || node::claim(&claimed, when_in_use))
                .await
                .expect("claim task does not panic")?;
            node::check_prerequisites()?;
        }
        let (binaries, debian_base) = tokio::task::spawn_blocking({
            let cache = options.cache_dir.clone();
            let node = options.node;
            move || {
                let binaries = build::ensure_built(&cache)?;
                let base = if node { Some(image::debian_base(&cache)?) } else { None };
                Ok::<_, Error>((binaries, base))
            }
        })
        .await
        .expect("build task does not panic")?;

        process::stop_all(&dir);
        if options.node {
            // One node per machine: whatever an earlier one left is in the way.
            node::clean_host(&dir)?;
        }
        for stale in ["pki", "etcd", "logs", "pids", "kubeconfig"] {
            let path = dir.join(stale);
            let _ = fs::remove_dir_all(&path).or_else(|_| fs::remove_file(&path));
        }
        let pki = Pki::generate(&dir.join("pki"))?;

        let [etcd_client, etcd_peer, apiserver_port, registry_port] = free_ports()?;
        let address = if options.node { network::NODE_IP } else { std::net::Ipv4Addr::LOCALHOST };
        let server = format!("https://{address}:{apiserver_port}");
        let kubeconfig = dir.join("kubeconfig");
        write_kubeconfig(&kubeconfig, &server, &pki.ca_cert, &pki.admin)?;
        let cm_kubeconfig = dir.join("pki/controller-manager.kubeconfig");
        write_kubeconfig(&cm_kubeconfig, &server, &pki.ca_cert, &pki.controller_manager)?;

        let mut components = vec![
            Component {
                name: "etcd",
                program: binaries.etcd.clone(),
                args: etcd_args(&dir, etcd_client, etcd_peer),
                env: Vec::new(),
            },
            Component {
                name: "kube-apiserver",
                program: binaries.kube.clone(),
                args: apiserver_args(&pki, etcd_client, apiserver_port, options.node),
                env: Vec::new(),
            },
            Component {
                name: "kube-controller-manager",
                program: binaries.kube.clone(),
                args: controller_manager_args(&pki, &cm_kubeconfig),
                env: Vec::new(),
            },
        ];
        let mut node_files = None;
        if options.node {
            let (files, node_components) = node::prepare(&dir, &pki, &server, &binaries, registry_port)?;
            components.extend(node_components);
            node_files = Some(files);
        }
        let mut plane = LocalControlPlane {
            state_dir: dir,
            kubeconfig,
            server,
            kubernetes_version: binaries.kubernetes_version,
            lifetime: options.lifetime,
            components,
            running: Vec::new(),
            node: node_files,
        };
        let started = async {
            if plane.node.is_some() {
                node::save_sysctls()?;
                network::create_bridge()?;
                network::contain()?;
                // containerd starts while the control plane does: neither needs the other yet.
                plane.start_component("containerd")?;
                plane.start_component("registry")?;
            }
            plane.start_component("etcd")?;
            plane.start_component("kube-apiserver")?;
            plane.wait_api_ready().await?;
            plane.start_component("kube-controller-manager")?;
            plane.wait_ready().await?;
            if let Some(base) = &debian_base {
                plane.start_node(base).await?;
            }
            Ok(())
        };
        match started.await {
            Ok(()) => Ok(plane),
            Err(e) => {
                // Also a detached control plane: a half-started one is no use to anyone.
                plane.stop();
                Err(e)
            }
        }
    }

    /// Starts the scheduler, the kubelet and kube-proxy once containerd answers and has
    /// the pause and add-on images, and the registry has the Debian base; waits until
    /// the node is Ready and the add-ons (CoreDNS, the volume provisioner) are.
    async fn start_node(&mut self, debian_base: &Path) -> Result<(), Error> {
        let files = self.node.clone().expect("a node's cluster");
        let socket = files.containerd_socket.clone();
        self.wait_for("containerd", async || {
            tokio::net::UnixStream::connect(&socket).await.map(drop).map_err(|e| e.to_string())
        })
        .await?;
        let registry = files.registry.clone();
        self.wait_for("registry", async || {
            tokio::net::TcpStream::connect(&registry).await.map(drop).map_err(|e| e.to_string())
        })
        .await?;
        let (image_files, base) = (files.clone(), debian_base.to_owned());
        tokio::task::spawn_blocking(move || {
            node::import_node_images(&image_files)?;
            let archived_as = format!("gitops.local/{}", image::DEBIAN_IMAGE);
            node::push_image(&image_files, &base, &archived_as, &[image::DEBIAN_IMAGE])
        })
        .await
        .expect("image task does not panic")?;
        for name in ["kube-scheduler", "kubelet", "kube-proxy"] {
            self.start_component(name)?;
        }
        let client = self.client().await?;
        let nodes: Api<Node> = Api::all(client.clone());
        self.wait_for("kubelet", async || {
            let node = nodes.get_opt(network::NODE_NAME).await.map_err(|e| e.to_string())?;
            let conditions = node.and_then(|n| n.status?.conditions).ok_or("the node has not registered yet")?;
            match conditions.iter().find(|c| c.type_ == "Ready") {
                Some(ready) if ready.status == "True" => Ok(()),
                Some(ready) => Err(format!("node not Ready: {}", ready.message.clone().unwrap_or_default())),
                None => Err("the node reports no Ready condition yet".to_owned()),
            }
        })
        .await?;
        addons::apply(&client, &files.registry, &files.dir.join("local-path")).await?;
        self.wait_for("kubelet", async || addons::ready(&client).await).await
    }

    /// Imports a docker-archive tar into the node's containerd, so pods can run that
    /// image without pulling it (`imagePullPolicy: Never` or `IfNotPresent`).
    pub fn import_image(&self, archive: &Path) -> Result<(), Error> {
        let files = self.node.as_ref().ok_or_else(|| Error::Conflict("this cluster has no node".into()))?;
        node::import_image(files, archive)
    }

    /// Pushes a docker-archive's image (held as `archived_as`) to the node's registry
    /// under each of `names`, from where the kubelet pulls it.
    pub fn push_image(&self, archive: &Path, archived_as: &str, names: &[&str]) -> Result<(), Error> {
        let files = self.node.as_ref().ok_or_else(|| Error::Conflict("this cluster has no node".into()))?;
        node::push_image(files, archive, archived_as, names)
    }

    /// Pushes a built image to the node's registry as `NAME:TAG` (its content's) and
    /// `NAME:latest`, and returns the first as pods name it.
    pub fn push_built(&self, built: &dockerfile::Built) -> Result<String, Error> {
        let tagged = format!("{}:{}", built.name, built.tag);
        self.push_image(&built.archive, &built.archived_as, &[&tagged, &format!("{}:latest", built.name)])?;
        Ok(format!("{}/{tagged}", self.registry().unwrap_or_default()))
    }

    /// The node's registry, `127.0.0.1:PORT` (also in `STATE_DIR/registry`).
    pub fn registry(&self) -> Option<&str> {
        self.node.as_ref().map(|n| n.registry.as_str())
    }

    /// The admin kubeconfig (`STATE_DIR/kubeconfig`).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The API server's URL, `https://127.0.0.1:PORT`.
    pub fn server(&self) -> &str {
        &self.server
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The Kubernetes release the control plane runs, e.g. `v1.37.2`.
    pub fn kubernetes_version(&self) -> &str {
        &self.kubernetes_version
    }

    /// A client with admin rights. Build one per async runtime: a client's connection
    /// pool belongs to the runtime that created it.
    pub async fn client(&self) -> Result<kube::Client, Error> {
        client_from_kubeconfig(&self.kubeconfig).await
    }

    /// Stops one component (`etcd`, `kube-apiserver`, `kube-controller-manager`);
    /// the others keep running.
    pub fn stop_component(&mut self, name: &str) -> Result<(), Error> {
        let index =
            self.running.iter().position(|p| p.name == name).ok_or_else(|| Error::UnknownComponent(name.to_owned()))?;
        self.running.remove(index).stop();
        Ok(())
    }

    /// Starts a component stopped by [`Self::stop_component`] again, on the same ports
    /// and data. Returns without waiting: see [`Self::wait_ready`].
    pub fn start_component(&mut self, name: &str) -> Result<(), Error> {
        let c =
            self.components.iter().find(|c| c.name == name).ok_or_else(|| Error::UnknownComponent(name.to_owned()))?;
        let env: Vec<(&str, &std::ffi::OsStr)> = c.env.iter().map(|(k, v)| (*k, v.as_ref())).collect();
        let process = Process::spawn_with_env(&self.state_dir, c.name, &c.program, &c.args, &env, self.lifetime)?;
        self.running.push(process);
        Ok(())
    }

    /// Waits until the API server answers `/readyz` and the controller manager has
    /// created the `default` service account; fails early, with the component's log,
    /// if one exits.
    pub async fn wait_ready(&self) -> Result<(), Error> {
        self.wait_api_ready().await?;
        let client = self.client().await?;
        let service_accounts: Api<ServiceAccount> = Api::namespaced(client, "default");
        self.wait_for("kube-controller-manager", async || match service_accounts.get_opt("default").await {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err("no default service account yet".to_owned()),
            Err(e) => Err(e.to_string()),
        })
        .await
    }

    /// Waits until the API server answers `/readyz`. The controller manager starts only
    /// then: it gives up by itself if the API server is slow to become healthy.
    async fn wait_api_ready(&self) -> Result<(), Error> {
        // Until the API server listens, the client would log every refused connection.
        let address = self.server.trim_start_matches("https://").to_owned();
        self.wait_for("kube-apiserver", async || {
            tokio::net::TcpStream::connect(&address).await.map(drop).map_err(|e| e.to_string())
        })
        .await?;
        let client = self.client().await?;
        self.wait_for("kube-apiserver", async || {
            let request = http::Request::get("/readyz").body(Vec::new()).expect("static request");
            match client.request_text(request).await {
                Ok(body) if body.trim() == "ok" => Ok(()),
                Ok(body) => Err(body),
                Err(e) => Err(e.to_string()),
            }
        })
        .await
    }

    /// Polls `probe` until it succeeds, a component exits, or [`READY_TIMEOUT`] passes.
    async fn wait_for(&self, component: &str, probe: impl AsyncFn() -> Result<(), String>) -> Result<(), Error> {
        let started = Instant::now();
        loop {
            if let Some(err) = self.check_running() {
                return Err(err);
            }
            let last_error = match probe().await {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            if started.elapsed() > READY_TIMEOUT {
                let log = self.state_dir.join("logs").join(format!("{component}.log"));
                return Err(Error::NotReady {
                    component: component.to_owned(),
                    waited: READY_TIMEOUT,
                    last_error,
                    tail: process::tail(&log, LOG_TAIL_LINES),
                    log,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn check_running(&self) -> Option<Error> {
        self.running.iter().find_map(|p| {
            p.exited().map(|status| Error::Exited {
                component: p.name.clone(),
                status,
                log: p.log.clone(),
                tail: p.log_tail(LOG_TAIL_LINES),
            })
        })
    }

    /// Stops every component, and removes what the node left on the machine. A
    /// detached cluster is better stopped with [`stop_state_dir`], which needs no handle.
    pub fn stop(&mut self) {
        // Reverse start order: the controller manager and API server before etcd.
        while let Some(p) = self.running.pop() {
            p.stop();
        }
        if self.node.take().is_some()
            && let Err(e) = node::clean_host(&self.state_dir)
        {
            tracing::warn!("removing what the node left: {e}");
        }
    }
}

impl Drop for LocalControlPlane {
    fn drop(&mut self) {
        if self.lifetime == Lifetime::TiedToThisProcess {
            self.stop();
        }
    }
}

/// Stops the cluster whose state is in `state_dir` (started by any process), removes
/// what its node left on the machine, and removes the directory. Returns the
/// components that were running.
pub fn stop_state_dir(state_dir: &Path) -> Result<Vec<String>, Error> {
    let stopped = process::stop_all(state_dir);
    if node::NodeFiles::new(state_dir).dir.exists() {
        node::clean_host(state_dir)?;
    }
    if state_dir.exists() {
        fs::remove_dir_all(state_dir).map_err(|e| Error::io(state_dir, e))?;
    }
    Ok(stopped)
}

/// What runs from `state_dir`: each component, its pid, and whether it is alive.
pub fn status(state_dir: &Path) -> Vec<(String, i32, bool)> {
    process::status(state_dir).into_iter().map(|(name, pid, alive)| (name, pid.as_raw(), alive)).collect()
}

/// A client for the cluster a kubeconfig file points at (its current context).
pub async fn client_from_kubeconfig(path: &Path) -> Result<kube::Client, Error> {
    let invalid = |message: String| Error::Kubeconfig { path: path.to_owned(), message };
    let kubeconfig = Kubeconfig::read_from(path).map_err(|e| invalid(e.to_string()))?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|e| invalid(e.to_string()))?;
    kube::Client::try_from(config).map_err(|e| invalid(e.to_string()))
}

/// Ports the kernel hands out are free at that moment; the listeners are closed just
/// before the components bind them.
fn free_ports<const N: usize>() -> Result<[u16; N], Error> {
    let listeners: Vec<TcpListener> =
        (0..N).map(|_| TcpListener::bind("127.0.0.1:0")).collect::<Result<_, _>>().map_err(Error::Port)?;
    let mut ports = [0u16; N];
    for (port, listener) in ports.iter_mut().zip(&listeners) {
        *port = listener.local_addr().map_err(Error::Port)?.port();
    }
    Ok(ports)
}

fn etcd_args(dir: &Path, client: u16, peer: u16) -> Vec<String> {
    let client_url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    vec![
        "--name=local".into(),
        format!("--data-dir={}", dir.join("etcd").display()),
        format!("--listen-client-urls={client_url}"),
        format!("--advertise-client-urls={client_url}"),
        format!("--listen-peer-urls={peer_url}"),
        format!("--initial-advertise-peer-urls={peer_url}"),
        format!("--initial-cluster=local={peer_url}"),
        // A throwaway cluster: durability across power loss buys nothing, fsync costs a lot.
        "--unsafe-no-fsync".into(),
        "--log-level=warn".into(),
    ]
}

fn apiserver_args(pki: &Pki, etcd_client: u16, port: u16, node: bool) -> Vec<String> {
    let p = |path: &PathBuf| path.display().to_string();
    let address = if node { network::NODE_IP } else { std::net::Ipv4Addr::LOCALHOST };
    let mut args = vec![
        "apiserver".into(),
        format!("--etcd-servers=http://127.0.0.1:{etcd_client}"),
        format!("--bind-address={address}"),
        format!("--advertise-address={address}"),
        format!("--secure-port={port}"),
        format!("--tls-cert-file={}", p(&pki.apiserver_cert)),
        format!("--tls-private-key-file={}", p(&pki.apiserver_key)),
        format!("--client-ca-file={}", p(&pki.ca_cert)),
        // Node: each kubelet reads and writes only what its pods need.
        "--authorization-mode=Node,RBAC".into(),
        "--enable-admission-plugins=NodeRestriction".into(),
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
        format!("--service-account-key-file={}", p(&pki.service_account_pub)),
        format!("--service-account-signing-key-file={}", p(&pki.service_account_key)),
        format!("--service-cluster-ip-range={}", network::SERVICE_CIDR),
        "--allow-privileged=true".into(),
        format!("--kubelet-client-certificate={}", p(&pki.apiserver_kubelet_client.cert)),
        format!("--kubelet-client-key={}", p(&pki.apiserver_kubelet_client.key)),
        format!("--kubelet-certificate-authority={}", p(&pki.ca_cert)),
        "--kubelet-preferred-address-types=InternalIP".into(),
        "--profiling=false".into(),
    ];
    if !node {
        // The default reconciler publishes the advertise address as the `kubernetes`
        // Service's endpoint and refuses loopback; without a node no pod dials it.
        args.push("--endpoint-reconciler-type=none".into());
    }
    args
}

fn controller_manager_args(pki: &Pki, kubeconfig: &Path) -> Vec<String> {
    let kubeconfig = kubeconfig.display();
    vec![
        "controller-manager".into(),
        format!("--kubeconfig={kubeconfig}"),
        format!("--authentication-kubeconfig={kubeconfig}"),
        format!("--authorization-kubeconfig={kubeconfig}"),
        format!("--service-account-private-key-file={}", pki.service_account_key.display()),
        format!("--root-ca-file={}", pki.ca_cert.display()),
        // Each controller acts as its own service account, as in a real cluster.
        "--use-service-account-credentials=true".into(),
        "--leader-elect=false".into(),
        // Nothing reads its metrics or health endpoints here.
        "--secure-port=0".into(),
        "--profiling=false".into(),
    ]
}

pub(crate) fn write_kubeconfig(path: &Path, server: &str, ca: &Path, user: &pki::CertFiles) -> Result<(), Error> {
    let text = format!(
        "apiVersion: v1\n\
         kind: Config\n\
         clusters:\n\
         - name: local\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\n\
         users:\n\
         - name: local\n  user:\n    client-certificate: {cert}\n    client-key: {key}\n\
         contexts:\n\
         - name: local\n  context:\n    cluster: local\n    user: local\n\
         current-context: local\n",
        ca = ca.display(),
        cert = user.cert.display(),
        key = user.key.display(),
    );
    fs::write(path, text).map_err(|e| Error::io(path, e))
}
