//! The checkout saga.
//!
//! ```text
//! validate_order ─► charge_payment ─► reserve_inventory ─► confirm_order ─► send_confirmation
//!  (read only)       ↺ refund           ↺ release             (pivot)          (retriable)
//! ```
//!
//! - `validate_order` only reads, so it declares that it needs no
//!   compensation.
//! - `charge_payment` and `reserve_inventory` call the payment and
//!   inventory services with the step's idempotency key; their
//!   compensations pass the *forward* key so the service can find what, if
//!   anything, to undo (a timed-out charge may or may not have happened).
//!   Each call also names the attempt's lease
//!   ([`StepContext::lease_token`]), which the services log.
//! - `confirm_order` is the pivot: a write to the shop's own database.
//!   Once it succeeds the saga only goes forward.
//! - `send_confirmation` emits an `order.confirmed` message into the outbox,
//!   committed with the step's result; the dispatcher delivers it to the
//!   email service, which deduplicates it through its inbox.

use std::time::Duration;

use saga_core::{
    Action, Jitter, Message, RetryPolicy, SagaDefinition, SagaShape, Step, StepContext, StepError,
};

use crate::clients::Downstream;
use crate::model::{Checkout, ORDER_CONFIRMED, OrderConfirmed};
use crate::shop::Shop;

/// The saga's name.
pub const NAME: &str = "checkout";
/// The definition's version.
pub const VERSION: u32 = 1;

/// What the checkout saga's steps are handed when they run: supplied where
/// the definition is registered on an executor
/// ([`ExecutorBuilder::register_with`](saga_core::ExecutorBuilder::register_with)),
/// never held by the definition.
#[derive(Debug, Clone)]
pub struct Deps {
    /// The payment and inventory clients.
    pub downstream: Downstream,
    /// The shop's own database.
    pub shop: Shop,
}

/// How the checkout saga's steps are retried and timed out.
#[derive(Debug, Clone)]
pub struct Policies {
    /// Retry policy of the forward steps that call other services.
    pub retry: RetryPolicy,
    /// Retry policy of the compensations.
    pub compensation_retry: RetryPolicy,
    /// Per-attempt timeout of every step.
    pub step_timeout: Duration,
}

impl Default for Policies {
    /// The demo's policies ([`demo_retry`], [`demo_compensation_retry`]),
    /// 5 s per attempt.
    fn default() -> Self {
        Policies {
            retry: demo_retry(),
            compensation_retry: demo_compensation_retry(),
            step_timeout: Duration::from_secs(5),
        }
    }
}

/// Retry policy of the calls to other services: 200 ms doubling to 2 s,
/// 4 attempts within 30 s, equal jitter. Short, so the demo finishes in
/// seconds; production values are the library's defaults (seconds, not
/// milliseconds).
#[must_use]
pub fn demo_retry() -> RetryPolicy {
    RetryPolicy::builder()
        .initial_delay(Duration::from_millis(200))
        .multiplier(2.0)
        .max_delay(Duration::from_secs(2))
        .max_attempts(4)
        .max_elapsed(Duration::from_secs(30))
        .jitter(Jitter::Equal)
        .build()
        .expect("valid policy")
}

/// Retry policy of the compensations: more patient than the forward steps.
#[must_use]
pub fn demo_compensation_retry() -> RetryPolicy {
    RetryPolicy::builder()
        .initial_delay(Duration::from_millis(200))
        .multiplier(2.0)
        .max_delay(Duration::from_secs(2))
        .max_attempts(12)
        .max_elapsed(Duration::from_secs(120))
        .jitter(Jitter::Equal)
        .build()
        .expect("valid policy")
}

struct ValidateOrder;
impl Action<Checkout, Deps> for ValidateOrder {
    async fn run(
        &self,
        deps: &Deps,
        _: &mut StepContext,
        s: &mut Checkout,
    ) -> Result<(), StepError> {
        let Some((order, _)) = deps.shop.get(&s.order.id).await? else {
            return Err(StepError::permanent(InvalidOrder("no such order")));
        };
        if order.lines.is_empty() || order.lines.iter().any(|l| l.qty == 0) {
            return Err(StepError::permanent(InvalidOrder("nothing to buy")));
        }
        if order.total_cents <= 0 {
            return Err(StepError::permanent(InvalidOrder(
                "the total must be positive",
            )));
        }
        Ok(())
    }
}

