//! The node: Debian's containerd and runc, the kubelet and kube-proxy of the
//! `kube-local` build, and CNI bridge networking (see [`super::network`]).
//!
//! There is one node per machine: the bridge, the kubelet's port and directories, the
//! pods' cgroups and the iptables rules are the machine's. So [`clean_host`] removes
//! whatever a node left, this state directory's or a crashed one's, and `up` calls it
//! before starting too.
//!
//! ```text
//! STATE_DIR/node/
//!   containerd/         config.toml, its socket, images and snapshots
//!   cni/                the CNI network config; cni/ipam/ the pods' addresses
//!   kubelet.yaml, kube-proxy.yaml and a kubeconfig per component
//!   *.tar               images packed here (pause, CoreDNS, local-path-provisioner),
//!                       imported into containerd at each start
//!   local-path/         the volumes of the default StorageClass
//!   registry/           the OCI registry's config and storage
//! STATE_DIR/registry    the registry's `host:port`, from which the node pulls
//! ```

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::mount::{MntFlags, umount2};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::image::{Image, ImageFile};
use super::network::{self, BRIDGE, DNS_SERVICE_IP, NODE_IP, NODE_NAME, NODE_POD_CIDR, POD_CIDR};
use super::pki::Pki;
use super::{Binaries, Component, Error, write_kubeconfig};

/// The sandbox image every pod starts with; containerd finds it imported, never pulls.
pub const PAUSE_IMAGE: &str = "gitops.local/pause:1";
/// A proxy address nothing listens on (the discard port, on loopback).
const DEAD_PROXY: &str = "http://127.0.0.1:9";
/// Where the CNI plugins of Debian's `containernetworking-plugins` are.
const CNI_BIN_DIR: &str = "/usr/lib/cni";
/// The kubelet's directory (pod volumes, plugins); the default, as tools expect it.
const KUBELET_ROOT: &str = "/var/lib/kubelet";
/// Where the saved sysctls are kept while a node runs: /run goes with a reboot, as do
/// the values the node changed.
const SAVED_SYSCTLS: &str = "/run/gitops-local-node/sysctls";
/// Sysctls the kubelet and the bridge plugin change, restored by [`clean_host`].
const SYSCTLS: [&str; 5] = [
    "vm/overcommit_memory",
    "kernel/panic",
    "kernel/panic_on_oops",
    "net/ipv4/ip_forward",
    "net/bridge/bridge-nf-call-iptables",
];
/// Directories the node's components create outside the state directory.
const HOST_DIRS: [&str; 6] =
    [KUBELET_ROOT, "/var/log/pods", "/var/log/containers", "/run/containerd", "/var/lib/cni", "/run/gitops-local-node"];
/// Cgroups holding the pods' processes, in every hierarchy.
const CGROUPS: [&str; 2] = ["kubepods", "k8s.io"];

/// The node's files in the state directory.
#[derive(Debug, Clone)]
pub struct NodeFiles {
    pub dir: PathBuf,
    pub containerd_socket: PathBuf,
    /// The registry's `127.0.0.1:PORT`, once [`prepare`] picked the port.
    pub registry: String,
}

impl NodeFiles {
    pub fn new(state_dir: &Path) -> NodeFiles {
        let dir = state_dir.join("node");
        NodeFiles { containerd_socket: dir.join("containerd/containerd.sock"), dir, registry: String::new() }
    }
}

/// Serialises claims on the machine's one node between processes.
const CLAIM_LOCK: &str = "/run/gitops-local-node.lock";
/// Who holds the node: the claiming process's pid and its state directory. Outside
/// the node's host directories, which [`clean_host`] removes.
const CLAIM: &str = "/run/gitops-local-node.claim";

/// Whether a cluster that finds the machine's node in use waits for it or fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenInUse {
    /// `up`: say who holds it and how to stop that.
    Fail,
    /// Tests in several processes (or worktrees) take turns.
    Wait,
}

