//! The charts the local cluster's repository installs, vendored into it.
//!
//! Pods on the local node reach no chart repository (nothing leaves this machine), so
//! `up` copies kube-prometheus-stack from a directory of unpacked charts (`--charts-dir`,
//! as `helm pull --untar` leaves them) into the repository it makes, at
//! [`VENDORED`], with the charts it depends on in its `charts/`, as `helm dependency
//! build` would put them. `clusters/local/charts/monitoring.yaml` renders it from there;
//! `clusters/eks` names the public chart repository instead.

use std::fs;
use std::path::{Path, PathBuf};

use super::Error;

/// The monitoring stack's chart.
pub const MONITORING_CHART: &str = "kube-prometheus-stack";

/// Where the chart goes in the repository, relative to its root.
pub const VENDORED: &str = "vendor/charts";

/// The directory of unpacked charts `up` vendors from when given no `--charts-dir`.
pub fn charts_dir_from_env() -> Option<PathBuf> {
    std::env::var_os("GITOPS_CHARTS_DIR").map(PathBuf::from)
}

/// Copies `charts/kube-prometheus-stack` into `repo/vendor/charts/`, and into its
/// `charts/` every chart of `charts` its Chart.yaml depends on and does not hold.
pub fn vendor(charts: &Path, repo: &Path) -> Result<(), Error> {
    let chart = charts.join(MONITORING_CHART);
    let chart_yaml = chart.join("Chart.yaml");
    let text = fs::read_to_string(&chart_yaml).map_err(|_| Error::Missing {
        what: format!("{}", chart_yaml.display()),
        fix: format!(
            "--charts-dir (or GITOPS_CHARTS_DIR) names a directory holding {MONITORING_CHART} and the charts it \
             depends on, unpacked (`helm pull --untar`): the local cluster's monitoring stack is rendered from it"
        ),
    })?;
    let target = repo.join(VENDORED).join(MONITORING_CHART);
    copy_dir(&chart, &target)?;
    for dependency in dependency_names(&text) {
        let (from, to) = (charts.join(&dependency), target.join("charts").join(&dependency));
        if from.join("Chart.yaml").is_file() && !to.exists() {
            copy_dir(&from, &to)?;
        }
    }
    Ok(())
}

/// The `name:` of each entry of Chart.yaml's `dependencies:` list.
fn dependency_names(chart_yaml: &str) -> Vec<String> {
    chart_yaml
        .lines()
        .skip_while(|line| !line.starts_with("dependencies:"))
        .skip(1)
        .take_while(|line| line.is_empty() || line.starts_with(' ') || line.starts_with('-'))
        .filter_map(|line| line.trim_start().strip_prefix("- name:"))
        .map(|name| name.trim().trim_matches('"').to_owned())
        .collect()
}

fn copy_dir(from: &Path, to: &Path) -> Result<(), Error> {
    fs::create_dir_all(to).map_err(|e| Error::io(to, e))?;
    for entry in fs::read_dir(from).map_err(|e| Error::io(from, e))? {
        let entry = entry.map_err(|e| Error::io(from, e))?;
        let (path, target) = (entry.path(), to.join(entry.file_name()));
        // A chart's own .gitignore leaves its subcharts out of git (kube-prometheus-stack's
        // ignores `charts/*`); vendored, they are what the agent renders from a clone.
        if entry.file_name() == ".gitignore" {
            continue;
        }
        if entry.file_type().map_err(|e| Error::io(&path, e))?.is_dir() {
            copy_dir(&path, &target)?;
        } else {
            fs::copy(&path, &target).map_err(|e| Error::io(&path, e))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn dependencies_are_read_from_chart_yaml() {
        let chart = "name: x\ndependencies:\n  - name: crds\n    version: \"0.0.0\"\n  - name: \"grafana\"\n    \
                     repository: https://example\nkubeVersion: '>=1.19'\n- name: not-a-dependency\n";
        assert_eq!(super::dependency_names(chart), ["crds", "grafana"]);
    }
}
