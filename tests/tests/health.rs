//! Health on the real node: a push is deployed only when what it changed runs, and a
//! bad rollout says why. Each test follows a repository of its own in a namespace of
//! its own; their pods share the one node ([`cluster::node`]).

use gitops_tests::agent::{Agent, AgentConfig};
use gitops_tests::cluster::{self, eventually};
use gitops_tests::git::GitRepo;
use gitops_tests::images;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::Api;
use kube::api::ListParams;
use serde_json::{Value, json};

struct Fixture {
    client: kube::Client,
    ns: String,
    repo: GitRepo,
    agent: Agent,
    busybox: &'static str,
}

impl Fixture {
    /// An agent following a repository holding one ConfigMap, its status ConfigMap on.
    async fn start(prefix: &str) -> Fixture {
        let plane = cluster::node();
        let busybox = images::busybox(plane);
        let client = plane.client().await.unwrap();
        let ns = cluster::namespace(&client, prefix).await;
        let repo = GitRepo::new();
        let settings = json!({ "apiVersion": "v1", "kind": "ConfigMap", "metadata": { "name": "settings" },
            "data": { "a": "b" } });
        repo.write("manifests/settings.yaml", &settings.to_string());
        repo.commit("app");
        let agent = Agent::start(
            client.clone(),
            AgentConfig {
                local_repo: Some(repo.path()),
                status_report: true,
                ..AgentConfig::new(repo.file_url(), &ns)
            },
        )
        .await;
        Fixture { client, ns, repo, agent, busybox }
    }

    fn head(&self) -> String {
        let repo = git2::Repository::open(self.repo.path()).unwrap();
        repo.head().unwrap().peel_to_commit().unwrap().id().to_string()
    }

    /// Waits until the revision `commit` is `health`, and returns `/status`.
    async fn health(&self, commit: &str, health: &str) -> Value {
        let series = format!("gitops_revision_health{{health=\"{health}\",revision=\"{commit}\"}}");
        eventually(&format!("revision {commit} to be {health}"), || async {
            (self.agent.metric(&series).await == 1.0).then_some(())
        })
        .await;
        self.agent.status().await
    }

    /// The status ConfigMap's `health` and `healthMessage`.
    async fn reported(&self) -> (String, String) {
        let cms: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.ns);
        let data = cms.get(gitops_agent::report::STATUS_NAME).await.unwrap().data.unwrap_or_default();
        (data.get("health").cloned().unwrap_or_default(), data.get("healthMessage").cloned().unwrap_or_default())
    }
}

/// The unhealthy object of `kind` that `/status` names, if any.
fn unhealthy_of<'a>(status: &'a Value, kind: &str) -> Option<&'a Value> {
    status["unhealthy"].as_array().unwrap().iter().find(|o| o["kind"] == kind)
}

/// The one unhealthy object `/status` names.
fn unhealthy(status: &Value) -> &Value {
    let unhealthy = status["unhealthy"].as_array().unwrap();
    assert_eq!(unhealthy.len(), 1, "{status:#}");
    &unhealthy[0]
}

fn deployment(name: &str, container: Value, extra_spec: Value) -> Value {
    let mut spec = json!({
        "replicas": 1,
        "selector": { "matchLabels": { "app": name } },
        "template": {
            "metadata": { "labels": { "app": name } },
            "spec": { "terminationGracePeriodSeconds": 0, "containers": [container] },
        },
    });
    spec.as_object_mut().unwrap().extend(extra_spec.as_object().cloned().unwrap_or_default());
    json!({ "apiVersion": "apps/v1", "kind": "Deployment", "metadata": { "name": name }, "spec": spec })
}

fn busybox(image: &str, name: &str, script: &str) -> Value {
    json!({ "name": name, "image": image, "imagePullPolicy": "Never", "args": ["sh", "-c", script] })
}

