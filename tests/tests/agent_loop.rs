//! The agent's loop as a user meets it: a push reaches the cluster through a webhook,
//! through a watched local repository, over authenticated smart HTTP; failures show in
//! `/status` and `/metrics` while the cluster stays at the last good revision.

use std::time::Duration;

use gitops_agent::source::Credentials;
use gitops_tests::agent::{Agent, AgentConfig, github_push};
use gitops_tests::cluster::{self, eventually};
use gitops_tests::git::{GitDaemon, GitRepo, HttpGitServer, git_secret_dir};
use hyper::Method;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;

/// Long enough that only a webhook or a watched repository can trigger a fetch
/// within a test.
const NEVER: Duration = Duration::from_secs(3600);

fn config_map(name: &str, value: &str) -> String {
    format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\ndata:\n  value: \"{value}\"\n")
}

/// Waits until ConfigMap `name` in `ns` holds `value`.
async fn applied(client: &kube::Client, ns: &str, name: &str, value: &str) {
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    eventually(&format!("ConfigMap {ns}/{name} to hold {value}"), || async {
        let cm = cms.get_opt(name).await.ok()??;
        (cm.data?.get("value")? == value).then_some(())
    })
    .await;
}

async fn value_of(client: &kube::Client, ns: &str, name: &str) -> Option<String> {
    let cm = Api::<ConfigMap>::namespaced(client.clone(), ns).get_opt(name).await.unwrap()?;
    cm.data?.remove("value")
}

/// An admin client, a fresh namespace, and a repository whose first commit has
/// ConfigMap `app` = 1.
async fn setup(prefix: &str) -> (kube::Client, String, GitRepo) {
    let client = cluster::client().await;
    let ns = cluster::namespace(&client, prefix).await;
    let repo = GitRepo::new();
    repo.write("manifests/app.yaml", &config_map("app", "1"));
    repo.commit("one");
    (client, ns, repo)
}

fn config(repo: String, namespace: &str) -> AgentConfig {
    AgentConfig { interval: NEVER, ..AgentConfig::new(repo, namespace) }
}

#[tokio::test]
async fn a_signed_webhook_triggers_a_fetch_and_a_forged_one_does_not() {
    let (client, ns, repo) = setup("webhook").await;
    let agent = Agent::start(
        client.clone(),
        AgentConfig { webhook_secret: Some("s3cret".into()), ..config(repo.file_url(), &ns) },
    )
    .await;
    applied(&client, &ns, "app", "1").await;
    eventually("/readyz to answer 200", || async { (agent.get("/readyz").await.0 == 200).then_some(()) }).await;

    repo.write("manifests/app.yaml", &config_map("app", "2"));
    repo.commit("two");
    let (body, _) = github_push("s3cret");
    let (forged_body, forged_headers) = github_push("not the secret");
    let headers: Vec<(&str, &str)> = forged_headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (status, reply) = agent.request(Method::POST, "/hooks/git", &headers, &forged_body).await;
    assert_eq!(status, 401, "{reply}");
    assert!(!reply.contains("s3cret"), "no secret in the answer: {reply}");

    let (_, signed) = github_push("s3cret");
    let headers: Vec<(&str, &str)> = signed.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (status, reply) = agent.request(Method::POST, "/hooks/git", &headers, &body).await;
    assert_eq!(status, 202, "{reply}");
    applied(&client, &ns, "app", "2").await;
    agent.stop().await;
}

#[tokio::test]
async fn a_commit_to_a_local_repository_is_applied_without_waiting_for_the_poll() {
    let (client, ns, repo) = setup("notify").await;
    let path = repo.path();
    let agent = Agent::start(
        client.clone(),
        AgentConfig { local_repo: Some(path.clone()), ..config(path.display().to_string(), &ns) },
    )
    .await;
    applied(&client, &ns, "app", "1").await;

    repo.write("manifests/app.yaml", &config_map("app", "2"));
    let two = repo.commit("two");
    applied(&client, &ns, "app", "2").await;
    // The object is live a moment before the sync that applied it is recorded.
    eventually("the sync of two recorded", || async { (agent.status().await["revision"] == two).then_some(()) }).await;

    // Only writes wake the loop: the agent's own reads of the repository must not, or
    // it would spin. Half a second is hundreds of syncs for a spinning loop, none here.
    let syncs = "gitops_sync_total{result=\"success\"}";
    let before = agent.metric(syncs).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(agent.metric(syncs).await <= before + 1.0, "the loop runs only when woken");
    agent.stop().await;
}

