//! What the benchmark reads from the outside: the `gitops-agent` process (its HTTP
//! endpoints, `/proc/PID/status` and `/proc/PID/stat`); the API server's request
//! counters are [`gitops_tests::requests`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use gitops_bootstrap::local::{Lifetime, Process};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `gitops-agent`, built in release mode into the target directory the benchmark runs
/// from (`cargo build --release -p gitops-agent`, run here so one command does it all).
pub fn agent_binary() -> Result<PathBuf> {
    // This binary is TARGET/release/gitops-bench: build the agent into the same TARGET,
    // however the benchmark was started.
    let exe = std::env::current_exe()?;
    let release = exe.parent().context("the benchmark's directory")?;
    let target = release.parent().context("the target directory")?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let status = Command::new(cargo)
        .args(["build", "--release", "-q", "-p", "gitops-agent", "--target-dir"])
        .arg(target)
        .status()
        .context("running cargo build -p gitops-agent")?;
    if !status.success() {
        bail!("cargo build --release -p gitops-agent failed");
    }
    Ok(release.join("gitops-agent"))
}

/// A `gitops-agent run` process, started like the control plane's components (own
/// process group, killed by the kernel if the benchmark dies); stopped when dropped.
pub struct AgentProcess {
    process: Process,
    address: String,
    pub log: PathBuf,
}

/// What differs between the agent runs of the benchmark.
pub struct AgentArgs<'a> {
    pub repo: &'a str,
    pub namespace: &'a str,
    pub interval: &'a str,
}

impl AgentProcess {
    /// Starts the agent with its files in `state_dir` (log: `logs/NAME.log`).
    pub async fn start(
        binary: &Path,
        kubeconfig: &Path,
        args: AgentArgs<'_>,
        state_dir: &Path,
        name: &str,
    ) -> Result<AgentProcess> {
        let address = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.to_string();
        let argv = vec![
            "run".to_owned(),
            format!("--repo={}", args.repo),
            format!("--interval={}", args.interval),
            format!("--listen={address}"),
            format!("--namespace={}", args.namespace),
            format!("--default-namespace={}", args.namespace),
            "--leader-election=false".to_owned(),
        ];
        let env = [("KUBECONFIG", kubeconfig.as_os_str()), ("RUST_LOG", std::ffi::OsStr::new("info"))];
        let process = Process::spawn_with_env(state_dir, name, binary, &argv, &env, Lifetime::TiedToThisProcess)
            .context("starting gitops-agent")?;
        let log = process.log.clone();
        let agent = AgentProcess { process, address, log };
        let deadline = Instant::now() + Duration::from_secs(60);
        while agent.get("/healthz").await.is_err() {
            if Instant::now() > deadline {
                bail!("gitops-agent did not answer /healthz; see {}", agent.log.display());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(agent)
    }

    pub fn pid(&self) -> i32 {
        self.process.pid.as_raw()
    }

    pub async fn get(&self, path: &str) -> Result<String> {
        http(&self.address, "GET", path).await
    }

    /// `POST /hooks/git`, as a forge does after a push (no secret is set).
    pub async fn webhook(&self) -> Result<()> {
        http(&self.address, "POST", "/hooks/git").await.map(drop)
    }

    /// The sum of every series of a metric (all label values), 0 when absent.
    pub async fn metric(&self, name: &str) -> Result<f64> {
        Ok(sum_series(&self.get("/metrics").await?, name))
    }

    /// Whether the agent reports `revision` as applied (`gitops_applied_revision_info`).
    pub async fn applied(&self, revision: &str) -> Result<bool> {
        let series = format!("gitops_applied_revision_info{{revision=\"{revision}\"}} 1");
        Ok(self.get("/metrics").await?.lines().any(|l| l == series))
    }

    /// Polls until `revision` is applied; returns when it saw it.
    pub async fn wait_applied(&self, revision: &str, timeout: Duration) -> Result<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.applied(revision).await? {
                return Ok(Instant::now());
            }
            if Instant::now() > deadline {
                bail!("revision {revision} not applied after {timeout:?}; see {}", self.log.display());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// `gitops_sync_stage_seconds` as it stands: each stage's sum and count.
    pub async fn stage_seconds(&self) -> Result<StageSeconds> {
        let metrics = self.get("/metrics").await?;
        let mut stages = StageSeconds::default();
        for line in metrics.lines() {
            let Some(rest) = line.strip_prefix("gitops_sync_stage_seconds_") else { continue };
            let Some((series, value)) = rest.rsplit_once(' ') else { continue };
            let Some((which, labels)) = series.split_once("{stage=\"") else { continue };
            let stage = labels.trim_end_matches("\"}").to_owned();
            let value: f64 = value.parse().unwrap_or(0.0);
            let entry = stages.0.entry(stage).or_default();
            match which {
                "sum" => entry.0 = value,
                "count" => entry.1 = value,
                _ => {}
            }
        }
        Ok(stages)
    }

    /// (VmRSS, VmHWM) in bytes.
    pub fn memory(&self) -> Result<(u64, u64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        let field = |name: &str| -> Result<u64> {
            let line = status.lines().find(|l| l.starts_with(name)).with_context(|| format!("{name} in status"))?;
            let kib: u64 = line.split_whitespace().nth(1).context("a value")?.parse()?;
            Ok(kib * 1024)
        };
        Ok((field("VmRSS:")?, field("VmHWM:")?))
    }

    /// User plus system CPU time the process has used.
    pub fn cpu(&self) -> Result<Duration> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid()))?;
        // Fields after the command name, which is in parentheses and may hold spaces.
        let rest = stat.rsplit_once(')').context("stat format")?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of stat(5); `rest` starts at field 3.
        let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
        let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.unwrap_or(100) as u64;
        Ok(Duration::from_nanos(ticks * 1_000_000_000 / hz))
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.process.stop();
    }
}

