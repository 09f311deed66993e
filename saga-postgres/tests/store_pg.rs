//! Postgres-specific behaviour of the store, beyond the conformance suite
//! (which `conformance.rs` runs).

mod common;

use std::sync::Arc;

use saga_core::store::{ClaimRequest, ClaimedSaga, NewSaga, SagaStore};
use saga_core::testing::{Script, TestState, scripted_saga};
use saga_core::{
    DEFAULT_MAX_BYTES, Error, Limits, ManualClock, Message, MessageId, SagaClient, SagaDefinition,
    SagaKind, StartKey, Status, WorkerId,
};
use saga_postgres::tokio_postgres::error::SqlState;
use saga_postgres::{PgError, PgSagaStore};

const LEASE: std::time::Duration = std::time::Duration::from_secs(30);

/// Claims as a worker that has `sagas` registered.
async fn claim(
    store: &PgSagaStore,
    sagas: &[&SagaDefinition<TestState>],
    limit: usize,
) -> Vec<ClaimedSaga> {
    let kinds: Vec<SagaKind> = sagas.iter().map(|s| s.kind().clone()).collect();
    let fingerprints: Vec<_> = sagas.iter().map(|s| s.shape().fingerprint()).collect();
    store
        .claim(ClaimRequest {
            worker: WorkerId::new(),
            kinds: &kinds,
            fingerprints: &fingerprints,
            limit,
            lease_for: LEASE,
        })
        .await
        .unwrap()
}

/// `count(*)` of a table of the store's schema, with an optional condition.
async fn rows(store: &PgSagaStore, table: &str, condition: &str) -> i64 {
    let db = store.pool().get().await.unwrap();
    let s = store.schema().quoted();
    common::count(
        &db,
        &format!("SELECT count(*) FROM {s}.{table} {condition}"),
        &[],
    )
    .await
}

/// An instance of the scripted saga, claimed: its lease, ready for a
/// transition.
async fn started_and_claimed(store: &PgSagaStore, order: u32) -> ClaimedSaga {
    let saga = scripted_saga(&Script::new(), 1);
    let id = SagaClient::new(store.clone())
        .start(
            &saga,
            StartKey::new(format!("order-{order}")).unwrap(),
            &TestState::order(order),
        )
        .await
        .unwrap()
        .id;
    let claimed = claim(store, &[&saga], 1).await;
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].lease.saga_id, id);
    claimed.into_iter().next().unwrap()
}

/// Makes the next insert into `saga_history` fail once with `sqlstate`,
/// as a real conflict would: a test-only trigger whose counter is a
/// sequence (`nextval` is not rolled back with the failed statement).
async fn fail_next_history_insert_once(store: &PgSagaStore, sqlstate: &str) {
    let s = store.schema().quoted();
    let db = store.pool().get().await.unwrap();
    db.batch_execute(&format!(
        "CREATE SEQUENCE {s}.fail_once;
         CREATE FUNCTION {s}.fail_once() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF nextval('{s}.fail_once') = 1 THEN
                 RAISE EXCEPTION 'injected by the test' USING ERRCODE = '{sqlstate}';
             END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER fail_once BEFORE INSERT ON {s}.saga_history
             FOR EACH ROW EXECUTE FUNCTION {s}.fail_once();"
    ))
    .await
    .unwrap();
}

/// How many times the trigger of [`fail_next_history_insert_once`] ran.
async fn trigger_runs(store: &PgSagaStore) -> i64 {
    let db = store.pool().get().await.unwrap();
    let s = store.schema().quoted();
    let sql = format!("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM {s}.fail_once");
    common::count(&db, &sql, &[]).await
}

