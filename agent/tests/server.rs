//! The HTTP endpoints over real loopback TCP, used the way Prometheus, Kubernetes probes,
//! dashboards and git servers use them.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use gitops_agent::metrics::BatchOutcome;
use gitops_agent::server::{self, WebhookSecret};
use gitops_agent::status::{AppState, BatchRun, DriftedObject};
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use sha2::Sha256;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::timeout;

const SECRET: &str = "hook-secret";
const PUSH_TO_MAIN: &str = r#"{"ref":"refs/heads/main","after":"0123abcd"}"#;

/// A server on 127.0.0.1 and a client for it.
struct Agent {
    base: String,
    state: Arc<AppState>,
    client: Client<HttpConnector, Full<Bytes>>,
    stop: oneshot::Sender<()>,
    server: JoinHandle<()>,
}

impl Agent {
    /// Starts a server following branch `main`, with `secret` (if any) read from a file
    /// the way `--webhook-secret-file` is.
    async fn start(secret: Option<&str>) -> Self {
        let secret = secret.map(|secret| {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("webhook-secret");
            std::fs::write(&path, format!("{secret}\n")).unwrap();
            WebhookSecret::from_file(&path).unwrap()
        });
        let state = Arc::new(AppState::new("main", secret));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel();
        let server = tokio::spawn(server::serve(listener, Arc::clone(&state), async {
            let _ = stopped.await;
        }));
        let client = Client::builder(TokioExecutor::new()).build_http();
        Self { base, state, client, stop, server }
    }

