//! The monitoring stack each cluster of repo-template installs, as the agent renders it
//! (no node needed): kube-prometheus-stack from the copy `up` vendors (local) or from a
//! chart repository (EKS, here one on 127.0.0.1 serving the same public chart).
//!
//! - Local: every container image, and every image the operator will start
//!   (Prometheus, Alertmanager, the config reloader), comes from the node's registry
//!   with the content tags `up` filled in, so nothing is pulled from the internet;
//!   Prometheus is told the version its image runs; Grafana is off.
//! - Both: the Prometheus that the chart makes selects the agent's and the viewer's
//!   ServiceMonitors and the agent's PrometheusRule from `manifests/monitoring/`.
//! - EKS: Grafana's dashboard sidecar loads the ConfigMaps the agent makes of
//!   `dashboards/` (their label, in any namespace, their folder annotation), and the
//!   Scale dashboards' PostgreSQL data source is provisioned.
//!
//! The stack running on the node, and its alert firing, is `scale_e2e`'s.

use std::collections::BTreeMap;
use std::path::Path;

use gitops_agent::render::{Capabilities, Manifest, Renderer};
use gitops_tests::render::{serve_eks_charts, template_repository, template_tag, tools};
use serde_json::Value;

const REGISTRY: &str = "127.0.0.1:5999";

fn render(repo: &Path, cluster: &str, cache: &Path) -> Vec<Manifest> {
    // As the agent runs with `--path clusters/CLUSTER`: the overlays reach out of it.
    let path_in_repo = Path::new("clusters").join(cluster);
    let renderer = Renderer::new(gitops_agent::render::Tools { path_in_repo, ..tools(cache) });
    let rendered = renderer
        .render(&repo.join("clusters").join(cluster), "monitoring", &Capabilities::default())
        .unwrap_or_else(|e| panic!("clusters/{cluster}: {e:#?}"));
    rendered.manifests
}

fn of_kind<'a>(manifests: &'a [Manifest], kind: &str) -> Vec<&'a Value> {
    manifests.iter().map(|m| &m.object).filter(|o| o["kind"] == kind).collect()
}

fn labels(object: &Value) -> BTreeMap<String, String> {
    serde_json::from_value(object["metadata"]["labels"].clone()).unwrap_or_default()
}