/// A transition whose first attempt fails with `sqlstate` (40001 or
/// 40P01) is retried and applied once.
async fn a_transition_failing_once_with(sqlstate: &str) {
    let store = common::fresh_store(Arc::new(ManualClock::starting_now())).await;
    let claimed = started_and_claimed(&store, 1).await;
    let id = claimed.lease.saga_id;
    let before = store.load(id).await.unwrap().unwrap();
    fail_next_history_insert_once(&store, sqlstate).await;
    let retries = store.stats().retries;

    let record = common::advance(id, store.clock().now());
    let tid = record.transition_id;
    store
        .record(&claimed.lease, record)
        .await
        .expect("retried and applied");

    assert_eq!(trigger_runs(&store).await, 2, "failed once, then succeeded");
    assert_eq!(store.stats().retries, retries + 1, "{:?}", store.stats());
    let history = store.history(id).await.unwrap();
    assert_eq!(history.iter().filter(|h| h.transition_id == tid).count(), 1);
    assert_eq!(history.len(), 2, "created + this transition");
    let after = store.load(id).await.unwrap().unwrap();
    assert_eq!(after.version, before.version + 1);
    assert_eq!((after.step.as_str(), after.lease), ("charge", None));
    assert_eq!(store.outbox_for(id).await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_serialization_failure_is_retried_and_applied_once() {
    a_transition_failing_once_with("40001").await;
}

#[tokio::test]
async fn a_deadlock_is_retried_and_applied_once() {
    a_transition_failing_once_with("40P01").await;
}

#[tokio::test]
async fn a_unique_violation_is_returned_at_once_with_its_sqlstate() {
    let store = common::fresh_store(Arc::new(ManualClock::starting_now())).await;
    let claimed = started_and_claimed(&store, 1).await;
    let id = claimed.lease.saga_id;
    let before = store.load(id).await.unwrap().unwrap();
    fail_next_history_insert_once(&store, "23505").await;
    let stats = store.stats();

    let record = common::advance(id, store.clock().now());
    let tid = record.transition_id;
    let err = store.record(&claimed.lease, record).await.unwrap_err();
    let pg = common::pg(&err);
    assert_eq!(pg.code(), Some(&SqlState::UNIQUE_VIOLATION), "{pg:?}");
    assert!(!pg.is_retryable());

    assert_eq!(trigger_runs(&store).await, 1, "one attempt, no retry");
    assert_eq!(store.stats(), stats, "no retry, no ambiguity");
    let history = store.history(id).await.unwrap();
    assert!(history.iter().all(|h| h.transition_id != tid));
    assert_eq!(
        store.load(id).await.unwrap().unwrap(),
        before,
        "nothing written"
    );
    assert!(store.outbox_for(id).await.unwrap().is_empty());
}

async fn assert_nothing_written(store: &PgSagaStore) {
    for table in ["saga_instances", "saga_history", "outbox"] {
        assert_eq!(rows(store, table, "").await, 0, "{table}");
    }
}

/// A state whose compact JSON is exactly `size` bytes.
fn state_of_size(size: usize) -> TestState {
    let empty = TestState {
        order: 1,
        done: vec![String::new()],
    };
    let overhead = serde_json::to_vec(&empty).unwrap().len();
    let state = TestState {
        order: 1,
        done: vec!["x".repeat(size - overhead)],
    };
    assert_eq!(serde_json::to_vec(&state).unwrap().len(), size);
    state
}

#[tokio::test]
async fn the_default_cap_is_256_kib_and_one_byte_more_is_refused() {
    let store = common::fresh_store(Arc::new(ManualClock::starting_now())).await;
    let saga = scripted_saga(&Script::new(), 1);
    let client = SagaClient::new(store.store.clone());
    assert_eq!(DEFAULT_MAX_BYTES, 256 * 1024);
    assert_eq!(store.limits(), Limits::default());
    assert_eq!(store.limits().max_state_bytes, 256 * 1024);

    let err = client
        .start(
            &saga,
            StartKey::new("order-1").unwrap(),
            &state_of_size(256 * 1024 + 1),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::TooLarge {
                what: "saga input",
                size: 262_145,
                limit: 262_144
            }
        ),
        "{err:?}"
    );
    assert_nothing_written(&store).await;

    // Exactly at the cap is fine.
    let started = client
        .start(
            &saga,
            StartKey::new("order-1").unwrap(),
            &state_of_size(256 * 1024),
        )
        .await
        .unwrap();
    assert!(started.created);
}

/// A start prepared with no cap at all, as a caller filling in `NewSaga`
/// itself could hand the store.
fn unchecked_start(store: &PgSagaStore, size: usize) -> NewSaga {
    let saga = scripted_saga(&Script::new(), 1);
    let unlimited = Limits::new(usize::MAX, usize::MAX);
    NewSaga::new(
        &saga,
        StartKey::new("order-1").unwrap(),
        &state_of_size(size),
        &unlimited,
        store.clock().now(),
    )
    .unwrap()
}

#[tokio::test]
async fn the_store_refuses_an_oversized_input_it_was_handed_unchecked() {
    let store = common::fresh_store(Arc::new(ManualClock::starting_now())).await;
    let too_large = |err: &Error| {
        matches!(
            err,
            Error::TooLarge {
                what: "saga input",
                size: 262_145,
                limit: 262_144
            }
        )
    };
    let err = store
        .start(unchecked_start(&store, 256 * 1024 + 1))
        .await
        .unwrap_err();
    assert!(too_large(&err), "{err:?}");
    assert_nothing_written(&store).await;

    let mut db = store.pool().get().await.unwrap();
    let tx = db.transaction().await.unwrap();
    let err = store
        .start_in_tx(&tx, unchecked_start(&store, 256 * 1024 + 1))
        .await
        .unwrap_err();
    assert!(too_large(&err), "{err:?}");
    // Refused before anything was sent: the caller's transaction is intact.
    tx.query_one("SELECT 1", &[]).await.unwrap();
    tx.commit().await.unwrap();
    assert_nothing_written(&store).await;
}

#[tokio::test]
async fn the_store_refuses_an_oversized_state_or_payload_in_a_transition() {
    let store = common::fresh_store(Arc::new(ManualClock::starting_now())).await;
    let store = store.map(|s| s.limits(Limits::new(4096, 1024)));
    let claimed = started_and_claimed(&store, 1).await;
    let id = claimed.lease.saga_id;
    let before = store.load(id).await.unwrap().unwrap();
    let history = store.history(id).await.unwrap();

    let mut big_state = common::advance(id, store.clock().now());
    big_state.state = Some(serde_json::to_value(state_of_size(4097)).unwrap());
    let err = store.record(&claimed.lease, big_state).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::TooLarge {
                what: "saga state",
                size: 4097,
                limit: 4096
            }
        ),
        "{err:?}"
    );

    let mut big_payload = common::advance(id, store.clock().now());
    big_payload.outbox[0] = Message::bytes("order.validated", vec![0; 1025])
        .unwrap()
        .into_outbox(MessageId::new(), store.clock().now());
    let err = store
        .record_unleased(id, before.version, big_payload)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::TooLarge {
                what: "outbox payload",
                size: 1025,
                limit: 1024
            }
        ),
        "{err:?}"
    );

    assert_eq!(
        store.load(id).await.unwrap().unwrap(),
        before,
        "nothing written"
    );
    assert_eq!(store.history(id).await.unwrap(), history);
    assert!(store.outbox_for(id).await.unwrap().is_empty());
    // Within the caps, the same transition goes through.
    store
        .record(&claimed.lease, common::advance(id, store.clock().now()))
        .await
        .unwrap();
}

