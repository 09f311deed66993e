//! The inbox: exactly-once effects from at-least-once deliveries.
//!
//! The outbox delivers every message at least once, so a consumer may see
//! the same message twice (a dispatcher crashed after publishing, an
//! acknowledgement was lost, an operator redrove a dead letter). The inbox
//! makes the consumer's *effect* happen once: in the transaction that
//! applies the effect, the consumer first claims the message id with
//! [`Inbox::process_once_in_tx`]. The first delivery inserts a row keyed by
//! (consumer, message id) and goes on; a duplicate finds the row and skips
//! the effect. A concurrent duplicate waits on the first delivery's
//! uncommitted row: if that transaction commits, the duplicate is skipped;
//! if it rolls back (the handler failed), the duplicate applies the effect.
//!
//! ```no_run
//! # async fn example(pool: saga_postgres::deadpool_postgres::Pool, msg: saga_core::OutboxMessage) -> Result<(), Box<dyn std::error::Error>> {
//! use saga_postgres::SchemaName;
//! use saga_postgres::inbox::{ConsumerName, Delivery, Inbox};
//!
//! let inbox = Inbox::new(pool.clone(), SchemaName::default());
//! let consumer = ConsumerName::new("email-sender")?;
//! let mut client = pool.get().await?;
//! let tx = client.transaction().await?;
//! if inbox.process_once_in_tx(&tx, &consumer, msg.id).await? == Delivery::First {
//!     tx.execute("INSERT INTO emails_to_send (order_id) VALUES ($1)", &[&17_i64]).await?;
//! }
//! tx.commit().await?;
//! # Ok(())
//! # }
//! ```
//!
//! Rows are kept for a retention period ([`InboxBuilder::retention`], default
//! 7 days) and then [pruned](Inbox::prune). A duplicate that arrives after
//! its row was pruned is applied again: keep the retention longer than any
//! redelivery can be late (retries, dead-letter redrives, broker replays).
//!
//! Under `REPEATABLE READ` or `SERIALIZABLE`, a duplicate that races a
//! delivery which committed after the duplicate's snapshot fails with a
//! serialization error (SQLSTATE 40001) instead of waiting: retry its
//! transaction, and it will see [`Delivery::Duplicate`].

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use saga_core::{Clock, MessageId, SystemClock};
use tokio_postgres::Transaction;
use tokio_postgres::types::{ToSql, Type};

use crate::db::Db;
use crate::db::clock::{DbClock, NOW};
use crate::db::rows::{col, micros, only};
use crate::db::statement::Statement;
use crate::error::PgError;
use crate::schema::SchemaName;
use crate::store::DEFAULT_OPERATION_DEADLINE;

/// How long processed message ids are kept by default: 7 days.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
/// The longest consumer name accepted, in bytes.
pub const MAX_CONSUMER_LEN: usize = 255;
/// Rows deleted per statement by [`Inbox::prune`].
const PRUNE_BATCH: i64 = 10_000;

/// The name of a consumer (a handler, a service, a projection): each
/// consumer deduplicates on its own. 1 to 255 bytes, no control characters.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConsumerName(Arc<str>);

/// A consumer name that [`ConsumerName::new`] refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid consumer name {name:?}: {reason}")]
pub struct InvalidConsumerName {
    name: String,
    reason: &'static str,
}

impl ConsumerName {
    /// Validates `name`.
    pub fn new(name: impl AsRef<str>) -> Result<Self, InvalidConsumerName> {
        let name = name.as_ref();
        let bad = |reason| InvalidConsumerName {
            name: name.chars().take(80).collect(),
            reason,
        };
        if name.is_empty() {
            return Err(bad("must not be empty"));
        }
        if name.len() > MAX_CONSUMER_LEN {
            return Err(bad("longer than 255 bytes"));
        }
        if name.chars().any(char::is_control) {
            return Err(bad("control characters are not allowed"));
        }
        Ok(ConsumerName(Arc::from(name)))
    }

    /// The name.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ConsumerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ConsumerName({:?})", &*self.0)
    }
}

