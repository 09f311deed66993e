//! The checkout invariants, checked from ground truth.
//!
//! [`gather`] reads the facts once the system is quiet: the services'
//! ledgers (charges, refunds, deductions, releases, emails), the saga rows
//! and their history, and what the harness recorded itself — every outbox
//! row and history row ever inserted (copied by triggers the harness
//! installs, committed or rolled back with the insert), the statements the
//! proxy cut, the zombies it froze. [`check`] is a pure function of those
//! facts.
//!
//! - I1 per order: charges − refunds = the total if confirmed, else 0;
//!   never two charges.
//! - I2 inventory deducted at most once per (order, SKU); stock conserved,
//!   never negative; restored for compensated orders.
//! - I3 exactly one email per confirmed order, none for the others.
//! - I4 every saga Completed or Compensated within the bound after the
//!   last fault (stuck ones are reported with their reasons).
//! - I5 every committed outbox message delivered at least once; nothing
//!   delivered that was not committed; no dead letters left.
//! - I6 compensations only for started steps, in reverse order — in the
//!   ledgers (a refund only of a charge made before it, a release only of
//!   a deduction made before it, every release before any refund) and in
//!   the engine's history; no step result recorded twice, no attempt
//!   recorded twice; no zombie's result accepted after another worker took
//!   its saga over.
//! - I7 every ambiguous commit resolved: each transition whose connection
//!   was cut is resolved from the database (committed at the cut or not;
//!   a transition cut before it was sent never committed at the cut), its
//!   saga moved on to the end, and each worker that lived to the end
//!   resolved at least as many ambiguous commits as it had transitions
//!   cut, counted at least as many "committed" as it had transitions
//!   committed at a cut, and left none unresolved.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::SystemTime;

use checkout::deploy::Deployment;
use saga_core::{Direction, HistoryEntry, MessageId, Outcome, SagaId, Status, StepName};
use serde::Serialize;
use uuid::Uuid;

use crate::schedule::ZombieAt;
use crate::worker::Counts;

/// The invariants, by name.
pub const INVARIANTS: [&str; 7] = ["I1", "I2", "I3", "I4", "I5", "I6", "I7"];

/// The checkout saga's steps, in order.
const STEPS: [&str; 5] = [
    "validate_order",
    "charge_payment",
    "reserve_inventory",
    "confirm_order",
    "send_confirmation",
];

/// The schema where the harness keeps its own records.
pub const HARNESS_SCHEMA: &str = "chaos_harness";

/// One broken invariant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violation {
    /// `I1` to `I7`.
    pub invariant: &'static str,
    /// The order concerned, if any.
    pub order: Option<String>,
    /// What is wrong.
    pub detail: String,
}

fn violation(invariant: &'static str, order: Option<&str>, detail: String) -> Violation {
    Violation {
        invariant,
        order: order.map(str::to_owned),
        detail,
    }
}

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

/// Whether the zombie's result, as sent, was written: a history row for
/// its transition inserted on the session that sent it. `writes` maps each
/// transition to the ports of the sessions that inserted its history row.
fn written_by_its_session(z: &ZombieFact, writes: &HashMap<Uuid, Vec<Option<i32>>>) -> bool {
    let (Some(Some(transition)), Some(port)) = (z.record_sent, z.record_port) else {
        return false;
    };
    writes
        .get(&transition)
        .is_some_and(|ports| ports.contains(&Some(i32::from(port))))
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
}

/// What the cut transitions turned out to be.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CutSummary {
    /// Distinct transitions cut (a write retried after a cut may be cut
    /// again).
    pub transitions: u64,
    /// Cut after the statement was sent.
    pub after: u64,
    /// Cut before it was sent.
    pub before: u64,
    /// Committed at the cut (the reply was lost after COMMIT).
    pub committed: u64,
    /// Not committed at the cut.
    pub not_committed: u64,
    /// Not committed at the cut, then written again by its worker.
    pub written_again: u64,
    /// Not committed at the cut, and then refused (its lease had lapsed):
    /// the step ran again elsewhere.
    pub dropped: u64,
}

impl CutSummary {
    fn of(cuts: &[CutFact]) -> Self {
        let mut s = CutSummary {
            transitions: cuts
                .iter()
                .filter_map(|c| c.transition)
                .collect::<HashSet<_>>()
                .len() as u64,
            ..CutSummary::default()
        };
        for c in cuts {
            if c.after {
                s.after += 1;
            } else {
                s.before += 1;
            }
            if c.committed_at_cut {
                s.committed += 1;
            } else {
                s.not_committed += 1;
                if c.in_history {
                    s.written_again += 1;
                } else {
                    s.dropped += 1;
                }
            }
        }
        s
    }
}

/// What the checks found.
#[derive(Debug, Clone, Default)]
pub struct Findings {
    /// Every violation.
    pub violations: Vec<Violation>,
    /// Sagas by final status.
    pub outcomes: BTreeMap<String, u64>,
    /// Stuck sagas: order and reason.
    pub stuck: Vec<(String, String)>,
    /// What the cut transitions turned out to be.
    pub cuts: CutSummary,
}

