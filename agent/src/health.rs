//! Health of one live object: `Healthy`, `Progressing` or `Degraded`, with a reason a
//! person can act on, following kstatus' rules (what `kubectl rollout status`, Flux's
//! health checks and Argo CD's health assessment read).
//!
//! Input: a live object as JSON (a watch event's object) and, for workloads, summaries
//! of the pods its selector picks ([`PodSummary`]). Output: [`Health`]. Pure functions:
//! no request, no clock; the revision health tracker feeds them from the watches.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

/// An object's, or a revision's, health.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum HealthStatus {
    Healthy,
    Progressing,
    Degraded,
}

impl HealthStatus {
    pub const ALL: [HealthStatus; 3] = [HealthStatus::Healthy, HealthStatus::Progressing, HealthStatus::Degraded];

    /// The metric label and status ConfigMap value.
    pub fn as_str(self) -> &'static str {
        match self {
            HealthStatus::Healthy => "Healthy",
            HealthStatus::Progressing => "Progressing",
            HealthStatus::Degraded => "Degraded",
        }
    }
}

/// One object's health and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Health {
    pub status: HealthStatus,
    /// A CamelCase word, as the cluster says it (`ImagePullBackOff`,
    /// `ProgressDeadlineExceeded`, `BackoffLimitExceeded`, ...); empty when healthy.
    pub reason: String,
    pub message: String,
}

impl Health {
    pub fn healthy() -> Health {
        Health { status: HealthStatus::Healthy, reason: String::new(), message: String::new() }
    }

    pub fn progressing(reason: &str, message: impl Into<String>) -> Health {
        Health { status: HealthStatus::Progressing, reason: reason.to_owned(), message: message.into() }
    }

    pub fn degraded(reason: &str, message: impl Into<String>) -> Health {
        Health { status: HealthStatus::Degraded, reason: reason.to_owned(), message: message.into() }
    }
}

/// Container waiting reasons that do not go away by waiting: the image cannot be
/// pulled, the container keeps crashing, or its configuration is wrong.
const FAILING_WAITING_REASONS: &[&str] = &[
    "ImagePullBackOff",
    "ErrImagePull",
    "ErrImageNeverPull",
    "InvalidImageName",
    "CrashLoopBackOff",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
];

/// What a workload needs of one of its pods: its labels (to match the selector) and
/// what is wrong with it, if anything. Kept instead of the pod, which is many times
/// larger.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodSummary {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Being deleted: an old rollout's pod says nothing about the new one.
    pub terminating: bool,
    /// `None`: running and ready, or finished successfully.
    pub problem: Option<Health>,
    /// Its problem does not go away by waiting (a container that cannot start, or
    /// keeps crashing), unlike a pod that ended (a Job's, which may retry).
    pub failing: bool,
}

impl PodSummary {
    pub fn of(pod: &Value) -> Option<PodSummary> {
        let metadata = pod.get("metadata")?;
        let labels = metadata
            .get("labels")
            .and_then(Value::as_object)
            .map(|labels| labels.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned()))).collect())
            .unwrap_or_default();
        let problem = Some(pod_health(pod)).filter(|h| h.status != HealthStatus::Healthy);
        let ended = pod.pointer("/status/phase").and_then(Value::as_str) == Some("Failed");
        Some(PodSummary {
            failing: !ended && problem.as_ref().is_some_and(|p| p.status == HealthStatus::Degraded),
            name: metadata.get("name")?.as_str()?.to_owned(),
            labels,
            terminating: metadata.get("deletionTimestamp").is_some_and(|t| !t.is_null()),
            problem,
        })
    }
}

/// The kinds whose health comes from pods they select.
pub fn selects_pods(group: &str, kind: &str) -> bool {
    matches!((group, kind), ("apps", "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet") | ("batch", "Job"))
}