/// Each stage's (seconds in all, syncs) from `gitops_sync_stage_seconds`; none for an
/// agent that has no such metric (a build from before it).
#[derive(Debug, Default)]
pub struct StageSeconds(BTreeMap<String, (f64, f64)>);

impl StageSeconds {
    /// Each stage's mean milliseconds per sync since `before`.
    pub fn mean_ms_since(&self, before: &StageSeconds) -> BTreeMap<String, f64> {
        self.0
            .iter()
            .filter_map(|(stage, (sum, count))| {
                let (sum_before, count_before) = before.0.get(stage).copied().unwrap_or_default();
                let syncs = count - count_before;
                (syncs > 0.0).then(|| (stage.clone(), (sum - sum_before) * 1000.0 / syncs))
            })
            .collect()
    }
}

/// One HTTP/1.0 request to a local server; the body of a 2xx answer.
async fn http(address: &str, method: &str, path: &str) -> Result<String> {
    let mut stream = tokio::net::TcpStream::connect(address).await?;
    stream
        .write_all(format!("{method} {path} HTTP/1.0\r\nHost: {address}\r\nContent-Length: 0\r\n\r\n").as_bytes())
        .await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").context("an HTTP response")?;
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if !status.starts_with('2') {
        bail!("{method} {path}: {head}");
    }
    Ok(body.to_owned())
}

/// The sum of a metric's series in Prometheus text format.
pub fn sum_series(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' ')))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `kubectl apply --server-side` of a directory into a namespace; its wall time.
pub fn kubectl_apply(kubeconfig: &Path, dir: &Path, namespace: &str) -> Result<Duration> {
    let started = Instant::now();
    let output = Command::new("kubectl")
        .args(["apply", "--server-side", "--recursive", "-n", namespace, "-f"])
        .arg(dir)
        .env("KUBECONFIG", kubeconfig)
        .stdout(Stdio::null())
        .output()
        .context("running kubectl")?;
    let elapsed = started.elapsed();
    if !output.status.success() {
        bail!("kubectl apply failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(elapsed)
}
