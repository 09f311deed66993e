//! Identifiers: instances, names, keys, leases.
//!
//! Names are validated once, at the edge, so the rest of the engine (and
//! every store) can rely on them: bounded length, a safe character set, no
//! surprises in logs, metric labels or SQL.

use std::borrow::Borrow;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

use crate::error::InvalidName;

/// The longest saga or step name accepted.
pub const MAX_NAME_LEN: usize = 64;
/// The longest caller-supplied start key accepted, in bytes.
pub const MAX_START_KEY_LEN: usize = 255;

/// Namespace for the UUIDv5 values this crate derives (idempotency keys,
/// message ids). Changing it would change every derived key: never do.
const KEY_NAMESPACE: Uuid = Uuid::from_u128(0x6f0c_5a3e_2b1d_4c8e_9a7f_31d2_e4b5_c6a7);

macro_rules! uuid_id {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(Uuid);

        impl $name {
            /// Wraps an existing UUID.
            #[must_use]
            pub const fn from_uuid(id: Uuid) -> Self {
                $name(id)
            }

            /// The UUID inside.
            #[must_use]
            pub const fn as_uuid(&self) -> Uuid {
                self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({})"), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }

        impl From<Uuid> for $name {
            fn from(id: Uuid) -> Self {
                $name(id)
            }
        }

        impl From<$name> for Uuid {
            fn from(id: $name) -> Uuid {
                id.0
            }
        }
    };
}

uuid_id!(
    /// The id of one saga instance: a UUIDv7, so ids sort by creation time.
    SagaId
);
uuid_id!(
    /// A worker (one executor in one process), as written into leases.
    WorkerId
);
uuid_id!(
    /// A fencing token: a fresh value on every claim. Only the holder of the
    /// current token may write the instance.
    LeaseToken
);
uuid_id!(
    /// The id of one recorded transition. Written under a unique constraint
    /// with the transition, so a store can tell whether a commit whose reply
    /// was lost took effect.
    TransitionId
);
uuid_id!(
    /// The id of one outbox message; consumers deduplicate on it.
    MessageId
);
uuid_id!(
    /// The idempotency key of one step in one direction of one instance.
    ///
    /// It is derived, not random: the same for every attempt, on every
    /// worker, after any crash. Pass it to the downstream service (e.g. as
    /// an `Idempotency-Key` header) so that a repeated call has no second
    /// effect. See [`IdempotencyKey::derive`].
    IdempotencyKey
);

impl SagaId {
    /// A new, time-ordered id.
    #[must_use]
    pub fn new() -> Self {
        SagaId(Uuid::now_v7())
    }
}

impl Default for SagaId {
    fn default() -> Self {
        SagaId::new()
    }
}

impl WorkerId {
    /// A new worker id.
    #[must_use]
    pub fn new() -> Self {
        WorkerId(Uuid::now_v7())
    }
}

impl Default for WorkerId {
    fn default() -> Self {
        WorkerId::new()
    }
}

impl LeaseToken {
    /// A new, unguessable token.
    #[must_use]
    pub fn new() -> Self {
        LeaseToken(Uuid::now_v7())
    }
}

impl Default for LeaseToken {
    fn default() -> Self {
        LeaseToken::new()
    }
}

impl TransitionId {
    /// A new transition id.
    #[must_use]
    pub fn new() -> Self {
        TransitionId(Uuid::now_v7())
    }
}

impl Default for TransitionId {
    fn default() -> Self {
        TransitionId::new()
    }
}

impl MessageId {
    /// A new random message id, for messages enqueued outside a saga.
    #[must_use]
    pub fn new() -> Self {
        MessageId(Uuid::now_v7())
    }

    /// The id of the `index`-th message emitted by `step` in `direction` of
    /// instance `saga`: re-running the step after a crash yields the same
    /// ids, so the outbox stores each message once.
    #[must_use]
    pub fn derive(saga: SagaId, step: &StepName, direction: Direction, index: u32) -> Self {
        let name = format!(
            "message/{}/{}/{}/{index}",
            saga.0.as_hyphenated(),
            step.as_str(),
            direction.as_str()
        );
        MessageId(Uuid::new_v5(&KEY_NAMESPACE, name.as_bytes()))
    }
}

impl Default for MessageId {
    fn default() -> Self {
        MessageId::new()
    }
}

impl IdempotencyKey {
    /// The key for `step` in `direction` of instance `saga`: a UUIDv5 of
    /// those three values, so every attempt of the same step and direction
    /// carries the same key, whichever worker runs it.
    #[must_use]
    pub fn derive(saga: SagaId, step: &StepName, direction: Direction) -> Self {
        let name = format!(
            "step/{}/{}/{}",
            saga.0.as_hyphenated(),
            step.as_str(),
            direction.as_str()
        );
        IdempotencyKey(Uuid::new_v5(&KEY_NAMESPACE, name.as_bytes()))
    }
}

/// Which way a step runs: its forward action or its compensation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// The forward action.
    Forward,
    /// The compensation, undoing the forward action.
    Compensate,
}

