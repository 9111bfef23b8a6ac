//! Render: the repository's files → validated Kubernetes objects.
//!
//! In: the directory holding `manifests/`, `dashboards/` and `jobs/` (the checkout's
//! `--path`). Out: a [`Rendered`] revision, or every problem found in any file, each a
//! [`RenderError`] that displays as `file:line: message`:
//! - every object of `manifests/**.{yaml,yml,json}` as a [`Manifest`], the JSON the
//!   apply stage sends, with the [`Location`] (file and line) it came from, in sorted
//!   path order and then document order;
//! - every Grafana dashboard of `dashboards/**.json` as the ConfigMap that delivers it
//!   ([`dashboards`]), among the manifests, so that it is applied, pruned and watched
//!   for drift like any object;
//! - every batch job spec of `jobs/**.{yaml,yml}` as a [`JobSpec`] ([`jobs`]): a run
//!   template, never applied as itself;
//! - every directory under `manifests/` holding a kustomization (or `--path` itself, in
//!   place of `manifests/`), rendered as a whole by `kustomize build` ([`kustomize`]);
//!   its files are not read one by one, and a kustomization another one includes is
//!   rendered only through it;
//! - every chart release of `charts/**.{yaml,yml}` rendered by `helm template`
//!   ([`helm`]).
//!
//! A [`Renderer`] runs the tools and keeps their output by the hash of its inputs, so
//! an unchanged overlay or release is not rendered again; its [`RenderStats`] count
//! what ran.
//!
//! Files decode as `kubectl create -f FILE` decodes them ([`decode`]: YAML 1.1 scalars,
//! multi-document streams, JSON streams), so a file means here what it means to kubectl;
//! where kubectl would silently pick one of two readings or drop content, the agent
//! refuses the file instead. `tests/tests/render_kubectl_parity.rs` holds the proof. A
//! `kind: List` (or any `*List` kind) is expanded into its items. Each object must have
//! an apiVersion, a kind and a metadata.name, and be defined once.
//!
//! Which kinds exist and which are namespaced only the API server knows: [`crate::plan`]
//! takes that from discovery, fills in default namespaces and checks scopes.

mod dashboards;
mod decode;
pub mod helm;
mod jobs;
pub mod kustomize;
mod libyaml;
mod scalar;
pub mod tool;

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fmt;
use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};

use kube::core::{GroupVersionKind, ObjectMeta};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

pub use dashboards::{DASHBOARD_LABEL, FOLDER_ANNOTATION};
pub use decode::{DecodeError, Segment, field_line};
pub use helm::{Capabilities, ChartCredentials, HelmProblem};
pub use jobs::{CONCURRENCY_ANNOTATION, ConcurrencyPolicy, HISTORY_LIMIT_ANNOTATION, JobSpec};
pub use kustomize::KustomizeProblem;
pub use scalar::ScalarError;
pub use tool::Limits;

use decode::Document;

/// Where an object or a problem is: a file relative to the rendered directory, and a
/// 1-based line (1 for problems with a file as a whole).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Location {
    pub file: PathBuf,
    pub line: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

/// One Kubernetes object from the repository.
#[derive(Debug, Clone, PartialEq)]
pub struct Manifest {
    /// The object as JSON. Rendering guarantees a JSON object with string `apiVersion`
    /// (`VERSION` or `GROUP/VERSION`) and `kind`, and `metadata` that deserializes into
    /// `ObjectMeta` without losing a field, with a `name`. So it deserializes into a
    /// `kube::api::DynamicObject` as it is, and goes into a server-side apply as it is.
    pub object: Value,
    /// Where the document (or the List item) starts; for a kustomize or helm render,
    /// the kustomization or the chart release file.
    pub location: Location,
    /// The namespace for this object if it is namespaced and names none, instead of
    /// `--default-namespace`: a chart release's namespace.
    pub default_namespace: Option<String>,
    /// `object` as rendered, in compact JSON (before the plan gives it a namespace).
    /// Shared with the render's cache, it is how the agent knows, without serializing
    /// the object again, that git did not change it since the last sync.
    pub source: Arc<str>,
}

impl Manifest {
    /// A manifest of `object` (not from a chart release), with its source.
    pub fn new(object: Value, location: Location) -> Manifest {
        let source = serde_json::to_string(&object).expect("JSON values serialize").into();
        Manifest { object, location, default_namespace: None, source }
    }

    pub fn api_version(&self) -> &str {
        self.str_at(&["apiVersion"])
    }

    pub fn kind(&self) -> &str {
        self.str_at(&["kind"])
    }

    pub fn name(&self) -> &str {
        self.str_at(&["metadata", "name"])
    }

    /// The namespace written in the object; an empty one counts as none, as in kubectl.
    pub fn namespace(&self) -> Option<&str> {
        Some(self.str_at(&["metadata", "namespace"])).filter(|ns| !ns.is_empty())
    }

    /// The group (empty for the core group) and version of `apiVersion`.
    pub fn group_version(&self) -> (&str, &str) {
        self.api_version().split_once('/').unwrap_or(("", self.api_version()))
    }

    pub fn gvk(&self) -> GroupVersionKind {
        let (group, version) = self.group_version();
        GroupVersionKind::gvk(group, version, self.kind())
    }

    /// The string at `path`, found by key: a JSON pointer would copy each of its tokens,
    /// and the plan asks every object of a revision its identity several times.
    fn str_at(&self, path: &[&str]) -> &str {
        path.iter().try_fold(&self.object, |value, key| value.get(key)).and_then(Value::as_str).unwrap_or_default()
    }

    /// How an error names the object: `Deployment.apps team-a/web`, `Namespace team-a`.
    pub fn describe(&self) -> String {
        let gvk = self.gvk();
        let group = if gvk.group.is_empty() { String::new() } else { format!(".{}", gvk.group) };
        let namespace = self.namespace().map(|ns| format!("{ns}/")).unwrap_or_default();
        format!("{}{group} {namespace}{}", gvk.kind, self.name())
    }
}

/// A problem in the repository, displayed as `file:line: message`.
#[derive(Debug, thiserror::Error)]
#[error("{at}: {problem}")]
pub struct RenderError {
    pub at: Location,
    pub problem: Problem,
}

