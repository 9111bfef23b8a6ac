//! Drift between commits, as an operator causes it with kubectl: found from watches,
//! shown in `/metrics` and `/status`, corrected or only reported by policy, and never
//! reported where only the API server's defaulting and normalisation differ.

use gitops_agent::drift::Policy;
use gitops_tests::agent::{Agent, AgentConfig};
use gitops_tests::cluster::{self, eventually};
use gitops_tests::git::GitRepo;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams};
use serde_json::json;

/// Manifests with the values the API server rewrites: quantities, int-or-string
/// ports, and fields it defaults.
fn manifests(value: &str) -> Vec<(&'static str, String)> {
    vec![
        (
            "manifests/settings.yaml",
            format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\ndata:\n  value: \"{value}\"\n"),
        ),
        (
            "manifests/web.yaml",
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  selector: {app: web}\n  ports:\n  - name: http\n    port: 80\n    targetPort: http\n  - name: admin\n    port: 8081\n    targetPort: 9000\n".into(),
        ),
        (
            "manifests/deployment.yaml",
            "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  replicas: 2\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec:\n      containers:\n      - name: web\n        image: nginx\n        resources:\n          requests: {cpu: 1000m, memory: 1024Mi}\n          limits: {cpu: \"2\", memory: 1Gi}\n        ports:\n        - containerPort: 80\n          name: http\n".into(),
        ),
    ]
}

struct Fixture {
    client: kube::Client,
    ns: String,
    repo: GitRepo,
    agent: Agent,
}

impl Fixture {
    async fn start(prefix: &str, policy: Policy) -> Fixture {
        let client = cluster::client().await;
        let ns = cluster::namespace(&client, prefix).await;
        let repo = GitRepo::new();
        for (path, contents) in manifests("from git") {
            repo.write(path, &contents);
        }
        repo.commit("app");
        let agent = Agent::start(
            client.clone(),
            AgentConfig { local_repo: Some(repo.path()), drift: policy, ..AgentConfig::new(repo.file_url(), &ns) },
        )
        .await;
        eventually("the first sync", || async { (agent.get("/readyz").await.0 == 200).then_some(()) }).await;
        Fixture { client, ns, repo, agent }
    }

    /// `kubectl edit`-style: a merge patch by another field manager.
    async fn edit<K>(&self, name: &str, patch: serde_json::Value)
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
        K::DynamicType: Default,
    {
        let params = PatchParams { field_manager: Some("kubectl-edit".into()), ..Default::default() };
        Api::<K>::namespaced(self.client.clone(), &self.ns).patch(name, &params, &Patch::Merge(patch)).await.unwrap();
    }

    /// The value of `series` (with its labels) in `/metrics`, 0 when absent.
    async fn metric(&self, series: &str) -> f64 {
        self.agent.metric(series).await
    }

    async fn drifted(&self) -> Vec<(String, String, Vec<String>)> {
        let status = self.agent.status().await;
        let mut drifted: Vec<(String, String, Vec<String>)> = status["drifted"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                let fields = d["fields"].as_array().unwrap().iter().map(|f| f.as_str().unwrap().to_owned()).collect();
                (d["kind"].as_str().unwrap().to_owned(), d["name"].as_str().unwrap().to_owned(), fields)
            })
            .collect();
        drifted.sort();
        drifted
    }
}

