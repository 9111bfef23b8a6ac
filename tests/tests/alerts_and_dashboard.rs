//! The alert rules (manifests/alerts/) and the Grafana dashboard (dashboards/) against
//! Debian's real promtool and Prometheus, the latter scraping the agent's real HTTP
//! server: the rules are valid and pass their unit tests, the PrometheusRule holds the
//! same rules, every query of the dashboard and the rules runs and names only metrics
//! the agent exports, and the drift alert fires and resolves as drift comes and goes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use gitops_agent::health::HealthStatus;
use gitops_agent::metrics::BatchOutcome;
use gitops_agent::server;
use gitops_agent::status::{AppState, DriftedObject, UnhealthyObject};
use gitops_tests::cluster::eventually;
use gitops_tests::prometheus::{Alert, PROMTOOL, Prometheus};
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The metrics of the design's contract: the dashboard shows every one.
const CONTRACT_METRICS: &[&str] = &[
    "gitops_sync_total",
    "gitops_sync_duration_seconds",
    "gitops_last_sync_success_timestamp_seconds",
    "gitops_applied_revision_info",
    "gitops_source_fetch_errors_total",
    "gitops_managed_resources",
    "gitops_drifted_resources",
    "gitops_drift_detected_total",
    "gitops_drift_corrected_total",
    "gitops_pruned_resources_total",
    "gitops_batch_runs_total",
    "gitops_batch_run_duration_seconds",
];

const ALERTS: &[&str] = &[
    "GitOpsDriftDetected",
    "GitOpsSyncFailing",
    "GitOpsSourceStale",
    "GitOpsBatchRunFailed",
    "GitOpsAgentDown",
    "GitOpsRevisionDegraded",
];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is inside the repository").to_owned()
}

fn rules_file() -> PathBuf {
    repo_root().join("manifests/alerts/gitops-agent.rules.yaml")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Runs promtool and asserts that it succeeds, showing its output if not.
fn promtool(args: &[&str]) -> String {
    let output = Command::new(PROMTOOL)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {PROMTOOL} (install Debian's prometheus package): {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "promtool {args:?} failed ({}):\n{text}", output.status);
    text
}

// ---------------------------------------------------------------------------------------
// YAML and the files' contents

/// Parses YAML into JSON with the agent's own decoder (YAML read as kubectl reads it).
/// `render` takes only Kubernetes objects, so the text becomes the `body` of one.
fn yaml_to_json(yaml: &str) -> Value {
    let mut object = String::from("apiVersion: v1\nkind: Wrapper\nmetadata:\n  name: wrapper\nbody:\n");
    for line in yaml.lines() {
        object.push_str("  ");
        object.push_str(line);
        object.push('\n');
    }
    render_one(&object)["body"].clone()
}

/// The single Kubernetes object of `yaml`, rendered by the agent as it would apply it.
fn render_one(yaml: &str) -> Value {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("manifests")).unwrap();
    std::fs::write(dir.path().join("manifests/object.yaml"), yaml).unwrap();
    let rendered =
        gitops_agent::render::render(dir.path(), "monitoring").map(|r| r.manifests).unwrap_or_else(|errors| {
            let errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
            panic!("the agent does not render it:\n{}", errors.join("\n"))
        });
    assert_eq!(rendered.len(), 1, "one object");
    rendered.into_iter().next().unwrap().object
}

/// Where two JSON values first differ: the JSON pointer and both values.
fn first_difference(at: &str, a: &Value, b: &Value) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            keys.into_iter().find_map(|k| {
                first_difference(
                    &format!("{at}/{k}"),
                    x.get(k).unwrap_or(&Value::Null),
                    y.get(k).unwrap_or(&Value::Null),
                )
            })
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            x.iter().zip(y).enumerate().find_map(|(i, (x, y))| first_difference(&format!("{at}/{i}"), x, y))
        }
        _ => (a != b).then(|| format!("at {at}: {a} vs {b}")),
    }
}

