//! `checkout`: runs a batch of orders through the checkout saga and prints
//! what happened, from the services' own ledgers.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use checkout::demo::{self, Options, Show, Verdict};
use checkout::deploy::Database;
use checkout::services::Faults;
use clap::{Args, Parser, Subcommand};

/// The checkout saga, end to end: validate order, charge payment, reserve
/// inventory, confirm order (the pivot), send confirmation; over fake
/// payment, inventory and email services with their own ledgers.
///
/// With no DATABASE_URL, a throwaway PostgreSQL cluster is started from the
/// local binaries (initdb, pg_ctl) and removed on exit. With one, the run's
/// schemas (checkout_<id>_*) are created there and dropped at the end
/// (--keep keeps them).
#[derive(Debug, Parser)]
#[command(
    name = "checkout",
    version,
    after_help = "Exit status: 0 when every saga completed or was compensated and every \
                  invariant holds; 1 when an invariant is broken or the run failed; 2 for bad \
                  arguments; 3 when the invariants hold but some sagas are stuck (parked for an \
                  operator) or unfinished (the deadline was reached); 130 when interrupted."
)]
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
    /// connection pool). The crash needs at least 2.
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
    /// Latency added to every service call, in milliseconds. At or above
    /// --http-timeout-ms every call times out.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Per-call timeout of the workers' HTTP calls to the services, in
    /// milliseconds (each step's attempt is also capped at 5 s).
    #[arg(long, default_value_t = 1000)]
    http_timeout_ms: u64,
    /// Do not kill a worker mid-run.
    #[arg(long)]
    no_crash: bool,
    /// Seed of the order mix and the injected faults.
    #[arg(long, default_value_t = 2)]
    seed: u64,
    /// PostgreSQL URL (its schemas `checkout_<id>_*` are created there).
    /// Default: a throwaway local cluster.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Keep the run's schemas in the database at --database-url /
    /// DATABASE_URL, to inspect them (they are dropped at the end
    /// otherwise).
    #[arg(long)]
    keep: bool,
    /// Stop after this many seconds: the sagas still running are reported
    /// as unfinished (exit status 3).
    #[arg(long, default_value_t = 300)]
    deadline_secs: u64,
    /// Orders listed in the summary: a number, or `all`.
    #[arg(long, default_value = "40", value_name = "N|all")]
    show: Show,
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
        if self.http_timeout_ms == 0 {
            return Err("--http-timeout-ms must be at least 1".into());
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
            http_timeout: Duration::from_millis(self.http_timeout_ms),
            keep: self.keep,
        })
    }
}

/// The live progress line, on a terminal only; cleared before the
/// summary, so that no stale count is left behind.
struct ProgressLine {
    on: bool,
    last: Option<std::time::Instant>,
}

impl ProgressLine {
    fn new() -> Self {
        ProgressLine {
            on: std::io::stderr().is_terminal(),
            last: None,
        }
    }

    fn show(&mut self, p: checkout::deploy::Progress) {
        if !self.on
            || self
                .last
                .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return;
        }
        self.last = Some(std::time::Instant::now());
        let messages = match p.undelivered {
            0 => "every message delivered".to_owned(),
            1 => "1 message to deliver".to_owned(),
            n => format!("{n} messages to deliver"),
        };
        eprint!(
            "\r\x1b[2K  {}/{} sagas finished, {messages}",
            p.finished, p.sagas
        );
        let _ = std::io::stderr().flush();
    }

    fn clear(&self) {
        if self.on && self.last.is_some() {
            eprint!("\r\x1b[2K");
            let _ = std::io::stderr().flush();
        }
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
    eprintln!("{}", demo::banner(&options));
    for warning in demo::warnings(&options) {
        eprintln!("checkout: warning: {warning}");
    }
    let mut line = ProgressLine::new();
    // Ctrl-C stops the run (the summary is printed and the schemas are
    // dropped); a second one exits at once.
    let (interrupted, interrupt) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            let _ = interrupted.send(());
            eprintln!("\ncheckout: stopping (Ctrl-C again to quit at once)");
            if tokio::signal::ctrl_c().await.is_ok() {
                std::process::exit(130);
            }
        }
    });
    let interrupt = async {
        if interrupt.await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let report = demo::run_until(options, |p| line.show(p), interrupt).await;
    line.clear();
    match report {
        Ok(report) => {
            print!("{}", demo::render(&report, args.show));
            if report.interrupted {
                eprintln!("checkout: interrupted");
                return ExitCode::from(130);
            }
            match report.verdict() {
                Verdict::AllGood => ExitCode::SUCCESS,
                Verdict::Violated => {
                    eprintln!("checkout: an invariant is broken (see above)");
                    ExitCode::FAILURE
                }
                Verdict::Unsettled => {
                    let stuck = report.stuck().count();
                    let unfinished = report.unfinished().count();
                    let mut why = Vec::new();
                    if stuck > 0 {
                        why.push(format!(
                            "{stuck} {} stuck, parked for an operator",
                            if stuck == 1 { "saga is" } else { "sagas are" }
                        ));
                    }
                    if unfinished > 0 {
                        why.push(format!(
                            "the deadline was reached with {unfinished} {} unfinished",
                            if unfinished == 1 { "saga" } else { "sagas" }
                        ));
                    } else if report.stopped_early {
                        why.push("the deadline was reached with messages undelivered".to_owned());
                    }
                    eprintln!(
                        "checkout: the invariants hold, but {} (exit status 3)",
                        why.join(", and ")
                    );
                    ExitCode::from(3)
                }
            }
        }
        Err(e) => {
            eprintln!("checkout: {}", checkout::describe(&e));
            ExitCode::FAILURE
        }
    }
}
