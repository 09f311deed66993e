//! Database roles and operator queries, as `docs/operations.md` prescribes
//! them: migrations run with a role allowed to run DDL (a superuser, or a
//! migration role with CREATE on the database); the worker, the
//! dispatcher, the inbox consumer and the operator each run with a role
//! that has the rights of its job only, and none of them can migrate.
//!
//! The SQL is read from the guide itself, not copied: its role block and
//! grant block are run as written (with unique role names, the test
//! database's name and a password substituted), and so are its operator
//! queries (stuck sagas, a saga's history, sagas due but not run, the
//! clean-up of finished sagas), each checked for its effect. Then each
//! component runs under its role. `roles_refused.rs` shows each role
//! refused (SQLSTATE 42501) what the guide says it cannot do, and
//! `roles_statements.rs` checks every statement of the crate against each
//! role.

mod roles_support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use roles_support::{Deployment, RUNTIME, Roles, sql_block, sql_blocks, sql_refused};
use saga_core::{
    Executor, ManualClock, Message, MessageId, Outcome, SagaDefinition, SagaId, StartKey, Status,
    Step, StepContext, StepError,
};
use saga_postgres::deadpool_postgres::Pool;
use saga_postgres::inbox::{ConsumerName, Delivery, Inbox};
use saga_postgres::outbox::{Dispatcher, InProcessPublisher, Outbox};
use saga_postgres::tokio_postgres::error::SqlState;
use saga_postgres::{MIGRATIONS, PgSagaStore, SchemaName, migrate, pool_from_config};

/// Whether `text` has `name` as a whole identifier.
fn has_word(text: &str, name: &str) -> bool {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .any(|w| w == name)
}

#[test]
fn the_guides_roles_are_substituted_as_whole_names() {
    let roles = Roles::unique();
    let admin = roles.admin_sql("db_1");
    let grants = roles.grants_sql();
    let (m, w) = (roles.name("saga_migrator"), roles.name("saga_worker"));
    let pw = &roles.password;
    assert!(admin.contains(&format!("CREATE ROLE {m} LOGIN PASSWORD '{pw}';")));
    assert!(admin.contains(&format!("GRANT CREATE ON DATABASE db_1 TO {m};")));
    assert!(admin.contains(&format!("CREATE ROLE {w} LOGIN PASSWORD '{pw}';")));
    assert!(!admin.contains("GRANT USAGE"), "{admin}");
    assert!(grants.contains(&format!(
        "GRANT SELECT, INSERT ON saga.saga_history TO {w};"
    )));
    assert!(
        grants.contains("ON saga.saga_instances TO"),
        "the schema `saga` is kept: {grants}"
    );
    for guide in std::iter::once("saga_migrator").chain(RUNTIME) {
        assert!(
            !has_word(&admin, guide) && !has_word(&grants, guide),
            "{guide}"
        );
        assert!(has_word(&admin, roles.name(guide)), "{guide}");
    }
    assert!(!has_word(&admin, "shop"));
    assert_eq!(
        roles_support::substitute("saga_app saga_app_x x_saga_app", &[("saga_app", "y")], "p"),
        "y saga_app_x x_saga_app"
    );
}

async fn reserve(_: &mut StepContext, _: &mut u32) -> Result<(), StepError> {
    Ok(())
}
static WAREHOUSE_FIXED: AtomicBool = AtomicBool::new(false);
/// Fails for a state of 3 until the warehouse is fixed.
async fn release_unless_broken(_: &mut StepContext, n: &mut u32) -> Result<(), StepError> {
    if *n == 3 && !WAREHOUSE_FIXED.load(Ordering::SeqCst) {
        return Err(StepError::permanent("the warehouse refuses the release"));
    }
    Ok(())
}
/// Emits a message, then declines states of 2 and above.
async fn confirm(ctx: &mut StepContext, order: &mut u32) -> Result<(), StepError> {
    if *order >= 2 {
        return Err(StepError::permanent("declined"));
    }
    ctx.emit(Message::json(
        "order.confirmed",
        &serde_json::json!({ "order": *order }),
    )?)?;
    Ok(())
}