#[tokio::test]
async fn an_oversized_input_is_refused_and_nothing_is_written() {
    let store = common::fresh_store(Arc::new(ManualClock::starting_now())).await;
    let store = store.map(|s| s.limits(Limits::new(1024, 1024)));
    let saga = scripted_saga(&Script::new(), 1);
    let client = SagaClient::new(store.store.clone());
    let mut big = TestState::order(1);
    big.done = vec!["x".repeat(2000)];
    let err = client
        .start(&saga, StartKey::new("order-1").unwrap(), &big)
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::TooLarge { size, limit: 1024, .. } if size > 2000),
        "{err:?}"
    );
    for table in ["saga_instances", "saga_history", "outbox"] {
        assert_eq!(rows(&store, table, "").await, 0, "{table}");
    }
}

#[tokio::test]
async fn database_errors_keep_their_sqlstate() {
    // A schema that was never migrated: every query fails with 42P01.
    let common::FreshSchema {
        pool,
        schema,
        guard: _guard,
        ..
    } = common::fresh_schema().await;
    let store = PgSagaStore::new(pool, schema);
    let err = store.load(saga_core::SagaId::new()).await.unwrap_err();
    let pg = common::pg(&err);
    assert_eq!(pg.code(), Some(&SqlState::UNDEFINED_TABLE));
    assert!(!pg.is_retryable());
    // Its message says what happened: the SQLSTATE and the server's words.
    let text = pg.to_string();
    assert!(text.contains("42P01"), "{text}");
    assert!(text.contains("does not exist"), "{text}");
    let db = std::error::Error::source(pg).expect("PgError keeps the driver's error");
    assert!(
        db.downcast_ref::<saga_postgres::tokio_postgres::Error>()
            .is_some()
    );
}

