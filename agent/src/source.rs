//! The agent's git source: which commit the tracked branch points at, and that
//! commit's files in a local mirror.
//!
//! Built on libgit2 rather than the git CLI so that the agent needs no git or ssh
//! binaries, and so that credentials never pass through a command line, an
//! environment variable or a helper process another user could observe.
//!
//! Supported URLs: `https://`, `http://`, `ssh://[user@]host[:port]/path`, scp-like
//! `[user@]host:path`, `git://`, `file://` and plain local paths.

mod known_hosts;
mod signatures;
mod worktree;

use std::cell::Cell;
use std::fmt;
use std::fs;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD_NO_PAD;
use git2::cert::Cert;
pub use signatures::{AllowedSigners, SignatureError};
pub use worktree::{Update, Worktree};

use git2::{
    AutotagOption, CertificateCheckStatus, Cred, CredentialType, Direction, ErrorCode, FetchOptions, Oid, Remote,
    RemoteCallbacks, RemoteConnection, Repository,
};

/// Why the source could not answer. Every variant names the repository by its
/// [`redact_url`]ed URL or the local path involved, and none carries a secret, so
/// errors can go to logs and `/status` as they are.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// A file of the git secret (or the secret directory itself) exists but cannot be
    /// read: a misconfiguration that retrying will not fix.
    #[error("cannot read git secret file {path}: {source}")]
    SecretUnreadable {
        /// The file or directory that failed.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },

    /// The remote has no such branch: never pushed, mistyped or deleted since.
    #[error("{url}: branch {branch:?} does not exist on the remote")]
    BranchNotFound {
        /// The remote, redacted.
        url: String,
        /// The branch asked for.
        branch: String,
    },

    /// The server refused the credentials, or wanted some the secret does not hold.
    /// The agent gives up after one refusal instead of letting libgit2 ask again forever.
    #[error("{url}: authentication failed: {reason}")]
    AuthenticationFailed {
        /// The remote, redacted.
        url: String,
        /// What was missing or refused.
        reason: &'static str,
    },

    /// An SSH URL without a `known_hosts` file: the agent never connects to an SSH
    /// server it cannot verify.
    #[error("{url}: SSH needs a known_hosts file in the git secret to verify the server, and there is none")]
    NoKnownHosts {
        /// The remote, redacted.
        url: String,
    },

    /// The SSH server's host key is not the one `known_hosts` lists for it: either the
    /// file lacks the host, or someone else answers in its name.
    #[error(
        "{url}: host {host} presented a {key_type} key ({fingerprint}) that {known_hosts} does not list for it; refusing to connect"
    )]
    UnknownHostKey {
        /// The remote, redacted.
        url: String,
        /// The host as `known_hosts` names it (`[host]:port` for ports other than 22),
        /// which is what an operator has to add.
        host: String,
        /// The key type the server presented, such as `ssh-ed25519`.
        key_type: &'static str,
        /// The key's fingerprint as `ssh-keygen -l` prints it (`SHA256:…`).
        fingerprint: String,
        /// The file that was searched.
        known_hosts: PathBuf,
    },

    /// Talking to the remote failed for another reason (network, protocol, server).
    #[error("{url}: {action}: {message}")]
    Remote {
        /// The remote, redacted.
        url: String,
        /// What the agent was doing.
        action: &'static str,
        /// libgit2's explanation, with any secret removed.
        message: String,
    },

    /// The local mirror could not be created, read or updated.
    #[error("git mirror {path}: {action}: {source}")]
    Mirror {
        /// The mirror repository.
        path: PathBuf,
        /// What the agent was doing.
        action: &'static str,
        /// libgit2's error.
        source: git2::Error,
    },

    /// The commit's files could not be written where the render reads them.
    #[error("working tree {path}: {message}")]
    Worktree {
        /// The file or directory that failed.
        path: PathBuf,
        /// What failed.
        message: String,
    },

    /// `--verify-signatures` is on and the head is unsigned, or not signed by an
    /// allowed key: it is not checked out, so it is never applied.
    #[error(transparent)]
    Signature(#[from] SignatureError),
}

/// How to authenticate to the remote and how to recognise it: the files of the git
/// Secret mounted at `--git-secret-dir`.
#[derive(Clone, Default)]
pub struct Credentials {
    /// User for HTTP basic auth and SSH when the URL names none.
    pub username: Option<String>,
    /// HTTP password or access token.
    pub password: Option<String>,
    /// SSH private key file, unencrypted, in OpenSSH or PEM format.
    pub identity: Option<PathBuf>,
    /// OpenSSH `known_hosts` file listing the SSH server's host key.
    pub known_hosts: Option<PathBuf>,
}

