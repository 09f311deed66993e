//! What a run found.

use std::collections::BTreeMap;

use serde::Serialize;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::faults::fake;
use super::tally::unit;
use super::{Config, NegativeControl, Run};
use crate::check::{
    self, CutEffects, CutSummary, Effects, Facts, Findings, NoEffect, RefusedAt, WindowTally,
    ZombieEffects, ZombieFact,
};
use crate::schedule::{FaultKind, Service};
use crate::worker::Counts;

/// The faults of one kind: how many were scheduled, how many took place,
/// and how much they hit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct KindCount {
    /// Events in the schedule.
    pub scheduled: u64,
    /// Events that took place (a point armed but never reached, a kill of
    /// a process already gone, a reset with no connection open... did not).
    pub fired: u64,
    /// What the fired events hit, in `unit`s.
    pub affected: u64,
    /// What `affected` counts.
    pub unit: &'static str,
}

/// What a run found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// The seed.
    pub seed: u64,
    /// Sagas started.
    pub sagas: usize,
    /// Worker processes.
    pub workers: usize,
    /// The negative control, if one was on.
    pub negative: Option<NegativeControl>,
    /// The kinds of fault injected.
    pub kinds: Vec<&'static str>,
    /// Seconds of fault injection.
    pub fault_seconds: f64,
    /// Per kind: scheduled, fired, affected.
    pub faults: BTreeMap<&'static str, KindCount>,
    /// Fault events scheduled, all kinds (the sum of `scheduled`).
    pub fault_events_scheduled: u64,
    /// Fault events fired, all kinds (the sum of `fired`).
    pub fault_events_fired: u64,
    /// What the cut transitions turned out to be, from the database.
    pub cuts: CutSummary,
    /// The zombies, each with what the harness saw.
    pub zombies: Vec<ZombieFact>,
    /// The services' calls from leases that had already ended (zombies'
    /// calls), from their request logs.
    pub late_calls: check::LateCalls,
    /// Deliveries the harness repeated itself.
    pub redeliveries_sent: u64,
    /// Of those, the ones the email inbox recognised and applied no
    /// effect for.
    pub redeliveries_absorbed: u64,
    /// Repeated deliveries from the dispatchers (after a dispatcher crash
    /// or a lost reply) that the email inbox absorbed.
    pub dispatcher_duplicates_absorbed: u64,
    /// The workers' counters, all incarnations (killed ones as last
    /// reported).
    pub counts: Counts,
    /// Violations per invariant.
    pub violations: BTreeMap<&'static str, usize>,
    /// Every violation.
    pub violation_details: Vec<check::Violation>,
    /// Sagas by final status.
    pub outcomes: BTreeMap<String, u64>,
    /// Per scenario, how its orders ended (I8 holds each to its scenario).
    pub by_scenario: Vec<check::ScenarioOutcomes>,
    /// Stuck sagas and why.
    pub stuck: Vec<(String, String)>,
    /// Seconds from the end of the last fault until every saga had
    /// finished and every message was delivered (`None`: not within the
    /// bound).
    pub seconds_to_quiesce: Option<f64>,
    /// The bound, in seconds.
    pub quiesce_bound_seconds: f64,
    /// Sagas finished per second over the whole run.
    pub throughput: f64,
    /// Wall time of the whole run, in seconds.
    pub seconds: f64,
    /// The first violating orders, each with its step timeline.
    pub first_violating_orders: Vec<(String, String)>,
    /// Per windowed kind: windows opened, and how many hit something.
    pub windows: BTreeMap<&'static str, WindowTally>,
    /// The kinds asked for that took no effect (`check::took_effect`),
    /// each with what was measured and what was required.
    pub faults_without_effect: Vec<NoEffect>,
}

impl Report {
    /// Whether every invariant held and every kind of fault asked for
    /// took effect.
    #[must_use]
    pub fn passed(&self) -> bool {
        self.violation_details.is_empty() && self.faults_without_effect.is_empty()
    }

    /// The counts of `kind` (zeros if it was not injected).
    #[must_use]
    pub fn kind(&self, kind: FaultKind) -> KindCount {
        self.faults.get(kind.name()).cloned().unwrap_or_default()
    }

    /// The zombies fenced off at their result write, verified.
    #[must_use]
    pub fn zombies_refused_at(&self, at: RefusedAt) -> usize {
        self.zombies
            .iter()
            .filter(|z| z.refused() == Some(at))
            .count()
    }
}

/// What the run's phases measured: when it started, the faults scheduled,
/// how long they were injected, and how long the system took to quiesce
/// after them.
pub(super) struct Timing {
    pub(super) started: Instant,
    pub(super) scheduled: BTreeMap<FaultKind, u64>,
    pub(super) fault_seconds: f64,
    pub(super) quiesced: Option<Duration>,
}