/// Claims the machine's one node for the cluster in `state_dir`. The node is in use
/// while its claimant process lives (it is still starting it, or a test holds it) or
/// any component of the claimant's state directory runs (a detached `up`). A claim
/// whose holder is gone is taken over; [`clean_host`] then removes what it left.
pub fn claim(state_dir: &Path, when_in_use: WhenInUse) -> Result<(), Error> {
    loop {
        let lock = fs::File::create(CLAIM_LOCK).map_err(|e| Error::io(Path::new(CLAIM_LOCK), e))?;
        lock.lock().map_err(|e| Error::io(Path::new(CLAIM_LOCK), e))?;
        let holder = fs::read_to_string(CLAIM).unwrap_or_default();
        let (pid, dir) = holder.split_once(' ').unwrap_or(("", ""));
        let dir = Path::new(dir.trim());
        let me = std::process::id().to_string();
        let claimant_alive = !pid.is_empty() && pid != me && Path::new("/proc").join(pid).exists();
        let in_use =
            dir != state_dir && (claimant_alive || super::process::status(dir).iter().any(|(_, _, alive)| *alive));
        if !in_use {
            return fs::write(CLAIM, format!("{me} {}\n", state_dir.display()))
                .map_err(|e| Error::io(Path::new(CLAIM), e));
        }
        drop(lock);
        if when_in_use == WhenInUse::Fail {
            return Err(Error::Conflict(format!(
                "this machine's one node is in use by the cluster in {} (claimed by pid {pid}): stop it first with \
                 `gitops-bootstrap down --provider local --state-dir {}`",
                dir.display(),
                dir.display()
            )));
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Fails, naming the missing thing and what provides it, unless this machine can run
/// the node: run before anything starts, so a failed check leaves nothing to undo.
pub fn check_prerequisites() -> Result<(), Error> {
    let missing = |what: String, fix: &str| Err(Error::Missing { what, fix: fix.to_owned() });
    if !nix::unistd::geteuid().is_root() {
        return missing("root".into(), "the node's containers, bridge and iptables rules need root: run as root");
    }
    for (program, package) in [
        ("containerd", "containerd"),
        ("containerd-shim-runc-v2", "containerd"),
        ("ctr", "containerd"),
        ("runc", "runc"),
        ("iptables", "iptables"),
        ("ip6tables", "iptables"),
        ("ip", "iproute2"),
        ("mount", "mount"),
        ("mmdebstrap", "mmdebstrap"),
    ] {
        if find_program(program).is_none() {
            return missing(format!("`{program}` on PATH"), &format!("apt-get install {package}"));
        }
    }
    for plugin in ["bridge", "host-local", "loopback", "portmap"] {
        if !Path::new(CNI_BIN_DIR).join(plugin).is_file() {
            return missing(
                format!("the CNI plugin {CNI_BIN_DIR}/{plugin}"),
                "apt-get install containernetworking-plugins",
            );
        }
    }
    for hierarchy in ["memory", "cpu", "pids"] {
        let dir = Path::new("/sys/fs/cgroup").join(hierarchy);
        let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").is_file();
        if !v2 && !dir.is_dir() {
            return missing(format!("the {hierarchy} cgroup hierarchy ({})", dir.display()), "mount it (cgroup v1)");
        }
    }
    if !Path::new("/proc/sys/net/bridge/bridge-nf-call-iptables").exists() {
        return missing("bridge netfilter (/proc/sys/net/bridge)".into(), "modprobe br_netfilter");
    }
    if let Some(pid) = running_kubelet() {
        return Err(Error::Conflict(format!(
            "a kubelet already runs (pid {pid}); one node per machine: stop it (`gitops-bootstrap down`) first"
        )));
    }
    for (range, prefix) in [(POD_CIDR, "10.244."), (network::SERVICE_CIDR, "10.96.")] {
        let routes = network::output("ip", &["-4", "-o", "route", "show", "table", "all"])?;
        if let Some(route) = routes.lines().find(|r| r.contains(prefix) && !r.contains(&format!("dev {BRIDGE} "))) {
            return Err(Error::Conflict(format!(
                "the node's network {range} is already routed on this machine ({route}); the node needs it to itself"
            )));
        }
    }
    Ok(())
}

/// Writes the node's configuration files and the pause image, and returns the
/// components to start: containerd, the scheduler, the kubelet and kube-proxy.
pub(crate) fn prepare(
    state_dir: &Path,
    pki: &Pki,
    server: &str,
    binaries: &Binaries,
    registry_port: u16,
) -> Result<(NodeFiles, Vec<Component>), Error> {
    let mut files = NodeFiles::new(state_dir);
    files.registry = format!("127.0.0.1:{registry_port}");
    let registry_file = state_dir.join("registry");
    fs::write(&registry_file, format!("{}\n", files.registry)).map_err(|e| Error::io(&registry_file, e))?;
    let (kube, pause) = (&binaries.kube, &binaries.pause);
    let dir = &files.dir;
    for sub in ["containerd", "cni", "registry"] {
        fs::create_dir_all(dir.join(sub)).map_err(|e| Error::io(&dir.join(sub), e))?;
    }
    let write = |name: &str, text: String| -> Result<PathBuf, Error> {
        let path = dir.join(name);
        fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
        Ok(path)
    };
    let d = |path: &Path| path.display().to_string();

    Image {
        reference: PAUSE_IMAGE.into(),
        files: vec![ImageFile { path: "/pause", source: pause.to_owned() }],
        entrypoint: vec!["/pause".into()],
    }
    .write_archive(&dir.join("pause.tar"))?;
    super::addons::write_images(binaries, dir)?;

    let containerd_config = write(
        "containerd/config.toml",
        format!(
            r#"version = 2
root = "{root}"
state = "{state}"
[grpc]
  address = "{socket}"
[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # Root here lacks CAP_SYS_RESOURCE: runc may only raise a container's oom_score_adj.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{cni}"
"#,
            root = d(&dir.join("containerd/root")),
            state = d(&dir.join("containerd/state")),
            socket = d(&files.containerd_socket),
            opt = d(&dir.join("containerd/opt")),
            cni = d(&dir.join("cni")),
        ),
    )?;
    write(
        "cni/10-gitops-local.conflist",
        serde_json::json!({
            "cniVersion": "0.4.0",
            "name": "gitops-local",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": BRIDGE,
                    "isGateway": true,
                    // No source NAT: nothing leaves the machine (see network.rs).
                    "ipMasq": false,
                    "hairpinMode": true,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{ "subnet": NODE_POD_CIDR, "gateway": NODE_IP.to_string() }]],
                        "routes": [{ "dst": "0.0.0.0/0" }],
                        "dataDir": d(&dir.join("cni/ipam")),
                    },
                },
                { "type": "portmap", "capabilities": { "portMappings": true } },
            ],
        })
        .to_string(),
    )?;

    let kubeconfig = |name: &str, cert| -> Result<PathBuf, Error> {
        let path = dir.join(format!("{name}.kubeconfig"));
        write_kubeconfig(&path, server, &pki.ca_cert, cert)?;
        Ok(path)
    };
    let kubelet_kubeconfig = kubeconfig("kubelet", &pki.kubelet)?;
    let proxy_kubeconfig = kubeconfig("kube-proxy", &pki.kube_proxy)?;
    let scheduler_kubeconfig = kubeconfig("kube-scheduler", &pki.scheduler)?;

    let kubelet_config = write(
        "kubelet.yaml",
        format!(
            r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# This machine has cgroup v1, which kubelet 1.35 and later refuse by default.
failCgroupV1: false
cgroupDriver: cgroupfs
failSwapOn: false
containerRuntimeEndpoint: unix://{socket}
address: {NODE_IP}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
tlsCertFile: {serving_cert}
tlsPrivateKeyFile: {serving_key}
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: true
  x509:
    clientCAFile: {ca}
authorization:
  mode: Webhook
clusterDomain: cluster.local
clusterDNS: [{DNS_SERVICE_IP}]
serializeImagePulls: false
# The node shares a developer's or CI's disk, where 15% free (the default imagefs
# threshold) is tens of gigabytes: under it the kubelet evicts every pod and admits
# none. As kind does, the local node never evicts for disk.
evictionHard:
  nodefs.available: "0%"
  nodefs.inodesFree: "0%"
  imagefs.available: "0%"
  imagefs.inodesFree: "0%"
imageGCHighThresholdPercent: 100
"#,
            socket = d(&files.containerd_socket),
            serving_cert = d(&pki.kubelet_serving.cert),
            serving_key = d(&pki.kubelet_serving.key),
            ca = d(&pki.ca_cert),
        ),
    )?;
    let proxy_config = write(
        "kube-proxy.yaml",
        format!(
            r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clientConnection:
  kubeconfig: {kubeconfig}
hostnameOverride: {NODE_NAME}
clusterCIDR: {POD_CIDR}
# NodePorts answer on the node's address only, never on the machine's interfaces.
nodePortAddresses: ["{NODE_IP}/32"]
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
# Zeros leave the machine's conntrack sysctls as they are.
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
"#,
            kubeconfig = d(&proxy_kubeconfig),
        ),
    )?;

    let registry_config = write(
        "registry/config.yml",
        format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {storage}\n\
             http:\n  addr: {address}\n",
            storage = d(&dir.join("registry/storage")),
            address = files.registry,
        ),
    )?;

    let containerd = find_program("containerd").expect("checked by check_prerequisites");
    let components = vec![
        Component {
            name: "containerd",
            program: containerd,
            args: vec![format!("--config={}", d(&containerd_config))],
            // No image may come from outside the machine: a pull of any registry but
            // one on loopback (which Go never proxies) goes to a proxy that is not there,
            // so it fails at once, without even a DNS query.
            env: ["HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"]
                .map(|name| (name, DEAD_PROXY.to_owned()))
                .into_iter()
                .chain([("NO_PROXY", String::new()), ("no_proxy", String::new())])
                .collect(),
        },
        Component {
            name: "registry",
            program: binaries.registry.clone(),
            args: vec!["serve".into(), d(&registry_config)],
            // Its tracing would export to a collector; there is none.
            env: vec![("OTEL_TRACES_EXPORTER", "none".into())],
        },
        Component {
            name: "kube-scheduler",
            program: kube.to_owned(),
            args: vec![
                "scheduler".into(),
                format!("--kubeconfig={}", d(&scheduler_kubeconfig)),
                format!("--authentication-kubeconfig={}", d(&scheduler_kubeconfig)),
                format!("--authorization-kubeconfig={}", d(&scheduler_kubeconfig)),
                "--leader-elect=false".into(),
                // Nothing reads its metrics or health endpoints here.
                "--secure-port=0".into(),
                "--profiling=false".into(),
            ],
            env: Vec::new(),
        },
        Component {
            name: "kubelet",
            program: kube.to_owned(),
            args: vec![
                "kubelet".into(),
                format!("--config={}", d(&kubelet_config)),
                format!("--kubeconfig={}", d(&kubelet_kubeconfig)),
                format!("--hostname-override={NODE_NAME}"),
                format!("--node-ip={NODE_IP}"),
                format!("--root-dir={KUBELET_ROOT}"),
            ],
            env: Vec::new(),
        },
        Component {
            name: "kube-proxy",
            program: kube.to_owned(),
            args: vec!["proxy".into(), format!("--config={}", d(&proxy_config))],
            env: Vec::new(),
        },
    ];
    Ok((files, components))
}

