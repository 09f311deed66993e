//! Each role of `docs/operations.md` is refused (SQLSTATE 42501,
//! `insufficient_privilege`) what the guide says it cannot do, with the
//! guide's role and grant blocks run as written: through the components
//! where one sends the statement, and as plain SQL otherwise. Nothing a
//! refused attempt tried changed a row. `roles.rs` shows each role doing
//! its job; `roles_statements.rs` checks every statement of the crate.

mod roles_support;

use roles_support::{Deployment, RUNTIME, core_code, outbox_code, pg_code, refused, sql_refused};
use saga_core::{
    Executor, Message, MessageId, SagaDefinition, StartKey, Step, StepContext, StepError,
};
use saga_postgres::inbox::{ConsumerName, Delivery, Inbox};
use saga_postgres::outbox::Outbox;
use saga_postgres::{MIGRATIONS, PgError, PgSagaStore, migrate};

async fn reserve(_: &mut StepContext, _: &mut u32) -> Result<(), StepError> {
    Ok(())
}
async fn release(_: &mut StepContext, _: &mut u32) -> Result<(), StepError> {
    Ok(())
}
/// Emits a message.
async fn confirm(ctx: &mut StepContext, order: &mut u32) -> Result<(), StepError> {
    ctx.emit(Message::json(
        "order.confirmed",
        &serde_json::json!({ "order": *order }),
    )?)?;
    Ok(())
}

