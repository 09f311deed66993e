use saga_core::{Action, Executor, InMemorySagaStore, SagaDefinition, Step, StepContext, StepError};

struct Gateway {
    url: String,
}

struct Charge;

impl Action<u64, Gateway> for Charge {
    async fn run(&self, gateway: &Gateway, _: &mut StepContext, _: &mut u64) -> Result<(), StepError> {
        let _ = &gateway.url;
        Ok(())
    }
}

fn main() {
    let saga = SagaDefinition::<u64, Gateway>::builder("checkout", 1)
        .pivot(Step::new("charge_payment", Charge))
        .build()
        .unwrap();
    // The actions need a `Gateway`: `register` hands them none.
    let _ = Executor::builder(InMemorySagaStore::new()).register(saga);
}