impl Findings {
    /// Violations per invariant (every invariant listed, zeros included).
    #[must_use]
    pub fn per_invariant(&self) -> BTreeMap<&'static str, usize> {
        let mut counts: BTreeMap<&'static str, usize> =
            INVARIANTS.iter().map(|i| (*i, 0)).collect();
        for v in &self.violations {
            *counts.entry(v.invariant).or_default() += 1;
        }
        counts
    }
}

/// Checks I1 to I7 against `facts`.
#[must_use]
pub fn check(facts: &Facts) -> Findings {
    let mut f = Findings {
        cuts: CutSummary::of(&facts.cuts),
        ..Findings::default()
    };
    let mut v = facts.ledger_violations.clone();
    finished(facts, &mut f, &mut v);
    delivered(facts, &mut v);
    compensations_in_ledgers(facts, &mut v);
    compensations_in_history(facts, &mut v);
    zombies(facts, &mut v);
    ambiguous_commits(facts, &mut v);
    f.violations = v;
    f
}

/// I4: every saga finished.
fn finished(facts: &Facts, f: &mut Findings, v: &mut Vec<Violation>) {
    if !facts.quiesced {
        v.push(violation(
            "I4",
            None,
            "the system did not quiesce within the bound after the last fault".into(),
        ));
    }
    for i in facts.instances.values() {
        *f.outcomes.entry(i.status.to_string()).or_default() += 1;
        if !i.status.is_terminal() {
            let reason = i.stuck_reason.clone().unwrap_or_default();
            if i.status == Status::Stuck {
                f.stuck.push((i.order.clone(), reason.clone()));
            }
            v.push(violation(
                "I4",
                Some(&i.order),
                format!("saga is {} {reason}", i.status),
            ));
        }
    }
}

/// I5: what was committed was delivered; nothing else was; nothing left.
fn delivered(facts: &Facts, v: &mut Vec<Violation>) {
    let orders: HashMap<SagaId, &str> = facts
        .instances
        .values()
        .map(|i| (i.id, i.order.as_str()))
        .collect();
    let committed: HashMap<MessageId, Option<&str>> = facts
        .committed
        .iter()
        .map(|c| (c.id, c.saga.and_then(|s| orders.get(&s).copied())))
        .collect();
    let delivered: HashSet<MessageId> = facts.delivered.iter().map(|(id, _)| *id).collect();
    let mut missing: Vec<_> = committed
        .iter()
        .filter(|(id, _)| !delivered.contains(id))
        .collect();
    missing.sort_by_key(|(id, _)| id.as_uuid());
    for (id, order) in missing {
        v.push(violation(
            "I5",
            *order,
            format!("committed message {id} was never delivered"),
        ));
    }
    for (id, order) in &facts.delivered {
        if !committed.contains_key(id) {
            v.push(violation(
                "I5",
                Some(order),
                format!("message {id} was delivered but never committed"),
            ));
        }
    }
    for l in &facts.left {
        v.push(violation(
            "I5",
            None,
            format!(
                "message {} ({}) {}: {}",
                l.id,
                l.topic,
                if l.dead {
                    "was dead-lettered"
                } else {
                    "is still undelivered"
                },
                l.last_error
            ),
        ));
    }
}

/// I6 in the ledgers: undo only what was done before, releases before
/// refunds.
fn compensations_in_ledgers(facts: &Facts, v: &mut Vec<Violation>) {
    for (order, effects) in &facts.effects {
        let done_before = |undo: &Effect, kind: EffectKind| {
            effects
                .iter()
                .any(|e| e.kind == kind && e.of == undo.of && e.sku == undo.sku && e.seq < undo.seq)
        };
        for e in effects {
            let (needs, what) = match e.kind {
                EffectKind::Refund => (EffectKind::Charge, "a refund of a charge"),
                EffectKind::Release => (EffectKind::Deduct, "a release of stock"),
                EffectKind::Charge | EffectKind::Deduct => continue,
            };
            if !done_before(e, needs) {
                let sku = e
                    .sku
                    .as_deref()
                    .map(|s| format!(", {s}"))
                    .unwrap_or_default();
                v.push(violation(
                    "I6",
                    Some(order),
                    format!("{what} never made before it ({}{sku})", e.of),
                ));
            }
        }
        // Reverse order: inventory was reserved after payment was charged,
        // so it is released before the payment is refunded.
        let last_release = effects
            .iter()
            .filter(|e| e.kind == EffectKind::Release)
            .map(|e| e.at)
            .max();
        let first_refund = effects
            .iter()
            .filter(|e| e.kind == EffectKind::Refund)
            .map(|e| e.at)
            .min();
        if let (Some(release), Some(refund)) = (last_release, first_refund)
            && refund <= release
        {
            v.push(violation(
                "I6",
                Some(order),
                "the payment was refunded before the stock was released (compensations out of reverse order)"
                    .into(),
            ));
        }
    }
}