#[derive(Debug, thiserror::Error)]
pub enum Problem {
    #[error("cannot read: {0}")]
    Read(io::Error),
    #[error("symlink resolves to {}, outside the repository", .0.display())]
    OutsideRoot(PathBuf),
    #[error("not UTF-8 text")]
    NotUtf8,
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("expected a Kubernetes object, found {0}")]
    NotAnObject(&'static str),
    #[error("missing {0}")]
    Missing(&'static str),
    #[error("{field} must be a string, found {found}")]
    NotAString { field: &'static str, found: Value },
    #[error("apiVersion {0:?} is not VERSION or GROUP/VERSION")]
    ApiVersion(String),
    #[error("invalid metadata: {0}")]
    Metadata(String),
    #[error("unknown field metadata.{0}")]
    UnknownMetadataField(String),
    #[error("the items of a List must be a sequence")]
    ListItems,
    #[error("a List inside a List")]
    NestedList,
    #[error("{0} has `items`, which kubectl would create in its place as if it were a List")]
    ItemsOutsideList(String),
    #[error("{object} is defined twice: here and at {first}")]
    Duplicate { object: String, first: Location },
    #[error("{kind} is cluster-scoped; remove metadata.namespace")]
    NamespaceOnClusterScoped { kind: String },
    #[error("unknown kind {kind} in group/version {api_version}")]
    UnknownKind { kind: String, api_version: String },
    #[error("the file is {0} bytes; files over {MAX_FILE_BYTES} bytes (32 MiB) are not read")]
    FileTooLarge(u64),
    #[error("the object is {0} bytes as JSON; the API server stores at most {MAX_OBJECT_BYTES} (1.5 MiB)")]
    ObjectTooLarge(usize),
    #[error("{object} is refused: {refusal}")]
    Refused { object: String, refusal: crate::access::Refusal },
    #[error("invalid JSON: {0}")]
    Json(String),
    #[error("annotation gitops.scale.dev/wave must be a whole number, found {0:?}")]
    Wave(String),
    #[error(
        "a {kind} is applied before every wave (the dry run of the revision needs it); \
         remove its gitops.scale.dev/wave annotation"
    )]
    EarlyWave { kind: String },
    #[error("{0}")]
    Dashboard(#[from] dashboards::DashboardProblem),
    #[error("{0}")]
    Job(#[from] jobs::JobProblem),
    #[error("{0}")]
    Kustomize(#[from] KustomizeProblem),
    #[error("{0}")]
    Helm(#[from] HelmProblem),
}

/// The largest file read: larger ones are refused unread, so a stray dump or a
/// generated monster in the repository cannot exhaust the agent's memory.
const MAX_FILE_BYTES: u64 = 32 * 1024 * 1024;
/// The largest object etcd stores by default (`--max-request-bytes`, 1.5 MiB); the
/// API server would refuse a larger one, so it is refused here, offline, with its place.
const MAX_OBJECT_BYTES: usize = 1536 * 1024;

/// A revision's objects and batch job specs.
#[derive(Debug, Default, PartialEq)]
pub struct Rendered {
    /// The objects of `manifests/`, then the ConfigMaps of `dashboards/`.
    pub manifests: Vec<Manifest>,
    pub jobs: Vec<JobSpec>,
}

/// The directories under `--path` that [`render`] reads.
pub const SOURCE_DIRS: [&str; 4] = ["manifests", "dashboards", "jobs", "charts"];

/// The renderers the agent runs, and where they keep their state.
#[derive(Debug, Clone)]
pub struct Tools {
    /// `--kustomize-bin`.
    pub kustomize: PathBuf,
    /// `--helm-bin`.
    pub helm: PathBuf,
    pub limits: Limits,
    /// Downloaded charts and helm's own state (`--chart-cache-dir`).
    pub chart_cache: PathBuf,
    /// For chart repositories and registries (`--chart-secret-dir`).
    pub credentials: ChartCredentials,
    /// `--path`: the rendered directory is this far below the repository root, which
    /// bases and values files may come from and must not leave.
    pub path_in_repo: PathBuf,
}

impl Default for Tools {
    /// Both tools from `PATH`, charts in the system's temporary directory.
    fn default() -> Self {
        Tools {
            kustomize: "kustomize".into(),
            helm: "helm".into(),
            limits: Limits::default(),
            chart_cache: std::env::temp_dir().join("gitops-agent-charts"),
            credentials: ChartCredentials::default(),
            path_in_repo: ".".into(),
        }
    }
}

impl Tools {
    /// The repository root of a rendered directory `root`.
    fn repo_root(&self, root: &Path) -> PathBuf {
        let depth = self.path_in_repo.components().filter(|c| matches!(c, Component::Normal(_))).count();
        root.ancestors().nth(depth).unwrap_or(root).to_owned()
    }

    /// `path` (relative to the repository) as a path relative to `--path` where it is
    /// inside it, so that errors name files the way the rest of the render does.
    fn under_root(&self, path: &Path) -> PathBuf {
        let prefix: PathBuf = self.path_in_repo.components().filter(|c| matches!(c, Component::Normal(_))).collect();
        path.strip_prefix(&prefix).map(Path::to_owned).unwrap_or_else(|_| path.to_owned())
    }
}

/// How many renders ran and how many came from the cache, since the renderer started.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RenderStats {
    pub kustomize_builds: u64,
    pub helm_templates: u64,
    pub chart_downloads: u64,
    pub cache_hits: u64,
}

/// Renders revisions, keeping the tools' output by the hash of its inputs, and each
/// plain file's objects by the digest of its text.
#[derive(Debug)]
pub struct Renderer {
    tools: Tools,
    /// Output by input hash: only the entries the last revision used are kept.
    cache: Mutex<HashMap<String, Arc<str>>>,
    /// The last revision's files of `manifests/`, by path relative to the rendered directory.
    files: Mutex<HashMap<PathBuf, DecodedFile>>,
    /// The last revision rendered, for [`Edits`].
    last: Mutex<Option<LastRevision>>,
    /// Shared with whoever asked for [`Renderer::stats_handle`].
    stats: Arc<Mutex<RenderStats>>,
}

/// A file of `manifests/` as last decoded, without errors: the SHA-256 of its text, and
/// each object's line and compact JSON (smaller than the decoded values, and read back
/// faster than the YAML is decoded).
#[derive(Debug)]
struct DecodedFile {
    digest: [u8; 32],
    objects: Vec<(usize, Arc<str>)>,
}

/// What changed in the tree since the revision the renderer rendered last: the files
/// edited in place, by path relative to the repository ([`crate::source::Update`]).
/// With it, a revision whose tree holds no symlink is rendered without walking the
/// tree or reading the files it did not change: a commit that edits one file of
/// 10,000 reads one file.
#[derive(Debug, Clone, Copy)]
pub struct Edits<'a> {
    pub since: &'a str,
    pub files: &'a [PathBuf],
}

/// A revision a [`Renderer`] rendered, and the files of its `manifests/` (as
/// [`Findings::files`] found them, less the kustomizations'). Kept only when that walk
/// found no problem and no symlink: a link's target may change without the link.
#[derive(Debug)]
struct LastRevision {
    root: PathBuf,
    revision: String,
    manifests: Vec<PathBuf>,
}

/// Reads a [`Renderer`]'s stats from elsewhere (the agent, once its syncer runs in the loop).
#[derive(Debug, Clone)]
pub struct StatsHandle(Arc<Mutex<RenderStats>>);

impl StatsHandle {
    pub fn get(&self) -> RenderStats {
        *self.0.lock().expect("not poisoned")
    }
}

impl Renderer {
    pub fn new(tools: Tools) -> Renderer {
        Renderer {
            tools,
            cache: Mutex::default(),
            files: Mutex::default(),
            last: Mutex::default(),
            stats: Arc::default(),
        }
    }

    pub fn stats(&self) -> RenderStats {
        *self.stats.lock().expect("not poisoned")
    }

    pub fn stats_handle(&self) -> StatsHandle {
        StatsHandle(self.stats.clone())
    }

    /// Renders the repository at `root` (`--path` in the checkout); dashboards'
    /// ConfigMaps go to `dashboards_namespace`; charts see `capabilities`.
    pub fn render(
        &self,
        root: &Path,
        dashboards_namespace: &str,
        capabilities: &Capabilities,
    ) -> Result<Rendered, Vec<RenderError>> {
        self.render_revision(root, dashboards_namespace, capabilities, None, None)
    }

    /// [`Self::render`] of commit `revision`, reading only the files `edits` names when
    /// it is the change from the revision this renderer rendered last (else, or without
    /// `edits`, the tree is walked and every file read).
    pub fn render_revision(
        &self,
        root: &Path,
        dashboards_namespace: &str,
        capabilities: &Capabilities,
        revision: Option<&str>,
        edits: Option<Edits<'_>>,
    ) -> Result<Rendered, Vec<RenderError>> {
        let last = self.last.lock().expect("not poisoned").take();
        let mut findings = Findings { repo_root: Some(self.tools.repo_root(root)), ..Findings::default() };
        let mut used = HashSet::new();
        let kustomizations = self.kustomizations(root, &mut findings, &mut used);
        let mut files = HashSet::new();
        let mut manifests = Vec::new();
        // Whether the files of manifests/ are known for sure: the walk found no problem.
        let mut walked = true;
        if kustomize::kustomization_file(root).is_none() {
            let known = last.and_then(|last| self.unchanged_since(last, root, revision, edits));
            let (list, edited) = match known {
                Some(known) => known,
                None => {
                    let errors = findings.errors.len();
                    let listed = findings.files(root, "manifests", &["yaml", "yml", "json"]);
                    walked = findings.errors.len() == errors;
                    (
                        listed.into_iter().filter(|f| !kustomizations.iter().any(|dir| f.starts_with(dir))).collect(),
                        None,
                    )
                }
            };
            for file in &list {
                let unchanged = edited.as_ref().is_some_and(|edited| !edited.contains(file));
                self.file_objects(root, file, unchanged, &mut findings, &mut files);
            }
            manifests = list;
        }
        self.charts(root, capabilities, &mut findings, &mut used);
        self.cache.lock().expect("not poisoned").retain(|key, _| used.contains(key));
        self.files.lock().expect("not poisoned").retain(|file, _| files.contains(file));
        // A file with errors is not cached, so it is read again whatever the edits say.
        if let Some(revision) = revision.filter(|_| !findings.linked && walked) {
            let revision = revision.to_owned();
            *self.last.lock().expect("not poisoned") =
                Some(LastRevision { root: root.to_owned(), revision, manifests });
        }
        findings.rest(root, dashboards_namespace)
    }

    /// The files of `manifests/` at `revision` and those of them `edits` changed, when
    /// that is all that changed since `last` (the same revision again changed nothing).
    /// `None` when it may not be: another tree, no edits from that revision, or an
    /// edited file of `manifests/` the last revision did not have.
    fn unchanged_since(
        &self,
        last: LastRevision,
        root: &Path,
        revision: Option<&str>,
        edits: Option<Edits<'_>>,
    ) -> Option<(Vec<PathBuf>, Option<HashSet<PathBuf>>)> {
        if last.root != root {
            return None;
        }
        let edited: HashSet<PathBuf> = match edits {
            _ if revision == Some(last.revision.as_str()) => HashSet::new(),
            Some(edits) if edits.since == last.revision => {
                edits.files.iter().map(|file| self.tools.under_root(file)).collect()
            }
            _ => return None,
        };
        let known = |file: &PathBuf| !file.starts_with("manifests") || last.manifests.binary_search(file).is_ok();
        edited.iter().all(known).then_some((last.manifests, Some(edited)))
    }

    /// Renders every kustomization of the revision into `findings`; returns every
    /// kustomization directory found (relative to `root`), whose files are not read
    /// one by one.
    fn kustomizations(&self, root: &Path, findings: &mut Findings, used: &mut HashSet<String>) -> Vec<PathBuf> {
        let tools = &self.tools;
        let repo = tools.repo_root(root);
        let in_repo = |dir: &Path| -> PathBuf {
            let prefix: PathBuf =
                tools.path_in_repo.components().filter(|c| matches!(c, Component::Normal(_))).collect();
            if dir == Path::new(".") { prefix } else { prefix.join(dir) }
        };
        let found: Vec<PathBuf> = match kustomize::kustomization_file(root) {
            Some(_) => vec![PathBuf::from(".")],
            None => {
                let mut found = Vec::new();
                find_kustomizations(root, Path::new("manifests"), &mut found);
                found
            }
        };
        let mut inputs = Vec::new();
        for dir in &found {
            let dir_in_repo = in_repo(dir);
            match kustomize::inputs(&repo, &dir_in_repo) {
                Ok(found_inputs) => inputs.push((dir.clone(), dir_in_repo, found_inputs)),
                Err(errors) => {
                    for (at, problem) in errors {
                        findings.error(Location { file: tools.under_root(&at.file), line: at.line }, problem);
                    }
                }
            }
        }
        for (dir, dir_in_repo, own) in &inputs {
            // A base another kustomization includes is rendered as part of it.
            if inputs.iter().any(|(_, other, theirs)| other != dir_in_repo && theirs.dirs.contains(dir_in_repo)) {
                continue;
            }
            let file = kustomize::kustomization_file(&root.join(dir)).expect("found by its file");
            let at = Location { file: file.strip_prefix(root).unwrap_or(&file).to_owned(), line: 1 };
            let key = own.key(&repo, &tools.kustomize);
            let output = self.cached(&key, used, |stats| {
                stats.kustomize_builds += 1;
                tracing::info!(kustomization = %at.file.display(), "kustomize build");
                kustomize::build(&tools.kustomize, &tools.limits, &repo, dir_in_repo).map_err(Problem::from)
            });
            match output {
                Ok(text) => findings.tool_objects(&at, &text, None),
                Err(problem) => findings.error(at, problem),
            }
        }
        found
    }

    /// Renders every chart release of `charts/` into `findings`.
    fn charts(&self, root: &Path, capabilities: &Capabilities, findings: &mut Findings, used: &mut HashSet<String>) {
        let tools = &self.tools;
        let repo = tools.repo_root(root);
        let helm = helm::Helm {
            bin: &tools.helm,
            cache: &tools.chart_cache,
            limits: &tools.limits,
            credentials: &tools.credentials,
        };
        for file in findings.files(root, "charts", &["yaml", "yml"]) {
            // A chart vendored under charts/ (for a release's `path`) is not a release.
            let in_chart = file.ancestors().skip(1).take_while(|dir| *dir != Path::new("charts"));
            if in_chart.into_iter().any(|dir| root.join(dir).join("Chart.yaml").is_file()) {
                continue;
            }
            let Some(text) = findings.read(root, &file) else { continue };
            let release = match helm::release(root, &repo, &file, text) {
                Ok(release) => release,
                Err(errors) => {
                    for (at, problem) in errors {
                        findings.error(at, problem);
                    }
                    continue;
                }
            };
            let (chart, digest) = match &release.source {
                helm::ChartSource::Remote { repo: url, chart, version, plain_http } => {
                    match helm.chart(url, chart, version, *plain_http) {
                        Ok((archive, digest, downloaded)) => {
                            if downloaded {
                                self.stats.lock().expect("not poisoned").chart_downloads += 1;
                                tracing::info!(release = release.name, chart, version, digest, "downloaded chart");
                            }
                            (archive, digest)
                        }
                        Err(problem) => {
                            // helm says which: a version the repository lacks, or a repository it cannot read.
                            let field = if problem.to_string().contains("not found") { "version" } else { "repo" };
                            findings.error(release.at(field), problem.into());
                            continue;
                        }
                    }
                }
                helm::ChartSource::Path(path) => (repo.join(path), helm::tree_digest(&repo.join(path))),
            };
            let key = helm::render_key(&tools.helm, &release, &digest, &repo, capabilities);
            let at = Location { file: file.clone(), line: 1 };
            let output = self.cached(&key, used, |stats| {
                stats.helm_templates += 1;
                tracing::info!(release = release.name, file = %file.display(), "helm template");
                helm.template(&release, &chart, &repo, capabilities).map_err(Problem::from)
            });
            match output {
                Ok(text) => findings.tool_objects(&at, &text, Some(&release.namespace)),
                Err(problem) => {
                    let at = if release.values.is_empty() { at } else { release.at("values") };
                    findings.error(at, problem)
                }
            }
        }
    }

    /// The objects of one file of `manifests/`: decoded again only when its text differs
    /// from the last render's, so a commit decodes the files it changed and reuses the
    /// objects of the rest. What decoding a file gives depends on its path and text
    /// alone (the checks across files, such as duplicates, run on the whole revision
    /// every time), so the reused objects are the ones decoding would give.
    /// An `unchanged` file (the diff says so) is not even read when it was decoded before.
    fn file_objects(
        &self,
        root: &Path,
        file: &Path,
        unchanged: bool,
        findings: &mut Findings,
        used: &mut HashSet<PathBuf>,
    ) {
        if unchanged && let Some(decoded) = self.files.lock().expect("not poisoned").get(file) {
            used.insert(file.to_owned());
            return findings.decoded(file, decoded);
        }
        let Some(text) = findings.read(root, file) else { return };
        let digest: [u8; 32] = Sha256::digest(text.as_bytes()).into();
        used.insert(file.to_owned());
        if let Some(decoded) = self.files.lock().expect("not poisoned").get(file).filter(|d| d.digest == digest) {
            return findings.decoded(file, decoded);
        }
        let (manifests, errors) = (findings.manifests.len(), findings.errors.len());
        findings.text_objects(file, &text);
        let mut files = self.files.lock().expect("not poisoned");
        if findings.errors.len() > errors {
            // A broken file is decoded again each time, so its errors are always the file's own.
            files.remove(file);
            return;
        }
        let objects = findings.manifests[manifests..].iter().map(|m| (m.location.line, m.source.clone())).collect();
        files.insert(file.to_owned(), DecodedFile { digest, objects });
    }

    /// The output cached under `key`, else what `render` makes of it (kept on success).
    fn cached(
        &self,
        key: &str,
        used: &mut HashSet<String>,
        render: impl FnOnce(&mut RenderStats) -> Result<String, Problem>,
    ) -> Result<Arc<str>, Problem> {
        used.insert(key.to_owned());
        if let Some(output) = self.cache.lock().expect("not poisoned").get(key) {
            self.stats.lock().expect("not poisoned").cache_hits += 1;
            return Ok(output.clone());
        }
        let output: Arc<str> = {
            let mut stats = self.stats();
            let result = render(&mut stats);
            *self.stats.lock().expect("not poisoned") = stats;
            result?.into()
        };
        self.cache.lock().expect("not poisoned").insert(key.to_owned(), output.clone());
        Ok(output)
    }
}

/// The directories under `dir` (relative to `root`) holding a kustomization: the
/// topmost ones, as each is rendered with everything below it.
fn find_kustomizations(root: &Path, dir: &Path, found: &mut Vec<PathBuf>) {
    let path = root.join(dir);
    if kustomize::kustomization_file(&path).is_some() {
        return found.push(dir.to_owned());
    }
    let Ok(entries) = fs::read_dir(&path) else { return };
    let mut entries: Vec<_> = entries.flatten().collect();
    entries.sort_by_key(|entry| entry.file_name());
    for entry in entries {
        // A symlinked directory is walked (and checked) by the file walk, not here.
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            find_kustomizations(root, &dir.join(entry.file_name()), found);
        }
    }
}

/// Renders the repository at `root` once, with kustomize and helm from `PATH` and helm's
/// default capabilities (no cluster): for callers that keep no [`Renderer`].
pub fn render(root: &Path, dashboards_namespace: &str) -> Result<Rendered, Vec<RenderError>> {
    Renderer::new(Tools::default()).render(root, dashboards_namespace, &Capabilities::default())
}

impl Findings {
    /// Job specs and dashboards, then the checks of the whole revision.
    fn rest(mut self, root: &Path, dashboards_namespace: &str) -> Result<Rendered, Vec<RenderError>> {
        let findings = &mut self;
        let manifests = std::mem::take(&mut findings.manifests);
        for file in findings.files(root, "jobs", &["yaml", "yml"]) {
            findings.objects(root, &file);
        }
        let job_manifests = std::mem::replace(&mut findings.manifests, manifests);
        let jobs_duplicates = duplicates(&job_manifests);
        findings.errors.extend(jobs_duplicates);
        let mut jobs = Vec::new();
        for manifest in job_manifests {
            match JobSpec::new(manifest) {
                Ok(spec) => jobs.push(spec),
                Err((at, problem)) => findings.error(at, problem.into()),
            }
        }

        let mut uids = dashboards::Uids::default();
        for file in findings.files(root, "dashboards", &["json"]) {
            let Some(text) = findings.read(root, &file) else { continue };
            match dashboards::config_map(&file, &text, dashboards_namespace, &mut uids) {
                Ok(manifest) => findings.manifests.push(manifest),
                Err((line, problem)) => findings.error(Location { file, line }, problem),
            }
        }
        let duplicates = duplicates(&findings.manifests);
        findings.errors.extend(duplicates);
        self.into_result().map(|manifests| Rendered { manifests, jobs })
    }
}

/// The objects of one file's `text`, checked as [`render`] checks a file of
/// `manifests/` (`file` only names it in errors). The fuzz target's entry point
/// (`agent/fuzz/`).
pub fn render_text(file: &Path, text: &str) -> Result<Vec<Manifest>, Vec<RenderError>> {
    let mut findings = Findings::default();
    findings.text_objects(file, text);
    let duplicates = duplicates(&findings.manifests);
    findings.errors.extend(duplicates);
    findings.into_result()
}

/// What rendering found so far.
#[derive(Default)]
struct Findings {
    manifests: Vec<Manifest>,
    errors: Vec<RenderError>,
    /// Where symlinks may point: the whole repository, not only `--path`, so that a
    /// cluster's directory can link the repository's shared `dashboards/` (as kustomize
    /// bases reach `../../manifests`). None: `--path` is the repository.
    repo_root: Option<PathBuf>,
    /// Whether a walk went through a symlink.
    linked: bool,
}

impl Findings {
    fn error(&mut self, at: Location, problem: Problem) {
        self.errors.push(RenderError { at, problem });
    }

    fn into_result(mut self) -> Result<Vec<Manifest>, Vec<RenderError>> {
        if self.errors.is_empty() {
            return Ok(self.manifests);
        }
        self.errors.sort_by(|a, b| a.at.cmp(&b.at));
        Err(self.errors)
    }

    /// The files under `root/dir` with one of `extensions`, relative to `root`, in
    /// sorted path order. Symlinks are followed as long as they stay inside the repository.
    fn files(&mut self, root: &Path, dir: &str, extensions: &[&str]) -> Vec<PathBuf> {
        let real_root = match self.repo_root.as_deref().unwrap_or(root).canonicalize() {
            Ok(real_root) => real_root,
            Err(e) => {
                // Said once, for the first directory.
                if dir == "manifests" {
                    self.error(Location { file: root.to_owned(), line: 1 }, Problem::Read(e));
                }
                return Vec::new();
            }
        };
        let real_base = root.canonicalize().unwrap_or_else(|_| root.to_owned());
        let mut walk = Walk { root, real_root, real_base, extensions, seen_dirs: HashSet::new(), files: Vec::new() };
        walk.visit(PathBuf::from(dir), self);
        walk.files.sort();
        walk.files
    }

    /// The objects of a YAML or JSON file, added to the manifests.
    fn objects(&mut self, root: &Path, file: &Path) {
        if let Some(text) = self.read(root, file) {
            self.text_objects(file, &text);
        }
    }

    /// The objects a tool rendered, each placed at `at` (the kustomization or release
    /// file), defaulting to `namespace` if namespaced and without one.
    fn tool_objects(&mut self, at: &Location, text: &str, namespace: Option<&str>) {
        let (manifests, errors) = (self.manifests.len(), self.errors.len());
        self.text_objects(&at.file, text);
        for manifest in &mut self.manifests[manifests..] {
            manifest.location = at.clone();
            manifest.default_namespace = namespace.map(str::to_owned);
        }
        for error in &mut self.errors[errors..] {
            error.at = at.clone();
        }
    }

    /// The objects of a file as decoded before.
    fn decoded(&mut self, file: &Path, decoded: &DecodedFile) {
        for (line, json) in &decoded.objects {
            let object = serde_json::from_str(json).expect("JSON that serde_json wrote");
            let location = Location { file: file.to_owned(), line: *line };
            self.manifests.push(Manifest { object, location, default_namespace: None, source: json.clone() });
        }
    }

    fn text_objects(&mut self, file: &Path, text: &str) {
        for document in decode::documents(text) {
            match document {
                Ok(document) => self.document(document, file),
                Err(e) => self.error(Location { file: file.to_owned(), line: e.line }, e.error.into()),
            }
        }
    }

    fn read(&mut self, root: &Path, file: &Path) -> Option<String> {
        let at = |line| Location { file: file.to_owned(), line };
        // Checked before reading, so a huge file costs no memory.
        match fs::metadata(root.join(file)) {
            Ok(metadata) if metadata.len() > MAX_FILE_BYTES => {
                self.error(at(1), Problem::FileTooLarge(metadata.len()));
                return None;
            }
            _ => {}
        }
        match fs::read(root.join(file)).map(String::from_utf8) {
            Ok(Ok(text)) => Some(text),
            Ok(Err(e)) => {
                let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
                self.error(at(1 + valid.iter().filter(|&&b| b == b'\n').count()), Problem::NotUtf8);
                None
            }
            Err(e) => {
                self.error(at(1), Problem::Read(e));
                None
            }
        }
    }

    /// A document's objects: itself, or the items of a List. kubectl reads any object
    /// with `items` as a List and creates the items (not the List), each taking the
    /// List's apiVersion and kind (`ConfigMapList` → `ConfigMap`) if it names neither.
    fn document(&mut self, document: Document, file: &Path) {
        let at = |line| Location { file: file.to_owned(), line };
        let Value::Object(mut object) = document.value else {
            return self.error(at(document.line), Problem::NotAnObject(json_type(&document.value)));
        };
        if !object.contains_key("items") {
            return self.object(object, at(document.line));
        }
        let list = required_str(&object, "kind").and_then(|kind| match kind.strip_suffix("List") {
            Some(item_kind) => Ok(item_kind.to_owned()),
            None => Err(Problem::ItemsOutsideList(kind.to_owned())),
        });
        let api_version = required_str(&object, "apiVersion").map(str::to_owned);
        let (item_kind, api_version, items) = match (list, api_version, object.remove("items")) {
            (Ok(item_kind), Ok(api_version), Some(Value::Array(items))) => (item_kind, api_version, items),
            (Err(problem), _, _) | (_, Err(problem), _) => return self.error(at(document.line), problem),
            _ => return self.error(at(document.line), Problem::ListItems),
        };
        for (index, item) in items.into_iter().enumerate() {
            let at = at(document.item_lines.get(index).copied().unwrap_or(document.line));
            let Value::Object(mut item) = item else {
                self.error(at, Problem::NotAnObject(json_type(&item)));
                continue;
            };
            if item.contains_key("items") {
                self.error(at, Problem::NestedList);
                continue;
            }
            if !item.contains_key("apiVersion") && !item.contains_key("kind") && !item_kind.is_empty() {
                item.insert("apiVersion".to_owned(), api_version.as_str().into());
                item.insert("kind".to_owned(), item_kind.as_str().into());
            }
            self.object(item, at);
        }
    }

    fn object(&mut self, object: Map<String, Value>, at: Location) {
        let mut problems = object_problems(&object);
        let object = Value::Object(object);
        let source = serde_json::to_string(&object).expect("JSON values serialize");
        if source.len() > MAX_OBJECT_BYTES {
            problems.push(Problem::ObjectTooLarge(source.len()));
        }
        if problems.is_empty() {
            let source = source.into();
            return self.manifests.push(Manifest { object, location: at, default_namespace: None, source });
        }
        for problem in problems {
            self.error(at.clone(), problem);
        }
    }
}

/// Walks a directory, collecting the files with one of `extensions` and reporting
/// problems to `findings`.
struct Walk<'a> {
    root: &'a Path,
    real_root: PathBuf,
    /// `root`, real: a path that is not this joined with its relative path went through a symlink.
    real_base: PathBuf,
    extensions: &'a [&'a str],
    /// Directories already walked, so that a symlink to one does not walk it again (or
    /// forever, if it points to an ancestor).
    seen_dirs: HashSet<PathBuf>,
    files: Vec<PathBuf>,
}

