//! An in-memory [`SagaStore`], for unit tests and fast property tests.
//!
//! Same semantics as the durable stores, leases and fencing included, on an
//! injectable [`Clock`]; it passes the same conformance suite. Nothing
//! survives the process.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::client::Limits;
use crate::error::Error;
use crate::fingerprint::ShapeFingerprint;
use crate::ids::{LeaseToken, MessageId, SagaId, SagaKind, SagaName, StartKey, TransitionId};
use crate::outbox::{OutboxMessage, Payload};
use crate::shape::SagaShape;
use crate::storable::refuse_unstorable;
use crate::store::{
    ClaimRequest, ClaimedSaga, HistoryEntry, Lease, NewSaga, Record, SagaSnapshot, SagaStore,
    Started,
};
use crate::time::{Clock, SystemClock, Timestamp};

#[derive(Debug)]
struct Row {
    snapshot: SagaSnapshot,
    input_digest: [u8; 32],
    fingerprint: ShapeFingerprint,
    lease_token: Option<LeaseToken>,
}

#[derive(Debug, Default)]
struct Inner {
    sagas: HashMap<SagaId, Row>,
    start_keys: HashMap<(SagaName, StartKey), SagaId>,
    history: HashMap<SagaId, Vec<HistoryEntry>>,
    transitions: HashSet<TransitionId>,
    outbox: BTreeMap<MessageId, (Option<SagaId>, OutboxMessage)>,
    outbox_order: Vec<MessageId>,
    /// Per saga kind, the fingerprint and shape first registered.
    definitions: HashMap<SagaKind, (ShapeFingerprint, serde_json::Value)>,
}

/// A [`SagaStore`] in memory.
///
/// ```
/// use std::sync::Arc;
/// use saga_core::{InMemorySagaStore, ManualClock};
///
/// let clock = Arc::new(ManualClock::starting_now());
/// let store = InMemorySagaStore::with_clock(clock.clone());
/// # let _ = store;
/// ```
#[derive(Debug, Clone)]
pub struct InMemorySagaStore {
    clock: Arc<dyn Clock>,
    limits: Limits,
    inner: Arc<Mutex<Inner>>,
}

impl Default for InMemorySagaStore {
    fn default() -> Self {
        InMemorySagaStore::new()
    }
}

impl InMemorySagaStore {
    /// An empty store on the system clock.
    #[must_use]
    pub fn new() -> Self {
        InMemorySagaStore::with_clock(Arc::new(SystemClock))
    }

    /// An empty store on `clock`.
    #[must_use]
    pub fn with_clock(clock: Arc<dyn Clock>) -> Self {
        InMemorySagaStore {
            clock,
            limits: Limits::default(),
            inner: Arc::new(Mutex::new(Inner::default())),
        }
    }

    /// The same store with `limits` as its size caps (default
    /// [`Limits::default`]); see [`SagaStore::limits`].
    #[must_use]
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Refuses a start whose input the store cannot keep: over the cap, or
    /// not storable JSON. As the durable stores do, so that tests see the
    /// same refusals.
    fn check_start(&self, new: &NewSaga) -> Result<(), Error> {
        self.limits.check_state("saga input", &new.state)?;
        refuse_unstorable("saga input", &new.state)
    }

    /// Refuses a transition whose state or messages the store cannot keep.
    fn check_record(&self, record: &Record) -> Result<(), Error> {
        if let Some(state) = &record.state {
            self.limits.check_state("saga state", state)?;
            refuse_unstorable("saga state", state)?;
        }
        for m in &record.outbox {
            let (size, limit) = (m.payload.len(), self.limits.max_payload_bytes);
            if size > limit {
                return Err(Error::TooLarge {
                    what: "outbox payload",
                    size,
                    limit,
                });
            }
            if let Payload::Json(v) = &m.payload {
                refuse_unstorable("outbox payload", v)?;
            }
        }
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves data that every method
        // keeps consistent before it can panic; carry on.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every message in the outbox, in the order first written.
    #[must_use]
    pub fn outbox(&self) -> Vec<OutboxMessage> {
        let inner = self.lock();
        inner
            .outbox_order
            .iter()
            .filter_map(|id| inner.outbox.get(id).map(|(_, m)| m.clone()))
            .collect()
    }

    /// Every instance, in no particular order.
    #[must_use]
    pub fn snapshots(&self) -> Vec<SagaSnapshot> {
        self.lock()
            .sagas
            .values()
            .map(|r| r.snapshot.clone())
            .collect()
    }
}

/// Whether a claim with `request` may take an instance of `kind` started
/// under `fingerprint`.
fn matches(request: &ClaimRequest<'_>, kind: &SagaKind, fingerprint: ShapeFingerprint) -> bool {
    request
        .kinds
        .iter()
        .position(|k| k == kind)
        .and_then(|i| request.fingerprints.get(i))
        .is_some_and(|f| *f == fingerprint)
}

fn live(row: &Row, now: Timestamp) -> bool {
    row.snapshot.lease.is_some_and(|(_, expires)| expires > now)
}

/// Checks that `lease` is the row's current, unexpired lease.
fn held<'a>(inner: &'a mut Inner, lease: &Lease, now: Timestamp) -> Result<&'a mut Row, Error> {
    let row = inner
        .sagas
        .get_mut(&lease.saga_id)
        .ok_or(Error::NotFound(lease.saga_id))?;
    if row.lease_token != Some(lease.token) || !live(row, now) {
        return Err(Error::LeaseLost(lease.saga_id));
    }
    Ok(row)
}