#[tokio::test]
async fn sqlstates_and_lost_connections_are_classified_for_retrying() {
    let common::FreshSchema {
        pool,
        schema,
        guard: _guard,
        ..
    } = common::fresh_schema().await;
    let mut a = pool.get().await.unwrap();
    let mut b = pool.get().await.unwrap();
    let t = format!("{}.accounts", schema.quoted());
    a.batch_execute(&format!(
        "CREATE TABLE {t} (id int PRIMARY KEY, balance int);
         INSERT INTO {t} VALUES (1, 10), (2, 10);"
    ))
    .await
    .unwrap();

    // A real serialization failure (40001).
    let ta = a
        .build_transaction()
        .isolation_level(saga_postgres::tokio_postgres::IsolationLevel::Serializable)
        .start()
        .await
        .unwrap();
    let tb = b
        .build_transaction()
        .isolation_level(saga_postgres::tokio_postgres::IsolationLevel::Serializable)
        .start()
        .await
        .unwrap();
    ta.query(&format!("SELECT sum(balance) FROM {t}"), &[])
        .await
        .unwrap();
    tb.query(&format!("SELECT sum(balance) FROM {t}"), &[])
        .await
        .unwrap();
    ta.execute(&format!("UPDATE {t} SET balance = 0 WHERE id = 1"), &[])
        .await
        .unwrap();
    tb.execute(&format!("UPDATE {t} SET balance = 0 WHERE id = 2"), &[])
        .await
        .unwrap();
    ta.commit().await.unwrap();
    let err = PgError::from(tb.commit().await.unwrap_err());
    assert_eq!(err.code(), Some(&SqlState::T_R_SERIALIZATION_FAILURE));
    assert!(err.is_retryable());
    assert!(!err.is_connection_error());

    // A unique violation is not retryable.
    let err = PgError::from(
        a.execute(&format!("INSERT INTO {t} VALUES (1, 0)"), &[])
            .await
            .unwrap_err(),
    );
    assert_eq!(err.code(), Some(&SqlState::UNIQUE_VIOLATION));
    assert!(!err.is_retryable());

    // A lost connection is retryable, and a connection error.
    let pid: i32 = b
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    a.execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    let err = PgError::from(b.query_one("SELECT 1", &[]).await.unwrap_err());
    assert!(err.is_connection_error(), "{err:?}");
    assert!(err.is_retryable());
}

#[tokio::test]
async fn claims_use_the_partial_index_not_a_scan_of_finished_sagas() {
    let store = common::fresh_store(Arc::new(ManualClock::starting_now())).await;
    let saga = scripted_saga(&Script::new(), 1);
    let db = store.pool().get().await.unwrap();
    // Many finished sagas and a few due ones.
    db.batch_execute(&format!(
        "INSERT INTO {s}.saga_instances (id, saga_name, saga_version, start_key, input_digest,
             status, step, direction, state, created_at, updated_at, next_run_at)
         SELECT gen_random_uuid(), 'scripted', 1, 'k' || i, '\\x00', 
             CASE WHEN i % 1000 = 0 THEN 'running' ELSE 'completed' END, 'validate', 'forward',
             '{{}}', now(), now(), CASE WHEN i % 1000 = 0 THEN now() END
         FROM generate_series(1, 20000) AS i;
         ANALYZE {s}.saga_instances;",
        s = store.schema().quoted()
    ))
    .await
    .unwrap();
    let plan = store
        .explain_claim(&[saga.kind().clone()], 16)
        .await
        .unwrap();
    assert!(plan.contains("saga_instances_due"), "{plan}");
    assert!(!plan.contains("Seq Scan on saga_instances"), "{plan}");
}