impl Walk<'_> {
    fn visit(&mut self, relative: PathBuf, findings: &mut Findings) {
        let is_manifest =
            relative.extension().and_then(OsStr::to_str).is_some_and(|ext| self.extensions.contains(&ext));
        let at = |relative: &Path| Location { file: relative.to_owned(), line: 1 };
        let path = self.root.join(&relative);
        // Follows symlinks, and so fails for a broken one.
        let metadata = match fs::metadata(&path) {
            Ok(metadata) if metadata.is_dir() || is_manifest => metadata,
            Ok(_) => return,
            Err(e) if is_manifest => return findings.error(at(&relative), Problem::Read(e)),
            Err(_) => return, // not ours, or no such directory at all
        };
        let real = path.canonicalize();
        if real.as_ref().is_ok_and(|real| *real != self.real_base.join(&relative)) {
            findings.linked = true;
        }
        match real {
            Ok(real) if !real.starts_with(&self.real_root) => findings.error(at(&relative), Problem::OutsideRoot(real)),
            Ok(real) if metadata.is_dir() => {
                if !self.seen_dirs.insert(real) {
                    return;
                }
                let entries = match fs::read_dir(&path).and_then(|entries| entries.collect::<io::Result<Vec<_>>>()) {
                    Ok(entries) => entries,
                    Err(e) => return findings.error(at(&relative), Problem::Read(e)),
                };
                for entry in entries {
                    self.visit(relative.join(entry.file_name()), findings);
                }
            }
            Ok(_) => self.files.push(relative),
            Err(e) => findings.error(at(&relative), Problem::Read(e)),
        }
    }
}