/// The health `object`, of `kind` in API group `group`, reports of itself.
pub fn own(group: &str, kind: &str, object: &Value) -> Health {
    match (group, kind) {
        ("apps", "Deployment") => deployment(object),
        ("apps", "StatefulSet") => stateful_set(object),
        ("apps", "DaemonSet") => daemon_set(object),
        ("apps", "ReplicaSet") => replica_set(object),
        ("batch", "Job") => job(object),
        ("", "Pod") => pod_health(object),
        ("", "PersistentVolumeClaim") => claim(object),
        ("", "Service") => service(object),
        ("apiextensions.k8s.io", "CustomResourceDefinition") => definition(object),
        ("apiregistration.k8s.io", "APIService") => api_service(object),
        _ => generic(object),
    }
}

/// A workload's health (see [`selects_pods`]) given its `own` and the pods of its
/// namespace: the pods its `selector` (its `spec.selector`) picks say why it is not
/// healthy, and a container that cannot start makes it Degraded.
pub fn with_pods(own: Health, selector: Option<&Value>, pods: &[&PodSummary]) -> Health {
    if own.status == HealthStatus::Healthy {
        return own;
    }
    let mine = pods.iter().filter(|pod| !pod.terminating && selector.is_some_and(|s| matches(s, &pod.labels)));
    let mut problems: Vec<(&Health, bool)> =
        mine.filter_map(|pod| Some((pod.problem.as_ref()?, pod.failing))).collect();
    // The worst pod speaks for the workload: a failing container before a slow one.
    problems.sort_by_key(|(p, failing)| std::cmp::Reverse((*failing, p.status)));
    match problems.first().map(|(pod, failing)| (*pod, *failing)) {
        // A container that cannot start, or keeps crashing, is the reason to act on,
        // whatever the workload's own status says yet.
        Some((pod, true)) => Health::degraded(&pod.reason, format!("{}; {}", pod.message, own.message)),
        // A pod that ended badly explains a failed workload; while it retries (a Job
        // below its backoff limit) it is only context.
        Some((pod, _)) if own.status == HealthStatus::Degraded => {
            Health { message: format!("{}; {}", pod.message, own.message), ..own }
        }
        Some((pod, _)) => Health { message: format!("{}; {}", own.message, pod.message), ..own },
        None => own,
    }
}

/// Whether a label selector (`matchLabels`, `matchExpressions`, or a Service-style
/// map) selects `labels`. An empty selector selects nothing here: a workload always
/// has one, and picking every pod of the namespace would blame the wrong ones.
pub fn matches(selector: &Value, labels: &BTreeMap<String, String>) -> bool {
    let Some(selector) = selector.as_object() else { return false };
    let (match_labels, expressions) = match (selector.get("matchLabels"), selector.get("matchExpressions")) {
        (None, None) => (Some(selector), None),
        (l, e) => (l.and_then(Value::as_object), e.and_then(Value::as_array)),
    };
    let mut any = false;
    for (key, value) in match_labels.into_iter().flatten() {
        any = true;
        if labels.get(key).map(String::as_str) != value.as_str() {
            return false;
        }
    }
    for expression in expressions.into_iter().flatten() {
        any = true;
        let Some(key) = expression.get("key").and_then(Value::as_str) else { return false };
        let values: Vec<&str> = expression
            .get("values")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let value = labels.get(key).map(String::as_str);
        let holds = match expression.get("operator").and_then(Value::as_str) {
            Some("In") => value.is_some_and(|v| values.contains(&v)),
            Some("NotIn") => value.is_none_or(|v| !values.contains(&v)),
            Some("Exists") => value.is_some(),
            Some("DoesNotExist") => value.is_none(),
            _ => false,
        };
        if !holds {
            return false;
        }
    }
    any
}

fn int(object: &Value, pointer: &str) -> Option<i64> {
    object.pointer(pointer).and_then(Value::as_i64)
}

fn text<'a>(object: &'a Value, pointer: &str) -> Option<&'a str> {
    object.pointer(pointer).and_then(Value::as_str)
}

/// A condition of `status.conditions` by type.
struct Condition<'a> {
    status: &'a str,
    reason: &'a str,
    message: &'a str,
}

