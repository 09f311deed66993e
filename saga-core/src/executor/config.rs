//! How an executor is configured: [`ExecutorConfig`] and the
//! [`ExecutorBuilder`] that checks it.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::Notify;

use super::registry::Registry;
use super::report::Counters;
use super::{Executor, Shared};
use crate::definition::SagaDefinition;
use crate::error::BuildError;
use crate::ids::{SagaKind, WorkerId};
use crate::retry::{Jitter, RetryPolicy};
use crate::store::SagaStore;

/// How an executor runs.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ExecutorConfig {
    /// Steps run at once, at most (default 16).
    pub concurrency: usize,
    /// How long a claim's lease lasts unless extended (default 60 s). A
    /// crashed worker's instances are taken up by others after this long.
    pub lease_duration: Duration,
    /// How often a running step's lease is extended (default 20 s); keep it
    /// well under `lease_duration`.
    pub heartbeat_interval: Duration,
    /// How often an idle executor polls for due work (default 1 s).
    pub poll_interval: Duration,
    /// How long `run` lets in-flight steps finish after shutdown is asked
    /// for (default 30 s). Steps still running then are abandoned; their
    /// leases expire and other workers resume them.
    pub shutdown_grace: Duration,
    /// How often [`Executor::run`] looks for due instances of saga kinds
    /// not registered here, to log them and set the
    /// [`saga_unregistered_due`](crate::metrics::UNREGISTERED_DUE) gauge
    /// (default 60 s). The check runs on its own timer, however busy the
    /// executor is.
    pub unregistered_check_interval: Duration,
}

impl Default for ExecutorConfig {
    fn default() -> Self {
        ExecutorConfig {
            concurrency: 16,
            lease_duration: Duration::from_secs(60),
            heartbeat_interval: Duration::from_secs(20),
            poll_interval: Duration::from_secs(1),
            shutdown_grace: Duration::from_secs(30),
            unregistered_check_interval: Duration::from_secs(60),
        }
    }
}

/// Builds an [`Executor`].
#[must_use = "call .build() to get the executor"]
pub struct ExecutorBuilder<St> {
    pub(super) store: Arc<St>,
    pub(super) registry: Registry,
    pub(super) duplicate: Option<SagaKind>,
    pub(super) config: ExecutorConfig,
    pub(super) worker: WorkerId,
    pub(super) seed: Option<u64>,
}

impl<St: SagaStore> ExecutorBuilder<St> {
    /// Registers a saga definition whose actions need no dependencies.
    /// Instances of saga kinds (name and version) not registered here are
    /// never touched by this executor. A definition whose actions need
    /// dependencies is registered with [`register_with`](Self::register_with).
    pub fn register<S>(self, saga: SagaDefinition<S>) -> Self
    where
        S: Serialize + DeserializeOwned + Send + 'static,
    {
        self.register_with(saga, ())
    }

    /// Registers a saga definition with the dependencies its actions are
    /// handed on every attempt (clients, pools; see
    /// [`Action`](crate::Action)). Instances of saga kinds (name and
    /// version) not registered here are never touched by this executor.
    pub fn register_with<S, D>(mut self, saga: SagaDefinition<S, D>, deps: D) -> Self
    where
        S: Serialize + DeserializeOwned + Send + 'static,
        D: Send + Sync + 'static,
    {
        if let Err(kind) = self.registry.insert(saga, deps) {
            self.duplicate.get_or_insert(kind);
        }
        self
    }

    /// Replaces the whole configuration.
    pub fn config(mut self, config: ExecutorConfig) -> Self {
        self.config = config;
        self
    }

    /// Steps run at once, at most.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.config.concurrency = n;
        self
    }

    /// Lease length.
    pub fn lease_duration(mut self, d: Duration) -> Self {
        self.config.lease_duration = d;
        self
    }

    /// Heartbeat interval for running steps.
    pub fn heartbeat_interval(mut self, d: Duration) -> Self {
        self.config.heartbeat_interval = d;
        self
    }

    /// Idle poll interval.
    pub fn poll_interval(mut self, d: Duration) -> Self {
        self.config.poll_interval = d;
        self
    }

    /// How often [`run`](Executor::run) looks for due instances of saga
    /// kinds not registered here.
    pub fn unregistered_check_interval(mut self, d: Duration) -> Self {
        self.config.unregistered_check_interval = d;
        self
    }

    /// Grace period for in-flight steps on shutdown.
    pub fn shutdown_grace(mut self, d: Duration) -> Self {
        self.config.shutdown_grace = d;
        self
    }

    /// This worker's id (default: a fresh one).
    pub fn worker_id(mut self, id: WorkerId) -> Self {
        self.worker = id;
        self
    }

    /// Seeds the jitter's random source, for reproducible tests.
    pub fn rng_seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Checks the configuration and builds the executor. Fails with
    /// [`BuildError::NoSagasRegistered`] if no saga was registered, and
    /// with [`BuildError::DuplicateRegistration`] if one name and version
    /// was registered twice.
    pub fn build(self) -> Result<Executor<St>, BuildError> {
        if let Some(kind) = self.duplicate {
            return Err(BuildError::DuplicateRegistration(kind));
        }
        if self.registry.kinds.is_empty() {
            return Err(BuildError::NoSagasRegistered);
        }
        let c = &self.config;
        let bad = |what: &'static str| Err(BuildError::InvalidConfig(what));
        if c.concurrency == 0 {
            return bad("concurrency must be at least 1");
        }
        if c.lease_duration.is_zero() || c.heartbeat_interval.is_zero() {
            return bad("lease_duration and heartbeat_interval must be above zero");
        }
        if c.heartbeat_interval >= c.lease_duration {
            return bad("heartbeat_interval must be shorter than lease_duration");
        }
        if c.poll_interval.is_zero() {
            return bad("poll_interval must be above zero");
        }
        if c.unregistered_check_interval.is_zero() {
            return bad("unregistered_check_interval must be above zero");
        }
        let claim_backoff = RetryPolicy::builder()
            .initial_delay(c.poll_interval)
            .multiplier(2.0)
            .max_delay(c.poll_interval.max(Duration::from_secs(30)))
            .max_attempts(u32::MAX)
            .no_max_elapsed()
            .jitter(Jitter::Equal)
            .build()?;
        let rng = match self.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Ok(Executor {
            shared: Arc::new(Shared {
                store: self.store,
                registry: self.registry,
                config: self.config,
                worker: self.worker,
                rng: Mutex::new(rng),
                wake: Arc::new(Notify::new()),
                counters: Counters::default(),
                claim_backoff,
                unregistered: Mutex::new(HashSet::new()),
                unmatched: Mutex::new(HashSet::new()),
                checked: tokio::sync::OnceCell::new(),
            }),
        })
    }
}
