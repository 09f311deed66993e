//! Pooled connections whose session cannot serve the crate are replaced: a
//! session that started while its database was read-only (as managed
//! services make a database whose disk is full) is discarded once it refuses
//! a write, and a connection past its maximum lifetime is closed.

mod common;

use std::time::Duration;

use saga_core::testing::{Script, TestState, scripted_saga};
use saga_core::{Executor, SagaClient, StartKey, Status};
use saga_postgres::tokio_postgres::error::SqlState;
use saga_postgres::tokio_postgres::{Client, NoTls};
use saga_postgres::{PgSagaStore, PoolOptions, SchemaName, pool_from_config, pool_with_options};
use saga_test_support::{fresh_database, test_server};

async fn admin() -> Client {
    let (client, connection) = test_server()
        .await
        .unwrap()
        .admin_config()
        .connect(NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_recovers_through_its_own_pool_once_its_database_is_writable_again() {
    let db = fresh_database().await.unwrap();
    let schema = SchemaName::new("saga").unwrap();
    saga_postgres::migrate(
        &mut pool_from_config(db.config(), 1)
            .unwrap()
            .get()
            .await
            .unwrap(),
        &schema,
    )
    .await
    .unwrap();
    let admin = admin().await;
    let read_only = |on: bool| {
        format!(
            "ALTER DATABASE \"{}\" {}",
            db.name(),
            if on {
                "SET default_transaction_read_only = on"
            } else {
                "RESET default_transaction_read_only"
            }
        )
    };
    // A pool of one: every operation reuses the same session unless the
    // crate discards it.
    let store = PgSagaStore::builder(pool_from_config(db.config(), 1).unwrap(), schema)
        .operation_deadline(Duration::from_secs(2))
        .build();
    let saga = scripted_saga(&Script::new(), 1);
    let client = SagaClient::new(store.clone());
    let start = |n: u32| {
        let (client, saga) = (&client, &saga);
        async move {
            client
                .start(
                    saga,
                    StartKey::new(format!("order-{n}")).unwrap(),
                    &TestState::order(n),
                )
                .await
        }
    };

    // The disk filled up: the database turned read-only, and the pool's
    // session starts read-only.
    admin.batch_execute(&read_only(true)).await.unwrap();
    let refused = start(1)
        .await
        .expect_err("a read-only database refuses writes");
    assert_eq!(
        common::pg(&refused).code(),
        Some(&SqlState::READ_ONLY_SQL_TRANSACTION),
        "{refused:?}"
    );

    // Writable again: the same store, through the same pool, recovers at
    // once (sessions keep the setting they started with, so the session
    // that refused had to go).
    admin.batch_execute(&read_only(false)).await.unwrap();
    let id = start(2).await.expect("the store recovered").id;
    let executor = Executor::builder(store.clone())
        .register(saga.clone())
        .build()
        .unwrap();
    executor.run_until_idle().await.unwrap();
    let done = saga_core::store::SagaStore::load(&store, id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(done.status, Status::Completed);
}

async fn backend_pid(pool: &saga_postgres::deadpool_postgres::Pool) -> i32 {
    let client = pool.get().await.unwrap();
    client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_past_its_lifetime_is_replaced() {
    let schema = saga_test_support::fresh_schema().await.unwrap();
    let lifetime = Duration::from_millis(200);
    let short = pool_with_options(
        schema.config(),
        PoolOptions::default()
            .max_size(1)
            .max_lifetime(Some(lifetime)),
    )
    .unwrap();
    let unlimited = pool_with_options(
        schema.config(),
        PoolOptions::default().max_size(1).max_lifetime(None),
    )
    .unwrap();
    let (first_short, first_unlimited) = (backend_pid(&short).await, backend_pid(&unlimited).await);
    // Connections age with the wall clock (deadpool measures it): wait one
    // lifetime out.
    tokio::time::sleep(lifetime).await;
    assert_ne!(backend_pid(&short).await, first_short, "replaced");
    assert_eq!(backend_pid(&unlimited).await, first_unlimited, "kept");
}

#[test]
fn a_pool_refuses_a_zero_lifetime() {
    let config: tokio_postgres::Config = "postgres://u@localhost/db".parse().unwrap();
    assert!(
        pool_with_options(
            config,
            PoolOptions::default().max_lifetime(Some(Duration::ZERO))
        )
        .is_err()
    );
}