/// Everything that keeps an object from being a [`Manifest`].
fn object_problems(object: &Map<String, Value>) -> Vec<Problem> {
    let mut problems = Vec::new();
    match required_str(object, "apiVersion") {
        Ok(api_version) if !is_api_version(api_version) => problems.push(Problem::ApiVersion(api_version.to_owned())),
        Ok(_) => {}
        Err(problem) => problems.push(problem),
    }
    problems.extend(required_str(object, "kind").err());
    match (required_str(object, "metadata.name"), object.get("metadata")) {
        (Ok(_), Some(metadata)) => problems.extend(metadata_problems(metadata)),
        (result, _) => problems.extend(result.err()),
    }
    problems
}

/// The non-empty string at `field`, a dotted path like `metadata.name`.
fn required_str<'a>(object: &'a Map<String, Value>, field: &'static str) -> Result<&'a str, Problem> {
    let mut keys = field.split('.');
    let value = keys.next().and_then(|key| object.get(key));
    match keys.fold(value, |value, key| value.and_then(|v| v.get(key))) {
        None | Some(Value::Null) => Err(Problem::Missing(field)),
        Some(Value::String(s)) if s.is_empty() => Err(Problem::Missing(field)),
        Some(Value::String(s)) => Ok(s),
        Some(found) => Err(Problem::NotAString { field, found: found.clone() }),
    }
}

