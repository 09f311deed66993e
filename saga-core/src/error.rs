//! Errors: [`BuildError`] for what is refused when a definition, policy or
//! executor is built; [`Error`] for what fails at run time; [`StepError`],
//! which steps return; and [`ErrorChain`], which renders any error with its
//! causes.

use std::borrow::Cow;
use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

use crate::fingerprint::{ShapeDifference, ShapeFingerprint, first_difference};
use crate::ids::{Direction, SagaId, SagaKind, SagaName, StartKey, StepName};
use crate::machine::{InvalidTransition, Status};
use crate::store::StoreFailure;

/// A boxed error that keeps its concrete type for `downcast_ref`.
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// What is refused when a saga definition, a retry policy or an executor is
/// built: the program is wrong, and nothing ran. Returned by the `build()`
/// methods; what fails at run time is an [`Error`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// A name failed validation.
    #[error(transparent)]
    InvalidName(#[from] InvalidName),

    /// A retry policy failed validation.
    #[error(transparent)]
    InvalidRetryPolicy(#[from] InvalidRetryPolicy),

    /// A saga definition is malformed (no steps, a duplicate step name...).
    #[error("invalid definition of saga `{saga}`: {problem}")]
    InvalidDefinition {
        /// The saga being defined.
        saga: SagaName,
        /// What is wrong with it.
        problem: DefinitionProblem,
    },

    /// The same saga name and version was registered twice on one executor.
    #[error("saga {0} is already registered")]
    DuplicateRegistration(SagaKind),

    /// An executor configuration value makes no sense.
    #[error("invalid configuration: {0}")]
    InvalidConfig(&'static str),

    /// An executor was built with no saga registered: it would claim
    /// nothing, ever. Register at least one definition with
    /// [`ExecutorBuilder::register`](crate::ExecutorBuilder::register).
    #[error("no saga is registered on the executor: it would never claim anything")]
    NoSagasRegistered,
}

/// What can go wrong at run time in this crate, and in a store behind it.
///
/// A store's own error (with its SQLSTATE, say) travels in
/// [`Error::Store`]: ask it [`is_retryable`](Error::is_retryable) and
/// [`code`](Error::code) directly, or
/// [`downcast_ref`](crate::store::StoreFailure#method.downcast_ref) it to the
/// store's type.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A name or key failed validation.
    #[error(transparent)]
    InvalidName(#[from] InvalidName),

    /// A saga's state, input or an outbox payload exceeds the configured cap.
    /// Nothing was written.
    #[error("{what} is {size} bytes, over the limit of {limit} bytes")]
    TooLarge {
        /// What was too large: `"saga input"`, `"saga state"`, `"outbox payload"`.
        what: &'static str,
        /// Its serialized size.
        size: usize,
        /// The configured limit.
        limit: usize,
    },

    /// A saga's input or state, or an outbox payload, holds data that no
    /// store keeps as given: a NUL character, a non-finite number (see
    /// [`crate::storable`]). Nothing was written; as a step's result, a
    /// permanent failure.
    #[error("{what} cannot be stored")]
    Unstorable {
        /// What: `"saga input"`, `"saga state"`, `"outbox payload"`.
        what: &'static str,
        /// What in it, and where.
        #[source]
        problem: crate::storable::Unstorable,
    },

    /// A saga's state could not be serialized to JSON.
    #[error("could not serialize the state of saga `{saga}`")]
    SerializeState {
        /// The saga whose state failed.
        saga: SagaName,
        /// The serializer's error.
        #[source]
        source: serde_json::Error,
    },

    /// A saga's stored state does not deserialize as its definition's state
    /// type (the type changed without a version bump, or the row was edited
    /// by hand). The instance is parked with this as its reason.
    #[error("the stored state does not deserialize as saga {saga}'s state type")]
    DeserializeState {
        /// The saga (name and version) whose state type was expected.
        saga: SagaKind,
        /// The deserializer's error.
        #[source]
        source: serde_json::Error,
    },

    /// The start key was already used to start this saga with a different
    /// input. The existing instance is untouched.
    #[error(
        "start key `{key}` was already used for saga `{saga}` (instance {existing}) with a different input"
    )]
    StartKeyConflict {
        /// The saga.
        saga: SagaName,
        /// The reused key.
        key: StartKey,
        /// The instance started first with this key.
        existing: SagaId,
    },

    /// No instance with this id exists.
    #[error("saga instance {0} not found")]
    NotFound(SagaId),

    /// The caller's lease on the instance expired or was taken over by
    /// another worker: the write was refused and changed nothing.
    #[error("lease on saga instance {0} was lost; the write was refused")]
    LeaseLost(SagaId),

    /// The instance changed between read and write (an operator write
    /// raced with another); nothing was written.
    #[error("saga instance {0} changed concurrently; nothing was written")]
    Conflict(SagaId),

    /// The operation does not apply to the instance in its current status;
    /// the source says why.
    #[error("cannot {action} saga instance {id}: it is {status}")]
    InvalidStatus {
        /// The instance.
        id: SagaId,
        /// What was attempted.
        action: &'static str,
        /// The instance's status.
        status: Status,
        /// The status machine's refusal, with its reason.
        #[source]
        source: InvalidTransition,
    },

    /// The instance is at a step (or a step's compensation) that its
    /// registered definition does not have: the step was removed, or
    /// renamed without keeping its old name as an alias, under the same
    /// version. Nothing was written.
    #[error(
        "saga instance {id} is at step `{step}` ({direction}), which saga {saga} does not have"
    )]
    UnknownStep {
        /// The instance.
        id: SagaId,
        /// Its saga name and version.
        saga: SagaKind,
        /// The stored step name.
        step: StepName,
        /// The stored direction.
        direction: Direction,
    },

    /// The instance's stored row cannot be read back (a column written by
    /// hand, say): its raw values are in the [`MalformedSaga`](crate::store::MalformedSaga),
    /// and [`SagaClient::get`](crate::SagaClient::get) returns them rather than this error.
    #[error("saga instance {} cannot be read: {}", .saga.id, .saga.reason)]
    Malformed {
        /// The row's raw values and why they do not read.
        saga: Box<crate::store::MalformedSaga>,
        /// The store's error.
        #[source]
        source: BoxError,
    },

    /// The instance's saga name and version are not registered here.
    #[error("saga {0} is not registered here")]
    UnknownSaga(SagaKind),

    /// This saga name and version were first registered with another
    /// shape: its steps' names, order, aliases or roles changed without a
    /// new version. Returned when an executor starts
    /// ([`Executor::check`](crate::Executor::check)); the executor claims
    /// nothing. Give the changed definition a new version (and keep the old
    /// one registered until its instances finish), or deploy the stored
    /// shape again. Retry policies and timeouts may change freely: they are
    /// not part of the shape's fingerprint.
    #[error(
        "saga {kind} was first registered with another shape (stored fingerprint {stored}, \
         this one {registered}): {first_difference}; a change to step names, order, aliases \
         or roles needs a new version"
    )]
    DefinitionChanged {
        /// The saga name and version.
        kind: SagaKind,
        /// The fingerprint stored for it.
        stored: ShapeFingerprint,
        /// The fingerprint of the shape being registered.
        registered: ShapeFingerprint,
        /// Where the two shapes first differ.
        first_difference: Box<ShapeDifference>,
    },

    /// The store failed. Displays as the store's own error, whose causes
    /// follow as this error's sources.
    #[error(transparent)]
    Store(Box<dyn StoreFailure>),
}

