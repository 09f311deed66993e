//! Typed saga definitions.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::context::StepContext;
use crate::error::{BuildError, DefinitionProblem, InvalidName, StepError};
use crate::ids::{Direction, SagaKind, SagaName, StepName};
use crate::machine::StepKind;
use crate::retry::RetryPolicy;

/// A boxed, sendable future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The default per-attempt timeout of a step or compensation: generous, so
/// that a slow first call (a cold start) is not cut short.
pub const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// What a step (or a compensation) does: an async function of the step's
/// context and the saga's state.
///
/// Implemented for `async fn(&mut StepContext, &mut S) -> Result<(), StepError>`
/// items, for closures wrapped in [`action_fn`], and by hand for structs
/// holding clients:
///
/// ```
/// use saga_core::{Action, StepContext, StepError};
///
/// struct Charge { gateway: String }
///
/// impl Action<u64> for Charge {
///     async fn run(&self, ctx: &mut StepContext, amount: &mut u64) -> Result<(), StepError> {
///         let _ = (&self.gateway, ctx.idempotency_key(), amount);
///         Ok(())
///     }
/// }
/// ```
pub trait Action<S>: Send + Sync + 'static {
    /// Runs one attempt. Changes to `state` are kept only if it succeeds.
    fn run<'a>(
        &'a self,
        ctx: &'a mut StepContext,
        state: &'a mut S,
    ) -> impl Future<Output = Result<(), StepError>> + Send + 'a;
}

/// The shape of an `async fn(&mut StepContext, &mut S)`: names the future it
/// returns for each lifetime. Implemented automatically; you never need to
/// name it.
pub trait ActionFn<'a, S: 'a>: Fn(&'a mut StepContext, &'a mut S) -> Self::Fut {
    /// The future returned.
    type Fut: Future<Output = Result<(), StepError>> + Send + 'a;
}

impl<'a, S: 'a, F, Fut> ActionFn<'a, S> for F
where
    F: Fn(&'a mut StepContext, &'a mut S) -> Fut,
    Fut: Future<Output = Result<(), StepError>> + Send + 'a,
{
    type Fut = Fut;
}

impl<S, F> Action<S> for F
where
    S: Send + 'static,
    F: for<'a> ActionFn<'a, S> + Send + Sync + 'static,
{
    fn run<'a>(
        &'a self,
        ctx: &'a mut StepContext,
        state: &'a mut S,
    ) -> impl Future<Output = Result<(), StepError>> + Send + 'a {
        (self)(ctx, state)
    }
}

/// Turns a closure returning a boxed future into an [`Action`], so it can
/// capture clients:
///
/// ```
/// use std::sync::Arc;
/// use saga_core::{action_fn, Step};
///
/// let gateway = Arc::new(String::from("https://pay.example"));
/// let charge = action_fn(move |ctx, amount: &mut u64| {
///     let gateway = gateway.clone();
///     Box::pin(async move {
///         let _ = (gateway, ctx.idempotency_key(), amount);
///         Ok(())
///     })
/// });
/// let step = Step::new("charge_payment", charge);
/// # let _ = step;
/// ```
pub fn action_fn<S, F>(f: F) -> F
where
    F: for<'a> Fn(&'a mut StepContext, &'a mut S) -> BoxFuture<'a, Result<(), StepError>>
        + Send
        + Sync
        + 'static,
{
    f
}

/// An [`Action`] behind a pointer.
pub(crate) trait DynAction<S>: Send + Sync + 'static {
    fn call<'a>(
        &'a self,
        ctx: &'a mut StepContext,
        state: &'a mut S,
    ) -> BoxFuture<'a, Result<(), StepError>>;
}

impl<S, A: Action<S>> DynAction<S> for A {
    fn call<'a>(
        &'a self,
        ctx: &'a mut StepContext,
        state: &'a mut S,
    ) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(self.run(ctx, state))
    }
}

mod sealed {
    pub trait Sealed {}
}

