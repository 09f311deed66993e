use saga_core::{SagaDefinition, Step, StepContext, StepError};

async fn confirm(_: &mut StepContext, _: &mut u64) -> Result<(), StepError> {
    Ok(())
}

async fn notify(_: &mut StepContext, _: &mut u64) -> Result<(), StepError> {
    Ok(())
}

fn main() {
    // A compensation decision has no meaning past the pivot either.
    let _ = SagaDefinition::<u64>::builder("checkout", 1)
        .pivot(Step::new("confirm_order", confirm))
        .step(Step::new("send_confirmation", notify).no_compensation())
        .build();
}
