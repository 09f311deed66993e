//! The inventory service: stock reservations and releases, idempotent per
//! key.
//!
//! - `POST /reservations` with an `Idempotency-Key` deducts every line of
//!   an order at once, or none (`409 out_of_stock`); the same key returns
//!   the first result and never deducts twice.
//! - `POST /releases` with its own key puts back what the reservation made
//!   under `reservation_key` deducted. Releasing a key that never reserved
//!   is a no-op that voids the key, so a late reservation with it deducts
//!   nothing.
//!
//! Stock never goes negative (a `CHECK`); every deduction and release is a
//! row in the append-only `ledger`.

use std::collections::BTreeMap;
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
use crate::model::OrderLine;

/// A reservation request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReserveRequest {
    /// The order.
    pub order_id: String,
    /// What to reserve.
    pub lines: Vec<OrderLine>,
}

/// A release request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReleaseRequest {
    /// The idempotency key the reservation was (or may have been) made with.
    pub reservation_key: Uuid,
}

/// Creates the service's tables in `schema` if needed and stocks each SKU
/// of `stock` not stocked yet.
pub async fn create_schema(
    pool: &Pool,
    schema: &SchemaName,
    stock: &BTreeMap<String, i32>,
) -> Result<(), crate::Error> {
    let s = schema.quoted();
    let client = pool.get().await?;
    client
        .batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {s};
             -- `initial` is what the run started with: stock is conserved
             -- when available = initial - deducted + released.
             CREATE TABLE IF NOT EXISTS {s}.stock (
                 sku       text PRIMARY KEY,
                 initial   int  NOT NULL CHECK (initial >= 0),
                 available int  NOT NULL CHECK (available >= 0)
             );
             -- Every deduction and release ever made: the ground truth.
             CREATE TABLE IF NOT EXISTS {s}.ledger (
                 seq             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                 kind            text NOT NULL CHECK (kind IN ('deduct', 'release')),
                 order_id        text NOT NULL,
                 sku             text NOT NULL,
                 qty             int  NOT NULL CHECK (qty > 0),
                 -- The reservation (for a release: the one released).
                 reservation_key uuid NOT NULL,
                 idempotency_key uuid NOT NULL,
                 at              timestamptz NOT NULL DEFAULT clock_timestamp(),
                 UNIQUE (idempotency_key, sku)
             );
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
    for (sku, available) in stock {
        client
            .execute(
                &format!(
                    "INSERT INTO {s}.stock (sku, initial, available) VALUES ($1, $2, $2)
                     ON CONFLICT (sku) DO NOTHING"
                ),
                &[sku, available],
            )
            .await?;
    }
    Ok(())
}

/// Starts the inventory service with the given initial stock.
pub async fn start(
    pool: Pool,
    schema: SchemaName,
    stock: &BTreeMap<String, i32>,
    seed: u64,
) -> Result<Service, crate::Error> {
    create_schema(&pool, &schema, stock).await?;
    Ok(serve(pool, schema, seed, |common| {
        Router::new()
            .route("/reservations", post(reserve))
            .route("/releases", post(release))
            .with_state(common)
    })
    .await?)
}

