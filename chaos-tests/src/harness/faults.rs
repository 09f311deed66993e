//! Injecting the scheduled faults, and putting everything right after.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use checkout::deploy::Deployment;
use checkout::services::{Faults, Service as FakeService};
use saga_postgres::tags;
use saga_test_support::TestCluster;
use saga_test_support::proxy::Cut;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::workers::Arm;
use super::{Config, Error, Run, windows};
use crate::schedule::{self, Event, Fault, FaultKind, Plan, Service};

/// The faults under way: what was scheduled, the tasks that end them, and
/// the commit cutter.
pub(super) struct Injection {
    /// Events scheduled, per kind.
    pub(super) scheduled: BTreeMap<FaultKind, u64>,
    /// When the first fault could start.
    pub(super) start: Instant,
    generation: Arc<std::sync::Mutex<BTreeMap<String, u64>>>,
    background: Vec<JoinHandle<()>>,
    cut_tx: mpsc::UnboundedSender<bool>,
    cutter: JoinHandle<()>,
}

/// Commit cuts, one armed at a time (arming replaces a cut not yet
/// fired), each aimed at a transition's statement.
fn spawn_cutter(run: &Run) -> (mpsc::UnboundedSender<bool>, JoinHandle<()>) {
    let (cut_tx, mut cut_rx) = mpsc::unbounded_channel::<bool>();
    let cutter = {
        let proxy = run.proxy.clone();
        let tally = run.tally.clone();
        tokio::spawn(async move {
            while let Some(reply_lost) = cut_rx.recv().await {
                proxy.arm(if reply_lost {
                    Cut::AfterQueryContaining(tags::TRANSITION.into())
                } else {
                    Cut::BeforeQueryContaining(tags::TRANSITION.into())
                });
                proxy.fired().await;
                tally.fired(FaultKind::CommitCut);
            }
        })
    };
    (cut_tx, cutter)
}

