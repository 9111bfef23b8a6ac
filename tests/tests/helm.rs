//! Helm chart releases as a user meets them: kube-prometheus-stack 88.5.3 (the real,
//! unmodified public chart and its dependencies, `../shared/charts/`) served from a
//! chart repository on 127.0.0.1 and synced to a real API server with values from the
//! repository; what lands equals `helm template` of the same inputs; a values change
//! is a change, a version bump an upgrade, deleting the release prunes it all. Bad
//! input is refused at its file and line.

use std::collections::BTreeSet;
use std::path::Path;

use gitops_agent::render::{self, Capabilities, Renderer};
use gitops_tests::agent::{Agent, AgentConfig};
use gitops_tests::cluster;
use gitops_tests::git::GitRepo;
use gitops_tests::render::{ChartRepo, OciRegistry, helm, tools};
use kube::api::{Api, DynamicObject};
use kube::discovery::Discovery;
use serde_json::Value;

const CHART: &str = "kube-prometheus-stack";
const PROMETHEUS: &str = "monitoring.coreos.com/v1";
const OPERATOR: &str = "monitoring-kube-prometheus-operator";
/// Without one, Grafana's chart makes a random admin password on every render, so two
/// renders of the same inputs differ (its Secret and the Deployment's checksum).
const GRAFANA_PASSWORD: &str = "a-test-value-not-a-secret";

/// On a control plane without a node the operator never runs, so its admission webhook
/// could never answer: off, as the chart allows.
/// And Grafana's admin password is set, so that two renders of the same inputs are equal.
const VALUES_FILE: &str = "prometheusOperator:\n  admissionWebhooks:\n    enabled: false\nnodeExporter:\n  enabled: true\ngrafana:\n  adminPassword: a-test-value-not-a-secret\n";

fn release(repo_url: &str, namespace: &str, version: &str, retention: &str) -> String {
    format!(
        "apiVersion: gitops.scale.dev/v1\nkind: HelmChart\nmetadata:\n  name: monitoring\n  namespace: {namespace}\nspec:\n  repo: {repo_url}\n  chart: {CHART}\n  version: {version}\n  valuesFiles:\n  - values/monitoring.yaml\n  values:\n    prometheus:\n      prometheusSpec:\n        retention: {retention}\n"
    )
}

/// The objects `helm template` renders for the release.
fn helm_template(
    chart: &Path,
    namespace: &str,
    values: &Path,
    retention: &str,
    capabilities: &Capabilities,
    home: &Path,
) -> Vec<Value> {
    let inline = home.join("inline.yaml");
    std::fs::write(&inline, format!("prometheus:\n  prometheusSpec:\n    retention: {retention}\n")).unwrap();
    let api_versions = capabilities.api_versions.join(",");
    let args = [
        "template",
        "monitoring",
        chart.to_str().unwrap(),
        "--namespace",
        namespace,
        "--include-crds",
        "--skip-tests",
        "--kube-version",
        capabilities.kube_version.as_deref().unwrap(),
        "--api-versions",
        &api_versions,
        "--values",
        values.to_str().unwrap(),
        "--values",
        inline.to_str().unwrap(),
    ];
    let text = helm(&args, home);
    let manifests = render::render_text(Path::new("helm-template.yaml"), &text).unwrap_or_else(|e| panic!("{e:#?}"));
    manifests.into_iter().map(|m| m.object).collect()
}

/// `(apiVersion, kind, namespace, name)` of every object, namespaced ones without a
/// namespace in the release's, as the agent places them.
fn ids(objects: &[Value], namespace: &str, discovery: &Discovery) -> BTreeSet<(String, String, String, String)> {
    let at = render::Location { file: "helm-template.yaml".into(), line: 1 };
    objects
        .iter()
        .map(|object| render::Manifest::new(object.clone(), at.clone()))
        .map(|m| {
            let namespaced = discovery
                .resolve_gvk(&m.gvk())
                .is_none_or(|(_, caps)| caps.scope == kube::discovery::Scope::Namespaced)
                && m.kind() != "CustomResourceDefinition";
            let ns = if namespaced { m.namespace().unwrap_or(namespace).to_owned() } else { String::new() };
            (m.api_version().to_owned(), m.kind().to_owned(), ns, m.name().to_owned())
        })
        .collect()
}

