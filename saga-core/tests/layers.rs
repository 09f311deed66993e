//! Definitions whose actions are handed their dependencies at registration,
//! and layers that wrap (or replace) a definition's actions from outside.

use std::sync::{Arc, Mutex};

use saga_core::testing::{Behavior, Script, TestState, scripted_saga};
use saga_core::{
    Action, BoxAction, Direction, Executor, InMemorySagaStore, SagaDefinition, StartKey, Status,
    Step, StepContext, StepError, StepKind, StepSide, action_fn,
};

type Log = Arc<Mutex<Vec<String>>>;

fn log() -> Log {
    Arc::default()
}

fn taken(log: &Log) -> Vec<String> {
    std::mem::take(&mut *log.lock().unwrap())
}

/// Logs `<tag>:in` before and `<tag>:out` after its inner action, for
/// every attempt, and `<tag>:<step>:<direction>` for every action it runs.
struct Around {
    tag: &'static str,
    step: String,
    direction: Direction,
    inner: BoxAction<TestState>,
    log: Log,
}

impl Action<TestState> for Around {
    async fn run(
        &self,
        deps: &(),
        ctx: &mut StepContext,
        s: &mut TestState,
    ) -> Result<(), StepError> {
        let tag = self.tag;
        self.log.lock().unwrap().push(format!("{tag}:in"));
        let result = self.inner.call(deps, ctx, s).await;
        self.log
            .lock()
            .unwrap()
            .push(format!("{tag}:{}:{}:out", self.step, self.direction));
        result
    }
}

/// A layer that wraps every action in an [`Around`] tagged `tag`, and
/// records which sides it was given (`seen`).
fn around(
    tag: &'static str,
    runs: &Log,
    seen: &Log,
) -> impl Fn(StepSide<'_>, BoxAction<TestState>) -> BoxAction<TestState> + use<> {
    let (runs, seen) = (runs.clone(), seen.clone());
    move |side: StepSide<'_>, inner| {
        assert_eq!(side.saga.name.as_str(), "scripted");
        seen.lock()
            .unwrap()
            .push(format!("{}:{}:{:?}", side.step, side.direction, side.kind));
        BoxAction::new(Around {
            tag,
            step: side.step.to_string(),
            direction: side.direction,
            inner,
            log: runs.clone(),
        })
    }
}

fn key(order: u32) -> StartKey {
    StartKey::new(format!("order-{order}")).unwrap()
}

/// Starts order `order` of `saga` and runs the executor until nothing is
/// due; returns the instance's final status and state.
async fn run<D: Send + Sync + 'static>(
    saga: SagaDefinition<TestState, D>,
    deps: D,
    order: u32,
) -> (Status, TestState) {
    let store = InMemorySagaStore::new();
    let exec = Executor::builder(store)
        .register_with(saga.clone(), deps)
        .build()
        .unwrap();
    let id = exec
        .client()
        .start(&saga, key(order), &TestState::order(order))
        .await
        .unwrap()
        .id;
    exec.run_until_idle().await.unwrap();
    let snap = exec.client().snapshot(id).await.unwrap();
    (snap.status, serde_json::from_value(snap.state).unwrap())
}

#[tokio::test]
async fn a_layer_wraps_every_step_in_both_directions_and_sees_their_names() {
    let script = Script::new();
    // `reserve` refuses for good: `reserve` and `charge` are compensated.
    script.on(1, "reserve", Direction::Forward, [Behavior::Permanent]);
    let (runs, seen) = (log(), log());
    let saga = scripted_saga(&script, 1).layer(around("a", &runs, &seen));
    assert_eq!(
        taken(&seen),
        [
            "validate:forward:NoCompensation",
            "charge:forward:Compensatable",
            "charge:compensate:Compensatable",
            "reserve:forward:Compensatable",
            "reserve:compensate:Compensatable",
            "confirm:forward:Pivot",
            "notify:forward:Retryable",
        ]
    );
    let (status, _) = run(saga, (), 1).await;
    assert_eq!(status, Status::Compensated);
    let runs: Vec<String> = taken(&runs)
        .into_iter()
        .filter(|r| r.ends_with(":out"))
        .collect();
    assert_eq!(
        runs,
        [
            "a:validate:forward:out",
            "a:charge:forward:out",
            "a:reserve:forward:out",
            "a:reserve:compensate:out",
            "a:charge:compensate:out",
        ]
    );
}

#[tokio::test]
async fn the_last_layer_given_is_the_outermost() {
    let script = Script::new();
    let (runs, seen) = (log(), log());
    let saga = scripted_saga(&script, 1)
        .layer(around("inner", &runs, &seen))
        .layer(around("outer", &runs, &seen));
    let (status, _) = run(saga, (), 1).await;
    assert_eq!(status, Status::Completed);
    let runs = taken(&runs);
    assert_eq!(
        runs[..4],
        [
            "outer:in",
            "inner:in",
            "inner:validate:forward:out",
            "outer:validate:forward:out"
        ]
    );
}