fn condition<'a>(object: &'a Value, kind: &str) -> Option<Condition<'a>> {
    let conditions = object.pointer("/status/conditions")?.as_array()?;
    let found = conditions.iter().find(|c| c.get("type").and_then(Value::as_str) == Some(kind))?;
    let field = |name| found.get(name).and_then(Value::as_str).unwrap_or("");
    Some(Condition { status: field("status"), reason: field("reason"), message: field("message") })
}

/// kstatus' first rule: a status about an older generation says nothing yet.
fn generation_observed(object: &Value) -> Option<Health> {
    let generation = int(object, "/metadata/generation")?;
    let observed = int(object, "/status/observedGeneration").unwrap_or(0);
    (observed < generation).then(|| {
        Health::progressing(
            "ObservedGenerationOutdated",
            format!("the controller has not seen generation {generation} yet (status is of {observed})"),
        )
    })
}

fn deployment(object: &Value) -> Health {
    if let Some(progress) = condition(object, "Progressing")
        && progress.reason == "ProgressDeadlineExceeded"
    {
        return Health::degraded("ProgressDeadlineExceeded", progress.message);
    }
    if let Some(outdated) = generation_observed(object) {
        return outdated;
    }
    let wanted = int(object, "/spec/replicas").unwrap_or(1);
    let count = |field: &str| int(object, &format!("/status/{field}")).unwrap_or(0);
    let (updated, replicas, available) = (count("updatedReplicas"), count("replicas"), count("availableReplicas"));
    if updated < wanted {
        return Health::progressing("RolloutInProgress", format!("{updated} of {wanted} replicas updated"));
    }
    if replicas > updated {
        return Health::progressing(
            "RolloutInProgress",
            format!("{} old replicas pending termination", replicas - updated),
        );
    }
    if available < updated {
        return Health::progressing(
            "RolloutInProgress",
            format!("{available} of {updated} updated replicas available"),
        );
    }
    Health::healthy()
}

fn stateful_set(object: &Value) -> Health {
    if let Some(outdated) = generation_observed(object) {
        return outdated;
    }
    let wanted = int(object, "/spec/replicas").unwrap_or(1);
    let count = |field: &str| int(object, &format!("/status/{field}")).unwrap_or(0);
    let ready = count("readyReplicas");
    if ready < wanted {
        return Health::progressing("RolloutInProgress", format!("{ready} of {wanted} replicas ready"));
    }
    // OnDelete: the controller leaves old pods until someone deletes them; there is
    // no rollout to wait for.
    if text(object, "/spec/updateStrategy/type") == Some("OnDelete") {
        return Health::healthy();
    }
    let partition = int(object, "/spec/updateStrategy/rollingUpdate/partition").unwrap_or(0);
    let updated = count("updatedReplicas");
    if updated < wanted - partition {
        return Health::progressing(
            "RolloutInProgress",
            format!("{updated} of {} replicas updated", wanted - partition),
        );
    }
    if partition == 0 && text(object, "/status/updateRevision") != text(object, "/status/currentRevision") {
        return Health::progressing("RolloutInProgress", "waiting for the update to finish");
    }
    Health::healthy()
}

fn daemon_set(object: &Value) -> Health {
    if let Some(outdated) = generation_observed(object) {
        return outdated;
    }
    let count = |field: &str| int(object, &format!("/status/{field}")).unwrap_or(0);
    let desired = count("desiredNumberScheduled");
    for (field, what) in
        [("updatedNumberScheduled", "updated"), ("numberAvailable", "available"), ("numberReady", "ready")]
    {
        let n = count(field);
        if n < desired {
            return Health::progressing("RolloutInProgress", format!("{n} of {desired} scheduled pods {what}"));
        }
    }
    Health::healthy()
}

fn replica_set(object: &Value) -> Health {
    if let Some(failure) = condition(object, "ReplicaFailure")
        && failure.status == "True"
    {
        return Health::degraded(failure.reason, failure.message);
    }
    if let Some(outdated) = generation_observed(object) {
        return outdated;
    }
    let wanted = int(object, "/spec/replicas").unwrap_or(1);
    let count = |field: &str| int(object, &format!("/status/{field}")).unwrap_or(0);
    for (field, what) in [("availableReplicas", "available"), ("readyReplicas", "ready")] {
        let n = count(field);
        if n < wanted {
            return Health::progressing("RolloutInProgress", format!("{n} of {wanted} replicas {what}"));
        }
    }
    Health::healthy()
}

