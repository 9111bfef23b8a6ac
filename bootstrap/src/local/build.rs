//! Builds the control-plane binaries from Go modules, once, into a cache directory
//! outside the repository.
//!
//! The Go sources are compiled into this crate, so `gitops-bootstrap` needs nothing but
//! the `go` command and the module proxy. A binary's cache key is its module version
//! plus a hash of its sources: a changed `go.mod` or `main.go` builds a new binary, an
//! unchanged one is reused by every later run.

use std::fs::{self, File};
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use nix::fcntl::{Flock, FlockArg};
use sha2::{Digest, Sha256};

use super::Error;

/// A Go main package, compiled into one binary.
struct GoBinary {
    /// File name of the binary and prefix of its cache directory.
    name: &'static str,
    /// The module whose version names the build, e.g. `k8s.io/kubernetes`.
    module: &'static str,
    /// What it holds, for progress messages.
    holds: &'static str,
    sources: &'static [(&'static str, &'static str)],
    /// Whether it may link libc; the binaries run in pods have images without one.
    cgo: bool,
    /// The main package built: `.` (the sources' own), or one of a required module.
    package: &'static str,
}

/// The Kubernetes components share most of their code, so they are one multi-call
/// binary: `kube-local apiserver …`, `kube-local kubelet …` (see its main.go).
const KUBE: GoBinary = GoBinary {
    name: "kube-local",
    module: "k8s.io/kubernetes",
    holds: "kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kube-proxy",
    sources: &[
        ("go.mod", include_str!("../../controlplane/go.mod")),
        ("go.sum", include_str!("../../controlplane/go.sum")),
        ("main.go", include_str!("../../controlplane/main.go")),
    ],
    cgo: true,
    package: ".",
};

/// etcd has a module of its own: k8s.io/kubernetes requires a newer etcd server module
/// than the 3.6 line we run, and one module would lift it.
const ETCD: GoBinary = GoBinary {
    name: "etcd",
    module: "go.etcd.io/etcd/server/v3",
    holds: "etcd",
    sources: &[
        ("go.mod", include_str!("../../controlplane/etcd/go.mod")),
        ("go.sum", include_str!("../../controlplane/etcd/go.sum")),
        ("main.go", include_str!("../../controlplane/etcd/main.go")),
    ],
    cgo: true,
    package: ".",
};

/// The OCI registry the node pulls from.
const REGISTRY: GoBinary = GoBinary {
    name: "registry",
    module: "github.com/distribution/distribution/v3",
    holds: "the OCI registry",
    sources: &[
        ("go.mod", include_str!("../../controlplane/registry/go.mod")),
        ("go.sum", include_str!("../../controlplane/registry/go.sum")),
        ("main.go", include_str!("../../controlplane/registry/main.go")),
    ],
    cgo: false,
    package: ".",
};

/// The cluster's DNS server, run as a pod.
const COREDNS: GoBinary = GoBinary {
    name: "coredns",
    module: "github.com/coredns/coredns",
    holds: "CoreDNS",
    sources: &[
        ("go.mod", include_str!("../../controlplane/coredns/go.mod")),
        ("go.sum", include_str!("../../controlplane/coredns/go.sum")),
        ("main.go", include_str!("../../controlplane/coredns/main.go")),
    ],
    // It runs in an image that has no libc.
    cgo: false,
    package: ".",
};

/// The dynamic provisioner of the default StorageClass, run as a pod.
const LOCAL_PATH: GoBinary = GoBinary {
    name: "local-path-provisioner",
    module: "github.com/rancher/local-path-provisioner",
    holds: "local-path-provisioner",
    sources: &[
        ("go.mod", include_str!("../../controlplane/local-path/go.mod")),
        ("go.sum", include_str!("../../controlplane/local-path/go.sum")),
        ("tools.go", include_str!("../../controlplane/local-path/tools.go")),
    ],
    cgo: false,
    package: "github.com/rancher/local-path-provisioner",
};

/// The process that holds a pod's namespaces, for the sandbox image: none can be pulled.
const PAUSE: GoBinary = GoBinary {
    name: "pause",
    module: "github.com/scale/gitops/bootstrap/controlplane/pause",
    holds: "the pod sandbox's pause process",
    sources: &[
        ("go.mod", include_str!("../../controlplane/pause/go.mod")),
        ("main.go", include_str!("../../controlplane/pause/main.go")),
    ],
    cgo: false,
    package: ".",
};

