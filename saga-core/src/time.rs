//! Time as the engine sees it: a microsecond [`Timestamp`] and an injectable
//! [`Clock`].
//!
//! Every decision that depends on "now" (is this instance due, has this lease
//! expired, when is the next retry) reads a [`Clock`]. Production uses
//! [`SystemClock`]; tests use [`ManualClock`] and move time forward
//! explicitly instead of sleeping.

use std::fmt;
use std::ops::{Add, Sub};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// A point in time, in whole microseconds since the Unix epoch.
///
/// Microseconds are what PostgreSQL's `timestamptz` stores, so a value
/// round-trips through every store unchanged.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(i64);

impl Timestamp {
    /// The Unix epoch.
    pub const UNIX_EPOCH: Timestamp = Timestamp(0);

    /// A timestamp from microseconds since the Unix epoch.
    #[must_use]
    pub const fn from_micros(micros: i64) -> Self {
        Timestamp(micros)
    }

    /// Microseconds since the Unix epoch.
    #[must_use]
    pub const fn as_micros(self) -> i64 {
        self.0
    }

    /// Converts a [`SystemTime`], truncating to microseconds and saturating
    /// at the ends of the representable range.
    #[must_use]
    pub fn from_system_time(t: SystemTime) -> Self {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Timestamp(i64::try_from(d.as_micros()).unwrap_or(i64::MAX)),
            Err(e) => Timestamp(-i64::try_from(e.duration().as_micros()).unwrap_or(i64::MAX)),
        }
    }

    /// Converts to a [`SystemTime`].
    #[must_use]
    pub fn to_system_time(self) -> SystemTime {
        if self.0 >= 0 {
            UNIX_EPOCH + Duration::from_micros(self.0.unsigned_abs())
        } else {
            UNIX_EPOCH - Duration::from_micros(self.0.unsigned_abs())
        }
    }

    /// The duration from `earlier` to `self`, or zero if `earlier` is later.
    #[must_use]
    pub fn saturating_duration_since(self, earlier: Timestamp) -> Duration {
        Duration::from_micros(self.0.saturating_sub(earlier.0).max(0).unsigned_abs())
    }

    /// `self + d`, saturating at the far future.
    #[must_use]
    pub fn saturating_add(self, d: Duration) -> Timestamp {
        let micros = i64::try_from(d.as_micros()).unwrap_or(i64::MAX);
        Timestamp(self.0.saturating_add(micros))
    }

    /// `self - d`, saturating at the far past.
    #[must_use]
    pub fn saturating_sub(self, d: Duration) -> Timestamp {
        let micros = i64::try_from(d.as_micros()).unwrap_or(i64::MAX);
        Timestamp(self.0.saturating_sub(micros))
    }
}

impl Add<Duration> for Timestamp {
    type Output = Timestamp;
    fn add(self, d: Duration) -> Timestamp {
        self.saturating_add(d)
    }
}

impl Sub<Duration> for Timestamp {
    type Output = Timestamp;
    fn sub(self, d: Duration) -> Timestamp {
        self.saturating_sub(d)
    }
}

impl From<SystemTime> for Timestamp {
    fn from(t: SystemTime) -> Self {
        Timestamp::from_system_time(t)
    }
}

impl From<Timestamp> for SystemTime {
    fn from(t: Timestamp) -> Self {
        t.to_system_time()
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Timestamp({self})")
    }
}

impl fmt::Display for Timestamp {
    /// Seconds since the epoch with microseconds, e.g. `1700000000.000250s`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.0.div_euclid(1_000_000);
        let micros = self.0.rem_euclid(1_000_000);
        write!(f, "{secs}.{micros:06}s")
    }
}

/// A source of the current time.
///
/// One clock is shared by a store and the executors that drive it, so that
/// lease expiry and retry times are computed against the same "now".
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// The current time.
    fn now(&self) -> Timestamp;
}

/// The operating system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::from_system_time(SystemTime::now())
    }
}

/// A clock that only moves when told to: for tests.
///
/// ```
/// use std::time::Duration;
/// use saga_core::{Clock, ManualClock, Timestamp};
///
/// let clock = ManualClock::new(Timestamp::from_micros(0));
/// clock.advance(Duration::from_secs(30));
/// assert_eq!(clock.now(), Timestamp::from_micros(30_000_000));
/// ```
#[derive(Debug)]
pub struct ManualClock {
    now: Mutex<Timestamp>,
}

impl ManualClock {
    /// A clock stopped at `start`.
    #[must_use]
    pub fn new(start: Timestamp) -> Self {
        ManualClock {
            now: Mutex::new(start),
        }
    }

    /// A clock stopped at the current wall-clock time.
    #[must_use]
    pub fn starting_now() -> Self {
        ManualClock::new(SystemClock.now())
    }

    /// Moves the clock forward by `d`.
    pub fn advance(&self, d: Duration) {
        let mut now = self.now.lock().unwrap_or_else(|e| e.into_inner());
        *now = *now + d;
    }

    /// Sets the clock to `t` (which may be in the past).
    pub fn set(&self, t: Timestamp) {
        *self.now.lock().unwrap_or_else(|e| e.into_inner()) = t;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        *self.now.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_time_round_trips_at_microsecond_precision() {
        let t = UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789);
        let ts = Timestamp::from_system_time(t);
        assert_eq!(ts.as_micros(), 1_700_000_000_123_456);
        assert_eq!(
            ts.to_system_time(),
            UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_000)
        );
    }

    #[test]
    fn arithmetic_saturates_instead_of_overflowing() {
        let far = Timestamp::from_micros(i64::MAX - 1);
        assert_eq!(
            far + Duration::from_secs(10),
            Timestamp::from_micros(i64::MAX)
        );
        let early = Timestamp::from_micros(5);
        assert_eq!(early.saturating_duration_since(far), Duration::ZERO);
    }

    #[test]
    fn display_handles_negative_times() {
        assert_eq!(Timestamp::from_micros(-1).to_string(), "-1.999999s");
        assert_eq!(Timestamp::from_micros(1_500_000).to_string(), "1.500000s");
    }
}
