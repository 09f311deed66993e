#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_auto_cfg))]

mod action;
mod client;
mod context;
pub mod definition;
mod diagram;
mod error;
mod executor;
pub mod fingerprint;
mod ids;
mod layer;
pub mod machine;
mod memory;
pub mod metrics;
mod outbox;
mod panic;
mod retry;
mod shape;
pub mod storable;
pub mod store;
#[cfg(feature = "testing")]
pub mod testing;
mod time;

// The user's vocabulary. The store implementer's contract is in [`store`];
// the typestate markers of the definition builder are in [`definition`];
// the pure status machine is in [`machine`].

pub use action::{Action, ActionFn, BoxAction, BoxFuture, WithDeps, action_fn, with_deps};
pub use client::{DEFAULT_MAX_BYTES, Limits, SagaClient, SagaView, count_started};
pub use context::StepContext;
pub use definition::{DEFAULT_STEP_TIMEOUT, SagaBuilder, SagaDefinition, Step};
pub use error::{
    BoxError, BuildError, DefinitionProblem, Error, ErrorChain, InvalidName, InvalidRetryPolicy,
    StepError, StepErrorKind,
};
pub use executor::{
    AttemptTimedOut, Executor, ExecutorBuilder, ExecutorConfig, ExecutorStats, RunReport,
    StepPanicked,
};
pub use fingerprint::{ShapeDifference, ShapeFingerprint, first_difference};
pub use ids::{
    Direction, IdempotencyKey, LeaseToken, MAX_NAME_LEN, MAX_START_KEY_LEN, MessageId, SagaId,
    SagaKind, SagaName, StartKey, StepName, TransitionId, WorkerId,
};
pub use layer::{StepLayer, StepSide};
pub use machine::{Status, StepKind};
pub use memory::InMemorySagaStore;
pub use outbox::{
    MAX_DELIVERY_DELAY, MAX_TOPIC_LEN, Message, MessageError, OutboxMessage, Payload,
};
pub use panic::message as panic_message;
pub use retry::{GiveUpReason, Jitter, RetryDecision, RetryPolicy, RetryPolicyBuilder};
pub use shape::{SagaShape, SideShape, StepShape};
pub use storable::Unstorable;
pub use store::{HistoryEntry, MalformedSaga, Outcome, SagaSnapshot, Started};
pub use time::{Clock, ManualClock, SystemClock, Timestamp};

/// The repository README's examples, compiled and run as doctests.
#[doc = include_str!("../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
