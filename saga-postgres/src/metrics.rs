//! Metric names of this crate, in one place: the store's and the outbox's
//! (see also `saga_core::metrics` for the executor's).

/// Counter: database operations retried after a lost connection, a restart,
/// a serialization failure or a deadlock (label `operation`).
pub const STORE_RETRIES: &str = "saga_postgres_retries_total";
/// Counter: transitions whose commit was ambiguous (the connection dropped
/// with the statement in flight); each is resolved by looking it up.
pub const AMBIGUOUS_COMMITS: &str = "saga_postgres_ambiguous_commits_total";

// The outbox and its dispatcher.

/// Counter: messages published and deleted.
pub const OUTBOX_PUBLISHED: &str = "saga_outbox_published_total";
/// Counter: failed publishes rescheduled for a retry.
pub const OUTBOX_RETRIED: &str = "saga_outbox_retried_total";
/// Counter: messages dead-lettered.
pub const OUTBOX_DEAD_LETTERED: &str = "saga_outbox_dead_lettered_total";
/// Counter: dispatch cycles that failed on a database error.
pub const OUTBOX_DISPATCH_ERRORS: &str = "saga_outbox_dispatch_errors_total";
/// Gauge (label `schema`): messages waiting to be published.
pub const OUTBOX_PENDING: &str = "saga_outbox_pending";
/// Gauge (label `schema`): messages being published (leased).
pub const OUTBOX_IN_FLIGHT: &str = "saga_outbox_in_flight";
/// Gauge (label `schema`): dead letters.
pub const OUTBOX_DEAD: &str = "saga_outbox_dead";
/// Gauge (label `schema`): the delivery lag, in seconds: how long the
/// longest-waiting undelivered message has been due (since its enqueue,
/// its `deliver_after` time, or its last redrive; dead letters and
/// messages not yet due do not count). 0 when none is due.
pub const OUTBOX_OLDEST_PENDING_AGE: &str = "saga_outbox_oldest_pending_age_seconds";
/// Gauge (label `schema`): 1 while the dispatcher's `LISTEN` connection
/// is up.
pub const OUTBOX_LISTENER_CONNECTED: &str = "saga_outbox_listener_connected";
/// Counter (label `schema`): times the `LISTEN` connection was
/// (re)established.
pub const OUTBOX_LISTENER_CONNECTIONS: &str = "saga_outbox_listener_connections_total";
/// Counter (label `schema`): failed `LISTEN` connection attempts and
/// lost `LISTEN` connections (each logged with its cause).
pub const OUTBOX_LISTENER_FAILURES: &str = "saga_outbox_listener_failures_total";