fn job(object: &Value) -> Health {
    for (kind, healthy) in [("Failed", false), ("Complete", true)] {
        if let Some(c) = condition(object, kind)
            && c.status == "True"
        {
            return if healthy { Health::healthy() } else { Health::degraded(c.reason, c.message) };
        }
    }
    if condition(object, "Suspended").is_some_and(|c| c.status == "True") {
        return Health::progressing("Suspended", "the job is suspended");
    }
    let active = int(object, "/status/active").unwrap_or(0);
    let failed = int(object, "/status/failed").unwrap_or(0);
    let message = match failed {
        0 => format!("{active} pods running"),
        failed => format!("{active} pods running, {failed} failed so far"),
    };
    Health::progressing("Running", message)
}

/// A pod: failing containers are named, each with what the kubelet says.
fn pod_health(object: &Value) -> Health {
    let name = text(object, "/metadata/name").unwrap_or("");
    let statuses = ["initContainerStatuses", "containerStatuses"]
        .into_iter()
        .filter_map(|field| object.pointer(&format!("/status/{field}")).and_then(Value::as_array))
        .flatten();
    let mut not_ready = Vec::new();
    for status in statuses.clone() {
        let container = status.get("name").and_then(Value::as_str).unwrap_or("");
        if let Some(reason) = text(status, "/state/waiting/reason")
            && FAILING_WAITING_REASONS.contains(&reason)
        {
            let said = text(status, "/state/waiting/message").unwrap_or("");
            let restarts = int(status, "/restartCount").unwrap_or(0);
            let message = match (said, restarts) {
                ("", 0) => format!("pod {name}: container {container}: {reason}"),
                ("", n) => format!("pod {name}: container {container}: {reason} ({n} restarts)"),
                (said, _) => format!("pod {name}: container {container}: {reason}: {said}"),
            };
            return Health::degraded(reason, message);
        }
    }
    match text(object, "/status/phase") {
        Some("Succeeded") => return Health::healthy(),
        Some("Failed") => {
            let exited = statuses.clone().find_map(|s| {
                let code = int(s, "/state/terminated/exitCode").filter(|code| *code != 0)?;
                Some(format!("container {} exited with code {code}", s.get("name")?.as_str()?))
            });
            let reason = text(object, "/status/reason").unwrap_or("Failed");
            let message = exited.or_else(|| text(object, "/status/message").map(str::to_owned)).unwrap_or_default();
            return Health::degraded(reason, format!("pod {name}: {message}"));
        }
        _ => {}
    }
    if let Some(scheduled) = condition(object, "PodScheduled")
        && scheduled.status == "False"
    {
        return Health::progressing(scheduled.reason, format!("pod {name}: {}", scheduled.message));
    }
    for status in statuses.clone() {
        // Between a crash-looping container's back-offs it is terminated, not waiting:
        // that is the same failure, not progress.
        if let Some(code) = int(status, "/state/terminated/exitCode").filter(|code| *code != 0)
            && text(object, "/spec/restartPolicy").is_none_or(|policy| policy == "Always")
        {
            let container = status.get("name").and_then(Value::as_str).unwrap_or("");
            let reason = text(status, "/state/terminated/reason").unwrap_or("Error");
            let restarts = int(status, "/restartCount").unwrap_or(0);
            return Health::degraded(
                reason,
                format!("pod {name}: container {container} exited with code {code} ({restarts} restarts)"),
            );
        }
    }
    for status in statuses {
        let container = status.get("name").and_then(Value::as_str).unwrap_or("");
        if status.get("ready").and_then(Value::as_bool) != Some(true) {
            if let Some(reason) = text(status, "/state/waiting/reason") {
                return Health::progressing(reason, format!("pod {name}: container {container}: {reason}"));
            }
            if status.pointer("/state/running").is_some() {
                not_ready.push(container);
            }
        }
    }
    if !not_ready.is_empty() {
        return Health::progressing(
            "ContainersNotReady",
            format!("pod {name}: container {} running but not ready (readiness probe)", not_ready.join(", ")),
        );
    }
    match condition(object, "Ready") {
        Some(ready) if ready.status == "True" => Health::healthy(),
        Some(ready) => Health::progressing(ready.reason, format!("pod {name}: {}", ready.message)),
        None => Health::progressing("Pending", format!("pod {name}: not started yet")),
    }
}

