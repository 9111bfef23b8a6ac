//! The whole Scale deployment from git on the real node, as `gitops-bootstrap up
//! --provider local` makes it: a repository from repo-template following
//! `clusters/local`, the agent in the cluster, the pipeline's images built from their
//! Dockerfiles. PostgreSQL becomes Ready on its volume, the local S3 endpoint serves the
//! corpus, the viewer answers through its Service, and the agent's batch run (the
//! Spark driver in a Job's pod, its executors as pods) fills the tables with exactly
//! what the test computes on its own. A commit that changes the job spec makes exactly
//! one more run, and so does its `git revert`. The monitoring stack from the same
//! repository (kube-prometheus-stack, its images built here) fires `GitOpsDriftDetected`
//! at a kubectl edit, Alertmanager receives it, and a commit resolves it.
//!
//! Then chaos, as the original deployment proved itself: under 100 requests a second
//! to the viewer through its Service, a viewer pod is deleted every few seconds, then
//! the PostgreSQL pod, then the agent's leader pod, then an executor pod in the middle
//! of a run, then the PostgreSQL pod in the middle of one. The test prints each one's
//! error count and recovery time, and checks that nothing is lost: the run that lost an
//! executor still writes exactly the right tables, the run that lost its database is
//! retried or reported failed and the next one is exact, and the agent, under its new
//! leader, makes no run twice. The leader's `/status` and metrics agree with the cluster
//! on every run.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use gitops_bootstrap::install;
use gitops_bootstrap::local::agent::{LOCAL_CLUSTER_PATH, LocalSettings, install_in_cluster};
use gitops_bootstrap::local::dockerfile;
use gitops_tests::cluster::{self, http_get};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Service};
use kube::Api;
use kube::api::{DeleteParams, ListParams};
use serde_json::Value;

const NAMESPACE: &str = "scale";
const SONGS: usize = 30;
const THRESHOLD: f64 = 0.5;
const MIN_INSTRUMENTS: usize = 3;
/// Long enough for a Spark run on two busy cores; only keeps a broken run from hanging CI.
const RUN_BOUND: Duration = Duration::from_secs(900);

/// What the corpus holds and which pairs are similar, computed by the pipeline's test
/// generator (`repo-template/apps/scale/tests/midigen.py`: it writes each song from a
/// chosen instrument set, and finds the pairs by brute force), not by the job.
struct Truth {
    songs: BTreeMap<String, BTreeSet<String>>,
    pairs: BTreeMap<(String, String), f64>,
}