fn apply(inner: &mut Inner, id: SagaId, record: Record, now: Timestamp) {
    if !inner.transitions.insert(record.transition_id) {
        return;
    }
    let Some(row) = inner.sagas.get_mut(&id) else {
        return;
    };
    let s = &mut row.snapshot;
    s.status = record.status;
    s.step = record.step;
    s.direction = record.direction;
    s.attempt = record.attempt;
    s.first_attempt_at = record.first_attempt_at;
    s.next_run_at = record.next_run_at;
    if let Some(state) = record.state {
        s.state = state;
    }
    s.stuck_reason = record.stuck_reason;
    s.lease = None;
    s.version += 1;
    s.updated_at = now;
    row.lease_token = None;
    for m in record.outbox {
        if !inner.outbox.contains_key(&m.id) {
            inner.outbox_order.push(m.id);
            inner.outbox.insert(m.id, (Some(id), m));
        }
    }
    inner.history.entry(id).or_default().push(record.history);
}

impl SagaStore for InMemorySagaStore {
    fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    fn limits(&self) -> Limits {
        self.limits
    }

    async fn start(&self, new: NewSaga) -> Result<Started, Error> {
        self.check_start(&new)?;
        let now = self.clock.now();
        let mut inner = self.lock();
        let key = (new.kind.name.clone(), new.start_key.clone());
        if let Some(&existing) = inner.start_keys.get(&key) {
            let row = &inner.sagas[&existing];
            if row.input_digest != new.input_digest {
                return Err(Error::StartKeyConflict {
                    saga: new.kind.name,
                    key: new.start_key,
                    existing,
                });
            }
            return Ok(Started {
                id: existing,
                created: false,
                kind: row.snapshot.kind.clone(),
            });
        }
        let kind = new.kind.clone();
        let snapshot = SagaSnapshot {
            id: new.id,
            kind: new.kind,
            start_key: new.start_key,
            status: crate::machine::Status::Running,
            step: new.first_step,
            direction: crate::ids::Direction::Forward,
            attempt: 0,
            first_attempt_at: None,
            next_run_at: Some(now),
            state: new.state,
            stuck_reason: None,
            lease: None,
            version: 1,
            created_at: now,
            updated_at: now,
        };
        inner.start_keys.insert(key, new.id);
        inner.transitions.insert(new.history.transition_id);
        inner.history.insert(new.id, vec![new.history]);
        inner.sagas.insert(
            new.id,
            Row {
                snapshot,
                input_digest: new.input_digest,
                fingerprint: new.fingerprint,
                lease_token: None,
            },
        );
        Ok(Started {
            id: new.id,
            created: true,
            kind,
        })
    }

    async fn claim(&self, request: ClaimRequest<'_>) -> Result<Vec<ClaimedSaga>, Error> {
        let now = self.clock.now();
        let mut inner = self.lock();
        let mut due: Vec<(Timestamp, SagaId)> = inner
            .sagas
            .values()
            .filter(|r| {
                let s = &r.snapshot;
                s.status.is_runnable()
                    && s.next_run_at.is_some_and(|t| t <= now)
                    && !live(r, now)
                    && matches(&request, &s.kind, r.fingerprint)
            })
            .map(|r| (r.snapshot.next_run_at.unwrap_or(now), r.snapshot.id))
            .collect();
        // Oldest due first; ties by id, as the Postgres store does.
        due.sort_unstable();
        due.truncate(request.limit);
        let mut claimed = Vec::with_capacity(due.len());
        for (_, id) in due {
            let row = inner.sagas.get_mut(&id).expect("collected above");
            let token = LeaseToken::new();
            let expires_at = now + request.lease_for;
            row.lease_token = Some(token);
            let s = &mut row.snapshot;
            s.lease = Some((request.worker, expires_at));
            // Due again when the lease lapses, should the worker vanish.
            s.next_run_at = Some(expires_at);
            s.attempt += 1;
            let first_attempt_at = *s.first_attempt_at.get_or_insert(now);
            s.version += 1;
            s.updated_at = now;
            claimed.push(ClaimedSaga {
                lease: Lease {
                    saga_id: id,
                    token,
                    expires_at,
                },
                kind: s.kind.clone(),
                status: s.status,
                step: s.step.clone(),
                direction: s.direction,
                attempt: s.attempt,
                first_attempt_at,
                state: s.state.clone(),
            });
        }
        Ok(claimed)
    }

