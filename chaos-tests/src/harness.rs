//! The harness: a throwaway PostgreSQL cluster, a fault-injecting proxy
//! between it and the workers, the checkout services, worker processes,
//! a stream of orders, and a seeded schedule of faults; then, once the
//! faults stop and the system quiesces, the checks.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use checkout::deploy::{Database, Deployment, WorkerSettings};
use checkout::services::{Faults, Service as FakeService};
use saga_postgres::testing::TestCluster;
use saga_postgres::testing::proxy::{Cut, FaultProxy, Intercepted};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::{Mutex, Notify, mpsc, oneshot};
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::check::{
    self, CutSummary, Findings, Recorded, RecordedCut, RefusedAt, WorkerFact, ZombieFact,
};
use crate::schedule::{self, Event, Fault, FaultKind, Plan, Service, ZombieAt};
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
    /// Print progress to stderr (every few seconds).
    pub progress: bool,
}

/// The faults of one kind: how many were scheduled, how many took place,
/// and how much they hit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct KindCount {
    /// Events in the schedule.
    pub scheduled: u64,
    /// Events that took place (a point armed but never reached, a kill of
    /// a process already gone, a reset with no connection open... did not).
    pub fired: u64,
    /// What the fired events hit, in `unit`s.
    pub affected: u64,
    /// What `affected` counts.
    pub unit: &'static str,
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
    /// The kinds of fault injected.
    pub kinds: Vec<&'static str>,
    /// Seconds of fault injection.
    pub fault_seconds: f64,
    /// Per kind: scheduled, fired, affected.
    pub faults: BTreeMap<&'static str, KindCount>,
    /// Fault events scheduled, all kinds (the sum of `scheduled`).
    pub fault_events_scheduled: u64,
    /// Fault events fired, all kinds (the sum of `fired`).
    pub fault_events_fired: u64,
    /// What the cut transitions turned out to be, from the database.
    pub cuts: CutSummary,
    /// The zombies, each with what the harness saw.
    pub zombies: Vec<ZombieFact>,
    /// Deliveries the harness repeated itself.
    pub redeliveries_sent: u64,
    /// Of those, the ones the email inbox recognised and applied no
    /// effect for.
    pub redeliveries_absorbed: u64,
    /// Repeated deliveries from the dispatchers (after a dispatcher crash
    /// or a lost reply) that the email inbox absorbed.
    pub dispatcher_duplicates_absorbed: u64,
    /// The workers' counters, all incarnations (killed ones as last
    /// reported).
    pub counts: Counts,
    /// Violations per invariant.
    pub violations: BTreeMap<&'static str, usize>,
    /// Every violation.
    pub violation_details: Vec<check::Violation>,
    /// Sagas by final status.
    pub outcomes: BTreeMap<String, u64>,
    /// Stuck sagas and why.
    pub stuck: Vec<(String, String)>,
    /// Seconds from the end of the last fault until every saga had
    /// finished and every message was delivered (`None`: not within the
    /// bound).
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

    /// The counts of `kind` (zeros if it was not injected).
    #[must_use]
    pub fn kind(&self, kind: FaultKind) -> KindCount {
        self.faults.get(kind.name()).cloned().unwrap_or_default()
    }

    /// The zombies fenced off at their result write, verified.
    #[must_use]
    pub fn zombies_refused_at(&self, at: RefusedAt) -> usize {
        self.zombies
            .iter()
            .filter(|z| z.refused() == Some(at))
            .count()
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

/// SQL text found only in a saga transition's statement (the one that
/// moves the instance and appends its history row): the store writes
/// `INSERT INTO <schema>.saga_history (transition_id, ...`. Workers never
/// start sagas (the shop does, on its own connections), so every worker
/// statement with this text is a transition.
pub const TRANSITION_SQL: &str = "saga_history (transition_id";

/// The number `N` of the first `$N` placeholder after `anchor` and then
/// `then` in `sql`.
fn placeholder_after(sql: &str, anchor: &str, then: &str) -> Option<usize> {
    let rest = &sql[sql.find(anchor)? + anchor.len()..];
    let rest = &rest[rest.find(then)? + then.len()..];
    let rest = &rest[rest.find('$')? + 1..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

fn uuid_param(statement: &Intercepted, n: Option<usize>) -> Option<Uuid> {
    Uuid::from_slice(statement.param(n?)?).ok()
}

/// The saga and transition ids of a transition's statement: the saga is
/// the `WHERE id = $N` of its update, the transition the first value of
/// its history row's `SELECT`.
#[must_use]
pub fn transition_ids(statement: &Intercepted) -> (Option<Uuid>, Option<Uuid>) {
    let Some(sql) = statement.sql.as_deref() else {
        return (None, None);
    };
    (
        uuid_param(statement, placeholder_after(sql, "UPDATE", "WHERE id = ")),
        uuid_param(statement, placeholder_after(sql, TRANSITION_SQL, "SELECT")),
    )
}

/// Fired fault events, and when the last one ended.
#[derive(Default)]
struct Tally {
    fired: std::sync::Mutex<BTreeMap<FaultKind, u64>>,
    affected: std::sync::Mutex<BTreeMap<FaultKind, u64>>,
    last: std::sync::Mutex<Option<Instant>>,
}

impl Tally {
    fn fired(&self, kind: FaultKind) {
        *self
            .fired
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(kind)
            .or_default() += 1;
        self.touch();
    }

    fn affected(&self, kind: FaultKind, n: u64) {
        *self
            .affected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(kind)
            .or_default() += n;
    }

    /// A fault's effect ended now.
    fn touch(&self) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }

    fn last(&self) -> Option<Instant> {
        *self.last.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn total(&self) -> u64 {
        self.fired
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .sum()
    }
}

struct Slot {
    child: Child,
    stdin: ChildStdin,
    incarnation: u64,
    reader: JoinHandle<()>,
}

/// An armed effect point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arm {
    Crash,
    Zombie(ZombieAt),
}

impl Arm {
    fn action(self) -> PointAction {
        match self {
            Arm::Crash => PointAction::Crash,
            Arm::Zombie(_) => PointAction::Pause,
        }
    }

    fn command(self) -> &'static str {
        match self.action() {
            PointAction::Crash => "crash-after-effect",
            PointAction::Pause => "pause-after-effect",
        }
    }
}

/// Armed points not yet reached. The head of each queue is armed on every
/// live worker; the first worker to reach it fires it.
#[derive(Debug, Default)]
struct Arms {
    effect: VecDeque<Arm>,
    publish: u32,
    /// A zombie is frozen or being watched: the next zombie point waits,
    /// so that some worker is always left to take a zombie's saga over.
    zombie_active: bool,
}

impl Arms {
    /// The effect point to arm on the workers now, and where it is in the
    /// queue: the first, or while a zombie is active the first crash.
    fn next(&self) -> Option<(usize, Arm)> {
        self.effect
            .iter()
            .copied()
            .enumerate()
            .find(|(_, a)| !(self.zombie_active && matches!(a, Arm::Zombie(_))))
    }

    fn to_arm(&self) -> Option<Arm> {
        self.next().map(|(_, arm)| arm)
    }
}

enum Msg {
    Event(usize, u64, WorkerEvent),
    /// Answered once every message before it was handled.
    Flush(oneshot::Sender<()>),
}

/// The name a worker incarnation's connections carry
/// (`application_name`).
fn incarnation_name(i: usize, incarnation: u64) -> String {
    format!("chaos-w{i}-{incarnation}")
}

/// The worker processes, restarted after each kill.
struct Workers {
    arms: std::sync::Mutex<Arms>,
    /// Workers frozen as zombies right now: random kills spare them, so
    /// that each zombie lives to make its stale write.
    paused: std::sync::Mutex<BTreeSet<usize>>,
    exe: PathBuf,
    spec: WorkerSpec,
    slots: Vec<Mutex<Option<Slot>>>,
    events: mpsc::UnboundedSender<Msg>,
    counts: std::sync::Mutex<BTreeMap<(usize, u64), Counts>>,
    /// Incarnations that stopped cleanly (their counters are complete).
    stopped: std::sync::Mutex<BTreeSet<(usize, u64)>>,
    /// Writes refused, as the workers reported them: (worker, incarnation,
    /// saga id).
    leases_lost: std::sync::Mutex<Vec<(usize, u64, String)>>,
    lease_lost: Notify,
    /// Each incarnation's executor id: the `lease_owner` of what it claims.
    worker_ids: std::sync::Mutex<BTreeMap<(usize, u64), Uuid>>,
    incarnations: AtomicU64,
}

impl Workers {
    async fn spawn(&self, i: usize) -> Result<(), Error> {
        let incarnation = self.incarnations.fetch_add(1, Ordering::Relaxed);
        let mut spec = self.spec.clone();
        spec.number = i;
        spec.endpoints.database_url = format!(
            "{}?application_name={}",
            spec.endpoints.database_url,
            incarnation_name(i, incarnation)
        );
        let mut child = Command::new(&self.exe)
            .arg("worker")
            .env(SPEC_ENV, serde_json::to_string(&spec)?)
            .env("RUST_LOG", "error")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        let events = self.events.clone();
        let reader = tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(event) = serde_json::from_str::<WorkerEvent>(&line) {
                    let _ = events.send(Msg::Event(i, incarnation, event));
                }
            }
        });
        *self.slots[i].lock().await = Some(Slot {
            child,
            stdin,
            incarnation,
            reader,
        });
        // A new incarnation gets the points armed on the others.
        let (effect, publish) = {
            let arms = self.arms.lock().unwrap_or_else(|e| e.into_inner());
            (arms.to_arm(), arms.publish > 0)
        };
        if let Some(arm) = effect {
            self.send(i, arm.command()).await;
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
    async fn arm_effect(&self, arm: Arm) {
        let (before, after) = {
            let mut arms = self.arms.lock().unwrap_or_else(|e| e.into_inner());
            let before = arms.to_arm();
            arms.effect.push_back(arm);
            (before, arms.to_arm())
        };
        if let Some(arm) = after
            && before.is_none()
        {
            self.broadcast(arm.command()).await;
        }
    }

    /// An effect point was reached: disarm it everywhere, arm the next;
    /// returns the arm it fired.
    async fn effect_fired(&self, action: PointAction) -> Option<Arm> {
        let (fired, next) = {
            let mut arms = self.arms.lock().unwrap_or_else(|e| e.into_inner());
            let fired = match arms.next() {
                Some((index, arm)) if arm.action() == action => arms.effect.remove(index),
                _ => None,
            };
            if matches!(fired, Some(Arm::Zombie(_))) {
                arms.zombie_active = true;
            }
            (fired, arms.to_arm())
        };
        self.broadcast("disarm-effect").await;
        if let Some(next) = next {
            self.broadcast(next.command()).await;
        }
        fired
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

    /// The zombie is done with: the next zombie point may be armed.
    async fn zombie_done(&self) {
        let next = {
            let mut arms = self.arms.lock().unwrap_or_else(|e| e.into_inner());
            arms.zombie_active = false;
            arms.to_arm()
        };
        if let Some(next) = next {
            self.broadcast(next.command()).await;
        }
    }

    fn armed(&self) -> bool {
        let arms = self.arms.lock().unwrap_or_else(|e| e.into_inner());
        !arms.effect.is_empty() || arms.publish > 0
    }

    fn clear_arms(&self) {
        *self.arms.lock().unwrap_or_else(|e| e.into_inner()) = Arms::default();
    }

    fn is_paused(&self, i: usize) -> bool {
        self.paused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&i)
    }

    fn set_paused(&self, i: usize, paused: bool) {
        let mut set = self.paused.lock().unwrap_or_else(|e| e.into_inner());
        if paused {
            set.insert(i);
        } else {
            set.remove(&i);
        }
    }

    fn reported_lease_lost(&self, i: usize, incarnation: u64, saga: &str) -> bool {
        self.leases_lost
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|(w, n, s)| *w == i && *n == incarnation && s == saga)
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
        // A worker that died meanwhile is no error here: the caller
        // learns it from the status.
        Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .stderr(Stdio::null())
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

    fn facts(&self) -> Vec<WorkerFact> {
        let stopped = self.stopped.lock().unwrap_or_else(|e| e.into_inner());
        self.counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|((i, n), counts)| WorkerFact {
                name: incarnation_name(*i, *n),
                survived: stopped.contains(&(*i, *n)),
                counts: *counts,
            })
            .collect()
    }

    /// Asks every worker to stop and waits for it and for its last events
    /// (killing what does not stop).
    async fn stop_all(&self) {
        for slot in &self.slots {
            if let Some(s) = slot.lock().await.as_mut() {
                let _ = s.stdin.write_all(b"stop\n").await;
                let _ = s.stdin.flush().await;
            }
        }
        for slot in &self.slots {
            let Some(mut s) = slot.lock().await.take() else {
                continue;
            };
            if tokio::time::timeout(Duration::from_secs(30), s.child.wait())
                .await
                .is_err()
            {
                let _ = s.child.start_kill();
                let _ = s.child.wait().await;
            }
            let _ = s.reader.await;
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

    let (events_tx, mut events_rx) = mpsc::unbounded_channel();
    let workers = Arc::new(Workers {
        exe: config.worker_exe.clone(),
        spec: WorkerSpec {
            endpoints,
            settings: settings.clone(),
            number: 0,
        },
        slots: (0..config.workers).map(|_| Mutex::new(None)).collect(),
        events: events_tx,
        arms: std::sync::Mutex::default(),
        paused: std::sync::Mutex::default(),
        counts: std::sync::Mutex::default(),
        stopped: std::sync::Mutex::default(),
        leases_lost: std::sync::Mutex::default(),
        lease_lost: Notify::new(),
        worker_ids: std::sync::Mutex::default(),
        incarnations: AtomicU64::new(0),
    });
    for i in 0..config.workers {
        workers.spawn(i).await?;
    }
    let tally = Arc::new(Tally::default());
    let run = Arc::new(Run {
        deployment: deployment.clone(),
        proxy: proxy.clone(),
        workers: workers.clone(),
        tally: tally.clone(),
        zombies: std::sync::Mutex::default(),
        zombie_tasks: std::sync::Mutex::default(),
        redeliveries_sent: AtomicU64::new(0),
        redeliveries_absorbed: AtomicU64::new(0),
    });

    // The workers' events: counters, refused writes, and the armed points
    // where the harness kills or freezes them.
    let event_loop = {
        let run = run.clone();
        let lease = settings.lease;
        tokio::spawn(async move {
            while let Some(msg) = events_rx.recv().await {
                let (i, incarnation, event) = match msg {
                    Msg::Event(i, n, e) => (i, n, e),
                    Msg::Flush(done) => {
                        let _ = done.send(());
                        continue;
                    }
                };
                handle_event(&run, lease, i, incarnation, event).await;
            }
        })
    };

    // Progress, every few seconds.
    let phase = Arc::new(std::sync::Mutex::new("faults"));
    let progress_task = config.progress.then(|| {
        let deployment = deployment.clone();
        let tally = tally.clone();
        let phase = phase.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(Duration::from_secs(5));
            ticker.tick().await;
            loop {
                ticker.tick().await;
                let phase = *phase.lock().unwrap_or_else(|e| e.into_inner());
                if let Ok(p) = deployment.quiet().await {
                    eprintln!(
                        "chaos: {:>6.1}s {phase}: {}/{} sagas finished, {} messages to deliver, {} fault events fired",
                        started.elapsed().as_secs_f64(),
                        p.finished,
                        p.sagas,
                        p.undelivered,
                        tally.total()
                    );
                }
            }
        })
    });

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

    // Commit cuts, one armed at a time (arming replaces a cut not yet
    // fired), each aimed at a transition's statement.
    let (cut_tx, mut cut_rx) = mpsc::unbounded_channel::<bool>();
    let cutter = {
        let proxy = proxy.clone();
        let tally = tally.clone();
        tokio::spawn(async move {
            while let Some(reply_lost) = cut_rx.recv().await {
                proxy.arm(if reply_lost {
                    Cut::AfterQueryContaining(TRANSITION_SQL.into())
                } else {
                    Cut::BeforeQueryContaining(TRANSITION_SQL.into())
                });
                proxy.fired().await;
                tally.fired(FaultKind::CommitCut);
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
                proxy.set_latency(latency);
                let proxy = proxy.clone();
                let tally = tally.clone();
                let generation = generation.clone();
                let mine = bump(&generation, "proxy");
                background.push(tokio::spawn(async move {
                    tokio::time::sleep(window).await;
                    if current(&generation, "proxy") == mine {
                        proxy.set_latency(Duration::ZERO);
                    }
                    tally.touch();
                }));
            }
            Fault::Downstream {
                service,
                faults,
                window,
            } => {
                tally.fired(kind);
                fake(&deployment, service).set_faults(faults);
                let deployment = deployment.clone();
                let tally = tally.clone();
                let generation = generation.clone();
                let key = format!("{service:?}");
                let mine = bump(&generation, &key);
                background.push(tokio::spawn(async move {
                    tokio::time::sleep(window).await;
                    if current(&generation, &key) == mine {
                        fake(&deployment, service).set_faults(Faults::default());
                    }
                    tally.touch();
                }));
            }
            Fault::DuplicateDelivery { count } => {
                if let Ok((sent, absorbed)) = redeliver(&deployment, count).await
                    && sent > 0
                {
                    tally.fired(kind);
                    tally.affected(kind, absorbed);
                    run.redeliveries_sent.fetch_add(sent, Ordering::Relaxed);
                    run.redeliveries_absorbed
                        .fetch_add(absorbed, Ordering::Relaxed);
                }
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
        fake(&deployment, s).set_faults(Faults::default());
    }
    for i in 0..config.workers {
        workers.send(i, "resume").await;
    }
    let _ = placing.await;
    let fault_seconds = fault_start.elapsed().as_secs_f64();
    *phase.lock().unwrap_or_else(|e| e.into_inner()) = "quiescing";
    say("faults stopped; waiting for the system to quiesce".into());

    // I4: from the end of the last fault.
    let last_fault = tally.last().unwrap_or(fault_start);
    let deadline = last_fault + config.quiesce_bound;
    let mut quiesced = None;
    loop {
        match deployment.quiet().await {
            Ok(p) if p.is_quiet() && p.sagas as usize == config.orders => {
                quiesced = Some(last_fault.elapsed());
                break;
            }
            _ if Instant::now() >= deadline => break,
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if let Some(task) = progress_task {
        task.abort();
    }
    workers.stop_all().await;
    let (done, flushed) = oneshot::channel();
    let _ = workers.events.send(Msg::Flush(done));
    let _ = flushed.await;
    event_loop.abort();

    let cuts = proxy
        .cuts()
        .into_iter()
        .map(|c| {
            let (saga, transition) = transition_ids(&c.statement);
            RecordedCut {
                after: c.after,
                saga,
                transition,
                worker: c.statement.application_name.clone(),
                port: c.statement.upstream_port,
            }
        })
        .collect();
    let recorded = Recorded {
        cuts,
        workers: workers.facts(),
        zombies: run
            .zombies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone(),
    };
    let facts = check::gather(&deployment, quiesced.is_some(), recorded).await?;
    let findings: Findings = check::check(&facts);

    // What each kind hit.
    let mut service_totals = checkout::services::Injected::default();
    for s in [Service::Payment, Service::Inventory, Service::Email] {
        let i = fake(&deployment, s).injected();
        service_totals.errors += i.errors;
        service_totals.outage_rejections += i.outage_rejections;
        service_totals.delayed += i.delayed;
        service_totals.lost_replies += i.lost_replies;
    }
    let redeliveries_absorbed = run.redeliveries_absorbed.load(Ordering::Relaxed);
    let dispatcher_duplicates_absorbed = deployment
        .email
        .injected()
        .duplicates_absorbed
        .saturating_sub(redeliveries_absorbed);
    deployment.stop_services();
    tally.affected(FaultKind::NetworkLatency, proxy.stats().delayed);
    tally.affected(FaultKind::DownstreamErrors, service_totals.errors);
    tally.affected(
        FaultKind::DownstreamOutage,
        service_totals.outage_rejections,
    );
    tally.affected(FaultKind::DownstreamLatency, service_totals.delayed);
    tally.affected(FaultKind::LostReplies, service_totals.lost_replies);
    tally.affected(
        FaultKind::ZombieWorker,
        facts
            .zombies
            .iter()
            .filter(|z| z.refused().is_some())
            .count() as u64,
    );
    tally.affected(FaultKind::CommitCut, facts.cuts.len() as u64);

    let fired = tally
        .fired
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let affected = tally
        .affected
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let mut kinds: Vec<FaultKind> = config.kinds.clone();
    kinds.sort();
    kinds.dedup();
    let faults: BTreeMap<&'static str, KindCount> = kinds
        .iter()
        .map(|k| {
            (
                k.name(),
                KindCount {
                    scheduled: scheduled.get(k).copied().unwrap_or(0),
                    fired: fired.get(k).copied().unwrap_or(0),
                    affected: affected.get(k).copied().unwrap_or(0),
                    unit: unit(*k),
                },
            )
        })
        .collect();

    let mut first_violating_orders = Vec::new();
    for v in &findings.violations {
        let Some(order) = &v.order else { continue };
        if first_violating_orders.iter().any(|(o, _)| o == order) {
            continue;
        }
        let timeline = facts
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
        sagas: facts.instances.len(),
        workers: config.workers,
        negative: config.negative,
        kinds: kinds.iter().map(|k| k.name()).collect(),
        fault_seconds,
        fault_events_scheduled: faults.values().map(|k| k.scheduled).sum(),
        fault_events_fired: faults.values().map(|k| k.fired).sum(),
        faults,
        cuts: findings.cuts,
        zombies: facts.zombies.clone(),
        redeliveries_sent: run.redeliveries_sent.load(Ordering::Relaxed),
        redeliveries_absorbed,
        dispatcher_duplicates_absorbed,
        counts: workers.total(),
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

/// What `affected` counts for each kind.
fn unit(kind: FaultKind) -> &'static str {
    match kind {
        FaultKind::WorkerKill => "workers killed",
        FaultKind::CrashAfterEffect => "workers killed after an effect",
        FaultKind::ZombieWorker => "zombies fenced off (verified)",
        FaultKind::PostgresRestart => "restarts",
        FaultKind::CommitCut => "transitions cut",
        FaultKind::ConnectionReset => "connections closed",
        FaultKind::NetworkLatency => "chunks delayed",
        FaultKind::DownstreamOutage => "requests refused (outage 503)",
        FaultKind::DownstreamErrors => "requests failed (injected 503)",
        FaultKind::DownstreamLatency => "requests delayed",
        FaultKind::LostReplies => "replies lost after the effect",
        FaultKind::DuplicateDelivery => "redeliveries absorbed by the inbox",
        FaultKind::DispatcherCrash => "dispatchers killed after publishing",
    }
}

async fn handle_event(
    run: &Arc<Run>,
    lease: Duration,
    i: usize,
    incarnation: u64,
    event: WorkerEvent,
) {
    let workers = &run.workers;
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
            // It hangs until killed, armed or not.
            if workers
                .kill_and_restart(i, Some(incarnation))
                .await
                .unwrap_or(false)
            {
                run.tally.fired(FaultKind::CrashAfterEffect);
                run.tally.affected(FaultKind::CrashAfterEffect, 1);
            }
        }
        WorkerEvent::EffectPoint {
            action: PointAction::Pause,
            order_id,
            ..
        } => {
            let Some(Arm::Zombie(at)) = workers.effect_fired(PointAction::Pause).await else {
                // Reached after it was disarmed: not a zombie.
                workers.send(i, "resume").await;
                return;
            };
            let task = tokio::spawn(zombie(run.clone(), lease, i, incarnation, order_id, at));
            run.zombie_tasks
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(task);
        }
        WorkerEvent::PublishPoint => {
            workers.publish_fired().await;
            if workers
                .kill_and_restart(i, Some(incarnation))
                .await
                .unwrap_or(false)
            {
                run.tally.fired(FaultKind::DispatcherCrash);
                run.tally.affected(FaultKind::DispatcherCrash, 1);
            }
        }
        WorkerEvent::LeaseLost { saga_id, .. } => {
            workers
                .leases_lost
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((i, incarnation, saga_id));
            workers.lease_lost.notify_waiters();
        }
        WorkerEvent::Stopped => {
            workers
                .stopped
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert((i, incarnation));
        }
        WorkerEvent::Ready { worker_id } => {
            workers
                .worker_ids
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert((i, incarnation), worker_id);
        }
    }
}

/// The lease on a saga, as its row says.
#[derive(Debug, Clone, Copy)]
struct LeaseRow {
    saga: Uuid,
    token: Option<Uuid>,
    owner: Option<Uuid>,
    version: i64,
}

/// The saga of `order`: its id, lease token and owner, and version.
async fn lease_of(
    deployment: &Deployment,
    order: &str,
) -> Result<Option<LeaseRow>, checkout::Error> {
    let db = deployment.pool.get().await?;
    let row = db
        .query_opt(
            &format!(
                "SELECT id, lease_token, lease_owner, version FROM {}.saga_instances
                 WHERE start_key = $1",
                deployment.schemas.saga.quoted()
            ),
            &[&order],
        )
        .await?;
    Ok(row.map(|r| LeaseRow {
        saga: r.get(0),
        token: r.get(1),
        owner: r.get(2),
        version: r.get(3),
    }))
}

/// Results written for `saga` by sessions other than `zombie`'s (the
/// harness's copy of every history insert keeps the session's
/// `application_name`).
async fn written_by_others(
    deployment: &Deployment,
    saga: Uuid,
    zombie: &str,
) -> Result<i64, checkout::Error> {
    let db = deployment.pool.get().await?;
    Ok(db
        .query_one(
            &format!(
                "SELECT count(*) FROM {}.history_inserts
                 WHERE saga_id = $1 AND application IS DISTINCT FROM $2",
                crate::check::HARNESS_SCHEMA
            ),
            &[&saga, &zombie],
        )
        .await?
        .get(0))
}

/// Waits (up to `bound`) until another worker than the zombie (`me`,
/// whose sessions are named `name`) has claimed the saga: seen either as
/// a new version under a live lease with another token and another owner,
/// or as a result another worker wrote for it since the freeze (its claim
/// and its result may both fall between two looks at the row). A new
/// version with no lease alone is not one: it may be the zombie's own
/// result, committed before it froze.
async fn wait_for_takeover(
    deployment: &Deployment,
    order: &str,
    (me, name): (Uuid, &str),
    before: LeaseRow,
    mut others_before: Option<i64>,
    bound: Duration,
) -> bool {
    let start = Instant::now();
    while start.elapsed() < bound {
        if let Ok(Some(now)) = lease_of(deployment, order).await
            && now.version > before.version
            && now.token.is_some()
            && now.token != before.token
            && now.owner.is_some_and(|owner| owner != me)
        {
            return true;
        }
        if let Ok(others) = written_by_others(deployment, before.saga, name).await {
            match others_before {
                None => others_before = Some(others),
                Some(n) if others > n => return true,
                Some(_) => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// A zombie: worker `i` stopped at its effect point on `order`. Frozen
/// there (`Step`) or once its result is on the way (`Record`), until
/// another worker has taken the saga over; then woken, and watched until
/// it reports its write refused.
async fn zombie(
    run: Arc<Run>,
    lease: Duration,
    i: usize,
    incarnation: u64,
    order: String,
    at: ZombieAt,
) {
    let workers = &run.workers;
    let deployment = &run.deployment;
    let mut fact = ZombieFact {
        order: order.clone(),
        at,
        frozen: false,
        takeover: false,
        record_sent: None,
        record_port: None,
        record_committed: false,
        refusal_reported: false,
    };
    workers.set_paused(i, true);
    // The worker is in its step and holds the saga's lease right now.
    let mut lease_now = None;
    for _ in 0..20 {
        match lease_of(deployment, &order).await {
            Ok(found) => {
                lease_now = found;
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
    // A zombie only if the lease is this worker's: faults (a restart, lost
    // heartbeats) may have let it lapse and another worker claim the saga
    // while this one was on its way to the effect point.
    let me = workers
        .worker_ids
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&(i, incarnation))
        .copied();
    let held = match (me, lease_now) {
        (Some(me), Some(before)) if before.owner == Some(me) => {
            before.token.map(|token| (me, before, token))
        }
        _ => None,
    };
    let Some((me, before, token)) = held else {
        workers.send(i, "resume").await;
        workers.set_paused(i, false);
        workers.zombie_done().await;
        return;
    };
    let saga_id = before.saga.to_string();
    let name = incarnation_name(i, incarnation);
    // Results others wrote for the saga so far (none should come while the
    // worker holds the lease; one that does is a takeover).
    let others_before = written_by_others(deployment, before.saga, &name).await.ok();
    // Its result, if it ever sends one, is held back until released.
    let mut hold = Some(run.proxy.hold(TRANSITION_SQL, token.as_bytes()));
    // Frozen at either point, the worker is woken once another has taken
    // the saga over (or the bound has passed).
    let takeover = || {
        wait_for_takeover(
            deployment,
            &order,
            (me, &name),
            before,
            others_before,
            lease * 8,
        )
    };
    match at {
        ZombieAt::Step => {
            if workers.signal(i, incarnation, "STOP").await {
                fact.frozen = true;
                run.tally.fired(FaultKind::ZombieWorker);
                fact.takeover = takeover().await;
                workers.signal(i, incarnation, "CONT").await;
            }
            workers.send(i, "resume").await;
        }
        ZombieAt::Record => {
            workers.send(i, "resume").await;
            let reached = match hold.as_mut() {
                Some(h) => tokio::time::timeout(lease * 2, h.reached()).await.ok(),
                None => None,
            };
            if let Some(statement) = reached {
                fact.record_sent = Some(transition_ids(&statement).1);
                fact.record_port = statement.upstream_port;
                if workers.signal(i, incarnation, "STOP").await {
                    fact.frozen = true;
                    run.tally.fired(FaultKind::ZombieWorker);
                    fact.takeover = takeover().await;
                }
                // The result reaches the database now, after the takeover.
                hold = None;
                workers.signal(i, incarnation, "CONT").await;
            }
        }
    }
    // Until the worker reports its write refused: a result it sends now
    // goes through at once (the takeover has happened).
    let deadline = Instant::now() + lease * 5;
    while Instant::now() < deadline && !workers.reported_lease_lost(i, incarnation, &saga_id) {
        let notified = workers.lease_lost.notified();
        let poll = tokio::time::sleep(Duration::from_millis(200));
        match hold.as_mut() {
            Some(h) => tokio::select! {
                statement = h.reached() => {
                    fact.record_sent = Some(transition_ids(&statement).1);
                    fact.record_port = statement.upstream_port;
                    hold = None;
                }
                () = notified => {}
                () = poll => {}
            },
            None => tokio::select! {
                () = notified => {}
                () = poll => {}
            },
        }
    }
    fact.refusal_reported = workers.reported_lease_lost(i, incarnation, &saga_id);
    drop(hold);
    workers.set_paused(i, false);
    if fact.frozen {
        run.tally.touch();
    }
    run.zombies
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(fact);
    workers.zombie_done().await;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The transition statement as the store writes it (abridged).
    const RECORD: &str = "WITH upd AS (
                    UPDATE \"chaos_saga\".saga_instances SET status = $3::text
                    WHERE id = $1::uuid AND lease_token = $2::uuid
                    RETURNING id
                ),
                hist AS (
                INSERT INTO \"chaos_saga\".saga_history (transition_id, saga_id, step, direction, attempt,
                    outcome, error, from_status, to_status, started_at, finished_at)
                SELECT $12::uuid, id, $13::text FROM upd
            ) SELECT 1";

    #[test]
    fn the_saga_and_transition_of_a_cut_statement_are_read_from_its_parameters() {
        assert_eq!(placeholder_after(RECORD, "UPDATE", "WHERE id = "), Some(1));
        assert_eq!(
            placeholder_after(RECORD, TRANSITION_SQL, "SELECT"),
            Some(12)
        );
        let (saga, transition) = (Uuid::from_u128(1), Uuid::from_u128(12));
        let mut statement = Intercepted::default();
        statement.sql = Some(RECORD.into());
        statement.params = (1..=13)
            .map(|n| match n {
                1 => Some(saga.as_bytes().to_vec()),
                12 => Some(transition.as_bytes().to_vec()),
                _ => Some(vec![0; 4]),
            })
            .collect();
        assert_eq!(transition_ids(&statement), (Some(saga), Some(transition)));
        statement.sql = Some("SELECT 1".into());
        assert_eq!(transition_ids(&statement), (None, None));
    }
}
