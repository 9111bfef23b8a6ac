//! Progress: one plain line per finished step on stdout, which logs and tests read, and
//! for long waits a spinner with the elapsed time and the current state on a terminal
//! (indicatif draws nothing when stderr is not one).

use std::future::Future;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// What became of one resource in `up`, `--dry-run` or `down`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Report {
    Found,
    Created,
    WouldCreate,
    Deleted,
    /// `down` found nothing to delete.
    Absent,
    /// `down` found it under our name but not tagged as ours.
    NotOurs,
}

/// Prints a resource's step: `  found    VPC vpc-0abc`, `  would create VPC 10.0.0.0/16`.
/// `detail` is the id, or (would create) what it would be made with.
pub fn report(report: Report, what: &str, detail: &str) {
    let line = match report {
        Report::Found => format!("found    {what} {detail}"),
        Report::Created => format!("created  {what} {detail}"),
        Report::WouldCreate => format!("would create {what} {detail}"),
        Report::Deleted => format!("deleted {what} {detail}"),
        Report::Absent => format!("no {what}"),
        Report::NotOurs => format!("{what} is not tagged as this cluster's: left alone"),
    };
    println!("  {}", line.trim_end());
}

/// What a probe of a wait found.
pub enum Poll<T> {
    Done(T),
    /// Not yet; the text says where it stands (shown beside the spinner).
    Pending(String),
}

/// A wait that ran out of time: what was awaited, for how long, the last state seen,
/// and the command that picks up from there.
#[derive(Debug, thiserror::Error)]
#[error("timed out after {waited:?} waiting for {what} (last seen: {last}); run `{resume}` to resume")]
pub struct Timeout {
    pub what: String,
    pub waited: Duration,
    pub last: String,
    pub resume: String,
}

/// A spinner for one step, `[00:03:12] step: state`.
pub fn spinner(step: &str) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {prefix}: {msg}").expect("static template"),
    );
    bar.set_prefix(step.to_owned());
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

/// Polls `probe` every `every` until it is done, showing a spinner; an error from the
/// probe ends the wait at once. `resume` is the command a timeout tells the user to run.
pub async fn wait<T, E, F, Fut>(
    what: &str,
    timeout: Duration,
    every: Duration,
    resume: &str,
    mut probe: F,
) -> Result<Result<T, Timeout>, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Poll<T>, E>>,
{
    let bar = spinner(what);
    let started = Instant::now();
    loop {
        match probe().await {
            Ok(Poll::Done(value)) => {
                bar.finish_and_clear();
                println!("  {what}: done after {}", elapsed(started.elapsed()));
                return Ok(Ok(value));
            }
            Ok(Poll::Pending(state)) => {
                if started.elapsed() >= timeout {
                    bar.abandon_with_message(format!("gave up: {state}"));
                    return Ok(Err(Timeout {
                        what: what.to_owned(),
                        waited: timeout,
                        last: state,
                        resume: resume.to_owned(),
                    }));
                }
                bar.set_message(state);
            }
            Err(e) => {
                bar.abandon();
                return Err(e);
            }
        }
        tokio::time::sleep(every).await;
    }
}

/// `2m05s`, `7s`.
pub fn elapsed(duration: Duration) -> String {
    let seconds = duration.as_secs();
    if seconds >= 60 { format!("{}m{:02}s", seconds / 60, seconds % 60) } else { format!("{seconds}s") }
}
