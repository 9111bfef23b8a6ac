//! Grafana dashboards (`dashboards/**.json`) → the ConfigMaps that deliver them.
//!
//! Grafana's dashboard sidecar (as kube-prometheus-stack deploys it) loads every
//! ConfigMap labelled `grafana_dashboard: "1"` and files it in the folder its
//! `grafana_folder` annotation names. So a dashboard becomes one ConfigMap, named
//! from its `uid` (which Grafana keys dashboards by, so renaming the file keeps it the
//! same dashboard), with the folder taken from its subdirectory of `dashboards/`.

use std::collections::HashMap;
use std::path::{Component, Path};

use serde_json::{Value, json};

use super::{Location, Manifest, Problem, required_str};

/// The sidecar's label: ConfigMaps carrying it hold dashboards.
pub const DASHBOARD_LABEL: &str = "grafana_dashboard";
/// The sidecar's annotation naming the Grafana folder.
pub const FOLDER_ANNOTATION: &str = "grafana_folder";
/// What a ConfigMap's data may hold in all.
const MAX_DATA_BYTES: usize = 1024 * 1024;
/// Grafana's own limit on a uid.
const MAX_UID_CHARS: usize = 40;

#[derive(Debug, thiserror::Error)]
pub enum DashboardProblem {
    #[error("the dashboard must be a JSON object, found {0}")]
    NotAnObject(&'static str),
    #[error("uid {0:?} must be 1 to {MAX_UID_CHARS} letters, digits, '-', '_' or '.'")]
    Uid(String),
    #[error("uid {uid:?} gives ConfigMap {name}, as does the dashboard at {first}")]
    DuplicateUid { uid: String, name: String, first: Location },
    #[error("the dashboard is {0} bytes; a ConfigMap holds at most {MAX_DATA_BYTES} (1 MiB)")]
    TooLarge(usize),
}

/// The ConfigMap names given so far, and where.
#[derive(Default)]
pub(super) struct Uids(HashMap<String, Location>);

/// The ConfigMap for the dashboard `file` (relative to the repository root, so under
/// `dashboards/`) holding `text`; or the line and the problem.
pub(super) fn config_map(
    file: &Path,
    text: &str,
    namespace: &str,
    uids: &mut Uids,
) -> Result<Manifest, (usize, Problem)> {
    let dashboard: Value = serde_json::from_str(text).map_err(|e| (e.line().max(1), Problem::Json(e.to_string())))?;
    let Value::Object(fields) = &dashboard else {
        return Err((1, DashboardProblem::NotAnObject(super::json_type(&dashboard)).into()));
    };
    let uid = required_str(fields, "uid").map_err(|p| (1, p))?;
    required_str(fields, "title").map_err(|p| (1, p))?;
    if uid.len() > MAX_UID_CHARS || !uid.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) {
        return Err((1, DashboardProblem::Uid(uid.to_owned()).into()));
    }
    let key = format!("{uid}.json");
    if key.len() + text.len() > MAX_DATA_BYTES {
        return Err((1, DashboardProblem::TooLarge(text.len()).into()));
    }
    // Object names are lower case; Grafana uids need not be.
    let name = format!("dashboard-{}", uid.to_ascii_lowercase().replace('_', "-"));
    let location = Location { file: file.to_owned(), line: 1 };
    if let Some(first) = uids.0.get(&name) {
        let problem = DashboardProblem::DuplicateUid { uid: uid.to_owned(), name, first: first.clone() };
        return Err((1, problem.into()));
    }
    uids.0.insert(name.clone(), location.clone());

    let mut metadata = json!({
        "name": name,
        "namespace": namespace,
        "labels": { DASHBOARD_LABEL: "1" },
    });
    if let Some(folder) = folder(file) {
        metadata["annotations"] = json!({ FOLDER_ANNOTATION: folder });
    }
    let object = json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata,
        "data": { key: text },
    });
    Ok(Manifest::new(object, location))
}

/// The subdirectory of `dashboards/` holding `file`: `dashboards/team/a.json` →
/// `team`; `None` at the top, which Grafana files under General.
fn folder(file: &Path) -> Option<String> {
    let dir = file.parent()?.strip_prefix("dashboards").ok()?;
    let parts: Vec<_> = dir
        .components()
        .filter_map(|c| match c {
            Component::Normal(part) => part.to_str(),
            _ => None,
        })
        .collect();
    (!parts.is_empty()).then(|| parts.join("/"))
}
