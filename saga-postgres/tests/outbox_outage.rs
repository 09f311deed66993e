//! A broker outage is not the messages' fault: a publisher that reports the
//! broker unavailable for longer than the per-message budget dead-letters
//! nothing, and everything is delivered once it is back; a message that
//! fails on its own still spends its budget while the others publish.
//!
//! Time is the injected `ManualClock`: `dispatch_once` never waits, it makes
//! the released messages due after the outage backoff, and the test moves
//! the clock past it.
//!
//! Each test runs on tokio's current-thread runtime, with a thread-local
//! metrics recorder.

mod outbox_support;

use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use metrics::{SharedString, Unit};
use metrics_util::CompositeKey;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use outbox_support::{env, fixed_policy, msg};
use saga_core::{Clock, Jitter, MessageId, RetryPolicy};
use saga_postgres::metrics as m;
use saga_postgres::outbox::{
    DispatchReport, Dispatcher, Outgoing, PublishError, PublishErrorKind, Publisher,
};

/// A broker that can be down, that can refuse some messages on their own
/// (a transient failure), and that can be unavailable for some messages
/// only (a flapping connection).
#[derive(Default)]
struct Broker {
    down: AtomicBool,
    calls: AtomicUsize,
    poison: Mutex<HashSet<MessageId>>,
    flaky: Mutex<HashSet<MessageId>>,
    delivered: Mutex<Vec<MessageId>>,
}

#[derive(Debug, thiserror::Error)]
#[error("connection refused")]
struct ConnectionRefused;

#[derive(Debug, thiserror::Error)]
#[error("the consumer rejected this message")]
struct Rejected;

impl Publisher for Broker {
    async fn publish(&self, batch: &[Outgoing]) -> Vec<Result<(), PublishError>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let down = self.down.load(Ordering::SeqCst);
        batch
            .iter()
            .map(|out| {
                let id = out.message.id;
                if down || self.flaky.lock().unwrap().contains(&id) {
                    Err(PublishError::unavailable(ConnectionRefused))
                } else if self.poison.lock().unwrap().contains(&id) {
                    Err(PublishError::transient(Rejected))
                } else {
                    self.delivered.lock().unwrap().push(id);
                    Ok(())
                }
            })
            .collect()
    }
}

/// 1 s doubling to at most 4 s, no jitter.
fn outage_backoff() -> RetryPolicy {
    RetryPolicy::builder()
        .initial_delay(Duration::from_secs(1))
        .multiplier(2.0)
        .max_delay(Duration::from_secs(4))
        .max_attempts(1)
        .no_max_elapsed()
        .jitter(Jitter::None)
        .build()
        .unwrap()
}

/// The counters since the last call (a snapshot resets them).
fn counters(snapshotter: &Snapshotter) -> impl Fn(&str) -> u64 {
    let snapshot = snapshotter.snapshot().into_vec();
    move |name| counter(&snapshot, name)
}

fn counter(
    snapshot: &[(CompositeKey, Option<Unit>, Option<SharedString>, DebugValue)],
    name: &str,
) -> u64 {
    snapshot
        .iter()
        .filter(|(key, ..)| key.key().name() == name)
        .map(|(.., value)| match value {
            DebugValue::Counter(n) => *n,
            other => panic!("{name} is not a counter: {other:?}"),
        })
        .sum()
}

#[tokio::test]
async fn a_broker_down_for_longer_than_the_budget_dead_letters_nothing_and_delivers_all_on_return()
{
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);
    let env = env().await;
    let broker = std::sync::Arc::new(Broker::default());
    // A budget of 3 attempts; the outage lasts 20 cycles.
    let dispatcher = Dispatcher::builder(env.outbox.clone(), broker.clone())
        .retry_policy(fixed_policy(3))
        .outage_backoff(outage_backoff())
        .build()
        .unwrap();
    let ids = env.enqueue((0..10).map(|n| msg("t", n)).collect()).await;
    broker.down.store(true, Ordering::SeqCst);

    let expected_delays = [1, 2, 4, 4, 4];
    for cycle in 0..20 {
        let now = env.clock.now();
        let report = dispatcher.run_until_idle().await.unwrap();
        assert_eq!(
            (report.claimed, report.released, report.outages),
            (10, 10, 1),
            "cycle {cycle}: {report:?}"
        );
        assert_eq!(
            (report.published, report.retried, report.dead_lettered),
            (0, 0, 0),
            "cycle {cycle}: {report:?}"
        );
        // Put back, no attempt spent, due after the growing outage backoff.
        let delay = Duration::from_secs(expected_delays[cycle.min(4)]);
        for id in &ids {
            let (attempts, error, available_at, dead) = env.row(*id).await.unwrap();
            assert_eq!((attempts, dead), (0, false), "cycle {cycle}");
            assert_eq!(
                available_at,
                (now + delay).to_system_time(),
                "cycle {cycle}"
            );
            assert!(error.unwrap().contains("connection refused"));
        }
        // Not due before the backoff has passed.
        assert_eq!(dispatcher.dispatch_once().await.unwrap().claimed, 0);
        env.clock.advance(delay);
    }
    assert_eq!(broker.calls.load(Ordering::SeqCst), 20);
    assert!(env.outbox.dead_letters(100, None).await.unwrap().is_empty());
    let counter = counters(&snapshotter);
    assert_eq!(counter(m::OUTBOX_BROKER_UNAVAILABLE), 20);
    assert_eq!(counter(m::OUTBOX_RELEASED), 200);
    assert_eq!(counter(m::OUTBOX_DEAD_LETTERED), 0);

    // The broker is back: everything goes out, each on its first counted
    // attempt.
    broker.down.store(false, Ordering::SeqCst);
    let report = dispatcher.run_until_idle().await.unwrap();
    assert_eq!(
        (report.published, report.dead_lettered),
        (10, 0),
        "{report:?}"
    );
    assert_eq!(env.outbox_rows().await, 0);
    let delivered: HashSet<_> = broker.delivered.lock().unwrap().iter().copied().collect();
    assert_eq!(delivered, ids.iter().copied().collect());
    assert_eq!(counters(&snapshotter)(m::OUTBOX_PUBLISHED), 10);

    // A new outage starts its backoff from the shortest delay again.
    let later = env.enqueue(vec![msg("t", 99)]).await[0];
    broker.down.store(true, Ordering::SeqCst);
    let now = env.clock.now();
    assert_eq!(dispatcher.run_until_idle().await.unwrap().outages, 1);
    let (_, _, available_at, _) = env.row(later).await.unwrap();
    assert_eq!(
        available_at,
        (now + Duration::from_secs(1)).to_system_time()
    );
}

