//! The operator's view of the outbox: dead letters, redrive, purge, counts.

use std::time::{Duration, SystemTime};

use saga_core::{MessageId, OutboxMessage, SagaId, Timestamp};
use tokio_postgres::Row;
use uuid::Uuid;

use super::enqueue::Outbox;
use super::error::OutboxError;
use crate::db::rows::{col, count, count64, only, time, time_opt};
use crate::error::PgError;

/// A message that exhausted its publish budget (or failed permanently), kept
/// for an operator: inspect it, fix the cause, then
/// [`redrive`](Outbox::redrive) or [`purge`](Outbox::purge) it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeadLetter {
    /// The message as enqueued.
    pub message: OutboxMessage,
    /// When it was enqueued.
    pub created_at: Timestamp,
    /// Publish attempts made.
    pub attempts: u32,
    /// The last failure, as text.
    pub last_error: Option<String>,
    /// When it was dead-lettered.
    pub dead_at: Timestamp,
    /// The saga instance whose step emitted it, if any.
    pub saga_id: Option<SagaId>,
}

/// How many messages are where, for dashboards and alerts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct OutboxStats {
    /// Messages waiting to be published: due now, delayed, or waiting for
    /// a retry.
    pub pending: u64,
    /// Messages leased to a dispatcher that is publishing them.
    pub in_flight: u64,
    /// Dead letters.
    pub dead: u64,
    /// How far behind delivery is: how long the longest-waiting message
    /// that is due has been due (pending, in flight or waiting for a retry;
    /// not dead). A message is due from its enqueue, or from its
    /// [`deliver_after`](saga_core::Message::deliver_after) time, or from
    /// its last redrive: one waiting for its `deliver_after` time does not
    /// count until then. `None` when no message is due.
    pub oldest_pending_age: Option<Duration>,
}

/// Reads the columns common to claims and dead letters: `id, topic, key,
/// payload_json, payload_bytes, headers, available_at, created_at,
/// attempts, saga_id`.
pub(crate) fn read_message(
    row: &Row,
) -> Result<(OutboxMessage, Timestamp, u32, Option<SagaId>), PgError> {
    let message = crate::store::outbox_message(row)?;
    Ok((
        message,
        time(row, "created_at")?,
        count(row, "attempts")?,
        col::<Option<Uuid>>(row, "saga_id")?.map(SagaId::from_uuid),
    ))
}

impl Outbox {
    /// Up to `limit` dead letters, oldest dead first, after `after` (the
    /// last one of the previous page; `None` for the first page).
    pub async fn dead_letters(
        &self,
        limit: usize,
        after: Option<&DeadLetter>,
    ) -> Result<Vec<DeadLetter>, OutboxError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let cursor_at: Option<SystemTime> = after.map(|d| d.dead_at.to_system_time());
        let cursor_id: Option<Uuid> = after.map(|d| d.message.id.as_uuid());
        let rows = self
            .inner
            .db
            .query(
                &self.inner.sql.dead_letters,
                &[
                    ("after_at", &cursor_at),
                    ("after_id", &cursor_id),
                    ("limit", &limit),
                ],
            )
            .await?;
        rows.iter()
            .map(|row| {
                let (message, created_at, attempts, saga_id) = read_message(row)?;
                Ok(DeadLetter {
                    message,
                    created_at,
                    attempts,
                    last_error: col(row, "last_error")?,
                    dead_at: time(row, "dead_at")?,
                    saga_id,
                })
            })
            .collect()
    }

    /// Puts dead letter `id` back in line: due now, with a fresh budget (its
    /// attempts start from zero and the retry policy's `max_elapsed` counts
    /// from its next claim; its last error is kept until it is
    /// overwritten). Returns
    /// whether there was such a dead letter. With per-key ordering it keeps
    /// its place: it goes out before the later messages of its key that
    /// are still pending.
    pub async fn redrive(&self, id: MessageId) -> Result<bool, OutboxError> {
        let now = self.inner.clock.bind();
        let uuid = id.as_uuid();
        let rows = self
            .inner
            .db
            .query(
                &self.inner.sql.redrive_one,
                &[
                    ("id", &uuid),
                    ("now", &now),
                    ("channel", &self.inner.sql.channel),
                ],
            )
            .await?;
        Ok(count64(only(&rows, "n")?, "n")? == 1)
    }

    /// Redrives every dead letter (of `topic`, if given). Returns how many.
    pub async fn redrive_all(&self, topic: Option<&str>) -> Result<u64, OutboxError> {
        let now = self.inner.clock.bind();
        let rows = self
            .inner
            .db
            .query(
                &self.inner.sql.redrive_all,
                &[
                    ("topic", &topic),
                    ("now", &now),
                    ("channel", &self.inner.sql.channel),
                ],
            )
            .await?;
        Ok(count64(only(&rows, "n")?, "n")?)
    }

    /// Deletes dead letter `id` for good. Returns whether there was one.
    /// Messages that are not dead are never purged.
    pub async fn purge(&self, id: MessageId) -> Result<bool, OutboxError> {
        let uuid = id.as_uuid();
        let rows = self
            .inner
            .db
            .query(&self.inner.sql.purge_one, &[("id", &uuid)])
            .await?;
        Ok(count64(only(&rows, "n")?, "n")? == 1)
    }

    /// Deletes every dead letter (of `topic`, if given). Returns how many.
    pub async fn purge_all(&self, topic: Option<&str>) -> Result<u64, OutboxError> {
        let rows = self
            .inner
            .db
            .query(&self.inner.sql.purge_all, &[("topic", &topic)])
            .await?;
        Ok(count64(only(&rows, "n")?, "n")?)
    }

    /// Counts pending, in-flight and dead messages and measures the delivery
    /// lag (see [`OutboxStats::oldest_pending_age`]). One aggregate over the outbox table:
    /// cheap while the outbox is short, as it is when dispatch keeps up.
    pub async fn stats(&self) -> Result<OutboxStats, OutboxError> {
        let now = self.inner.clock.bind();
        let rows = self
            .inner
            .db
            .query(&self.inner.sql.stats, &[("now", &now)])
            .await?;
        let row = only(&rows, "stats")?;
        let at = time(row, "at")?;
        Ok(OutboxStats {
            pending: count64(row, "pending")?,
            in_flight: count64(row, "in_flight")?,
            dead: count64(row, "dead")?,
            oldest_pending_age: time_opt(row, "oldest")?.map(|t| at.saturating_duration_since(t)),
        })
    }

    /// [`stats`](Outbox::stats), also recorded as gauges (see
    /// [`crate::metrics`]) labelled with the schema.
    pub async fn record_stats(&self) -> Result<OutboxStats, OutboxError> {
        let stats = self.stats().await?;
        let schema = self.inner.schema.to_string();
        #[allow(clippy::cast_precision_loss)]
        {
            ::metrics::gauge!(crate::metrics::OUTBOX_PENDING, "schema" => schema.clone())
                .set(stats.pending as f64);
            ::metrics::gauge!(crate::metrics::OUTBOX_IN_FLIGHT, "schema" => schema.clone())
                .set(stats.in_flight as f64);
            ::metrics::gauge!(crate::metrics::OUTBOX_DEAD, "schema" => schema.clone())
                .set(stats.dead as f64);
        }
        ::metrics::gauge!(crate::metrics::OUTBOX_OLDEST_PENDING_AGE, "schema" => schema)
            .set(stats.oldest_pending_age.map_or(0.0, |d| d.as_secs_f64()));
        Ok(stats)
    }
}