impl Error {
    /// Wraps a store's error.
    pub fn store(failure: impl StoreFailure) -> Self {
        Error::Store(Box::new(failure))
    }

    /// Whether the same call may succeed if simply made again: a store
    /// failure its store calls retryable (a lost connection, a
    /// serialization failure), or a [`Conflict`](Error::Conflict) with a
    /// concurrent write.
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Store(failure) => failure.is_retryable(),
            Error::Conflict(_) => true,
            _ => false,
        }
    }

    /// Whether the data itself was refused, so that writing it again can
    /// never succeed: over a size cap ([`TooLarge`](Error::TooLarge)),
    /// [`Unstorable`](Error::Unstorable), or a store failure its store says
    /// [`refuses_data`](StoreFailure::refuses_data) (PostgreSQL's data
    /// exceptions). The executor fails a step whose result is refused so
    /// for good, with this error as the reason, instead of running it again.
    #[must_use]
    pub fn refuses_data(&self) -> bool {
        match self {
            Error::TooLarge { .. } | Error::Unstorable { .. } => true,
            Error::Store(failure) => failure.refuses_data(),
            _ => false,
        }
    }

    /// [`Error::DefinitionChanged`] for `registered`, whose fingerprint
    /// differs from `stored`, the fingerprint a store keeps with the
    /// shape it was first registered with (`stored_shape`, as the JSON of a
    /// [`SagaShape`](crate::SagaShape)). For store implementations.
    #[must_use]
    pub fn definition_changed(
        registered: &crate::SagaShape,
        stored: ShapeFingerprint,
        stored_shape: &serde_json::Value,
    ) -> Self {
        let first_difference =
            match serde_json::from_value::<crate::SagaShape>(stored_shape.clone()) {
                Ok(stored_shape) => {
                    first_difference(&stored_shape, registered).unwrap_or_else(|| {
                        ShapeDifference::NotShown {
                            reason: "the stored shape's fingerprint was computed differently"
                                .into(),
                        }
                    })
                }
                Err(e) => ShapeDifference::NotShown {
                    reason: format!("the stored shape does not parse: {e}"),
                },
            };
        Error::DefinitionChanged {
            kind: registered.kind.clone(),
            stored,
            registered: registered.fingerprint(),
            first_difference: Box::new(first_difference),
        }
    }

    /// The store's code for a store failure (PostgreSQL's SQLSTATE, say).
    #[must_use]
    pub fn code(&self) -> Option<&str> {
        match self {
            Error::Store(failure) => failure.code(),
            _ => None,
        }
    }
}

