//! The executor: claims due instances, runs one step each with no store
//! transaction open, and records the outcome in one write guarded by the
//! lease.

use std::collections::HashMap;
use std::collections::HashSet;
use std::fmt;
use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use backon::BackoffBuilder;
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;
use tracing::Instrument;

use crate::action::BoxFuture;
use crate::client::{Limits, SagaClient};
use crate::context::StepContext;
use crate::definition::SagaDefinition;
use crate::error::{Chain, Error, StepError, StepErrorKind};
use crate::ids::{Direction, SagaId, SagaKind, StepName, TransitionId, WorkerId};
use crate::machine::{self, Attempts, Command, Event, Position, Status, StepKind, TransitionKind};
use crate::metrics as m;
use crate::outbox::OutboxMessage;
use crate::retry::{GiveUpReason, RetryDecision, RetryPolicy};
use crate::store::{
    ClaimRequest, ClaimedSaga, HistoryEntry, Lease, Outcome, Record, SagaSnapshot, SagaStore,
};
use crate::time::Timestamp;

/// How an executor runs.
#[derive(Debug, Clone)]
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
    /// Size caps on state and payloads.
    pub limits: Limits,
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
            limits: Limits::default(),
        }
    }
}

/// What one attempt produced: on success the new state and the messages
/// the step emitted.
struct AttemptResult {
    outcome: Result<(serde_json::Value, Vec<OutboxMessage>), StepError>,
}

/// A registered definition with its state type erased.
trait ErasedSaga: Send + Sync + 'static {
    fn plan(&self) -> &[StepKind];
    fn step_index(&self, name: &str) -> Option<usize>;
    fn step_name(&self, index: usize) -> &StepName;
    /// The name the step's keys and message ids derive from.
    fn key_name(&self, index: usize) -> &StepName;
    fn policy(&self, index: usize, direction: Direction) -> Option<(&RetryPolicy, Duration)>;
    /// Deserializes the state and returns the attempt, ready to run; or why
    /// it cannot run ([`Error::UnknownStep`], [`Error::DeserializeState`]).
    fn attempt(
        &self,
        index: usize,
        direction: Direction,
        ctx: StepContext,
        state: serde_json::Value,
        limits: Limits,
    ) -> Result<BoxFuture<'static, AttemptResult>, Error>;
}

/// A definition bound to the dependencies its actions are handed.
struct Registered<S, D> {
    saga: SagaDefinition<S, D>,
    deps: Arc<D>,
}

impl<S, D> ErasedSaga for Registered<S, D>
where
    S: Serialize + DeserializeOwned + Send + 'static,
    D: Send + Sync + 'static,
{
    fn plan(&self) -> &[StepKind] {
        self.saga.plan()
    }

    fn step_index(&self, name: &str) -> Option<usize> {
        self.saga.step_index(name)
    }

    fn step_name(&self, index: usize) -> &StepName {
        self.saga
            .step_name(index)
            .expect("index from the definition")
    }

    fn key_name(&self, index: usize) -> &StepName {
        &self
            .saga
            .step_def(index)
            .expect("index from the definition")
            .key_name
    }

    fn policy(&self, index: usize, direction: Direction) -> Option<(&RetryPolicy, Duration)> {
        let (_, policy, timeout) = self.saga.step_def(index)?.side(direction)?;
        Some((policy, timeout))
    }

    fn attempt(
        &self,
        index: usize,
        direction: Direction,
        mut ctx: StepContext,
        state: serde_json::Value,
        limits: Limits,
    ) -> Result<BoxFuture<'static, AttemptResult>, Error> {
        let Some((action, _, timeout)) = self.saga.step_def(index).and_then(|d| d.side(direction))
        else {
            return Err(Error::UnknownStep {
                id: ctx.saga_id(),
                saga: self.saga.kind().clone(),
                step: ctx.step().clone(),
                direction,
            });
        };
        let mut state: S =
            serde_json::from_value(state).map_err(|source| Error::DeserializeState {
                saga: self.saga.kind().clone(),
                source,
            })?;
        let action = action.clone();
        let deps = self.deps.clone();
        Ok(Box::pin(async move {
            // The step runs in its own task: a panic is caught as a failure.
            // The task is aborted when the attempt ends without it: on a
            // timeout, and when the attempt is dropped (its lease was lost,
            // or the executor abandoned it at shutdown).
            let mut task = tokio::spawn(async move {
                let result = action.call(&deps, &mut ctx, &mut state).await;
                (ctx, state, result)
            });
            let _abort_on_drop = AbortOnDrop(task.abort_handle());
            let joined = match tokio::time::timeout(timeout, &mut task).await {
                Ok(joined) => joined,
                Err(_) => {
                    return AttemptResult {
                        outcome: Err(StepError::timeout(AttemptTimedOut(timeout))),
                    };
                }
            };
            let outcome = match joined {
                Ok((mut ctx, state, Ok(()))) => serde_json::to_value(&state)
                    .map_err(StepError::permanent)
                    .and_then(|v| check_size(v, limits.max_state_bytes))
                    .map(|v| (v, ctx.take_emitted())),
                Ok((_, _, Err(e))) => Err(e),
                Err(join) => Err(StepError::retryable(StepPanicked(panic_message(join)))),
            };
            AttemptResult { outcome }
        }))
    }
}