#[tokio::test]
async fn report_mode_shows_an_edit_and_a_delete_until_git_agrees() {
    let f = Fixture::start("drift-report", Policy::Report).await;
    let configmaps = format!("gitops_drifted_resources{{kind=\"ConfigMap\",namespace=\"{}\"}}", f.ns);
    let services = format!("gitops_drifted_resources{{kind=\"Service\",namespace=\"{}\"}}", f.ns);

    f.edit::<ConfigMap>("settings", json!({ "data": { "value": "edited by hand" } })).await;
    Api::<Service>::namespaced(f.client.clone(), &f.ns).delete("web", &DeleteParams::default()).await.unwrap();
    eventually("both drifts in /metrics", || async {
        (f.metric(&configmaps).await == 1.0 && f.metric(&services).await == 1.0).then_some(())
    })
    .await;
    let drifted = f.drifted().await;
    assert_eq!(
        drifted,
        vec![
            ("ConfigMap".into(), "settings".into(), vec!["data.value".into()]),
            ("Service".into(), "web".into(), vec!["(deleted)".into()]),
        ],
        "/status names each object and the differing fields"
    );
    assert_eq!(f.metric("gitops_drift_detected_total{kind=\"ConfigMap\"}").await, 1.0);
    let live = Api::<ConfigMap>::namespaced(f.client.clone(), &f.ns).get("settings").await.unwrap();
    assert_eq!(live.data.unwrap()["value"], "edited by hand", "report mode leaves the edit alone");

    // Git catches up with the cluster: the edit is committed, the Service removed.
    f.repo.write("manifests/settings.yaml", &manifests("edited by hand")[0].1);
    f.repo.remove("manifests/web.yaml");
    f.repo.commit("agree with the cluster");
    eventually("the drift to resolve", || async {
        (f.metric(&configmaps).await == 0.0 && f.metric(&services).await == 0.0).then_some(())
    })
    .await;
    assert!(f.drifted().await.is_empty());
}

#[tokio::test]
async fn correct_mode_undoes_an_edit_and_a_scale() {
    let f = Fixture::start("drift-correct", Policy::Correct).await;
    f.edit::<ConfigMap>("settings", json!({ "data": { "value": "edited by hand" } })).await;
    f.edit::<Deployment>("web", json!({ "spec": { "replicas": 5 } })).await;

    let configmaps: Api<ConfigMap> = Api::namespaced(f.client.clone(), &f.ns);
    let deployments: Api<Deployment> = Api::namespaced(f.client.clone(), &f.ns);
    eventually("the edits to be undone", || async {
        let value = configmaps.get("settings").await.ok()?.data?.remove("value")?;
        let replicas = deployments.get("web").await.ok()?.spec.replicas?;
        (value == "from git" && replicas == 2).then_some(())
    })
    .await;
    eventually("the counters to move", || async {
        let detected = f.metric("gitops_drift_detected_total{kind=\"ConfigMap\"}").await;
        let corrected = f.metric("gitops_drift_corrected_total{kind=\"Deployment\"}").await;
        (detected >= 1.0 && corrected >= 1.0).then_some(())
    })
    .await;
    assert!(f.drifted().await.is_empty(), "corrected objects are not drifted");
}

#[tokio::test]
async fn defaulting_quantities_and_other_managers_fields_are_no_drift() {
    let f = Fixture::start("drift-none", Policy::Report).await;
    // Writes by other managers to fields git does not set make every object suspect,
    // so each one goes through the dry-run confirmation.
    f.edit::<Deployment>("web", json!({ "metadata": { "labels": { "touched": "yes" } } })).await;
    f.edit::<Service>("web", json!({ "metadata": { "annotations": { "touched": "yes" } } })).await;
    f.edit::<ConfigMap>("settings", json!({ "metadata": { "labels": { "touched": "yes" } } })).await;
    // Then one real edit per object; each watch handles its events in order, so once
    // these show, the touches above were checked.
    f.edit::<Deployment>("web", json!({ "spec": { "replicas": 3 } })).await;
    f.edit::<Service>("web", json!({ "spec": { "selector": { "app": "other" } } })).await;
    f.edit::<ConfigMap>("settings", json!({ "data": { "value": "edited" } })).await;
    let drifted = eventually("the three real edits", || async {
        let drifted = f.drifted().await;
        (drifted.len() == 3).then_some(drifted)
    })
    .await;
    assert_eq!(
        drifted,
        vec![
            ("ConfigMap".into(), "settings".into(), vec!["data.value".into()]),
            ("Deployment".into(), "web".into(), vec!["spec.replicas".into()]),
            ("Service".into(), "web".into(), vec!["spec.selector.app".into()]),
        ],
        "only the real edits, not 1000m vs 1, targetPort or defaulted fields"
    );
    for kind in ["ConfigMap", "Deployment", "Service"] {
        let detected = f.metric(&format!("gitops_drift_detected_total{{kind=\"{kind}\"}}")).await;
        assert_eq!(detected, 1.0, "{kind}: the touch was not counted as drift");
    }
}

