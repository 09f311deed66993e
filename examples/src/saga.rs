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
//! - `confirm_order` is the pivot: a write to the shop's own database.
//!   Once it succeeds the saga only goes forward.
//! - `send_confirmation` emits an `order.confirmed` message into the outbox,
//!   committed with the step's result; the dispatcher delivers it to the
//!   email service, which deduplicates it through its inbox.

use std::time::Duration;

use saga_core::{
    Action, Jitter, Message, RetryPolicy, SagaDefinition, Step, StepContext, StepError,
};

use crate::clients::Downstream;
use crate::model::{Checkout, ORDER_CONFIRMED, OrderConfirmed};
use crate::shop::Shop;

/// The saga's name.
pub const NAME: &str = "checkout";
/// The definition's version.
pub const VERSION: u32 = 1;

/// What the checkout saga needs to run its steps.
#[derive(Clone)]
pub struct Config {
    /// The payment and inventory clients.
    pub downstream: Downstream,
    /// The shop's own database.
    pub shop: Shop,
    /// Retry policy of the forward steps that call other services.
    pub retry: RetryPolicy,
    /// Retry policy of the compensations.
    pub compensation_retry: RetryPolicy,
    /// Per-attempt timeout of every step.
    pub step_timeout: Duration,
    /// Negative control: `send_confirmation` posts straight to the email
    /// service at this URL instead of emitting into the outbox (a dual
    /// write). Breaks "exactly one email per confirmed order" on purpose.
    pub publish_directly_to: Option<String>,
    /// Called after each downstream call that applied (or may have
    /// applied) an effect, before the step's result is recorded: where a
    /// test or the chaos harness makes a worker die or stall at the worst
    /// moment.
    pub after_effect: Option<EffectHook>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("downstream", &self.downstream)
            .field("step_timeout", &self.step_timeout)
            .field("publish_directly_to", &self.publish_directly_to)
            .field("after_effect", &self.after_effect.is_some())
            .finish_non_exhaustive()
    }
}

/// Where an effect was just applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EffectPoint {
    /// The order.
    pub order_id: String,
    /// The step.
    pub step: &'static str,
    /// Forward or compensation.
    pub direction: saga_core::Direction,
}

/// A hook run after each effect; see [`Config::after_effect`].
pub type EffectHook =
    std::sync::Arc<dyn Fn(EffectPoint) -> saga_core::BoxFuture<'static, ()> + Send + Sync>;

async fn after_effect(
    hook: &Option<EffectHook>,
    order_id: &str,
    step: &'static str,
    direction: saga_core::Direction,
) {
    if let Some(hook) = hook {
        hook(EffectPoint {
            order_id: order_id.to_owned(),
            step,
            direction,
        })
        .await;
    }
}

