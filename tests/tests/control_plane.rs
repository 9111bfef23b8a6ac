//! Proves the local control plane is a real Kubernetes: server-side apply with field
//! ownership, CRDs, the controller manager's namespace, service-account and Job
//! controllers, RBAC; and that its processes never outlive the test.

use std::time::Duration;

use gitops_tests::cluster::{self, eventually};
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use serde_json::json;

fn config_map(ns: &str, name: &str, data: serde_json::Value) -> serde_json::Value {
    json!({ "apiVersion": "v1", "kind": "ConfigMap", "metadata": { "name": name, "namespace": ns }, "data": data })
}

#[tokio::test]
async fn server_side_apply_creates_updates_and_reports_conflicts() {
    let client = cluster::client().await;
    let ns = cluster::namespace(&client, "ssa").await;
    let cms: Api<ConfigMap> = Api::namespaced(client, &ns);
    let as_manager = |m: &str| PatchParams::apply(m);

    let created = cms
        .patch("settings", &as_manager("alice"), &Patch::Apply(config_map(&ns, "settings", json!({ "color": "red" }))))
        .await
        .unwrap();
    assert_eq!(created.data.unwrap()["color"], "red");

    let updated = cms
        .patch("settings", &as_manager("alice"), &Patch::Apply(config_map(&ns, "settings", json!({ "color": "blue" }))))
        .await
        .unwrap();
    assert_eq!(updated.data.unwrap()["color"], "blue");

    let conflict = cms
        .patch("settings", &as_manager("bob"), &Patch::Apply(config_map(&ns, "settings", json!({ "color": "green" }))))
        .await
        .expect_err("a second manager setting an owned field must conflict");
    match conflict {
        kube::Error::Api(status) => {
            assert_eq!(status.code, 409, "{status:?}");
            assert!(status.message.contains("alice"), "the conflict names the owner: {}", status.message);
        }
        other => panic!("expected a 409 conflict, got {other}"),
    }

    let forced = cms
        .patch(
            "settings",
            &as_manager("bob").force(),
            &Patch::Apply(config_map(&ns, "settings", json!({ "color": "green" }))),
        )
        .await
        .unwrap();
    assert_eq!(forced.data.unwrap()["color"], "green");
    let managers: Vec<String> = forced.metadata.managed_fields.unwrap().into_iter().filter_map(|f| f.manager).collect();
    assert_eq!(managers, vec!["bob".to_owned()], "a forced apply takes ownership of the field");
}

#[tokio::test]
async fn a_crd_becomes_established_and_its_objects_are_served() {
    let client = cluster::client().await;
    let ns = cluster::namespace(&client, "crd").await;
    // CRDs are cluster-scoped: a group per test process keeps parallel runs apart.
    let group = format!("{ns}.test.scale.dev");
    let crd: CustomResourceDefinition = serde_json::from_value(json!({
        "metadata": { "name": format!("widgets.{group}") },
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": { "plural": "widgets", "singular": "widget", "kind": "Widget" },
            "versions": [{
                "name": "v1", "served": true, "storage": true,
                "schema": { "openAPIV3Schema": { "type": "object", "properties": {
                    "spec": { "type": "object", "properties": { "size": { "type": "integer" } } }
                } } }
            }]
        }
    }))
    .unwrap();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.create(&PostParams::default(), &crd).await.unwrap();
    eventually("the CRD to become Established", || async {
        let crd = crds.get(&format!("widgets.{group}")).await.ok()?;
        let conditions = crd.status?.conditions?;
        conditions.iter().any(|c| c.type_ == "Established" && c.status == "True").then_some(())
    })
    .await;

    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(&group, "v1", "Widget"));
    let widgets: Api<DynamicObject> = Api::namespaced_with(client, &ns, &resource);
    let widget: DynamicObject = serde_json::from_value(json!({
        "apiVersion": format!("{group}/v1"), "kind": "Widget",
        "metadata": { "name": "w1" }, "spec": { "size": 3 }
    }))
    .unwrap();
    // The discovery cache of a fresh CRD can lag Established by a moment.
    eventually("the Widget to be created", || async { widgets.create(&PostParams::default(), &widget).await.ok() })
        .await;
    let served = widgets.get("w1").await.unwrap();
    assert_eq!(served.data["spec"]["size"], 3);
    crds.delete(&format!("widgets.{group}"), &DeleteParams::default()).await.unwrap();
}

