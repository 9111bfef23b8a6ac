//! The agent's HTTP endpoints, on the `--listen` address.
//!
//! Input: a bound listener and the shared [`AppState`], which the sync loop keeps up to
//! date through its `record` and `set_*` methods.
//! Output: `/metrics` (Prometheus text), `/healthz` (the process runs), `/readyz` (a sync
//! has succeeded, or this replica stands by for the leader), `/status` (JSON, see
//! [`crate::status::Status`]) and `/hooks/git`: a push webhook from GitHub, Gitea or GitLab that, once authenticated, wakes the sync loop
//! ([`AppState::fetch_requested`]) instead of letting it wait for the next poll.
//! Anything else is 404.

use std::convert::Infallible;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderMap, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use serde::Deserialize;
use sha2::Sha256;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::status::AppState;

/// Push payloads are a few KiB; anything much larger is not a push webhook.
const MAX_WEBHOOK_BODY: usize = 1024 * 1024;

/// How long shutdown waits for in-flight requests before dropping them, so a stalled
/// client cannot hold the process up.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------
// Serving

/// Serves HTTP/1 on `listener` until `shutdown` completes, then lets in-flight requests
/// finish (up to [`SHUTDOWN_GRACE`]) and returns.
pub async fn serve(listener: TcpListener, state: Arc<AppState>, shutdown: impl Future<Output = ()>) {
    let graceful = GracefulShutdown::new();
    let mut shutdown = pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(connection) => connection,
                Err(error) => {
                    // Accept errors concern one connection or are transient (out of
                    // file descriptors); pausing keeps the latter from spinning.
                    warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let state = Arc::clone(&state);
        let service = service_fn(move |request| {
            let state = Arc::clone(&state);
            async move { Ok::<_, Infallible>(route(&state, request).await) }
        });
        // The timer enables hyper's header read timeout, so idle or slow clients cannot
        // hold connections open forever.
        let connection = http1::Builder::new().timer(TokioTimer::new()).serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                debug!(%peer, %error, "connection ended with an error");
            }
        });
    }
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown()).await.is_err() {
        warn!(grace = ?SHUTDOWN_GRACE, "dropping connections still open after shutdown");
    }
}

async fn route(state: &AppState, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let response = match (&method, path.as_str()) {
        (&Method::GET, "/metrics") => respond(StatusCode::OK, crate::metrics::CONTENT_TYPE, state.metrics.encode()),
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok"),
        (&Method::GET, "/readyz") if state.is_ready() => text(StatusCode::OK, "ready"),
        (&Method::GET, "/readyz") => text(StatusCode::SERVICE_UNAVAILABLE, "not ready: no successful sync yet"),
        (&Method::GET, "/status") => status_json(state),
        (&Method::POST, "/hooks/git") => git_hook(state, request).await,
        (_, "/metrics" | "/healthz" | "/readyz" | "/status") => method_not_allowed("GET"),
        (_, "/hooks/git") => method_not_allowed("POST"),
        _ => text(StatusCode::NOT_FOUND, "not found"),
    };
    debug!(%method, path, status = response.status().as_u16(), "request");
    response
}

fn status_json(state: &AppState) -> Response<Full<Bytes>> {
    match serde_json::to_string(&*state.status()) {
        Ok(json) => respond(StatusCode::OK, "application/json", json),
        Err(error) => {
            warn!(%error, "serializing the status failed");
            text(StatusCode::INTERNAL_SERVER_ERROR, "cannot serialize the status")
        }
    }
}

