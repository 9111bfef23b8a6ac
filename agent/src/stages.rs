//! How long each stage of one sync took: what `gitops_sync_stage_seconds{stage}` and
//! the `synced` log line show, so a slow commit says where its time went (the fixed
//! costs that grow with the repository, or the requests that grow with the change).

use std::fmt;
use std::time::{Duration, Instant};

/// One stage of a sync, in the order a sync runs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Stage {
    /// Asking the remote for its head and bringing the commit into the mirror.
    Fetch,
    /// Writing the commit's files where the render reads them.
    Checkout,
    /// The files → objects (kustomize and helm included).
    Render,
    /// Discovery, and ordering the objects into stages.
    Plan,
    /// The dry runs of the objects no watch vouches for (and the lists they read).
    DryRun,
    /// The writes of the objects that differ, and waiting for new CRDs.
    Apply,
    /// Deleting what the revision no longer holds.
    Prune,
    /// Reading the inventory, and writing it (pending, then the revision's objects).
    Inventory,
    /// Recording the outcome: metrics, `/status`, the status ConfigMap.
    Status,
}

impl Stage {
    pub const ALL: [Stage; 9] = [
        Stage::Fetch,
        Stage::Checkout,
        Stage::Render,
        Stage::Plan,
        Stage::DryRun,
        Stage::Apply,
        Stage::Prune,
        Stage::Inventory,
        Stage::Status,
    ];

    /// The `stage` label value.
    pub fn label(self) -> &'static str {
        match self {
            Stage::Fetch => "fetch",
            Stage::Checkout => "checkout",
            Stage::Render => "render",
            Stage::Plan => "plan",
            Stage::DryRun => "dry_run",
            Stage::Apply => "apply",
            Stage::Prune => "prune",
            Stage::Inventory => "inventory",
            Stage::Status => "status",
        }
    }
}

/// Time spent in each stage; a stage entered several times (one dry run per apply
/// stage) adds up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StageTimes {
    spent: [Duration; Stage::ALL.len()],
}

impl StageTimes {
    /// Adds the time since `started` to `stage`.
    pub fn since(&mut self, stage: Stage, started: Instant) {
        self.add(stage, started.elapsed());
    }

    pub fn add(&mut self, stage: Stage, spent: Duration) {
        self.spent[stage as usize] += spent;
    }

    pub fn get(&self, stage: Stage) -> Duration {
        self.spent[stage as usize]
    }

    /// Adds every stage of `other`.
    pub fn extend(&mut self, other: &StageTimes) {
        for stage in Stage::ALL {
            self.add(stage, other.get(stage));
        }
    }
}

impl fmt::Display for StageTimes {
    /// `fetch 12 ms, checkout 30 ms, …`, every stage, in order.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> =
            Stage::ALL.iter().map(|&s| format!("{} {} ms", s.label(), self.get(s).as_millis())).collect();
        f.write_str(&parts.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_add_up_and_print_in_order() {
        let mut times = StageTimes::default();
        times.add(Stage::DryRun, Duration::from_millis(5));
        times.add(Stage::DryRun, Duration::from_millis(7));
        times.add(Stage::Fetch, Duration::from_millis(3));
        assert_eq!(times.get(Stage::DryRun), Duration::from_millis(12));
        let text = times.to_string();
        assert!(text.starts_with("fetch 3 ms, checkout 0 ms, render 0 ms, plan 0 ms, dry_run 12 ms"), "{text}");
    }
}
