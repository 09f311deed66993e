//! The checkout invariants, checked from ground truth.
//!
//! [`gather`] reads the facts once the system is quiet: the services'
//! ledgers (charges, refunds, deductions, releases, emails), the saga rows
//! and their history, and what the harness recorded itself — every outbox
//! row and history row ever inserted (copied by triggers the harness
//! installs, committed or rolled back with the insert), every change of a
//! saga row's lease (`lease_log`), the statements the proxy cut, the
//! zombies it froze; and the services' request logs (which lease each
//! call came from). [`check`] is a pure function of those
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
//! - I8 every order ended as its scenario intends (an `Ok` order
//!   completed; a declined, out-of-stock or gateway-down one compensated),
//!   and the shop's status of the order agrees with its saga's.
//! - I9 fencing, from the services' request logs and the harness's log of
//!   every lease change: no result the services gave a lease that had
//!   already ended (taken over, or ended by its own write) is recorded,
//!   and no step's service answer is counted as a success by two leases.
//!   A zombie's late call, absorbed by idempotency, is not a violation.
//!
//! I1 and I2 also pair each undo with what it undoes (a refund with its
//! charge, by id and amount; a release with its deduction, by reservation,
//! SKU and quantity), so that offsetting errors cannot balance the totals.

mod ambiguous_commits;
mod compensations_in_history;
mod compensations_in_ledgers;
mod delivered;
mod facts;
mod fencing;
mod finished;
#[cfg(test)]
mod fixtures;
mod gather;
mod intent;
mod lease_log;
mod took_effect;
mod undo_matches;
mod zombies;

use std::collections::{BTreeMap, HashSet};

use serde::Serialize;

use ambiguous_commits::ambiguous_commits;
use compensations_in_history::compensations_in_history;
use compensations_in_ledgers::compensations_in_ledgers;
use delivered::delivered;
use fencing::{fencing, late_calls};
use finished::finished;
use intent::intent;
use undo_matches::undo_matches;
use zombies::zombies;

pub use facts::{
    Committed, CutFact, Effect, EffectKind, Facts, Instance, Left, Recorded, RecordedCut,
    RefusedAt, WorkerFact, ZombieFact,
};
pub use fencing::{Answered, LateCalls, LeaseChange, ResultWritten, ServiceCall};
pub use gather::{gather, install_records, instances};
pub use intent::{ScenarioOutcomes, intended, scenario_name};
pub use took_effect::{CutEffects, Effects, NoEffect, WindowTally, ZombieEffects, took_effect};

/// The invariants, by name.
pub const INVARIANTS: [&str; 9] = ["I1", "I2", "I3", "I4", "I5", "I6", "I7", "I8", "I9"];

/// The schema where the harness keeps its own records.
pub const HARNESS_SCHEMA: &str = "chaos_harness";

/// One broken invariant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violation {
    /// One of [`INVARIANTS`].
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
    /// How the orders of each scenario ended (every scenario, in order).
    pub by_scenario: Vec<ScenarioOutcomes>,
    /// The services' calls from leases that had already ended (zombies'
    /// calls, absorbed by idempotency).
    pub late_calls: LateCalls,
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

/// Checks every invariant against `facts`.
#[must_use]
pub fn check(facts: &Facts) -> Findings {
    let mut f = Findings {
        cuts: CutSummary::of(&facts.cuts),
        late_calls: late_calls(facts),
        ..Findings::default()
    };
    let mut v = facts.ledger_violations.clone();
    finished(facts, &mut f, &mut v);
    delivered(facts, &mut v);
    compensations_in_ledgers(facts, &mut v);
    compensations_in_history(facts, &mut v);
    zombies(facts, &mut v);
    ambiguous_commits(facts, &mut v);
    undo_matches(facts, &mut v);
    intent(facts, &mut f, &mut v);
    fencing(facts, &mut v);
    f.violations = v;
    f
}

#[cfg(test)]
mod tests {
    use super::fixtures::{ORDER, assert_fires, clean, compensated, cut, cut_of, fired};
    use super::*;

    #[test]
    fn clean_runs_have_no_violations() {
        assert_eq!(fired(&clean()), vec![]);
        assert_eq!(fired(&compensated()), vec![]);
        let findings = check(&clean());
        assert_eq!(findings.outcomes, [("completed".to_owned(), 1)].into());
        assert_eq!(findings.per_invariant().values().sum::<usize>(), 0);
        assert_eq!(findings.per_invariant().len(), INVARIANTS.len());
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
}
