//! Failures of the database itself: a connection dropped while a
//! transition's commit is in flight, and a PostgreSQL crash and restart.

mod common;

use std::sync::Arc;
use std::time::Duration;

use saga_core::testing::{Behavior, Gate, Script, TestState, scripted_saga};
use saga_core::{
    ClaimRequest, Clock, Direction, Executor, HistoryEntry, ManualClock, Message, MessageId,
    Outcome, Record, SagaClient, SagaStore, StartKey, Status, StepName, TransitionId, WorkerId,
};
use saga_postgres::testing::proxy::{Cut, FaultProxy};
use saga_postgres::testing::{TestCluster, test_server};
use saga_postgres::{PgSagaStore, SchemaName, pool_from_config};

const LEASE: Duration = Duration::from_secs(30);
const WAIT: Duration = Duration::from_secs(60);

/// A record moving the instance to its second step, with one outbox
/// message, as the executor would write it.
fn advance(id: saga_core::SagaId, now: saga_core::Timestamp) -> Record {
    let tid = TransitionId::new();
    let validate = StepName::new("validate").unwrap();
    let message = Message::json("order.validated", &serde_json::json!({ "ok": true }))
        .unwrap()
        .into_outbox(MessageId::derive(id, &validate, Direction::Forward, 0), now);
    Record {
        transition_id: tid,
        status: Status::Running,
        step: StepName::new("charge").unwrap(),
        direction: Direction::Forward,
        attempt: 0,
        first_attempt_at: None,
        next_run_at: Some(now),
        state: Some(serde_json::json!({ "order": 1, "done": ["validate:forward"] })),
        stuck_reason: None,
        outbox: vec![message],
        history: HistoryEntry {
            transition_id: tid,
            step: validate,
            direction: Direction::Forward,
            attempt: 1,
            outcome: Outcome::Succeeded,
            error: None,
            from_status: Some(Status::Running),
            to_status: Status::Running,
            started_at: now,
            finished_at: now,
        },
    }
}

/// Runs one transition through a proxy armed with `cut` and checks it was
/// applied exactly once. Returns the store's stats.
async fn transition_through(cut: Cut) -> saga_postgres::StoreStats {
    let fresh = common::fresh_schema().await;
    let mut admin = fresh.pool.get().await.unwrap();
    saga_postgres::migrate(&mut admin, &fresh.schema)
        .await
        .unwrap();
    let server = test_server().await.unwrap();
    let proxy = FaultProxy::start(server.socket_addr().await.unwrap())
        .await
        .unwrap();
    let clock = Arc::new(ManualClock::starting_now());
    let store = PgSagaStore::new(
        pool_from_config(fresh.guard.config_via(proxy.addr()), 4).unwrap(),
        fresh.schema.clone(),
    )
    .with_clock(clock.clone());

    let saga = scripted_saga(&Script::new(), 1);
    let id = SagaClient::new(store.clone())
        .start(
            &saga,
            StartKey::new("order-1").unwrap(),
            &TestState::order(1),
        )
        .await
        .unwrap()
        .id;
    let kinds = [saga.kind().clone()];
    let claimed = store
        .claim(ClaimRequest {
            worker: WorkerId::new(),
            kinds: &kinds,
            limit: 1,
            lease_for: LEASE,
        })
        .await
        .unwrap()
        .remove(0);
    let before = store.load(id).await.unwrap().unwrap();
    let record = advance(id, clock.now());
    let tid = record.transition_id;

    proxy.arm(cut);
    let fired = proxy.fired();
    store
        .record(&claimed.lease, record)
        .await
        .expect("the store resolves the ambiguity and reports success");
    tokio::time::timeout(WAIT, fired)
        .await
        .expect("the cut fired");
    assert_eq!(proxy.fired_count(), 1);

    // Exactly once: one history row for the transition, one version bump,
    // one copy of the message, the lease released.
    let history = store.history(id).await.unwrap();
    assert_eq!(history.iter().filter(|h| h.transition_id == tid).count(), 1);
    assert_eq!(history.len(), 2, "created + this transition: {history:#?}");
    let after = store.load(id).await.unwrap().unwrap();
    assert_eq!(after.version, before.version + 1);
    assert_eq!(
        (after.step.as_str(), after.attempt, after.lease),
        ("charge", 0, None)
    );
    assert_eq!(store.outbox_for(id).await.unwrap().len(), 1);
    let stats = store.stats();
    drop(admin);
    proxy.stop().await;
    stats
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_reply_is_lost_is_found_committed_and_not_applied_again() {
    let stats = transition_through(Cut::AfterExecute).await;
    assert_eq!(stats.ambiguous_committed, 1, "{stats:?}");
    assert_eq!(stats.ambiguous_not_committed, 0, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_that_never_reached_the_server_is_found_missing_and_written_again() {
    let stats = transition_through(Cut::BeforeExecute).await;
    assert_eq!(stats.ambiguous_committed, 0, "{stats:?}");
    assert_eq!(stats.ambiguous_not_committed, 1, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_survives_a_postgres_crash_and_restart() {
    let cluster = TestCluster::start()
        .await
        .expect("local PostgreSQL binaries");
    let db = cluster.fresh_database().await.unwrap();
    let schema = SchemaName::new("saga").unwrap();
    let pool = pool_from_config(db.config(), 4).unwrap();
    saga_postgres::migrate(&mut pool.get().await.unwrap(), &schema)
        .await
        .unwrap();
    let store = PgSagaStore::new(pool, schema).with_reconnect_for(Duration::from_secs(60));
    let script = Script::new();
    let saga = scripted_saga(&script, 1);
    let gate = Gate::new();
    script.on(
        1,
        "charge",
        Direction::Forward,
        [Behavior::Wait(gate.clone())],
    );
    let exec = Executor::builder(store.clone())
        .register(saga.clone())
        .concurrency(4)
        .build()
        .unwrap();
    let client = exec.client();
    let mut ids = Vec::new();
    for n in 1..=8 {
        let key = StartKey::new(format!("order-{n}")).unwrap();
        ids.push(
            client
                .start(&saga, key, &TestState::order(n))
                .await
                .unwrap()
                .id,
        );
    }
    let worker = tokio::spawn({
        let exec = exec.clone();
        async move { exec.run_until_idle().await }
    });
    // Order 1 is inside `charge` when the server crashes.
    tokio::time::timeout(WAIT, gate.entered()).await.unwrap();
    cluster.stop_immediate().await.unwrap();
    assert!(!cluster.is_running());
    // The step finishes while the database is down; its result waits for
    // the server to come back.
    gate.open();
    cluster.start_again().await.unwrap();
    let report = tokio::time::timeout(WAIT, worker)
        .await
        .expect("the worker finishes")
        .unwrap()
        .expect("no operator action needed");
    for id in ids {
        assert_eq!(
            store.load(id).await.unwrap().unwrap().status,
            Status::Completed,
            "{id}"
        );
    }
    assert!(
        store.stats().retries > 0,
        "the crash was noticed: {:?}",
        store.stats()
    );
    assert_eq!(report.store_errors, 0, "{report:?}");
    let charge_successes = store
        .history(exec_first(&script))
        .await
        .unwrap()
        .iter()
        .filter(|h| h.step.as_str() == "charge" && h.outcome == Outcome::Succeeded)
        .count();
    assert_eq!(charge_successes, 1);
}

/// The instance of order 1, found through the script's call log.
fn exec_first(script: &Script) -> saga_core::SagaId {
    script
        .calls()
        .iter()
        .find(|c| c.order == 1)
        .expect("order 1 ran")
        .saga_id
}
