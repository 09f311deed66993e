//! The store implementer's contract: the [`SagaStore`] trait, the records
//! it exchanges with the executor and the client, and [`StoreFailure`] for
//! its errors.
//!
//! A [`SagaStore`] keeps instances, their history and the messages their
//! steps emit. It decides nothing: the executor computes every transition
//! with the pure [status machine](crate::machine) and hands the store one
//! [`Record`] to apply atomically, guarded by a lease (or, for operator
//! actions, by the instance's version). Implementations must pass the
//! conformance suite in [`crate::testing`] (feature `testing`).
//!
//! ## Leases and fencing
//!
//! [`claim`](SagaStore::claim) hands out due instances with a fresh
//! [`LeaseToken`] and an expiry, and counts the attempt. A write guarded by a
//! lease succeeds only if the token is still the instance's current one and
//! has not expired; otherwise it changes nothing and fails with
//! [`Error::LeaseLost`]. An expired lease makes the
//! instance claimable again, with a new token, so a stalled worker can never
//! overwrite the work of the worker that took over.
//!
//! ## Evolving the contract
//!
//! The records exchanged with a store ([`NewSaga`], [`ClaimedSaga`],
//! [`Lease`], [`Record`], [`HistoryEntry`], [`SagaSnapshot`]) are plain
//! structs with public fields, deliberately not `#[non_exhaustive]`: a
//! store persists and returns every field, so a new field is a change every
//! store must make, and the compiler should say where. A store's own error
//! travels as a [`StoreFailure`].

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::client::Limits;
use crate::error::Error;
use crate::fingerprint::ShapeFingerprint;
use crate::ids::{
    Direction, LeaseToken, SagaId, SagaKind, StartKey, StepName, TransitionId, WorkerId,
};
use crate::machine::Status;
use crate::outbox::OutboxMessage;
use crate::shape::SagaShape;
use crate::time::{Clock, Timestamp};

/// A store's own error, as it travels in [`Error::Store`]: callers ask it
/// whether trying again may help and for its code without knowing the
/// store's type.
///
/// Its [`Display`](std::fmt::Display) says what happened (the database's
/// message, say), and its [`source`](std::error::Error::source) chain
/// keeps the causes. [`Error::store`] wraps one.
pub trait StoreFailure: std::error::Error + Send + Sync + 'static {
    /// Whether the operation may succeed if simply tried again (a lost
    /// connection, a serialization failure), as opposed to a failure that
    /// will recur (a missing table, a constraint the data breaks).
    fn is_retryable(&self) -> bool;

    /// Whether the store refused the data it was asked to write, so that
    /// the same write fails however often it is tried (PostgreSQL's data
    /// exceptions, class 22, and 54000 "program limit exceeded"). Never
    /// also [`is_retryable`](StoreFailure::is_retryable). The executor
    /// fails a step whose result is refused so for good, with the failure
    /// as its reason. Default: `false`.
    fn refuses_data(&self) -> bool {
        false
    }

    /// The store's code for the failure, if it has one (PostgreSQL's
    /// five-character SQLSTATE, say).
    fn code(&self) -> Option<&str>;
}

impl dyn StoreFailure {
    /// The failure as the store's own type `T`, if it is one.
    #[must_use]
    pub fn downcast_ref<T: StoreFailure>(&self) -> Option<&T> {
        let error: &(dyn std::error::Error + 'static) = self;
        error.downcast_ref::<T>()
    }

    /// Whether the failure is of the store's own type `T`.
    #[must_use]
    pub fn is<T: StoreFailure>(&self) -> bool {
        self.downcast_ref::<T>().is_some()
    }
}

/// Lets [`Error::Store`] display as, and take its causes from, the failure
/// it holds.
impl std::error::Error for Box<dyn StoreFailure> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        (**self).source()
    }
}

/// A new instance, as the client hands it to the store.
#[derive(Debug, Clone)]
pub struct NewSaga {
    /// The new instance's id (used only if the start key is new).
    pub id: SagaId,
    /// Saga name and version.
    pub kind: SagaKind,
    /// The caller's idempotency key, unique per saga name.
    pub start_key: StartKey,
    /// SHA-256 of the canonical JSON input, to tell a repeated start from a
    /// conflicting one.
    pub input_digest: [u8; 32],
    /// The initial state.
    pub state: serde_json::Value,
    /// The first step (forward).
    pub first_step: StepName,
    /// The fingerprint of the definition the instance is started under
    /// ([`SagaShape::fingerprint`](crate::SagaShape::fingerprint)): only
    /// workers whose registered definition has the same one claim it.
    pub fingerprint: ShapeFingerprint,
    /// The history row that records the creation.
    pub history: HistoryEntry,
}

