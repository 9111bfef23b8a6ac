//! Restricted mode as an operator deploys it: the agent runs as a ServiceAccount bound
//! only by `manifests/restricted/rbac.yaml`, with `--allow-namespaces`. It applies in
//! its namespaces, refuses everything else with a clear error before any write, and
//! RBAC itself stops the account from escalating.

use gitops_tests::agent::{Agent, AgentConfig};
use gitops_tests::cluster::{self, eventually};
use gitops_tests::git::GitRepo;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, RoleBinding};
use kube::Api;
use kube::api::PostParams;
use serde_json::json;

fn config_map(namespace: &str, name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n  namespace: {namespace}\ndata:\n  value: \"1\"\n"
    )
}

async fn exists(client: &kube::Client, namespace: &str, name: &str) -> bool {
    Api::<ConfigMap>::namespaced(client.clone(), namespace).get_opt(name).await.unwrap().is_some()
}

/// The status of a request the account is not allowed to make.
fn forbidden<T: std::fmt::Debug>(result: Result<T, kube::Error>) -> bool {
    matches!(result, Err(kube::Error::Api(status)) if status.code == 403)
}

#[tokio::test]
async fn the_agent_stays_inside_its_namespaces_and_cannot_escalate() {
    let admin = cluster::client().await;
    let (own, other, outside) = (
        cluster::namespace(&admin, "own").await,
        cluster::namespace(&admin, "other").await,
        cluster::namespace(&admin, "outside").await,
    );
    let rbac = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests/restricted/rbac.yaml"))
        .unwrap()
        .replace("team-a", &own)
        .replace("team-b", &other)
        .replace("gitops-system", &own);
    cluster::apply_yaml(&admin, &rbac).await;
    let agent_client = cluster::service_account_client(&admin, &own, "gitops-agent").await;

    let repo = GitRepo::new();
    repo.write("manifests/own.yaml", &config_map(&own, "mine"));
    repo.write("manifests/other.yaml", &config_map(&other, "theirs"));
    let good = repo.commit("inside");
    let agent = Agent::start(
        agent_client.clone(),
        AgentConfig {
            local_repo: Some(repo.path()),
            allow_namespaces: Some(vec![own.clone(), other.clone()]),
            status_report: true,
            ..AgentConfig::new(repo.file_url(), &own)
        },
    )
    .await;
    eventually("the revision inside the allowed namespaces", || async {
        (agent.status().await["revision"] == good).then_some(())
    })
    .await;
    assert!(exists(&admin, &own, "mine").await && exists(&admin, &other, "theirs").await);
    // Its events: on what it applied, and on its status ConfigMap by the rule of its own
    // namespace's Role, which grants nothing else but ConfigMaps and the Lease.
    for (namespace, object, reason) in
        [(&other, "configmap/theirs", "Created"), (&own, "configmap/gitops-agent-status", "Synced")]
    {
        eventually(&format!("the {reason} event of {object}"), || async {
            let events = cluster::kubectl(&["get", "events", "-n", namespace]);
            events.lines().any(|line| line.contains(object) && line.contains(reason)).then_some(())
        })
        .await;
    }

    // A revision reaching outside: refused as a whole, before any write.
    repo.write("manifests/own.yaml", &config_map(&own, "mine-too"));
    repo.write("manifests/outside.yaml", &config_map(&outside, "escape"));
    repo.write(
        "manifests/admin.yaml",
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata:\n  name: take-over\n\
         roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: cluster-admin}\n\
         subjects: [{kind: ServiceAccount, name: gitops-agent, namespace: x}]\n",
    );
    repo.commit("outside");
    let errors = eventually("the refusal in /status", || async {
        let errors = agent.status().await["errors"].clone();
        (errors != json!([])).then_some(errors)
    })
    .await;
    // One entry per refused object, each with its file and line.
    let message: Vec<String> = errors
        .as_array()
        .unwrap()
        .iter()
        .map(|e| format!("{}:{}: {}", e["file"].as_str().unwrap(), e["line"], e["message"].as_str().unwrap()))
        .collect();
    let message = message.join("\n");
    assert!(
        message.contains(
            "manifests/admin.yaml:1: ClusterRoleBinding.rbac.authorization.k8s.io take-over is refused: it is \
             cluster-scoped, and the agent may only apply objects inside its allowed namespaces"
        ),
        "{message}"
    );
    assert!(
        message.contains(&format!(
            "manifests/outside.yaml:1: ConfigMap {outside}/escape is refused: namespace {outside} is outside the \
             agent's allowed namespaces"
        )),
        "{message}"
    );
    assert!(!exists(&admin, &own, "mine-too").await, "nothing of the refused revision was written");
    assert!(!exists(&admin, &outside, "escape").await);
    assert_eq!(agent.status().await["revision"], good.as_str(), "the last good revision stays applied");
    agent.stop().await;

    // And RBAC itself holds, whatever the agent would try.
    let binding: ClusterRoleBinding = serde_json::from_value(json!({
        "metadata": { "name": format!("escalate-{own}") },
        "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin" },
        "subjects": [{ "kind": "ServiceAccount", "name": "gitops-agent", "namespace": own }],
    }))
    .unwrap();
    let cluster_bindings: Api<ClusterRoleBinding> = Api::all(agent_client.clone());
    assert!(forbidden(cluster_bindings.create(&PostParams::default(), &binding).await), "no ClusterRoleBinding");
    let local_binding: RoleBinding = serde_json::from_value(json!({
        "metadata": { "name": "escalate" },
        "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin" },
        "subjects": [{ "kind": "ServiceAccount", "name": "gitops-agent", "namespace": own }],
    }))
    .unwrap();
    let own_bindings: Api<RoleBinding> = Api::namespaced(agent_client.clone(), &own);
    assert!(forbidden(own_bindings.create(&PostParams::default(), &local_binding).await), "no binding to more rights");
    let system: Api<ConfigMap> = Api::namespaced(agent_client.clone(), "kube-system");
    let cm: ConfigMap = serde_json::from_value(json!({ "metadata": { "name": "planted" } })).unwrap();
    assert!(forbidden(system.create(&PostParams::default(), &cm).await), "no write to kube-system");
    let outside_cms: Api<ConfigMap> = Api::namespaced(agent_client, &outside);
    assert!(forbidden(outside_cms.create(&PostParams::default(), &cm).await), "no write outside");
}