/// Checks the webhook's signature, then wakes the sync loop unless the push is for
/// another branch. The payload is parsed only once authenticated.
async fn git_hook(state: &AppState, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = request.into_parts();
    let body = match Limited::new(body, MAX_WEBHOOK_BODY).collect().await {
        Ok(body) => body.to_bytes(),
        Err(error) if error.is::<LengthLimitError>() => {
            warn!(limit = MAX_WEBHOOK_BODY, "rejected webhook: body too large");
            return text(StatusCode::PAYLOAD_TOO_LARGE, "payload too large");
        }
        Err(error) => {
            warn!(%error, "reading the webhook body failed");
            return text(StatusCode::BAD_REQUEST, "cannot read the body");
        }
    };
    if let Some(secret) = &state.webhook_secret
        && let Err(error) = secret.verify(&parts.headers, &body)
    {
        warn!(reason = %error, "rejected webhook");
        return text(StatusCode::UNAUTHORIZED, &error.to_string());
    }
    let pushed = pushed_ref(&body);
    // Tags and other refs keep their full name, so they never equal the branch.
    let pushed_branch = pushed.as_deref().map(|r| r.strip_prefix("refs/heads/").unwrap_or(r));
    match pushed_branch {
        Some(other) if other != state.branch => {
            info!(pushed = other, branch = %state.branch, "ignored push to another branch");
            text(StatusCode::OK, &format!("ignored: branch {other}"))
        }
        // No `ref` (a ping, a form-encoded payload): fetching anyway is cheap and safe.
        _ => {
            info!(branch = %state.branch, "webhook triggered a fetch");
            state.fetch_now.notify_one();
            text(StatusCode::ACCEPTED, "fetch triggered")
        }
    }
}

/// The `ref` a push payload names (`refs/heads/BRANCH`), if the body is JSON and has one.
fn pushed_ref(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Push {
        #[serde(rename = "ref")]
        pushed: Option<String>,
    }
    serde_json::from_slice::<Push>(body).ok()?.pushed
}

fn method_not_allowed(allowed: &'static str) -> Response<Full<Bytes>> {
    let mut response = text(StatusCode::METHOD_NOT_ALLOWED, &format!("method not allowed: use {allowed}"));
    response.headers_mut().insert(hyper::header::ALLOW, HeaderValue::from_static(allowed));
    response
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    respond(status, "text/plain; charset=utf-8", body.to_owned())
}

fn respond(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

// ---------------------------------------------------------------------------------------
// Webhook authentication

type HmacSha256 = Hmac<Sha256>;

/// The shared secret of push webhooks (`--webhook-secret-file`). Its `Debug` hides it.
pub struct WebhookSecret(Vec<u8>);

impl std::fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WebhookSecret(..)")
    }
}

/// Why `--webhook-secret-file` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read the webhook secret file {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("the webhook secret file {path} is empty")]
    Empty { path: PathBuf },
}

/// Why a webhook was refused. The messages go back to the caller and into the logs, so
/// they never include the secret or the signature received.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
enum WebhookError {
    #[error("missing signature: expected X-Hub-Signature-256, X-Gitea-Signature or X-Gitlab-Token")]
    Missing,
    #[error("malformed signature: expected hex HMAC-SHA256 (GitHub: prefixed with sha256=)")]
    Malformed,
    #[error("signature does not match")]
    Mismatch,
}

impl WebhookSecret {
    /// Reads the secret from `path`, without the trailing newline most editors and
    /// `echo` add (it is never part of the secret configured on the git server).
    pub fn from_file(path: &Path) -> Result<Self, SecretError> {
        let mut secret = std::fs::read(path).map_err(|source| SecretError::Read { path: path.to_owned(), source })?;
        if secret.ends_with(b"\n") {
            secret.pop();
            if secret.ends_with(b"\r") {
                secret.pop();
            }
        }
        if secret.is_empty() {
            return Err(SecretError::Empty { path: path.to_owned() });
        }
        Ok(Self(secret))
    }

    /// Checks the first signature header present, in this order:
    /// - GitHub `X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the body>` (recent Gitea
    ///   versions send it too),
    /// - Gitea `X-Gitea-Signature: <hex HMAC-SHA256 of the body>`,
    /// - GitLab `X-Gitlab-Token: <the secret itself>`.
    fn verify(&self, headers: &HeaderMap, body: &[u8]) -> Result<(), WebhookError> {
        let header = |name: &str| headers.get(name).map(|value| value.as_bytes());
        if let Some(signature) = header("x-hub-signature-256") {
            let hex = signature.strip_prefix(b"sha256=").ok_or(WebhookError::Malformed)?;
            self.verify_hmac(hex, body)
        } else if let Some(signature) = header("x-gitea-signature") {
            self.verify_hmac(signature, body)
        } else if let Some(token) = header("x-gitlab-token") {
            // Comparing MACs of both tokens takes the same time whatever the token's
            // length or content, so timing reveals nothing about the secret.
            let expected = self.mac(&self.0).finalize().into_bytes();
            self.mac(token).verify_slice(&expected).map_err(|_| WebhookError::Mismatch)
        } else {
            Err(WebhookError::Missing)
        }
    }

