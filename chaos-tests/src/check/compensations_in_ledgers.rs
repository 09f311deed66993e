//! I6 in the services' ledgers: a refund only of a charge made before it,
//! a release only of a deduction made before it, every release before any
//! refund.

use super::{Effect, EffectKind, Facts, Violation, violation};

/// I6 in the ledgers: undo only what was done before, releases before
/// refunds.
pub(super) fn compensations_in_ledgers(facts: &Facts, v: &mut Vec<Violation>) {
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use uuid::Uuid;

    use crate::check::EffectKind;
    use crate::check::fixtures::{ORDER, assert_fires, compensated};

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
}