/// Makes `reserve_inventory` of one order report and hang right after the
/// inventory service reserved the stock, before the result is recorded: a
/// worker dying at the worst moment. Shared by every worker of a run (each
/// with its own number); fires once, in whichever worker gets there.
#[derive(Debug, Clone)]
pub struct CrashHook {
    order_id: String,
    report: tokio::sync::mpsc::UnboundedSender<(usize, String)>,
    fired: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl CrashHook {
    /// Fires for `order_id`, sending (worker number, order id) to `report`.
    #[must_use]
    pub fn new(
        order_id: String,
        report: tokio::sync::mpsc::UnboundedSender<(usize, String)>,
    ) -> Self {
        CrashHook {
            order_id,
            report,
            fired: std::sync::Arc::default(),
        }
    }

    /// The hook for worker number `worker`.
    #[must_use]
    pub fn for_worker(&self, worker: usize) -> EffectHook {
        let this = self.clone();
        std::sync::Arc::new(move |point: EffectPoint| {
            let this = this.clone();
            Box::pin(async move {
                use std::sync::atomic::Ordering;
                if point.step == "reserve_inventory"
                    && point.direction == saga_core::Direction::Forward
                    && point.order_id == this.order_id
                    && !this.fired.swap(true, Ordering::SeqCst)
                {
                    let _ = this.report.send((worker, point.order_id));
                    // The worker is about to be killed: never return.
                    std::future::pending::<()>().await;
                }
            })
        })
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

struct ValidateOrder(Shop);
impl Action<Checkout> for ValidateOrder {
    async fn run(&self, _: &mut StepContext, s: &mut Checkout) -> Result<(), StepError> {
        let Some((order, _)) = self.0.get(&s.order.id).await? else {
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

struct ChargePayment(Downstream, Option<EffectHook>);
impl Action<Checkout> for ChargePayment {
    async fn run(&self, ctx: &mut StepContext, s: &mut Checkout) -> Result<(), StepError> {
        let charge_id = self.0.charge(ctx.idempotency_key(), &s.order).await?;
        after_effect(&self.1, &s.order.id, "charge_payment", ctx.direction()).await;
        s.charge_id = Some(charge_id);
        Ok(())
    }
}

struct RefundPayment(Downstream, Option<EffectHook>);
impl Action<Checkout> for RefundPayment {
    async fn run(&self, ctx: &mut StepContext, s: &mut Checkout) -> Result<(), StepError> {
        // The charge may have happened even if we never heard back: the
        // payment service looks it up by the charge's own key.
        self.0
            .refund(ctx.idempotency_key(), ctx.forward_key())
            .await?;
        after_effect(&self.1, &s.order.id, "charge_payment", ctx.direction()).await;
        s.charge_id = None;
        Ok(())
    }
}

struct ReserveInventory(Downstream, Option<EffectHook>);
impl Action<Checkout> for ReserveInventory {
    async fn run(&self, ctx: &mut StepContext, s: &mut Checkout) -> Result<(), StepError> {
        let id = self
            .0
            .reserve(ctx.idempotency_key(), &s.order.id, &s.order.lines)
            .await?;
        after_effect(&self.1, &s.order.id, "reserve_inventory", ctx.direction()).await;
        s.reservation_id = Some(id);
        Ok(())
    }
}

struct ReleaseInventory(Downstream, Option<EffectHook>);
impl Action<Checkout> for ReleaseInventory {
    async fn run(&self, ctx: &mut StepContext, s: &mut Checkout) -> Result<(), StepError> {
        self.0
            .release(ctx.idempotency_key(), ctx.forward_key())
            .await?;
        after_effect(&self.1, &s.order.id, "reserve_inventory", ctx.direction()).await;
        s.reservation_id = None;
        Ok(())
    }
}

struct ConfirmOrder(Shop);
impl Action<Checkout> for ConfirmOrder {
    async fn run(&self, _: &mut StepContext, s: &mut Checkout) -> Result<(), StepError> {
        if !self.0.confirm(&s.order.id).await? {
            return Err(StepError::permanent(InvalidOrder("the order vanished")));
        }
        Ok(())
    }
}

struct SendConfirmation {
    direct: Option<(reqwest::Client, String)>,
}
impl Action<Checkout> for SendConfirmation {
    async fn run(&self, ctx: &mut StepContext, s: &mut Checkout) -> Result<(), StepError> {
        let confirmed = OrderConfirmed {
            order_id: s.order.id.clone(),
            email: s.order.email.clone(),
            total_cents: s.order.total_cents,
        };
        let message = Message::json(ORDER_CONFIRMED, &confirmed)?.key(s.order.id.clone())?;
        match &self.direct {
            None => {
                ctx.emit(message)?;
            }
            Some((http, url)) => {
                // The negative control: a dual write, with a fresh id each
                // attempt, outside the transaction that records the step.
                let delivery = crate::services::email::Delivery::new(
                    saga_core::MessageId::new(),
                    ORDER_CONFIRMED,
                    serde_json::to_value(&confirmed)?,
                );
                http.post(format!("{url}/deliveries"))
                    .json(&delivery)
                    .send()
                    .await?
                    .error_for_status()?;
            }
        }
        Ok(())
    }
}

/// The checkout saga's definition.
pub fn definition(config: &Config) -> Result<SagaDefinition<Checkout>, saga_core::BuildError> {
    let d = &config.downstream;
    let h = &config.after_effect;
    let t = config.step_timeout;
    SagaDefinition::builder(NAME, VERSION)
        .step(
            Step::new("validate_order", ValidateOrder(config.shop.clone()))
                .timeout(t)
                .no_compensation(),
        )
        .step(
            Step::new("charge_payment", ChargePayment(d.clone(), h.clone()))
                .retry(config.retry.clone())
                .timeout(t)
                .compensate_with(RefundPayment(d.clone(), h.clone()))
                .compensation_retry(config.compensation_retry.clone())
                .compensation_timeout(t),
        )
        .step(
            Step::new("reserve_inventory", ReserveInventory(d.clone(), h.clone()))
                .retry(config.retry.clone())
                .timeout(t)
                .compensate_with(ReleaseInventory(d.clone(), h.clone()))
                .compensation_retry(config.compensation_retry.clone())
                .compensation_timeout(t),
        )
        .pivot(
            // A local, idempotent write: retried patiently. Giving up here
            // would leave its outcome in doubt and park the saga.
            Step::new("confirm_order", ConfirmOrder(config.shop.clone()))
                .retry(config.compensation_retry.clone())
                .timeout(t),
        )
        .step(
            Step::new(
                "send_confirmation",
                SendConfirmation {
                    direct: config
                        .publish_directly_to
                        .clone()
                        .map(|url| (reqwest::Client::new(), url)),
                },
            )
            .retry(config.compensation_retry.clone())
            .timeout(t),
        )
        .build()
}

/// The checkout saga's definition with clients that are never called:
/// its names, roles and version, for drawing and inspecting it
/// ([`SagaDefinition::plan`]) without a database or services.
#[must_use]
pub fn shape() -> SagaDefinition<Checkout> {
    let pool = saga_postgres::pool_from_url("postgres://diagram@127.0.0.1/unused", 1)
        .expect("a valid URL");
    let config = Config {
        downstream: Downstream::new(String::new(), String::new(), Duration::from_secs(1))
            .expect("an HTTP client"),
        shop: Shop::new(pool, saga_postgres::SchemaName::default()),
        retry: demo_retry(),
        compensation_retry: demo_compensation_retry(),
        step_timeout: Duration::from_secs(5),
        publish_directly_to: None,
        after_effect: None,
    };
    definition(&config).expect("a valid definition")
}

/// The checkout saga drawn as a Mermaid flowchart, from the real
/// definition (with clients that are never called).
#[must_use]
pub fn diagram() -> String {
    shape().to_mermaid()
}