    fn verify_hmac(&self, hex_signature: &[u8], body: &[u8]) -> Result<(), WebhookError> {
        let signature = hex::decode(hex_signature).map_err(|_| WebhookError::Malformed)?;
        // verify_slice compares in constant time.
        self.mac(body).verify_slice(&signature).map_err(|_| WebhookError::Mismatch)
    }

    fn mac(&self, message: &[u8]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC accepts keys of any length");
        mac.update(message);
        mac
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"It's a Secret to Everybody";
    const BODY: &[u8] = b"Hello, World!";
    /// GitHub's documented example: HMAC-SHA256 of BODY keyed with SECRET.
    const BODY_HMAC: &str = "757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";

    fn verify(headers: &[(&'static str, &str)]) -> Result<(), WebhookError> {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.insert(*name, value.parse().unwrap());
        }
        WebhookSecret(SECRET.to_vec()).verify(&map, BODY)
    }

    #[test]
    fn github_signature() {
        let good = format!("sha256={BODY_HMAC}");
        assert_eq!(verify(&[("x-hub-signature-256", &good)]), Ok(()));
        let bad = format!("sha256={}", BODY_HMAC.replace('7', "8"));
        assert_eq!(verify(&[("x-hub-signature-256", &bad)]), Err(WebhookError::Mismatch));
        assert_eq!(verify(&[("x-hub-signature-256", BODY_HMAC)]), Err(WebhookError::Malformed));
        assert_eq!(verify(&[("x-hub-signature-256", "sha256=xyz")]), Err(WebhookError::Malformed));
    }

    #[test]
    fn gitea_signature() {
        assert_eq!(verify(&[("x-gitea-signature", BODY_HMAC)]), Ok(()));
        let truncated = &BODY_HMAC[..32];
        assert_eq!(verify(&[("x-gitea-signature", truncated)]), Err(WebhookError::Mismatch));
        assert_eq!(verify(&[("x-gitea-signature", "not hex")]), Err(WebhookError::Malformed));
    }

    #[test]
    fn gitlab_token() {
        assert_eq!(verify(&[("x-gitlab-token", "It's a Secret to Everybody")]), Ok(()));
        assert_eq!(verify(&[("x-gitlab-token", "It's a Secret")]), Err(WebhookError::Mismatch));
        assert_eq!(verify(&[("x-gitlab-token", "")]), Err(WebhookError::Mismatch));
    }

    #[test]
    fn missing_signature() {
        assert_eq!(verify(&[]), Err(WebhookError::Missing));
        assert_eq!(verify(&[("x-hub-signature", "sha1=00")]), Err(WebhookError::Missing));
    }

    #[test]
    fn secret_file_loses_one_trailing_newline_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, b" s3cret \r\n").unwrap();
        assert_eq!(WebhookSecret::from_file(&path).unwrap().0, b" s3cret ");
        std::fs::write(&path, b"\n").unwrap();
        assert!(matches!(WebhookSecret::from_file(&path), Err(SecretError::Empty { .. })));
        assert!(matches!(WebhookSecret::from_file(&dir.path().join("absent")), Err(SecretError::Read { .. })));
    }

    #[test]
    fn secret_debug_hides_the_secret() {
        assert_eq!(format!("{:?}", WebhookSecret(SECRET.to_vec())), "WebhookSecret(..)");
    }

    #[test]
    fn pushed_ref_from_payloads() {
        assert_eq!(pushed_ref(br#"{"ref":"refs/heads/main","after":"abc"}"#).as_deref(), Some("refs/heads/main"));
        assert_eq!(pushed_ref(br#"{"zen":"ping"}"#), None);
        assert_eq!(pushed_ref(b"payload=%7B%7D"), None);
    }
}