/// The answer to a start.
///
/// Start keys are unique per saga *name*, across its versions: a start of
/// version 2 with a key that started a version 1 instance (with an equal
/// input) returns that version 1 instance, and `kind` says so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Started {
    /// The instance: the new one, or the one started earlier with this key.
    pub id: SagaId,
    /// Whether this call created it.
    pub created: bool,
    /// The instance's saga name and version: the definition started, or,
    /// when `created` is false, the version the earlier start used, which
    /// may be another version of the same saga.
    pub kind: SagaKind,
}

/// What a worker asks for when claiming.
#[derive(Debug, Clone, Copy)]
pub struct ClaimRequest<'a> {
    /// Who claims.
    pub worker: WorkerId,
    /// Only instances of these saga kinds are claimed; others are left for
    /// workers that have them registered.
    pub kinds: &'a [SagaKind],
    /// The fingerprint of the definition registered for each kind, index
    /// for index with `kinds`. An instance of `kinds[i]` is claimed only if
    /// it was started under `fingerprints[i]`, or under no recorded
    /// fingerprint (an instance from before fingerprints were recorded);
    /// others are left for a worker whose definition matches. A kind
    /// without an entry here claims nothing.
    pub fingerprints: &'a [ShapeFingerprint],
    /// At most this many instances.
    pub limit: usize,
    /// How long the lease lasts unless extended.
    pub lease_for: Duration,
}

/// A lease on one instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// The leased instance.
    pub saga_id: SagaId,
    /// The fencing token.
    pub token: LeaseToken,
    /// When the lease lapses unless extended.
    pub expires_at: Timestamp,
}

/// An instance handed to a worker by [`SagaStore::claim`].
#[derive(Debug, Clone)]
pub struct ClaimedSaga {
    /// The worker's lease.
    pub lease: Lease,
    /// Saga name and version.
    pub kind: SagaKind,
    /// `Running` or `Compensating`.
    pub status: Status,
    /// The step to run.
    pub step: StepName,
    /// Its direction.
    pub direction: Direction,
    /// This attempt's number (from 1): the claim counted it.
    pub attempt: u32,
    /// When the first attempt of this step and direction started, moved
    /// later by any time spent snoozed (see [`Record::first_attempt_at`]).
    pub first_attempt_at: Timestamp,
    /// The state as recorded after the last successful step.
    pub state: serde_json::Value,
}

/// One atomic write: the new position and status of an instance, its new
/// state, the messages its step emitted, and a history row.
#[derive(Debug, Clone)]
pub struct Record {
    /// Identifies the write, under a unique constraint: lets a store tell
    /// whether a commit whose reply was lost took effect.
    pub transition_id: TransitionId,
    /// The new status.
    pub status: Status,
    /// The step the instance is now at.
    pub step: StepName,
    /// Its direction.
    pub direction: Direction,
    /// Attempts spent on that step and direction.
    pub attempt: u32,
    /// When the first attempt of that step and direction started, moved
    /// later by any time it spent snoozed (the origin of the retry policy's
    /// `max_elapsed`); `None` when none has started. A snooze gives its
    /// attempt back but leaves this set: the step has started.
    pub first_attempt_at: Option<Timestamp>,
    /// When the instance is next due; `None` when it is terminal or stuck.
    pub next_run_at: Option<Timestamp>,
    /// The new state; `None` keeps the stored one.
    pub state: Option<serde_json::Value>,
    /// Why the instance is stuck, if it is.
    pub stuck_reason: Option<String>,
    /// Messages to enqueue. Inserting a message whose id already exists
    /// does nothing (a re-run step emits the same ids).
    pub outbox: Vec<OutboxMessage>,
    /// The history row to append.
    pub history: HistoryEntry,
}

/// What happened, as recorded in the history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Outcome {
    /// The instance was created.
    Created,
    /// The step succeeded.
    Succeeded,
    /// The step failed; another attempt is scheduled.
    RetryScheduled,
    /// The step asked to run again later, without spending an attempt.
    Snoozed,
    /// The step failed for good.
    FailedForGood,
    /// The engine could not run the instance and parked it.
    Parked,
    /// An operator resumed the instance.
    Resumed,
    /// An operator cancelled the instance.
    Cancelled,
}

impl Outcome {
    /// Every outcome.
    pub const ALL: [Outcome; 8] = [
        Outcome::Created,
        Outcome::Succeeded,
        Outcome::RetryScheduled,
        Outcome::Snoozed,
        Outcome::FailedForGood,
        Outcome::Parked,
        Outcome::Resumed,
        Outcome::Cancelled,
    ];

