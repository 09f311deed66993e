//! The outbox's error type.

use saga_core::MessageId;
use tokio_postgres::error::SqlState;

use crate::error::PgError;

/// What can go wrong when enqueueing, dispatching or administering outbox
/// messages.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OutboxError {
    /// A message's payload is over the configured cap
    /// ([`OutboxBuilder::max_payload_bytes`](super::OutboxBuilder::max_payload_bytes)).
    /// Nothing was written.
    #[error("outbox message {id}: payload is {size} bytes, over the limit of {limit} bytes")]
    PayloadTooLarge {
        /// The message.
        id: MessageId,
        /// Its payload's size.
        size: usize,
        /// The configured cap.
        limit: usize,
    },

    /// A message's id is already in the outbox under a *different* message
    /// (another topic, key, headers or payload). The stored message is
    /// untouched. Found before writing, nothing of the call was written and
    /// the transaction is still usable; found against a concurrent
    /// transaction that committed the id while this call waited, the call's
    /// other messages may be written in this transaction: roll it back.
    /// Re-enqueueing the *same* message under its id is not an error (it
    /// is skipped). Ids are checked against the messages still in the
    /// outbox (pending, in flight or dead-lettered); see
    /// [`Outbox::enqueue_with_ids_in_tx`](super::Outbox::enqueue_with_ids_in_tx)
    /// for what holds once a message was delivered.
    #[error(
        "outbox message {} is already enqueued with a different topic, key, headers or payload \
         ({} conflicting id(s) in all)",
        .ids[0], .ids.len()
    )]
    Conflict {
        /// The conflicting ids, in the call's order (at least one).
        ids: Vec<MessageId>,
    },

    /// Two messages of one call have the same id. Nothing was written.
    #[error("outbox message id {id} appears more than once in one call; nothing was written")]
    DuplicateId {
        /// The repeated id.
        id: MessageId,
    },

    /// A message is due further in the future than
    /// [`MAX_DELIVERY_DELAY`](saga_core::MAX_DELIVERY_DELAY) from now (on
    /// the outbox's clock). Nothing was written.
    #[error("outbox message {id} is due {delay:?} from now, over the maximum of {max:?}")]
    DueTooLate {
        /// The message.
        id: MessageId,
        /// How far from now it is due.
        delay: std::time::Duration,
        /// The maximum.
        max: std::time::Duration,
    },

    /// A message's JSON payload is not storable JSON (a NUL character,
    /// which PostgreSQL's `jsonb` refuses; see [`saga_core::storable`]).
    /// Nothing was written.
    #[error("outbox message {id}: the payload cannot be stored")]
    Unstorable {
        /// The message.
        id: MessageId,
        /// What in the payload, and where.
        #[source]
        problem: saga_core::Unstorable,
    },

    /// The database failed (or could not be reached). The SQLSTATE, if the
    /// server sent one, is available from [`OutboxError::code`].
    #[error("outbox database operation failed")]
    Store(#[from] PgError),

    /// A configuration value makes no sense.
    #[error("invalid outbox configuration: {0}")]
    InvalidConfig(&'static str),
}

impl From<tokio_postgres::Error> for OutboxError {
    fn from(e: tokio_postgres::Error) -> Self {
        OutboxError::Store(PgError::Db(e))
    }
}

impl From<deadpool_postgres::PoolError> for OutboxError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        OutboxError::Store(PgError::Pool(e))
    }
}

impl OutboxError {
    /// The SQLSTATE the server sent, if any.
    #[must_use]
    pub fn code(&self) -> Option<&SqlState> {
        match self {
            OutboxError::Store(e) => e.code(),
            _ => None,
        }
    }

    /// Whether the operation may be retried as a whole (a lost connection, a
    /// restart, a serialization failure, a deadlock).
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        matches!(self, OutboxError::Store(e) if e.is_retryable())
    }
}
