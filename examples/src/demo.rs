//! The demo: a batch of orders with a mix of outcomes, run by several
//! workers, one of which dies mid-run; then a summary from the ledgers.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use saga_core::store::SagaStore;
use saga_core::{Direction, HistoryEntry, Outcome, SagaId, Status};
use tokio::sync::{mpsc, watch};

use crate::audit::{Audit, Violation};
use crate::deploy::{Database, Deployment, Progress, WorkerSettings};
use crate::model::{CARD_DECLINED, CARD_GATEWAY_DOWN, CARD_OK, Order, OrderLine, SKU_SOLD_OUT};
use crate::services::Faults;

/// What can happen to an order, by design.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scenario {
    /// Everything works.
    Ok,
    /// The card is declined: nothing to undo but the (absent) charge.
    Declined,
    /// An item is out of stock after the card was charged: refunded.
    OutOfStock,
    /// The payment gateway is down for this card: retries, then
    /// compensation once the budget is spent.
    GatewayDown,
}

impl Scenario {
    /// A short description.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Scenario::Ok => "ok",
            Scenario::Declined => "card declined",
            Scenario::OutOfStock => "out of stock",
            Scenario::GatewayDown => "gateway outage",
        }
    }
}

/// How many orders the summary lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Show {
    /// Every order.
    All,
    /// The first ones, then how many more there are.
    First(usize),
}

impl Default for Show {
    /// The first 40.
    fn default() -> Self {
        Show::First(40)
    }
}

impl std::str::FromStr for Show {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "all" {
            return Ok(Show::All);
        }
        s.parse()
            .map(Show::First)
            .map_err(|_| format!("`{s}`: expected `all` or a number of orders"))
    }
}

/// How to run the demo.
#[derive(Debug)]
pub struct Options {
    /// Orders to place.
    pub orders: usize,
    /// Workers running sagas.
    pub workers: usize,
    /// Fraction of orders paid with a card that is declined.
    pub decline_rate: f64,
    /// Fraction of orders with an item out of stock.
    pub out_of_stock_rate: f64,
    /// Fraction of orders whose payment gateway is down.
    pub outage_rate: f64,
    /// Transient failures and lost replies injected into every service.
    pub faults: Faults,
    /// Kill a worker right after it reserved one order's stock.
    pub crash: bool,
    /// Seed of the order mix and of the injected faults.
    pub seed: u64,
    /// The database.
    pub database: Database,
    /// Give up after this long.
    pub deadline: Duration,
    /// Per-call timeout of the workers' calls to the services.
    pub http_timeout: Duration,
    /// Keep the run's schemas in the database given by URL (they are
    /// dropped at the end otherwise).
    pub keep: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            orders: 12,
            workers: 2,
            decline_rate: 0.1,
            out_of_stock_rate: 0.1,
            outage_rate: 0.1,
            faults: Faults::default(),
            crash: true,
            seed: 2,
            database: Database::Throwaway,
            deadline: Duration::from_secs(300),
            http_timeout: WorkerSettings::default().http_timeout,
            keep: false,
        }
    }
}