fn claim(object: &Value) -> Health {
    match text(object, "/status/phase") {
        Some("Bound") => Health::healthy(),
        Some("Lost") => Health::degraded("ClaimLost", "the claim's volume is gone"),
        phase => Health::progressing(phase.unwrap_or("Pending"), "waiting for a volume to be bound"),
    }
}

fn service(object: &Value) -> Health {
    if text(object, "/spec/type") != Some("LoadBalancer") {
        return Health::healthy();
    }
    let assigned =
        object.pointer("/status/loadBalancer/ingress").and_then(Value::as_array).is_some_and(|i| !i.is_empty());
    match assigned {
        true => Health::healthy(),
        false => Health::progressing("LoadBalancerPending", "waiting for the load balancer's address"),
    }
}

fn definition(object: &Value) -> Health {
    if let Some(names) = condition(object, "NamesAccepted")
        && names.status == "False"
    {
        return Health::degraded(names.reason, names.message);
    }
    match condition(object, "Established") {
        Some(c) if c.status == "True" => Health::healthy(),
        _ => Health::progressing("NotEstablished", "the API server does not serve its kind yet"),
    }
}

fn api_service(object: &Value) -> Health {
    match condition(object, "Available") {
        Some(c) if c.status == "True" => Health::healthy(),
        Some(c) => Health::progressing(c.reason, c.message),
        None => Health::progressing("NotAvailable", "the API server has not checked the service yet"),
    }
}

