//! [`Outbox`]: writing messages in the caller's transaction.

use std::sync::Arc;

use deadpool_postgres::Pool;
use saga_core::{
    Clock, DEFAULT_MAX_BYTES, Message, MessageId, OutboxMessage, Payload, SystemClock,
};
use tokio_postgres::Transaction;
use tokio_postgres::types::{ToSql, Type};
use uuid::Uuid;

use super::error::OutboxError;
use super::sql::OutboxSql;
use crate::schema::SchemaName;

pub(crate) struct OutboxInner {
    pub(crate) pool: Pool,
    pub(crate) schema: SchemaName,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) sql: OutboxSql,
    pub(crate) max_payload_bytes: usize,
}

/// The transactional outbox of one schema: enqueue messages in your own
/// transaction, and inspect, redrive or purge dead letters.
///
/// Cheap to clone. Messages are published by a
/// [`Dispatcher`](super::Dispatcher) built on the same `Outbox`.
///
/// ```no_run
/// # async fn example(pool: saga_postgres::deadpool_postgres::Pool) -> Result<(), Box<dyn std::error::Error>> {
/// use saga_core::Message;
/// use saga_postgres::SchemaName;
/// use saga_postgres::outbox::Outbox;
///
/// let outbox = Outbox::new(pool.clone(), SchemaName::default());
/// let mut client = pool.get().await?;
/// let tx = client.transaction().await?;
/// tx.execute("UPDATE orders SET status = 'paid' WHERE id = $1", &[&17_i64]).await?;
/// outbox
///     .enqueue_in_tx(&tx, Message::json("order.paid", &serde_json::json!({"order": 17}))?.key("order-17")?)
///     .await?;
/// tx.commit().await?; // the message exists if and only if the update does
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Outbox {
    pub(crate) inner: Arc<OutboxInner>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("schema", &self.inner.schema)
            .field("max_payload_bytes", &self.inner.max_payload_bytes)
            .finish_non_exhaustive()
    }
}

/// The parameters of one enqueue statement.
struct Batch<'a> {
    ids: Vec<Uuid>,
    topics: Vec<&'a str>,
    keys: Vec<Option<&'a str>>,
    json: Vec<Option<&'a serde_json::Value>>,
    bytes: Vec<Option<&'a [u8]>>,
    headers: Vec<serde_json::Value>,
    available: Vec<std::time::SystemTime>,
}

impl Outbox {
    /// The outbox in `schema` (migrated by [`migrate`](crate::migrate())),
    /// reading time from the system clock, with payloads capped at
    /// [`DEFAULT_MAX_BYTES`] (256 KiB).
    #[must_use]
    pub fn new(pool: Pool, schema: SchemaName) -> Self {
        let sql = OutboxSql::new(&schema);
        Outbox {
            inner: Arc::new(OutboxInner {
                pool,
                schema,
                clock: Arc::new(SystemClock),
                sql,
                max_payload_bytes: DEFAULT_MAX_BYTES,
            }),
        }
    }

    fn with_inner(self, f: impl FnOnce(&mut OutboxInner)) -> Self {
        let mut inner = Arc::try_unwrap(self.inner).unwrap_or_else(|shared| OutboxInner {
            pool: shared.pool.clone(),
            schema: shared.schema.clone(),
            clock: shared.clock.clone(),
            sql: OutboxSql::new(&shared.schema),
            max_payload_bytes: shared.max_payload_bytes,
        });
        f(&mut inner);
        Outbox {
            inner: Arc::new(inner),
        }
    }

    /// Reads time from `clock` (creation and availability times, claims,
    /// backoff, leases) instead of the system clock. Give the dispatcher
    /// and the saga store the same clock.
    #[must_use]
    pub fn with_clock(self, clock: Arc<dyn Clock>) -> Self {
        self.with_inner(|i| i.clock = clock)
    }

    /// Caps payloads at `limit` bytes (default 256 KiB); a larger one is
    /// refused with [`OutboxError::PayloadTooLarge`] and nothing is written.
    #[must_use]
    pub fn with_max_payload_bytes(self, limit: usize) -> Self {
        self.with_inner(|i| i.max_payload_bytes = limit)
    }

    /// The connection pool.
    #[must_use]
    pub fn pool(&self) -> &Pool {
        &self.inner.pool
    }

    /// The schema.
    #[must_use]
    pub fn schema(&self) -> &SchemaName {
        &self.inner.schema
    }

