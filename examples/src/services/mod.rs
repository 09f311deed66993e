//! Fake downstream services that are real enough to be wrong.
//!
//! Payment, inventory and email each run as an HTTP server on 127.0.0.1
//! with their own schema in the database and an append-only ledger of the
//! effects they applied (charges, refunds, deductions, releases, emails),
//! which is the ground truth for checking the run. Each can be told to
//! misbehave ([`Faults`]): errors, an outage, latency, and success then
//! timeout (the effect is applied and committed, then the reply is lost).
//!
//! Payment and inventory also log every request they receive
//! (`requests`): its idempotency key, the caller's lease token if it sent
//! one ([`LEASE_HEADER`]), when it arrived, and whether it was answered
//! from the ledger — the effect applied for it, or the stored reply
//! replayed — committed with the effect. The chaos harness reads it to
//! check fencing from the services' side.

pub mod email;
pub mod inventory;
pub mod payment;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use saga_postgres::SchemaName;
use saga_postgres::deadpool_postgres::Pool;
use saga_postgres::tokio_postgres::Transaction;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// How a service misbehaves. Rates are probabilities per request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Faults {
    /// Every request fails with 503 before doing anything.
    pub outage: bool,
    /// Fraction of requests failing with 503 before doing anything.
    pub error_rate: f64,
    /// Fraction of requests whose effect is applied and committed, and
    /// whose reply is then never sent (the client times out).
    pub lose_reply_rate: f64,
    /// Added before handling each request.
    pub latency: Duration,
}

/// What the fault dice decided for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fate {
    /// Handle normally.
    Serve,
    /// Fail with 503 before doing anything (an injected error, or an
    /// outage).
    Fail,
    /// Apply the effect, then never reply.
    LoseReply,
}

/// The state shared by a service's handlers.
#[derive(Debug)]
pub(crate) struct Common {
    pub(crate) pool: Pool,
    pub(crate) schema: SchemaName,
    faults: Mutex<Faults>,
    rng: Mutex<StdRng>,
    shutdown: watch::Receiver<bool>,
    failed: AtomicU64,
    down: AtomicU64,
    delayed: AtomicU64,
    lost: AtomicU64,
    pub(crate) duplicates: AtomicU64,
}

/// How many faults a service injected, each request counted under the
/// one fault that decided its fate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Injected {
    /// Requests failed with a 503 by [`Faults::error_rate`].
    pub errors: u64,
    /// Requests refused with a 503 during an outage ([`Faults::outage`]).
    pub outage_rejections: u64,
    /// Requests delayed by [`Faults::latency`].
    pub delayed: u64,
    /// Requests whose reply was lost after the effect.
    pub lost_replies: u64,
    /// Repeated deliveries it recognised and applied no effect for (the
    /// email service's inbox).
    pub duplicates_absorbed: u64,
}

impl Common {
    /// Rolls the dice for one request, after the configured latency.
    pub(crate) async fn fate(&self) -> Fate {
        let faults = self
            .faults
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if !faults.latency.is_zero() {
            self.delayed.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(faults.latency).await;
        }
        if faults.outage {
            self.down.fetch_add(1, Ordering::Relaxed);
            return Fate::Fail;
        }
        let fate = {
            let roll: f64 = self.rng.lock().unwrap_or_else(|e| e.into_inner()).random();
            if roll < faults.error_rate {
                Fate::Fail
            } else if roll < faults.error_rate + faults.lose_reply_rate {
                Fate::LoseReply
            } else {
                Fate::Serve
            }
        };
        match fate {
            Fate::Fail => self.failed.fetch_add(1, Ordering::Relaxed),
            Fate::LoseReply => self.lost.fetch_add(1, Ordering::Relaxed),
            Fate::Serve => 0,
        };
        fate
    }

    /// Replies, or (for a lost reply) holds the request until the service
    /// stops, so the client times out after the effect was committed.
    pub(crate) async fn reply(&self, fate: Fate, response: Response) -> Response {
        if fate == Fate::LoseReply {
            let mut shutdown = self.shutdown.clone();
            let _ = shutdown.wait_for(|stopped| *stopped).await;
            return StatusCode::SERVICE_UNAVAILABLE.into_response();
        }
        response
    }

    /// The table `name` in this service's schema, quoted.
    pub(crate) fn table(&self, name: &str) -> String {
        format!("{}.{name}", self.schema.quoted())
    }
}

/// A running fake service.
#[derive(Debug, Clone)]
pub struct Service {
    addr: SocketAddr,
    common: Arc<Common>,
    stop: Arc<watch::Sender<bool>>,
}

impl Service {
    /// Where it listens.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its base URL.
    #[must_use]
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Changes how it misbehaves from now on.
    pub fn set_faults(&self, faults: Faults) {
        *self.common.faults.lock().unwrap_or_else(|e| e.into_inner()) = faults;
    }

    /// The faults injected so far.
    #[must_use]
    pub fn injected(&self) -> Injected {
        Injected {
            errors: self.common.failed.load(Ordering::Relaxed),
            outage_rejections: self.common.down.load(Ordering::Relaxed),
            delayed: self.common.delayed.load(Ordering::Relaxed),
            lost_replies: self.common.lost.load(Ordering::Relaxed),
            duplicates_absorbed: self.common.duplicates.load(Ordering::Relaxed),
        }
    }

