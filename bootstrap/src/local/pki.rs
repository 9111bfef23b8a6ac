//! The certificates and keys of a local cluster: one throwaway CA, the API server's and
//! the kubelet's serving certificates, a client certificate for the admin and for each
//! component, and the service-account signing key. Everything is written as PEM files
//! under one directory and is valid only for loopback and the node's own address.

use std::fs;
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};

use super::Error;

/// Where each generated file lives.
#[derive(Debug, Clone)]
pub struct Pki {
    pub ca_cert: PathBuf,
    pub apiserver_cert: PathBuf,
    pub apiserver_key: PathBuf,
    pub admin: CertFiles,
    pub controller_manager: CertFiles,
    pub scheduler: CertFiles,
    /// The kubelet's identity, `system:node:NAME`, which the Node authorizer checks.
    pub kubelet: CertFiles,
    pub kube_proxy: CertFiles,
    /// What the API server shows the kubelet for logs, exec and port-forward.
    pub apiserver_kubelet_client: CertFiles,
    /// The kubelet's serving certificate, for the node's address.
    pub kubelet_serving: CertFiles,
    /// Private key the controller manager signs service-account tokens with.
    pub service_account_key: PathBuf,
    /// Its public half, which the API server verifies tokens with.
    pub service_account_pub: PathBuf,
}

/// A certificate and its private key, as PEM files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The first address of the service CIDR (see [`super::network`]): in-cluster clients
/// reach `kubernetes.default` there, so it belongs in the serving certificate.
pub const KUBERNETES_SERVICE_IP: Ipv4Addr = super::network::KUBERNETES_SERVICE_IP;

impl Pki {
    /// Generates a fresh CA and every certificate signed by it into `dir`.
    pub fn generate(dir: &Path) -> Result<Pki, Error> {
        fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;

        let mut ca_params = CertificateParams::default();
        ca_params.distinguished_name.push(DnType::CommonName, "gitops-local-ca");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
        let ca_cert = write(dir, "ca.crt", &ca.pem())?;

        let (apiserver_cert, apiserver_key) = issue(
            dir,
            "apiserver",
            &ca,
            "kube-apiserver",
            None,
            ExtendedKeyUsagePurpose::ServerAuth,
            vec![
                SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
                SanType::IpAddress(IpAddr::V4(KUBERNETES_SERVICE_IP)),
                SanType::IpAddress(IpAddr::V4(super::network::NODE_IP)),
                SanType::DnsName("localhost".try_into()?),
                SanType::DnsName("kubernetes".try_into()?),
                SanType::DnsName("kubernetes.default".try_into()?),
                SanType::DnsName("kubernetes.default.svc".try_into()?),
                SanType::DnsName("kubernetes.default.svc.cluster.local".try_into()?),
            ],
        )?;
        let client = |name: &str, cn: &str, org: Option<&str>| -> Result<CertFiles, Error> {
            let (cert, key) = issue(dir, name, &ca, cn, org, ExtendedKeyUsagePurpose::ClientAuth, vec![])?;
            Ok(CertFiles { cert, key })
        };
        // system:masters is bound to cluster-admin by the API server's bootstrap RBAC policy.
        let admin = client("admin", "admin", Some("system:masters"))?;
        let controller_manager = client("controller-manager", "system:kube-controller-manager", None)?;
        let scheduler = client("scheduler", "system:kube-scheduler", None)?;
        let kubelet = client("kubelet", &format!("system:node:{}", super::network::NODE_NAME), Some("system:nodes"))?;
        let kube_proxy = client("kube-proxy", "system:kube-proxy", None)?;
        let apiserver_kubelet_client = client("apiserver-kubelet-client", "kube-apiserver", Some("system:masters"))?;
        let (cert, key) = issue(
            dir,
            "kubelet-serving",
            &ca,
            super::network::NODE_NAME,
            None,
            ExtendedKeyUsagePurpose::ServerAuth,
            vec![
                SanType::IpAddress(IpAddr::V4(super::network::NODE_IP)),
                SanType::DnsName(super::network::NODE_NAME.try_into()?),
            ],
        )?;
        let kubelet_serving = CertFiles { cert, key };

        let sa = KeyPair::generate()?;
        let service_account_key = write_secret(dir, "service-account.key", &sa.serialize_pem())?;
        let service_account_pub = write(dir, "service-account.pub", &sa.public_key_pem())?;

        Ok(Pki {
            ca_cert,
            apiserver_cert,
            apiserver_key,
            admin,
            controller_manager,
            scheduler,
            kubelet,
            kube_proxy,
            apiserver_kubelet_client,
            kubelet_serving,
            service_account_key,
            service_account_pub,
        })
    }
}

fn issue(
    dir: &Path,
    name: &str,
    ca: &CertifiedIssuer<'_, KeyPair>,
    common_name: &str,
    organization: Option<&str>,
    usage: ExtendedKeyUsagePurpose,
    subject_alt_names: Vec<SanType>,
) -> Result<(PathBuf, PathBuf), Error> {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, common_name);
    if let Some(org) = organization {
        params.distinguished_name.push(DnType::OrganizationName, org);
    }
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![usage];
    params.subject_alt_names = subject_alt_names;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, ca)?;
    Ok((
        write(dir, &format!("{name}.crt"), &cert.pem())?,
        write_secret(dir, &format!("{name}.key"), &key.serialize_pem())?,
    ))
}

fn write(dir: &Path, name: &str, contents: &str) -> Result<PathBuf, Error> {
    let path = dir.join(name);
    fs::write(&path, contents).map_err(|e| Error::io(&path, e))?;
    Ok(path)
}

/// Private keys are readable by their owner only.
fn write_secret(dir: &Path, name: &str, contents: &str) -> Result<PathBuf, Error> {
    let path = write(dir, name, contents)?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).map_err(|e| Error::io(&path, e))?;
    Ok(path)
}
