//! Postgres-specific behaviour of the store, beyond the conformance suite
//! (which `conformance.rs` runs).

mod common;

use std::sync::Arc;

use saga_core::testing::{Script, TestState, scripted_saga};
use saga_core::{Error, Limits, ManualClock, SagaClient, SagaStore, StartKey};
use saga_postgres::tokio_postgres::error::SqlState;
use saga_postgres::{PgError, PgSagaStore};

#[tokio::test]
async fn an_oversized_input_is_refused_and_nothing_is_written() {
    let store = common::fresh_store(Arc::new(ManualClock::starting_now())).await;
    let saga = scripted_saga(&Script::new(), 1);
    let client = SagaClient::new(store.store.clone()).with_limits(Limits {
        max_state_bytes: 1024,
        max_payload_bytes: 1024,
    });
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
    let db = store.pool().get().await.unwrap();
    for table in ["saga_instances", "saga_history", "outbox"] {
        let n: i64 = db
            .query_one(
                &format!("SELECT count(*) FROM {}.{table}", store.schema().quoted()),
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 0, "{table}");
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
    let Error::Store(source) = &err else {
        panic!("expected a store error, got {err:?}");
    };
    let pg = source
        .downcast_ref::<PgError>()
        .expect("the source is a PgError");
    assert_eq!(pg.code(), Some(&SqlState::UNDEFINED_TABLE));
    assert!(!pg.is_retryable());
    let db = std::error::Error::source(pg).expect("PgError keeps the driver's error");
    assert!(
        db.downcast_ref::<saga_postgres::tokio_postgres::Error>()
            .is_some()
    );
}

#[tokio::test]
async fn serialization_failures_and_deadlocks_are_retryable_other_errors_are_not() {
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
        saga_core::NewSaga::new(
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
