//! Leases, due times and outbox availability are the database server's
//! time, not each worker's: a worker whose clock runs 90 s ahead takes over
//! no live lease, publishes nothing early, and schedules its retries on the
//! server's timeline.

mod common;
mod outbox_support;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use outbox_support::{Fate, Recorder, msg};
use saga_core::store::{ClaimRequest, SagaStore};
use saga_core::testing::{Behavior, Script, TestState, scripted_saga};
use saga_core::{
    Clock, Direction, Executor, Jitter, RetryPolicy, SagaClient, StartKey, SystemClock, Timestamp,
    WorkerId,
};
use saga_postgres::deadpool_postgres::Pool;
use saga_postgres::inbox::{ConsumerName, Delivery, Inbox};
use saga_postgres::outbox::{DispatcherBuilder, Outbox};
use saga_postgres::{PgSagaStore, SchemaName};

/// How far ahead the skewed worker's clock runs.
const SKEW: Duration = Duration::from_secs(90);
const LEASE: Duration = Duration::from_secs(30);

/// The system clock, running `0` ahead.
#[derive(Debug)]
struct Ahead(Duration);

impl Clock for Ahead {
    fn now(&self) -> Timestamp {
        SystemClock.now() + self.0
    }
}

/// A fresh, migrated schema with two stores on the server's time: one on a
/// worker whose clock is right, one on a worker whose clock runs ahead.
struct Workers {
    on_time: PgSagaStore,
    ahead: PgSagaStore,
    fresh: common::FreshSchema,
}

async fn workers() -> Workers {
    let fresh = common::fresh_schema().await;
    let mut client = fresh.pool.get().await.unwrap();
    saga_postgres::migrate(&mut client, &fresh.schema)
        .await
        .unwrap();
    drop(client);
    Workers {
        on_time: PgSagaStore::new(fresh.pool.clone(), fresh.schema.clone()),
        ahead: PgSagaStore::builder(fresh.pool.clone(), fresh.schema.clone())
            .local_clock(Arc::new(Ahead(SKEW)))
            .build(),
        fresh,
    }
}

