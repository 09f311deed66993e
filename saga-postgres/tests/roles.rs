//! Database roles and operator queries, as `docs/operations.md` prescribes
//! them: migrations run with a role allowed to run DDL (a superuser, or a
//! migration role with CREATE on the database); workers, dispatchers,
//! consumers and operator calls run with a runtime role that has DML only
//! (no DDL, no sequence rights), and that role cannot migrate.
//!
//! The SQL is read from the guide itself, not copied: its role and grant
//! block is run as written (with unique role names, the test database's
//! name and a password substituted), and so are its operator queries
//! (stuck sagas, a saga's history, sagas due but not run, the clean-up of
//! finished sagas), each checked for its effect. Roles are cluster-wide:
//! each test makes its own, under unique names, and drops them when it
//! passes (a failed run keeps them with its database, for inspection).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use saga_core::{
    Executor, ManualClock, Message, MessageId, SagaDefinition, SagaId, StartKey, Status, Step,
    StepContext, StepError,
};
use saga_postgres::inbox::{ConsumerName, Delivery, Inbox};
use saga_postgres::outbox::{Dispatcher, InProcessPublisher, Outbox};
use saga_postgres::tokio_postgres::error::SqlState;
use saga_postgres::{MIGRATIONS, PgError, PgSagaStore, SchemaName, migrate, pool_from_config};

/// `docs/operations.md`.
fn operations_guide() -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/operations.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The bodies of the guide's ```sql blocks.
fn sql_blocks() -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in operations_guide().lines() {
        match &mut current {
            None if line.trim_end() == "```sql" => current = Some(String::new()),
            None => {}
            Some(_) if line.trim_end() == "```" => blocks.extend(current.take()),
            Some(body) => {
                body.push_str(line);
                body.push('\n');
            }
        }
    }
    assert!(current.is_none(), "an unterminated ```sql block");
    blocks
}

/// The guide's one ```sql block that contains `needle`.
fn sql_block(needle: &str) -> String {
    let found: Vec<String> = sql_blocks()
        .into_iter()
        .filter(|b| b.contains(needle))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "docs/operations.md must have exactly one ```sql block with `{needle}`"
    );
    found.into_iter().next().unwrap()
}

/// `sql` with each whole identifier `from` replaced by `to`, and each
/// `'...'` (the guide's elided password) by `password`.
fn substitute(sql: &str, names: &[(&str, &str)], password: &str) -> String {
    let sql = sql.replace("'...'", &format!("'{password}'"));
    let mut out = String::with_capacity(sql.len());
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        let replaced = names
            .iter()
            .find(|(from, _)| *from == word.as_str())
            .map_or(word.as_str(), |(_, to)| to);
        out.push_str(replaced);
        word.clear();
    };
    for c in sql.chars() {
        if c.is_ascii_alphanumeric() || c == '_' {
            word.push(c);
        } else {
            flush(&mut word, &mut out);
            out.push(c);
        }
    }
    flush(&mut word, &mut out);
    out
}

/// The guide's roles: what the administrator runs once per database, and
/// the runtime role's grants that the migration role runs after
/// migrating, for roles `migrator` and `app` on database `db`.
struct GuideRoles {
    admin: String,
    runtime_grants: String,
}

fn guide_roles(migrator: &str, app: &str, db: &str, password: &str) -> GuideRoles {
    let block = sql_block("GRANT USAGE ON SCHEMA saga TO saga_app");
    let split = block
        .find("-- As saga_migrator")
        .expect("the grants the migration role runs, after `-- As saga_migrator`");
    let names = [("saga_migrator", migrator), ("saga_app", app), ("shop", db)];
    GuideRoles {
        admin: substitute(&block[..split], &names, password),
        runtime_grants: substitute(&block[split..], &names, password),
    }
}

/// Unique role names: (migration role, runtime role).
fn unique_roles() -> (String, String) {
    let suffix = &uuid::Uuid::now_v7().simple().to_string()[20..];
    (
        format!("saga_migrator_{suffix}"),
        format!("saga_app_{suffix}"),
    )
}