fn roles_saga() -> SagaDefinition<u32> {
    SagaDefinition::<u32>::builder("roles", 1)
        .step(Step::new("reserve", reserve).compensate_with(release))
        .pivot(Step::new("confirm", confirm))
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_is_refused_what_it_must_not_do() {
    let d = Deployment::new().await;
    let schema = d.schema.clone();
    let saga = roles_saga();
    let outbox_as = |role| Outbox::new(d.pool(role), schema.clone());
    let inbox_as = |role| Inbox::new(d.pool(role), schema.clone());
    let client_as = |role| {
        Executor::builder(PgSagaStore::new(d.pool(role), schema.clone()))
            .register(saga.clone())
            .build()
            .unwrap()
    };
    let consumer = ConsumerName::new("email-sender").unwrap();
    // One row in each table, so that every refusal below would otherwise
    // have something to act on.
    let worker = client_as("saga_worker");
    let started = worker
        .client()
        .start(&saga, StartKey::new("order-1").unwrap(), &1)
        .await
        .unwrap();
    worker.run_until_idle().await.unwrap();
    worker
        .client()
        .start(&saga, StartKey::new("order-2").unwrap(), &1)
        .await
        .unwrap();
    assert_eq!(outbox_as("saga_operator").stats().await.unwrap().pending, 1);
    {
        let mut conn = d.conn("saga_consumer").await;
        let tx = conn.transaction().await.unwrap();
        let id = MessageId::new();
        let delivery = inbox_as("saga_consumer")
            .process_once_in_tx(&tx, &consumer, id)
            .await
            .unwrap();
        assert_eq!(delivery, Delivery::First);
        tx.commit().await.unwrap();
    }

    // The worker: no deletes, no changes to history or to the outbox
    // (whoever wrote the row), no reading delivery state, no forged delivery
    // state, no change to a saga's identity, nothing on the inbox.
    let conn = d.conn("saga_worker").await;
    for sql in [
        "DELETE FROM saga.saga_history",
        "UPDATE saga.saga_history SET error = 'nothing happened'",
        "DELETE FROM saga.saga_instances",
        "UPDATE saga.saga_instances SET saga_name = 'other', saga_version = 2",
        "UPDATE saga.saga_instances SET start_key = 'order-9'",
        "DELETE FROM saga.outbox",
        "UPDATE saga.outbox SET topic = 'payments.refund'",
        "UPDATE saga.outbox SET available_at = now() + interval '1 year'",
        "SELECT attempts, last_error, lease_token FROM saga.outbox",
        "INSERT INTO saga.outbox (id, topic, payload_json, created_at, available_at, dead_at)
         VALUES (gen_random_uuid(), 'x', '1', now(), now(), now())",
        "INSERT INTO saga.outbox (id, topic, payload_json, created_at, available_at, lease_token,
             lease_expires_at)
         VALUES (gen_random_uuid(), 'x', '1', now(), now(), gen_random_uuid(), now())",
        "SELECT * FROM saga.inbox",
        "INSERT INTO saga.inbox VALUES ('email-sender', gen_random_uuid(), now())",
        "DELETE FROM saga.inbox",
    ] {
        sql_refused(&conn, sql).await;
    }
    drop(conn);
    let worker_outbox = outbox_as("saga_worker");
    refused("stats", worker_outbox.stats().await, outbox_code);
    refused("purge", worker_outbox.purge_all(None).await, outbox_code);
    refused("prune", inbox_as("saga_worker").prune().await, pg_code);

    // The dispatcher: no new messages, no change to a message's content,
    // nothing on the sagas or the inbox.
    let conn = d.conn("saga_dispatcher").await;
    for sql in [
        "INSERT INTO saga.outbox (id, topic, payload_json, created_at, available_at)
         VALUES (gen_random_uuid(), 'x', '1', now(), now())",
        "UPDATE saga.outbox SET payload_json = '{\"refund\": 1000}'",
        "UPDATE saga.outbox SET topic = 'payments.refund', key = 'k', headers = '{}'",
        "SELECT * FROM saga.saga_instances",
        "UPDATE saga.saga_instances SET state = '{}'",
        "SELECT * FROM saga.saga_history",
        "INSERT INTO saga.inbox VALUES ('email-sender', gen_random_uuid(), now())",
        "SELECT * FROM saga.inbox",
    ] {
        sql_refused(&conn, sql).await;
    }
    {
        let mut conn = d.conn("saga_dispatcher").await;
        let tx = conn.transaction().await.unwrap();
        let message = Message::json("order.confirmed", &1).unwrap();
        refused(
            "enqueue",
            outbox_as("saga_dispatcher")
                .enqueue_in_tx(&tx, message)
                .await,
            outbox_code,
        );
    }
    drop(conn);
    let dispatcher = client_as("saga_dispatcher");
    refused("get", dispatcher.client().get(started.id).await, core_code);
    let start = dispatcher
        .client()
        .start(&saga, StartKey::new("order-3").unwrap(), &1)
        .await;
    refused("start", start, core_code);

    // The consumer: the inbox only, and it cannot rewrite a row.
    let conn = d.conn("saga_consumer").await;
    for sql in [
        "UPDATE saga.inbox SET processed_at = now()",
        "SELECT * FROM saga.saga_instances",
        "SELECT * FROM saga.saga_history",
        "SELECT * FROM saga.outbox",
        "INSERT INTO saga.outbox (id, topic, payload_json, created_at, available_at)
         VALUES (gen_random_uuid(), 'x', '1', now(), now())",
        "DELETE FROM saga.outbox",
    ] {
        sql_refused(&conn, sql).await;
    }
    drop(conn);
    refused(
        "stats",
        outbox_as("saga_consumer").stats().await,
        outbox_code,
    );
    refused(
        "get",
        client_as("saga_consumer").client().get(started.id).await,
        core_code,
    );

    // The operator: no claims, no starts, no settling, no history changes,
    // nothing on the inbox.
    let conn = d.conn("saga_operator").await;
    for sql in [
        "UPDATE saga.saga_instances SET claim_id = gen_random_uuid()",
        "UPDATE saga.saga_instances SET saga_name = 'other'",
        "DELETE FROM saga.saga_history",
        "UPDATE saga.saga_history SET error = 'nothing happened'",
        "UPDATE saga.outbox SET last_error = 'published elsewhere'",
        "UPDATE saga.outbox SET payload_json = '{}'",
        "SELECT * FROM saga.inbox",
        "INSERT INTO saga.inbox VALUES ('email-sender', gen_random_uuid(), now())",
        "DELETE FROM saga.inbox",
    ] {
        sql_refused(&conn, sql).await;
    }
    drop(conn);
    let operator = client_as("saga_operator");
    let start = operator
        .client()
        .start(&saga, StartKey::new("order-4").unwrap(), &1)
        .await;
    refused("start", start, core_code);
    refused("prune", inbox_as("saga_operator").prune().await, pg_code);

    // No runtime role can migrate, or create a table; nothing changed.
    for role in RUNTIME {
        let mut conn = d.conn(role).await;
        let err = migrate(&mut conn, &schema).await.unwrap_err();
        assert!(matches!(err, PgError::Db(_)), "{role}: {err:?}");
        refused(role, Err::<(), _>(err), pg_code);
        sql_refused(&conn, "CREATE TABLE saga.not_allowed (id int)").await;
        sql_refused(
            &conn,
            "ALTER TABLE saga.outbox DROP CONSTRAINT outbox_one_payload",
        )
        .await;
    }
    let migrations: i64 = d
        .admin
        .query_one("SELECT count(*) FROM saga.saga_migrations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(migrations, i64::try_from(MIGRATIONS.len()).unwrap());

    // What was refused changed nothing: the rows are as they were.
    let counts = d
        .admin
        .query_one(
            "SELECT (SELECT count(*) FROM saga.saga_instances),
                    (SELECT count(*) FROM saga.outbox WHERE topic = 'order.confirmed'),
                    (SELECT count(*) FROM saga.inbox)",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (
            counts.get::<_, i64>(0),
            counts.get::<_, i64>(1),
            counts.get::<_, i64>(2)
        ),
        (2, 1, 1)
    );
    drop((worker, dispatcher, operator));
    d.drop_roles().await;
}