#[tokio::test]
async fn a_saga_started_in_the_callers_transaction_exists_only_if_it_commits() {
    let store = common::fresh_store(Arc::new(ManualClock::starting_now())).await;
    let saga = scripted_saga(&Script::new(), 1);
    let orders = format!("{}.orders", store.schema().quoted());
    let mut db = store.pool().get().await.unwrap();
    db.batch_execute(&format!("CREATE TABLE {orders} (id int PRIMARY KEY)"))
        .await
        .unwrap();
    let new = |n: u32| {
        saga_core::store::NewSaga::new(
            &saga,
            StartKey::new(format!("order-{n}")).unwrap(),
            &TestState::order(n),
            &Limits::default(),
            store.clock().now(),
        )
        .unwrap()
    };

    // Rolled back: neither the order nor the saga exists.
    let tx = db.transaction().await.unwrap();
    tx.execute(&format!("INSERT INTO {orders} VALUES (1)"), &[])
        .await
        .unwrap();
    let rolled_back = store.start_in_tx(&tx, new(1)).await.unwrap();
    assert!(rolled_back.created);
    tx.rollback().await.unwrap();
    assert!(store.load(rolled_back.id).await.unwrap().is_none());
    assert!(store.history(rolled_back.id).await.unwrap().is_empty());

    // Committed: both exist; a second start with the key finds it.
    let tx = db.transaction().await.unwrap();
    tx.execute(&format!("INSERT INTO {orders} VALUES (1)"), &[])
        .await
        .unwrap();
    let committed = store.start_in_tx(&tx, new(1)).await.unwrap();
    tx.commit().await.unwrap();
    assert!(store.load(committed.id).await.unwrap().is_some());
    let tx = db.transaction().await.unwrap();
    let again = store.start_in_tx(&tx, new(1)).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!((again.id, again.created), (committed.id, false));
    let mut other_input = new(1);
    other_input.input_digest = [7; 32];
    let tx = db.transaction().await.unwrap();
    let err = store.start_in_tx(&tx, other_input).await.unwrap_err();
    assert!(matches!(err, Error::StartKeyConflict { existing, .. } if existing == committed.id));
    tx.rollback().await.unwrap();
}

#[tokio::test]
async fn a_claim_walks_only_the_due_rows_of_the_kinds_it_asks_for() {
    let store = common::fresh_store(Arc::new(ManualClock::starting_now())).await;
    let saga = scripted_saga(&Script::new(), 1);
    let s = store.schema().quoted();
    let db = store.pool().get().await.unwrap();
    // 20,000 due rows of a kind no worker here runs, all due long before
    // the two rows of the kind asked for.
    db.batch_execute(&format!(
        "INSERT INTO {s}.saga_instances (id, saga_name, saga_version, start_key, input_digest,
             status, step, direction, state, created_at, updated_at, next_run_at)
         SELECT gen_random_uuid(), 'legacy', 7, 'k' || i, '\\x00', 'running', 'validate',
             'forward', '{{}}', now(), now(), now() - interval '1 day'
         FROM generate_series(1, 20000) AS i;
         ANALYZE {s}.saga_instances;"
    ))
    .await
    .unwrap();
    let client = SagaClient::new(store.store.clone());
    let mut ids = common::start_orders(&client, &saga, 1..=2).await;
    let kinds = [saga.kind().clone()];
    let plan = store.explain_claim(&kinds, 16).await.unwrap();
    assert!(plan.contains("saga_instances_due"), "{plan}");
    assert!(
        plan.contains("Index Cond: ((saga_name = k.name) AND (saga_version = k.version)"),
        "the kind is part of the index condition, not a filter: {plan}"
    );
    assert!(!plan.contains("Seq Scan on saga_instances"), "{plan}");

    let mut claimed: Vec<_> = claim(&store, &[&saga], 16)
        .await
        .iter()
        .map(|c| c.lease.saga_id)
        .collect();
    claimed.sort();
    ids.sort();
    assert_eq!(claimed, ids);
    assert_eq!(
        rows(
            &store,
            "saga_instances",
            "WHERE saga_name = 'legacy' AND lease_token IS NULL"
        )
        .await,
        20_000,
        "the other kind's rows are left alone"
    );
}