/// The one Prometheus selects the ServiceMonitors and the PrometheusRule from git.
fn assert_prometheus_selects_what_git_holds(manifests: &[Manifest]) {
    let [prometheus] = of_kind(manifests, "Prometheus")[..] else { panic!("one Prometheus") };
    let selects = |selector: &str, object: &Value| {
        let wanted: BTreeMap<String, String> =
            serde_json::from_value(prometheus["spec"][selector]["matchLabels"].clone()).unwrap();
        let have = labels(object);
        wanted.iter().all(|(key, value)| have.get(key) == Some(value))
    };
    let monitors: Vec<&str> = of_kind(manifests, "ServiceMonitor")
        .into_iter()
        .filter(|m| selects("serviceMonitorSelector", m))
        .map(|m| m["metadata"]["name"].as_str().unwrap())
        .collect();
    for name in ["gitops-agent", "viewer"] {
        assert!(monitors.contains(&name), "ServiceMonitor {name} selected: {monitors:?}");
    }
    let rules: Vec<&Value> = of_kind(manifests, "PrometheusRule");
    let agent_rule = rules.iter().find(|r| r["metadata"]["name"] == "gitops-agent").expect("the agent's rule");
    assert!(selects("ruleSelector", agent_rule), "the agent's PrometheusRule is selected");
    let alerts: Vec<&str> = agent_rule["spec"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .filter_map(|r| r["alert"].as_str())
        .collect();
    assert!(alerts.contains(&"GitOpsDriftDetected"), "{alerts:?}");
}

#[test]
fn the_local_stack_runs_only_images_from_the_nodes_registry() {
    let dir = tempfile::tempdir().unwrap();
    let repo = template_repository(dir.path(), REGISTRY);
    let manifests = render(&repo, "local", &dir.path().join("charts-cache"));

    let mut images = Vec::new();
    for object in manifests.iter().map(|m| &m.object) {
        let pod = match object["kind"].as_str().unwrap() {
            "Deployment" | "StatefulSet" | "DaemonSet" | "Job" => &object["spec"]["template"]["spec"],
            _ => continue,
        };
        for container in
            ["initContainers", "containers"].iter().flat_map(|c| pod[c].as_array().cloned().unwrap_or_default())
        {
            images.push(container["image"].as_str().unwrap().to_owned());
            // What the operator is told to start beside Prometheus and Alertmanager.
            for arg in container["args"].as_array().into_iter().flatten().filter_map(Value::as_str) {
                if let Some(image) = arg.strip_prefix("--prometheus-config-reloader=") {
                    images.push(image.to_owned());
                }
            }
        }
    }
    for kind in ["Prometheus", "Alertmanager"] {
        let [object] = of_kind(&manifests, kind)[..] else { panic!("one {kind}") };
        images.push(object["spec"]["image"].as_str().unwrap().to_owned());
    }
    for image in &images {
        let (registry, rest) = image.split_once('/').unwrap_or(("", image));
        let (name, tag) = rest.rsplit_once(':').unwrap_or((rest, ""));
        assert_eq!(registry, REGISTRY, "{image} is pulled from the node's registry");
        assert_eq!(tag, template_tag(name), "{image} has its build's tag");
    }
    let names: std::collections::BTreeSet<&str> =
        images.iter().map(|i| i.rsplit_once(':').unwrap().0.rsplit_once('/').unwrap().1).collect();
    for name in
        ["prometheus", "alertmanager", "prometheus-operator", "prometheus-config-reloader", "kube-state-metrics"]
    {
        assert!(names.contains(name), "the stack runs {name}: {names:?}");
    }
    let [prometheus] = of_kind(&manifests, "Prometheus")[..] else { unreachable!() };
    assert_eq!(prometheus["spec"]["version"], "v3.14.0", "the operator writes flags for the Prometheus its image runs");
    assert!(
        !manifests.iter().any(|m| m.object["metadata"]["name"].as_str().unwrap_or_default().contains("grafana")),
        "Grafana is off on the local cluster"
    );
    assert_prometheus_selects_what_git_holds(&manifests);
}

#[test]
fn the_eks_stack_loads_the_dashboards_into_grafana() {
    let dir = tempfile::tempdir().unwrap();
    let repo = template_repository(dir.path(), REGISTRY);
    let _charts = serve_eks_charts(&repo);
    let manifests = render(&repo, "eks", &dir.path().join("charts-cache"));

    // The sidecar beside Grafana, configured as the dashboards' ConfigMaps need.
    let grafana = of_kind(&manifests, "Deployment")
        .into_iter()
        .find(|d| d["metadata"]["name"].as_str().unwrap().ends_with("grafana"))
        .expect("Grafana is on");
    let containers = grafana["spec"]["template"]["spec"]["containers"].as_array().unwrap();
    let sidecar = containers.iter().find(|c| c["name"] == "grafana-sc-dashboard").expect("the dashboard sidecar");
    let env: BTreeMap<&str, &str> = sidecar["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| Some((e["name"].as_str()?, e["value"].as_str()?)))
        .collect();
    // The agent's, of dashboards/ (the chart brings its own, in no folder).
    let dashboards: Vec<&Value> = manifests
        .iter()
        .filter(|m| m.location.file.starts_with("dashboards"))
        .map(|m| &m.object)
        .filter(|c| labels(c).contains_key(gitops_agent::render::DASHBOARD_LABEL))
        .collect();
    assert!(dashboards.len() >= 2, "the Scale dashboards: {}", dashboards.len());
    for dashboard in dashboards {
        let name = dashboard["metadata"]["name"].as_str().unwrap();
        assert_eq!(env.get("LABEL"), Some(&gitops_agent::render::DASHBOARD_LABEL), "{env:?}");
        assert_eq!(
            Some(labels(dashboard)[gitops_agent::render::DASHBOARD_LABEL].as_str()),
            env.get("LABEL_VALUE").copied()
        );
        assert_eq!(env.get("NAMESPACE"), Some(&"ALL"), "{name} is found in its namespace");
        assert_eq!(env.get("FOLDER_ANNOTATION"), Some(&gitops_agent::render::FOLDER_ANNOTATION));
        assert!(
            dashboard["metadata"]["annotations"][gitops_agent::render::FOLDER_ANNOTATION].is_string(),
            "{name} names its folder"
        );
    }
    // The data source the dashboards' `postgres` variable picks.
    let datasources = of_kind(&manifests, "ConfigMap")
        .into_iter()
        .find(|c| labels(c).contains_key("grafana_datasource"))
        .expect("the data sources' ConfigMap");
    let provisioned = datasources["data"].as_object().unwrap().values().filter_map(Value::as_str).collect::<String>();
    assert!(provisioned.contains("type: grafana-postgresql-datasource"), "{provisioned}");
    assert!(provisioned.contains("url: postgres.scale.svc:5432"), "{provisioned}");
    assert!(provisioned.contains("password: $SCALE_PG_PASSWORD"), "from the Secret, not the ConfigMap:\n{provisioned}");
    assert_prometheus_selects_what_git_holds(&manifests);
}
