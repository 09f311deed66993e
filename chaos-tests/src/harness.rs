//! The harness: a throwaway PostgreSQL cluster, a fault-injecting proxy
//! between it and the workers, the checkout services, worker processes,
//! a stream of orders, and a seeded schedule of faults; then, once the
//! faults stop and the system quiesces, the checks.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use checkout::deploy::{Database, Deployment, WorkerSettings};
use checkout::services::{Faults, Service as FakeService};
use saga_postgres::testing::TestCluster;
use saga_postgres::testing::proxy::{Cut, FaultProxy};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::{Mutex, mpsc};

use crate::check::{self, Findings};
use crate::schedule::{self, Event, Fault, FaultKind, Plan, Service};
use crate::worker::{Counts, PointAction, SPEC_ENV, WorkerEvent, WorkerSpec, chaos_settings};

/// A switch that breaks the system on purpose, so that the harness can show
/// it notices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum NegativeControl {
    /// Record step results without checking the worker's lease.
    NoFencing,
    /// Send a fresh idempotency key with every downstream attempt.
    FreshKeys,
    /// Email straight from the step instead of through the outbox.
    PublishDirectly,
}

/// How to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// The seed of the schedule, the orders and the services' dice.
    pub seed: u64,
    /// Orders placed during the fault phase.
    pub orders: usize,
    /// Worker processes.
    pub workers: usize,
    /// How long faults are injected.
    pub duration: Duration,
    /// Faults started per second, on average.
    pub rate: f64,
    /// The kinds of fault to inject (each at least once).
    pub kinds: Vec<FaultKind>,
    /// A switch that breaks the system on purpose.
    pub negative: Option<NegativeControl>,
    /// How long after the last fault every saga must have finished (I4).
    pub quiesce_bound: Duration,
    /// The `chaos` executable, run as `chaos worker`.
    pub worker_exe: PathBuf,
    /// Print progress to stderr.
    pub progress: bool,
}

/// What a run found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The seed.
    pub seed: u64,
    /// Sagas started.
    pub sagas: usize,
    /// Worker processes.
    pub workers: usize,
    /// The negative control, if one was on.
    pub negative: Option<NegativeControl>,
    /// Seconds of fault injection.
    pub fault_seconds: f64,
    /// Faults injected, by kind.
    pub faults: BTreeMap<String, u64>,
    /// Faults injected in all.
    pub faults_total: u64,
    /// Repeated deliveries the email inbox recognised and ignored.
    pub duplicates_absorbed: u64,
    /// The workers' counters (fenced writes, ambiguous commits...).
    pub counts: Counts,
    /// Violations per invariant.
    pub violations: BTreeMap<&'static str, usize>,
    /// Every violation.
    pub violation_details: Vec<check::Violation>,
    /// Sagas by final status.
    pub outcomes: BTreeMap<String, u64>,
    /// Stuck sagas and why.
    pub stuck: Vec<(String, String)>,
    /// Seconds from the end of the faults until every saga had finished and
    /// every message was delivered (`None`: not within the bound).
    pub seconds_to_quiesce: Option<f64>,
    /// The bound, in seconds.
    pub quiesce_bound_seconds: f64,
    /// Sagas finished per second over the whole run.
    pub throughput: f64,
    /// Wall time of the whole run, in seconds.
    pub seconds: f64,
    /// The first violating orders, each with its step timeline.
    pub first_violating_orders: Vec<(String, String)>,
}

impl Report {
    /// Whether every invariant held.
    #[must_use]
    pub fn passed(&self) -> bool {
        self.violation_details.is_empty()
    }
}

