//! The agent on a local control plane: a `gitops-agent run` process beside the
//! control plane's, started detached with its pid file in the same state directory (so
//! `down` stops it too), following a repository: the user's, or a new one made from
//! `repo-template/`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use include_dir::{Dir, include_dir};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::process::{self, Lifetime, Process};
use super::{Error, LOG_TAIL_LINES};

/// The repository a user starts from, compiled in so the binary needs no checkout.
pub(crate) static REPO_TEMPLATE: Dir<'_> = include_dir!("$CARGO_MANIFEST_DIR/../repo-template");

/// The agent keeps its inventory here; the install creates it.
pub use crate::install::AGENT_NAMESPACE;

/// How long the first sync may take before `up` gives up waiting.
const FIRST_SYNC_TIMEOUT: Duration = Duration::from_secs(120);

/// How to run the agent.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// The `gitops-agent` binary.
    pub binary: PathBuf,
    /// The repository to follow (URL or path).
    pub repo: String,
    /// The directory in it holding manifests/ (`--path`).
    pub path: String,
    /// Address of the agent's HTTP endpoints.
    pub listen: String,
}

/// The `gitops-agent` binary installed beside this one (cargo puts both in the same
/// target directory), else the one on `PATH`.
pub fn find_agent_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join("gitops-agent")))
        .filter(|candidate| candidate.is_file())
        .unwrap_or_else(|| PathBuf::from("gitops-agent"))
}

/// repo-template's symlinks (path, target), which `include_dir!` embeds as copies.
const TEMPLATE_SYMLINKS: &[(&str, &str)] = include!(concat!(env!("OUT_DIR"), "/template_symlinks.rs"));

/// The local cluster's directory in repo-template, the agent's `--path` there.
pub const LOCAL_CLUSTER_PATH: &str = "clusters/local";

/// What only `up` knows, written into the local cluster's files before the first commit.
#[derive(Debug, Clone)]
pub struct LocalSettings {
    /// The node's registry (`host:port`), for `LOCAL-REGISTRY` in image names.
    pub registry: Option<String>,
    /// The images built for the node's registry (name, content tag), for each
    /// `LOCAL-TAG-NAME`: a rebuilt image gets a new tag, so committing it rolls it out.
    pub images: Vec<(String, String)>,
    /// The directory on the node whose MIDI files the local S3 endpoint serves, for
    /// `LOCAL-MIDI-DIR`.
    pub midi_dir: Option<PathBuf>,
    /// Unpacked charts holding kube-prometheus-stack and its dependencies, vendored
    /// into the repository (see [`super::charts`]).
    pub charts: PathBuf,
}

/// Writes `repo-template/` into a new git repository at `dir` with one commit on
/// `main`, and returns its path. The local cluster's files (`clusters/local`) get
/// `settings` in that first commit, so that its first sync pulls from the node's
/// registry, reads the corpus and installs the vendored monitoring stack.
pub fn repo_from_template(dir: &Path, settings: &LocalSettings) -> Result<PathBuf, Error> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    REPO_TEMPLATE.extract(dir).map_err(|e| Error::io(dir, e))?;
    for (link, target) in TEMPLATE_SYMLINKS {
        let link = dir.join(link);
        std::fs::remove_dir_all(&link).or_else(|_| std::fs::remove_file(&link)).map_err(|e| Error::io(&link, e))?;
        std::os::unix::fs::symlink(target, &link).map_err(|e| Error::io(&link, e))?;
    }
    super::charts::vendor(&settings.charts, dir)?;
    let mut placeholders: Vec<(String, String)> =
        settings.images.iter().map(|(name, tag)| (format!("LOCAL-TAG-{name}"), tag.clone())).collect();
    if let Some(registry) = &settings.registry {
        placeholders.push(("LOCAL-REGISTRY".into(), registry.clone()));
    }
    if let Some(midi_dir) = &settings.midi_dir {
        placeholders.push(("LOCAL-MIDI-DIR".into(), midi_dir.display().to_string()));
    }
    // Longest first: LOCAL-TAG-prometheus would otherwise eat LOCAL-TAG-prometheus-operator.
    placeholders.sort_by_key(|(name, _)| std::cmp::Reverse(name.len()));
    fill_in(&dir.join(LOCAL_CLUSTER_PATH), &placeholders)?;
    let git = |e: git2::Error| Error::Git { path: dir.to_owned(), message: e.message().to_owned() };
    let repo =
        git2::Repository::init_opts(dir, git2::RepositoryInitOptions::new().initial_head("main")).map_err(git)?;
    let mut index = repo.index().map_err(git)?;
    index.add_all(["*"], git2::IndexAddOption::DEFAULT, None).map_err(git)?;
    index.write().map_err(git)?;
    let tree = repo.find_tree(index.write_tree().map_err(git)?).map_err(git)?;
    let signature = git2::Signature::now("gitops-bootstrap", "gitops-bootstrap@localhost").map_err(git)?;
    repo.commit(Some("HEAD"), &signature, &signature, "Start from repo-template", &tree, &[]).map_err(git)?;
    Ok(dir.to_owned())
}