#[tokio::test]
async fn a_missing_image_degrades_the_revision_naming_the_container_and_the_revert_heals_it() {
    let fixture = Fixture::start("health-image").await;
    let good = fixture.head();
    let status = fixture.health(&good, "Healthy").await;
    assert_eq!(status["unhealthy"], json!([]), "{status:#}");

    let image = fixture.busybox;
    let web = deployment("web", busybox(image, "app", "sleep 3600"), json!({}));
    fixture.repo.write("manifests/web.yaml", &web.to_string());
    let working = fixture.repo.commit("web");
    let status = fixture.health(&working, "Healthy").await;
    assert_eq!(status["health"], "Healthy");
    assert_eq!(fixture.reported().await.0, "Healthy");

    // A pull from anywhere but the node's registry fails at once (nothing leaves the machine).
    let broken = deployment(
        "web",
        json!({ "name": "app", "image": "gitops.invalid/nothing:1", "imagePullPolicy": "Always" }),
        json!({}),
    );
    fixture.repo.write("manifests/web.yaml", &broken.to_string());
    let bad = fixture.repo.commit("web: a new image");
    let status = fixture.health(&bad, "Degraded").await;
    let web = unhealthy(&status);
    assert_eq!(
        (&web["kind"], &web["namespace"], &web["name"]),
        (&json!("Deployment"), &json!(fixture.ns), &json!("web"))
    );
    assert_eq!(web["health"], "Degraded");
    let reason = web["reason"].as_str().unwrap();
    assert!(["ImagePullBackOff", "ErrImagePull"].contains(&reason), "{web:#}");
    assert!(web["message"].as_str().unwrap().contains("container app"), "{web:#}");
    let (health, message) = fixture.reported().await;
    assert_eq!(health, "Degraded");
    assert!(message.starts_with(&format!("Deployment {}/web: Degraded: ", fixture.ns)), "{message}");

    let reverted = fixture.repo.revert_head();
    let status = fixture.health(&reverted, "Healthy").await;
    assert_eq!(status["unhealthy"], json!([]), "{status:#}");
    assert_eq!(fixture.reported().await, ("Healthy".to_owned(), String::new()));
    fixture.agent.stop().await;
}

#[tokio::test]
async fn a_container_that_exits_at_once_is_a_crash_loop() {
    let fixture = Fixture::start("health-crash").await;
    let crashing = deployment("crash", busybox(fixture.busybox, "main", "exit 1"), json!({}));
    fixture.repo.write("manifests/crash.yaml", &crashing.to_string());
    let commit = fixture.repo.commit("crash");
    let status = eventually("the crash loop to be the reason", || async {
        let status = fixture.health(&commit, "Degraded").await;
        (unhealthy(&status)["reason"] == "CrashLoopBackOff").then_some(status)
    })
    .await;
    let crash = unhealthy(&status);
    assert!(crash["message"].as_str().unwrap().contains("container main: CrashLoopBackOff"), "{crash:#}");
    fixture.agent.stop().await;
}

#[tokio::test]
async fn a_failing_readiness_probe_progresses_then_degrades_at_the_progress_deadline() {
    let fixture = Fixture::start("health-probe").await;
    let mut container = busybox(fixture.busybox, "web", "sleep 3600");
    container["readinessProbe"] = json!({ "exec": { "command": ["/bin/busybox", "false"] }, "periodSeconds": 1 });
    let web = deployment("web", container, json!({ "progressDeadlineSeconds": 10 }));
    fixture.repo.write("manifests/web.yaml", &web.to_string());
    let commit = fixture.repo.commit("web");
    let status = eventually("the pod to run, not ready", || async {
        let status = fixture.health(&commit, "Progressing").await;
        let message = unhealthy_of(&status, "Deployment")?["message"].as_str()?.to_owned();
        message.contains("container web running but not ready").then_some(status)
    })
    .await;
    assert_eq!(unhealthy_of(&status, "Deployment").unwrap()["health"], "Progressing", "{status:#}");
    let status = fixture.health(&commit, "Degraded").await;
    let web = unhealthy(&status);
    assert_eq!(web["reason"], "ProgressDeadlineExceeded", "{web:#}");
    assert!(web["message"].as_str().unwrap().contains("container web running but not ready"), "{web:#}");
    fixture.agent.stop().await;
}

