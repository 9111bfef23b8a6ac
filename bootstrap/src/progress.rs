//! Progress for long waits: a spinner with the elapsed time and the current step on a
//! terminal (indicatif draws nothing when stderr is not one), and one plain line per
//! finished step on stdout, which logs and tests read.

use std::future::Future;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

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
