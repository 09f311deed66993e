//! The short chaos configurations CI runs: every fault kind injected
//! together, and each kind alone, with evidence that each took effect and
//! every invariant held; and each negative control, on the same seed,
//! caught.

use std::time::Duration;

use chaos_tests::schedule::FaultKind;
use chaos_tests::{Config, NegativeControl, Report, report};

/// One harness at a time: each starts its own cluster and worker
/// processes, and two at once would starve each other on two cores.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const SEED: u64 = 1;

fn config(negative: Option<NegativeControl>) -> Config {
    Config {
        seed: SEED,
        orders: 150,
        workers: 3,
        duration: Duration::from_secs(20),
        rate: 2.0,
        kinds: FaultKind::ALL.to_vec(),
        negative,
        quiesce_bound: Duration::from_secs(120),
        worker_exe: env!("CARGO_BIN_EXE_chaos").into(),
        progress: true,
    }
}

async fn run(config: Config) -> Report {
    let _one = ONE_AT_A_TIME.lock().await;
    let report = chaos_tests::run(config).await.expect("the harness runs");
    eprintln!("{}", report::table(&report));
    report
}

fn assert_held(report: &Report) {
    // Every invariant held, and every kind took effect
    // (`chaos_tests::check::took_effect`, the rules the CLI applies).
    assert!(
        report.passed(),
        "seed {}: {:#?} {:#?}",
        report.seed,
        report.violation_details,
        report.faults_without_effect
    );
    assert!(report.seconds_to_quiesce.is_some());
    let fired: u64 = report.faults.values().map(|k| k.fired).sum();
    assert_eq!(report.fault_events_fired, fired, "the total is the sum");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_run_injects_every_fault_kind_and_every_invariant_holds() {
    let report = run(config(None)).await;
    assert_held(&report);
    assert_eq!(report.sagas, 150);
    assert_eq!(
        report.kinds.len(),
        FaultKind::ALL.len(),
        "every kind judged"
    );
}

/// A small run of `kind` alone.
async fn alone(kind: FaultKind) -> Report {
    let report = chaos_tests::run(Config {
        orders: 24,
        workers: 2,
        duration: Duration::from_secs(4),
        rate: 1.0,
        kinds: vec![kind],
        ..config(None)
    })
    .await
    .expect("the harness runs");
    eprintln!("{} alone:{}", kind.name(), report::table(&report));
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_fault_kind_alone_takes_effect_and_every_invariant_holds() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut failed = Vec::new();
    // Two small runs at a time: each is light, and alone they would
    // leave the machine mostly idle.
    for pair in FaultKind::ALL.chunks(2) {
        let reports = match pair {
            [a, b] => {
                let (a, b) = tokio::join!(alone(*a), alone(*b));
                vec![a, b]
            }
            [a] => vec![alone(*a).await],
            _ => unreachable!("chunks of two"),
        };
        for (kind, report) in pair.iter().copied().zip(reports) {
            check_alone(kind, &report, &mut failed);
        }
    }
    assert!(failed.is_empty(), "{failed:#?}");
}

fn check_alone(kind: FaultKind, report: &Report, failed: &mut Vec<String>) {
    if !report.violation_details.is_empty() || report.seconds_to_quiesce.is_none() {
        failed.push(format!(
            "{} alone (seed {}): {:?}",
            kind.name(),
            report.seed,
            report.violation_details
        ));
    }
    // The kind took effect, by the rules the CLI applies.
    assert_eq!(report.kinds, vec![kind.name()]);
    failed.extend(report.faults_without_effect.iter().map(ToString::to_string));
}

/// Runs the short configuration with `control` on, and returns the report
/// once it has shown each of `invariants` broken.
async fn caught(control: NegativeControl, invariants: &[&str]) -> Report {
    caught_in(config(Some(control)), invariants).await
}

/// Runs `config` (a negative control on) and returns the report once it
/// has shown each of `invariants` broken.
async fn caught_in(config: Config, invariants: &[&str]) -> Report {
    let control = config.negative;
    let report = run(config).await;
    assert!(
        !report.violation_details.is_empty(),
        "{control:?} went unnoticed on seed {SEED}"
    );
    for invariant in invariants {
        assert!(
            report.violations[invariant] > 0,
            "{control:?} should break {invariant}: {:?}",
            report.violations
        );
    }
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turning_fencing_off_is_caught() {
    // A frozen worker's stale result is accepted after another worker took
    // its saga over: a result recorded twice, a zombie's write accepted.
    // I6 sees it in the engine's history; I9 from ground truth: the
    // services' request logs (which lease each call came from) and the
    // harness's log of every lease change.
    let report = caught(NegativeControl::NoFencing, &["I6", "I9"]).await;
    assert!(
        report.violation_details.iter().any(|v| v
            .detail
            .contains("accepted after another worker had taken its saga over")),
        "a zombie's own stale write is caught: {:#?}",
        report.violation_details
    );
    assert!(
        report.violation_details.iter().any(|v| v.invariant == "I9"
            && v.detail
                .contains("a result obtained under a fenced-off lease was recorded")),
        "a service's answer to a lease taken over, recorded, is caught from ground truth: {:#?}",
        report.violation_details
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_passing_idempotency_keys_downstream_is_caught() {
    // A retried charge after a lost reply charges again; the refund, keyed
    // by the charge's stable key, finds nothing to refund.
    caught(NegativeControl::FreshKeys, &["I1"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_directly_instead_of_through_the_outbox_is_caught() {
    // Emails that no committed transaction emitted, and duplicates.
    caught(NegativeControl::PublishDirectly, &["I5"]).await;
}

/// A short run with no faults: the outcome controls need none to show,
/// only each scenario (the first four orders are one of each).
fn no_faults(control: NegativeControl) -> Config {
    Config {
        orders: 12,
        workers: 2,
        duration: Duration::from_secs(3),
        rate: 0.0,
        kinds: Vec::new(),
        ..config(Some(control))
    }
}

fn scenario(report: &Report, name: &str) -> chaos_tests::check::ScenarioOutcomes {
    *report
        .by_scenario
        .iter()
        .find(|s| s.scenario == name)
        .expect("every scenario has a row")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusing_every_order_is_caught() {
    // Every saga compensates cleanly: nothing charged, deducted or sent,
    // everything terminal. Only the outcome against intent notices.
    let report = caught_in(no_faults(NegativeControl::RefuseEveryOrder), &["I8"]).await;
    assert!(
        report.violation_details.iter().all(|v| v.invariant == "I8"),
        "no other invariant can see it: {:#?}",
        report.violation_details
    );
    let ok = scenario(&report, "ok");
    assert!(ok.orders > 0);
    assert_eq!((ok.completed, ok.compensated), (0, ok.orders), "{ok:?}");
    assert!(
        report
            .violation_details
            .iter()
            .any(|v| v.detail.contains("its scenario (ok) must end completed")),
        "{:#?}",
        report.violation_details
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completing_every_order_is_caught() {
    // A declined card goes through: the order completes, unpaid.
    let report = caught_in(no_faults(NegativeControl::CompleteEveryOrder), &["I8"]).await;
    let declined = scenario(&report, "declined");
    assert!(declined.orders > 0);
    assert_eq!(declined.completed, declined.orders, "{declined:?}");
    assert!(
        report.violation_details.iter().any(|v| v.invariant == "I8"
            && v.detail
                .contains("its scenario (card declined) must end compensated")),
        "{:#?}",
        report.violation_details
    );
}
