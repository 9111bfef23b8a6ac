//! Commit signature verification (`--verify-signatures ALLOWED_SIGNERS`): a head is
//! applied only if it carries an SSH signature (git's `gpg.format=ssh`) that verifies
//! over the commit, in namespace `git`, by a key the allowed-signers file lists. That
//! file is ssh-keygen's format, the one git's `gpg.ssh.allowedSignersFile` reads:
//! `PRINCIPALS [OPTIONS] KEYTYPE BASE64 [COMMENT]`, one key a line.
//!
//! As git does, trust is the key: the signer's principals are reported, not matched
//! against the committer.

use std::fs;
use std::path::{Path, PathBuf};

use git2::{Oid, Repository};
use ssh_key::{PublicKey, SshSig};

/// The namespace git signs commits in.
const GIT_NAMESPACE: &str = "git";

/// Why a head is not applied, or the signers file not usable.
#[derive(Debug, thiserror::Error)]
pub enum SignatureError {
    #[error("cannot read the allowed signers file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}:{line}: {message}")]
    Malformed { path: PathBuf, line: usize, message: String },
    #[error("commit {commit} is not signed; --verify-signatures applies only signed commits")]
    Unsigned { commit: Oid },
    #[error("commit {commit} has a signature that is not a valid SSH signature: {reason}")]
    Invalid { commit: Oid, reason: String },
    #[error("commit {commit} is signed by a key the allowed signers do not list ({fingerprint})")]
    Untrusted { commit: Oid, fingerprint: String },
    #[error("commit {commit}: the signature of {principals} does not verify: {reason}")]
    Forged { commit: Oid, principals: String, reason: String },
    #[error("cannot read commit {commit} from the mirror: {source}")]
    Mirror { commit: Oid, source: git2::Error },
}

/// The keys trusted to sign commits.
#[derive(Debug, Clone)]
pub struct AllowedSigners {
    signers: Vec<Signer>,
}

#[derive(Debug, Clone)]
struct Signer {
    principals: String,
    key: PublicKey,
}

impl AllowedSigners {
    pub fn from_file(path: &Path) -> Result<AllowedSigners, SignatureError> {
        let text = fs::read_to_string(path).map_err(|source| SignatureError::Read { path: path.to_owned(), source })?;
        let mut signers = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let malformed =
                |message: String| SignatureError::Malformed { path: path.to_owned(), line: index + 1, message };
            let signer = Signer::parse(line).map_err(malformed)?;
            // A key restricted to other namespaces (`namespaces="file"`) cannot sign commits.
            if let Some(signer) = signer {
                signers.push(signer);
            }
        }
        if signers.is_empty() {
            let message = "no key allowed to sign in namespace \"git\"".to_owned();
            return Err(SignatureError::Malformed { path: path.to_owned(), line: 1, message });
        }
        Ok(AllowedSigners { signers })
    }

    /// Verifies `commit`'s signature; on success, the principals of its signer.
    pub fn verify(&self, repo: &Repository, commit: Oid) -> Result<String, SignatureError> {
        let (signature, signed) = match repo.extract_signature(&commit, None) {
            Ok(parts) => parts,
            Err(e) if e.code() == git2::ErrorCode::NotFound => return Err(SignatureError::Unsigned { commit }),
            Err(source) => return Err(SignatureError::Mirror { commit, source }),
        };
        let invalid = |reason: String| SignatureError::Invalid { commit, reason };
        let signature = std::str::from_utf8(&signature).map_err(|e| invalid(e.to_string()))?;
        // A GPG signature is "not SSH", which is all this agent verifies.
        let signature = SshSig::from_pem(signature.trim()).map_err(|e| invalid(e.to_string()))?;
        let signer = self.signers.iter().find(|s| s.key.key_data() == signature.public_key()).ok_or_else(|| {
            let fingerprint = ssh_key::PublicKey::from(signature.public_key().clone())
                .fingerprint(ssh_key::HashAlg::Sha256)
                .to_string();
            SignatureError::Untrusted { commit, fingerprint }
        })?;
        signer.key.verify(GIT_NAMESPACE, &signed, &signature).map_err(|e| SignatureError::Forged {
            commit,
            principals: signer.principals.clone(),
            reason: e.to_string(),
        })?;
        Ok(signer.principals.clone())
    }
}

