//! Database roles, as `docs/operations.md` prescribes them: migrations run
//! with a role allowed to run DDL (a superuser, or a migration role with
//! CREATE on the database); workers, dispatchers, consumers and operator
//! calls run with a runtime role that has DML only (no DDL, no sequence
//! rights), and that role cannot migrate.
//!
//! The GRANT statements below are the ones printed in the operations
//! guide; keep the two in step. Roles are cluster-wide: each test makes
//! its own, under a unique name, and drops them when it passes (a failed
//! run keeps them with its database, for inspection).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use saga_core::{
    Executor, ManualClock, Message, MessageId, SagaDefinition, StartKey, Status, Step, StepContext,
    StepError,
};
use saga_postgres::inbox::{ConsumerName, Delivery, Inbox};
use saga_postgres::outbox::{Dispatcher, InProcessPublisher, Outbox};
use saga_postgres::tokio_postgres::error::SqlState;
use saga_postgres::{PgError, PgSagaStore, SchemaName, migrate, pool_from_config};

/// The runtime role's grants on schema `saga`, exactly as in
/// `docs/operations.md` ("Database roles"). `{role}` is the role.
const RUNTIME_GRANTS: &str = "
    GRANT USAGE ON SCHEMA saga TO {role};
    GRANT SELECT, INSERT, UPDATE, DELETE
        ON saga.saga_instances, saga.saga_history, saga.outbox, saga.inbox
        TO {role};
    GRANT SELECT ON saga.saga_migrations TO {role};
";