/// Replaces each placeholder in every file under `dir` (symlinks not followed: they lead
/// to what every cluster shares).
fn fill_in(dir: &Path, placeholders: &[(String, String)]) -> Result<(), Error> {
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let (path, kind) = (entry.path(), entry.file_type().map_err(|e| Error::io(dir, e))?);
        if kind.is_dir() {
            fill_in(&path, placeholders)?;
        } else if kind.is_file() {
            let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
            let filled = placeholders.iter().fold(text.clone(), |text, (name, value)| text.replace(name, value));
            if filled != text {
                std::fs::write(&path, filled).map_err(|e| Error::io(&path, e))?;
            }
        }
    }
    Ok(())
}

/// Starts the agent against the cluster of `kubeconfig` and waits for its first
/// successful sync (`/readyz`). On failure the error carries the agent's log.
pub async fn start(state_dir: &Path, kubeconfig: &Path, options: &AgentOptions) -> Result<Process, Error> {
    let work_dir = state_dir.join("agent");
    let args: Vec<String> = vec![
        "run".into(),
        format!("--repo={}", options.repo),
        format!("--path={}", options.path),
        format!("--listen={}", options.listen),
        format!("--namespace={AGENT_NAMESPACE}"),
        format!("--work-dir={}", work_dir.display()),
        // Polls matter only for remote repositories; local ones are watched.
        "--interval=10s".into(),
    ];
    let tools = tokio::task::spawn_blocking(|| super::build::ensure_render_tools(&super::build::cache_dir()))
        .await
        .expect("the tools' build does not panic")?;
    let args = [
        args,
        vec![format!("--kustomize-bin={}", tools.kustomize.display()), format!("--helm-bin={}", tools.helm.display())],
    ]
    .concat();
    let env = [("KUBECONFIG", kubeconfig.as_os_str())];
    let agent = Process::spawn_with_env(state_dir, "gitops-agent", &options.binary, &args, &env, Lifetime::Detached)?;

    let started = Instant::now();
    let mut last = String::from("no answer yet");
    while started.elapsed() < FIRST_SYNC_TIMEOUT {
        if let Some(status) = agent.exited() {
            return Err(Error::Exited {
                component: agent.name.clone(),
                status,
                log: agent.log.clone(),
                tail: agent.log_tail(LOG_TAIL_LINES),
            });
        }
        match http_status(&options.listen, "/readyz").await {
            Ok(200) => return Ok(agent),
            Ok(code) => last = format!("/readyz answered {code}"),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Err(Error::NotReady {
        component: agent.name.clone(),
        waited: FIRST_SYNC_TIMEOUT,
        last_error: last,
        tail: process::tail(&agent.log, LOG_TAIL_LINES),
        log: agent.log.clone(),
    })
}

/// The status code of `GET path` on `address`: one plain HTTP/1.0 request on loopback.
async fn http_status(address: &str, path: &str) -> std::io::Result<u16> {
    let address = address.replace("0.0.0.0", "127.0.0.1");
    let mut stream = tokio::net::TcpStream::connect(&address).await?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").as_bytes()).await?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).await?;
    // "HTTP/1.1 200"
    std::str::from_utf8(&head[9..12])
        .ok()
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other("not an HTTP response"))
}

/// How to install the agent in the local cluster, as on EKS.
#[derive(Debug, Clone)]
pub struct InClusterOptions {
    /// The `gitops-agent` binary the image is built around.
    pub binary: PathBuf,
    /// The install's settings; `repo` is a path on this machine (served to the pods by
    /// a git daemon on the node's address) or a URL the pods can reach, and `image` is
    /// replaced by the image built here.
    pub install: crate::install::InstallOptions,
    pub lifetime: Lifetime,
}

/// The agent as installed in the local cluster.
#[derive(Debug)]
pub struct InCluster {
    /// The image the Deployment runs, in the node's registry.
    pub image: String,
    /// The repository as the pods fetch it.
    pub repo_url: String,
    /// The git daemon serving a local repository to the pods, if it is one.
    pub git_daemon: Option<Process>,
}

/// Builds the agent's image from agent/Dockerfile around `options.binary`, pushes it to
/// the node's registry, serves a local repository to the pods with `git daemon` on the
/// node's address (its hooks request a sync at each commit, as a webhook would), and
/// installs `manifests/install/` with that image and repository. Returns once installed;
/// [`crate::install::wait_synced`] then waits for the first sync.
pub async fn install_in_cluster(
    plane: &super::LocalControlPlane,
    options: &InClusterOptions,
) -> Result<InCluster, Error> {
    let binary = options.binary.clone();
    let cache = super::build::cache_dir();
    let built = tokio::task::spawn_blocking(move || {
        let base = super::image::debian_base(&cache)?;
        let tools = super::build::ensure_render_tools(&cache)?;
        super::dockerfile::build(&cache, &base, &super::dockerfile::agent(&binary, &tools)?)
    })
    .await
    .expect("image build does not panic")?;
    let image = plane.push_built(&built)?;

    let repo_path = Path::new(&options.install.repo);
    let (repo_url, git_daemon) = if repo_path.is_dir() {
        let repo_path = std::fs::canonicalize(repo_path).map_err(|e| Error::io(repo_path, e))?;
        let (url, daemon) = serve_repo(plane.state_dir(), &repo_path, options.lifetime)?;
        write_sync_hooks(&repo_path, &options.binary, plane.kubeconfig())?;
        (url, Some(daemon))
    } else {
        (options.install.repo.clone(), None)
    };
    let install =
        crate::install::InstallOptions { repo: repo_url.clone(), image: image.clone(), ..options.install.clone() };
    crate::install::install_and_report(&plane.client().await?, &install).await?;
    Ok(InCluster { image, repo_url, git_daemon })
}

/// Serves the repository at `repo` read-only with `git daemon` on the node's address,
/// which pods reach (the bridge is their gateway) and nothing outside this machine does.
fn serve_repo(state_dir: &Path, repo: &Path, lifetime: Lifetime) -> Result<(String, Process), Error> {
    let listener = std::net::TcpListener::bind((super::network::NODE_IP, 0)).map_err(Error::Port)?;
    let port = listener.local_addr().map_err(Error::Port)?.port();
    drop(listener);
    let parent = repo.parent().expect("a canonical repository path has a parent");
    let name = repo.file_name().expect("a canonical repository path has a name").to_string_lossy().into_owned();
    let args: Vec<String> = vec![
        "daemon".into(),
        "--reuseaddr".into(),
        "--informative-errors".into(),
        format!("--listen={}", super::network::NODE_IP),
        format!("--port={port}"),
        format!("--base-path={}", parent.display()),
        "--export-all".into(),
        repo.display().to_string(),
    ];
    let daemon = Process::spawn_with_env(state_dir, "git-daemon", Path::new("git"), &args, &[], lifetime)?;
    Ok((format!("git://{}:{port}/{name}", super::network::NODE_IP), daemon))
}

/// Git hooks that ask the agent to sync right after a commit or merge (a work tree)
/// or a push (a bare repository), through its status ConfigMap (`gitops-agent sync`),
/// so a commit is applied within a second instead of at the next poll.
fn write_sync_hooks(repo: &Path, binary: &Path, kubeconfig: &Path) -> Result<(), Error> {
    use std::os::unix::fs::PermissionsExt;
    let git = git2::Repository::open(repo)
        .map_err(|e| Error::Git { path: repo.to_owned(), message: e.message().to_owned() })?;
    let hooks = git.path().join("hooks");
    std::fs::create_dir_all(&hooks).map_err(|e| Error::io(&hooks, e))?;
    let script = format!(
        "#!/bin/sh\n# Written by gitops-bootstrap: the agent in the cluster syncs now rather than at its next poll.\n\
         KUBECONFIG='{}' '{}' sync --namespace {AGENT_NAMESPACE} >/dev/null 2>&1 ||\n  \
         echo 'gitops-bootstrap hook: could not request a sync (is the cluster up?); the agent picks the commit up at its next poll' >&2\n",
        kubeconfig.display(),
        binary.display(),
    );
    for hook in ["post-commit", "post-merge", "post-receive"] {
        let path = hooks.join(hook);
        std::fs::write(&path, &script).map_err(|e| Error::io(&path, e))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).map_err(|e| Error::io(&path, e))?;
    }
    Ok(())
}

/// One line per pod of the agent's Deployment with what is wrong with it, if anything
/// (a container that cannot start or keeps crashing, with the kubelet's reason), for
/// an `up` whose agent never reported a sync.
pub async fn pod_problems(client: &kube::Client) -> Vec<String> {
    use k8s_openapi::api::core::v1::Pod;
    let pods: kube::Api<Pod> = kube::Api::namespaced(client.clone(), AGENT_NAMESPACE);
    let params = kube::api::ListParams::default().labels("app.kubernetes.io/name=gitops-agent");
    let Ok(list) = pods.list(&params).await else { return vec!["the agent's pods could not be listed".into()] };
    if list.items.is_empty() {
        return vec![format!("no pod of the gitops-agent Deployment in {AGENT_NAMESPACE}")];
    }
    list.items
        .iter()
        .filter_map(|pod| gitops_agent::health::PodSummary::of(&serde_json::to_value(pod).ok()?))
        .map(|pod| match pod.problem {
            Some(problem) => format!("pod {}: {}: {}", pod.name, problem.reason, problem.message),
            None => format!("pod {}: running", pod.name),
        })
        .collect()
}