fn roles_saga() -> SagaDefinition<u32> {
    SagaDefinition::<u32>::builder("roles", 1)
        .step(Step::new("reserve", reserve).compensate_with(release_unless_broken))
        .pivot(Step::new("confirm", confirm))
        .build()
        .unwrap()
}

/// A consumer that deduplicates with the inbox, in its own transaction on
/// `pool`, and records the ids whose effect it applied.
#[derive(Clone)]
struct Consumer {
    pool: Pool,
    inbox: Inbox,
    name: ConsumerName,
    applied: Arc<Mutex<Vec<MessageId>>>,
}

impl Consumer {
    async fn deliver(&self, id: MessageId) -> Result<Delivery, saga_postgres::BoxError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let delivery = self.inbox.process_once_in_tx(&tx, &self.name, id).await?;
        if delivery.is_first() {
            self.applied.lock().unwrap().push(id);
        }
        tx.commit().await?;
        Ok(delivery)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_does_its_job_under_the_guides_grants() {
    let d = Deployment::new().await;
    let schema = d.schema.clone();
    let clock = Arc::new(ManualClock::starting_now());

    // No right on the sequences behind the identity columns
    // (`saga_history.seq`, `outbox.seq`) is needed: identity columns do not
    // check them.
    for role in RUNTIME {
        let row = d
            .admin
            .query_one(
                "SELECT count(*), coalesce(bool_or(has_sequence_privilege($1, c.oid, 'USAGE')),
                     false)
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname = 'saga' AND c.relkind = 'S'",
                &[&d.roles.name(role)],
            )
            .await
            .unwrap();
        assert_eq!((row.get::<_, i64>(0), row.get::<_, bool>(1)), (2, false));
        // Each may check the schema and LISTEN (which needs no right).
        let conn = d.conn(role).await;
        saga_postgres::check_migrations(&conn, &schema)
            .await
            .unwrap();
        conn.batch_execute(&format!("LISTEN \"{}\"", schema.outbox_channel()))
            .await
            .unwrap();
    }

    // The worker: checks the schema, starts, claims and records sagas; one
    // completes (its pivot emits a message), one ends stuck.
    let store = PgSagaStore::builder(d.pool("saga_worker"), schema.clone())
        .clock(clock.clone())
        .build();
    store.check_schema().await.unwrap();
    let saga = roles_saga();
    let executor = Executor::builder(store)
        .register(saga.clone())
        .build()
        .unwrap();
    let client = executor.client();
    let done = client
        .start(&saga, StartKey::new("order-1").unwrap(), &1)
        .await
        .unwrap();
    let stuck = client
        .start(&saga, StartKey::new("order-3").unwrap(), &3)
        .await
        .unwrap();
    executor.run_until_idle().await.unwrap();
    assert_eq!(
        client.snapshot(done.id).await.unwrap().status,
        Status::Completed
    );
    assert_eq!(
        client.snapshot(stuck.id).await.unwrap().status,
        Status::Stuck
    );
    assert_eq!(client.history(done.id).await.unwrap().len(), 3);

    // The application enqueues with the worker's grant, in its own
    // transaction: a message, and one for a topic nobody handles (it will
    // be dead-lettered).
    let worker_outbox = Outbox::builder(d.pool("saga_worker"), schema.clone())
        .clock(clock.clone())
        .build();
    let (by_hand, unhandled) = {
        let mut conn = d.conn("saga_worker").await;
        let tx = conn.transaction().await.unwrap();
        let message = Message::json("order.confirmed", &serde_json::json!({"order": 18}));
        let a = worker_outbox
            .enqueue_in_tx(&tx, message.unwrap())
            .await
            .unwrap();
        let b = worker_outbox
            .enqueue_in_tx(&tx, Message::json("nobody.listens", &1).unwrap())
            .await
            .unwrap();
        tx.commit().await.unwrap();
        (a, b)
    };

