//! The [`Publisher`] contract between the dispatcher and a broker.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;

use saga_core::{OutboxMessage, SagaId, Timestamp};

use crate::error::BoxError;

/// A message handed to a [`Publisher`]: the message and where it stands.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Outgoing {
    /// The message. Its [`id`](OutboxMessage::id) is stable across every
    /// attempt: pass it on (as `Nats-Msg-Id`, a Kafka key, an HTTP
    /// `Idempotency-Key`...) so that the receiving side can deduplicate.
    pub message: OutboxMessage,
    /// When it was enqueued.
    pub created_at: Timestamp,
    /// This publish attempt, from 1. Above 1, an earlier attempt failed or
    /// its outcome is unknown: the receiver may already have the message.
    pub attempt: u32,
    /// The saga instance whose step emitted it, if any.
    pub saga_id: Option<SagaId>,
}

impl Outgoing {
    /// A message on its first attempt (for testing publishers).
    #[must_use]
    pub fn new(message: OutboxMessage, created_at: Timestamp) -> Self {
        Outgoing {
            message,
            created_at,
            attempt: 1,
            saga_id: None,
        }
    }
}

/// Whether a failed publish may succeed if tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PublishErrorKind {
    /// Try again later, per the dispatcher's retry policy (a broker outage,
    /// a timeout, a handler that failed).
    Transient,
    /// Trying again cannot help (a message the broker refuses, a topic
    /// nobody handles): the message is dead-lettered at once, for an
    /// operator to inspect and redrive.
    Permanent,
    /// The broker, not the message, failed: it cannot be reached, the
    /// connection broke, it did not acknowledge in time, it is overloaded.
    /// The message is put back without spending an attempt of its budget,
    /// and when no message of the batch was published the dispatcher backs
    /// off as a whole (see [`DispatcherConfig::outage_backoff`]). Report it
    /// only for failures that say nothing about the message: a message
    /// that keeps failing this way is never dead-lettered.
    ///
    /// [`DispatcherConfig::outage_backoff`]: super::DispatcherConfig::outage_backoff
    Unavailable,
}

/// A message could not be published. Keeps its cause as its source; the
/// dispatcher writes the whole chain to the row's `last_error`.
#[derive(Debug)]
pub struct PublishError {
    kind: PublishErrorKind,
    source: BoxError,
}

impl PublishError {
    /// A failure worth retrying.
    pub fn transient(source: impl Into<BoxError>) -> Self {
        PublishError {
            kind: PublishErrorKind::Transient,
            source: source.into(),
        }
    }

    /// A failure that retrying cannot fix: dead-letter the message now.
    pub fn permanent(source: impl Into<BoxError>) -> Self {
        PublishError {
            kind: PublishErrorKind::Permanent,
            source: source.into(),
        }
    }

    /// The broker is unavailable (unreachable, disconnected, not
    /// acknowledging): not the message's fault, so not counted against its
    /// attempt budget ([`PublishErrorKind::Unavailable`]).
    pub fn unavailable(source: impl Into<BoxError>) -> Self {
        PublishError {
            kind: PublishErrorKind::Unavailable,
            source: source.into(),
        }
    }

    /// A failure of the given kind.
    pub fn from_kind(kind: PublishErrorKind, source: impl Into<BoxError>) -> Self {
        PublishError {
            kind,
            source: source.into(),
        }
    }

    /// Whether the broker, not the message, failed.
    #[must_use]
    pub fn is_unavailable(&self) -> bool {
        self.kind == PublishErrorKind::Unavailable
    }

    /// Which kind of failure.
    #[must_use]
    pub fn kind(&self) -> PublishErrorKind {
        self.kind
    }

    /// Whether retrying cannot help.
    #[must_use]
    pub fn is_permanent(&self) -> bool {
        self.kind == PublishErrorKind::Permanent
    }

    /// Turns a handler's error into a publish error: a `PublishError`
    /// (boxed) keeps its kind; anything else is transient.
    #[must_use]
    pub fn from_boxed(e: BoxError) -> Self {
        match e.downcast::<PublishError>() {
            Ok(p) => *p,
            Err(other) => PublishError::transient(other),
        }
    }
}

impl fmt::Display for PublishError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            PublishErrorKind::Transient => f.write_str("publish failed"),
            PublishErrorKind::Permanent => f.write_str("publish failed permanently"),
            PublishErrorKind::Unavailable => {
                f.write_str("publish failed: the broker is unavailable")
            }
        }
    }
}

impl StdError for PublishError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&*self.source)
    }
}

/// Delivers outbox messages to a broker or to handlers.
///
/// The dispatcher calls [`publish`](Publisher::publish) with no database
/// transaction open and no row locked; the messages are leased to it
/// meanwhile. Return `Ok(())` for a message only once the receiver has it
/// (a broker's acknowledgement, a handler's success): the row is then
/// deleted. A message may be handed over again after a crash or a timeout,
/// always with the same id.
///
/// With per-key ordering, a batch holds at most one message per key, so a
/// publisher may send a batch's messages concurrently.
pub trait Publisher: Send + Sync + 'static {
    /// Publishes `batch`, returning one result per message, in the same
    /// order. A missing result counts as a transient failure.
    fn publish(
        &self,
        batch: &[Outgoing],
    ) -> impl Future<Output = Vec<Result<(), PublishError>>> + Send;
}

impl<P: Publisher> Publisher for std::sync::Arc<P> {
    fn publish(
        &self,
        batch: &[Outgoing],
    ) -> impl Future<Output = Vec<Result<(), PublishError>>> + Send {
        (**self).publish(batch)
    }
}