/// The plain rules file, parsed.
fn rules() -> Value {
    yaml_to_json(&read(&rules_file()))
}

/// Every rule of every group.
fn all_rules(rules: &Value) -> Vec<&Value> {
    let groups = rules["groups"].as_array().expect("groups is a list");
    groups.iter().flat_map(|group| group["rules"].as_array().expect("a group's rules are a list")).collect()
}

fn dashboard() -> Value {
    let path = repo_root().join("dashboards/gitops-agent.json");
    serde_json::from_str(&read(&path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every panel, those inside rows included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    fn walk<'a>(panels: &'a Value, out: &mut Vec<&'a Value>) {
        for panel in panels.as_array().into_iter().flatten() {
            out.push(panel);
            walk(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// The `expr` of every panel target: (panel title, expr).
fn panel_queries(dashboard: &Value) -> Vec<(String, String)> {
    let mut queries = Vec::new();
    for panel in panels(dashboard) {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap_or_else(|| panic!("a target without expr: {target}"));
            queries.push((panel["title"].as_str().unwrap_or_default().to_owned(), expr.to_owned()));
        }
    }
    queries
}

/// The `expr` of every annotation query (the built-in one has none).
fn annotation_queries(dashboard: &Value) -> Vec<(String, String)> {
    let list = dashboard["annotations"]["list"].as_array().into_iter().flatten();
    list.filter_map(|a| Some((a["name"].as_str()?.to_owned(), a["expr"].as_str()?.to_owned()))).collect()
}

/// `expr` as Prometheus gets it from Grafana: its interval variables filled in. Any
/// other `$` would be a variable this test does not know.
fn as_grafana_sends_it(expr: &str) -> String {
    let mut expr = expr.to_owned();
    for variable in ["$__rate_interval", "${__rate_interval}", "$__interval", "${__interval}", "$__range", "${__range}"]
    {
        expr = expr.replace(variable, "1m");
    }
    assert!(!expr.contains('$'), "a variable this test does not fill in: {expr}");
    expr
}

/// The metric names `expr` uses: identifiers starting `gitops_`, without the
/// `_bucket`/`_sum`/`_count` suffixes of histogram series.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut at = 0;
    while let Some(found) = expr[at..].find("gitops_") {
        let start = at + found;
        let mut end = start + "gitops_".len();
        while end < bytes.len() && (bytes[end].is_ascii_lowercase() || bytes[end] == b'_') {
            end += 1;
        }
        let word_start = start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        if word_start {
            let name = &expr[start..end];
            let base = ["_bucket", "_sum", "_count"].iter().find_map(|suffix| name.strip_suffix(suffix));
            names.insert(base.unwrap_or(name).to_owned());
        }
        at = end;
    }
    names
}

/// The metric families of an exposition: the names of its `# TYPE` lines.
fn exported_families(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE ")?.split_whitespace().next().map(str::to_owned))
        .collect()
}

// ---------------------------------------------------------------------------------------
// The agent's HTTP server, in this process

/// `gitops_agent::server::serve` on a free loopback port; stopped when dropped.
struct AgentServer {
    /// `127.0.0.1:PORT`, the scrape target.
    address: String,
    state: Arc<AppState>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl AgentServer {
    async fn start() -> AgentServer {
        let state = Arc::new(AppState::new("main", None));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server::serve(listener, state.clone(), async move {
            let _ = stopped.await;
        }));
        AgentServer { address, state, stop: Some(stop), task }
    }

    /// The body of `/metrics`.
    async fn metrics(&self) -> String {
        let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let request = Request::get(format!("http://{}/metrics", self.address)).body(Full::new(Bytes::new())).unwrap();
        let response = client.request(request).await.expect("GET /metrics");
        assert_eq!(response.status(), 200, "GET /metrics");
        let body = response.into_body().collect().await.expect("the body of /metrics").to_bytes();
        String::from_utf8(body.to_vec()).expect("/metrics is UTF-8")
    }
}

impl Drop for AgentServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.abort();
    }
}

fn drifted(kind: &str, namespace: Option<&str>, name: &str) -> DriftedObject {
    DriftedObject {
        kind: kind.to_owned(),
        namespace: namespace.map(str::to_owned),
        name: name.to_owned(),
        fields: vec!["spec.replicas".to_owned()],
        contested: false,
    }
}

fn unhealthy(kind: &str, name: &str, health: HealthStatus) -> UnhealthyObject {
    UnhealthyObject {
        kind: kind.to_owned(),
        namespace: Some("web".to_owned()),
        name: name.to_owned(),
        health,
        reason: "ImagePullBackOff".to_owned(),
        message: "pod web-1: container app: ImagePullBackOff".to_owned(),
    }
}

/// Alerts named `name` in state `state`.
fn alerts_named<'a>(alerts: &'a [Alert], name: &str, state: &str) -> Vec<&'a BTreeMap<String, String>> {
    alerts.iter().filter(|(n, s, _)| n == name && s == state).map(|(_, _, labels)| labels).collect()
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// Waits until Prometheus has evaluated every rule, and asserts that none failed.
async fn rules_evaluated_without_error(prometheus: &Prometheus) {
    let rules = eventually("every rule to have been evaluated", || async {
        let groups = prometheus.rule_groups().await;
        let rules: Vec<Value> =
            groups.iter().flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default()).collect();
        (!rules.is_empty() && rules.iter().all(|r| r["health"] != "unknown")).then_some(rules)
    })
    .await;
    assert_eq!(rules.len(), ALERTS.len(), "the rules Prometheus loaded");
    for rule in &rules {
        assert_eq!(rule["health"], "ok", "rule {} failed: {}", rule["name"], rule["lastError"]);
    }
}