/// Displays an error followed by its chain of causes, `: `-separated: for
/// logs, for a program's last word, and for the reasons the executor keeps
/// in the store.
///
/// ```
/// use saga_core::ErrorChain;
///
/// #[derive(Debug, thiserror::Error)]
/// #[error("charge failed")]
/// struct ChargeFailed(#[source] std::io::Error);
///
/// let err = ChargeFailed(std::io::Error::other("connection reset"));
/// assert_eq!(ErrorChain(&err).to_string(), "charge failed: connection reset");
/// ```
#[derive(Clone, Copy)]
pub struct ErrorChain<'a>(pub &'a (dyn StdError + 'static));

impl fmt::Debug for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut next = self.0.source();
        while let Some(e) = next {
            write!(f, ": {e}")?;
            next = e.source();
        }
        Ok(())
    }
}

/// A name, key or identifier that failed validation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {value:?}: {reason}")]
pub struct InvalidName {
    what: &'static str,
    value: String,
    reason: Cow<'static, str>,
}

impl InvalidName {
    pub(crate) fn new(
        what: &'static str,
        value: &str,
        reason: impl Into<Cow<'static, str>>,
    ) -> Self {
        // Keep a hostile value from filling a log line.
        let value: String = value.chars().take(80).collect();
        InvalidName {
            what,
            value,
            reason: reason.into(),
        }
    }

    /// What kind of value was invalid (`"step name"`, `"start key"`...).
    #[must_use]
    pub fn what(&self) -> &'static str {
        self.what
    }
}

/// A retry policy that makes no sense (a multiplier below 1, a zero cap...).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid retry policy: {0}")]
pub struct InvalidRetryPolicy(pub(crate) &'static str);

/// What is wrong with a saga definition.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DefinitionProblem {
    /// The saga has no steps.
    #[error("it has no steps")]
    NoSteps,
    /// Two steps share a name.
    #[error("step name `{0}` is used twice")]
    DuplicateStep(StepName),
    /// A name failed validation.
    #[error(transparent)]
    InvalidName(InvalidName),
    /// The version is 0: versions start at 1 (0 is what an unset field or
    /// a default gives, so it is taken for a mistake).
    #[error("its version is 0; versions start at 1")]
    ZeroVersion,
    /// A step's timeout is zero.
    #[error("step `{0}` has a zero timeout")]
    ZeroTimeout(StepName),
}

/// How a failed attempt should be treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StepErrorKind {
    /// Try again, per the step's retry policy.
    Retryable,
    /// Never retry: compensate (before the pivot) or park (after it).
    Permanent,
    /// The attempt ran out of time; its outcome is unknown. Retried like
    /// [`StepErrorKind::Retryable`].
    Timeout,
    /// Not a failure: try again after the given delay, without spending
    /// any of the retry budget (see [`StepError::snooze`]).
    Snooze(Duration),
}

