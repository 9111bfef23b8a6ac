//! Kustomizations as a user meets them: rendered as `kubectl kustomize` renders them,
//! synced to a real API server (a generator's hash-suffixed ConfigMap replaced and the
//! old one pruned), not rendered again when nothing under them changed, and bad input
//! refused at its file and line before anything is applied.

use std::path::{Path, PathBuf};
use std::process::Command;

use gitops_agent::render::{self, Capabilities, Renderer};
use gitops_tests::agent::{Agent, AgentConfig};
use gitops_tests::cluster::{self, eventually};
use gitops_tests::git::GitRepo;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use serde_json::Value;

const CORPUS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/data/kustomize-parity");

fn renderer(chart_cache: &Path) -> Renderer {
    Renderer::new(gitops_tests::render::tools(chart_cache))
}

/// `kubectl kustomize DIR`'s objects, decoded as the agent decodes a file.
fn kubectl_kustomize(dir: &Path) -> Vec<Value> {
    let output = Command::new("kubectl").arg("kustomize").arg(dir).output().expect("running kubectl");
    assert!(
        output.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).unwrap();
    let manifests = render::render_text(Path::new("kubectl-output.yaml"), &text).unwrap_or_else(|e| panic!("{e:#?}"));
    manifests.into_iter().map(|m| m.object).collect()
}

#[test]
fn every_case_renders_as_kubectl_kustomize_does() {
    let cache = tempfile::tempdir().unwrap();
    let renderer = renderer(cache.path());
    let mut cases: Vec<PathBuf> =
        std::fs::read_dir(CORPUS).unwrap().flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect();
    cases.sort();
    assert!(cases.len() >= 6, "the corpus is there: {cases:?}");
    let mut failures = Vec::new();
    for case in &cases {
        let name = case.file_name().unwrap().to_string_lossy().into_owned();
        let rendered = renderer
            .render(case, "monitoring", &Capabilities::default())
            .unwrap_or_else(|e| panic!("{name}: {}", e.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n")));
        let agent: Vec<Value> = rendered.manifests.iter().map(|m| m.object.clone()).collect();
        let at: Vec<String> = rendered.manifests.iter().map(|m| m.location.to_string()).collect();
        assert!(at.iter().all(|at| at == "manifests/app/kustomization.yaml:1"), "{name}: {at:?}");
        let kubectl = kubectl_kustomize(&case.join("manifests/app"));
        if agent == kubectl {
            println!("ok   {name}: {} objects", agent.len());
        } else {
            failures.push(format!(
                "{name}:\nagent:   {}\nkubectl: {}",
                serde_json::to_string(&agent).unwrap(),
                serde_json::to_string(&kubectl).unwrap()
            ));
        }
    }
    assert_eq!(renderer.stats().kustomize_builds, cases.len() as u64, "one build a case");
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));

    // The last case rendered again, unchanged: from the cache.
    renderer.render(cases.last().unwrap(), "monitoring", &Capabilities::default()).unwrap();
    let stats = renderer.stats();
    assert_eq!((stats.kustomize_builds, stats.cache_hits), (cases.len() as u64, 1));
}

