//! Outbox messages as the engine sees them.
//!
//! A step emits messages through its [`StepContext`](crate::StepContext);
//! they are written by the store in the same write that records the step's
//! result, so they exist if and only if the step's success does. Their ids
//! are derived from (instance, step, direction, index), so a step that runs
//! again after a crash cannot enqueue a second copy.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use crate::error::InvalidName;
use crate::ids::MessageId;
use crate::time::Timestamp;

/// The longest topic, message key, header name or header value accepted.
pub const MAX_TOPIC_LEN: usize = 255;

/// The longest delay [`Message::deliver_after`] accepts: 366 days. A
/// longer one is almost surely a mistake (`Duration::MAX` used as "never",
/// seconds given as milliseconds), and a message that is never due would
/// sit in the outbox unseen; schedule such far-off work elsewhere.
pub const MAX_DELIVERY_DELAY: Duration = Duration::from_secs(366 * 24 * 60 * 60);

/// A message body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// A JSON document.
    Json(serde_json::Value),
    /// Opaque bytes.
    Bytes(Vec<u8>),
}

impl Payload {
    /// The payload's size in bytes as it will be stored and published.
    #[must_use]
    pub fn len(&self) -> usize {
        match self {
            // Serializing a `Value` cannot fail.
            Payload::Json(v) => serde_json::to_vec(v).map_or(0, |b| b.len()),
            Payload::Bytes(b) => b.len(),
        }
    }

    /// Whether the payload is empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A message to emit, before it has an id.
///
/// ```
/// use saga_core::Message;
///
/// let msg = Message::json("order.confirmed", &serde_json::json!({"order": 17}))?
///     .key("order-17")?
///     .header("content-type", "application/json")?;
/// assert_eq!(msg.topic(), "order.confirmed");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
#[must_use]
pub struct Message {
    topic: String,
    key: Option<String>,
    payload: Payload,
    headers: BTreeMap<String, String>,
    delay: Duration,
}

fn check_text(what: &'static str, s: &str) -> Result<(), InvalidName> {
    if s.is_empty() {
        return Err(InvalidName::new(what, s, "must not be empty"));
    }
    if s.len() > MAX_TOPIC_LEN {
        return Err(InvalidName::new(what, s, "longer than 255 bytes"));
    }
    if s.chars().any(char::is_control) {
        return Err(InvalidName::new(
            what,
            s,
            "control characters are not allowed",
        ));
    }
    Ok(())
}

impl Message {
    /// A message whose payload is `value` serialized as JSON.
    ///
    /// A value that is not storable JSON (a NUL character, a non-finite
    /// number, which serde_json would write as `null`) is refused with
    /// [`MessageError::Unstorable`].
    pub fn json<T: Serialize + ?Sized>(
        topic: impl Into<String>,
        value: &T,
    ) -> Result<Self, MessageError> {
        crate::storable::check(value)?;
        let value = serde_json::to_value(value).map_err(MessageError::Serialize)?;
        Message::new(topic, Payload::Json(value))
    }

    /// A message with an opaque byte payload.
    pub fn bytes(
        topic: impl Into<String>,
        bytes: impl Into<Vec<u8>>,
    ) -> Result<Self, MessageError> {
        Message::new(topic, Payload::Bytes(bytes.into()))
    }

    /// A message with the given payload. A JSON payload that is not
    /// storable (a NUL character in a string or key) is refused with
    /// [`MessageError::Unstorable`].
    pub fn new(topic: impl Into<String>, payload: Payload) -> Result<Self, MessageError> {
        let topic = topic.into();
        check_text("topic", &topic)?;
        if let Payload::Json(v) = &payload {
            crate::storable::check(v)?;
        }
        Ok(Message {
            topic,
            key: None,
            payload,
            headers: BTreeMap::new(),
            delay: Duration::ZERO,
        })
    }

    /// An ordering key: messages with the same key are delivered in order
    /// where the dispatcher is configured for it.
    pub fn key(mut self, key: impl Into<String>) -> Result<Self, MessageError> {
        let key = key.into();
        check_text("message key", &key)?;
        self.key = Some(key);
        Ok(self)
    }

    /// Adds a header.
    pub fn header(
        mut self,
        name: impl Into<String>,
        value: impl Into<String>,
    ) -> Result<Self, MessageError> {
        let (name, value) = (name.into(), value.into());
        check_text("header name", &name)?;
        if value.len() > MAX_TOPIC_LEN || value.chars().any(char::is_control) {
            return Err(InvalidName::new(
                "header value",
                &value,
                "at most 255 bytes, no control characters",
            )
            .into());
        }
        self.headers.insert(name, value);
        Ok(self)
    }

    /// Do not deliver before `delay` has passed from the enqueue (for a
    /// message a step emits: from the start of the step's attempt).
    ///
    /// # Errors
    ///
    /// [`MessageError::DelayTooLong`] if `delay` is over
    /// [`MAX_DELIVERY_DELAY`] (366 days).
    pub fn deliver_after(mut self, delay: Duration) -> Result<Self, MessageError> {
        if delay > MAX_DELIVERY_DELAY {
            return Err(MessageError::DelayTooLong {
                delay,
                max: MAX_DELIVERY_DELAY,
            });
        }
        self.delay = delay;
        Ok(self)
    }

