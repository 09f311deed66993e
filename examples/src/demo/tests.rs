//! The demo's report, summary and banner.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use saga_core::{SagaId, Status};

use super::*;
use crate::audit::{Audit, OrderLedger, check};
use crate::model::{CARD_OK, Order, OrderLine};
use crate::services::Faults;

fn order(id: &str, total_cents: i64, status: Status) -> OrderReport {
    OrderReport {
        order: Order {
            id: id.to_owned(),
            email: format!("{id}@example.com"),
            card: CARD_OK.to_owned(),
            lines: vec![OrderLine {
                sku: "mug".to_owned(),
                qty: 1,
            }],
            total_cents,
        },
        scenario: Scenario::Ok,
        saga_id: SagaId::new(),
        status,
        stuck_reason: None,
        history: Vec::new(),
    }
}

/// What the ledgers say of an order charged `charged` and refunded
/// `refunded`, deducted `deducted` mugs, with `emails` emails.
fn ledger(
    total_cents: i64,
    confirmed: bool,
    (charged, refunded): (i64, i64),
    deducted: i64,
    emails: usize,
) -> OrderLedger {
    OrderLedger {
        total_cents,
        confirmed,
        charges: usize::from(charged > 0),
        charged_cents: charged,
        refunded_cents: refunded,
        ordered: [("mug".to_owned(), 1)].into(),
        reservations: [("mug".to_owned(), usize::from(deducted > 0))].into(),
        net_deducted: [("mug".to_owned(), deducted)].into(),
        emails,
    }
}

fn report(orders: Vec<OrderReport>, ledgers: Vec<OrderLedger>, available: i64) -> Report {
    let ledgers: BTreeMap<String, OrderLedger> = orders
        .iter()
        .map(|o| o.order.id.clone())
        .zip(ledgers)
        .collect();
    let stock = [("mug".to_owned(), (10, available))].into();
    let violations = check(&ledgers, &stock);
    Report {
        orders,
        audit: Audit {
            orders: ledgers,
            stock,
            violations,
        },
        crash: Crash::NotAsked,
        workers: 2,
        seed: 7,
        elapsed: Duration::from_millis(1_500),
        deadline: Duration::from_secs(300),
        stopped_early: false,
        interrupted: false,
        undelivered: 0,
        undelivered_orders: BTreeSet::new(),
        dead_letters: 0,
        notes: Vec::new(),
        cleanup: Cleanup::Throwaway,
    }
}

#[test]
fn balanced_ledgers_say_so() {
    let r = report(
        vec![
            order("order-0001", 1_200, Status::Completed),
            order("order-0002", 800, Status::Compensated),
        ],
        vec![
            ledger(1_200, true, (1_200, 0), 1, 1),
            ledger(800, false, (800, 800), 0, 0),
        ],
        9,
    );
    let text = render(&r, Show::default());
    assert!(
        text.contains(
            "2 charges ($20.00), 1 refund ($8.00); net $12.00 = total of the 1 confirmed order ($12.00)"
        ),
        "{text}"
    );
    assert!(text.contains("net deducted 1 unit, all for confirmed orders; stock conserved: yes"));
    assert!(text.contains("1 sent for 1 confirmed order\n"), "{text}");
    assert!(text.contains("Invariants: all hold"), "{text}");
    assert!(!text.contains("Unfinished") && !text.contains("Deadline"));
    assert_eq!(r.verdict(), Verdict::AllGood);
}

#[test]
fn unbalanced_ledgers_are_not_reported_as_balanced() {
    // order-0002 was compensated but never refunded, and its mug never
    // released; one mug went missing from the stock.
    let r = report(
        vec![
            order("order-0001", 1_200, Status::Completed),
            order("order-0002", 800, Status::Compensated),
        ],
        vec![
            ledger(1_200, true, (1_200, 0), 1, 1),
            ledger(800, false, (800, 0), 1, 0),
        ],
        7,
    );
    let text = render(&r, Show::default());
    assert!(
        text.contains("net $20.00 ≠ total of the 1 confirmed order ($12.00)"),
        "{text}"
    );
    assert!(!text.contains(" = total"), "{text}");
    assert!(text.contains("charged, not confirmed and not refunded: 1"));
    assert!(
        text.contains("net deducted 2 units, 1 for orders not confirmed; stock conserved: NO"),
        "{text}"
    );
    assert!(!text.contains("all for confirmed orders"), "{text}");
    assert!(text.contains("Invariants: 3 VIOLATED"), "{text}");
    assert!(text.contains("I1 order-0002: charges - refunds = 800, expected 0"));
    assert!(!text.contains("all hold"), "{text}");
    assert_eq!(r.verdict(), Verdict::Violated);
}

