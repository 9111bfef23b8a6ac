//! Real git servers for tests: a repository driven with the `git` CLI as a user would,
//! served by `git daemon`, by `git http-backend` behind nginx with basic auth, and by
//! OpenSSH's sshd. Each server listens on a free loopback port and is killed, with
//! every process it started, when its fixture is dropped.

use std::fs::{self, File};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::{Pid, User, geteuid};
use tempfile::TempDir;

/// The branch every fixture repository uses.
pub const BRANCH: &str = "main";

/// A repository as the user has it: a bare "remote" that the servers serve, and a
/// work tree cloned from it where commits are made and pushed with the `git` CLI.
pub struct GitRepo {
    dir: TempDir,
}

impl GitRepo {
    /// An empty repository; the branch exists after the first [`commit`](Self::commit).
    pub fn new() -> GitRepo {
        let repo = GitRepo { dir: tempfile::tempdir().expect("temp dir for a git repository") };
        let bare = repo.path();
        git(repo.dir.path(), &["init", "-q", "--bare", "-b", BRANCH, path_str(&bare)]);
        git(repo.dir.path(), &["init", "-q", "-b", BRANCH, "work"]);
        for (key, value) in [("user.name", "Test Author"), ("user.email", "author@example.com")] {
            repo.git(&["config", key, value]);
        }
        repo.git(&["remote", "add", "origin", path_str(&bare)]);
        repo
    }

    /// The directory holding the bare repository: what a server exports.
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("served")
    }

    /// The bare repository's name under [`root`](Self::root).
    pub fn name(&self) -> &'static str {
        "repo.git"
    }

    /// The bare repository (the "remote").
    pub fn path(&self) -> PathBuf {
        self.root().join(self.name())
    }

    /// The bare repository as a `file://` URL.
    pub fn file_url(&self) -> String {
        format!("file://{}", self.path().display())
    }

    /// Writes a file of the work tree, creating its directories; committed by the next
    /// [`commit`](Self::commit).
    pub fn write(&self, path: &str, contents: &str) {
        self.write_bytes(path, contents.as_bytes());
    }

    /// [`write`](Self::write) for any bytes, text or not.
    pub fn write_bytes(&self, path: &str, contents: &[u8]) {
        let file = self.work_tree().join(path);
        fs::create_dir_all(file.parent().expect("a file has a parent directory"))
            .expect("directories of a work tree file");
        fs::write(&file, contents).expect("writing a work tree file");
    }

    /// Makes `path` in the work tree a symlink to `target` (relative or absolute).
    pub fn symlink(&self, path: &str, target: &str) {
        let link = self.work_tree().join(path);
        fs::create_dir_all(link.parent().expect("a link has a parent directory")).expect("directories of a link");
        std::os::unix::fs::symlink(target, link).expect("making a symlink");
    }

    /// Deletes a file of the work tree; committed by the next [`commit`](Self::commit).
    pub fn remove(&self, path: &str) {
        fs::remove_file(self.work_tree().join(path)).expect("removing a work tree file");
    }

    /// Commits every change of the work tree, pushes it, and returns the commit's sha.
    pub fn commit(&self, message: &str) -> String {
        self.git(&["add", "--all"]);
        self.git(&["commit", "-q", "-m", message]);
        self.push_with(&[])
    }

    /// Commits every change of the work tree without pushing it; [`push`](Self::push)
    /// publishes it. For measuring from the push alone.
    pub fn commit_unpushed(&self, message: &str) {
        self.git(&["add", "--all"]);
        self.git(&["commit", "-q", "-m", message]);
    }

    /// Pushes the work tree's branch and returns the pushed commit's sha.
    pub fn push(&self) -> String {
        self.push_with(&[])
    }

    /// The work tree where commits are made.
    pub fn work_tree(&self) -> PathBuf {
        self.dir.path().join("work")
    }

    /// [`commit`](Self::commit), SSH-signed with the private key at `key` as git signs
    /// (`gpg.format=ssh`, through ssh-keygen).
    pub fn commit_signed(&self, message: &str, key: &Path) -> String {
        self.git(&["add", "--all"]);
        let signing_key = format!("user.signingkey={}", path_str(key));
        self.git(&["-c", "gpg.format=ssh", "-c", &signing_key, "commit", "-q", "-S", "-m", message]);
        self.push()
    }

    /// `git revert` of the last commit, pushed; returns the revert commit's sha.
    pub fn revert_head(&self) -> String {
        self.git(&["revert", "--no-edit", "HEAD"]);
        self.push_with(&[])
    }

    /// Replaces the branch with a single commit holding only `files` (path, contents),
    /// sharing no history with before, and force-pushes it; returns the commit's sha.
    pub fn force_push_unrelated_history(&self, files: &[(&str, &str)]) -> String {
        self.git(&["checkout", "-q", "--orphan", "unrelated"]);
        self.git(&["rm", "-q", "-r", "-f", "."]);
        for (path, contents) in files {
            self.write(path, contents);
        }
        self.git(&["add", "--all"]);
        self.git(&["commit", "-q", "-m", "unrelated history"]);
        self.git(&["branch", "-q", "-M", BRANCH]);
        self.push_with(&["--force"])
    }

    /// Deletes the branch on the remote.
    pub fn delete_branch(&self) {
        // A bare repository refuses to lose the branch its HEAD names unless told.
        git(&self.path(), &["config", "receive.denyDeleteCurrent", "ignore"]);
        self.git(&["push", "-q", "origin", "--delete", BRANCH]);
    }

    fn push_with(&self, flags: &[&str]) -> String {
        let refspec = format!("HEAD:refs/heads/{BRANCH}");
        self.git(&[&["push", "-q"], flags, &["origin", &refspec]].concat());
        self.git(&["rev-parse", "HEAD"])
    }

    fn git(&self, args: &[&str]) -> String {
        git(&self.work_tree(), args)
    }
}

