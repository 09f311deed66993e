//! `checkout`: runs a batch of orders through the checkout saga and prints
//! what happened, from the services' own ledgers.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use checkout::demo::{self, Options};
use checkout::deploy::Database;
use checkout::services::Faults;
use clap::{Args, Parser, Subcommand};

/// The checkout saga, end to end: validate order, charge payment, reserve
/// inventory, confirm order (the pivot), send confirmation; over fake
/// payment, inventory and email services with their own ledgers.
///
/// With no DATABASE_URL, a throwaway PostgreSQL cluster is started from the
/// local binaries (initdb, pg_ctl) and removed on exit.
#[derive(Debug, Parser)]
#[command(name = "checkout", version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a batch of orders and print a summary (the default).
    Run(RunArgs),
    /// Print the checkout saga as a Mermaid flowchart.
    Diagram,
}

#[derive(Debug, Clone, Args)]
struct RunArgs {
    /// Orders to place.
    #[arg(long, default_value_t = 12)]
    orders: usize,
    /// Workers running sagas and dispatching the outbox (each with its own
    /// connection pool).
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Fraction of orders paid with a card that is declined (compensated).
    #[arg(long, default_value_t = 0.1)]
    decline_rate: f64,
    /// Fraction of orders with an item out of stock (the charge is refunded).
    #[arg(long, default_value_t = 0.1)]
    out_of_stock_rate: f64,
    /// Fraction of orders whose payment gateway is down (retried with
    /// backoff, then compensated when the budget is spent).
    #[arg(long, default_value_t = 0.1)]
    outage_rate: f64,
    /// Fraction of requests to every service that fail with a 503.
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
    /// Fraction of requests whose effect happens and whose reply is lost
    /// (the caller times out).
    #[arg(long, default_value_t = 0.0)]
    lost_reply_rate: f64,
    /// Latency added to every service call, in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Do not kill a worker mid-run.
    #[arg(long)]
    no_crash: bool,
    /// Seed of the order mix and the injected faults.
    #[arg(long, default_value_t = 2)]
    seed: u64,
    /// PostgreSQL URL (its schemas `checkout_<id>_*` are created there).
    /// Default: a throwaway local cluster.
    #[arg(long, env = "DATABASE_URL")]
    database_url: Option<String>,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 300)]
    deadline_secs: u64,
}

fn rate(name: &str, value: f64) -> Result<f64, String> {
    if (0.0..=1.0).contains(&value) {
        Ok(value)
    } else {
        Err(format!("--{name} must be between 0 and 1, got {value}"))
    }
}

impl RunArgs {
    fn options(&self) -> Result<Options, String> {
        let scenario_rates = rate("decline-rate", self.decline_rate)?
            + rate("out-of-stock-rate", self.out_of_stock_rate)?
            + rate("outage-rate", self.outage_rate)?;
        if scenario_rates > 1.0 {
            return Err("the decline, out-of-stock and outage rates add up to more than 1".into());
        }
        if rate("error-rate", self.error_rate)? + rate("lost-reply-rate", self.lost_reply_rate)?
            > 1.0
        {
            return Err("the error and lost-reply rates add up to more than 1".into());
        }
        if self.orders == 0 || self.workers == 0 {
            return Err("--orders and --workers must be at least 1".into());
        }
        Ok(Options {
            orders: self.orders,
            workers: self.workers,
            decline_rate: self.decline_rate,
            out_of_stock_rate: self.out_of_stock_rate,
            outage_rate: self.outage_rate,
            faults: Faults {
                outage: false,
                error_rate: self.error_rate,
                lose_reply_rate: self.lost_reply_rate,
                latency: Duration::from_millis(self.latency_ms),
            },
            crash: !self.no_crash,
            seed: self.seed,
            database: match &self.database_url {
                Some(url) => Database::Url(url.clone()),
                None => Database::Throwaway,
            },
            deadline: Duration::from_secs(self.deadline_secs),
        })
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let args = match cli.command {
        Some(Command::Diagram) => {
            print!("{}", checkout::saga::diagram());
            return ExitCode::SUCCESS;
        }
        Some(Command::Run(args)) => args,
        None => cli.run,
    };
    let options = match args.options() {
        Ok(options) => options,
        Err(message) => {
            eprintln!("checkout: {message}");
            return ExitCode::from(2);
        }
    };
    let total = options.orders;
    let where_ = match &options.database {
        Database::Url(_) => "the database at DATABASE_URL".to_owned(),
        Database::Throwaway => "a throwaway local PostgreSQL".to_owned(),
    };
    eprintln!(
        "checkout: {total} orders, {} workers, on {where_}",
        options.workers
    );
    let mut last_print = std::time::Instant::now();
    let report = demo::run(options, |p| {
        if last_print.elapsed() >= Duration::from_secs(1) {
            last_print = std::time::Instant::now();
            eprint!(
                "\r  {}/{} sagas finished, {} messages to deliver   ",
                p.finished, p.sagas, p.undelivered
            );
            let _ = std::io::stderr().flush();
        }
    })
    .await;
    eprintln!();
    match report {
        Ok(report) => {
            print!("{}", demo::render(&report));
            if report.audit.violations.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("checkout: {}", checkout::describe(&e));
            ExitCode::FAILURE
        }
    }
}