/// The agent's kustomize renderer. v5.7 rather than v5.8: v5.8 needs Go 1.27 (through
/// `GOTOOLCHAIN`, a second toolchain download), and v5.7 renders what kubectl 1.32's
/// embedded kustomize renders, which the parity tests compare against.
const KUSTOMIZE: GoBinary = GoBinary {
    name: "kustomize",
    module: "sigs.k8s.io/kustomize/kustomize/v5",
    holds: "kustomize",
    sources: &[
        ("go.mod", include_str!("../../controlplane/kustomize/go.mod")),
        ("go.sum", include_str!("../../controlplane/kustomize/go.sum")),
        ("tools.go", include_str!("../../controlplane/kustomize/tools.go")),
    ],
    // It runs in the agent's image, which may have no libc.
    cgo: false,
    package: "sigs.k8s.io/kustomize/kustomize/v5",
};

/// The agent's Helm chart renderer.
const HELM: GoBinary = GoBinary {
    name: "helm",
    module: "helm.sh/helm/v3",
    holds: "helm",
    sources: &[
        ("go.mod", include_str!("../../controlplane/helm/go.mod")),
        ("go.sum", include_str!("../../controlplane/helm/go.sum")),
        ("tools.go", include_str!("../../controlplane/helm/tools.go")),
    ],
    cgo: false,
    package: "helm.sh/helm/v3/cmd/helm",
};

/// The monitoring stack's operator (kube-prometheus-stack's `prometheusOperator`).
const PROMETHEUS_OPERATOR: GoBinary = GoBinary {
    name: "operator",
    module: "github.com/prometheus-operator/prometheus-operator",
    holds: "the Prometheus Operator",
    sources: PROMETHEUS_OPERATOR_SOURCES,
    // It runs in an image of its own, as the upstream one: static, like theirs.
    cgo: false,
    package: "github.com/prometheus-operator/prometheus-operator/cmd/operator",
};

/// The sidecar the operator adds to Prometheus and Alertmanager pods, which reloads
/// them when their configuration changes; the same module as the operator.
const CONFIG_RELOADER: GoBinary = GoBinary {
    name: "prometheus-config-reloader",
    holds: "the Prometheus config reloader",
    package: "github.com/prometheus-operator/prometheus-operator/cmd/prometheus-config-reloader",
    ..PROMETHEUS_OPERATOR
};

const PROMETHEUS_OPERATOR_SOURCES: &[(&str, &str)] = &[
    ("go.mod", include_str!("../../controlplane/prometheus-operator/go.mod")),
    ("go.sum", include_str!("../../controlplane/prometheus-operator/go.sum")),
    ("tools.go", include_str!("../../controlplane/prometheus-operator/tools.go")),
];

/// The monitoring stack's exporter of object states (kube-prometheus-stack's
/// `kube-state-metrics` dependency).
const KUBE_STATE_METRICS: GoBinary = GoBinary {
    name: "kube-state-metrics",
    module: "k8s.io/kube-state-metrics/v2",
    holds: "kube-state-metrics",
    sources: &[
        ("go.mod", include_str!("../../controlplane/kube-state-metrics/go.mod")),
        ("go.sum", include_str!("../../controlplane/kube-state-metrics/go.sum")),
        ("tools.go", include_str!("../../controlplane/kube-state-metrics/tools.go")),
    ],
    cgo: false,
    package: "k8s.io/kube-state-metrics/v2",
};

/// The monitoring stack's server. Debian's package is built without the Kubernetes
/// service discovery that the operator's scrape configuration uses.
const PROMETHEUS: GoBinary = GoBinary {
    name: "prometheus",
    module: "github.com/prometheus/prometheus",
    holds: "Prometheus",
    sources: &[
        ("go.mod", include_str!("../../controlplane/prometheus/go.mod")),
        ("go.sum", include_str!("../../controlplane/prometheus/go.sum")),
        ("tools.go", include_str!("../../controlplane/prometheus/tools.go")),
    ],
    cgo: false,
    package: "github.com/prometheus/prometheus/cmd/prometheus",
};

/// The monitoring stack's Go programs, each in an image of its own on the local node.
#[derive(Debug, Clone)]
pub struct MonitoringPrograms {
    pub prometheus: PathBuf,
    pub operator: PathBuf,
    pub config_reloader: PathBuf,
    pub kube_state_metrics: PathBuf,
}

/// Returns the cached monitoring programs, building any that are missing or stale.
pub fn ensure_monitoring_programs(cache: &Path) -> Result<MonitoringPrograms, Error> {
    Ok(MonitoringPrograms {
        prometheus: PROMETHEUS.ensure_built(cache)?,
        operator: PROMETHEUS_OPERATOR.ensure_built(cache)?,
        config_reloader: CONFIG_RELOADER.ensure_built(cache)?,
        kube_state_metrics: KUBE_STATE_METRICS.ensure_built(cache)?,
    })
}

/// The renderers the agent runs as child processes (`--kustomize-bin`, `--helm-bin`).
#[derive(Debug, Clone)]
pub struct RenderTools {
    pub kustomize: PathBuf,
    pub helm: PathBuf,
}