    async fn send(&self, method: Method, path: &str, headers: &[(&str, &str)], body: &str) -> (StatusCode, String) {
        let mut request = Request::builder().method(method).uri(format!("{}{path}", self.base));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(Full::new(Bytes::from(body.to_owned()))).unwrap();
        let response = self.client.request(request).await.unwrap();
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    async fn get(&self, path: &str) -> (StatusCode, String) {
        self.send(Method::GET, path, &[], "").await
    }

    async fn hook(&self, headers: &[(&str, &str)], body: &str) -> (StatusCode, String) {
        self.send(Method::POST, "/hooks/git", headers, body).await
    }

    /// Whether the sync loop was woken. A webhook notifies before it responds, so a short
    /// wait is enough to tell "not notified".
    async fn fetch_was_requested(&self) -> bool {
        timeout(Duration::from_millis(300), self.state.fetch_requested()).await.is_ok()
    }
}

fn hex_hmac(body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(body.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

#[tokio::test]
async fn healthz_unknown_paths_and_wrong_methods() {
    let agent = Agent::start(None).await;
    assert_eq!(agent.get("/healthz").await, (StatusCode::OK, "ok".to_owned()));
    assert_eq!(agent.get("/nope").await.0, StatusCode::NOT_FOUND);
    assert_eq!(agent.send(Method::POST, "/metrics", &[], "").await.0, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(agent.send(Method::DELETE, "/status", &[], "").await.0, StatusCode::METHOD_NOT_ALLOWED);
    let (code, body) = agent.get("/hooks/git").await;
    assert_eq!((code, body.as_str()), (StatusCode::METHOD_NOT_ALLOWED, "method not allowed: use POST"));
}

#[tokio::test]
async fn readyz_turns_ready_after_the_first_successful_sync() {
    let agent = Agent::start(None).await;
    assert_eq!(agent.get("/readyz").await.0, StatusCode::SERVICE_UNAVAILABLE);
    agent.state.record(failed("clone failed"), Duration::from_secs(1)).await;
    assert_eq!(agent.get("/readyz").await.0, StatusCode::SERVICE_UNAVAILABLE);
    agent.state.record(synced("0123abcd"), Duration::from_secs(2)).await;
    assert_eq!(agent.get("/readyz").await.0, StatusCode::OK);
    // A later failure does not make a running agent unready: it still serves the last
    // applied revision.
    agent.state.record(failed("apply failed"), Duration::from_secs(1)).await;
    assert_eq!(agent.get("/readyz").await.0, StatusCode::OK);
}

/// Every metric of the contract: (name, type, label names).
const CONTRACT: &[(&str, &str, &[&str])] = &[
    ("gitops_sync_total", "counter", &["result"]),
    ("gitops_sync_duration_seconds", "histogram", &[]),
    ("gitops_last_sync_success_timestamp_seconds", "gauge", &[]),
    ("gitops_applied_revision_info", "gauge", &["revision"]),
    ("gitops_source_fetch_errors_total", "counter", &[]),
    ("gitops_managed_resources", "gauge", &["kind"]),
    ("gitops_drifted_resources", "gauge", &["kind", "namespace"]),
    ("gitops_drift_detected_total", "counter", &["kind"]),
    ("gitops_drift_corrected_total", "counter", &["kind"]),
    ("gitops_pruned_resources_total", "counter", &["kind"]),
    ("gitops_batch_runs_total", "counter", &["job", "result"]),
    ("gitops_batch_run_duration_seconds", "histogram", &["job"]),
];

/// The label names of each sample line of family `name` (histogram samples without `le`).
fn label_sets(exposition: &str, name: &str, kind: &str) -> Vec<BTreeSet<String>> {
    let suffixes: &[&str] = if kind == "histogram" { &["_bucket", "_sum", "_count"] } else { &[""] };
    exposition
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (sample, _value) = line.rsplit_once(' ')?;
            let (sample_name, labels) = sample.split_once('{').unwrap_or((sample, "}"));
            suffixes.iter().any(|s| sample_name == format!("{name}{s}")).then(|| {
                labels
                    .trim_end_matches('}')
                    .split(',')
                    .filter_map(|pair| pair.split_once('=').map(|(label, _)| label.to_owned()))
                    .filter(|label| label != "le")
                    .collect()
            })
        })
        .collect()
}

#[tokio::test]
async fn metrics_expose_every_contract_metric() {
    let agent = Agent::start(None).await;
    let (state, metrics) = (&agent.state, &agent.state.metrics);
    state.record(failed("boom"), Duration::from_millis(300)).await;
    state.record(synced("aaaa"), Duration::from_secs(3)).await;
    state.record(synced("bbbb"), Duration::from_secs(4)).await;
    metrics.fetch_failed();
    metrics.set_managed(["Deployment", "Deployment", "Service"]);
    state.set_drifted(vec![DriftedObject {
        kind: "Deployment".to_owned(),
        namespace: Some("web".to_owned()),
        name: "front".to_owned(),
        fields: vec!["spec.replicas".to_owned()],
        contested: false,
    }]);
    metrics.drift_detected("Deployment");
    metrics.drift_corrected("Deployment");
    metrics.pruned("ConfigMap");
    metrics.batch_run_triggered("nightly");
    metrics.batch_run_finished("nightly", BatchOutcome::Succeeded, Duration::from_secs(600));
    metrics.batch_run_triggered("nightly");
    metrics.batch_run_finished("nightly", BatchOutcome::Failed, Duration::from_secs(20));

    let request = Request::get(format!("{}/metrics", agent.base)).body(Full::default()).unwrap();
    let response = agent.client.request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/plain; version=0.0.4");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let exposition = String::from_utf8(body.to_vec()).unwrap();

    for (name, kind, labels) in CONTRACT {
        let type_line = format!("# TYPE {name} {kind}");
        assert!(exposition.lines().any(|line| line == type_line), "{name} {kind} missing");
        let help = format!("# HELP {name} ");
        assert!(exposition.lines().any(|line| line.starts_with(&help)), "{name} has no HELP");
        let expected: BTreeSet<String> = labels.iter().map(|label| label.to_string()).collect();
        let found = label_sets(&exposition, name, kind);
        assert!(!found.is_empty(), "{name} has no samples");
        assert!(found.iter().all(|set| *set == expected), "{name}: labels {found:?}, want {expected:?}");
    }
    for sample in [
        "gitops_sync_total{result=\"success\"} 2",
        "gitops_sync_total{result=\"failure\"} 1",
        "gitops_sync_duration_seconds_count 3",
        "gitops_applied_revision_info{revision=\"bbbb\"} 1",
        "gitops_source_fetch_errors_total 1",
        "gitops_managed_resources{kind=\"Deployment\"} 2",
        "gitops_managed_resources{kind=\"Service\"} 1",
        "gitops_drifted_resources{kind=\"Deployment\",namespace=\"web\"} 1",
        "gitops_drift_detected_total{kind=\"Deployment\"} 1",
        "gitops_drift_corrected_total{kind=\"Deployment\"} 1",
        "gitops_pruned_resources_total{kind=\"ConfigMap\"} 1",
        "gitops_batch_runs_total{job=\"nightly\",result=\"triggered\"} 2",
        "gitops_batch_runs_total{job=\"nightly\",result=\"succeeded\"} 1",
        "gitops_batch_runs_total{job=\"nightly\",result=\"failed\"} 1",
        "gitops_batch_run_duration_seconds_bucket{job=\"nightly\",le=\"3600\"} 2",
        "gitops_batch_run_duration_seconds_count{job=\"nightly\"} 2",
    ] {
        assert!(exposition.lines().any(|line| line == sample), "missing `{sample}` in\n{exposition}");
    }
    assert!(!exposition.contains("revision=\"aaaa\""), "a replaced revision is still exposed");
    let timestamp = exposition
        .lines()
        .find_map(|line| line.strip_prefix("gitops_last_sync_success_timestamp_seconds "))
        .and_then(|value| value.parse::<f64>().ok())
        .unwrap();
    assert!(timestamp > 1.7e9, "timestamp {timestamp} is not a recent unix time");
}

#[tokio::test]
async fn status_reports_revision_last_sync_errors_drift_and_runs() {
    let agent = Agent::start(None).await;
    let parse = |body: String| serde_json::from_str::<Value>(&body).unwrap();
    let (code, body) = agent.get("/status").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(
        parse(body),
        json!({"revision": null, "leader": false, "suspended": false, "last_sync": null, "errors": [], "drifted": [], "batch_runs": [], "batch_errors": [], "batch_waiting": [], "health": null, "unhealthy": [], "applied": []})
    );

    agent.state.record(synced("0123abcd"), Duration::from_millis(1500)).await;
    agent.state.set_drifted(vec![DriftedObject {
        kind: "Namespace".to_owned(),
        namespace: None,
        name: "web".to_owned(),
        fields: vec!["metadata.labels.team".to_owned()],
        contested: false,
    }]);
    agent.state.set_batch_runs(vec![
        BatchRun {
            job: "nightly".to_owned(),
            run: "nightly-3".to_owned(),
            revision: "0123abcd".to_owned(),
            result: Some(BatchOutcome::Succeeded),
        },
        BatchRun {
            job: "nightly".to_owned(),
            run: "nightly-4".to_owned(),
            revision: "0123abcd".to_owned(),
            result: None,
        },
    ]);
    agent.state.set_batch_errors(vec!["jobs/spark.yaml:1: job spark: no CRD".to_owned()]);
    let rejected = gitops_agent::apply::ApplyError {
        origin: "manifests/web.yaml:3".to_owned(),
        id: gitops_agent::object::ObjectId {
            group: String::new(),
            kind: "Namespace".to_owned(),
            namespace: String::new(),
            name: "web".to_owned(),
        },
        message: "apply rejected: forbidden".to_owned(),
        not_found: false,
    };
    let error = gitops_agent::sync::SyncError::Apply(vec![rejected]);
    let outcome = gitops_agent::status::Outcome::sync_failed("89abcdef", &error);
    agent.state.record(outcome, Duration::from_millis(250)).await;

    let mut status = parse(agent.get("/status").await.1);
    let time = status["last_sync"]["time"].take();
    let time = time.as_str().unwrap();
    assert!(time.len() == 20 && time.ends_with('Z'), "not RFC 3339 UTC: {time}");
    assert_eq!(
        status,
        json!({
            "revision": "0123abcd",
            "leader": false,
            "suspended": false,
            "last_sync": {"time": null, "result": "failure", "duration_seconds": 0.25},
            "errors": [{
                "file": "manifests/web.yaml", "line": 3, "object": "Namespace web",
                "message": "apply rejected: forbidden",
            }],
            "drifted": [{
                "kind": "Namespace", "namespace": null, "name": "web",
                "fields": ["metadata.labels.team"], "contested": false,
            }],
            "batch_runs": [
                {"job": "nightly", "run": "nightly-3", "revision": "0123abcd", "result": "succeeded"},
                {"job": "nightly", "run": "nightly-4", "revision": "0123abcd", "result": null},
            ],
            "batch_errors": ["jobs/spark.yaml:1: job spark: no CRD"],
            "batch_waiting": [],
            "health": null,
            "unhealthy": [],
            "applied": [],
        })
    );
    agent.state.record(synced("4567ef01"), Duration::from_secs(1)).await;
    let status = parse(agent.get("/status").await.1);
    assert_eq!(status["revision"], "4567ef01");
    assert_eq!(status["last_sync"]["result"], "success");
    assert_eq!(status["errors"], json!([]));
}

#[tokio::test]
async fn signed_webhooks_trigger_a_fetch() {
    let agent = Agent::start(Some(SECRET)).await;
    let github = format!("sha256={}", hex_hmac(PUSH_TO_MAIN));
    let gitea = hex_hmac(PUSH_TO_MAIN);
    for headers in [
        [("x-hub-signature-256", github.as_str())],
        [("x-gitea-signature", gitea.as_str())],
        [("x-gitlab-token", SECRET)],
    ] {
        let (code, _) = agent.hook(&headers, PUSH_TO_MAIN).await;
        assert_eq!(code, StatusCode::ACCEPTED, "{headers:?}");
        assert!(agent.fetch_was_requested().await, "{headers:?} did not trigger a fetch");
    }
}

#[tokio::test]
async fn badly_signed_webhooks_are_refused_without_revealing_the_secret() {
    let agent = Agent::start(Some(SECRET)).await;
    let other_body = format!("sha256={}", hex_hmac("{}"));
    for headers in [
        vec![],
        vec![("x-hub-signature-256", other_body.as_str())],
        vec![("x-hub-signature-256", "sha256=zz")],
        vec![("x-gitea-signature", "00")],
        vec![("x-gitlab-token", "hook-secreT")],
    ] {
        let (code, body) = agent.hook(&headers, PUSH_TO_MAIN).await;
        assert_eq!(code, StatusCode::UNAUTHORIZED, "{headers:?}");
        assert!(!body.is_empty() && !body.contains(SECRET), "{headers:?}: {body}");
        assert!(!agent.fetch_was_requested().await, "{headers:?} triggered a fetch");
    }
}

#[tokio::test]
async fn pushes_to_other_branches_are_ignored() {
    let agent = Agent::start(Some(SECRET)).await;
    for (pushed, shown) in [("refs/heads/feature", "feature"), ("refs/tags/main", "refs/tags/main")] {
        let body = json!({"ref": pushed}).to_string();
        let github = format!("sha256={}", hex_hmac(&body));
        let response = agent.hook(&[("x-hub-signature-256", &github)], &body).await;
        assert_eq!(response, (StatusCode::OK, format!("ignored: branch {shown}")));
        assert!(!agent.fetch_was_requested().await);
    }
}

#[tokio::test]
async fn without_a_secret_any_webhook_triggers_a_fetch() {
    let agent = Agent::start(None).await;
    assert_eq!(agent.hook(&[], PUSH_TO_MAIN).await.0, StatusCode::ACCEPTED);
    assert!(agent.fetch_was_requested().await);
    // GitHub's ping has no ref; fetching is harmless.
    assert_eq!(agent.hook(&[], r#"{"zen":"Keep it simple."}"#).await.0, StatusCode::ACCEPTED);
    assert!(agent.fetch_was_requested().await);
}

#[tokio::test]
async fn oversized_webhooks_are_refused() {
    let agent = Agent::start(None).await;
    let body = "x".repeat(1024 * 1024 + 1);
    assert_eq!(agent.hook(&[], &body).await.0, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(!agent.fetch_was_requested().await);
}

#[tokio::test]
async fn shutdown_stops_the_server() {
    let agent = Agent::start(None).await;
    assert_eq!(agent.get("/healthz").await.0, StatusCode::OK);
    agent.stop.send(()).unwrap();
    timeout(Duration::from_secs(5), agent.server).await.unwrap().unwrap();
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
