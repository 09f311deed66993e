//! I9, fencing from ground truth: no result obtained from a downstream
//! service under a lease that had already ended is recorded, and no
//! step's service answer is counted by two leases.
//!
//! Two ground truths meet here, neither of them the engine's own history:
//!
//! - the services' request logs ([`ServiceCall`]): every call the payment
//!   and inventory services received, with the caller's lease token (the
//!   step passes [`StepContext::lease_token`](saga_core::StepContext::lease_token)),
//!   when it arrived, and whether it was answered from the ledger (its
//!   effect applied, or the stored reply replayed), committed with the
//!   effect;
//! - the harness's log of the saga rows ([`LeaseChange`]): a trigger copies
//!   every change of a row's lease token, in the order the row's writes
//!   committed (each takes the row's lock), with the step result written
//!   in the same transaction, if any.
//!
//! A lease *ends* at the first change away from it: its own result or
//! release, or another worker's claim (a takeover). With fencing on,
//! nothing is written under a lease after it ended. A zombie may still
//! *call* a service after its lease was taken over — it cannot know — and
//! that call may even be the one that applies the effect (the new lease's
//! call then gets the stored reply): the service's idempotency absorbs it,
//! and only the new lease's result is recorded. What must never happen:
//!
//! - a step result written under a lease that had already ended, by a
//!   lease the services had answered: an effect obtained by a fenced-off
//!   caller, counted;
//! - a step's success counted by two leases that were both answered for
//!   it: one effect, counted twice.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::SystemTime;

use saga_core::{Direction, Outcome};
use serde::Serialize;
use uuid::Uuid;

use super::{Facts, Violation, violation};

/// A change of a saga row's lease token, from the harness's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseChange {
    /// The saga's order.
    pub order: String,
    /// Its place in the log: on one row, the order the changes committed.
    pub seq: i64,
    /// When the change was made (the database's clock, before its commit).
    pub at: SystemTime,
    /// The lease before (the writer's, for a result or a release; the
    /// lapsed one, for a claim that took over).
    pub from: Option<Uuid>,
    /// The lease after (a claim's new token; none after a result).
    pub to: Option<Uuid>,
    /// The step result written in the same transaction, if any.
    pub result: Option<ResultWritten>,
}

/// A step result, as the harness's copy of the history insert has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResultWritten {
    /// The step.
    pub step: String,
    /// Its direction.
    pub direction: Direction,
    /// What came of it.
    pub outcome: Outcome,
}

/// How a service answered a call, from its own log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Answered {
    /// The first call with its key: the service decided its reply (and
    /// applied its effect, if any).
    Applied,
    /// The stored reply to an earlier call with its key was replayed.
    Replayed,
}

/// A call a downstream service received, from its request log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceCall {
    /// `payment` or `inventory`.
    pub service: &'static str,
    /// Its idempotency key.
    pub key: Uuid,
    /// The caller's lease token, if it sent one.
    pub lease: Option<Uuid>,
    /// When the service received it (the database's clock).
    pub received_at: SystemTime,
    /// How it was answered from the ledger; `None` if it was not (a 503,
    /// an error, a crash before the effect committed).
    pub answered: Option<Answered>,
}

/// What the services saw of leases that had already ended: zombies'
/// calls, which fencing does not prevent and idempotency absorbs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct LateCalls {
    /// Calls received after the caller's lease had ended.
    pub calls: u64,
    /// Of those, answered by applying their effect (the new lease's call
    /// then replayed it).
    pub applied: u64,
    /// Of those, answered with the stored reply.
    pub replayed: u64,
}

/// How each lease ended: the change away from it.
fn ends(changes: &[&LeaseChange]) -> HashMap<Uuid, usize> {
    let mut ended = HashMap::new();
    for (i, c) in changes.iter().enumerate() {
        if let Some(from) = c.from
            && c.to != Some(from)
        {
            ended.entry(from).or_insert(i);
        }
    }
    ended
}

/// Each order's lease changes, in the order they committed.
fn by_order(facts: &Facts) -> BTreeMap<&str, Vec<&LeaseChange>> {
    let mut out: BTreeMap<&str, Vec<&LeaseChange>> = BTreeMap::new();
    for c in &facts.leases {
        out.entry(c.order.as_str()).or_default().push(c);
    }
    for changes in out.values_mut() {
        changes.sort_by_key(|c| c.seq);
    }
    out
}