/// The harness's errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The checkout deployment failed.
    #[error(transparent)]
    Checkout(#[from] checkout::Error),
    /// The throwaway database failed.
    #[error("the test database failed")]
    TestDb(#[from] saga_postgres::testing::TestDbError),
    /// A process or socket failed.
    #[error("I/O error")]
    Io(#[from] std::io::Error),
    /// A worker spec could not be encoded.
    #[error("JSON error")]
    Json(#[from] serde_json::Error),
}

#[derive(Default)]
struct Tally {
    by_kind: std::sync::Mutex<BTreeMap<FaultKind, u64>>,
}

impl Tally {
    fn add(&self, kind: FaultKind, n: u64) {
        *self
            .by_kind
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(kind)
            .or_default() += n;
    }
}

struct Slot {
    child: Child,
    stdin: ChildStdin,
    incarnation: u64,
}

/// Armed points not yet reached. The head of each queue is armed on every
/// live worker; the first worker to reach it fires it.
#[derive(Debug, Default)]
struct Arms {
    effect: std::collections::VecDeque<PointAction>,
    publish: u32,
}

fn effect_command(action: PointAction) -> &'static str {
    match action {
        PointAction::Crash => "crash-after-effect",
        PointAction::Pause => "pause-after-effect",
    }
}

/// The worker processes, restarted after each kill.
struct Workers {
    arms: std::sync::Mutex<Arms>,
    /// Workers frozen as zombies right now: random kills spare them, so
    /// that each zombie lives to make its stale write.
    paused: std::sync::Mutex<std::collections::BTreeSet<usize>>,
    exe: PathBuf,
    specs: Vec<String>,
    slots: Vec<Mutex<Option<Slot>>>,
    events: mpsc::UnboundedSender<(usize, u64, WorkerEvent)>,
    counts: std::sync::Mutex<BTreeMap<(usize, u64), Counts>>,
    incarnations: AtomicU64,
}

impl Workers {
    async fn spawn(&self, i: usize) -> Result<(), Error> {
        let incarnation = self.incarnations.fetch_add(1, Ordering::Relaxed);
        let mut child = Command::new(&self.exe)
            .arg("worker")
            .env(SPEC_ENV, &self.specs[i])
            .env("RUST_LOG", "error")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        let events = self.events.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(event) = serde_json::from_str::<WorkerEvent>(&line) {
                    let _ = events.send((i, incarnation, event));
                }
            }
        });
        *self.slots[i].lock().await = Some(Slot {
            child,
            stdin,
            incarnation,
        });
        // A new incarnation gets the points armed on the others.
        let (effect, publish) = {
            let arms = self.arms.lock().unwrap_or_else(|e| e.into_inner());
            (arms.effect.front().copied(), arms.publish > 0)
        };
        if let Some(action) = effect {
            self.send(i, effect_command(action)).await;
        }
        if publish {
            self.send(i, "crash-after-publish").await;
        }
        Ok(())
    }

    async fn broadcast(&self, command: &str) {
        for i in 0..self.slots.len() {
            self.send(i, command).await;
        }
    }

    /// Queues an effect point; arms it everywhere if it is the first.
    async fn arm_effect(&self, action: PointAction) {
        let first = {
            let mut arms = self.arms.lock().unwrap_or_else(|e| e.into_inner());
            arms.effect.push_back(action);
            arms.effect.len() == 1
        };
        if first {
            self.broadcast(effect_command(action)).await;
        }
    }

    /// An effect point was reached: disarm it everywhere, arm the next.
    async fn effect_fired(&self, action: PointAction) {
        let next = {
            let mut arms = self.arms.lock().unwrap_or_else(|e| e.into_inner());
            if arms.effect.front() == Some(&action) {
                arms.effect.pop_front();
            }
            arms.effect.front().copied()
        };
        self.broadcast("disarm-effect").await;
        if let Some(next) = next {
            self.broadcast(effect_command(next)).await;
        }
    }

    async fn arm_publish(&self) {
        let first = {
            let mut arms = self.arms.lock().unwrap_or_else(|e| e.into_inner());
            arms.publish += 1;
            arms.publish == 1
        };
        if first {
            self.broadcast("crash-after-publish").await;
        }
    }

    async fn publish_fired(&self) {
        let more = {
            let mut arms = self.arms.lock().unwrap_or_else(|e| e.into_inner());
            arms.publish = arms.publish.saturating_sub(1);
            arms.publish > 0
        };
        self.broadcast("disarm-publish").await;
        if more {
            self.broadcast("crash-after-publish").await;
        }
    }

    fn armed(&self) -> bool {
        let arms = self.arms.lock().unwrap_or_else(|e| e.into_inner());
        !arms.effect.is_empty() || arms.publish > 0
    }

    /// SIGKILL worker `i` (if `incarnation` is given, only that one), then
    /// start it again.
    async fn kill_and_restart(&self, i: usize, incarnation: Option<u64>) -> Result<bool, Error> {
        {
            let mut slot = self.slots[i].lock().await;
            match slot.as_mut() {
                Some(s) if incarnation.is_none_or(|n| n == s.incarnation) => {
                    let _ = s.child.start_kill();
                    let _ = s.child.wait().await;
                    *slot = None;
                }
                _ => return Ok(false),
            }
        }
        self.spawn(i).await?;
        Ok(true)
    }

    async fn send(&self, i: usize, command: &str) {
        if let Some(s) = self.slots[i].lock().await.as_mut() {
            let _ = s.stdin.write_all(format!("{command}\n").as_bytes()).await;
            let _ = s.stdin.flush().await;
        }
    }

    async fn signal(&self, i: usize, incarnation: u64, signal: &str) -> bool {
        let pid = match self.slots[i].lock().await.as_ref() {
            Some(s) if s.incarnation == incarnation => s.child.id(),
            _ => None,
        };
        let Some(pid) = pid else { return false };
        Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .await
            .is_ok_and(|s| s.success())
    }

    fn total(&self) -> Counts {
        let mut total = Counts::default();
        for c in self
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            total += *c;
        }
        total
    }

    /// Asks every worker to stop and waits (killing what does not stop).
    async fn stop_all(&self) {
        for slot in &self.slots {
            if let Some(s) = slot.lock().await.as_mut() {
                let _ = s.stdin.write_all(b"stop\n").await;
            }
        }
        for slot in &self.slots {
            if let Some(mut s) = slot.lock().await.take()
                && tokio::time::timeout(Duration::from_secs(30), s.child.wait())
                    .await
                    .is_err()
            {
                let _ = s.child.start_kill();
                let _ = s.child.wait().await;
            }
        }
    }
}

