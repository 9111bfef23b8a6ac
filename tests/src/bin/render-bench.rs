//! `render-bench`: the agent's render of kube-prometheus-stack 88.5.3 (cold: download
//! and render; warm: cache hit) and of a 1,000-object overlay, against `helm pull` +
//! `helm template` and `kustomize build` of the same inputs, in the same run.
//!
//! ```sh
//! cargo run --release -p gitops-tests --bin render-bench
//! ```
//!
//! Each agent case runs in a process of its own, the release build of
//! `agent/examples/render_bench.rs` (built here first), so its peak RSS is the render's
//! alone; the tools run under `/usr/bin/time`. Renders use no cluster capabilities
//! (helm's defaults), like `gitops-agent validate`.

use gitops_tests::render::{ChartRepo, binaries};
use std::fs;
use std::path::Path;
use std::process::Command;

const OBJECTS: usize = 1000;

fn main() {
    let status = Command::new(env!("CARGO"))
        .args(["build", "-q", "--release", "-p", "gitops-agent", "--example", "render_bench"])
        .status()
        .unwrap();
    assert!(status.success(), "building the render_bench example");
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/examples/render_bench");
    let built = binaries();
    let work = tempfile::tempdir().unwrap();
    let charts = ChartRepo::serve();
    let archive = charts.kube_prometheus_stack("88.5.3");
    let kps = work.path().join("kps");
    fs::create_dir_all(kps.join("charts")).unwrap();
    fs::write(
        kps.join("charts/monitoring.yaml"),
        format!(
            "apiVersion: gitops.scale.dev/v1\nkind: HelmChart\nmetadata:\n  name: monitoring\n  namespace: monitoring\nspec:\n  repo: {}\n  chart: kube-prometheus-stack\n  version: 88.5.3\n",
            charts.url()
        ),
    )
    .unwrap();
    let overlay = work.path().join("overlay");
    write_overlay(&overlay);

    let mut rows = Vec::new();
    for case in ["kps-cold", "kps-warm", "overlay-cold", "overlay-warm"] {
        let dir = if case.starts_with("kps") { &kps } else { &overlay };
        let output = Command::new(&example).arg(case).arg(dir).arg(&built.kustomize).arg(&built.helm).output().unwrap();
        assert!(output.status.success(), "{case}: {}", String::from_utf8_lossy(&output.stderr));
        let figures = String::from_utf8(output.stdout).unwrap();
        let figures: Vec<&str> = figures.split_whitespace().collect();
        if case.starts_with("overlay") {
            assert_eq!(figures[3], OBJECTS.to_string(), "the overlay renders {OBJECTS} objects");
        }
        rows.push((format!("agent, {case} ({} objects)", figures[3]), figures[..3].join(" ")));
    }

    let home = tempfile::tempdir().unwrap();
    let pulled = tempfile::tempdir().unwrap();
    let helm = built.helm.to_str().unwrap();
    let pull = timed(
        &[
            helm,
            "pull",
            "kube-prometheus-stack",
            "--repo",
            &charts.url(),
            "--version",
            "88.5.3",
            "--destination",
            pulled.path().to_str().unwrap(),
        ],
        home.path(),
    );
    let template = timed(
        &[
            helm,
            "template",
            "monitoring",
            archive.to_str().unwrap(),
            "--namespace",
            "monitoring",
            "--include-crds",
            "--skip-tests",
        ],
        home.path(),
    );
    let kustomize = timed(
        &[built.kustomize.to_str().unwrap(), "build", overlay.join("manifests/app").to_str().unwrap()],
        home.path(),
    );
    rows.push(("helm pull".into(), pull));
    rows.push(("helm template".into(), template));
    rows.push(("kustomize build".into(), kustomize));
    println!("| case | seconds | peak RSS (KiB) | tool's peak RSS (KiB) |\n|---|---|---|---|");
    for (case, figures) in rows {
        let cells: Vec<&str> = figures.split_whitespace().collect();
        println!("| {case} | {} |", cells.join(" | "));
    }
}

/// `seconds peak_rss_kib -` of one tool run.
fn timed(args: &[&str], home: &Path) -> String {
    let output =
        gitops_tests::render::isolated("/usr/bin/time", home).args(["-f", "%e %M"]).args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{args:?}: {stderr}");
    format!("{} -", stderr.lines().last().unwrap())
}

/// A base of 1,000 objects (Deployments, Services and ConfigMaps in 10 files) and an
/// overlay with a namespace, a name prefix, labels, an image and a strategic patch.
fn write_overlay(root: &Path) {
    let base = root.join("base");
    fs::create_dir_all(&base).unwrap();
    let mut files = Vec::new();
    for file in 0..10 {
        let mut text = String::new();
        for i in 0..OBJECTS / 10 {
            let n = file * 100 + i;
            text += &match n % 3 {
                0 => format!(
                    "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: app-{n}\nspec:\n  selector:\n    matchLabels: {{app: app-{n}}}\n  template:\n    metadata:\n      labels: {{app: app-{n}}}\n    spec:\n      containers:\n      - name: app\n        image: nginx:1.25\n---\n"
                ),
                1 => format!(
                    "apiVersion: v1\nkind: Service\nmetadata:\n  name: app-{n}\nspec:\n  selector: {{app: app-{n}}}\n  ports:\n  - port: 80\n---\n"
                ),
                _ => format!(
                    "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: app-{n}\ndata:\n  index: \"{n}\"\n---\n"
                ),
            };
        }
        fs::write(base.join(format!("objects-{file}.yaml")), text).unwrap();
        files.push(format!("- objects-{file}.yaml"));
    }
    fs::write(base.join("kustomization.yaml"), format!("resources:\n{}\n", files.join("\n"))).unwrap();
    let app = root.join("manifests/app");
    fs::create_dir_all(&app).unwrap();
    fs::write(
        app.join("kustomization.yaml"),
        "resources:\n- ../../base\nnamespace: bench\nnamePrefix: prod-\nlabels:\n- pairs: {team: bench}\nimages:\n- name: nginx\n  newTag: \"1.27\"\npatches:\n- target: {kind: Deployment}\n  patch: |-\n    apiVersion: apps/v1\n    kind: Deployment\n    metadata: {name: any}\n    spec:\n      replicas: 2\n",
    )
    .unwrap();
}