/// The answered calls, by lease.
fn answered_by_lease(facts: &Facts) -> HashMap<Uuid, Vec<&ServiceCall>> {
    let mut out: HashMap<Uuid, Vec<&ServiceCall>> = HashMap::new();
    for call in &facts.calls {
        if let (Some(lease), Some(_)) = (call.lease, call.answered) {
            out.entry(lease).or_default().push(call);
        }
    }
    out
}

fn describe(calls: &[&ServiceCall]) -> String {
    calls
        .iter()
        .map(|c| {
            let how = match c.answered {
                Some(Answered::Applied) => "applied",
                Some(Answered::Replayed) => "replayed",
                None => "not answered",
            };
            format!("{} {how}", c.service)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// I9: no service answer to an ended lease counted, none counted twice.
pub(super) fn fencing(facts: &Facts, v: &mut Vec<Violation>) {
    let answered = answered_by_lease(facts);
    for (order, changes) in by_order(facts) {
        let ended = ends(&changes);
        let mut succeeded: BTreeMap<(&str, Direction), HashSet<Uuid>> = BTreeMap::new();
        for (i, c) in changes.iter().enumerate() {
            let (Some(writer), Some(result)) = (c.from, &c.result) else {
                continue;
            };
            let Some(calls) = answered.get(&writer) else {
                continue;
            };
            if let Some(&end) = ended.get(&writer)
                && end < i
            {
                let how = match changes[end].to {
                    Some(_) => "taken over by another worker's claim",
                    None => "ended by its own earlier write",
                };
                v.push(violation(
                    "I9",
                    Some(order),
                    format!(
                        "a result obtained under a fenced-off lease was recorded: {} {} {:?} \
                         written under lease {writer} (answered by {}) after that lease had \
                         been {how}",
                        result.step,
                        result.direction,
                        result.outcome,
                        describe(calls),
                    ),
                ));
            }
            if result.outcome == Outcome::Succeeded {
                succeeded
                    .entry((result.step.as_str(), result.direction))
                    .or_default()
                    .insert(writer);
            }
        }
        for ((step, direction), leases) in succeeded {
            if leases.len() > 1 {
                v.push(violation(
                    "I9",
                    Some(order),
                    format!(
                        "one step's service answer was counted by {} leases: {step} {direction} \
                         recorded as succeeded under each, every one of them answered by the \
                         service",
                        leases.len()
                    ),
                ));
            }
        }
    }
}

/// The calls the services received from leases that had already ended.
pub(super) fn late_calls(facts: &Facts) -> LateCalls {
    let mut ended_at: HashMap<Uuid, SystemTime> = HashMap::new();
    for changes in by_order(facts).values() {
        for (lease, i) in ends(changes) {
            ended_at.insert(lease, changes[i].at);
        }
    }
    let mut late = LateCalls::default();
    for call in &facts.calls {
        let Some(end) = call.lease.and_then(|l| ended_at.get(&l)) else {
            continue;
        };
        if call.received_at > *end {
            late.calls += 1;
            match call.answered {
                Some(Answered::Applied) => late.applied += 1,
                Some(Answered::Replayed) => late.replayed += 1,
                None => {}
            }
        }
    }
    late
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use saga_core::{Direction, Outcome};
    use uuid::Uuid;

    use super::*;
    use crate::check::fixtures::{ORDER, assert_fires, clean, fired};

    const ZOMBIE: Uuid = Uuid::from_u128(0xa);
    const TAKER: Uuid = Uuid::from_u128(0xb);
    const KEY: Uuid = Uuid::from_u128(0xc);

    fn at(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(s)
    }

    fn change(seq: i64, from: Option<Uuid>, to: Option<Uuid>) -> LeaseChange {
        LeaseChange {
            order: ORDER.into(),
            seq,
            at: at(u64::try_from(seq).unwrap() * 10),
            from,
            to,
            result: None,
        }
    }

    fn charged(seq: i64, writer: Uuid, outcome: Outcome) -> LeaseChange {
        LeaseChange {
            result: Some(ResultWritten {
                step: "charge_payment".into(),
                direction: Direction::Forward,
                outcome,
            }),
            ..change(seq, Some(writer), None)
        }
    }

    fn call(lease: Uuid, received: u64, answered: Option<Answered>) -> ServiceCall {
        ServiceCall {
            service: "payment",
            key: KEY,
            lease: Some(lease),
            received_at: at(received),
            answered,
        }
    }

    /// The zombie claims the charge (seq 1), its lease lapses and the
    /// taker claims the saga (seq 2: the zombie's lease ends there), then
    /// the taker's result (seq 3).
    fn takeover(calls: Vec<ServiceCall>) -> Facts {
        Facts {
            leases: vec![
                change(1, None, Some(ZOMBIE)),
                change(2, Some(ZOMBIE), Some(TAKER)),
                charged(3, TAKER, Outcome::Succeeded),
            ],
            calls,
            ..clean()
        }
    }

    #[test]
    fn a_zombie_call_absorbed_by_idempotency_is_no_violation() {
        // The zombie's call arrives after the takeover (at 25 s, the
        // takeover at 20 s); the taker's call is replayed, and only the
        // taker's result is recorded.
        let f = takeover(vec![
            call(ZOMBIE, 5, Some(Answered::Applied)),
            call(ZOMBIE, 25, Some(Answered::Replayed)),
            call(TAKER, 26, Some(Answered::Replayed)),
        ]);
        assert_eq!(fired(&f), vec![]);
        assert_eq!(
            late_calls(&f),
            LateCalls {
                calls: 1,
                applied: 0,
                replayed: 1
            }
        );
    }

    #[test]
    fn a_zombie_call_that_applied_the_effect_late_is_no_violation_either() {
        // The zombie's late call is the first with its key, so it applies
        // the charge; the taker's call gets the stored reply, and only the
        // taker's result counts.
        let f = takeover(vec![
            call(ZOMBIE, 25, Some(Answered::Applied)),
            call(TAKER, 26, Some(Answered::Replayed)),
        ]);
        assert_eq!(fired(&f), vec![]);
        assert_eq!(late_calls(&f).applied, 1);
    }

    #[test]
    fn i9_fires_for_a_result_recorded_under_a_lease_taken_over() {
        // Unfenced: the zombie's lease is pointed back at it (seq 4) and
        // its result written under it (seq 5), after the takeover.
        let mut f = takeover(vec![
            call(ZOMBIE, 5, Some(Answered::Applied)),
            call(TAKER, 26, Some(Answered::Replayed)),
        ]);
        f.leases.push(change(4, None, Some(ZOMBIE)));
        f.leases.push(charged(5, ZOMBIE, Outcome::Succeeded));
        assert_fires(&f, "I9", "written under lease");
        assert_fires(&f, "I9", "taken over by another worker's claim");
        assert_fires(&f, "I9", "counted by 2 leases");
        assert_eq!(fired(&f).len(), 2);
    }

    #[test]
    fn i9_fires_for_a_write_after_the_lease_ended_by_its_own_result() {
        let f = Facts {
            leases: vec![
                change(1, None, Some(ZOMBIE)),
                charged(2, ZOMBIE, Outcome::RetryScheduled),
                change(3, None, Some(ZOMBIE)),
                charged(4, ZOMBIE, Outcome::RetryScheduled),
            ],
            calls: vec![call(ZOMBIE, 5, Some(Answered::Applied))],
            ..clean()
        };
        assert_fires(&f, "I9", "ended by its own earlier write");
    }

    #[test]
    fn only_answered_calls_make_an_effect_and_retries_are_not_counted_twice() {
        // A stale write by a lease no service answered is not this
        // invariant's (I6 sees it in the history): no effect was counted.
        let mut f = takeover(vec![call(ZOMBIE, 5, None)]);
        f.leases.push(change(4, None, Some(ZOMBIE)));
        f.leases.push(charged(5, ZOMBIE, Outcome::Succeeded));
        assert_eq!(fired(&f), vec![]);
        // A failure recorded, then a success by another lease: both
        // answered, counted once.
        let f = Facts {
            leases: vec![
                change(1, None, Some(ZOMBIE)),
                charged(2, ZOMBIE, Outcome::RetryScheduled),
                change(3, None, Some(TAKER)),
                charged(4, TAKER, Outcome::Succeeded),
            ],
            calls: vec![
                call(ZOMBIE, 5, Some(Answered::Applied)),
                call(TAKER, 35, Some(Answered::Replayed)),
            ],
            ..clean()
        };
        assert_eq!(fired(&f), vec![]);
        assert_eq!(late_calls(&f), LateCalls::default());
    }
}