/// The service range holds what a real cluster's repository needs: the 254th Service
/// used to be refused ("range is full") when the range was a /24.
#[tokio::test]
async fn the_service_range_holds_hundreds_of_cluster_ip_services() {
    let client = cluster::client().await;
    let ns = cluster::namespace(&client, "services").await;
    let services: Api<k8s_openapi::api::core::v1::Service> = Api::namespaced(client, &ns);
    let created = futures::future::join_all((0..300).map(|i| {
        let services = services.clone();
        async move {
            let service = serde_json::from_value(json!({
                "metadata": { "name": format!("svc-{i}") },
                "spec": { "selector": { "app": "x" }, "ports": [{ "port": 80 }] },
            }))
            .unwrap();
            services.create(&PostParams::default(), &service).await
        }
    }))
    .await;
    let ips: std::collections::BTreeSet<String> = created
        .into_iter()
        .map(|service| service.expect("a ClusterIP Service is allocated an address").spec.unwrap().cluster_ip.unwrap())
        .collect();
    assert_eq!(ips.len(), 300, "each Service has an address of its own");
}

#[tokio::test]
async fn deleting_a_namespace_finishes() {
    let client = cluster::client().await;
    let ns = cluster::namespace(&client, "doomed").await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    cms.create(&PostParams::default(), &serde_json::from_value(config_map(&ns, "c", json!({}))).unwrap())
        .await
        .unwrap();

    let namespaces: Api<Namespace> = Api::all(client);
    namespaces.delete(&ns, &DeleteParams::default()).await.unwrap();
    // The namespace controller empties the namespace and removes its finalizer.
    eventually("the namespace to be gone", || async { namespaces.get_opt(&ns).await.unwrap().is_none().then_some(()) })
        .await;
}

#[tokio::test]
async fn a_job_completes_when_its_pod_succeeds() {
    let client = cluster::client().await;
    let ns = cluster::namespace(&client, "job").await;
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    let job: Job = serde_json::from_value(json!({
        "metadata": { "name": "once" },
        "spec": { "backoffLimit": 0, "template": { "spec": {
            "restartPolicy": "Never",
            "containers": [{ "name": "main", "image": "busybox", "command": ["true"] }]
        } } }
    }))
    .unwrap();
    jobs.create(&PostParams::default(), &job).await.unwrap();

    let pods: Api<Pod> = Api::namespaced(client, &ns);
    let pod = eventually("the Job controller to create a pod", || async {
        pods.list(&ListParams::default().labels("job-name=once")).await.ok()?.items.into_iter().next()
    })
    .await;
    // No kubelet runs here: report the container's success as a kubelet would.
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let status = json!({ "status": {
        "phase": "Succeeded",
        "containerStatuses": [{
            "name": "main", "image": "busybox", "imageID": "", "ready": false, "restartCount": 0,
            "state": { "terminated": { "exitCode": 0, "reason": "Completed", "startedAt": now, "finishedAt": now } }
        }]
    } });
    pods.patch_status(&pod.metadata.name.unwrap(), &PatchParams::default(), &Patch::Merge(status)).await.unwrap();

    eventually("the Job to be Complete", || async {
        let conditions = jobs.get("once").await.ok()?.status?.conditions?;
        conditions.iter().any(|c| c.type_ == "Complete" && c.status == "True").then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_narrow_role_is_refused_outside_itself() {
    let admin = cluster::client().await;
    let ns = cluster::namespace(&admin, "rbac").await;
    let other = cluster::namespace(&admin, "rbac-other").await;
    let apply = |value: serde_json::Value| {
        let admin = admin.clone();
        async move {
            let obj: DynamicObject = serde_json::from_value(value).unwrap();
            let gvk = GroupVersionKind::try_from(obj.types.as_ref().unwrap()).unwrap();
            let api: Api<DynamicObject> =
                Api::namespaced_with(admin, obj.metadata.namespace.as_deref().unwrap(), &ApiResource::from_gvk(&gvk));
            api.patch(obj.metadata.name.as_deref().unwrap(), &PatchParams::apply("test"), &Patch::Apply(&obj))
                .await
                .unwrap();
        }
    };
    apply(json!({ "apiVersion": "v1", "kind": "ServiceAccount", "metadata": { "name": "reader", "namespace": ns } }))
        .await;
    apply(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": { "name": "read-configmaps", "namespace": ns },
        "rules": [{ "apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"] }]
    }))
    .await;
    apply(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": { "name": "reader", "namespace": ns },
        "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "read-configmaps" },
        "subjects": [{ "kind": "ServiceAccount", "name": "reader", "namespace": ns }]
    }))
    .await;

    // A token the API server signs with the control plane's service-account key.
    let request: TokenRequest = serde_json::from_value(json!({ "spec": { "audiences": [] } })).unwrap();
    let token = Api::<ServiceAccount>::namespaced(admin.clone(), &ns)
        .create_token_request("reader", &PostParams::default(), &request)
        .await
        .unwrap()
        .status
        .unwrap()
        .token
        .expect("the API server issues a token");
    let mut config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(cluster::shared().kubeconfig()).unwrap(),
        &Default::default(),
    )
    .await
    .unwrap();
    config.auth_info = kube::config::AuthInfo { token: Some(token.into()), ..Default::default() };
    let reader = kube::Client::try_from(config).unwrap();

    let own: Api<ConfigMap> = Api::namespaced(reader.clone(), &ns);
    own.list(&ListParams::default()).await.expect("the role grants list in its namespace");
    let forbidden = |result: Result<(), kube::Error>| matches!(result, Err(kube::Error::Api(s)) if s.code == 403);
    assert!(forbidden(
        Api::<ConfigMap>::namespaced(reader.clone(), &other).list(&ListParams::default()).await.map(|_| ())
    ));
    let cm = serde_json::from_value(config_map(&ns, "new", json!({}))).unwrap();
    assert!(forbidden(own.create(&PostParams::default(), &cm).await.map(|_| ())));
    assert!(forbidden(Api::<Namespace>::all(reader).list(&ListParams::default()).await.map(|_| ())));
}

