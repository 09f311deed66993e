//! I1 and I2, amount by amount: each refund undoes one charge of its own
//! order, by the charge's id and for the charge's amount, and no charge is
//! refunded twice; each release undoes one deduction of its own order, by
//! the reservation and SKU and for the deducted quantity, and none is
//! released twice.
//!
//! The audit's I1 and I2 compare totals per order (charges − refunds,
//! stock conserved); two errors that offset each other — two partial
//! refunds of one charge, a refund of the wrong charge for the right sum —
//! balance the totals. These rules do not add up: they pair.

use std::collections::HashMap;

use uuid::Uuid;

use super::{Effect, EffectKind, Facts, Violation, violation};

/// What an undo is checked against: the order and amount of what it
/// undoes, and how many undos it has had.
struct Done<'a> {
    order: &'a str,
    amount: i64,
    undone: u32,
}

/// I1 and I2: every undo pairs with what it undoes.
pub(super) fn undo_matches(facts: &Facts, v: &mut Vec<Violation>) {
    pair(facts, EffectKind::Charge, EffectKind::Refund, "I1", v);
    pair(facts, EffectKind::Deduct, EffectKind::Release, "I2", v);
}

fn pair(
    facts: &Facts,
    done: EffectKind,
    undo: EffectKind,
    invariant: &'static str,
    v: &mut Vec<Violation>,
) {
    let key = |e: &Effect| (e.of, e.sku.clone());
    let mut made: HashMap<(Uuid, Option<String>), Done<'_>> = HashMap::new();
    for (order, effects) in &facts.effects {
        for e in effects.iter().filter(|e| e.kind == done) {
            made.insert(
                key(e),
                Done {
                    order,
                    amount: e.amount,
                    undone: 0,
                },
            );
        }
    }
    let (what, unit) = match undo {
        EffectKind::Refund => ("refund", "cents"),
        _ => ("release", "units"),
    };
    for (order, effects) in &facts.effects {
        for e in effects.iter().filter(|e| e.kind == undo) {
            let sku = e
                .sku
                .as_deref()
                .map(|s| format!(", {s}"))
                .unwrap_or_default();
            // An undo of nothing at all is I6's (undo only what was done
            // before).
            let Some(d) = made.get_mut(&key(e)) else {
                continue;
            };
            d.undone += 1;
            if d.order != order.as_str() {
                v.push(violation(
                    invariant,
                    Some(order),
                    format!(
                        "a {what} of {}{sku} undoes order {}'s, not this order's",
                        e.of, d.order
                    ),
                ));
            }
            if d.amount != e.amount {
                v.push(violation(
                    invariant,
                    Some(order),
                    format!(
                        "a {what} of {}{sku} is for {} {unit}, what it undoes for {}",
                        e.of, e.amount, d.amount
                    ),
                ));
            }
            if d.undone == 2 {
                v.push(violation(
                    invariant,
                    Some(order),
                    format!("{}{sku} undone more than once ({what}s)", e.of),
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::check::EffectKind;
    use crate::check::fixtures::{ORDER, assert_fires, clean, compensated, effect, fired};

    #[test]
    fn undos_that_pair_with_what_they_undo_pass() {
        assert_eq!(fired(&compensated()), vec![]);
        assert_eq!(fired(&clean()), vec![]);
    }

    #[test]
    fn i1_fires_for_two_partial_refunds_that_balance_the_total() {
        // Charged 1000 (the fixture's amount), refunded 400 + 600: the
        // totals balance, neither refund is the charge's.
        let mut f = compensated();
        let effects = f.effects.get_mut(ORDER).expect("the order");
        effects[3].amount = 400;
        let mut second = effect(EffectKind::Refund, 3, 1, 14);
        second.amount = 600;
        effects.push(second);
        assert_fires(&f, "I1", "is for 400 cents, what it undoes for 1000");
        assert_fires(&f, "I1", "is for 600 cents");
        assert_fires(&f, "I1", "undone more than once (refunds)");
    }

    #[test]
    fn i1_fires_for_a_refund_of_another_orders_charge_for_the_same_sum() {
        // Order 1 is refunded with order 2's charge (same amount): each
        // order's total balances, order 2 confirmed and charged, order 1
        // compensated and refunded. I6 sees the foreign refund too.
        let mut f = compensated();
        f.effects.get_mut(ORDER).expect("the order")[3].of = uuid::Uuid::from_u128(99);
        f.effects
            .insert("order-2".into(), vec![effect(EffectKind::Charge, 5, 99, 9)]);
        let found = fired(&f);
        assert!(
            found
                .iter()
                .any(|(i, d)| *i == "I1" && d.contains("undoes order order-2's")),
            "{found:?}"
        );
        assert!(
            found.iter().all(|(i, _)| *i == "I1" || *i == "I6"),
            "{found:?}"
        );
    }

    #[test]
    fn a_refund_of_no_charge_at_all_is_left_to_i6() {
        let mut f = compensated();
        f.effects.get_mut(ORDER).expect("the order")[3].of = uuid::Uuid::from_u128(98);
        assert_fires(&f, "I6", "a refund of a charge never made");
    }

    #[test]
    fn i2_fires_for_a_release_of_another_quantity() {
        let mut f = compensated();
        f.effects.get_mut(ORDER).expect("the order")[2].amount = 5;
        assert_fires(&f, "I2", "is for 5 units, what it undoes for 2");
        // Released twice, each of the right quantity.
        let mut f = compensated();
        let effects = f.effects.get_mut(ORDER).expect("the order");
        effects.insert(3, effect(EffectKind::Release, 3, 2, 12));
        assert_fires(&f, "I2", "undone more than once (releases)");
    }
}