fn fake(d: &Deployment, s: Service) -> &FakeService {
    match s {
        Service::Payment => &d.payment,
        Service::Inventory => &d.inventory,
        Service::Email => &d.email,
    }
}

/// Runs the harness.
pub async fn run(config: Config) -> Result<Report, Error> {
    let started = Instant::now();
    let say = |msg: String| {
        if config.progress {
            eprintln!("chaos: {msg}");
        }
    };
    say(format!(
        "seed {} ({} orders, {} workers, {:?} of faults)",
        config.seed, config.orders, config.workers, config.duration
    ));

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
    let mut endpoints = deployment.endpoints();
    endpoints.database_url = format!(
        "postgres://postgres@127.0.0.1:{}/postgres",
        proxy.addr().port()
    );
    let mut settings: WorkerSettings = chaos_settings();
    match config.negative {
        Some(NegativeControl::NoFencing) => settings.no_fencing = true,
        Some(NegativeControl::FreshKeys) => settings.fresh_key_per_attempt = true,
        Some(NegativeControl::PublishDirectly) => settings.publish_directly = true,
        None => {}
    }
    let lease = settings.lease;

    let (events_tx, mut events_rx) = mpsc::unbounded_channel();
    let specs = (0..config.workers)
        .map(|number| {
            serde_json::to_string(&WorkerSpec {
                endpoints: endpoints.clone(),
                settings: settings.clone(),
                number,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let workers = Arc::new(Workers {
        exe: config.worker_exe.clone(),
        specs,
        slots: (0..config.workers).map(|_| Mutex::new(None)).collect(),
        events: events_tx,
        arms: std::sync::Mutex::default(),
        paused: std::sync::Mutex::default(),
        counts: std::sync::Mutex::default(),
        incarnations: AtomicU64::new(0),
    });
    for i in 0..config.workers {
        workers.spawn(i).await?;
    }
    let tally = Arc::new(Tally::default());

    // The workers' events: counters, and the armed points where the
    // harness kills or stalls them.
    let event_loop = {
        let workers = workers.clone();
        let tally = tally.clone();
        tokio::spawn(async move {
            while let Some((i, incarnation, event)) = events_rx.recv().await {
                match event {
                    WorkerEvent::Stats { counts } => {
                        workers
                            .counts
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert((i, incarnation), counts);
                    }
                    WorkerEvent::EffectPoint {
                        action: PointAction::Crash,
                        ..
                    } => {
                        workers.effect_fired(PointAction::Crash).await;
                        if workers
                            .kill_and_restart(i, Some(incarnation))
                            .await
                            .unwrap_or(false)
                        {
                            tally.add(FaultKind::CrashAfterEffect, 1);
                        }
                    }
                    WorkerEvent::EffectPoint {
                        action: PointAction::Pause,
                        ..
                    } => {
                        workers.effect_fired(PointAction::Pause).await;
                        let workers = workers.clone();
                        let tally = tally.clone();
                        tokio::spawn(async move {
                            workers
                                .paused
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .insert(i);
                            if workers.signal(i, incarnation, "STOP").await {
                                tally.add(FaultKind::ZombieWorker, 1);
                                tokio::time::sleep(lease + Duration::from_secs(1)).await;
                                workers.signal(i, incarnation, "CONT").await;
                            }
                            workers.send(i, "resume").await;
                            // Leave it time to try its stale write.
                            tokio::time::sleep(Duration::from_secs(2)).await;
                            workers
                                .paused
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .remove(&i);
                        });
                    }
                    WorkerEvent::PublishPoint => {
                        workers.publish_fired().await;
                        if workers
                            .kill_and_restart(i, Some(incarnation))
                            .await
                            .unwrap_or(false)
                        {
                            tally.add(FaultKind::DispatcherCrash, 1);
                        }
                    }
                    WorkerEvent::Ready | WorkerEvent::Stopped => {}
                }
            }
        })
    };

    // Orders, placed over the first 80% of the fault phase; each retried
    // until it lands (placing is idempotent on the order id).
    let plan = checkout::demo::orders(&checkout::demo::Options {
        orders: config.orders,
        seed: config.seed,
        ..checkout::demo::Options::default()
    });
    let placing = {
        let deployment = deployment.clone();
        let spacing =
            config.duration.mul_f64(0.8) / u32::try_from(config.orders.max(1)).unwrap_or(u32::MAX);
        let saga = deployment.saga(&settings)?;
        tokio::spawn(async move {
            for (order, _) in plan {
                let mut backoff = ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(50))
                    .with_max_delay(Duration::from_secs(1))
                    .without_max_times()
                    .build();
                while deployment
                    .shop
                    .place(&deployment.store, &saga, &order)
                    .await
                    .is_err()
                {
                    tokio::time::sleep(backoff.next().unwrap_or(Duration::from_secs(1))).await;
                }
                tokio::time::sleep(spacing).await;
            }
        })
    };

    // The fault schedule.
    let events = schedule::schedule(&Plan {
        seed: config.seed,
        duration: config.duration,
        workers: config.workers,
        kinds: config.kinds.clone(),
        rate: config.rate,
    });
    say(format!("{} scheduled faults", events.len()));
    let generation: Arc<std::sync::Mutex<BTreeMap<String, u64>>> = Arc::default();
    let fault_start = Instant::now();
    let mut background = Vec::new();
    let mut last_progress = Instant::now();
    for Event { at, fault } in events {
        if let Some(wait) = at.checked_sub(fault_start.elapsed()) {
            tokio::time::sleep(wait).await;
        }
        if config.progress && last_progress.elapsed() > Duration::from_secs(5) {
            last_progress = Instant::now();
            if let Ok(p) = deployment.quiet().await {
                say(format!(
                    "{:>5.1}s: {}/{} sagas finished",
                    fault_start.elapsed().as_secs_f64(),
                    p.finished,
                    p.sagas
                ));
            }
        }
        let kind = fault.kind();
        match fault {
            Fault::WorkerKill { worker } => {
                let target = {
                    let paused = workers.paused.lock().unwrap_or_else(|e| e.into_inner());
                    (0..config.workers)
                        .map(|k| (worker + k) % config.workers)
                        .find(|w| !paused.contains(w))
                };
                if let Some(target) = target
                    && workers.kill_and_restart(target, None).await?
                {
                    tally.add(kind, 1);
                }
            }
            // Armed on every worker: the first to reach the point fires it.
            Fault::CrashAfterEffect { .. } => workers.arm_effect(PointAction::Crash).await,
            Fault::ZombieWorker { .. } => workers.arm_effect(PointAction::Pause).await,
            Fault::DispatcherCrash { .. } => workers.arm_publish().await,
            Fault::PostgresRestart { down_for } => {
                let cluster = cluster.clone();
                let tally = tally.clone();
                background.push(tokio::spawn(async move {
                    if cluster.stop_immediate().await.is_ok() {
                        tally.add(kind, 1);
                        tokio::time::sleep(down_for).await;
                    }
                    let _ = cluster.start_again().await;
                }));
            }
            Fault::CommitCut { reply_lost } => {
                proxy.arm(if reply_lost {
                    Cut::AfterExecute
                } else {
                    Cut::BeforeExecute
                });
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
                            tally.add(kind, reset as u64);
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                }));
            }
            Fault::NetworkLatency { latency, window } => {
                tally.add(kind, 1);
                proxy.set_latency(latency);
                let proxy = proxy.clone();
                let generation = generation.clone();
                let mine = bump(&generation, "proxy");
                background.push(tokio::spawn(async move {
                    tokio::time::sleep(window).await;
                    if current(&generation, "proxy") == mine {
                        proxy.set_latency(Duration::ZERO);
                    }
                }));
            }
            Fault::Downstream {
                service,
                faults,
                window,
            } => {
                if kind == FaultKind::DownstreamOutage || kind == FaultKind::DownstreamLatency {
                    tally.add(kind, 1);
                }
                fake(&deployment, service).set_faults(faults);
                let deployment = deployment.clone();
                let generation = generation.clone();
                let key = format!("{service:?}");
                let mine = bump(&generation, &key);
                background.push(tokio::spawn(async move {
                    tokio::time::sleep(window).await;
                    if current(&generation, &key) == mine {
                        fake(&deployment, service).set_faults(Faults::default());
                    }
                }));
            }
            Fault::DuplicateDelivery { count } => {
                tally.add(kind, redeliver(&deployment, count).await.unwrap_or(0));
            }
        }
    }
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
    for task in background {
        let _ = task.await;
    }
    if !cluster.is_running() {
        let _ = cluster.start_again().await;
    }
    proxy.disarm();
    proxy.set_latency(Duration::ZERO);
    for s in [Service::Payment, Service::Inventory, Service::Email] {
        bump(&generation, &format!("{s:?}"));
        fake(&deployment, s).set_faults(Faults::default());
    }
    for i in 0..config.workers {
        workers.send(i, "disarm").await;
        workers.send(i, "resume").await;
    }
    let _ = placing.await;
    tally.add(FaultKind::CommitCut, proxy.fired_count());
    let fault_seconds = fault_start.elapsed().as_secs_f64();
    say("faults stopped; waiting for the system to quiesce".into());

    let quiet_start = Instant::now();
    let mut quiesced = None;
    while quiet_start.elapsed() < config.quiesce_bound {
        match deployment.quiet().await {
            Ok(p) if p.is_quiet() && p.sagas as usize == config.orders => {
                quiesced = Some(quiet_start.elapsed());
                break;
            }
            Ok(p) if config.progress && last_progress.elapsed() > Duration::from_secs(5) => {
                last_progress = Instant::now();
                say(format!(
                    "quiescing: {}/{} sagas finished, {} messages to deliver",
                    p.finished, p.sagas, p.undelivered
                ));
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    workers.stop_all().await;
    event_loop.abort();

    let audit = deployment.audit().await?;
    let counts = workers.total();
    let findings: Findings = check::check(&deployment, &audit, quiesced.is_some(), &counts).await?;
    for s in [Service::Payment, Service::Inventory, Service::Email] {
        let injected = fake(&deployment, s).injected();
        tally.add(FaultKind::DownstreamErrors, injected.failures);
        tally.add(FaultKind::LostReplies, injected.lost_replies);
    }
    let duplicates_absorbed = deployment.email.injected().duplicates_absorbed;
    deployment.stop_services();

    let faults: BTreeMap<String, u64> = tally
        .by_kind
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|(k, n)| (k.name().to_owned(), *n))
        .collect();
    let mut first_violating_orders = Vec::new();
    for v in &findings.violations {
        let Some(order) = &v.order else { continue };
        if first_violating_orders.iter().any(|(o, _)| o == order) {
            continue;
        }
        let timeline = findings
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
    Ok(Report {
        seed: config.seed,
        sagas: findings.instances.len(),
        workers: config.workers,
        negative: config.negative,
        fault_seconds,
        faults_total: faults.values().sum(),
        faults,
        duplicates_absorbed,
        counts,
        violations: findings.per_invariant(),
        violation_details: findings.violations.clone(),
        outcomes: findings.outcomes.clone(),
        stuck: findings.stuck.clone(),
        seconds_to_quiesce: quiesced.map(|d| d.as_secs_f64()),
        quiesce_bound_seconds: config.quiesce_bound.as_secs_f64(),
        throughput: finished as f64 / seconds,
        seconds,
        first_violating_orders,
    })
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
/// broker redelivering would; returns how many were sent.
async fn redeliver(deployment: &Deployment, count: usize) -> Result<u64, checkout::Error> {
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
    let mut sent = 0;
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
        if http
            .post(format!("{}/deliveries", deployment.email.url()))
            .json(&delivery)
            .send()
            .await
            .is_ok()
        {
            sent += 1;
        }
    }
    Ok(sent)
}
