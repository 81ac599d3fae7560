//! One shared document in memory: its text, revision, recent operations and who is here.
//!
//! Edits are applied in the order they reach the server. Each one names the revision it was
//! made on; it is transformed past every operation applied since, then applied, and becomes the
//! next revision. Every change (an edit, a viewer joining or leaving) bumps a [`watch`] counter, so
//! the connections of all transports wake at once and send what their client has not seen.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::watch;

use crate::ot::{OtError, TextOperation};

/// Operations kept for transforming late edits and for catching up reconnecting clients.
pub const HISTORY: usize = 1000;
/// The largest document, in characters.
pub const MAX_CHARS: usize = 200_000;
/// A long-poll client counts as a viewer this long after its last poll began or ended.
pub const POLL_PRESENCE: Duration = Duration::from_secs(30);

/// A shared text document.
#[derive(Debug)]
pub struct Document {
    state: Mutex<State>,
    changes: watch::Sender<u64>,
}

#[derive(Debug, Default)]
struct State {
    text: String,
    rev: u64,
    /// The last operations, oldest first; the last one made revision `rev`.
    history: VecDeque<Applied>,
    presence: HashMap<String, Presence>,
}

#[derive(Debug)]
struct Applied {
    rev: u64,
    client: String,
    seq: u64,
    op: TextOperation,
}

#[derive(Debug, Default)]
struct Presence {
    streams: usize,
    poll_until: Option<Instant>,
}

impl Presence {
    fn here(&self, now: Instant) -> bool {
        self.streams > 0 || self.poll_until.is_some_and(|t| t > now)
    }
}

/// Why an edit was refused; the client then starts over from a fresh copy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// The edit names a revision this server has not reached (e.g. made on another server).
    #[error("revision {0} is newer than this server's copy")]
    UnknownRevision(u64),
    /// The edit is older than the history kept.
    #[error("revision {0} is too old to merge")]
    TooOld(u64),
    /// The edit does not fit the text.
    #[error("{0}")]
    Invalid(#[from] OtError),
    /// A seed came after the document was started here.
    #[error("the document already has edits on this server")]
    AlreadyStarted,
    /// The result would exceed [`MAX_CHARS`].
    #[error("the document would exceed {MAX_CHARS} characters")]
    TooLarge,
}

/// Where one connection is: the revision and viewer count its client has been sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    rev: u64,
    viewers: usize,
}

impl Cursor {
    /// A client that has revision `rev` and shows `viewers` viewers.
    pub fn new(rev: u64, viewers: usize) -> Self {
        Cursor { rev, viewers }
    }
}

impl Default for Document {
    fn default() -> Self {
        Self::new()
    }
}