/// The objects the agent reports managing, summed over kinds.
async fn managed(agent: &Agent) -> f64 {
    let text = agent.get("/metrics").await.1;
    text.lines()
        .filter(|line| line.starts_with("gitops_managed_resources{"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn get(
    client: &kube::Client,
    discovery: &Discovery,
    api_version: &str,
    kind: &str,
    ns: &str,
    name: &str,
) -> Option<DynamicObject> {
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let gvk = kube::core::GroupVersionKind::gvk(group, version, kind);
    let (resource, caps) = discovery.resolve_gvk(&gvk).unwrap_or_else(|| panic!("the API serves {gvk:?}"));
    let api: Api<DynamicObject> = if caps.scope == kube::discovery::Scope::Namespaced {
        Api::namespaced_with(client.clone(), ns, &resource)
    } else {
        Api::all_with(client.clone(), &resource)
    };
    api.get_opt(name).await.unwrap()
}

#[tokio::test]
async fn kube_prometheus_stack_is_installed_changed_upgraded_and_pruned_from_a_chart_repository() {
    let client = cluster::client().await;
    let ns = cluster::namespace(&client, "helm-kps").await;
    let charts = ChartRepo::serve();
    let chart = charts.kube_prometheus_stack("88.5.3");

    let repo = GitRepo::new();
    repo.write("values/monitoring.yaml", VALUES_FILE);
    repo.write("charts/monitoring.yaml", &release(&charts.url(), &ns, "88.5.3", "10d"));
    repo.write("manifests/keep.yaml", &cluster::configmap("keep", "one"));
    let first = repo.commit("kube-prometheus-stack 88.5.3");
    // What the agent's first render sees: the cluster before the chart's CRDs.
    let before = Discovery::new(client.clone()).run_aggregated().await.unwrap();
    let version = client.apiserver_version().await.unwrap().git_version;
    let capabilities = gitops_agent::sync::capabilities(&before, version);
    let cache = tempfile::tempdir().unwrap();
    let agent = Agent::start(
        client.clone(),
        AgentConfig { render: tools(cache.path()), ..AgentConfig::new(repo.file_url(), &ns) },
    )
    .await;
    agent.applied(&first).await;

    // Everything helm template renders for the same inputs, and nothing else.
    // Discovered again now that the chart's CRDs are served.
    let discovery = Discovery::new(client.clone()).run_aggregated().await.unwrap();
    let values = repo.work_tree().join("values/monitoring.yaml");
    let rendered = helm_template(&chart, &ns, &values, "10d", &capabilities, charts.helm_home());
    // Object for object, what the agent renders for the same inputs.
    let agent_cache = tempfile::tempdir().unwrap();
    let agent_render = Renderer::new(tools(agent_cache.path()))
        .render(&repo.work_tree(), &ns, &capabilities)
        .unwrap_or_else(|e| panic!("{e:#?}"));
    let from_chart = agent_render.manifests.into_iter().filter(|m| m.location.file.starts_with("charts"));
    let agent_objects: Vec<Value> = from_chart.map(|m| m.object).collect();
    assert!(agent_objects == rendered, "the agent renders what helm template renders");
    let expected = ids(&rendered, &ns, &discovery);
    assert!(expected.len() > 100, "kube-prometheus-stack renders its CRDs and objects: {}", expected.len());
    assert_eq!(managed(&agent).await, (expected.len() + 1) as f64, "the release's objects and keep");
    for (api_version, kind, object_ns, name) in [
        ("apiextensions.k8s.io/v1", "CustomResourceDefinition", "", "prometheuses.monitoring.coreos.com"),
        (PROMETHEUS, "Prometheus", ns.as_str(), "monitoring-kube-prometheus-prometheus"),
        ("apps/v1", "Deployment", ns.as_str(), OPERATOR),
        ("apps/v1", "Deployment", ns.as_str(), "monitoring-grafana"),
        ("apps/v1", "DaemonSet", ns.as_str(), "monitoring-prometheus-node-exporter"),
    ] {
        let id = (api_version.to_owned(), kind.to_owned(), object_ns.to_owned(), name.to_owned());
        assert!(expected.contains(&id), "helm renders {id:?}");
    }
    for (api_version, kind, object_ns, name) in &expected {
        let live = get(&client, &discovery, api_version, kind, object_ns, name).await;
        assert!(live.is_some(), "{kind} {object_ns}/{name} is applied");
    }
    let prometheus = "monitoring-kube-prometheus-prometheus";
    let live = get(&client, &discovery, PROMETHEUS, "Prometheus", &ns, prometheus).await.unwrap();
    assert_eq!(live.data["spec"]["retention"], "10d");
    assert_eq!(agent.render_stats().chart_downloads, 1);

    // A values change is a change; the chart is not downloaded again.
    repo.write("charts/monitoring.yaml", &release(&charts.url(), &ns, "88.5.3", "20d"));
    agent.trigger_and_wait(repo.commit("retention 20d")).await;
    let live = get(&client, &discovery, PROMETHEUS, "Prometheus", &ns, prometheus).await.unwrap();
    assert_eq!(live.data["spec"]["retention"], "20d");
    let stats = agent.render_stats();
    assert_eq!((stats.chart_downloads, stats.helm_templates), (1, 2), "{stats:?}");

    // A commit that changes nothing the release reads: no render.
    repo.write("manifests/keep.yaml", &cluster::configmap("keep", "two"));
    agent.trigger_and_wait(repo.commit("unrelated")).await;
    let stats = agent.render_stats();
    assert_eq!((stats.chart_downloads, stats.helm_templates), (1, 2), "{stats:?}");

    // A version bump is an upgrade.
    charts.kube_prometheus_stack("88.5.4");
    repo.write("charts/monitoring.yaml", &release(&charts.url(), &ns, "88.5.4", "20d"));
    agent.trigger_and_wait(repo.commit("kube-prometheus-stack 88.5.4")).await;
    let operator = get(&client, &discovery, "apps/v1", "Deployment", &ns, OPERATOR).await.unwrap();
    assert_eq!(operator.metadata.labels.unwrap()["chart"], "kube-prometheus-stack-88.5.4");
    assert_eq!(agent.render_stats().chart_downloads, 2);

    // Deleting the release file prunes all it rendered, CRDs included.
    repo.remove("charts/monitoring.yaml");
    agent.trigger_and_wait(repo.commit("no monitoring")).await;
    assert_eq!(managed(&agent).await, 1.0, "only keep is left");
    assert!(get(&client, &discovery, "apps/v1", "Deployment", &ns, OPERATOR).await.is_none());
    let crd = get(
        &client,
        &discovery,
        "apiextensions.k8s.io/v1",
        "CustomResourceDefinition",
        "",
        "prometheuses.monitoring.coreos.com",
    )
    .await;
    assert!(crd.is_none_or(|crd| crd.metadata.deletion_timestamp.is_some()), "the CRD is pruned");
    agent.stop().await;
}

/// The errors of rendering a repository of `files` as `file:line: message`.
fn render_errors(files: &[(&str, &str)], chart_cache: &Path) -> Vec<String> {
    let repo = tempfile::tempdir().unwrap();
    for (path, text) in files {
        let path = repo.path().join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    let renderer = Renderer::new(tools(chart_cache));
    let errors = renderer.render(repo.path(), "monitoring", &Capabilities::default()).unwrap_err();
    errors.iter().map(ToString::to_string).collect()
}

const SMALL_CHART: &[(&str, &str)] = &[
    ("vendor/small/Chart.yaml", "apiVersion: v2\nname: small\nversion: 0.1.0\n"),
    ("vendor/small/values.yaml", "replicas: 1\nfail: false\n"),
    (
        "vendor/small/values.schema.json",
        "{\"type\": \"object\", \"properties\": {\"replicas\": {\"type\": \"integer\"}, \"fail\": {\"type\": \"boolean\"}}}",
    ),
    (
        "vendor/small/templates/cm.yaml",
        "{{- if .Values.fail }}{{ fail \"the small chart refuses to render\" }}{{ end }}\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: small\ndata:\n  replicas: {{ .Values.replicas | quote }}\n",
    ),
];

fn small_release(values: &str) -> String {
    format!(
        "apiVersion: gitops.scale.dev/v1\nkind: HelmChart\nmetadata:\n  name: small\n  namespace: apps\nspec:\n  path: vendor/small\n  values:\n{values}"
    )
}

#[test]
fn bad_chart_releases_are_errors_at_their_file_and_line() {
    let cache = tempfile::tempdir().unwrap();
    let charts = ChartRepo::serve();
    charts.kube_prometheus_stack("88.5.3");
    let missing_version = format!(
        "apiVersion: gitops.scale.dev/v1\nkind: HelmChart\nmetadata:\n  name: m\n  namespace: monitoring\nspec:\n  repo: {}\n  chart: {CHART}\n  version: 99.0.0\n",
        charts.url()
    );
    let errors = render_errors(&[("charts/m.yaml", &missing_version)], cache.path());
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].starts_with("charts/m.yaml:9: fetching chart kube-prometheus-stack 99.0.0: "), "{errors:?}");
    assert!(errors[0].contains("99.0.0") && errors[0].contains("not found"), "helm's own message: {errors:?}");

    // A repository nobody serves.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let down = missing_version.replace(&charts.url(), &format!("http://127.0.0.1:{port}")).replace("99.0.0", "88.5.3");
    let errors = render_errors(&[("charts/m.yaml", &down)], cache.path());
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].starts_with("charts/m.yaml:7: fetching chart kube-prometheus-stack 88.5.3: "), "{errors:?}");
    assert!(errors[0].contains("connection refused"), "{errors:?}");

    // A template that fails, and values of the wrong type, in a chart in the repository.
    let mut files = SMALL_CHART.to_vec();
    let failing = small_release("    fail: true\n");
    files.push(("charts/small.yaml", &failing));
    let errors = render_errors(&files, cache.path());
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].starts_with("charts/small.yaml:8: helm template: "), "{errors:?}");
    assert!(errors[0].contains("the small chart refuses to render"), "{errors:?}");

    let mut files = SMALL_CHART.to_vec();
    let wrong_type = small_release("    replicas: two\n");
    files.push(("charts/small.yaml", &wrong_type));
    let errors = render_errors(&files, cache.path());
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].starts_with("charts/small.yaml:8: helm template: "), "{errors:?}");
    assert!(errors[0].contains("replicas") && errors[0].contains("integer"), "{errors:?}");

    // The same chart with good values renders, into the release's namespace; vendored
    // under charts/, its own files are not taken for releases.
    let vendored: Vec<(String, &str)> =
        SMALL_CHART.iter().map(|(path, text)| (format!("charts/{path}"), *text)).collect();
    let mut files: Vec<(&str, &str)> = vendored.iter().map(|(path, text)| (path.as_str(), *text)).collect();
    let good = small_release("    replicas: 3\n").replace("path: vendor/small", "path: charts/vendor/small");
    files.push(("charts/small.yaml", &good));
    let repo = tempfile::tempdir().unwrap();
    for (path, text) in &files {
        let path = repo.path().join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    let rendered =
        Renderer::new(tools(cache.path())).render(repo.path(), "monitoring", &Capabilities::default()).unwrap();
    let [manifest] = rendered.manifests.as_slice() else { panic!("{:?}", rendered.manifests) };
    assert_eq!(manifest.object["data"]["replicas"], "3");
    assert_eq!(manifest.default_namespace.as_deref(), Some("apps"));
    assert_eq!(manifest.location.to_string(), "charts/small.yaml:1");
}

