//! The shapes the builder accepts: decided steps before the pivot, plain
//! steps at and after it; async fns, `action_fn` closures, `Action` structs.
use std::sync::Arc;

use saga_core::{Action, SagaDefinition, Step, StepContext, StepError, action_fn};

async fn validate(_: &mut StepContext, _: &mut u64) -> Result<(), StepError> {
    Ok(())
}

struct Refund {
    gateway: Arc<String>,
}

impl Action<u64> for Refund {
    async fn run(&self, _: &(), ctx: &mut StepContext, amount: &mut u64) -> Result<(), StepError> {
        let _ = (&self.gateway, ctx.forward_key(), amount);
        Ok(())
    }
}

fn main() {
    let gateway = Arc::new(String::from("https://pay.example"));
    let g = gateway.clone();
    let charge = action_fn(move |ctx, amount: &mut u64| {
        let g = g.clone();
        Box::pin(async move {
            let _ = (g, ctx.idempotency_key());
            *amount += 1;
            Ok(())
        })
    });
    let saga = SagaDefinition::<u64>::builder("checkout", 1)
        .step(Step::new("validate_order", validate).no_compensation())
        .step(Step::new("charge_payment", charge).compensate_with(Refund { gateway }))
        .pivot(Step::new("confirm_order", validate))
        .step(Step::new("send_confirmation", validate))
        .build()
        .unwrap();
    assert_eq!(saga.plan().len(), 4);
}