impl Document {
    /// An empty document at revision 0.
    pub fn new() -> Self {
        Document {
            state: Mutex::new(State::default()),
            changes: watch::channel(0).0,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere cannot leave the state half-written: every update is one assignment.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Wakes on every change after it is created (or last marked seen).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The current text and revision.
    pub fn snapshot(&self) -> (String, u64) {
        let state = self.lock();
        (state.text.clone(), state.rev)
    }

    /// How many clients are here now, over every transport.
    pub fn viewers(&self) -> usize {
        let now = Instant::now();
        self.lock()
            .presence
            .values()
            .filter(|p| p.here(now))
            .count()
    }

    /// Applies an edit made on revision `base` and returns the revision it became. A repeated
    /// `(client, seq)` still in the history is not applied twice: its revision is returned.
    pub fn submit(
        &self,
        client: &str,
        seq: u64,
        base: u64,
        op: TextOperation,
    ) -> Result<u64, SubmitError> {
        self.apply(client, seq, base, op, false)
    }

    /// Applies `op` (on the empty text) only if nothing has been applied here yet. A client
    /// whose document moved to this server (its old one was drained or failed) carries its
    /// text over this way; if another client did so first, this one takes that copy instead.
    pub fn submit_seed(
        &self,
        client: &str,
        seq: u64,
        op: TextOperation,
    ) -> Result<u64, SubmitError> {
        self.apply(client, seq, 0, op, true)
    }

    fn apply(
        &self,
        client: &str,
        seq: u64,
        base: u64,
        op: TextOperation,
        seed: bool,
    ) -> Result<u64, SubmitError> {
        let mut state = self.lock();
        if base > state.rev {
            return Err(SubmitError::UnknownRevision(base));
        }
        if let Some(done) = state
            .history
            .iter()
            .find(|a| a.client == client && a.seq == seq)
        {
            return Ok(done.rev);
        }
        if seed && state.rev != 0 {
            return Err(SubmitError::AlreadyStarted);
        }
        let oldest_base = state.rev - state.history.len() as u64;
        if base < oldest_base {
            return Err(SubmitError::TooOld(base));
        }
        let skip = usize::try_from(base - oldest_base).unwrap_or(usize::MAX);
        let mut op = op;
        for applied in state.history.iter().skip(skip) {
            op = TextOperation::transform(&op, &applied.op)?.0;
        }
        if op.target_len() > MAX_CHARS {
            return Err(SubmitError::TooLarge);
        }
        let text = op.apply(&state.text)?;
        state.text = text;
        state.rev += 1;
        let rev = state.rev;
        state.history.push_back(Applied {
            rev,
            client: client.to_owned(),
            seq,
            op,
        });
        if state.history.len() > HISTORY {
            state.history.pop_front();
        }
        drop(state);
        self.changed();
        Ok(rev)
    }

    /// The first message of a connection and the cursor after it. With `since` (a revision of
    /// this server the client already has) it carries the operations the client missed;
    /// otherwise, or if they are no longer kept, the whole text.
    pub fn hello(&self, server: &str, since: Option<u64>) -> (Value, Cursor) {
        let viewers = self.viewers();
        let state = self.lock();
        let missed = since.and_then(|rev| ops_since(&state, rev));
        let mut hello = json!({
            "type": "hello",
            "server": server,
            "rev": state.rev,
            "viewers": viewers,
        });
        match missed {
            Some(ops) => hello["missed"] = Value::Array(ops),
            None => hello["text"] = Value::from(state.text.as_str()),
        }
        let cursor = Cursor {
            rev: state.rev,
            viewers,
        };
        (hello, cursor)
    }

    /// What the client behind `cursor` has not been sent yet (operations in order, then the
    /// viewer count if it changed), and moves the cursor past it. If the operations are no
    /// longer kept the answer is a fresh `hello` with the whole text.
    pub fn pending(&self, server: &str, cursor: &mut Cursor) -> Vec<Value> {
        let viewers = self.viewers();
        let mut messages = {
            let state = self.lock();
            match ops_since(&state, cursor.rev) {
                Some(ops) => {
                    cursor.rev = state.rev;
                    ops
                }
                None => {
                    drop(state);
                    let (hello, fresh) = self.hello(server, None);
                    *cursor = fresh;
                    return vec![hello];
                }
            }
        };
        if viewers != cursor.viewers {
            cursor.viewers = viewers;
            messages.push(json!({"type": "viewers", "count": viewers}));
        }
        messages
    }

    /// Counts `client` as here while the returned guard lives (a WebSocket or SSE stream).
    pub fn join(self: &Arc<Self>, client: &str) -> Joined {
        self.lock()
            .presence
            .entry(client.to_owned())
            .or_default()
            .streams += 1;
        self.changed();
        Joined {
            document: Arc::clone(self),
            client: client.to_owned(),
        }
    }

    /// Counts a long-polling `client` as here for [`POLL_PRESENCE`] from `now`.
    pub fn touch_poll(&self, client: &str, now: Instant) {
        let was_here = {
            let mut state = self.lock();
            let presence = state.presence.entry(client.to_owned()).or_default();
            let was_here = presence.here(now);
            presence.poll_until = Some(now + POLL_PRESENCE);
            was_here
        };
        if !was_here {
            self.changed();
        }
    }

    /// Forgets long-poll clients not seen for [`POLL_PRESENCE`]; tells viewers if any left.
    pub fn expire(&self, now: Instant) {
        let before = {
            let mut state = self.lock();
            let before = state.presence.len();
            state.presence.retain(|_, p| p.here(now));
            before - state.presence.len()
        };
        if before > 0 {
            self.changed();
        }
    }
}

fn ops_since(state: &State, rev: u64) -> Option<Vec<Value>> {
    let oldest_base = state.rev - state.history.len() as u64;
    if rev > state.rev || rev < oldest_base {
        return None;
    }
    let skip = usize::try_from(rev - oldest_base).ok()?;
    let ops = state.history.iter().skip(skip).map(|a| {
        json!({
            "type": "op",
            "rev": a.rev,
            "op": a.op.to_json(),
            "client": a.client,
            "seq": a.seq,
        })
    });
    Some(ops.collect())
}

/// A client counted as here; dropping it un-counts the client (and tells the others).
#[derive(Debug)]
pub struct Joined {
    document: Arc<Document>,
    client: String,
}

impl Drop for Joined {
    fn drop(&mut self) {
        let now = Instant::now();
        {
            let mut state = self.document.lock();
            if let Some(p) = state.presence.get_mut(&self.client) {
                p.streams = p.streams.saturating_sub(1);
                if !p.here(now) {
                    state.presence.remove(&self.client);
                }
            }
        }
        self.document.changed();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(wire: Value) -> TextOperation {
        TextOperation::from_json(&wire).expect("valid op")
    }

    #[test]
    fn two_edits_on_one_revision_are_both_kept_in_server_order() {
        let doc = Document::new();
        assert_eq!(doc.submit("a", 1, 0, op(json!(["hello"]))), Ok(1));
        assert_eq!(doc.submit("b", 1, 1, op(json!([5, " world"]))), Ok(2));
        assert_eq!(doc.submit("c", 1, 1, op(json!([5, "!"]))), Ok(3));
        assert_eq!(doc.snapshot(), ("hello! world".to_owned(), 3));
    }

    #[test]
    fn an_insert_survives_a_concurrent_delete_around_it() {
        let doc = Document::new();
        doc.submit("a", 1, 0, op(json!(["abcdef"]))).expect("seed");
        doc.submit("a", 2, 1, op(json!([1, -4, 1])))
            .expect("delete bcde");
        doc.submit("b", 1, 1, op(json!([3, "XY", 3])))
            .expect("insert in the middle");
        assert_eq!(doc.snapshot().0, "aXYf");
    }

    #[test]
    fn a_repeated_edit_is_applied_once() {
        let doc = Document::new();
        assert_eq!(doc.submit("a", 7, 0, op(json!(["x"]))), Ok(1));
        assert_eq!(doc.submit("a", 7, 0, op(json!(["x"]))), Ok(1));
        assert_eq!(doc.snapshot(), ("x".to_owned(), 1));
    }

    #[test]
    fn edits_on_unknown_or_forgotten_revisions_are_refused() {
        let doc = Document::new();
        assert_eq!(
            doc.submit("a", 1, 3, op(json!(["x"]))),
            Err(SubmitError::UnknownRevision(3))
        );
        for seq in 0..=HISTORY as u64 {
            let mut append = TextOperation::new();
            append.retain(seq as usize).insert("x");
            doc.submit("a", seq, seq, append).expect("append");
        }
        assert_eq!(
            doc.submit("b", 1, 0, op(json!(["y"]))),
            Err(SubmitError::TooOld(0))
        );
        // Revision 1 ("x") is the oldest still mergeable.
        assert_eq!(
            doc.submit("b", 2, 1, op(json!([1, "y"]))),
            Ok(HISTORY as u64 + 2)
        );
        let text = doc.snapshot().0;
        assert_eq!(text.len(), HISTORY + 2);
        assert!(text.starts_with("xy"), "{}", &text[..5]);
    }

    #[test]
    fn only_the_first_seed_of_a_new_document_is_applied() {
        let doc = Document::new();
        assert_eq!(doc.submit_seed("a", 1, op(json!(["carried"]))), Ok(1));
        assert_eq!(doc.submit_seed("a", 1, op(json!(["carried"]))), Ok(1));
        assert_eq!(
            doc.submit_seed("b", 1, op(json!(["also carried"]))),
            Err(SubmitError::AlreadyStarted)
        );
        assert_eq!(doc.snapshot(), ("carried".to_owned(), 1));
    }

    #[test]
    fn a_reconnecting_client_gets_only_what_it_missed() {
        let doc = Document::new();
        doc.submit("a", 1, 0, op(json!(["ab"]))).expect("1");
        doc.submit("a", 2, 1, op(json!([2, "c"]))).expect("2");
        let (hello, cursor) = doc.hello("app-1", Some(1));
        assert_eq!(hello["rev"], 2);
        assert_eq!(hello["missed"][0]["op"], json!([2, "c"]));
        assert!(hello.get("text").is_none());
        assert_eq!(cursor.rev, 2);
        let (fresh, _) = doc.hello("app-1", Some(9));
        assert_eq!(fresh["text"], "abc");
    }

    #[test]
    fn pending_sends_new_operations_and_viewer_changes_once() {
        let doc = Arc::new(Document::new());
        let (_, mut cursor) = doc.hello("app-1", None);
        assert!(doc.pending("app-1", &mut cursor).is_empty());
        let joined = doc.join("c1");
        doc.submit("c1", 1, 0, op(json!(["x"]))).expect("edit");
        let sent = doc.pending("app-1", &mut cursor);
        assert_eq!(sent.len(), 2, "{sent:?}");
        assert_eq!(sent[0]["type"], "op");
        assert_eq!(sent[1], json!({"type": "viewers", "count": 1}));
        assert!(doc.pending("app-1", &mut cursor).is_empty());
        drop(joined);
        assert_eq!(
            doc.pending("app-1", &mut cursor),
            vec![json!({"type": "viewers", "count": 0})]
        );
    }

    #[test]
    fn long_poll_viewers_count_until_they_stop_polling() {
        let doc = Document::new();
        let start = Instant::now();
        doc.touch_poll("p1", start);
        doc.touch_poll("p1", start);
        assert_eq!(doc.viewers(), 1);
        doc.expire(start + POLL_PRESENCE + Duration::from_secs(1));
        assert_eq!(doc.viewers(), 0);
    }
}
