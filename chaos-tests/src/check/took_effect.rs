//! Whether each fault kind asked for took effect, scaled to the run.
//!
//! A run in which a kind was scheduled but did nothing (no zombie frozen,
//! no worker killed after an effect, outage windows that refused no
//! request) proves nothing about that kind, however well the invariants
//! held. [`took_effect`] is the verdict the CLI and the CI test share: per
//! kind asked for, a minimum of what it must have done, measured from
//! ground truth the harness gathers ([`Effects`]), proportional to the
//! events of that kind in the schedule and never less than one.
//!
//! The proportions leave room for what a fault cannot help: a kill or
//! freeze point armed on every worker that no worker reaches before the
//! end, zombies that go one at a time, a redelivery before the first email
//! was sent, a window on a service nobody called while it was open. They
//! are far below what the documented long run shows, and far above zero.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

use crate::schedule::FaultKind;

/// What the fault windows (and per-event faults) of one kind hit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct WindowTally {
    /// Windows opened (events that fired).
    pub opened: u64,
    /// Of those, the ones that hit at least one request (a request failed,
    /// refused, delayed, its reply lost; a chunk delayed by the proxy; a
    /// redelivery absorbed by the inbox).
    pub hit: u64,
}

/// What the zombies did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ZombieEffects {
    /// Workers frozen.
    pub frozen: u64,
    /// Of those, verifiably fenced off (see `ZombieFact::refused`).
    pub verified: u64,
    /// Of those, fenced off at their result (not only at the heartbeat).
    pub at_result: u64,
}

/// What the cuts did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CutEffects {
    /// Cuts that fell on a transition the harness identified.
    pub on_transitions: u64,
    /// Cuts committed at the cut (the reply to a COMMIT lost).
    pub committed: u64,
    /// Cuts not committed at the cut.
    pub not_committed: u64,
}

/// The ground truth the rules read: what was scheduled, what fired, and
/// what the fired events hit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Effects {
    /// Events in the schedule, per kind.
    pub scheduled: BTreeMap<FaultKind, u64>,
    /// Events that took place, per kind (a kill, a restart, a reset that
    /// closed a connection, a window opened...).
    pub fired: BTreeMap<FaultKind, u64>,
    /// Per windowed kind (network latency, the downstream faults,
    /// redeliveries): windows opened and windows that hit something.
    pub windows: BTreeMap<FaultKind, WindowTally>,
    /// The zombies.
    pub zombies: ZombieEffects,
    /// The cuts.
    pub cuts: CutEffects,
    /// Repeated deliveries from killed dispatchers (or lost replies) that
    /// the email inbox absorbed.
    pub dispatcher_duplicates_absorbed: u64,
}

impl Effects {
    fn scheduled(&self, kind: FaultKind) -> u64 {
        self.scheduled.get(&kind).copied().unwrap_or(0)
    }

    fn fired(&self, kind: FaultKind) -> u64 {
        self.fired.get(&kind).copied().unwrap_or(0)
    }
}

/// A kind that was asked for and took no (or too little) effect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NoEffect {
    /// The kind (`FaultKind::name`).
    pub kind: &'static str,
    /// What was measured.
    pub measured: String,
    /// What the rule required.
    pub required: String,
}

impl fmt::Display for NoEffect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} took no effect: measured {}; required at least {}",
            self.kind, self.measured, self.required
        )
    }
}

/// `num/den` of `n`, rounded up, and at least one.
fn share(n: u64, num: u64, den: u64) -> u64 {
    (n * num).div_ceil(den).max(1)
}

/// One requirement: `measured` ≥ `required`, `what` naming the unit.
struct Need {
    measured: u64,
    required: u64,
    what: &'static str,
}

fn need(measured: u64, required: u64, what: &'static str) -> Need {
    Need {
        measured,
        required,
        what,
    }
}