async fn reserve(
    State(c): State<Arc<Common>>,
    headers: HeaderMap,
    Json(req): Json<ReserveRequest>,
) -> Result<Response, ServiceError> {
    let key = idempotency_key(&headers)?;
    let call = log_request(&c, key, &headers).await?;
    let fate = c.fate().await;
    if fate == Fate::Fail {
        return Ok((StatusCode::SERVICE_UNAVAILABLE, "inventory unavailable").into_response());
    }
    if req.lines.is_empty() || req.lines.iter().any(|l| l.qty == 0) {
        return Err(ServiceError::BadRequest(
            "lines must be non-empty with positive quantities",
        ));
    }
    let mut wanted: BTreeMap<&str, i32> = BTreeMap::new();
    for line in &req.lines {
        *wanted.entry(line.sku.as_str()).or_default() +=
            i32::try_from(line.qty).unwrap_or(i32::MAX);
    }
    let mut client = c.pool.get().await?;
    let tx = client.transaction().await?;
    lock(&tx, key).await?;
    let stored_reply = stored(&tx, &c, key).await?;
    answered(&tx, &c, call, stored_reply.is_some()).await?;
    let reply = match stored_reply {
        Some(reply) => reply,
        None => {
            // Lock the rows in SKU order (no deadlocks), check, then deduct.
            let skus: Vec<&str> = wanted.keys().copied().collect();
            let rows = tx
                .query(
                    &format!(
                        "SELECT sku, available FROM {} WHERE sku = ANY($1) ORDER BY sku FOR UPDATE",
                        c.table("stock")
                    ),
                    &[&skus],
                )
                .await?;
            let available: BTreeMap<String, i32> =
                rows.iter().map(|r| (r.get(0), r.get(1))).collect();
            let short = wanted
                .iter()
                .any(|(sku, qty)| available.get(*sku).is_none_or(|a| a < qty));
            let reply = if short {
                Stored {
                    status: 409,
                    body: json!({ "error": "out_of_stock" }),
                }
            } else {
                for (sku, qty) in &wanted {
                    tx.execute(
                        &format!(
                            "UPDATE {} SET available = available - $2 WHERE sku = $1",
                            c.table("stock")
                        ),
                        &[sku, qty],
                    )
                    .await?;
                    tx.execute(
                        &format!(
                            "INSERT INTO {} (kind, order_id, sku, qty, reservation_key, idempotency_key)
                             VALUES ('deduct', $1, $2, $3, $4, $4)",
                            c.table("ledger")
                        ),
                        &[&req.order_id, sku, qty, &key],
                    )
                    .await?;
                }
                Stored {
                    status: 201,
                    body: json!({ "reservation_id": key }),
                }
            };
            store(&tx, &c, key, &reply).await?;
            reply
        }
    };
    tx.commit().await?;
    Ok(c.reply(fate, reply.into_response()).await)
}

async fn release(
    State(c): State<Arc<Common>>,
    headers: HeaderMap,
    Json(req): Json<ReleaseRequest>,
) -> Result<Response, ServiceError> {
    let key = idempotency_key(&headers)?;
    let call = log_request(&c, key, &headers).await?;
    let fate = c.fate().await;
    if fate == Fate::Fail {
        return Ok((StatusCode::SERVICE_UNAVAILABLE, "inventory unavailable").into_response());
    }
    let mut client = c.pool.get().await?;
    let tx = client.transaction().await?;
    lock(&tx, req.reservation_key).await?;
    lock(&tx, key).await?;
    let stored_reply = stored(&tx, &c, key).await?;
    answered(&tx, &c, call, stored_reply.is_some()).await?;
    let reply = match stored_reply {
        Some(reply) => reply,
        None => {
            let deducted = tx
                .query(
                    &format!(
                        "SELECT order_id, sku, qty FROM {}
                         WHERE kind = 'deduct' AND reservation_key = $1 ORDER BY sku",
                        c.table("ledger")
                    ),
                    &[&req.reservation_key],
                )
                .await?;
            let reply = if deducted.is_empty() {
                if stored(&tx, &c, req.reservation_key).await?.is_none() {
                    store(
                        &tx,
                        &c,
                        req.reservation_key,
                        &Stored {
                            status: 409,
                            body: json!({ "error": "voided_by_release" }),
                        },
                    )
                    .await?;
                }
                Stored {
                    status: 200,
                    body: json!({ "released": false }),
                }
            } else {
                let already = tx
                    .query_opt(
                        &format!(
                            "SELECT 1 FROM {} WHERE kind = 'release' AND reservation_key = $1",
                            c.table("ledger")
                        ),
                        &[&req.reservation_key],
                    )
                    .await?
                    .is_some();
                if !already {
                    for row in &deducted {
                        let (order_id, sku, qty): (String, String, i32) =
                            (row.get(0), row.get(1), row.get(2));
                        tx.execute(
                            &format!(
                                "UPDATE {} SET available = available + $2 WHERE sku = $1",
                                c.table("stock")
                            ),
                            &[&sku, &qty],
                        )
                        .await?;
                        tx.execute(
                            &format!(
                                "INSERT INTO {} (kind, order_id, sku, qty, reservation_key, idempotency_key)
                                 VALUES ('release', $1, $2, $3, $4, $5)",
                                c.table("ledger")
                            ),
                            &[&order_id, &sku, &qty, &req.reservation_key, &key],
                        )
                        .await?;
                    }
                }
                Stored {
                    status: 200,
                    body: json!({ "released": true }),
                }
            };
            store(&tx, &c, key, &reply).await?;
            reply
        }
    };
    tx.commit().await?;
    Ok(c.reply(fate, reply.into_response()).await)
}
