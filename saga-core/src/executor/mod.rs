//! The executor: claims due instances, runs one step each with no store
//! transaction open, and records the outcome in one write guarded by the
//! lease.

mod check;
mod config;
mod decide;
mod operator;
mod process;
mod registry;
mod report;
mod run;

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, Mutex};

use rand::rngs::StdRng;
use tokio::sync::Notify;

pub use config::{ExecutorBuilder, ExecutorConfig};
pub use registry::{AttemptTimedOut, StepPanicked};
pub use report::{ExecutorStats, RunReport};

use crate::client::SagaClient;
use crate::fingerprint::ShapeFingerprint;
use crate::ids::{SagaKind, WorkerId};
use crate::retry::RetryPolicy;
use crate::store::SagaStore;
use registry::Registry;
use report::Counters;

struct Shared<St> {
    store: Arc<St>,
    registry: Registry,
    config: ExecutorConfig,
    worker: WorkerId,
    rng: Mutex<StdRng>,
    wake: Arc<Notify>,
    counters: Counters,
    /// The delays between claims that fail in a row: from the poll
    /// interval, doubling, to at least 30 s.
    claim_backoff: RetryPolicy,
    /// The unregistered kinds the last check found due, whose gauges are
    /// zeroed once they are no longer found.
    unregistered: Mutex<HashSet<SagaKind>>,
    /// Likewise for due instances of registered kinds started under
    /// another fingerprint.
    unmatched: Mutex<HashSet<(SagaKind, ShapeFingerprint)>>,
    /// Set once every definition was registered with the store and
    /// matched the stored shape ([`Executor::check`]).
    checked: tokio::sync::OnceCell<()>,
}

/// Claims and runs due saga instances.
///
/// ```text
///   claim (short write: lease + attempt)      record (short write, fenced)
///        │                                         ▲
///        ▼                                         │
///   run the step ── timeout, heartbeat ──► outcome ─► retry policy ─► status machine
/// ```
///
/// Retries are never slept on: the next attempt time is persisted and the
/// instance is claimed again when it is due, by whichever worker is free.
///
/// Cheap to clone; clones share configuration and registry.
pub struct Executor<St> {
    shared: Arc<Shared<St>>,
}

impl<St> Clone for Executor<St> {
    fn clone(&self) -> Self {
        Executor {
            shared: self.shared.clone(),
        }
    }
}

impl<St> fmt::Debug for Executor<St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Executor")
            .field("worker", &self.shared.worker)
            .field("sagas", &self.shared.registry)
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl<St: SagaStore> Executor<St> {
    /// A builder on `store` with the default configuration.
    pub fn builder(store: St) -> ExecutorBuilder<St> {
        Executor::builder_from_arc(Arc::new(store))
    }

    /// A builder on a shared store.
    pub fn builder_from_arc(store: Arc<St>) -> ExecutorBuilder<St> {
        ExecutorBuilder {
            store,
            registry: Registry::default(),
            duplicate: None,
            config: ExecutorConfig::default(),
            worker: WorkerId::new(),
            seed: None,
        }
    }

    /// This worker's id, as written into leases.
    #[must_use]
    pub fn worker_id(&self) -> WorkerId {
        self.shared.worker
    }

    /// The saga kinds registered here.
    #[must_use]
    pub fn registered(&self) -> &[SagaKind] {
        &self.shared.registry.kinds
    }

    /// A client on the same store that wakes this executor when it starts
    /// an instance.
    #[must_use]
    pub fn client(&self) -> SagaClient<St> {
        SagaClient::from_arc(self.shared.store.clone()).with_wake(self.shared.wake.clone())
    }
}