    /// The clock.
    #[must_use]
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.inner.clock
    }

    /// The payload cap, in bytes.
    #[must_use]
    pub fn max_payload_bytes(&self) -> usize {
        self.inner.max_payload_bytes
    }

    /// Writes `message` to the outbox inside `tx`, the caller's own
    /// transaction, under a new id (a UUIDv7), and returns that id. The
    /// message becomes visible to dispatchers when `tx` commits, and
    /// vanishes if it rolls back. One statement, one round trip; it also
    /// notifies the dispatchers (PostgreSQL delivers one notification per
    /// transaction however many messages it enqueued).
    ///
    /// Works with a `tokio_postgres::Transaction` or a deadpool one (which
    /// dereferences to it).
    pub async fn enqueue_in_tx(
        &self,
        tx: &Transaction<'_>,
        message: Message,
    ) -> Result<MessageId, OutboxError> {
        let mut ids = self.enqueue_all_in_tx(tx, [message]).await?;
        Ok(ids.remove(0))
    }

    /// Writes `messages` to the outbox inside `tx`, in one statement, in
    /// this order (the order per-key ordering keeps), each under a new id.
    /// Nothing is written if any payload is over the cap.
    pub async fn enqueue_all_in_tx(
        &self,
        tx: &Transaction<'_>,
        messages: impl IntoIterator<Item = Message>,
    ) -> Result<Vec<MessageId>, OutboxError> {
        let now = self.inner.clock.now();
        let messages: Vec<OutboxMessage> = messages
            .into_iter()
            .map(|m| m.into_outbox(MessageId::new(), now))
            .collect();
        self.write_in_tx(tx, &messages).await?;
        Ok(messages.iter().map(|m| m.id).collect())
    }

    /// Writes messages whose ids the caller chose (for example derived
    /// from a business key, or by [`MessageId::derive`]) inside `tx`.
    /// Idempotent on the id: a message whose id is already in the outbox is
    /// skipped. Returns how many were written. Nothing is written if any
    /// payload is over the cap.
    pub async fn enqueue_with_ids_in_tx(
        &self,
        tx: &Transaction<'_>,
        messages: &[OutboxMessage],
    ) -> Result<u64, OutboxError> {
        self.write_in_tx(tx, messages).await
    }

    async fn write_in_tx(
        &self,
        tx: &Transaction<'_>,
        messages: &[OutboxMessage],
    ) -> Result<u64, OutboxError> {
        if messages.is_empty() {
            return Ok(0);
        }
        let limit = self.inner.max_payload_bytes;
        for m in messages {
            let size = m.payload.len();
            if size > limit {
                return Err(OutboxError::PayloadTooLarge {
                    id: m.id,
                    size,
                    limit,
                });
            }
        }
        let b = batch(messages);
        let created = self.inner.clock.now().to_system_time();
        let channel = self.inner.sql.channel.as_str();
        // `query_typed`: parse, bind and execute in one round trip, on any
        // transaction (no statement cache needed).
        let params: [(&(dyn ToSql + Sync), Type); 9] = [
            (&b.ids, Type::UUID_ARRAY),
            (&b.topics, Type::TEXT_ARRAY),
            (&b.keys, Type::TEXT_ARRAY),
            (&b.json, Type::JSONB_ARRAY),
            (&b.bytes, Type::BYTEA_ARRAY),
            (&b.headers, Type::JSONB_ARRAY),
            (&b.available, Type::TIMESTAMPTZ_ARRAY),
            (&created, Type::TIMESTAMPTZ),
            (&channel, Type::TEXT),
        ];
        let row = tx.query_typed_one(&self.inner.sql.enqueue, &params).await?;
        let inserted: i64 = row.get(0);
        Ok(u64::try_from(inserted).unwrap_or(0))
    }
}

fn batch(messages: &[OutboxMessage]) -> Batch<'_> {
    let n = messages.len();
    let mut b = Batch {
        ids: Vec::with_capacity(n),
        topics: Vec::with_capacity(n),
        keys: Vec::with_capacity(n),
        json: Vec::with_capacity(n),
        bytes: Vec::with_capacity(n),
        headers: Vec::with_capacity(n),
        available: Vec::with_capacity(n),
    };
    for m in messages {
        b.ids.push(m.id.as_uuid());
        b.topics.push(&m.topic);
        b.keys.push(m.key.as_deref());
        let (json, bytes) = match &m.payload {
            Payload::Json(v) => (Some(v), None),
            Payload::Bytes(bytes) => (None, Some(bytes.as_slice())),
        };
        b.json.push(json);
        b.bytes.push(bytes);
        b.headers.push(serde_json::Value::Object(
            m.headers
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                .collect(),
        ));
        b.available.push(m.available_at.to_system_time());
    }
    b
}
