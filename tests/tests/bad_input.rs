//! A corpus of broken revisions, each committed on top of a good one and synced
//! against the real API server: each fails with its `file:line` and a clear message,
//! and changes nothing; the next good commit applies again.

use gitops_agent::source::{self, Credentials, GitSource};
use gitops_agent::sync::{Options, Syncer};
use gitops_tests::cluster;
use gitops_tests::git::GitRepo;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::ListParams;

/// What a case commits.
enum File {
    Text(&'static str, String),
    Bytes(&'static str, Vec<u8>),
    Symlink(&'static str, &'static str),
}

struct Case {
    name: &'static str,
    files: Vec<File>,
    /// Every line of the error, each as a prefix (API server messages go on).
    errors: Vec<String>,
}

fn config_map(name: &str) -> String {
    format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\ndata:\n  value: \"1\"\n")
}

fn corpus(ns: &str) -> Vec<Case> {
    let deep = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: deep}}\ndata: {}{}\n",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let line =
        format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: line}}\ndata: {{k: {}}}\n", "x".repeat(10_000_000));
    let huge = format!("# {}\n", "x".repeat(32 * 1024 * 1024));
    vec![
        Case {
            name: "invalid YAML",
            files: vec![File::Text("manifests/bad.yaml", format!("{}---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: b\n   labels: x\n", config_map("ok")))],
            errors: vec!["manifests/bad.yaml:12: invalid YAML: mapping values are not allowed".into()],
        },
        Case {
            name: "wrong types",
            files: vec![File::Text(
                "manifests/bad.yaml",
                "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  replicas: three\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec:\n      containers: [{name: web, image: nginx}]\n".into(),
            )],
            errors: vec![format!("manifests/bad.yaml:6: Deployment.apps {ns}/web: dry-run apply rejected: ")],
        },
        Case {
            name: "unknown kind",
            files: vec![File::Text("manifests/bad.yaml", "apiVersion: example.com/v1\nkind: Frobnicator\nmetadata:\n  name: f\n".into())],
            errors: vec!["manifests/bad.yaml:1: unknown kind Frobnicator in group/version example.com/v1".into()],
        },
        Case {
            name: "duplicate objects",
            files: vec![File::Text("manifests/bad.yaml", format!("{}---\n{}", config_map("twice"), config_map("twice")))],
            errors: vec!["manifests/bad.yaml:8: ConfigMap twice is defined twice: here and at manifests/bad.yaml:1".into()],
        },
        Case {
            name: "a huge file",
            files: vec![File::Text("manifests/huge.yaml", huge.clone())],
            errors: vec![format!("manifests/huge.yaml:1: the file is {} bytes; files over 33554432 bytes (32 MiB) are not read", huge.len())],
        },
        Case {
            name: "deep nesting",
            files: vec![File::Text("manifests/deep.yaml", deep)],
            errors: vec!["manifests/deep.yaml:4: invalid YAML: recursion limit exceeded".into()],
        },
        Case {
            name: "a symlink out of the repository",
            files: vec![File::Symlink("manifests/passwd.yaml", "/etc/passwd")],
            errors: vec!["manifests/passwd.yaml:1: symlink resolves to /etc/passwd, outside the repository".into()],
        },
        Case {
            name: "non-UTF-8",
            files: vec![File::Bytes("manifests/latin1.yaml", b"apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata: {k: caf\xe9}\n".to_vec())],
            errors: vec!["manifests/latin1.yaml:4: not UTF-8 text".into()],
        },
        Case {
            name: "a 10 MB single line",
            files: vec![File::Text("manifests/line.yaml", line)],
            errors: vec!["manifests/line.yaml:1: the object is 10000081 bytes as JSON; the API server stores at most 1572864 (1.5 MiB)".into()],
        },
        Case {
            name: "a dashboard without a title and a job spec of the wrong kind",
            files: vec![
                File::Text("dashboards/d.json", "{\"uid\": \"d\"}".into()),
                File::Text("jobs/j.yaml", config_map("j")),
            ],
            errors: vec![
                "dashboards/d.json:1: missing title".into(),
                "jobs/j.yaml:1: a job spec must be a batch/v1 Job or a sparkoperator.k8s.io/v1beta2 SparkApplication, found v1 ConfigMap".into(),
            ],
        },
    ]
}

#[tokio::test]
async fn each_broken_revision_names_its_file_and_line_and_changes_nothing() {
    let client = cluster::client().await;
    let ns = cluster::namespace(&client, "bad").await;
    let syncer = Syncer::new(
        gitops_agent::write::Writer::sole(client.clone()),
        Options {
            default_namespace: ns.clone(),
            prune: true,
            force_conflicts: true,
            inventory_namespace: ns.clone(),
            dashboards_namespace: ns.clone(),
            access: gitops_agent::access::Access::Cluster,
        },
    );
    let repo = GitRepo::new();
    let work = tempfile::tempdir().unwrap();
    let sync = || async {
        let source = GitSource::new(&repo.file_url(), "main", Credentials::none());
        let (head, tree) = source::fetch_tree(&source, work.path()).unwrap();
        syncer.sync(&tree, &head.to_string()).await
    };
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let live = || async {
        let listed = cms.list(&ListParams::default()).await.unwrap();
        let mut live: Vec<(String, Option<String>)> = listed
            .items
            .into_iter()
            .filter(|cm| cm.metadata.name.as_deref() != Some("kube-root-ca.crt"))
            .map(|cm| (cm.metadata.name.unwrap(), cm.metadata.resource_version))
            .collect();
        live.sort();
        live
    };

    repo.write("manifests/a.yaml", &config_map("a"));
    repo.commit("good");
    sync().await.unwrap();
    let mut good = live().await;
    assert_eq!(good.iter().map(|(name, _)| name.as_str()).collect::<Vec<_>>(), ["a", "gitops-inventory"]);

    let mut tried = 0;
    for case in corpus(&ns) {
        // Removing `a` too: a revision that fails must not prune it either.
        repo.remove("manifests/a.yaml");
        let mut paths = Vec::new();
        for file in &case.files {
            match file {
                File::Text(path, text) => repo.write(path, text),
                File::Bytes(path, bytes) => repo.write_bytes(path, bytes),
                File::Symlink(path, target) => repo.symlink(path, target),
            }
            paths.push(match file {
                File::Text(path, _) | File::Bytes(path, _) | File::Symlink(path, _) => *path,
            });
        }
        repo.commit(case.name);
        let error = sync().await.expect_err(case.name).to_string();
        let lines: Vec<&str> = error.lines().filter(|l| !l.starts_with("the API server rejected")).collect();
        assert_eq!(lines.len(), case.errors.len(), "{}: {error}", case.name);
        for (line, expected) in lines.iter().zip(&case.errors) {
            assert!(line.starts_with(expected.as_str()), "{}:\n  got      {line}\n  expected {expected}", case.name);
        }
        assert_eq!(live().await, good, "{}: nothing changed, nothing pruned ({error})", case.name);

        for path in paths {
            repo.remove(path);
        }
        repo.write("manifests/a.yaml", &config_map("a"));
        repo.commit("good again");
        sync().await.unwrap_or_else(|e| panic!("after {}: {e}", case.name));
        // The inventory records the new good commit.
        good = live().await;
        tried += 1;
    }
    println!("{tried} broken revisions refused, each with its file and line; nothing changed");
}
