//! The registered saga definitions, with their state types erased so
//! that one executor runs several, and one attempt of a step made ready
//! to run.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::task::AbortOnDropHandle;

use crate::action::BoxFuture;
use crate::client::Limits;
use crate::context::StepContext;
use crate::definition::SagaDefinition;
use crate::error::{Error, StepError};
use crate::fingerprint::ShapeFingerprint;
use crate::ids::{Direction, SagaKind, StepName};
use crate::machine::StepKind;
use crate::outbox::OutboxMessage;
use crate::retry::RetryPolicy;
use crate::shape::SagaShape;

/// What one attempt produced: on success the new state and the messages
/// the step emitted.
pub(super) struct AttemptResult {
    pub(super) outcome: Result<(serde_json::Value, Vec<OutboxMessage>), StepError>,
}

/// A registered definition with its state type erased.
pub(super) trait ErasedSaga: Send + Sync + 'static {
    fn shape(&self) -> &SagaShape;
    fn plan(&self) -> &[StepKind];
    fn step_index(&self, name: &str) -> Option<usize>;
    fn step_name(&self, index: usize) -> &StepName;
    /// The name the step's keys and message ids derive from.
    fn key_name(&self, index: usize) -> &StepName;
    fn policy(&self, index: usize, direction: Direction) -> Option<(&RetryPolicy, Duration)>;
    /// Deserializes the state and returns the attempt, ready to run; or why
    /// it cannot run ([`Error::UnknownStep`], [`Error::DeserializeState`]).
    /// The state the step leaves is checked against `limits` (the store's)
    /// and for storable JSON: a permanent failure if it fails either.
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
    fn shape(&self) -> &SagaShape {
        self.saga.shape()
    }

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
            let mut task = AbortOnDropHandle::new(tokio::spawn(async move {
                let result = action.call(&deps, &mut ctx, &mut state).await;
                (ctx, state, result)
            }));
            let joined = match tokio::time::timeout(timeout, &mut task).await {
                Ok(joined) => joined,
                Err(_) => {
                    return AttemptResult {
                        outcome: Err(StepError::timeout(AttemptTimedOut(timeout))),
                    };
                }
            };
            let outcome = match joined {
                // Refused before anything is written, and for good: the
                // same step would leave the same data again.
                Ok((mut ctx, state, Ok(()))) => {
                    crate::storable::refuse_unstorable("saga state", &state)
                        .map_err(StepError::permanent)
                        .and_then(|()| serde_json::to_value(&state).map_err(StepError::permanent))
                        .and_then(|v| {
                            limits
                                .check_state("saga state", &v)
                                .map_err(StepError::permanent)?;
                            Ok(v)
                        })
                        .map(|v| (v, ctx.take_emitted()))
                }
                Ok((_, _, Err(e))) => Err(e),
                Err(join) => Err(StepError::retryable(StepPanicked(panic_message(join)))),
            };
            AttemptResult { outcome }
        }))
    }
}

/// What a step's task ended with other than a result: its panic's
/// message, or why it was cancelled.
fn panic_message(join: tokio::task::JoinError) -> String {
    match join.try_into_panic() {
        Ok(payload) => crate::panic::message(payload.as_ref()).to_owned(),
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
pub(super) struct Registry {
    pub(super) sagas: HashMap<SagaKind, Arc<dyn ErasedSaga>>,
    pub(super) kinds: Vec<SagaKind>,
    /// The fingerprint of each kind's definition, index for index with
    /// `kinds`.
    pub(super) fingerprints: Vec<ShapeFingerprint>,
}

impl Registry {
    /// Adds `saga`, its actions handed `deps`; or, if its kind is already
    /// registered, leaves the registry as it is and returns the kind.
    pub(super) fn insert<S, D>(
        &mut self,
        saga: SagaDefinition<S, D>,
        deps: D,
    ) -> Result<(), SagaKind>
    where
        S: Serialize + DeserializeOwned + Send + 'static,
        D: Send + Sync + 'static,
    {
        let kind = saga.kind().clone();
        if self.sagas.contains_key(&kind) {
            return Err(kind);
        }
        self.kinds.push(kind.clone());
        self.fingerprints.push(saga.fingerprint());
        let registered = Registered {
            saga,
            deps: Arc::new(deps),
        };
        self.sagas.insert(kind, Arc::new(registered));
        Ok(())
    }
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(&self.kinds).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::definition::Step;
    use crate::error::ErrorChain;
    use crate::ids::SagaId;
    use crate::time::Timestamp;

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
            ErrorChain(&err).to_string(),
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
