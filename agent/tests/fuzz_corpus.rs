//! The fuzz corpus (`agent/fuzz/corpus/render`, inputs `agent/fuzz/run.sh` found to reach
//! new code in the renderer) replayed on every test run, without nightly or libFuzzer:
//! each input renders to objects or to errors that name the file, and never panics.

use std::path::Path;

#[test]
fn every_fuzz_corpus_input_renders_or_names_its_file() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/render");
    let file = Path::new("manifests/fuzz.yaml");
    let mut replayed = 0;
    for entry in std::fs::read_dir(&corpus).unwrap() {
        let path = entry.unwrap().path();
        let Ok(text) = String::from_utf8(std::fs::read(&path).unwrap()) else { continue };
        if let Err(errors) = gitops_agent::render::render_text(file, &text) {
            for error in errors {
                let shown = error.to_string();
                assert!(
                    shown.starts_with("manifests/fuzz.yaml"),
                    "{}: error without its file: {shown}",
                    path.display()
                );
            }
        }
        replayed += 1;
    }
    assert!(replayed > 1000, "the corpus is checked in ({replayed} UTF-8 inputs found)");
}
