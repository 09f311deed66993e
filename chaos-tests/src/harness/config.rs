//! How to run, and the switches that break the system on purpose.

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use crate::schedule::FaultKind;

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
    /// Refuse every order in `validate_order`: every saga compensates.
    RefuseEveryOrder,
    /// Ignore what the payment and inventory services answer: every order
    /// completes, declined, out-of-stock and gateway-down ones included.
    CompleteEveryOrder,
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
