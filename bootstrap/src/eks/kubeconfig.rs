//! The kubeconfig of an EKS cluster: its endpoint and CA, and exec authentication
//! through `gitops-bootstrap token`, so kubectl needs no AWS CLI.

use std::path::{Path, PathBuf};

use super::Error;
use super::cluster::ClusterInfo;

/// Writes the kubeconfig to `path` (mode 0600: it names the profile used) and returns
/// the path. The exec command is this binary's absolute path, so kubectl finds it
/// without `PATH`; move the binary and run `up` again to rewrite it.
pub fn write(
    path: &Path,
    cluster: &str,
    region: &str,
    profile: Option<&str>,
    info: &ClusterInfo,
) -> Result<PathBuf, Error> {
    let command = std::env::current_exe()
        .ok()
        .and_then(|p| p.to_str().map(str::to_owned))
        .unwrap_or_else(|| "gitops-bootstrap".to_owned());
    let text = render(cluster, region, profile, info, &command);
    let io = |source| Error::Kubeconfig { path: path.to_owned(), source };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    std::fs::write(path, text).map_err(io)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    Ok(path.to_owned())
}

/// The kubeconfig as YAML; JSON strings are valid YAML scalars, so values are quoted
/// with serde_json and need no escaping of their own.
pub fn render(cluster: &str, region: &str, profile: Option<&str>, info: &ClusterInfo, command: &str) -> String {
    let q = |s: &str| serde_json::to_string(s).expect("strings serialize");
    let context = format!("gitops-{cluster}");
    let env = match profile {
        Some(profile) => format!("\n      env:\n      - name: AWS_PROFILE\n        value: {}", q(profile)),
        None => String::new(),
    };
    format!(
        "apiVersion: v1\n\
         kind: Config\n\
         clusters:\n\
         - name: {ctx}\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\n\
         users:\n\
         - name: {ctx}\n  user:\n    exec:\n      apiVersion: client.authentication.k8s.io/v1beta1\n      \
         command: {command}\n      args: [\"token\", \"--cluster\", {name}, \"--region\", {region}]\n      \
         interactiveMode: Never{env}\n\
         contexts:\n\
         - name: {ctx}\n  context:\n    cluster: {ctx}\n    user: {ctx}\n\
         current-context: {ctx}\n",
        ctx = q(&context),
        server = q(&info.endpoint),
        ca = q(&info.certificate_authority),
        command = q(command),
        name = q(cluster),
        region = q(region),
    )
}