/// `n` and `noun`, plural unless `n` is 1 (`noun` + "s").
fn count(n: impl Into<i64>, noun: &str) -> String {
    let n = n.into();
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

fn count_usize(n: usize, noun: &str) -> String {
    count(i64::try_from(n).unwrap_or(i64::MAX), noun)
}

/// Where the run's database is, for people: no password.
fn describe_database(database: &Database) -> String {
    match database {
        Database::Throwaway => "a throwaway local PostgreSQL".to_owned(),
        Database::Url(url) => match saga_postgres::tokio_postgres::Config::from_str(url) {
            Ok(config) => {
                use saga_postgres::tokio_postgres::config::Host;
                let host = match config.get_hosts().first() {
                    Some(Host::Tcp(host)) => host.clone(),
                    #[cfg(unix)]
                    Some(Host::Unix(path)) => path.display().to_string(),
                    None => "localhost".to_owned(),
                };
                let port = config.get_ports().first().copied().unwrap_or(5432);
                let database = config
                    .get_dbname()
                    .or(config.get_user())
                    .unwrap_or("(default)");
                format!("PostgreSQL at {host}:{port}, database {database}")
            }
            Err(_) => "the PostgreSQL at the given URL".to_owned(),
        },
    }
}
/// The line printed before a run: what it does, and where.
#[must_use]
pub fn banner(options: &Options) -> String {
    let mut line = format!(
        "checkout: {}, {}, on {}",
        count_usize(options.orders, "order"),
        count_usize(options.workers, "worker"),
        describe_database(&options.database)
    );
    if matches!(options.database, Database::Url(_)) {
        line.push_str(if options.keep {
            " (its schemas checkout_<id>_* are kept: --keep)"
        } else {
            " (its schemas checkout_<id>_* are dropped at the end; --keep keeps them)"
        });
    }
    line
}

/// What is odd about `options`, for a warning before the run.
#[must_use]
pub fn warnings(options: &Options) -> Vec<String> {
    let mut warnings = Vec::new();
    if options.crash && options.workers < 2 {
        warnings.push(
            "crash skipped: needs at least 2 workers (one is killed, another takes over); \
             --no-crash silences this"
                .to_owned(),
        );
    }
    warnings.extend(notes(options));
    warnings
}

/// The [`warnings`] that the summary repeats as notes (the skipped crash
/// has its own line there).
fn notes(options: &Options) -> Vec<String> {
    let mut warnings = Vec::new();
    let step_timeout = WorkerSettings::default().step_timeout;
    let (timeout, which) = if options.http_timeout <= step_timeout {
        (
            options.http_timeout,
            "the per-call timeout, --http-timeout-ms",
        )
    } else {
        (step_timeout, "the per-attempt timeout of each step")
    };
    if options.faults.latency >= timeout {
        warnings.push(format!(
            "the injected latency of {} ms is at or above {which}, of {} ms: every call to the \
             services times out, so the sagas retry, compensate, and end stuck once their \
             compensations give up",
            options.faults.latency.as_millis(),
            timeout.as_millis()
        ));
    }
    if options.keep && matches!(options.database, Database::Throwaway) {
        warnings.push(
            "--keep only applies to a database given by URL: the throwaway cluster is removed \
             on exit"
                .to_owned(),
        );
    }
    warnings
}

/// One order, what was meant to happen, and what did.
#[derive(Debug, Clone)]
pub struct OrderReport {
    /// The order.
    pub order: Order,
    /// What it was set up to meet.
    pub scenario: Scenario,
    /// Its saga.
    pub saga_id: SagaId,
    /// The saga's status at the end of the run.
    pub status: Status,
    /// Why it is stuck, if it is.
    pub stuck_reason: Option<String>,
    /// The saga's history.
    pub history: Vec<HistoryEntry>,
}

impl OrderReport {
    /// Its saga is still running or compensating (the run stopped first).
    #[must_use]
    pub fn is_unfinished(&self) -> bool {
        self.status.is_runnable()
    }
}

/// The worker killed mid-run, or why none was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Crash {
    /// Not asked for.
    NotAsked,
    /// Asked for, but a crash needs a second worker to take over.
    NeedsTwoWorkers,
    /// Planned during `order`'s stock reservation, which never happened
    /// (the order failed before it, or the run stopped first).
    DidNotHappen {
        /// The order.
        order: String,
    },
    /// `worker` (from 1) was killed right after reserving `order`'s stock,
    /// before recording it.
    Happened {
        /// The worker, from 1.
        worker: usize,
        /// The order.
        order: String,
    },
}

/// What became of the run's schemas.
#[derive(Debug, Clone)]
pub enum Cleanup {
    /// A throwaway cluster, removed on exit.
    Throwaway,
    /// The schemas `<prefix>_*` were dropped.
    Dropped {
        /// Their prefix.
        prefix: String,
    },
    /// The schemas `<prefix>_*` were kept, as asked.
    Kept {
        /// Their prefix.
        prefix: String,
    },
    /// The schemas `<prefix>_*` could not be dropped.
    DropFailed {
        /// Their prefix.
        prefix: String,
        /// Why.
        error: Arc<crate::Error>,
    },
}