/// Imports a docker-archive tar into containerd's `k8s.io` namespace, where the
/// kubelet's images are.
pub fn import_image(files: &NodeFiles, archive: &Path) -> Result<(), Error> {
    let socket = files.containerd_socket.display().to_string();
    let archive = archive.display().to_string();
    network::run("ctr", &["--address", &socket, "--namespace", "k8s.io", "images", "import", &archive])
}

/// Pushes the image of a docker-archive tar to the node's registry under each of `names` (e.g.
/// `debian:bookworm`), through containerd, which keeps no copy: pods pull it from
/// the registry as from any other.
pub fn push_image(files: &NodeFiles, archive: &Path, archived_as: &str, names: &[&str]) -> Result<(), Error> {
    let socket = files.containerd_socket.display().to_string();
    let ctr = |args: &[&str]| {
        let all = [&["--address", &socket, "--namespace", "k8s.io"][..], args].concat();
        network::run("ctr", &all)
    };
    ctr(&["images", "import", "--no-unpack", &archive.display().to_string()])?;
    let targets: Vec<String> = names.iter().map(|name| format!("{}/{name}", files.registry)).collect();
    for target in &targets {
        ctr(&["images", "tag", "--force", archived_as, target])?;
        // Debian's ctr 1.6.20 now and then fails a push half-way ("unexpected EOF", or a
        // panic, "send on closed channel", in its pusher's retry of an upload); a push is
        // idempotent and the registry keeps the blobs that made it, so it is tried again.
        let mut attempt = 1;
        loop {
            match ctr(&["images", "push", "--plain-http", target]) {
                Err(Error::Command { output, .. }) if attempt < 3 => {
                    tracing::warn!(image = %target, attempt, output, "ctr push failed; trying again");
                    attempt += 1
                }
                result => break result?,
            }
        }
    }
    let mut remove = vec!["images", "rm", "--sync", archived_as];
    remove.extend(targets.iter().map(String::as_str));
    ctr(&remove)
}

