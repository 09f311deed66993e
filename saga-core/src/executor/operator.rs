//! Operator actions on one instance: resume and cancel.

use super::Executor;
use super::decide::Settled;
use super::process::build_record;
use super::report::count_status;
use crate::error::Error;
use crate::ids::{Direction, SagaId, TransitionId};
use crate::machine::{self, Event, Position};
use crate::store::{HistoryEntry, Outcome, SagaSnapshot, SagaStore};

impl<St: SagaStore> Executor<St> {
    /// Resumes a stuck instance where it stopped, with a fresh retry budget
    /// for that step. Like every operator action, fails with
    /// [`Error::DefinitionChanged`] (see [`Executor::check`]) if a
    /// definition here has a shape other than the stored one. Fails with
    /// [`Error::InvalidStatus`] unless it is stuck, and with [`Error::UnknownStep`] if it is stuck at a step the
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
        // A definition whose shape drifted from the stored one would plan
        // the action on the wrong steps.
        self.check().await?;
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
            &Settled::Move(t.clone()),
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
}
