//! Helm: `charts/**.yaml` chart releases (`gitops.scale.dev/v1` `HelmChart`, one a
//! file), rendered by `helm template` with the cluster's Kubernetes version and API
//! versions, CRDs included. No release Secret is written and no hook runs as a hook:
//! what helm renders is applied, pruned and watched like plain manifests; hooks
//! (`pre-install`, `post-install`, …) are applied with everything else, and chart
//! tests are skipped.
//!
//! A chart from a repository or registry is downloaded once per repo, chart and
//! version into the chart cache, with its digest recorded beside it: a later sync
//! reuses it after checking the digest, and a corrupted or replaced file is fetched
//! again. The download is the only render step with network access.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::decode;
use super::kustomize::line_of;
use super::tool::{Limits, Run, ToolError};
use super::{Location, Problem};

pub const API_VERSION: &str = "gitops.scale.dev/v1";
pub const KIND: &str = "HelmChart";

#[derive(Debug, thiserror::Error)]
pub enum HelmProblem {
    #[error("a chart release must be apiVersion {API_VERSION}, kind {KIND}")]
    NotAHelmChart,
    #[error("missing {0}")]
    Missing(&'static str),
    #[error("{0} must be {1}")]
    Type(&'static str, &'static str),
    #[error("give either spec.path or spec.repo, spec.chart and spec.version")]
    Source,
    #[error("{} resolves outside the repository", .0.display())]
    OutsideRepo(PathBuf),
    #[error("{}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("one chart release a file: found a second document")]
    TwoDocuments,
    #[error("fetching chart {chart} {version}: {error}")]
    Fetch { chart: String, version: String, error: ToolError },
    #[error("helm template: {0}")]
    Template(ToolError),
    #[error("chart cache {}: {source}", path.display())]
    Cache { path: PathBuf, source: std::io::Error },
}

/// Where a chart comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum ChartSource {
    /// An HTTP(S) chart repository, or an OCI registry (`oci://HOST/PATH`); `plain_http`
    /// (`spec.plainHTTP`) for a registry without TLS, such as one on the machine itself.
    Remote { repo: String, chart: String, version: String, plain_http: bool },
    /// A chart directory in the repository, relative to the repository root.
    Path(PathBuf),
}

/// One chart release file.
#[derive(Debug, Clone)]
pub struct Release {
    pub name: String,
    pub namespace: String,
    pub source: ChartSource,
    /// Relative to the repository root.
    pub values_files: Vec<PathBuf>,
    pub values: Map<String, Value>,
    /// The release file, relative to `--path`, and the lines errors point at.
    pub file: PathBuf,
    pub text: String,
}

impl Release {
    /// The line of `field` in the release file.
    pub fn line(&self, field: &str) -> usize {
        line_of(&self.text, &format!("{field}:"))
    }

    pub fn at(&self, field: &str) -> Location {
        Location { file: self.file.clone(), line: self.line(field) }
    }
}

