//! Debian's Prometheus (`/usr/bin/prometheus`, package `prometheus`) for tests: a server
//! of the test's own on a free loopback port, with a temporary TSDB, scraping the given
//! targets as job `gitops-agent` every second and evaluating the given rule files every
//! second; and an HTTP client for its API.
//!
//! It runs in a process group of its own, tied to the test process (the bootstrap's
//! [`Process`] with [`Lifetime::TiedToThisProcess`]): dropping the fixture stops it, and
//! the kernel kills it if the test process dies, even by SIGKILL.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use gitops_bootstrap::local::{Lifetime, Process};
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tempfile::TempDir;

use crate::cluster::eventually;

/// Debian's Prometheus server.
pub const PROMETHEUS: &str = "/usr/bin/prometheus";
/// Debian's promtool, from the same package.
pub const PROMTOOL: &str = "/usr/bin/promtool";
/// The scrape job of the agent, as the alert rules and the dashboard expect it.
pub const JOB: &str = "gitops-agent";
/// The namespace the fixture gives its targets as a target label, as a ServiceMonitor
/// scrape gives the namespace of the agent's pod.
pub const TARGET_NAMESPACE: &str = "gitops-system";

/// An alert from `/api/v1/alerts`: name, state (`pending` or `firing`) and labels
/// (`alertname` included).
pub type Alert = (String, String, BTreeMap<String, String>);

/// A running Prometheus; stopped when dropped.
pub struct Prometheus {
    /// `http://127.0.0.1:PORT`
    pub base: String,
    process: Process,
    client: Client<HttpConnector, Full<Bytes>>,
    targets: usize,
    _dir: TempDir,
}

impl Prometheus {
    /// Starts Prometheus scraping `targets` (`HOST:PORT`, path `/metrics`) as job
    /// [`JOB`] and loading `rule_files`, and returns once it is ready to serve queries.
    /// Panics with its log if it exits or does not get ready.
    ///
    /// The scrape keeps the agent's own `job` and `namespace` labels (`honor_labels`),
    /// as the alert rules require (see manifests/alerts/gitops-agent.rules.yaml).
    pub async fn start(targets: &[String], rule_files: &[PathBuf]) -> Prometheus {
        assert!(
            Path::new(PROMETHEUS).exists(),
            "{PROMETHEUS} is missing: install Debian's prometheus package (apt-get install prometheus)"
        );
        let dir = tempfile::tempdir().expect("temp dir for prometheus");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(&config, config_file(targets, rule_files)).expect("writing prometheus.yml");
        let client = Client::builder(TokioExecutor::new()).build_http();
        // Another process may take the free port before Prometheus binds it: then try another.
        for attempt in 1.. {
            let port = free_port();
            let base = format!("http://127.0.0.1:{port}");
            let args = vec![
                format!("--config.file={}", config.display()),
                format!("--storage.tsdb.path={}", dir.path().join("data").display()),
                format!("--web.listen-address=127.0.0.1:{port}"),
                "--web.enable-lifecycle".to_owned(),
            ];
            let process =
                Process::spawn(dir.path(), "prometheus", Path::new(PROMETHEUS), &args, Lifetime::TiedToThisProcess)
                    .unwrap_or_else(|e| panic!("starting {PROMETHEUS}: {e}"));
            match wait_ready(&client, &base, &process).await {
                Ok(()) => return Prometheus { base, process, client, targets: targets.len(), _dir: dir },
                Err(log) => {
                    process.stop();
                    if attempt < 3 && log.contains("address already in use") {
                        continue;
                    }
                    panic!("prometheus did not get ready; its log:\n{log}");
                }
            }
        }
        unreachable!("the loop returns or panics")
    }

    /// `GET path`: the status code and body; `Err` if the request fails.
    async fn try_get(&self, path: &str) -> Result<(u16, String), String> {
        get(&self.client, &format!("{}{path}", self.base)).await
    }