/// The requirements on `kind`, given what was measured.
fn needs(kind: FaultKind, e: &Effects) -> Vec<Need> {
    let (scheduled, fired) = (e.scheduled(kind), e.fired(kind));
    let windows = e.windows.get(&kind).copied().unwrap_or_default();
    match kind {
        // Aimed at a live worker (any, if the one drawn is frozen), or at
        // the server: half of them at least.
        FaultKind::WorkerKill => vec![need(fired, share(scheduled, 1, 2), "workers killed")],
        FaultKind::PostgresRestart => vec![need(fired, share(scheduled, 1, 2), "restarts")],
        // Retried for three seconds when no connection is open.
        FaultKind::ConnectionReset => vec![need(
            fired,
            share(scheduled, 1, 2),
            "resets that closed a connection",
        )],
        // Points armed on every worker, reached only if some step gets
        // there before the end: a quarter at least.
        FaultKind::CrashAfterEffect => vec![need(
            fired,
            share(scheduled, 1, 4),
            "workers killed after an effect",
        )],
        FaultKind::DispatcherCrash => vec![
            need(
                fired,
                share(scheduled, 1, 4),
                "dispatchers killed after publishing",
            ),
            // A killed dispatcher's batch is delivered again (and absorbed).
            need(
                e.dispatcher_duplicates_absorbed,
                share(fired, 1, 4),
                "duplicates from dispatchers absorbed by the inbox",
            ),
        ],
        // One at a time, each holding a worker for seconds: a tenth of
        // the scheduled ones frozen; of the frozen, at most one in five
        // unverified (none when fewer than five froze); and some fenced
        // off at their result, not only at the heartbeat.
        FaultKind::ZombieWorker => {
            let z = e.zombies;
            vec![
                need(z.frozen, share(scheduled, 1, 10), "zombies frozen"),
                need(
                    z.verified,
                    z.frozen - z.frozen / 5,
                    "zombies verifiably fenced off",
                ),
                need(
                    z.at_result,
                    share(z.frozen, 1, 10),
                    "zombies fenced off at their result",
                ),
            ]
        }
        // Armed one at a time, each aimed at a transition; both outcomes
        // of an ambiguous commit must have happened.
        FaultKind::CommitCut => {
            let c = e.cuts;
            vec![
                need(
                    c.on_transitions,
                    share(scheduled, 1, 2),
                    "cuts that hit a transition",
                ),
                need(
                    c.committed,
                    share(c.on_transitions, 1, 10),
                    "cut transitions committed at the cut",
                ),
                need(
                    c.not_committed,
                    share(c.on_transitions, 1, 10),
                    "cut transitions not committed at the cut",
                ),
            ]
        }
        // Windows: every one opens; some fall on a service (or a moment)
        // nobody calls.
        FaultKind::NetworkLatency => vec![
            need(fired, share(scheduled, 1, 2), "latency windows opened"),
            need(
                windows.hit,
                share(windows.opened, 1, 2),
                "latency windows that delayed a chunk",
            ),
        ],
        FaultKind::DownstreamOutage => vec![
            need(fired, share(scheduled, 1, 2), "outage windows opened"),
            need(
                windows.hit,
                share(windows.opened, 1, 4),
                "outage windows that refused a request",
            ),
        ],
        FaultKind::DownstreamErrors => vec![
            need(fired, share(scheduled, 1, 2), "error windows opened"),
            need(
                windows.hit,
                share(windows.opened, 1, 4),
                "error windows that failed a request",
            ),
        ],
        FaultKind::DownstreamLatency => vec![
            need(fired, share(scheduled, 1, 2), "latency windows opened"),
            need(
                windows.hit,
                share(windows.opened, 1, 4),
                "latency windows that delayed a request",
            ),
        ],
        FaultKind::LostReplies => vec![
            need(fired, share(scheduled, 1, 2), "lost-reply windows opened"),
            need(
                windows.hit,
                share(windows.opened, 1, 4),
                "lost-reply windows that lost a reply",
            ),
        ],
        // Nothing to redeliver before the first email.
        FaultKind::DuplicateDelivery => vec![
            need(fired, share(scheduled, 1, 4), "redeliveries sent"),
            need(
                windows.hit,
                share(windows.opened, 1, 4),
                "redeliveries the inbox absorbed",
            ),
        ],
    }
}