    /// Stops serving (requests held for a lost reply are released).
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

/// Serves `router` on 127.0.0.1 on a free port.
pub(crate) async fn serve(
    pool: Pool,
    schema: SchemaName,
    seed: u64,
    router: impl FnOnce(Arc<Common>) -> axum::Router,
) -> std::io::Result<Service> {
    let (stop, shutdown) = watch::channel(false);
    let common = Arc::new(Common {
        pool,
        schema,
        faults: Mutex::new(Faults::default()),
        rng: Mutex::new(StdRng::seed_from_u64(seed)),
        shutdown: shutdown.clone(),
        failed: AtomicU64::new(0),
        down: AtomicU64::new(0),
        delayed: AtomicU64::new(0),
        lost: AtomicU64::new(0),
        duplicates: AtomicU64::new(0),
    });
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
    let addr = listener.local_addr()?;
    let app = router(common.clone());
    let mut until = shutdown;
    tokio::spawn(async move {
        let stopped = async move {
            let _ = until.wait_for(|stopped| *stopped).await;
        };
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(stopped)
            .await
        {
            tracing::error!(error = %e, "fake service stopped");
        }
    });
    Ok(Service {
        addr,
        common,
        stop: Arc::new(stop),
    })
}

/// An error inside a fake service: answered with a 500.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ServiceError {
    #[error("database error")]
    Db(#[from] saga_postgres::tokio_postgres::Error),
    #[error("no database connection")]
    Pool(#[from] saga_postgres::deadpool_postgres::PoolError),
    #[error("inbox error")]
    Inbox(#[from] saga_postgres::PgError),
    #[error("bad request: {0}")]
    BadRequest(&'static str),
}

impl IntoResponse for ServiceError {
    fn into_response(self) -> Response {
        let status = match self {
            ServiceError::BadRequest(_) => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        tracing::warn!(error = %self, "fake service request failed");
        (status, self.to_string()).into_response()
    }
}

/// The `Idempotency-Key` header, as a UUID.
pub(crate) fn idempotency_key(headers: &axum::http::HeaderMap) -> Result<uuid::Uuid, ServiceError> {
    headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| uuid::Uuid::parse_str(v).ok())
        .ok_or(ServiceError::BadRequest(
            "a UUID Idempotency-Key header is required",
        ))
}

/// The header a caller sends its lease token in (the fencing token of the
/// step attempt that makes the call; see
/// [`StepContext::lease_token`](saga_core::StepContext::lease_token)).
/// Logged, never checked: fencing is the engine's job.
pub const LEASE_HEADER: &str = "saga-lease";

/// The request log of a service's schema `s` (quoted).
pub(crate) fn requests_table(s: &str) -> String {
    format!(
        "-- Every request received: key, the caller's lease, when, and
         -- whether it was answered from the ledger (committed with it).
         CREATE TABLE IF NOT EXISTS {s}.requests (
             seq         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
             key         uuid NOT NULL,
             lease       uuid,
             received_at timestamptz NOT NULL DEFAULT clock_timestamp(),
             answered    text CHECK (answered IN ('applied', 'replayed'))
         );"
    )
}

/// Logs a request as received (committed at once, whatever follows) and
/// returns its number in the log.
pub(crate) async fn log_request(
    c: &Common,
    key: uuid::Uuid,
    headers: &axum::http::HeaderMap,
) -> Result<i64, ServiceError> {
    let lease = headers
        .get(LEASE_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| uuid::Uuid::parse_str(v).ok());
    let row = c
        .pool
        .get()
        .await?
        .query_one(
            &format!(
                "INSERT INTO {} (key, lease) VALUES ($1, $2) RETURNING seq",
                c.table("requests")
            ),
            &[&key, &lease],
        )
        .await?;
    Ok(row.get(0))
}

/// Marks logged request `seq` as answered from the ledger, in the
/// transaction that applies its effect or reads its stored reply.
pub(crate) async fn answered(
    tx: &Transaction<'_>,
    c: &Common,
    seq: i64,
    replayed: bool,
) -> Result<(), ServiceError> {
    tx.execute(
        &format!(
            "UPDATE {} SET answered = $2 WHERE seq = $1",
            c.table("requests")
        ),
        &[&seq, &if replayed { "replayed" } else { "applied" }],
    )
    .await?;
    Ok(())
}

/// Serializes requests for one key, until the transaction ends.
pub(crate) async fn lock(tx: &Transaction<'_>, key: uuid::Uuid) -> Result<(), ServiceError> {
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended($1::text, 0))",
        &[&key.to_string()],
    )
    .await?;
    Ok(())
}

/// The reply stored for `key`, if any.
pub(crate) async fn stored(
    tx: &Transaction<'_>,
    c: &Common,
    key: uuid::Uuid,
) -> Result<Option<Stored>, ServiceError> {
    let row = tx
        .query_opt(
            &format!(
                "SELECT status, body FROM {} WHERE key = $1",
                c.table("idempotency")
            ),
            &[&key],
        )
        .await?;
    Ok(row.map(|r| Stored {
        status: u16::try_from(r.get::<_, i32>(0)).unwrap_or(500),
        body: r.get(1),
    }))
}

/// Stores `reply` as the answer to `key`.
pub(crate) async fn store(
    tx: &Transaction<'_>,
    c: &Common,
    key: uuid::Uuid,
    reply: &Stored,
) -> Result<(), ServiceError> {
    tx.execute(
        &format!(
            "INSERT INTO {} (key, status, body) VALUES ($1, $2, $3)",
            c.table("idempotency")
        ),
        &[&key, &i32::from(reply.status), &reply.body],
    )
    .await?;
    Ok(())
}

/// A stored reply, replayed for a repeated idempotency key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Stored {
    pub(crate) status: u16,
    pub(crate) body: serde_json::Value,
}

impl IntoResponse for Stored {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, axum::Json(self.body)).into_response()
    }
}