/// Marker: a step whose compensation has not been decided yet.
#[derive(Debug)]
pub enum Undecided {}
/// Marker: a step with a compensation.
#[derive(Debug)]
pub enum WithCompensation {}
/// Marker: a step declared to need no compensation.
#[derive(Debug)]
pub enum WithoutCompensation {}

impl sealed::Sealed for Undecided {}
impl sealed::Sealed for WithCompensation {}
impl sealed::Sealed for WithoutCompensation {}

/// Steps that may come before the pivot: those whose compensation has been
/// decided.
#[diagnostic::on_unimplemented(
    message = "this step has no compensation decision",
    label = "steps before the pivot need a compensation",
    note = "call `.compensate_with(undo)` on the step, or `.no_compensation()` if it changes nothing (a validation, a read)"
)]
pub trait BeforePivot: sealed::Sealed {}
impl BeforePivot for WithCompensation {}
impl BeforePivot for WithoutCompensation {}

/// Steps that may be the pivot or come after it: never compensated.
#[diagnostic::on_unimplemented(
    message = "the pivot and the steps after it are never compensated",
    label = "this step was given a compensation decision",
    note = "past the pivot the saga only goes forward: steps are retried until they succeed or the saga is parked; remove `.compensate_with(..)` / `.no_compensation()`"
)]
pub trait PivotOrAfter: sealed::Sealed {}
impl PivotOrAfter for Undecided {}

/// One step of a saga, being configured.
///
/// `C` records whether its compensation has been decided; the saga builder
/// uses it to refuse, at compile time, a step before the pivot without a
/// decision and a compensation after the pivot.
#[must_use = "a step does nothing until added to a saga builder"]
pub struct Step<S, C = Undecided> {
    name: Result<StepName, InvalidName>,
    aliases: Vec<Result<StepName, InvalidName>>,
    forward: Arc<dyn DynAction<S>>,
    compensation: Option<Arc<dyn DynAction<S>>>,
    retry: RetryPolicy,
    compensation_retry: RetryPolicy,
    timeout: Duration,
    compensation_timeout: Duration,
    _decision: PhantomData<fn() -> C>,
}

impl<S: Send + 'static> Step<S, Undecided> {
    /// A step named `name` (1 to 64 ASCII letters, digits, `_`, `-`, `.`;
    /// checked by [`SagaBuilder::build`]) running `action`.
    pub fn new(name: impl AsRef<str>, action: impl Action<S>) -> Self {
        Step {
            name: StepName::new(name),
            aliases: Vec::new(),
            forward: Arc::new(action),
            compensation: None,
            retry: RetryPolicy::default(),
            compensation_retry: RetryPolicy::compensation_default(),
            timeout: DEFAULT_STEP_TIMEOUT,
            compensation_timeout: DEFAULT_STEP_TIMEOUT,
            _decision: PhantomData,
        }
    }

    /// Pairs the step with the action that undoes it. The compensation must
    /// tolerate "nothing to undo": it runs even when the forward action
    /// failed or timed out, and gets the forward action's idempotency key
    /// ([`StepContext::forward_key`]) to look up what happened.
    pub fn compensate_with(self, compensation: impl Action<S>) -> Step<S, WithCompensation> {
        Step {
            compensation: Some(Arc::new(compensation)),
            ..self.decided()
        }
    }

    /// Declares that the step changes nothing that would need undoing.
    pub fn no_compensation(self) -> Step<S, WithoutCompensation> {
        self.decided()
    }

    fn decided<D>(self) -> Step<S, D> {
        Step {
            name: self.name,
            aliases: self.aliases,
            forward: self.forward,
            compensation: self.compensation,
            retry: self.retry,
            compensation_retry: self.compensation_retry,
            timeout: self.timeout,
            compensation_timeout: self.compensation_timeout,
            _decision: PhantomData,
        }
    }
}

