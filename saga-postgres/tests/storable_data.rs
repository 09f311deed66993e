//! Data PostgreSQL cannot store as given fails at once, with its reason:
//! a NUL in a state or a payload, a non-finite number, a state over the
//! store's cap; the server's own data exceptions are permanent, never
//! retried; and a row whose attempt count no claim can take is parked by
//! itself while the rest of its kind is claimed.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use saga_core::Limits;
use saga_core::store::SagaStore;
use saga_core::testing::{Script, scripted_saga};
use saga_core::{
    Error, Executor, ManualClock, Message, MessageId, OutboxMessage, Outcome, Payload, SagaClient,
    SagaDefinition, SagaId, StartKey, Status, Step, StepContext, StepError, Unstorable,
};
use saga_postgres::outbox::{Outbox, OutboxError};
use saga_postgres::{MIGRATIONS, PgError, migrate, migrate_with};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Order {
    note: String,
    total: f64,
}

#[derive(Debug, Clone, Copy)]
enum Stamp {
    Nul,
    NaN,
    NaNMessage,
    Big,
    NulInError,
}

#[derive(Default)]
struct Calls {
    stamp: AtomicU32,
    undo: AtomicU32,
}

#[derive(Debug, thiserror::Error)]
#[error("the gateway said \u{0}")]
struct Odd;

fn saga(stamp: Stamp, past_pivot: bool, calls: &Arc<Calls>) -> SagaDefinition<Order> {
    let c = calls.clone();
    let step = saga_core::action_fn(move |ctx: &mut StepContext, order: &mut Order| {
        c.stamp.fetch_add(1, Ordering::SeqCst);
        let done = match stamp {
            Stamp::Nul => {
                order.note = "gift\u{0}wrap".into();
                Ok(())
            }
            Stamp::NaN => {
                order.total = f64::NAN;
                Ok(())
            }
            Stamp::NaNMessage => Message::json("order.total", &[f64::NAN])
                .map_err(StepError::from)
                .and_then(|m| ctx.emit(m).map(|_| ())),
            Stamp::Big => {
                order.note = "x".repeat(2000);
                Ok(())
            }
            Stamp::NulInError => Err(StepError::permanent(Odd)),
        };
        Box::pin(async move { done })
    });
    let c = calls.clone();
    let undo = saga_core::action_fn(move |_, _: &mut Order| {
        c.undo.fetch_add(1, Ordering::SeqCst);
        Box::pin(async { Ok(()) })
    });
    let b = SagaDefinition::<Order>::builder("stamped", 1);
    if past_pivot {
        b.pivot(Step::new("confirm", noop))
            .step(Step::new("stamp", step))
            .build()
            .unwrap()
    } else {
        b.step(Step::new("stamp", step).compensate_with(undo))
            .build()
            .unwrap()
    }
}

async fn noop(_: &mut StepContext, _: &mut Order) -> Result<(), StepError> {
    Ok(())
}

fn key() -> StartKey {
    StartKey::new("order-1").unwrap()
}

/// One instance of `saga` run on `store` until nothing is due; no store
/// error on the way.
async fn run_one(store: &common::TestStore, saga: &SagaDefinition<Order>) -> SagaId {
    let exec = Executor::builder_from_arc(Arc::new(store.store.clone()))
        .register(saga.clone())
        .build()
        .unwrap();
    let id = exec
        .client()
        .start(saga, key(), &Order::default())
        .await
        .unwrap()
        .id;
    let report = exec.run_until_idle().await.unwrap();
    assert_eq!(report.store_errors, 0, "{report:?}");
    id
}

/// The step's one failure: failed for good, no retry.
async fn failure(store: &common::TestStore, id: SagaId) -> String {
    let history = store.history(id).await.unwrap();
    let failed: Vec<_> = history
        .iter()
        .filter(|e| {
            e.step.as_str() == "stamp"
                && !matches!(e.outcome, Outcome::Succeeded | Outcome::Created)
        })
        .collect();
    assert_eq!(failed.len(), 1, "{history:#?}");
    assert_eq!(failed[0].outcome, Outcome::FailedForGood);
    failed[0].error.clone().unwrap()
}

async fn fresh() -> common::TestStore {
    common::fresh_store(Arc::new(ManualClock::starting_now())).await
}

async fn count(store: &common::TestStore, sql: &str) -> i64 {
    let db = store.pool().get().await.unwrap();
    let sql = sql.replace("{s}", &store.schema().quoted());
    common::count(&db, &sql, &[]).await
}

