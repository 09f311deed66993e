//! What a step sees of the engine while it runs.

use std::time::Duration;

use crate::error::StepError;
use crate::ids::{Direction, IdempotencyKey, LeaseToken, MessageId, SagaId, SagaName, StepName};
use crate::outbox::{Message, MessageError, OutboxMessage};
use crate::time::Timestamp;

/// The context of one attempt of one step (forward or compensation).
///
/// It carries the step's [idempotency key](StepContext::idempotency_key),
/// the same on every attempt and every worker, and collects the outbox
/// messages the step emits; those are written together with the step's
/// result, or not at all.
#[derive(Debug)]
pub struct StepContext {
    saga_id: SagaId,
    saga_name: SagaName,
    step: StepName,
    key_name: StepName,
    direction: Direction,
    attempt: u32,
    started_at: Timestamp,
    deadline: Timestamp,
    key: IdempotencyKey,
    forward_key: IdempotencyKey,
    lease_token: Option<LeaseToken>,
    max_payload_bytes: usize,
    emitted: Vec<OutboxMessage>,
}

impl StepContext {
    /// A context for an attempt starting at `started_at` with `timeout`.
    ///
    /// The executor makes these; it is public so that steps can be unit
    /// tested on their own.
    #[must_use]
    pub fn new(
        saga_id: SagaId,
        saga_name: SagaName,
        step: StepName,
        direction: Direction,
        attempt: u32,
        started_at: Timestamp,
        timeout: Duration,
    ) -> Self {
        let key = IdempotencyKey::derive(saga_id, &step, direction);
        let forward_key = IdempotencyKey::derive(saga_id, &step, Direction::Forward);
        StepContext {
            saga_id,
            saga_name,
            key_name: step.clone(),
            step,
            direction,
            attempt,
            started_at,
            deadline: started_at + timeout,
            key,
            forward_key,
            lease_token: None,
            max_payload_bytes: crate::DEFAULT_MAX_BYTES,
            emitted: Vec::new(),
        }
    }

    /// Derives keys and message ids from `name` (the step's oldest name)
    /// rather than its current one.
    pub(crate) fn with_key_name(mut self, name: StepName) -> Self {
        self.key = IdempotencyKey::derive(self.saga_id, &name, self.direction);
        self.forward_key = IdempotencyKey::derive(self.saga_id, &name, Direction::Forward);
        self.key_name = name;
        self
    }

    /// The same context, run under the lease `token`: the executor sets
    /// the token of the claim it runs the attempt under; a unit test of a
    /// step may set one too.
    #[must_use]
    pub fn with_lease_token(mut self, token: LeaseToken) -> Self {
        self.lease_token = Some(token);
        self
    }

    pub(crate) fn with_max_payload_bytes(mut self, limit: usize) -> Self {
        self.max_payload_bytes = limit;
        self
    }

    /// The instance.
    #[must_use]
    pub fn saga_id(&self) -> SagaId {
        self.saga_id
    }

    /// The saga's name.
    #[must_use]
    pub fn saga_name(&self) -> &SagaName {
        &self.saga_name
    }

    /// The step.
    #[must_use]
    pub fn step(&self) -> &StepName {
        &self.step
    }

    /// Forward or compensation.
    #[must_use]
    pub fn direction(&self) -> Direction {
        self.direction
    }

    /// This attempt's number, from 1. Attempts cut short by a crash or a
    /// lost lease count too.
    #[must_use]
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// When this attempt started.
    #[must_use]
    pub fn started_at(&self) -> Timestamp {
        self.started_at
    }

    /// When this attempt times out. Pass it on to downstream calls so they
    /// give up no later than the engine does.
    #[must_use]
    pub fn deadline(&self) -> Timestamp {
        self.deadline
    }

    /// The idempotency key of this step in this direction: stable across
    /// retries, crashes and workers. Send it with every downstream call.
    #[must_use]
    pub fn idempotency_key(&self) -> IdempotencyKey {
        self.key
    }

    /// The idempotency key of this step's *forward* action. A compensation
    /// uses it to look up what, if anything, the forward action did; the
    /// forward action may have failed, timed out, or never reached the
    /// downstream service.
    #[must_use]
    pub fn forward_key(&self) -> IdempotencyKey {
        self.forward_key
    }