    /// The topic.
    #[must_use]
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The payload.
    #[must_use]
    pub fn payload(&self) -> &Payload {
        &self.payload
    }

    /// Gives the message its id and its availability time (`now` plus the
    /// delay set by [`deliver_after`](Message::deliver_after)). Stores use it
    /// to enqueue a message outside a saga step.
    pub fn into_outbox(self, id: MessageId, now: Timestamp) -> OutboxMessage {
        OutboxMessage {
            id,
            topic: self.topic,
            key: self.key,
            payload: self.payload,
            headers: self.headers,
            available_at: now + self.delay,
        }
    }
}

/// A message with its id, ready to be written to the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxMessage {
    /// Unique id; consumers deduplicate on it.
    pub id: MessageId,
    /// Where it goes.
    pub topic: String,
    /// Optional ordering key.
    pub key: Option<String>,
    /// The body.
    pub payload: Payload,
    /// Headers.
    pub headers: BTreeMap<String, String>,
    /// Not delivered before this time.
    pub available_at: Timestamp,
}

/// A message that cannot be built or emitted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MessageError {
    /// A topic, key or header is invalid.
    #[error(transparent)]
    Invalid(#[from] InvalidName),
    /// The payload is not storable JSON (a NUL character, a non-finite
    /// number): no retry can fix it, so a step that returns this with `?`
    /// fails for good.
    #[error("the message payload cannot be stored")]
    Unstorable(#[from] crate::storable::Unstorable),
    /// The payload could not be serialized.
    #[error("could not serialize the message payload")]
    Serialize(#[source] serde_json::Error),
    /// The payload exceeds the configured cap: no retry can fix it, so a
    /// step that returns this with `?` fails for good.
    #[error("message payload is {size} bytes, over the limit of {limit} bytes")]
    TooLarge {
        /// The payload's size.
        size: usize,
        /// The configured cap.
        limit: usize,
    },
    /// A [`deliver_after`](Message::deliver_after) delay over
    /// [`MAX_DELIVERY_DELAY`].
    #[error("a delivery delay of {delay:?} is over the maximum of {max:?}")]
    DelayTooLong {
        /// The delay asked for.
        delay: Duration,
        /// The maximum, [`MAX_DELIVERY_DELAY`].
        max: Duration,
    },
}

impl MessageError {
    /// Whether the message's data itself was refused (not storable, over
    /// the cap): building or emitting it again can never succeed.
    #[must_use]
    pub fn refuses_data(&self) -> bool {
        matches!(
            self,
            MessageError::Unstorable(_) | MessageError::TooLarge { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_payload_that_is_not_storable_json_is_refused() {
        let err = Message::json("t", &serde_json::json!({"note": "a\u{0}b"})).unwrap_err();
        assert!(matches!(err, MessageError::Unstorable(_)), "{err:?}");
        assert!(err.refuses_data());
        let err = Message::json("t", &[1.0, f64::NAN]).unwrap_err();
        let MessageError::Unstorable(problem) = &err else {
            panic!("{err:?}");
        };
        assert_eq!(
            problem.to_string(),
            "a non-finite number (NaN) at $[1], which JSON cannot represent"
        );
        let err = Message::new("t", Payload::Json(serde_json::json!(["\u{0}"]))).unwrap_err();
        assert!(matches!(err, MessageError::Unstorable(_)), "{err:?}");
        // Bytes are bytes.
        assert!(Message::bytes("t", vec![0, 0]).is_ok());
    }

    #[test]
    fn messages_validate_their_fields() {
        assert!(Message::bytes("", b"x".to_vec()).is_err());
        assert!(Message::bytes("t\n", b"x".to_vec()).is_err());
        let m = Message::bytes("t", b"x".to_vec()).unwrap();
        assert!(m.clone().key("k".repeat(256)).is_err());
        assert!(m.clone().header("h", "v\r\n").is_err());
        assert!(m.header("h", "v").is_ok());
    }

    #[test]
    fn delivery_delays_are_capped() {
        let m = Message::bytes("t", b"x".to_vec()).unwrap();
        assert!(m.clone().deliver_after(MAX_DELIVERY_DELAY).is_ok());
        for too_long in [MAX_DELIVERY_DELAY + Duration::from_micros(1), Duration::MAX] {
            match m.clone().deliver_after(too_long) {
                Err(MessageError::DelayTooLong { delay, max }) => {
                    assert_eq!((delay, max), (too_long, MAX_DELIVERY_DELAY));
                }
                other => panic!("expected DelayTooLong, got {other:?}"),
            }
        }
    }

    #[test]
    fn payload_len_is_the_serialized_size() {
        assert_eq!(Payload::Json(serde_json::json!({"a": 1})).len(), 7);
        assert_eq!(Payload::Bytes(vec![0; 3]).len(), 3);
    }
}