impl Direction {
    /// `"forward"` or `"compensate"`, as stored and used in metric labels.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Direction::Forward => "forward",
            Direction::Compensate => "compensate",
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Direction {
    type Err = InvalidName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "forward" => Ok(Direction::Forward),
            "compensate" => Ok(Direction::Compensate),
            _ => Err(InvalidName::new(
                "direction",
                s,
                "expected `forward` or `compensate`",
            )),
        }
    }
}

fn check_name(what: &'static str, s: &str) -> Result<(), InvalidName> {
    if s.is_empty() {
        return Err(InvalidName::new(what, s, "must not be empty"));
    }
    if s.len() > MAX_NAME_LEN {
        return Err(InvalidName::new(what, s, "longer than 64 bytes"));
    }
    if !s.as_bytes()[0].is_ascii_alphabetic() {
        return Err(InvalidName::new(what, s, "must start with an ASCII letter"));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
    {
        return Err(InvalidName::new(
            what,
            s,
            format!("character {c:?} is not allowed (use ASCII letters, digits, `_`, `-`, `.`)"),
        ));
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$meta:meta])* $name:ident, $what:literal) => {
        $(#[$meta])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(Arc<str>);

        impl $name {
            /// Validates `s`: 1 to 64 bytes of ASCII letters, digits, `_`,
            /// `-` and `.`, starting with a letter.
            pub fn new(s: impl AsRef<str>) -> Result<Self, InvalidName> {
                let s = s.as_ref();
                check_name($what, s)?;
                Ok($name(Arc::from(s)))
            }

            /// The name.
            #[must_use]
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({:?})"), &*self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = InvalidName;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                $name::new(s)
            }
        }

        impl TryFrom<&str> for $name {
            type Error = InvalidName;
            fn try_from(s: &str) -> Result<Self, Self::Error> {
                $name::new(s)
            }
        }

        impl TryFrom<String> for $name {
            type Error = InvalidName;
            fn try_from(s: String) -> Result<Self, Self::Error> {
                $name::new(s)
            }
        }

        impl Serialize for $name {
            fn serialize<Ser: Serializer>(&self, s: Ser) -> Result<Ser::Ok, Ser::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                $name::new(&*s).map_err(serde::de::Error::custom)
            }
        }
    };
}

name_type!(
    /// The stable name of a saga definition, e.g. `checkout`.
    SagaName,
    "saga name"
);
name_type!(
    /// The stable name of a step within a saga, e.g. `charge_payment`.
    /// Steps are identified by name, never by position.
    StepName,
    "step name"
);

/// A saga definition's identity: its name and version.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SagaKind {
    /// The saga's name.
    pub name: SagaName,
    /// The definition's version.
    pub version: u32,
}

impl fmt::Display for SagaKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@v{}", self.name, self.version)
    }
}

/// The caller's idempotency key for starting an instance: starting twice
/// with the same key (and the same input) returns the first instance.
///
/// Typically an order id or a request id. 1 to 255 bytes, no control
/// characters.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StartKey(Arc<str>);