/// What the demo did.
#[derive(Debug, Clone)]
pub struct Report {
    /// Per order.
    pub orders: Vec<OrderReport>,
    /// The ledgers.
    pub audit: Audit,
    /// The crash.
    pub crash: Crash,
    /// Workers.
    pub workers: usize,
    /// Seed.
    pub seed: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// The deadline.
    pub deadline: Duration,
    /// Whether the run stopped before every saga finished and every
    /// message was delivered: the deadline was reached, or it was
    /// interrupted.
    pub stopped_early: bool,
    /// Whether it was interrupted.
    pub interrupted: bool,
    /// Outbox messages not delivered when the run stopped (dead letters
    /// excluded).
    pub undelivered: i64,
    /// The orders (message keys) of those messages.
    pub undelivered_orders: BTreeSet<String>,
    /// Dead letters left in the outbox.
    pub dead_letters: i64,
    /// Warnings about the options ([`warnings`]), but the skipped crash.
    pub notes: Vec<String>,
    /// What became of the run's schemas.
    pub cleanup: Cleanup,
}

/// How a run ended, for the exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Every saga completed or was compensated, and every invariant holds.
    AllGood,
    /// Every invariant holds, but some sagas are stuck (parked for an
    /// operator) or unfinished (the run stopped first).
    Unsettled,
    /// An invariant is broken.
    Violated,
}

impl Report {
    /// The orders whose saga is still running or compensating.
    pub fn unfinished(&self) -> impl Iterator<Item = &OrderReport> {
        self.orders.iter().filter(|o| o.is_unfinished())
    }

    /// The orders whose saga is stuck.
    pub fn stuck(&self) -> impl Iterator<Item = &OrderReport> {
        self.orders.iter().filter(|o| o.status == Status::Stuck)
    }

    /// Whether a violation only says that an order's ledgers are not
    /// final yet: an imbalance of an order whose saga has not finished
    /// (charged and not yet confirmed or refunded, deducted and not yet
    /// released...), or the missing email of a confirmed order whose
    /// message is still in the outbox. A second charge or deduction is
    /// never pending: it is wrong whenever it happens.
    #[must_use]
    pub fn is_pending(&self, violation: &Violation) -> bool {
        let Some(order) = violation.order() else {
            return false;
        };
        let unfinished = self
            .orders
            .iter()
            .any(|o| o.order.id == order && o.is_unfinished());
        match violation {
            Violation::ChargedTwice { .. }
            | Violation::DeductedTwice { .. }
            | Violation::StockNotConserved { .. } => false,
            Violation::WrongNetCharge { .. } | Violation::WrongNetDeduction { .. } => unfinished,
            Violation::WrongEmailCount { emails, .. } => {
                unfinished || (*emails == 0 && self.undelivered_orders.contains(order))
            }
        }
    }

    /// The broken invariants, pending ledgers ([`Report::is_pending`])
    /// left out.
    pub fn violations(&self) -> impl Iterator<Item = &Violation> {
        self.audit.violations.iter().filter(|v| !self.is_pending(v))
    }

    /// How the run ended.
    #[must_use]
    pub fn verdict(&self) -> Verdict {
        if self.violations().next().is_some() {
            Verdict::Violated
        } else if self.stopped_early
            || self.unfinished().next().is_some()
            || self.stuck().next().is_some()
        {
            Verdict::Unsettled
        } else {
            Verdict::AllGood
        }
    }

    /// The crashed worker (from 1) and order, if a worker was killed.
    #[must_use]
    pub fn crashed_during(&self) -> Option<(usize, &str)> {
        match &self.crash {
            Crash::Happened { worker, order } => Some((*worker, order)),
            _ => None,
        }
    }
}

const CATALOGUE: [(&str, i64); 3] = [("mug", 1_200), ("t-shirt", 2_500), ("poster", 800)];

