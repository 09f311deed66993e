//! I7: every ambiguous commit resolved, from the database, and counted by
//! the worker whose transition was cut.

use std::collections::BTreeMap;
use std::time::SystemTime;

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
///
/// A worker that was killed is held to less, and only to what is known:
/// its counters are those of its last report, read at a moment of its
/// clock (`reported_at`), and an ambiguity counts once resolved. What it
/// resolved before that moment is in them; what was still in flight then
/// (cut, not yet looked up) is not, and after a SIGKILL never will be. The
/// only resolution the database shows the moment of is a transition found
/// not committed and written again: the store writes it again only after
/// the lookup, so a history row for it inserted by that worker on a
/// session none of its cuts fell on (`written_again_at`) before
/// `reported_at` proves it counted. A killed worker must have resolved at
/// least as many as it had such transitions, and left none unresolved. A
/// transition committed at the cut or refused after it leaves no trace of
/// when the worker looked it up (once it committed, the saga is free to
/// claim, even by another task of the same worker, so a later row proves
/// nothing), and a worker that never reported is held to nothing: for
/// those alone the count is unknowable.
pub(super) fn ambiguous_commits(facts: &Facts, v: &mut Vec<Violation>) {
    // Per worker, per cut transition: whether one of its cuts committed.
    let mut per_worker: BTreeMap<&str, BTreeMap<Uuid, bool>> = BTreeMap::new();
    // Per worker, per transition it wrote again: when (earliest).
    let mut written_again: BTreeMap<&str, BTreeMap<Uuid, SystemTime>> = BTreeMap::new();
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
            if let Some(at) = c.written_again_at {
                written_again
                    .entry(worker.as_str())
                    .or_default()
                    .insert(transition, at);
            }
        }
    }
    for w in facts.workers.iter().filter(|w| !w.survived) {
        let Some(reported_at) = w.reported_at else {
            continue;
        };
        let c = &w.counts;
        if c.ambiguous_unresolved > 0 {
            v.push(violation(
                "I7",
                None,
                format!(
                    "worker {} (killed) left {} ambiguous commits unresolved",
                    w.name, c.ambiguous_unresolved
                ),
            ));
        }
        let known = written_again.get(w.name.as_str()).map_or(0, |t| {
            t.values().filter(|at| **at < reported_at).count() as u64
        });
        let resolved = c.ambiguous_committed + c.ambiguous_not_committed;
        if resolved < known {
            v.push(violation(
                "I7",
                None,
                format!(
                    "worker {} (killed) had resolved {resolved} ambiguous commits when it last \
                     reported, but had already written {known} of its cut transitions again",
                    w.name
                ),
            ));
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
    use std::time::{Duration, SystemTime};

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
        // A worker that did not survive is not held to what it cannot
        // be known to have counted (here: it never reported).
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

    fn killed(committed: u64, not_committed: u64, reported_at: u64) -> WorkerFact {
        WorkerFact {
            survived: false,
            reported_at: Some(secs(reported_at)),
            ..survivor(committed, not_committed)
        }
    }

    fn secs(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(s)
    }

    fn written_again(transition: u128, at: u64) -> CutFact {
        CutFact {
            written_again_at: Some(secs(at)),
            ..cut_of(transition, true, false)
        }
    }

    #[test]
    fn i7_fires_when_a_killed_worker_had_not_counted_what_it_had_already_written_again() {
        let mut f = clean();
        // Two transitions cut and written again by the worker at 10 s and
        // 12 s; it last reported at 20 s, having counted one.
        f.cuts = vec![written_again(11, 10), written_again(12, 12)];
        f.workers = vec![killed(0, 1, 20)];
        assert_fires(
            &f,
            "I7",
            "worker w0 (killed) had resolved 1 ambiguous commits when it last reported, \
             but had already written 2 of its cut transitions again",
        );
        // Or counted them, and left one unresolved.
        f.workers = vec![WorkerFact {
            counts: Counts {
                ambiguous_unresolved: 1,
                ..killed(0, 2, 20).counts
            },
            ..killed(0, 2, 20)
        }];
        assert_fires(
            &f,
            "I7",
            "worker w0 (killed) left 1 ambiguous commits unresolved",
        );
    }

    #[test]
    fn i7_exempts_a_killed_worker_only_from_what_was_in_flight_or_leaves_no_trace() {
        let mut f = clean();
        // Written again after its last report: in flight when it reported.
        f.cuts = vec![written_again(11, 10), written_again(12, 25)];
        f.workers = vec![killed(0, 1, 20)];
        assert_eq!(fired(&f), vec![]);
        // Committed at the cut, refused, or never written again: no trace
        // of when it was looked up.
        let mut refused = cut_of(13, true, false);
        refused.in_history = false;
        f.cuts = vec![cut_of(12, true, true), refused, cut_of(14, false, false)];
        f.workers = vec![killed(0, 0, 20)];
        assert_eq!(fired(&f), vec![]);
        // Written again by it before its last report, counted.
        f.cuts = vec![
            written_again(11, 10),
            written_again(11, 10),
            cut_of(12, true, true),
        ];
        f.workers = vec![killed(0, 1, 20)];
        assert_eq!(fired(&f), vec![]);
        // A worker killed before it ever reported: nothing known.
        f.cuts = vec![written_again(11, 10)];
        f.workers = vec![WorkerFact {
            reported_at: None,
            ..killed(0, 0, 20)
        }];
        assert_eq!(fired(&f), vec![]);
    }
}