#[tokio::test]
async fn a_message_failing_on_its_own_still_spends_its_budget_while_others_publish() {
    let env = env().await;
    let broker = std::sync::Arc::new(Broker::default());
    let dispatcher = Dispatcher::builder(env.outbox.clone(), broker.clone())
        .retry_policy(fixed_policy(3))
        .outage_backoff(outage_backoff())
        .build()
        .unwrap();
    let poison = env.enqueue(vec![msg("t", 0)]).await[0];
    broker.poison.lock().unwrap().insert(poison);
    let mut total = DispatchReport::default();
    for round in 1..=3 {
        // Three healthy messages beside it each round.
        env.enqueue((1..=3).map(|n| msg("t", n)).collect()).await;
        let report = dispatcher.run_until_idle().await.unwrap();
        assert_eq!(
            (report.published, report.outages, report.released),
            (3, 0, 0)
        );
        let row = env.row(poison).await;
        if round < 3 {
            let (attempts, _, _, dead) = row.unwrap();
            assert_eq!((attempts, dead), (round, false));
        }
        total += report;
        env.clock.advance(Duration::from_secs(1));
    }
    let (attempts, error, _, dead) = env.row(poison).await.unwrap();
    assert_eq!(
        (attempts, dead),
        (3, true),
        "its own failures spent its budget"
    );
    assert!(error.unwrap().contains("rejected"));
    assert_eq!((total.retried, total.dead_lettered), (2, 1));

    // A batch whose only messages fail on their own, with no word from the
    // publisher about the broker, is not an outage: the budget is spent.
    let lone = env.enqueue(vec![msg("t", 7)]).await[0];
    broker.poison.lock().unwrap().insert(lone);
    let report = dispatcher.run_until_idle().await.unwrap();
    assert_eq!((report.retried, report.outages), (1, 0));
    assert_eq!(env.row(lone).await.unwrap().0, 1);
}

#[tokio::test]
async fn a_message_the_broker_was_unavailable_for_beside_published_ones_keeps_its_budget() {
    let env = env().await;
    let broker = std::sync::Arc::new(Broker::default());
    // A budget of one attempt: any counted failure would dead-letter it.
    let dispatcher = Dispatcher::builder(env.outbox.clone(), broker.clone())
        .retry_policy(fixed_policy(1))
        .outage_backoff(outage_backoff())
        .build()
        .unwrap();
    let flaky = env.enqueue(vec![msg("t", 0)]).await[0];
    broker.flaky.lock().unwrap().insert(flaky);
    for _ in 0..5 {
        env.enqueue(vec![msg("t", 1)]).await;
        let report = dispatcher.run_until_idle().await.unwrap();
        assert_eq!(
            (
                report.published,
                report.released,
                report.outages,
                report.dead_lettered
            ),
            (1, 1, 0, 0),
            "{report:?}"
        );
        assert_eq!(env.row(flaky).await.unwrap().0, 0, "no attempt counted");
        env.clock.advance(Duration::from_secs(1));
    }
    broker.flaky.lock().unwrap().clear();
    assert_eq!(dispatcher.run_until_idle().await.unwrap().published, 1);
    assert_eq!(env.outbox_rows().await, 0);
}

#[test]
fn unavailable_is_its_own_kind_of_publish_error() {
    let e = PublishError::unavailable(ConnectionRefused);
    assert_eq!(e.kind(), PublishErrorKind::Unavailable);
    assert!(e.is_unavailable() && !e.is_permanent());
    // It survives being boxed through a handler.
    let boxed: Box<dyn std::error::Error + Send + Sync> = Box::new(e);
    assert!(PublishError::from_boxed(boxed).is_unavailable());
    assert!(!PublishError::transient(Rejected).is_unavailable());
}

#[tokio::test]
async fn the_nats_publisher_says_the_broker_is_unavailable_while_it_is_not_connected() {
    use saga_core::Timestamp;
    use saga_postgres::outbox::NatsPublisher;
    use saga_postgres::outbox::nats::async_nats;

    // Nothing listens on port 1: the client keeps trying to connect.
    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect("127.0.0.1:1")
        .await
        .unwrap();
    let publisher = NatsPublisher::new(client);
    let message = msg("orders.paid", 1).into_outbox(MessageId::new(), Timestamp::from_micros(0));
    let results = publisher
        .publish(&[
            Outgoing::new(message.clone(), Timestamp::from_micros(0)),
            Outgoing::new(message, Timestamp::from_micros(0)),
        ])
        .await;
    assert_eq!(results.len(), 2);
    for r in results {
        let e = r.unwrap_err();
        assert!(e.is_unavailable(), "{e:?}");
        let cause = std::error::Error::source(&e).unwrap().to_string();
        assert!(cause.contains("not connected"), "{cause}");
    }
}