/// Any other kind, by kstatus' generic rules: `Stalled` fails, `Reconciling` and an
/// unobserved generation progress, `Ready` (or `Available`) decides, and a kind with
/// none of them is healthy once applied.
fn generic(object: &Value) -> Health {
    if let Some(stalled) = condition(object, "Stalled")
        && stalled.status == "True"
    {
        return Health::degraded(stalled.reason, stalled.message);
    }
    if object.pointer("/status/observedGeneration").is_some()
        && let Some(outdated) = generation_observed(object)
    {
        return outdated;
    }
    if let Some(reconciling) = condition(object, "Reconciling")
        && reconciling.status == "True"
    {
        return Health::progressing(reconciling.reason, reconciling.message);
    }
    match condition(object, "Ready").or_else(|| condition(object, "Available")) {
        Some(c) if c.status == "False" => Health::progressing(c.reason, c.message),
        _ => Health::healthy(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn health(group: &str, kind: &str, object: &Value, pods: &[&PodSummary]) -> Health {
        let own = own(group, kind, object);
        if !selects_pods(group, kind) {
            return own;
        }
        with_pods(own, object.pointer("/spec/selector"), pods)
    }

    fn deployment(status: Value) -> Value {
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": { "name": "web", "namespace": "shop", "generation": 2 },
            "spec": { "replicas": 2, "selector": { "matchLabels": { "app": "web" } } },
            "status": status,
        })
    }

    fn pod(name: &str, labels: Value, status: Value) -> PodSummary {
        PodSummary::of(&json!({ "metadata": { "name": name, "labels": labels }, "status": status })).unwrap()
    }

    #[test]
    fn a_complete_rollout_at_the_current_generation_is_healthy() {
        let done = json!({ "observedGeneration": 2, "replicas": 2, "updatedReplicas": 2, "readyReplicas": 2,
            "availableReplicas": 2 });
        assert_eq!(health("apps", "Deployment", &deployment(done), &[]), Health::healthy());
        let stale = json!({ "observedGeneration": 1, "replicas": 2, "updatedReplicas": 2, "availableReplicas": 2 });
        assert_eq!(health("apps", "Deployment", &deployment(stale), &[]).reason, "ObservedGenerationOutdated");
        let rolling = json!({ "observedGeneration": 2, "replicas": 3, "updatedReplicas": 2, "availableReplicas": 2 });
        let health = health("apps", "Deployment", &deployment(rolling), &[]);
        assert_eq!(
            (health.status, health.message.as_str()),
            (HealthStatus::Progressing, "1 old replicas pending termination")
        );
    }

    #[test]
    fn a_deployment_blames_its_pods_image_pull_naming_the_container() {
        let status = json!({ "observedGeneration": 2, "replicas": 2, "updatedReplicas": 2, "unavailableReplicas": 2 });
        let waiting = json!({ "phase": "Pending", "containerStatuses": [
            { "name": "sidecar", "ready": true, "restartCount": 0, "state": { "running": {} } },
            { "name": "app", "ready": false, "restartCount": 0, "image": "nope:1",
              "state": { "waiting": { "reason": "ImagePullBackOff", "message": "Back-off pulling image \"nope:1\"" } } },
        ]});
        let theirs = pod("web-1", json!({ "app": "web" }), waiting.clone());
        let other = pod(
            "db-1",
            json!({ "app": "db" }),
            json!({ "phase": "Running", "containerStatuses": [
            { "name": "db", "ready": false, "state": { "waiting": { "reason": "CrashLoopBackOff" } } }] }),
        );
        let health = health("apps", "Deployment", &deployment(status), &[&other, &theirs]);
        assert_eq!(health.status, HealthStatus::Degraded);
        assert_eq!(health.reason, "ImagePullBackOff");
        assert!(
            health.message.starts_with("pod web-1: container app: ImagePullBackOff: Back-off pulling image"),
            "{}",
            health.message
        );
        assert!(health.message.ends_with("0 of 2 updated replicas available"), "{}", health.message);
    }

    #[test]
    fn a_crash_loop_is_degraded_and_a_failing_readiness_probe_progresses_until_the_deadline() {
        let crashing = pod(
            "web-1",
            json!({ "app": "web" }),
            json!({ "phase": "Running", "containerStatuses": [
            { "name": "app", "ready": false, "restartCount": 3,
              "state": { "waiting": { "reason": "CrashLoopBackOff", "message": "back-off 40s restarting failed container=app" } },
              "lastState": { "terminated": { "exitCode": 1 } } }] }),
        );
        let problem = crashing.problem.clone().unwrap();
        assert_eq!((problem.status, problem.reason.as_str()), (HealthStatus::Degraded, "CrashLoopBackOff"));
        let between_back_offs = pod(
            "web-1",
            json!({ "app": "web" }),
            json!({ "phase": "Running", "containerStatuses": [
            { "name": "app", "ready": false, "restartCount": 3,
              "state": { "terminated": { "exitCode": 1, "reason": "Error" } } }] }),
        );
        let problem = between_back_offs.problem.unwrap();
        assert_eq!(
            (problem.status, problem.message.as_str()),
            (HealthStatus::Degraded, "pod web-1: container app exited with code 1 (3 restarts)")
        );

        let unready = pod(
            "web-2",
            json!({ "app": "web" }),
            json!({ "phase": "Running",
            "conditions": [{ "type": "Ready", "status": "False", "reason": "ContainersNotReady" }],
            "containerStatuses": [{ "name": "app", "ready": false, "state": { "running": {} } }] }),
        );
        let rolling = json!({ "observedGeneration": 2, "replicas": 2, "updatedReplicas": 2, "availableReplicas": 0 });
        let progressing = health("apps", "Deployment", &deployment(rolling), &[&unready]);
        assert_eq!(progressing.status, HealthStatus::Progressing);
        assert!(progressing.message.contains("container app running but not ready"), "{}", progressing.message);

        let past = json!({ "observedGeneration": 2, "replicas": 2, "updatedReplicas": 2, "availableReplicas": 0,
            "conditions": [{ "type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                "message": "ReplicaSet \"web-5d4\" has timed out progressing." }] });
        let degraded = health("apps", "Deployment", &deployment(past), &[&unready]);
        assert_eq!((degraded.status, degraded.reason.as_str()), (HealthStatus::Degraded, "ProgressDeadlineExceeded"));
        assert!(degraded.message.contains("web-2: container app running but not ready"), "{}", degraded.message);
    }

    #[test]
    fn terminating_pods_of_an_old_rollout_do_not_count() {
        let mut old = pod(
            "web-old",
            json!({ "app": "web" }),
            json!({ "phase": "Running", "containerStatuses": [
            { "name": "app", "ready": false, "state": { "waiting": { "reason": "ImagePullBackOff" } } }] }),
        );
        old.terminating = true;
        let rolling = json!({ "observedGeneration": 2, "replicas": 2, "updatedReplicas": 2, "availableReplicas": 1 });
        assert_eq!(health("apps", "Deployment", &deployment(rolling), &[&old]).status, HealthStatus::Progressing);
    }

    #[test]
    fn stateful_sets_wait_for_ready_and_updated_replicas() {
        let set = |status: Value| {
            json!({ "metadata": { "generation": 1 },
            "spec": { "replicas": 1, "selector": { "matchLabels": { "app": "db" } } }, "status": status })
        };
        let starting = set(json!({ "observedGeneration": 1, "replicas": 1, "readyReplicas": 0,
            "currentRevision": "db-1", "updateRevision": "db-1" }));
        assert_eq!(health("apps", "StatefulSet", &starting, &[]).message, "0 of 1 replicas ready");
        let ready = set(json!({ "observedGeneration": 1, "replicas": 1, "readyReplicas": 1, "updatedReplicas": 1,
            "currentRevision": "db-1", "updateRevision": "db-1" }));
        assert_eq!(health("apps", "StatefulSet", &ready, &[]), Health::healthy());
        let updating = set(json!({ "observedGeneration": 1, "replicas": 1, "readyReplicas": 1, "updatedReplicas": 1,
            "currentRevision": "db-1", "updateRevision": "db-2" }));
        assert_eq!(health("apps", "StatefulSet", &updating, &[]).status, HealthStatus::Progressing);
    }

    #[test]
    fn daemon_sets_and_replica_sets_count_their_pods() {
        let ds = json!({ "metadata": { "generation": 1 }, "status": { "observedGeneration": 1,
            "desiredNumberScheduled": 3, "updatedNumberScheduled": 3, "numberAvailable": 2, "numberReady": 3 } });
        assert_eq!(health("apps", "DaemonSet", &ds, &[]).message, "2 of 3 scheduled pods available");
        let rs = json!({ "metadata": { "generation": 1 }, "spec": { "replicas": 1 }, "status": { "observedGeneration": 1,
            "conditions": [{ "type": "ReplicaFailure", "status": "True", "reason": "FailedCreate",
                "message": "pods \"x\" is forbidden: exceeded quota" }] } });
        assert_eq!(health("apps", "ReplicaSet", &rs, &[]).reason, "FailedCreate");
    }

    #[test]
    fn jobs_complete_or_fail_and_a_failed_pod_says_how() {
        let job = |conditions: Value| {
            json!({ "metadata": { "name": "migrate" },
            "spec": { "selector": { "matchLabels": { "batch.kubernetes.io/controller-uid": "u1" } } },
            "status": { "failed": 2, "conditions": conditions } })
        };
        let failed_pod = pod(
            "migrate-x",
            json!({ "batch.kubernetes.io/controller-uid": "u1" }),
            json!({
            "phase": "Failed", "containerStatuses": [{ "name": "migrate", "ready": false,
                "state": { "terminated": { "exitCode": 3, "reason": "Error" } } }] }),
        );
        let failed = health(
            "batch",
            "Job",
            &job(json!([{ "type": "Failed", "status": "True",
            "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit" }])),
            &[&failed_pod],
        );
        assert_eq!((failed.status, failed.reason.as_str()), (HealthStatus::Degraded, "BackoffLimitExceeded"));
        assert!(
            failed.message.starts_with("pod migrate-x: container migrate exited with code 3"),
            "{}",
            failed.message
        );
        assert_eq!(
            health("batch", "Job", &job(json!([{ "type": "Complete", "status": "True" }])), &[]),
            Health::healthy()
        );
        // Still retrying: a failed pod is not yet the job's failure.
        assert_eq!(health("batch", "Job", &job(json!([])), &[&failed_pod]).status, HealthStatus::Progressing);
    }

    #[test]
    fn claims_load_balancers_definitions_and_api_services() {
        assert_eq!(
            health("", "PersistentVolumeClaim", &json!({ "status": { "phase": "Pending" } }), &[]).status,
            HealthStatus::Progressing
        );
        assert_eq!(
            health("", "PersistentVolumeClaim", &json!({ "status": { "phase": "Bound" } }), &[]),
            Health::healthy()
        );
        assert_eq!(health("", "Service", &json!({ "spec": { "type": "ClusterIP" } }), &[]), Health::healthy());
        let lb = json!({ "spec": { "type": "LoadBalancer" }, "status": { "loadBalancer": {} } });
        assert_eq!(health("", "Service", &lb, &[]).reason, "LoadBalancerPending");
        let lb = json!({ "spec": { "type": "LoadBalancer" }, "status": { "loadBalancer": { "ingress": [{ "ip": "10.0.0.9" }] } } });
        assert_eq!(health("", "Service", &lb, &[]), Health::healthy());
        let crd = json!({ "status": { "conditions": [{ "type": "NamesAccepted", "status": "True" },
            { "type": "Established", "status": "True" }] } });
        assert_eq!(health("apiextensions.k8s.io", "CustomResourceDefinition", &crd, &[]), Health::healthy());
        let api = json!({ "status": { "conditions": [{ "type": "Available", "status": "False",
            "reason": "MissingEndpoints", "message": "endpoints for service/metrics in \"kube-system\" have no addresses" }] } });
        assert_eq!(health("apiregistration.k8s.io", "APIService", &api, &[]).reason, "MissingEndpoints");
    }

    #[test]
    fn other_kinds_follow_their_conditions_or_are_healthy_once_applied() {
        assert_eq!(health("", "ConfigMap", &json!({ "data": { "a": "b" } }), &[]), Health::healthy());
        let not_ready = json!({ "metadata": { "generation": 3 }, "status": { "observedGeneration": 3,
            "conditions": [{ "type": "Ready", "status": "False", "reason": "Pending", "message": "waiting" }] } });
        assert_eq!(health("example.com", "Widget", &not_ready, &[]).status, HealthStatus::Progressing);
        let stale = json!({ "metadata": { "generation": 4 }, "status": { "observedGeneration": 3,
            "conditions": [{ "type": "Ready", "status": "True" }] } });
        assert_eq!(health("example.com", "Widget", &stale, &[]).reason, "ObservedGenerationOutdated");
        let stalled = json!({ "status": { "conditions": [{ "type": "Stalled", "status": "True", "reason": "BadSpec",
            "message": "spec.size must be positive" }] } });
        assert_eq!(health("example.com", "Widget", &stalled, &[]).status, HealthStatus::Degraded);
    }

    #[test]
    fn selectors_match_labels_and_expressions() {
        let labels: BTreeMap<String, String> = [("app".into(), "web".into()), ("tier".into(), "front".into())].into();
        assert!(matches(&json!({ "matchLabels": { "app": "web" } }), &labels));
        assert!(!matches(&json!({ "matchLabels": { "app": "db" } }), &labels));
        assert!(matches(
            &json!({ "matchExpressions": [{ "key": "tier", "operator": "In", "values": ["front"] }] }),
            &labels
        ));
        assert!(!matches(&json!({ "matchExpressions": [{ "key": "tier", "operator": "DoesNotExist" }] }), &labels));
        assert!(!matches(&json!({}), &labels));
    }
}