/// Returns the cached kustomize and helm, building either if missing or stale.
pub fn ensure_render_tools(cache: &Path) -> Result<RenderTools, Error> {
    Ok(RenderTools { kustomize: KUSTOMIZE.ensure_built(cache)?, helm: HELM.ensure_built(cache)? })
}

/// Paths of the built control-plane binaries.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// The multi-call binary of the Kubernetes components.
    pub kube: PathBuf,
    pub etcd: PathBuf,
    pub pause: PathBuf,
    pub registry: PathBuf,
    pub coredns: PathBuf,
    pub local_path: PathBuf,
    /// The Kubernetes release they were built from, e.g. `v1.37.2`.
    pub kubernetes_version: String,
}

/// Where built binaries are kept: `$GITOPS_CACHE_DIR`, else `$XDG_CACHE_HOME/gitops-agent`,
/// else `~/.cache/gitops-agent`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("GITOPS_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into())).join(".cache"));
    base.join("gitops-agent")
}

/// Returns the cached binaries, building any that are missing or stale.
pub fn ensure_built(cache: &Path) -> Result<Binaries, Error> {
    Ok(Binaries {
        kube: KUBE.ensure_built(cache)?,
        etcd: ETCD.ensure_built(cache)?,
        pause: PAUSE.ensure_built(cache)?,
        registry: REGISTRY.ensure_built(cache)?,
        coredns: COREDNS.ensure_built(cache)?,
        local_path: LOCAL_PATH.ensure_built(cache)?,
        kubernetes_version: KUBE.version().to_owned(),
    })
}

impl GoBinary {
    fn go_mod(&self) -> &'static str {
        self.sources.iter().find(|(name, _)| *name == "go.mod").map(|(_, text)| *text).unwrap_or_default()
    }

    /// The version `go.mod` requires of `self.module`.
    fn version(&self) -> &'static str {
        self.go_mod()
            .lines()
            .filter_map(|line| {
                let line = line.trim();
                let line = line.strip_prefix("require ").unwrap_or(line);
                line.strip_prefix(self.module)?.split_whitespace().next()
            })
            .find(|v| v.starts_with('v'))
            .unwrap_or("local")
    }

    /// What the project's own Makefile links in besides `-s -w`, where it matters.
    /// helm: its version, and the Kubernetes version its client-go implies
    /// (k8s.io/client-go v0.X → 1.X), which `helm template` assumes without
    /// `--kube-version` (else v1.20, which charts requiring a newer one refuse). The
    /// Prometheus projects: their version, which `--version` and their metrics report.
    fn extra_ldflags(&self) -> Option<String> {
        let version = self.version();
        let said = match self.module {
            m if m == PROMETHEUS_OPERATOR.module => Some(version.trim_start_matches('v').to_owned()),
            m if m == KUBE_STATE_METRICS.module => Some(version.to_owned()),
            // Prometheus 3.X.Y is module version v0.3XX.Y.
            m if m == PROMETHEUS.module => {
                let (minor, patch) = version.strip_prefix("v0.3")?.split_once('.')?;
                Some(format!("3.{}.{patch}", minor.parse::<u32>().ok()?))
            }
            _ => None,
        };
        if let Some(said) = said {
            return Some(format!(" -X github.com/prometheus/common/version.Version={said}"));
        }
        if self.module != HELM.module {
            return None;
        }
        let client_go = self.go_mod().lines().find_map(|l| l.trim().strip_prefix("k8s.io/client-go v0."))?;
        let minor = client_go.split('.').next()?;
        Some(format!(
            " -X helm.sh/helm/v3/internal/version.version={version} \
             -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor={minor} \
             -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor={minor}"
        ))
    }

    fn key(&self) -> String {
        let mut hash = Sha256::new();
        if let Some(flags) = self.extra_ldflags() {
            hash.update(flags.as_bytes());
        }
        for (name, text) in self.sources {
            hash.update(name.as_bytes());
            hash.update([0]);
            hash.update(text.as_bytes());
            hash.update([0]);
        }
        let digest = hash.finalize();
        let short: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
        format!("{}-{}-{short}", self.name, self.version())
    }

    fn ensure_built(&self, cache: &Path) -> Result<PathBuf, Error> {
        let dir = cache.join("controlplane").join(self.key());
        let binary = dir.join(self.name);
        build_once(cache, &self.key(), &binary, || self.build(&dir))?;
        Ok(binary)
    }

    fn build(&self, dir: &Path) -> Result<(), Error> {
        let staging = dir.with_extension("partial");
        let src = staging.join("src");
        let _ = fs::remove_dir_all(&staging);
        fs::create_dir_all(&src).map_err(|e| Error::io(&src, e))?;
        for (name, text) in self.sources {
            fs::write(src.join(name), text).map_err(|e| Error::io(&src.join(name), e))?;
        }

        let version = self.version();
        eprintln!("building {} ({} {version}) into {}", self.holds, self.module, dir.display());
        let started = Instant::now();
        let mut ldflags = String::from("-s -w");
        if self.module == KUBE.module {
            // Without these the API server reports v0.0.0-master to clients.
            let (major, minor) = kube_major_minor(version);
            ldflags += &format!(
                " -X k8s.io/component-base/version.gitVersion={version} \
                 -X k8s.io/component-base/version.gitMajor={major} \
                 -X k8s.io/component-base/version.gitMinor={minor} \
                 -X k8s.io/component-base/version.gitTreeState=clean"
            );
        }
        ldflags += &self.extra_ldflags().unwrap_or_default();
        let mut child = Command::new("go")
            .args(["build", "-v", "-ldflags", &ldflags, "-o"])
            .arg(staging.join(self.name))
            .arg(self.package)
            .current_dir(&src)
            .env("CGO_ENABLED", if self.cgo { "1" } else { "0" })
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| Error::Spawn { program: "go".into(), source })?;

        // `go build -v` names each package as it compiles it: that count is the progress.
        let mut compiled = 0usize;
        let mut output = Vec::new();
        let tty = std::io::stderr().is_terminal();
        for line in BufReader::new(child.stderr.take().expect("piped")).lines().map_while(Result::ok) {
            compiled += 1;
            if tty {
                eprint!("\r  {compiled} packages compiled, {:.0?} elapsed ", started.elapsed());
                let _ = std::io::stderr().flush();
            } else if compiled.is_multiple_of(200) {
                eprintln!("  {compiled} packages compiled, {:.0?} elapsed", started.elapsed());
            }
            output.push(line);
        }
        let status = child.wait().map_err(|source| Error::Spawn { program: "go".into(), source })?;
        if tty {
            eprintln!();
        }
        if !status.success() {
            let start = output.len().saturating_sub(40);
            return Err(Error::GoBuild { binary: self.name, output: output[start..].join("\n") });
        }
        let _ = fs::remove_dir_all(&src);
        fs::rename(&staging, dir).map_err(|e| Error::io(dir, e))?;
        eprintln!("built {} in {:.1?} ({compiled} packages)", self.name, started.elapsed());
        Ok(())
    }
}