impl fmt::Display for ConsumerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Whether a delivery is the first of its message for this consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[must_use = "apply the effect only for `Delivery::First`"]
pub enum Delivery {
    /// The first delivery: apply the effect in the same transaction.
    First,
    /// Already processed (committed) by this consumer: skip the effect.
    Duplicate,
}

impl Delivery {
    /// Whether this is the first delivery.
    #[must_use]
    pub fn is_first(self) -> bool {
        self == Delivery::First
    }
}

#[derive(Debug)]
struct Sql {
    claim: Statement,
    exists: Statement,
    prune: Statement,
}

impl Sql {
    fn new(schema: &SchemaName) -> Self {
        let s = schema.quoted();
        Sql {
            claim: Statement::new(
                "claim",
                &format!(
                    "INSERT INTO {s}.inbox (consumer, message_id, processed_at)
                     VALUES ($consumer::text, $message_id::uuid, {NOW})
                     ON CONFLICT (consumer, message_id) DO NOTHING"
                ),
                &["consumer", "message_id", "now"],
            ),
            exists: Statement::new(
                "exists",
                &format!(
                    "SELECT EXISTS (SELECT 1 FROM {s}.inbox
                     WHERE consumer = $consumer::text AND message_id = $message_id::uuid) AS found"
                ),
                &["consumer", "message_id"],
            ),
            // The cutoff is the server's time less the retention.
            prune: Statement::new(
                "prune",
                &format!(
                    "WITH d AS (
                        DELETE FROM {s}.inbox
                        WHERE (consumer, message_id) IN (
                            SELECT consumer, message_id FROM {s}.inbox
                            WHERE processed_at
                                < {NOW} - $retention_us::int8 * interval '1 microsecond'
                            ORDER BY processed_at
                            LIMIT $batch::int8)
                        RETURNING 1
                    )
                    SELECT count(*) AS n FROM d"
                ),
                &["now", "retention_us", "batch"],
            ),
        }
    }
}

/// Every statement of the inbox, for the crate's statement tests.
pub(crate) fn statements(schema: &SchemaName) -> Vec<Statement> {
    let sql = Sql::new(schema);
    vec![sql.claim, sql.exists, sql.prune]
}

struct Inner {
    db: Db,
    schema: SchemaName,
    clock: DbClock,
    retention: Duration,
    sql: Sql,
}

/// The inbox of one schema. Cheap to clone.
#[derive(Clone)]
pub struct Inbox {
    inner: Arc<Inner>,
}

impl fmt::Debug for Inbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Inbox")
            .field("schema", &self.inner.schema)
            .field("retention", &self.inner.retention)
            .finish_non_exhaustive()
    }
}

/// Builds an [`Inbox`]: [`Inbox::builder`].
#[must_use]
pub struct InboxBuilder {
    pool: Pool,
    schema: SchemaName,
    clock: Option<Arc<dyn Clock>>,
    retention: Duration,
    operation_deadline: Duration,
}

impl fmt::Debug for InboxBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InboxBuilder")
            .field("schema", &self.schema)
            .field("clock", &self.clock)
            .field("retention", &self.retention)
            .field("operation_deadline", &self.operation_deadline)
            .finish_non_exhaustive()
    }
}

impl InboxBuilder {
    /// Drives time with `clock` instead of the server's (for tests): its
    /// time is bound as the processing time and the pruning cutoff's base.
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Keeps processed ids for `retention` before [`prune`](Inbox::prune)
    /// may delete them (default 7 days).
    pub fn retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// How long [`was_processed`](Inbox::was_processed) and each batch of
    /// [`prune`](Inbox::prune) may take, retries included (default
    /// [`DEFAULT_OPERATION_DEADLINE`]).
    pub fn operation_deadline(mut self, d: Duration) -> Self {
        self.operation_deadline = d;
        self
    }

    /// The inbox.
    pub fn build(self) -> Inbox {
        let sql = Sql::new(&self.schema);
        Inbox {
            inner: Arc::new(Inner {
                db: Db::new(self.pool, self.operation_deadline),
                schema: self.schema,
                clock: DbClock::new(self.clock, Arc::new(SystemClock)),
                retention: self.retention,
                sql,
            }),
        }
    }
}

