//! The demo: a batch of orders with a mix of outcomes, run by several
//! workers, one of which dies mid-run; then a summary from the ledgers.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use saga_core::{Direction, HistoryEntry, Outcome, SagaId, SagaStore, Status};
use tokio::sync::{mpsc, watch};

use crate::audit::Audit;
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
        }
    }
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
    /// The saga's final status.
    pub status: Status,
    /// The saga's history.
    pub history: Vec<HistoryEntry>,
}

/// What the demo did.
#[derive(Debug, Clone)]
pub struct Report {
    /// Per order.
    pub orders: Vec<OrderReport>,
    /// The ledgers.
    pub audit: Audit,
    /// The worker (from 1) killed, and the order it was reserving stock
    /// for, if one was.
    pub crashed_during: Option<(usize, String)>,
    /// Workers.
    pub workers: usize,
    /// Seed.
    pub seed: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// Dead letters left in the outbox.
    pub dead_letters: i64,
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
pub async fn run(
    options: Options,
    mut progress: impl FnMut(Progress),
) -> Result<Report, crate::Error> {
    let started = Instant::now();
    let prefix = match options.database {
        Database::Throwaway => "checkout".to_owned(),
        Database::Url(_) => format!(
            "checkout_{}",
            &uuid::Uuid::now_v7().simple().to_string()[20..]
        ),
    };
    let plan = orders(&options);
    let deployment = Deployment::start(
        options.database,
        &prefix,
        &stock(options.orders),
        options.seed,
    )
    .await?;
    for service in [
        &deployment.payment,
        &deployment.inventory,
        &deployment.email,
    ] {
        service.set_faults(options.faults.clone());
    }
    let settings = WorkerSettings::default();

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
    let (crashed_tx, mut crashed_rx) = mpsc::unbounded_channel();
    let hook = crash_order.map(|order| crate::saga::CrashHook::new(order, crashed_tx));
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

    let mut crashed_during = None;
    let mut ticker = tokio::time::interval(Duration::from_millis(250));
    let last = loop {
        ticker.tick().await;
        while let Ok((worker, order)) = crashed_rx.try_recv() {
            // This worker has reserved the order's stock and not recorded
            // it: kill it now. Its lease expires; another worker takes over.
            workers[worker].abort();
            crashed_during = Some((worker + 1, order));
        }
        let now = deployment.quiet().await?;
        progress(now);
        if now.is_quiet() {
            break now;
        }
        if started.elapsed() > options.deadline {
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
            history: deployment.store.history(saga_id).await?,
        });
    }
    let audit = deployment.audit().await?;
    deployment.stop_services();
    Ok(Report {
        orders: reports,
        audit,
        crashed_during,
        workers: options.workers.max(1),
        seed: options.seed,
        elapsed: started.elapsed(),
        dead_letters: last.dead_letters,
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

/// The summary printed at the end of a run.
#[must_use]
pub fn render(report: &Report) -> String {
    let mut out = String::new();
    let w = &mut out;
    let _ = writeln!(
        w,
        "\n{} orders, {} workers, seed {}, {:.1}s\n",
        report.orders.len(),
        report.workers,
        report.seed,
        report.elapsed.as_secs_f64()
    );
    let _ = writeln!(
        w,
        "{:<11} {:<15} {:<12} steps (✓ ok, ✗ retried, ✗! gave up, … worker died)",
        "order", "scenario", "outcome"
    );
    let shown = report.orders.len().min(40);
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
        let _ = writeln!(w, "… and {} more orders", report.orders.len() - shown);
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
    if let Some((worker, order)) = &report.crashed_during {
        let _ = writeln!(
            w,
            "Crash: worker {worker} was killed right after reserving the stock of {order}, before \
             recording it; another worker resumed {order} once the lease expired, with the same \
             idempotency key (no second deduction)."
        );
    }
    let a = &report.audit;
    let (charges, charged, refunded) = a.payment_totals();
    let confirmed: Vec<_> = a.orders.values().filter(|o| o.confirmed).collect();
    let confirmed_total: i64 = confirmed.iter().map(|o| o.total_cents).sum();
    let refunds = a.orders.values().filter(|o| o.refunded_cents > 0).count();
    let _ = writeln!(w, "\nLedgers (the services' own records):");
    let _ = writeln!(
        w,
        "  payment:   {charges} charges ({}), {refunds} refunds ({}); net {} = total of the {} confirmed orders ({})",
        dollars(charged),
        dollars(refunded),
        dollars(charged - refunded),
        confirmed.len(),
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
    let _ = writeln!(
        w,
        "  inventory: {} SKUs; net deducted {deducted} units, all for confirmed orders; stock conserved: {}",
        a.stock.len(),
        if a.violations.iter().any(|v| v.invariant() == "I2") {
            "NO"
        } else {
            "yes"
        }
    );
    let emails: usize = a.orders.values().map(|o| o.emails).sum();
    let _ = writeln!(
        w,
        "  email:     {emails} sent for {} confirmed orders",
        confirmed.len()
    );
    if report.dead_letters > 0 {
        let _ = writeln!(w, "  outbox:    {} dead letters", report.dead_letters);
    }
    if a.violations.is_empty() {
        let _ = writeln!(
            w,
            "\nInvariants: all hold (no double charge, no lost refund, stock conserved, one email per confirmed order)."
        );
    } else {
        let _ = writeln!(w, "\nInvariants: {} VIOLATIONS", a.violations.len());
        for v in &a.violations {
            let _ = writeln!(w, "  {v}");
        }
    }
    out
}