/// Imports the images packed at [`prepare`] (pause and the add-ons'); containerd must
/// be answering.
pub fn import_node_images(files: &NodeFiles) -> Result<(), Error> {
    for archive in ["pause.tar", "coredns.tar", "local-path.tar"] {
        import_image(files, &files.dir.join(archive))?;
    }
    Ok(())
}

/// Records the sysctls the node will change, unless a node already recorded them.
pub fn save_sysctls() -> Result<(), Error> {
    let saved = Path::new(SAVED_SYSCTLS);
    if saved.exists() {
        return Ok(());
    }
    let mut text = String::new();
    for name in SYSCTLS {
        let path = Path::new("/proc/sys").join(name);
        if let Ok(value) = fs::read_to_string(&path) {
            text += &format!("{name}={}\n", value.trim());
        }
    }
    let dir = saved.parent().expect("an absolute path");
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    fs::write(saved, text).map_err(|e| Error::io(saved, e))
}

/// Removes everything a node left on this machine: its containers' processes and
/// shims, cgroups, mounts, network namespaces, the bridge, iptables rules, the
/// directories it made, and the sysctls it changed. The node's own processes (pid
/// files) must be stopped already.
pub fn clean_host(state_dir: &Path) -> Result<(), Error> {
    kill_shims(state_dir);
    for cgroup in cgroup_dirs() {
        kill_cgroup(&cgroup);
    }
    unmount_under(&[Path::new(KUBELET_ROOT), Path::new("/run/containerd"), state_dir]);
    remove_pod_netns();
    for cgroup in cgroup_dirs().into_iter().rev() {
        let _ = fs::remove_dir(&cgroup);
    }
    network::remove()?;
    restore_sysctls()?;
    for dir in HOST_DIRS {
        match fs::remove_dir_all(dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(Error::io(Path::new(dir), e)),
            _ => {}
        }
    }
    let node = NodeFiles::new(state_dir).dir;
    match fs::remove_dir_all(&node) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(&node, e)),
        _ => Ok(()),
    }
}

