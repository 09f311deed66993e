//! `chaos`: the chaos harness (`chaos run`), and the worker processes it
//! starts (`chaos worker`).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use chaos_tests::schedule::FaultKind;
use chaos_tests::worker::{self, SPEC_ENV, WorkerSpec};
use chaos_tests::{Config, NegativeControl, report};
use clap::{Args, Parser, Subcommand};

/// Seeded fault injection against the checkout saga, checking the checkout
/// invariants from the services' ledgers and the database.
#[derive(Debug, Parser)]
#[command(name = "chaos", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the harness and print the report.
    Run(RunArgs),
    /// Print the fault schedule a run would follow (one JSON event per
    /// line), then the number of events per kind.
    Schedule(RunArgs),
    /// A worker process (started by `run`; reads its spec from the
    /// environment).
    #[command(hide = true)]
    Worker,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Seed of the fault schedule, the orders and the services' dice.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Orders placed during the fault phase.
    #[arg(long, default_value_t = 300)]
    orders: usize,
    /// Worker processes.
    #[arg(long, default_value_t = 3)]
    workers: usize,
    /// Seconds of fault injection.
    #[arg(long, default_value_t = 40)]
    seconds: u64,
    /// Faults started per second, on average (every kind at least once).
    #[arg(long, default_value_t = 2.0)]
    rate: f64,
    /// Break the system on purpose, to see the checker notice.
    #[arg(long, value_enum)]
    negative: Option<NegativeControl>,
    /// The kinds of fault to inject, comma-separated (each at least once);
    /// all of them by default.
    #[arg(long, value_enum, value_delimiter = ',')]
    kinds: Vec<FaultKind>,
    /// Seconds after the last fault within which every saga must finish.
    #[arg(long, default_value_t = 120)]
    quiesce_bound: u64,
    /// Print the report as JSON on stdout (progress still goes to stderr).
    #[arg(long)]
    json: bool,
}

impl RunArgs {
    fn kinds(&self) -> Vec<FaultKind> {
        if self.kinds.is_empty() {
            FaultKind::ALL.to_vec()
        } else {
            self.kinds.clone()
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    match cli.command {
        Command::Worker => {
            worker::init_tracing();
            let spec: WorkerSpec = match std::env::var(SPEC_ENV)
                .map_err(|e| e.to_string())
                .and_then(|s| serde_json::from_str(&s).map_err(|e| e.to_string()))
            {
                Ok(spec) => spec,
                Err(e) => {
                    eprintln!("chaos worker: no valid {SPEC_ENV}: {e}");
                    return ExitCode::from(2);
                }
            };
            match runtime.block_on(worker::main(spec)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("chaos worker: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Schedule(args) => {
            let events = chaos_tests::schedule::schedule(&chaos_tests::schedule::Plan {
                seed: args.seed,
                duration: Duration::from_secs(args.seconds),
                workers: args.workers.max(1),
                kinds: args.kinds(),
                rate: args.rate,
            });
            let mut per_kind = std::collections::BTreeMap::new();
            let mut out = std::io::stdout().lock();
            for event in &events {
                *per_kind.entry(event.fault.kind().name()).or_insert(0u64) += 1;
                let line = serde_json::to_string(event).expect("a serializable event");
                if writeln!(out, "{line}").is_err() {
                    return ExitCode::SUCCESS; // The reader went away (| head).
                }
            }
            let counts = serde_json::to_string(&per_kind).expect("serializable counts");
            let _ = writeln!(out, "{counts}");
            ExitCode::SUCCESS
        }
        Command::Run(args) => {
            let exe: PathBuf = std::env::current_exe().expect("the path of this executable");
            let config = Config {
                seed: args.seed,
                orders: args.orders,
                workers: args.workers.max(1),
                duration: Duration::from_secs(args.seconds),
                rate: args.rate,
                kinds: args.kinds(),
                negative: args.negative,
                quiesce_bound: Duration::from_secs(args.quiesce_bound),
                worker_exe: exe,
                progress: true,
            };
            // The seed goes to stderr first, whatever happens next.
            eprintln!(
                "chaos: seed {} (rerun with --seed {})",
                config.seed, config.seed
            );
            let seed = config.seed;
            match runtime.block_on(chaos_tests::run(config)) {
                Ok(report) => {
                    if args.json {
                        println!(
                            "{}",
                            serde_json::to_string_pretty(&report).expect("a serializable report")
                        );
                    } else {
                        print!("{}", report::table(&report));
                    }
                    if report.passed() {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    }
                }
                Err(e) => {
                    eprintln!(
                        "chaos: the harness failed (seed {seed}): {}",
                        checkout::describe(&e)
                    );
                    ExitCode::FAILURE
                }
            }
        }
    }
}
