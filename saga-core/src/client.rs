//! Starting instances and looking at them.

use std::sync::Arc;

use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::Notify;

use crate::definition::SagaDefinition;
use crate::error::Error;
use crate::ids::{Direction, SagaId, SagaName, StartKey, TransitionId};
use crate::machine::Status;
use crate::store::{
    HistoryEntry, MalformedSaga, NewSaga, Outcome, SagaSnapshot, SagaStore, Started,
};
use crate::time::Timestamp;

/// The default cap on a saga's serialized state and on an outbox payload:
/// 256 KiB.
pub const DEFAULT_MAX_BYTES: usize = 256 * 1024;

/// Size caps, checked before anything is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// Largest serialized saga input or state, in bytes.
    pub max_state_bytes: usize,
    /// Largest outbox message payload, in bytes.
    pub max_payload_bytes: usize,
}

impl Limits {
    /// Caps of `max_state_bytes` on a saga's serialized input and state and
    /// `max_payload_bytes` on an outbox payload.
    #[must_use]
    pub const fn new(max_state_bytes: usize, max_payload_bytes: usize) -> Self {
        Limits {
            max_state_bytes,
            max_payload_bytes,
        }
    }
}

impl Limits {
    /// Refuses a saga input or state (`what`) whose serialized form is
    /// over [`max_state_bytes`](Limits::max_state_bytes), with
    /// [`Error::TooLarge`]. The one size check of saga state, for starts and
    /// for the state a step leaves.
    pub(crate) fn check_state(
        &self,
        what: &'static str,
        state: &serde_json::Value,
    ) -> Result<(), Error> {
        let size = serde_json::to_vec(state).map_or(0, |b| b.len());
        if size > self.max_state_bytes {
            return Err(Error::TooLarge {
                what,
                size,
                limit: self.max_state_bytes,
            });
        }
        Ok(())
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_state_bytes: DEFAULT_MAX_BYTES,
            max_payload_bytes: DEFAULT_MAX_BYTES,
        }
    }
}

/// Starts saga instances and reads them back.
///
/// Cheap to clone. An executor's [`client`](crate::Executor::client) also
/// wakes that executor when it starts an instance.
#[derive(Debug)]
pub struct SagaClient<St> {
    store: Arc<St>,
    wake: Option<Arc<Notify>>,
}

impl<St> Clone for SagaClient<St> {
    fn clone(&self) -> Self {
        SagaClient {
            store: self.store.clone(),
            wake: self.wake.clone(),
        }
    }
}

impl<St: SagaStore> SagaClient<St> {
    /// A client on `store`. A start's input is checked against the store's
    /// [`limits`](SagaStore::limits).
    pub fn new(store: St) -> Self {
        SagaClient::from_arc(Arc::new(store))
    }

    /// A client on a shared store.
    pub fn from_arc(store: Arc<St>) -> Self {
        SagaClient { store, wake: None }
    }

    pub(crate) fn with_wake(mut self, wake: Arc<Notify>) -> Self {
        self.wake = Some(wake);
        self
    }

    /// The store.
    pub fn store(&self) -> &St {
        &self.store
    }

    /// Starts an instance of `saga` with `input` as its initial state.
    ///
    /// Idempotent on `key` (per saga name): starting again with the same key
    /// and an equal input returns the first instance with
    /// `created == false`; with a different input it fails with
    /// [`Error::StartKeyConflict`]. Keys span versions: a start of version
    /// 2 with a key that started a version 1 instance returns that
    /// instance, and [`Started::kind`] says it is version 1 (see the
    /// guarantees guide for why this is not a conflict). An input over the
    /// store's size cap ([`SagaStore::limits`]) fails with
    /// [`Error::TooLarge`], one that is not storable JSON (a NUL character,
    /// a non-finite number) with [`Error::Unstorable`]. Either way nothing
    /// is written.
    pub async fn start<S: Serialize, D>(
        &self,
        saga: &SagaDefinition<S, D>,
        key: StartKey,
        input: &S,
    ) -> Result<Started, Error> {
        let now = self.store.clock().now();
        let new = NewSaga::new(saga, key, input, &self.store.limits(), now)?;
        let started = self.store.start(new).await?;
        if started.created {
            count_started(saga.name());
            if let Some(wake) = &self.wake {
                wake.notify_one();
            }
        }
        Ok(started)
    }

    /// The instance as stored, for operator tools: its snapshot, or, if its
    /// row cannot be read (see [`MalformedSaga`]), the row's raw values and
    /// why; [`Error::NotFound`] if there is none. To get a typed
    /// [`SagaSnapshot`] or an error, use [`snapshot`](Self::snapshot).
    pub async fn get(&self, id: SagaId) -> Result<SagaView, Error> {
        match self.store.load(id).await {
            Ok(Some(snapshot)) => Ok(SagaView::Readable(snapshot)),
            Ok(None) => Err(Error::NotFound(id)),
            Err(Error::Malformed { saga, .. }) => Ok(SagaView::Malformed(*saga)),
            Err(e) => Err(e),
        }
    }

    /// The instance, or [`Error::NotFound`], or [`Error::Malformed`] if its
    /// row cannot be read.
    pub async fn snapshot(&self, id: SagaId) -> Result<SagaSnapshot, Error> {
        self.store.load(id).await?.ok_or(Error::NotFound(id))
    }

