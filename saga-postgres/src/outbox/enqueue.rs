//! [`Outbox`]: writing messages in the caller's transaction.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use saga_core::{
    Clock, DEFAULT_MAX_BYTES, MAX_DELIVERY_DELAY, Message, MessageId, OutboxMessage, Payload,
    SystemClock, Timestamp,
};
use tokio_postgres::Transaction;
use tokio_postgres::types::{ToSql, Type};
use uuid::Uuid;

use super::error::OutboxError;
use super::sql::OutboxSql;
use crate::db::Db;
use crate::db::clock::DbClock;
use crate::db::rows::{col, only};
use crate::schema::SchemaName;
use crate::store::DEFAULT_OPERATION_DEADLINE;

pub(crate) struct OutboxInner {
    pub(crate) db: Db,
    pub(crate) schema: SchemaName,
    pub(crate) clock: DbClock,
    pub(crate) sql: OutboxSql,
    pub(crate) max_payload_bytes: usize,
}

/// Builds an [`Outbox`]: [`Outbox::builder`].
#[must_use]
pub struct OutboxBuilder {
    pool: Pool,
    schema: SchemaName,
    clock: Option<Arc<dyn Clock>>,
    local_clock: Arc<dyn Clock>,
    max_payload_bytes: usize,
    operation_deadline: Duration,
}

impl std::fmt::Debug for OutboxBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboxBuilder")
            .field("schema", &self.schema)
            .field("clock", &self.clock)
            .field("max_payload_bytes", &self.max_payload_bytes)
            .field("operation_deadline", &self.operation_deadline)
            .finish_non_exhaustive()
    }
}