    /// The stored name.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Outcome::Created => "created",
            Outcome::Succeeded => "succeeded",
            Outcome::RetryScheduled => "retry_scheduled",
            Outcome::Snoozed => "snoozed",
            Outcome::FailedForGood => "failed_for_good",
            Outcome::Parked => "parked",
            Outcome::Resumed => "resumed",
            Outcome::Cancelled => "cancelled",
        }
    }
}

impl std::str::FromStr for Outcome {
    type Err = crate::error::InvalidName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Outcome::ALL
            .into_iter()
            .find(|o| o.as_str() == s)
            .ok_or_else(|| crate::error::InvalidName::new("outcome", s, "not a history outcome"))
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One row of an instance's history: every transition appends one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// The transition that wrote it.
    pub transition_id: TransitionId,
    /// The step concerned.
    pub step: StepName,
    /// Its direction.
    pub direction: Direction,
    /// The attempt concerned (0 when none ran, e.g. on creation).
    pub attempt: u32,
    /// What happened.
    pub outcome: Outcome,
    /// The error and its causes, when the step failed.
    pub error: Option<String>,
    /// Status before (`None` on creation).
    pub from_status: Option<Status>,
    /// Status after.
    pub to_status: Status,
    /// When the attempt (or operator action) started.
    pub started_at: Timestamp,
    /// When it finished.
    pub finished_at: Timestamp,
}

/// An instance as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct SagaSnapshot {
    /// The instance.
    pub id: SagaId,
    /// Saga name and version.
    pub kind: SagaKind,
    /// The caller's start key.
    pub start_key: StartKey,
    /// Its status.
    pub status: Status,
    /// The current (or last) step.
    pub step: StepName,
    /// Its direction.
    pub direction: Direction,
    /// Attempts spent on that step and direction.
    pub attempt: u32,
    /// When the first attempt of that step and direction started, moved
    /// later by any time it spent snoozed; `None` when none has started
    /// (see [`Record::first_attempt_at`]).
    pub first_attempt_at: Option<Timestamp>,
    /// When it is next due. While leased, the lease's expiry: when it falls
    /// due again should its worker vanish.
    pub next_run_at: Option<Timestamp>,
    /// The state.
    pub state: serde_json::Value,
    /// Why it is stuck.
    pub stuck_reason: Option<String>,
    /// The current lease holder and expiry, if leased.
    pub lease: Option<(WorkerId, Timestamp)>,
    /// Bumped by every write.
    pub version: u64,
    /// When it was created.
    pub created_at: Timestamp,
    /// When it was last written.
    pub updated_at: Timestamp,
}

/// An instance whose stored row the store cannot read back as a
/// [`SagaSnapshot`] (a column written by hand, or by a binary with another
/// idea of the schema): its raw values, for an operator to see. A claim
/// parks such a row as `stuck` with the reason (when it can);
/// [`SagaClient::get`](crate::SagaClient::get) returns one instead of an
/// error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MalformedSaga {
    /// The instance.
    pub id: SagaId,
    /// Why the row cannot be read (the error and its causes).
    pub reason: String,
    /// Every column of the row, by name, as text (`None`: SQL `NULL`).
    pub columns: std::collections::BTreeMap<String, Option<String>>,
}

impl MalformedSaga {
    /// A column's raw value (`None` if the column is `NULL` or absent).
    #[must_use]
    pub fn column(&self, name: &str) -> Option<&str> {
        self.columns.get(name).and_then(|v| v.as_deref())
    }
}

