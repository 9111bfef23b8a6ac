//! `gitops-bootstrap token --cluster NAME`: the bearer token EKS accepts, made the way
//! aws-iam-authenticator and `aws eks get-token` make it, so no AWS CLI is needed.
//!
//! The token is a presigned STS `GetCallerIdentity` URL that also signs the header
//! `x-k8s-aws-id: NAME`: EKS replays the request to STS to learn who the caller is, and
//! the signed header binds the token to one cluster. It is `k8s-aws-v1.` followed by
//! the URL in unpadded base64url. STS refuses it 15 minutes after signing
//! (X-Amz-Expires=60 is what the authenticators send; EKS allows 15 minutes whatever it
//! says); the ExecCredential says 14, so kubectl asks for a new one in time.

use std::time::{Duration, SystemTime};

use aws_credential_types::provider::ProvideCredentials;
use aws_sigv4::http_request::{SignableBody, SignableRequest, SignatureLocation, SigningSettings, sign};
use aws_sigv4::sign::v4;
use base64::Engine;

use super::{AwsOptions, Error};

/// The header that names the cluster in the signed request.
pub const CLUSTER_HEADER: &str = "x-k8s-aws-id";
pub const TOKEN_PREFIX: &str = "k8s-aws-v1.";
/// The presigned URL's own X-Amz-Expires, as aws-iam-authenticator sends it.
pub const PRESIGN_EXPIRES: Duration = Duration::from_secs(60);
/// When the ExecCredential tells kubectl to fetch a new token: a minute before EKS's
/// 15 minutes run out.
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(14 * 60);

/// A token and when to stop using it.
#[derive(Debug, Clone)]
pub struct Token {
    pub token: String,
    pub expiration: SystemTime,
}

/// The STS endpoint of `region` that EKS validates tokens against: the real regional
/// one, even when the SDK talks to another endpoint (AWS_ENDPOINT_URL), since the
/// cluster, not this process, sends the request.
fn sts_host(region: &str) -> String {
    let suffix = if region.starts_with("cn-") { "amazonaws.com.cn" } else { "amazonaws.com" };
    format!("sts.{region}.{suffix}")
}

/// Signs a token for `cluster` with `credentials` at `now`.
pub fn sign_token(
    cluster: &str,
    region: &str,
    credentials: aws_credential_types::Credentials,
    now: SystemTime,
) -> Result<Token, Error> {
    let url = format!("https://{}/?Action=GetCallerIdentity&Version=2011-06-15", sts_host(region));
    let identity = credentials.into();
    let mut settings = SigningSettings::default();
    settings.signature_location = SignatureLocation::QueryParams;
    settings.expires_in = Some(PRESIGN_EXPIRES);
    let params: aws_sigv4::http_request::SigningParams = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name("sts")
        .time(now)
        .settings(settings)
        .build()
        .map_err(|e| Error::Invalid(format!("signing the EKS token: {e}")))?
        .into();
    let signable =
        SignableRequest::new("GET", url.as_str(), [(CLUSTER_HEADER, cluster)].into_iter(), SignableBody::Bytes(&[]))
            .map_err(|e| Error::Invalid(format!("signing the EKS token: {e}")))?;
    let (instructions, _signature) =
        sign(signable, &params).map_err(|e| Error::Invalid(format!("signing the EKS token: {e}")))?.into_parts();
    let mut request =
        http::Request::get(&url).header(CLUSTER_HEADER, cluster).body(()).expect("a valid URL and header");
    instructions.apply_to_request_http1x(&mut request);
    let presigned = request.uri().to_string();
    Ok(Token {
        token: format!("{TOKEN_PREFIX}{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(presigned)),
        expiration: now + TOKEN_LIFETIME,
    })
}

/// A token for `cluster` with the SDK's credentials (chain, `--profile`, `--region`).
pub async fn token(cluster: &str, options: &AwsOptions) -> Result<Token, Error> {
    let config = super::sdk_config(options).await?;
    let region = config.region().map(|r| r.to_string()).unwrap_or_default();
    let provider = config
        .credentials_provider()
        .ok_or_else(|| Error::Invalid("no AWS credentials provider is configured".into()))?;
    let credentials = provider
        .provide_credentials()
        .await
        .map_err(|e| super::aws_error("loading AWS credentials for the EKS token")(e))?;
    sign_token(cluster, &region, credentials, SystemTime::now())
}

/// The ExecCredential kubectl reads from `gitops-bootstrap token` (v1beta1, the
/// version the kubeconfig's exec section names).
pub fn exec_credential(token: &Token) -> serde_json::Value {
    let expiration = k8s_openapi::jiff::Timestamp::try_from(token.expiration)
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_default();
    serde_json::json!({
        "kind": "ExecCredential",
        "apiVersion": "client.authentication.k8s.io/v1beta1",
        "spec": {},
        "status": { "expirationTimestamp": expiration, "token": token.token },
    })
}