/// Renders a repository of `files` and returns its errors as `file:line: message`.
fn render_errors(files: &[(&str, &str)]) -> Vec<String> {
    let repo = tempfile::tempdir().unwrap();
    for (path, text) in files {
        let path = repo.path().join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    let cache = tempfile::tempdir().unwrap();
    let errors = renderer(cache.path()).render(repo.path(), "monitoring", &Capabilities::default()).unwrap_err();
    errors.iter().map(ToString::to_string).collect()
}

#[test]
fn bad_kustomizations_are_errors_at_their_file_and_line() {
    let base = ("base/kustomization.yaml", "resources: [cm.yaml]\n");
    let cm = ("base/cm.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n");

    let broken =
        render_errors(&[base, cm, ("manifests/app/kustomization.yaml", "resources:\n- ../../base\n  namePrefix: x\n")]);
    assert_eq!(broken.len(), 1, "{broken:?}");
    assert!(broken[0].starts_with("manifests/app/kustomization.yaml:3: invalid YAML"), "{broken:?}");

    let unknown_field =
        render_errors(&[base, cm, ("manifests/app/kustomization.yaml", "resources: [../../base]\nnamePrefx: x\n")]);
    assert_eq!(unknown_field.len(), 1, "{unknown_field:?}");
    assert!(unknown_field[0].starts_with("manifests/app/kustomization.yaml:1: kustomize: "), "{unknown_field:?}");
    assert!(unknown_field[0].contains("namePrefx"), "kustomize's own message: {unknown_field:?}");

    let missing = render_errors(&[("manifests/app/kustomization.yaml", "namePrefix: x-\nresources:\n- ../../base\n")]);
    assert_eq!(missing, ["manifests/app/kustomization.yaml:3: \"../../base\" does not exist (resources)"]);

    let remote = render_errors(&[
        base,
        cm,
        (
            "manifests/app/kustomization.yaml",
            "resources:\n- ../../base\n- https://github.com/kubernetes-sigs/kustomize//examples/helloWorld?ref=v5.7.1\n",
        ),
    ]);
    assert_eq!(
        remote,
        [
            "manifests/app/kustomization.yaml:3: \"https://github.com/kubernetes-sigs/kustomize//examples/helloWorld?ref=v5.7.1\" is a remote base; only paths in the repository are rendered (vendor it into the repository)"
        ]
    );

    let outside = render_errors(&[("manifests/app/kustomization.yaml", "components:\n- ../../..\n")]);
    assert_eq!(outside.len(), 1, "{outside:?}");
    assert!(
        outside[0].starts_with("manifests/app/kustomization.yaml:2: \"../../..\" resolves to /")
            && outside[0].ends_with(", outside the repository"),
        "{outside:?}"
    );
}

async fn config_maps(client: &kube::Client, ns: &str, prefix: &str) -> Vec<ConfigMap> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let list = api.list(&Default::default()).await.unwrap();
    list.items.into_iter().filter(|cm| cm.metadata.name.as_deref().unwrap_or_default().starts_with(prefix)).collect()
}

const OVERLAY: &str = "resources:\n- ../../base\nconfigMapGenerator:\n- name: app-config\n  literals:\n  - VALUE=1\n";

#[tokio::test]
async fn a_generated_configmap_is_replaced_and_the_old_one_pruned_and_unchanged_overlays_are_not_rendered_again() {
    let client = cluster::client().await;
    let ns = cluster::namespace(&client, "kustomize-sync").await;
    let repo = GitRepo::new();
    repo.write("base/kustomization.yaml", "resources: [cm.yaml]\n");
    repo.write("base/cm.yaml", &cluster::configmap("base", "one"));
    repo.write("manifests/app/kustomization.yaml", OVERLAY);
    repo.write("manifests/plain.yaml", &cluster::configmap("plain", "one"));
    let first = repo.commit("overlay with a generator");
    let cache = tempfile::tempdir().unwrap();
    let config =
        AgentConfig { render: gitops_tests::render::tools(cache.path()), ..AgentConfig::new(repo.file_url(), &ns) };
    let agent = Agent::start(client.clone(), config).await;
    agent.applied(&first).await;
    let generated = config_maps(&client, &ns, "app-config-").await;
    assert_eq!(generated.len(), 1, "one generated ConfigMap");
    let old_name = generated[0].metadata.name.clone().unwrap();
    assert_eq!(generated[0].data.as_ref().unwrap()["VALUE"], "1");
    assert_eq!(config_maps(&client, &ns, "base").await.len(), 1, "the base's object, through the overlay");
    assert_eq!(agent.render_stats().kustomize_builds, 1);

    // A commit that changes nothing the overlay reads: no build.
    repo.write("manifests/plain.yaml", &cluster::configmap("plain", "two"));
    let second = repo.commit("unrelated change");
    agent.trigger_and_wait(second).await;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    assert_eq!(cluster::value(&api, "plain").await.as_deref(), Some("two"));
    let stats = agent.render_stats();
    assert_eq!((stats.kustomize_builds, stats.cache_hits), (1, 1), "{stats:?}");

    // The generator's input changes: a new name, the old one pruned.
    repo.write("manifests/app/kustomization.yaml", &OVERLAY.replace("VALUE=1", "VALUE=2"));
    let third = repo.commit("new generator value");
    agent.trigger_and_wait(third).await;
    let generated = eventually("the old generated ConfigMap to be pruned", || async {
        let generated = config_maps(&client, &ns, "app-config-").await;
        (generated.len() == 1).then_some(generated)
    })
    .await;
    let new_name = generated[0].metadata.name.clone().unwrap();
    assert_ne!(new_name, old_name, "the hash suffix follows the content");
    assert_eq!(generated[0].data.as_ref().unwrap()["VALUE"], "2");
    assert_eq!(agent.render_stats().kustomize_builds, 2);

    // A bad revision (a remote base next to a new plain object): nothing is applied.
    repo.write(
        "manifests/app/kustomization.yaml",
        &OVERLAY.replace("- ../../base\n", "- ../../base\n- github.com/example/remote//base?ref=v1\n"),
    );
    repo.write("manifests/new.yaml", &cluster::configmap("new", "one"));
    repo.commit("remote base");
    agent.trigger().await;
    let errors = eventually("the render error in /status", || async {
        let status = agent.status().await;
        let errors = status["errors"].as_array().filter(|e| !e.is_empty())?.clone();
        Some(Value::Array(errors))
    })
    .await;
    assert_eq!(errors[0]["file"], "manifests/app/kustomization.yaml", "{errors}");
    assert_eq!(errors[0]["line"], 3, "{errors}");
    assert!(errors[0]["message"].as_str().unwrap().contains("is a remote base"), "{errors}");
    assert_eq!(cluster::value(&api, "new").await, None, "nothing applied");
    assert_eq!(config_maps(&client, &ns, "app-config-").await[0].metadata.name.as_deref(), Some(new_name.as_str()));
    agent.stop().await;
}