impl Credentials {
    /// For public repositories and local paths.
    pub fn none() -> Credentials {
        Credentials::default()
    }

    /// Reads the Secret layout: files `username`, `password` (or `token`), `identity`
    /// and `known_hosts`, each optional. Values lose their trailing newline, which
    /// `echo` and most editors add. The key files are kept as paths and read when
    /// used, so a rotated Secret takes effect without a restart.
    pub fn from_secret_dir(dir: &Path) -> Result<Credentials, SourceError> {
        // A mistyped directory would otherwise silently mean "no credentials".
        fs::read_dir(dir).map_err(|source| SourceError::SecretUnreadable { path: dir.to_owned(), source })?;
        let password = match read_secret_value(dir, "password")? {
            Some(password) => Some(password),
            None => read_secret_value(dir, "token")?,
        };
        Ok(Credentials {
            username: read_secret_value(dir, "username")?,
            password,
            identity: secret_file(dir, "identity")?,
            known_hosts: secret_file(dir, "known_hosts")?,
        })
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| Redacted))
            .field("identity", &self.identity)
            .field("known_hosts", &self.known_hosts)
            .finish()
    }
}

/// Stands in for a secret in `Debug` output.
struct Redacted;

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

fn read_secret_value(dir: &Path, name: &str) -> Result<Option<String>, SourceError> {
    let path = dir.join(name);
    match fs::read_to_string(&path) {
        Ok(value) => {
            let value = value.trim_end_matches(['\n', '\r']);
            Ok((!value.is_empty()).then(|| value.to_owned()))
        }
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(SourceError::SecretUnreadable { path, source }),
    }
}

fn secret_file(dir: &Path, name: &str) -> Result<Option<PathBuf>, SourceError> {
    let path = dir.join(name);
    match fs::metadata(&path) {
        Ok(_) => Ok(Some(path)),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(SourceError::SecretUnreadable { path, source }),
    }
}

/// One branch of one remote repository, with the credentials to reach it.
pub struct GitSource {
    url: String,
    branch: String,
    credentials: Credentials,
    transport: Transport,
    /// `--verify-signatures`: who may sign the heads the agent applies.
    signers: Option<AllowedSigners>,
}

impl GitSource {
    /// Nothing is contacted or validated yet: errors surface on the first
    /// [`remote_head`](Self::remote_head) or [`fetch`](Self::fetch), where the agent
    /// reports and retries them.
    pub fn new(url: &str, branch: &str, credentials: Credentials) -> GitSource {
        let transport = Transport::of(url);
        GitSource { url: url.to_owned(), branch: branch.to_owned(), credentials, transport, signers: None }
    }

    /// Checks out only heads signed by one of `signers` (see [`fetch_tree`]).
    pub fn verify_signatures(self, signers: AllowedSigners) -> GitSource {
        GitSource { signers: Some(signers), ..self }
    }

    /// The commit the branch points at on the remote. Costs one round trip and
    /// downloads no objects, so the agent can poll it cheaply and fetch only when it
    /// changes.
    pub fn remote_head(&self) -> Result<Oid, SourceError> {
        let session = Session::open(self)?;
        let mut remote =
            Remote::create_detached(self.url.as_str()).map_err(|error| session.error("reading the URL", error))?;
        let connection = session.connect(&mut remote)?;
        session.branch_head(&connection)
    }

    /// Brings the branch's commit into the bare repository `mirror` (created if
    /// missing) and returns its id; `refs/heads/<branch>` in the mirror points at it.
    ///
    /// Over the network the fetch is shallow (depth 1): the agent needs the files, not
    /// the history. libgit2's local transport cannot fetch shallow, so local
    /// repositories are fetched whole. A force-pushed branch is followed like any other
    /// move.
    pub fn fetch(&self, mirror: &Path) -> Result<Oid, SourceError> {
        Ok(self.fetch_unless(mirror, None)?.expect("no head to skip"))
    }