#[test]
fn the_guides_roles_are_substituted_as_whole_names() {
    let roles = guide_roles("m_1", "a_1", "db_1", "pw");
    assert!(roles.admin.contains("CREATE ROLE m_1 LOGIN PASSWORD 'pw';"));
    assert!(
        roles
            .admin
            .contains("GRANT CREATE ON DATABASE db_1 TO m_1;")
    );
    assert!(
        roles
            .admin
            .contains("GRANT CONNECT ON DATABASE db_1 TO a_1;")
    );
    assert!(!roles.admin.contains("GRANT USAGE"), "{}", roles.admin);
    assert!(
        roles
            .runtime_grants
            .contains("GRANT USAGE ON SCHEMA saga TO a_1;")
    );
    assert!(
        roles
            .runtime_grants
            .contains("ON saga.saga_instances, saga.saga_history, saga.outbox, saga.inbox"),
        "the schema `saga` is kept: {}",
        roles.runtime_grants
    );
    assert!(!roles.runtime_grants.contains("saga_app"));
    assert_eq!(
        substitute("saga_app saga_app_x x_saga_app", &[("saga_app", "y")], "p"),
        "y saga_app_x x_saga_app"
    );
}

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
    let db = saga_test_support::fresh_database()
        .await
        .expect("a test PostgreSQL server");
    let schema = SchemaName::new("saga").unwrap();
    let admin = db.connect().await.unwrap();

    // As an administrator: the two roles, exactly as the guide makes them.
    let (migrator, role) = unique_roles();
    let password = uuid::Uuid::now_v7().simple().to_string();
    let guide = guide_roles(&migrator, &role, db.name(), &password);
    admin.batch_execute(&guide.admin).await.unwrap();

    // As the migration role: migrate, then grant the runtime role its
    // rights, exactly as the guide grants them.
    let mut migrator_config = db.config();
    migrator_config.user(&migrator).password(&password);
    let migrator_pool = pool_from_config(migrator_config, 1).unwrap();
    let mut conn = migrator_pool.get().await.unwrap();
    migrate(&mut conn, &schema).await.unwrap();
    conn.batch_execute(&guide.runtime_grants).await.unwrap();
    drop(conn);
    drop(migrator_pool);

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
        i64::try_from(MIGRATIONS.len()).unwrap(),
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
    let store = PgSagaStore::builder(app_pool.clone(), schema.clone())
        .clock(clock.clone())
        .build();
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
    let outbox = Outbox::builder(app_pool.clone(), schema.clone())
        .clock(clock.clone())
        .build();
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
    let inbox = Inbox::builder(app_pool.clone(), schema.clone())
        .clock(clock.clone())
        .build();
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
        .batch_execute(&format!(
            "DROP OWNED BY {role}, {migrator}; DROP ROLE {role}, {migrator};"
        ))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_migration_role_needs_create_on_the_database_and_grants_the_runtime_role() {
    let db = saga_test_support::fresh_database()
        .await
        .expect("a test PostgreSQL server");
    let schema = SchemaName::new("saga").unwrap();
    let admin = db.connect().await.unwrap();
    let (migrator, app) = unique_roles();
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
    let all: Vec<i32> = MIGRATIONS.iter().map(|m| m.version).collect();
    assert_eq!(migrate(&mut conn, &schema).await.unwrap().applied, all);
    conn.batch_execute(&guide_roles(&migrator, &app, db.name(), "unused").runtime_grants)
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
async fn the_guides_operator_queries_find_and_clean_up_what_they_say_as_the_runtime_role() {
    let db = saga_test_support::fresh_database()
        .await
        .expect("a test PostgreSQL server");
    let schema = SchemaName::new("saga").unwrap();
    let mut admin = db.connect().await.unwrap();
    migrate(&mut admin, &schema).await.unwrap();
    let (migrator, app) = unique_roles();
    let password = uuid::Uuid::now_v7().simple().to_string();
    let guide = guide_roles(&migrator, &app, db.name(), &password);
    admin.batch_execute(&guide.admin).await.unwrap();
    admin.batch_execute(&guide.runtime_grants).await.unwrap();
    let mut app_config = db.config();
    app_config.user(&app).password(&password);
    let app_pool = pool_from_config(app_config, 4).unwrap();

    // Sagas in every state, run as the runtime role.
    let saga = SagaDefinition::<u32>::builder("cleanup", 1)
        .step(Step::new("reserve", reserve).compensate_with(release_unless_three))
        .pivot(Step::new("confirm", confirm_unless_two_or_more))
        .build()
        .unwrap();
    let executor = Executor::builder(PgSagaStore::new(app_pool.clone(), schema.clone()))
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
        assert_eq!(client.get(ids[key]).await.unwrap().status, status, "{key}");
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
    admin
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
    assert!(history_rows(&admin, "done-old").await > 0);

    let conn = app_pool.get().await.unwrap();

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
    // history; the recent one, the stuck one and the running ones stay.
    let delete = sql_block("DELETE FROM saga.saga_instances");
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
        assert_eq!(history_rows(&admin, key).await, 0, "{key}'s history");
    }
    assert!(history_rows(&admin, "done-recent").await > 0);
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

    drop((conn, executor, app_pool));
    admin
        .batch_execute(&format!(
            "DROP OWNED BY {app}, {migrator}; DROP ROLE {app}, {migrator};"
        ))
        .await
        .unwrap();
}

#[test]
fn every_sql_block_of_the_operations_guide_is_run_by_these_tests() {
    let run = [
        "GRANT USAGE ON SCHEMA saga TO saga_app",
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