#[tokio::test]
async fn smart_http_with_basic_auth_deploys_and_a_wrong_password_is_reported() {
    let (client, ns, repo) = setup("http").await;
    let server = HttpGitServer::serve(&repo.root(), "deployer", "right-password");

    let secret = git_secret_dir(&[("username", "deployer"), ("password", "right-password")]);
    let agent = Agent::start(
        client.clone(),
        AgentConfig {
            credentials: Credentials::from_secret_dir(secret.path()).unwrap(),
            ..config(server.url(repo.name()), &ns)
        },
    )
    .await;
    applied(&client, &ns, "app", "1").await;
    agent.stop().await;

    let wrong = git_secret_dir(&[("username", "deployer"), ("password", "wrong-password")]);
    let other_ns = cluster::namespace(&client, "http-denied").await;
    let agent = Agent::start(
        client.clone(),
        AgentConfig {
            credentials: Credentials::from_secret_dir(wrong.path()).unwrap(),
            ..config(server.url(repo.name()), &other_ns)
        },
    )
    .await;
    let errors = eventually("the fetch failure in /status", || async {
        let status = agent.status().await;
        let errors = status["errors"].as_array().filter(|e| !e.is_empty())?.clone();
        Some(serde_json::Value::Array(errors).to_string())
    })
    .await;
    assert!(errors.contains("authentication"), "{errors}");
    assert!(!errors.contains("wrong-password"), "no secret in /status: {errors}");
    assert!(agent.metric("gitops_source_fetch_errors_total").await >= 1.0);
    assert!(agent.metric("gitops_sync_total{result=\"failure\"}").await >= 1.0);
    assert_eq!(value_of(&client, &other_ns, "app").await, None, "nothing applied");
    agent.stop().await;
}

#[tokio::test]
async fn an_unreachable_remote_keeps_the_last_good_revision_and_recovers() {
    let (client, ns, repo) = setup("unreachable").await;
    let daemon = GitDaemon::serve(&repo.root());
    let url = daemon.url(repo.name());
    let agent = Agent::start(client.clone(), AgentConfig { webhook_secret: None, ..config(url.clone(), &ns) }).await;
    applied(&client, &ns, "app", "1").await;

    // The server goes away; a push (with the file deleted) cannot be fetched.
    let port = url.rsplit(':').next().unwrap().split('/').next().unwrap().to_owned();
    drop(daemon);
    repo.remove("manifests/app.yaml");
    repo.write("manifests/other.yaml", &config_map("other", "1"));
    repo.commit("two");
    agent.trigger().await;
    eventually("the fetch failure to be counted", || async {
        (agent.metric("gitops_source_fetch_errors_total").await >= 1.0).then_some(())
    })
    .await;
    let status = agent.status().await;
    assert!(status["errors"][0]["message"].as_str().unwrap_or_default().contains("127.0.0.1"), "{status}");
    assert_eq!(value_of(&client, &ns, "app").await.as_deref(), Some("1"), "nothing pruned");

    // The server is back on the same address: the backoff retries pick the push up.
    let _daemon = GitDaemon::serve_on(&repo.root(), port.parse().unwrap());
    applied(&client, &ns, "other", "1").await;
    eventually("app to be pruned", || async { value_of(&client, &ns, "app").await.is_none().then_some(()) }).await;
    agent.stop().await;
}

#[tokio::test]
async fn status_lists_the_applied_objects_with_their_file_line_and_last_action() {
    let (client, ns, repo) = setup("applied").await;
    repo.write("manifests/more.yaml", &format!("{}---\n{}", config_map("kept", "1"), config_map("changed", "1")));
    let first = repo.commit("more");
    let agent = Agent::start(client.clone(), config(repo.file_url(), &ns)).await;
    agent.applied(&first).await;
    let entry = |name: &str, file: &str, line: u64, action: &str, revision: &str| {
        serde_json::json!({ "kind": "ConfigMap", "namespace": ns, "name": name, "file": file, "line": line,
                            "last_action": action, "revision": revision })
    };
    assert_eq!(
        agent.status().await["applied"],
        serde_json::json!([
            entry("app", "manifests/app.yaml", 1, "created", &first),
            entry("changed", "manifests/more.yaml", 8, "created", &first),
            entry("kept", "manifests/more.yaml", 1, "created", &first),
        ])
    );

    repo.write("manifests/more.yaml", &format!("{}---\n{}", config_map("kept", "1"), config_map("changed", "2")));
    std::fs::remove_file(repo.work_tree().join("manifests/app.yaml")).unwrap();
    let second = repo.commit("change one, delete one");
    agent.trigger_and_wait(second.clone()).await;
    assert_eq!(
        agent.status().await["applied"],
        serde_json::json!([
            entry("changed", "manifests/more.yaml", 8, "configured", &second),
            entry("kept", "manifests/more.yaml", 1, "created", &first),
        ]),
        "the pruned object is gone, the unchanged one keeps its last action"
    );
    agent.stop().await;
}
