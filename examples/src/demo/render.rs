//! The summary printed at the end of a run.

use std::collections::BTreeMap;
use std::fmt::Write;

use saga_core::{Direction, HistoryEntry, Outcome};

use crate::audit::Violation;

use super::{Cleanup, Crash, OrderReport, Report, Show};

/// `n` and `noun`, plural unless `n` is 1 (`noun` + "s").
pub(super) fn count(n: impl Into<i64>, noun: &str) -> String {
    let n = n.into();
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

pub(super) fn count_usize(n: usize, noun: &str) -> String {
    count(i64::try_from(n).unwrap_or(i64::MAX), noun)
}

fn dollars(cents: i64) -> String {
    format!("${}.{:02}", cents / 100, (cents % 100).abs())
}

/// A failure's gist: the status code or the kind of error.
fn gist(error: &str) -> String {
    if error.contains("declined") {
        return "declined".into();
    }
    if error.contains("out_of_stock") {
        return "out of stock".into();
    }
    if let Some(i) = error.find("answered ") {
        let code: String = error[i + 9..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        if !code.is_empty() {
            return code;
        }
    }
    if error.starts_with("timeout") {
        return "timeout".into();
    }
    if error.contains("retry budget spent") && error.contains("claimed") {
        return "lost".into();
    }
    error.split(':').next().unwrap_or(error).to_owned()
}

/// One order's step timeline: each step (and compensation) with its
/// attempts, `✓` a success, `✗` a failure that was retried, `✗!` a
/// failure for good, `…` an attempt whose worker died.
#[must_use]
pub fn timeline(history: &[HistoryEntry]) -> String {
    let mut parts: Vec<(String, String)> = Vec::new();
    let mut last_attempt: BTreeMap<(String, Direction), u32> = BTreeMap::new();
    for h in history.iter().filter(|h| h.outcome != Outcome::Created) {
        let name = match h.direction {
            Direction::Forward => h.step.to_string(),
            Direction::Compensate => format!("↺ undo {}", h.step),
        };
        let key = (h.step.to_string(), h.direction);
        let previous = last_attempt.insert(key, h.attempt).unwrap_or(0);
        let mut marks = String::new();
        // Attempts claimed but never recorded: a worker died in them.
        for _ in previous + 1..h.attempt {
            marks.push_str("… ");
        }
        let error = h.error.as_deref().map(gist);
        marks.push_str(&match (h.outcome, error) {
            (Outcome::Succeeded, _) => "✓".to_owned(),
            (Outcome::RetryScheduled, Some(e)) => format!("✗{e}"),
            (Outcome::FailedForGood, Some(e)) => format!("✗!{e}"),
            (Outcome::Snoozed, _) => "⏸".to_owned(),
            (Outcome::Parked, _) => "⚑".to_owned(),
            (other, _) => other.to_string(),
        });
        match parts.last_mut() {
            Some((last, m)) if *last == name => {
                m.push(' ');
                m.push_str(&marks);
            }
            _ => parts.push((name, marks)),
        }
    }
    parts
        .into_iter()
        .map(|(name, marks)| format!("{name} {marks}"))
        .collect::<Vec<_>>()
        .join(" · ")
}

/// The summary printed at the end of a run, listing the orders as `show`
/// says.
#[must_use]
pub fn render(report: &Report, show: Show) -> String {
    let mut out = String::new();
    let w = &mut out;
    let _ = writeln!(
        w,
        "\n{}, {}, seed {}, {:.1}s\n",
        count_usize(report.orders.len(), "order"),
        count_usize(report.workers, "worker"),
        report.seed,
        report.elapsed.as_secs_f64()
    );
    let _ = writeln!(
        w,
        "{:<11} {:<15} {:<12} steps (✓ ok, ✗ retried, ✗! gave up, … worker died)",
        "order", "scenario", "outcome"
    );
    let shown = match show {
        Show::All => report.orders.len(),
        Show::First(n) => report.orders.len().min(n),
    };
    for o in &report.orders[..shown] {
        let _ = writeln!(
            w,
            "{:<11} {:<15} {:<12} {}",
            o.order.id,
            o.scenario.label(),
            o.status.as_str(),
            timeline(&o.history)
        );
    }
    if report.orders.len() > shown {
        let _ = writeln!(
            w,
            "… and {} (--show all lists them)",
            count_usize(report.orders.len() - shown, "more order")
        );
    }
    let mut by_status: BTreeMap<&str, usize> = BTreeMap::new();
    for o in &report.orders {
        *by_status.entry(o.status.as_str()).or_default() += 1;
    }
    let _ = writeln!(
        w,
        "\nOutcomes: {}",
        by_status
            .iter()
            .map(|(s, n)| format!("{n} {s}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    match &report.crash {
        Crash::NotAsked => {}
        Crash::NeedsTwoWorkers => {
            let _ = writeln!(w, "Crash: skipped: needs at least 2 workers.");
        }
        Crash::DidNotHappen { order } => {
            let _ = writeln!(
                w,
                "Crash: none: {order} never reserved its stock, where a worker was to be killed."
            );
        }
        Crash::Happened { worker, order } => {
            let resumed = report
                .orders
                .iter()
                .find(|o| o.order.id == *order)
                .is_some_and(|o| {
                    o.history.iter().any(|h| {
                        h.step.as_str() == "reserve_inventory"
                            && h.direction == Direction::Forward
                            && h.outcome != Outcome::Created
                    })
                });
            let _ = writeln!(
                w,
                "Crash: worker {worker} was killed right after reserving the stock of {order}, \
                 before recording it; {}",
                if resumed {
                    format!(
                        "another worker resumed {order} once the lease expired, with the same \
                         idempotency key (no second deduction)."
                    )
                } else {
                    format!("the run stopped before another worker resumed {order}.")
                }
            );
        }
    }
    for note in &report.notes {
        let _ = writeln!(w, "Note: {note}.");
    }
    let unfinished: Vec<&OrderReport> = report.unfinished().collect();
    if report.stopped_early {
        let why = if report.interrupted {
            "Interrupted".to_owned()
        } else {
            format!("Deadline reached ({}s)", report.deadline.as_secs())
        };
        let mut left = Vec::new();
        if !unfinished.is_empty() {
            left.push(format!(
                "{} of {} unfinished (still running or compensating)",
                unfinished.len(),
                count_usize(report.orders.len(), "saga")
            ));
        }
        if report.undelivered > 0 {
            left.push(format!(
                "{} not delivered yet",
                count(report.undelivered, "message")
            ));
        }
        let _ = writeln!(
            w,
            "{why}: the run stopped with {}.",
            if left.is_empty() {
                "nothing left to do".to_owned()
            } else {
                left.join(" and ")
            }
        );
    }

    let a = &report.audit;
    let (charges, charged, refunded) = a.payment_totals();
    let confirmed: Vec<_> = a.orders.values().filter(|o| o.confirmed).collect();
    let confirmed_total: i64 = confirmed.iter().map(|o| o.total_cents).sum();
    let refunds = a.orders.values().filter(|o| o.refunded_cents > 0).count();
    let net = charged - refunded;
    let _ = writeln!(w, "\nLedgers (the services' own records):");
    let _ = writeln!(
        w,
        "  payment:   {} ({}), {} ({}); net {} {} total of the {} ({})",
        count_usize(charges, "charge"),
        dollars(charged),
        count_usize(refunds, "refund"),
        dollars(refunded),
        dollars(net),
        if net == confirmed_total { "=" } else { "≠" },
        count_usize(confirmed.len(), "confirmed order"),
        dollars(confirmed_total)
    );
    let twice = a.orders.values().filter(|o| o.charges > 1).count();
    let unrefunded = a
        .orders
        .values()
        .filter(|o| !o.confirmed && o.charged_cents != o.refunded_cents)
        .count();
    let _ = writeln!(
        w,
        "             orders charged twice: {twice}; charged, not confirmed and not refunded: {unrefunded}"
    );
    let deducted: i64 = a
        .orders
        .values()
        .flat_map(|o| o.net_deducted.values())
        .sum();
    let unconfirmed_deducted: i64 = a
        .orders
        .values()
        .filter(|o| !o.confirmed)
        .flat_map(|o| o.net_deducted.values())
        .sum();
    let stock_conserved = !a
        .violations
        .iter()
        .any(|v| matches!(v, Violation::StockNotConserved { .. }));
    let _ = writeln!(
        w,
        "  inventory: {}; net deducted {}, {}; stock conserved: {}",
        count_usize(a.stock.len(), "SKU"),
        count(deducted, "unit"),
        if unconfirmed_deducted == 0 {
            "all for confirmed orders".to_owned()
        } else {
            format!("{unconfirmed_deducted} for orders not confirmed")
        },
        if stock_conserved { "yes" } else { "NO" }
    );
    let emails: usize = a.orders.values().map(|o| o.emails).sum();
    let _ = writeln!(
        w,
        "  email:     {emails} sent for {}{}",
        count_usize(confirmed.len(), "confirmed order"),
        if report.undelivered > 0 {
            format!(
                " ({} still in the outbox)",
                count(report.undelivered, "message")
            )
        } else {
            String::new()
        }
    );
    if report.dead_letters > 0 {
        let _ = writeln!(
            w,
            "  outbox:    {}",
            count(report.dead_letters, "dead letter")
        );
    }

    if !unfinished.is_empty() {
        let _ = writeln!(
            w,
            "\nUnfinished: {} ({}): their ledgers are not final (charged and not yet \
             confirmed or refunded...).",
            count_usize(unfinished.len(), "order"),
            list(unfinished.iter().map(|o| o.order.id.as_str())),
        );
    }
    let pending = a.violations.iter().filter(|v| report.is_pending(v)).count();
    if pending > 0 {
        let _ = writeln!(
            w,
            "Pending: {} of unfinished orders, or of emails still in the outbox, not counted \
             as violations.",
            count_usize(pending, "ledger imbalance")
        );
    }
    let stuck: Vec<&OrderReport> = report.stuck().collect();
    if !stuck.is_empty() {
        let _ = writeln!(
            w,
            "\nStuck: {} parked for an operator, who resumes or cancels them \
             (docs/operations.md, \"Stuck sagas\"):",
            count_usize(stuck.len(), "order")
        );
        for o in stuck.iter().take(10) {
            let _ = writeln!(
                w,
                "  {:<11} {}",
                o.order.id,
                o.stuck_reason.as_deref().unwrap_or("(no reason recorded)")
            );
        }
        if stuck.len() > 10 {
            let _ = writeln!(w, "  … and {} more", stuck.len() - 10);
        }
    }

    let violations: Vec<&Violation> = report.violations().collect();
    if violations.is_empty() && unfinished.is_empty() && report.undelivered == 0 {
        let _ = writeln!(
            w,
            "\nInvariants: all hold (no double charge, no lost refund, stock conserved, one email per confirmed order)."
        );
    } else if violations.is_empty() {
        let _ = writeln!(
            w,
            "\nInvariants: no violation in the final ledgers; the unfinished orders are not checked."
        );
    } else {
        let _ = writeln!(w, "\nInvariants: {} VIOLATED", violations.len());
        for v in violations {
            let _ = writeln!(w, "  {v}");
        }
    }
    match &report.cleanup {
        Cleanup::Throwaway | Cleanup::Dropped { .. } => {}
        Cleanup::Kept { prefix } => {
            let _ = writeln!(
                w,
                "\nSchemas kept: {prefix}_saga, {prefix}_shop, {prefix}_payment, \
                 {prefix}_inventory, {prefix}_email."
            );
        }
        Cleanup::DropFailed { prefix, error } => {
            let _ = writeln!(
                w,
                "\nSchemas {prefix}_* could not be dropped: {}",
                crate::describe(error.as_ref())
            );
        }
    }
    out
}

/// Up to five items, then how many more.
fn list<'a>(items: impl ExactSizeIterator<Item = &'a str>) -> String {
    let n = items.len();
    let mut shown: Vec<&str> = items.take(5).collect();
    let more = n - shown.len();
    let more = (more > 0).then(|| format!("and {more} more"));
    shown.extend(more.as_deref());
    shown.join(", ")
}