impl Default for GitRepo {
    fn default() -> Self {
        GitRepo::new()
    }
}

/// Runs the `git` CLI in `dir`, deaf to the machine's global and system settings,
/// and returns its trimmed standard output.
fn git(dir: &Path, args: &[&str]) -> String {
    let output = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .output()
        .expect("running git");
    assert!(output.status.success(), "git {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).expect("git prints UTF-8").trim().to_owned()
}

/// `git daemon` exporting every repository under a root, anonymously.
pub struct GitDaemon {
    _daemon: ServerProcess,
    port: u16,
    _logs: TempDir,
}

impl GitDaemon {
    pub fn serve(root: &Path) -> GitDaemon {
        GitDaemon::serve_on(root, free_port())
    }

    /// Serves on a given port: a server that comes back where it was.
    pub fn serve_on(root: &Path, port: u16) -> GitDaemon {
        let logs = tempfile::tempdir().expect("temp dir for git daemon's log");
        let mut command = Command::new("git");
        command.args([
            "daemon",
            "--reuseaddr",
            "--export-all",
            &format!("--base-path={}", root.display()),
            "--listen=127.0.0.1",
            &format!("--port={port}"),
        ]);
        let daemon = ServerProcess::start(command, &Endpoint::Tcp(port), &logs.path().join("daemon.log"));
        GitDaemon { _daemon: daemon, port, _logs: logs }
    }

    /// `git://` URL of the repository `name` under the served root.
    pub fn url(&self, name: &str) -> String {
        format!("git://127.0.0.1:{}/{name}", self.port)
    }
}

/// Smart HTTP: nginx with basic auth in front of `git http-backend`, which fcgiwrap
/// runs for each request.
pub struct HttpGitServer {
    _nginx: ServerProcess,
    _fcgiwrap: ServerProcess,
    port: u16,
    _dir: TempDir,
}

impl HttpGitServer {
    /// Serves every repository under `root` to `user` with `password`, and to nobody else.
    pub fn serve(root: &Path, user: &str, password: &str) -> HttpGitServer {
        let dir = tempfile::tempdir().expect("temp dir for nginx");
        let socket = dir.path().join("fcgiwrap.sock");
        let mut command = Command::new("fcgiwrap");
        command.arg("-s").arg(format!("unix:{}", socket.display()));
        let fcgiwrap = ServerProcess::start(command, &Endpoint::Unix(socket.clone()), &dir.path().join("fcgiwrap.log"));

        // nginx accepts plain-text passwords in this form, so no hashing tool is needed.
        fs::write(dir.path().join("htpasswd"), format!("{user}:{{PLAIN}}{password}\n")).expect("writing htpasswd");
        let port = free_port();
        let config = dir.path().join("nginx.conf");
        fs::write(&config, nginx_config(dir.path(), port, &socket, root)).expect("writing nginx.conf");
        let mut command = Command::new("nginx");
        command.arg("-p").arg(dir.path()).arg("-c").arg(&config);
        command.arg("-e").arg(dir.path().join("error.log"));
        let nginx = ServerProcess::start(command, &Endpoint::Tcp(port), &dir.path().join("nginx.log"));
        HttpGitServer { _nginx: nginx, _fcgiwrap: fcgiwrap, port, _dir: dir }
    }

    /// `http://` URL of the repository `name` under the served root.
    pub fn url(&self, name: &str) -> String {
        format!("http://127.0.0.1:{}/{name}", self.port)
    }
}

/// A foreground, single-process nginx keeping every file it writes under `prefix`.
fn nginx_config(prefix: &Path, port: u16, fcgi_socket: &Path, git_root: &Path) -> String {
    let prefix = prefix.display();
    // As root nginx would switch to "nobody", who cannot read the repositories.
    let user = if geteuid().is_root() { "user root;" } else { "" };
    format!(
        r#"{user}
daemon off;
master_process off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/client_body;
    fastcgi_temp_path {prefix}/fastcgi;
    proxy_temp_path {prefix}/proxy;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 0;
        location / {{
            auth_basic "git";
            auth_basic_user_file {prefix}/htpasswd;
            include /etc/nginx/fastcgi_params;
            fastcgi_param SCRIPT_FILENAME /usr/lib/git-core/git-http-backend;
            fastcgi_param GIT_PROJECT_ROOT {git_root};
            fastcgi_param GIT_HTTP_EXPORT_ALL "";
            fastcgi_param PATH_INFO $uri;
            fastcgi_param REMOTE_USER $remote_user;
            fastcgi_pass unix:{socket};
        }}
    }}
}}
"#,
        git_root = git_root.display(),
        socket = fcgi_socket.display(),
    )
}