impl Signer {
    /// One line: `PRINCIPALS [OPTIONS] KEYTYPE BASE64 [COMMENT]`. `None` for a key
    /// whose `namespaces=` option excludes git.
    fn parse(line: &str) -> Result<Option<Signer>, String> {
        let (principals, rest) = line.split_once(char::is_whitespace).ok_or("expected PRINCIPALS KEYTYPE KEY")?;
        let rest = rest.trim_start();
        let (options, key) = if is_key_type(rest.split_whitespace().next().unwrap_or_default()) {
            ("", rest)
        } else {
            let end = options_end(rest);
            (&rest[..end], rest[end..].trim_start())
        };
        let key = PublicKey::from_openssh(key).map_err(|e| format!("invalid public key: {e}"))?;
        for option in split_options(options) {
            let (name, value) = option.split_once('=').unwrap_or((option, ""));
            match name.to_ascii_lowercase().as_str() {
                "namespaces" => {
                    let namespaces = value.trim_matches('"');
                    if !namespaces.split(',').any(|n| n.trim() == GIT_NAMESPACE || n.trim() == "*") {
                        return Ok(None);
                    }
                }
                // Certificates are not verified here: refuse rather than trust too much.
                "cert-authority" => return Err("cert-authority keys are not supported".to_owned()),
                "valid-after" | "valid-before" => {
                    return Err(format!("option {name} is not supported: list only keys valid now"));
                }
                other => return Err(format!("unknown option {other:?}")),
            }
        }
        Ok(Some(Signer { principals: principals.to_owned(), key }))
    }
}

fn is_key_type(word: &str) -> bool {
    word.starts_with("ssh-") || word.starts_with("ecdsa-sha2-") || word.starts_with("sk-")
}

/// Where the options field ends: the first whitespace outside double quotes.
fn options_end(text: &str) -> usize {
    let mut quoted = false;
    for (i, c) in text.char_indices() {
        match c {
            '"' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => return i,
            _ => {}
        }
    }
    text.len()
}

/// The comma-separated options, commas inside quotes kept.
fn split_options(options: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut quoted) = (0, false);
    for (i, c) in options.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                parts.push(&options[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if start < options.len() {
        parts.push(&options[start..]);
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOqvmSxBq0L58qaLCq+YUcLTqIy0WUHHZ+hduu0/iCGV";

    #[test]
    fn reads_ssh_keygens_allowed_signers_format() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("allowed_signers");
        fs::write(
            &path,
            format!(
                "# deployers\n\nalice@example.com {KEY} alice\nbob@example.com,ci@example.com namespaces=\"git,file\" {KEY}\nfiles@example.com namespaces=\"file\" {KEY}\n"
            ),
        )
        .unwrap();
        let signers = AllowedSigners::from_file(&path).unwrap();
        let principals: Vec<&str> = signers.signers.iter().map(|s| s.principals.as_str()).collect();
        assert_eq!(principals, ["alice@example.com", "bob@example.com,ci@example.com"], "file-only keys are left out");

        fs::write(&path, format!("alice@example.com valid-before=20300101 {KEY}\n")).unwrap();
        let error = AllowedSigners::from_file(&path).unwrap_err().to_string();
        assert!(
            error.ends_with("allowed_signers:1: option valid-before is not supported: list only keys valid now"),
            "{error}"
        );
        fs::write(&path, "alice@example.com ssh-ed25519 not-base64\n").unwrap();
        let error = AllowedSigners::from_file(&path).unwrap_err().to_string();
        assert!(error.contains("allowed_signers:1: invalid public key"), "{error}");
    }
}
