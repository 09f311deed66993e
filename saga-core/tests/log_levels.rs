//! How a step's failure for good is logged and recorded: a permanent
//! (business) failure at INFO, a give-up after retries at WARN, and the
//! reason saying "permanent" once.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use saga_core::store::SagaStore;
use saga_core::testing::{Behavior, LEASE, Script, TestState, scripted_saga};
use saga_core::{
    Direction, Executor, InMemorySagaStore, ManualClock, Outcome, StartKey, Timestamp,
};
use tracing::Level;
use tracing_subscriber::layer::{Context, SubscriberExt};

/// Every event's level and message.
#[derive(Default, Clone)]
struct Events(Arc<Mutex<Vec<(Level, String)>>>);

struct Message<'a>(&'a mut String);

impl tracing::field::Visit for Message<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            *self.0 = format!("{value:?}");
        }
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Events {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        let mut message = String::new();
        event.record(&mut Message(&mut message));
        self.0
            .lock()
            .unwrap()
            .push((*event.metadata().level(), message));
    }
}

/// Runs order 1 with `behaviors` on its first step until idle (advancing
/// past every retry), under a subscriber that captures events; returns
/// them and the failure's recorded reason.
fn run(behaviors: Vec<Behavior>) -> (Vec<(Level, String)>, String) {
    let events = Events::default();
    let subscriber = tracing_subscriber::registry().with(events.clone());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let reason = tracing::subscriber::with_default(subscriber, || {
        rt.block_on(async {
            let clock = Arc::new(ManualClock::new(Timestamp::from_micros(
                1_750_000_000_000_000,
            )));
            let store = Arc::new(InMemorySagaStore::with_clock(clock.clone()));
            let script = Script::new();
            script.on(1, "validate", Direction::Forward, behaviors);
            let saga = scripted_saga(&script, 1);
            let exec = Executor::builder_from_arc(store.clone())
                .register(saga.clone())
                .lease_duration(LEASE)
                .heartbeat_interval(LEASE - Duration::from_secs(1))
                .build()
                .unwrap();
            let id = exec
                .client()
                .start(
                    &saga,
                    StartKey::new("order-1").unwrap(),
                    &TestState::order(1),
                )
                .await
                .unwrap()
                .id;
            for _ in 0..5 {
                exec.run_until_idle().await.unwrap();
                clock.advance(Duration::from_secs(60));
            }
            let history = store.history(id).await.unwrap();
            history
                .iter()
                .find(|h| h.outcome == Outcome::FailedForGood)
                .and_then(|h| h.error.clone())
                .expect("the step failed for good")
        })
    });
    let events = events.0.lock().unwrap().clone();
    (events, reason)
}

fn failed_for_good(events: &[(Level, String)]) -> Vec<Level> {
    events
        .iter()
        .filter(|(_, m)| m.starts_with("step failed for good"))
        .map(|(l, _)| *l)
        .collect()
}

#[test]
fn a_permanent_failure_is_info_and_its_reason_says_permanent_once() {
    let (events, reason) = run(vec![Behavior::Permanent]);
    assert_eq!(failed_for_good(&events), [Level::INFO], "{events:#?}");
    assert!(
        events.iter().all(|(l, _)| *l > Level::WARN),
        "no WARN or ERROR for a business decline: {events:#?}"
    );
    assert_eq!(reason, "permanent error: scripted permanent failure");
}

#[test]
fn a_give_up_after_retries_is_warn() {
    let (events, reason) = run(vec![Behavior::Retryable; 3]);
    assert_eq!(failed_for_good(&events), [Level::WARN], "{events:#?}");
    assert!(
        reason.starts_with("retry budget spent after 3 attempts: retryable: "),
        "{reason}"
    );
}