/// Debian's sshd on a loopback port, letting the current user in with a generated key
/// and nothing else.
pub struct SshGitServer {
    _sshd: ServerProcess,
    port: u16,
    user: String,
    dir: TempDir,
}

impl SshGitServer {
    pub fn serve() -> SshGitServer {
        let dir = tempfile::tempdir().expect("temp dir for sshd");
        for key in ["host_key", "user_key", "stranger_key"] {
            generate_key(&dir.path().join(key));
        }
        fs::copy(dir.path().join("user_key.pub"), dir.path().join("authorized_keys")).expect("writing authorized_keys");
        // sshd refuses to start without its privilege separation directory.
        fs::create_dir_all("/run/sshd").expect("creating /run/sshd");

        let port = free_port();
        let config = dir.path().join("sshd_config");
        fs::write(&config, sshd_config(dir.path(), port)).expect("writing sshd_config");
        let server = SshGitServer {
            _sshd: ServerProcess::start(sshd_command(&config), &Endpoint::Tcp(port), &dir.path().join("sshd.log")),
            port,
            user: current_user(),
            dir,
        };
        server.write_known_hosts("known_hosts", "host_key.pub");
        server.write_known_hosts("wrong_known_hosts", "stranger_key.pub");
        server
    }

    /// `ssh://` URL of the repository at the absolute path `repo`.
    pub fn url(&self, repo: &Path) -> String {
        format!("ssh://{}@127.0.0.1:{}{}", self.user, self.port, repo.display())
    }

    /// The private key the server accepts.
    pub fn identity(&self) -> PathBuf {
        self.dir.path().join("user_key")
    }

    /// A private key the server has never heard of.
    pub fn stranger_identity(&self) -> PathBuf {
        self.dir.path().join("stranger_key")
    }

    /// A `known_hosts` file listing the server's real host key.
    pub fn known_hosts(&self) -> PathBuf {
        self.dir.path().join("known_hosts")
    }

    /// A `known_hosts` file listing another key for the same host and port, as if
    /// someone else answered in the server's name.
    pub fn wrong_known_hosts(&self) -> PathBuf {
        self.dir.path().join("wrong_known_hosts")
    }

