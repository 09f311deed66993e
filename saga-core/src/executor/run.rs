//! The run loops: [`Executor::run`] and [`Executor::run_until_idle`]
//! claim due instances and hand each to processing.

use std::collections::HashSet;
use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::atomic::Ordering;
use std::task::Poll;

use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;

use super::Executor;
use super::process::process;
use super::report::{Processed, RunReport};
use crate::error::{Error, ErrorChain};
use crate::ids::SagaKind;
use crate::metrics as m;
use crate::store::{ClaimRequest, ClaimedSaga, SagaStore};

impl<St: SagaStore> Executor<St> {
    /// Claims and runs due instances until none is due at the store clock's
    /// current time, then reports what happened. Retries scheduled in the
    /// future are left for a later call: with a
    /// [`ManualClock`](crate::ManualClock), advance the clock and call again.
    ///
    /// The first call registers the definitions first ([`Executor::check`])
    /// and fails, having claimed nothing, if that fails.
    pub async fn run_until_idle(&self) -> Result<RunReport, Error> {
        self.check().await?;
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
        report.unmatched = self.check_unmatched().await?;
        Ok(report)
    }

    /// Runs until `shutdown` completes: claims due instances whenever a
    /// slot is free, waking on starts from this executor's
    /// [`client`](Executor::client), on finished steps and on the poll
    /// interval. On shutdown it stops claiming and lets in-flight steps
    /// finish within [`ExecutorConfig::shutdown_grace`](super::ExecutorConfig::shutdown_grace); steps still
    /// running then are abandoned, and their leases expire so another
    /// worker resumes them.
    ///
    /// It fails only at start, before it claims anything: when the
    /// definitions cannot be registered ([`Executor::check`]), because one
    /// has a shape other than the one stored for its name and version
    /// ([`Error::DefinitionChanged`]) or the store cannot answer (the
    /// PostgreSQL store's schema was never migrated, say). Once running,
    /// store errors are logged, counted and retried with backoff; they do
    /// not end the loop, and it returns `Ok(())` at shutdown.
    pub async fn run(&self, shutdown: impl Future<Output = ()> + Send) -> Result<(), Error> {
        self.check().await?;
        let cfg = &self.shared.config;
        let mut shutdown = pin!(shutdown);
        let mut tasks: JoinSet<Processed> = JoinSet::new();
        // Its own timer, so that a busy executor reports unregistered kinds
        // too. The first tick is at once.
        let mut unregistered_check = tokio::time::interval(cfg.unregistered_check_interval);
        unregistered_check.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // Claims that failed in a row, for the backoff.
        let mut failed_claims = 0u32;
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
                        failed_claims = 0;
                        for claimed in batch {
                            tasks.spawn(process(self.shared.clone(), claimed));
                        }
                    }
                    Err(e) => {
                        failed_claims = failed_claims.saturating_add(1);
                        wait = {
                            let mut rng = self.shared.rng.lock().unwrap_or_else(|e| e.into_inner());
                            self.shared.claim_backoff.delay(failed_claims, &mut *rng)
                        };
                        tracing::warn!(error = %ErrorChain(&e), retry_in = ?wait, "claiming due sagas failed");
                    }
                }
            }
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                _ = unregistered_check.tick() => {
                    if let Err(e) = self.check_unregistered().await {
                        tracing::warn!(error = %ErrorChain(&e), "checking for unregistered sagas failed");
                    }
                    if let Err(e) = self.check_unmatched().await {
                        tracing::warn!(error = %ErrorChain(&e), "checking for sagas of another definition shape failed");
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

    async fn claim(&self, limit: usize) -> Result<Vec<ClaimedSaga>, Error> {
        let cfg = &self.shared.config;
        let counters = &self.shared.counters;
        let claimed = self
            .shared
            .store
            .claim(ClaimRequest {
                worker: self.shared.worker,
                kinds: &self.shared.registry.kinds,
                fingerprints: &self.shared.registry.fingerprints,
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