/// Reads a release file; `root` is `--path`, `repo` the repository root.
pub fn release(root: &Path, repo: &Path, file: &Path, text: String) -> Result<Release, Vec<(Location, Problem)>> {
    let at = |line| Location { file: file.to_owned(), line };
    let mut documents = decode::documents(&text).into_iter();
    let document = match documents.next() {
        Some(Ok(document)) => document,
        Some(Err(e)) => return Err(vec![(at(e.line), e.error.into())]),
        None => return Err(vec![(at(1), HelmProblem::NotAHelmChart.into())]),
    };
    if let Some(second) = documents.find_map(Result::ok) {
        return Err(vec![(at(second.line), HelmProblem::TwoDocuments.into())]);
    }
    let value = document.value;
    let line = |field: &str| line_of(&text, &format!("{field}:"));
    let mut errors: Vec<(Location, Problem)> = Vec::new();
    if value["apiVersion"] != API_VERSION || value["kind"] != KIND {
        return Err(vec![(at(document.line), HelmProblem::NotAHelmChart.into())]);
    }
    let mut string = |pointer: &str, field: &'static str| -> Option<String> {
        match value.pointer(pointer) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
            Some(_) => {
                errors.push((
                    at(line(field.rsplit('.').next().unwrap_or(field))),
                    HelmProblem::Type(field, "a string").into(),
                ));
                None
            }
        }
    };
    let name = string("/metadata/name", "metadata.name");
    let namespace = string("/metadata/namespace", "metadata.namespace");
    let path = string("/spec/path", "spec.path");
    let repo_url = string("/spec/repo", "spec.repo");
    let chart = string("/spec/chart", "spec.chart");
    let version = string("/spec/version", "spec.version");
    let inside = |relative: &str, field: &str, errors: &mut Vec<(Location, Problem)>| -> Option<PathBuf> {
        let joined = root.join(relative);
        match (joined.canonicalize(), repo.canonicalize()) {
            (Ok(real), Ok(real_repo)) => match real.strip_prefix(&real_repo) {
                Ok(inside) => Some(inside.to_owned()),
                Err(_) => {
                    errors.push((at(line_of(&text, relative)), HelmProblem::OutsideRepo(real).into()));
                    None
                }
            },
            (Err(e), _) | (_, Err(e)) => {
                errors.push((
                    at(line_of(&text, relative).max(line(field))),
                    HelmProblem::Read { path: relative.into(), source: e }.into(),
                ));
                None
            }
        }
    };
    let source = match (path, repo_url, chart, version) {
        (Some(path), None, None, None) => inside(&path, "path", &mut errors).map(ChartSource::Path),
        (None, Some(repo), Some(chart), Some(version)) => {
            let plain_http = match value.pointer("/spec/plainHTTP") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(plain)) => *plain,
                Some(_) => {
                    errors.push((at(line("plainHTTP")), HelmProblem::Type("spec.plainHTTP", "true or false").into()));
                    false
                }
            };
            Some(ChartSource::Remote { repo, chart, version, plain_http })
        }
        _ => {
            errors.push((at(line("spec")), HelmProblem::Source.into()));
            None
        }
    };
    let mut values_files = Vec::new();
    match value.pointer("/spec/valuesFiles") {
        None | Some(Value::Null) => {}
        Some(Value::Array(files)) => {
            for file in files {
                match file.as_str() {
                    Some(file) => values_files.extend(inside(file, "valuesFiles", &mut errors)),
                    None => errors.push((
                        at(line("valuesFiles")),
                        HelmProblem::Type("spec.valuesFiles", "a list of paths").into(),
                    )),
                }
            }
        }
        Some(_) => {
            errors.push((at(line("valuesFiles")), HelmProblem::Type("spec.valuesFiles", "a list of paths").into()))
        }
    }
    let values = match value.pointer("/spec/values") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(values)) => values.clone(),
        Some(_) => {
            errors.push((at(line("values")), HelmProblem::Type("spec.values", "a mapping").into()));
            Map::new()
        }
    };
    if name.is_none() {
        errors.push((at(document.line), HelmProblem::Missing("metadata.name").into()));
    }
    if namespace.is_none() {
        errors.push((at(document.line), HelmProblem::Missing("metadata.namespace").into()));
    }
    match (name, namespace, source) {
        (Some(name), Some(namespace), Some(source)) if errors.is_empty() => {
            Ok(Release { name, namespace, source, values_files, values, file: file.to_owned(), text })
        }
        _ => Err(errors),
    }
}

/// What `helm template` is told about the cluster, so `.Capabilities` in templates
/// sees the real one.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Capabilities {
    /// `v1.37.2`; `None`: helm's default.
    pub kube_version: Option<String>,
    /// Every `GROUP/VERSION` and `GROUP/VERSION/Kind` the API server serves.
    pub api_versions: Vec<String>,
}

/// Credentials for chart repositories and registries, from a mounted Secret directory
/// (`username`, `password`).
#[derive(Clone, Default)]
pub struct ChartCredentials {
    pub username: Option<String>,
    pub password: Option<String>,
}

