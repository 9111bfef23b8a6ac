//! Batch job specs (`jobs/**.{yaml,yml}`): a `batch/v1` Job or a
//! `sparkoperator.k8s.io/v1beta2` SparkApplication, used as the template of its runs.
//! Checked here, with the per-job settings read from its annotations, so `validate`
//! reports a bad spec as `file:line` like any other problem; [`crate::batch`] makes
//! the runs.

use std::fmt;

use sha2::{Digest, Sha256};

use super::{Location, Manifest};

/// How many finished runs to keep (the default is 5, as a CronJob's).
pub const HISTORY_LIMIT_ANNOTATION: &str = "gitops.scale.dev/history-limit";
/// What to do with a changed spec while a run of the old one still goes.
pub const CONCURRENCY_ANNOTATION: &str = "gitops.scale.dev/concurrency-policy";
const DEFAULT_HISTORY_LIMIT: usize = 5;
/// Kinds a spec may be, as (apiVersion, kind).
const KINDS: [(&str, &str); 2] = [("batch/v1", "Job"), ("sparkoperator.k8s.io/v1beta2", "SparkApplication")];
/// A run is named `<job>-<n>`, and a Job's name must fit a 63-character label value
/// (its pods carry it): this leaves room for ten digits of `n`.
const MAX_NAME_CHARS: usize = 52;

#[derive(Debug, thiserror::Error)]
pub enum JobProblem {
    #[error("a job spec must be a batch/v1 Job or a sparkoperator.k8s.io/v1beta2 SparkApplication, found {0}")]
    Kind(String),
    #[error("the job name {0:?} is longer than {MAX_NAME_CHARS} characters, too long for its runs' names")]
    NameTooLong(String),
    #[error("annotation {HISTORY_LIMIT_ANNOTATION} must be a whole number of at least 1, found {0:?}")]
    HistoryLimit(String),
    #[error("annotation {CONCURRENCY_ANNOTATION} must be Allow, Forbid or Replace, found {0:?}")]
    Concurrency(String),
}

/// What to do when a spec changes while a run of it still goes; CronJob's meanings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConcurrencyPolicy {
    /// Start the new run beside the old.
    #[default]
    Allow,
    /// Wait until no run goes, then start a run of the newest spec.
    Forbid,
    /// Delete the running runs, then start.
    Replace,
}

impl fmt::Display for ConcurrencyPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A job spec: the template of its runs, and its settings.
#[derive(Debug, Clone, PartialEq)]
pub struct JobSpec {
    pub template: Manifest,
    /// Finished runs to keep; older ones are deleted. At least 1: the newest run is how
    /// the agent knows the spec already ran.
    pub history_limit: usize,
    pub concurrency: ConcurrencyPolicy,
    /// Hex SHA-256 of the template, settings excluded: a run of a spec with this hash
    /// exists or it is due.
    pub hash: String,
}

impl JobSpec {
    pub(super) fn new(template: Manifest) -> Result<JobSpec, (Location, JobProblem)> {
        let at = template.location.clone();
        let kind = (template.api_version(), template.kind());
        if !KINDS.contains(&kind) {
            return Err((at, JobProblem::Kind(format!("{} {}", kind.0, kind.1))));
        }
        if template.name().len() > MAX_NAME_CHARS {
            return Err((at, JobProblem::NameTooLong(template.name().to_owned())));
        }
        let annotation = |key: &str| template.object["metadata"]["annotations"][key].as_str().map(str::to_owned);
        let history_limit = match annotation(HISTORY_LIMIT_ANNOTATION) {
            None => DEFAULT_HISTORY_LIMIT,
            Some(limit) => match limit.parse::<usize>() {
                Ok(n) if n >= 1 => n,
                _ => return Err((at, JobProblem::HistoryLimit(limit))),
            },
        };
        let concurrency = match annotation(CONCURRENCY_ANNOTATION).as_deref() {
            None | Some("Allow") => ConcurrencyPolicy::Allow,
            Some("Forbid") => ConcurrencyPolicy::Forbid,
            Some("Replace") => ConcurrencyPolicy::Replace,
            Some(other) => return Err((at, JobProblem::Concurrency(other.to_owned()))),
        };
        let hash = hash(&template);
        Ok(JobSpec { template, history_limit, concurrency, hash })
    }

    /// The job's name: its runs are `<name>-<n>`.
    pub fn name(&self) -> &str {
        self.template.name()
    }
}

/// The template's hash, without the settings (changing how many runs to keep is not a
/// reason to run again). serde_json's maps are sorted, so equal objects hash equally
/// however their files order keys.
fn hash(template: &Manifest) -> String {
    let mut object = template.object.clone();
    if let Some(annotations) = object.pointer_mut("/metadata/annotations").and_then(|a| a.as_object_mut()) {
        annotations.remove(HISTORY_LIMIT_ANNOTATION);
        annotations.remove(CONCURRENCY_ANNOTATION);
        if annotations.is_empty() {
            object["metadata"].as_object_mut().expect("metadata is a mapping").remove("annotations");
        }
    }
    hex::encode(Sha256::digest(object.to_string()))
}