/// An order that cannot be checked out.
#[derive(Debug, thiserror::Error)]
#[error("invalid order: {0}")]
pub struct InvalidOrder(&'static str);

struct ChargePayment;
impl Action<Checkout, Deps> for ChargePayment {
    async fn run(
        &self,
        deps: &Deps,
        ctx: &mut StepContext,
        s: &mut Checkout,
    ) -> Result<(), StepError> {
        let charge_id = deps
            .downstream
            .under_lease(ctx.lease_token())
            .charge(ctx.idempotency_key(), &s.order)
            .await?;
        s.charge_id = Some(charge_id);
        Ok(())
    }
}

struct RefundPayment;
impl Action<Checkout, Deps> for RefundPayment {
    async fn run(
        &self,
        deps: &Deps,
        ctx: &mut StepContext,
        s: &mut Checkout,
    ) -> Result<(), StepError> {
        // The charge may have happened even if we never heard back: the
        // payment service looks it up by the charge's own key.
        deps.downstream
            .under_lease(ctx.lease_token())
            .refund(ctx.idempotency_key(), ctx.forward_key())
            .await?;
        s.charge_id = None;
        Ok(())
    }
}

struct ReserveInventory;
impl Action<Checkout, Deps> for ReserveInventory {
    async fn run(
        &self,
        deps: &Deps,
        ctx: &mut StepContext,
        s: &mut Checkout,
    ) -> Result<(), StepError> {
        let id = deps
            .downstream
            .under_lease(ctx.lease_token())
            .reserve(ctx.idempotency_key(), &s.order.id, &s.order.lines)
            .await?;
        s.reservation_id = Some(id);
        Ok(())
    }
}

struct ReleaseInventory;
impl Action<Checkout, Deps> for ReleaseInventory {
    async fn run(
        &self,
        deps: &Deps,
        ctx: &mut StepContext,
        s: &mut Checkout,
    ) -> Result<(), StepError> {
        deps.downstream
            .under_lease(ctx.lease_token())
            .release(ctx.idempotency_key(), ctx.forward_key())
            .await?;
        s.reservation_id = None;
        Ok(())
    }
}

struct ConfirmOrder;
impl Action<Checkout, Deps> for ConfirmOrder {
    async fn run(
        &self,
        deps: &Deps,
        _: &mut StepContext,
        s: &mut Checkout,
    ) -> Result<(), StepError> {
        if !deps.shop.confirm(&s.order.id).await? {
            return Err(StepError::permanent(InvalidOrder("the order vanished")));
        }
        Ok(())
    }
}

/// `send_confirmation`: emits `order.confirmed` into the outbox, committed
/// with the step's result. It needs no dependencies.
async fn send_confirmation(ctx: &mut StepContext, s: &mut Checkout) -> Result<(), StepError> {
    let confirmed = OrderConfirmed::of(&s.order);
    ctx.emit(Message::json(ORDER_CONFIRMED, &confirmed)?.key(s.order.id.clone())?)?;
    Ok(())
}

/// The checkout saga's definition: its steps, roles and policies. It
/// holds no clients, so it is built (and drawn, and compared) with no
/// database or service at hand; its actions are handed [`Deps`] where it
/// is registered:
///
/// ```no_run
/// # async fn register(store: saga_postgres::PgSagaStore, deps: checkout::saga::Deps)
/// #     -> Result<(), Box<dyn std::error::Error>> {
/// use checkout::saga::{self, Policies};
///
/// let executor = saga_core::Executor::builder(store)
///     .register_with(saga::definition(&Policies::default())?, deps)
///     .build()?;
/// # let _ = executor;
/// # Ok(())
/// # }
/// ```
pub fn definition(
    policies: &Policies,
) -> Result<SagaDefinition<Checkout, Deps>, saga_core::BuildError> {
    let t = policies.step_timeout;
    SagaDefinition::builder(NAME, VERSION)
        .step(
            // A local read: retried patiently (with the compensations'
            // policy, like the pivot). Giving up on it for a passing
            // database fault would refuse a good order.
            Step::new("validate_order", ValidateOrder)
                .retry(policies.compensation_retry.clone())
                .timeout(t)
                .no_compensation(),
        )
        .step(
            Step::new("charge_payment", ChargePayment)
                .retry(policies.retry.clone())
                .timeout(t)
                .compensate_with(RefundPayment)
                .compensation_retry(policies.compensation_retry.clone())
                .compensation_timeout(t),
        )
        .step(
            Step::new("reserve_inventory", ReserveInventory)
                .retry(policies.retry.clone())
                .timeout(t)
                .compensate_with(ReleaseInventory)
                .compensation_retry(policies.compensation_retry.clone())
                .compensation_timeout(t),
        )
        .pivot(
            // A local, idempotent write: retried patiently. Giving up here
            // would leave its outcome in doubt and park the saga.
            Step::new("confirm_order", ConfirmOrder)
                .retry(policies.compensation_retry.clone())
                .timeout(t),
        )
        .step(
            Step::new("send_confirmation", send_confirmation)
                .retry(policies.compensation_retry.clone())
                .timeout(t),
        )
        .build()
}

/// The checkout saga's shape with the demo's [`Policies`]: its names,
/// roles, order and policies, for drawing and inspecting it
/// ([`SagaShape::plan`]). Needs no database, network or client.
#[must_use]
pub fn shape() -> SagaShape {
    definition(&Policies::default())
        .expect("a valid definition")
        .shape()
        .clone()
}

/// The checkout saga drawn as a Mermaid flowchart, from its [`shape`].
#[must_use]
pub fn diagram() -> String {
    shape().to_mermaid()
}
