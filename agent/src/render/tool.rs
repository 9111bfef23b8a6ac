//! Tool: runs a renderer (`kustomize`, `helm`) as a child process the way a render
//! must run: an empty environment (no proxy settings, tokens or kubeconfig leak in),
//! bounded memory (`RLIMIT_DATA`: Go reserves far more address space than it uses, so
//! `RLIMIT_AS` would stop it starting), a timeout after which it is killed, and
//! bounded output.

use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Limits every run shares.
#[derive(Debug, Clone)]
pub struct Limits {
    pub timeout: Duration,
    /// Bytes of heap and data segment the child may have.
    pub memory: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { timeout: Duration::from_secs(120), memory: 2 << 30 }
    }
}

/// The most stdout kept: a render larger than this is refused, not buffered without end.
const MAX_OUTPUT: u64 = 512 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("cannot run {}: {source}", program.display())]
    Spawn { program: PathBuf, source: std::io::Error },
    #[error("{} did not finish within {timeout:?} and was stopped", program.display())]
    Timeout { program: PathBuf, timeout: Duration },
    #[error("{} failed: {message}", name(program))]
    Failed { program: PathBuf, message: String },
    #[error("{} wrote more than {MAX_OUTPUT} bytes", program.display())]
    TooMuchOutput { program: PathBuf },
    #[error("{} wrote output that is not UTF-8", program.display())]
    NotUtf8 { program: PathBuf },
}

/// A tool by its file name: where it is installed says nothing about what failed.
fn name(program: &Path) -> std::path::Display<'_> {
    Path::new(program.file_name().unwrap_or(program.as_os_str())).display()
}

/// `program` itself, or for a bare name (`kustomize`) where the agent's own `PATH` has
/// it: the tool runs with a cleared environment, whose lookup would search only
/// `/bin:/usr/bin` and miss images that install tools in `/usr/local/bin`.
fn on_path(program: &Path, path: Option<OsString>) -> PathBuf {
    if program.components().count() != 1 {
        return program.to_owned();
    }
    path.and_then(|paths| std::env::split_paths(&paths).map(|dir| dir.join(program)).find(|path| path.is_file()))
        .unwrap_or_else(|| program.to_owned())
}

/// One invocation: the program, its arguments, its working directory and the only
/// environment variables it sees.
pub struct Run<'a> {
    pub program: &'a Path,
    pub args: Vec<OsString>,
    pub dir: &'a Path,
    pub env: Vec<(&'static str, OsString)>,
    /// Written to the tool's standard input: the way a secret reaches it, never the
    /// command line, which any process may read in /proc.
    pub stdin: Option<&'a str>,
}