/// Runs `build` unless `product` exists. Two processes needing the same product build
/// it once: the second waits on a lock named by `key`, then finds it.
pub(crate) fn build_once(
    cache: &Path,
    key: &str,
    product: &Path,
    build: impl FnOnce() -> Result<(), Error>,
) -> Result<(), Error> {
    if product.exists() {
        return Ok(());
    }
    fs::create_dir_all(cache).map_err(|e| Error::io(cache, e))?;
    let lock_path = cache.join(format!("{key}.lock"));
    let lock_file = File::create(&lock_path).map_err(|e| Error::io(&lock_path, e))?;
    let _lock =
        Flock::lock(lock_file, FlockArg::LockExclusive).map_err(|(_, errno)| Error::io(&lock_path, errno.into()))?;
    if product.exists() {
        return Ok(());
    }
    build()
}

/// `v1.37.2` → (`1`, `37`).
fn kube_major_minor(version: &str) -> (&str, &str) {
    let mut parts = version.trim_start_matches('v').split('.');
    (parts.next().unwrap_or("0"), parts.next().unwrap_or("0"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_come_from_go_mod() {
        assert!(KUBE.version().starts_with("v1."), "{}", KUBE.version());
        assert!(ETCD.version().starts_with("v3.6."), "{}", ETCD.version());
        assert_eq!(KUSTOMIZE.version(), "v5.7.1");
        assert_eq!(HELM.version(), "v3.22.0");
        // The chart's appVersion: its CRDs are this operator's.
        assert_eq!(PROMETHEUS_OPERATOR.version(), "v0.93.1");
        assert_eq!(KUBE_STATE_METRICS.version(), "v2.20.0");
        // The chart's default Prometheus (v3.14.0), as it names itself.
        assert_eq!(PROMETHEUS.version(), "v0.314.0");
        assert!(PROMETHEUS.extra_ldflags().unwrap().ends_with("version.Version=3.14.0"));
        assert_eq!(kube_major_minor("v1.37.2"), ("1", "37"));
    }

    #[test]
    fn every_staging_module_is_pinned_to_the_matching_release() {
        // k8s.io/kubernetes v1.X.Y goes with staging modules v0.X.Y.
        let staging = format!("v0.{}", KUBE.version().trim_start_matches("v1."));
        let pins: Vec<&str> = KUBE.go_mod().lines().filter(|l| l.contains(" => ")).collect();
        assert!(pins.len() > 25, "expected a replace line per staging module, found {}", pins.len());
        for pin in pins {
            assert!(pin.trim_end().ends_with(&staging), "{pin} is not pinned to {staging}");
        }
    }
}
