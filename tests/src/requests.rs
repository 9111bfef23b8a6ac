//! The API server's own count of the requests it served (`apiserver_request_total` on
//! its `/metrics`), for tests and benchmarks that check what the agent asks of it. The
//! counters are the whole server's: compare two scrapes of a control plane nobody else
//! uses.

use std::collections::BTreeMap;

use anyhow::Result;

/// The API server's `apiserver_request_total`, by (verb, resource, dry run).
#[derive(Debug, Clone, Default)]
pub struct Requests(pub BTreeMap<(String, String, bool), u64>);

impl Requests {
    pub async fn scrape(client: &kube::Client) -> Result<Requests> {
        let mut counts = BTreeMap::new();
        for line in metrics(client).await?.lines().filter(|l| l.starts_with("apiserver_request_total{")) {
            let verb = label(line, "verb").unwrap_or_default().to_owned();
            let resource = label(line, "resource").unwrap_or_default().to_owned();
            let dry_run = label(line, "dry_run").is_some_and(|d| !d.is_empty());
            *counts.entry((verb, resource, dry_run)).or_default() += value(line) as u64;
        }
        Ok(Requests(counts))
    }

    /// What `later` counted that `self` had not.
    pub fn since(&self, earlier: &Requests) -> Requests {
        let mut counts = BTreeMap::new();
        for (key, value) in &self.0 {
            let delta = value.saturating_sub(earlier.0.get(key).copied().unwrap_or(0));
            if delta > 0 {
                counts.insert(key.clone(), delta);
            }
        }
        Requests(counts)
    }

    /// Requests whose resource is one of `resources`.
    pub fn only(&self, resources: &[&str]) -> Requests {
        Requests(
            self.0
                .iter()
                .filter(|((_, r, _), _)| resources.contains(&r.as_str()))
                .map(|(k, v)| (k.clone(), *v))
                .collect(),
        )
    }

    /// Counts by verb, dry runs as `VERB (dry run)`.
    pub fn by_verb(&self) -> BTreeMap<String, u64> {
        let mut verbs = BTreeMap::new();
        for ((verb, _, dry_run), count) in &self.0 {
            let key = if *dry_run { format!("{verb} (dry run)") } else { verb.clone() };
            *verbs.entry(key).or_default() += count;
        }
        verbs
    }

    pub fn count(&self, verb: &str) -> u64 {
        self.0.iter().filter(|((v, _, _), _)| v == verb).map(|(_, count)| count).sum()
    }
}

/// Watches of `resource` the API server is serving now (`apiserver_longrunning_requests`).
pub async fn open_watches(client: &kube::Client, resource: &str) -> Result<u64> {
    Ok(metrics(client)
        .await?
        .lines()
        .filter(|l| l.starts_with("apiserver_longrunning_requests{"))
        .filter(|l| label(l, "resource") == Some(resource) && label(l, "verb") == Some("WATCH"))
        .map(value)
        .sum::<f64>() as u64)
}

/// The API server's `/metrics`, in Prometheus text format.
async fn metrics(client: &kube::Client) -> Result<String> {
    let request = http::Request::get("/metrics").body(Vec::new())?;
    Ok(client.request_text(request).await?)
}

/// The value of label `name` in one sample line.
fn label<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let start = format!("{name}=\"");
    line.split_once(&start).and_then(|(_, rest)| rest.split_once('"')).map(|(v, _)| v)
}

/// One sample line's value; 0 when unreadable.
fn value(line: &str) -> f64 {
    line.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or(0.0)
}

/// The requests one client sent, counted as they leave it: for telling apart the
/// requests of two agents that share an API server (and so its counters).
#[derive(Debug, Default)]
pub struct Sent {
    /// Writes (create, update, patch, delete) of anything but Leases, which leader
    /// election itself renews.
    pub writes: std::sync::atomic::AtomicU64,
    /// Dry-run writes: what the agent checks, not what it changes.
    pub dry_runs: std::sync::atomic::AtomicU64,
}

impl Sent {
    pub fn writes(&self) -> u64 {
        self.writes.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn dry_runs(&self) -> u64 {
        self.dry_runs.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn count(&self, request: &http::Request<kube::client::Body>) {
        use std::sync::atomic::Ordering::SeqCst;
        let write = [http::Method::POST, http::Method::PUT, http::Method::PATCH, http::Method::DELETE]
            .contains(request.method());
        let uri = request.uri();
        if !write || uri.path().contains("/apis/coordination.k8s.io/") {
            return;
        }
        if uri.query().is_some_and(|q| q.split('&').any(|p| p == "dryRun=All")) {
            self.dry_runs.fetch_add(1, SeqCst);
        } else {
            self.writes.fetch_add(1, SeqCst);
        }
    }
}

/// A client for the cluster of `kubeconfig` that counts what it sends in the [`Sent`].
pub async fn counting_client(kubeconfig: &std::path::Path) -> (kube::Client, std::sync::Arc<Sent>) {
    let kubeconfig = kube::config::Kubeconfig::read_from(kubeconfig).expect("reading the kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
        .await
        .expect("a client configuration from the kubeconfig");
    let sent = std::sync::Arc::new(Sent::default());
    let counter = sent.clone();
    let layer = tower::util::MapRequestLayer::new(move |request: http::Request<kube::client::Body>| {
        counter.count(&request);
        request
    });
    let client = kube::client::ClientBuilder::try_from(config).expect("a client stack").with_layer(&layer).build();
    (client, sent)
}
