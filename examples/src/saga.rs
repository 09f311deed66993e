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
#[derive(Debug, Clone)]
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
    /// Demo: make this worker die right after reserving one order's stock.
    pub crash: Option<CrashHook>,
}

/// Makes `reserve_inventory` of one order report and hang right after the
/// inventory service reserved the stock, before the result is recorded: a
/// worker dying at the worst moment. Shared by every worker of a run (each
/// with its own number); fires once, in whichever worker gets there.
#[derive(Debug, Clone)]
pub struct CrashHook {
    worker: usize,
    shared: std::sync::Arc<CrashShared>,
}

#[derive(Debug)]
struct CrashShared {
    order_id: String,
    report: tokio::sync::mpsc::UnboundedSender<(usize, String)>,
    fired: std::sync::atomic::AtomicBool,
}

impl CrashHook {
    /// Fires for `order_id`, sending (worker number, order id) to `report`.
    #[must_use]
    pub fn new(
        order_id: String,
        report: tokio::sync::mpsc::UnboundedSender<(usize, String)>,
    ) -> Self {
        CrashHook {
            worker: 0,
            shared: std::sync::Arc::new(CrashShared {
                order_id,
                report,
                fired: std::sync::atomic::AtomicBool::new(false),
            }),
        }
    }

    /// The same hook, for worker number `worker`.
    #[must_use]
    pub fn for_worker(&self, worker: usize) -> Self {
        CrashHook {
            worker,
            shared: self.shared.clone(),
        }
    }

    async fn maybe_crash(&self, order_id: &str) {
        use std::sync::atomic::Ordering;
        let s = &self.shared;
        if order_id == s.order_id && !s.fired.swap(true, Ordering::SeqCst) {
            let _ = s.report.send((self.worker, order_id.to_owned()));
            // The worker is about to be killed: never return.
            std::future::pending::<()>().await;
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

struct ChargePayment(Downstream);
impl Action<Checkout> for ChargePayment {
    async fn run(&self, ctx: &mut StepContext, s: &mut Checkout) -> Result<(), StepError> {
        s.charge_id = Some(self.0.charge(ctx.idempotency_key(), &s.order).await?);
        Ok(())
    }
}

struct RefundPayment(Downstream);
impl Action<Checkout> for RefundPayment {
    async fn run(&self, ctx: &mut StepContext, s: &mut Checkout) -> Result<(), StepError> {
        // The charge may have happened even if we never heard back: the
        // payment service looks it up by the charge's own key.
        self.0
            .refund(ctx.idempotency_key(), ctx.forward_key())
            .await?;
        s.charge_id = None;
        Ok(())
    }
}

struct ReserveInventory(Downstream, Option<CrashHook>);
impl Action<Checkout> for ReserveInventory {
    async fn run(&self, ctx: &mut StepContext, s: &mut Checkout) -> Result<(), StepError> {
        let id = self
            .0
            .reserve(ctx.idempotency_key(), &s.order.id, &s.order.lines)
            .await?;
        if let Some(hook) = &self.1 {
            hook.maybe_crash(&s.order.id).await;
        }
        s.reservation_id = Some(id);
        Ok(())
    }
}

struct ReleaseInventory(Downstream);
impl Action<Checkout> for ReleaseInventory {
    async fn run(&self, ctx: &mut StepContext, s: &mut Checkout) -> Result<(), StepError> {
        self.0
            .release(ctx.idempotency_key(), ctx.forward_key())
            .await?;
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
pub fn definition(config: &Config) -> Result<SagaDefinition<Checkout>, saga_core::Error> {
    let d = &config.downstream;
    let t = config.step_timeout;
    SagaDefinition::builder(NAME, VERSION)
        .step(
            Step::new("validate_order", ValidateOrder(config.shop.clone()))
                .timeout(t)
                .no_compensation(),
        )
        .step(
            Step::new("charge_payment", ChargePayment(d.clone()))
                .retry(config.retry.clone())
                .timeout(t)
                .compensate_with(RefundPayment(d.clone()))
                .compensation_retry(config.compensation_retry.clone())
                .compensation_timeout(t),
        )
        .step(
            Step::new(
                "reserve_inventory",
                ReserveInventory(d.clone(), config.crash.clone()),
            )
            .retry(config.retry.clone())
            .timeout(t)
            .compensate_with(ReleaseInventory(d.clone()))
            .compensation_retry(config.compensation_retry.clone())
            .compensation_timeout(t),
        )
        .pivot(Step::new("confirm_order", ConfirmOrder(config.shop.clone())).timeout(t))
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

/// The checkout saga drawn as a Mermaid flowchart, from the real
/// definition (with clients that are never called).
#[must_use]
pub fn diagram() -> String {
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
        crash: None,
    };
    definition(&config)
        .expect("a valid definition")
        .to_mermaid()
}
