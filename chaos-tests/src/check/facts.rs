//! The facts the checks read, and what the harness records during a run
//! to derive some of them.

use std::collections::BTreeMap;
use std::time::SystemTime;

use checkout::demo::Scenario;
use checkout::shop::OrderStatus;
use saga_core::{HistoryEntry, MessageId, SagaId, Status};
use serde::Serialize;
use uuid::Uuid;

use super::Violation;
use super::fencing::{LeaseChange, ServiceCall};
use crate::schedule::ZombieAt;
use crate::worker::Counts;

/// A saga instance as the checks see it.
#[derive(Debug, Clone)]
pub struct Instance {
    /// Its id.
    pub id: SagaId,
    /// Its order.
    pub order: String,
    /// Its status.
    pub status: Status,
    /// Why it is stuck, if it is.
    pub stuck_reason: Option<String>,
    /// Its history.
    pub history: Vec<HistoryEntry>,
}

/// An effect in a service's ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EffectKind {
    /// A charge (payment).
    Charge,
    /// A refund of a charge (payment).
    Refund,
    /// A deduction of stock (inventory).
    Deduct,
    /// A release of a deduction (inventory).
    Release,
}

/// One row of a service's ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Effect {
    /// What it was.
    pub kind: EffectKind,
    /// Its row number in its ledger (payment and inventory count apart).
    pub seq: i64,
    /// When it was written (the database's clock, shared by both ledgers).
    pub at: SystemTime,
    /// The charge (charge, refund) or reservation (deduct, release) it is
    /// about.
    pub of: Uuid,
    /// The SKU (inventory only).
    pub sku: Option<String>,
    /// How much: cents (payment) or units of stock (inventory).
    pub amount: i64,
}

/// A message committed to the outbox (from the harness's copy of every
/// insert).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    /// Its id.
    pub id: MessageId,
    /// The saga that emitted it.
    pub saga: Option<SagaId>,
}

/// An outbox row still there at the end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Left {
    /// Its id.
    pub id: Uuid,
    /// Its topic.
    pub topic: String,
    /// Its last delivery error.
    pub last_error: String,
    /// Whether it was dead-lettered.
    pub dead: bool,
}

/// A transition whose connection the proxy cut, resolved from the
/// database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CutFact {
    /// Cut after the statement was sent (its reply lost), or before.
    pub after: bool,
    /// The order whose saga it was, if it could be told.
    pub order: Option<String>,
    /// The transition's id, read from the statement's parameters.
    pub transition: Option<Uuid>,
    /// The worker incarnation (its `application_name`).
    pub worker: Option<String>,
    /// The history row was written by the very session that was cut: the
    /// statement committed although its client never heard.
    pub committed_at_cut: bool,
    /// The history row exists at the end (committed at the cut, or written
    /// again after it).
    pub in_history: bool,
    /// When the cut's worker wrote the transition again on a session none
    /// of its cuts fell on (the database's clock, on this host): it had
    /// resolved the ambiguity ("not committed") before.
    pub written_again_at: Option<SystemTime>,
}

/// A worker incarnation and its own counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WorkerFact {
    /// Its `application_name`.
    pub name: String,
    /// It ran to the end and stopped cleanly, so its counters are complete.
    pub survived: bool,
    /// Its last reported counters.
    pub counts: Counts,
    /// When they were read (the worker's clock, on this host): every
    /// ambiguity it resolved before then is in them.
    pub reported_at: Option<SystemTime>,
}

/// A zombie worker, as the harness saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ZombieFact {
    /// The order it was working on.
    pub order: String,
    /// Where it froze.
    pub at: ZombieAt,
    /// It was frozen.
    pub frozen: bool,
    /// While it was frozen, another worker claimed its saga (read from the
    /// saga's row: a new lease and a new version).
    pub takeover: bool,
    /// It sent its step's result after the takeover: the transition id.
    pub record_sent: Option<Option<Uuid>>,
    /// The port the server saw that result's session on.
    pub record_port: Option<u16>,
    /// That result was written by its own session (a history row for its
    /// transition, inserted on that port): the stale write was accepted.
    /// A row for the same transition written earlier on another session
    /// (its first send, committed while its reply was lost) is not.
    pub record_committed: bool,
    /// The worker reported that the engine refused its write for this saga.
    pub refusal_reported: bool,
}

impl ZombieFact {
    /// Which write was refused, if the zombie was verifiably fenced off:
    /// frozen, taken over, its refusal reported, and no stale result
    /// accepted.
    #[must_use]
    pub fn refused(&self) -> Option<RefusedAt> {
        if !(self.frozen && self.takeover && self.refusal_reported) || self.record_committed {
            return None;
        }
        Some(if self.record_sent.is_some() {
            RefusedAt::Record
        } else {
            RefusedAt::Heartbeat
        })
    }
}

/// Which of a zombie's writes was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusedAt {
    /// Its lease heartbeat (it never sent its result).
    Heartbeat,
    /// Its step's result, sent after another worker took over.
    Record,
}

/// Everything the checks look at.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    /// The system quiesced within the bound after the last fault.
    pub quiesced: bool,
    /// I1–I3 as the checkout audit found them in the ledgers.
    pub ledger_violations: Vec<Violation>,
    /// The saga instances, by order.
    pub instances: BTreeMap<String, Instance>,
    /// Every outbox message ever committed.
    pub committed: Vec<Committed>,
    /// Every email sent: message id and order.
    pub delivered: Vec<(MessageId, String)>,
    /// Outbox rows left at the end.
    pub left: Vec<Left>,
    /// Payment and inventory effects, by order.
    pub effects: BTreeMap<String, Vec<Effect>>,
    /// Transitions cut.
    pub cuts: Vec<CutFact>,
    /// Worker incarnations.
    pub workers: Vec<WorkerFact>,
    /// Zombies.
    pub zombies: Vec<ZombieFact>,
    /// What each order was placed to do: its scenario, by order.
    pub scenarios: BTreeMap<String, Scenario>,
    /// The shop's own status of each order (its `orders` table), by order.
    pub shop: BTreeMap<String, OrderStatus>,
    /// Every change of a saga row's lease, from the harness's log (I9).
    pub leases: Vec<LeaseChange>,
    /// Every call the payment and inventory services received, from their
    /// request logs (I9).
    pub calls: Vec<ServiceCall>,
}

/// What the harness itself recorded during the run, to be resolved
/// against the database.
#[derive(Debug, Clone, Default)]
pub struct Recorded {
    /// Cuts: after or before, the saga and transition ids read from the
    /// statement, the worker, and the port of the cut session.
    pub cuts: Vec<RecordedCut>,
    /// Worker incarnations.
    pub workers: Vec<WorkerFact>,
    /// Zombies, before their result is looked up.
    pub zombies: Vec<ZombieFact>,
    /// The scenario of each order placed, by order.
    pub scenarios: BTreeMap<String, Scenario>,
}

/// A cut as the proxy recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedCut {
    /// After or before.
    pub after: bool,
    /// The saga, from the statement.
    pub saga: Option<Uuid>,
    /// The transition, from the statement.
    pub transition: Option<Uuid>,
    /// The worker.
    pub worker: Option<String>,
    /// The port the server saw the cut session on.
    pub port: Option<u16>,
}