impl std::fmt::Debug for ChartCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChartCredentials").field("username", &self.username).field("password", &"***").finish()
    }
}

impl ChartCredentials {
    pub fn from_secret_dir(dir: &Path) -> std::io::Result<ChartCredentials> {
        let read = |name: &str| match fs::read_to_string(dir.join(name)) {
            Ok(text) => Ok(Some(text.trim_end_matches(['\r', '\n']).to_owned())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        };
        Ok(ChartCredentials { username: read("username")?, password: read("password")? })
    }

    /// Username and password, when both are given.
    fn pair(&self) -> Option<(&str, &str)> {
        Some((self.username.as_deref()?, self.password.as_deref()?))
    }

    fn secrets(&self) -> Vec<&str> {
        self.password.as_deref().into_iter().collect()
    }
}

/// The helm binary and where it keeps charts and its own state.
#[derive(Debug, Clone)]
pub struct Helm<'a> {
    pub bin: &'a Path,
    pub cache: &'a Path,
    pub limits: &'a Limits,
    pub credentials: &'a ChartCredentials,
}

impl Helm<'_> {
    /// The variables helm sees: its state under the cache, nothing of the agent's.
    fn env(&self) -> Vec<(&'static str, OsString)> {
        let home = self.cache.join("helm-home");
        vec![
            ("HOME", home.clone().into()),
            ("HELM_CACHE_HOME", home.join("cache").into()),
            ("HELM_CONFIG_HOME", home.join("config").into()),
            ("HELM_DATA_HOME", home.join("data").into()),
        ]
    }

    /// The chart archive of a remote source, from the cache or downloaded into it.
    /// Returns the archive and its digest; `fetched` says whether it was downloaded.
    pub fn chart(
        &self,
        repo: &str,
        chart: &str,
        version: &str,
        plain_http: bool,
    ) -> Result<(PathBuf, String, bool), HelmProblem> {
        let key = hex::encode(&Sha256::digest(format!("{repo}\0{chart}\0{version}"))[..16]);
        let dir = self.cache.join("charts").join(format!("{chart}-{version}-{key}"));
        let archive = dir.join("chart.tgz");
        let digest_file = dir.join("digest");
        if let (Ok(bytes), Ok(recorded)) = (fs::read(&archive), fs::read_to_string(&digest_file)) {
            let digest = hex::encode(Sha256::digest(&bytes));
            if digest == recorded.trim() {
                return Ok((archive, digest, false));
            }
        }
        let cache_error = |path: &Path| {
            let path = path.to_owned();
            move |source| HelmProblem::Cache { path, source }
        };
        let staging = dir.with_extension("partial");
        let _ = fs::remove_dir_all(&staging);
        fs::create_dir_all(&staging).map_err(cache_error(&staging))?;
        let fetch_error = |error| HelmProblem::Fetch { chart: chart.to_owned(), version: version.to_owned(), error };
        let secrets = self.credentials.secrets();
        let plain: Option<OsString> = plain_http.then(|| "--plain-http".into());
        let mut args: Vec<OsString> = vec!["pull".into()];
        if let Some(registry) = repo.strip_prefix("oci://") {
            if let Some((user, password)) = self.credentials.pair() {
                // Logged in through stdin; helm keeps it in its registry config, in the cache.
                let host = registry.split('/').next().unwrap_or(registry);
                let login: Vec<OsString> = ["registry", "login", host, "--username", user, "--password-stdin"]
                    .into_iter()
                    .map(OsString::from)
                    .chain(plain.clone())
                    .collect();
                let run = Run { program: self.bin, args: login, dir: &staging, env: self.env(), stdin: Some(password) };
                run.output(self.limits, &secrets).map_err(fetch_error)?;
            }
            args.push(format!("{}/{chart}", repo.trim_end_matches('/')).into());
        } else if let Some((user, password)) = self.credentials.pair() {
            // A repository named for its URL, added through stdin, then pulled by name.
            let name = format!("gitops-{}", &hex::encode(Sha256::digest(repo))[..12]);
            let add: Vec<OsString> =
                ["repo", "add", &name, repo, "--username", user, "--password-stdin", "--force-update"]
                    .into_iter()
                    .map(OsString::from)
                    .collect();
            let run = Run { program: self.bin, args: add, dir: &staging, env: self.env(), stdin: Some(password) };
            run.output(self.limits, &secrets).map_err(fetch_error)?;
            args.push(format!("{name}/{chart}").into());
        } else {
            args.extend([chart.into(), "--repo".into(), repo.into()]);
        }
        args.extend(["--version".into(), version.into(), "--destination".into(), staging.clone().into()]);
        args.extend(plain);
        let run = Run { program: self.bin, args, dir: &staging, env: self.env(), stdin: None };
        run.output(self.limits, &secrets).map_err(fetch_error)?;
        let pulled = fs::read_dir(&staging)
            .map_err(cache_error(&staging))?
            .flatten()
            .map(|entry| entry.path())
            .find(|path| path.extension().is_some_and(|ext| ext == "tgz"))
            .ok_or_else(|| HelmProblem::Cache {
                path: staging.clone(),
                source: std::io::Error::other("helm pull wrote no archive"),
            })?;
        let bytes = fs::read(&pulled).map_err(cache_error(&pulled))?;
        let digest = hex::encode(Sha256::digest(&bytes));
        fs::rename(&pulled, staging.join("chart.tgz")).map_err(cache_error(&pulled))?;
        fs::write(staging.join("digest"), &digest).map_err(cache_error(&staging))?;
        let _ = fs::remove_dir_all(&dir);
        fs::rename(&staging, &dir).map_err(cache_error(&dir))?;
        Ok((archive, digest, true))
    }

    /// `helm template` of `release` from `chart` (an archive or a directory).
    pub fn template(
        &self,
        release: &Release,
        chart: &Path,
        repo: &Path,
        capabilities: &Capabilities,
    ) -> Result<String, HelmProblem> {
        let work = tempfile::tempdir().map_err(|e| HelmProblem::Cache { path: std::env::temp_dir(), source: e })?;
        let mut args: Vec<OsString> = vec![
            "template".into(),
            release.name.clone().into(),
            chart.into(),
            "--namespace".into(),
            release.namespace.clone().into(),
            "--include-crds".into(),
            "--skip-tests".into(),
        ];
        if let ChartSource::Remote { version, .. } = &release.source {
            args.extend(["--version".into(), version.into()]);
        }
        if let Some(kube_version) = &capabilities.kube_version {
            args.extend(["--kube-version".into(), kube_version.into()]);
        }
        if !capabilities.api_versions.is_empty() {
            args.extend(["--api-versions".into(), capabilities.api_versions.join(",").into()]);
        }
        for file in &release.values_files {
            args.extend(["--values".into(), repo.join(file).into()]);
        }
        if !release.values.is_empty() {
            let inline = work.path().join("values.json");
            let json = serde_json::to_vec(&release.values).expect("JSON values serialize");
            fs::write(&inline, json).map_err(|e| HelmProblem::Cache { path: inline.clone(), source: e })?;
            args.extend(["--values".into(), inline.into()]);
        }
        let run = Run { program: self.bin, args, dir: work.path(), env: self.env(), stdin: None };
        run.output(self.limits, &[]).map_err(|error| {
            HelmProblem::Template(match error {
                ToolError::Failed { program, message } => {
                    // Paths in the checkout and the cache say nothing to the user.
                    let message = message
                        .replace(&format!("{}/", repo.display()), "")
                        .replace(&format!("{}/", work.path().display()), "")
                        .to_owned();
                    ToolError::Failed { program, message }
                }
                other => other,
            })
        })
    }
}