#[test]
fn the_repo_template_cluster_overlays_render_as_kubectl_kustomize_and_validate() {
    let cache = tempfile::tempdir().unwrap();
    let template = gitops_tests::render::template_repository(cache.path(), "127.0.0.1:5999");
    let _charts = gitops_tests::render::serve_eks_charts(&template);
    let built = gitops_tests::render::binaries();
    let validate = |dir: &Path| {
        let output = Command::new(gitops_tests::agent::binary())
            .arg("validate")
            .arg(dir)
            .arg("--kustomize-bin")
            .arg(&built.kustomize)
            .arg("--helm-bin")
            .arg(&built.helm)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(output.status.success(), "{stdout}{}", String::from_utf8_lossy(&output.stderr));
        stdout
    };
    for cluster in ["local", "eks"] {
        let path_in_repo = PathBuf::from("clusters").join(cluster);
        let tools = render::Tools { path_in_repo: path_in_repo.clone(), ..gitops_tests::render::tools(cache.path()) };
        let rendered = Renderer::new(tools)
            .render(&template.join(&path_in_repo), "monitoring", &Capabilities::default())
            .unwrap_or_else(|e| panic!("{cluster}: {e:#?}"));
        // The overlay, then the repository's dashboards (linked from the cluster's
        // directory) and the monitoring chart's release, which kustomize knows nothing of.
        let (dashboards, rest): (Vec<_>, Vec<_>) =
            rendered.manifests.iter().partition(|m| m.location.file.starts_with("dashboards"));
        let (chart, overlay): (Vec<_>, Vec<_>) = rest.into_iter().partition(|m| m.location.file.starts_with("charts"));
        assert!(
            chart.iter().any(|m| m.object["kind"] == "Prometheus"),
            "clusters/{cluster}/charts: the monitoring stack"
        );
        let agent: Vec<Value> = overlay.iter().map(|m| m.object.clone()).collect();
        assert_eq!(agent, kubectl_kustomize(&template.join(&path_in_repo)), "clusters/{cluster}");
        assert!(agent.iter().all(|o| o["metadata"]["labels"]["gitops.scale.dev/cluster"] == cluster));
        assert_eq!(dashboards.len(), 2, "clusters/{cluster}/dashboards: the pipeline's and the pods' dashboards");

        // `gitops-agent validate` renders it the same way, offline, with the cluster's job.
        let stdout = validate(&template.join(&path_in_repo));
        let objects = rendered.manifests.len();
        assert!(stdout.ends_with(&format!("{objects} objects, 1 batch jobs, no errors\n")), "{stdout}");
    }
    // So does the repository's root, the layout for any other cluster.
    assert!(validate(&template).ends_with(" 1 batch jobs, no errors\n"), "the midi batch job spec");

    // And refuses what the agent refuses, at the file and line.
    let bad = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(bad.path().join("manifests/app")).unwrap();
    std::fs::write(
        bad.path().join("manifests/app/kustomization.yaml"),
        "resources:\n- git@github.com:example/base.git\n",
    )
    .unwrap();
    let output = Command::new(gitops_tests::agent::binary())
        .arg("validate")
        .arg(bad.path())
        .arg("--kustomize-bin")
        .arg(&built.kustomize)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "manifests/app/kustomization.yaml:2: \"git@github.com:example/base.git\" is a remote base; only paths in the repository are rendered (vendor it into the repository)\n"
    );
}