    /// [`Self::fetch`], unless the branch's head is `applied`: then `None`, and nothing
    /// is downloaded. One connection either way, where asking [`Self::remote_head`]
    /// first and then fetching would make two.
    pub fn fetch_unless(&self, mirror: &Path, applied: Option<Oid>) -> Result<Option<Oid>, SourceError> {
        let session = Session::open(self)?;
        let branch_ref = self.branch_ref();
        let repo = open_or_init_mirror(mirror)?;
        let mut remote = repo.remote_anonymous(&self.url).map_err(|error| session.error("reading the URL", error))?;
        let mut connection = session.connect(&mut remote)?;
        let head = session.branch_head(&connection)?;
        if Some(head) == applied {
            return Ok(None);
        }
        // A depth-1 fetch would download the snapshot again even when it is here.
        if !repo.odb().is_ok_and(|odb| odb.exists(head)) {
            connection
                .remote()
                .download(&[branch_ref.as_str()], Some(&mut session.fetch_options()))
                .map_err(|error| session.error("downloading the branch", error))?;
        }
        // Forced: after a force-push the new head does not descend from the old one.
        repo.reference(&branch_ref, head, true, "gitops-agent fetch").map_err(|source| SourceError::Mirror {
            path: mirror.to_owned(),
            action: "updating the branch",
            source,
        })?;
        Ok(Some(head))
    }

    fn branch_ref(&self) -> String {
        format!("refs/heads/{}", self.branch)
    }

    fn host_trust(&self, host: &str, port: u16) -> Result<HostTrust, SourceError> {
        let Some(path) = &self.credentials.known_hosts else {
            return Err(SourceError::NoKnownHosts { url: redact_url(&self.url) });
        };
        let listed =
            fs::read_to_string(path).map_err(|source| SourceError::SecretUnreadable { path: path.clone(), source })?;
        Ok(HostTrust { entry_name: known_hosts::host_entry_name(host, port), known_hosts: path.clone(), listed })
    }

    /// libgit2 messages may quote the URL, userinfo included.
    fn without_secrets(&self, text: &str) -> String {
        let mut text = match userinfo_span(&self.url) {
            Some(span) => text.replace(&self.url[span], ""),
            None => text.to_owned(),
        };
        if let Some(password) = &self.credentials.password {
            text = text.replace(password.as_str(), "<redacted>");
        }
        text
    }
}

/// Bounds every network operation of libgit2 (all sources, process-wide): connecting
/// may take `timeout`, and so may each read or write after that, so a remote that stops
/// answering fails the fetch instead of hanging the agent's loop.
///
/// # Safety
///
/// Sets libgit2 globals without synchronisation: call it before any thread that may
/// use libgit2 exists (in `main`, before the async runtime starts).
pub unsafe fn set_network_timeout(timeout: std::time::Duration) -> Result<(), git2::Error> {
    let millis = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: the caller guarantees no other thread uses libgit2 yet.
    unsafe {
        git2::opts::set_server_connect_timeout_in_milliseconds(millis)?;
        git2::opts::set_server_timeout_in_milliseconds(millis)
    }
}

/// Fetches the branch into `work_dir/mirror` and checks its commit out into
/// `work_dir/tree-<commit>` (replacing an earlier checkout there): the commit and the
/// tree the render stage reads. With [`GitSource::verify_signatures`], a head that is
/// not signed by an allowed key is refused before it is checked out.
pub fn fetch_tree(source: &GitSource, work_dir: &Path) -> Result<(Oid, PathBuf), SourceError> {
    let head = fetch_verified(source, work_dir, None)?.expect("no head to skip");
    let tree = work_dir.join(format!("tree-{head}"));
    let _ = fs::remove_dir_all(&tree);
    checkout(&mirror_of(work_dir), head, &tree)?;
    Ok((head, tree))
}

/// The mirror [`fetch_verified`] keeps in `work_dir`.
pub fn mirror_of(work_dir: &Path) -> PathBuf {
    work_dir.join("mirror")
}

/// Fetches the branch into `work_dir/mirror` and returns its head, once verified when
/// [`GitSource::verify_signatures`] is on: a head that is not signed by an allowed key
/// is refused, so it is never checked out. `None` when the head is `applied`.
pub fn fetch_verified(source: &GitSource, work_dir: &Path, applied: Option<Oid>) -> Result<Option<Oid>, SourceError> {
    let mirror = mirror_of(work_dir);
    let Some(head) = source.fetch_unless(&mirror, applied)? else { return Ok(None) };
    if let Some(signers) = &source.signers {
        let repo = Repository::open_bare(&mirror).map_err(|source| SourceError::Mirror {
            path: mirror.clone(),
            action: "opening",
            source,
        })?;
        let signer = signers.verify(&repo, head)?;
        tracing::info!(commit = %head, signer, "verified the head's signature");
    }
    Ok(Some(head))
}

