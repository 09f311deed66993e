//! [`NatsPublisher`]: publishes to NATS JetStream (feature `nats`).

use std::str::FromStr;
use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage};
use async_nats::{HeaderMap, HeaderName, HeaderValue};
use saga_core::Payload;

use super::publisher::{Outgoing, PublishError, Publisher};

/// Re-exported so that users connect with the same version.
pub use async_nats;

/// The header carrying the message's key, when it has one.
pub const KEY_HEADER: &str = "Saga-Message-Key";
/// The header JetStream deduplicates on; set to the message id.
pub const MSG_ID_HEADER: &str = "Nats-Msg-Id";

/// A message that NATS cannot carry as it is (an invalid subject or
/// header). Permanent: the message is dead-lettered.
#[derive(Debug, thiserror::Error)]
#[error("cannot publish to NATS: {0}")]
pub struct Unpublishable(String);

/// A [`Publisher`] to NATS JetStream.
///
/// While its client is not connected, and for the errors that are the
/// server's (a broken connection, an acknowledgement that did not come in
/// time, too many acknowledgements pending), it reports the broker
/// [unavailable](PublishError::unavailable): the dispatcher then backs off
/// without spending the messages' attempts. A message over the server's
/// payload limit, an invalid subject or header is permanent (dead-lettered).
///
/// Each message goes to subject `<prefix><topic>` with header
/// [`Nats-Msg-Id`](MSG_ID_HEADER) set to its id, so that JetStream's
/// duplicate window drops a re-publish (after a dispatcher crash, a lost
/// acknowledgement or a timeout); its key, if any, travels in
/// [`KEY_HEADER`] and its headers as NATS headers. A message counts as
/// published only once JetStream has acknowledged it (a duplicate
/// acknowledgement counts too), so the outbox row is deleted only after
/// the stream has the message.
///
/// The batch's messages are sent back to back and their acknowledgements
/// awaited afterwards. A re-publish later than the stream's duplicate
/// window (two minutes by default) is stored twice: consumers deduplicate
/// on the id (see [`Inbox`](crate::inbox::Inbox)).
#[derive(Debug, Clone)]
pub struct NatsPublisher {
    js: jetstream::Context,
    prefix: String,
}

impl NatsPublisher {
    /// A publisher on `client`, waiting up to 10 s for each
    /// acknowledgement.
    #[must_use]
    pub fn new(client: async_nats::Client) -> Self {
        let js = jetstream::ContextBuilder::new()
            .timeout(Duration::from_secs(10))
            .backpressure_on_inflight(true)
            .build(client);
        NatsPublisher::from_context(js)
    }

    /// A publisher on a JetStream context you configured.
    #[must_use]
    pub fn from_context(js: jetstream::Context) -> Self {
        NatsPublisher {
            js,
            prefix: String::new(),
        }
    }

    /// Publishes topic `t` to subject `<prefix>t` (e.g. `orders.`).
    #[must_use]
    pub fn subject_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The JetStream context.
    #[must_use]
    pub fn context(&self) -> &jetstream::Context {
        &self.js
    }

    fn subject(&self, topic: &str) -> Result<String, Unpublishable> {
        let subject = format!("{}{topic}", self.prefix);
        let valid = !subject.is_empty()
            && !subject.contains(|c: char| c.is_whitespace() || c == '*' || c == '>')
            && subject.split('.').all(|token| !token.is_empty());
        if valid {
            Ok(subject)
        } else {
            Err(Unpublishable(format!("`{subject}` is not a valid subject")))
        }
    }

    fn message(&self, out: &Outgoing) -> Result<(String, PublishMessage), Unpublishable> {
        let m = &out.message;
        let subject = self.subject(&m.topic)?;
        let mut headers = HeaderMap::new();
        for (name, value) in &m.headers {
            let bad = || Unpublishable(format!("header `{name}` is not a valid NATS header"));
            let name = HeaderName::from_str(name).map_err(|_| bad())?;
            let value = HeaderValue::from_str(value).map_err(|_| bad())?;
            headers.insert(name, value);
        }
        if let Some(key) = &m.key {
            let value = HeaderValue::from_str(key)
                .map_err(|_| Unpublishable("the message key is not a valid header value".into()))?;
            headers.insert(KEY_HEADER, value);
        }
        headers.insert(MSG_ID_HEADER, m.id.to_string().as_str());
        let payload = match &m.payload {
            Payload::Json(v) => serde_json::to_vec(v)
                .map_err(|e| Unpublishable(format!("payload does not serialize: {e}")))?,
            Payload::Bytes(b) => b.clone(),
        };
        Ok((
            subject,
            PublishMessage::build()
                .payload(payload.into())
                .headers(headers),
        ))
    }
}

/// The broker is unavailable: the client is not connected.
#[derive(Debug, thiserror::Error)]
#[error("not connected to NATS (connection state: {0})")]
pub struct NotConnected(String);

/// A JetStream publish error as a [`PublishError`]: a message over the
/// server's payload limit is permanent; a broken connection, an
/// acknowledgement that did not come in time and a full in-flight window
/// say the broker is unavailable (not counted against the message's
/// budget); anything else is transient.
fn classify(e: jetstream::context::PublishError) -> PublishError {
    PublishError::from_kind(classify_kind(e.kind()), e)
}

fn classify_kind(kind: jetstream::context::PublishErrorKind) -> super::PublishErrorKind {
    use super::PublishErrorKind as Ours;
    use jetstream::context::PublishErrorKind as K;
    match kind {
        K::MaxPayloadExceeded => Ours::Permanent,
        K::BrokenPipe | K::TimedOut | K::MaxAckPending => Ours::Unavailable,
        _ => Ours::Transient,
    }
}

impl Publisher for NatsPublisher {
    async fn publish(&self, batch: &[Outgoing]) -> Vec<Result<(), PublishError>> {
        // Not connected (yet, or any more): the broker is unavailable, and
        // sending would only queue the messages in the client.
        let state = self.js.client().connection_state();
        if state != async_nats::connection::State::Connected {
            return batch
                .iter()
                .map(|_| Err(PublishError::unavailable(NotConnected(state.to_string()))))
                .collect();
        }
        // Send everything first, then wait for the acknowledgements.
        let mut pending = Vec::with_capacity(batch.len());
        for out in batch {
            let sent = match self.message(out) {
                Ok((subject, publish)) => self
                    .js
                    .send_publish(subject, publish)
                    .await
                    .map_err(classify),
                Err(e) => Err(PublishError::permanent(e)),
            };
            pending.push(sent);
        }
        let mut results = Vec::with_capacity(batch.len());
        for sent in pending {
            results.push(match sent {
                Ok(ack) => ack.await.map(|_ack| ()).map_err(classify),
                Err(e) => Err(e),
            });
        }
        results
    }
}

#[cfg(test)]
mod tests {
    use super::super::PublishErrorKind as Ours;
    use super::*;
    use jetstream::context::PublishErrorKind as K;

    #[test]
    fn connection_errors_say_the_broker_is_unavailable() {
        let table = [
            (K::BrokenPipe, Ours::Unavailable),
            (K::TimedOut, Ours::Unavailable),
            (K::MaxAckPending, Ours::Unavailable),
            (K::MaxPayloadExceeded, Ours::Permanent),
            (K::StreamNotFound, Ours::Transient),
            (K::WrongLastMessageId, Ours::Transient),
            (K::WrongLastSequence, Ours::Transient),
            (K::Other, Ours::Transient),
        ];
        for (theirs, ours) in table {
            assert_eq!(classify_kind(theirs), ours, "{theirs:?}");
        }
    }
}
