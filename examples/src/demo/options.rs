//! What a run is asked to do, and what is said about it before it starts.

use std::str::FromStr;
use std::time::Duration;

use crate::deploy::{Database, WorkerSettings};
use crate::services::Faults;

use super::render::count_usize;

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
pub(super) fn notes(options: &Options) -> Vec<String> {
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
