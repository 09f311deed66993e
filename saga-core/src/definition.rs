//! Typed saga definitions.

use std::collections::HashMap;
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::action::{Action, BoxAction};
use crate::error::{BuildError, DefinitionProblem, InvalidName};
use crate::fingerprint::ShapeFingerprint;
use crate::ids::{Direction, SagaKind, SagaName, StepName};
use crate::layer::{StepLayer, StepSide};
use crate::machine::StepKind;
use crate::retry::RetryPolicy;
use crate::shape::{SagaShape, SideShape, StepShape};

/// The default per-attempt timeout of a step or compensation: generous, so
/// that a slow first call (a cold start) is not cut short.
pub const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(30);

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
/// `D` is what its actions are handed to reach the world (see [`Action`]).
#[must_use = "a step does nothing until added to a saga builder"]
pub struct Step<S, D = (), C = Undecided> {
    name: Result<StepName, InvalidName>,
    aliases: Vec<Result<StepName, InvalidName>>,
    forward: BoxAction<S, D>,
    compensation: Option<BoxAction<S, D>>,
    retry: RetryPolicy,
    compensation_retry: RetryPolicy,
    timeout: Duration,
    compensation_timeout: Duration,
    _decision: PhantomData<fn() -> C>,
}

impl<S: Send + 'static, D: 'static> Step<S, D, Undecided> {
    /// A step named `name` (1 to 64 ASCII letters, digits, `_`, `-`, `.`;
    /// checked by [`SagaBuilder::build`]) running `action`.
    pub fn new(name: impl AsRef<str>, action: impl Action<S, D>) -> Self {
        Step {
            name: StepName::new(name),
            aliases: Vec::new(),
            forward: BoxAction::new(action),
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
    /// ([`StepContext::forward_key`](crate::StepContext::forward_key)) to look up what happened.
    pub fn compensate_with(self, compensation: impl Action<S, D>) -> Step<S, D, WithCompensation> {
        Step {
            compensation: Some(BoxAction::new(compensation)),
            ..self.decided()
        }
    }

    /// Declares that the step changes nothing that would need undoing.
    pub fn no_compensation(self) -> Step<S, D, WithoutCompensation> {
        self.decided()
    }
}

impl<S, D, C> Step<S, D, C> {
    fn decided<E>(self) -> Step<S, D, E> {
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

impl<S, D> Step<S, D, WithCompensation> {
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

impl<S, D, C> fmt::Debug for Step<S, D, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Step")
            .field("name", &self.name)
            .field("has_compensation", &self.compensation.is_some())
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// A step as it sits in a built definition.
pub(crate) struct StepDef<S, D> {
    pub(crate) name: StepName,
    /// What keys and message ids derive from: the oldest name.
    pub(crate) key_name: StepName,
    pub(crate) kind: StepKind,
    pub(crate) forward: BoxAction<S, D>,
    pub(crate) compensation: Option<BoxAction<S, D>>,
    pub(crate) retry: RetryPolicy,
    pub(crate) compensation_retry: RetryPolicy,
    pub(crate) timeout: Duration,
    pub(crate) compensation_timeout: Duration,
}

impl<S, D> Clone for StepDef<S, D> {
    fn clone(&self) -> Self {
        StepDef {
            name: self.name.clone(),
            key_name: self.key_name.clone(),
            kind: self.kind,
            forward: self.forward.clone(),
            compensation: self.compensation.clone(),
            retry: self.retry.clone(),
            compensation_retry: self.compensation_retry.clone(),
            timeout: self.timeout,
            compensation_timeout: self.compensation_timeout,
        }
    }
}

impl<S, D> StepDef<S, D> {
    /// The action, policy and timeout for one direction.
    pub(crate) fn side(
        &self,
        direction: Direction,
    ) -> Option<(&BoxAction<S, D>, &RetryPolicy, Duration)> {
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
/// A definition is a named, versioned list of steps over a state type `S`,
/// whose actions are handed dependencies `D` when they run (see
/// [`Action`]; `()` when they need none). The builder is a typestate: before the pivot, a step cannot be added
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
pub struct SagaBuilder<S, D = (), P = BeforePivotPhase> {
    name: Result<SagaName, InvalidName>,
    version: u32,
    steps: Vec<Added<S, D>>,
    _phase: PhantomData<fn() -> P>,
}

/// A step added to a builder, its role fixed.
struct Added<S, D> {
    step: Step<S, D, ()>,
    kind: StepKind,
    aliases: Vec<Result<StepName, InvalidName>>,
}

impl<S, D, P> SagaBuilder<S, D, P> {
    fn push<C>(mut self, step: Step<S, D, C>, kind: StepKind) -> Self {
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

    fn phase<Q>(self) -> SagaBuilder<S, D, Q> {
        SagaBuilder {
            name: self.name,
            version: self.version,
            steps: self.steps,
            _phase: PhantomData,
        }
    }
}

impl<S, D> SagaBuilder<S, D, BeforePivotPhase> {
    /// Adds a step before the pivot. It must have a compensation, or be
    /// declared to need none.
    pub fn step<C: BeforePivot>(self, step: Step<S, D, C>) -> Self {
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
    /// [`StepError::permanent`](crate::StepError::permanent) when you know
    /// it did not happen.
    pub fn pivot<C: PivotOrAfter>(self, step: Step<S, D, C>) -> SagaBuilder<S, D, AfterPivotPhase> {
        self.push(step, StepKind::Pivot).phase()
    }
}

impl<S, D> SagaBuilder<S, D, AfterPivotPhase> {
    /// Adds a step after the pivot: retried until it succeeds, or parked
    /// as `Stuck` for an operator; never compensated.
    pub fn step<C: PivotOrAfter>(self, step: Step<S, D, C>) -> Self {
        self.push(step, StepKind::Retryable)
    }
}

impl<S, D, P> SagaBuilder<S, D, P>
where
    S: Serialize + DeserializeOwned + Send + 'static,
{
    /// Checks the definition: valid names, at least one step, no step name
    /// (or alias) used twice, no zero timeout.
    pub fn build(self) -> Result<SagaDefinition<S, D>, BuildError> {
        let name = self.name?;
        let problem = |problem| BuildError::InvalidDefinition {
            saga: name.clone(),
            problem,
        };
        if self.version == 0 {
            return Err(problem(DefinitionProblem::ZeroVersion));
        }
        if self.steps.is_empty() {
            return Err(problem(DefinitionProblem::NoSteps));
        }
        let mut index = HashMap::new();
        let mut steps = Vec::with_capacity(self.steps.len());
        let mut shapes = Vec::with_capacity(self.steps.len());
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
            let mut valid_aliases = Vec::with_capacity(aliases.len());
            for n in std::iter::once(Ok(step_name.clone())).chain(aliases) {
                let n = n.map_err(|e| problem(DefinitionProblem::InvalidName(e)))?;
                if index.insert(n.clone(), i).is_some() {
                    return Err(problem(DefinitionProblem::DuplicateStep(n)));
                }
                if n != step_name {
                    valid_aliases.push(n);
                }
            }
            if step.timeout.is_zero() || step.compensation_timeout.is_zero() {
                return Err(problem(DefinitionProblem::ZeroTimeout(step_name)));
            }
            let shape = StepShape {
                name: step_name.clone(),
                aliases: valid_aliases,
                kind,
                forward: SideShape {
                    retry: step.retry.clone(),
                    timeout: step.timeout,
                },
                compensation: step.compensation.as_ref().map(|_| SideShape {
                    retry: step.compensation_retry.clone(),
                    timeout: step.compensation_timeout,
                }),
            };
            steps.push(StepDef {
                key_name: shape.key_name().clone(),
                name: step_name,
                kind,
                forward: step.forward,
                compensation: step.compensation,
                retry: step.retry,
                compensation_retry: step.compensation_retry,
                timeout: step.timeout,
                compensation_timeout: step.compensation_timeout,
            });
            shapes.push(shape);
        }
        let plan = steps.iter().map(|s| s.kind).collect();
        let kind = SagaKind {
            name,
            version: self.version,
        };
        let shape = SagaShape {
            kind: kind.clone(),
            steps: shapes,
        };
        Ok(SagaDefinition {
            inner: Arc::new(Inner {
                fingerprint: shape.fingerprint(),
                shape,
                kind,
                steps,
                plan,
                index,
            }),
        })
    }
}

struct Inner<S, D> {
    kind: SagaKind,
    shape: SagaShape,
    fingerprint: ShapeFingerprint,
    steps: Vec<StepDef<S, D>>,
    plan: Vec<StepKind>,
    index: HashMap<StepName, usize>,
}

/// A built saga definition: cheap to clone, shared by clients and executors.
///
/// `D` is the dependencies its actions are handed when they run (clients,
/// pools; `()` when they need none). The definition holds none of them:
/// they are supplied where it is registered on an executor
/// ([`ExecutorBuilder::register_with`](crate::ExecutorBuilder::register_with);
/// [`register`](crate::ExecutorBuilder::register) when `D` is `()`), so a
/// definition is built, drawn ([`to_mermaid`](Self::to_mermaid)) and
/// compared ([`shape`](Self::shape)) with no infrastructure at all.
pub struct SagaDefinition<S, D = ()> {
    inner: Arc<Inner<S, D>>,
}

impl<S, D> Clone for SagaDefinition<S, D> {
    fn clone(&self) -> Self {
        SagaDefinition {
            inner: self.inner.clone(),
        }
    }
}

impl<S, D> fmt::Debug for SagaDefinition<S, D> {
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

impl<S, D> SagaDefinition<S, D> {
    /// Starts a definition named `name` (validated by `build`) at `version`.
    /// Bump the version whenever the steps change in a way that running
    /// instances must not see.
    pub fn builder(name: impl AsRef<str>, version: u32) -> SagaBuilder<S, D, BeforePivotPhase> {
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

    /// What the definition is, apart from what its actions do: names,
    /// aliases, roles, order, retry policies and timeouts. A plain value;
    /// see [`SagaShape`].
    #[must_use]
    pub fn shape(&self) -> &SagaShape {
        &self.inner.shape
    }

    /// The fingerprint of its [`shape`](Self::shape)
    /// ([`SagaShape::fingerprint`]), computed once when it was built: what
    /// every start records and every claim matches.
    ///
    /// ```
    /// use saga_core::{SagaDefinition, Step, StepContext, StepError};
    /// async fn ok(_: &mut StepContext, _: &mut u8) -> Result<(), StepError> { Ok(()) }
    /// let saga = SagaDefinition::<u8>::builder("pay", 1)
    ///     .step(Step::new("charge", ok).compensate_with(ok))
    ///     .build()?;
    /// assert_eq!(saga.fingerprint(), saga.shape().fingerprint());
    /// # Ok::<(), saga_core::BuildError>(())
    /// ```
    #[must_use]
    pub fn fingerprint(&self) -> ShapeFingerprint {
        self.inner.fingerprint
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

    /// The definition with each of its actions (every step, both
    /// directions) wrapped, or replaced, by `layer`: how a cross-cutting
    /// concern (metrics, a fault injected by a test) is added from outside
    /// the code that defines the saga. Each call wraps what is there, so
    /// the last layer given is the outermost: it runs first and sees the
    /// result last. The [shape](Self::shape) is unchanged. An executor
    /// the definition was already registered on keeps the actions it was
    /// registered with.
    ///
    /// ```
    /// use saga_core::{BoxAction, SagaDefinition, Step, StepContext, StepError, StepSide, action_fn};
    /// async fn ok(_: &mut StepContext, _: &mut u8) -> Result<(), StepError> { Ok(()) }
    ///
    /// let saga = SagaDefinition::<u8>::builder("pay", 1)
    ///     .pivot(Step::new("charge", ok))
    ///     .step(Step::new("notify", ok))
    ///     .build()?;
    /// // Replace one step's action; leave the others as they are.
    /// let quiet = saga.clone().layer(|side: StepSide<'_>, inner: BoxAction<u8>| {
    ///     if side.step.as_str() == "notify" {
    ///         BoxAction::new(action_fn(|_, _: &mut u8| Box::pin(async { Ok(()) })))
    ///     } else {
    ///         inner
    ///     }
    /// });
    /// assert_eq!(quiet.shape(), saga.shape());
    /// # Ok::<(), saga_core::BuildError>(())
    /// ```
    #[must_use]
    pub fn layer(self, layer: impl StepLayer<S, D>) -> Self {
        let inner = &self.inner;
        let steps = inner
            .steps
            .iter()
            .map(|def| {
                let side = |direction| StepSide {
                    saga: &inner.kind,
                    step: &def.name,
                    kind: def.kind,
                    direction,
                };
                let mut def = def.clone();
                def.forward = layer.layer(side(Direction::Forward), def.forward);
                def.compensation = def
                    .compensation
                    .map(|c| layer.layer(side(Direction::Compensate), c));
                def
            })
            .collect();
        SagaDefinition {
            inner: Arc::new(Inner {
                kind: inner.kind.clone(),
                shape: inner.shape.clone(),
                fingerprint: inner.fingerprint,
                steps,
                plan: inner.plan.clone(),
                index: inner.index.clone(),
            }),
        }
    }

    pub(crate) fn step_def(&self, index: usize) -> Option<&StepDef<S, D>> {
        self.inner.steps.get(index)
    }
}