async fn reserve(_: &mut StepContext, _: &mut u32) -> Result<(), StepError> {
    Ok(())
}
async fn release(_: &mut StepContext, _: &mut u32) -> Result<(), StepError> {
    Ok(())
}
async fn confirm(ctx: &mut StepContext, order: &mut u32) -> Result<(), StepError> {
    ctx.emit(Message::json(
        "order.confirmed",
        &serde_json::json!({ "order": *order }),
    )?)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_role_with_dml_only_runs_everything_but_cannot_migrate() {
    let db = saga_postgres::testing::fresh_database()
        .await
        .expect("a test PostgreSQL server");
    let schema = SchemaName::new("saga").unwrap();

    // The migration role (here the superuser) creates the schema.
    let mut admin = db.connect().await.unwrap();
    migrate(&mut admin, &schema).await.unwrap();

    // The runtime role: LOGIN, USAGE on the schema, DML on its tables.
    // Roles are cluster-wide: a unique name, dropped at the end.
    let role = format!(
        "saga_app_{}",
        &uuid::Uuid::now_v7().simple().to_string()[20..]
    );
    let password = uuid::Uuid::now_v7().simple().to_string();
    admin
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN PASSWORD '{password}';
             GRANT CONNECT ON DATABASE {db} TO {role};
             {grants}",
            db = db.name(),
            grants = RUNTIME_GRANTS.replace("{role}", &role),
        ))
        .await
        .unwrap();

    // No right on the sequences behind the identity columns
    // (`saga_history.seq`, `outbox.seq`) is needed: identity columns do not
    // check them.
    let row = admin
        .query_one(
            "SELECT count(*), coalesce(bool_or(has_sequence_privilege($1, c.oid, 'USAGE')), false)
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = 'saga' AND c.relkind = 'S'",
            &[&role],
        )
        .await
        .unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, bool>(1)), (2, false));

    let mut app_config = db.config();
    app_config.user(&role).password(&password);
    let app_pool = pool_from_config(app_config.clone(), 4).unwrap();
    let clock = Arc::new(ManualClock::starting_now());

    // It cannot migrate: the DDL is refused with SQLSTATE 42501, which the
    // error keeps, and nothing changed.
    let mut app = app_pool.get().await.unwrap();
    let err = migrate(&mut app, &schema).await.unwrap_err();
    assert_eq!(
        err.code(),
        Some(&SqlState::INSUFFICIENT_PRIVILEGE),
        "migrating as the runtime role: {err:?}"
    );
    assert!(matches!(err, PgError::Db(_)), "{err:?}");
    let migrations: i64 = admin
        .query_one("SELECT count(*) FROM saga.saga_migrations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        migrations,
        i64::try_from(saga_postgres::MIGRATIONS.len()).unwrap(),
        "the refused migration changed nothing"
    );
    let err = app
        .batch_execute("CREATE TABLE saga.not_allowed (id int)")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE));
    // LISTEN (the dispatcher's wake-up) needs no privilege.
    app.batch_execute(&format!("LISTEN \"{}\"", schema.outbox_channel()))
        .await
        .unwrap();
    drop(app);

    // A worker: checks the schema without DDL, starts, claims and records
    // a saga whose pivot emits an outbox message.
    let store = PgSagaStore::new(app_pool.clone(), schema.clone()).with_clock(clock.clone());
    store.check_schema().await.unwrap();
    let saga = SagaDefinition::<u32>::builder("roles", 1)
        .step(Step::new("reserve", reserve).compensate_with(release))
        .pivot(Step::new("confirm", confirm))
        .build()
        .unwrap();
    let executor = Executor::builder(store.clone())
        .register(saga.clone())
        .build()
        .unwrap();
    let started = executor
        .client()
        .start(&saga, StartKey::new("order-17").unwrap(), &17)
        .await
        .unwrap();
    let report = executor.run_until_idle().await.unwrap();
    assert_eq!(report.transitions.len(), 2, "{report:?}");
    assert_eq!(
        executor.client().get(started.id).await.unwrap().status,
        Status::Completed
    );
    assert_eq!(
        executor.client().history(started.id).await.unwrap().len(),
        3
    );

    // The application enqueues a message in its own transaction, and one
    // for a topic nobody handles (it will be dead-lettered).
    let outbox = Outbox::new(app_pool.clone(), schema.clone()).with_clock(clock.clone());
    let (by_hand, unhandled) = {
        let mut client = app_pool.get().await.unwrap();
        let tx = client.transaction().await.unwrap();
        let a = outbox
            .enqueue_in_tx(
                &tx,
                Message::json("order.confirmed", &serde_json::json!({"order": 18})).unwrap(),
            )
            .await
            .unwrap();
        let b = outbox
            .enqueue_in_tx(&tx, Message::json("nobody.listens", &1).unwrap())
            .await
            .unwrap();
        tx.commit().await.unwrap();
        (a, b)
    };

    // A dispatcher delivers through an in-process publisher to a consumer
    // that deduplicates with the inbox, all as the runtime role.
    let inbox = Inbox::new(app_pool.clone(), schema.clone()).with_clock(clock.clone());
    let consumer = ConsumerName::new("email-sender").unwrap();
    let applied: Arc<Mutex<Vec<MessageId>>> = Arc::default();
    let deliver = {
        let (pool, inbox, consumer, applied) = (
            app_pool.clone(),
            inbox.clone(),
            consumer.clone(),
            applied.clone(),
        );
        move |id: MessageId| {
            let (pool, inbox, consumer, applied) = (
                pool.clone(),
                inbox.clone(),
                consumer.clone(),
                applied.clone(),
            );
            async move {
                let mut client = pool.get().await?;
                let tx = client.transaction().await?;
                let delivery = inbox.process_once_in_tx(&tx, &consumer, id).await?;
                if delivery.is_first() {
                    applied.lock().unwrap().push(id);
                }
                tx.commit().await?;
                Ok::<_, saga_postgres::BoxError>(delivery)
            }
        }
    };
    let handler = deliver.clone();
    let publisher = InProcessPublisher::new().handle("order.confirmed", move |out| {
        let deliver = handler.clone();
        async move {
            let _first_or_duplicate = deliver(out.message.id).await?;
            Ok(())
        }
    });
    let dispatcher = Dispatcher::builder(outbox.clone(), publisher)
        .build()
        .unwrap();
    let dispatched = dispatcher.run_until_idle().await.unwrap();
    assert_eq!(
        (dispatched.published, dispatched.dead_lettered),
        (2, 1),
        "{dispatched:?}"
    );
    let from_saga = MessageId::derive(
        started.id,
        &saga_core::StepName::new("confirm").unwrap(),
        saga_core::Direction::Forward,
        0,
    );
    let mut got = applied.lock().unwrap().clone();
    got.sort();
    let mut want = vec![from_saga, by_hand];
    want.sort();
    assert_eq!(got, want);

    // A duplicate delivery has no second effect.
    assert_eq!(deliver(by_hand).await.unwrap(), Delivery::Duplicate);
    assert_eq!(applied.lock().unwrap().len(), 2);

    // Operator calls: stats, dead letters, redrive, purge.
    let stats = outbox.stats().await.unwrap();
    assert_eq!((stats.pending, stats.in_flight, stats.dead), (0, 0, 1));
    let dead = outbox.dead_letters(10, None).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].message.id, unhandled);
    assert!(outbox.redrive(unhandled).await.unwrap());
    assert_eq!(dispatcher.run_until_idle().await.unwrap().dead_lettered, 1);
    assert!(outbox.purge(unhandled).await.unwrap());
    assert_eq!(outbox.stats().await.unwrap().dead, 0);

    // Inbox retention: pruning deletes.
    clock.advance(inbox.retention() + Duration::from_secs(1));
    assert_eq!(inbox.prune().await.unwrap(), 2);

    // Clean up the cluster-wide role (a failed run keeps it with the
    // database, for inspection).
    drop((executor, store, dispatcher, outbox, inbox, app_pool));
    admin
        .batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE {role};"))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_migration_role_needs_create_on_the_database_and_grants_the_runtime_role() {
    let db = saga_postgres::testing::fresh_database()
        .await
        .expect("a test PostgreSQL server");
    let schema = SchemaName::new("saga").unwrap();
    let admin = db.connect().await.unwrap();
    let suffix = &uuid::Uuid::now_v7().simple().to_string()[20..];
    let (migrator, app) = (
        format!("saga_migrator_{suffix}"),
        format!("saga_app_{suffix}"),
    );
    // The migration role owns the schema but lacks CREATE on the database:
    // `migrate` runs `CREATE SCHEMA IF NOT EXISTS`, which PostgreSQL checks
    // against the database's CREATE privilege even when the schema exists.
    admin
        .batch_execute(&format!(
            "CREATE ROLE {migrator} LOGIN;
             CREATE ROLE {app} LOGIN;
             CREATE SCHEMA saga AUTHORIZATION {migrator};"
        ))
        .await
        .unwrap();
    let connect_as = |role: &str| {
        let mut config = db.config();
        config.user(role);
        pool_from_config(config, 2).unwrap()
    };
    let migrator_pool = connect_as(&migrator);
    let mut conn = migrator_pool.get().await.unwrap();
    let err = migrate(&mut conn, &schema).await.unwrap_err();
    assert_eq!(
        err.code(),
        Some(&SqlState::INSUFFICIENT_PRIVILEGE),
        "{err:?}"
    );

    // With CREATE on the database it migrates, and, owning the tables,
    // grants the runtime role its rights.
    admin
        .batch_execute(&format!(
            "GRANT CREATE ON DATABASE {db} TO {migrator};
             GRANT CONNECT ON DATABASE {db} TO {app};",
            db = db.name()
        ))
        .await
        .unwrap();
    let every: Vec<i32> = saga_postgres::MIGRATIONS
        .iter()
        .map(|m| m.version)
        .collect();
    assert_eq!(migrate(&mut conn, &schema).await.unwrap().applied, every);
    conn.batch_execute(&RUNTIME_GRANTS.replace("{role}", &app))
        .await
        .unwrap();
    drop(conn);
    let app_pool = connect_as(&app);
    PgSagaStore::new(app_pool.clone(), schema.clone())
        .check_schema()
        .await
        .unwrap();

    drop((migrator_pool, app_pool));
    admin
        .batch_execute(&format!(
            "DROP OWNED BY {app}; DROP OWNED BY {migrator}; DROP ROLE {app}; DROP ROLE {migrator};"
        ))
        .await
        .unwrap();
}