fn is_api_version(api_version: &str) -> bool {
    match api_version.split_once('/') {
        Some((group, version)) => !group.is_empty() && !version.is_empty() && !version.contains('/'),
        None => true, // a version of the core group, like `v1`
    }
}

/// Later stages read metadata as `ObjectMeta`, which drops fields it does not know:
/// a misspelt `lables` would vanish without a word.
fn metadata_problems(metadata: &Value) -> Vec<Problem> {
    let parsed = match serde_json::from_value::<ObjectMeta>(metadata.clone()) {
        Ok(parsed) => serde_json::to_value(parsed).expect("ObjectMeta serializes"),
        Err(e) => return vec![Problem::Metadata(e.to_string())],
    };
    let written = metadata.as_object().into_iter().flatten();
    written
        .filter(|(key, value)| !value.is_null() && parsed.get(key).is_none())
        .map(|(key, _)| Problem::UnknownMetadataField(key.clone()))
        .collect()
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a sequence",
        Value::Object(_) => "a mapping",
    }
}

/// An error for every object defined again (same group, kind, namespace and name),
/// naming where it was first defined.
pub(crate) fn duplicates(manifests: &[Manifest]) -> Vec<RenderError> {
    let mut first: HashMap<(&str, &str, Option<&str>, &str), &Location> = HashMap::new();
    let mut errors = Vec::new();
    for manifest in manifests {
        let identity = (manifest.group_version().0, manifest.kind(), manifest.namespace(), manifest.name());
        match first.entry(identity) {
            Entry::Vacant(entry) => {
                entry.insert(&manifest.location);
            }
            Entry::Occupied(entry) => errors.push(RenderError {
                at: manifest.location.clone(),
                problem: Problem::Duplicate { object: manifest.describe(), first: (*entry.get()).clone() },
            }),
        }
    }
    errors
}