impl StepErrorKind {
    /// A short label: `retryable`, `permanent`, `timeout`, `snooze`.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            StepErrorKind::Retryable => "retryable",
            StepErrorKind::Permanent => "permanent",
            StepErrorKind::Timeout => "timeout",
            StepErrorKind::Snooze(_) => "snooze",
        }
    }
}

/// What a step returns when it does not succeed.
///
/// Any error converts into a *retryable* `StepError` with `?`, keeping the
/// original error as its source; except the engine's own refusals of data,
/// which no retry can fix (a [`MessageError`](crate::MessageError) for a
/// payload that is not storable JSON or over the cap, an [`Error`] whose
/// [`refuses_data`](Error::refuses_data) is true): those convert into a
/// *permanent* one. Giving up is explicit:
///
/// ```
/// use std::time::Duration;
/// use saga_core::{StepError, StepErrorKind};
///
/// #[derive(Debug, thiserror::Error)]
/// #[error("card declined")]
/// struct Declined;
///
/// fn charge(declined: bool) -> Result<(), StepError> {
///     if declined {
///         return Err(StepError::permanent(Declined));
///     }
///     let _amount: u32 = "42".parse()?; // a parse error would be retryable
///     Ok(())
/// }
///
/// let err = charge(true).unwrap_err();
/// assert_eq!(err.kind(), StepErrorKind::Permanent);
/// assert!(err.source().unwrap().downcast_ref::<Declined>().is_some());
///
/// let later = StepError::snooze(Duration::from_secs(30));
/// assert_eq!(later.kind(), StepErrorKind::Snooze(Duration::from_secs(30)));
/// ```
///
/// `StepError` deliberately does not implement [`std::error::Error`]: that
/// is what lets every error convert into it.
pub struct StepError {
    kind: StepErrorKind,
    source: Option<BoxError>,
}

impl StepError {
    /// A failure worth retrying.
    pub fn retryable(source: impl Into<BoxError>) -> Self {
        StepError {
            kind: StepErrorKind::Retryable,
            source: Some(source.into()),
        }
    }

    /// A failure that no retry can fix (card declined, out of stock).
    pub fn permanent(source: impl Into<BoxError>) -> Self {
        StepError {
            kind: StepErrorKind::Permanent,
            source: Some(source.into()),
        }
    }

    /// A call that timed out, so its outcome is unknown. Retried like a
    /// retryable error; the history records it as a timeout.
    pub fn timeout(source: impl Into<BoxError>) -> Self {
        StepError {
            kind: StepErrorKind::Timeout,
            source: Some(source.into()),
        }
    }

    /// Run this step again after `delay` (e.g. the downstream said the
    /// payment is pending: come back later).
    ///
    /// A snooze spends none of the step's retry budget: not an attempt, and
    /// the time spent snoozed does not count toward
    /// [`RetryPolicy::max_elapsed`](crate::RetryPolicy::max_elapsed). The
    /// policy therefore never gives up a step that keeps snoozing: the step
    /// decides when to stop waiting (and returns an error then).
    ///
    /// The step still counts as *started*: its outcome may be unknown (the
    /// pending payment may go through), so if the saga is cancelled while
    /// the step is snoozed, its compensation runs.
    #[must_use]
    pub fn snooze(delay: Duration) -> Self {
        StepError {
            kind: StepErrorKind::Snooze(delay),
            source: None,
        }
    }

    /// The kind of failure.
    #[must_use]
    pub fn kind(&self) -> StepErrorKind {
        self.kind
    }

    /// The underlying error, if any.
    #[must_use]
    pub fn source(&self) -> Option<&(dyn StdError + Send + Sync + 'static)> {
        self.source.as_deref()
    }

    /// Takes the underlying error out.
    #[must_use]
    pub fn into_source(self) -> Option<BoxError> {
        self.source
    }

    /// The error and its chain of causes, `: `-separated, for the history.
    #[must_use]
    pub fn describe(&self) -> String {
        let kind = match self.kind {
            StepErrorKind::Snooze(d) => format!("snoozed for {d:?}"),
            kind => kind.as_str().to_owned(),
        };
        match &self.source {
            Some(e) => format!("{kind}: {}", ErrorChain(e.as_ref())),
            None => kind,
        }
    }
}

