//! Control-plane processes: each runs in a process group of its own, logs to a file,
//! and leaves a pid file, so that `down` (from another process) and a crashed test
//! both find and stop every one of them.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use super::Error;

/// How long a component gets to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Whether a process outlives the one that started it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifetime {
    /// Keeps running after the starter exits (`gitops-bootstrap up`).
    Detached,
    /// Killed by the kernel when the starting process dies, even by SIGKILL (tests).
    TiedToThisProcess,
}

/// A running component.
#[derive(Debug)]
pub struct Process {
    pub name: String,
    pub pid: Pid,
    pub log: PathBuf,
    pid_file: PathBuf,
    /// Held when we are the parent, so the exit status can be reaped.
    child: Mutex<Option<Child>>,
}

impl Process {
    /// Starts `program args` as component `name` in `state_dir`: output goes to
    /// `state_dir/logs/NAME.log`, the pid to `state_dir/pids/NAME.pid`.
    pub fn spawn(
        state_dir: &Path,
        name: &str,
        program: &Path,
        args: &[String],
        lifetime: Lifetime,
    ) -> Result<Process, Error> {
        Process::spawn_with_env(state_dir, name, program, args, &[], lifetime)
    }

    /// [`Process::spawn`] with extra environment variables.
    pub fn spawn_with_env(
        state_dir: &Path,
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(&str, &OsStr)],
        lifetime: Lifetime,
    ) -> Result<Process, Error> {
        let logs = state_dir.join("logs");
        let pids = state_dir.join("pids");
        for dir in [&logs, &pids] {
            fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        let log = logs.join(format!("{name}.log"));
        let out = File::create(&log).map_err(|e| Error::io(&log, e))?;
        let err = out.try_clone().map_err(|e| Error::io(&log, e))?;

        let mut cmd = Command::new(program);
        cmd.args(args)
            .envs(env.iter().copied())
            .current_dir(state_dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            // Own group: a terminal's Ctrl-C does not reach it, and killpg stops it whole.
            .process_group(0);
        let child = match lifetime {
            Lifetime::Detached => cmd.spawn(),
            Lifetime::TiedToThisProcess => spawn_tied(cmd),
        }
        .map_err(|source| Error::Spawn { program: program.to_owned(), source })?;

        let pid = Pid::from_raw(child.id() as i32);
        let pid_file = pids.join(format!("{name}.pid"));
        fs::write(&pid_file, pid.to_string()).map_err(|e| Error::io(&pid_file, e))?;
        Ok(Process { name: name.to_owned(), pid, log, pid_file, child: Mutex::new(Some(child)) })
    }

    /// `Some(reason)` once the process has exited.
    pub fn exited(&self) -> Option<String> {
        let mut child = self.child.lock().unwrap();
        match child.as_mut() {
            Some(c) => match c.try_wait() {
                Ok(Some(status)) => Some(status.to_string()),
                Ok(None) => None,
                Err(e) => Some(e.to_string()),
            },
            None => (!is_running(self.pid.as_raw())).then(|| "exited".to_owned()),
        }
    }

    /// The last `lines` lines of the component's log, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }

    /// SIGTERM to the whole group, SIGKILL after a grace period, then reaps it.
    pub fn stop(&self) {
        stop_group(self.pid);
        if let Some(mut child) = self.child.lock().unwrap().take() {
            let _ = child.wait();
        }
        let _ = fs::remove_file(&self.pid_file);
    }
}

/// Stops every component whose pid file is under `state_dir/pids`, started by this
/// process or any other. Returns the names of those that were still running.
pub fn stop_all(state_dir: &Path) -> Vec<String> {
    let mut stopped = Vec::new();
    for (name, pid) in pid_files(state_dir) {
        if is_running(pid.as_raw()) {
            stop_group(pid);
            stopped.push(name);
        }
    }
    let _ = fs::remove_dir_all(state_dir.join("pids"));
    stopped
}

/// Each recorded component with whether it still runs.
pub fn status(state_dir: &Path) -> Vec<(String, Pid, bool)> {
    pid_files(state_dir).into_iter().map(|(name, pid)| (name, pid, is_running(pid.as_raw()))).collect()
}

fn pid_files(state_dir: &Path) -> Vec<(String, Pid)> {
    let Ok(entries) = fs::read_dir(state_dir.join("pids")) else { return Vec::new() };
    let mut found: Vec<(String, Pid)> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.path().file_stem()?.to_str()?.to_owned();
            let pid = fs::read_to_string(e.path()).ok()?.trim().parse().ok()?;
            Some((name, Pid::from_raw(pid)))
        })
        .collect();
    found.sort();
    found
}

fn stop_group(pgid: Pid) {
    if killpg(pgid, Signal::SIGTERM).is_err() {
        return;
    }
    let deadline = Instant::now() + STOP_GRACE;
    let mut killed = false;
    while group_alive(pgid) {
        if !killed && Instant::now() > deadline {
            let _ = killpg(pgid, Signal::SIGKILL);
            killed = true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A group leader that has exited but is not yet reaped still answers signals, so a
/// zombie counts as gone (its parent, or init, reaps it).
fn group_alive(pgid: Pid) -> bool {
    killpg(pgid, None) != Err(Errno::ESRCH) && group_has_live_member(pgid)
}

/// Whether process `pid` runs. A zombie has exited: its parent, or init, reaps it.
pub fn is_running(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state letter follows the parenthesised command name.
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => false,
    }
}

fn group_has_live_member(pgid: Pid) -> bool {
    let Ok(procs) = fs::read_dir("/proc") else { return false };
    procs.flatten().any(|p| {
        let Ok(stat) = fs::read_to_string(p.path().join("stat")) else { return false };
        let Some((_, rest)) = stat.rsplit_once(')') else { return false };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // Fields after the name: state, ppid, pgrp, ...
        fields.len() > 2 && fields[2] == pgid.to_string() && !matches!(fields[0], "Z" | "X")
    })
}

/// The last `lines` lines of a log file (reads at most its last 64 KiB).
pub fn tail(path: &Path, lines: usize) -> String {
    let Ok(mut file) = File::open(path) else { return format!("(no log at {})", path.display()) };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut buf = Vec::new();
    let _ = file.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Forks `cmd` with PR_SET_PDEATHSIG=SIGKILL. The kernel sends that signal when the
/// *thread* that forked the child exits, and test harnesses run each test on a thread
/// of its own, so tied children are forked from one thread that lives as long as the
/// process does.
fn spawn_tied(cmd: Command) -> std::io::Result<Child> {
    static FORKER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let forker = FORKER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("control-plane-forker".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let parent = std::process::id() as i32;
                    // SAFETY: prctl and getppid are async-signal-safe; nothing allocates.
                    unsafe {
                        cmd.pre_exec(move || {
                            if nix::libc::prctl(nix::libc::PR_SET_PDEATHSIG, nix::libc::SIGKILL) != 0 {
                                return Err(std::io::Error::last_os_error());
                            }
                            // The parent may have died before prctl took effect.
                            if nix::libc::getppid() != parent {
                                nix::libc::_exit(1);
                            }
                            Ok(())
                        });
                    }
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("spawning the control-plane forker thread");
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    forker.lock().unwrap().send((cmd, reply_tx)).expect("forker thread lives as long as the process");
    reply_rx.recv().expect("forker thread answers every request")
}