/// Aborts a task when dropped (a no-op once the task has finished).
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn check_size(v: serde_json::Value, limit: usize) -> Result<serde_json::Value, StepError> {
    let size = serde_json::to_vec(&v).map_or(0, |b| b.len());
    if size > limit {
        return Err(StepError::permanent(Error::TooLarge {
            what: "saga state",
            size,
            limit,
        }));
    }
    Ok(v)
}

fn panic_message(join: tokio::task::JoinError) -> String {
    match join.try_into_panic() {
        Ok(payload) => payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "non-string panic payload".to_owned()),
        Err(e) => e.to_string(),
    }
}

/// A step attempt ran past its timeout.
#[derive(Debug, thiserror::Error)]
#[error("the attempt did not finish within {0:?}")]
pub struct AttemptTimedOut(pub Duration);

/// A step panicked.
#[derive(Debug, thiserror::Error)]
#[error("the step panicked: {0}")]
pub struct StepPanicked(pub String);

/// The saga definitions an executor runs, by name and version.
#[derive(Default, Clone)]
struct Registry {
    sagas: HashMap<SagaKind, Arc<dyn ErasedSaga>>,
    kinds: Vec<SagaKind>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(&self.kinds).finish()
    }
}

/// Builds an [`Executor`].
#[must_use = "call .build() to get the executor"]
pub struct ExecutorBuilder<St> {
    store: Arc<St>,
    registry: Registry,
    duplicate: Option<SagaKind>,
    config: ExecutorConfig,
    worker: WorkerId,
    seed: Option<u64>,
}

impl<St: SagaStore> ExecutorBuilder<St> {
    /// Registers a saga definition whose actions need no dependencies.
    /// Instances of saga kinds (name and version) not registered here are
    /// never touched by this executor. A definition that needs
    /// dependencies is registered with [`register_with`](Self::register_with).
    pub fn register<S>(self, saga: SagaDefinition<S>) -> Self
    where
        S: Serialize + DeserializeOwned + Send + 'static,
    {
        self.register_with(saga, ())
    }

    /// Registers a saga definition with the dependencies its actions are
    /// handed on every attempt (clients, pools: see
    /// [`Action`](crate::Action)). Instances of saga kinds (name and
    /// version) not registered here are never touched by this executor.
    pub fn register_with<S, D>(mut self, saga: SagaDefinition<S, D>, deps: D) -> Self
    where
        S: Serialize + DeserializeOwned + Send + 'static,
        D: Send + Sync + 'static,
    {
        let kind = saga.kind().clone();
        if self.registry.sagas.contains_key(&kind) {
            self.duplicate.get_or_insert(kind);
            return self;
        }
        self.registry.kinds.push(kind.clone());
        self.registry.sagas.insert(
            kind,
            Arc::new(Registered {
                saga,
                deps: Arc::new(deps),
            }),
        );
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

    /// Size caps.
    pub fn limits(mut self, limits: Limits) -> Self {
        self.config.limits = limits;
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

    /// Checks the configuration and builds the executor.
    pub fn build(self) -> Result<Executor<St>, Error> {
        if let Some(kind) = self.duplicate {
            return Err(Error::DuplicateRegistration(kind));
        }
        let c = &self.config;
        let bad = |what: &'static str| Err(Error::InvalidConfig(what));
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
                unregistered: Mutex::new(HashSet::new()),
            }),
        })
    }
}

struct Shared<St> {
    store: Arc<St>,
    registry: Registry,
    config: ExecutorConfig,
    worker: WorkerId,
    rng: Mutex<StdRng>,
    wake: Arc<Notify>,
    counters: Counters,
    /// The unregistered kinds the last check found due, whose gauges are
    /// zeroed once they are no longer found.
    unregistered: Mutex<HashSet<SagaKind>>,
}

#[derive(Debug, Default)]
struct Counters {
    claimed: AtomicU64,
    recorded: AtomicU64,
    leases_lost: AtomicU64,
    store_errors: AtomicU64,
}