/// The orders of a run: the first four show each scenario (when their rates
/// are not zero), the rest are drawn from the rates.
#[must_use]
pub fn orders(options: &Options) -> Vec<(Order, Scenario)> {
    let mut rng = StdRng::seed_from_u64(options.seed);
    let forced: Vec<Scenario> = [
        (Scenario::Ok, 1.0),
        (Scenario::Declined, options.decline_rate),
        (Scenario::OutOfStock, options.out_of_stock_rate),
        (Scenario::GatewayDown, options.outage_rate),
    ]
    .into_iter()
    .filter(|(_, rate)| *rate > 0.0)
    .map(|(s, _)| s)
    .collect();
    (0..options.orders)
        .map(|i| {
            let scenario = forced.get(i).copied().unwrap_or_else(|| {
                let roll: f64 = rng.random();
                let d = options.decline_rate;
                let o = d + options.out_of_stock_rate;
                let g = o + options.outage_rate;
                if roll < d {
                    Scenario::Declined
                } else if roll < o {
                    Scenario::OutOfStock
                } else if roll < g {
                    Scenario::GatewayDown
                } else {
                    Scenario::Ok
                }
            });
            let mut lines: Vec<OrderLine> = (0..rng.random_range(1..=2))
                .map(|_| {
                    let (sku, _) = CATALOGUE[rng.random_range(0..CATALOGUE.len())];
                    OrderLine {
                        sku: sku.to_owned(),
                        qty: rng.random_range(1..=3),
                    }
                })
                .collect();
            lines.sort_by(|a, b| a.sku.cmp(&b.sku));
            lines.dedup_by(|a, b| a.sku == b.sku);
            let mut total: i64 = lines
                .iter()
                .map(|l| {
                    CATALOGUE
                        .iter()
                        .find(|(s, _)| *s == l.sku)
                        .map_or(0, |(_, p)| *p)
                        * i64::from(l.qty)
                })
                .sum();
            if scenario == Scenario::OutOfStock {
                lines.push(OrderLine {
                    sku: SKU_SOLD_OUT.to_owned(),
                    qty: 1,
                });
                total += 9_900;
            }
            let card = match scenario {
                Scenario::Declined => CARD_DECLINED,
                Scenario::GatewayDown => CARD_GATEWAY_DOWN,
                _ => CARD_OK,
            };
            let order = Order {
                id: format!("order-{:04}", i + 1),
                email: format!("customer{}@example.com", i + 1),
                card: card.to_owned(),
                lines,
                total_cents: total,
            };
            (order, scenario)
        })
        .collect()
}

/// Stock for `orders` orders: plenty of each catalogue item, none of the
/// sold-out one.
#[must_use]
pub fn stock(orders: usize) -> BTreeMap<String, i32> {
    let plenty = i32::try_from(orders.saturating_mul(6) + 10).unwrap_or(i32::MAX);
    let mut stock: BTreeMap<String, i32> = CATALOGUE
        .iter()
        .map(|(sku, _)| ((*sku).to_owned(), plenty))
        .collect();
    stock.insert(SKU_SOLD_OUT.to_owned(), 0);
    stock
}

/// Runs the demo; `progress` is called about four times a second.
pub async fn run(options: Options, progress: impl FnMut(Progress)) -> Result<Report, crate::Error> {
    run_until(options, progress, std::future::pending()).await
}

/// [`run`], stopping early when `interrupt` completes (Ctrl-C): the
/// workers are stopped, the ledgers audited, the schemas dropped (unless
/// kept), and the report says it was interrupted.
pub async fn run_until(
    mut options: Options,
    progress: impl FnMut(Progress),
    interrupt: impl Future<Output = ()>,
) -> Result<Report, crate::Error> {
    let started = Instant::now();
    let prefix = match options.database {
        Database::Throwaway => "checkout".to_owned(),
        Database::Url(_) => format!(
            "checkout_{}",
            &uuid::Uuid::now_v7().simple().to_string()[20..]
        ),
    };
    let by_url = matches!(options.database, Database::Url(_));
    let keep = options.keep;
    let notes = notes(&options);
    let stock = stock(options.orders);
    let database = std::mem::replace(&mut options.database, Database::Throwaway);
    let deployment = Deployment::start(database, &prefix, &stock, options.seed).await?;
    let ran = drive(&deployment, &options, started, progress, interrupt).await;
    deployment.stop_services();
    let cleanup = if !by_url {
        Cleanup::Throwaway
    } else if keep {
        Cleanup::Kept { prefix }
    } else {
        match deployment.drop_schemas().await {
            Ok(()) => Cleanup::Dropped { prefix },
            Err(error) => Cleanup::DropFailed {
                prefix,
                error: Arc::new(error),
            },
        }
    };
    let mut report = ran?;
    report.notes = notes;
    report.cleanup = cleanup;
    Ok(report)
}

