//! The dispatcher: claim, publish, settle; leases, backoff, dead letters,
//! redrive, concurrent dispatchers, and messages emitted by saga steps.

mod outbox_support;

use std::sync::Arc;
use std::time::Duration;

use outbox_support::{Env, Fate, Recorder, WAIT, env, fixed_policy, msg};
use saga_core::{
    Clock, Direction, Executor, Jitter, Message, MessageId, RetryPolicy, SagaDefinition, StartKey,
    Step, StepContext, StepError, StepName,
};
use saga_postgres::inbox::{ConsumerName, Delivery, Inbox};
use saga_postgres::outbox::{
    DispatchReport, Dispatcher, DispatcherBuilder, InProcessPublisher, Outgoing, PublishError,
    Publisher,
};
use saga_postgres::{PgSagaStore, pool_from_config};
use saga_test_support::proxy::{Cut, FaultProxy};
use saga_test_support::test_server;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

const LEASE: Duration = Duration::from_secs(30);

/// A fixed 1 s backoff, 10 attempts, and at most 2.5 s from the first
/// attempt: the third failure in a row is dead-lettered.
fn capped_policy() -> RetryPolicy {
    RetryPolicy::builder()
        .initial_delay(Duration::from_secs(1))
        .multiplier(1.0)
        .max_delay(Duration::from_secs(1))
        .max_attempts(10)
        .max_elapsed(Duration::from_millis(2500))
        .jitter(Jitter::None)
        .build()
        .unwrap()
}

