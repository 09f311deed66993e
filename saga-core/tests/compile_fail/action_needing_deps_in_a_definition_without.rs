use saga_core::{Action, SagaDefinition, Step, StepContext, StepError};

struct Gateway;

struct Charge;

impl Action<u64, Gateway> for Charge {
    async fn run(&self, _: &Gateway, _: &mut StepContext, _: &mut u64) -> Result<(), StepError> {
        Ok(())
    }
}

fn main() {
    // A definition whose actions need nothing cannot hold one needing a `Gateway`.
    let _ = SagaDefinition::<u64>::builder("checkout", 1)
        .pivot(Step::new("charge_payment", Charge))
        .build();
}
