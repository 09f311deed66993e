use saga_core::{SagaDefinition, Step, StepContext, StepError};

async fn confirm(_: &mut StepContext, _: &mut u64) -> Result<(), StepError> {
    Ok(())
}

async fn unconfirm(_: &mut StepContext, _: &mut u64) -> Result<(), StepError> {
    Ok(())
}

fn main() {
    // The pivot is the point of no return: it has no compensation.
    let _ = SagaDefinition::<u64>::builder("checkout", 1)
        .pivot(Step::new("confirm_order", confirm).compensate_with(unconfirm))
        .build();
}