/// Where a store keeps saga instances.
///
/// Every method is one short, atomic operation; none is ever called with a
/// step in progress inside it.
pub trait SagaStore: Send + Sync + 'static {
    /// The clock the store (and every executor on it) reads.
    fn clock(&self) -> &Arc<dyn Clock>;

    /// The size caps this store enforces on what it is handed: a start's
    /// input and a transition's state over
    /// [`max_state_bytes`](Limits::max_state_bytes), an outbox payload over
    /// [`max_payload_bytes`](Limits::max_payload_bytes), are refused with
    /// [`Error::TooLarge`] and nothing is written. The one source of the
    /// caps: the client checks a start's input, and the executor the state
    /// a step leaves and the payloads it emits, against these. Typically
    /// [`Limits::default`] (256 KiB each) unless configured; a wrapper
    /// answers with the inner store's.
    fn limits(&self) -> Limits;

    /// Creates an instance, or returns the one already started with the same
    /// saga name and start key, whatever its version (with that version in
    /// [`Started::kind`]). If that one was started with a different input,
    /// fails with [`Error::StartKeyConflict`] and writes nothing. An input
    /// over the store's [`limits`](SagaStore::limits) is refused with
    /// [`Error::TooLarge`], one that is not storable JSON (see
    /// [`crate::storable`]) with [`Error::Unstorable`], before anything is
    /// written.
    fn start(&self, new: NewSaga) -> impl Future<Output = Result<Started, Error>> + Send;

    /// Leases up to `limit` due instances of the given kinds: `Running` or
    /// `Compensating`, next run time passed, not under a live lease; oldest
    /// due first. Each claim counts an attempt of the instance's current
    /// step (and sets its first attempt time if unset).
    fn claim(
        &self,
        request: ClaimRequest<'_>,
    ) -> impl Future<Output = Result<Vec<ClaimedSaga>, Error>> + Send;

    /// Extends a live lease to `now + lease_for`. Fails with
    /// [`Error::LeaseLost`] if it is no longer held.
    fn heartbeat(
        &self,
        lease: &Lease,
        lease_for: Duration,
    ) -> impl Future<Output = Result<Lease, Error>> + Send;

    /// Gives a lease back without running the step: the attempt the claim
    /// counted is refunded and the instance is due again at once.
    fn release(&self, lease: &Lease) -> impl Future<Output = Result<(), Error>> + Send;

    /// Applies `record` if `lease` is still held, releasing it. Otherwise
    /// changes nothing and fails with [`Error::LeaseLost`]. A state or an
    /// outbox payload over the store's [`limits`](SagaStore::limits), or not
    /// storable JSON, is refused ([`Error::TooLarge`],
    /// [`Error::Unstorable`]; [`Error::refuses_data`] says so) and nothing
    /// is written; the lease stays held.
    fn record(
        &self,
        lease: &Lease,
        record: Record,
    ) -> impl Future<Output = Result<(), Error>> + Send;

    /// Applies an operator's `record` if the instance is still at
    /// `expected_version` and under no live lease; otherwise fails with
    /// [`Error::Conflict`] and changes nothing. Any expired lease is voided.
    fn record_unleased(
        &self,
        id: SagaId,
        expected_version: u64,
        record: Record,
    ) -> impl Future<Output = Result<(), Error>> + Send;

    /// The instance, if it exists. A row that exists but cannot be read
    /// fails with [`Error::Malformed`], carrying its raw values.
    fn load(&self, id: SagaId) -> impl Future<Output = Result<Option<SagaSnapshot>, Error>> + Send;

    /// The instance's history, oldest first.
    fn history(&self, id: SagaId) -> impl Future<Output = Result<Vec<HistoryEntry>, Error>> + Send;

    /// The messages emitted by the instance's steps that are still in the
    /// outbox (not yet dispatched), in the order they were written.
    fn outbox_for(
        &self,
        id: SagaId,
    ) -> impl Future<Output = Result<Vec<OutboxMessage>, Error>> + Send;

    /// How many due instances belong to saga kinds *not* in `kinds`: work
    /// that no worker with this registry will ever pick up.
    fn due_unregistered(
        &self,
        kinds: &[SagaKind],
    ) -> impl Future<Output = Result<Vec<(SagaKind, u64)>, Error>> + Send;

    /// How many due instances of the kinds in `kinds` were started under a
    /// fingerprint other than the one given for their kind (index for
    /// index, as in [`ClaimRequest`]), by kind and fingerprint: work a
    /// claim with these fingerprints leaves for a worker whose definition
    /// matches. Instances with no recorded fingerprint are not counted
    /// (every worker of their kind claims them).
    fn due_unmatched(
        &self,
        kinds: &[SagaKind],
        fingerprints: &[ShapeFingerprint],
    ) -> impl Future<Output = Result<Vec<(SagaKind, ShapeFingerprint, u64)>, Error>> + Send;

    /// Records `shape`'s [fingerprint](crate::SagaShape::fingerprint) as its
    /// saga name and version's, with the shape itself, if that name and
    /// version have none yet; and returns the stored fingerprint. If they
    /// already have another one, fails with [`Error::DefinitionChanged`]
    /// (built with [`Error::definition_changed`] from the stored shape) and
    /// changes nothing. Registering the same fingerprint again changes
    /// nothing either: the first shape stored stays (its retry policies and
    /// timeouts are only informative).
    fn register_definition(
        &self,
        shape: &SagaShape,
    ) -> impl Future<Output = Result<ShapeFingerprint, Error>> + Send;
}
