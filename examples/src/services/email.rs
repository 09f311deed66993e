//! The email service: the consumer of `order.confirmed` messages.
//!
//! The outbox dispatcher delivers each message at least once (a worker
//! may die between publishing and deleting it, a reply may be lost). The
//! service claims the message id in its inbox inside the same transaction
//! that records the email, so every message has exactly one effect.
//!
//! `POST /deliveries` takes a [`Delivery`]; the `sent` table is the
//! ledger of emails.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use saga_core::{MessageId, OutboxMessage, Payload};
use saga_postgres::SchemaName;
use saga_postgres::deadpool_postgres::Pool;
use saga_postgres::inbox::{ConsumerName, Inbox};
use saga_postgres::outbox::{Outgoing, PublishError, Publisher};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{Common, Fate, Service, ServiceError, serve};
use crate::model::{ORDER_CONFIRMED, OrderConfirmed};

/// The consumer name under which the email service deduplicates.
pub const CONSUMER: &str = "email-sender";

/// A message as delivered over HTTP.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Delivery {
    /// The message id: the deduplication key.
    pub id: MessageId,
    /// Its topic.
    pub topic: String,
    /// Its JSON payload.
    pub payload: serde_json::Value,
}

impl Delivery {
    /// A delivery of `payload` on `topic` with id `id`.
    #[must_use]
    pub fn new(id: MessageId, topic: &str, payload: serde_json::Value) -> Self {
        Delivery {
            id,
            topic: topic.to_owned(),
            payload,
        }
    }
}

/// Creates the service's tables (its `sent` ledger, and the inbox, which
/// comes with the `saga-postgres` schema) in `schema`.
pub async fn create_schema(pool: &Pool, schema: &SchemaName) -> Result<(), crate::Error> {
    let mut client = pool.get().await?;
    saga_postgres::migrate(&mut client, schema).await?;
    client
        .batch_execute(&format!(
            "-- Every email sent: the ground truth.
             CREATE TABLE IF NOT EXISTS {s}.sent (
                 seq        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                 message_id uuid NOT NULL,
                 order_id   text NOT NULL,
                 recipient  text NOT NULL,
                 at         timestamptz NOT NULL DEFAULT clock_timestamp()
             );
             {append_only}",
            s = schema.quoted(),
            append_only = crate::audit::append_only(schema, "sent"),
        ))
        .await?;
    Ok(())
}

struct State_ {
    common: Arc<Common>,
    inbox: Inbox,
    consumer: ConsumerName,
}

/// Starts the email service, with its tables in `schema`.
pub async fn start(pool: Pool, schema: SchemaName, seed: u64) -> Result<Service, crate::Error> {
    create_schema(&pool, &schema).await?;
    let inbox = Inbox::new(pool.clone(), schema.clone());
    let consumer = ConsumerName::new(CONSUMER).expect("a valid consumer name");
    Ok(serve(pool, schema, seed, move |common| {
        Router::new()
            .route("/deliveries", post(deliver))
            .with_state(Arc::new(State_ {
                common,
                inbox,
                consumer,
            }))
    })
    .await?)
}

async fn deliver(
    State(s): State<Arc<State_>>,
    Json(delivery): Json<Delivery>,
) -> Result<Response, ServiceError> {
    let c = &s.common;
    let fate = c.fate().await;
    if fate == Fate::Fail {
        return Ok((StatusCode::SERVICE_UNAVAILABLE, "smtp relay unavailable").into_response());
    }
    if delivery.topic != ORDER_CONFIRMED {
        return Err(ServiceError::BadRequest("unknown topic"));
    }
    let confirmed: OrderConfirmed = serde_json::from_value(delivery.payload)
        .map_err(|_| ServiceError::BadRequest("not an order.confirmed payload"))?;
    let mut client = c.pool.get().await?;
    let tx = client.transaction().await?;
    let first = s
        .inbox
        .process_once_in_tx(&tx, &s.consumer, delivery.id)
        .await?
        .is_first();
    if !first {
        c.duplicates
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    if first {
        tx.execute(
            &format!(
                "INSERT INTO {} (message_id, order_id, recipient) VALUES ($1, $2, $3)",
                c.table("sent")
            ),
            &[
                &delivery.id.as_uuid(),
                &confirmed.order_id,
                &confirmed.email,
            ],
        )
        .await?;
    }
    tx.commit().await?;
    let reply = (StatusCode::OK, Json(json!({ "sent": first }))).into_response();
    Ok(c.reply(fate, reply).await)
}

/// Publishes outbox messages to the email service over HTTP: the outbox
/// dispatcher's [`Publisher`].
#[derive(Clone)]
pub struct HttpPublisher {
    http: reqwest::Client,
    url: String,
    after_publish: Option<PublishHook>,
}

/// A hook run after a batch was delivered and before the dispatcher
/// deletes it: where the chaos harness kills a dispatcher.
pub type PublishHook = std::sync::Arc<dyn Fn() -> saga_core::BoxFuture<'static, ()> + Send + Sync>;

impl std::fmt::Debug for HttpPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpPublisher")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl HttpPublisher {
    /// Posts to the email service at `url` (its base URL), each call
    /// bounded by `timeout`.
    pub fn new(url: String, timeout: std::time::Duration) -> Result<Self, crate::Error> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .map_err(crate::Error::Http)?;
        Ok(HttpPublisher {
            http,
            url,
            after_publish: None,
        })
    }

    /// Runs `hook` after each batch with at least one delivered message,
    /// before the results go back to the dispatcher.
    #[must_use]
    pub fn with_after_publish(mut self, hook: PublishHook) -> Self {
        self.after_publish = Some(hook);
        self
    }

    async fn send(&self, message: &OutboxMessage) -> Result<(), PublishError> {
        let Payload::Json(payload) = &message.payload else {
            return Err(PublishError::permanent(
                "the email service takes JSON payloads",
            ));
        };
        let delivery = Delivery::new(message.id, &message.topic, payload.clone());
        let response = self
            .http
            .post(format!("{}/deliveries", self.url))
            .json(&delivery)
            .send()
            .await
            .map_err(PublishError::transient)?;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else if status.is_client_error() {
            Err(PublishError::permanent(EmailRefused(status.as_u16())))
        } else {
            Err(PublishError::transient(EmailRefused(status.as_u16())))
        }
    }
}

/// The email service refused a delivery.
#[derive(Debug, thiserror::Error)]
#[error("the email service answered {0}")]
pub struct EmailRefused(pub u16);

impl Publisher for HttpPublisher {
    async fn publish(&self, batch: &[Outgoing]) -> Vec<Result<(), PublishError>> {
        let mut results = Vec::with_capacity(batch.len());
        for outgoing in batch {
            results.push(self.send(&outgoing.message).await);
        }
        if let Some(hook) = &self.after_publish
            && results.iter().any(Result::is_ok)
        {
            hook().await;
        }
        results
    }
}
