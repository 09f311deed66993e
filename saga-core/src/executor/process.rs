//! Processing one claimed instance: run its step under the lease's
//! heartbeat, decide what the outcome means, record it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tracing::Instrument;

use super::Shared;
use super::decide::{Attempted, Located, Rule, Settled, Verdict, budget_spent, decide};
use super::registry::{AttemptResult, ErasedSaga};
use super::report::{Processed, count_status, store_error};
use crate::action::BoxFuture;
use crate::context::StepContext;
use crate::error::{Error, ErrorChain, StepError};
use crate::ids::TransitionId;
use crate::machine::{Attempts, Command, Position};
use crate::metrics as m;
use crate::outbox::OutboxMessage;
use crate::store::{ClaimedSaga, HistoryEntry, Lease, Record, SagaStore};
use crate::time::Timestamp;

/// Processes one claimed instance: run its step, record the outcome.
pub(super) async fn process<St: SagaStore>(
    shared: Arc<Shared<St>>,
    claimed: ClaimedSaga,
) -> Processed {
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

    // The store's caps: the one source of them (see `SagaStore::limits`).
    let limits = shared.store.limits();
    let located = saga.step_index(claimed.step.as_str()).and_then(|index| {
        let (policy, timeout) = saga.policy(index, claimed.direction)?;
        let position = Position {
            step: index,
            direction: claimed.direction,
        };
        Some((Located { position, policy }, timeout))
    });
    let attempted = match located {
        None => Attempted::Unplaced(Error::UnknownStep {
            id,
            saga: claimed.kind.clone(),
            step: claimed.step.clone(),
            direction: claimed.direction,
        }),
        Some((at, _)) if budget_spent(claimed.attempt, at.policy) => Attempted::BudgetSpent(at),
        Some((at, timeout)) => {
            let index = at.position.step;
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
            .with_lease_token(claimed.lease.token)
            .with_max_payload_bytes(limits.max_payload_bytes);
            match saga.attempt(index, claimed.direction, ctx, claimed.state.clone(), limits) {
                Err(problem) => Attempted::NotReady(at.position, problem),
                Ok(attempt) => {
                    let timer = Instant::now();
                    let Some(result) = run_with_heartbeat(&shared, claimed.lease, attempt).await
                    else {
                        return lease_lost(&shared, &claimed);
                    };
                    metrics::histogram!(m::STEP_DURATION, &labels)
                        .record(timer.elapsed().as_secs_f64());
                    Attempted::Ran(at, result.outcome)
                }
            }
        }
    };

    // Where a success was placed, should the store refuse its result.
    let succeeded_at = match &attempted {
        Attempted::Ran(at, Ok(_)) => Some(*at),
        _ => None,
    };
    let decided = {
        let mut rng = shared.rng.lock().unwrap_or_else(|e| e.into_inner());
        decide(&claimed, saga.plan(), attempted, clock.now(), &mut *rng)
    };
    let verdict = match decided {
        Ok(verdict) => verdict,
        Err(not_runnable) => {
            // Claims only return runnable rows; give this one back if not.
            tracing::error!(error = %not_runnable, "giving the claim back");
            return match shared.store.release(&claimed.lease).await {
                Ok(()) => Processed::Released,
                Err(_) => Processed::StoreError,
            };
        }
    };
    if let Some(label) = verdict.attempt_label {
        attempt_metric(&labels, label);
    }
    let reason = match verdict.settled.command() {
        Command::Park { reason } => reason.as_str(),
        _ => "",
    };
    match verdict.rule {
        Rule::UnknownStep | Rule::NotReady | Rule::MachineRefused => {
            tracing::error!(%reason, "parking saga instance");
        }
        Rule::RetryScheduled => {
            let error = verdict.error.as_deref().unwrap_or_default();
            tracing::info!(%error, retry_in = ?verdict.retry_in, "step failed; retry scheduled");
        }
        // A permanent failure is the step's own answer (a declined card):
        // business as usual, INFO. Giving up after retries is WARN.
        Rule::GaveUpPermanent => {
            let reason = verdict.error.as_deref().unwrap_or_default();
            tracing::info!(%reason, "step failed for good");
        }
        Rule::GaveUpAttempts | Rule::GaveUpElapsed => {
            let reason = verdict.error.as_deref().unwrap_or_default();
            tracing::warn!(%reason, "step failed for good after its retries");
        }
        Rule::BudgetSpent | Rule::Succeeded | Rule::Snoozed => {}
    }
    match record(&shared, &saga, &claimed, verdict, started_at).await {
        Recording::Done(processed) => processed,
        Recording::Refused(refused) => {
            fail_refused(&shared, &saga, &claimed, succeeded_at, refused, started_at).await
        }
    }
}