    /// The instance's history, oldest first, or [`Error::NotFound`].
    pub async fn history(&self, id: SagaId) -> Result<Vec<HistoryEntry>, Error> {
        let history = self.store.history(id).await?;
        if history.is_empty() && self.store.load(id).await?.is_none() {
            return Err(Error::NotFound(id));
        }
        Ok(history)
    }
}

/// What [`SagaClient::get`] found: an instance, readable or not.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum SagaView {
    /// The instance, read.
    Readable(SagaSnapshot),
    /// A row that cannot be read: its raw values and why.
    Malformed(MalformedSaga),
}

impl SagaView {
    /// The instance's id.
    #[must_use]
    pub fn id(&self) -> SagaId {
        match self {
            SagaView::Readable(s) => s.id,
            SagaView::Malformed(m) => m.id,
        }
    }

    /// The snapshot, if the row could be read.
    #[must_use]
    pub fn readable(&self) -> Option<&SagaSnapshot> {
        match self {
            SagaView::Readable(s) => Some(s),
            SagaView::Malformed(_) => None,
        }
    }

    /// The raw row, if it could not be read.
    #[must_use]
    pub fn malformed(&self) -> Option<&MalformedSaga> {
        match self {
            SagaView::Readable(_) => None,
            SagaView::Malformed(m) => Some(m),
        }
    }
}

/// Counts a newly started instance (stores that start instances in the
/// caller's own transaction call this after it commits).
pub fn count_started(saga: &SagaName) {
    metrics::counter!(crate::metrics::SAGAS_STARTED, "saga" => saga.to_string()).increment(1);
}

impl NewSaga {
    /// Prepares the start of an instance of `saga` with `input`: checks
    /// that it is storable JSON ([`Error::Unstorable`]: no NUL, no
    /// non-finite number), serializes and size-checks it, digests it, and fills in the first step
    /// and the `Created` history row. Used by [`SagaClient::start`] and by
    /// stores that start instances inside the caller's own transaction.
    pub fn new<S: Serialize, D>(
        saga: &SagaDefinition<S, D>,
        key: StartKey,
        input: &S,
        limits: &Limits,
        now: Timestamp,
    ) -> Result<NewSaga, Error> {
        // Before serializing: serde_json would turn a non-finite number
        // into `null` without a word.
        crate::storable::refuse_unstorable("saga input", input)?;
        let state = serde_json::to_value(input).map_err(|source| Error::SerializeState {
            saga: saga.name().clone(),
            source,
        })?;
        limits.check_state("saga input", &state)?;
        let first_step = saga
            .step_name(0)
            .expect("a built definition has at least one step")
            .clone();
        Ok(NewSaga {
            id: SagaId::new(),
            kind: saga.kind().clone(),
            start_key: key,
            input_digest: digest(&state),
            state,
            first_step: first_step.clone(),
            fingerprint: saga.fingerprint(),
            history: HistoryEntry {
                transition_id: TransitionId::new(),
                step: first_step,
                direction: Direction::Forward,
                attempt: 0,
                outcome: Outcome::Created,
                error: None,
                from_status: None,
                to_status: Status::Running,
                started_at: now,
                finished_at: now,
            },
        })
    }
}

/// SHA-256 of a canonical encoding of `value`: object keys sorted, so the
/// digest does not depend on map iteration order.
pub(crate) fn digest(value: &serde_json::Value) -> [u8; 32] {
    fn feed(h: &mut Sha256, v: &serde_json::Value) {
        use serde_json::Value;
        match v {
            Value::Null => h.update(b"n"),
            Value::Bool(b) => h.update(if *b { b"t" } else { b"f" }),
            Value::Number(n) => {
                let s = n.to_string();
                h.update(b"#");
                h.update((s.len() as u64).to_le_bytes());
                h.update(s.as_bytes());
            }
            Value::String(s) => {
                h.update(b"s");
                h.update((s.len() as u64).to_le_bytes());
                h.update(s.as_bytes());
            }
            Value::Array(items) => {
                h.update(b"[");
                h.update((items.len() as u64).to_le_bytes());
                for item in items {
                    feed(h, item);
                }
            }
            Value::Object(map) => {
                let mut entries: Vec<_> = map.iter().collect();
                entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
                h.update(b"{");
                h.update((entries.len() as u64).to_le_bytes());
                for (k, v) in entries {
                    h.update((k.len() as u64).to_le_bytes());
                    h.update(k.as_bytes());
                    feed(h, v);
                }
            }
        }
    }
    let mut h = Sha256::new();
    feed(&mut h, value);
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn digest_ignores_key_order_but_not_values() {
        let a = json!({"order": 1, "items": [{"sku": "a", "qty": 2}]});
        let b: serde_json::Value =
            serde_json::from_str(r#"{"items":[{"qty":2,"sku":"a"}],"order":1}"#).unwrap();
        assert_eq!(digest(&a), digest(&b));
        assert_ne!(
            digest(&a),
            digest(&json!({"order": 2, "items": [{"sku": "a", "qty": 2}]}))
        );
        // Structure, not just concatenated text, is hashed.
        assert_ne!(digest(&json!(["ab", "c"])), digest(&json!(["a", "bc"])));
        assert_ne!(digest(&json!("1")), digest(&json!(1)));
    }
}