    // The dispatcher delivers, as its role, through an in-process
    // publisher, to a consumer that deduplicates with the inbox as its
    // role.
    let inbox = Inbox::builder(d.pool("saga_consumer"), schema.clone())
        .clock(clock.clone())
        .build();
    let consumer = Consumer {
        pool: d.pool("saga_consumer"),
        inbox: inbox.clone(),
        name: ConsumerName::new("email-sender").unwrap(),
        applied: Arc::default(),
    };
    let handler = consumer.clone();
    let publisher = InProcessPublisher::new().handle("order.confirmed", move |out| {
        let consumer = handler.clone();
        async move {
            let _first_or_duplicate = consumer.deliver(out.message.id).await?;
            Ok(())
        }
    });
    let outbox = Outbox::builder(d.pool("saga_dispatcher"), schema.clone())
        .clock(clock.clone())
        .build();
    let dispatcher = Dispatcher::builder(outbox, publisher).build().unwrap();
    let dispatched = dispatcher.run_until_idle().await.unwrap();
    assert_eq!(
        (dispatched.published, dispatched.dead_lettered),
        (2, 1),
        "{dispatched:?}"
    );
    let from_saga = MessageId::derive(
        done.id,
        &saga_core::StepName::new("confirm").unwrap(),
        saga_core::Direction::Forward,
        0,
    );
    let mut got = consumer.applied.lock().unwrap().clone();
    got.sort();
    let mut want = vec![from_saga, by_hand];
    want.sort();
    assert_eq!(got, want);
    // A duplicate delivery has no second effect.
    assert_eq!(
        consumer.deliver(by_hand).await.unwrap(),
        Delivery::Duplicate
    );
    assert_eq!(consumer.applied.lock().unwrap().len(), 2);

    // The operator: stats, dead letters, redrive, purge.
    let operator_outbox = Outbox::builder(d.pool("saga_operator"), schema.clone())
        .clock(clock.clone())
        .build();
    let stats = operator_outbox.stats().await.unwrap();
    assert_eq!((stats.pending, stats.in_flight, stats.dead), (0, 0, 1));
    let dead = operator_outbox.dead_letters(10, None).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].message.id, unhandled);
    assert!(operator_outbox.redrive(unhandled).await.unwrap());
    assert_eq!(dispatcher.run_until_idle().await.unwrap().dead_lettered, 1);
    assert!(operator_outbox.purge(unhandled).await.unwrap());
    assert_eq!(operator_outbox.stats().await.unwrap().dead, 0);

    // The operator resumes the stuck saga once the warehouse is fixed, and
    // cancels one that has not run; the worker carries both out.
    let operator = Executor::builder(
        PgSagaStore::builder(d.pool("saga_operator"), schema.clone())
            .clock(clock.clone())
            .build(),
    )
    .register(saga.clone())
    .build()
    .unwrap();
    operator.client().snapshot(stuck.id).await.unwrap();
    WAREHOUSE_FIXED.store(true, Ordering::SeqCst);
    operator.resume(stuck.id).await.unwrap();
    let cancelled = client
        .start(&saga, StartKey::new("order-cancelled").unwrap(), &1)
        .await
        .unwrap();
    operator
        .cancel(cancelled.id, "the customer called")
        .await
        .unwrap();
    executor.run_until_idle().await.unwrap();
    for id in [stuck.id, cancelled.id] {
        assert_eq!(
            operator.client().snapshot(id).await.unwrap().status,
            Status::Compensated
        );
    }
    let history = operator.client().history(cancelled.id).await.unwrap();
    assert!(
        history.iter().any(|h| h.outcome == Outcome::Cancelled),
        "{history:?}"
    );
    let history = operator.client().history(stuck.id).await.unwrap();
    assert!(
        history.iter().any(|h| h.outcome == Outcome::Resumed),
        "{history:?}"
    );

    // The consumer prunes its inbox.
    clock.advance(inbox.retention() + Duration::from_secs(1));
    assert_eq!(inbox.prune().await.unwrap(), 2);

    drop((
        executor,
        operator,
        dispatcher,
        worker_outbox,
        operator_outbox,
    ));
    drop((inbox, consumer));
    d.drop_roles().await;
}

