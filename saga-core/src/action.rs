//! What a step runs: actions, and the dependencies they are handed.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::context::StepContext;
use crate::error::StepError;

/// A boxed, sendable future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a step (or a compensation) does: an async function of the
/// definition's dependencies `D`, the step's context and the saga's state.
///
/// An action holds no clients. What it needs to reach the world (HTTP
/// clients, a database pool) is the definition's *dependencies*, `D`,
/// handed to every attempt by the executor the definition is registered on
/// ([`ExecutorBuilder::register_with`](crate::ExecutorBuilder::register_with)).
/// So a definition can be built, drawn and compared
/// ([`SagaDefinition::shape`](crate::SagaDefinition::shape)) with no
/// database, network or service at hand.
///
/// Implemented for:
/// - `async fn(&mut StepContext, &mut S) -> Result<(), StepError>` items and
///   closures wrapped in [`action_fn`], for every `D` (they ignore it);
/// - closures that take the dependencies, wrapped in [`with_deps`];
/// - by hand, usually for unit structs:
///
/// ```
/// use saga_core::{Action, StepContext, StepError};
///
/// struct Gateway { url: String }
/// struct Charge;
///
/// impl Action<u64, Gateway> for Charge {
///     async fn run(&self, gateway: &Gateway, ctx: &mut StepContext, amount: &mut u64)
///         -> Result<(), StepError>
///     {
///         let _ = (&gateway.url, ctx.idempotency_key(), amount);
///         Ok(())
///     }
/// }
/// ```
pub trait Action<S, D = ()>: Send + Sync + 'static {
    /// Runs one attempt. Changes to `state` are kept only if it succeeds.
    fn run<'a>(
        &'a self,
        deps: &'a D,
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

impl<S, D, F> Action<S, D> for F
where
    S: Send + 'static,
    F: for<'a> ActionFn<'a, S> + Send + Sync + 'static,
{
    fn run<'a>(
        &'a self,
        _: &'a D,
        ctx: &'a mut StepContext,
        state: &'a mut S,
    ) -> impl Future<Output = Result<(), StepError>> + Send + 'a {
        (self)(ctx, state)
    }
}

/// Turns a closure returning a boxed future into an [`Action`] that needs
/// no dependencies:
///
/// ```
/// use saga_core::{action_fn, SagaDefinition, Step};
///
/// let charge = action_fn(|ctx, amount: &mut u64| {
///     Box::pin(async move {
///         let _ = (ctx.idempotency_key(), amount);
///         Ok(())
///     })
/// });
/// let saga = SagaDefinition::<u64>::builder("pay", 1)
///     .pivot(Step::new("charge_payment", charge))
///     .build()?;
/// # let _ = saga;
/// # Ok::<(), saga_core::BuildError>(())
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

/// Turns a closure of the dependencies, the context and the state,
/// returning a boxed future, into an [`Action`]:
///
/// ```
/// use saga_core::{with_deps, SagaDefinition, Step};
///
/// struct Gateway { url: String }
///
/// let charge = with_deps(|gateway: &Gateway, ctx, amount: &mut u64| {
///     Box::pin(async move {
///         let _ = (&gateway.url, ctx.idempotency_key(), amount);
///         Ok(())
///     })
/// });
/// let saga = SagaDefinition::<u64, Gateway>::builder("pay", 1)
///     .pivot(Step::new("charge_payment", charge))
///     .build()?;
/// # let _ = saga;
/// # Ok::<(), saga_core::BuildError>(())
/// ```
pub fn with_deps<S, D, F>(f: F) -> WithDeps<F>
where
    F: for<'a> Fn(&'a D, &'a mut StepContext, &'a mut S) -> BoxFuture<'a, Result<(), StepError>>
        + Send
        + Sync
        + 'static,
{
    WithDeps(f)
}

/// A closure that takes the definition's dependencies; see [`with_deps`].
#[derive(Clone)]
pub struct WithDeps<F>(F);

impl<F> fmt::Debug for WithDeps<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WithDeps").finish_non_exhaustive()
    }
}

impl<S, D, F> Action<S, D> for WithDeps<F>
where
    F: for<'a> Fn(&'a D, &'a mut StepContext, &'a mut S) -> BoxFuture<'a, Result<(), StepError>>
        + Send
        + Sync
        + 'static,
{
    fn run<'a>(
        &'a self,
        deps: &'a D,
        ctx: &'a mut StepContext,
        state: &'a mut S,
    ) -> impl Future<Output = Result<(), StepError>> + Send + 'a {
        (self.0)(deps, ctx, state)
    }
}

/// An [`Action`] behind a pointer, for the definition to hold and the
/// executor to call.
trait DynAction<S, D>: Send + Sync + 'static {
    fn call<'a>(
        &'a self,
        deps: &'a D,
        ctx: &'a mut StepContext,
        state: &'a mut S,
    ) -> BoxFuture<'a, Result<(), StepError>>;
}

impl<S, D, A: Action<S, D>> DynAction<S, D> for A {
    fn call<'a>(
        &'a self,
        deps: &'a D,
        ctx: &'a mut StepContext,
        state: &'a mut S,
    ) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(self.run(deps, ctx, state))
    }
}

/// Any [`Action`], type-erased and cheap to clone: what a definition holds
/// for each step and direction, and what a [`StepLayer`](crate::StepLayer)
/// receives and returns.
pub struct BoxAction<S, D = ()>(Arc<dyn DynAction<S, D>>);

impl<S: 'static, D: 'static> BoxAction<S, D> {
    /// Boxes `action`.
    pub fn new(action: impl Action<S, D>) -> Self {
        BoxAction(Arc::new(action))
    }

    /// Runs one attempt of the boxed action.
    pub fn call<'a>(
        &'a self,
        deps: &'a D,
        ctx: &'a mut StepContext,
        state: &'a mut S,
    ) -> BoxFuture<'a, Result<(), StepError>> {
        self.0.call(deps, ctx, state)
    }
}

impl<S, D> Clone for BoxAction<S, D> {
    fn clone(&self) -> Self {
        BoxAction(self.0.clone())
    }
}

impl<S, D> fmt::Debug for BoxAction<S, D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BoxAction").finish_non_exhaustive()
    }
}

impl<S: 'static, D: 'static> Action<S, D> for BoxAction<S, D> {
    fn run<'a>(
        &'a self,
        deps: &'a D,
        ctx: &'a mut StepContext,
        state: &'a mut S,
    ) -> impl Future<Output = Result<(), StepError>> + Send + 'a {
        self.call(deps, ctx, state)
    }
}