impl<S, C> Step<S, C> {
    /// The forward action's retry policy (default: [`RetryPolicy::default`]).
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// The forward action's per-attempt timeout (default 30 s). A timeout is
    /// a retryable failure whose outcome is unknown.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// A former name of this step, so that instances recorded under the old
    /// name still resolve after a rename. Give aliases oldest first: the
    /// step's idempotency keys and message ids keep deriving from its
    /// *oldest* name, so a rename never changes them under an instance in
    /// flight (a changed key would let a retried charge charge again, or a
    /// refund miss the charge).
    pub fn alias(mut self, old_name: impl AsRef<str>) -> Self {
        self.aliases.push(StepName::new(old_name));
        self
    }
}

impl<S> Step<S, WithCompensation> {
    /// The compensation's retry policy (default:
    /// [`RetryPolicy::compensation_default`]). Past it the instance is
    /// parked as `Stuck`.
    pub fn compensation_retry(mut self, policy: RetryPolicy) -> Self {
        self.compensation_retry = policy;
        self
    }

    /// The compensation's per-attempt timeout (default 30 s).
    pub fn compensation_timeout(mut self, timeout: Duration) -> Self {
        self.compensation_timeout = timeout;
        self
    }
}

impl<S, C> fmt::Debug for Step<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Step")
            .field("name", &self.name)
            .field("has_compensation", &self.compensation.is_some())
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// A step as it sits in a built definition.
pub(crate) struct StepDef<S> {
    pub(crate) name: StepName,
    /// What keys and message ids derive from: the oldest name.
    pub(crate) key_name: StepName,
    pub(crate) kind: StepKind,
    pub(crate) forward: Arc<dyn DynAction<S>>,
    pub(crate) compensation: Option<Arc<dyn DynAction<S>>>,
    pub(crate) retry: RetryPolicy,
    pub(crate) compensation_retry: RetryPolicy,
    pub(crate) timeout: Duration,
    pub(crate) compensation_timeout: Duration,
}

impl<S> StepDef<S> {
    /// The action, policy and timeout for one direction.
    pub(crate) fn side(
        &self,
        direction: Direction,
    ) -> Option<(&Arc<dyn DynAction<S>>, &RetryPolicy, Duration)> {
        match direction {
            Direction::Forward => Some((&self.forward, &self.retry, self.timeout)),
            Direction::Compensate => self
                .compensation
                .as_ref()
                .map(|c| (c, &self.compensation_retry, self.compensation_timeout)),
        }
    }
}

/// Typestate: steps added now come before the pivot.
#[derive(Debug)]
pub enum BeforePivotPhase {}
/// Typestate: the pivot has been added.
#[derive(Debug)]
pub enum AfterPivotPhase {}

/// Builds a [`SagaDefinition`].
///
/// A definition is a named, versioned list of steps over a state type `S`.
/// The builder is a typestate: before the pivot, a step cannot be added
/// until it has a compensation or is declared to need none; after the
/// pivot, a step cannot be given one. Both mistakes are compile errors.
///
/// ```
/// use saga_core::{SagaDefinition, Step, StepContext, StepError};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize)]
/// struct Order { id: u64, charged: bool }
///
/// async fn validate(_: &mut StepContext, order: &mut Order) -> Result<(), StepError> {
///     if order.id == 0 { return Err(StepError::permanent("no such order")); }
///     Ok(())
/// }
/// async fn charge(_: &mut StepContext, order: &mut Order) -> Result<(), StepError> {
///     order.charged = true;
///     Ok(())
/// }
/// async fn refund(_: &mut StepContext, order: &mut Order) -> Result<(), StepError> {
///     order.charged = false;
///     Ok(())
/// }
/// async fn confirm(_: &mut StepContext, _: &mut Order) -> Result<(), StepError> { Ok(()) }
/// async fn notify(_: &mut StepContext, _: &mut Order) -> Result<(), StepError> { Ok(()) }
///
/// let checkout = SagaDefinition::<Order>::builder("checkout", 1)
///     .step(Step::new("validate_order", validate).no_compensation())
///     .step(Step::new("charge_payment", charge).compensate_with(refund))
///     .pivot(Step::new("confirm_order", confirm))
///     .step(Step::new("send_confirmation", notify))
///     .build()?;
/// assert_eq!(checkout.step_names().collect::<Vec<_>>(),
///            ["validate_order", "charge_payment", "confirm_order", "send_confirmation"]);
/// # Ok::<(), saga_core::BuildError>(())
/// ```
#[must_use = "call .build() to get the definition"]
pub struct SagaBuilder<S, P = BeforePivotPhase> {
    name: Result<SagaName, InvalidName>,
    version: u32,
    steps: Vec<Added<S>>,
    _phase: PhantomData<fn() -> P>,
}

