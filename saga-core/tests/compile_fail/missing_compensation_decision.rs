use saga_core::{SagaDefinition, Step, StepContext, StepError};

async fn charge(_: &mut StepContext, _: &mut u64) -> Result<(), StepError> {
    Ok(())
}

fn main() {
    // Forgot `.compensate_with(refund)` or `.no_compensation()`.
    let _ = SagaDefinition::<u64>::builder("checkout", 1)
        .step(Step::new("charge_payment", charge))
        .build();
}