/// Unmounts and removes the pods' network namespaces (`/run/netns/cni-*`). One mounted
/// before `ip netns add` first bind-mounted /run/netns over itself is hidden beneath
/// that mount and stays (the bridge's side of its veth is removed all the same).
fn remove_pod_netns() {
    let is_pod_netns = |path: &Path| {
        path.parent() == Some(Path::new("/run/netns"))
            && path.file_name().is_some_and(|n| n.to_string_lossy().starts_with("cni-"))
    };
    unmount_where(is_pod_netns);
    if let Ok(entries) = fs::read_dir("/run/netns") {
        for entry in entries.flatten().filter(|e| is_pod_netns(&e.path())) {
            let _ = fs::remove_file(entry.path());
        }
    }
}

fn restore_sysctls() -> Result<(), Error> {
    let saved = Path::new(SAVED_SYSCTLS);
    let Ok(text) = fs::read_to_string(saved) else { return Ok(()) };
    for (name, value) in text.lines().filter_map(|l| l.split_once('=')) {
        let path = Path::new("/proc/sys").join(name);
        fs::write(&path, value).map_err(|e| Error::io(&path, e))?;
    }
    fs::remove_file(saved).map_err(|e| Error::io(saved, e))
}

/// containerd starts a shim per pod that outlives it (in a process group of its own);
/// the node's are those serving this state directory's containerd, or a containerd
/// whose socket is gone.
fn kill_shims(state_dir: &Path) {
    for (pid, args) in processes() {
        if !args.first().is_some_and(|a| a.ends_with("containerd-shim-runc-v2")) {
            continue;
        }
        let address = args.windows(2).find(|w| w[0] == "-address").map(|w| PathBuf::from(&w[1]));
        if address.is_some_and(|a| a.starts_with(state_dir) || !a.exists()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// Every cgroup of the node's, parents before children.
fn cgroup_dirs() -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(hierarchies) = fs::read_dir("/sys/fs/cgroup") else { return found };
    let mut roots: Vec<PathBuf> = hierarchies.flatten().map(|h| h.path()).collect();
    // cgroup v2: the node's cgroups sit right under the root.
    roots.push(PathBuf::from("/sys/fs/cgroup"));
    for root in roots {
        for name in CGROUPS {
            let mut stack = vec![root.join(name)];
            while let Some(dir) = stack.pop() {
                if !dir.join("cgroup.procs").is_file() {
                    continue;
                }
                if let Ok(children) = fs::read_dir(&dir) {
                    stack.extend(children.flatten().filter(|c| c.path().is_dir()).map(|c| c.path()));
                }
                found.push(dir);
            }
        }
    }
    found.sort_by_key(|p| p.components().count());
    found
}

/// SIGKILLs every process in `cgroup` and waits (a few seconds at most) until none is left.
fn kill_cgroup(cgroup: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let procs = fs::read_to_string(cgroup.join("cgroup.procs")).unwrap_or_default();
        let pids: Vec<i32> = procs.lines().filter_map(|l| l.trim().parse().ok()).collect();
        if pids.is_empty() || Instant::now() > deadline {
            return;
        }
        for pid in pids {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Detaches every mount below `dirs`, deepest first.
fn unmount_under(dirs: &[&Path]) {
    unmount_where(|point| dirs.iter().any(|d| point.starts_with(d)));
}

/// Detaches every mount whose mount point `matches`, deepest first.
fn unmount_where(matches: impl Fn(&Path) -> bool) {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mount_point(p)))
        .filter(|p| matches(p))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points.dedup();
    for point in points {
        let _ = umount2(&point, MntFlags::MNT_DETACH);
    }
}

/// mountinfo writes space, tab, newline and backslash as octal escapes.
fn unescape_mount_point(raw: &str) -> String {
    let mut out = String::new();
    let mut rest = raw;
    while let Some(i) = rest.find('\\') {
        out += &rest[..i];
        match u8::from_str_radix(rest.get(i + 1..i + 4).unwrap_or(""), 8) {
            Ok(byte) => {
                out.push(byte as char);
                rest = &rest[i + 4..];
            }
            Err(_) => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out + rest
}

/// Each process's pid and command line.
fn processes() -> Vec<(i32, Vec<String>)> {
    let Ok(entries) = fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = fs::read(e.path().join("cmdline")).ok()?;
            let args =
                cmdline.split(|b| *b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned());
            Some((pid, args.collect()))
        })
        .collect()
}

/// The pid of a kubelet running on this machine, ours (`kube-local kubelet`) or another.
fn running_kubelet() -> Option<i32> {
    processes().into_iter().find_map(|(pid, args)| {
        let program = Path::new(args.first()?).file_name()?.to_str()?.to_owned();
        let is_kubelet = program == "kubelet" || (program == "kube-local" && args.get(1)? == "kubelet");
        is_kubelet.then_some(pid)
    })
}

/// `program` on `PATH`: the node's components look there too (containerd for runc,
/// the kubelet for iptables and mount), so a program elsewhere would not do.
fn find_program(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).map(|dir| dir.join(program)).find(|candidate| candidate.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_are_unescaped() {
        assert_eq!(unescape_mount_point(r"/var/lib/kubelet/pods/a\040b"), "/var/lib/kubelet/pods/a b");
        assert_eq!(unescape_mount_point("/plain"), "/plain");
    }
}