impl Run<'_> {
    /// Runs to completion and returns stdout; on failure, the tool's own message
    /// (stderr, trimmed), with every string of `secrets` blanked out.
    pub fn output(self, limits: &Limits, secrets: &[&str]) -> Result<String, ToolError> {
        let program = self.program.to_owned();
        let mut command = Command::new(on_path(self.program, std::env::var_os("PATH")));
        command
            .args(&self.args)
            .current_dir(self.dir)
            .env_clear()
            .envs(self.env)
            .stdin(if self.stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let memory = limits.memory;
        // SAFETY: setrlimit is async-signal-safe, and nothing else runs between fork and exec.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, move || {
                let limit = libc::rlimit { rlim_cur: memory, rlim_max: memory };
                if libc::setrlimit(libc::RLIMIT_DATA, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command.spawn().map_err(|source| ToolError::Spawn { program: program.clone(), source })?;
        if let (Some(text), Some(mut stdin)) = (self.stdin, child.stdin.take()) {
            // A tool that exits before reading it all is reported by its status below.
            let _ = std::io::Write::write_all(&mut stdin, text.as_bytes());
        }
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        // Read on threads so a large output cannot fill a pipe and stall the child.
        let out = std::thread::spawn(move || {
            let mut buffer = Vec::new();
            stdout.take(MAX_OUTPUT + 1).read_to_end(&mut buffer).map(|_| buffer)
        });
        let err = std::thread::spawn(move || {
            let mut buffer = Vec::new();
            let _ = stderr.take(1 << 20).read_to_end(&mut buffer);
            buffer
        });
        let started = Instant::now();
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if started.elapsed() > limits.timeout => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(ToolError::Timeout { program, timeout: limits.timeout });
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                Err(source) => return Err(ToolError::Spawn { program, source }),
            }
        };
        let stdout = out.join().expect("reader does not panic").unwrap_or_default();
        let stderr = err.join().expect("reader does not panic");
        if !status.success() {
            // Both tools prefix their one-line reason with "Error: ", which the failure says already.
            let mut message = String::from_utf8_lossy(&stderr).trim().trim_start_matches("Error: ").to_owned();
            for secret in secrets.iter().filter(|s| !s.is_empty()) {
                message = message.replace(secret, "***");
            }
            if message.is_empty() {
                message = status.to_string();
            }
            return Err(ToolError::Failed { program, message });
        }
        if stdout.len() as u64 > MAX_OUTPUT {
            return Err(ToolError::TooMuchOutput { program });
        }
        String::from_utf8(stdout).map_err(|_| ToolError::NotUtf8 { program })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str, limits: &Limits) -> Result<String, ToolError> {
        Run {
            program: Path::new("/bin/sh"),
            args: vec!["-c".into(), script.into()],
            dir: Path::new("/"),
            env: vec![("ONLY", "this".into())],
            stdin: Some("from stdin"),
        }
        .output(limits, &["hunter2"])
    }

    #[test]
    fn the_child_sees_only_the_environment_it_is_given() {
        let env = sh("env | grep -v '^PWD=' | grep -v '^SHLVL=' | grep -v '^_=' | sort", &Limits::default()).unwrap();
        assert_eq!(env.trim(), "ONLY=this");
    }

    #[test]
    fn a_failure_carries_the_tool_message_without_secrets() {
        let error = sh("echo 'login hunter2 refused' >&2; exit 3", &Limits::default()).unwrap_err().to_string();
        assert_eq!(error, "sh failed: login *** refused");
    }

    #[test]
    fn a_tool_named_without_a_path_is_found_on_the_agents_path() {
        let run = Run {
            program: Path::new("sh"),
            args: vec!["-c".into(), "echo found".into()],
            dir: Path::new("/"),
            env: vec![],
            stdin: None,
        };
        assert_eq!(run.output(&Limits::default(), &[]).unwrap(), "found\n");
        // Wherever PATH has it, not only in the cleared environment's /bin:/usr/bin (the
        // agent's image installs kustomize and helm in /usr/local/bin).
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("kustomize"), "").unwrap();
        let path = std::env::join_paths(["/nowhere".into(), dir.path().to_owned()]).unwrap();
        assert_eq!(on_path(Path::new("kustomize"), Some(path)), dir.path().join("kustomize"));
        assert_eq!(on_path(Path::new("kustomize"), None), Path::new("kustomize"));
        assert_eq!(on_path(Path::new("/opt/kustomize"), Some("/bin".into())), Path::new("/opt/kustomize"));
    }

    #[test]
    fn standard_input_reaches_the_tool() {
        assert_eq!(sh("read line; echo \"$line\"", &Limits::default()).unwrap(), "from stdin\n");
    }

    #[test]
    fn a_slow_tool_is_stopped() {
        let limits = Limits { timeout: Duration::from_millis(200), ..Limits::default() };
        assert!(matches!(sh("sleep 30", &limits), Err(ToolError::Timeout { .. })));
    }

    #[test]
    fn memory_is_bounded() {
        let limits = Limits { memory: 64 << 20, ..Limits::default() };
        // A 200 MiB shell variable cannot be allocated under a 64 MiB data limit.
        let result = sh("x=$(head -c 209715200 /dev/zero | tr '\\0' a); echo ${#x}", &limits);
        assert!(matches!(result, Err(ToolError::Failed { .. })), "{result:?}");
    }
}
