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
//! Rows are kept for a retention period ([`Inbox::with_retention`], default
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

use crate::error::PgError;
use crate::schema::SchemaName;

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

#[derive(Debug, Clone)]
struct Sql {
    claim: String,
    exists: String,
    prune: String,
}

struct Inner {
    pool: Pool,
    schema: SchemaName,
    clock: Arc<dyn Clock>,
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

impl Inbox {
    /// The inbox in `schema` (migrated by [`migrate`](crate::migrate())),
    /// with the system clock and the [default retention](DEFAULT_RETENTION).
    #[must_use]
    pub fn new(pool: Pool, schema: SchemaName) -> Self {
        let s = schema.quoted();
        let sql = Sql {
            claim: format!(
                "INSERT INTO {s}.inbox (consumer, message_id, processed_at)
                 VALUES ($1, $2, $3)
                 ON CONFLICT (consumer, message_id) DO NOTHING"
            ),
            exists: format!(
                "SELECT EXISTS (SELECT 1 FROM {s}.inbox
                 WHERE consumer = $1::text AND message_id = $2::uuid)"
            ),
            prune: format!(
                "DELETE FROM {s}.inbox
                 WHERE (consumer, message_id) IN (
                     SELECT consumer, message_id FROM {s}.inbox
                     WHERE processed_at < $1::timestamptz
                     ORDER BY processed_at
                     LIMIT $2::int8)"
            ),
        };
        Inbox {
            inner: Arc::new(Inner {
                pool,
                schema,
                clock: Arc::new(SystemClock),
                retention: DEFAULT_RETENTION,
                sql,
            }),
        }
    }

    fn with_inner(self, f: impl FnOnce(&mut Inner)) -> Self {
        let mut inner = Arc::try_unwrap(self.inner).unwrap_or_else(|shared| Inner {
            pool: shared.pool.clone(),
            schema: shared.schema.clone(),
            clock: shared.clock.clone(),
            retention: shared.retention,
            sql: shared.sql.clone(),
        });
        f(&mut inner);
        Inbox {
            inner: Arc::new(inner),
        }
    }

    /// Reads time from `clock` instead of the system clock (for tests).
    #[must_use]
    pub fn with_clock(self, clock: Arc<dyn Clock>) -> Self {
        self.with_inner(|i| i.clock = clock)
    }

    /// Keeps processed ids for `retention` before [`prune`](Inbox::prune)
    /// may delete them (default 7 days).
    #[must_use]
    pub fn with_retention(self, retention: Duration) -> Self {
        self.with_inner(|i| i.retention = retention)
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
        let now = self.inner.clock.now().to_system_time();
        let id = message_id.as_uuid();
        let name = consumer.as_str();
        let params: [(&(dyn ToSql + Sync), Type); 3] = [
            (&name, Type::TEXT),
            (&id, Type::UUID),
            (&now, Type::TIMESTAMPTZ),
        ];
        let inserted = tx.execute_typed(&self.inner.sql.claim, &params).await?;
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
        let client = self.inner.pool.get().await?;
        let stmt = client.prepare_cached(&self.inner.sql.exists).await?;
        let row = client
            .query_one(&stmt, &[&consumer.as_str(), &message_id.as_uuid()])
            .await?;
        Ok(row.get(0))
    }

    /// Deletes the rows processed longer ago than the retention, in
    /// batches of 10 000 (each its own short statement). Returns how many.
    pub async fn prune(&self) -> Result<u64, PgError> {
        let cutoff = (self.inner.clock.now() - self.inner.retention).to_system_time();
        let client = self.inner.pool.get().await?;
        let stmt = client.prepare_cached(&self.inner.sql.prune).await?;
        let mut total = 0;
        loop {
            let n = client.execute(&stmt, &[&cutoff, &PRUNE_BATCH]).await?;
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
