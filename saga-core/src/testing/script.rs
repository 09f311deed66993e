//! A scripted saga: a checkout-shaped definition whose steps do what the
//! test says, attempt by attempt, and record every call.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::action::Action;
use crate::context::StepContext;
use crate::definition::{SagaDefinition, Step};
use crate::error::StepError;
use crate::ids::{Direction, IdempotencyKey, SagaId};
use crate::outbox::Message;
use crate::retry::{Jitter, RetryPolicy};

/// The scripted saga's state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestState {
    /// Which order this instance is for; scripts are keyed by it.
    pub order: u32,
    /// `step:direction` for every attempt that succeeded, in order.
    pub done: Vec<String>,
}

impl TestState {
    /// The state of order `order`.
    #[must_use]
    pub fn order(order: u32) -> Self {
        TestState {
            order,
            done: Vec::new(),
        }
    }
}

/// The scripted saga's step names, in order: `validate` (no compensation),
/// `charge` and `reserve` (compensated), `confirm` (the pivot), `notify`
/// (after the pivot; emits an `order.confirmed` message).
pub const STEPS: [&str; 5] = ["validate", "charge", "reserve", "confirm", "notify"];

/// What a scripted step does on one attempt.
#[derive(Debug, Clone)]
pub enum Behavior {
    /// Succeed (the default once a script runs out).
    Succeed,
    /// Fail with a retryable error.
    Retryable,
    /// Fail with a permanent error.
    Permanent,
    /// Ask to run again after the delay.
    Snooze(Duration),
    /// Panic.
    Panic,
    /// Never finish (until the attempt times out).
    Hang,
    /// Signal the gate, wait until it is opened, then succeed.
    Wait(Gate),
}

/// A rendezvous with a running step: the test waits until the step is
/// inside ([`Gate::entered`]) and lets it finish ([`Gate::open`]).
#[derive(Debug, Clone, Default)]
pub struct Gate {
    entered: Arc<Notify>,
    opened: Arc<Notify>,
}

impl Gate {
    /// A closed gate.
    #[must_use]
    pub fn new() -> Self {
        Gate::default()
    }

    /// Waits until a step has reached the gate.
    pub async fn entered(&self) {
        self.entered.notified().await;
    }

    /// Lets the waiting step go on.
    pub fn open(&self) {
        self.opened.notify_one();
    }
}

/// One call of a scripted step, as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// The instance.
    pub saga_id: SagaId,
    /// Its order number.
    pub order: u32,
    /// The step.
    pub step: String,
    /// The direction.
    pub direction: Direction,
    /// The attempt number the context gave.
    pub attempt: u32,
    /// The idempotency key the context gave.
    pub key: IdempotencyKey,
    /// The forward key the context gave.
    pub forward_key: IdempotencyKey,
}

type Queue = HashMap<(u32, String, Direction), VecDeque<Behavior>>;

/// Behaviours per (order, step, direction), consumed one per attempt, and
/// the log of calls.
#[derive(Debug, Default)]
pub struct Script {
    queued: Mutex<Queue>,
    calls: Mutex<Vec<Call>>,
}

/// The scripted failure.
#[derive(Debug, thiserror::Error)]
#[error("scripted {0} failure")]
pub struct ScriptedFailure(&'static str);

impl Script {
    /// An empty script: every step succeeds.
    #[must_use]
    pub fn new() -> Arc<Self> {
        Arc::new(Script::default())
    }

    /// Queues what `step` in `direction` of order `order` does on its next
    /// attempts, one behaviour per attempt; afterwards it succeeds.
    pub fn on(
        &self,
        order: u32,
        step: &str,
        direction: Direction,
        behaviors: impl IntoIterator<Item = Behavior>,
    ) {
        self.queued
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((order, step.to_owned(), direction))
            .or_default()
            .extend(behaviors);
    }

    /// Every call so far.
    #[must_use]
    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The calls for one order, as `step:direction` strings.
    #[must_use]
    pub fn trace(&self, order: u32) -> Vec<String> {
        self.calls()
            .into_iter()
            .filter(|c| c.order == order)
            .map(|c| format!("{}:{}", c.step, c.direction))
            .collect()
    }

    fn next(&self, ctx: &StepContext, order: u32, step: &str) -> Behavior {
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Call {
                saga_id: ctx.saga_id(),
                order,
                step: step.to_owned(),
                direction: ctx.direction(),
                attempt: ctx.attempt(),
                key: ctx.idempotency_key(),
                forward_key: ctx.forward_key(),
            });
        self.queued
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(&(order, step.to_owned(), ctx.direction()))
            .and_then(VecDeque::pop_front)
            .unwrap_or(Behavior::Succeed)
    }
}

