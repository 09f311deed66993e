//! Faults injected into the checkout saga from outside, as layers over its
//! definition ([`SagaDefinition::layer`](saga_core::SagaDefinition::layer)):
//! where the demo and the chaos harness make a worker die or stall right
//! after an effect, and the dual-write negative control. None of this is
//! part of the saga a team would write ([`crate::saga`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use saga_core::{
    Action, BoxAction, BoxFuture, Direction, MessageId, StepContext, StepError, StepKind,
    StepLayer, StepName, StepSide,
};
use tokio::sync::mpsc::UnboundedSender;

use crate::model::{Checkout, ORDER_CONFIRMED, OrderConfirmed};

/// Where an effect was just applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EffectPoint {
    /// The order.
    pub order_id: String,
    /// The step.
    pub step: StepName,
    /// Forward or compensation.
    pub direction: Direction,
}

/// A hook run after each effect; see [`AfterEffect`].
pub type EffectHook = Arc<dyn Fn(EffectPoint) -> BoxFuture<'static, ()> + Send + Sync>;

/// A layer that calls a hook right after each action of a compensatable
/// step (the steps whose effects live in another service: the charge, the
/// reservation, and their undoing) returned `Ok`, before its result is
/// recorded: where a test or the chaos harness makes a worker die or stall
/// at the worst moment.
#[derive(Clone)]
pub struct AfterEffect(EffectHook);

impl AfterEffect {
    /// Calls `hook` after each effect.
    #[must_use]
    pub fn new(hook: EffectHook) -> Self {
        AfterEffect(hook)
    }
}

impl std::fmt::Debug for AfterEffect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AfterEffect").finish_non_exhaustive()
    }
}

impl<D: Send + Sync + 'static> StepLayer<Checkout, D> for AfterEffect {
    fn layer(&self, side: StepSide<'_>, inner: BoxAction<Checkout, D>) -> BoxAction<Checkout, D> {
        if side.kind != StepKind::Compensatable {
            return inner;
        }
        BoxAction::new(Hooked {
            inner,
            hook: self.0.clone(),
            step: side.step.clone(),
        })
    }
}

/// An action followed by an [`EffectHook`].
struct Hooked<D> {
    inner: BoxAction<Checkout, D>,
    hook: EffectHook,
    step: StepName,
}

impl<D: Send + Sync + 'static> Action<Checkout, D> for Hooked<D> {
    async fn run(
        &self,
        deps: &D,
        ctx: &mut StepContext,
        s: &mut Checkout,
    ) -> Result<(), StepError> {
        self.inner.call(deps, ctx, s).await?;
        (self.hook)(EffectPoint {
            order_id: s.order.id.clone(),
            step: self.step.clone(),
            direction: ctx.direction(),
        })
        .await;
        Ok(())
    }
}

/// Makes `reserve_inventory` of one order report and hang right after the
/// inventory service reserved the stock, before the result is recorded: a
/// worker dying at the worst moment. Shared by every worker of a run (each
/// with its own number); fires once, in whichever worker gets there.
#[derive(Debug, Clone)]
pub struct CrashHook {
    order_id: String,
    report: UnboundedSender<(usize, String)>,
    fired: Arc<AtomicBool>,
}

impl CrashHook {
    /// Fires for `order_id`, sending (worker number, order id) to `report`.
    #[must_use]
    pub fn new(order_id: String, report: UnboundedSender<(usize, String)>) -> Self {
        CrashHook {
            order_id,
            report,
            fired: Arc::default(),
        }
    }