#[tokio::test]
async fn a_nul_in_a_steps_state_fails_it_once_for_good_and_compensates() {
    let store = fresh().await;
    let calls = Arc::new(Calls::default());
    let id = run_one(&store, &saga(Stamp::Nul, false, &calls)).await;
    let s = store.load(id).await.unwrap().unwrap();
    assert_eq!(s.status, Status::Compensated);
    let error = failure(&store, id).await;
    assert!(
        error.contains(
            "saga state cannot be stored: a NUL character (\\u0000) in a string at $.note"
        ),
        "{error}"
    );
    assert!(!error.contains("lost leases"), "{error}");
    assert_eq!(calls.stamp.load(Ordering::SeqCst), 1, "the step ran once");
    assert_eq!(calls.undo.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_nul_in_a_steps_state_past_the_pivot_parks_it_with_a_truthful_reason() {
    let store = fresh().await;
    let calls = Arc::new(Calls::default());
    let id = run_one(&store, &saga(Stamp::Nul, true, &calls)).await;
    let s = store.load(id).await.unwrap().unwrap();
    assert_eq!(s.status, Status::Stuck);
    let reason = s.stuck_reason.unwrap();
    assert!(reason.contains("a NUL character"), "{reason}");
    assert!(!reason.contains("lost leases"), "{reason}");
    failure(&store, id).await;
    assert_eq!(calls.stamp.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_nul_in_a_steps_error_is_recorded_escaped_not_rerun() {
    let store = fresh().await;
    let calls = Arc::new(Calls::default());
    let id = run_one(&store, &saga(Stamp::NulInError, false, &calls)).await;
    assert_eq!(
        store.load(id).await.unwrap().unwrap().status,
        Status::Compensated
    );
    let error = failure(&store, id).await;
    assert!(error.ends_with("the gateway said \\0"), "{error}");
    assert_eq!(calls.stamp.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_non_finite_number_at_start_is_a_typed_error_and_nothing_is_written() {
    let store = fresh().await;
    let calls = Arc::new(Calls::default());
    let saga = saga(Stamp::NaN, false, &calls);
    let client = SagaClient::new(store.store.clone());
    let input = Order {
        total: f64::INFINITY,
        ..Order::default()
    };
    let err = client.start(&saga, key(), &input).await.unwrap_err();
    assert!(
        matches!(
            &err,
            Error::Unstorable {
                what: "saga input",
                problem: Unstorable::NonFinite { value: "inf", .. }
            }
        ),
        "{err:?}"
    );
    for table in ["saga_instances", "saga_history", "outbox"] {
        assert_eq!(
            count(&store, &format!("SELECT count(*) FROM {{s}}.{table}")).await,
            0
        );
    }
}

#[tokio::test]
async fn a_non_finite_number_in_a_state_or_a_message_fails_the_step_for_good() {
    for (stamp, expected) in [
        (Stamp::NaN, "a non-finite number (NaN) at $.total"),
        (Stamp::NaNMessage, "the message payload cannot be stored"),
    ] {
        let store = fresh().await;
        let calls = Arc::new(Calls::default());
        let id = run_one(&store, &saga(stamp, false, &calls)).await;
        let s = store.load(id).await.unwrap().unwrap();
        assert_eq!(s.status, Status::Compensated, "{stamp:?}");
        assert_eq!(s.state["total"], 0.0, "{stamp:?}: not written as null");
        let error = failure(&store, id).await;
        assert!(error.contains(expected), "{stamp:?}: {error}");
        assert_eq!(calls.stamp.load(Ordering::SeqCst), 1, "{stamp:?}");
        assert!(store.outbox_for(id).await.unwrap().is_empty());
    }
}

#[tokio::test]
async fn a_state_over_the_stores_cap_fails_the_step_once_for_good() {
    // The executor has no cap of its own: it checks against the store's,
    // which used to refuse the record and rerun the step per lease expiry.
    let store = fresh().await.map(|b| b.limits(Limits::new(1024, 1024)));
    let calls = Arc::new(Calls::default());
    let id = run_one(&store, &saga(Stamp::Big, false, &calls)).await;
    assert_eq!(
        store.load(id).await.unwrap().unwrap().status,
        Status::Compensated
    );
    let error = failure(&store, id).await;
    assert!(error.contains("over the limit of 1024 bytes"), "{error}");
    assert_eq!(calls.stamp.load(Ordering::SeqCst), 1, "the step ran once");
    assert_eq!(calls.undo.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_outbox_payload_with_a_nul_is_refused_before_it_is_sent() {
    let store = fresh().await;
    let outbox = Outbox::new(store.pool().clone(), store.schema().clone());
    let message = OutboxMessage {
        id: MessageId::new(),
        topic: "order.noted".into(),
        key: None,
        payload: Payload::Json(serde_json::json!({ "note": "a\u{0}b" })),
        headers: Default::default(),
        available_at: store.clock().now(),
    };
    let mut db = store.pool().get().await.unwrap();
    let tx = db.transaction().await.unwrap();
    let err = outbox
        .enqueue_with_ids_in_tx(&tx, std::slice::from_ref(&message))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, OutboxError::Unstorable { id, .. } if *id == message.id),
        "{err:?}"
    );
    // Refused before anything was sent: the transaction is intact.
    tx.query_one("SELECT 1", &[]).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(count(&store, "SELECT count(*) FROM {s}.outbox").await, 0);
}

#[tokio::test]
async fn the_servers_data_exceptions_refuse_the_data_and_are_never_retried() {
    let store = fresh().await;
    let db = store.pool().get().await.unwrap();
    for (sql, code) in [
        (r"SELECT '{}'::jsonb", None),
        (r#"SELECT '"\u0000"'::jsonb"#, Some("22P05")),
        ("SELECT 2147483647::int4 + 1", Some("22003")),
        ("SELECT repeat('x', 1073741824)", Some("54000")),
    ] {
        let result = db.query(sql, &[]).await;
        let Some(code) = code else {
            result.unwrap();
            continue;
        };
        let err = saga_core::Error::from(PgError::from(result.unwrap_err()));
        assert_eq!(err.code(), Some(code), "{sql}");
        assert!(err.refuses_data(), "{sql}: {err}");
        assert!(!err.is_retryable(), "{sql}");
    }
}

/// Sets `attempt` of `id` by hand.
async fn set_attempt(store: &common::TestStore, id: SagaId, attempt: i32) -> Result<u64, PgError> {
    let db = store.pool().get().await.unwrap();
    let sql = format!(
        "UPDATE {}.saga_instances SET attempt = $2 WHERE id = $1",
        store.schema().quoted()
    );
    Ok(db.execute(&sql, &[&id.as_uuid(), &attempt]).await?)
}

#[tokio::test]
async fn a_row_at_the_attempt_bound_is_parked_by_itself_and_the_rest_of_its_kind_run() {
    // A schema before migration 6, where a count at the integer maximum
    // could be written; then migrated.
    let common::FreshSchema {
        pool,
        schema,
        guard: _guard,
        ..
    } = common::fresh_schema().await;
    let mut client = pool.get().await.unwrap();
    let before_6: Vec<_> = MIGRATIONS
        .iter()
        .copied()
        .filter(|m| m.version < 6)
        .collect();
    migrate_with(&mut client, &schema, &before_6).await.unwrap();
    let clock = Arc::new(ManualClock::starting_now());
    let pg = saga_postgres::PgSagaStore::builder(pool.clone(), schema.clone())
        .clock(clock.clone())
        .build();
    let script = Script::new();
    let saga = scripted_saga(&script, 1);
    let client_ = SagaClient::new(pg.clone());
    let ids = common::start_orders(&client_, &saga, 1..=4).await;
    let poison = ids[1];
    client
        .execute(
            &format!(
                "UPDATE {}.saga_instances SET attempt = 2147483647 WHERE id = $1",
                schema.quoted()
            ),
            &[&poison.as_uuid()],
        )
        .await
        .unwrap();
    migrate(&mut client, &schema).await.unwrap();

    let exec = Executor::builder(pg.clone())
        .register(saga.clone())
        .build()
        .unwrap();
    let report = exec.run_until_idle().await.unwrap();
    assert_eq!(report.store_errors, 0, "{report:?}");
    for id in [ids[0], ids[2], ids[3]] {
        assert_eq!(
            pg.load(id).await.unwrap().unwrap().status,
            Status::Completed
        );
    }
    let s = pg.load(poison).await.unwrap().unwrap();
    assert_eq!(s.status, Status::Stuck);
    assert_eq!(
        s.attempt, 1_000_000,
        "clamped to the bound by the migration"
    );
    let reason = s.stuck_reason.unwrap();
    assert!(
        reason.contains("attempt count is at its bound (1000000)"),
        "{reason}"
    );
    assert_eq!(pg.stats().unclaimable_parked, 1);
    assert_eq!(pg.stats().malformed_parked, 0);
    let parked = pg.history(poison).await.unwrap();
    let last = parked.last().unwrap();
    assert_eq!(
        (last.outcome, last.to_status),
        (Outcome::Parked, Status::Stuck)
    );
    assert!(
        script.trace(2).is_empty(),
        "the poison row's step never ran: {:?}",
        script.trace(2)
    );
}

#[tokio::test]
async fn the_schema_refuses_an_attempt_count_past_the_bound() {
    let store = fresh().await;
    let client = SagaClient::new(store.store.clone());
    let saga = scripted_saga(&Script::new(), 1);
    let id = common::start_orders(&client, &saga, 1..=1).await[0];
    assert_eq!(set_attempt(&store, id, 1_000_000).await.unwrap(), 1);
    let err = set_attempt(&store, id, 1_000_001).await.unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("23514"), "{err}");
    // At the bound, a claim parks it instead of counting past it.
    let claimed = store
        .claim(saga_core::store::ClaimRequest {
            worker: saga_core::WorkerId::new(),
            kinds: &[saga.kind().clone()],
            fingerprints: &[saga.shape().fingerprint()],
            limit: 10,
            lease_for: std::time::Duration::from_secs(30),
        })
        .await
        .unwrap();
    assert!(claimed.is_empty());
    assert_eq!(store.load(id).await.unwrap().unwrap().status, Status::Stuck);
    assert_eq!(store.stats().unclaimable_parked, 1);
}
