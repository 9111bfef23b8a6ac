//! The agent's git source against real servers, one per transport it supports:
//! `file://` URLs and plain paths, `git daemon`, smart HTTP with basic auth, and SSH.

use std::path::Path;

use git2::Repository;
use gitops_agent::source::{self, Credentials, GitSource, SourceError};
use gitops_tests::git::{BRANCH, GitDaemon, GitRepo, HttpGitServer, SshGitServer, git_secret_dir};
use tempfile::TempDir;

const MANIFEST: &str = "manifests/app.yaml";
const HTTP_USER: &str = "deploy";
const HTTP_PASSWORD: &str = "correct-horse-battery";

#[test]
fn file_url() {
    let repo = GitRepo::new();
    assert_follows_commits(&repo, &repo.file_url(), Credentials::none(), Depth::Full);
}

#[test]
fn plain_local_path() {
    let repo = GitRepo::new();
    let path = repo.path().display().to_string();
    assert_follows_commits(&repo, &path, Credentials::none(), Depth::Full);
}

#[test]
fn git_daemon() {
    let repo = GitRepo::new();
    let daemon = GitDaemon::serve(&repo.root());
    assert_follows_commits(&repo, &daemon.url(repo.name()), Credentials::none(), Depth::Shallow);
}

#[test]
fn smart_http_with_basic_auth() {
    let repo = GitRepo::new();
    let server = HttpGitServer::serve(&repo.root(), HTTP_USER, HTTP_PASSWORD);
    let credentials =
        Credentials { username: Some(HTTP_USER.into()), password: Some(HTTP_PASSWORD.into()), ..Credentials::none() };
    assert_follows_commits(&repo, &server.url(repo.name()), credentials, Depth::Shallow);
}

#[test]
fn ssh_with_key_and_known_hosts_from_the_secret_dir() {
    let repo = GitRepo::new();
    let server = SshGitServer::serve();
    let secret = ssh_secret(&server.identity(), Some(&server.known_hosts()));
    let credentials = Credentials::from_secret_dir(secret.path()).unwrap();
    assert_follows_commits(&repo, &server.url(&repo.path()), credentials, Depth::Shallow);
}

#[test]
fn http_refuses_wrong_or_missing_credentials_without_leaking_them() {
    let repo = GitRepo::new();
    repo.write(MANIFEST, "replicas: 1\n");
    repo.commit("first");
    let server = HttpGitServer::serve(&repo.root(), HTTP_USER, HTTP_PASSWORD);
    let url = server.url(repo.name());
    let wrong_password = Credentials {
        username: Some(HTTP_USER.into()),
        password: Some("wrong-password-1".into()),
        ..Credentials::none()
    };
    let url_with_password = url.replacen("http://", "http://deploy:wrong-password-2@", 1);

    for (url, credentials) in [
        (url.as_str(), wrong_password),
        (url.as_str(), Credentials::none()),
        (url_with_password.as_str(), Credentials::none()),
    ] {
        let source = GitSource::new(url, BRANCH, credentials);
        for error in [source.remote_head().unwrap_err(), fetch_into_new_mirror(&source).unwrap_err()] {
            let message = error.to_string();
            assert!(matches!(error, SourceError::AuthenticationFailed { .. }), "{message}");
            assert!(message.contains(&server.url(repo.name())), "{message}");
            assert!(!message.contains("wrong-password"), "{message}");
        }
    }
}

#[test]
fn ssh_refuses_an_unknown_host_key() {
    let repo = GitRepo::new();
    repo.write(MANIFEST, "replicas: 1\n");
    repo.commit("first");
    let server = SshGitServer::serve();
    let secret = ssh_secret(&server.identity(), Some(&server.wrong_known_hosts()));
    let source =
        GitSource::new(&server.url(&repo.path()), BRANCH, Credentials::from_secret_dir(secret.path()).unwrap());

    let error = source.remote_head().unwrap_err();
    let message = error.to_string();
    let SourceError::UnknownHostKey { host, known_hosts, .. } = error else {
        panic!("expected UnknownHostKey, got: {message}");
    };
    assert_eq!(host, server.known_hosts_name());
    assert_eq!(known_hosts, secret.path().join("known_hosts"));
    assert!(message.contains(&server.known_hosts_name()), "{message}");
    assert!(matches!(fetch_into_new_mirror(&source), Err(SourceError::UnknownHostKey { .. })));
}

#[test]
fn ssh_without_known_hosts_does_not_connect() {
    let repo = GitRepo::new();
    let server = SshGitServer::serve();
    let secret = ssh_secret(&server.identity(), None);
    let source =
        GitSource::new(&server.url(&repo.path()), BRANCH, Credentials::from_secret_dir(secret.path()).unwrap());
    assert!(matches!(source.remote_head(), Err(SourceError::NoKnownHosts { .. })));
    assert!(matches!(fetch_into_new_mirror(&source), Err(SourceError::NoKnownHosts { .. })));
}

#[test]
fn ssh_gives_up_after_the_key_is_refused() {
    let repo = GitRepo::new();
    repo.write(MANIFEST, "replicas: 1\n");
    repo.commit("first");
    let server = SshGitServer::serve();
    let secret = ssh_secret(&server.stranger_identity(), Some(&server.known_hosts()));
    let source =
        GitSource::new(&server.url(&repo.path()), BRANCH, Credentials::from_secret_dir(secret.path()).unwrap());
    let error = source.remote_head().unwrap_err();
    assert!(matches!(error, SourceError::AuthenticationFailed { .. }), "{error}");
}

