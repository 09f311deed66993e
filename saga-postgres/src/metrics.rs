//! Metric names of this crate: the store's and the outbox's. Every metric
//! name of the workspace is owned, with its description, by
//! [`saga_core::metrics`]; these are re-exported from there.

pub use saga_core::metrics::{
    AMBIGUOUS_COMMITS, OUTBOX_BROKER_UNAVAILABLE, OUTBOX_DEAD, OUTBOX_DEAD_LETTERED,
    OUTBOX_DISPATCH_ERRORS, OUTBOX_IN_FLIGHT, OUTBOX_LISTENER_CONNECTED,
    OUTBOX_LISTENER_CONNECTIONS, OUTBOX_LISTENER_FAILURES, OUTBOX_OLDEST_PENDING_AGE,
    OUTBOX_PENDING, OUTBOX_PUBLISHED, OUTBOX_RELEASED, OUTBOX_RETRIED, STORE_RETRIES,
};