/// Every kind of `kinds` (the kinds asked for) that took no effect, with
/// what was measured and what was required; empty if every one did.
#[must_use]
pub fn took_effect(kinds: &[FaultKind], effects: &Effects) -> Vec<NoEffect> {
    let mut kinds = kinds.to_vec();
    kinds.sort();
    kinds.dedup();
    let mut out = Vec::new();
    for kind in kinds {
        let needs = needs(kind, effects);
        if needs.iter().all(|n| n.measured >= n.required) {
            continue;
        }
        let show = |f: fn(&Need) -> u64| {
            needs
                .iter()
                .map(|n| format!("{} {}", f(n), n.what))
                .collect::<Vec<_>>()
                .join(", ")
        };
        out.push(NoEffect {
            kind: kind.name(),
            measured: format!(
                "{} scheduled, {} fired; {}",
                effects.scheduled(kind),
                effects.fired(kind),
                show(|n| n.measured)
            ),
            required: show(|n| n.required),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kind scheduled `n` times, fired `n` times, every window hit,
    /// every zombie verified (half at its result), cuts both ways.
    fn all_effective(n: u64) -> Effects {
        let per_kind = |v: u64| FaultKind::ALL.iter().map(|k| (*k, v)).collect();
        Effects {
            scheduled: per_kind(n),
            fired: per_kind(n),
            windows: FaultKind::ALL
                .iter()
                .map(|k| (*k, WindowTally { opened: n, hit: n }))
                .collect(),
            zombies: ZombieEffects {
                frozen: n,
                verified: n,
                at_result: n.div_ceil(2),
            },
            cuts: CutEffects {
                on_transitions: n,
                committed: n / 2,
                not_committed: n - n / 2,
            },
            dispatcher_duplicates_absorbed: n,
        }
    }

    fn failing(kinds: &[FaultKind], e: &Effects) -> Vec<&'static str> {
        took_effect(kinds, e).into_iter().map(|n| n.kind).collect()
    }

    #[test]
    fn a_run_where_every_kind_took_effect_passes() {
        for n in [2, 3, 10, 1000] {
            assert_eq!(
                failing(&FaultKind::ALL, &all_effective(n)),
                Vec::<&str>::new()
            );
        }
    }

    #[test]
    fn the_documented_long_run_passes() {
        // docs/chaos.md, seed 2026: scheduled, fired.
        use FaultKind::*;
        let rows = [
            (CommitCut, 1065, 1065),
            (ConnectionReset, 1086, 1083),
            (CrashAfterEffect, 1066, 1069),
            (DispatcherCrash, 1110, 1109),
            (DownstreamErrors, 1042, 1042),
            (DownstreamLatency, 1124, 1124),
            (DownstreamOutage, 497, 497),
            (DuplicateDelivery, 1018, 872),
            (LostReplies, 1061, 1061),
            (NetworkLatency, 1110, 1110),
            (PostgresRestart, 87, 87),
            (WorkerKill, 1041, 1040),
            (ZombieWorker, 508, 161),
        ];
        let mut e = all_effective(0);
        for (k, s, f) in rows {
            e.scheduled.insert(k, s);
            e.fired.insert(k, f);
            // Half the windows hit something, at the least.
            e.windows.insert(
                k,
                WindowTally {
                    opened: f,
                    hit: f / 2,
                },
            );
        }
        e.zombies = ZombieEffects {
            frozen: 161,
            verified: 135,
            at_result: 71,
        };
        e.cuts = CutEffects {
            on_transitions: 1065,
            committed: 493,
            not_committed: 572,
        };
        e.dispatcher_duplicates_absorbed = 5016;
        assert_eq!(failing(&FaultKind::ALL, &e), Vec::<&str>::new());
    }

    #[test]
    fn only_the_kinds_asked_for_are_judged() {
        let e = Effects::default();
        assert_eq!(failing(&[], &e), Vec::<&str>::new());
        assert_eq!(
            failing(&[FaultKind::WorkerKill, FaultKind::WorkerKill], &e),
            vec!["worker_kill"]
        );
    }

    /// Each row: a kind, a way to take its effect away, and what the
    /// reason must say.
    #[test]
    fn a_kind_that_took_no_effect_fails_with_what_was_measured() {
        type Break = fn(&mut Effects);
        use FaultKind::*;
        let rows: [(FaultKind, Break, &str); 19] = [
            (
                WorkerKill,
                |e| _ = e.fired.insert(WorkerKill, 0),
                "0 workers killed",
            ),
            (
                PostgresRestart,
                |e| _ = e.fired.insert(PostgresRestart, 4),
                "4 restarts",
            ),
            (
                ConnectionReset,
                |e| _ = e.fired.insert(ConnectionReset, 0),
                "0 resets",
            ),
            (
                CrashAfterEffect,
                |e| _ = e.fired.insert(CrashAfterEffect, 0),
                "0 workers killed after an effect",
            ),
            (
                CrashAfterEffect,
                |e| _ = e.fired.insert(CrashAfterEffect, 2),
                "2 workers killed after an effect",
            ),
            (
                DispatcherCrash,
                |e| e.dispatcher_duplicates_absorbed = 0,
                "0 duplicates from dispatchers",
            ),
            (
                ZombieWorker,
                |e| e.zombies = ZombieEffects::default(),
                "0 zombies frozen",
            ),
            (
                ZombieWorker,
                |e| e.zombies.verified -= 3,
                "7 zombies verifiably fenced off",
            ),
            (
                ZombieWorker,
                |e| e.zombies.at_result = 0,
                "0 zombies fenced off at their result",
            ),
            (
                CommitCut,
                |e| e.cuts = CutEffects::default(),
                "0 cuts that hit a transition",
            ),
            (
                CommitCut,
                |e| {
                    e.cuts.committed = 0;
                    e.cuts.not_committed = 10;
                },
                "0 cut transitions committed at the cut",
            ),
            (
                CommitCut,
                |e| {
                    e.cuts.committed = 10;
                    e.cuts.not_committed = 0;
                },
                "0 cut transitions not committed",
            ),
            (
                NetworkLatency,
                |e| {
                    _ = e
                        .windows
                        .insert(NetworkLatency, WindowTally { opened: 10, hit: 4 })
                },
                "4 latency windows that delayed a chunk",
            ),
            (
                DownstreamOutage,
                |e| {
                    _ = e
                        .windows
                        .insert(DownstreamOutage, WindowTally { opened: 10, hit: 0 })
                },
                "0 outage windows that refused a request",
            ),
            (
                DownstreamErrors,
                |e| {
                    _ = e
                        .windows
                        .insert(DownstreamErrors, WindowTally { opened: 10, hit: 2 })
                },
                "2 error windows that failed a request",
            ),
            (
                DownstreamLatency,
                |e| _ = e.windows.remove(&DownstreamLatency),
                "0 latency windows that delayed a request",
            ),
            (
                LostReplies,
                |e| {
                    _ = e
                        .windows
                        .insert(LostReplies, WindowTally { opened: 10, hit: 0 })
                },
                "0 lost-reply windows",
            ),
            (
                LostReplies,
                |e| _ = e.fired.insert(LostReplies, 0),
                "0 fired",
            ),
            (
                DuplicateDelivery,
                |e| {
                    _ = e
                        .windows
                        .insert(DuplicateDelivery, WindowTally { opened: 10, hit: 0 })
                },
                "0 redeliveries the inbox absorbed",
            ),
        ];
        for (kind, break_it, said) in rows {
            let mut e = all_effective(10);
            break_it(&mut e);
            let found = took_effect(&FaultKind::ALL, &e);
            assert_eq!(
                found.iter().map(|n| n.kind).collect::<Vec<_>>(),
                vec![kind.name()],
                "{said}: {found:#?}"
            );
            let reason = found[0].to_string();
            assert!(
                reason.starts_with(&format!("{} took no effect", kind.name())),
                "{reason}"
            );
            assert!(reason.contains(said), "«{said}» in {reason}");
        }
    }

    #[test]
    fn minimums_scale_with_the_run_and_are_never_zero() {
        assert_eq!(share(0, 1, 4), 1);
        assert_eq!(share(1, 1, 4), 1);
        assert_eq!(share(5, 1, 4), 2);
        assert_eq!(share(1000, 1, 2), 500);
        // A long run with a handful of kills is not enough.
        let mut e = all_effective(1000);
        e.fired.insert(FaultKind::WorkerKill, 3);
        let found = took_effect(&[FaultKind::WorkerKill], &e);
        assert_eq!(found.len(), 1);
        assert!(
            found[0].required.contains("500 workers killed"),
            "{:?}",
            found[0]
        );
        // Fewer than five zombies frozen: every one must be verified.
        let mut e = all_effective(4);
        e.zombies.verified = 3;
        assert_eq!(
            failing(&[FaultKind::ZombieWorker], &e),
            vec!["zombie_worker"]
        );
        // Ten frozen: two may go unverified (a later fault took the worker
        // down before it reported its refusal).
        let mut e = all_effective(10);
        e.zombies.verified = 8;
        assert_eq!(failing(&[FaultKind::ZombieWorker], &e), Vec::<&str>::new());
    }
}