/// Writes the files of `commit` from a mirror written by [`GitSource::fetch`] into
/// `dir` (created if missing), the working tree the render stage reads.
pub fn checkout(mirror: &Path, commit: Oid, dir: &Path) -> Result<(), SourceError> {
    let mirror_error = |action| move |source| SourceError::Mirror { path: mirror.to_owned(), action, source };
    let repo = Repository::open_bare(mirror).map_err(mirror_error("opening"))?;
    let tree = repo.find_commit(commit).and_then(|commit| commit.tree()).map_err(mirror_error("reading the commit"))?;
    worktree::write_tree(&repo, &tree, dir).map_err(|e| e.at(dir))
}

/// `url` without its userinfo (`user:password@` or `token@`), fit for logs and
/// errors. Local paths and scp-like SSH addresses carry no secret and come back as
/// they are.
pub fn redact_url(url: &str) -> String {
    match userinfo_span(url) {
        Some(span) => format!("{}{}", &url[..span.start], &url[span.end..]),
        None => url.to_owned(),
    }
}

/// Where `scheme://userinfo@` has its userinfo, `@` included.
fn userinfo_span(url: &str) -> Option<Range<usize>> {
    let start = url.find("://")? + "://".len();
    let authority = url[start..].split('/').next()?;
    let at = authority.rfind('@')?;
    Some(start..start + at + 1)
}

fn open_or_init_mirror(mirror: &Path) -> Result<Repository, SourceError> {
    Repository::open_bare(mirror)
        .or_else(|error| match error.code() {
            // Also covers an empty directory, such as a freshly mounted volume.
            ErrorCode::NotFound => Repository::init_bare(mirror),
            _ => Err(error),
        })
        .map_err(|source| SourceError::Mirror { path: mirror.to_owned(), action: "opening or creating", source })
}

/// How libgit2 will reach the remote, as far as the agent's behaviour depends on it.
enum Transport {
    /// `file://` or a path: no credentials, no shallow fetch.
    Local,
    /// SSH, whose host key must be in `known_hosts`.
    Ssh { host: String, port: u16 },
    /// HTTP(S) or the git protocol.
    Network,
}

impl Transport {
    /// Follows git's own reading of a URL: a scheme, else scp-like `host:path` when a
    /// colon comes before any slash, else a local path.
    fn of(url: &str) -> Transport {
        if let Some((scheme, rest)) = url.split_once("://") {
            return match scheme {
                "file" => Transport::Local,
                "ssh" | "ssh+git" | "git+ssh" => {
                    let authority = rest.split('/').next().unwrap_or_default();
                    Transport::ssh(authority)
                }
                _ => Transport::Network,
            };
        }
        match url.split_once(':') {
            Some((authority, _)) if !authority.contains('/') => Transport::ssh(authority),
            _ => Transport::Local,
        }
    }

    /// From `[user@]host[:port]`, where an IPv6 host is bracketed.
    fn ssh(authority: &str) -> Transport {
        let host_port = authority.rsplit_once('@').map_or(authority, |(_, rest)| rest);
        let (host, port) = match host_port.strip_prefix('[') {
            Some(bracketed) => {
                bracketed.split_once(']').map_or((bracketed, ""), |(host, rest)| (host, rest.trim_start_matches(':')))
            }
            None => host_port.split_once(':').unwrap_or((host_port, "")),
        };
        Transport::Ssh { host: host.to_owned(), port: port.parse().unwrap_or(22) }
    }
}

/// What an SSH server's host key is checked against.
struct HostTrust {
    /// The host's name in `known_hosts` form.
    entry_name: String,
    known_hosts: PathBuf,
    /// The file's text, read before connecting.
    listed: String,
}

/// One conversation with the remote.
///
/// libgit2 turns a refused password or a rejected host key into a generic error, so
/// the callbacks note the precise failure here and [`Session::error`] returns it
/// instead.
struct Session<'s> {
    source: &'s GitSource,
    host_trust: Option<HostTrust>,
    /// Set once a password or key was handed out: libgit2 asks again after a
    /// refusal, and answering again would loop forever.
    secret_offered: Cell<bool>,
    failure: Cell<Option<SourceError>>,
}