impl Counters {
    /// Counts a failed store operation, in the stats and the metric.
    fn store_failed(&self, operation: &'static str) {
        self.store_errors.fetch_add(1, Ordering::Relaxed);
        store_error(operation);
    }
}

/// What an executor has done since it was built (all its clones together).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExecutorStats {
    /// Instances claimed.
    pub claimed: u64,
    /// Transitions recorded.
    pub recorded: u64,
    /// Results refused because the lease had been lost (fenced writes).
    pub leases_lost: u64,
    /// Store operations that failed.
    pub store_errors: u64,
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

/// What a call to [`Executor::run_until_idle`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunReport {
    /// Instances claimed.
    pub claimed: usize,
    /// Transitions recorded, in the order they were recorded.
    pub transitions: Vec<(SagaId, TransitionKind)>,
    /// Results refused because the lease had been lost.
    pub leases_lost: usize,
    /// Claims given back (saga kind no longer registered).
    pub released: usize,
    /// Store operations that failed.
    pub store_errors: usize,
    /// Due instances of saga kinds not registered here.
    pub unregistered: Vec<(SagaKind, u64)>,
}

/// How processing one claimed instance ended.
#[derive(Debug)]
enum Processed {
    Recorded(SagaId, TransitionKind),
    LeaseLost,
    Released,
    StoreError,
}