#[test]
fn a_chart_from_an_oci_registry_renders_as_from_a_chart_repository() {
    let charts = ChartRepo::serve();
    let archive = charts.kube_prometheus_stack("88.5.3");
    let registry = OciRegistry::serve();
    registry.push(&archive, charts.helm_home());
    let release = |source: &str| {
        format!(
            "apiVersion: gitops.scale.dev/v1\nkind: HelmChart\nmetadata:\n  name: monitoring\n  namespace: monitoring\nspec:\n{source}  chart: {CHART}\n  version: 88.5.3\n  values:\n    grafana:\n      adminPassword: {GRAFANA_PASSWORD}\n"
        )
    };
    let render = |text: String| {
        let repo = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(repo.path().join("charts")).unwrap();
        std::fs::write(repo.path().join("charts/monitoring.yaml"), text).unwrap();
        let cache = tempfile::tempdir().unwrap();
        let renderer = Renderer::new(tools(cache.path()));
        let rendered =
            renderer.render(repo.path(), "monitoring", &Capabilities::default()).unwrap_or_else(|e| panic!("{e:#?}"));
        assert_eq!(renderer.stats().chart_downloads, 1);
        rendered.manifests.into_iter().map(|m| m.object).collect::<Vec<_>>()
    };
    let from_repo = render(release(&format!("  repo: {}\n", charts.url())));
    let from_oci = render(release(&format!("  repo: {}\n  plainHTTP: true\n", registry.url())));
    assert!(from_repo.len() > 100, "{}", from_repo.len());
    assert!(from_oci == from_repo, "the same chart renders the same objects from either source");
}