#[tokio::test]
async fn a_stateful_set_with_a_claim_progresses_until_its_pod_is_ready() {
    let fixture = Fixture::start("health-claim").await;
    let mut container = busybox(fixture.busybox, "db", "echo ok > /data/ok && sleep 3600");
    container["volumeMounts"] = json!([{ "name": "data", "mountPath": "/data" }]);
    container["readinessProbe"] =
        json!({ "exec": { "command": ["/bin/busybox", "cat", "/data/ok"] }, "periodSeconds": 1 });
    let set = json!({
        "apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": { "name": "db" },
        "spec": {
            "replicas": 1, "serviceName": "db",
            "selector": { "matchLabels": { "app": "db" } },
            "template": { "metadata": { "labels": { "app": "db" } },
                "spec": { "terminationGracePeriodSeconds": 0, "containers": [container] } },
            "volumeClaimTemplates": [{ "metadata": { "name": "data" },
                "spec": { "accessModes": ["ReadWriteOnce"], "resources": { "requests": { "storage": "16Mi" } } } }],
        },
    });
    fixture.repo.write("manifests/db.yaml", &set.to_string());
    let commit = fixture.repo.commit("db");
    let status = eventually("the StatefulSet to wait for its pod", || async {
        let status = fixture.health(&commit, "Progressing").await;
        let message = unhealthy_of(&status, "StatefulSet")?["message"].as_str()?.to_owned();
        message.contains("0 of 1 replicas ready").then_some(status)
    })
    .await;
    assert_eq!(unhealthy_of(&status, "StatefulSet").unwrap()["health"], "Progressing", "{status:#}");
    fixture.health(&commit, "Healthy").await;
    fixture.agent.stop().await;
}

