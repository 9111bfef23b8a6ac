//! `gitops-agent`: the command line is not wired up yet; the library does the work.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!("usage: gitops-agent <run|validate|diff> [OPTIONS]");
    ExitCode::from(2)
}