/// The cache key of a release's render: everything that reaches `helm template`.
pub fn render_key(
    helm: &Path,
    release: &Release,
    chart_digest: &str,
    repo: &Path,
    capabilities: &Capabilities,
) -> String {
    let mut hash = Sha256::new();
    let values = serde_json::to_string(&release.values).expect("JSON values serialize");
    for part in [
        helm.as_os_str().as_encoded_bytes(),
        release.name.as_bytes(),
        release.namespace.as_bytes(),
        chart_digest.as_bytes(),
        values.as_bytes(),
        capabilities.kube_version.as_deref().unwrap_or_default().as_bytes(),
        capabilities.api_versions.join(",").as_bytes(),
    ] {
        hash.update(part);
        hash.update([0]);
    }
    for file in &release.values_files {
        hash.update(file.as_os_str().as_encoded_bytes());
        hash.update([0]);
        hash.update(fs::read(repo.join(file)).unwrap_or_default());
        hash.update([0]);
    }
    hex::encode(hash.finalize())
}

/// A digest of a chart directory in the repository: every file, by path and content.
pub fn tree_digest(dir: &Path) -> String {
    let mut files = Vec::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(relative) = pending.pop() {
        let Ok(entries) = fs::read_dir(dir.join(&relative)) else { continue };
        for entry in entries.flatten() {
            let path = relative.join(entry.file_name());
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                pending.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files.sort();
    let mut hash = Sha256::new();
    for file in files {
        hash.update(file.as_os_str().as_encoded_bytes());
        hash.update([0]);
        hash.update(fs::read(dir.join(&file)).unwrap_or_default());
        hash.update([0]);
    }
    hex::encode(hash.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Release, Vec<String>> {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("values")).unwrap();
        fs::write(dir.path().join("values/a.yaml"), "x: 1\n").unwrap();
        release(dir.path(), dir.path(), Path::new("charts/m.yaml"), text.to_owned())
            .map_err(|errors| errors.into_iter().map(|(at, problem)| format!("{at}: {problem}")).collect())
    }

    #[test]
    fn a_release_from_a_repository() {
        let release = parse("apiVersion: gitops.scale.dev/v1\nkind: HelmChart\nmetadata:\n  name: monitoring\n  namespace: monitoring\nspec:\n  repo: http://127.0.0.1:1/charts\n  chart: kube-prometheus-stack\n  version: 88.5.3\n  valuesFiles: [values/a.yaml]\n  values: {grafana: {enabled: false}}\n").unwrap();
        assert_eq!((release.name.as_str(), release.namespace.as_str()), ("monitoring", "monitoring"));
        assert_eq!(
            release.source,
            ChartSource::Remote {
                repo: "http://127.0.0.1:1/charts".into(),
                chart: "kube-prometheus-stack".into(),
                version: "88.5.3".into(),
                plain_http: false,
            }
        );
        assert_eq!(release.values_files, [PathBuf::from("values/a.yaml")]);
        assert_eq!(release.line("version"), 9);
    }

    #[test]
    fn bad_releases_name_the_line() {
        let errors = parse("apiVersion: gitops.scale.dev/v1\nkind: HelmChart\nmetadata:\n  name: m\nspec:\n  chart: x\n  values: [1]\n  valuesFiles: [nope.yaml]\n").unwrap_err();
        assert_eq!(errors.len(), 4, "{errors:?}");
        assert_eq!(errors[0], "charts/m.yaml:5: give either spec.path or spec.repo, spec.chart and spec.version");
        assert!(errors[1].starts_with("charts/m.yaml:8: nope.yaml: "), "{errors:?}");
        assert_eq!(errors[2], "charts/m.yaml:7: spec.values must be a mapping");
        assert_eq!(errors[3], "charts/m.yaml:1: missing metadata.namespace");
        let errors = parse("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n").unwrap_err();
        assert_eq!(errors, ["charts/m.yaml:1: a chart release must be apiVersion gitops.scale.dev/v1, kind HelmChart"]);
    }
}