#[test]
fn unfinished_sagas_at_the_deadline_are_reported_apart_from_violations() {
    // The deadline passed: order-0002 is charged and not yet confirmed,
    // order-0003 is compensating (charged, not yet refunded).
    let mut r = report(
        vec![
            order("order-0001", 1_200, Status::Completed),
            order("order-0002", 800, Status::Running),
            order("order-0003", 2_500, Status::Compensating),
        ],
        vec![
            ledger(1_200, true, (1_200, 0), 1, 1),
            ledger(800, false, (800, 0), 1, 0),
            ledger(2_500, false, (2_500, 0), 0, 0),
        ],
        8,
    );
    r.stopped_early = true;
    r.deadline = Duration::from_secs(1);
    r.undelivered = 1;
    r.crash = Crash::Happened {
        worker: 2,
        order: "order-0002".to_owned(),
    };
    assert_eq!(r.audit.violations.len(), 3, "{:?}", r.audit.violations);
    let text = render(&r, Show::default());
    assert!(
        text.contains(
            "before recording it; the run stopped before another worker resumed order-0002."
        ),
        "{text}"
    );
    assert!(
        text.contains(
            "Deadline reached (1s): the run stopped with 2 of 3 sagas unfinished (still \
             running or compensating) and 1 message not delivered yet."
        ),
        "{text}"
    );
    assert!(
        text.contains("net $45.00 ≠ total of the 1 confirmed order ($12.00)"),
        "{text}"
    );
    assert!(
        text.contains("Unfinished: 2 orders (order-0002, order-0003)"),
        "{text}"
    );
    assert!(
        text.contains("Pending: 3 ledger imbalances of unfinished orders"),
        "{text}"
    );
    assert!(
        text.contains("email:     1 sent for 1 confirmed order (1 message still in the outbox)"),
        "{text}"
    );
    assert!(
        text.contains("Invariants: no violation in the final ledgers"),
        "{text}"
    );
    assert!(
        !text.contains("VIOLATED") && !text.contains("all hold"),
        "{text}"
    );
    assert_eq!(r.verdict(), Verdict::Unsettled);

    // A second charge is wrong whether or not the saga has finished.
    r.audit.orders.get_mut("order-0002").unwrap().charges = 2;
    r.audit.violations = check(&r.audit.orders, &r.audit.stock);
    let text = render(&r, Show::default());
    assert!(text.contains("Invariants: 1 VIOLATED"), "{text}");
    assert!(text.contains("I1 order-0002: charged 2 times"), "{text}");
    assert_eq!(r.verdict(), Verdict::Violated);
}

#[test]
fn a_missing_email_still_in_the_outbox_is_pending_not_violated() {
    let mut r = report(
        vec![order("order-0001", 1_200, Status::Completed)],
        vec![ledger(1_200, true, (1_200, 0), 1, 0)],
        9,
    );
    assert_eq!(
        r.verdict(),
        Verdict::Violated,
        "no email, nothing in flight"
    );
    r.stopped_early = true;
    r.undelivered = 1;
    r.undelivered_orders.insert("order-0001".to_owned());
    assert_eq!(r.verdict(), Verdict::Unsettled);
    let text = render(&r, Show::default());
    assert!(text.contains("1 message not delivered yet"), "{text}");
}

#[test]
fn stuck_sagas_a_skipped_crash_and_counts_of_one() {
    let mut stuck = order("order-0001", 1_200, Status::Stuck);
    stuck.stuck_reason = Some("the pivot's outcome is unknown: timeout".to_owned());
    let mut r = report(vec![stuck], vec![ledger(1_200, false, (0, 0), 0, 0)], 10);
    r.workers = 1;
    r.crash = Crash::NeedsTwoWorkers;
    let text = render(&r, Show::default());
    assert!(
        text.starts_with("\n1 order, 1 worker, seed 7, 1.5s\n"),
        "{text}"
    );
    assert!(text.contains("Crash: skipped: needs at least 2 workers."));
    assert!(
        text.contains("Stuck: 1 order parked for an operator"),
        "{text}"
    );
    assert!(text.contains("order-0001  the pivot's outcome is unknown: timeout"));
    assert!(
        text.contains("0 charges ($0.00), 0 refunds ($0.00)"),
        "{text}"
    );
    assert!(text.contains("Invariants: all hold"), "{text}");
    assert_eq!(r.verdict(), Verdict::Unsettled);
}

#[test]
fn show_lists_all_or_the_first_n_orders() {
    let orders: Vec<OrderReport> = (1..=45)
        .map(|i| order(&format!("order-{i:04}"), 100, Status::Completed))
        .collect();
    let ledgers = (1..=45)
        .map(|_| ledger(100, true, (100, 0), 1, 1))
        .collect();
    let r = report(orders, ledgers, 10 - 45);
    let rows = |text: &str| text.lines().filter(|l| l.starts_with("order-")).count();
    let default = render(&r, Show::default());
    assert_eq!(rows(&default), 40);
    assert!(default.contains("… and 5 more orders (--show all lists them)"));
    let all = render(&r, Show::All);
    assert_eq!(rows(&all), 45);
    assert!(!all.contains("more orders"));
    let three = render(&r, "3".parse().unwrap());
    assert_eq!(rows(&three), 3);
    assert!(three.contains("… and 42 more orders"));
    assert_eq!("all".parse::<Show>(), Ok(Show::All));
    assert!("some".parse::<Show>().is_err());
}

#[test]
fn the_banner_says_where_without_the_password_and_the_warnings_what_is_odd() {
    let url = Options {
        database: Database::Url("postgres://me:secret@db.example:6543/shop".into()),
        ..Options::default()
    };
    let banner = banner(&url);
    assert_eq!(
        banner,
        "checkout: 12 orders, 2 workers, on PostgreSQL at db.example:6543, database shop \
         (its schemas checkout_<id>_* are dropped at the end; --keep keeps them)"
    );
    assert!(!banner.contains("secret"));
    assert_eq!(
        super::banner(&Options {
            orders: 1,
            workers: 1,
            ..Options::default()
        }),
        "checkout: 1 order, 1 worker, on a throwaway local PostgreSQL"
    );
    assert!(warnings(&Options::default()).is_empty());
    let odd = warnings(&Options {
        workers: 1,
        faults: Faults {
            latency: Duration::from_millis(1_500),
            ..Faults::default()
        },
        ..Options::default()
    });
    assert_eq!(odd.len(), 2, "{odd:?}");
    assert!(odd[0].starts_with("crash skipped: needs at least 2 workers"));
    assert!(
        odd[1].contains(
            "latency of 1500 ms is at or above the per-call timeout, --http-timeout-ms, of \
             1000 ms"
        ),
        "{odd:?}"
    );
}
