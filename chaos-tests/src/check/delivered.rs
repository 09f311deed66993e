//! I5: every committed outbox message delivered at least once; nothing
//! delivered that was not committed; no dead letters left.

use std::collections::{HashMap, HashSet};

use saga_core::{MessageId, SagaId};

use super::{Facts, Violation, violation};

/// I5: what was committed was delivered; nothing else was; nothing left.
pub(super) fn delivered(facts: &Facts, v: &mut Vec<Violation>) {
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

#[cfg(test)]
mod tests {
    use saga_core::MessageId;
    use uuid::Uuid;

    use crate::check::Left;
    use crate::check::fixtures::{ORDER, assert_fires, clean};

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
}
