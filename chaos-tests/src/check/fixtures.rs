//! Crafted facts for the checks' unit tests: a clean run and a
//! compensated one, history entries, effects, zombies, cuts and workers
//! to break them with, and the assertion that exactly one invariant fires.

use std::time::{Duration, SystemTime};

use checkout::demo::Scenario;
use checkout::shop::OrderStatus;
use saga_core::{
    Direction, HistoryEntry, MessageId, Outcome, SagaId, Status, StepName, Timestamp, TransitionId,
};
use uuid::Uuid;

use super::{
    Committed, CutFact, Effect, EffectKind, Facts, Instance, WorkerFact, ZombieFact, check,
};
use crate::schedule::ZombieAt;
use crate::worker::Counts;

pub(super) const ORDER: &str = "order-1";

pub(super) fn saga() -> SagaId {
    SagaId::from_uuid(Uuid::from_u128(1))
}

pub(super) fn entry(
    step: &str,
    direction: Direction,
    attempt: u32,
    outcome: Outcome,
) -> HistoryEntry {
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

pub(super) fn instance(status: Status, history: Vec<HistoryEntry>) -> Instance {
    Instance {
        id: saga(),
        order: ORDER.into(),
        status,
        stuck_reason: None,
        history,
    }
}

/// A saga that completed cleanly, its message committed and delivered:
/// an `Ok` order, confirmed in the shop.
pub(super) fn clean() -> Facts {
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
        scenarios: [(ORDER.to_owned(), Scenario::Ok)].into(),
        shop: [(ORDER.to_owned(), OrderStatus::Confirmed)].into(),
        ..Facts::default()
    }
}

pub(super) fn effect(kind: EffectKind, seq: i64, of: u128, at: u64) -> Effect {
    let inventory = matches!(kind, EffectKind::Deduct | EffectKind::Release);
    Effect {
        kind,
        seq,
        at: SystemTime::UNIX_EPOCH + Duration::from_secs(at),
        of: Uuid::from_u128(of),
        sku: inventory.then(|| "sku-1".to_owned()),
        amount: if inventory { 2 } else { 1_000 },
    }
}

/// The compensated version: reserve failed after the charge (an item out
/// of stock); stock released, then the payment refunded; the shop's order
/// still pending.
pub(super) fn compensated() -> Facts {
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
    f.scenarios = [(ORDER.to_owned(), Scenario::OutOfStock)].into();
    f.shop = [(ORDER.to_owned(), OrderStatus::Pending)].into();
    f
}

pub(super) fn fired(facts: &Facts) -> Vec<(&'static str, String)> {
    check(facts)
        .violations
        .into_iter()
        .map(|v| (v.invariant, v.detail))
        .collect()
}

pub(super) fn assert_fires(facts: &Facts, invariant: &str, needle: &str) {
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

pub(super) fn zombie() -> ZombieFact {
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

pub(super) fn cut(after: bool, committed_at_cut: bool) -> CutFact {
    cut_of(11, after, committed_at_cut)
}

pub(super) fn cut_of(transition: u128, after: bool, committed_at_cut: bool) -> CutFact {
    CutFact {
        after,
        order: Some(ORDER.into()),
        transition: Some(Uuid::from_u128(transition)),
        worker: Some("w0".into()),
        committed_at_cut,
        in_history: true,
        written_again_at: None,
    }
}

pub(super) fn survivor(committed: u64, not_committed: u64) -> WorkerFact {
    WorkerFact {
        name: "w0".into(),
        survived: true,
        counts: Counts {
            ambiguous_committed: committed,
            ambiguous_not_committed: not_committed,
            ..Counts::default()
        },
        reported_at: None,
    }
}
