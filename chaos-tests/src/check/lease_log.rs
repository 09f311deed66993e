//! The facts of I9: the harness's log of every lease change on the saga
//! rows (with the step result written in the same transaction), and the
//! services' own request logs.

use std::collections::HashMap;

use checkout::deploy::Deployment;
use saga_postgres::deadpool_postgres::Object;
use uuid::Uuid;

use super::HARNESS_SCHEMA;
use super::fencing::{Answered, LeaseChange, ResultWritten, ServiceCall};

/// Installs the lease log: a trigger on the saga rows copies every change
/// of a row's lease token, and one on the history copies every step
/// result, each inside the writing transaction (so a copy exists exactly
/// when the write committed) and tagged with it. Changes to one row are
/// numbered in the order they committed: each write holds the row's lock
/// until its commit, and the copy is numbered after it took the lock.
pub(super) async fn install(db: &Object, deployment: &Deployment) -> Result<(), checkout::Error> {
    let s = deployment.schemas.saga.quoted();
    let h = HARNESS_SCHEMA;
    db.batch_execute(&format!(
        "CREATE TABLE {h}.lease_changes (
             seq        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
             saga_id    uuid NOT NULL,
             from_token uuid,
             to_token   uuid,
             xact       xid8 NOT NULL DEFAULT pg_current_xact_id(),
             at         timestamptz NOT NULL DEFAULT clock_timestamp()
         );
         CREATE FUNCTION {h}.log_lease() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             INSERT INTO {h}.lease_changes (saga_id, from_token, to_token)
                 VALUES (NEW.id, OLD.lease_token, NEW.lease_token);
             RETURN NULL;
         END $$;
         CREATE TRIGGER chaos_log_lease AFTER UPDATE OF lease_token ON {s}.saga_instances
             FOR EACH ROW WHEN (OLD.lease_token IS DISTINCT FROM NEW.lease_token)
             EXECUTE FUNCTION {h}.log_lease();
         CREATE TABLE {h}.results (
             saga_id   uuid NOT NULL,
             step      text NOT NULL,
             direction text NOT NULL,
             outcome   text NOT NULL,
             xact      xid8 NOT NULL DEFAULT pg_current_xact_id()
         );
         CREATE FUNCTION {h}.log_result() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             INSERT INTO {h}.results (saga_id, step, direction, outcome)
                 VALUES (NEW.saga_id, NEW.step, NEW.direction, NEW.outcome);
             RETURN NULL;
         END $$;
         CREATE TRIGGER chaos_log_result AFTER INSERT ON {s}.saga_history
             FOR EACH ROW EXECUTE FUNCTION {h}.log_result();"
    ))
    .await?;
    Ok(())
}

/// Reads the lease log (orders told by `orders`, saga id to order) and the
/// payment and inventory services' request logs.
pub(super) async fn read(
    db: &Object,
    deployment: &Deployment,
    orders: &HashMap<Uuid, String>,
) -> Result<(Vec<LeaseChange>, Vec<ServiceCall>), checkout::Error> {
    let h = HARNESS_SCHEMA;
    let mut leases = Vec::new();
    for r in db
        .query(
            &format!(
                "SELECT l.seq, l.saga_id, l.at, l.from_token, l.to_token,
                     r.step, r.direction, r.outcome
                 FROM {h}.lease_changes l
                 LEFT JOIN {h}.results r ON r.xact = l.xact AND r.saga_id = l.saga_id
                 ORDER BY l.seq"
            ),
            &[],
        )
        .await?
    {
        let Some(order) = orders.get(&r.get::<_, Uuid>(1)) else {
            continue;
        };
        let result = match (
            r.get::<_, Option<&str>>(5),
            r.get::<_, Option<&str>>(6),
            r.get::<_, Option<&str>>(7),
        ) {
            (Some(step), Some(direction), Some(outcome)) => Some(ResultWritten {
                step: step.to_owned(),
                direction: direction.parse()?,
                outcome: outcome.parse()?,
            }),
            _ => None,
        };
        leases.push(LeaseChange {
            order: order.clone(),
            seq: r.get(0),
            at: r.get(2),
            from: r.get(3),
            to: r.get(4),
            result,
        });
    }
    let mut calls = Vec::new();
    for (service, schema) in [
        ("payment", &deployment.schemas.payment),
        ("inventory", &deployment.schemas.inventory),
    ] {
        for r in db
            .query(
                &format!(
                    "SELECT key, lease, received_at, answered FROM {}.requests ORDER BY seq",
                    schema.quoted()
                ),
                &[],
            )
            .await?
        {
            calls.push(ServiceCall {
                service,
                key: r.get(0),
                lease: r.get(1),
                received_at: r.get(2),
                answered: match r.get::<_, Option<&str>>(3) {
                    Some("applied") => Some(Answered::Applied),
                    Some("replayed") => Some(Answered::Replayed),
                    _ => None,
                },
            });
        }
    }
    Ok((leases, calls))
}
