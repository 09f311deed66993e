//! Processing one claimed instance: run its step under the lease's
//! heartbeat, decide what the outcome means, record it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tracing::Instrument;

use super::Shared;
use super::registry::{AttemptResult, ErasedSaga, StepPanicked};
use super::report::{Processed, count_status, store_error};
use crate::action::BoxFuture;
use crate::context::StepContext;
use crate::error::{Chain, Error, StepErrorKind};
use crate::ids::{Direction, TransitionId};
use crate::machine::{self, Attempts, Command, Event, Position, Status, TransitionKind};
use crate::metrics as m;
use crate::outbox::OutboxMessage;
use crate::retry::{GiveUpReason, RetryDecision, RetryPolicy};
use crate::store::{ClaimedSaga, HistoryEntry, Lease, Outcome, Record, SagaStore};
use crate::time::Timestamp;

/// Claims are spent; `what` says why the step was not run.
fn exhausted_reason(attempt: u32, policy: &RetryPolicy) -> String {
    format!(
        "retry budget spent: attempt {attempt} of at most {} was claimed, earlier attempts never \
         recorded a result (worker crashes or lost leases)",
        policy.max_attempts()
    )
}

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
pub(super) fn build_record(
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