/// A step added to a builder, its role fixed.
struct Added<S> {
    step: Step<S, ()>,
    kind: StepKind,
    aliases: Vec<Result<StepName, InvalidName>>,
}

impl<S, P> SagaBuilder<S, P> {
    fn push<C>(mut self, step: Step<S, C>, kind: StepKind) -> Self {
        let Step {
            name,
            aliases,
            forward,
            compensation,
            retry,
            compensation_retry,
            timeout,
            compensation_timeout,
            _decision,
        } = step;
        let erased = Step {
            name,
            aliases: Vec::new(),
            forward,
            compensation,
            retry,
            compensation_retry,
            timeout,
            compensation_timeout,
            _decision: PhantomData,
        };
        self.steps.push(Added {
            step: erased,
            kind,
            aliases,
        });
        self
    }

    fn phase<Q>(self) -> SagaBuilder<S, Q> {
        SagaBuilder {
            name: self.name,
            version: self.version,
            steps: self.steps,
            _phase: PhantomData,
        }
    }
}

impl<S> SagaBuilder<S, BeforePivotPhase> {
    /// Adds a step before the pivot. It must have a compensation, or be
    /// declared to need none.
    pub fn step<C: BeforePivot>(self, step: Step<S, C>) -> Self {
        let kind = if step.compensation.is_some() {
            StepKind::Compensatable
        } else {
            StepKind::NoCompensation
        };
        self.push(step, kind)
    }

    /// Adds the pivot: the point of no return. Once it succeeds, the saga
    /// only goes forward. If it fails with a permanent error (a definitive
    /// "no"), the steps before it are compensated. If it gives up without a
    /// definitive answer (its retry budget spent on transient errors,
    /// timeouts or lost attempts), it may have taken effect: the saga is
    /// parked as `Stuck` for a person, who resumes it or, knowing it did not
    /// happen, cancels it. Give the pivot a patient retry policy, and return
    /// [`StepError::permanent`] when you know it did not happen.
    pub fn pivot<C: PivotOrAfter>(self, step: Step<S, C>) -> SagaBuilder<S, AfterPivotPhase> {
        self.push(step, StepKind::Pivot).phase()
    }
}

impl<S> SagaBuilder<S, AfterPivotPhase> {
    /// Adds a step after the pivot: retried until it succeeds, or parked
    /// as `Stuck` for an operator; never compensated.
    pub fn step<C: PivotOrAfter>(self, step: Step<S, C>) -> Self {
        self.push(step, StepKind::Retryable)
    }
}

