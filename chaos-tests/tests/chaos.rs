//! The short chaos configurations CI runs: every fault kind injected
//! together, and each kind alone, with evidence that each took effect and
//! every invariant held; and each negative control, on the same seed,
//! caught.

use std::time::Duration;

use chaos_tests::check::RefusedAt;
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

/// Evidence that the faults of `kind` took effect, not merely that they
/// were scheduled or attempted.
fn took_effect(r: &Report, kind: FaultKind) -> Result<(), String> {
    let k = r.kind(kind);
    let fail = |why: &str| Err(format!("{}: {why}: {k:?}", kind.name()));
    if k.fired == 0 {
        return fail("none fired");
    }
    match kind {
        // A kill, a restart: the process or server was gone.
        FaultKind::WorkerKill
        | FaultKind::CrashAfterEffect
        | FaultKind::PostgresRestart
        | FaultKind::DispatcherCrash => {}
        FaultKind::ZombieWorker => {
            let unverified: Vec<_> = r
                .zombies
                .iter()
                .filter(|z| z.frozen && z.refused().is_none())
                .collect();
            if !unverified.is_empty() {
                return fail(&format!(
                    "zombies not verifiably fenced off: {unverified:?}"
                ));
            }
            if r.zombies_refused_at(RefusedAt::Record) == 0 {
                return fail(&format!("no zombie's result was refused: {:?}", r.zombies));
            }
        }
        FaultKind::CommitCut => {
            if r.cuts.committed == 0 || r.cuts.not_committed == 0 {
                return fail(&format!(
                    "cut transitions should include one that committed and one that did not: {:?}",
                    r.cuts
                ));
            }
        }
        FaultKind::ConnectionReset
        | FaultKind::NetworkLatency
        | FaultKind::DownstreamOutage
        | FaultKind::DownstreamErrors
        | FaultKind::DownstreamLatency
        | FaultKind::LostReplies
        | FaultKind::DuplicateDelivery => {
            if k.affected == 0 {
                return fail(&format!("nothing was {}", k.unit));
            }
        }
    }
    if kind == FaultKind::DispatcherCrash && r.dispatcher_duplicates_absorbed == 0 {
        return fail("no batch of a killed dispatcher was delivered again");
    }
    Ok(())
}

fn assert_held(report: &Report) {
    assert!(
        report.passed(),
        "seed {}: {:#?}",
        report.seed,
        report.violation_details
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
    let missing: Vec<String> = FaultKind::ALL
        .into_iter()
        .filter_map(|kind| took_effect(&report, kind).err())
        .collect();
    assert!(missing.is_empty(), "{missing:#?}");
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
    if !report.passed() || report.seconds_to_quiesce.is_none() {
        failed.push(format!(
            "{} alone (seed {}): {:?}",
            kind.name(),
            report.seed,
            report.violation_details
        ));
    }
    if let Err(why) = took_effect(report, kind) {
        failed.push(why);
    }
}

/// Runs the short configuration with `control` on, and returns the report
/// once it has shown each of `invariants` broken.
async fn caught(control: NegativeControl, invariants: &[&str]) -> Report {
    let report = run(config(Some(control))).await;
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