impl<E> From<E> for StepError
where
    E: Into<BoxError>,
{
    fn from(e: E) -> Self {
        let source = e.into();
        let kind = if refuses_data(source.as_ref()) {
            StepErrorKind::Permanent
        } else {
            StepErrorKind::Retryable
        };
        StepError {
            kind,
            source: Some(source),
        }
    }
}

/// Whether `e` is one of the engine's own refusals of data, which no retry
/// can fix: a message or a value that is not storable JSON, or over a cap.
fn refuses_data(e: &(dyn StdError + 'static)) -> bool {
    if let Some(m) = e.downcast_ref::<crate::outbox::MessageError>() {
        return m.refuses_data();
    }
    if let Some(e) = e.downcast_ref::<Error>() {
        return e.refuses_data();
    }
    e.is::<crate::storable::Unstorable>()
}

impl fmt::Debug for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StepError")
            .field("kind", &self.kind)
            .field("source", &self.source)
            .finish()
    }
}

impl fmt::Display for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("gateway said 503")]
    struct Gateway503;

    #[derive(Debug, thiserror::Error)]
    #[error("charge failed")]
    struct ChargeFailed(#[source] Gateway503);

    fn fails() -> Result<(), StepError> {
        Err(ChargeFailed(Gateway503))?;
        Ok(())
    }

    #[test]
    fn question_mark_makes_a_retryable_error_that_keeps_its_source() {
        let err = fails().unwrap_err();
        assert_eq!(err.kind(), StepErrorKind::Retryable);
        let source = err.source().expect("source kept");
        assert!(source.downcast_ref::<ChargeFailed>().is_some());
        assert_eq!(err.describe(), "retryable: charge failed: gateway said 503");
    }

    #[test]
    fn permanent_is_explicit_and_keeps_its_source() {
        let err = StepError::permanent(Gateway503);
        assert_eq!(err.kind(), StepErrorKind::Permanent);
        assert!(err.into_source().unwrap().downcast::<Gateway503>().is_ok());
    }

    /// A store's error, as a backend would define it.
    #[derive(Debug, thiserror::Error)]
    #[error("serialization failure (SQLSTATE 40001)")]
    struct Backend {
        #[source]
        cause: std::io::Error,
    }

    impl StoreFailure for Backend {
        fn is_retryable(&self) -> bool {
            true
        }
        fn code(&self) -> Option<&str> {
            Some("40001")
        }
    }

    #[test]
    fn a_store_error_says_what_happened_and_answers_without_downcasting() {
        let err = Error::store(Backend {
            cause: std::io::Error::other("could not serialize access"),
        });
        assert_eq!(err.to_string(), "serialization failure (SQLSTATE 40001)");
        assert_eq!(
            ErrorChain(&err).to_string(),
            "serialization failure (SQLSTATE 40001): could not serialize access"
        );
        assert!(err.is_retryable());
        assert_eq!(err.code(), Some("40001"));
        let Error::Store(failure) = &err else {
            panic!("{err:?}");
        };
        assert!(failure.is::<Backend>());
        assert!(failure.downcast_ref::<Backend>().is_some());

        let not_found = Error::NotFound(crate::ids::SagaId::new());
        assert!(!not_found.is_retryable());
        assert_eq!(not_found.code(), None);
    }

    #[test]
    fn the_engines_refusals_of_data_convert_into_permanent_errors() {
        fn build() -> Result<(), StepError> {
            let _message = crate::Message::json("t", &f64::INFINITY)?;
            Ok(())
        }
        let err = build().unwrap_err();
        assert_eq!(err.kind(), StepErrorKind::Permanent);
        assert!(
            err.describe().contains("non-finite number (inf)"),
            "{}",
            err.describe()
        );
        let too_large: StepError = Error::TooLarge {
            what: "saga state",
            size: 2,
            limit: 1,
        }
        .into();
        assert_eq!(too_large.kind(), StepErrorKind::Permanent);
        // Anything else stays retryable.
        let other: StepError = Error::NotFound(crate::ids::SagaId::new()).into();
        assert_eq!(other.kind(), StepErrorKind::Retryable);
    }

    #[test]
    fn string_messages_convert_too() {
        let err: StepError = "out of stock".into();
        assert_eq!(err.describe(), "retryable: out of stock");
    }
}
