//! Metric names of this crate, in one place (see also `saga_core::metrics`).

/// Counter: database operations retried after a lost connection, a restart,
/// a serialization failure or a deadlock (label `operation`).
pub const STORE_RETRIES: &str = "saga_postgres_retries_total";
/// Counter: transitions whose commit was ambiguous (the connection dropped
/// with the statement in flight); each is resolved by looking it up.
pub const AMBIGUOUS_COMMITS: &str = "saga_postgres_ambiguous_commits_total";