/// Runs the orders on `deployment` until they are done, the deadline
/// passes or `interrupt` completes; then stops the workers and audits.
async fn drive(
    deployment: &Deployment,
    options: &Options,
    started: Instant,
    mut progress: impl FnMut(Progress),
    interrupt: impl Future<Output = ()>,
) -> Result<Report, crate::Error> {
    for service in [
        &deployment.payment,
        &deployment.inventory,
        &deployment.email,
    ] {
        service.set_faults(options.faults.clone());
    }
    let settings = WorkerSettings {
        http_timeout: options.http_timeout,
        ..WorkerSettings::default()
    };
    let plan = orders(options);

    // The order during which a worker dies: the first plain one after the
    // scenario showcase. Whichever worker reserves its stock is killed.
    let crash_order = (options.crash && options.workers >= 2)
        .then(|| {
            plan.iter()
                .skip(4)
                .find(|(_, s)| *s == Scenario::Ok)
                .or(plan.first())
        })
        .flatten()
        .map(|(o, _)| o.id.clone());
    let mut crash = match &crash_order {
        Some(order) => Crash::DidNotHappen {
            order: order.clone(),
        },
        None if options.crash => Crash::NeedsTwoWorkers,
        None => Crash::NotAsked,
    };
    let (crashed_tx, mut crashed_rx) = mpsc::unbounded_channel();
    let hook = crash_order.map(|order| crate::faults::CrashHook::new(order, crashed_tx));
    let (stop, stopped) = watch::channel(false);
    let mut workers = Vec::new();
    for i in 0..options.workers.max(1) {
        let hooks = crate::deploy::Hooks {
            after_effect: hook.as_ref().map(|h| h.for_worker(i)),
            after_publish: None,
        };
        let worker = deployment.worker_with_hooks(&settings, hooks)?;
        let mut stopped = stopped.clone();
        workers.push(tokio::spawn(async move {
            worker
                .run(async move {
                    let _ = stopped.wait_for(|s| *s).await;
                })
                .await
        }));
    }

    let saga = deployment.saga(&settings)?;
    let mut placed = Vec::with_capacity(plan.len());
    for (order, scenario) in plan {
        let started = deployment
            .shop
            .place(&deployment.store, &saga, &order)
            .await?;
        placed.push((order, scenario, started.id));
    }

    let mut ticker = tokio::time::interval(Duration::from_millis(250));
    let mut interrupt = std::pin::pin!(interrupt);
    let mut interrupted = false;
    let last = loop {
        tokio::select! {
            Some((worker, order)) = crashed_rx.recv() => {
                // This worker has reserved the order's stock and not
                // recorded it: kill it now. Its lease expires; another
                // worker takes over.
                workers[worker].abort();
                crash = Crash::Happened { worker: worker + 1, order };
                continue;
            }
            () = &mut interrupt, if !interrupted => interrupted = true,
            _ = ticker.tick() => {}
        }
        let now = deployment.quiet().await?;
        progress(now);
        if now.is_quiet() || interrupted || started.elapsed() > options.deadline {
            break now;
        }
    };
    let _ = stop.send(true);
    for worker in workers {
        if let Ok(result) = worker.await {
            result?;
        }
    }

    let mut reports = Vec::with_capacity(placed.len());
    for (order, scenario, saga_id) in placed {
        let snapshot = deployment
            .store
            .load(saga_id)
            .await?
            .ok_or(saga_core::Error::NotFound(saga_id))?;
        reports.push(OrderReport {
            order,
            scenario,
            saga_id,
            status: snapshot.status,
            stuck_reason: snapshot.stuck_reason,
            history: deployment.store.history(saga_id).await?,
        });
    }
    let audit = deployment.audit().await?;
    let undelivered_orders = deployment.undelivered_keys().await?;
    Ok(Report {
        orders: reports,
        audit,
        crash,
        workers: options.workers.max(1),
        seed: options.seed,
        elapsed: started.elapsed(),
        deadline: options.deadline,
        stopped_early: !last.is_quiet(),
        interrupted,
        undelivered: last.undelivered,
        undelivered_orders,
        dead_letters: last.dead_letters,
        notes: Vec::new(),
        cleanup: Cleanup::Throwaway,
    })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{OrderLedger, check};

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
        assert!(
            text.contains("net deducted 1 unit, all for confirmed orders; stock conserved: yes")
        );
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
            text.contains(
                "email:     1 sent for 1 confirmed order (1 message still in the outbox)"
            ),
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
}