/// I6 in the engine's history.
fn compensations_in_history(facts: &Facts, v: &mut Vec<Violation>) {
    let index = |step: &StepName| STEPS.iter().position(|s| *s == step.as_str());
    for i in facts.instances.values() {
        let order = Some(i.order.as_str());
        let started: BTreeSet<usize> = i
            .history
            .iter()
            .filter(|h| h.direction == Direction::Forward && h.outcome != Outcome::Created)
            .filter_map(|h| index(&h.step))
            .collect();
        let compensated: Vec<usize> = i
            .history
            .iter()
            .filter(|h| h.direction == Direction::Compensate && h.outcome == Outcome::Succeeded)
            .filter_map(|h| index(&h.step))
            .collect();
        for c in &compensated {
            if !started.contains(c) {
                v.push(violation(
                    "I6",
                    order,
                    format!("{} was compensated but never started", STEPS[*c]),
                ));
            }
        }
        if compensated.windows(2).any(|w| w[1] >= w[0]) {
            v.push(violation(
                "I6",
                order,
                format!(
                    "compensations out of reverse order: {:?}",
                    compensated.iter().map(|c| STEPS[*c]).collect::<Vec<_>>()
                ),
            ));
        }
        let mut results: BTreeMap<(String, Direction), usize> = BTreeMap::new();
        for h in i.history.iter().filter(|h| h.outcome == Outcome::Succeeded) {
            *results
                .entry((h.step.to_string(), h.direction))
                .or_default() += 1;
        }
        for ((step, direction), n) in results {
            if n > 1 {
                v.push(violation(
                    "I6",
                    order,
                    format!("the result of {step} ({direction}) was recorded {n} times"),
                ));
            }
        }
        let mut attempts: BTreeMap<(String, Direction, u32, String), usize> = BTreeMap::new();
        for h in i.history.iter().filter(|h| h.outcome != Outcome::Created) {
            *attempts
                .entry((
                    h.step.to_string(),
                    h.direction,
                    h.attempt,
                    format!("{:?}", h.started_at),
                ))
                .or_default() += 1;
        }
        for ((step, direction, attempt, _), n) in attempts {
            if n > 1 {
                v.push(violation(
                    "I6",
                    order,
                    format!("attempt {attempt} of {step} ({direction}) was recorded {n} times"),
                ));
            }
        }
    }
}

/// I6: no zombie's stale result accepted.
fn zombies(facts: &Facts, v: &mut Vec<Violation>) {
    for z in &facts.zombies {
        // Without a takeover the lease was still the zombie's to use: a
        // late write is then no one else's loss.
        if z.takeover && z.record_committed {
            v.push(violation(
                "I6",
                Some(&z.order),
                format!(
                    "a frozen worker's result ({:?}) was accepted after another worker had taken its saga over",
                    z.at
                ),
            ));
        }
    }
}

/// I7: every cut transition resolved, and counted by its worker.
///
/// A worker counts an ambiguity once per write of a transition, not once
/// per cut: when the same write is cut again before it gets through (cuts
/// queued during an outage fire back to back on whatever transition comes
/// next), the later cuts find it already "not committed" and add nothing.
/// And a write first found not committed that then turns out to have
/// committed late moves from one count to the other. So each worker is
/// held to two lower bounds over its distinct cut transitions: as many
/// "committed" as transitions committed at one of their cuts, and as many
/// resolved either way as transitions cut.
fn ambiguous_commits(facts: &Facts, v: &mut Vec<Violation>) {
    // Per worker, per cut transition: whether one of its cuts committed.
    let mut per_worker: BTreeMap<&str, BTreeMap<Uuid, bool>> = BTreeMap::new();
    for c in &facts.cuts {
        let order = c.order.as_deref();
        let Some(transition) = c.transition else {
            v.push(violation(
                "I7",
                order,
                "a cut fell on a statement whose transition could not be identified".into(),
            ));
            continue;
        };
        if !c.after && c.committed_at_cut {
            v.push(violation(
                "I7",
                order,
                format!("transition {transition} was cut before it was sent, yet committed"),
            ));
        }
        match order.and_then(|o| facts.instances.get(o)) {
            None => v.push(violation(
                "I7",
                order,
                format!("transition {transition} was cut on a saga that does not exist"),
            )),
            Some(i) if !i.status.is_terminal() => v.push(violation(
                "I7",
                order,
                format!(
                    "transition {transition} was cut and its saga never moved on: it is {}",
                    i.status
                ),
            )),
            Some(_) => {}
        }
        if let Some(worker) = &c.worker {
            *per_worker
                .entry(worker.as_str())
                .or_default()
                .entry(transition)
                .or_default() |= c.committed_at_cut;
        }
    }
    for w in facts.workers.iter().filter(|w| w.survived) {
        let c = &w.counts;
        if c.ambiguous_unresolved > 0 {
            v.push(violation(
                "I7",
                None,
                format!(
                    "worker {} left {} ambiguous commits unresolved",
                    w.name, c.ambiguous_unresolved
                ),
            ));
        }
        let (cut, committed) = per_worker.get(w.name.as_str()).map_or((0, 0), |t| {
            (t.len() as u64, t.values().filter(|c| **c).count() as u64)
        });
        let resolved = c.ambiguous_committed + c.ambiguous_not_committed;
        if c.ambiguous_committed < committed || resolved < cut {
            v.push(violation(
                "I7",
                None,
                format!(
                    "worker {} resolved {} ambiguous commits as committed and {} as not, \
                     but {cut} of its transitions were cut and {committed} of them committed at a cut",
                    w.name, c.ambiguous_committed, c.ambiguous_not_committed
                ),
            ));
        }
    }
}