#[tokio::test]
async fn a_migration_role_needs_create_on_the_database_and_grants_the_runtime_roles() {
    let db = saga_test_support::fresh_database()
        .await
        .expect("a test PostgreSQL server");
    let schema = SchemaName::new("saga").unwrap();
    let admin = db.connect().await.unwrap();
    let roles = Roles::unique();
    let migrator = roles.name("saga_migrator").to_owned();
    let worker = roles.name("saga_worker").to_owned();
    // The migration role owns the schema but lacks CREATE on the database:
    // `migrate` runs `CREATE SCHEMA IF NOT EXISTS`, which PostgreSQL checks
    // against the database's CREATE privilege even when the schema exists.
    let mut create = String::new();
    for (_, name) in &roles.names {
        create.push_str(&format!("CREATE ROLE {name} LOGIN;\n"));
    }
    create.push_str(&format!("CREATE SCHEMA saga AUTHORIZATION {migrator};"));
    admin.batch_execute(&create).await.unwrap();
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
    // grants the runtime roles their rights.
    admin
        .batch_execute(&format!(
            "GRANT CREATE ON DATABASE {db} TO {migrator};
             GRANT CONNECT ON DATABASE {db} TO {worker};",
            db = db.name()
        ))
        .await
        .unwrap();
    let all: Vec<i32> = MIGRATIONS.iter().map(|m| m.version).collect();
    assert_eq!(migrate(&mut conn, &schema).await.unwrap().applied, all);
    conn.batch_execute(&roles.grants_sql()).await.unwrap();
    drop(conn);
    let worker_pool = connect_as(&worker);
    PgSagaStore::new(worker_pool.clone(), schema.clone())
        .check_schema()
        .await
        .unwrap();

    drop((migrator_pool, worker_pool));
    roles.drop(&admin).await;
}