// ---------------------------------------------------------------------------------------
// The tests

#[test]
fn promtool_accepts_the_rules_file() {
    let output = promtool(&["check", "rules", rules_file().to_str().unwrap()]);
    assert!(output.contains(&format!("SUCCESS: {} rules found", ALERTS.len())), "{output}");
}

#[test]
fn the_alerts_pass_their_promtool_unit_tests() {
    let tests = repo_root().join("manifests/alerts/tests.yaml");
    let output = promtool(&["test", "rules", tests.to_str().unwrap()]);
    assert!(output.contains("SUCCESS"), "{output}");
    // Every alert is unit-tested, firing at least once.
    let tests = yaml_to_json(&read(&tests));
    let mut firing = BTreeSet::new();
    for test in tests["tests"].as_array().unwrap() {
        for case in test["alert_rule_test"].as_array().unwrap() {
            if !case["exp_alerts"].as_array().unwrap().is_empty() {
                firing.insert(case["alertname"].as_str().unwrap().to_owned());
            }
        }
    }
    assert_eq!(firing, ALERTS.iter().map(|a| a.to_string()).collect(), "alerts shown firing in tests.yaml");
}

#[test]
fn the_rules_are_the_six_alerts_with_severity_summary_and_description() {
    let rules = rules();
    let groups = rules["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 1);
    assert_eq!(groups[0]["name"], "gitops-agent");
    let rules = all_rules(&rules);
    let names: Vec<&str> = rules.iter().map(|r| r["alert"].as_str().unwrap()).collect();
    assert_eq!(names, ALERTS);
    for rule in rules {
        let name = &rule["alert"];
        let severity = rule["labels"]["severity"].as_str().unwrap_or_default();
        assert!(["warning", "critical"].contains(&severity), "{name}: severity {severity:?}");
        for annotation in ["summary", "description"] {
            let text = rule["annotations"][annotation].as_str().unwrap_or_default();
            assert!(text.contains("{{"), "{name}: the {annotation} uses no label or value: {text:?}");
        }
    }
}

#[test]
fn the_prometheus_rule_holds_the_same_groups_as_the_rules_file() {
    let rule = render_one(&read(&repo_root().join("manifests/alerts/prometheusrule.yaml")));
    assert_eq!(rule["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(rule["kind"], "PrometheusRule");
    assert_eq!(rule["metadata"]["namespace"], "gitops-system");
    assert_eq!(rule["metadata"]["labels"]["release"], "kube-prometheus-stack");
    let plain = rules();
    assert_eq!(plain.as_object().unwrap().keys().collect::<Vec<_>>(), ["groups"], "the plain file has only groups");
    if let Some(difference) = first_difference("", &rule["spec"]["groups"], &plain["groups"]) {
        panic!(
            "prometheusrule.yaml's spec.groups differ from gitops-agent.rules.yaml's groups (copy them over): \
             {difference}"
        );
    }
}

#[test]
fn the_dashboard_is_a_grafana_dashboard_on_a_chosen_prometheus() {
    let dashboard = dashboard();
    assert_eq!(dashboard["uid"], "gitops-agent");
    assert_eq!(dashboard["title"], "GitOps agent");
    assert!(dashboard["schemaVersion"].as_u64().is_some_and(|v| (36..=41).contains(&v)), "schemaVersion");
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    let datasource = variables.iter().find(|v| v["name"] == "datasource").expect("a datasource variable");
    assert_eq!(datasource["type"], "datasource");
    assert_eq!(datasource["query"], "prometheus");

    let mut ids = BTreeSet::new();
    for panel in panels(&dashboard) {
        let title = &panel["title"];
        assert!(ids.insert(panel["id"].as_u64().expect("a numeric panel id")), "panel id repeated: {title}");
        let grid = &panel["gridPos"];
        assert!(grid["x"].as_u64().unwrap() + grid["w"].as_u64().unwrap() <= 24, "{title} is wider than the grid");
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title}: datasource");
        let targets = panel["targets"].as_array().unwrap_or_else(|| panic!("{title}: no targets"));
        assert!(!targets.is_empty(), "{title}: no targets");
        for target in targets {
            assert_eq!(target["datasource"]["uid"], "${datasource}", "{title}: a target's datasource");
        }
    }
    for (name, _) in annotation_queries(&dashboard) {
        let annotation =
            dashboard["annotations"]["list"].as_array().unwrap().iter().find(|a| a["name"] == name.as_str());
        assert_eq!(annotation.unwrap()["datasource"]["uid"], "${datasource}", "annotation {name}: datasource");
    }

    // Every metric of the contract is on it.
    let shown: BTreeSet<String> = panel_queries(&dashboard).iter().flat_map(|(_, expr)| metric_names(expr)).collect();
    let missing: Vec<&&str> = CONTRACT_METRICS.iter().filter(|m| !shown.contains(**m)).collect();
    assert!(missing.is_empty(), "metrics of the contract the dashboard does not show: {missing:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_query_of_the_dashboard_and_the_rules_runs_on_the_agents_metrics() {
    // The agent's server, with every kind of event recorded once.
    let agent = AgentServer::start().await;
    let state = &agent.state;
    state.record(synced("0123456789abcdef0123456789abcdef01234567"), Duration::from_millis(1200)).await;
    state.record(failed("the API server said no"), Duration::from_millis(300)).await;
    state.metrics.fetch_failed();
    state.metrics.set_managed(["Namespace", "Deployment", "Service", "ConfigMap"]);
    state.set_drifted(vec![drifted("Deployment", Some("web"), "api")]);
    state.metrics.drift_detected("Deployment");
    state.metrics.drift_corrected("Deployment");
    state.metrics.pruned("ConfigMap");
    state.metrics.batch_run_triggered("scale-batch");
    state.metrics.batch_run_finished("scale-batch", BatchOutcome::Failed, Duration::from_secs(42));
    state.metrics.batch_run_triggered("nightly");
    state.metrics.batch_run_finished("nightly", BatchOutcome::Succeeded, Duration::from_secs(640));
    state.set_health(
        "0123456789abcdef0123456789abcdef01234567",
        HealthStatus::Progressing,
        vec![unhealthy("Deployment", "web", HealthStatus::Progressing)],
        [("Deployment", HealthStatus::Progressing), ("Service", HealthStatus::Healthy)],
    );

    // Every metric the dashboard and the rules name is one the agent exports.
    let exported = exported_families(&agent.metrics().await);
    let dashboard = dashboard();
    let panel_queries = panel_queries(&dashboard);
    let annotation_queries = annotation_queries(&dashboard);
    let rules = rules();
    let rule_queries: Vec<(String, String)> = all_rules(&rules)
        .iter()
        .map(|r| (r["alert"].as_str().unwrap().to_owned(), r["expr"].as_str().unwrap().to_owned()))
        .collect();
    let all_queries = || panel_queries.iter().chain(&annotation_queries).chain(&rule_queries);
    for (name, expr) in all_queries() {
        for metric in metric_names(expr) {
            assert!(exported.contains(&metric), "{name}: {metric} is not exported by the agent ({exported:?}): {expr}");
        }
    }

    let prometheus = Prometheus::start(std::slice::from_ref(&agent.address), &[rules_file()]).await;
    prometheus.wait_for_targets_up().await;

    // Prometheus accepts every query. Each panel's query finds data (a rate needs two
    // scrapes in its window, hence the wait); the rules' and the annotation's may
    // rightly find none.
    for (name, expr) in all_queries() {
        let expr = as_grafana_sends_it(expr);
        if let Err(error) = prometheus.query(&expr).await {
            panic!("{name}: Prometheus rejects {expr}: {error}");
        }
    }
    for (panel, expr) in &panel_queries {
        let expr = as_grafana_sends_it(expr);
        eventually(&format!("panel {panel:?} to find data: {expr}"), || async {
            let data = prometheus.query(&expr).await.unwrap_or_else(|e| panic!("{panel}: {expr}: {e}"));
            (data["result"].as_array().is_some_and(|r| !r.is_empty())).then_some(())
        })
        .await;
    }

    // Prometheus evaluates every rule on the agent's data without an error, and the
    // alerts read the agent's labels as the contract names them: the failed run fires
    // for its batch job, the drifted Deployment is pending for its namespace.
    rules_evaluated_without_error(&prometheus).await;
    let alerts = eventually("GitOpsBatchRunFailed to fire and GitOpsDriftDetected to be pending", || async {
        let alerts = prometheus.alerts().await;
        let ready = !alerts_named(&alerts, "GitOpsBatchRunFailed", "firing").is_empty()
            && !alerts_named(&alerts, "GitOpsDriftDetected", "pending").is_empty();
        ready.then_some(alerts)
    })
    .await;
    assert_eq!(
        alerts_named(&alerts, "GitOpsBatchRunFailed", "firing"),
        [&labels(&[("alertname", "GitOpsBatchRunFailed"), ("job", "scale-batch"), ("severity", "warning")])]
    );
    assert_eq!(
        alerts_named(&alerts, "GitOpsDriftDetected", "pending"),
        [&labels(&[
            ("alertname", "GitOpsDriftDetected"),
            ("kind", "Deployment"),
            ("namespace", "web"),
            ("severity", "warning")
        ])]
    );
    let names: BTreeSet<&str> = alerts.iter().map(|(name, _, _)| name.as_str()).collect();
    assert_eq!(names, BTreeSet::from(["GitOpsBatchRunFailed", "GitOpsDriftDetected"]), "{alerts:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_fires_the_drift_alert_and_its_end_resolves_it() {
    let agent = AgentServer::start().await;
    agent.state.record(synced("0123456789abcdef0123456789abcdef01234567"), Duration::from_secs(1)).await;

    // The rules with `for: 1s` instead of 5 minutes.
    let rules = read(&rules_file());
    assert!(rules.contains("for: 5m"), "the rules file has no `for: 5m` any more");
    let dir = tempfile::tempdir().unwrap();
    let quick_rules = dir.path().join("quick.rules.yaml");
    std::fs::write(&quick_rules, rules.replace("for: 5m", "for: 1s")).unwrap();

    let prometheus = Prometheus::start(std::slice::from_ref(&agent.address), &[quick_rules]).await;
    prometheus.wait_for_targets_up().await;
    rules_evaluated_without_error(&prometheus).await;
    let drift_alerts = |alerts: Vec<Alert>| -> Vec<Alert> {
        alerts.into_iter().filter(|(name, _, _)| name == "GitOpsDriftDetected").collect()
    };
    assert_eq!(drift_alerts(prometheus.alerts().await), [], "no drift, no alert");

    // A namespaced and a cluster-scoped object drift.
    agent.state.set_drifted(vec![
        drifted("Deployment", Some("web"), "api"),
        drifted("Deployment", Some("web"), "worker"),
        drifted("ClusterRole", None, "reader"),
    ]);
    let firing = eventually("GitOpsDriftDetected to fire for both kinds", || async {
        let alerts = drift_alerts(prometheus.alerts().await);
        (alerts.len() == 2 && alerts.iter().all(|(_, state, _)| state == "firing")).then_some(alerts)
    })
    .await;
    let firing: Vec<&BTreeMap<String, String>> = firing.iter().map(|(_, _, labels)| labels).collect();
    assert_eq!(
        firing,
        [
            &labels(&[("alertname", "GitOpsDriftDetected"), ("kind", "ClusterRole"), ("severity", "warning")]),
            &labels(&[
                ("alertname", "GitOpsDriftDetected"),
                ("kind", "Deployment"),
                ("namespace", "web"),
                ("severity", "warning")
            ]),
        ]
    );

    // Git and the cluster agree again: the alert resolves.
    agent.state.set_drifted(vec![]);
    eventually("GitOpsDriftDetected to resolve", || async {
        drift_alerts(prometheus.alerts().await).is_empty().then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_degraded_revision_fires_its_alert_and_the_healthy_revert_resolves_it() {
    let agent = AgentServer::start().await;
    let (bad, revert) = ("0123456789abcdef0123456789abcdef01234567", "89abcdef0123456789abcdef0123456789abcdef");
    agent.state.record(synced(bad), Duration::from_secs(1)).await;
    agent.state.set_health(bad, HealthStatus::Progressing, vec![], [("Deployment", HealthStatus::Progressing)]);

    // The rules with `for: 1s` instead of 2 minutes.
    let rules = read(&rules_file());
    assert!(rules.contains("for: 2m"), "the rules file has no `for: 2m` any more");
    let dir = tempfile::tempdir().unwrap();
    let quick_rules = dir.path().join("quick.rules.yaml");
    std::fs::write(&quick_rules, rules.replace("for: 2m", "for: 1s")).unwrap();
    let prometheus = Prometheus::start(std::slice::from_ref(&agent.address), &[quick_rules]).await;
    prometheus.wait_for_targets_up().await;
    rules_evaluated_without_error(&prometheus).await;
    let degraded_alerts = |alerts: Vec<Alert>| -> Vec<Alert> {
        alerts.into_iter().filter(|(name, _, _)| name == "GitOpsRevisionDegraded").collect()
    };
    assert_eq!(degraded_alerts(prometheus.alerts().await), [], "progressing, no alert");

    let web = unhealthy("Deployment", "web", HealthStatus::Degraded);
    agent.state.set_health(bad, HealthStatus::Degraded, vec![web], [("Deployment", HealthStatus::Degraded)]);
    eventually("GitOpsRevisionDegraded to fire for the revision", || async {
        let alerts = degraded_alerts(prometheus.alerts().await);
        let expected = labels(&[("alertname", "GitOpsRevisionDegraded"), ("revision", bad), ("severity", "warning")]);
        (alerts.len() == 1 && alerts[0].1 == "firing" && alerts[0].2 == expected).then_some(())
    })
    .await;

    // `git revert`: the next revision is applied and Healthy.
    agent.state.record(synced(revert), Duration::from_secs(1)).await;
    agent.state.set_health(revert, HealthStatus::Healthy, vec![], [("Deployment", HealthStatus::Healthy)]);
    eventually("GitOpsRevisionDegraded to resolve", || async {
        degraded_alerts(prometheus.alerts().await).is_empty().then_some(())
    })
    .await;
}

#[test]
fn the_dashboard_configmap_holds_the_dashboard_for_grafanas_sidecar() {
    // Rendered as the agent renders a repository, so it is also a valid object.
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("manifests")).unwrap();
    std::fs::copy(repo_root().join("manifests/dashboards/gitops-agent.yaml"), root.path().join("manifests/d.yaml"))
        .unwrap();
    let objects = gitops_agent::render::render(root.path(), "monitoring").unwrap_or_else(|e| panic!("{e:?}")).manifests;
    let [configmap] = objects.as_slice() else { panic!("one object, got {}", objects.len()) };
    assert_eq!(configmap.kind(), "ConfigMap");
    assert_eq!(configmap.object["metadata"]["labels"]["grafana_dashboard"], "1");
    let embedded: Value =
        serde_json::from_str(configmap.object["data"]["gitops-agent.json"].as_str().unwrap()).unwrap();
    assert_eq!(embedded, dashboard(), "regenerate manifests/dashboards/gitops-agent.yaml from the JSON");
}

/// The dashboards a user starts with (`repo-template/dashboards/`): every Prometheus
/// query is one Prometheus accepts, and names only metrics the agent exports where it
/// names the agent's. (Their SQL panels are run against the job's tables by the Scale
/// pipeline's tests.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_repo_templates_dashboards_query_prometheus_correctly() {
    let agent = AgentServer::start().await;
    // Labelled metrics are exported once they have a series.
    agent.state.metrics.batch_run_triggered("midi-batch");
    agent.state.metrics.batch_run_finished("midi-batch", BatchOutcome::Succeeded, Duration::from_secs(60));
    let exported = exported_families(&agent.metrics().await);
    let prometheus = Prometheus::start(&[], &[]).await;
    let dir = repo_root().join("repo-template/dashboards");
    let mut checked = 0;
    for entry in std::fs::read_dir(dir.join("scale")).unwrap() {
        let path = entry.unwrap().path();
        let dashboard: Value = serde_json::from_str(&read(&path)).unwrap();
        for panel in panels(&dashboard) {
            for target in panel["targets"].as_array().into_iter().flatten() {
                let Some(expr) = target["expr"].as_str() else { continue }; // SQL
                let title = panel["title"].as_str().unwrap_or_default();
                for metric in metric_names(expr) {
                    assert!(exported.contains(&metric), "{}: {title}: the agent exports no {metric}", path.display());
                }
                // The job picker's value, as Grafana fills it in.
                let expr = as_grafana_sends_it(&expr.replace("$job", "midi-batch"));
                if let Err(error) = prometheus.query(&expr).await {
                    panic!("{}: {title}: Prometheus rejects {expr}: {error}", path.display());
                }
                checked += 1;
            }
        }
    }
    assert!(checked >= 8, "the pipeline's and the pods' panels: {checked}");
}

/// A reconcile that failed with `message` alone.
fn failed(message: &str) -> gitops_agent::status::Outcome {
    use gitops_agent::status::{Cause, ErrorEntry, Outcome};
    let error = ErrorEntry { file: None, line: None, object: None, message: message.to_owned() };
    Outcome::Failed { revision: None, cause: Cause::Sync, errors: vec![error] }
}

/// A reconcile that found `revision` applied.
fn synced(revision: &str) -> gitops_agent::status::Outcome {
    gitops_agent::status::Outcome::Synced { revision: revision.to_owned(), changes: None }
}