#[cfg(test)]
pub(crate) mod tests {
    use serde_json::json;

    use super::*;

    /// A repository with `files` (path under `manifests/`, content).
    fn repo(files: &[(&str, &str)]) -> tempfile::TempDir {
        let files: Vec<(String, &str)> =
            files.iter().map(|(path, text)| (format!("manifests/{path}"), *text)).collect();
        repo_at_root(&files)
    }

    /// A repository with `files` (path from the root, content).
    pub(crate) fn repo_at_root<P: AsRef<Path>>(files: &[(P, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (path, content) in files {
            let path = dir.path().join(path);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, content).unwrap();
        }
        dir
    }

    fn render_ok(files: &[(&str, &str)]) -> Vec<Manifest> {
        let dir = repo(files);
        render(dir.path(), "monitoring").unwrap_or_else(|errors| panic!("{errors:#?}")).manifests
    }

    fn render_errors(files: &[(&str, &str)]) -> Vec<String> {
        let dir = repo(files);
        render(dir.path(), "monitoring").expect_err("errors").iter().map(ToString::to_string).collect()
    }

    fn summary(manifests: &[Manifest]) -> Vec<(String, String)> {
        manifests.iter().map(|m| (m.location.to_string(), m.describe())).collect()
    }

    fn config_map(name: &str) -> String {
        format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n")
    }

    #[test]
    fn an_error_names_the_file_and_the_line_of_its_document() {
        let text = format!(
            "{}---\n{}---\n# the third\napiVersion: v1\nkind: ConfigMap\nmetadata: {{}}\n",
            config_map("a"),
            config_map("b")
        );
        assert_eq!(render_errors(&[("app.yaml", &text)]), ["manifests/app.yaml:12: missing metadata.name"]);
    }

    #[test]
    fn errors_in_every_file_are_reported() {
        let errors = render_errors(&[
            ("a.yaml", "apiVersion: v1\nmetadata: {name: x}\n"),
            ("b.yaml", "kind: ConfigMap\nmetadata: {name: b}\n---\n- 1\n"),
        ]);
        assert_eq!(
            errors,
            [
                "manifests/a.yaml:1: missing kind",
                "manifests/b.yaml:1: missing apiVersion",
                "manifests/b.yaml:4: expected a Kubernetes object, found a sequence",
            ]
        );
    }

    #[test]
    fn invalid_yaml_points_at_the_syntax_error() {
        let text =
            format!("{}---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: b\n   labels: x\n", config_map("a"));
        let errors = render_errors(&[("a.yaml", &text)]);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].starts_with("manifests/a.yaml:10: invalid YAML: "), "{errors:?}");
    }

    #[test]
    fn lists_are_expanded_with_a_line_per_item() {
        let list = "apiVersion: v1\nkind: ConfigMapList\nitems:\n- metadata: {name: a}\n- apiVersion: v1\n  kind: Secret\n  metadata:\n    name: b\n";
        assert_eq!(
            summary(&render_ok(&[("list.yaml", list)])),
            [
                ("manifests/list.yaml:4".to_owned(), "ConfigMap a".to_owned()),
                ("manifests/list.yaml:5".to_owned(), "Secret b".to_owned()),
            ]
        );
        let nested = "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: List, items: []}\n";
        assert_eq!(render_errors(&[("list.yaml", nested)]), ["manifests/list.yaml:4: a List inside a List"]);
    }

    #[test]
    fn duplicates_name_both_places() {
        let errors = render_errors(&[("a.yaml", &config_map("x")), ("b/c.yaml", &format!("# x\n{}", config_map("x")))]);
        assert_eq!(errors, ["manifests/b/c.yaml:2: ConfigMap x is defined twice: here and at manifests/a.yaml:1"]);
    }

    #[test]
    fn empty_documents_are_skipped() {
        let text = format!("---\n# nothing\n---\n\n---\n{}---\n~\n...\n---\n", config_map("a"));
        assert_eq!(
            summary(&render_ok(&[("a.yaml", &text)])),
            [("manifests/a.yaml:6".to_owned(), "ConfigMap a".to_owned())]
        );
    }

    #[test]
    fn json_files_and_streams() {
        let json = "{\n  \"apiVersion\": \"v1\", \"kind\": \"List\",\n  \"items\": [\n    {\"apiVersion\": \"v1\", \"kind\": \"ConfigMap\", \"metadata\": {\"name\": \"a\"}, \"data\": {\"n\": \"1\"}},\n    {\"apiVersion\": \"v1\", \"kind\": \"ConfigMap\", \"metadata\": {\"name\": \"b\"}}\n  ]\n}\n{\"apiVersion\": \"v1\", \"kind\": \"ConfigMap\", \"metadata\": {\"name\": \"c\"}}\n";
        let manifests = render_ok(&[("x.json", json)]);
        assert_eq!(
            manifests.iter().map(|m| m.location.line).collect::<Vec<_>>(),
            [4, 5, 8],
            "each item and each value of the stream on its own line"
        );
        assert_eq!(
            manifests[0].object,
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"}, "data": {"n": "1"}})
        );
    }

    #[test]
    fn files_are_read_in_sorted_path_order_and_others_ignored() {
        let manifests = render_ok(&[
            ("b.yml", &config_map("b")),
            ("a.yaml", &config_map("a")),
            ("a/z.json", r#"{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "z"}}"#),
            ("README.md", "not YAML: ["),
            ("notes.txt", "-"),
        ]);
        let files: Vec<String> = manifests.iter().map(|m| m.location.file.display().to_string()).collect();
        assert_eq!(files, ["manifests/a/z.json", "manifests/a.yaml", "manifests/b.yml"]);
    }

    #[test]
    fn a_repository_without_manifests_renders_nothing() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(render(dir.path(), "monitoring").unwrap(), Rendered::default());
    }

    #[test]
    fn objects_must_name_themselves_properly() {
        let errors = render_errors(&[(
            "a.yaml",
            "apiVersion: apps/v1/x\nkind: Deployment\nmetadata: {name: ''}\n---\napiVersion: 1\nkind: [ConfigMap]\nmetadata: {name: a, lables: {app: a}, annotations: {n: 1}}\n",
        )]);
        assert_eq!(
            errors,
            [
                "manifests/a.yaml:1: apiVersion \"apps/v1/x\" is not VERSION or GROUP/VERSION",
                "manifests/a.yaml:1: missing metadata.name",
                "manifests/a.yaml:5: apiVersion must be a string, found 1",
                "manifests/a.yaml:5: kind must be a string, found [\"ConfigMap\"]",
                "manifests/a.yaml:5: invalid metadata: invalid type: integer `1`, expected a string",
            ]
        );
        let errors = render_errors(&[("a.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: y}\n")]);
        assert_eq!(
            errors,
            ["manifests/a.yaml:1: metadata.name must be a string, found true"],
            "YAML 1.1 reads `y` as true"
        );
        let errors =
            render_errors(&[("a.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a, lables: {app: a}}\n")]);
        assert_eq!(errors, ["manifests/a.yaml:1: unknown field metadata.lables"]);
    }

    fn dashboard(uid: &str, title: &str) -> String {
        format!("{{\n  \"title\": \"{title}\",\n  \"panels\": [],\n  \"uid\": \"{uid}\"\n}}\n")
    }

    #[test]
    fn dashboards_become_configmaps_named_from_the_uid_in_the_folder_of_their_directory() {
        let top = dashboard("Top_Level", "Top");
        let nested = dashboard("scale-pipeline", "Scale");
        let dir = repo_at_root(&[
            ("dashboards/top.json", top.as_str()),
            ("dashboards/scale/pipeline.json", nested.as_str()),
            ("dashboards/README.md", "not a dashboard"),
        ]);
        let rendered = render(dir.path(), "grafana").unwrap_or_else(|e| panic!("{e:#?}"));
        let objects: Vec<&Value> = rendered.manifests.iter().map(|m| &m.object).collect();
        assert_eq!(
            objects,
            [
                &json!({
                    "apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {
                        "name": "dashboard-scale-pipeline", "namespace": "grafana",
                        "labels": { "grafana_dashboard": "1" },
                        "annotations": { "grafana_folder": "scale" },
                    },
                    "data": { "scale-pipeline.json": nested },
                }),
                &json!({
                    "apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {
                        "name": "dashboard-top-level", "namespace": "grafana",
                        "labels": { "grafana_dashboard": "1" },
                    },
                    "data": { "Top_Level.json": top },
                }),
            ]
        );
        assert_eq!(rendered.manifests[0].location.to_string(), "dashboards/scale/pipeline.json:1");
    }

    #[test]
    fn bad_dashboards_name_their_file() {
        let big = format!("{{\"uid\": \"big\", \"title\": \"Big\", \"pad\": \"{}\"}}", "x".repeat(1024 * 1024));
        let errors = {
            let dir = repo_at_root(&[
                ("dashboards/a.json", dashboard("same", "A").as_str()),
                ("dashboards/b/a.json", dashboard("Same", "Also A").as_str()),
                ("dashboards/big.json", big.as_str()),
                ("dashboards/broken.json", "{\n  \"uid\": \"x\",\n  \"title\": }\n"),
                ("dashboards/list.json", "[]"),
                ("dashboards/no-title.json", "{\"uid\": \"t\"}"),
                ("dashboards/slash.json", dashboard("a/b", "Slash").as_str()),
            ]);
            render(dir.path(), "monitoring").unwrap_err().iter().map(ToString::to_string).collect::<Vec<_>>()
        };
        assert_eq!(errors.len(), 6, "{errors:#?}");
        assert_eq!(
            errors[0],
            "dashboards/b/a.json:1: uid \"Same\" gives ConfigMap dashboard-same, as does the dashboard at dashboards/a.json:1"
        );
        assert_eq!(
            errors[1],
            format!(
                "dashboards/big.json:1: the dashboard is {} bytes; a ConfigMap holds at most 1048576 (1 MiB)",
                big.len()
            )
        );
        assert!(errors[2].starts_with("dashboards/broken.json:3: invalid JSON: "), "{errors:#?}");
        assert_eq!(errors[3], "dashboards/list.json:1: the dashboard must be a JSON object, found a sequence");
        assert_eq!(errors[4], "dashboards/no-title.json:1: missing title");
        assert_eq!(errors[5], "dashboards/slash.json:1: uid \"a/b\" must be 1 to 40 letters, digits, '-', '_' or '.'");
    }

    const JOB: &str = "apiVersion: batch/v1\nkind: Job\nmetadata:\n  name: midi\n  annotations:\n    gitops.scale.dev/history-limit: \"2\"\n    gitops.scale.dev/concurrency-policy: Forbid\nspec:\n  template:\n    spec:\n      restartPolicy: Never\n      containers: [{name: batch, image: busybox}]\n";

    #[test]
    fn job_specs_are_templates_with_settings_and_a_hash() {
        let dir = repo_at_root(&[("jobs/midi.yaml", JOB)]);
        let rendered = render(dir.path(), "monitoring").unwrap_or_else(|e| panic!("{e:#?}"));
        assert_eq!(rendered.manifests, [], "a job spec is not applied as an object");
        let [spec] = rendered.jobs.as_slice() else { panic!("one job: {:?}", rendered.jobs) };
        assert_eq!((spec.name(), spec.history_limit, spec.concurrency), ("midi", 2, ConcurrencyPolicy::Forbid));
        assert_eq!(spec.template.location.to_string(), "jobs/midi.yaml:1");

        // The settings are not part of what runs; key order in the file is not either.
        let reordered = "kind: Job\napiVersion: batch/v1\nspec:\n  template:\n    spec:\n      containers: [{image: busybox, name: batch}]\n      restartPolicy: Never\nmetadata:\n  name: midi\n";
        let dir = repo_at_root(&[("jobs/midi.yaml", reordered)]);
        let same = render(dir.path(), "monitoring").unwrap().jobs.remove(0);
        assert_eq!(
            (same.hash.as_str(), same.history_limit, same.concurrency),
            (spec.hash.as_str(), 5, ConcurrencyPolicy::Allow)
        );
        let changed = JOB.replace("busybox", "busybox:1.37");
        let dir = repo_at_root(&[("jobs/midi.yaml", changed.as_str())]);
        assert_ne!(render(dir.path(), "monitoring").unwrap().jobs[0].hash, spec.hash);
    }

    #[test]
    fn bad_job_specs_name_their_file_and_line() {
        let dir = repo_at_root(&[
            ("jobs/a.yaml", format!("{}---\n{}", config_map("x"), JOB.replace("\"2\"", "\"0\"")).as_str()),
            ("jobs/b.yaml", JOB.replace("Forbid", "Sometimes").replace("name: midi", "name: b").as_str()),
            ("jobs/c.yml", JOB.replace("name: midi", &format!("name: {}", "m".repeat(53))).as_str()),
            ("jobs/d.yaml", JOB),
        ]);
        let errors: Vec<String> =
            render(dir.path(), "monitoring").unwrap_err().iter().map(ToString::to_string).collect();
        assert_eq!(
            errors,
            [
                "jobs/a.yaml:1: a job spec must be a batch/v1 Job or a sparkoperator.k8s.io/v1beta2 SparkApplication, found v1 ConfigMap".to_owned(),
                "jobs/a.yaml:6: annotation gitops.scale.dev/history-limit must be a whole number of at least 1, found \"0\"".to_owned(),
                "jobs/b.yaml:1: annotation gitops.scale.dev/concurrency-policy must be Allow, Forbid or Replace, found \"Sometimes\"".to_owned(),
                format!("jobs/c.yml:1: the job name \"{}\" is longer than 52 characters, too long for its runs' names", "m".repeat(53)),
                "jobs/d.yaml:1: Job.batch midi is defined twice: here and at jobs/a.yaml:6".to_owned(),
            ]
        );
    }

    #[test]
    fn non_utf8_files_and_symlinks_out_of_the_repository_are_errors() {
        let dir = repo(&[("ok.yaml", &config_map("a"))]);
        let manifests = dir.path().join("manifests");
        fs::write(manifests.join("latin1.yaml"), b"apiVersion: v1\ndata: {k: caf\xe9}\n").unwrap();
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("x.yaml"), config_map("x")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("x.yaml"), manifests.join("out.yaml")).unwrap();
        std::os::unix::fs::symlink(outside.path(), manifests.join("outdir")).unwrap();
        std::os::unix::fs::symlink("ok.yaml", manifests.join("in.yaml")).unwrap();
        // Back up to the root: walked once, not forever, and manifests/ not twice.
        std::os::unix::fs::symlink("..", manifests.join("loop")).unwrap();

        let errors: Vec<String> =
            render(dir.path(), "monitoring").unwrap_err().iter().map(ToString::to_string).collect();
        let real_outside = outside.path().canonicalize().unwrap();
        assert_eq!(
            errors,
            [
                "manifests/latin1.yaml:2: not UTF-8 text".to_owned(),
                "manifests/ok.yaml:1: ConfigMap a is defined twice: here and at manifests/in.yaml:1".to_owned(),
                format!(
                    "manifests/out.yaml:1: symlink resolves to {}, outside the repository",
                    real_outside.join("x.yaml").display()
                ),
                format!("manifests/outdir:1: symlink resolves to {}, outside the repository", real_outside.display()),
            ]
        );
    }

    #[test]
    fn a_symlink_may_reach_outside_path_but_not_outside_the_repository() {
        // A cluster's directory links the repository's shared dashboards/, as
        // repo-template's clusters/local does.
        let dir = repo_at_root(&[("dashboards/scale/a.json", dashboard("a", "A").as_str())]);
        let cluster = dir.path().join("clusters/local");
        fs::create_dir_all(&cluster).unwrap();
        std::os::unix::fs::symlink("../../dashboards", cluster.join("dashboards")).unwrap();
        let tools = Tools { path_in_repo: "clusters/local".into(), ..Tools::default() };
        let rendered = Renderer::new(tools).render(&cluster, "monitoring", &Capabilities::default()).unwrap();
        assert_eq!(
            summary(&rendered.manifests),
            [("dashboards/scale/a.json:1".into(), "ConfigMap monitoring/dashboard-a".into())]
        );

        // Without the repository around it, the same link leaves the root.
        let errors = render(&cluster, "monitoring").unwrap_err();
        assert!(errors[0].to_string().contains("outside the repository"), "{errors:?}");
    }
}