/// Reads the instances with their histories.
pub async fn instances(
    deployment: &Deployment,
) -> Result<BTreeMap<String, Instance>, checkout::Error> {
    let db = deployment.pool.get().await?;
    let s = deployment.schemas.saga.quoted();
    let mut out = BTreeMap::new();
    let mut by_id = HashMap::new();
    for row in db
        .query(
            &format!("SELECT id, start_key, status, stuck_reason FROM {s}.saga_instances"),
            &[],
        )
        .await?
    {
        let id = SagaId::from_uuid(row.get(0));
        let order: String = row.get(1);
        let status: Status = row
            .get::<_, &str>(2)
            .parse()
            .map_err(saga_core::Error::from)?;
        by_id.insert(id, order.clone());
        out.insert(
            order.clone(),
            Instance {
                id,
                order,
                status,
                stuck_reason: row.get(3),
                history: Vec::new(),
            },
        );
    }
    for row in db
        .query(
            &format!(
                "SELECT saga_id, transition_id, step, direction, attempt, outcome, error,
                    from_status, to_status, started_at, finished_at
                 FROM {s}.saga_history ORDER BY saga_id, seq"
            ),
            &[],
        )
        .await?
    {
        let id = SagaId::from_uuid(row.get(0));
        let Some(order) = by_id.get(&id) else {
            continue;
        };
        let parse_status = |v: Option<&str>| v.map(|v| v.parse::<Status>()).transpose();
        let entry = HistoryEntry {
            transition_id: saga_core::TransitionId::from_uuid(row.get(1)),
            step: StepName::new(row.get::<_, &str>(2))?,
            direction: row.get::<_, &str>(3).parse()?,
            attempt: u32::try_from(row.get::<_, i32>(4)).unwrap_or(0),
            outcome: row.get::<_, &str>(5).parse()?,
            error: row.get(6),
            from_status: parse_status(row.get(7))?,
            to_status: row.get::<_, &str>(8).parse()?,
            started_at: saga_core::Timestamp::from_system_time(row.get(9)),
            finished_at: saga_core::Timestamp::from_system_time(row.get(10)),
        };
        if let Some(instance) = out.get_mut(order) {
            instance.history.push(entry);
        }
    }
    Ok(out)
}

