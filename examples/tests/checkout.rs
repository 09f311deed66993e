//! The checkout example, end to end, and the behaviour of its fake services.

use std::collections::BTreeMap;
use std::time::Duration;

use checkout::demo::{self, Options, Scenario};
use checkout::deploy::{Database, Deployment};
use checkout::model::{CARD_OK, Order, OrderLine};
use checkout::services::Faults;
use saga_core::{Direction, Outcome, Status};
use serde_json::json;

async fn database() -> (Database, saga_test_support::TestDatabase) {
    let db = saga_test_support::fresh_database()
        .await
        .expect("a test database");
    (Database::Url(db.url().to_owned()), db)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_ends_every_order_as_its_scenario_says_and_the_ledgers_balance() {
    let (database, _db) = database().await;
    let report = demo::run(
        Options {
            orders: 12,
            workers: 2,
            database,
            deadline: Duration::from_secs(120),
            ..Options::default()
        },
        |_| {},
    )
    .await
    .unwrap();
    assert!(
        report.audit.violations.is_empty(),
        "{:#?}",
        report.audit.violations
    );
    let scenarios: std::collections::BTreeSet<Scenario> =
        report.orders.iter().map(|o| o.scenario).collect();
    assert_eq!(scenarios.len(), 4, "every scenario is shown: {scenarios:?}");
    for o in &report.orders {
        let ledger = &report.audit.orders[&o.order.id];
        let steps = |direction| -> Vec<(String, Outcome)> {
            o.history
                .iter()
                .filter(|h| h.direction == direction && h.outcome != Outcome::Created)
                .map(|h| (h.step.to_string(), h.outcome))
                .collect()
        };
        match o.scenario {
            Scenario::Ok => {
                assert_eq!(o.status, Status::Completed, "{}", o.order.id);
                assert_eq!(ledger.charged_cents, o.order.total_cents);
                assert_eq!(ledger.emails, 1);
            }
            Scenario::Declined => {
                assert_eq!(o.status, Status::Compensated, "{}", o.order.id);
                assert_eq!(ledger.charges, 0);
                // The failed step is compensated too: its refund finds
                // nothing to undo.
                assert_eq!(
                    steps(Direction::Compensate),
                    [("charge_payment".into(), Outcome::Succeeded)]
                );
            }
            Scenario::OutOfStock => {
                assert_eq!(o.status, Status::Compensated, "{}", o.order.id);
                assert_eq!(
                    (ledger.charges, ledger.refunded_cents),
                    (1, o.order.total_cents)
                );
                assert_eq!(
                    steps(Direction::Compensate),
                    [
                        ("reserve_inventory".into(), Outcome::Succeeded),
                        ("charge_payment".into(), Outcome::Succeeded)
                    ],
                    "reverse order"
                );
            }
            Scenario::GatewayDown => {
                assert_eq!(o.status, Status::Compensated, "{}", o.order.id);
                let forward = steps(Direction::Forward);
                let charges: Vec<_> = forward
                    .iter()
                    .filter(|(s, _)| s == "charge_payment")
                    .collect();
                let attempts: Vec<u32> = o
                    .history
                    .iter()
                    .filter(|h| {
                        h.step.as_str() == "charge_payment"
                            && h.direction == Direction::Forward
                            && h.outcome != Outcome::Created
                    })
                    .map(|h| h.attempt)
                    .collect();
                // The killed worker may have had one of these attempts in
                // flight: claimed, never recorded, so its number is missing.
                let interrupted = attempts.iter().zip(1..).any(|(a, n)| *a != n);
                if interrupted {
                    assert!(
                        attempts.windows(2).all(|w| w[0] < w[1])
                            && attempts.last().is_some_and(|a| *a >= 4),
                        "retried up to the budget, one attempt lost: {attempts:?}"
                    );
                } else {
                    assert_eq!(charges.len(), 4, "retried up to the budget: {forward:?}");
                }
                assert_eq!(charges.last().unwrap().1, Outcome::FailedForGood);
                assert!(
                    charges[..charges.len() - 1]
                        .iter()
                        .all(|(_, o)| *o == Outcome::RetryScheduled),
                    "{forward:?}"
                );
                assert_eq!(ledger.charges, 0);
            }
        }
    }
    let (worker, crashed) = report.crashed_during().expect("a worker was killed");
    let crashed = crashed.to_owned();
    assert!(worker >= 1);
    let order = report
        .orders
        .iter()
        .find(|o| o.order.id == crashed)
        .unwrap();
    assert_eq!(order.status, Status::Completed);
    let reserve: Vec<u32> = order
        .history
        .iter()
        .filter(|h| h.step.as_str() == "reserve_inventory")
        .map(|h| h.attempt)
        .collect();
    assert_eq!(
        reserve,
        [2],
        "the killed attempt left no record; the second one succeeded"
    );
    assert_eq!(
        report.audit.orders[&crashed].reservations.values().max(),
        Some(&1)
    );
    let rendered = demo::render(&report, demo::Show::default());
    assert!(rendered.contains("Invariants: all hold"), "{rendered}");
    assert!(rendered.contains(&format!("{crashed:<11}")), "{rendered}");
    assert_eq!(report.verdict(), demo::Verdict::AllGood);

    // The README's first screen shows this run (same options, same seed):
    // what `cargo run -p checkout` prints, the banner on stderr, then the
    // summary.
    let printed = format!("{}\n{rendered}", demo::banner(&Options::default()));
    assert_matches_readme_sample(&printed, &crashed);
}

/// The README's sample output of `cargo run -p checkout`: its first
/// ```text block.
fn readme_sample() -> String {
    let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let readme = std::fs::read_to_string(&path).unwrap();
    let start = readme
        .find("```text\n")
        .expect("a ```text block in README.md")
        + 8;
    let end = start + readme[start..].find("```\n").expect("its end");
    readme[start..end].to_owned()
}

/// A line as it may differ between two runs of the same seed: the elapsed
/// time, which worker was killed, and the attempts the kill interrupted in
/// orders other than the one it was aimed at.
fn normalised(line: &str, crashed: &str) -> String {
    if line.contains(" orders, ")
        && line.contains(", seed ")
        && let Some((head, _elapsed)) = line.rsplit_once(", ")
    {
        return format!("{head}, <elapsed>");
    }
    if let Some(rest) = line.strip_prefix("Crash: worker ") {
        let rest = rest.trim_start_matches(|c: char| c.is_ascii_digit());
        return format!("Crash: worker <n>{rest}");
    }
    if line.starts_with("order-") && !line.starts_with(crashed) {
        return line.replace(" …", "");
    }
    line.to_owned()
}

/// Where the steps column starts in `line`, if it is the row of an order
/// other than `crashed` with an attempt a worker died in (`…`).
fn interrupted_at(line: &str, crashed: &str) -> Option<usize> {
    // The columns: order (11), scenario (15), outcome (12), steps.
    const STEPS_AT: usize = 11 + 1 + 15 + 1 + 12 + 1;
    (line.starts_with("order-") && !line.starts_with(crashed) && line.contains(" … "))
        .then_some(STEPS_AT)
}

/// `printed` is the README's sample, but for what [`normalised`] evens
/// out and the sample's `[... N more orders ...]` lines, each standing for
/// N order rows.
fn assert_matches_readme_sample(printed: &str, crashed: &str) {
    let sample = readme_sample();
    let mut actual = printed.lines();
    let mut elided = 0;
    for (n, want) in sample.lines().enumerate() {
        let more = want
            .strip_prefix("[... ")
            .and_then(|r| r.strip_suffix(" more orders ...]"))
            .map(|k| k.parse::<usize>().expect("a count of orders"));
        if let Some(k) = more {
            for _ in 0..k {
                let row = actual.next().unwrap_or_default();
                assert!(
                    row.starts_with("order-"),
                    "README.md sample line {}: `{want}` stands for {k} order rows, but the \
                     demo printed `{row}`\n{printed}",
                    n + 1
                );
            }
            elided += k;
            continue;
        }
        let got = actual.next().unwrap_or_default();
        // An order the kill interrupted (an attempt of it was in flight on
        // the killed worker) has one attempt fewer recorded: its timeline
        // differs from the sample's; its order, scenario and outcome do not.
        if let Some(steps_at) = interrupted_at(got, crashed) {
            assert_eq!(
                want.get(..steps_at).map(str::trim_end),
                got.get(..steps_at).map(str::trim_end),
                "README.md's sample output (line {} of its ```text block) is not what \
                 `cargo run -p checkout` prints; update the README from:\n{printed}",
                n + 1
            );
            continue;
        }
        assert_eq!(
            normalised(want, crashed),
            normalised(got, crashed),
            "README.md's sample output (line {} of its ```text block) is not what \
             `cargo run -p checkout` prints; update the README from:\n{printed}",
            n + 1
        );
    }
    assert_eq!(
        actual.collect::<Vec<_>>(),
        Vec::<&str>::new(),
        "the README's sample stops early"
    );
    assert!(elided > 0 && elided < 12, "the sample shows some orders");
}

async fn post(
    http: &reqwest::Client,
    url: String,
    key: uuid::Uuid,
    body: serde_json::Value,
) -> (u16, serde_json::Value) {
    let r = http
        .post(url)
        .header("Idempotency-Key", key.to_string())
        .json(&body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(json!(null)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payment_charges_once_per_key_and_a_refund_for_nothing_voids_the_key() {
    let (database, _db) = database().await;
    let stock = BTreeMap::from([("mug".to_owned(), 5)]);
    let d = Deployment::start(database, "pay", &stock, 1).await.unwrap();
    let http = reqwest::Client::new();
    let charge = |order: &str| json!({ "order_id": order, "amount_cents": 500, "card": CARD_OK });
    let (k1, k2) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());

    let first = post(
        &http,
        format!("{}/charges", d.payment.url()),
        k1,
        charge("o1"),
    )
    .await;
    let again = post(
        &http,
        format!("{}/charges", d.payment.url()),
        k1,
        charge("o1"),
    )
    .await;
    assert_eq!(first.0, 201);
    assert_eq!(again, first, "the same key returns the first result");
    let refund = post(
        &http,
        format!("{}/refunds", d.payment.url()),
        k2,
        json!({ "charge_key": k1 }),
    )
    .await;
    assert_eq!(refund.1["refunded"], true);
    let refund_again = post(
        &http,
        format!("{}/refunds", d.payment.url()),
        k2,
        json!({ "charge_key": k1 }),
    )
    .await;
    assert_eq!(refund_again, refund);

    // A refund for a key that never charged is a no-op, and a charge
    // arriving late with that key is refused.
    let (never, undo) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
    let noop = post(
        &http,
        format!("{}/refunds", d.payment.url()),
        undo,
        json!({ "charge_key": never }),
    )
    .await;
    assert_eq!(noop, (200, json!({ "refunded": false })));
    let late = post(
        &http,
        format!("{}/charges", d.payment.url()),
        never,
        charge("o2"),
    )
    .await;
    assert_eq!(late.0, 409);

    // A lost reply: the charge happens, the caller times out, the retry
    // gets the stored result.
    d.payment.set_faults(Faults {
        lose_reply_rate: 1.0,
        ..Faults::default()
    });
    let k3 = uuid::Uuid::now_v7();
    let timed_out = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap()
        .post(format!("{}/charges", d.payment.url()))
        .header("Idempotency-Key", k3.to_string())
        .json(&charge("o3"))
        .send()
        .await;
    assert!(timed_out.unwrap_err().is_timeout());
    d.payment.set_faults(Faults::default());
    let retried = post(
        &http,
        format!("{}/charges", d.payment.url()),
        k3,
        charge("o3"),
    )
    .await;
    assert_eq!(retried.0, 201);

    let audit = d.audit().await.unwrap();
    let charges: BTreeMap<_, _> = audit
        .orders
        .iter()
        .map(|(k, o)| (k.clone(), (o.charges, o.refunded_cents)))
        .collect();
    assert_eq!(charges["o1"], (1, 500));
    assert_eq!(charges.get("o2").copied().unwrap_or((0, 0)), (0, 0));
    assert_eq!(charges["o3"], (1, 0));
    d.stop_services();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inventory_deducts_once_per_key_and_never_below_zero() {
    let (database, _db) = database().await;
    let stock = BTreeMap::from([("mug".to_owned(), 3)]);
    let d = Deployment::start(database, "inv", &stock, 1).await.unwrap();
    let http = reqwest::Client::new();
    let order = Order {
        id: "o1".into(),
        email: "a@example.com".into(),
        card: CARD_OK.into(),
        lines: vec![OrderLine {
            sku: "mug".into(),
            qty: 2,
        }],
        total_cents: 100,
    };
    let body = json!({ "order_id": order.id, "lines": order.lines });
    let k = uuid::Uuid::now_v7();
    let first = post(
        &http,
        format!("{}/reservations", d.inventory.url()),
        k,
        body.clone(),
    )
    .await;
    let again = post(
        &http,
        format!("{}/reservations", d.inventory.url()),
        k,
        body.clone(),
    )
    .await;
    assert_eq!((first.0, again), (201, first.clone()));
    let other = post(
        &http,
        format!("{}/reservations", d.inventory.url()),
        uuid::Uuid::now_v7(),
        body,
    )
    .await;
    assert_eq!(
        other,
        (409, json!({ "error": "out_of_stock" })),
        "only 1 left"
    );
    let release = uuid::Uuid::now_v7();
    for _ in 0..2 {
        let r = post(
            &http,
            format!("{}/releases", d.inventory.url()),
            release,
            json!({ "reservation_key": k }),
        )
        .await;
        assert_eq!(r, (200, json!({ "released": true })));
    }
    let audit = d.audit().await.unwrap();
    assert_eq!(audit.stock["mug"], (3, 3), "released once, back to 3");
    d.stop_services();
}

#[test]
fn the_diagram_is_generated_from_the_definition() {
    let diagram = checkout::saga::diagram();
    assert!(diagram.starts_with("flowchart LR\n    %% checkout v1\n"));
    for step in [
        "validate_order",
        "charge_payment",
        "reserve_inventory",
        "send_confirmation",
    ] {
        assert!(diagram.contains(step), "{step}");
    }
    assert!(
        diagram.contains(r#"s3{{"confirm_order<br/>pivot"}}"#),
        "{diagram}"
    );
    assert!(
        diagram.contains("s3 -. fails .-> c2"),
        "the pivot's definitive failure undoes the steps before it"
    );
    assert!(
        diagram.contains("s3 -. in doubt .-> stuck"),
        "the pivot giving up in doubt parks the saga"
    );
    for compensation in ["c1", "c2"] {
        assert!(
            diagram.contains(&format!("{compensation} -. gives up .-> stuck")),
            "{compensation}: {diagram}"
        );
    }
    assert!(
        diagram.contains("c2 --> c1"),
        "compensations run in reverse"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledgers_refuse_updates_and_deletes() {
    let (database, _db) = database().await;
    let stock = BTreeMap::from([("mug".to_owned(), 5)]);
    let d = Deployment::start(database, "ledgers", &stock, 1)
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let charged = post(
        &http,
        format!("{}/charges", d.payment.url()),
        uuid::Uuid::now_v7(),
        json!({ "order_id": "o1", "amount_cents": 500, "card": CARD_OK }),
    )
    .await;
    assert_eq!(charged.0, 201);
    let db = d.pool.get().await.unwrap();
    let payment = format!("{}.ledger", d.schemas.payment.quoted());
    let tables = [
        payment.clone(),
        format!("{}.ledger", d.schemas.inventory.quoted()),
        format!("{}.sent", d.schemas.email.quoted()),
    ];
    for table in &tables {
        for statement in [
            format!("UPDATE {table} SET order_id = 'o2'"),
            format!("DELETE FROM {table}"),
            format!("TRUNCATE {table}"),
        ] {
            let err = db.batch_execute(&statement).await.unwrap_err();
            assert_eq!(
                err.code(),
                Some(&saga_postgres::tokio_postgres::error::SqlState::RAISE_EXCEPTION),
                "{statement}: {err:?}"
            );
            let message = err.as_db_error().map(|e| e.message().to_owned());
            assert!(
                message
                    .as_deref()
                    .is_some_and(|m| m.contains("is append-only")),
                "{statement}: {message:?}"
            );
        }
    }
    let rows: Vec<(String, i64)> = db
        .query(
            &format!("SELECT order_id, amount_cents FROM {payment}"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(rows, [("o1".to_owned(), 500)], "the charge is as it was");
    d.stop_services();
}

async fn checkout_schemas(db: &saga_test_support::TestDatabase) -> Vec<String> {
    db.connect()
        .await
        .unwrap()
        .query(
            "SELECT nspname::text FROM pg_namespace WHERE nspname LIKE 'checkout\\_%' ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_past_its_deadline_reports_unfinished_sagas_and_drops_its_schemas_unless_kept() {
    let (_, db) = database().await;
    // No time at all: the gateway outage of order-0004 alone retries for
    // more than a second, so the run stops with sagas unfinished.
    let options = |keep| Options {
        orders: 4,
        workers: 2,
        crash: false,
        database: Database::Url(db.url().to_owned()),
        deadline: Duration::ZERO,
        keep,
        ..Options::default()
    };
    let kept = demo::run(options(true), |_| {}).await.unwrap();
    assert!(kept.stopped_early);
    let unfinished: Vec<&str> = kept.unfinished().map(|o| o.order.id.as_str()).collect();
    assert!(unfinished.contains(&"order-0004"), "{unfinished:?}");
    assert_eq!(kept.verdict(), demo::Verdict::Unsettled);
    let text = demo::render(&kept, demo::Show::All);
    assert!(
        text.contains("Deadline reached (0s): the run stopped with "),
        "{text}"
    );
    assert!(text.contains("\nUnfinished: "), "{text}");
    assert!(!text.contains("VIOLATED"), "{text}");
    let demo::Cleanup::Kept { prefix } = &kept.cleanup else {
        panic!("{:?}", kept.cleanup);
    };
    assert!(
        text.contains(&format!("Schemas kept: {prefix}_saga, ")),
        "{text}"
    );
    let mut expected: Vec<String> = ["email", "inventory", "payment", "saga", "shop"]
        .iter()
        .map(|s| format!("{prefix}_{s}"))
        .collect();
    expected.sort();
    assert_eq!(checkout_schemas(&db).await, expected);

    let dropped = demo::run(options(false), |_| {}).await.unwrap();
    let demo::Cleanup::Dropped { prefix: other } = &dropped.cleanup else {
        panic!("{:?}", dropped.cleanup);
    };
    assert_ne!(other, prefix);
    assert_eq!(
        checkout_schemas(&db).await,
        expected,
        "only the kept run's schemas are left"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_services_log_each_call_with_the_callers_lease_and_how_it_was_answered() {
    use checkout::clients::Downstream;
    use saga_core::{IdempotencyKey, LeaseToken, SagaId, StepName};

    let (database, _db) = database().await;
    let stock = BTreeMap::from([("mug".to_owned(), 5)]);
    let d = Deployment::start(database, "leases", &stock, 1)
        .await
        .unwrap();
    let downstream =
        Downstream::new(d.payment.url(), d.inventory.url(), Duration::from_secs(5)).unwrap();
    let order = Order {
        id: "o1".into(),
        email: "o1@example.com".into(),
        card: CARD_OK.into(),
        lines: vec![OrderLine {
            sku: "mug".into(),
            qty: 1,
        }],
        total_cents: 500,
    };
    let key = IdempotencyKey::derive(
        SagaId::new(),
        &StepName::new("charge_payment").unwrap(),
        Direction::Forward,
    );
    let (first, second) = (LeaseToken::new(), LeaseToken::new());
    // Refused by an outage: logged, not answered from the ledger.
    d.payment.set_faults(Faults {
        outage: true,
        ..Faults::default()
    });
    assert!(
        downstream
            .under_lease(Some(first))
            .charge(key, &order)
            .await
            .is_err()
    );
    d.payment.set_faults(Faults::default());
    let charged = downstream
        .under_lease(Some(first))
        .charge(key, &order)
        .await
        .unwrap();
    let replayed = downstream
        .under_lease(Some(second))
        .charge(key, &order)
        .await
        .unwrap();
    assert_eq!(charged, replayed);
    downstream.charge(key, &order).await.unwrap();

    let rows = d
        .pool
        .get()
        .await
        .unwrap()
        .query(
            &format!(
                "SELECT key, lease, answered FROM {}.requests ORDER BY seq",
                d.schemas.payment.quoted()
            ),
            &[],
        )
        .await
        .unwrap();
    let logged: Vec<(uuid::Uuid, Option<uuid::Uuid>, Option<String>)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let (k, a, b) = (key.as_uuid(), first.as_uuid(), second.as_uuid());
    assert_eq!(
        logged,
        vec![
            (k, Some(a), None),
            (k, Some(a), Some("applied".into())),
            (k, Some(b), Some("replayed".into())),
            (k, None, Some("replayed".into())),
        ]
    );
    d.stop_services();
}
