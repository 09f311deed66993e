//! The payment service: charges and refunds, idempotent as real payment
//! APIs are.
//!
//! - `POST /charges` with an `Idempotency-Key` charges once per key: the
//!   same key returns the first result (a charge or a decline) and never
//!   charges twice.
//! - `POST /refunds` with its own `Idempotency-Key` refunds the charge made
//!   under `charge_key`. A refund for a key that never charged is a no-op,
//!   and *voids* that key: a charge request arriving late with it (an
//!   attempt that was still in flight when the saga gave up) is refused
//!   instead of charging a customer nobody will refund.
//!
//! Every effect is a row in the append-only `ledger`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use saga_postgres::SchemaName;
use saga_postgres::deadpool_postgres::Pool;
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

use super::{
    Common, Fate, Service, ServiceError, Stored, answered, idempotency_key, lock, log_request,
    requests_table, serve, store, stored,
};
use crate::model::{CARD_DECLINED, CARD_GATEWAY_DOWN};

/// A charge request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChargeRequest {
    /// The order being paid.
    pub order_id: String,
    /// How much.
    pub amount_cents: i64,
    /// The card token.
    pub card: String,
}

/// A refund request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RefundRequest {
    /// The idempotency key the charge was (or may have been) made with.
    pub charge_key: Uuid,
}

/// Creates the service's tables in `schema` if they do not exist.
pub async fn create_schema(pool: &Pool, schema: &SchemaName) -> Result<(), crate::Error> {
    let s = schema.quoted();
    pool.get()
        .await?
        .batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {s};
             -- Every charge and refund ever made: the ground truth.
             CREATE TABLE IF NOT EXISTS {s}.ledger (
                 seq             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                 kind            text   NOT NULL CHECK (kind IN ('charge', 'refund')),
                 order_id        text   NOT NULL,
                 amount_cents    bigint NOT NULL CHECK (amount_cents > 0),
                 -- The charge (for a refund: the charge refunded).
                 charge_id       uuid   NOT NULL,
                 idempotency_key uuid   NOT NULL UNIQUE,
                 at              timestamptz NOT NULL DEFAULT clock_timestamp()
             );
             -- The first reply to each idempotency key, replayed to repeats.
             CREATE TABLE IF NOT EXISTS {s}.idempotency (
                 key    uuid  PRIMARY KEY,
                 status int   NOT NULL,
                 body   jsonb NOT NULL
             );
             {requests}
             {append_only}",
            requests = requests_table(&s),
            append_only = crate::audit::append_only(schema, "ledger"),
        ))
        .await?;
    Ok(())
}

/// Starts the payment service on `pool`, with its tables in `schema`.
pub async fn start(pool: Pool, schema: SchemaName, seed: u64) -> Result<Service, crate::Error> {
    create_schema(&pool, &schema).await?;
    Ok(serve(pool, schema, seed, |common| {
        Router::new()
            .route("/charges", post(charge))
            .route("/refunds", post(refund))
            .with_state(common)
    })
    .await?)
}

async fn charge(
    State(c): State<Arc<Common>>,
    headers: HeaderMap,
    Json(req): Json<ChargeRequest>,
) -> Result<Response, ServiceError> {
    let key = idempotency_key(&headers)?;
    let call = log_request(&c, key, &headers).await?;
    let fate = c.fate().await;
    if fate == Fate::Fail || req.card == CARD_GATEWAY_DOWN {
        return Ok((StatusCode::SERVICE_UNAVAILABLE, "gateway unavailable").into_response());
    }
    if req.amount_cents <= 0 {
        return Err(ServiceError::BadRequest("amount_cents must be positive"));
    }
    let mut client = c.pool.get().await?;
    let tx = client.transaction().await?;
    lock(&tx, key).await?;
    let stored_reply = stored(&tx, &c, key).await?;
    answered(&tx, &c, call, stored_reply.is_some()).await?;
    let reply = match stored_reply {
        Some(reply) => reply,
        None => {
            let reply = if req.card == CARD_DECLINED {
                Stored {
                    status: 402,
                    body: json!({ "error": "card_declined" }),
                }
            } else {
                let charge_id = Uuid::now_v7();
                tx.execute(
                    &format!(
                        "INSERT INTO {} (kind, order_id, amount_cents, charge_id, idempotency_key)
                         VALUES ('charge', $1, $2, $3, $4)",
                        c.table("ledger")
                    ),
                    &[&req.order_id, &req.amount_cents, &charge_id, &key],
                )
                .await?;
                Stored {
                    status: 201,
                    body: json!({ "charge_id": charge_id }),
                }
            };
            store(&tx, &c, key, &reply).await?;
            reply
        }
    };
    tx.commit().await?;
    Ok(c.reply(fate, reply.into_response()).await)
}

async fn refund(
    State(c): State<Arc<Common>>,
    headers: HeaderMap,
    Json(req): Json<RefundRequest>,
) -> Result<Response, ServiceError> {
    let key = idempotency_key(&headers)?;
    let call = log_request(&c, key, &headers).await?;
    let fate = c.fate().await;
    if fate == Fate::Fail {
        return Ok((StatusCode::SERVICE_UNAVAILABLE, "gateway unavailable").into_response());
    }
    let mut client = c.pool.get().await?;
    let tx = client.transaction().await?;
    // Always lock the charge key first, then the refund key, so that a
    // late charge and its refund serialize.
    lock(&tx, req.charge_key).await?;
    lock(&tx, key).await?;
    let stored_reply = stored(&tx, &c, key).await?;
    answered(&tx, &c, call, stored_reply.is_some()).await?;
    let reply = match stored_reply {
        Some(reply) => reply,
        None => {
            let charge = tx
                .query_opt(
                    &format!(
                        "SELECT charge_id, order_id, amount_cents FROM {}
                         WHERE kind = 'charge' AND idempotency_key = $1",
                        c.table("ledger")
                    ),
                    &[&req.charge_key],
                )
                .await?;
            let reply = match charge {
                None => {
                    // Nothing to undo. Void the key so that a charge
                    // arriving late with it cannot charge.
                    if stored(&tx, &c, req.charge_key).await?.is_none() {
                        store(
                            &tx,
                            &c,
                            req.charge_key,
                            &Stored {
                                status: 409,
                                body: json!({ "error": "voided_by_refund" }),
                            },
                        )
                        .await?;
                    }
                    Stored {
                        status: 200,
                        body: json!({ "refunded": false }),
                    }
                }
                Some(row) => {
                    let (charge_id, order_id, amount): (Uuid, String, i64) =
                        (row.get(0), row.get(1), row.get(2));
                    let already = tx
                        .query_opt(
                            &format!(
                                "SELECT 1 FROM {} WHERE kind = 'refund' AND charge_id = $1",
                                c.table("ledger")
                            ),
                            &[&charge_id],
                        )
                        .await?
                        .is_some();
                    if !already {
                        tx.execute(
                            &format!(
                                "INSERT INTO {} (kind, order_id, amount_cents, charge_id, idempotency_key)
                                 VALUES ('refund', $1, $2, $3, $4)",
                                c.table("ledger")
                            ),
                            &[&order_id, &amount, &charge_id, &key],
                        )
                        .await?;
                    }
                    Stored {
                        status: 200,
                        body: json!({ "refunded": true, "charge_id": charge_id }),
                    }
                }
            };
            store(&tx, &c, key, &reply).await?;
            reply
        }
    };
    tx.commit().await?;
    Ok(c.reply(fate, reply.into_response()).await)
}