struct Scripted {
    script: Arc<Script>,
    step: &'static str,
}

impl Action<TestState> for Scripted {
    async fn run(
        &self,
        _: &(),
        ctx: &mut StepContext,
        state: &mut TestState,
    ) -> Result<(), StepError> {
        let behavior = self.script.next(ctx, state.order, self.step);
        // Scribble on the state first: only a success may persist it.
        state.done.push(format!(
            "{}:{}:attempt{}",
            self.step,
            ctx.direction(),
            ctx.attempt()
        ));
        match behavior {
            Behavior::Succeed => {}
            Behavior::Retryable => return Err(StepError::retryable(ScriptedFailure("retryable"))),
            Behavior::Permanent => return Err(StepError::permanent(ScriptedFailure("permanent"))),
            Behavior::Snooze(d) => return Err(StepError::snooze(d)),
            Behavior::Panic => panic!("scripted panic in {}", self.step),
            Behavior::Hang => std::future::pending::<()>().await,
            Behavior::Wait(gate) => {
                gate.entered.notify_one();
                gate.opened.notified().await;
            }
        }
        state.done.pop();
        state
            .done
            .push(format!("{}:{}", self.step, ctx.direction()));
        if self.step == "notify" {
            ctx.emit(
                Message::json(
                    "order.confirmed",
                    &serde_json::json!({ "order": state.order }),
                )?
                .key(format!("order-{}", state.order))?,
            )?;
        }
        Ok(())
    }
}

/// The retry policy of every scripted step and compensation: 1 s doubling,
/// 3 attempts, no jitter, no elapsed cap.
#[must_use]
pub fn test_policy() -> RetryPolicy {
    RetryPolicy::builder()
        .initial_delay(Duration::from_secs(1))
        .multiplier(2.0)
        .max_delay(Duration::from_secs(10))
        .max_attempts(3)
        .no_max_elapsed()
        .jitter(Jitter::None)
        .build()
        .expect("valid policy")
}

/// The per-attempt timeout of every scripted step: 5 s.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The scripted checkout saga, named `scripted`, at `version`: every step
/// and compensation with [`test_policy`] and [`TEST_TIMEOUT`].
#[must_use]
pub fn scripted_saga(script: &Arc<Script>, version: u32) -> SagaDefinition<TestState> {
    scripted_saga_with(script, version, &test_policy(), TEST_TIMEOUT)
}

/// The scripted checkout saga with another retry policy and per-attempt
/// timeout for every step and compensation.
#[must_use]
pub fn scripted_saga_with(
    script: &Arc<Script>,
    version: u32,
    policy: &RetryPolicy,
    timeout: Duration,
) -> SagaDefinition<TestState> {
    build_scripted(script, version, policy, timeout, ["charge", "reserve"])
}

/// The scripted checkout saga with `charge` and `reserve` swapped: the
/// same name and version deployed with another shape (its
/// [fingerprint](crate::SagaShape::fingerprint) differs), as in a rolling
/// deploy of a changed definition that forgot to bump the version.
#[must_use]
pub fn scripted_saga_swapped(script: &Arc<Script>, version: u32) -> SagaDefinition<TestState> {
    build_scripted(
        script,
        version,
        &test_policy(),
        TEST_TIMEOUT,
        ["reserve", "charge"],
    )
}

fn build_scripted(
    script: &Arc<Script>,
    version: u32,
    policy: &RetryPolicy,
    timeout: Duration,
    middle: [&'static str; 2],
) -> SagaDefinition<TestState> {
    let act = |step: &'static str| Scripted {
        script: script.clone(),
        step,
    };
    let p = || policy.clone();
    let compensated = |name: &'static str| {
        Step::new(name, act(name))
            .retry(p())
            .timeout(timeout)
            .compensate_with(act(name))
            .compensation_retry(p())
            .compensation_timeout(timeout)
    };
    SagaDefinition::builder("scripted", version)
        .step(
            Step::new("validate", act("validate"))
                .retry(p())
                .timeout(timeout)
                .no_compensation(),
        )
        .step(compensated(middle[0]))
        .step(compensated(middle[1]))
        .pivot(
            Step::new("confirm", act("confirm"))
                .retry(p())
                .timeout(timeout),
        )
        .step(
            Step::new("notify", act("notify"))
                .retry(p())
                .timeout(timeout),
        )
        .build()
        .expect("valid definition")
}