impl<S, P> SagaBuilder<S, P>
where
    S: Serialize + DeserializeOwned + Send + 'static,
{
    /// Checks the definition: valid names, at least one step, no step name
    /// (or alias) used twice, no zero timeout.
    pub fn build(self) -> Result<SagaDefinition<S>, BuildError> {
        let name = self.name?;
        let problem = |problem| BuildError::InvalidDefinition {
            saga: name.clone(),
            problem,
        };
        if self.steps.is_empty() {
            return Err(problem(DefinitionProblem::NoSteps));
        }
        let mut index = HashMap::new();
        let mut steps = Vec::with_capacity(self.steps.len());
        for (
            i,
            Added {
                step,
                kind,
                aliases,
            },
        ) in self.steps.into_iter().enumerate()
        {
            let step_name = step
                .name
                .map_err(|e| problem(DefinitionProblem::InvalidName(e)))?;
            let mut key_name = None;
            for n in std::iter::once(Ok(step_name.clone())).chain(aliases) {
                let n = n.map_err(|e| problem(DefinitionProblem::InvalidName(e)))?;
                if index.insert(n.clone(), i).is_some() {
                    return Err(problem(DefinitionProblem::DuplicateStep(n)));
                }
                if n != step_name && key_name.is_none() {
                    key_name = Some(n);
                }
            }
            if step.timeout.is_zero() || step.compensation_timeout.is_zero() {
                return Err(problem(DefinitionProblem::ZeroTimeout(step_name)));
            }
            steps.push(StepDef {
                key_name: key_name.unwrap_or_else(|| step_name.clone()),
                name: step_name,
                kind,
                forward: step.forward,
                compensation: step.compensation,
                retry: step.retry,
                compensation_retry: step.compensation_retry,
                timeout: step.timeout,
                compensation_timeout: step.compensation_timeout,
            });
        }
        let plan = steps.iter().map(|s| s.kind).collect();
        Ok(SagaDefinition {
            inner: Arc::new(Inner {
                kind: SagaKind {
                    name,
                    version: self.version,
                },
                steps,
                plan,
                index,
            }),
        })
    }
}

struct Inner<S> {
    kind: SagaKind,
    steps: Vec<StepDef<S>>,
    plan: Vec<StepKind>,
    index: HashMap<StepName, usize>,
}

/// A built saga definition: cheap to clone, shared by clients and executors.
pub struct SagaDefinition<S> {
    inner: Arc<Inner<S>>,
}

impl<S> Clone for SagaDefinition<S> {
    fn clone(&self) -> Self {
        SagaDefinition {
            inner: self.inner.clone(),
        }
    }
}

impl<S> fmt::Debug for SagaDefinition<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SagaDefinition")
            .field("kind", &self.inner.kind)
            .field(
                "steps",
                &self
                    .inner
                    .steps
                    .iter()
                    .map(|s| (s.name.as_str(), s.kind))
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl<S> SagaDefinition<S> {
    /// Starts a definition named `name` (validated by `build`) at `version`.
    /// Bump the version whenever the steps change in a way that running
    /// instances must not see.
    pub fn builder(name: impl AsRef<str>, version: u32) -> SagaBuilder<S, BeforePivotPhase> {
        SagaBuilder {
            name: SagaName::new(name),
            version,
            steps: Vec::new(),
            _phase: PhantomData,
        }
    }

    /// The saga's name and version.
    #[must_use]
    pub fn kind(&self) -> &SagaKind {
        &self.inner.kind
    }

    /// The saga's name.
    #[must_use]
    pub fn name(&self) -> &SagaName {
        &self.inner.kind.name
    }

    /// The definition's version.
    #[must_use]
    pub fn version(&self) -> u32 {
        self.inner.kind.version
    }

    /// The role of each step, in order: what the status machine needs.
    #[must_use]
    pub fn plan(&self) -> &[StepKind] {
        &self.inner.plan
    }

    /// The step names, in order.
    pub fn step_names(&self) -> impl Iterator<Item = &str> {
        self.inner.steps.iter().map(|s| s.name.as_str())
    }

    /// The name of step `index`.
    #[must_use]
    pub fn step_name(&self, index: usize) -> Option<&StepName> {
        self.inner.steps.get(index).map(|s| &s.name)
    }

    /// The index of the step with this name or alias.
    #[must_use]
    pub fn step_index(&self, name: &str) -> Option<usize> {
        self.inner.index.get(name).copied()
    }

    pub(crate) fn step_def(&self, index: usize) -> Option<&StepDef<S>> {
        self.inner.steps.get(index)
    }
}