fn write_corpus(dir: &Path) -> Truth {
    let tests = Path::new(env!("CARGO_MANIFEST_DIR")).join("../repo-template/apps/scale/tests");
    let script = format!(
        "import json, pathlib, sys\n\
         sys.path.insert(0, {tests:?})\n\
         import midigen\n\
         root = pathlib.Path({dir:?})\n\
         known = midigen.random_corpus(root, {SONGS}, seed=7)\n\
         (root / 'broken').mkdir()\n\
         (root / 'broken' / 'noise.mid').write_bytes(b'RIFF' + bytes(300))\n\
         pairs = midigen.exact_similar_pairs(known, {THRESHOLD}, {MIN_INSTRUMENTS})\n\
         print(json.dumps({{'songs': {{p: sorted(s) for p, s in known.items()}},\n\
                           'pairs': [[a, b, j] for (a, b), j in pairs.items()]}}))\n",
        tests = tests.display().to_string(),
        dir = dir.display().to_string(),
    );
    let out = Command::new("python3").arg("-c").arg(script).output().expect("python3 runs");
    assert!(out.status.success(), "midigen: {}", String::from_utf8_lossy(&out.stderr));
    let truth: Value = serde_json::from_slice(&out.stdout).unwrap();
    let songs = truth["songs"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(path, set)| (path.clone(), set.as_array().unwrap().iter().map(|i| i.as_str().unwrap().into()).collect()))
        .collect();
    let pairs = truth["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| ((p[0].as_str().unwrap().into(), p[1].as_str().unwrap().into()), p[2].as_f64().unwrap()))
        .collect();
    Truth { songs, pairs }
}

/// Rows of `sql` run by psql in the PostgreSQL pod (local socket: no password here).
fn query(kubeconfig: &str, sql: &str) -> Vec<Vec<String>> {
    let out = Command::new("kubectl")
        .args(["--kubeconfig", kubeconfig, "-n", NAMESPACE, "exec", "postgres-0", "--", "sh", "-c"])
        .arg(format!("psql -U \"$POSTGRES_USER\" -d \"$POSTGRES_DB\" -At -F '|' -c \"{sql}\""))
        .output()
        .unwrap();
    assert!(out.status.success(), "psql {sql}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().lines().map(|line| line.split('|').map(str::to_owned).collect()).collect()
}

fn git(repo: &Path, args: &[&str]) {
    let out = Command::new("git")
        .args(["-c", "user.name=test", "-c", "user.email=test@localhost"])
        .args(args)
        .current_dir(repo)
        .output()
        .unwrap();
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// How run `name` went: whether it succeeded, the executor pods seen while it ran (each
/// owned by the run's driver pod), and how those that failed ended.
struct Run {
    succeeded: bool,
    executors: BTreeSet<String>,
    executor_exits: BTreeMap<String, String>,
}

/// Waits for run `name` to end.
async fn wait_for_run(jobs: &Api<Job>, pods: &Api<Pod>, name: &str) -> Run {
    let mut run = Run { succeeded: false, executors: BTreeSet::new(), executor_exits: BTreeMap::new() };
    let deadline = tokio::time::Instant::now() + RUN_BOUND;
    loop {
        let listed = pods.list(&ListParams::default().labels("spark-role=executor")).await.unwrap();
        for pod in listed.items {
            let owners = pod.metadata.owner_references.clone().unwrap_or_default();
            if owners.iter().any(|o| o.kind == "Pod" && o.name.starts_with(&format!("{name}-"))) {
                let pod_name = pod.metadata.name.clone().unwrap();
                let statuses = pod.status.and_then(|s| s.container_statuses).unwrap_or_default();
                // Not those the driver stops at the end (SIGTERM, 143) or that finish.
                let ended = statuses.iter().find_map(|s| s.state.as_ref()?.terminated.as_ref());
                if let Some(ended) = ended.filter(|ended| ![0, 143].contains(&ended.exit_code)) {
                    let reason = ended.reason.clone().unwrap_or_default();
                    run.executor_exits.insert(pod_name.clone(), format!("{reason} (exit code {})", ended.exit_code));
                }
                run.executors.insert(pod_name);
            }
        }
        let status = jobs.get_opt(name).await.unwrap().and_then(|job| job.status).unwrap_or_default();
        if status.succeeded.unwrap_or(0) > 0 || status.failed.unwrap_or(0) > 0 {
            run.succeeded = status.succeeded.unwrap_or(0) > 0;
            return run;
        }
        assert!(tokio::time::Instant::now() < deadline, "run {name} did not end");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The run's driver log, for a failed run's message.
fn driver_log(kubeconfig: &str, run: &str) -> String {
    let out = Command::new("kubectl")
        .args(["--kubeconfig", kubeconfig, "-n", NAMESPACE, "logs", &format!("job/{run}"), "--tail=80"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// The runs of midi-batch, by name.
async fn runs(jobs: &Api<Job>) -> Vec<String> {
    let listed = jobs.list(&ListParams::default().labels("gitops.scale.dev/job=midi-batch")).await.unwrap();
    let mut names: Vec<String> = listed.items.into_iter().map(|job| job.metadata.name.unwrap()).collect();
    names.sort();
    names
}

/// Asserts the tables hold exactly the corpus' songs, instruments and similar pairs.
fn assert_tables(kubeconfig: &str, truth: &Truth) {
    let mut songs: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for row in query(kubeconfig, "SELECT s.path, i.instrument FROM songs s JOIN song_instruments i USING (song_id)") {
        songs.entry(row[0].clone()).or_default().insert(row[1].clone());
    }
    assert_eq!(songs, truth.songs, "instruments per song (drums as 'drums', never as program 0)");
    let pairs: BTreeMap<(String, String), f64> = query(
        kubeconfig,
        "SELECT a.path, b.path, p.jaccard FROM similar_songs p \
         JOIN songs a ON a.song_id = p.song_a JOIN songs b ON b.song_id = p.song_b",
    )
    .into_iter()
    .map(|row| {
        let (a, b) = if row[0] < row[1] { (row[0].clone(), row[1].clone()) } else { (row[1].clone(), row[0].clone()) };
        ((a, b), row[2].parse().unwrap())
    })
    .collect();
    assert_eq!(
        pairs.keys().collect::<Vec<_>>(),
        truth.pairs.keys().collect::<Vec<_>>(),
        "every similar pair, no other"
    );
    for (pair, jaccard) in &truth.pairs {
        assert!((pairs[pair] - jaccard).abs() < 1e-9, "{pair:?}: {} vs {jaccard}", pairs[pair]);
    }
    assert_eq!(query(kubeconfig, "SELECT path FROM rejected_files"), [["broken/noise.mid"]]);
}

/// The leading agent's word on the runs against the cluster's: its `/status` lists every
/// run the cluster holds with the result the run's Job shows, and its
/// `gitops_batch_runs_total` counts the runs in `made` (those it created, and saw end,
/// as the leader) by outcome. Each replica counts only what it did as the leader.
async fn assert_runs_reported(client: &kube::Client, jobs: &Api<Job>, made: &[&str]) {
    let leases: Api<Lease> = Api::namespaced(client.clone(), install::AGENT_NAMESPACE);
    let agents: Api<Pod> = Api::namespaced(client.clone(), install::AGENT_NAMESPACE);
    let leader = leases.get("gitops-agent").await.unwrap().spec.unwrap().holder_identity.unwrap();
    let ip = agents.get(&leader).await.unwrap().status.unwrap().pod_ip.unwrap();
    let address = format!("{ip}:8080");
    cluster::eventually("the leader's /status and /metrics to agree with the cluster's runs", || async {
        let listed = jobs.list(&ListParams::default().labels("gitops.scale.dev/job=midi-batch")).await.unwrap();
        let cluster: BTreeMap<String, Option<&str>> = listed
            .items
            .iter()
            .map(|job| {
                let status = job.status.clone().unwrap_or_default();
                let result = if status.succeeded.unwrap_or(0) > 0 {
                    Some("succeeded")
                } else if status.failed.unwrap_or(0) > 0 {
                    Some("failed")
                } else {
                    None
                };
                (job.metadata.name.clone().unwrap(), result)
            })
            .collect();
        let status: Value = serde_json::from_str(&http_get(&address, "/status").await?).unwrap();
        let reported: BTreeMap<String, Option<&str>> = status["batch_runs"]
            .as_array()?
            .iter()
            .filter(|run| run["job"] == "midi-batch")
            .map(|run| (run["run"].as_str().unwrap().to_owned(), run["result"].as_str()))
            .collect();
        let metrics = http_get(&address, "/metrics").await?;
        let counted = |result: &str| {
            let label = format!("result=\"{result}\"");
            metrics
                .lines()
                .filter(|line| line.starts_with("gitops_batch_runs_total{") && line.contains("job=\"midi-batch\""))
                .find(|line| line.contains(&label))
                .map_or(0.0, |line| line.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        };
        let made_by = |result: &str| made.iter().filter(|run| cluster.get(**run) == Some(&Some(result))).count() as f64;
        let agree = reported == cluster
            && counted("triggered") == made.len() as f64
            && counted("succeeded") == made_by("succeeded")
            && counted("failed") == made_by("failed");
        if !agree {
            eprintln!(
                "runs: cluster {cluster:?}, /status {reported:?}, metrics triggered {} succeeded {} failed {} for {made:?}",
                counted("triggered"),
                counted("succeeded"),
                counted("failed")
            );
        }
        agree.then_some(())
    })
    .await;
}

/// Measurement (printed, not asserted): run 3's time, a driver with two executor pods,
/// against the same job in one pod with `--master local[2]` and the cores of both
/// executors, created by hand outside the agent's runs. Both write the same tables.
async fn executors_against_one_pod(kubeconfig: &str, jobs: &Api<Job>, pods: &Api<Pod>, spec: &Path, truth: &Truth) {
    let kubectl = || {
        let mut command = Command::new("kubectl");
        command.args(["--kubeconfig", kubeconfig]);
        command
    };
    let out = kubectl().args(["create", "--dry-run=client", "-o", "json", "-f"]).arg(spec).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut job: Value = serde_json::from_slice(&out.stdout).unwrap();
    job["metadata"] = serde_json::json!({ "name": "midi-batch-local", "namespace": NAMESPACE });
    let container = &mut job["spec"]["template"]["spec"]["containers"][0];
    for arg in container["args"].as_array_mut().unwrap() {
        if arg.as_str().unwrap().starts_with("--master=") {
            *arg = "--master=local[2]".into();
        }
    }
    container["resources"]["limits"] = serde_json::json!({ "cpu": "2", "memory": "2560Mi" });
    let mut create = kubectl().args(["create", "-f", "-"]).stdin(std::process::Stdio::piped()).spawn().unwrap();
    std::io::Write::write_all(&mut create.stdin.take().unwrap(), job.to_string().as_bytes()).unwrap();
    assert!(create.wait().unwrap().success(), "kubectl create midi-batch-local");
    let local = wait_for_run(jobs, pods, "midi-batch-local").await;
    assert!(local.succeeded, "midi-batch-local failed:\n{}", driver_log(kubeconfig, "midi-batch-local"));
    assert!(local.executors.is_empty(), "local[2] starts no executor pod: {:?}", local.executors);
    assert_tables(kubeconfig, truth);
    let took = |job: Job| {
        let status = job.status.unwrap();
        status.completion_time.unwrap().0.duration_since(status.start_time.unwrap().0).as_secs_f64()
    };
    let (executors, one_pod) =
        (took(jobs.get("midi-batch-3").await.unwrap()), took(jobs.get("midi-batch-local").await.unwrap()));
    println!(
        "\nthe batch run on {SONGS} songs: {executors:.0} s with two executor pods, {one_pod:.0} s in one pod \
         with --master local[2] ({:.2}x)",
        executors / one_pod
    );
    jobs.delete("midi-batch-local", &DeleteParams::background()).await.unwrap();
}

#[tokio::test]
async fn the_scale_pipeline_runs_from_git_with_spark_executors_as_pods() {
    let plane = cluster::node();
    let client = plane.client().await.unwrap();
    let kubeconfig = plane.kubeconfig().display().to_string();
    let registry = plane.registry().unwrap().to_owned();

    // The corpus on the node, readable by the S3 endpoint's unprivileged user.
    let corpus = tempfile::tempdir().unwrap();
    std::fs::set_permissions(corpus.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let truth = write_corpus(corpus.path());
    assert!(truth.pairs.len() >= 5, "a corpus with similar songs: {}", truth.pairs.len());

    let cache = gitops_bootstrap::local::build::cache_dir();
    let built = tokio::task::spawn_blocking(move || dockerfile::build_local_cluster(&cache)).await.unwrap().unwrap();
    for image in &built {
        plane.push_built(image).unwrap();
    }
    let work = tempfile::tempdir().unwrap();
    let settings = LocalSettings {
        registry: Some(registry),
        images: built.into_iter().map(|image| (image.name.to_owned(), image.tag)).collect(),
        midi_dir: Some(corpus.path().to_owned()),
        charts: gitops_tests::render::shared_charts(),
    };
    let repo = gitops_bootstrap::local::agent::repo_from_template(&work.path().join("repo"), &settings).unwrap();
    let options = cluster::in_cluster_options(&repo, LOCAL_CLUSTER_PATH);
    install_in_cluster(plane, &options).await.unwrap();
    install::wait_synced(&client, Duration::from_secs(180), "").await.unwrap();

    // The first run starts once the revision is healthy: PostgreSQL Ready on its volume,
    // the S3 endpoint holding the corpus, the viewer Ready.
    let jobs: Api<Job> = Api::namespaced(client.clone(), NAMESPACE);
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let run = wait_for_run(&jobs, &pods, "midi-batch-1").await;
    assert!(run.succeeded, "run 1 failed: {:?}\n{}", run.executor_exits, driver_log(&kubeconfig, "midi-batch-1"));
    assert_eq!(run.executor_exits, BTreeMap::new(), "no executor was lost");
    assert_eq!(run.executors.len(), 2, "spark.executor.instances=2, as pods: {:?}", run.executors);
    assert!(cluster::is_ready(&pods.get("postgres-0").await.unwrap()), "PostgreSQL is Ready");
    let claim = Api::<PersistentVolumeClaim>::namespaced(client.clone(), NAMESPACE).get("data-postgres-0").await;
    assert_eq!(claim.unwrap().status.unwrap().phase.as_deref(), Some("Bound"), "on a local-path volume");
    assert_tables(&kubeconfig, &truth);
    // Executors go with their run.
    cluster::eventually("the executor pods to go", || async {
        let left = pods.list(&ListParams::default().labels("spark-role=executor")).await.unwrap();
        left.items.is_empty().then_some(())
    })
    .await;

    // The viewer, through its Service as a user's browser on this machine reaches it:
    // the song with the most similar songs lists each of them.
    let service = Api::<Service>::namespaced(client.clone(), NAMESPACE).get("viewer").await.unwrap();
    let address = format!("{}:80", service.spec.unwrap().cluster_ip.unwrap());
    let mut similar: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (a, b) in truth.pairs.keys() {
        similar.entry(a).or_default().push(b);
        similar.entry(b).or_default().push(a);
    }
    let (song, others) = similar.iter().max_by_key(|(_, others)| others.len()).unwrap();
    let id = &query(&kubeconfig, &format!("SELECT song_id FROM songs WHERE path = '{song}'"))[0][0];
    let path = format!("/songs/{id}");
    let page = cluster::eventually("the viewer's song page", || http_get(&address, &path)).await;
    assert!(page.contains(song), "the page names its song {song}");
    for other in others {
        assert!(page.contains(other), "the page of {song} lists its similar song {other}");
    }

    // A commit that changes the job spec: exactly one more run, and the tables stay exact.
    let spec = repo.join(LOCAL_CLUSTER_PATH).join("jobs/midi-batch.yaml");
    let text = std::fs::read_to_string(&spec).unwrap();
    let edited = text.replace("spark.executor.instances=2", "spark.executor.instances=1");
    assert_ne!(edited, text);
    std::fs::write(&spec, edited).unwrap();
    git(&repo, &["commit", "-qam", "midi-batch: one executor"]);
    let run = wait_for_run(&jobs, &pods, "midi-batch-2").await;
    assert!(run.succeeded, "run 2 failed: {:?}\n{}", run.executor_exits, driver_log(&kubeconfig, "midi-batch-2"));
    assert_eq!(run.executor_exits, BTreeMap::new(), "no executor was lost");
    assert_eq!(run.executors.len(), 1, "{:?}", run.executors);
    assert_tables(&kubeconfig, &truth);

    // Its revert: one more run, with two executors again.
    git(&repo, &["revert", "--no-edit", "HEAD"]);
    let run = wait_for_run(&jobs, &pods, "midi-batch-3").await;
    assert!(run.succeeded, "run 3 failed: {:?}\n{}", run.executor_exits, driver_log(&kubeconfig, "midi-batch-3"));
    assert_eq!(run.executor_exits, BTreeMap::new(), "no executor was lost");
    assert_eq!(run.executors.len(), 2, "{:?}", run.executors);
    assert_eq!(runs(&jobs).await, ["midi-batch-1", "midi-batch-2", "midi-batch-3"], "one run per change");
    assert_eq!(query(&kubeconfig, "SELECT count(*) FROM runs WHERE status = 'succeeded'"), [["3"]]);
    assert_tables(&kubeconfig, &truth);
    assert_runs_reported(&client, &jobs, &["midi-batch-1", "midi-batch-2", "midi-batch-3"]).await;
    executors_against_one_pod(&kubeconfig, &jobs, &pods, &spec, &truth).await;
    drift_alert_in_the_cluster(&client, &kubeconfig, &repo).await;

    chaos(&client, &kubeconfig, &repo, &truth, &address, id).await;
}

/// The address (`ClusterIP:port`) of Service `name` in `namespace`, which this machine
/// reaches through kube-proxy as the node does.
async fn service_address(client: &kube::Client, namespace: &str, name: &str) -> String {
    let spec = Api::<Service>::namespaced(client.clone(), namespace).get(name).await.unwrap().spec.unwrap();
    format!("{}:{}", spec.cluster_ip.unwrap(), spec.ports.unwrap()[0].port)
}

/// The label sets of the alerts named `alert` that `body` (Prometheus' `/api/v1/alerts`
/// or Alertmanager's `/api/v2/alerts`) lists, with each one's state.
fn alerts_named(body: &str, alert: &str) -> Vec<(BTreeMap<String, String>, String)> {
    let body: Value = serde_json::from_str(body).unwrap();
    let alerts = body.pointer("/data/alerts").unwrap_or(&body).as_array().cloned().unwrap_or_default();
    alerts
        .iter()
        .filter(|a| a["labels"]["alertname"] == alert)
        .map(|a| {
            let labels = serde_json::from_value(a["labels"].clone()).unwrap();
            let state = a.get("state").or_else(|| a.pointer("/status/state")).and_then(Value::as_str);
            (labels, state.unwrap_or_default().to_owned())
        })
        .collect()
}

/// The monitoring stack from git at work: a kubectl edit of a managed object fires
/// `GitOpsDriftDetected` in the in-cluster Prometheus (the agent scraped through its
/// ServiceMonitor, the rule from its PrometheusRule, both from git), Alertmanager
/// receives it, and the fix from git resolves it in both.
async fn drift_alert_in_the_cluster(client: &kube::Client, kubeconfig: &str, repo: &Path) {
    // Git: the rule without its five minutes' patience, and the quota's drift reported
    // rather than corrected, so that it lasts until git says otherwise.
    let rules = repo.join("manifests/monitoring/gitops-agent-alerts.yaml");
    let text = std::fs::read_to_string(&rules).unwrap();
    let (before, after) = text.split_once("alert: GitOpsDriftDetected").unwrap();
    let next = after.find("- alert:").unwrap();
    assert!(after[..next].contains("for: 5m"), "GitOpsDriftDetected waits 5 minutes");
    std::fs::write(&rules, format!("{before}alert: GitOpsDriftDetected{}", after.replacen("for: 5m", "for: 1s", 1)))
        .unwrap();
    let policy = repo.join("clusters/base/policy.yaml");
    let text = std::fs::read_to_string(&policy).unwrap();
    let quota = "kind: ResourceQuota\nmetadata:\n  name: scale\n";
    let reported = text.replace(quota, &format!("{quota}  annotations:\n    gitops.scale.dev/drift: report\n"));
    assert_ne!(reported, text);
    std::fs::write(&policy, reported).unwrap();
    git(repo, &["commit", "-qam", "alerts: drift fires at once; the quota's drift is reported, not corrected"]);
    let quotas: Api<k8s_openapi::api::core::v1::ResourceQuota> = Api::namespaced(client.clone(), NAMESPACE);
    cluster::eventually("the quota's annotation from git", || async {
        let annotations = quotas.get("scale").await.ok()?.metadata.annotations?;
        (annotations.get("gitops.scale.dev/drift")? == "report").then_some(())
    })
    .await;

    let edit = Command::new("kubectl")
        .args(["--kubeconfig", kubeconfig, "-n", NAMESPACE, "patch", "resourcequota", "scale", "--type=merge"])
        .args(["-p", r#"{"spec":{"hard":{"requests.cpu":"1600m"}}}"#])
        .output()
        .unwrap();
    assert!(edit.status.success(), "kubectl patch: {}", String::from_utf8_lossy(&edit.stderr));
    let started = Instant::now();
    let prometheus = service_address(client, "monitoring", "kube-prometheus-stack-prometheus").await;
    let alertmanager = service_address(client, "monitoring", "kube-prometheus-stack-alertmanager").await;
    let drift = |body: &str| {
        alerts_named(body, "GitOpsDriftDetected")
            .into_iter()
            .filter(|(labels, _)| labels.get("kind").map(String::as_str) == Some("ResourceQuota"))
            .map(|(labels, state)| (labels["namespace"].clone(), labels["severity"].clone(), state))
            .collect::<Vec<_>>()
    };
    let firing = cluster::eventually("GitOpsDriftDetected to fire in the cluster's Prometheus", || async {
        let alerts = drift(&http_get(&prometheus, "/api/v1/alerts").await?);
        alerts.iter().any(|(_, _, state)| state == "firing").then_some(alerts)
    })
    .await;
    assert_eq!(firing, [(NAMESPACE.to_owned(), "warning".to_owned(), "firing".to_owned())]);
    let fired_after = started.elapsed();
    let received = cluster::eventually("Alertmanager to receive it", || async {
        let alerts = drift(&http_get(&alertmanager, "/api/v2/alerts").await?);
        (!alerts.is_empty()).then_some(alerts)
    })
    .await;
    assert_eq!(received, [(NAMESPACE.to_owned(), "warning".to_owned(), "active".to_owned())]);

    // The fix from git: the annotation goes, and the agent puts the quota back.
    let text = std::fs::read_to_string(&policy).unwrap();
    std::fs::write(&policy, text.replace("  annotations:\n    gitops.scale.dev/drift: report\n", "")).unwrap();
    git(repo, &["commit", "-qam", "policy: correct the quota's drift again"]);
    let fixed = Instant::now();
    cluster::eventually("the alert to resolve in Prometheus and Alertmanager", || async {
        let (firing, received) =
            (http_get(&prometheus, "/api/v1/alerts").await?, http_get(&alertmanager, "/api/v2/alerts").await?);
        (drift(&firing).is_empty() && drift(&received).is_empty()).then_some(())
    })
    .await;
    let hard = quotas.get("scale").await.unwrap().spec.unwrap().hard.unwrap();
    assert_eq!(hard["requests.cpu"].0, "1500m", "the quota from git");
    println!(
        "\nGitOpsDriftDetected in the cluster's Prometheus {:.0} s after the kubectl edit (scrape 30 s, \
         evaluation 15 s, `for: 1s`); resolved {:.0} s after the fix was committed",
        fired_after.as_secs_f64(),
        fixed.elapsed().as_secs_f64()
    );
}

/// A user's browser at 100 requests a second on one page, each on a new connection
/// through the viewer's Service, every outcome kept with the time it was sent.
struct Load {
    running: Arc<AtomicBool>,
    outcomes: Arc<Mutex<Vec<(Instant, bool)>>>,
    task: tokio::task::JoinHandle<()>,
}

/// What users saw of one disruption: the requests sent from its start until all was
/// well again, how many failed, and how long after its start the last one did.
#[derive(Debug)]
struct Disruption {
    what: &'static str,
    requests: usize,
    errors: usize,
    recovered_after: Duration,
}

impl Load {
    fn start(address: String, path: String) -> Load {
        let running = Arc::new(AtomicBool::new(true));
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let (still, seen) = (running.clone(), outcomes.clone());
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut requests = tokio::task::JoinSet::new();
            while still.load(Ordering::Relaxed) {
                tick.tick().await;
                let (address, path, seen) = (address.clone(), path.clone(), seen.clone());
                requests.spawn(async move {
                    let sent = Instant::now();
                    let ok = http_get(&address, &path).await.is_some();
                    seen.lock().unwrap().push((sent, ok));
                });
                while requests.try_join_next().is_some() {}
            }
            while requests.join_next().await.is_some() {}
        });
        Load { running, outcomes, task }
    }

    /// The requests sent since `from`.
    fn since(&self, what: &'static str, from: Instant) -> Disruption {
        let outcomes = self.outcomes.lock().unwrap();
        let window: Vec<_> = outcomes.iter().filter(|(sent, _)| *sent >= from).collect();
        let last_error = window.iter().filter(|(_, ok)| !ok).map(|(sent, _)| *sent).max();
        Disruption {
            what,
            requests: window.len(),
            errors: window.iter().filter(|(_, ok)| !ok).count(),
            recovered_after: last_error.map_or(Duration::ZERO, |at| at - from),
        }
    }

    async fn stop(self) {
        self.running.store(false, Ordering::Relaxed);
        self.task.await.unwrap();
    }
}

/// Waits until the load has had `quiet` of successes in a row, as a user would judge
/// that things work again.
async fn settled(load: &Load, quiet: Duration) {
    cluster::eventually("the viewer to answer every request again", || async {
        let outcomes = load.outcomes.lock().unwrap();
        let last_error = outcomes.iter().filter(|(_, ok)| !ok).map(|(sent, _)| *sent).max();
        last_error.is_none_or(|at| at.elapsed() > quiet).then_some(())
    })
    .await;
}

/// Deletes PostgreSQL's pod, and returns its uid for [`postgres_back`].
async fn delete_postgres(scale: &Api<Pod>) -> Option<String> {
    let before = scale.get("postgres-0").await.unwrap().metadata.uid;
    scale.delete("postgres-0", &DeleteParams::default()).await.unwrap();
    before
}

/// Waits until PostgreSQL runs again in a new pod (not `before`), Ready.
async fn postgres_back(scale: &Api<Pod>, before: &Option<String>) {
    cluster::eventually("PostgreSQL back and Ready", || async {
        let pod = scale.get_opt("postgres-0").await.unwrap()?;
        (pod.metadata.uid != *before && cluster::is_ready(&pod)).then_some(())
    })
    .await;
}

async fn chaos(client: &kube::Client, kubeconfig: &str, repo: &Path, truth: &Truth, viewer: &str, song: &str) {
    let scale: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let agents: Api<Pod> = Api::namespaced(client.clone(), install::AGENT_NAMESPACE);
    let leases: Api<Lease> = Api::namespaced(client.clone(), install::AGENT_NAMESPACE);
    let jobs: Api<Job> = Api::namespaced(client.clone(), NAMESPACE);
    let quiet = Duration::from_secs(3);
    // A page that reads PostgreSQL.
    let load = Load::start(viewer.to_owned(), format!("/api/songs/{song}"));
    settled(&load, quiet).await;
    let mut disruptions = Vec::new();

    // A viewer pod deleted every five seconds, three times.
    let from = Instant::now();
    for _ in 0..3 {
        let ready = cluster::ready_pods(&scale, "app.kubernetes.io/name=viewer").await;
        scale.delete(&ready[0], &DeleteParams::default()).await.unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    cluster::eventually("two viewer pods Ready", || async {
        (cluster::ready_pods(&scale, "app.kubernetes.io/name=viewer").await.len() == 2).then_some(())
    })
    .await;
    settled(&load, quiet).await;
    disruptions.push(load.since("a viewer pod deleted every 5 s, 3 times", from));

    // PostgreSQL: the viewer cannot answer until it is back on its volume.
    let from = Instant::now();
    let before = delete_postgres(&scale).await;
    postgres_back(&scale, &before).await;
    settled(&load, quiet).await;
    disruptions.push(load.since("the PostgreSQL pod deleted", from));
    assert_tables(kubeconfig, truth);

    // The agent's leader: the standby takes the Lease; the viewer does not notice.
    let holder = || async { leases.get_opt("gitops-agent").await.unwrap()?.spec?.holder_identity };
    let leader = cluster::eventually("a leader", holder).await;
    let runs_before = runs(&jobs).await;
    let from = Instant::now();
    agents.delete(&leader, &DeleteParams::default()).await.unwrap();
    cluster::eventually("another replica to take the Lease", || async {
        holder().await.filter(|next| *next != leader)
    })
    .await;
    let new_leader_after = from.elapsed();
    settled(&load, quiet).await;
    let mut disruption = load.since("the agent's leader pod deleted", from);
    disruption.recovered_after = disruption.recovered_after.max(new_leader_after);
    disruptions.push(disruption);
    assert_eq!(runs(&jobs).await, runs_before, "the new leader starts no run for a spec that did not change");

    // An executor in the middle of a run: Spark asks for another and the run still
    // writes exactly the right tables.
    let spec = repo.join(LOCAL_CLUSTER_PATH).join("jobs/midi-batch.yaml");
    let text = std::fs::read_to_string(&spec).unwrap();
    std::fs::write(&spec, text.replace("--name=midi-batch", "--name=midi-batch-chaos")).unwrap();
    git(repo, &["commit", "-qam", "midi-batch: a run to lose an executor in"]);
    let victim = cluster::eventually("run 4's executors at work", || async {
        let listed = scale.list(&ListParams::default().labels("spark-role=executor")).await.unwrap();
        listed.items.into_iter().find(|pod| pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
    })
    .await;
    let from = Instant::now();
    scale.delete(victim.metadata.name.as_deref().unwrap(), &DeleteParams::default()).await.unwrap();
    let run = wait_for_run(&jobs, &scale, "midi-batch-4").await;
    assert!(run.succeeded, "run 4 failed: {:?}\n{}", run.executor_exits, driver_log(kubeconfig, "midi-batch-4"));
    assert!(run.executors.len() >= 3, "a new executor took the lost one's place: {:?}", run.executors);
    disruptions.push(Disruption {
        what: "an executor pod deleted mid-run (to the run's end)",
        requests: 0,
        errors: 0,
        recovered_after: from.elapsed(),
    });
    assert_tables(kubeconfig, truth);
    let runs_now = runs(&jobs).await;
    assert_eq!(runs_now, ["midi-batch-1", "midi-batch-2", "midi-batch-3", "midi-batch-4"], "no run twice");

    // PostgreSQL in the middle of a run, once the run is recorded in `runs`: the run is
    // retried or reported failed, and the next run writes exactly the right tables.
    let text = std::fs::read_to_string(&spec).unwrap();
    std::fs::write(&spec, text.replace("--name=midi-batch-chaos", "--name=midi-batch-database")).unwrap();
    git(repo, &["commit", "-qam", "midi-batch: a run to restart PostgreSQL in"]);
    cluster::eventually("run 5 to record itself in runs", || async {
        driver_log(kubeconfig, "midi-batch-5").contains("migrations applied").then_some(())
    })
    .await;
    let from = Instant::now();
    let before = delete_postgres(&scale).await;
    let interrupted = wait_for_run(&jobs, &scale, "midi-batch-5").await;
    postgres_back(&scale, &before).await;
    settled(&load, quiet).await;
    disruptions.push(load.since("the PostgreSQL pod deleted mid-run", from));
    println!(
        "run 5, PostgreSQL restarted under it: {}",
        if interrupted.succeeded { "succeeded (its writes were retried)" } else { "failed, and reported so" }
    );
    if interrupted.succeeded {
        assert_tables(kubeconfig, truth);
    }
    std::fs::write(&spec, text.replace("--name=midi-batch-chaos", "--name=midi-batch-after")).unwrap();
    git(repo, &["commit", "-qam", "midi-batch: the run after"]);
    let next = wait_for_run(&jobs, &scale, "midi-batch-6").await;
    assert!(next.succeeded, "run 6 failed: {:?}\n{}", next.executor_exits, driver_log(kubeconfig, "midi-batch-6"));
    assert_tables(kubeconfig, truth);
    let last_five: Vec<String> = (2..=6).map(|n| format!("midi-batch-{n}")).collect();
    cluster::eventually("no run twice, and the history limit keeping the last five", || async {
        (runs(&jobs).await == last_five).then_some(())
    })
    .await;
    // The new leader made runs 4 to 6.
    assert_runs_reported(client, &jobs, &["midi-batch-4", "midi-batch-5", "midi-batch-6"]).await;
    load.stop().await;

    println!("\nchaos under 100 requests/s to the viewer:");
    for d in &disruptions {
        println!(
            "  {:<52} {:>6} requests {:>5} errors  recovered after {:.1} s",
            d.what,
            d.requests,
            d.errors,
            d.recovered_after.as_secs_f64()
        );
    }
}
