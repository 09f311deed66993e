//! Layers: wrapping a definition's actions from outside, the way tower
//! layers wrap services.

use crate::action::BoxAction;
use crate::ids::{Direction, SagaKind, StepName};
use crate::machine::StepKind;

/// Which action a [`StepLayer`] is being asked to wrap: one step of one
/// saga, in one direction.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct StepSide<'a> {
    /// The saga's name and version.
    pub saga: &'a SagaKind,
    /// The step's name.
    pub step: &'a StepName,
    /// The step's role.
    pub kind: StepKind,
    /// The forward action or the compensation.
    pub direction: Direction,
}

/// Wraps (or replaces) the actions of a definition: given each step's
/// forward action and compensation in turn, with which step and direction
/// it is, returns the action to run instead. Applied with
/// [`SagaDefinition::layer`](crate::SagaDefinition::layer).
///
/// What a layer does around its inner action (time it, count it, stall
/// after it for a test) is its own; what it cannot change is the
/// definition's [shape](crate::SagaShape): names, roles, order, policies
/// and timeouts stay as built.
///
/// Implemented for closures `Fn(StepSide<'_>, BoxAction<S, D>) -> BoxAction<S, D>`:
///
/// ```
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicUsize, Ordering};
/// use saga_core::{Action, BoxAction, Direction, SagaDefinition, Step, StepContext, StepError, StepSide};
///
/// async fn ok(_: &mut StepContext, _: &mut u8) -> Result<(), StepError> { Ok(()) }
///
/// /// Counts the forward attempts that succeeded.
/// struct Counted { inner: BoxAction<u8>, done: Arc<AtomicUsize> }
/// impl Action<u8> for Counted {
///     async fn run(&self, deps: &(), ctx: &mut StepContext, s: &mut u8) -> Result<(), StepError> {
///         self.inner.call(deps, ctx, s).await?;
///         self.done.fetch_add(1, Ordering::Relaxed);
///         Ok(())
///     }
/// }
///
/// let done = Arc::new(AtomicUsize::new(0));
/// let counted = done.clone();
/// let saga = SagaDefinition::<u8>::builder("pay", 1)
///     .step(Step::new("charge", ok).compensate_with(ok))
///     .pivot(Step::new("confirm", ok))
///     .build()?
///     .layer(move |side: StepSide<'_>, inner: BoxAction<u8>| match side.direction {
///         Direction::Forward => BoxAction::new(Counted { inner, done: counted.clone() }),
///         Direction::Compensate => inner,
///     });
/// # let _ = (saga, done);
/// # Ok::<(), saga_core::BuildError>(())
/// ```
pub trait StepLayer<S, D = ()> {
    /// The action to run for `side` instead of `inner`.
    fn layer(&self, side: StepSide<'_>, inner: BoxAction<S, D>) -> BoxAction<S, D>;
}

impl<S, D, F> StepLayer<S, D> for F
where
    F: Fn(StepSide<'_>, BoxAction<S, D>) -> BoxAction<S, D>,
{
    fn layer(&self, side: StepSide<'_>, inner: BoxAction<S, D>) -> BoxAction<S, D> {
        self(side, inner)
    }
}
