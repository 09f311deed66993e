//! I6 in the engine's history: compensations only for started steps, in
//! reverse order; no step result recorded twice, no attempt recorded twice.

use std::collections::{BTreeMap, BTreeSet};

use saga_core::{Direction, Outcome, StepName};

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

#[cfg(test)]
mod tests {
    use saga_core::{Direction, Outcome, TransitionId};

    use crate::check::fixtures::{ORDER, assert_fires, clean, compensated, entry};

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
}