    /// `GET path` of the API, parsed: the `data` of a `success`, or the error message.
    async fn api(&self, path: &str) -> Result<Value, String> {
        let (status, body) = self.try_get(path).await?;
        let json: Value = serde_json::from_str(&body).map_err(|e| format!("HTTP {status}, not JSON ({e}): {body}"))?;
        if json["status"] == "success" {
            Ok(json["data"].clone())
        } else {
            Err(format!("HTTP {status}: {}: {}", json["errorType"], json["error"]))
        }
    }

    /// Evaluates the PromQL `expr` now (`/api/v1/query`): the `data` of the answer
    /// (`resultType` and `result`), or Prometheus' error message (a parse error, an
    /// unknown function, a type error, ...).
    pub async fn query(&self, expr: &str) -> Result<Value, String> {
        self.api(&format!("/api/v1/query?query={}", url_encode(expr))).await
    }

    /// The alerts now pending or firing (`/api/v1/alerts`), sorted.
    pub async fn alerts(&self) -> Vec<Alert> {
        let data = self.api("/api/v1/alerts").await.unwrap_or_else(|e| panic!("GET /api/v1/alerts: {e}"));
        let mut alerts: Vec<Alert> = data["alerts"]
            .as_array()
            .expect("alerts is an array")
            .iter()
            .map(|alert| {
                let labels: BTreeMap<String, String> =
                    serde_json::from_value(alert["labels"].clone()).expect("alert labels are a map of strings");
                let name = labels.get("alertname").cloned().unwrap_or_default();
                (name, alert["state"].as_str().unwrap_or_default().to_owned(), labels)
            })
            .collect();
        alerts.sort();
        alerts
    }

    /// The rule groups as Prometheus loaded them (`/api/v1/rules`), with each rule's
    /// `health` (`unknown` until evaluated, then `ok` or `err`) and `lastError`.
    pub async fn rule_groups(&self) -> Vec<Value> {
        let data = self.api("/api/v1/rules").await.unwrap_or_else(|e| panic!("GET /api/v1/rules: {e}"));
        data["groups"].as_array().cloned().unwrap_or_default()
    }

    /// Waits until every target has been scraped successfully (health `up`).
    pub async fn wait_for_targets_up(&self) {
        let what = format!("all {} target(s) of {} to be up", self.targets, self.base);
        eventually(&what, || async {
            let data = self.api("/api/v1/targets").await.ok()?;
            let active = data["activeTargets"].as_array()?;
            (active.len() == self.targets && active.iter().all(|t| t["health"] == "up")).then_some(())
        })
        .await;
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        // SIGTERM to the process group, SIGKILL after a grace period, then reaped.
        self.process.stop();
    }
}

/// Waits until `/-/ready` answers 200, or returns the tail of the log if the process
/// exits or a minute passes.
async fn wait_ready(client: &Client<HttpConnector, Full<Bytes>>, base: &str, process: &Process) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = process.exited() {
            return Err(format!("exited: {status}\n{}", process.log_tail(40)));
        }
        if Instant::now() > deadline {
            return Err(format!("not ready after a minute\n{}", process.log_tail(40)));
        }
        if matches!(get(client, &format!("{base}/-/ready")).await, Ok((200, _))) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `GET url`: the status code and body; `Err` if the request fails.
async fn get(client: &Client<HttpConnector, Full<Bytes>>, url: &str) -> Result<(u16, String), String> {
    let request = Request::get(url).body(Full::new(Bytes::new())).expect("a GET request builds");
    let response = client.request(request).await.map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// prometheus.yml: one scrape job, the rules, everything every second.
fn config_file(targets: &[String], rule_files: &[PathBuf]) -> String {
    let quote = |s: &str| serde_json::to_string(s).expect("strings serialize");
    let targets: Vec<String> = targets.iter().map(|t| quote(t)).collect();
    let rules: Vec<String> = rule_files.iter().map(|f| quote(&f.display().to_string())).collect();
    format!(
        "global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files: [{rules}]
scrape_configs:
  - job_name: {JOB}
    honor_labels: true
    static_configs:
      - targets: [{targets}]
        labels:
          namespace: {TARGET_NAMESPACE}
",
        rules = rules.join(", "),
        targets = targets.join(", "),
    )
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A loopback port nobody listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("binding a free loopback port")
        .port()
}