impl Inbox {
    /// The inbox in `schema` (migrated by [`migrate`](crate::migrate())),
    /// on the server's time, with the [default retention](DEFAULT_RETENTION);
    /// [`builder`](Inbox::builder) for others.
    #[must_use]
    pub fn new(pool: Pool, schema: SchemaName) -> Self {
        Inbox::builder(pool, schema).build()
    }

    /// A builder for the inbox in `schema`.
    pub fn builder(pool: Pool, schema: SchemaName) -> InboxBuilder {
        InboxBuilder {
            pool,
            schema,
            clock: None,
            retention: DEFAULT_RETENTION,
            operation_deadline: DEFAULT_OPERATION_DEADLINE,
        }
    }

    /// The retention.
    #[must_use]
    pub fn retention(&self) -> Duration {
        self.inner.retention
    }

    /// Claims `message_id` for `consumer` inside `tx`, the transaction in
    /// which the consumer applies its effect, before applying it. Returns
    /// [`Delivery::First`] if the effect should be applied, or
    /// [`Delivery::Duplicate`] if this consumer already processed the
    /// message (in a committed transaction). If another transaction is
    /// processing the same message right now, this waits for it to end.
    /// One statement, one round trip.
    pub async fn process_once_in_tx(
        &self,
        tx: &Transaction<'_>,
        consumer: &ConsumerName,
        message_id: MessageId,
    ) -> Result<Delivery, PgError> {
        let now = self.inner.clock.bind();
        let id = message_id.as_uuid();
        let name = consumer.as_str();
        let stmt = &self.inner.sql.claim;
        let params = stmt.bind(&[("consumer", &name), ("message_id", &id), ("now", &now)])?;
        // One round trip: parse, bind and execute together.
        let typed: Vec<(&(dyn ToSql + Sync), Type)> = params
            .into_iter()
            .zip([Type::TEXT, Type::UUID, Type::TIMESTAMPTZ])
            .collect();
        let inserted = tx.execute_typed(stmt.text(), &typed).await?;
        Ok(if inserted == 1 {
            Delivery::First
        } else {
            Delivery::Duplicate
        })
    }

    /// Whether `consumer` has processed `message_id` (and the row is not
    /// pruned yet).
    pub async fn was_processed(
        &self,
        consumer: &ConsumerName,
        message_id: MessageId,
    ) -> Result<bool, PgError> {
        let (name, id) = (consumer.as_str(), message_id.as_uuid());
        let rows = self
            .inner
            .db
            .query(
                &self.inner.sql.exists,
                &[("consumer", &name), ("message_id", &id)],
            )
            .await?;
        col(only(&rows, "found")?, "found")
    }

    /// Deletes the rows processed longer ago than the retention, in
    /// batches of 10 000 (each its own short statement). Returns how many.
    pub async fn prune(&self) -> Result<u64, PgError> {
        let retention = micros(self.inner.retention);
        let mut total = 0;
        loop {
            let now = self.inner.clock.bind();
            let rows = self
                .inner
                .db
                .query(
                    &self.inner.sql.prune,
                    &[
                        ("now", &now),
                        ("retention_us", &retention),
                        ("batch", &PRUNE_BATCH),
                    ],
                )
                .await?;
            let n: i64 = col(only(&rows, "n")?, "n")?;
            let n = n.unsigned_abs();
            total += n;
            if n < PRUNE_BATCH.unsigned_abs() {
                return Ok(total);
            }
        }
    }

    /// Calls [`prune`](Inbox::prune) every `every` until `shutdown`
    /// completes, logging failures.
    pub async fn run_pruner(&self, every: Duration, shutdown: impl Future<Output = ()> + Send) {
        let mut tick = tokio::time::interval(every);
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            tokio::select! {
                _ = tick.tick() => match self.prune().await {
                    Ok(n) => tracing::debug!(schema = %self.inner.schema, pruned = n, "inbox pruned"),
                    Err(e) => tracing::warn!(schema = %self.inner.schema, error = %e, code = ?e.code(),
                        "could not prune the inbox"),
                },
                () = &mut shutdown => return,
            }
        }
    }
}
