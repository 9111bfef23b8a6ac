//! kustomize and helm built from Go modules by the bootstrap (the same cached builds
//! `gitops-bootstrap prepare` makes), and a chart repository on 127.0.0.1 serving the
//! real public charts of `../shared/charts/` (`helm package` + `helm repo index`,
//! served by Python's `http.server`).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use gitops_agent::render::Tools;
use gitops_bootstrap::local::build::{RenderTools, cache_dir, ensure_render_tools};
use tempfile::TempDir;

use crate::git::{Endpoint, ServerProcess, free_port};

/// The built kustomize and helm (built on first use, then cached).
pub fn binaries() -> &'static RenderTools {
    static TOOLS: OnceLock<RenderTools> = OnceLock::new();
    TOOLS.get_or_init(|| {
        ensure_render_tools(&cache_dir()).unwrap_or_else(|e| panic!("building kustomize and helm: {e}"))
    })
}

/// The agent's render settings with the built tools and `chart_cache` for charts.
pub fn tools(chart_cache: &Path) -> Tools {
    let built = binaries();
    Tools {
        kustomize: built.kustomize.clone(),
        helm: built.helm.clone(),
        chart_cache: chart_cache.to_owned(),
        ..Tools::default()
    }
}

/// Where the public test charts are.
pub fn shared_charts() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/charts")
}

/// `program` (helm, or a wrapper of it) with an empty environment and a throwaway
/// helm home, so no user setting or cache on this machine changes what it does.
pub fn isolated(program: impl AsRef<std::ffi::OsStr>, home: &Path) -> Command {
    let mut command = Command::new(program);
    command
        .env_clear()
        .env("HOME", home)
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"));
    command
}

/// Runs the built helm with a throwaway home; panics with its output on failure.
pub fn helm(args: &[&str], home: &Path) -> String {
    let output = isolated(&binaries().helm, home).args(args).output().expect("running helm");
    assert!(output.status.success(), "helm {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).expect("helm prints UTF-8")
}

/// A chart repository on 127.0.0.1: a directory of packaged charts and its index.yaml.
pub struct ChartRepo {
    _server: ServerProcess,
    port: u16,
    dir: TempDir,
    /// helm's home for packaging and indexing.
    home: TempDir,
}

impl ChartRepo {
    /// Served by Python's `http.server`, to anyone.
    pub fn serve() -> ChartRepo {
        let dir = tempfile::tempdir().expect("temp dir for a chart repository");
        let home = tempfile::tempdir().expect("temp dir for helm's home");
        fs::create_dir_all(dir.path().join("charts")).unwrap();
        let port = free_port();
        let mut command = Command::new("python3");
        command.args(["-m", "http.server", &port.to_string(), "--bind", "127.0.0.1", "--directory"]);
        command.arg(dir.path().join("charts"));
        let server = ServerProcess::start(command, &Endpoint::Tcp(port), &dir.path().join("server.log"));
        ChartRepo { _server: server, port, dir, home }
    }

    /// Served by nginx with basic auth, to `user` with `password` only.
    pub fn serve_authenticated(user: &str, password: &str) -> ChartRepo {
        let dir = tempfile::tempdir().expect("temp dir for a chart repository");
        let home = tempfile::tempdir().expect("temp dir for helm's home");
        let prefix = dir.path();
        fs::create_dir_all(prefix.join("charts")).unwrap();
        // nginx accepts plain-text passwords in this form, so no hashing tool is needed.
        fs::write(prefix.join("htpasswd"), format!("{user}:{{PLAIN}}{password}\n")).unwrap();
        let port = free_port();
        // As root nginx would switch to "nobody", who cannot read the temp dir.
        let run_as = if nix::unistd::geteuid().is_root() { "user root;" } else { "" };
        let p = prefix.display();
        let config = format!(
            "{run_as}\ndaemon off;\nmaster_process off;\npid {p}/nginx.pid;\nerror_log {p}/error.log;\nevents {{ worker_connections 64; }}\nhttp {{\n  access_log {p}/access.log;\n  client_body_temp_path {p}/client_body;\n  proxy_temp_path {p}/proxy;\n  fastcgi_temp_path {p}/fastcgi;\n  uwsgi_temp_path {p}/uwsgi;\n  scgi_temp_path {p}/scgi;\n  server {{\n    listen 127.0.0.1:{port};\n    root {p}/charts;\n    location / {{ auth_basic \"charts\"; auth_basic_user_file {p}/htpasswd; }}\n  }}\n}}\n"
        );
        fs::write(prefix.join("nginx.conf"), config).unwrap();
        let mut command = Command::new("nginx");
        command.arg("-p").arg(prefix).arg("-c").arg(prefix.join("nginx.conf")).arg("-e").arg(prefix.join("error.log"));
        let server = ServerProcess::start(command, &Endpoint::Tcp(port), &prefix.join("nginx.log"));
        ChartRepo { _server: server, port, dir, home }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Packages the chart directory `chart` (as `version` if given) into the
    /// repository, with the already packaged `dependencies` vendored into its
    /// `charts/` as `helm dependency build` would, and re-indexes it.
    pub fn add(&self, chart: &Path, version: Option<&str>, dependencies: &[&str]) -> PathBuf {
        let work = tempfile::tempdir().unwrap();
        let name = chart.file_name().unwrap();
        let copy = work.path().join(name);
        copy_dir(chart, &copy);
        for dependency in dependencies {
            let archive = self.archive(dependency);
            fs::copy(&archive, copy.join("charts").join(archive.file_name().unwrap())).unwrap();
        }
        let out = self.dir.path().join("charts");
        let mut args = vec!["package", copy.to_str().unwrap(), "--destination", out.to_str().unwrap()];
        if let Some(version) = version {
            args.extend(["--version", version]);
        }
        helm(&args, self.home.path());
        helm(&["repo", "index", out.to_str().unwrap(), "--url", &self.url()], self.home.path());
        self.archive(&format!("{}-{}", name.to_str().unwrap(), version.unwrap_or("")))
    }

    /// The archive whose file name starts with `prefix`.
    fn archive(&self, prefix: &str) -> PathBuf {
        let dir = self.dir.path().join("charts");
        let mut found: Vec<PathBuf> = fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name().unwrap().to_str().unwrap().starts_with(prefix)
                    && p.extension().is_some_and(|e| e == "tgz")
            })
            .collect();
        found.sort();
        found.pop().unwrap_or_else(|| panic!("no packaged chart {prefix}* in {}", dir.display()))
    }

    /// kube-prometheus-stack 88.5.3 (as `version`) and its dependencies, packaged from
    /// the unmodified charts.
    pub fn kube_prometheus_stack(&self, version: &str) -> PathBuf {
        let charts = shared_charts();
        let dependencies = ["kube-state-metrics", "prometheus-node-exporter", "grafana", "prometheus-windows-exporter"];
        for dependency in dependencies {
            if fs::read_dir(self.dir.path().join("charts"))
                .unwrap()
                .flatten()
                .all(|e| !e.file_name().to_str().unwrap().starts_with(&format!("{dependency}-")))
            {
                self.add(&charts.join(dependency), None, &[]);
            }
        }
        let with_dash: Vec<String> = dependencies.iter().map(|d| format!("{d}-")).collect();
        let with_dash: Vec<&str> = with_dash.iter().map(String::as_str).collect();
        self.add(&charts.join("kube-prometheus-stack"), Some(version), &with_dash)
    }

    pub fn helm_home(&self) -> &Path {
        self.home.path()
    }
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap().flatten() {
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// An OCI registry on 127.0.0.1 (distribution's, the one the local node pulls from),
/// for charts pushed with `helm push`.
pub struct OciRegistry {
    _server: ServerProcess,
    port: u16,
    _dir: TempDir,
}

impl OciRegistry {
    pub fn serve() -> OciRegistry {
        let binaries = gitops_bootstrap::local::build::ensure_built(&cache_dir())
            .unwrap_or_else(|e| panic!("building the registry: {e}"));
        let dir = tempfile::tempdir().expect("temp dir for a registry");
        let port = free_port();
        let config = dir.path().join("config.yml");
        fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
                dir.path().join("storage").display()
            ),
        )
        .unwrap();
        let mut command = Command::new(&binaries.registry);
        command.arg("serve").arg(&config).env("OTEL_TRACES_EXPORTER", "none");
        let server = ServerProcess::start(command, &Endpoint::Tcp(port), &dir.path().join("registry.log"));
        OciRegistry { _server: server, port, _dir: dir }
    }

    /// `oci://127.0.0.1:PORT/charts`, where [`Self::push`] puts charts.
    pub fn url(&self) -> String {
        format!("oci://127.0.0.1:{}/charts", self.port)
    }

    /// `helm push ARCHIVE` over plain HTTP.
    pub fn push(&self, archive: &Path, home: &Path) {
        helm(&["push", archive.to_str().unwrap(), &self.url(), "--plain-http"], home);
    }
}

