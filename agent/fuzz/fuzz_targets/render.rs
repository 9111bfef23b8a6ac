//! Any bytes as a file of `manifests/`: rendering must answer with objects or errors,
//! never panic, hang or grow without bound (`run.sh` sets the time and memory limits).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Non-UTF-8 is refused before decoding; the decoder is what is worth fuzzing.
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = gitops_agent::render::render_text(Path::new("manifests/fuzz.yaml"), text);
    }
});