impl OutboxBuilder {
    /// Drives time with `clock` instead of the server's (for tests): its
    /// time is bound into every statement (creation and availability
    /// times, claims, leases, backoff). Give the dispatcher and the saga
    /// store the same clock.
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = Some(clock);
        self
    }

    /// The process's own clock, read (corrected by the offset learned
    /// from the server) when no [`clock`](Self::clock) is injected.
    /// Default: the system clock. For tests of clock skew.
    pub fn local_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.local_clock = clock;
        self
    }

    /// Caps payloads at `limit` bytes (default 256 KiB); a larger one is
    /// refused with [`OutboxError::PayloadTooLarge`] and nothing is written.
    pub fn max_payload_bytes(mut self, limit: usize) -> Self {
        self.max_payload_bytes = limit;
        self
    }

    /// How long one operation of the dispatcher or the admin calls may
    /// take, retries included (default
    /// [`DEFAULT_OPERATION_DEADLINE`](crate::DEFAULT_OPERATION_DEADLINE)).
    /// Settling a batch is retried for up to the dispatcher's `lease_for`
    /// instead.
    pub fn operation_deadline(mut self, d: Duration) -> Self {
        self.operation_deadline = d;
        self
    }

    /// The outbox.
    pub fn build(self) -> Outbox {
        let sql = OutboxSql::new(&self.schema);
        let clock = DbClock::new(self.clock, self.local_clock);
        Outbox {
            inner: Arc::new(OutboxInner {
                db: Db::new(self.pool, self.operation_deadline),
                schema: self.schema,
                clock,
                sql,
                max_payload_bytes: self.max_payload_bytes,
            }),
        }
    }
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
    /// on the server's time, with payloads capped at [`DEFAULT_MAX_BYTES`]
    /// (256 KiB); [`builder`](Outbox::builder) for others.
    #[must_use]
    pub fn new(pool: Pool, schema: SchemaName) -> Self {
        Outbox::builder(pool, schema).build()
    }

    /// A builder for the outbox in `schema`.
    pub fn builder(pool: Pool, schema: SchemaName) -> OutboxBuilder {
        OutboxBuilder {
            pool,
            schema,
            clock: None,
            local_clock: Arc::new(SystemClock),
            max_payload_bytes: DEFAULT_MAX_BYTES,
            operation_deadline: DEFAULT_OPERATION_DEADLINE,
        }
    }

    /// The connection pool.
    #[must_use]
    pub fn pool(&self) -> &Pool {
        self.inner.db.pool()
    }

    /// The schema.
    #[must_use]
    pub fn schema(&self) -> &SchemaName {
        &self.inner.schema
    }

    /// The clock: the injected one, or the process's clock corrected by
    /// its offset to the server's.
    #[must_use]
    pub fn clock(&self) -> &Arc<dyn Clock> {
        self.inner.clock.clock()
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
    /// Nothing is written if any payload is over the cap or not storable
    /// JSON ([`OutboxError::Unstorable`]); the other errors are those of
    /// [`enqueue_with_ids_in_tx`](Outbox::enqueue_with_ids_in_tx) (fresh
    /// ids cannot conflict).
    pub async fn enqueue_all_in_tx(
        &self,
        tx: &Transaction<'_>,
        messages: impl IntoIterator<Item = Message>,
    ) -> Result<Vec<MessageId>, OutboxError> {
        let now = self.clock().now();
        let messages: Vec<OutboxMessage> = messages
            .into_iter()
            .map(|m| m.into_outbox(MessageId::new(), now))
            .collect();
        self.write_in_tx(tx, &messages, Some(now.to_system_time()))
            .await?;
        Ok(messages.iter().map(|m| m.id).collect())
    }

    /// Writes messages whose ids the caller chose (for example derived
    /// from a business key, or by [`MessageId::derive`]) inside `tx`, and
    /// returns how many were written.
    ///
    /// Idempotent on the id, and never silently dropping a message: an id
    /// already in the outbox with the **same** message (topic, key, headers
    /// and payload; the delivery time is not compared, since a retry
    /// recomputes it) is skipped and not counted; an id already there with
    /// a **different** message is refused with [`OutboxError::Conflict`],
    /// and then nothing of the call is written (the transaction stays
    /// usable). Against a concurrent transaction that enqueued the id
    /// first, this call waits for it to commit, then skips or refuses; a
    /// refusal found that late can leave the call's *other* messages
    /// written in this transaction, so roll the transaction back on this
    /// error, as on any error of this call (the business write beside it
    /// must not commit without its messages). Taking them back would need
    /// `DELETE` on the outbox, which the worker's role does not hold.
    ///
    /// Ids are compared with the messages still in the outbox: pending, in
    /// flight or dead-lettered. A delivered message's row is deleted, and
    /// its id forgotten: enqueued again, the same id is a new message,
    /// delivered again (consumers deduplicating on the id with the
    /// [`Inbox`](crate::inbox::Inbox) then drop it, whatever its payload).
    /// So an id must name one message for good: derive it from everything
    /// that makes the message what it is, never reuse it for new content.
    ///
    /// # Errors
    ///
    /// Nothing is written if any payload is over the cap
    /// ([`OutboxError::PayloadTooLarge`]), if two messages of the call share
    /// an id ([`OutboxError::DuplicateId`]), if one is due more than
    /// [`MAX_DELIVERY_DELAY`](saga_core::MAX_DELIVERY_DELAY) from now
    /// ([`OutboxError::DueTooLate`]), or on a conflict.
    pub async fn enqueue_with_ids_in_tx(
        &self,
        tx: &Transaction<'_>,
        messages: &[OutboxMessage],
    ) -> Result<u64, OutboxError> {
        self.write_in_tx(tx, messages, None).await
    }

    /// Writes `messages`; their times were computed from `basis`, if given
    /// (moved onto the server's timeline), or are absolute.
    async fn write_in_tx(
        &self,
        tx: &Transaction<'_>,
        messages: &[OutboxMessage],
        basis: Option<std::time::SystemTime>,
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
            if let Payload::Json(v) = &m.payload {
                saga_core::storable::check(v)
                    .map_err(|problem| OutboxError::Unstorable { id: m.id, problem })?;
            }
        }
        check_ids_and_times(messages, self.clock().now())?;
        let b = batch(messages);
        let now = self.inner.clock.bind();
        // Under an injected clock the times are on its timeline already.
        let basis = if now.is_some() { None } else { basis };
        let channel = self.inner.sql.channel.as_str();
        let stmt = &self.inner.sql.enqueue;
        let params = stmt.bind(&[
            ("ids", &b.ids),
            ("topics", &b.topics),
            ("keys", &b.keys),
            ("json", &b.json),
            ("bytes", &b.bytes),
            ("headers", &b.headers),
            ("available", &b.available),
            ("now", &now),
            ("basis", &basis),
            ("channel", &channel),
        ])?;
        // `query_typed`: parse, bind and execute in one round trip, on any
        // transaction (no statement cache needed).
        let typed: Vec<(&(dyn ToSql + Sync), Type)> =
            params.into_iter().zip(ENQUEUE_TYPES).collect();
        let rows = tx.query_typed(stmt.text(), &typed).await?;
        let row = only(&rows, "enqueue")?;
        let conflicts: Vec<Uuid> = col(row, "conflicts")?;
        if !conflicts.is_empty() {
            return Err(conflict(&conflicts));
        }
        let raced: Vec<Uuid> = col(row, "raced")?;
        if !raced.is_empty() {
            self.recheck(tx, messages, &raced).await?;
        }
        let inserted: i64 = col(row, "n")?;
        Ok(u64::try_from(inserted).unwrap_or(0))
    }

    /// The ids in `raced` were committed by a concurrent transaction while
    /// this call's insert waited: compares them with what it committed.
    /// A conflict found here is refused, but the call's other rows stay in
    /// the (caller's, uncommitted) transaction: see
    /// [`enqueue_with_ids_in_tx`](Outbox::enqueue_with_ids_in_tx).
    async fn recheck(
        &self,
        tx: &Transaction<'_>,
        messages: &[OutboxMessage],
        raced: &[Uuid],
    ) -> Result<(), OutboxError> {
        let raced: Vec<OutboxMessage> = messages
            .iter()
            .filter(|m| raced.contains(&m.id.as_uuid()))
            .cloned()
            .collect();
        let b = batch(&raced);
        let stmt = &self.inner.sql.enqueue_recheck;
        let params = stmt.bind(&[
            ("ids", &b.ids),
            ("topics", &b.topics),
            ("keys", &b.keys),
            ("json", &b.json),
            ("bytes", &b.bytes),
            ("headers", &b.headers),
        ])?;
        let typed: Vec<(&(dyn ToSql + Sync), Type)> = params
            .into_iter()
            .zip(ENQUEUE_TYPES.into_iter().take(6))
            .collect();
        let rows = tx.query_typed(stmt.text(), &typed).await?;
        if rows.is_empty() {
            // The same messages (or already delivered and deleted): skipped.
            return Ok(());
        }
        let conflicts = rows
            .iter()
            .map(|r| col(r, "id"))
            .collect::<Result<Vec<Uuid>, _>>()?;
        Err(conflict(&conflicts))
    }
}