#[test]
fn chart_repository_credentials_come_from_a_secret_dir_and_never_show_in_errors() {
    let password = "hunter2-chart-password";
    let charts = ChartRepo::serve_authenticated("charts", password);
    let chart = tempfile::tempdir().unwrap();
    for (path, text) in SMALL_CHART {
        let path = chart.path().join(path.strip_prefix("vendor/").unwrap());
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    charts.add(&chart.path().join("small"), None, &[]);
    let release = format!(
        "apiVersion: gitops.scale.dev/v1\nkind: HelmChart\nmetadata:\n  name: small\n  namespace: apps\nspec:\n  repo: {}\n  chart: small\n  version: 0.1.0\n",
        charts.url()
    );
    let repo = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(repo.path().join("charts")).unwrap();
    std::fs::write(repo.path().join("charts/small.yaml"), &release).unwrap();
    let render = |secret: &[(&str, &str)]| {
        let dir = gitops_tests::git::git_secret_dir(secret);
        let credentials = render::ChartCredentials::from_secret_dir(dir.path()).unwrap();
        let cache = tempfile::tempdir().unwrap();
        let tools = render::Tools { credentials, ..tools(cache.path()) };
        Renderer::new(tools).render(repo.path(), "monitoring", &Capabilities::default())
    };

    let rendered = render(&[("username", "charts"), ("password", password)]).unwrap_or_else(|e| panic!("{e:#?}"));
    assert_eq!(rendered.manifests.len(), 1);

    for secret in [vec![], vec![("username", "charts"), ("password", "wrong-password-123")]] {
        let errors: Vec<String> = render(&secret).unwrap_err().iter().map(ToString::to_string).collect();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].starts_with("charts/small.yaml:7: fetching chart small 0.1.0: "), "{errors:?}");
        assert!(errors[0].contains("401"), "{errors:?}");
        assert!(!errors[0].contains("wrong-password-123") && !errors[0].contains(password), "no secret: {errors:?}");
    }
    let debug =
        format!("{:?}", render::ChartCredentials { username: Some("u".into()), password: Some(password.into()) });
    assert!(!debug.contains(password), "{debug}");
}

