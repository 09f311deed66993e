//! Every metric name of the workspace, in one place: the executor's and the
//! client's, and those of the `saga-postgres` store and outbox (which
//! re-exports its own under `saga_postgres::metrics` and
//! `saga_postgres::outbox::metrics`).
//!
//! Emitted through the [`metrics`] facade: install any recorder (Prometheus,
//! StatsD...) to collect them, and call [`describe`] once to register their
//! descriptions and units. Labels are bounded: saga and step names and
//! versions come from definitions, directions and outcomes from fixed sets,
//! schemas from configuration; no instance ids.

/// Counter: instances created by `start` (label `saga`).
pub const SAGAS_STARTED: &str = "saga_started_total";
/// Counter: instances that reached `Completed` (label `saga`).
pub const SAGAS_COMPLETED: &str = "saga_completed_total";
/// Counter: instances that reached `Compensated` (label `saga`).
pub const SAGAS_COMPENSATED: &str = "saga_compensated_total";
/// Counter: instances parked as `Stuck` (label `saga`). Alert on it.
pub const SAGAS_STUCK: &str = "saga_stuck_total";
/// Counter: step attempts by result (labels `saga`, `step`, `direction`,
/// `outcome`: `succeeded`, `retryable`, `permanent`, `timeout`, `snooze`,
/// `panicked`, `exhausted`).
pub const STEP_ATTEMPTS: &str = "saga_step_attempts_total";
/// Histogram: seconds per step attempt (labels `saga`, `step`, `direction`).
pub const STEP_DURATION: &str = "saga_step_duration_seconds";
/// Counter: writes refused because the worker's lease was lost (label `saga`).
pub const LEASES_LOST: &str = "saga_leases_lost_total";
/// Counter: store operations that failed (label `operation`).
pub const STORE_ERRORS: &str = "saga_store_errors_total";
/// Gauge: due instances whose saga name and version no worker here has
/// registered (labels `saga`, `version`).
pub const UNREGISTERED_DUE: &str = "saga_unregistered_due";
/// Gauge: due instances of a saga name and version registered here but
/// started under another definition shape, left for a worker whose
/// definition matches (labels `saga`, `version`, `fingerprint`: the one
/// they were started under).
pub const UNMATCHED_DUE: &str = "saga_unmatched_due";

// The PostgreSQL store (`saga-postgres`).

/// Counter: database operations retried after a lost connection, a restart,
/// a serialization failure or a deadlock (label `operation`).
pub const STORE_RETRIES: &str = "saga_postgres_retries_total";
/// Counter: transitions whose commit was ambiguous (the connection dropped
/// with the statement in flight); each is resolved by looking it up.
pub const AMBIGUOUS_COMMITS: &str = "saga_postgres_ambiguous_commits_total";

// The outbox (`saga-postgres`).

/// Counter: outbox messages published and deleted.
pub const OUTBOX_PUBLISHED: &str = "saga_outbox_published_total";
/// Counter: failed publishes rescheduled for a retry.
pub const OUTBOX_RETRIED: &str = "saga_outbox_retried_total";
/// Counter: outbox messages dead-lettered.
pub const OUTBOX_DEAD_LETTERED: &str = "saga_outbox_dead_lettered_total";
/// Counter: outbox messages put back without spending an attempt because
/// the broker was unavailable.
pub const OUTBOX_RELEASED: &str = "saga_outbox_released_total";
/// Counter: dispatch cycles that found the broker unavailable (nothing
/// published, the publisher said so) and backed off as a whole. Alert on
/// its rate: it counts up through a broker outage.
pub const OUTBOX_BROKER_UNAVAILABLE: &str = "saga_outbox_broker_unavailable_total";
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

/// Registers descriptions and units for every metric above with the
/// installed recorder.
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(SAGAS_STARTED, Unit::Count, "Saga instances created");
    describe_counter!(SAGAS_COMPLETED, Unit::Count, "Saga instances completed");
    describe_counter!(SAGAS_COMPENSATED, Unit::Count, "Saga instances compensated");
    describe_counter!(SAGAS_STUCK, Unit::Count, "Saga instances parked as stuck");
    describe_counter!(STEP_ATTEMPTS, Unit::Count, "Step attempts by outcome");
    describe_histogram!(STEP_DURATION, Unit::Seconds, "Duration of step attempts");
    describe_counter!(
        LEASES_LOST,
        Unit::Count,
        "Writes refused because the lease was lost"
    );
    describe_counter!(STORE_ERRORS, Unit::Count, "Failed store operations");
    describe_gauge!(
        UNREGISTERED_DUE,
        Unit::Count,
        "Due instances of saga kinds not registered on this worker"
    );
    describe_gauge!(
        UNMATCHED_DUE,
        Unit::Count,
        "Due instances started under another shape of a saga kind registered on this worker"
    );
    describe_counter!(
        STORE_RETRIES,
        Unit::Count,
        "Database operations retried after a transient failure"
    );
    describe_counter!(
        AMBIGUOUS_COMMITS,
        Unit::Count,
        "Transitions whose commit reply was lost, resolved by lookup"
    );
    describe_counter!(OUTBOX_PUBLISHED, Unit::Count, "Outbox messages published");
    describe_counter!(OUTBOX_RETRIED, Unit::Count, "Outbox publishes rescheduled");
    describe_counter!(
        OUTBOX_DEAD_LETTERED,
        Unit::Count,
        "Outbox messages dead-lettered"
    );
    describe_counter!(
        OUTBOX_RELEASED,
        Unit::Count,
        "Outbox messages put back, attempt not counted, the broker being unavailable"
    );
    describe_counter!(
        OUTBOX_BROKER_UNAVAILABLE,
        Unit::Count,
        "Outbox dispatch cycles that found the broker unavailable and backed off"
    );
    describe_counter!(
        OUTBOX_DISPATCH_ERRORS,
        Unit::Count,
        "Outbox dispatch cycles that failed"
    );
    describe_gauge!(OUTBOX_PENDING, Unit::Count, "Outbox messages waiting");
    describe_gauge!(
        OUTBOX_IN_FLIGHT,
        Unit::Count,
        "Outbox messages being published"
    );
    describe_gauge!(OUTBOX_DEAD, Unit::Count, "Outbox dead letters");
    describe_gauge!(
        OUTBOX_OLDEST_PENDING_AGE,
        Unit::Seconds,
        "Delivery lag of the longest-waiting due outbox message"
    );
    describe_gauge!(
        OUTBOX_LISTENER_CONNECTED,
        "1 while the outbox LISTEN connection is up"
    );
    describe_counter!(
        OUTBOX_LISTENER_CONNECTIONS,
        Unit::Count,
        "Outbox LISTEN connections established"
    );
    describe_counter!(
        OUTBOX_LISTENER_FAILURES,
        Unit::Count,
        "Outbox LISTEN connection attempts that failed, and LISTEN connections lost"
    );
}