    async fn heartbeat(&self, lease: &Lease, lease_for: Duration) -> Result<Lease, Error> {
        let now = self.clock.now();
        let mut inner = self.lock();
        let row = held(&mut inner, lease, now)?;
        let expires_at = now + lease_for;
        if let Some((_, e)) = &mut row.snapshot.lease {
            *e = expires_at;
        }
        row.snapshot.next_run_at = Some(expires_at);
        Ok(Lease {
            expires_at,
            ..*lease
        })
    }

    async fn release(&self, lease: &Lease) -> Result<(), Error> {
        let now = self.clock.now();
        let mut inner = self.lock();
        let row = held(&mut inner, lease, now)?;
        row.lease_token = None;
        let s = &mut row.snapshot;
        s.lease = None;
        s.attempt = s.attempt.saturating_sub(1);
        if s.attempt == 0 {
            s.first_attempt_at = None;
        }
        s.next_run_at = Some(now);
        s.version += 1;
        s.updated_at = now;
        Ok(())
    }

    async fn record(&self, lease: &Lease, record: Record) -> Result<(), Error> {
        let now = self.clock.now();
        let mut inner = self.lock();
        held(&mut inner, lease, now)?;
        self.check_record(&record)?;
        apply(&mut inner, lease.saga_id, record, now);
        Ok(())
    }

    async fn record_unleased(
        &self,
        id: SagaId,
        expected_version: u64,
        record: Record,
    ) -> Result<(), Error> {
        let now = self.clock.now();
        let mut inner = self.lock();
        let row = inner.sagas.get(&id).ok_or(Error::NotFound(id))?;
        if row.snapshot.version != expected_version || live(row, now) {
            return Err(Error::Conflict(id));
        }
        self.check_record(&record)?;
        apply(&mut inner, id, record, now);
        Ok(())
    }

    async fn load(&self, id: SagaId) -> Result<Option<SagaSnapshot>, Error> {
        Ok(self.lock().sagas.get(&id).map(|r| r.snapshot.clone()))
    }

    async fn history(&self, id: SagaId) -> Result<Vec<HistoryEntry>, Error> {
        Ok(self.lock().history.get(&id).cloned().unwrap_or_default())
    }

    async fn outbox_for(&self, id: SagaId) -> Result<Vec<OutboxMessage>, Error> {
        let inner = self.lock();
        Ok(inner
            .outbox_order
            .iter()
            .filter_map(|m| inner.outbox.get(m))
            .filter(|(saga, _)| *saga == Some(id))
            .map(|(_, m)| m.clone())
            .collect())
    }

    async fn due_unregistered(&self, kinds: &[SagaKind]) -> Result<Vec<(SagaKind, u64)>, Error> {
        let now = self.clock.now();
        let inner = self.lock();
        let mut counts: BTreeMap<SagaKind, u64> = BTreeMap::new();
        for r in inner.sagas.values() {
            let s = &r.snapshot;
            if s.status.is_runnable()
                && s.next_run_at.is_some_and(|t| t <= now)
                && !kinds.contains(&s.kind)
            {
                *counts.entry(s.kind.clone()).or_default() += 1;
            }
        }
        Ok(counts.into_iter().collect())
    }

    async fn due_unmatched(
        &self,
        kinds: &[SagaKind],
        fingerprints: &[ShapeFingerprint],
    ) -> Result<Vec<(SagaKind, ShapeFingerprint, u64)>, Error> {
        let now = self.clock.now();
        let inner = self.lock();
        let mut counts: BTreeMap<(SagaKind, ShapeFingerprint), u64> = BTreeMap::new();
        for r in inner.sagas.values() {
            let s = &r.snapshot;
            let Some(i) = kinds.iter().position(|k| *k == s.kind) else {
                continue;
            };
            if s.status.is_runnable()
                && s.next_run_at.is_some_and(|t| t <= now)
                && fingerprints.get(i) != Some(&r.fingerprint)
            {
                *counts.entry((s.kind.clone(), r.fingerprint)).or_default() += 1;
            }
        }
        Ok(counts.into_iter().map(|((k, f), n)| (k, f, n)).collect())
    }

    async fn register_definition(&self, shape: &SagaShape) -> Result<ShapeFingerprint, Error> {
        let fingerprint = shape.fingerprint();
        let json = serde_json::to_value(shape).map_err(|source| Error::SerializeState {
            saga: shape.kind.name.clone(),
            source,
        })?;
        let mut inner = self.lock();
        let (stored, stored_shape) = inner
            .definitions
            .entry(shape.kind.clone())
            .or_insert((fingerprint, json));
        if *stored != fingerprint {
            return Err(Error::definition_changed(shape, *stored, stored_shape));
        }
        Ok(fingerprint)
    }
}
