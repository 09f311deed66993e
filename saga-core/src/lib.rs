#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_auto_cfg))]

mod action;
mod client;
mod context;
mod definition;
mod diagram;
mod error;
mod executor;
mod ids;
mod layer;
pub mod machine;
mod memory;
pub mod metrics;
mod outbox;
mod retry;
mod shape;
mod store;
#[cfg(feature = "testing")]
pub mod testing;
mod time;

pub use action::{Action, ActionFn, BoxAction, BoxFuture, WithDeps, action_fn, with_deps};
pub use client::{DEFAULT_MAX_BYTES, Limits, SagaClient, count_started};
pub use context::StepContext;
pub use definition::{
    AfterPivotPhase, BeforePivot, BeforePivotPhase, DEFAULT_STEP_TIMEOUT, PivotOrAfter,
    SagaBuilder, SagaDefinition, Step, Undecided, WithCompensation, WithoutCompensation,
};
pub use error::{
    BoxError, DefinitionProblem, Error, InvalidName, InvalidRetryPolicy, StepError, StepErrorKind,
};
pub use executor::{
    AttemptTimedOut, Executor, ExecutorBuilder, ExecutorConfig, ExecutorStats, RunReport,
    StepPanicked,
};
pub use ids::{
    Direction, IdempotencyKey, LeaseToken, MAX_NAME_LEN, MAX_START_KEY_LEN, MessageId, SagaId,
    SagaKind, SagaName, StartKey, StepName, TransitionId, WorkerId,
};
pub use layer::{StepLayer, StepSide};
pub use machine::{Status, StepKind};
pub use memory::InMemorySagaStore;
pub use outbox::{MAX_TOPIC_LEN, Message, MessageError, OutboxMessage, Payload};
pub use retry::{GiveUpReason, Jitter, RetryDecision, RetryPolicy, RetryPolicyBuilder};
pub use shape::{SagaShape, SideShape, StepShape};
pub use store::{
    ClaimRequest, ClaimedSaga, HistoryEntry, Lease, NewSaga, Outcome, Record, SagaSnapshot,
    SagaStore, Started,
};
pub use time::{Clock, ManualClock, SystemClock, Timestamp};

/// The repository README's examples, compiled and run as doctests.
#[doc = include_str!("../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
