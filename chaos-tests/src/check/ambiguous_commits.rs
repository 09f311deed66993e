//! I7: every ambiguous commit resolved, from the database, and counted by
//! the worker whose transition was cut.

use std::collections::BTreeMap;

use uuid::Uuid;

use super::{Facts, Violation, violation};

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
pub(super) fn ambiguous_commits(facts: &Facts, v: &mut Vec<Violation>) {
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

#[cfg(test)]
mod tests {
    use saga_core::Status;

    use crate::check::fixtures::{ORDER, assert_fires, clean, cut, cut_of, fired, survivor};
    use crate::check::{CutFact, WorkerFact};
    use crate::worker::Counts;

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