/// The cluster-wide install (`manifests/install/rbac.yaml`) in a revision that ships
/// RBAC as workloads and operators do: a Role granting `deletecollection` and its
/// RoleBinding (repo-template's Spark driver), and a ClusterRole granting verb `*` and
/// its binding (kube-prometheus-stack's operator). Kubernetes lets only an account that
/// holds a right grant it; the agent holds them all, and applies both.
#[tokio::test]
async fn the_installs_rbac_applies_the_roles_workloads_and_operators_ship() {
    let admin = cluster::client().await;
    let own = cluster::namespace(&admin, "install-rbac").await;
    let app = cluster::namespace(&admin, "app").await;
    let rbac = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests/install/rbac.yaml"))
        .unwrap()
        .replace("gitops-system", &own);
    cluster::apply_yaml(&admin, &rbac).await;
    let agent_client = cluster::service_account_client(&admin, &own, "gitops-agent").await;

    let repo = GitRepo::new();
    repo.write(
        "manifests/driver.yaml",
        &format!(
            "apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata:\n  name: driver\n  namespace: {app}\n\
             rules:\n- apiGroups: [\"\"]\n  resources: [pods, configmaps]\n  verbs: [create, get, list, watch, delete, deletecollection]\n\
             ---\napiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata:\n  name: driver\n  namespace: {app}\n\
             roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: driver}}\n\
             subjects: [{{kind: ServiceAccount, name: driver, namespace: {app}}}]\n"
        ),
    );
    repo.write(
        "manifests/operator.yaml",
        &format!(
            "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata:\n  name: {own}-operator\n\
             rules:\n- apiGroups: [\"\"]\n  resources: [configmaps, secrets]\n  verbs: [\"*\"]\n\
             - apiGroups: [monitoring.coreos.com]\n  resources: [prometheuses, prometheuses/status]\n  verbs: [\"*\"]\n\
             ---\napiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata:\n  name: {own}-operator\n\
             roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: {own}-operator}}\n\
             subjects: [{{kind: ServiceAccount, name: operator, namespace: {app}}}]\n"
        ),
    );
    let good = repo.commit("the driver's and the operator's roles");
    let agent = Agent::start(
        agent_client.clone(),
        AgentConfig { local_repo: Some(repo.path()), ..AgentConfig::new(repo.file_url(), &own) },
    )
    .await;
    let status = eventually("the roles revision applied, or refused", || async {
        let status = agent.status().await;
        (status["revision"] == good || status["errors"] != json!([])).then_some(status)
    })
    .await;
    assert_eq!(status["errors"], json!([]), "{status}");
    assert!(Api::<RoleBinding>::namespaced(admin.clone(), &app).get_opt("driver").await.unwrap().is_some());
    let bindings: Api<ClusterRoleBinding> = Api::all(admin.clone());
    assert!(bindings.get_opt(&format!("{own}-operator")).await.unwrap().is_some());
    agent.stop().await;
}