/// How far `sql`'s one `timestamptz` lies after the server's `now()`, in
/// seconds (negative: before).
async fn seconds_after_now(pool: &Pool, sql: &str) -> f64 {
    let client = pool.get().await.unwrap();
    client
        .query_one(
            &format!("SELECT extract(epoch FROM ({sql}) - now())::float8"),
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_clock_runs_ahead_takes_over_no_live_lease() {
    let w = workers().await;
    let saga = scripted_saga(&Script::new(), 1);
    let kinds = [saga.kind().clone()];
    let id = SagaClient::new(w.on_time.clone())
        .start(
            &saga,
            StartKey::new("order-1").unwrap(),
            &TestState::order(1),
        )
        .await
        .unwrap()
        .id;
    let fingerprints = [saga.shape().fingerprint()];
    let request = |worker| ClaimRequest {
        worker,
        kinds: &kinds,
        fingerprints: &fingerprints,
        limit: 10,
        lease_for: LEASE,
    };
    let held = w.on_time.claim(request(WorkerId::new())).await.unwrap();
    assert_eq!(held.len(), 1);

    // By the skewed worker's own clock that lease expired a minute ago.
    assert!(Ahead(SKEW).now() > held[0].lease.expires_at);
    let taken = w.ahead.claim(request(WorkerId::new())).await.unwrap();
    assert!(taken.is_empty(), "took over a live lease: {taken:?}");

    // The holder still holds it.
    w.on_time.heartbeat(&held[0].lease, LEASE).await.unwrap();
    let row = w.on_time.load(id).await.unwrap().unwrap();
    assert_eq!(row.attempt, 1, "no second attempt was started");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_clock_runs_ahead_schedules_retries_on_the_servers_timeline() {
    let w = workers().await;
    let script = Script::new();
    let snooze = Duration::from_secs(10);
    script.on(
        1,
        "validate",
        Direction::Forward,
        [Behavior::Snooze(snooze)],
    );
    let saga = scripted_saga(&script, 1);
    let executor = Executor::builder(w.ahead.clone())
        .register(saga.clone())
        .lease_duration(LEASE)
        .build()
        .unwrap();
    let id = executor
        .client()
        .start(
            &saga,
            StartKey::new("order-1").unwrap(),
            &TestState::order(1),
        )
        .await
        .unwrap()
        .id;

    executor.run_until_idle().await.unwrap();

    // The store's clock is the server's, not the worker's.
    let server = seconds_after_now(
        &w.fresh.pool,
        &format!(
            "SELECT to_timestamp({}::float8 / 1e6)",
            w.ahead.clock().now().as_micros()
        ),
    )
    .await;
    assert!(
        server.abs() < 5.0,
        "the store's clock is {server} s off the server's"
    );
    // The snoozed step is due 10 s from the server's now, not 100 s.
    let due = seconds_after_now(
        &w.fresh.pool,
        &format!(
            "SELECT next_run_at FROM {}.saga_instances WHERE id = '{}'",
            w.fresh.schema.quoted(),
            id.as_uuid()
        ),
    )
    .await;
    assert!(
        due > 0.0 && due <= snooze.as_secs_f64() + 1.0,
        "due {due} s after the server's now"
    );
}

fn slow_policy() -> RetryPolicy {
    RetryPolicy::builder()
        .initial_delay(Duration::from_secs(60))
        .multiplier(1.0)
        .max_delay(Duration::from_secs(60))
        .max_attempts(5)
        .no_max_elapsed()
        .jitter(Jitter::None)
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispatcher_whose_clock_runs_ahead_publishes_nothing_before_its_time() {
    let w = workers().await;
    let schema: &SchemaName = &w.fresh.schema;
    let on_time = Outbox::new(w.fresh.pool.clone(), schema.clone());
    let ahead = Outbox::builder(w.fresh.pool.clone(), schema.clone())
        .local_clock(Arc::new(Ahead(SKEW)))
        .build();
    let mut client = w.fresh.pool.get().await.unwrap();
    let tx = client.transaction().await.unwrap();
    let id = on_time.enqueue_in_tx(&tx, msg("t", 1)).await.unwrap();
    tx.commit().await.unwrap();

    // The first attempt fails: the next one is a minute away.
    let failing = Recorder::new();
    failing.set_fate(id, Fate::AlwaysFail);
    let first = DispatcherBuilder::from_arc(on_time, failing)
        .retry_policy(slow_policy())
        .build()
        .unwrap();
    assert_eq!(first.dispatch_once().await.unwrap().retried, 1);
    let due = seconds_after_now(
        &w.fresh.pool,
        &format!(
            "SELECT available_at FROM {}.outbox WHERE id = '{}'",
            schema.quoted(),
            id.as_uuid()
        ),
    )
    .await;
    assert!(
        due > 50.0 && due <= 61.0,
        "retry due {due} s after the server's now"
    );

    // By the skewed dispatcher's clock it is due; by the server's it is not.
    let recorder = Recorder::new();
    let second = DispatcherBuilder::from_arc(ahead, recorder.clone())
        .retry_policy(slow_policy())
        .build()
        .unwrap();
    let report = second.dispatch_once().await.unwrap();
    assert_eq!(report.claimed, 0, "{report:?}");
    assert!(recorder.published_ids().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_and_inbox_rows_carry_the_servers_time() {
    let w = workers().await;
    let schema = &w.fresh.schema;
    let outbox = Outbox::new(w.fresh.pool.clone(), schema.clone());
    let inbox = Inbox::new(w.fresh.pool.clone(), schema.clone());
    let consumer = ConsumerName::new("c").unwrap();
    let mut client = w.fresh.pool.get().await.unwrap();
    let tx = client.transaction().await.unwrap();
    let id = outbox.enqueue_in_tx(&tx, msg("t", 1)).await.unwrap();
    assert_eq!(
        inbox.process_once_in_tx(&tx, &consumer, id).await.unwrap(),
        Delivery::First
    );
    // `now()` is the transaction's start on the server: what both rows got.
    let row = tx
        .query_one(
            &format!(
                "SELECT o.created_at = now(), o.available_at = now(), i.processed_at = now(),
                    now()
                 FROM {s}.outbox o, {s}.inbox i WHERE o.id = $1 AND i.message_id = $1",
                s = schema.quoted()
            ),
            &[&id.as_uuid()],
        )
        .await
        .unwrap();
    let server_now: SystemTime = row.get(3);
    assert_eq!(
        (
            row.get::<_, bool>(0),
            row.get::<_, bool>(1),
            row.get::<_, bool>(2)
        ),
        (true, true, true),
        "server now {server_now:?}"
    );
    tx.commit().await.unwrap();
}
