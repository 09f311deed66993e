//! The report: a table for people, JSON for machines.

use std::fmt::Write;

use crate::check::RefusedAt;
use crate::harness::Report;

/// The report as a table.
#[must_use]
pub fn table(r: &Report) -> String {
    let mut out = String::new();
    let w = &mut out;
    let _ = writeln!(
        w,
        "\nchaos run, seed {}{}",
        r.seed,
        match r.negative {
            Some(n) => format!(" — NEGATIVE CONTROL {n:?} (the system is broken on purpose)"),
            None => String::new(),
        }
    );
    let _ = writeln!(w, "  sagas                      {}", r.sagas);
    let _ = writeln!(w, "  workers                    {}", r.workers);
    let _ = writeln!(w, "  fault phase                {:.1} s", r.fault_seconds);
    let _ = writeln!(
        w,
        "  fault events               {} fired of {} scheduled",
        r.fault_events_fired, r.fault_events_scheduled
    );
    let _ = writeln!(
        w,
        "    {:<22} {:>9} {:>7} {:>9}  (what it counts)",
        "kind", "scheduled", "fired", "affected"
    );
    for (kind, k) in &r.faults {
        let _ = writeln!(
            w,
            "    {kind:<22} {:>9} {:>7} {:>9}  {}",
            k.scheduled, k.fired, k.affected, k.unit
        );
    }
    let _ = writeln!(
        w,
        "    {:<22} {:>9} {:>7}",
        "total", r.fault_events_scheduled, r.fault_events_fired
    );
    let c = &r.cuts;
    let _ = writeln!(
        w,
        "  transitions cut            {} cuts on {} transitions ({} after sending, {} before): \
         {} committed at the cut, {} not ({} written again, {} refused and redone)",
        c.after + c.before,
        c.transitions,
        c.after,
        c.before,
        c.committed,
        c.not_committed,
        c.written_again,
        c.dropped
    );
    let frozen = r.zombies.iter().filter(|z| z.frozen).count();
    let _ = writeln!(
        w,
        "  zombies                    {frozen} frozen: {} fenced off at the heartbeat, {} at the result, \
         {} not verified",
        r.zombies_refused_at(RefusedAt::Heartbeat),
        r.zombies_refused_at(RefusedAt::Record),
        frozen
            - r.zombies_refused_at(RefusedAt::Heartbeat)
            - r.zombies_refused_at(RefusedAt::Record)
    );
    let late = &r.late_calls;
    let _ = writeln!(
        w,
        "  calls from ended leases    {}, absorbed by the services: {} applied first (the new \
         lease's call replayed), {} replayed",
        late.calls, late.applied, late.replayed
    );
    let _ = writeln!(
        w,
        "  redeliveries               {} sent by the harness, {} absorbed by the inbox; \
         {} more duplicates from dispatchers absorbed",
        r.redeliveries_sent, r.redeliveries_absorbed, r.dispatcher_duplicates_absorbed
    );
    let c = &r.counts;
    let _ = writeln!(
        w,
        "  workers' own counters      {} ambiguous commits resolved ({} committed, {} not; \
         {} unresolved), {} writes refused, {} database retries",
        c.ambiguous_committed + c.ambiguous_not_committed,
        c.ambiguous_committed,
        c.ambiguous_not_committed,
        c.ambiguous_unresolved,
        c.leases_lost,
        c.retries
    );
    let _ = writeln!(
        w,
        "  outcomes                   {}",
        r.outcomes
            .iter()
            .map(|(s, n)| format!("{n} {s}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(
        w,
        "    {:<22} {:>9} {:>9} {:>11} {:>6}",
        "scenario", "orders", "completed", "compensated", "other"
    );
    for s in &r.by_scenario {
        let _ = writeln!(
            w,
            "    {:<22} {:>9} {:>9} {:>11} {:>6}",
            s.scenario, s.orders, s.completed, s.compensated, s.other
        );
    }
    let _ = writeln!(
        w,
        "  time to quiesce            {}",
        match r.seconds_to_quiesce {
            Some(s) => format!(
                "{s:.1} s after the last fault (bound {:.0} s)",
                r.quiesce_bound_seconds
            ),
            None => format!("NOT within {:.0} s", r.quiesce_bound_seconds),
        }
    );
    let _ = writeln!(
        w,
        "  throughput                 {:.1} sagas/s over {:.1} s",
        r.throughput, r.seconds
    );
    let _ = writeln!(w, "  violations");
    for (invariant, n) in &r.violations {
        let _ = writeln!(w, "    {invariant:<24} {n}");
    }
    for (order, reason) in &r.stuck {
        let _ = writeln!(w, "  stuck: {order}: {reason}");
    }
    if r.faults_without_effect.is_empty() {
        let _ = writeln!(w, "  took effect                every fault kind asked for");
    } else {
        let _ = writeln!(
            w,
            "  faults without effect      {}",
            r.faults_without_effect.len()
        );
        for no in &r.faults_without_effect {
            let _ = writeln!(w, "    {no}");
        }
    }
    if r.passed() {
        // Every invariant held, and every kind asked for took effect.
        let _ = writeln!(w, "\nall invariants hold");
    } else {
        let _ = writeln!(
            w,
            "\nFAILED (seed {}): {} violations",
            r.seed,
            r.violation_details.len()
        );
        for no in &r.faults_without_effect {
            let _ = writeln!(w, "  {no}");
        }
        for v in r.violation_details.iter().take(10) {
            // The audit's details name their order already.
            let order = match &v.order {
                Some(o) if !v.detail.starts_with(o.as_str()) => format!("{o}: "),
                _ => String::new(),
            };
            let _ = writeln!(w, "  {} {order}{}", v.invariant, v.detail);
        }
        if !r.first_violating_orders.is_empty() {
            let _ = writeln!(w, "first violating orders:");
            for (order, timeline) in &r.first_violating_orders {
                let _ = writeln!(w, "  {order}: {timeline}");
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::NoEffect;

    #[test]
    fn a_kind_without_effect_fails_the_run_in_the_table_and_the_json() {
        let held = Report::default();
        assert!(held.passed());
        assert!(table(&held).contains("took effect                every fault kind asked for"));
        let r = Report {
            faults_without_effect: vec![NoEffect {
                kind: "zombie_worker",
                measured: "3 scheduled, 0 fired; 0 zombies frozen".into(),
                required: "1 zombies frozen".into(),
            }],
            ..Report::default()
        };
        // No invariant broken, and still a failure.
        assert!(r.violation_details.is_empty());
        assert!(!r.passed());
        let shown = table(&r);
        assert!(shown.contains("FAILED (seed 0)"), "{shown}");
        assert!(
            shown.contains(
                "zombie_worker took no effect: measured 3 scheduled, 0 fired; 0 zombies frozen; \
                 required at least 1 zombies frozen"
            ),
            "{shown}"
        );
        assert!(!shown.contains("all invariants hold"), "{shown}");
        let json = serde_json::to_value(&r).expect("a serializable report");
        assert_eq!(json["faults_without_effect"][0]["kind"], "zombie_worker");
        assert_eq!(
            json["faults_without_effect"][0]["measured"],
            "3 scheduled, 0 fired; 0 zombies frozen"
        );
    }
}