/// The report of a run: what each kind of fault hit, the findings, and
/// the numbers. Stops the checkout services (their counters are read
/// first).
pub(super) fn summarize(
    config: &Config,
    run: &Run,
    facts: Facts,
    findings: Findings,
    Timing {
        started,
        scheduled,
        fault_seconds,
        quiesced,
    }: Timing,
) -> Report {
    let (deployment, tally, proxy, workers) =
        (&run.deployment, &run.tally, &run.proxy, &run.workers);
    // What each kind hit.
    let mut service_totals = checkout::services::Injected::default();
    for s in [Service::Payment, Service::Inventory, Service::Email] {
        let i = fake(deployment, s).injected();
        service_totals.errors += i.errors;
        service_totals.outage_rejections += i.outage_rejections;
        service_totals.delayed += i.delayed;
        service_totals.lost_replies += i.lost_replies;
    }
    let redeliveries_absorbed = run.redeliveries_absorbed.load(Ordering::Relaxed);
    let dispatcher_duplicates_absorbed = deployment
        .email
        .injected()
        .duplicates_absorbed
        .saturating_sub(redeliveries_absorbed);
    deployment.stop_services();
    tally.affected(FaultKind::NetworkLatency, proxy.stats().delayed);
    tally.affected(FaultKind::DownstreamErrors, service_totals.errors);
    tally.affected(
        FaultKind::DownstreamOutage,
        service_totals.outage_rejections,
    );
    tally.affected(FaultKind::DownstreamLatency, service_totals.delayed);
    tally.affected(FaultKind::LostReplies, service_totals.lost_replies);
    tally.affected(
        FaultKind::ZombieWorker,
        facts
            .zombies
            .iter()
            .filter(|z| z.refused().is_some())
            .count() as u64,
    );
    tally.affected(FaultKind::CommitCut, facts.cuts.len() as u64);

    let fired = tally
        .fired
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let windows = run.windows.tally();
    let effects = effects(
        &facts,
        scheduled.clone(),
        fired.clone(),
        windows.clone(),
        dispatcher_duplicates_absorbed,
    );
    let affected = tally
        .affected
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let mut kinds: Vec<FaultKind> = config.kinds.clone();
    kinds.sort();
    kinds.dedup();
    let faults: BTreeMap<&'static str, KindCount> = kinds
        .iter()
        .map(|k| {
            (
                k.name(),
                KindCount {
                    scheduled: scheduled.get(k).copied().unwrap_or(0),
                    fired: fired.get(k).copied().unwrap_or(0),
                    affected: affected.get(k).copied().unwrap_or(0),
                    unit: unit(*k),
                },
            )
        })
        .collect();

    let mut first_violating_orders = Vec::new();
    for v in &findings.violations {
        let Some(order) = &v.order else { continue };
        if first_violating_orders.iter().any(|(o, _)| o == order) {
            continue;
        }
        let timeline = facts
            .instances
            .get(order)
            .map(|i| checkout::demo::timeline(&i.history))
            .unwrap_or_default();
        first_violating_orders.push((order.clone(), timeline));
        if first_violating_orders.len() == 5 {
            break;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let finished: u64 = findings
        .outcomes
        .iter()
        .filter(|(s, _)| *s == "completed" || *s == "compensated")
        .map(|(_, n)| *n)
        .sum();
    Report {
        seed: config.seed,
        sagas: facts.instances.len(),
        workers: config.workers,
        negative: config.negative,
        kinds: kinds.iter().map(|k| k.name()).collect(),
        fault_seconds,
        fault_events_scheduled: faults.values().map(|k| k.scheduled).sum(),
        fault_events_fired: faults.values().map(|k| k.fired).sum(),
        faults,
        cuts: findings.cuts,
        zombies: facts.zombies.clone(),
        late_calls: findings.late_calls,
        redeliveries_sent: run.redeliveries_sent.load(Ordering::Relaxed),
        redeliveries_absorbed,
        dispatcher_duplicates_absorbed,
        counts: workers.total(),
        violations: findings.per_invariant(),
        violation_details: findings.violations.clone(),
        outcomes: findings.outcomes.clone(),
        by_scenario: findings.by_scenario.clone(),
        stuck: findings.stuck.clone(),
        seconds_to_quiesce: quiesced.map(|d| d.as_secs_f64()),
        quiesce_bound_seconds: config.quiesce_bound.as_secs_f64(),
        throughput: finished as f64 / seconds,
        seconds,
        first_violating_orders,
        windows: windows.iter().map(|(k, w)| (k.name(), *w)).collect(),
        faults_without_effect: check::took_effect(&kinds, &effects),
    }
}

/// What the faults did, from ground truth, for the took-effect rules.
fn effects(
    facts: &Facts,
    scheduled: BTreeMap<FaultKind, u64>,
    fired: BTreeMap<FaultKind, u64>,
    windows: BTreeMap<FaultKind, WindowTally>,
    dispatcher_duplicates_absorbed: u64,
) -> Effects {
    let z = &facts.zombies;
    let on_transitions = facts.cuts.iter().filter(|c| c.transition.is_some());
    Effects {
        scheduled,
        fired,
        windows,
        zombies: ZombieEffects {
            frozen: z.iter().filter(|z| z.frozen).count() as u64,
            verified: z.iter().filter(|z| z.refused().is_some()).count() as u64,
            at_result: z
                .iter()
                .filter(|z| z.refused() == Some(RefusedAt::Record))
                .count() as u64,
        },
        cuts: CutEffects {
            on_transitions: on_transitions.clone().count() as u64,
            committed: on_transitions
                .clone()
                .filter(|c| c.committed_at_cut)
                .count() as u64,
            not_committed: on_transitions.filter(|c| !c.committed_at_cut).count() as u64,
        },
        dispatcher_duplicates_absorbed,
    }
}
