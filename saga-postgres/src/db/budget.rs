//! One operation's retry budget, and why one attempt failed.

use std::time::Duration;

use backon::BackoffBuilder;
use tokio::time::Instant;

use crate::error::PgError;

/// One operation's retry budget: a wall-clock deadline for all of it
/// (attempts, waits between them, lookups), and the backoff between
/// attempts.
pub(crate) struct Budget {
    pub(crate) deadline: Instant,
    /// The whole allowance, for [`PgError::DeadlineExceeded`].
    pub(crate) allowance: Duration,
    backoff: backon::ExponentialBackoff,
    /// The last error an attempt failed with, kept as the cause of
    /// [`PgError::DeadlineExceeded`].
    last: Option<PgError>,
}

impl Budget {
    pub(crate) fn new(allowance: Duration) -> Self {
        Budget {
            deadline: Instant::now() + allowance,
            allowance,
            backoff: backon::ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(20))
                .with_max_delay(Duration::from_secs(2))
                .with_jitter()
                .without_max_times()
                .build(),
            last: None,
        }
    }

    /// The next wait between attempts.
    pub(crate) fn next_delay(&mut self) -> Duration {
        self.backoff.next().unwrap_or(Duration::from_secs(2))
    }

    /// Keeps `e` as the cause of a later deadline error.
    pub(crate) fn remember(&mut self, e: PgError) {
        self.last = Some(e);
    }

    /// The deadline, for one attempt.
    pub(crate) fn deadline(&self) -> Deadline {
        Deadline {
            at: self.deadline,
            allowance: self.allowance,
        }
    }

    /// `e`, or the deadline error with the last error as its cause.
    pub(crate) fn with_last(&mut self, e: PgError) -> PgError {
        match e {
            PgError::DeadlineExceeded { after, last: None } => PgError::DeadlineExceeded {
                after,
                last: self.last.take().map(Box::new),
            },
            e => e,
        }
    }
}

/// When an attempt must have finished, and the operation's whole
/// allowance (for the error).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deadline {
    pub(crate) at: Instant,
    pub(crate) allowance: Duration,
}

impl Deadline {
    /// An attempt cut off at the deadline; [`Budget::with_last`] adds the
    /// last error as its cause.
    pub(crate) fn exceeded(self) -> PgError {
        PgError::DeadlineExceeded {
            after: self.allowance,
            last: None,
        }
    }
}

/// Why one attempt at a statement failed.
#[derive(Debug)]
pub(crate) struct Failed {
    pub(crate) error: PgError,
    /// Whether the statement itself had been sent: it may have taken
    /// effect. False when no connection could be had or the statement could
    /// not be prepared.
    pub(crate) in_flight: bool,
}

impl Failed {
    pub(crate) fn before(error: PgError) -> Self {
        Failed {
            error,
            in_flight: false,
        }
    }

    /// Whether the statement may or may not have taken effect.
    pub(crate) fn ambiguous(&self) -> bool {
        self.in_flight && self.error.is_connection_error()
    }
}

impl From<PgError> for Failed {
    fn from(e: PgError) -> Self {
        Failed::before(e)
    }
}