#[tokio::test]
async fn a_restarted_api_server_serves_the_same_data() {
    let mut plane = cluster::private().await;
    let client = plane.client().await.unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(client, "default");
    cms.create(
        &PostParams::default(),
        &serde_json::from_value(config_map("default", "kept", json!({"a": "1"}))).unwrap(),
    )
    .await
    .unwrap();

    plane.stop_component("kube-apiserver").unwrap();
    assert!(cms.get("kept").await.is_err(), "no API server, no answer");
    plane.start_component("kube-apiserver").unwrap();
    plane.wait_ready().await.unwrap();

    let client = plane.client().await.unwrap();
    let kept = Api::<ConfigMap>::namespaced(client, "default").get("kept").await.unwrap();
    assert_eq!(kept.data.unwrap()["a"], "1");
}

/// Set in the child process of the test below, which starts a control plane and waits
/// to be killed.
const CHILD_STATE_DIR: &str = "GITOPS_TEST_CHILD_STATE_DIR";

#[tokio::test]
async fn components_die_with_a_killed_test_process() {
    if let Ok(dir) = std::env::var(CHILD_STATE_DIR) {
        let options = gitops_bootstrap::local::Options::new(dir, gitops_bootstrap::local::Lifetime::TiedToThisProcess);
        let _plane = gitops_bootstrap::local::LocalControlPlane::start(&options).await.unwrap();
        std::future::pending::<()>().await;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "components_die_with_a_killed_test_process", "--nocapture"])
        .env(CHILD_STATE_DIR, dir.path())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pids = eventually("the child's control plane to be ready", || async {
        let components = gitops_bootstrap::local::status(dir.path());
        let kubeconfig = dir.path().join("kubeconfig");
        let ready = components.len() == 3
            && kubeconfig.exists()
            && gitops_bootstrap::local::client_from_kubeconfig(&kubeconfig)
                .await
                .ok()?
                .apiserver_version()
                .await
                .is_ok();
        ready.then(|| components.into_iter().map(|(_, pid, _)| pid).collect::<Vec<_>>())
    })
    .await;

    child.kill().unwrap(); // SIGKILL: no destructor, no panic hook runs.
    child.wait().unwrap();
    eventually("every component to be gone", || async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        pids.iter().all(|pid| !gitops_bootstrap::local::process::is_running(*pid)).then_some(())
    })
    .await;
}
