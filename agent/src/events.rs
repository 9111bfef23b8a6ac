//! Kubernetes Events for what the agent does, where `kubectl get events` shows them: each revision applied and each sync that failed on the status
//! ConfigMap, and on the objects themselves what a sync created, configured or pruned,
//! each drift corrected and each batch run started.
//!
//! Events are for people and must never slow or fail a sync: hooks queue them and a
//! task of their own sends them through the [`Writer`] (so a replica that does not lead,
//! or a suspended agent, emits none). As client-go's recorder does, a full queue drops
//! events (it holds [`QUEUE`] of them), repeats become a series
//! ([`kube::runtime::events::Recorder`]) and each object gets at most a burst of
//! [`BURST`] events, then one every [`REFILL`].

use std::hash::{Hash, Hasher};
use std::num::NonZeroU32;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType};
use tokio::sync::mpsc;

use crate::apply::{Action, Change, ChangeSet};
use crate::report::STATUS_NAME;
use crate::write::{WriteError, Writer};

/// client-go's `maxQueuedEvents`.
pub const QUEUE: usize = 1000;
/// client-go's spam filter: 25 events an object at once, then one each 5 minutes.
pub const BURST: NonZeroU32 = NonZeroU32::new(25).unwrap();
pub const REFILL: Duration = Duration::from_secs(300);
/// The API server refuses an event whose note is longer (events.k8s.io/v1).
const NOTE_BYTES: usize = 1024;
/// Objects whose events are counted; past this, those quiet for a while are forgotten.
const KEYS: usize = 4096;

/// Queues events; cheap to clone. [`Events::disabled`] drops them all.
#[derive(Clone, Debug)]
pub struct Events {
    queue: Option<mpsc::Sender<Queued>>,
    /// The agent's namespace, home of the status ConfigMap.
    namespace: String,
}

struct Queued {
    event: Event,
    regarding: ObjectReference,
}

impl Events {
    /// Starts the task that sends the events; it ends when every clone is dropped.
    pub fn start(writer: Writer, namespace: &str) -> Events {
        let (queue, queued) = mpsc::channel(QUEUE);
        tokio::spawn(send(writer, queued));
        Events { queue: Some(queue), namespace: namespace.to_owned() }
    }

    /// Emits nothing.
    pub fn disabled() -> Events {
        Events { queue: None, namespace: String::new() }
    }

    /// A sync applied `revision`: on the status ConfigMap, and on each object it
    /// created, configured or pruned.
    pub fn synced(&self, revision: &str, changes: &ChangeSet) {
        let short = short(revision);
        self.status_event(EventType::Normal, "Synced", "Sync", format!("applied revision {revision}: {changes}"));
        for change in &changes.changes {
            let (reason, note) = match change.action {
                Action::Unchanged => continue,
                Action::Created => ("Created", format!("created from {} at revision {short}", change.origin)),
                Action::Configured => ("Configured", format!("configured from {} at revision {short}", change.origin)),
                Action::Deleted => ("Pruned", format!("pruned: not in revision {short}")),
            };
            self.emit(EventType::Normal, reason, "Sync", note, reference(change));
        }
    }

    /// A reconcile failed; `revision`: the commit tried, if known. `message` names each
    /// problem at its `file:line`.
    pub fn sync_failed(&self, revision: Option<&str>, message: &str) {
        let note = match revision {
            Some(revision) => format!("revision {revision} not applied: {message}"),
            None => format!("nothing applied: {message}"),
        };
        self.status_event(EventType::Warning, "SyncFailed", "Sync", note);
    }

    /// The drift watch put `object` back as git has it.
    pub fn drift_corrected(&self, object: ObjectReference, origin: &str, fields: &[String]) {
        let note = match fields {
            [] => format!("re-created from {origin}"),
            fields => format!("corrected {} back to {origin}", fields.join(", ")),
        };
        self.emit(EventType::Normal, "DriftCorrected", "CorrectDrift", note, object);
    }

    /// A batch run of `job` started for `revision`.
    pub fn run_started(&self, run: ObjectReference, job: &str, revision: &str) {
        let note =
            format!("started run {} of job {job} for revision {}", run.name.as_deref().unwrap_or(""), short(revision));
        self.emit(EventType::Normal, "RunStarted", "StartRun", note, run);
    }