    /// How OpenSSH names a host on a non-default port in `known_hosts`.
    pub fn known_hosts_name(&self) -> String {
        format!("[127.0.0.1]:{}", self.port)
    }

    fn write_known_hosts(&self, file: &str, public_key: &str) {
        let public_key = fs::read_to_string(self.dir.path().join(public_key)).expect("reading a public key");
        // Drop the key's comment: "TYPE BASE64 COMMENT".
        let key: Vec<&str> = public_key.split_whitespace().take(2).collect();
        let line = format!("{} {}\n", self.known_hosts_name(), key.join(" "));
        fs::write(self.dir.path().join(file), line).expect("writing known_hosts");
    }
}

fn sshd_config(dir: &Path, port: u16) -> String {
    let dir = dir.display();
    format!(
        "ListenAddress 127.0.0.1:{port}
HostKey {dir}/host_key
PidFile {dir}/sshd.pid
AuthorizedKeysFile {dir}/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
LogLevel VERBOSE
"
    )
}

/// In the foreground (`-D`) with logs on stderr (`-e`); sshd re-executes itself, so it
/// must be named by its absolute path.
fn sshd_command(config: &Path) -> Command {
    let mut command = Command::new("/usr/sbin/sshd");
    command.arg("-D").arg("-e").arg("-f").arg(config);
    command
}

/// An unencrypted ed25519 key pair at `path` and `path.pub`.
fn generate_key(path: &Path) {
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "gitops-tests", "-f"])
        .arg(path)
        .status()
        .expect("running ssh-keygen");
    assert!(status.success(), "ssh-keygen failed for {}", path.display());
}

fn current_user() -> String {
    User::from_uid(nix::unistd::getuid())
        .expect("reading the user database")
        .expect("the current user has an entry in the user database")
        .name
}

/// A `--git-secret-dir` laid out like a mounted Secret: one file per `(name, contents)`.
pub fn git_secret_dir(files: &[(&str, &str)]) -> TempDir {
    let dir = tempfile::tempdir().expect("temp dir for a git secret");
    for (name, contents) in files {
        fs::write(dir.path().join(name), contents).expect("writing a git secret file");
    }
    dir
}

/// Where a server accepts connections once it is ready.
pub(crate) enum Endpoint {
    Tcp(u16),
    Unix(PathBuf),
}

impl Endpoint {
    fn accepts(&self) -> bool {
        match self {
            Endpoint::Tcp(port) => TcpStream::connect(("127.0.0.1", *port)).is_ok(),
            Endpoint::Unix(path) => UnixStream::connect(path).is_ok(),
        }
    }
}

/// A server process in a process group of its own, so that dropping it kills the
/// server and every child it forked (nginx workers, sshd sessions, CGI scripts),
/// leaving nothing behind when a test ends or panics.
pub(crate) struct ServerProcess {
    child: Child,
}

impl ServerProcess {
    const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);

    /// Starts `command` with its output in `log`, and returns once `endpoint` accepts
    /// connections. Panics with the log if the server exits or never gets ready.
    pub(crate) fn start(mut command: Command, endpoint: &Endpoint, log: &Path) -> ServerProcess {
        let output = File::create(log).expect("creating a server log");
        command
            .stdin(Stdio::null())
            .stdout(output.try_clone().expect("duplicating a log file handle"))
            .stderr(output)
            .process_group(0);
        let child = command.spawn().unwrap_or_else(|e| panic!("starting {command:?}: {e}"));
        let mut server = ServerProcess { child };
        let deadline = Instant::now() + Self::STARTUP_TIMEOUT;
        while !endpoint.accepts() {
            let exited = server.child.try_wait().expect("polling a server").is_some();
            if exited || Instant::now() > deadline {
                let log = fs::read_to_string(log).unwrap_or_default();
                panic!("{command:?} did not start serving (exited: {exited}); its log:\n{log}");
            }
            thread::sleep(Duration::from_millis(20));
        }
        server
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let group = Pid::from_raw(self.child.id() as i32);
        // The group is gone already if the server died; nothing is left to kill then.
        let _ = killpg(group, Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// A loopback port nobody listens on right now. Another process could take it before
/// the server binds it; on a test machine that is rare enough to accept.
pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("binding a free loopback port")
        .port()
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("temp paths are UTF-8")
}
