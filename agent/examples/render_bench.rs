//! One measured render, in a process of its own so that its peak RSS is the render's
//! alone: `render_bench CASE DIR KUSTOMIZE HELM`, where CASE ends in `cold` (one render,
//! chart downloads included) or `warm` (the same render again, from the render cache).
//! Prints `seconds peak_rss_kib tools_peak_rss_kib objects`. Driven by
//! `tests/src/bin/render-bench.rs`, which also times the tools alone.

use std::path::Path;
use std::time::Instant;

use gitops_agent::render::{Capabilities, Renderer, Tools};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, case, dir, kustomize, helm] = args.as_slice() else {
        panic!("usage: render_bench CASE DIR KUSTOMIZE HELM");
    };
    let cache = tempfile::tempdir().unwrap();
    let tools = Tools {
        kustomize: kustomize.into(),
        helm: helm.into(),
        chart_cache: cache.path().to_owned(),
        ..Tools::default()
    };
    let renderer = Renderer::new(tools);
    let render = || {
        let started = Instant::now();
        let rendered = renderer
            .render(Path::new(dir), "monitoring", &Capabilities::default())
            .unwrap_or_else(|e| panic!("{e:#?}"));
        (started.elapsed(), rendered.manifests.len())
    };
    let (mut elapsed, objects) = render();
    if case.ends_with("warm") {
        elapsed = render().0;
        assert!(renderer.stats().cache_hits > 0, "the second render came from the cache");
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let hwm = status.lines().find_map(|l| l.strip_prefix("VmHWM:")).unwrap().trim().trim_end_matches(" kB").to_owned();
    // SAFETY: getrusage only writes the struct it is given.
    let mut usage = unsafe { std::mem::zeroed::<libc::rusage>() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    println!("{:.3} {hwm} {} {objects}", elapsed.as_secs_f64(), usage.ru_maxrss);
}