    fn status_event(&self, type_: EventType, reason: &str, action: &str, note: String) {
        let status = ObjectReference {
            api_version: Some("v1".to_owned()),
            kind: Some("ConfigMap".to_owned()),
            namespace: Some(self.namespace.clone()),
            name: Some(STATUS_NAME.to_owned()),
            ..ObjectReference::default()
        };
        self.emit(type_, reason, action, note, status);
    }

    fn emit(&self, type_: EventType, reason: &str, action: &str, note: String, regarding: ObjectReference) {
        let Some(queue) = &self.queue else { return };
        // One line, as `kubectl get events` prints a table.
        let note = truncated(note.replace('\n', "; "));
        // kube's recorder makes a series of events alike but for the note, keeping the
        // first note; client-go's tells them apart by the note. The action carries a
        // digest of it, so an event says what happened this time.
        let mut digest = std::collections::hash_map::DefaultHasher::new();
        note.hash(&mut digest);
        let action = format!("{action}-{:08x}", digest.finish() as u32);
        let event = Event { type_, reason: reason.to_owned(), note: Some(note), action, secondary: None };
        if queue.try_send(Queued { event, regarding }).is_err() {
            tracing::debug!(reason, "event dropped: the queue is full");
        }
    }
}

/// Sends queued events while the writer may write.
async fn send(writer: Writer, mut queued: mpsc::Receiver<Queued>) {
    let limit = SpamFilter::default();
    while let Some(Queued { event, regarding }) = queued.recv().await {
        if !limit.allows(&regarding) {
            tracing::debug!(reason = event.reason, object = ?regarding.name, "event dropped: too many for this object");
            continue;
        }
        match writer.publish(&event, &regarding).await {
            Ok(()) => {}
            Err(WriteError::NotLeader | WriteError::Suspended) => {}
            Err(e) => {
                tracing::warn!(reason = event.reason, object = ?regarding.name, error = %e, "emitting an event failed")
            }
        }
    }
}

/// An object's kind, namespace and name.
type ObjectKey = (Option<String>, Option<String>, Option<String>);

/// Per object, as client-go's `EventSourceObjectSpamFilter`: a burst of [`BURST`], then
/// one each [`REFILL`].
struct SpamFilter {
    limiter: governor::DefaultKeyedRateLimiter<ObjectKey>,
}

impl Default for SpamFilter {
    fn default() -> SpamFilter {
        let quota = governor::Quota::with_period(REFILL).expect("REFILL is not zero").allow_burst(BURST);
        SpamFilter { limiter: governor::RateLimiter::keyed(quota) }
    }
}

impl SpamFilter {
    fn allows(&self, regarding: &ObjectReference) -> bool {
        if self.limiter.len() >= KEYS {
            // The objects quiet for long enough to have their whole burst again.
            self.limiter.retain_recent();
        }
        let key = (regarding.kind.clone(), regarding.namespace.clone(), regarding.name.clone());
        self.limiter.check_key(&key).is_ok()
    }
}

/// An object of a sync, as an event names it.
fn reference(change: &Change) -> ObjectReference {
    let id = &change.id;
    ObjectReference {
        kind: Some(id.kind.clone()),
        namespace: Some(id.namespace.clone()).filter(|n| !n.is_empty()),
        name: Some(id.name.clone()),
        uid: change.uid.clone(),
        ..ObjectReference::default()
    }
}

/// A commit as people quote it.
fn short(revision: &str) -> &str {
    revision.get(..12).unwrap_or(revision)
}

fn truncated(mut note: String) -> String {
    if note.len() > NOTE_BYTES {
        let mut end = NOTE_BYTES - "…".len();
        while !note.is_char_boundary(end) {
            end -= 1;
        }
        note.truncate(end);
        note.push('…');
    }
    note
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(name: &str) -> ObjectReference {
        ObjectReference { kind: Some("ConfigMap".into()), name: Some(name.into()), ..ObjectReference::default() }
    }

    #[test]
    fn an_object_gets_a_burst_of_events_then_no_more_for_a_while() {
        let filter = SpamFilter::default();
        let allowed = (0..40).filter(|_| filter.allows(&object("a"))).count();
        assert_eq!(allowed, BURST.get() as usize);
        assert!(filter.allows(&object("b")), "another object has its own burst");
        assert!(!filter.allows(&object("a")));
    }

    #[test]
    fn a_long_note_is_cut_to_what_the_api_server_takes() {
        let note = truncated("é".repeat(1000));
        assert!(note.len() <= NOTE_BYTES && note.ends_with('…'), "{} bytes", note.len());
        assert_eq!(truncated("short".into()), "short");
    }
}