#[tokio::test]
async fn an_object_annotated_drift_ignore_is_left_alone() {
    let f = Fixture::start("drift-ignore", Policy::Correct).await;
    f.edit::<ConfigMap>("settings", json!({ "metadata": { "annotations": { "gitops.scale.dev/drift": "ignore" } } }))
        .await;
    f.edit::<ConfigMap>("settings", json!({ "data": { "value": "mine" } })).await;
    // A real edit elsewhere, to know the watch got this far.
    f.edit::<Deployment>("web", json!({ "spec": { "replicas": 4 } })).await;
    eventually("the Deployment to be corrected", || async {
        (f.metric("gitops_drift_corrected_total{kind=\"Deployment\"}").await >= 1.0).then_some(())
    })
    .await;
    let cms = Api::<ConfigMap>::namespaced(f.client.clone(), &f.ns);
    assert_eq!(cms.get("settings").await.unwrap().data.unwrap()["value"], "mine");
    assert_eq!(f.metric("gitops_drift_detected_total{kind=\"ConfigMap\"}").await, 0.0);

    // "Do not undo changes" is not "do not notice it is gone": deleted, it comes back.
    cms.delete("settings", &DeleteParams::default()).await.unwrap();
    let back = eventually("the ignored ConfigMap to come back", || async { cms.get_opt("settings").await.ok()? }).await;
    assert_eq!(back.data.unwrap()["value"], "from git");
}

#[tokio::test]
async fn an_object_annotated_drift_report_in_git_is_reported_not_corrected() {
    let f = Fixture::start("drift-report-one", Policy::Correct).await;
    let (path, settings) = manifests("from git").remove(0);
    let annotated = settings
        .replace("  name: settings\n", "  name: settings\n  annotations:\n    gitops.scale.dev/drift: report\n");
    assert_ne!(annotated, settings);
    f.repo.write(path, &annotated);
    f.repo.commit("settings: report its drift, do not correct it");
    let cms = Api::<ConfigMap>::namespaced(f.client.clone(), &f.ns);
    eventually("the annotation to be applied", || async {
        let annotations = cms.get("settings").await.ok()?.metadata.annotations?;
        (annotations.get("gitops.scale.dev/drift")? == "report").then_some(())
    })
    .await;
    f.edit::<ConfigMap>("settings", json!({ "data": { "value": "tuned live" } })).await;
    // Written live, the same annotation does not stop the correction.
    let live_annotation = json!({ "gitops.scale.dev/drift": "report" });
    f.edit::<Deployment>("web", json!({ "metadata": { "annotations": live_annotation }, "spec": { "replicas": 4 } }))
        .await;
    let deployments: Api<Deployment> = Api::namespaced(f.client.clone(), &f.ns);
    eventually("the Deployment to be corrected", || async {
        (deployments.get("web").await.ok()?.spec.replicas == Some(2)).then_some(())
    })
    .await;
    let drifted = eventually("the ConfigMap's drift to be reported", || async {
        let drifted = f.drifted().await;
        (!drifted.is_empty()).then_some(drifted)
    })
    .await;
    assert_eq!(drifted, vec![("ConfigMap".into(), "settings".into(), vec!["data.value".into()])]);
    assert_eq!(cms.get("settings").await.unwrap().data.unwrap()["value"], "tuned live", "not corrected");
    assert_eq!(f.metric("gitops_drift_corrected_total{kind=\"ConfigMap\"}").await, 0.0);
}