impl StartKey {
    /// Validates `s`.
    pub fn new(s: impl AsRef<str>) -> Result<Self, InvalidName> {
        let s = s.as_ref();
        if s.is_empty() {
            return Err(InvalidName::new("start key", s, "must not be empty"));
        }
        if s.chars().all(char::is_whitespace) {
            return Err(InvalidName::new(
                "start key",
                s,
                "must not be only whitespace",
            ));
        }
        if s.len() > MAX_START_KEY_LEN {
            return Err(InvalidName::new("start key", s, "longer than 255 bytes"));
        }
        if s.chars().any(char::is_control) {
            return Err(InvalidName::new(
                "start key",
                s,
                "control characters are not allowed",
            ));
        }
        Ok(StartKey(Arc::from(s)))
    }

    /// The key.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for StartKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StartKey({:?})", &*self.0)
    }
}

impl fmt::Display for StartKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for StartKey {
    type Err = InvalidName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        StartKey::new(s)
    }
}

impl TryFrom<&str> for StartKey {
    type Error = InvalidName;
    fn try_from(s: &str) -> Result<Self, Self::Error> {
        StartKey::new(s)
    }
}

impl TryFrom<String> for StartKey {
    type Error = InvalidName;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        StartKey::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        assert!(StepName::new("charge_payment").is_ok());
        assert!(StepName::new("v2.charge-payment").is_ok());
        assert!(StepName::new("").is_err());
        assert!(StepName::new("1step").is_err());
        assert!(StepName::new("drop table;").is_err());
        assert!(StepName::new("a".repeat(65)).is_err());
        assert!(SagaName::new("a".repeat(64)).is_ok());
        let err = SagaName::new("bad name").unwrap_err();
        assert!(err.to_string().contains("saga name"), "{err}");
    }

    #[test]
    fn names_reject_invalid_values_on_deserialize() {
        let ok: StepName = serde_json::from_str("\"charge\"").unwrap();
        assert_eq!(ok.as_str(), "charge");
        assert!(serde_json::from_str::<StepName>("\"no spaces\"").is_err());
    }

    #[test]
    fn start_keys_are_validated() {
        assert!(StartKey::new("order-17").is_ok());
        assert!(StartKey::new("").is_err());
        for blank in [" ", "   ", "\u{3000}"] {
            let err = StartKey::new(blank).unwrap_err();
            assert_eq!(err.what(), "start key");
            assert!(err.to_string().contains("only whitespace"), "{err}");
        }
        assert!(
            StartKey::new(" order-17 ").is_ok(),
            "spaces around a key are kept"
        );
        assert!(StartKey::new("a\nb").is_err());
        assert!(StartKey::new("k".repeat(256)).is_err());
    }

    #[test]
    fn idempotency_keys_depend_on_instance_step_and_direction_only() {
        let saga = SagaId::new();
        let step = StepName::new("charge").unwrap();
        let a = IdempotencyKey::derive(saga, &step, Direction::Forward);
        let b = IdempotencyKey::derive(saga, &step, Direction::Forward);
        assert_eq!(a, b);
        assert_ne!(
            a,
            IdempotencyKey::derive(saga, &step, Direction::Compensate)
        );
        assert_ne!(
            a,
            IdempotencyKey::derive(SagaId::new(), &step, Direction::Forward)
        );
        let other = StepName::new("refund").unwrap();
        assert_ne!(a, IdempotencyKey::derive(saga, &other, Direction::Forward));
    }

    #[test]
    fn message_ids_are_stable_and_distinct_per_index() {
        let saga = SagaId::new();
        let step = StepName::new("notify").unwrap();
        let m0 = MessageId::derive(saga, &step, Direction::Forward, 0);
        assert_eq!(m0, MessageId::derive(saga, &step, Direction::Forward, 0));
        assert_ne!(m0, MessageId::derive(saga, &step, Direction::Forward, 1));
        let key = IdempotencyKey::derive(saga, &step, Direction::Forward);
        assert_ne!(m0.as_uuid(), key.as_uuid());
    }
}
