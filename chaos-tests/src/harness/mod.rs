//! The harness: a throwaway PostgreSQL cluster, a fault-injecting proxy
//! between it and the workers, the checkout services, worker processes,
//! a stream of orders, and a seeded schedule of faults; then, once the
//! faults stop and the system quiesces, the checks.
//!
//! [`run`] is that sequence of phases; each phase lives in the module
//! named for it.

mod config;
mod error;
mod events;
mod faults;
mod orders;
mod progress;
mod report;
mod tally;
mod windows;
mod workers;
mod zombie;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use checkout::demo::Scenario;
use checkout::deploy::{Database, Deployment, WorkerSettings};
use checkout::faults::ForceOutcome;
use saga_test_support::TestCluster;
use saga_test_support::proxy::{FaultProxy, transition_ids};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

pub use config::{Config, NegativeControl};
pub use error::Error;
pub use report::{KindCount, Report};

use crate::check::{self, Findings, Recorded, ZombieFact};
use crate::worker::{WorkerSpec, chaos_settings};
use tally::Tally;
use workers::Workers;

/// What the fault tasks share.
struct Run {
    deployment: Arc<Deployment>,
    proxy: Arc<FaultProxy>,
    workers: Arc<Workers>,
    tally: Arc<Tally>,
    zombies: std::sync::Mutex<Vec<ZombieFact>>,
    zombie_tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
    redeliveries_sent: AtomicU64,
    redeliveries_absorbed: AtomicU64,
    /// What each fault window hit.
    windows: windows::Windows,
}

/// Runs the harness.
pub async fn run(config: Config) -> Result<Report, Error> {
    let started = Instant::now();
    let progress = config.progress;
    let say = move |msg: String| {
        if progress {
            eprintln!("chaos: {msg}");
        }
    };
    say(format!(
        "seed {} ({} orders, {} workers, {:?} of faults)",
        config.seed, config.orders, config.workers, config.duration
    ));

    let (cluster, proxy, deployment) = start_database_and_services(&config).await?;
    let settings = worker_settings(&config);
    let (run, event_loop) = start_workers(&config, &settings, deployment, proxy).await?;
    let progress = progress::Progress::spawn(&config, &run, started);
    let (placing, scenarios) = orders::place(&config, &run.deployment, &settings)?;

    let injection = faults::inject(&config, &cluster, &run, say).await?;
    let (fault_start, scheduled) = (injection.start, injection.scheduled.clone());
    faults::stop(&config, &cluster, &run, injection).await;
    let _ = placing.await;
    let fault_seconds = fault_start.elapsed().as_secs_f64();
    progress.quiescing();
    say("faults stopped; waiting for the system to quiesce".into());

    let quiesced = wait_until_quiet(&config, &run, fault_start).await;
    progress.stop();
    run.workers.stop_all().await;
    run.workers.flush_events().await;
    event_loop.abort();

    let recorded = recorded(&run, scenarios);
    let facts = check::gather(&run.deployment, quiesced.is_some(), recorded).await?;
    let findings: Findings = check::check(&facts);
    Ok(report::summarize(
        &config,
        &run,
        facts,
        findings,
        report::Timing {
            started,
            scheduled,
            fault_seconds,
            quiesced,
        },
    ))
}

/// The throwaway cluster, the fault proxy in front of it, and the checkout
/// deployment (its services and the shop), with the harness's records
/// installed.
async fn start_database_and_services(
    config: &Config,
) -> Result<(Arc<TestCluster>, Arc<FaultProxy>, Arc<Deployment>), Error> {
    let cluster = Arc::new(TestCluster::start().await?);
    let proxy = Arc::new(FaultProxy::start(cluster.addr()).await?);
    let deployment = Arc::new(
        Deployment::start(
            Database::Url(cluster.url("postgres")),
            "chaos",
            &checkout::demo::stock(config.orders),
            config.seed,
        )
        .await?,
    );
    check::install_records(&deployment).await?;
    Ok((cluster, proxy, deployment))
}

/// The workers' settings, with the negative control switched on.
fn worker_settings(config: &Config) -> WorkerSettings {
    let mut settings: WorkerSettings = chaos_settings();
    match config.negative {
        // Set on the workers' spec (`start_workers`): not a setting of the
        // example's workers.
        Some(NegativeControl::NoFencing) => {}
        Some(NegativeControl::FreshKeys) => settings.fresh_key_per_attempt = true,
        Some(NegativeControl::PublishDirectly) => settings.publish_directly = true,
        Some(NegativeControl::RefuseEveryOrder) => {
            settings.force_outcome = Some(ForceOutcome::RefuseEvery);
        }
        Some(NegativeControl::CompleteEveryOrder) => {
            settings.force_outcome = Some(ForceOutcome::CompleteEvery);
        }
        None => {}
    }
    settings
}

/// Starts the worker processes, connected through the proxy, and the loop
/// that handles their events.
async fn start_workers(
    config: &Config,
    settings: &WorkerSettings,
    deployment: Arc<Deployment>,
    proxy: Arc<FaultProxy>,
) -> Result<(Arc<Run>, JoinHandle<()>), Error> {
    let mut endpoints = deployment.endpoints();
    endpoints.database_url = format!(
        "postgres://postgres@127.0.0.1:{}/postgres",
        proxy.addr().port()
    );
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let workers = Arc::new(Workers::new(
        config.worker_exe.clone(),
        WorkerSpec {
            endpoints,
            settings: settings.clone(),
            number: 0,
            unfenced: config.negative == Some(NegativeControl::NoFencing),
        },
        config.workers,
        events_tx,
    ));
    for i in 0..config.workers {
        workers.spawn(i).await?;
    }
    let run = Arc::new(Run {
        deployment,
        proxy,
        workers,
        tally: Arc::new(Tally::default()),
        zombies: std::sync::Mutex::default(),
        zombie_tasks: std::sync::Mutex::default(),
        redeliveries_sent: AtomicU64::new(0),
        redeliveries_absorbed: AtomicU64::new(0),
        windows: windows::Windows::default(),
    });
    let event_loop = events::spawn_loop(run.clone(), settings.lease, events_rx);
    Ok((run, event_loop))
}

/// I4: waits, up to the bound from the end of the last fault, until every
/// order's saga has finished and every message is delivered; returns how
/// long that took (`None`: not within the bound).
async fn wait_until_quiet(config: &Config, run: &Run, fault_start: Instant) -> Option<Duration> {
    let last_fault = run.tally.last().unwrap_or(fault_start);
    let deadline = last_fault + config.quiesce_bound;
    let mut quiesced = None;
    loop {
        match run.deployment.quiet().await {
            Ok(p) if p.is_quiet() && p.sagas as usize == config.orders => {
                quiesced = Some(last_fault.elapsed());
                break;
            }
            _ if Instant::now() >= deadline => break,
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    quiesced
}

/// What the harness itself saw: the cut statements, the workers, the
/// zombies; and what each order was placed to do.
fn recorded(run: &Run, scenarios: BTreeMap<String, Scenario>) -> Recorded {
    let cuts = run
        .proxy
        .cuts()
        .into_iter()
        .map(|c| {
            let (saga, transition) = transition_ids(&c.statement);
            check::RecordedCut {
                after: c.after,
                saga,
                transition,
                worker: c.statement.application_name.clone(),
                port: c.statement.upstream_port,
            }
        })
        .collect();
    Recorded {
        cuts,
        workers: run.workers.facts(),
        zombies: run
            .zombies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone(),
        scenarios,
    }
}