#[tokio::test]
async fn kubectl_drift_fires_the_shipped_alert_and_a_commit_resolves_it() {
    let f = Fixture::start("drift-alert", Policy::Report).await;
    // The shipped rules, with `for: 1s` instead of 5 minutes.
    let rules =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests/alerts/gitops-agent.rules.yaml"))
            .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let quick = dir.path().join("quick.rules.yaml");
    std::fs::write(&quick, rules.replace("for: 5m", "for: 1s")).unwrap();
    let target = f.agent.base.trim_start_matches("http://").to_owned();
    let prometheus = gitops_tests::prometheus::Prometheus::start(&[target], &[quick]).await;
    prometheus.wait_for_targets_up().await;

    cluster::kubectl(&[
        "-n",
        &f.ns,
        "patch",
        "configmap",
        "settings",
        "--type=merge",
        "-p",
        r#"{"data":{"value":"by hand"}}"#,
    ]);
    cluster::kubectl(&["-n", &f.ns, "delete", "service", "web"]);
    let firing = eventually("GitOpsDriftDetected to fire for the ConfigMap and the Service", || async {
        let alerts: Vec<String> = prometheus
            .alerts()
            .await
            .into_iter()
            .filter(|(name, state, labels)| {
                name == "GitOpsDriftDetected" && state == "firing" && labels.get("namespace") == Some(&f.ns)
            })
            .map(|(_, _, labels)| labels["kind"].clone())
            .collect();
        (alerts.len() == 2).then_some(alerts)
    })
    .await;
    assert_eq!(firing, ["ConfigMap", "Service"]);

    f.repo.write("manifests/settings.yaml", &manifests("by hand")[0].1);
    f.repo.remove("manifests/web.yaml");
    f.repo.commit("agree with the cluster");
    eventually("the alert to resolve", || async {
        let alerts = prometheus.alerts().await;
        (!alerts
            .iter()
            .any(|(name, _, labels)| name == "GitOpsDriftDetected" && labels.get("namespace") == Some(&f.ns)))
        .then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_custom_object_with_schema_defaults_is_no_drift() {
    let f = Fixture::start("drift-crd", Policy::Report).await;
    // CRDs are cluster-scoped: a group of this test's own.
    let group = format!("{}.drift.test", f.ns);
    f.repo.write(
        "manifests/crd.yaml",
        &format!(
            "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata:\n  name: widgets.{group}\n\
             spec:\n  group: {group}\n  scope: Namespaced\n  names: {{plural: widgets, singular: widget, kind: Widget}}\n\
             \x20 versions:\n  - name: v1\n    served: true\n    storage: true\n    schema:\n      openAPIV3Schema:\n\
             \x20       type: object\n        properties:\n          spec:\n            type: object\n            properties:\n\
             \x20             size: {{type: integer, default: 3}}\n              port: {{x-kubernetes-int-or-string: true}}\n\
             \x20             color: {{type: string}}\n"
        ),
    );
    f.repo.write(
        "manifests/widget.yaml",
        &format!("apiVersion: {group}/v1\nkind: Widget\nmetadata:\n  name: w\nspec:\n  port: \"8080\"\n  color: red\n"),
    );
    f.repo.commit("a CRD and a widget");
    let resource = kube::api::ApiResource::from_gvk(&kube::core::GroupVersionKind::gvk(&group, "v1", "Widget"));
    let widgets: Api<kube::api::DynamicObject> = Api::namespaced_with(f.client.clone(), &f.ns, &resource);
    let widget = eventually("the widget, defaulted", || async { widgets.get_opt("w").await.ok()? }).await;
    assert_eq!(widget.data["spec"]["size"], 3, "the API server defaulted spec.size");

    let params = PatchParams { field_manager: Some("kubectl-edit".into()), ..Default::default() };
    widgets
        .patch("w", &params, &Patch::Merge(json!({ "metadata": { "labels": { "touched": "yes" } } })))
        .await
        .unwrap();
    widgets.patch("w", &params, &Patch::Merge(json!({ "spec": { "color": "blue" } }))).await.unwrap();
    let drifted = eventually("the real edit", || async {
        let drifted = f.drifted().await;
        drifted.iter().any(|(kind, _, _)| kind == "Widget").then_some(drifted)
    })
    .await;
    assert_eq!(drifted, vec![("Widget".into(), "w".into(), vec!["spec.color".into()])]);
    assert_eq!(f.metric("gitops_drift_detected_total{kind=\"Widget\"}").await, 1.0, "the touch was no drift");
}
