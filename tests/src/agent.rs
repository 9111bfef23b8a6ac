//! The agent running in the test process, against the shared control plane, started by
//! the same [`gitops_agent::agent::Agent::start`] as the binary, with an HTTP client for
//! its endpoints.

use std::path::PathBuf;
use std::time::Duration;

use gitops_agent::access::Access;
use gitops_agent::agent::{LeaderElection, Options};
use gitops_agent::drift::Policy;
use gitops_agent::server::WebhookSecret;
use gitops_agent::source::{AllowedSigners, Credentials, GitSource};
use gitops_agent::sync;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// What to follow and how.
pub struct AgentConfig {
    pub repo: String,
    pub credentials: Credentials,
    /// Objects without a namespace, dashboards, batch runs and the inventory go here.
    pub namespace: String,
    pub interval: Duration,
    pub webhook_secret: Option<String>,
    /// Watch this local repository for commits.
    pub local_repo: Option<PathBuf>,
    pub drift: Policy,
    /// `--health-timeout`.
    pub health_timeout: Duration,
    /// `--allow-namespaces`.
    pub allow_namespaces: Option<Vec<String>>,
    /// `--verify-signatures`: an allowed signers file.
    pub allowed_signers: Option<PathBuf>,
    /// `None`: the only replica.
    pub leader_election: Option<LeaderElection>,
    /// Write the status ConfigMap in `namespace`.
    pub status_report: bool,
    /// kustomize and helm ([`crate::render::tools`] for the built ones).
    pub render: gitops_agent::render::Tools,
}

impl AgentConfig {
    /// Follows `repo` with the agent's defaults, its objects and inventory in
    /// `namespace`, and a poll interval so long that only a webhook or a watched local
    /// repository triggers a fetch within a test.
    pub fn new(repo: String, namespace: &str) -> AgentConfig {
        AgentConfig {
            repo,
            credentials: Credentials::none(),
            namespace: namespace.to_owned(),
            interval: Duration::from_secs(3600),
            webhook_secret: None,
            local_repo: None,
            drift: Policy::Correct,
            health_timeout: Duration::from_secs(300),
            allow_namespaces: None,
            allowed_signers: None,
            leader_election: None,
            status_report: false,
            render: gitops_agent::render::Tools::default(),
        }
    }
}

/// A running agent, with an HTTP client for its endpoints.
pub struct Agent {
    pub base: String,
    client: Client<HttpConnector, Full<Bytes>>,
    /// `None` once stopped; dropping it aborts nothing, so [`Agent::stop`] is the way out.
    agent: Option<gitops_agent::agent::Agent>,
    _work: tempfile::TempDir,
}

impl Agent {
    pub async fn start(client: kube::Client, config: AgentConfig) -> Agent {
        let work = tempfile::tempdir().unwrap();
        let webhook_secret = config.webhook_secret.map(|secret| {
            let path = work.path().join("webhook-secret");
            std::fs::write(&path, secret).unwrap();
            WebhookSecret::from_file(&path).unwrap()
        });
        let source = GitSource::new(&config.repo, "main", config.credentials);
        let options = Options {
            source: match &config.allowed_signers {
                Some(path) => source.verify_signatures(AllowedSigners::from_file(path).unwrap()),
                None => source,
            },
            branch: "main".to_owned(),
            path: ".".into(),
            interval: config.interval,
            work_dir: work.path().to_owned(),
            local_repo: config.local_repo,
            sync: sync::Options {
                default_namespace: config.namespace.clone(),
                prune: true,
                force_conflicts: true,
                inventory_namespace: config.namespace.clone(),
                dashboards_namespace: config.namespace.clone(),
                access: Access::new(config.allow_namespaces),
            },
            drift: config.drift,
            health_timeout: config.health_timeout,
            webhook_secret,
            leader_election: config.leader_election,
            status_report: config.status_report,
            render: config.render,
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let agent = gitops_agent::agent::Agent::start(client, listener, options).await.expect("the agent starts");
        Agent {
            base: format!("http://{}", agent.address()),
            client: Client::builder(TokioExecutor::new()).build_http(),
            agent: Some(agent),
            _work: work,
        }
    }

    /// What the agent rendered and took from its render cache so far.
    pub fn render_stats(&self) -> gitops_agent::render::RenderStats {
        self.agent.as_ref().expect("running").render_stats()
    }

    /// Sends a request and returns the status code and body.
    pub async fn request(&self, method: Method, path: &str, headers: &[(&str, &str)], body: &str) -> (u16, String) {
        let mut request = Request::builder().method(method).uri(format!("{}{path}", self.base));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response =
            self.client.request(request.body(Full::new(Bytes::from(body.to_owned()))).unwrap()).await.unwrap();
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        self.request(Method::GET, path, &[], "").await
    }

    /// `/status` as JSON.
    pub async fn status(&self) -> serde_json::Value {
        serde_json::from_str(&self.get("/status").await.1).unwrap()
    }

    /// The value of a metric series without labels beyond `labels` (e.g.
    /// `gitops_sync_total{result="failure"}`), 0 when absent.
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.get("/metrics").await.1;
        text.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok()).unwrap_or(0.0)
    }

    /// Waits until `/status` says the agent has applied `commit`.
    pub async fn applied(&self, commit: &str) {
        crate::cluster::eventually(&format!("the agent to apply {commit}"), || async {
            (self.status().await["revision"] == commit).then_some(())
        })
        .await;
    }

    /// Tells the agent about a push, as a forge's webhook does.
    pub async fn trigger(&self) {
        assert_eq!(self.request(Method::POST, "/hooks/git", &[], "{}").await.0, 202, "webhook accepted");
    }

    /// [`Self::trigger`], then waits until the agent has applied `commit`.
    pub async fn trigger_and_wait(&self, commit: String) {
        self.trigger().await;
        self.applied(&commit).await;
    }

    /// Stops the loop after its current sync, releases the Lease, and stops the server.
    pub async fn stop(mut self) {
        if let Some(agent) = self.agent.take() {
            agent.stop().await;
        }
    }
}

/// A GitHub push webhook for `main`, signed with `secret`: the body and its headers.
pub fn github_push(secret: &str) -> (String, Vec<(&'static str, String)>) {
    use hmac::{Hmac, Mac};
    let body = r#"{"ref":"refs/heads/main"}"#.to_owned();
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body.as_bytes());
    let signature = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    (body, vec![("X-Hub-Signature-256", signature), ("X-GitHub-Event", "push".to_owned())])
}

/// `gitops-agent`, built by cargo into the target directory the calling test runs from.
pub fn binary() -> std::path::PathBuf {
    let status =
        std::process::Command::new(env!("CARGO")).args(["build", "-q", "-p", "gitops-agent"]).status().unwrap();
    assert!(status.success(), "building gitops-agent");
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().join("gitops-agent")
}