/// The store refused to record a step's result for its data (over its
/// caps, not storable, a data exception of the database): the step failed
/// for good with this as its reason.
#[derive(Debug, thiserror::Error)]
#[error("the store refused to record the step's result")]
struct ResultRefused(#[source] Error);

/// A success whose result the store refused for its data (a deterministic
/// refusal: writing it again can never succeed) is failed for good in its
/// place, once, with the store's reason: compensated before the pivot,
/// parked after it; never run again per lease expiry.
async fn fail_refused<St: SagaStore>(
    shared: &Shared<St>,
    saga: &Arc<dyn ErasedSaga>,
    claimed: &ClaimedSaga,
    succeeded_at: Option<Located<'_>>,
    refused: Error,
    started_at: Timestamp,
) -> Processed {
    let Some(at) = succeeded_at else {
        shared.counters.store_failed("record");
        tracing::error!(error = %ErrorChain(&refused), "the store refused to record a failure; the step will run again when the lease expires");
        return Processed::StoreError;
    };
    tracing::warn!(error = %ErrorChain(&refused), "the store refused the step's result for its data; failing the step for good");
    let failed = Attempted::Ran(at, Err(StepError::permanent(ResultRefused(refused))));
    let decided = {
        let mut rng = shared.rng.lock().unwrap_or_else(|e| e.into_inner());
        decide(
            claimed,
            saga.plan(),
            failed,
            shared.store.clock().now(),
            &mut *rng,
        )
    };
    let Ok(verdict) = decided else {
        // Not runnable: the first decision would have said so already.
        return Processed::StoreError;
    };
    match record(shared, saga, claimed, verdict, started_at).await {
        Recording::Done(processed) => processed,
        Recording::Refused(e) => {
            shared.counters.store_failed("record");
            tracing::error!(error = %ErrorChain(&e), "the store refused to record the step's failure too; the step will run again when the lease expires");
            Processed::StoreError
        }
    }
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
                        tracing::warn!(error = %ErrorChain(&e), "lease heartbeat failed; will retry");
                    }
                }
            }
        }
    }
}

/// What came of recording a verdict.
enum Recording {
    /// Recorded, or failed in a way that leaves nothing more to do here.
    Done(Processed),
    /// The store refused the write for its data ([`Error::refuses_data`]):
    /// nothing was written, the lease is still held.
    Refused(Error),
}

async fn record<St: SagaStore>(
    shared: &Shared<St>,
    saga: &Arc<dyn ErasedSaga>,
    claimed: &ClaimedSaga,
    verdict: Verdict,
    started_at: Timestamp,
) -> Recording {
    let now = shared.store.clock().now();
    let t = verdict.settled;
    let history = HistoryEntry {
        transition_id: TransitionId::new(),
        step: claimed.step.clone(),
        direction: claimed.direction,
        attempt: claimed.attempt,
        outcome: verdict.outcome,
        error: verdict.error,
        from_status: Some(claimed.status),
        to_status: t.status(),
        started_at,
        finished_at: now,
    };
    let record = build_record(
        saga.as_ref(),
        &t,
        now,
        claimed.attempt,
        Some(claimed.first_attempt_at),
        verdict.state,
        verdict.emitted,
        history,
    );
    let id = claimed.lease.saga_id;
    Recording::Done(match shared.store.record(&claimed.lease, record).await {
        Ok(()) => {
            shared.counters.recorded.fetch_add(1, Ordering::Relaxed);
            count_status(&claimed.kind, t.status());
            tracing::debug!(transition = ?t.kind(), status = %t.status(), "recorded");
            if matches!(t.command(), Command::Schedule { at: None, .. }) {
                // The next step is due now: make sure a worker looks.
                shared.wake.notify_one();
            }
            Processed::Recorded(id, t.kind())
        }
        Err(Error::LeaseLost(_)) => lease_lost(shared, claimed),
        Err(e) if e.refuses_data() => return Recording::Refused(e),
        Err(e) => {
            shared.counters.store_failed("record");
            tracing::error!(error = %ErrorChain(&e), "recording the step's outcome failed; the step will run again when the lease expires");
            Processed::StoreError
        }
    })
}

/// Turns a settled decision into the write that persists it.
#[allow(clippy::too_many_arguments)]
pub(super) fn build_record(
    saga: &dyn ErasedSaga,
    t: &Settled,
    now: Timestamp,
    attempt: u32,
    first_attempt_at: Option<Timestamp>,
    new_state: Option<serde_json::Value>,
    outbox: Vec<OutboxMessage>,
    history: HistoryEntry,
) -> Record {
    let (attempt, first_attempt_at, next_run_at, stuck_reason) = match t.command() {
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
    let (step, direction) = match t {
        Settled::Move(t) if !matches!(t.command, Command::Park { .. }) => (
            saga.step_name(t.position.step).clone(),
            t.position.direction,
        ),
        _ => (history.step.clone(), history.direction),
    };
    Record {
        transition_id: history.transition_id,
        status: t.status(),
        step,
        direction,
        attempt,
        first_attempt_at,
        next_run_at,
        state: new_state,
        stuck_reason,
        outbox,
        history,
    }
}