impl<'s> Session<'s> {
    fn open(source: &'s GitSource) -> Result<Session<'s>, SourceError> {
        let host_trust = match &source.transport {
            Transport::Ssh { host, port } => Some(source.host_trust(host, *port)?),
            Transport::Local | Transport::Network => None,
        };
        Ok(Session { source, host_trust, secret_offered: Cell::new(false), failure: Cell::new(None) })
    }

    fn connect<'r, 'repo>(
        &'r self,
        remote: &'r mut Remote<'repo>,
    ) -> Result<RemoteConnection<'repo, 'r, 'r>, SourceError> {
        remote
            .connect_auth(Direction::Fetch, Some(self.callbacks()), None)
            .map_err(|error| self.error("connecting", error))
    }

    fn branch_head(&self, connection: &RemoteConnection<'_, '_, '_>) -> Result<Oid, SourceError> {
        let branch_ref = self.source.branch_ref();
        let heads = connection.list().map_err(|error| self.error("listing branches", error))?;
        heads.iter().find(|head| head.name() == branch_ref).map(|head| head.oid()).ok_or_else(|| {
            SourceError::BranchNotFound { url: redact_url(&self.source.url), branch: self.source.branch.clone() }
        })
    }

    fn fetch_options(&self) -> FetchOptions<'_> {
        let mut options = FetchOptions::new();
        options.remote_callbacks(self.callbacks()).download_tags(AutotagOption::None);
        if !matches!(self.source.transport, Transport::Local) {
            options.depth(1);
        }
        options
    }

    fn callbacks(&self) -> RemoteCallbacks<'_> {
        let mut callbacks = RemoteCallbacks::new();
        callbacks.credentials(|_url, username_from_url, allowed| self.credentials(username_from_url, allowed));
        callbacks.certificate_check(|cert, _host| self.check_certificate(cert));
        callbacks
    }

    fn credentials(&self, username_from_url: Option<&str>, allowed: CredentialType) -> Result<Cred, git2::Error> {
        let username = username_from_url.or(self.source.credentials.username.as_deref()).unwrap_or("git");
        // SSH asks for the login name first; that is no attempt to authenticate yet.
        if allowed.contains(CredentialType::USERNAME) {
            return Cred::username(username);
        }
        if self.secret_offered.replace(true) {
            return Err(self.fail(self.authentication_failed("the server refused the credentials from the git secret")));
        }
        if allowed.contains(CredentialType::SSH_KEY) {
            self.ssh_key(username)
        } else if allowed.contains(CredentialType::USER_PASS_PLAINTEXT) {
            self.password(username)
        } else {
            Err(self.fail(
                self.authentication_failed("the server asks for a kind of credentials the agent does not support"),
            ))
        }
    }

    fn ssh_key(&self, username: &str) -> Result<Cred, git2::Error> {
        let Some(path) = &self.source.credentials.identity else {
            return Err(self.fail(
                self.authentication_failed("the server wants an SSH key and the git secret has no identity file"),
            ));
        };
        let key = fs::read_to_string(path)
            .map_err(|source| self.fail(SourceError::SecretUnreadable { path: path.clone(), source }))?;
        Cred::ssh_key_from_memory(username, None, &key, None)
    }

    fn password(&self, username: &str) -> Result<Cred, git2::Error> {
        match &self.source.credentials.password {
            Some(password) => Cred::userpass_plaintext(username, password),
            None => Err(self.fail(
                self.authentication_failed("the server wants a password and the git secret has no password or token"),
            )),
        }
    }

    /// TLS certificates are left to libgit2, which checks them against the system's
    /// CAs; SSH host keys must be listed in the secret's `known_hosts`.
    fn check_certificate(&self, cert: &Cert<'_>) -> Result<CertificateCheckStatus, git2::Error> {
        let Some(host_key) = cert.as_hostkey() else {
            return Ok(CertificateCheckStatus::CertificatePassthrough);
        };
        let key = host_key.hostkey().unwrap_or_default();
        let failure = match &self.host_trust {
            Some(trust) if known_hosts::is_known(&trust.listed, &trust.entry_name, key) => {
                return Ok(CertificateCheckStatus::CertificateOk);
            }
            Some(trust) => SourceError::UnknownHostKey {
                url: redact_url(&self.source.url),
                host: trust.entry_name.clone(),
                key_type: host_key.hostkey_type().map_or("unknown", |t| t.name()),
                fingerprint: host_key.hash_sha256().map_or_else(
                    || "fingerprint unavailable".to_owned(),
                    |hash| format!("SHA256:{}", STANDARD_NO_PAD.encode(hash)),
                ),
                known_hosts: trust.known_hosts.clone(),
            },
            None => SourceError::NoKnownHosts { url: redact_url(&self.source.url) },
        };
        Err(self.fail(failure))
    }

    fn authentication_failed(&self, reason: &'static str) -> SourceError {
        SourceError::AuthenticationFailed { url: redact_url(&self.source.url), reason }
    }

    /// Keeps `failure` for [`Session::error`] and gives libgit2 an error to abort with.
    fn fail(&self, failure: SourceError) -> git2::Error {
        let message = failure.to_string();
        self.failure.set(Some(failure));
        git2::Error::from_str(&message)
    }

    /// The failure a callback noted, else libgit2's error with the secrets removed.
    fn error(&self, action: &'static str, error: git2::Error) -> SourceError {
        self.failure.take().unwrap_or_else(|| SourceError::Remote {
            url: redact_url(&self.source.url),
            action,
            message: self.source.without_secrets(error.message()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_url_drops_userinfo() {
        for (url, redacted) in [
            ("https://user:s3cret@git.example/org/repo.git", "https://git.example/org/repo.git"),
            ("https://ghp_token@git.example/repo", "https://git.example/repo"),
            ("ssh://git@git.example:2222/srv/repo", "ssh://git.example:2222/srv/repo"),
            ("http://127.0.0.1:8080/repo.git", "http://127.0.0.1:8080/repo.git"),
            ("https://git.example/a@b/repo", "https://git.example/a@b/repo"),
            ("git@git.example:org/repo.git", "git@git.example:org/repo.git"),
            ("/srv/git/repo", "/srv/git/repo"),
        ] {
            assert_eq!(redact_url(url), redacted, "{url}");
        }
    }

    #[test]
    fn remote_errors_never_quote_secrets() {
        let credentials = Credentials { password: Some("hunter2".into()), ..Credentials::none() };
        let source = GitSource::new("https://me:pw@git.example/repo", "main", credentials);
        let text = source.without_secrets("GET https://me:pw@git.example/repo with hunter2");
        assert_eq!(text, "GET https://git.example/repo with <redacted>");
    }

    #[test]
    fn reads_urls_as_git_does() {
        let ssh = |url| match Transport::of(url) {
            Transport::Ssh { host, port } => Some((host, port)),
            Transport::Local | Transport::Network => None,
        };
        assert_eq!(ssh("ssh://git@127.0.0.1:2222/srv/repo"), Some(("127.0.0.1".into(), 2222)));
        assert_eq!(ssh("ssh://git.example/repo"), Some(("git.example".into(), 22)));
        assert_eq!(ssh("ssh://[::1]:2222/repo"), Some(("::1".into(), 2222)));
        assert_eq!(ssh("git@git.example:org/repo.git"), Some(("git.example".into(), 22)));
        assert_eq!(ssh("./dir:with/colon"), None);
        assert!(matches!(Transport::of("/srv/repo"), Transport::Local));
        assert!(matches!(Transport::of("file:///srv/repo"), Transport::Local));
        assert!(matches!(Transport::of("https://git.example/r"), Transport::Network));
        assert!(matches!(Transport::of("git://git.example/r"), Transport::Network));
    }

    #[test]
    fn reads_the_secret_layout() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("username"), "deploy\n").unwrap();
        fs::write(dir.path().join("token"), "t0ken\r\n").unwrap();
        fs::write(dir.path().join("known_hosts"), "").unwrap();
        let credentials = Credentials::from_secret_dir(dir.path()).unwrap();
        assert_eq!(credentials.username.as_deref(), Some("deploy"));
        assert_eq!(credentials.password.as_deref(), Some("t0ken"));
        assert_eq!(credentials.identity, None);
        assert_eq!(credentials.known_hosts, Some(dir.path().join("known_hosts")));
        assert!(!format!("{credentials:?}").contains("t0ken"));
        assert!(format!("{credentials:?}").contains("<redacted>"));
    }

    #[test]
    fn a_missing_secret_dir_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        assert!(matches!(
            Credentials::from_secret_dir(&missing),
            Err(SourceError::SecretUnreadable { path, .. }) if path == missing
        ));
    }
}