#[tokio::test]
async fn get_shows_a_malformed_row_with_its_raw_values_and_the_reason() {
    let store = common::fresh_store(Arc::new(ManualClock::starting_now())).await;
    let saga: SagaDefinition<TestState> = scripted_saga(&Script::new(), 1);
    let client = SagaClient::new(store.store.clone());
    let ids = common::start_orders(&client, &saga, 1..=2).await;
    let bad = ids[0];
    let db = store.pool().get().await.unwrap();
    db.execute(
        &format!(
            "UPDATE {}.saga_instances SET step = 'not a step!' WHERE id = $1",
            store.schema().quoted()
        ),
        &[&bad.as_uuid()],
    )
    .await
    .unwrap();
    // The claim parks it.
    assert_eq!(claim(&store, &[&saga], 10).await.len(), 1);
    assert_eq!(store.stats().malformed_parked, 1);

    let view = client.get(bad).await.unwrap();
    let raw = view.malformed().expect("a malformed view, not an error");
    assert_eq!((raw.id, view.id()), (bad, bad));
    assert!(raw.reason.contains("malformed step"), "{}", raw.reason);
    assert!(raw.reason.contains("not a step!"), "{}", raw.reason);
    assert_eq!(raw.column("step"), Some("not a step!"));
    assert_eq!(raw.column("status"), Some("stuck"));
    assert_eq!(raw.column("saga_name"), Some("scripted"));
    assert_eq!(raw.column("start_key"), Some("order-1"));
    assert_eq!(raw.column("lease_token"), None, "NULL");
    let parked = raw.column("stuck_reason").expect("the claim's reason");
    assert!(parked.contains("the stored row cannot be read"), "{parked}");
    // The typed read says what is wrong, keeping the store's error.
    let err = client.snapshot(bad).await.unwrap_err();
    let Error::Malformed { saga: m, source } = &err else {
        panic!("{err:?}");
    };
    assert_eq!(**m, *raw);
    assert!(source.downcast_ref::<PgError>().is_some(), "{source:?}");
    // A readable row reads as before.
    let good = client.get(ids[1]).await.unwrap();
    assert_eq!(good.readable().map(|s| s.status), Some(Status::Running));
    assert!(matches!(
        client.get(saga_core::SagaId::new()).await,
        Err(Error::NotFound(_))
    ));
}

#[tokio::test]
async fn a_malformed_row_is_parked_and_the_rest_of_its_batch_is_claimed() {
    let store = common::fresh_store(Arc::new(ManualClock::starting_now())).await;
    let saga: SagaDefinition<TestState> = scripted_saga(&Script::new(), 1);
    let client = SagaClient::new(store.store.clone());
    let ids = common::start_orders(&client, &saga, 1..=3).await;
    let bad = ids[1];
    let db = store.pool().get().await.unwrap();
    db.execute(
        &format!(
            "UPDATE {}.saga_instances SET step = 'not a step!' WHERE id = $1",
            store.schema().quoted()
        ),
        &[&bad.as_uuid()],
    )
    .await
    .unwrap();

    let claimed = claim(&store, &[&saga], 10).await;
    let mut good: Vec<_> = claimed.iter().map(|c| c.lease.saga_id).collect();
    good.sort();
    assert_eq!(good, [ids[0], ids[2]], "the good rows of the batch");
    for c in &claimed {
        let s = store.load(c.lease.saga_id).await.unwrap().unwrap();
        assert_eq!((s.attempt, s.status), (1, Status::Running));
        assert!(s.lease.is_some());
    }
    assert_eq!(store.stats().malformed_parked, 1);

    // The bad row: parked, with the reason, no lease, not due; its history
    // says so (read by hand: its step name does not parse).
    let row = db
        .query_one(
            &format!(
                "SELECT status, stuck_reason, lease_token IS NULL, next_run_at IS NULL, attempt
                 FROM {}.saga_instances WHERE id = $1",
                store.schema().quoted()
            ),
            &[&bad.as_uuid()],
        )
        .await
        .unwrap();
    let (status, reason, unleased, unscheduled, attempt): (String, String, bool, bool, i32) =
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    assert_eq!(status, "stuck");
    assert!(reason.contains("malformed step"), "{reason}");
    assert!(reason.contains("not a step!"), "{reason}");
    assert!(unleased && unscheduled);
    assert_eq!(attempt, 1);
    let parked = db
        .query_one(
            &format!(
                "SELECT outcome, step, from_status, to_status, error FROM {}.saga_history
                 WHERE saga_id = $1 ORDER BY seq DESC LIMIT 1",
                store.schema().quoted()
            ),
            &[&bad.as_uuid()],
        )
        .await
        .unwrap();
    let parked: (String, String, String, String, String) = (
        parked.get(0),
        parked.get(1),
        parked.get(2),
        parked.get(3),
        parked.get(4),
    );
    assert_eq!(
        (&*parked.0, &*parked.1, &*parked.2, &*parked.3),
        ("parked", "not a step!", "running", "stuck")
    );
    assert_eq!(parked.4, reason);
    assert!(
        claim(&store, &[&saga], 10).await.is_empty(),
        "nothing is left to claim"
    );
    // The good rows go on as usual.
    for c in &claimed {
        store
            .record(
                &c.lease,
                common::advance(c.lease.saga_id, store.clock().now()),
            )
            .await
            .unwrap();
    }
}