#[tokio::test]
async fn diff_shows_what_a_kustomization_and_a_chart_release_would_create() {
    let client = cluster::client().await;
    let ns = cluster::namespace(&client, "render-diff").await;
    let repo = GitRepo::new();
    for (path, text) in SMALL_CHART {
        repo.write(path, text);
    }
    repo.write(
        "charts/small.yaml",
        &small_release("    replicas: 3\n").replace("namespace: apps", &format!("namespace: {ns}")),
    );
    repo.write("manifests/app/kustomization.yaml", "configMapGenerator:\n- name: generated\n  literals: [A=1]\n");
    repo.commit("a kustomization and a chart release");
    let built = gitops_tests::render::binaries();
    let output = std::process::Command::new(gitops_tests::agent::binary())
        .args(["diff", "--repo", &repo.file_url(), "--namespace", &ns, "--default-namespace", &ns])
        .arg("--kustomize-bin")
        .arg(&built.kustomize)
        .arg("--helm-bin")
        .arg(&built.helm)
        .env("KUBECONFIG", cluster::shared().kubeconfig())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "changes: {stdout}{}", String::from_utf8_lossy(&output.stderr));
    let created: Vec<&str> = stdout.lines().filter(|l| l.starts_with("+ ")).collect();
    assert_eq!(created.len(), 2, "{stdout}");
    assert!(
        created.iter().any(|l| l.ends_with("(charts/small.yaml:1): created") && l.contains(&format!("{ns}/small"))),
        "{stdout}"
    );
    assert!(
        created
            .iter()
            .any(|l| l.ends_with("(manifests/app/kustomization.yaml:1): created")
                && l.contains(&format!("{ns}/generated-"))),
        "{stdout}"
    );
}