fn conflict(ids: &[Uuid]) -> OutboxError {
    OutboxError::Conflict {
        ids: ids.iter().copied().map(MessageId::from_uuid).collect(),
    }
}

/// Refuses a call with two messages under one id, or with a message due
/// more than [`MAX_DELIVERY_DELAY`] after `now`.
fn check_ids_and_times(messages: &[OutboxMessage], now: Timestamp) -> Result<(), OutboxError> {
    let mut seen = HashSet::with_capacity(messages.len());
    for m in messages {
        if !seen.insert(m.id) {
            return Err(OutboxError::DuplicateId { id: m.id });
        }
        let delay = m.available_at.saturating_duration_since(now);
        if delay > MAX_DELIVERY_DELAY {
            return Err(OutboxError::DueTooLate {
                id: m.id,
                delay,
                max: MAX_DELIVERY_DELAY,
            });
        }
    }
    Ok(())
}

/// The types of the enqueue statement's parameters, in its order.
const ENQUEUE_TYPES: [Type; 10] = [
    Type::UUID_ARRAY,
    Type::TEXT_ARRAY,
    Type::TEXT_ARRAY,
    Type::JSONB_ARRAY,
    Type::BYTEA_ARRAY,
    Type::JSONB_ARRAY,
    Type::TIMESTAMPTZ_ARRAY,
    Type::TIMESTAMPTZ,
    Type::TIMESTAMPTZ,
    Type::TEXT,
];

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