/// Fails the pivot for states of 2 and above, and the release for 3: a
/// state of 1 completes, 2 is compensated, 3 ends stuck.
async fn confirm_unless_two_or_more(_: &mut StepContext, n: &mut u32) -> Result<(), StepError> {
    if *n >= 2 {
        return Err(StepError::permanent("declined"));
    }
    Ok(())
}
async fn release_unless_three(_: &mut StepContext, n: &mut u32) -> Result<(), StepError> {
    if *n == 3 {
        return Err(StepError::permanent("the warehouse refuses the release"));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guides_operator_queries_find_and_clean_up_what_they_say_as_the_operator_role() {
    let d = Deployment::new().await;
    let schema = d.schema.clone();

    // Sagas in every state, run as the worker.
    let saga = SagaDefinition::<u32>::builder("cleanup", 1)
        .step(Step::new("reserve", reserve).compensate_with(release_unless_three))
        .pivot(Step::new("confirm", confirm_unless_two_or_more))
        .build()
        .unwrap();
    let executor = Executor::builder(PgSagaStore::new(d.pool("saga_worker"), schema.clone()))
        .register(saga.clone())
        .build()
        .unwrap();
    let client = executor.client();
    let mut ids = std::collections::BTreeMap::<&str, SagaId>::new();
    for (key, n) in [
        ("done-old", 1),
        ("done-recent", 1),
        ("undone-old", 2),
        ("stuck-old", 3),
    ] {
        let started = client
            .start(&saga, StartKey::new(key).unwrap(), &n)
            .await
            .unwrap();
        ids.insert(key, started.id);
    }
    executor.run_until_idle().await.unwrap();
    for (key, status) in [
        ("done-old", Status::Completed),
        ("done-recent", Status::Completed),
        ("undone-old", Status::Compensated),
        ("stuck-old", Status::Stuck),
    ] {
        assert_eq!(
            client.snapshot(ids[key]).await.unwrap().status,
            status,
            "{key}"
        );
    }
    // Two more, never run: one due two minutes ago, one due now.
    for key in ["overdue", "due-now"] {
        let started = client
            .start(&saga, StartKey::new(key).unwrap(), &1)
            .await
            .unwrap();
        ids.insert(key, started.id);
    }
    // Time passes: three of the finished ones are 100 days old.
    d.admin
        .batch_execute(
            "UPDATE saga.saga_instances SET updated_at = now() - interval '100 days'
             WHERE start_key IN ('done-old', 'undone-old', 'stuck-old');
             UPDATE saga.saga_instances SET next_run_at = now() - interval '2 minutes'
             WHERE start_key = 'overdue';",
        )
        .await
        .unwrap();
    let history_of = |key: &str| ids[key].as_uuid();
    let history_rows = async |admin: &saga_postgres::tokio_postgres::Client, key: &str| -> i64 {
        admin
            .query_one(
                "SELECT count(*) FROM saga.saga_history WHERE saga_id = $1",
                &[&history_of(key)],
            )
            .await
            .unwrap()
            .get(0)
    };
    assert!(history_rows(&d.admin, "done-old").await > 0);

    let conn = d.conn("saga_operator").await;

    // Stuck sagas: the one stuck.
    let stuck = conn
        .query(&sql_block("WHERE status = 'stuck'"), &[])
        .await
        .unwrap();
    let stuck: Vec<(uuid::Uuid, String)> = stuck
        .iter()
        .map(|r| (r.get("id"), r.get("stuck_reason")))
        .collect();
    assert_eq!(stuck.len(), 1, "{stuck:?}");
    assert_eq!(stuck[0].0, history_of("stuck-old"));
    assert!(stuck[0].1.contains("the warehouse refuses the release"));

    // A saga's history: every transition of the stuck one, in order.
    let history = conn
        .query(
            &sql_block("FROM saga.saga_history"),
            &[&history_of("stuck-old")],
        )
        .await
        .unwrap();
    let api = client.history(ids["stuck-old"]).await.unwrap();
    assert_eq!(history.len(), api.len());
    let to_status: Vec<String> = history.iter().map(|r| r.get("to_status")).collect();
    assert_eq!(to_status.last().map(String::as_str), Some("stuck"));

    // Due but not run: only the saga due two minutes ago.
    let due = conn
        .query(&sql_block("next_run_at < now() - interval '1 minute'"), &[])
        .await
        .unwrap();
    let due: Vec<(String, i32, i64)> = due.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
    assert_eq!(due, [("cleanup".to_owned(), 1, 1)]);

    // The clean-up: the finished sagas older than 90 days go, with their
    // history (the cascade needs no DELETE on the history); the recent
    // one, the stuck one and the running ones stay. The worker may not
    // run it.
    let delete = sql_block("DELETE FROM saga.saga_instances");
    sql_refused(&*d.conn("saga_worker").await, &delete).await;
    assert_eq!(conn.execute(&delete, &[]).await.unwrap(), 2);
    let left: Vec<String> = conn
        .query(
            "SELECT start_key FROM saga.saga_instances ORDER BY start_key",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(left, ["done-recent", "due-now", "overdue", "stuck-old"]);
    for key in ["done-old", "undone-old"] {
        assert_eq!(history_rows(&d.admin, key).await, 0, "{key}'s history");
    }
    assert!(history_rows(&d.admin, "done-recent").await > 0);
    assert_eq!(
        conn.execute(&delete, &[]).await.unwrap(),
        0,
        "nothing more to delete"
    );
    // As the guide warns, a deleted saga's start key starts a new saga.
    let again = client
        .start(&saga, StartKey::new("done-old").unwrap(), &1)
        .await
        .unwrap();
    assert_ne!(again.id, ids["done-old"]);

    drop((conn, executor));
    d.drop_roles().await;
}

#[test]
fn every_sql_block_of_the_operations_guide_is_run_by_these_tests() {
    let run = [
        roles_support::ADMIN_BLOCK,
        roles_support::GRANT_BLOCK,
        "WHERE status = 'stuck'",
        "FROM saga.saga_history",
        "next_run_at < now() - interval '1 minute'",
        "DELETE FROM saga.saga_instances",
        // tests/definitions.rs
        "FROM saga.saga_definitions ORDER BY",
    ];
    for block in sql_blocks() {
        assert!(
            run.iter().any(|needle| block.contains(needle)),
            "a ```sql block of docs/operations.md that no test runs:\n{block}"
        );
    }
}