impl RunReport {
    fn add(&mut self, p: Processed) {
        match p {
            Processed::Recorded(id, kind) => self.transitions.push((id, kind)),
            Processed::LeaseLost => self.leases_lost += 1,
            Processed::Released => self.released += 1,
            Processed::StoreError => self.store_errors += 1,
        }
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

    /// What this executor has done so far.
    #[must_use]
    pub fn stats(&self) -> ExecutorStats {
        let c = &self.shared.counters;
        ExecutorStats {
            claimed: c.claimed.load(Ordering::Relaxed),
            recorded: c.recorded.load(Ordering::Relaxed),
            leases_lost: c.leases_lost.load(Ordering::Relaxed),
            store_errors: c.store_errors.load(Ordering::Relaxed),
        }
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
        SagaClient::from_arc(self.shared.store.clone())
            .with_limits(self.shared.config.limits)
            .with_wake(self.shared.wake.clone())
    }

    /// Claims and runs due instances until none is due at the store clock's
    /// current time, then reports what happened. Retries scheduled in the
    /// future are left for a later call: with a
    /// [`ManualClock`](crate::ManualClock), advance the clock and call again.
    pub async fn run_until_idle(&self) -> Result<RunReport, Error> {
        let mut report = RunReport::default();
        loop {
            let batch = self.claim(self.shared.config.concurrency).await?;
            if batch.is_empty() {
                break;
            }
            report.claimed += batch.len();
            let mut tasks = JoinSet::new();
            for claimed in batch {
                tasks.spawn(process(self.shared.clone(), claimed));
            }
            while let Some(done) = tasks.join_next().await {
                report.add(done.expect("processing never panics"));
            }
        }
        report.unregistered = self.check_unregistered().await?;
        Ok(report)
    }

    /// Runs until `shutdown` completes: claims due instances whenever a
    /// slot is free, waking on starts from this executor's
    /// [`client`](Executor::client), on finished steps and on the poll
    /// interval. On shutdown it stops claiming and lets in-flight steps
    /// finish within [`ExecutorConfig::shutdown_grace`]; steps still
    /// running then are abandoned, and their leases expire so another
    /// worker resumes them.
    ///
    /// Store errors are logged, counted and retried with backoff; they do
    /// not end the loop.
    pub async fn run(&self, shutdown: impl Future<Output = ()> + Send) -> Result<(), Error> {
        let cfg = &self.shared.config;
        let mut shutdown = pin!(shutdown);
        let mut tasks: JoinSet<Processed> = JoinSet::new();
        // Its own timer, so that a busy executor reports unregistered kinds
        // too. The first tick is at once.
        let mut unregistered_check = tokio::time::interval(cfg.unregistered_check_interval);
        unregistered_check.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let backoff_builder = backon::ExponentialBuilder::default()
            .with_min_delay(cfg.poll_interval)
            .with_max_delay(cfg.poll_interval.max(Duration::from_secs(30)))
            .with_jitter()
            .without_max_times();
        let mut backoff = backoff_builder.build();
        tracing::info!(worker = %self.shared.worker, sagas = ?self.shared.registry, "executor started");
        loop {
            while let Some(done) = tasks.try_join_next() {
                log_processed(done);
            }
            // Whatever woke the loop (a start, a finished step, the poll
            // timer), nothing is claimed once shutdown has been asked for.
            if is_done(shutdown.as_mut()).await {
                break;
            }
            let free = cfg.concurrency.saturating_sub(tasks.len());
            let mut wait = cfg.poll_interval;
            if free > 0 {
                match self.claim(free).await {
                    Ok(batch) => {
                        backoff = backoff_builder.build();
                        for claimed in batch {
                            tasks.spawn(process(self.shared.clone(), claimed));
                        }
                    }
                    Err(e) => {
                        wait = backoff.next().unwrap_or(cfg.poll_interval);
                        tracing::warn!(error = %Chain(&e), retry_in = ?wait, "claiming due sagas failed");
                    }
                }
            }
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                _ = unregistered_check.tick() => {
                    if let Err(e) = self.check_unregistered().await {
                        tracing::warn!(error = %Chain(&e), "checking for unregistered sagas failed");
                    }
                }
                Some(done) = tasks.join_next(), if !tasks.is_empty() => log_processed(done),
                () = self.shared.wake.notified() => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
        let in_flight = tasks.len();
        tracing::info!(in_flight, grace = ?cfg.shutdown_grace, "executor stopping");
        let drained = tokio::time::timeout(cfg.shutdown_grace, async {
            while let Some(done) = tasks.join_next().await {
                log_processed(done);
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                abandoned = tasks.len(),
                "steps still running after the shutdown grace period were abandoned; their leases will expire"
            );
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
        tracing::info!("executor stopped");
        Ok(())
    }

    /// Resumes a stuck instance where it stopped, with a fresh retry budget
    /// for that step. Fails with [`Error::InvalidStatus`] unless it is
    /// stuck, and with [`Error::UnknownStep`] if it is stuck at a step the
    /// registered definition does not have (deploy a definition of that
    /// version that has it, as a step or an alias, first).
    pub async fn resume(&self, id: SagaId) -> Result<(), Error> {
        self.operator(id, "resume", Outcome::Resumed, |_| Event::Resume)
            .await
    }

    /// Cancels an instance whose pivot has not succeeded: what was started
    /// is compensated, in reverse order. Works on a running instance, and
    /// on one stuck at (or before) its pivot: for a pivot parked in doubt,
    /// cancelling is the operator's statement that it did not take effect.
    /// Fails with [`Error::InvalidStatus`] past the pivot or once finished
    /// (its source says why), with [`Error::UnknownStep`] if the instance is
    /// at a step the registered definition does not have, and with
    /// [`Error::Conflict`] while a worker holds the instance (try again).
    ///
    /// The current step counts as started, and is compensated too, once an
    /// attempt of it was claimed, including one that snoozed.
    pub async fn cancel(&self, id: SagaId, reason: impl Into<String>) -> Result<(), Error> {
        let reason = reason.into();
        // Read before the instance: the history only grows, and anything a
        // worker records after this read moves the instance's version,
        // which guards the write.
        let history = self.shared.store.history(id).await?;
        self.operator(id, "cancel", Outcome::Cancelled, |snapshot| {
            // Claimed attempts count; so does one that snoozed (the snooze
            // gave its attempt back but kept the time the step first
            // started), and so does any attempt the history shows before a
            // resume reset the budget. Compensating a step that never ran
            // is harmless (compensations tolerate "nothing to undo"); not
            // compensating one that did is not.
            let ran_before_a_resume = history.iter().any(|h| {
                h.step == snapshot.step
                    && h.direction == Direction::Forward
                    && !matches!(
                        h.outcome,
                        Outcome::Created | Outcome::Resumed | Outcome::Cancelled
                    )
            });
            Event::Cancel {
                reason,
                current_step_started: snapshot.attempt > 0
                    || snapshot.first_attempt_at.is_some()
                    || ran_before_a_resume,
            }
        })
        .await
    }

    /// Applies an operator's event, computed from the instance as loaded,
    /// guarded by the loaded version.
    async fn operator(
        &self,
        id: SagaId,
        action: &'static str,
        outcome: Outcome,
        event: impl FnOnce(&SagaSnapshot) -> Event,
    ) -> Result<(), Error> {
        let store = &self.shared.store;
        let snapshot = store.load(id).await?.ok_or(Error::NotFound(id))?;
        let saga = self
            .shared
            .registry
            .sagas
            .get(&snapshot.kind)
            .ok_or_else(|| Error::UnknownSaga(snapshot.kind.clone()))?;
        let index = saga
            .step_index(snapshot.step.as_str())
            .ok_or_else(|| Error::UnknownStep {
                id,
                saga: snapshot.kind.clone(),
                step: snapshot.step.clone(),
                direction: snapshot.direction,
            })?;
        let position = Position {
            step: index,
            direction: snapshot.direction,
        };
        let event = event(&snapshot);
        let t = machine::transition(saga.plan(), snapshot.status, position, &event).map_err(
            |source| Error::InvalidStatus {
                id,
                action,
                status: snapshot.status,
                source,
            },
        )?;
        let now = store.clock().now();
        let reason = match &event {
            Event::Cancel { reason, .. } => Some(reason.clone()),
            _ => None,
        };
        let record = build_record(
            saga.as_ref(),
            &t,
            now,
            snapshot.attempt,
            snapshot.first_attempt_at,
            None,
            Vec::new(),
            HistoryEntry {
                transition_id: TransitionId::new(),
                step: snapshot.step.clone(),
                direction: snapshot.direction,
                attempt: snapshot.attempt,
                outcome,
                error: reason,
                from_status: Some(snapshot.status),
                to_status: t.status,
                started_at: now,
                finished_at: now,
            },
        );
        store.record_unleased(id, snapshot.version, record).await?;
        count_status(&snapshot.kind, t.status);
        tracing::info!(saga_id = %id, action, status = %t.status, "operator action recorded");
        self.shared.wake.notify_one();
        Ok(())
    }

    async fn claim(&self, limit: usize) -> Result<Vec<ClaimedSaga>, Error> {
        let cfg = &self.shared.config;
        let counters = &self.shared.counters;
        let claimed = self
            .shared
            .store
            .claim(ClaimRequest {
                worker: self.shared.worker,
                kinds: &self.shared.registry.kinds,
                limit,
                lease_for: cfg.lease_duration,
            })
            .await
            .inspect_err(|_| counters.store_failed("claim"))?;
        counters
            .claimed
            .fetch_add(claimed.len() as u64, Ordering::Relaxed);
        Ok(claimed)
    }

    /// Logs and counts due instances of kinds not registered here; the
    /// gauge of a kind found last time and not now goes back to zero.
    async fn check_unregistered(&self) -> Result<Vec<(SagaKind, u64)>, Error> {
        let found = self
            .shared
            .store
            .due_unregistered(&self.shared.registry.kinds)
            .await
            .inspect_err(|_| self.shared.counters.store_failed("due_unregistered"))?;
        let gauge = |kind: &SagaKind| {
            metrics::gauge!(m::UNREGISTERED_DUE,
                "saga" => kind.name.to_string(), "version" => kind.version.to_string())
        };
        for (kind, count) in &found {
            tracing::warn!(
                saga = %kind.name,
                version = kind.version,
                due = count,
                "due saga instances of a kind not registered on this worker are left untouched"
            );
            gauge(kind).set(*count as f64);
        }
        let found_now: HashSet<SagaKind> = found.iter().map(|(kind, _)| kind.clone()).collect();
        let gone: Vec<SagaKind> = {
            let mut reported = self
                .shared
                .unregistered
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let gone = reported.difference(&found_now).cloned().collect();
            *reported = found_now;
            gone
        };
        for kind in &gone {
            gauge(kind).set(0.0);
        }
        Ok(found)
    }
}

/// Whether `shutdown` has completed, without waiting for it. Once it has,
/// the caller must not poll it again.
async fn is_done<F: Future<Output = ()>>(mut shutdown: Pin<&mut F>) -> bool {
    std::future::poll_fn(|cx| Poll::Ready(shutdown.as_mut().poll(cx).is_ready())).await
}

fn log_processed(done: Result<Processed, tokio::task::JoinError>) {
    if let Err(e) = done {
        tracing::error!(error = %e, "saga processing task failed");
    }
}

fn store_error(operation: &'static str) {
    metrics::counter!(m::STORE_ERRORS, "operation" => operation).increment(1);
}

fn count_status(kind: &SagaKind, status: Status) {
    let name = match status {
        Status::Completed => m::SAGAS_COMPLETED,
        Status::Compensated => m::SAGAS_COMPENSATED,
        Status::Stuck => m::SAGAS_STUCK,
        _ => return,
    };
    metrics::counter!(name, "saga" => kind.name.to_string()).increment(1);
}

/// Claims are spent; `what` says why the step was not run.
fn exhausted_reason(attempt: u32, policy: &RetryPolicy) -> String {
    format!(
        "retry budget spent: attempt {attempt} of at most {} was claimed, earlier attempts never \
         recorded a result (worker crashes or lost leases)",
        policy.max_attempts()
    )
}

/// Processes one claimed instance: run its step, record the outcome.
async fn process<St: SagaStore>(shared: Arc<Shared<St>>, claimed: ClaimedSaga) -> Processed {
    let Some(saga) = shared.registry.sagas.get(&claimed.kind).cloned() else {
        // Cannot happen (claims are filtered by kind); give it back if it does.
        return match shared.store.release(&claimed.lease).await {
            Ok(()) => Processed::Released,
            Err(_) => Processed::StoreError,
        };
    };
    let span = tracing::info_span!(
        "saga_step",
        saga_id = %claimed.lease.saga_id,
        saga = %claimed.kind.name,
        version = claimed.kind.version,
        step = %claimed.step,
        direction = %claimed.direction,
        attempt = claimed.attempt,
    );
    process_in_span(shared, saga, claimed)
        .instrument(span)
        .await
}

async fn process_in_span<St: SagaStore>(
    shared: Arc<Shared<St>>,
    saga: Arc<dyn ErasedSaga>,
    claimed: ClaimedSaga,
) -> Processed {
    let clock = shared.store.clock().clone();
    let started_at = clock.now();
    let id = claimed.lease.saga_id;
    let labels = [
        ("saga", claimed.kind.name.to_string()),
        ("step", claimed.step.to_string()),
        ("direction", claimed.direction.as_str().to_owned()),
    ];

    let mut emitted = Vec::new();
    let mut new_state = None;
    let mut error_text = None;
    let (event, outcome) = 'event: {
        // The error is logged with its causes, and rendered to text only
        // for the stuck reason the store keeps.
        let park = |e: Error| {
            tracing::error!(error = %Chain(&e), "parking saga instance");
            let reason = Chain(&e).to_string();
            (Event::Park { reason }, Outcome::Parked)
        };
        let unknown_step = || Error::UnknownStep {
            id,
            saga: claimed.kind.clone(),
            step: claimed.step.clone(),
            direction: claimed.direction,
        };
        let Some(index) = saga.step_index(claimed.step.as_str()) else {
            break 'event park(unknown_step());
        };
        let Some((policy, timeout)) = saga.policy(index, claimed.direction) else {
            break 'event park(unknown_step());
        };
        let policy = policy.clone();
        if claimed.attempt > policy.max_attempts() {
            let reason = exhausted_reason(claimed.attempt, &policy);
            attempt_metric(&labels, "exhausted");
            error_text = Some(reason.clone());
            break 'event (
                Event::FailedForGood {
                    reason,
                    definitive: false,
                },
                Outcome::FailedForGood,
            );
        }
        let ctx = StepContext::new(
            id,
            claimed.kind.name.clone(),
            saga.step_name(index).clone(),
            claimed.direction,
            claimed.attempt,
            started_at,
            timeout,
        )
        .with_key_name(saga.key_name(index).clone())
        .with_max_payload_bytes(shared.config.limits.max_payload_bytes);
        let attempt = match saga.attempt(
            index,
            claimed.direction,
            ctx,
            claimed.state.clone(),
            shared.config.limits,
        ) {
            Ok(a) => a,
            Err(reason) => break 'event park(reason),
        };

        let timer = Instant::now();
        let result = match run_with_heartbeat(&shared, claimed.lease, attempt).await {
            Some(result) => result,
            None => return lease_lost(&shared, &claimed),
        };
        metrics::histogram!(m::STEP_DURATION, &labels).record(timer.elapsed().as_secs_f64());
        let now = clock.now();
        match result.outcome {
            Ok((state, messages)) => {
                attempt_metric(&labels, "succeeded");
                emitted = messages;
                new_state = Some(state);
                (Event::Succeeded, Outcome::Succeeded)
            }
            Err(err) => {
                let label = if err.source().is_some_and(|s| s.is::<StepPanicked>()) {
                    "panicked"
                } else {
                    err.kind().as_str()
                };
                attempt_metric(&labels, label);
                error_text = Some(err.describe());
                match err.kind() {
                    StepErrorKind::Snooze(d) => {
                        (Event::Snoozed { until: now + d }, Outcome::Snoozed)
                    }
                    kind => {
                        let decision = {
                            let mut rng = shared.rng.lock().unwrap_or_else(|e| e.into_inner());
                            policy.decide(
                                kind,
                                claimed.attempt,
                                claimed.first_attempt_at,
                                now,
                                &mut *rng,
                            )
                        };
                        match decision {
                            RetryDecision::RetryAt { at, delay } => {
                                tracing::info!(error = %err, retry_in = ?delay, "step failed; retry scheduled");
                                (Event::RetryScheduled { at }, Outcome::RetryScheduled)
                            }
                            RetryDecision::GiveUp(why) => {
                                let reason = format!("{why}: {}", err.describe());
                                tracing::warn!(%reason, "step failed for good");
                                error_text = Some(reason.clone());
                                let definitive = why == GiveUpReason::Permanent;
                                (
                                    Event::FailedForGood { reason, definitive },
                                    Outcome::FailedForGood,
                                )
                            }
                        }
                    }
                }
            }
        }
    };

    let index = saga.step_index(claimed.step.as_str()).unwrap_or(0);
    let position = Position {
        step: index,
        direction: claimed.direction,
    };
    let t = match machine::transition(saga.plan(), claimed.status, position, &event) {
        Ok(t) => t,
        Err(invalid) => {
            // A stored row the machine cannot place (an unknown step, a
            // status and direction that disagree): park it for a person.
            let reason = format!("cannot continue: {invalid}");
            tracing::error!(%reason, "parking saga instance");
            let stuck = machine::Transition {
                kind: if claimed.direction == Direction::Forward {
                    TransitionKind::ParkForward
                } else {
                    TransitionKind::ParkCompensation
                },
                status: Status::Stuck,
                position,
                command: Command::Park { reason },
            };
            return record(
                &shared,
                &saga,
                &claimed,
                stuck,
                started_at,
                Outcome::Parked,
                None,
                None,
                Vec::new(),
            )
            .await;
        }
    };
    record(
        &shared, &saga, &claimed, t, started_at, outcome, error_text, new_state, emitted,
    )
    .await
}

fn attempt_metric(labels: &[(&'static str, String); 3], outcome: &'static str) {
    let [(_, saga), (_, step), (_, direction)] = labels;
    metrics::counter!(m::STEP_ATTEMPTS,
        "saga" => saga.clone(), "step" => step.clone(),
        "direction" => direction.clone(), "outcome" => outcome)
    .increment(1);
}

fn lease_lost<St>(shared: &Shared<St>, claimed: &ClaimedSaga) -> Processed {
    shared.counters.leases_lost.fetch_add(1, Ordering::Relaxed);
    tracing::warn!("lease lost: another worker has taken this instance over; result discarded");
    metrics::counter!(m::LEASES_LOST, "saga" => claimed.kind.name.to_string()).increment(1);
    Processed::LeaseLost
}

/// Runs the attempt while extending the lease every heartbeat interval.
/// `None` if the lease was lost meanwhile (the attempt is then abandoned:
/// its result could not be recorded).
async fn run_with_heartbeat<St: SagaStore>(
    shared: &Shared<St>,
    mut lease: Lease,
    attempt: BoxFuture<'static, AttemptResult>,
) -> Option<AttemptResult> {
    let cfg = &shared.config;
    let mut attempt = attempt;
    let mut ticker = tokio::time::interval_at(
        tokio::time::Instant::now() + cfg.heartbeat_interval,
        cfg.heartbeat_interval,
    );
    loop {
        tokio::select! {
            result = &mut attempt => return Some(result),
            _ = ticker.tick() => {
                match shared.store.heartbeat(&lease, cfg.lease_duration).await {
                    Ok(extended) => lease = extended,
                    Err(Error::LeaseLost(_)) => return None,
                    Err(e) => {
                        store_error("heartbeat");
                        tracing::warn!(error = %Chain(&e), "lease heartbeat failed; will retry");
                    }
                }
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn record<St: SagaStore>(
    shared: &Shared<St>,
    saga: &Arc<dyn ErasedSaga>,
    claimed: &ClaimedSaga,
    t: machine::Transition,
    started_at: Timestamp,
    outcome: Outcome,
    error: Option<String>,
    new_state: Option<serde_json::Value>,
    emitted: Vec<OutboxMessage>,
) -> Processed {
    let now = shared.store.clock().now();
    let history = HistoryEntry {
        transition_id: TransitionId::new(),
        step: claimed.step.clone(),
        direction: claimed.direction,
        attempt: claimed.attempt,
        outcome,
        error,
        from_status: Some(claimed.status),
        to_status: t.status,
        started_at,
        finished_at: now,
    };
    let record = build_record(
        saga.as_ref(),
        &t,
        now,
        claimed.attempt,
        Some(claimed.first_attempt_at),
        new_state,
        emitted,
        history,
    );
    let id = claimed.lease.saga_id;
    match shared.store.record(&claimed.lease, record).await {
        Ok(()) => {
            shared.counters.recorded.fetch_add(1, Ordering::Relaxed);
            count_status(&claimed.kind, t.status);
            tracing::debug!(transition = ?t.kind, status = %t.status, "recorded");
            if matches!(t.command, Command::Schedule { at: None, .. }) {
                // The next step is due now: make sure a worker looks.
                shared.wake.notify_one();
            }
            Processed::Recorded(id, t.kind)
        }
        Err(Error::LeaseLost(_)) => lease_lost(shared, claimed),
        Err(e) => {
            shared.counters.store_failed("record");
            tracing::error!(error = %Chain(&e), "recording the step's outcome failed; the step will run again when the lease expires");
            Processed::StoreError
        }
    }
}

/// Turns a transition into the write that persists it.
#[allow(clippy::too_many_arguments)]
fn build_record(
    saga: &dyn ErasedSaga,
    t: &machine::Transition,
    now: Timestamp,
    attempt: u32,
    first_attempt_at: Option<Timestamp>,
    new_state: Option<serde_json::Value>,
    outbox: Vec<OutboxMessage>,
    history: HistoryEntry,
) -> Record {
    let (attempt, first_attempt_at, next_run_at, stuck_reason) = match &t.command {
        Command::Schedule { at, attempts } => {
            let (attempt, first) = match attempts {
                Attempts::Reset => (0, None),
                Attempts::Keep => (attempt, first_attempt_at),
                Attempts::Refund => {
                    // A snooze gives its attempt back. The step did start,
                    // so the time of its first attempt stays set (a cancel
                    // then compensates it), moved later by the snooze: time
                    // spent snoozed does not count toward `max_elapsed`.
                    let snoozed = at.map_or(Duration::ZERO, |at| at.saturating_duration_since(now));
                    (
                        attempt.saturating_sub(1),
                        first_attempt_at.map(|t| t + snoozed),
                    )
                }
            };
            (attempt, first, Some(at.unwrap_or(now)), None)
        }
        Command::Finish => (attempt, first_attempt_at, None, None),
        Command::Park { reason } => (attempt, first_attempt_at, None, Some(reason.clone())),
    };
    // Parking never moves an instance: keep the stored step name, which may
    // be one the definition no longer knows.
    let step = match &t.command {
        Command::Park { .. } => history.step.clone(),
        _ => saga.step_name(t.position.step).clone(),
    };
    Record {
        transition_id: history.transition_id,
        status: t.status,
        step,
        direction: t.position.direction,
        attempt,
        first_attempt_at,
        next_run_at,
        state: new_state,
        stuck_reason,
        outbox,
        history,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::definition::Step;

    #[derive(Serialize, serde::Deserialize)]
    struct Order {
        id: u32,
    }

    async fn check(_: &mut StepContext, _: &mut Order) -> Result<(), StepError> {
        Ok(())
    }

    fn attempt(
        saga: &SagaDefinition<Order>,
        direction: Direction,
        state: serde_json::Value,
    ) -> Error {
        let ctx = StepContext::new(
            SagaId::new(),
            saga.name().clone(),
            StepName::new("check").unwrap(),
            direction,
            1,
            Timestamp::from_micros(0),
            Duration::from_secs(1),
        );
        let registered = Registered {
            saga: saga.clone(),
            deps: Arc::new(()),
        };
        match ErasedSaga::attempt(&registered, 0, direction, ctx, state, Limits::default()) {
            Ok(_) => panic!("the attempt must not be ready to run"),
            Err(e) => e,
        }
    }

    #[test]
    fn a_state_that_does_not_deserialize_is_a_typed_error_keeping_its_cause() {
        let saga = SagaDefinition::<Order>::builder("orders", 3)
            .step(Step::new("check", check).no_compensation())
            .build()
            .unwrap();
        let err = attempt(
            &saga,
            Direction::Forward,
            serde_json::json!({ "id": "seven" }),
        );
        let Error::DeserializeState { saga: kind, source } = &err else {
            panic!("{err:?}");
        };
        assert_eq!(kind, saga.kind());
        assert!(source.is_data(), "{source}");
        let cause = std::error::Error::source(&err).expect("the cause is kept");
        assert!(cause.downcast_ref::<serde_json::Error>().is_some());
        // Rendered, for the stuck reason: the message, then the cause.
        assert_eq!(
            Chain(&err).to_string(),
            format!(
                "the stored state does not deserialize as saga orders@v3's state type: {source}"
            )
        );

        // A side the step does not have is named, not guessed at.
        let err = attempt(&saga, Direction::Compensate, serde_json::json!({ "id": 7 }));
        assert!(
            matches!(
                &err,
                Error::UnknownStep { step, direction: Direction::Compensate, .. }
                    if step.as_str() == "check"
            ),
            "{err:?}"
        );
    }
}