#[test]
fn a_force_pushed_unrelated_history_is_followed() {
    let repo = GitRepo::new();
    let daemon = GitDaemon::serve(&repo.root());
    let source = GitSource::new(&daemon.url(repo.name()), BRANCH, Credentials::none());
    let mirror = TempDir::new().unwrap();
    repo.write(MANIFEST, "replicas: 1\n");
    repo.commit("first");
    source.fetch(mirror.path()).unwrap();

    let rewritten = repo.force_push_unrelated_history(&[("manifests/other.yaml", "kind: Other\n")]);

    assert_eq!(source.remote_head().unwrap().to_string(), rewritten);
    let fetched = source.fetch(mirror.path()).unwrap();
    assert_eq!(fetched.to_string(), rewritten);
    assert_eq!(read(&mirror, fetched, "manifests/other.yaml").as_deref(), Some("kind: Other\n"));
    assert_eq!(read(&mirror, fetched, MANIFEST), None);
}

#[test]
fn removed_files_and_reverts_are_followed() {
    let repo = GitRepo::new();
    let source = GitSource::new(&repo.file_url(), BRANCH, Credentials::none());
    let mirror = TempDir::new().unwrap();
    repo.write(MANIFEST, "replicas: 1\n");
    repo.commit("add the app");

    repo.remove(MANIFEST);
    let removal = repo.commit("remove the app");
    let fetched = source.fetch(mirror.path()).unwrap();
    assert_eq!(fetched.to_string(), removal);
    assert_eq!(read(&mirror, fetched, MANIFEST), None);

    let revert = repo.revert_head();
    let fetched = source.fetch(mirror.path()).unwrap();
    assert_eq!(fetched.to_string(), revert);
    assert_eq!(read(&mirror, fetched, MANIFEST).as_deref(), Some("replicas: 1\n"));
}

#[test]
fn a_missing_branch_is_reported_as_such() {
    let repo = GitRepo::new();
    let daemon = GitDaemon::serve(&repo.root());
    repo.write(MANIFEST, "replicas: 1\n");
    repo.commit("first");
    let url = daemon.url(repo.name());
    let mirror = TempDir::new().unwrap();
    GitSource::new(&url, BRANCH, Credentials::none()).fetch(mirror.path()).unwrap();

    let misspelled = GitSource::new(&url, "mian", Credentials::none());
    assert!(matches!(misspelled.remote_head(), Err(SourceError::BranchNotFound { .. })));

    repo.delete_branch();
    let source = GitSource::new(&url, BRANCH, Credentials::none());
    let error = source.remote_head().unwrap_err();
    assert!(matches!(&error, SourceError::BranchNotFound { branch, .. } if branch == BRANCH), "{error}");
    assert!(error.to_string().contains(&url), "{error}");
    // The mirror still holds the old commit; fetch must not pass it off as current.
    assert!(matches!(source.fetch(mirror.path()), Err(SourceError::BranchNotFound { .. })));
}

/// Whether a fetch over this transport is expected to be shallow.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Depth {
    Shallow,
    Full,
}

/// Commits, fetches through `url` into a fresh mirror, checks commit and content, then
/// does it again for a second commit, which must also show in `remote_head`.
fn assert_follows_commits(repo: &GitRepo, url: &str, credentials: Credentials, depth: Depth) {
    let source = GitSource::new(url, BRANCH, credentials);
    let mirror = TempDir::new().unwrap();
    for (replicas, message) in [(1, "first"), (2, "second")] {
        let contents = format!("replicas: {replicas}\n");
        repo.write(MANIFEST, &contents);
        let commit = repo.commit(message);

        assert_eq!(source.remote_head().unwrap().to_string(), commit, "{url}: remote head");
        let fetched = source.fetch(mirror.path()).unwrap();
        assert_eq!(fetched.to_string(), commit, "{url}: fetched commit");
        assert_eq!(read(&mirror, fetched, MANIFEST), Some(contents), "{url}: file content");
    }
    let mirror = Repository::open_bare(mirror.path()).unwrap();
    assert_eq!(mirror.is_shallow(), depth == Depth::Shallow, "{url}: mirror shallow");
}

/// The file at `path` in `commit`, checked out as the agent checks out a revision.
fn read(mirror: &TempDir, commit: git2::Oid, path: &str) -> Option<String> {
    let tree = TempDir::new().unwrap();
    source::checkout(mirror.path(), commit, tree.path()).unwrap();
    std::fs::read_to_string(tree.path().join(path)).ok()
}

fn fetch_into_new_mirror(source: &GitSource) -> Result<git2::Oid, SourceError> {
    source.fetch(TempDir::new().unwrap().path())
}

fn ssh_secret(identity: &Path, known_hosts: Option<&Path>) -> TempDir {
    let identity = std::fs::read_to_string(identity).unwrap();
    let known_hosts = known_hosts.map(|path| std::fs::read_to_string(path).unwrap());
    let mut files = vec![("identity", identity.as_str())];
    files.extend(known_hosts.as_deref().map(|text| ("known_hosts", text)));
    git_secret_dir(&files)
}