/// The image names `up` fills in repo-template's `LOCAL-TAG-NAME` placeholders for.
pub const TEMPLATE_IMAGES: [&str; 9] = [
    "scale-viewer",
    "scale-midi-batch",
    "scale-postgres",
    "scale-local-s3",
    "prometheus",
    "alertmanager",
    "prometheus-operator",
    "prometheus-config-reloader",
    "kube-state-metrics",
];

/// The tag [`template_repository`] gives image `name`: all digits, as a content hash
/// can be, which YAML reads as a number unless the template quotes it.
pub fn template_tag(name: &str) -> String {
    let index = TEMPLATE_IMAGES.iter().position(|n| *n == name).expect("an image of repo-template");
    format!("{}", 100_000_000_000u64 + index as u64)
}

/// repo-template as `up` makes it (charts vendored, `registry` and [`template_tag`] for
/// each image filled in), as the agent sees it: a clone, at `dir/clone`, of its first
/// commit.
pub fn template_repository(dir: &Path, registry: &str) -> PathBuf {
    use gitops_bootstrap::local::agent::{LocalSettings, repo_from_template};
    let settings = LocalSettings {
        registry: Some(registry.into()),
        images: TEMPLATE_IMAGES.iter().map(|name| (name.to_string(), template_tag(name))).collect(),
        midi_dir: Some("/srv/midi".into()),
        charts: shared_charts(),
    };
    let made = repo_from_template(&dir.join("repo"), &settings).expect("repo-template as up makes it");
    let repo = dir.join("clone");
    git2::Repository::clone(made.to_str().unwrap(), &repo).expect("a clone of the repository up made");
    repo
}

/// Serves the chart the EKS cluster of [`template_repository`]'s `repo` installs on
/// 127.0.0.1, and points its release there instead of the public repository (which
/// nothing here may reach). The server must outlive the renders.
pub fn serve_eks_charts(repo: &Path) -> ChartRepo {
    let charts = ChartRepo::serve();
    charts.kube_prometheus_stack("88.5.3");
    let release = repo.join("clusters/eks/charts/monitoring.yaml");
    let text = fs::read_to_string(&release).unwrap();
    let public = "https://prometheus-community.github.io/helm-charts";
    assert!(text.contains(&format!("repo: {public}")), "the EKS release names the public chart repository");
    fs::write(&release, text.replace(public, &charts.url())).unwrap();
    charts
}