/// Installs the harness's own records: a copy of every outbox row and
/// history row inserted, taken by triggers inside the inserting
/// transaction (so a copy exists exactly when the insert committed), with
/// the port of the session that wrote it.
pub async fn install_records(deployment: &Deployment) -> Result<(), checkout::Error> {
    let db = deployment.pool.get().await?;
    let s = deployment.schemas.saga.quoted();
    let h = HARNESS_SCHEMA;
    db.batch_execute(&format!(
        "CREATE SCHEMA {h};
         CREATE TABLE {h}.outbox_inserts (
             id      uuid NOT NULL,
             saga_id uuid,
             topic   text NOT NULL
         );
         CREATE FUNCTION {h}.copy_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             INSERT INTO {h}.outbox_inserts VALUES (NEW.id, NEW.saga_id, NEW.topic);
             RETURN NULL;
         END $$;
         CREATE TRIGGER chaos_copy_outbox AFTER INSERT ON {s}.outbox
             FOR EACH ROW EXECUTE FUNCTION {h}.copy_outbox();
         CREATE TABLE {h}.history_inserts (
             transition_id uuid NOT NULL,
             saga_id       uuid NOT NULL,
             client_port   int,
             application   text
         );
         CREATE FUNCTION {h}.copy_history() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             INSERT INTO {h}.history_inserts VALUES (NEW.transition_id, NEW.saga_id,
                 inet_client_port(), current_setting('application_name'));
             RETURN NULL;
         END $$;
         CREATE TRIGGER chaos_copy_history AFTER INSERT ON {s}.saga_history
             FOR EACH ROW EXECUTE FUNCTION {h}.copy_history();"
    ))
    .await?;
    Ok(())
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

/// Reads every fact the checks need.
pub async fn gather(
    deployment: &Deployment,
    quiesced: bool,
    recorded: Recorded,
) -> Result<Facts, checkout::Error> {
    let audit = deployment.audit().await?;
    let ledger_violations = audit
        .violations
        .iter()
        .map(|violation| {
            let text = violation.to_string();
            let detail = text
                .strip_prefix(violation.invariant())
                .map_or(text.clone(), |rest| rest.trim_start().to_owned());
            Violation {
                invariant: violation.invariant(),
                order: violation.order().map(str::to_owned),
                detail,
            }
        })
        .collect();
    let instances = instances(deployment).await?;
    let db = deployment.pool.get().await?;
    let schemas = &deployment.schemas;
    let h = HARNESS_SCHEMA;

    let committed = db
        .query(&format!("SELECT id, saga_id FROM {h}.outbox_inserts"), &[])
        .await?
        .iter()
        .map(|r| Committed {
            id: MessageId::from_uuid(r.get(0)),
            saga: r.get::<_, Option<Uuid>>(1).map(SagaId::from_uuid),
        })
        .collect();
    let delivered = db
        .query(
            &format!(
                "SELECT message_id, order_id FROM {}.sent ORDER BY seq",
                schemas.email.quoted()
            ),
            &[],
        )
        .await?
        .iter()
        .map(|r| (MessageId::from_uuid(r.get(0)), r.get(1)))
        .collect();
    let left = db
        .query(
            &format!(
                "SELECT id, topic, coalesce(last_error, ''), dead_at IS NOT NULL FROM {}.outbox",
                schemas.saga.quoted()
            ),
            &[],
        )
        .await?
        .iter()
        .map(|r| Left {
            id: r.get(0),
            topic: r.get(1),
            last_error: r.get(2),
            dead: r.get(3),
        })
        .collect();

    let mut effects: BTreeMap<String, Vec<Effect>> = BTreeMap::new();
    for r in db
        .query(
            &format!(
                "SELECT kind, order_id, charge_id, seq, at FROM {}.ledger ORDER BY seq",
                schemas.payment.quoted()
            ),
            &[],
        )
        .await?
    {
        let kind = match r.get::<_, &str>(0) {
            "charge" => EffectKind::Charge,
            _ => EffectKind::Refund,
        };
        effects.entry(r.get(1)).or_default().push(Effect {
            kind,
            of: r.get(2),
            seq: r.get(3),
            at: r.get(4),
            sku: None,
        });
    }
    for r in db
        .query(
            &format!(
                "SELECT kind, order_id, reservation_key, seq, at, sku FROM {}.ledger ORDER BY seq",
                schemas.inventory.quoted()
            ),
            &[],
        )
        .await?
    {
        let kind = match r.get::<_, &str>(0) {
            "deduct" => EffectKind::Deduct,
            _ => EffectKind::Release,
        };
        effects.entry(r.get(1)).or_default().push(Effect {
            kind,
            of: r.get(2),
            seq: r.get(3),
            at: r.get(4),
            sku: Some(r.get(5)),
        });
    }

    let mut writes: HashMap<Uuid, Vec<Option<i32>>> = HashMap::new();
    for r in db
        .query(
            &format!("SELECT transition_id, client_port FROM {h}.history_inserts"),
            &[],
        )
        .await?
    {
        writes.entry(r.get(0)).or_default().push(r.get(1));
    }
    let orders: HashMap<Uuid, String> = instances
        .values()
        .map(|i| (i.id.as_uuid(), i.order.clone()))
        .collect();
    let cuts = recorded
        .cuts
        .iter()
        .map(|c| {
            let ports = c.transition.and_then(|t| writes.get(&t));
            CutFact {
                after: c.after,
                order: c.saga.and_then(|s| orders.get(&s).cloned()),
                transition: c.transition,
                worker: c.worker.clone(),
                committed_at_cut: ports.is_some_and(|ports| {
                    c.port.is_some() && ports.contains(&c.port.map(i32::from))
                }),
                in_history: ports.is_some(),
            }
        })
        .collect();
    let zombies = recorded
        .zombies
        .iter()
        .map(|z| ZombieFact {
            record_committed: written_by_its_session(z, &writes),
            ..z.clone()
        })
        .collect();
    Ok(Facts {
        quiesced,
        ledger_violations,
        instances,
        committed,
        delivered,
        left,
        effects,
        cuts,
        workers: recorded.workers,
        zombies,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use saga_core::{Timestamp, TransitionId};

    use super::*;

    const ORDER: &str = "order-1";

    fn saga() -> SagaId {
        SagaId::from_uuid(Uuid::from_u128(1))
    }

    fn entry(step: &str, direction: Direction, attempt: u32, outcome: Outcome) -> HistoryEntry {
        let at = Timestamp::from_system_time(
            SystemTime::UNIX_EPOCH + Duration::from_secs(u64::from(attempt) + 100),
        );
        HistoryEntry {
            transition_id: TransitionId::new(),
            step: StepName::new(step).expect("a step name"),
            direction,
            attempt,
            outcome,
            error: None,
            from_status: None,
            to_status: Status::Running,
            started_at: at,
            finished_at: at,
        }
    }

    fn instance(status: Status, history: Vec<HistoryEntry>) -> Instance {
        Instance {
            id: saga(),
            order: ORDER.into(),
            status,
            stuck_reason: None,
            history,
        }
    }

    /// A saga that completed cleanly, its message committed and delivered.
    fn clean() -> Facts {
        use Direction::Forward;
        let history = vec![
            entry("validate_order", Forward, 0, Outcome::Created),
            entry("validate_order", Forward, 1, Outcome::Succeeded),
            entry("charge_payment", Forward, 1, Outcome::Succeeded),
            entry("reserve_inventory", Forward, 1, Outcome::Succeeded),
            entry("confirm_order", Forward, 1, Outcome::Succeeded),
            entry("send_confirmation", Forward, 1, Outcome::Succeeded),
        ];
        let message = MessageId::from_uuid(Uuid::from_u128(7));
        Facts {
            quiesced: true,
            instances: [(ORDER.to_owned(), instance(Status::Completed, history))].into(),
            committed: vec![Committed {
                id: message,
                saga: Some(saga()),
            }],
            delivered: vec![(message, ORDER.into())],
            effects: [(
                ORDER.to_owned(),
                vec![
                    effect(EffectKind::Charge, 1, 1, 10),
                    effect(EffectKind::Deduct, 1, 2, 11),
                ],
            )]
            .into(),
            ..Facts::default()
        }
    }

    fn effect(kind: EffectKind, seq: i64, of: u128, at: u64) -> Effect {
        let inventory = matches!(kind, EffectKind::Deduct | EffectKind::Release);
        Effect {
            kind,
            seq,
            at: SystemTime::UNIX_EPOCH + Duration::from_secs(at),
            of: Uuid::from_u128(of),
            sku: inventory.then(|| "sku-1".to_owned()),
        }
    }

    /// The compensated version: reserve failed after the charge; stock
    /// released, then the payment refunded.
    fn compensated() -> Facts {
        use Direction::{Compensate, Forward};
        let mut f = clean();
        let history = vec![
            entry("validate_order", Forward, 0, Outcome::Created),
            entry("validate_order", Forward, 1, Outcome::Succeeded),
            entry("charge_payment", Forward, 1, Outcome::Succeeded),
            entry("reserve_inventory", Forward, 1, Outcome::FailedForGood),
            entry("reserve_inventory", Compensate, 1, Outcome::Succeeded),
            entry("charge_payment", Compensate, 1, Outcome::Succeeded),
        ];
        f.instances = [(ORDER.to_owned(), instance(Status::Compensated, history))].into();
        f.committed.clear();
        f.delivered.clear();
        f.effects = [(
            ORDER.to_owned(),
            vec![
                effect(EffectKind::Charge, 1, 1, 10),
                effect(EffectKind::Deduct, 1, 2, 11),
                effect(EffectKind::Release, 2, 2, 12),
                effect(EffectKind::Refund, 2, 1, 13),
            ],
        )]
        .into();
        f
    }

    fn fired(facts: &Facts) -> Vec<(&'static str, String)> {
        check(facts)
            .violations
            .into_iter()
            .map(|v| (v.invariant, v.detail))
            .collect()
    }

    fn assert_fires(facts: &Facts, invariant: &str, needle: &str) {
        let found = fired(facts);
        assert!(
            found
                .iter()
                .any(|(i, d)| *i == invariant && d.contains(needle)),
            "expected {invariant} «{needle}», got {found:?}"
        );
        assert!(
            found.iter().all(|(i, _)| *i == invariant),
            "only {invariant} should fire: {found:?}"
        );
    }

    #[test]
    fn clean_runs_have_no_violations() {
        assert_eq!(fired(&clean()), vec![]);
        assert_eq!(fired(&compensated()), vec![]);
        let findings = check(&clean());
        assert_eq!(findings.outcomes, [("completed".to_owned(), 1)].into());
        assert_eq!(findings.per_invariant().values().sum::<usize>(), 0);
        assert_eq!(findings.per_invariant().len(), 7);
    }

    #[test]
    fn ledger_violations_are_passed_through() {
        let mut f = clean();
        f.ledger_violations
            .push(violation("I1", Some(ORDER), "charged twice".into()));
        assert_fires(&f, "I1", "charged twice");
        assert_eq!(check(&f).per_invariant()["I1"], 1);
    }

    #[test]
    fn i4_fires_when_not_quiesced_or_a_saga_is_unfinished() {
        let mut f = clean();
        f.quiesced = false;
        assert_fires(&f, "I4", "did not quiesce");
        let mut f = clean();
        let i = f.instances.get_mut(ORDER).expect("the order");
        i.status = Status::Stuck;
        i.stuck_reason = Some("gave up in doubt".into());
        assert_fires(&f, "I4", "gave up in doubt");
        assert_eq!(
            check(&f).stuck,
            vec![(ORDER.to_owned(), "gave up in doubt".to_owned())]
        );
        let mut f = clean();
        f.instances.get_mut(ORDER).expect("the order").status = Status::Running;
        assert_fires(&f, "I4", "saga is running");
    }

    #[test]
    fn i5_fires_for_undelivered_uncommitted_and_leftover_messages() {
        let mut f = clean();
        f.delivered.clear();
        assert_fires(&f, "I5", "was never delivered");
        let mut f = clean();
        f.delivered
            .push((MessageId::from_uuid(Uuid::from_u128(99)), ORDER.into()));
        assert_fires(&f, "I5", "delivered but never committed");
        for (dead, text) in [(true, "dead-lettered"), (false, "still undelivered")] {
            let mut f = clean();
            f.left.push(Left {
                id: Uuid::from_u128(5),
                topic: "order.confirmed".into(),
                last_error: "503".into(),
                dead,
            });
            assert_fires(&f, "I5", text);
        }
    }

    #[test]
    fn i6_fires_for_undoing_in_the_ledgers_what_was_never_done() {
        let mut f = compensated();
        let effects = f.effects.get_mut(ORDER).expect("the order");
        effects.retain(|e| e.kind != EffectKind::Charge);
        assert_fires(&f, "I6", "a refund of a charge never made");
        let mut f = compensated();
        let effects = f.effects.get_mut(ORDER).expect("the order");
        effects.retain(|e| e.kind != EffectKind::Deduct);
        assert_fires(&f, "I6", "a release of stock never made");
        // Made, but after the undo.
        let mut f = compensated();
        let effects = f.effects.get_mut(ORDER).expect("the order");
        effects[0].seq = 3;
        assert_fires(&f, "I6", "a refund of a charge never made");
        // Another charge than the one refunded.
        let mut f = compensated();
        f.effects.get_mut(ORDER).expect("the order")[3].of = Uuid::from_u128(42);
        assert_fires(&f, "I6", "a refund of a charge never made");
    }

    #[test]
    fn i6_fires_for_a_refund_before_the_release_in_the_ledgers() {
        let mut f = compensated();
        let effects = f.effects.get_mut(ORDER).expect("the order");
        effects[3].at = effects[2].at - Duration::from_millis(1);
        assert_fires(&f, "I6", "refunded before the stock was released");
    }

    #[test]
    fn i6_fires_for_compensating_in_the_history_what_never_started() {
        let mut f = compensated();
        let i = f.instances.get_mut(ORDER).expect("the order");
        i.history.retain(|h| {
            !(h.step.as_str() == "reserve_inventory" && h.direction == Direction::Forward)
        });
        assert_fires(
            &f,
            "I6",
            "reserve_inventory was compensated but never started",
        );
    }

    #[test]
    fn i6_fires_for_compensations_in_the_history_out_of_reverse_order() {
        let mut f = compensated();
        let i = f.instances.get_mut(ORDER).expect("the order");
        i.history.swap(4, 5);
        assert_fires(&f, "I6", "compensations out of reverse order");
    }

    #[test]
    fn i6_fires_for_a_result_or_an_attempt_recorded_twice() {
        let mut f = clean();
        let i = f.instances.get_mut(ORDER).expect("the order");
        let mut again = entry("charge_payment", Direction::Forward, 2, Outcome::Succeeded);
        again.transition_id = TransitionId::new();
        i.history.push(again);
        assert_fires(
            &f,
            "I6",
            "the result of charge_payment (forward) was recorded 2 times",
        );
        let mut f = clean();
        let i = f.instances.get_mut(ORDER).expect("the order");
        let mut same_attempt = entry(
            "charge_payment",
            Direction::Forward,
            1,
            Outcome::RetryScheduled,
        );
        same_attempt.transition_id = TransitionId::new();
        i.history.insert(2, same_attempt);
        assert_fires(
            &f,
            "I6",
            "attempt 1 of charge_payment (forward) was recorded 2 times",
        );
    }

    fn zombie() -> ZombieFact {
        ZombieFact {
            order: ORDER.into(),
            at: ZombieAt::Record,
            frozen: true,
            takeover: true,
            record_sent: Some(Some(Uuid::from_u128(3))),
            record_port: Some(40_000),
            record_committed: false,
            refusal_reported: true,
        }
    }

    #[test]
    fn a_zombie_result_counts_as_written_only_if_its_own_session_wrote_it() {
        let z = zombie();
        let transition = Uuid::from_u128(3);
        let mut writes: HashMap<Uuid, Vec<Option<i32>>> = HashMap::new();
        assert!(!written_by_its_session(&z, &writes), "no row");
        // Its first send committed on another session (the reply was
        // lost); the copy held back and sent later was refused.
        writes.insert(transition, vec![Some(41_000)]);
        assert!(!written_by_its_session(&z, &writes));
        writes.insert(transition, vec![Some(41_000), Some(40_000)]);
        assert!(written_by_its_session(&z, &writes));
        let unknown_port = ZombieFact {
            record_port: None,
            ..zombie()
        };
        assert!(!written_by_its_session(&unknown_port, &writes));
    }

    #[test]
    fn i6_fires_for_a_zombie_result_accepted_and_refusals_are_told_apart() {
        let mut f = clean();
        f.zombies.push(zombie());
        assert_eq!(fired(&f), vec![]);
        assert_eq!(f.zombies[0].refused(), Some(RefusedAt::Record));
        let heartbeat = ZombieFact {
            record_sent: None,
            at: ZombieAt::Step,
            ..zombie()
        };
        assert_eq!(heartbeat.refused(), Some(RefusedAt::Heartbeat));
        for unverified in [
            ZombieFact {
                takeover: false,
                ..zombie()
            },
            ZombieFact {
                refusal_reported: false,
                ..zombie()
            },
            ZombieFact {
                frozen: false,
                ..zombie()
            },
        ] {
            assert_eq!(unverified.refused(), None);
        }
        f.zombies[0].record_committed = true;
        assert_eq!(f.zombies[0].refused(), None);
        assert_fires(
            &f,
            "I6",
            "was accepted after another worker had taken its saga over",
        );
        // Nobody took over: the late result is not a violation (nor a
        // verified fencing).
        f.zombies[0].takeover = false;
        assert_eq!(fired(&f), vec![]);
        assert_eq!(f.zombies[0].refused(), None);
    }

    fn cut(after: bool, committed_at_cut: bool) -> CutFact {
        cut_of(11, after, committed_at_cut)
    }

    fn cut_of(transition: u128, after: bool, committed_at_cut: bool) -> CutFact {
        CutFact {
            after,
            order: Some(ORDER.into()),
            transition: Some(Uuid::from_u128(transition)),
            worker: Some("w0".into()),
            committed_at_cut,
            in_history: true,
        }
    }

    fn survivor(committed: u64, not_committed: u64) -> WorkerFact {
        WorkerFact {
            name: "w0".into(),
            survived: true,
            counts: Counts {
                ambiguous_committed: committed,
                ambiguous_not_committed: not_committed,
                ..Counts::default()
            },
        }
    }

    #[test]
    fn cuts_are_summarised_from_the_database() {
        let mut dropped = cut(true, false);
        dropped.in_history = false;
        let f = Facts {
            cuts: vec![cut(true, true), cut_of(12, false, false), dropped],
            ..clean()
        };
        let s = check(&f).cuts;
        assert_eq!(
            s,
            CutSummary {
                transitions: 2,
                after: 2,
                before: 1,
                committed: 1,
                not_committed: 2,
                written_again: 1,
                dropped: 1,
            }
        );
    }

    #[test]
    fn i7_holds_for_resolved_cuts_counted_by_their_worker() {
        let mut f = clean();
        f.cuts = vec![cut_of(11, true, true), cut_of(12, false, false)];
        f.workers = vec![survivor(1, 1)];
        assert_eq!(fired(&f), vec![]);
        // One write cut three times before it got through: the worker
        // found it not committed once, and wrote it again.
        f.cuts = vec![
            cut_of(12, false, false),
            cut_of(12, true, false),
            cut_of(12, false, false),
        ];
        f.workers = vec![survivor(0, 1)];
        assert_eq!(fired(&f), vec![]);
        // Cut twice, and the second cut's statement committed late: the
        // worker's "not committed" became "committed".
        f.cuts = vec![cut_of(12, true, false), cut_of(12, true, true)];
        f.workers = vec![survivor(1, 0)];
        assert_eq!(fired(&f), vec![]);
        // A worker that did not survive is not held to its counters.
        f.workers = vec![WorkerFact {
            survived: false,
            ..survivor(0, 0)
        }];
        assert_eq!(fired(&f), vec![]);
    }

    #[test]
    fn i7_fires_for_each_unresolved_cut() {
        let mut f = clean();
        f.cuts = vec![CutFact {
            transition: None,
            ..cut(true, true)
        }];
        assert_fires(&f, "I7", "could not be identified");
        let mut f = clean();
        f.cuts = vec![cut(false, true)];
        assert_fires(&f, "I7", "cut before it was sent, yet committed");
        let mut f = clean();
        f.cuts = vec![CutFact {
            order: None,
            ..cut(true, true)
        }];
        assert_fires(&f, "I7", "does not exist");
        let mut f = clean();
        f.cuts = vec![cut(true, true)];
        f.instances.get_mut(ORDER).expect("the order").status = Status::Compensating;
        let found = fired(&f);
        assert!(
            found
                .iter()
                .any(|(i, d)| *i == "I7" && d.contains("never moved on")),
            "{found:?}"
        );
    }

    #[test]
    fn i7_fires_when_a_surviving_worker_miscounts_or_leaves_one_unresolved() {
        let mut f = clean();
        f.cuts = vec![cut_of(11, true, true), cut_of(12, false, false)];
        f.workers = vec![survivor(0, 2)];
        assert_fires(&f, "I7", "resolved 0 ambiguous commits as committed");
        f.workers = vec![survivor(1, 0)];
        assert_fires(
            &f,
            "I7",
            "2 of its transitions were cut and 1 of them committed at a cut",
        );
        // Three transitions, each cut once, counted as one.
        f.cuts = vec![
            cut_of(12, false, false),
            cut_of(13, true, false),
            cut_of(14, false, false),
        ];
        f.workers = vec![survivor(0, 1)];
        assert_fires(&f, "I7", "3 of its transitions were cut");
        f.workers = vec![WorkerFact {
            counts: Counts {
                ambiguous_unresolved: 2,
                ..survivor(1, 1).counts
            },
            ..survivor(1, 1)
        }];
        assert_fires(&f, "I7", "left 2 ambiguous commits unresolved");
    }
}