/// Runs the seeded fault schedule to its end: each event at its time.
pub(super) async fn inject(
    config: &Config,
    cluster: &Arc<TestCluster>,
    run: &Arc<Run>,
    say: impl Fn(String),
) -> Result<Injection, Error> {
    let (workers, tally, proxy, deployment) =
        (&run.workers, &run.tally, &run.proxy, &run.deployment);
    let (cut_tx, cutter) = spawn_cutter(run);
    let events = schedule::schedule(&Plan {
        seed: config.seed,
        duration: config.duration,
        workers: config.workers,
        kinds: config.kinds.clone(),
        rate: config.rate,
    });
    let mut scheduled: BTreeMap<FaultKind, u64> = BTreeMap::new();
    for e in &events {
        *scheduled.entry(e.fault.kind()).or_default() += 1;
    }
    say(format!("{} scheduled faults", events.len()));
    let generation: Arc<std::sync::Mutex<BTreeMap<String, u64>>> = Arc::default();
    let fault_start = Instant::now();
    let mut background = Vec::new();
    for Event { at, fault } in events {
        if let Some(wait) = at.checked_sub(fault_start.elapsed()) {
            tokio::time::sleep(wait).await;
        }
        let kind = fault.kind();
        match fault {
            Fault::WorkerKill { worker } => {
                let target = (0..config.workers)
                    .map(|k| (worker + k) % config.workers)
                    .find(|w| !workers.is_paused(*w));
                if let Some(target) = target
                    && workers.kill_and_restart(target, None).await?
                {
                    tally.fired(kind);
                    tally.affected(kind, 1);
                }
            }
            // Armed on every worker: the first to reach the point fires it.
            Fault::CrashAfterEffect { .. } => workers.arm_effect(Arm::Crash).await,
            Fault::ZombieWorker { at, .. } => workers.arm_effect(Arm::Zombie(at)).await,
            Fault::DispatcherCrash { .. } => workers.arm_publish().await,
            Fault::PostgresRestart { down_for } => {
                let cluster = cluster.clone();
                let tally = tally.clone();
                background.push(tokio::spawn(async move {
                    let stopped = cluster.stop_immediate().await.is_ok();
                    if stopped {
                        tally.fired(kind);
                        tally.affected(kind, 1);
                        tokio::time::sleep(down_for).await;
                    }
                    let _ = cluster.start_again().await;
                    if stopped {
                        tally.touch();
                    }
                }));
            }
            Fault::CommitCut { reply_lost } => {
                let _ = cut_tx.send(reply_lost);
            }
            Fault::ConnectionReset => {
                // Right after a database restart there may be no live
                // connection yet: try again shortly.
                let proxy = proxy.clone();
                let tally = tally.clone();
                background.push(tokio::spawn(async move {
                    for _ in 0..10 {
                        let reset = proxy.reset_all().await;
                        if reset > 0 {
                            tally.fired(kind);
                            tally.affected(kind, reset as u64);
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                }));
            }
            Fault::NetworkLatency { latency, window } => {
                tally.fired(kind);
                let window_id = run.windows.open("proxy", kind, &|_| proxy.stats().delayed);
                proxy.set_latency(latency);
                let run = run.clone();
                let generation = generation.clone();
                let mine = bump(&generation, "proxy");
                background.push(tokio::spawn(async move {
                    tokio::time::sleep(window).await;
                    if current(&generation, "proxy") == mine {
                        run.proxy.set_latency(Duration::ZERO);
                    }
                    run.windows
                        .close("proxy", window_id, &|_| run.proxy.stats().delayed);
                    run.tally.touch();
                }));
            }
            Fault::Downstream {
                service,
                faults,
                window,
            } => {
                tally.fired(kind);
                let key = format!("{service:?}");
                let read = |k| windows::service_counter(&fake(deployment, service).injected(), k);
                let window_id = run.windows.open(&key, kind, &read);
                fake(deployment, service).set_faults(faults);
                let run = run.clone();
                let generation = generation.clone();
                let mine = bump(&generation, &key);
                background.push(tokio::spawn(async move {
                    tokio::time::sleep(window).await;
                    let fake = fake(&run.deployment, service);
                    if current(&generation, &key) == mine {
                        fake.set_faults(Faults::default());
                    }
                    run.windows.close(&key, window_id, &|k| {
                        windows::service_counter(&fake.injected(), k)
                    });
                    run.tally.touch();
                }));
            }
            Fault::DuplicateDelivery { count } => {
                if let Ok((sent, absorbed)) = redeliver(deployment, count).await
                    && sent > 0
                {
                    tally.fired(kind);
                    tally.affected(kind, absorbed);
                    run.windows.event(kind, absorbed > 0);
                    run.redeliveries_sent.fetch_add(sent, Ordering::Relaxed);
                    run.redeliveries_absorbed
                        .fetch_add(absorbed, Ordering::Relaxed);
                }
            }
        }
    }
    Ok(Injection {
        scheduled,
        start: fault_start,
        generation,
        background,
        cut_tx,
        cutter,
    })
}

/// Stops the faults: gives armed points a little while to be reached,
/// disarms everything, waits for the faults under way and the zombies to
/// end, and puts the database, the proxy and the services right.
pub(super) async fn stop(config: &Config, cluster: &TestCluster, run: &Run, injection: Injection) {
    let (workers, proxy, deployment) = (&run.workers, &run.proxy, &run.deployment);
    let Injection {
        generation,
        background,
        cut_tx,
        cutter,
        ..
    } = injection;
    // Armed points still waiting: give the workers a little while to
    // reach them (orders are still flowing), then let what is under way end
    // and put everything right.
    let grace = Instant::now();
    while workers.armed() && grace.elapsed() < Duration::from_secs(15) {
        if deployment.quiet().await.is_ok_and(|p| p.is_quiet()) {
            break; // Nothing left that could reach them.
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    workers.clear_arms();
    for i in 0..config.workers {
        workers.send(i, "disarm").await;
    }
    for task in background {
        let _ = task.await;
    }
    loop {
        let tasks =
            std::mem::take(&mut *run.zombie_tasks.lock().unwrap_or_else(|e| e.into_inner()));
        if tasks.is_empty() {
            break;
        }
        for task in tasks {
            let _ = task.await;
        }
    }
    if !cluster.is_running() {
        let _ = cluster.start_again().await;
    }
    drop(cut_tx);
    proxy.disarm();
    cutter.abort();
    let _ = cutter.await;
    proxy.set_latency(Duration::ZERO);
    for s in [Service::Payment, Service::Inventory, Service::Email] {
        bump(&generation, &format!("{s:?}"));
        fake(deployment, s).set_faults(Faults::default());
    }
    for i in 0..config.workers {
        workers.send(i, "resume").await;
    }
}

pub(super) fn fake(d: &Deployment, s: Service) -> &FakeService {
    match s {
        Service::Payment => &d.payment,
        Service::Inventory => &d.inventory,
        Service::Email => &d.email,
    }
}

fn bump(generation: &std::sync::Mutex<BTreeMap<String, u64>>, key: &str) -> u64 {
    let mut g = generation.lock().unwrap_or_else(|e| e.into_inner());
    let n = g.entry(key.to_owned()).or_default();
    *n += 1;
    *n
}

fn current(generation: &std::sync::Mutex<BTreeMap<String, u64>>, key: &str) -> u64 {
    generation
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(key)
        .copied()
        .unwrap_or(0)
}

/// Delivers up to `count` already delivered confirmations again, as a
/// broker redelivering would; returns how many were sent and how many of
/// those the email service answered as already seen.
async fn redeliver(deployment: &Deployment, count: usize) -> Result<(u64, u64), checkout::Error> {
    let db = deployment.pool.get().await?;
    let rows = db
        .query(
            &format!(
                "SELECT s.message_id, s.order_id, s.recipient, o.total_cents
                 FROM {e}.sent s JOIN {shop}.orders o ON o.id = s.order_id
                 ORDER BY s.seq DESC LIMIT $1",
                e = deployment.schemas.email.quoted(),
                shop = deployment.schemas.shop.quoted()
            ),
            &[&i64::try_from(count).unwrap_or(1)],
        )
        .await?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .map_err(checkout::Error::Http)?;
    let (mut sent, mut absorbed) = (0, 0);
    for row in rows {
        let confirmed = checkout::model::OrderConfirmed {
            order_id: row.get(1),
            email: row.get(2),
            total_cents: row.get(3),
        };
        let delivery = checkout::services::email::Delivery::new(
            saga_core::MessageId::from_uuid(row.get(0)),
            checkout::model::ORDER_CONFIRMED,
            serde_json::to_value(&confirmed)?,
        );
        let Ok(response) = http
            .post(format!("{}/deliveries", deployment.email.url()))
            .json(&delivery)
            .send()
            .await
        else {
            continue;
        };
        sent += 1;
        if response.status().is_success()
            && let Ok(body) = response.json::<serde_json::Value>().await
            && body.get("sent") == Some(&serde_json::Value::Bool(false))
        {
            absorbed += 1;
        }
    }
    Ok((sent, absorbed))
}