#[tokio::test]
async fn a_layer_can_replace_one_steps_action_and_leaves_the_shape_alone() {
    let script = Script::new();
    let saga = scripted_saga(&script, 1);
    let replaced = saga
        .clone()
        .layer(|side: StepSide<'_>, inner: BoxAction<TestState>| {
            if side.step.as_str() == "notify" {
                BoxAction::new(action_fn(|_, s: &mut TestState| {
                    Box::pin(async move {
                        s.done.push("replaced".to_owned());
                        Ok(())
                    })
                }))
            } else {
                inner
            }
        });
    assert_eq!(replaced.shape(), saga.shape());
    let (status, state) = run(replaced, (), 1).await;
    assert_eq!(status, Status::Completed);
    assert_eq!(
        state.done,
        [
            "validate:forward",
            "charge:forward",
            "reserve:forward",
            "confirm:forward",
            "replaced"
        ]
    );
}

/// What the actions of [`with_deps`] need: told apart from `()` by type.
struct Mailer {
    from: String,
}

/// A unit-struct action that reaches the world only through its deps.
struct Greet;

impl Action<TestState, Mailer> for Greet {
    async fn run(
        &self,
        mailer: &Mailer,
        ctx: &mut StepContext,
        s: &mut TestState,
    ) -> Result<(), StepError> {
        s.done.push(format!(
            "{}:{}:{}",
            ctx.step(),
            ctx.direction(),
            mailer.from
        ));
        Ok(())
    }
}

async fn plain(_: &mut StepContext, s: &mut TestState) -> Result<(), StepError> {
    s.done.push("plain".to_owned());
    Ok(())
}

fn with_deps() -> SagaDefinition<TestState, Mailer> {
    SagaDefinition::builder("scripted", 1)
        .step(Step::new("check", plain).no_compensation())
        .step(Step::new("greet", Greet).compensate_with(Greet))
        .pivot(Step::new(
            "send",
            saga_core::with_deps(|mailer: &Mailer, _, s: &mut TestState| {
                let from = mailer.from.clone();
                Box::pin(async move {
                    s.done.push(format!("closure:{from}"));
                    Ok(())
                })
            }),
        ))
        .build()
        .unwrap()
}

#[tokio::test]
async fn actions_are_handed_the_dependencies_given_at_registration() {
    let saga = with_deps();
    let (status, state) = run(
        saga,
        Mailer {
            from: "shop@example.com".to_owned(),
        },
        1,
    )
    .await;
    assert_eq!(status, Status::Completed);
    assert_eq!(
        state.done,
        [
            "plain",
            "greet:forward:shop@example.com",
            "closure:shop@example.com"
        ]
    );
}

#[test]
fn a_definition_needing_dependencies_is_built_and_drawn_without_them() {
    // No runtime, no dependencies: the shape and the diagram only.
    let saga = with_deps();
    let shape = saga.shape();
    assert_eq!(
        shape.plan().collect::<Vec<_>>(),
        [
            StepKind::NoCompensation,
            StepKind::Compensatable,
            StepKind::Pivot
        ]
    );
    assert_eq!(shape, with_deps().shape());
    assert!(saga.to_mermaid().contains(r#"s2{{"send<br/>pivot"}}"#));
    assert_eq!(shape.to_mermaid(), saga.to_mermaid());
}

#[test]
fn shapes_differ_exactly_when_names_roles_order_aliases_policies_or_timeouts_do() {
    use std::time::Duration;
    async fn ok(_: &mut StepContext, _: &mut u8) -> Result<(), StepError> {
        Ok(())
    }
    let base = || {
        SagaDefinition::<u8>::builder("pay", 1)
            .step(Step::new("charge", ok).compensate_with(ok))
            .pivot(Step::new("confirm", ok))
    };
    let shape = |d: SagaDefinition<u8>| d.shape().clone();
    let original = shape(base().build().unwrap());
    assert_eq!(original, shape(base().build().unwrap()));
    let variants = [
        shape(
            SagaDefinition::<u8>::builder("pay", 2)
                .step(Step::new("charge", ok).compensate_with(ok))
                .pivot(Step::new("confirm", ok))
                .build()
                .unwrap(),
        ),
        shape(
            SagaDefinition::<u8>::builder("pay", 1)
                .step(Step::new("charge", ok).alias("bill").compensate_with(ok))
                .pivot(Step::new("confirm", ok))
                .build()
                .unwrap(),
        ),
        shape(
            SagaDefinition::<u8>::builder("pay", 1)
                .step(Step::new("charge", ok).no_compensation())
                .pivot(Step::new("confirm", ok))
                .build()
                .unwrap(),
        ),
        shape(
            SagaDefinition::<u8>::builder("pay", 1)
                .step(
                    Step::new("charge", ok)
                        .compensate_with(ok)
                        .compensation_timeout(Duration::from_secs(3)),
                )
                .pivot(Step::new("confirm", ok))
                .build()
                .unwrap(),
        ),
        shape(
            SagaDefinition::<u8>::builder("pay", 1)
                .step(Step::new("charge", ok).compensate_with(ok))
                .pivot(
                    Step::new("confirm", ok).retry(saga_core::RetryPolicy::compensation_default()),
                )
                .build()
                .unwrap(),
        ),
        shape(base().step(Step::new("notify", ok)).build().unwrap()),
    ];
    for v in &variants {
        assert_ne!(&original, v);
    }
    let json = serde_json::to_value(&original).unwrap();
    assert_eq!(
        serde_json::from_value::<saga_core::SagaShape>(json).unwrap(),
        original
    );
}
