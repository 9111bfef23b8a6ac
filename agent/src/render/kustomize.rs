//! Kustomize: a directory holding a kustomization is rendered as a whole by
//! `kustomize build`, as `kubectl kustomize DIR` renders it.
//!
//! Before kustomize runs, the kustomization and every one it includes (through
//! `resources`, `bases`, `components`, `crds`) are read here: an entry that names no
//! file in the checkout is refused (kustomize would take it for a remote base and clone
//! it: nothing outside the commit is fetched behind the user's back), and so is one that
//! resolves outside the repository. The files of those directories are the render's
//! inputs: kustomize's default load restrictor reads patches and generator files only
//! inside a kustomization's own directory, so their hash is the cache key.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Component, Path, PathBuf};

use serde_json::Value;
use sha2::{Digest, Sha256};

use super::decode;
use super::tool::{Limits, Run, ToolError};
use super::{Location, Problem};

/// The file names kustomize accepts for a kustomization, in the order it looks.
pub const KUSTOMIZATION_FILES: [&str; 3] = ["kustomization.yaml", "kustomization.yml", "Kustomization"];

#[derive(Debug, thiserror::Error)]
pub enum KustomizeProblem {
    #[error("{0:?} is a remote base; only paths in the repository are rendered (vendor it into the repository)")]
    Remote(String),
    #[error("{entry:?} does not exist ({field})")]
    Missing { entry: String, field: &'static str },
    #[error("{entry:?} resolves to {}, outside the repository", resolved.display())]
    OutsideRepo { entry: String, resolved: PathBuf },
    #[error("{entry:?} in {field} is a URL; only files in the repository are read")]
    RemoteFile { entry: String, field: &'static str },
    #[error("`{field}` must be a list of paths")]
    NotAList { field: &'static str },
    #[error("helmCharts in a kustomization are not rendered; put the release in charts/ instead")]
    HelmCharts,
    #[error("the kustomization must be a mapping")]
    NotAMapping,
    #[error("kustomize: {0}")]
    Tool(ToolError),
}

/// The kustomization file in `dir`, if it has one.
pub fn kustomization_file(dir: &Path) -> Option<PathBuf> {
    KUSTOMIZATION_FILES.iter().map(|name| dir.join(name)).find(|path| path.is_file())
}

/// The fields whose entries are other kustomizations or resource files.
const PATH_FIELDS: [&str; 4] = ["resources", "bases", "components", "crds"];

/// One kustomization's render inputs, found before kustomize runs.
#[derive(Debug)]
pub struct Inputs {
    /// The directories included, the rendered one first, relative to the repository.
    pub dirs: BTreeSet<PathBuf>,
    /// Resource files named one by one, relative to the repository.
    pub files: BTreeSet<PathBuf>,
}

/// Reads the kustomization in `dir` (relative to `repo`) and all it includes.
/// Every problem is one error at the kustomization file and line that names it.
pub fn inputs(repo: &Path, dir: &Path) -> Result<Inputs, Vec<(Location, Problem)>> {
    let real_repo = repo.canonicalize().map_err(|e| vec![(at(dir, 1), Problem::Read(e))])?;
    let mut found = Inputs { dirs: BTreeSet::new(), files: BTreeSet::new() };
    let mut errors = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(dir) = pending.pop() {
        if !found.dirs.insert(dir.clone()) {
            continue;
        }
        let Some(file) = kustomization_file(&repo.join(&dir)) else {
            // kustomize says what is missing in its own words.
            continue;
        };
        let relative_file = file.strip_prefix(repo).unwrap_or(&file).to_owned();
        let text = match fs::read_to_string(&file) {
            Ok(text) => text,
            Err(e) => {
                errors.push((at(&relative_file, 1), Problem::Read(e)));
                continue;
            }
        };
        let value = match decode::documents(&text).into_iter().next() {
            Some(Ok(document)) => document.value,
            Some(Err(e)) => {
                errors.push((at(&relative_file, e.line), e.error.into()));
                continue;
            }
            None => Value::Null,
        };
        let object = match value {
            Value::Object(object) => object,
            Value::Null => continue,
            _ => {
                errors.push((at(&relative_file, 1), KustomizeProblem::NotAMapping.into()));
                continue;
            }
        };
        if object.contains_key("helmCharts") {
            errors.push((at(&relative_file, line_of(&text, "helmCharts")), KustomizeProblem::HelmCharts.into()));
        }
        for (field, entry) in file_entries(&object) {
            // kustomize fetches a URL in any of these itself, past its load restrictor.
            if entry.contains("://") {
                let here = at(&relative_file, line_of(&text, entry));
                errors.push((here, KustomizeProblem::RemoteFile { entry: entry.to_owned(), field }.into()));
            }
        }
        for field in PATH_FIELDS {
            let entries = match object.get(field) {
                None | Some(Value::Null) => continue,
                Some(Value::Array(entries)) => entries,
                Some(_) => {
                    errors
                        .push((at(&relative_file, line_of(&text, field)), KustomizeProblem::NotAList { field }.into()));
                    continue;
                }
            };
            for entry in entries {
                let Some(entry) = entry.as_str() else {
                    errors
                        .push((at(&relative_file, line_of(&text, field)), KustomizeProblem::NotAList { field }.into()));
                    continue;
                };
                let here = at(&relative_file, line_of(&text, entry));
                match resolve(repo, &real_repo, &dir, entry, field) {
                    Ok(Resolved::Dir(included)) => pending.push(included),
                    Ok(Resolved::File(included)) => {
                        found.files.insert(included);
                    }
                    Err(problem) => errors.push((here, problem.into())),
                }
            }
        }
    }
    if errors.is_empty() { Ok(found) } else { Err(errors) }
}

/// Every file a kustomization names outside [`PATH_FIELDS`]: patches, generator
/// sources, transformer and OpenAPI files, with the field naming them.
fn file_entries(object: &serde_json::Map<String, Value>) -> Vec<(&'static str, &str)> {
    let mut found = Vec::new();
    for field in ["patchesStrategicMerge", "configurations", "generators", "transformers", "validators"] {
        found.extend(strings(object.get(field)).into_iter().map(|entry| (field, entry)));
    }
    for field in ["patches", "patchesJson6902", "replacements"] {
        for item in object.get(field).and_then(Value::as_array).into_iter().flatten() {
            found.extend(strings(item.get("path")).into_iter().map(|entry| (field, entry)));
        }
    }
    found.extend(strings(object.get("openapi").and_then(|o| o.get("path"))).into_iter().map(|e| ("openapi", e)));
    for field in ["configMapGenerator", "secretGenerator"] {
        for item in object.get(field).and_then(Value::as_array).into_iter().flatten() {
            for key in ["files", "envs", "env"] {
                // `files` entries may be `KEY=PATH`.
                let paths = strings(item.get(key)).into_iter().map(|e| e.split_once('=').map_or(e, |(_, path)| path));
                found.extend(paths.map(|entry| (field, entry)));
            }
        }
    }
    found
}

/// A string, or the strings of a list.
fn strings(value: Option<&Value>) -> Vec<&str> {
    match value {
        Some(Value::String(s)) => vec![s.as_str()],
        Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    }
}

enum Resolved {
    Dir(PathBuf),
    File(PathBuf),
}

fn resolve(
    repo: &Path,
    real_repo: &Path,
    dir: &Path,
    entry: &str,
    field: &'static str,
) -> Result<Resolved, KustomizeProblem> {
    let path = repo.join(dir).join(entry);
    let Ok(real) = path.canonicalize() else {
        return Err(if is_remote(entry) {
            KustomizeProblem::Remote(entry.to_owned())
        } else {
            KustomizeProblem::Missing { entry: entry.to_owned(), field }
        });
    };
    let Ok(relative) = real.strip_prefix(real_repo) else {
        return Err(KustomizeProblem::OutsideRepo { entry: entry.to_owned(), resolved: real });
    };
    let relative = if relative.as_os_str().is_empty() { PathBuf::from(".") } else { relative.to_owned() };
    Ok(if real.is_dir() { Resolved::Dir(relative) } else { Resolved::File(relative) })
}

/// What kustomize would try to fetch: a URL, an scp-like git address, or its
/// `host/org/repo//path?ref=` form.
fn is_remote(entry: &str) -> bool {
    entry.contains("://")
        || entry.starts_with("git@")
        || entry.starts_with("git::")
        || entry.contains("?ref=")
        || entry.contains("//")
        || entry.split_once('/').is_some_and(|(host, _)| host.contains('.') && !host.starts_with('.'))
}

/// The line of the first occurrence of `needle` in `text` (1 when it is not there).
pub(crate) fn line_of(text: &str, needle: &str) -> usize {
    text.find(needle).map(|offset| 1 + text[..offset].matches('\n').count()).unwrap_or(1)
}

fn at(file: &Path, line: usize) -> Location {
    Location { file: file.to_owned(), line }
}

impl Inputs {
    /// The cache key: every file of the included directories and every named file,
    /// by path and content, and the kustomize binary that renders them.
    pub fn key(&self, repo: &Path, kustomize: &Path) -> String {
        let mut hash = Sha256::new();
        hash.update(kustomize.as_os_str().as_encoded_bytes());
        let mut files: BTreeSet<PathBuf> = self.files.clone();
        for dir in &self.dirs {
            collect_files(repo, dir, &mut files);
        }
        for file in files {
            hash.update([0]);
            hash.update(file.as_os_str().as_encoded_bytes());
            hash.update([0]);
            // An unreadable file still changes the key by being absent.
            hash.update(fs::read(repo.join(&file)).unwrap_or_default());
        }
        hex::encode(hash.finalize())
    }
}

/// Every file under `dir` (relative to `repo`), recursively; symlinks are followed as
/// kustomize follows them.
fn collect_files(repo: &Path, dir: &Path, files: &mut BTreeSet<PathBuf>) {
    let Ok(entries) = fs::read_dir(repo.join(dir)) else { return };
    for entry in entries.flatten() {
        let relative = dir.join(entry.file_name());
        let path = repo.join(&relative);
        if path.is_dir() {
            // A symlink back up would loop; kustomize cannot load past the repo either.
            if !fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink()) {
                collect_files(repo, &relative, files);
            }
        } else {
            files.insert(normalize(&relative));
        }
    }
}

fn normalize(path: &Path) -> PathBuf {
    path.components().filter(|c| !matches!(c, Component::CurDir)).collect()
}

/// Runs `kustomize build DIR` for the kustomization in `dir` (relative to `repo`).
pub fn build(kustomize: &Path, limits: &Limits, repo: &Path, dir: &Path) -> Result<String, KustomizeProblem> {
    let run = Run {
        program: kustomize,
        args: vec!["build".into(), repo.join(dir).into_os_string()],
        dir: repo,
        env: Vec::new(),
        stdin: None,
    };
    run.output(limits, &[]).map_err(|error| match error {
        // Its messages name absolute paths inside the checkout; the repository's are shorter.
        ToolError::Failed { program, message } => {
            let prefix = format!("{}/", repo.display());
            let message = message.replace(&prefix, "");
            KustomizeProblem::Tool(ToolError::Failed { program, message })
        }
        other => KustomizeProblem::Tool(other),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::render::tests::repo_at_root as repo;

    fn errors(dir: &tempfile::TempDir, kustomization: &str) -> Vec<String> {
        inputs(dir.path(), Path::new(kustomization))
            .unwrap_err()
            .into_iter()
            .map(|(at, problem)| format!("{at}: {problem}"))
            .collect()
    }

    #[test]
    fn inputs_follow_bases_and_components_inside_the_repository() {
        let dir = repo(&[
            ("base/kustomization.yaml", "resources: [cm.yaml]\n"),
            ("base/cm.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n"),
            ("components/extra/kustomization.yaml", "kind: Component\n"),
            ("clusters/local/kustomization.yaml", "resources:\n- ../../base\ncomponents:\n- ../../components/extra\n"),
        ]);
        let found = inputs(dir.path(), Path::new("clusters/local")).unwrap();
        let dirs: Vec<&str> = found.dirs.iter().map(|d| d.to_str().unwrap()).collect();
        assert_eq!(dirs, ["base", "clusters/local", "components/extra"]);
        let before = found.key(dir.path(), Path::new("kustomize"));
        fs::write(dir.path().join("base/cm.yaml"), "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: b}\n").unwrap();
        assert_ne!(found.key(dir.path(), Path::new("kustomize")), before, "a base's change changes the key");
    }

    #[test]
    fn urls_in_patches_and_generators_are_refused_at_their_line() {
        let kustomization = "patches:\n- path: https://example.com/patch.yaml\nconfigMapGenerator:\n- name: x\n  files:\n  - local.txt\n  - key=http://example.com/f\ncommonAnnotations:\n  docs: https://example.com/ok\n";
        let dir = repo(&[("app/kustomization.yaml", kustomization)]);
        assert_eq!(
            errors(&dir, "app"),
            [
                "app/kustomization.yaml:2: \"https://example.com/patch.yaml\" in patches is a URL; only files in the repository are read",
                "app/kustomization.yaml:7: \"http://example.com/f\" in configMapGenerator is a URL; only files in the repository are read",
            ]
        );
    }

    #[test]
    fn remote_missing_and_outside_entries_are_refused_at_their_line() {
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("kustomization.yaml"), "resources: []\n").unwrap();
        let kustomization = format!(
            "resources:\n- github.com/kubernetes-sigs/kustomize//examples/helloWorld?ref=v5.7.1\n- https://example.com/x.yaml\n- ../gone\n- {}\n",
            outside.path().display()
        );
        let dir = repo(&[("app/kustomization.yaml", &kustomization)]);
        let real = outside.path().canonicalize().unwrap();
        assert_eq!(
            errors(&dir, "app"),
            [
                "app/kustomization.yaml:2: \"github.com/kubernetes-sigs/kustomize//examples/helloWorld?ref=v5.7.1\" is a remote base; only paths in the repository are rendered (vendor it into the repository)".to_owned(),
                "app/kustomization.yaml:3: \"https://example.com/x.yaml\" is a remote base; only paths in the repository are rendered (vendor it into the repository)".to_owned(),
                "app/kustomization.yaml:4: \"../gone\" does not exist (resources)".to_owned(),
                format!("app/kustomization.yaml:5: {:?} resolves to {}, outside the repository", outside.path().display().to_string(), real.display()),
            ]
        );
    }
}