    /// The hook for worker number `worker`.
    #[must_use]
    pub fn for_worker(&self, worker: usize) -> EffectHook {
        let this = self.clone();
        Arc::new(move |point: EffectPoint| {
            let this = this.clone();
            Box::pin(async move {
                if point.step.as_str() == "reserve_inventory"
                    && point.direction == Direction::Forward
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

/// Negative control: a layer that replaces `send_confirmation` with a post
/// straight to the email service (a dual write, with a fresh message id
/// each attempt, outside the transaction that records the step) instead of
/// emitting into the outbox. Breaks "exactly one email per confirmed
/// order" on purpose.
#[derive(Debug, Clone)]
pub struct PublishDirectly {
    http: reqwest::Client,
    email_url: String,
}

impl PublishDirectly {
    /// Posts to the email service at `email_url`.
    #[must_use]
    pub fn to(email_url: String) -> Self {
        PublishDirectly {
            http: reqwest::Client::new(),
            email_url,
        }
    }
}

impl<D: Send + Sync + 'static> StepLayer<Checkout, D> for PublishDirectly {
    fn layer(&self, side: StepSide<'_>, inner: BoxAction<Checkout, D>) -> BoxAction<Checkout, D> {
        if side.step.as_str() == "send_confirmation" && side.direction == Direction::Forward {
            BoxAction::new(self.clone())
        } else {
            inner
        }
    }
}

impl<D: Send + Sync + 'static> Action<Checkout, D> for PublishDirectly {
    async fn run(&self, _: &D, _: &mut StepContext, s: &mut Checkout) -> Result<(), StepError> {
        let delivery = crate::services::email::Delivery::new(
            MessageId::new(),
            ORDER_CONFIRMED,
            serde_json::to_value(OrderConfirmed::of(&s.order))?,
        );
        self.http
            .post(format!("{}/deliveries", self.email_url))
            .json(&delivery)
            .send()
            .await?
            .error_for_status()?;
        Ok(())
    }
}

/// Negative control: a build that overrides every order's outcome, so
/// that a harness holding each order to its scenario can show it notices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ForceOutcome {
    /// `validate_order` refuses every order ([`RefuseEveryOrder`]): every
    /// saga compensates, with nothing charged, deducted or sent.
    RefuseEvery,
    /// Every charge and reservation reports success whatever the service
    /// answered ([`CompleteEveryOrder`]): declined, out-of-stock and
    /// gateway-down orders complete.
    CompleteEvery,
}

impl ForceOutcome {
    /// Layers the control over `saga`.
    #[must_use]
    pub fn layer<D: Send + Sync + 'static>(
        self,
        saga: saga_core::SagaDefinition<Checkout, D>,
    ) -> saga_core::SagaDefinition<Checkout, D> {
        match self {
            ForceOutcome::RefuseEvery => saga.layer(RefuseEveryOrder),
            ForceOutcome::CompleteEvery => saga.layer(CompleteEveryOrder),
        }
    }
}

/// Why [`RefuseEveryOrder`] refused an order.
#[derive(Debug, thiserror::Error)]
#[error("negative control: every order is refused")]
pub struct RefusedOnPurpose;

/// Negative control: replaces `validate_order` with a step that refuses
/// every order (a permanent error): a validation bug that rejects
/// everything. Every saga compensates cleanly, so only a check of each
/// order's outcome against its intent notices.
#[derive(Debug, Clone, Copy, Default)]
pub struct RefuseEveryOrder;

impl<D: Send + Sync + 'static> StepLayer<Checkout, D> for RefuseEveryOrder {
    fn layer(&self, side: StepSide<'_>, inner: BoxAction<Checkout, D>) -> BoxAction<Checkout, D> {
        if side.step.as_str() == "validate_order" && side.direction == Direction::Forward {
            BoxAction::new(*self)
        } else {
            inner
        }
    }
}

impl<D: Send + Sync + 'static> Action<Checkout, D> for RefuseEveryOrder {
    async fn run(&self, _: &D, _: &mut StepContext, _: &mut Checkout) -> Result<(), StepError> {
        Err(StepError::permanent(RefusedOnPurpose))
    }
}

/// Negative control: `charge_payment` and `reserve_inventory` report
/// success whatever the service answered (`let _ = charge(..)`): a
/// declined card, a sold-out item, a gateway that stays down all go
/// through, and their orders complete unpaid or unreserved.
#[derive(Debug, Clone, Copy, Default)]
pub struct CompleteEveryOrder;

impl<D: Send + Sync + 'static> StepLayer<Checkout, D> for CompleteEveryOrder {
    fn layer(&self, side: StepSide<'_>, inner: BoxAction<Checkout, D>) -> BoxAction<Checkout, D> {
        let calls = matches!(side.step.as_str(), "charge_payment" | "reserve_inventory");
        if calls && side.direction == Direction::Forward {
            BoxAction::new(IgnoreErrors(inner))
        } else {
            inner
        }
    }
}

/// An action whose errors are dropped.
struct IgnoreErrors<D>(BoxAction<Checkout, D>);

impl<D: Send + Sync + 'static> Action<Checkout, D> for IgnoreErrors<D> {
    async fn run(
        &self,
        deps: &D,
        ctx: &mut StepContext,
        s: &mut Checkout,
    ) -> Result<(), StepError> {
        let _ = self.0.call(deps, ctx, s).await;
        Ok(())
    }
}
