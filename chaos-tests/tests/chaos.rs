//! The short chaos configuration CI runs: every fault kind injected, every
//! invariant holds; and each negative control, on the same seed, caught.

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

async fn run(negative: Option<NegativeControl>) -> Report {
    let _one = ONE_AT_A_TIME.lock().await;
    let report = chaos_tests::run(config(negative))
        .await
        .expect("the harness runs");
    eprintln!("{}", report::table(&report));
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_run_injects_every_fault_kind_and_every_invariant_holds() {
    let report = run(None).await;
    assert!(
        report.passed(),
        "seed {}: {:#?}",
        report.seed,
        report.violation_details
    );
    for kind in FaultKind::ALL {
        let n = report.faults.get(kind.name()).copied().unwrap_or(0);
        assert!(
            n > 0,
            "no {} fault was injected: {:?}",
            kind.name(),
            report.faults
        );
    }
    assert_eq!(report.sagas, 150);
    assert!(report.seconds_to_quiesce.is_some());
    assert!(
        report.counts.leases_lost > 0,
        "a stale worker's write was fenced off"
    );
    assert!(
        report.duplicates_absorbed > 0,
        "duplicate deliveries reached the inbox"
    );
    let cuts = report.faults["commit_cut"];
    assert!(cuts > 0);
}

async fn caught(control: NegativeControl, invariants: &[&str]) {
    let report = run(Some(control)).await;
    assert!(
        !report.passed(),
        "{control:?} went unnoticed on seed {SEED}"
    );
    for invariant in invariants {
        assert!(
            report.violations[invariant] > 0,
            "{control:?} should break {invariant}: {:?}",
            report.violations
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turning_fencing_off_is_caught() {
    // A worker that stalled past its lease records its result over the
    // newer one: a result recorded twice, compensations out of order.
    caught(NegativeControl::NoFencing, &["I6"]).await;
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
