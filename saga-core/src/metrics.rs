//! Metric names, in one place.
//!
//! Emitted through the [`metrics`] facade: install any recorder (Prometheus,
//! StatsD...) to collect them. Labels are bounded: saga and step names and
//! versions come from definitions, directions and outcomes from fixed sets;
//! no instance ids.

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
}