fn dispatcher(env: &Env, recorder: &Arc<Recorder>) -> DispatcherBuilder<Recorder> {
    DispatcherBuilder::from_arc(env.outbox.clone(), recorder.clone())
        .lease_for(LEASE)
        .publish_timeout(Duration::from_secs(10))
        .retry_policy(fixed_policy(3))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dispatcher_publishes_in_batches_and_removes_what_it_published() {
    let env = env().await;
    let ids = env.enqueue((0..25).map(|n| msg("t", n)).collect()).await;
    let recorder = Recorder::new();
    let d = dispatcher(&env, &recorder).batch_size(10).build().unwrap();

    let report = d.run_until_idle().await.unwrap();

    assert_eq!(report.claimed, 25);
    assert_eq!(report.published, 25);
    assert_eq!((report.retried, report.dead_lettered), (0, 0));
    let mut published = recorder.published_ids();
    assert_eq!(published.len(), 25, "each message once");
    // Three batches (10, 10, 5), handed over in enqueue order.
    assert_eq!(recorder.batch_sizes(), vec![10, 10, 5]);
    assert_eq!(published, ids);
    published.sort();
    published.dedup();
    assert_eq!(published.len(), 25);
    assert!(recorder.attempts().iter().all(|a| a.out.attempt == 1));
    assert_eq!(env.outbox_rows().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_holding_a_lower_id_that_commits_after_higher_ids_is_not_skipped() {
    let env = env().await;
    let recorder = Recorder::new();
    let d = dispatcher(&env, &recorder).build().unwrap();
    let q = env.schema.quoted();

    // The slow transaction takes the lower sequence number first...
    let mut slow_client = env.pool.get().await.unwrap();
    let slow = slow_client.transaction().await.unwrap();
    let early = env.outbox.enqueue_in_tx(&slow, msg("t", 0)).await.unwrap();
    let early_seq: i64 = slow
        .query_one(
            &format!("SELECT seq FROM {q}.outbox WHERE id = $1"),
            &[&early.as_uuid()],
        )
        .await
        .unwrap()
        .get(0);
    // ...while later ones commit and are published.
    let late = env.enqueue(vec![msg("t", 1), msg("t", 2)]).await;
    let client = env.pool.get().await.unwrap();
    let late_uuids: Vec<uuid::Uuid> = late.iter().map(|id| id.as_uuid()).collect();
    let late_min_seq: i64 = client
        .query_one(
            &format!("SELECT min(seq) FROM {q}.outbox WHERE id = ANY($1)"),
            &[&late_uuids],
        )
        .await
        .unwrap()
        .get(0);
    assert!(early_seq < late_min_seq, "{early_seq} < {late_min_seq}");
    let report = d.run_until_idle().await.unwrap();
    assert_eq!(report.published, 2);
    assert_eq!(recorder.published_ids(), late);

    // The lower id commits last, and is still published.
    slow.commit().await.unwrap();
    let report = d.run_until_idle().await.unwrap();
    assert_eq!(report.published, 1);
    assert_eq!(recorder.published_ids(), vec![late[0], late[1], early]);
    assert_eq!(env.outbox_rows().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispatcher_killed_between_publish_and_delete_loses_nothing_and_the_inbox_deduplicates() {
    let env = env().await;
    let ids = env.enqueue((0..5).map(|n| msg("t", n)).collect()).await;
    let recorder = Recorder::new();

    // Dispatcher A publishes, then dies before it can delete.
    recorder.hang_after_publish(true);
    let a = dispatcher(&env, &recorder).build().unwrap();
    let killed = tokio::spawn(async move { a.dispatch_once().await });
    recorder.wait_calls(1).await;
    killed.abort();
    assert!(killed.await.unwrap_err().is_cancelled());
    assert_eq!(recorder.published_ids(), ids);
    let stats = env.outbox.stats().await.unwrap();
    assert_eq!((stats.pending, stats.in_flight), (0, 5), "{stats:?}");

    // Dispatcher B cannot take the batch while A's lease holds...
    recorder.hang_after_publish(false);
    let b = dispatcher(&env, &recorder).build().unwrap();
    assert_eq!(b.dispatch_once().await.unwrap(), DispatchReport::default());
    // ...and publishes it again, same ids, once the lease has expired.
    env.clock.advance(LEASE + Duration::from_secs(1));
    let report = b.run_until_idle().await.unwrap();
    assert_eq!(report.published, 5);
    assert_eq!(env.outbox_rows().await, 0);
    let published = recorder.published();
    assert_eq!(published.len(), 10);
    assert!(published[5..].iter().all(|o| o.attempt == 2));
    let again: Vec<MessageId> = published[5..].iter().map(|o| o.message.id).collect();
    assert_eq!(again, ids);

    // Downstream, a consumer deduplicating with the inbox applies each
    // message once.
    let inbox = Inbox::new(env.pool.clone(), env.schema.clone());
    let consumer = ConsumerName::new("ledger").unwrap();
    let q = env.schema.quoted();
    let mut client = env.pool.get().await.unwrap();
    client
        .batch_execute(&format!(
            "CREATE TABLE {q}.effects (message_id uuid NOT NULL)"
        ))
        .await
        .unwrap();
    let mut firsts = 0;
    for delivery in &published {
        let tx = client.transaction().await.unwrap();
        if inbox
            .process_once_in_tx(&tx, &consumer, delivery.message.id)
            .await
            .unwrap()
            == Delivery::First
        {
            firsts += 1;
            tx.execute(
                &format!("INSERT INTO {q}.effects VALUES ($1)"),
                &[&delivery.message.id.as_uuid()],
            )
            .await
            .unwrap();
        }
        tx.commit().await.unwrap();
    }
    assert_eq!(firsts, 5);
    let row = client
        .query_one(
            &format!("SELECT count(*), count(DISTINCT message_id) FROM {q}.effects"),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, i64>(0), row.get::<_, i64>(1)),
        (5, 5),
        "one effect per message"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_keeps_failing_backs_off_is_dead_lettered_and_can_be_redriven() {
    let env = env().await;
    let ids = env.enqueue(vec![msg("t", 0)]).await;
    let id = ids[0];
    let recorder = Recorder::new();
    recorder.set_fate(id, Fate::AlwaysFail);
    let d = dispatcher(&env, &recorder).build().unwrap();

    // Attempt 1 fails: rescheduled 1 s later, with the error in the row.
    let t0 = env.clock.now();
    let report = d.dispatch_once().await.unwrap();
    assert_eq!((report.claimed, report.retried), (1, 1));
    let (attempts, error, available_at, dead) = env.row(id).await.unwrap();
    assert_eq!(attempts, 1);
    assert!(error.unwrap().contains("broker unavailable"));
    assert_eq!(available_at, (t0 + Duration::from_secs(1)).to_system_time());
    assert!(!dead);
    // Not before its time: the next attempt time is in the row.
    assert_eq!(d.dispatch_once().await.unwrap().claimed, 0);
    env.clock.advance(Duration::from_secs(1));
    assert_eq!(d.dispatch_once().await.unwrap().retried, 1);
    env.clock.advance(Duration::from_secs(1));
    // Attempt 3 of 3 fails: dead letter.
    let report = d.dispatch_once().await.unwrap();
    assert_eq!(report.dead_lettered, 1);
    let stats = env.outbox.stats().await.unwrap();
    assert_eq!((stats.pending, stats.in_flight, stats.dead), (0, 0, 1));
    let dead = env.outbox.dead_letters(10, None).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].message.id, id);
    assert_eq!(dead[0].attempts, 3);
    let last_error = dead[0].last_error.clone().unwrap();
    assert!(last_error.contains("broker unavailable"), "{last_error}");
    assert!(last_error.contains("dead-lettered"), "{last_error}");
    // A dead letter is never published again on its own.
    env.clock.advance(Duration::from_secs(3600));
    assert_eq!(d.run_until_idle().await.unwrap(), DispatchReport::default());
    assert_eq!(recorder.attempts().len(), 3);

    // Redrive it once the cause is fixed: published.
    recorder.set_fate(id, Fate::FailTimes(0));
    assert!(env.outbox.redrive(id).await.unwrap());
    assert!(!env.outbox.redrive(id).await.unwrap(), "no longer dead");
    let report = d.run_until_idle().await.unwrap();
    assert_eq!(report.published, 1);
    assert_eq!(recorder.published_ids(), vec![id]);
    assert_eq!(recorder.published()[0].attempt, 1, "a fresh budget");
    assert_eq!(env.outbox_rows().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_redriven_long_after_its_enqueue_gets_a_fresh_time_budget() {
    let env = env().await;
    let id = env.enqueue(vec![msg("t", 0)]).await[0];
    let recorder = Recorder::new();
    recorder.set_fate(id, Fate::Permanent);
    let d = dispatcher(&env, &recorder)
        .retry_policy(capped_policy())
        .build()
        .unwrap();
    assert_eq!(d.dispatch_once().await.unwrap().dead_lettered, 1);

    // An hour later, far past the policy's 2.5 s, an operator redrives it,
    // and it fails again: retried, as if it were new.
    env.clock.advance(Duration::from_secs(3600));
    recorder.set_fate(id, Fate::AlwaysFail);
    assert!(env.outbox.redrive(id).await.unwrap());
    let report = d.dispatch_once().await.unwrap();
    assert_eq!((report.retried, report.dead_lettered), (1, 0), "{report:?}");
    let (attempts, _, _, dead) = env.row(id).await.unwrap();
    assert_eq!((attempts, dead), (1, false));
    env.clock.advance(Duration::from_secs(1));
    assert_eq!(d.dispatch_once().await.unwrap().retried, 1);
    // The cap still holds, counted from the first attempt after the
    // redrive: a third try would be 3 s after it.
    env.clock.advance(Duration::from_secs(1));
    assert_eq!(d.dispatch_once().await.unwrap().dead_lettered, 1);
    let dead = env.outbox.dead_letters(10, None).await.unwrap();
    assert_eq!((dead[0].message.id, dead[0].attempts), (id, 3));
    let error = dead[0].last_error.as_deref().unwrap();
    assert!(error.contains("dead-lettered"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_delayed_past_the_time_cap_gets_its_budget_from_its_first_attempt() {
    let env = env().await;
    let id = env
        .enqueue(vec![
            msg("t", 0)
                .deliver_after(Duration::from_secs(3600))
                .unwrap(),
        ])
        .await[0];
    let recorder = Recorder::new();
    recorder.set_fate(id, Fate::FailTimes(1));
    let d = dispatcher(&env, &recorder)
        .retry_policy(capped_policy())
        .build()
        .unwrap();
    env.clock.advance(Duration::from_secs(3600));
    let report = d.dispatch_once().await.unwrap();
    assert_eq!((report.retried, report.dead_lettered), (1, 0), "{report:?}");
    env.clock.advance(Duration::from_secs(1));
    assert_eq!(d.dispatch_once().await.unwrap().published, 1);
    assert_eq!(recorder.published_ids(), vec![id]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lag_counts_from_when_a_message_fell_due_and_ignores_those_not_due_yet() {
    let env = env().await;
    let day = Duration::from_secs(24 * 3600);
    let recorder = Recorder::new();
    let d = dispatcher(&env, &recorder).build().unwrap();
    // Delayed by a day: pending, but not late.
    let later = env
        .enqueue(vec![msg("t", 0).deliver_after(day).unwrap()])
        .await[0];
    // A dead letter: not counted either.
    let dead = env.enqueue(vec![msg("t", 1)]).await[0];
    recorder.set_fate(dead, Fate::Permanent);
    assert_eq!(d.dispatch_once().await.unwrap().dead_lettered, 1);
    let stats = env.outbox.stats().await.unwrap();
    assert_eq!((stats.pending, stats.dead), (1, 1));
    assert_eq!(stats.oldest_pending_age, None, "{stats:?}");
    env.clock.advance(day - Duration::from_secs(1));
    assert_eq!(env.outbox.stats().await.unwrap().oldest_pending_age, None);

    // Due for 5 s: 5 s late, not a day.
    env.clock.advance(Duration::from_secs(6));
    let stats = env.outbox.stats().await.unwrap();
    assert_eq!(stats.oldest_pending_age, Some(Duration::from_secs(5)));
    // Claimed and failed, it stays late from when it fell due.
    recorder.set_fate(later, Fate::FailTimes(1));
    assert_eq!(d.dispatch_once().await.unwrap().retried, 1);
    env.clock.advance(Duration::from_secs(10));
    let stats = env.outbox.stats().await.unwrap();
    assert_eq!(stats.oldest_pending_age, Some(Duration::from_secs(15)));
    assert_eq!(d.dispatch_once().await.unwrap().published, 1);
    assert_eq!(env.outbox.stats().await.unwrap().oldest_pending_age, None);

    // A dead letter redriven a day after its enqueue is due from now.
    assert!(env.outbox.redrive(dead).await.unwrap());
    let stats = env.outbox.stats().await.unwrap();
    assert_eq!((stats.pending, stats.dead), (1, 0));
    assert_eq!(stats.oldest_pending_age, Some(Duration::ZERO));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_failures_are_dead_lettered_at_once_and_operators_redrive_or_purge_them() {
    let env = env().await;
    let ids = env
        .enqueue(vec![msg("refused", 0), msg("refused", 1), msg("other", 2)])
        .await;
    let recorder = Recorder::new();
    recorder.set_topic_fate("refused", Some(Fate::Permanent));
    recorder.set_topic_fate("other", Some(Fate::Permanent));
    let d = dispatcher(&env, &recorder).build().unwrap();
    let report = d.dispatch_once().await.unwrap();
    assert_eq!((report.claimed, report.dead_lettered), (3, 3));

    // Pages of dead letters.
    let first = env.outbox.dead_letters(2, None).await.unwrap();
    let rest = env.outbox.dead_letters(2, first.last()).await.unwrap();
    let mut all: Vec<MessageId> = first.iter().chain(&rest).map(|d| d.message.id).collect();
    all.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(all, expected);
    assert!(
        first[0]
            .last_error
            .as_deref()
            .unwrap()
            .contains("refused for good")
    );

    // Purge one; pending messages are never purged.
    assert!(env.outbox.purge(ids[0]).await.unwrap());
    assert!(!env.outbox.purge(ids[0]).await.unwrap());
    let pending = env.enqueue(vec![msg("fine", 3)]).await[0];
    assert!(!env.outbox.purge(pending).await.unwrap());

    // Redrive a topic's dead letters, then purge the rest.
    recorder.set_topic_fate("refused", None);
    assert_eq!(env.outbox.redrive_all(Some("refused")).await.unwrap(), 1);
    let report = d.run_until_idle().await.unwrap();
    assert_eq!(report.published, 2);
    let mut published = recorder.published_ids();
    published.sort();
    let mut want = vec![ids[1], pending];
    want.sort();
    assert_eq!(published, want);
    assert_eq!(env.outbox.purge_all(None).await.unwrap(), 1);
    assert_eq!(env.outbox_rows().await, 0);
    assert_eq!(env.outbox.redrive_all(None).await.unwrap(), 0);
}

#[test]
fn stats_count_pending_in_flight_and_dead_messages_and_the_oldest_age_also_as_gauges() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    use saga_postgres::metrics as m;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let metrics_recorder = DebuggingRecorder::new();
    let snapshotter = metrics_recorder.snapshotter();
    let env = rt.block_on(env());
    let stats = rt.block_on(async {
        let recorder = Recorder::new();
        // One dead letter, created at t0.
        let dead = env.enqueue(vec![msg("t", 0)]).await[0];
        recorder.set_fate(dead, Fate::Permanent);
        dispatcher(&env, &recorder)
            .build()
            .unwrap()
            .dispatch_once()
            .await
            .unwrap();
        // Three more at t0 + 5 s.
        env.clock.advance(Duration::from_secs(5));
        env.enqueue(vec![msg("t", 1), msg("t", 2), msg("t", 3)])
            .await;
        env.clock.advance(Duration::from_secs(10));
        // One of them in flight: claimed by a dispatcher that is publishing.
        recorder.hang_after_publish(true);
        let busy = dispatcher(&env, &recorder).batch_size(1).build().unwrap();
        let busy = tokio::spawn(async move { busy.dispatch_once().await });
        recorder.wait_calls(2).await;
        let stats = env.outbox.stats().await.unwrap();
        busy.abort();
        stats
    });
    assert_eq!(stats.pending, 2);
    assert_eq!(stats.in_flight, 1);
    assert_eq!(stats.dead, 1);
    assert_eq!(stats.oldest_pending_age, Some(Duration::from_secs(10)));

    let recorded =
        metrics::with_local_recorder(&metrics_recorder, || rt.block_on(env.outbox.record_stats()))
            .unwrap();
    assert_eq!(recorded, stats);
    let snapshot = snapshotter.snapshot().into_vec();
    let gauge = |name: &str| -> f64 {
        snapshot
            .iter()
            .find(|(key, _, _, _)| {
                key.key().name() == name
                    && key
                        .key()
                        .labels()
                        .any(|l| l.key() == "schema" && l.value() == env.schema.as_str())
            })
            .map(|(_, _, _, value)| match value {
                DebugValue::Gauge(g) => g.into_inner(),
                other => panic!("{name} is not a gauge: {other:?}"),
            })
            .unwrap_or_else(|| panic!("no gauge {name}"))
    };
    assert_eq!(gauge(m::OUTBOX_PENDING), 2.0);
    assert_eq!(gauge(m::OUTBOX_IN_FLIGHT), 1.0);
    assert_eq!(gauge(m::OUTBOX_DEAD), 1.0);
    assert_eq!(gauge(m::OUTBOX_OLDEST_PENDING_AGE), 10.0);
    drop(rt);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_messages_wait_for_their_time() {
    let env = env().await;
    let later = env
        .enqueue(vec![
            msg("t", 0).deliver_after(Duration::from_secs(30)).unwrap(),
        ])
        .await[0];
    let now = env.enqueue(vec![msg("t", 1)]).await[0];
    let recorder = Recorder::new();
    let d = dispatcher(&env, &recorder).build().unwrap();
    d.run_until_idle().await.unwrap();
    assert_eq!(recorder.published_ids(), vec![now]);
    env.clock.advance(Duration::from_secs(30));
    d.run_until_idle().await.unwrap();
    assert_eq!(recorder.published_ids(), vec![now, later]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_dispatchers_never_publish_a_batch_twice() {
    let env = env().await;
    let ids = env.enqueue((0..300).map(|n| msg("t", n)).collect()).await;
    let recorder = Recorder::new();
    // Four dispatchers as if in four processes: each its own pool.
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let pool = pool_from_config(env.test_schema.config(), 2).unwrap();
        let outbox = saga_postgres::outbox::Outbox::builder(pool, env.schema.clone())
            .clock(env.clock.clone())
            .build();
        let d = DispatcherBuilder::from_arc(outbox, recorder.clone())
            .batch_size(7)
            .lease_for(LEASE)
            .publish_timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        tasks.push(tokio::spawn(
            async move { d.run_until_idle().await.unwrap() },
        ));
    }
    let mut claimed_by = Vec::new();
    for t in tasks {
        claimed_by.push(t.await.unwrap().published);
    }
    assert_eq!(claimed_by.iter().sum::<u64>(), 300);
    let mut published = recorder.published_ids();
    assert_eq!(published.len(), 300, "no message published twice");
    published.sort();
    let mut expected = ids;
    expected.sort();
    assert_eq!(published, expected);
    assert_eq!(env.outbox_rows().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_publisher_fails_the_batch_not_the_dispatcher() {
    struct Panics;
    impl Publisher for Panics {
        async fn publish(&self, _: &[Outgoing]) -> Vec<Result<(), PublishError>> {
            panic!("publisher bug");
        }
    }
    let env = env().await;
    let ids = env.enqueue(vec![msg("t", 0), msg("t", 1)]).await;
    let d = Dispatcher::builder(env.outbox.clone(), Panics)
        .retry_policy(fixed_policy(3))
        .build()
        .unwrap();
    let report = d.dispatch_once().await.unwrap();
    assert_eq!((report.claimed, report.retried), (2, 2));
    let (attempts, error, _, dead) = env.row(ids[0]).await.unwrap();
    assert_eq!((attempts, dead), (1, false));
    assert!(error.unwrap().contains("panicked: publisher bug"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_whose_dispatchers_keep_dying_is_dead_lettered_after_its_budget() {
    let env = env().await;
    let id = env.enqueue(vec![msg("t", 0)]).await[0];
    let recorder = Recorder::new();
    recorder.hang_after_publish(true);
    // Two claims, each by a dispatcher killed while publishing.
    for call in 1..=2 {
        let d = dispatcher(&env, &recorder)
            .retry_policy(fixed_policy(2))
            .build()
            .unwrap();
        let killed = tokio::spawn(async move { d.dispatch_once().await });
        recorder.wait_calls(call).await;
        killed.abort();
        let _ = killed.await;
        env.clock.advance(LEASE + Duration::from_secs(1));
    }
    // The next claim dead-letters it instead of publishing a third time.
    recorder.hang_after_publish(false);
    let d = dispatcher(&env, &recorder)
        .retry_policy(fixed_policy(2))
        .build()
        .unwrap();
    let report = d.dispatch_once().await.unwrap();
    assert_eq!((report.claimed, report.dead_lettered), (0, 1));
    assert_eq!(recorder.attempts().len(), 2);
    let dead = env.outbox.dead_letters(10, None).await.unwrap();
    assert_eq!(dead[0].message.id, id);
    assert!(
        dead[0]
            .last_error
            .as_deref()
            .unwrap()
            .starts_with("abandoned")
    );
}

#[derive(Debug, Serialize, Deserialize)]
struct Order {
    id: u64,
}

async fn confirm(ctx: &mut StepContext, order: &mut Order) -> Result<(), StepError> {
    ctx.emit(
        Message::json("order.confirmed", &serde_json::json!({ "order": order.id }))?
            .key(format!("order-{}", order.id))?,
    )?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_emitted_by_a_saga_step_reaches_the_publisher_through_the_dispatcher() {
    let env = env().await;
    let store = PgSagaStore::builder(env.pool.clone(), env.schema.clone())
        .clock(env.clock.clone())
        .build();
    let checkout = SagaDefinition::<Order>::builder("checkout", 1)
        .pivot(Step::new("confirm", confirm))
        .build()
        .unwrap();
    let executor = Executor::builder(store)
        .register(checkout.clone())
        .build()
        .unwrap();
    let started = executor
        .client()
        .start(
            &checkout,
            StartKey::new("order-7").unwrap(),
            &Order { id: 7 },
        )
        .await
        .unwrap();
    executor.run_until_idle().await.unwrap();

    let (tx, mut rx) = mpsc::unbounded_channel();
    let publisher = InProcessPublisher::new().handle("order.confirmed", move |out| {
        let tx = tx.clone();
        async move {
            tx.send(out).map_err(|_| "test ended")?;
            Ok(())
        }
    });
    let d = Dispatcher::builder(env.outbox.clone(), publisher)
        .build()
        .unwrap();
    let report = d.run_until_idle().await.unwrap();
    assert_eq!(report.published, 1);
    let got = tokio::time::timeout(WAIT, rx.recv())
        .await
        .unwrap()
        .unwrap();
    let step = StepName::new("confirm").unwrap();
    assert_eq!(
        got.message.id,
        MessageId::derive(started.id, &step, Direction::Forward, 0)
    );
    assert_eq!(got.saga_id, Some(started.id));
    assert_eq!(got.message.key.as_deref(), Some("order-7"));
    assert_eq!(
        got.message.payload,
        saga_core::Payload::Json(serde_json::json!({"order": 7}))
    );
    assert_eq!(env.outbox_rows().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_row_is_dead_lettered_and_does_not_hold_up_the_rest() {
    let env = env().await;
    let good = env.enqueue(vec![msg("t", 0)]).await[0];
    let bad = env.enqueue(vec![msg("t", 1)]).await[0];
    // Somebody wrote a header that is not a string, by hand.
    let client = env.pool.get().await.unwrap();
    client
        .execute(
            &format!(
                "UPDATE {}.outbox SET headers = '{{\"h\": 1}}' WHERE id = $1",
                env.schema.quoted()
            ),
            &[&bad.as_uuid()],
        )
        .await
        .unwrap();
    let recorder = Recorder::new();
    let d = dispatcher(&env, &recorder).build().unwrap();
    let report = d.run_until_idle().await.unwrap();
    assert_eq!((report.published, report.dead_lettered), (1, 1));
    assert_eq!(recorder.published_ids(), vec![good]);
    let dead = env.outbox.stats().await.unwrap();
    assert_eq!(dead.dead, 1);
    let (_, error, _, is_dead) = env.row(bad).await.unwrap();
    assert!(is_dead);
    assert!(error.unwrap().starts_with("unreadable row"));
}

/// `env`'s outbox reached through a fault proxy (the test's own writes go
/// straight to the server).
async fn through_proxy(env: &Env) -> (FaultProxy, saga_postgres::Outbox) {
    let server = test_server().await.unwrap();
    let proxy = FaultProxy::start(server.socket_addr().await.unwrap())
        .await
        .unwrap();
    let pool = pool_from_config(env.test_schema.config_via(proxy.addr()), 2).unwrap();
    let outbox = saga_postgres::Outbox::builder(pool, env.schema.clone())
        .clock(env.clock.clone())
        .build();
    (proxy, outbox)
}

/// Dispatches three messages once through a proxy armed with `cut` on the
/// claim: all three are published at once (no lease to wait out), each on
/// its first attempt.
async fn claim_cut(cut: Cut) {
    let env = env().await;
    let ids = env.enqueue((0..3).map(|n| msg("t", n)).collect()).await;
    let (proxy, outbox) = through_proxy(&env).await;
    let recorder = Recorder::new();
    let d = DispatcherBuilder::from_arc(outbox, recorder.clone())
        .lease_for(LEASE)
        .publish_timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    proxy.arm(cut);
    let fired = proxy.fired();

    // The clock does not move: nothing waits for a lease to expire.
    let report = d.dispatch_once().await.expect("the claim goes through");
    tokio::time::timeout(WAIT, fired)
        .await
        .expect("the cut fired");

    assert_eq!((report.claimed, report.published), (3, 3), "{report:?}");
    let mut published = recorder.published_ids();
    published.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(published, want, "each message once");
    assert!(
        recorder.published().iter().all(|o| o.attempt == 1),
        "no attempt spent: {:?}",
        recorder.published()
    );
    assert_eq!(env.outbox_rows().await, 0);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_claim_whose_reply_is_lost_publishes_what_it_leased_at_once() {
    claim_cut(Cut::AfterQueryContaining("SKIP LOCKED".into())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_claim_that_never_reached_the_server_claims_again() {
    claim_cut(Cut::BeforeQueryContaining("SKIP LOCKED".into())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settling_is_retried_across_a_dropped_connection() {
    for cut in [
        Cut::BeforeQueryContaining("WITH done AS".into()),
        Cut::AfterQueryContaining("WITH done AS".into()),
    ] {
        let env = env().await;
        env.enqueue((0..3).map(|n| msg("t", n)).collect()).await;
        let (proxy, outbox) = through_proxy(&env).await;
        let recorder = Recorder::new();
        let d = DispatcherBuilder::from_arc(outbox, recorder.clone())
            .lease_for(LEASE)
            .publish_timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        proxy.arm(cut.clone());
        let fired = proxy.fired();

        let report = d.dispatch_once().await.expect("settling goes through");
        tokio::time::timeout(WAIT, fired)
            .await
            .expect("the cut fired");

        if matches!(cut, Cut::BeforeQueryContaining(_)) {
            assert_eq!(report.published, 3, "{report:?}");
        }
        // Either way the batch is settled: nothing left, nothing published
        // twice, nothing to publish again once the lease would expire.
        assert_eq!(env.outbox_rows().await, 0, "{cut:?}");
        env.clock.advance(LEASE * 2);
        assert_eq!(d.run_until_idle().await.unwrap().claimed, 0);
        assert_eq!(recorder.published_ids().len(), 3, "{cut:?}");
        proxy.stop().await;
    }
}