    /// The fencing token of the lease this attempt runs under: a new one
    /// for every claim, so it names this attempt on this worker (the
    /// [idempotency key](StepContext::idempotency_key) is the same for every
    /// attempt). `None` for a context built by hand
    /// ([`StepContext::new`]) without one.
    ///
    /// Read only, and for information: a downstream service may log it,
    /// to tell afterwards which attempt made each call (the chaos harness
    /// checks from the services' own logs that no result obtained under a
    /// lease already taken over is recorded). The engine, not the service,
    /// fences: a step whose lease was lost keeps running until it ends,
    /// and its result is then refused.
    #[must_use]
    pub fn lease_token(&self) -> Option<LeaseToken> {
        self.lease_token
    }

    /// Emits an outbox message, committed together with this step's
    /// result. Its id is derived from the instance, step, direction and the
    /// message's index within this attempt, so emit in a deterministic
    /// order.
    ///
    /// A payload over the cap is a permanent error: retrying cannot shrink it.
    pub fn emit(&mut self, message: Message) -> Result<MessageId, StepError> {
        let size = message.payload().len();
        if size > self.max_payload_bytes {
            return Err(StepError::permanent(MessageError::TooLarge {
                size,
                limit: self.max_payload_bytes,
            }));
        }
        let index = u32::try_from(self.emitted.len()).unwrap_or(u32::MAX);
        let id = MessageId::derive(self.saga_id, &self.key_name, self.direction, index);
        self.emitted.push(message.into_outbox(id, self.started_at));
        Ok(id)
    }

    /// The messages emitted so far.
    #[must_use]
    pub fn emitted(&self) -> &[OutboxMessage] {
        &self.emitted
    }

    pub(crate) fn take_emitted(&mut self) -> Vec<OutboxMessage> {
        std::mem::take(&mut self.emitted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::StepErrorKind;

    fn ctx(direction: Direction) -> StepContext {
        StepContext::new(
            SagaId::new(),
            SagaName::new("checkout").unwrap(),
            StepName::new("charge").unwrap(),
            direction,
            1,
            Timestamp::from_micros(0),
            Duration::from_secs(5),
        )
    }

    #[test]
    fn compensation_sees_its_forward_key() {
        let f = ctx(Direction::Forward);
        assert_eq!(f.idempotency_key(), f.forward_key());
        let c = StepContext::new(
            f.saga_id,
            f.saga_name.clone(),
            f.step.clone(),
            Direction::Compensate,
            3,
            Timestamp::from_micros(9),
            Duration::from_secs(1),
        );
        assert_eq!(c.forward_key(), f.idempotency_key());
        assert_ne!(c.idempotency_key(), f.idempotency_key());
        assert_eq!(c.deadline(), Timestamp::from_micros(1_000_009));
    }

    #[test]
    fn a_hand_built_context_has_no_lease_until_given_one() {
        let c = ctx(Direction::Forward);
        assert_eq!(c.lease_token(), None);
        let token = LeaseToken::new();
        assert_eq!(c.with_lease_token(token).lease_token(), Some(token));
    }

    #[test]
    fn emitted_ids_are_stable_per_index_and_oversized_payloads_are_permanent() {
        let mut a = ctx(Direction::Forward).with_max_payload_bytes(16);
        let id0 = a.emit(Message::bytes("t", vec![1; 4]).unwrap()).unwrap();
        let id1 = a.emit(Message::bytes("t", vec![1; 4]).unwrap()).unwrap();
        assert_ne!(id0, id1);
        let mut b = StepContext::new(
            a.saga_id,
            a.saga_name.clone(),
            a.step.clone(),
            Direction::Forward,
            2,
            Timestamp::from_micros(5),
            Duration::from_secs(1),
        );
        assert_eq!(b.emit(Message::bytes("t", vec![]).unwrap()).unwrap(), id0);
        let err = a
            .emit(Message::bytes("t", vec![0; 17]).unwrap())
            .unwrap_err();
        assert_eq!(err.kind(), StepErrorKind::Permanent);
        assert_eq!(a.emitted().len(), 2);
    }
}
