//! I6 in the engine's history: compensations only for started steps, in
//! reverse order; no step result recorded twice, no attempt recorded twice.

use std::collections::{BTreeMap, BTreeSet};

use saga_core::{Direction, HistoryEntry, Outcome, StepName};

use super::{Facts, Violation, violation};

/// The checkout saga's steps, in order.
const STEPS: [&str; 5] = [
    "validate_order",
    "charge_payment",
    "reserve_inventory",
    "confirm_order",
    "send_confirmation",
];

/// I6 in the engine's history.
pub(super) fn compensations_in_history(facts: &Facts, v: &mut Vec<Violation>) {
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
        for ((step, direction, attempt), n) in attempts_recorded(&i.history) {
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

/// How many rows record each attempt of a saga's steps.
///
/// An attempt is identified by its saga (the history is one saga's), its
/// step, its direction and its number, whoever wrote it and whenever it
/// started: the claim numbers it, so two rows for one number are one
/// attempt recorded twice (by two workers, or twice by one). Only the rows
/// that end an attempt count (succeeded, retry scheduled, failed for
/// good): a snoozed attempt is given back, so the next claim reuses its
/// number, and the engine's and operators' rows (created, parked,
/// resumed, cancelled) are not attempts. An operator's resume starts the
/// budget afresh, so numbers count again from there.
fn attempts_recorded(history: &[HistoryEntry]) -> BTreeMap<(String, Direction, u32), usize> {
    let mut epoch = 0u32;
    let mut per_epoch: BTreeMap<(u32, String, Direction, u32), usize> = BTreeMap::new();
    for h in history {
        match h.outcome {
            Outcome::Resumed => epoch += 1,
            Outcome::Succeeded | Outcome::RetryScheduled | Outcome::FailedForGood => {
                *per_epoch
                    .entry((epoch, h.step.to_string(), h.direction, h.attempt))
                    .or_default() += 1;
            }
            _ => {}
        }
    }
    let mut out: BTreeMap<(String, Direction, u32), usize> = BTreeMap::new();
    for ((_, step, direction, attempt), n) in per_epoch {
        let most = out.entry((step, direction, attempt)).or_default();
        *most = (*most).max(n);
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use saga_core::{Direction, Outcome, Timestamp, TransitionId};

    use crate::check::fixtures::{ORDER, assert_fires, clean, compensated, entry, fired};

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

    #[test]
    fn i6_fires_for_one_attempt_recorded_by_two_workers_at_different_times() {
        // Two workers ran attempt 1 of charge_payment (a lease taken over
        // without a new claim, say): each started it at its own moment and
        // recorded its own outcome.
        let mut f = clean();
        let i = f.instances.get_mut(ORDER).expect("the order");
        let mut other = entry(
            "charge_payment",
            Direction::Forward,
            1,
            Outcome::RetryScheduled,
        );
        other.started_at =
            Timestamp::from_system_time(SystemTime::UNIX_EPOCH + Duration::from_secs(7));
        other.finished_at = other.started_at;
        i.history.insert(2, other);
        assert_fires(
            &f,
            "I6",
            "attempt 1 of charge_payment (forward) was recorded 2 times",
        );
        // The same in the compensation of a step.
        let mut f = compensated();
        let i = f.instances.get_mut(ORDER).expect("the order");
        let mut again = entry(
            "charge_payment",
            Direction::Compensate,
            1,
            Outcome::RetryScheduled,
        );
        again.started_at =
            Timestamp::from_system_time(SystemTime::UNIX_EPOCH + Duration::from_secs(9));
        i.history.insert(5, again);
        assert_fires(
            &f,
            "I6",
            "attempt 1 of charge_payment (compensate) was recorded 2 times",
        );
    }

    #[test]
    fn i6_holds_for_attempts_numbered_again_legitimately() {
        // A snoozed attempt is given back: the next claim reuses its number.
        let mut f = clean();
        let i = f.instances.get_mut(ORDER).expect("the order");
        i.history.insert(
            2,
            entry("charge_payment", Direction::Forward, 1, Outcome::Snoozed),
        );
        assert_eq!(fired(&f), vec![]);
        // Retries: one row per attempt number.
        let mut f = clean();
        let i = f.instances.get_mut(ORDER).expect("the order");
        i.history.insert(
            2,
            entry(
                "charge_payment",
                Direction::Forward,
                1,
                Outcome::RetryScheduled,
            ),
        );
        i.history[3].attempt = 2;
        assert_eq!(fired(&f), vec![]);
        // Parked, then resumed by an operator: the budget starts afresh.
        let mut f = clean();
        let i = f.instances.get_mut(ORDER).expect("the order");
        let rows = [
            entry(
                "charge_payment",
                Direction::Forward,
                1,
                Outcome::RetryScheduled,
            ),
            entry("charge_payment", Direction::Forward, 2, Outcome::Parked),
            entry("charge_payment", Direction::Forward, 2, Outcome::Resumed),
        ];
        for (k, row) in rows.into_iter().enumerate() {
            i.history.insert(2 + k, row);
        }
        assert_eq!(fired(&f), vec![]);
        // The same step forward and compensated: two attempts 1.
        assert_eq!(fired(&compensated()), vec![]);
    }
}