#[tokio::test]
async fn a_job_that_fails_degrades_the_revision() {
    let fixture = Fixture::start("health-job").await;
    let job = json!({
        "apiVersion": "batch/v1", "kind": "Job", "metadata": { "name": "migrate" },
        "spec": { "backoffLimit": 0, "template": { "spec": { "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 0, "containers": [busybox(fixture.busybox, "migrate", "exit 3")] } } },
    });
    fixture.repo.write("manifests/migrate.yaml", &job.to_string());
    let commit = fixture.repo.commit("migrate");
    // The job's failure and its pod's come from two watches, in either order.
    let status = eventually("the failed pod to be named", || async {
        let status = fixture.health(&commit, "Degraded").await;
        unhealthy(&status)["message"].as_str().unwrap_or("").contains("exited").then_some(status)
    })
    .await;
    let migrate = unhealthy(&status);
    assert_eq!((&migrate["kind"], &migrate["reason"]), (&json!("Job"), &json!("BackoffLimitExceeded")), "{migrate:#}");
    assert!(migrate["message"].as_str().unwrap().contains("container migrate exited with code 3"), "{migrate:#}");
    fixture.agent.stop().await;
}

#[tokio::test]
async fn a_job_spec_waits_for_the_revisions_deployment_to_be_ready() {
    let fixture = Fixture::start("health-wait").await;
    // The image has no /tmp: the file goes to a volume.
    let mut container = busybox(fixture.busybox, "db", "sleep 5 && echo > /state/ready && sleep 3600");
    container["readinessProbe"] = json!({ "exec": { "command": ["/bin/busybox", "cat", "/state/ready"] },
        "periodSeconds": 1 });
    container["volumeMounts"] = json!([{ "name": "state", "mountPath": "/state" }]);
    let mut db = deployment("db", container, json!({}));
    db["spec"]["template"]["spec"]["volumes"] = json!([{ "name": "state", "emptyDir": {} }]);
    fixture.repo.write("manifests/db.yaml", &db.to_string());
    let report = json!({
        "apiVersion": "batch/v1", "kind": "Job", "metadata": { "name": "report" },
        "spec": { "backoffLimit": 0, "template": { "spec": { "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 0, "containers": [busybox(fixture.busybox, "report", "true")] } } },
    });
    fixture.repo.write("jobs/report.yaml", &report.to_string());
    let commit = fixture.repo.commit("db and its report");
    let jobs: Api<Job> = Api::namespaced(fixture.client.clone(), &fixture.ns);

    // Held back while the Deployment is not Ready, saying why.
    let waiting = eventually("the job spec to wait", || async {
        let status = fixture.agent.status().await;
        let waiting = status["batch_waiting"].as_array()?.first()?.clone();
        (waiting["job"] == "report" && waiting["revision"] == json!(commit)).then_some(waiting)
    })
    .await;
    assert!(waiting["waits_for"].as_array().unwrap().contains(&json!("Deployment db")), "{waiting:#}");
    assert!(jobs.get_opt("report-1").await.unwrap().is_none(), "no run before the revision is healthy");

    fixture.health(&commit, "Healthy").await;
    let run = eventually("run report-1", || async { jobs.get_opt("report-1").await.unwrap() }).await;
    let pods: Api<Pod> = Api::namespaced(fixture.client.clone(), &fixture.ns);
    let db = pods.list(&ListParams::default().labels("app=db")).await.unwrap().items;
    let ready =
        db[0].status.as_ref().unwrap().conditions.as_ref().unwrap().iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!(ready.status, "True");
    let (ready_at, created_at) =
        (ready.last_transition_time.clone().unwrap().0, run.metadata.creation_timestamp.unwrap().0);
    assert!(ready_at <= created_at, "the run was created at {created_at}, before its database was Ready at {ready_at}");
    assert_eq!(fixture.agent.status().await["batch_waiting"], json!([]));
    fixture.agent.stop().await;
}

/// `object`, in sync wave `wave`.
fn in_wave(mut object: Value, wave: &str) -> Value {
    object["metadata"]["annotations"] = json!({ gitops_agent::plan::WAVE_ANNOTATION: wave });
    object
}

#[tokio::test]
async fn a_wave_is_applied_only_once_the_wave_before_is_healthy() {
    let fixture = Fixture::start("health-waves").await;
    // Ready only a few seconds after it starts: without the wait, wave 1 would be there first.
    let mut container = busybox(fixture.busybox, "db", "sleep 5 && echo > /state/ready && sleep 3600");
    container["readinessProbe"] = json!({ "exec": { "command": ["/bin/busybox", "cat", "/state/ready"] },
        "periodSeconds": 1 });
    container["volumeMounts"] = json!([{ "name": "state", "mountPath": "/state" }]);
    let mut db = in_wave(deployment("db", container, json!({})), "0");
    db["spec"]["template"]["spec"]["volumes"] = json!([{ "name": "state", "emptyDir": {} }]);
    fixture.repo.write("manifests/db.yaml", &db.to_string());
    let uses_db = json!({ "apiVersion": "v1", "kind": "ConfigMap", "metadata": { "name": "uses-db" },
        "data": { "db": "db" } });
    fixture.repo.write("manifests/uses-db.yaml", &in_wave(uses_db, "1").to_string());
    let commit = fixture.repo.commit("db, then what uses it");

    // While wave 0 is not Ready, the revision is Progressing on it alone.
    let status = fixture.health(&commit, "Progressing").await;
    assert!(unhealthy_of(&status, "Deployment").is_some_and(|db| db["name"] == "db"), "{status:#}");
    assert!(unhealthy_of(&status, "ConfigMap").is_none(), "wave 1 is not followed yet: {status:#}");

    fixture.health(&commit, "Healthy").await;
    let cms: Api<ConfigMap> = Api::namespaced(fixture.client.clone(), &fixture.ns);
    let created_at = cms.get("uses-db").await.unwrap().metadata.creation_timestamp.unwrap().0;
    let pods: Api<Pod> = Api::namespaced(fixture.client.clone(), &fixture.ns);
    let db = pods.list(&ListParams::default().labels("app=db")).await.unwrap().items;
    let ready =
        db[0].status.as_ref().unwrap().conditions.as_ref().unwrap().iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!(ready.status, "True");
    let ready_at = ready.last_transition_time.clone().unwrap().0;
    assert!(ready_at <= created_at, "wave 1 was applied at {created_at}, before wave 0 was Ready at {ready_at}");
    assert_eq!(fixture.agent.status().await["revision"], json!(commit));
    fixture.agent.stop().await;
}

#[tokio::test]
async fn a_degraded_wave_stops_the_sync_naming_the_wave_and_the_reason() {
    let fixture = Fixture::start("health-wave-degraded").await;
    let good = fixture.head();
    fixture.health(&good, "Healthy").await;
    let broken = deployment(
        "web",
        json!({ "name": "app", "image": "gitops.invalid/nothing:1", "imagePullPolicy": "Always" }),
        json!({}),
    );
    fixture.repo.write("manifests/web.yaml", &in_wave(broken, "0").to_string());
    let after = json!({ "apiVersion": "v1", "kind": "ConfigMap", "metadata": { "name": "after-web" } });
    fixture.repo.write("manifests/after-web.yaml", &in_wave(after, "1").to_string());
    fixture.repo.remove("manifests/settings.yaml");
    let bad = fixture.repo.commit("web, then what needs it, and no settings");

    let errors = eventually("the sync to fail on wave 0", || async {
        let status = fixture.agent.status().await;
        let errors = status["errors"].as_array().filter(|e| !e.is_empty())?.clone();
        Some(Value::Array(errors).to_string())
    })
    .await;
    let web = format!("wave 0: Deployment {}/web: Degraded: ", fixture.ns);
    assert!(errors.contains(&web), "{errors}");
    assert!(errors.contains("ImagePullBackOff") || errors.contains("ErrImagePull"), "{errors}");
    assert!(errors.contains("container app"), "{errors}");
    let status = fixture.health(&bad, "Degraded").await;
    assert_eq!(status["revision"], json!(good), "the revision that failed is not the applied one: {status:#}");
    let cms: Api<ConfigMap> = Api::namespaced(fixture.client.clone(), &fixture.ns);
    assert!(cms.get_opt("after-web").await.unwrap().is_none(), "wave 1 was applied after a Degraded wave 0");
    assert!(cms.get_opt("settings").await.unwrap().is_some(), "a sync stopped at a wave prunes nothing");
    fixture.agent.stop().await;
}

/// Measurement, not part of the suite (`cargo test -p gitops-tests --test health --
/// --ignored --nocapture`): how soon after a rollout's new pod is Ready the agent's
/// revision health says Healthy, over 20 rollouts. The pod's Ready condition carries a
/// lastTransitionTime of whole seconds, so the start is when a watch of this test sees
/// the condition turn True (the agent's own pod watch is no faster); the end is the
/// first `/metrics` (polled every 5 ms) showing the revision Healthy. What lies between
/// is the deployment controller's status update and the agent's work.
#[tokio::test]
#[ignore]
async fn measure_pod_ready_to_revision_healthy() {
    use futures::StreamExt;
    use kube::runtime::watcher;
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};
    use tokio::time::Instant;

    let fixture = Fixture::start("health-latency").await;
    let ready_seen: Arc<Mutex<BTreeMap<String, Instant>>> = Arc::default();
    let pods: Api<Pod> = Api::namespaced(fixture.client.clone(), &fixture.ns);
    let watch = tokio::spawn({
        let ready_seen = ready_seen.clone();
        async move {
            let mut events = watcher::watcher(pods, watcher::Config::default()).boxed();
            while let Some(event) = events.next().await {
                let Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod)) = event else { continue };
                let ready = pod.status.and_then(|s| s.conditions).unwrap_or_default();
                if ready.iter().any(|c| c.type_ == "Ready" && c.status == "True") {
                    ready_seen.lock().unwrap().entry(pod.metadata.name.unwrap()).or_insert_with(Instant::now);
                }
            }
        }
    });
    let mut latencies = Vec::new();
    for rollout in 0..21 {
        let mut container = busybox(fixture.busybox, "web", "sleep 3600");
        container["env"] = json!([{ "name": "ROLLOUT", "value": rollout.to_string() }]);
        fixture.repo.write("manifests/web.yaml", &deployment("web", container, json!({})).to_string());
        let before: Vec<String> = ready_seen.lock().unwrap().keys().cloned().collect();
        let commit = fixture.repo.commit(&format!("rollout {rollout}"));
        let series = format!("gitops_revision_health{{health=\"Healthy\",revision=\"{commit}\"}} 1");
        let healthy_at = loop {
            if fixture.agent.get("/metrics").await.1.contains(&series) {
                break Instant::now();
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        };
        let seen = ready_seen.lock().unwrap().clone();
        let (pod, ready_at) = seen.iter().find(|(name, _)| !before.contains(name)).expect("a new pod was Ready");
        assert!(*ready_at <= healthy_at, "revision {commit} Healthy before its pod {pod} was Ready");
        // The first rollout creates the Deployment: its time includes the first pod watch's list.
        if rollout > 0 {
            latencies.push(healthy_at.duration_since(*ready_at).as_secs_f64() * 1000.0);
        }
    }
    watch.abort();
    latencies.sort_by(f64::total_cmp);
    let at = |q: f64| latencies[((latencies.len() as f64 * q).ceil() as usize).clamp(1, latencies.len()) - 1];
    println!(
        "pod Ready -> revision Healthy over {} rollouts: p50 {:.0} ms, p99 {:.0} ms, min {:.0} ms, max {:.0} ms",
        latencies.len(),
        at(0.5),
        at(0.99),
        latencies[0],
        latencies[latencies.len() - 1]
    );
    fixture.agent.stop().await;
}
