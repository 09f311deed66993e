//! Retry policy as data.
//!
//! A [`RetryPolicy`] is a serializable value. Whether to retry and when is a
//! pure function of the policy, the attempt number, the time of the first
//! attempt, the current time and a random source
//! ([`RetryPolicy::decide`]). The executor persists the answer as the
//! instance's next run time; nothing sleeps to retry, and a crash loses no
//! scheduled retry.

use std::time::Duration;

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::error::{InvalidRetryPolicy, StepErrorKind};
use crate::time::Timestamp;

/// How much randomness to add to each delay, so that many instances failing
/// together do not retry together.
///
/// With `base = min(max_delay, initial_delay × multiplier^(attempt-1))`:
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Jitter {
    /// Exactly `base`.
    None,
    /// Uniform in `[0, base]`. Spreads load best; may retry almost at once.
    Full,
    /// Uniform in `[base/2, base]`. Never retries sooner than half the base.
    Equal,
    /// Uniform in `[initial_delay, min(max_delay, 3 × base)]`: the
    /// stateless form of "decorrelated jitter", spreading retries widely.
    Decorrelated,
}

/// When (and whether) to retry a failed attempt.
///
/// Build one with [`RetryPolicy::builder`], which validates; or deserialize
/// one, which validates the same way.
///
/// ```
/// use std::time::Duration;
/// use saga_core::{Jitter, RetryPolicy};
///
/// let policy = RetryPolicy::builder()
///     .initial_delay(Duration::from_secs(1))
///     .multiplier(3.0)
///     .max_delay(Duration::from_secs(20))
///     .max_attempts(4)
///     .max_elapsed(Duration::from_secs(120))
///     .jitter(Jitter::None)
///     .build()?;
/// assert_eq!(policy.base_delay(1), Duration::from_secs(1));
/// assert_eq!(policy.base_delay(3), Duration::from_secs(9));
/// assert_eq!(policy.base_delay(4), Duration::from_secs(20)); // capped
/// # Ok::<(), saga_core::InvalidRetryPolicy>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RetryPolicyRepr", into = "RetryPolicyRepr")]
pub struct RetryPolicy {
    initial_delay: Duration,
    multiplier: f64,
    max_delay: Duration,
    max_attempts: u32,
    max_elapsed: Option<Duration>,
    jitter: Jitter,
}

/// The serialized form of a [`RetryPolicy`]; validated on the way in.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RetryPolicyRepr {
    initial_delay: Duration,
    multiplier: f64,
    max_delay: Duration,
    max_attempts: u32,
    #[serde(default)]
    max_elapsed: Option<Duration>,
    jitter: Jitter,
}

impl TryFrom<RetryPolicyRepr> for RetryPolicy {
    type Error = InvalidRetryPolicy;
    fn try_from(r: RetryPolicyRepr) -> Result<Self, Self::Error> {
        RetryPolicy {
            initial_delay: r.initial_delay,
            multiplier: r.multiplier,
            max_delay: r.max_delay,
            max_attempts: r.max_attempts,
            max_elapsed: r.max_elapsed,
            jitter: r.jitter,
        }
        .validated()
    }
}

impl From<RetryPolicy> for RetryPolicyRepr {
    fn from(p: RetryPolicy) -> Self {
        RetryPolicyRepr {
            initial_delay: p.initial_delay,
            multiplier: p.multiplier,
            max_delay: p.max_delay,
            max_attempts: p.max_attempts,
            max_elapsed: p.max_elapsed,
            jitter: p.jitter,
        }
    }
}

/// The answer to "this attempt failed: now what?".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryDecision {
    /// Run the next attempt at `at`, which is `delay` after now.
    RetryAt {
        /// When to run the next attempt.
        at: Timestamp,
        /// The delay chosen, jitter included.
        delay: Duration,
    },
    /// Do not retry.
    GiveUp(GiveUpReason),
}

/// Why a failure is final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum GiveUpReason {
    /// The error was permanent.
    Permanent,
    /// `max_attempts` attempts were made.
    AttemptsExhausted {
        /// Attempts made.
        attempts: u32,
    },
    /// The next attempt would start after `first attempt + max_elapsed`.
    ElapsedExhausted {
        /// Time since the first attempt.
        elapsed: Duration,
    },
}

impl std::fmt::Display for GiveUpReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GiveUpReason::Permanent => f.write_str("permanent error"),
            GiveUpReason::AttemptsExhausted { attempts } => {
                write!(f, "retry budget spent after {attempts} attempts")
            }
            GiveUpReason::ElapsedExhausted { elapsed } => {
                write!(f, "retry time budget spent after {elapsed:?}")
            }
        }
    }
}

/// The largest multiplier accepted; anything bigger is surely a typo.
const MAX_MULTIPLIER: f64 = 100.0;

impl RetryPolicy {
    /// A builder starting from [`RetryPolicy::default`].
    pub fn builder() -> RetryPolicyBuilder {
        RetryPolicyBuilder {
            policy: RetryPolicy::default(),
        }
    }

    /// The default for compensations, which must eventually succeed: more
    /// patient than [`RetryPolicy::default`]. 5 s doubling to at most 5 min,
    /// 10 attempts, 1 hour in all, equal jitter; then the instance is parked
    /// as `Stuck` for an operator.
    #[must_use]
    pub fn compensation_default() -> Self {
        RetryPolicy {
            initial_delay: Duration::from_secs(5),
            multiplier: 2.0,
            max_delay: Duration::from_secs(300),
            max_attempts: 10,
            max_elapsed: Some(Duration::from_secs(3600)),
            jitter: Jitter::Equal,
        }
    }

    /// No retries at all: the first failure is final.
    #[must_use]
    pub fn no_retry() -> Self {
        RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        }
    }

    /// Delay before the first retry, before jitter.
    #[must_use]
    pub fn initial_delay(&self) -> Duration {
        self.initial_delay
    }

    /// Factor by which the delay grows per attempt.
    #[must_use]
    pub fn multiplier(&self) -> f64 {
        self.multiplier
    }

    /// Largest delay, jitter included.
    #[must_use]
    pub fn max_delay(&self) -> Duration {
        self.max_delay
    }

    /// Most attempts made in all, the first included.
    #[must_use]
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// Longest time from the first attempt to the start of the last one.
    /// Time the step spent snoozed ([`StepError::snooze`]) does not count:
    /// a snooze spends none of the retry budget.
    ///
    /// [`StepError::snooze`]: crate::StepError::snooze
    #[must_use]
    pub fn max_elapsed(&self) -> Option<Duration> {
        self.max_elapsed
    }

    /// The jitter applied to each delay.
    #[must_use]
    pub fn jitter(&self) -> Jitter {
        self.jitter
    }

    fn validated(self) -> Result<Self, InvalidRetryPolicy> {
        if self.max_attempts == 0 {
            return Err(InvalidRetryPolicy("max_attempts must be at least 1"));
        }
        if self.initial_delay.is_zero() {
            return Err(InvalidRetryPolicy("initial_delay must be above zero"));
        }
        if !self.multiplier.is_finite() || !(1.0..=MAX_MULTIPLIER).contains(&self.multiplier) {
            return Err(InvalidRetryPolicy("multiplier must be between 1 and 100"));
        }
        if self.max_delay < self.initial_delay {
            return Err(InvalidRetryPolicy(
                "max_delay must not be below initial_delay",
            ));
        }
        if self.max_elapsed.is_some_and(|d| d.is_zero()) {
            return Err(InvalidRetryPolicy("max_elapsed must be above zero"));
        }
        Ok(self)
    }

    /// Whether an error of this kind may be retried at all (tower's
    /// *whether*, kept apart from *when*). Snoozes are not retries: they
    /// never reach the policy.
    #[must_use]
    pub fn retries(&self, kind: StepErrorKind) -> bool {
        matches!(kind, StepErrorKind::Retryable | StepErrorKind::Timeout)
    }

    /// The delay after failed attempt number `attempt` (1-based) before
    /// jitter: `initial_delay × multiplier^(attempt-1)`, capped at
    /// `max_delay`.
    #[must_use]
    pub fn base_delay(&self, attempt: u32) -> Duration {
        let exp = i32::try_from(attempt.saturating_sub(1)).unwrap_or(i32::MAX);
        let secs = self.initial_delay.as_secs_f64() * self.multiplier.powi(exp);
        let cap = self.max_delay.as_secs_f64();
        if secs.is_finite() && secs < cap {
            Duration::from_secs_f64(secs)
        } else {
            self.max_delay
        }
    }

    /// The jittered delay after failed attempt number `attempt`.
    pub fn delay<R: Rng + ?Sized>(&self, attempt: u32, rng: &mut R) -> Duration {
        let base = self.base_delay(attempt);
        let delay = match self.jitter {
            Jitter::None => base,
            Jitter::Full => base.mul_f64(rng.random::<f64>()),
            Jitter::Equal => base / 2 + (base / 2).mul_f64(rng.random::<f64>()),
            Jitter::Decorrelated => {
                let upper = base.saturating_mul(3).min(self.max_delay);
                let lower = self.initial_delay.min(upper);
                lower + (upper - lower).mul_f64(rng.random::<f64>())
            }
        };
        delay.min(self.max_delay)
    }

    /// Whether and when to retry after attempt number `attempt` (1-based)
    /// failed with an error of `kind` at `now`, the first attempt of this
    /// step having started at `first_attempt_at`. The executor passes that
    /// time moved later by any time the step spent snoozed, so that snoozes
    /// do not use up `max_elapsed`.
    pub fn decide<R: Rng + ?Sized>(
        &self,
        kind: StepErrorKind,
        attempt: u32,
        first_attempt_at: Timestamp,
        now: Timestamp,
        rng: &mut R,
    ) -> RetryDecision {
        if !self.retries(kind) {
            return RetryDecision::GiveUp(GiveUpReason::Permanent);
        }
        if attempt >= self.max_attempts {
            return RetryDecision::GiveUp(GiveUpReason::AttemptsExhausted { attempts: attempt });
        }
        let delay = self.delay(attempt, rng);
        let at = now + delay;
        if let Some(max_elapsed) = self.max_elapsed
            && at.saturating_duration_since(first_attempt_at) > max_elapsed
        {
            return RetryDecision::GiveUp(GiveUpReason::ElapsedExhausted {
                elapsed: now.saturating_duration_since(first_attempt_at),
            });
        }
        RetryDecision::RetryAt { at, delay }
    }
}

impl Default for RetryPolicy {
    /// Conservative defaults for calls to other services: 2 s doubling to at
    /// most 60 s, 5 attempts, 10 minutes from the first attempt, equal
    /// jitter. A struggling downstream sees at most 5 calls per step, spread
    /// over about half a minute.
    fn default() -> Self {
        RetryPolicy {
            initial_delay: Duration::from_secs(2),
            multiplier: 2.0,
            max_delay: Duration::from_secs(60),
            max_attempts: 5,
            max_elapsed: Some(Duration::from_secs(600)),
            jitter: Jitter::Equal,
        }
    }
}

/// Builds a [`RetryPolicy`]; [`build`](RetryPolicyBuilder::build) validates.
#[derive(Debug, Clone)]
#[must_use]
pub struct RetryPolicyBuilder {
    policy: RetryPolicy,
}

impl RetryPolicyBuilder {
    /// Delay before the first retry (above zero).
    pub fn initial_delay(mut self, d: Duration) -> Self {
        self.policy.initial_delay = d;
        self
    }

    /// Growth factor per attempt, between 1 and 100.
    pub fn multiplier(mut self, m: f64) -> Self {
        self.policy.multiplier = m;
        self
    }

    /// Largest delay (at least the initial delay).
    pub fn max_delay(mut self, d: Duration) -> Self {
        self.policy.max_delay = d;
        self
    }

    /// Most attempts in all, the first included (at least 1).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.policy.max_attempts = n;
        self
    }

    /// Longest time from the first attempt to the start of the last one,
    /// not counting time spent snoozed.
    pub fn max_elapsed(mut self, d: Duration) -> Self {
        self.policy.max_elapsed = Some(d);
        self
    }

    /// No cap on elapsed time (attempts still cap retries).
    pub fn no_max_elapsed(mut self) -> Self {
        self.policy.max_elapsed = None;
        self
    }

    /// The jitter to apply.
    pub fn jitter(mut self, j: Jitter) -> Self {
        self.policy.jitter = j;
        self
    }

    /// Validates and returns the policy.
    pub fn build(self) -> Result<RetryPolicy, InvalidRetryPolicy> {
        self.policy.validated()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn jitter() -> impl Strategy<Value = Jitter> {
        prop_oneof![
            Just(Jitter::None),
            Just(Jitter::Full),
            Just(Jitter::Equal),
            Just(Jitter::Decorrelated),
        ]
    }

    prop_compose! {
        fn policy()(
            initial_ms in 1u64..10_000,
            extra_ms in 0u64..600_000,
            multiplier in 1.0f64..10.0,
            max_attempts in 1u32..20,
            max_elapsed_s in proptest::option::of(1u64..3_600),
            jitter in jitter(),
        ) -> RetryPolicy {
            let mut b = RetryPolicy::builder()
                .initial_delay(Duration::from_millis(initial_ms))
                .max_delay(Duration::from_millis(initial_ms + extra_ms))
                .multiplier(multiplier)
                .max_attempts(max_attempts)
                .jitter(jitter);
            b = match max_elapsed_s {
                Some(s) => b.max_elapsed(Duration::from_secs(s)),
                None => b.no_max_elapsed(),
            };
            b.build().expect("strategy only makes valid policies")
        }
    }

    proptest! {
        #[test]
        fn delays_never_exceed_the_cap(p in policy(), attempt in 1u32..200, seed: u64) {
            let mut rng = StdRng::seed_from_u64(seed);
            let d = p.delay(attempt, &mut rng);
            prop_assert!(d <= p.max_delay(), "{d:?} > {:?}", p.max_delay());
            prop_assert!(p.base_delay(attempt) <= p.max_delay());
        }

        #[test]
        fn jitter_stays_in_its_range(p in policy(), attempt in 1u32..60, seed: u64) {
            let mut rng = StdRng::seed_from_u64(seed);
            let base = p.base_delay(attempt);
            let d = p.delay(attempt, &mut rng);
            // Durations go through f64; allow a nanosecond of rounding.
            let slack = Duration::from_nanos(1);
            match p.jitter() {
                Jitter::None => prop_assert_eq!(d, base),
                Jitter::Full => prop_assert!(d <= base + slack),
                Jitter::Equal => prop_assert!(d + slack >= base / 2 && d <= base + slack),
                Jitter::Decorrelated => {
                    let upper = base.saturating_mul(3).min(p.max_delay());
                    prop_assert!(d + slack >= p.initial_delay().min(upper));
                    prop_assert!(d <= upper + slack);
                }
            }
        }

        #[test]
        fn jittered_delays_spread_over_their_range(p in policy(), attempt in 1u32..60, seed: u64) {
            let base = p.base_delay(attempt);
            let (low, high) = match p.jitter() {
                Jitter::None => return Ok(()),
                Jitter::Full => (Duration::ZERO, base),
                Jitter::Equal => (base / 2, base),
                Jitter::Decorrelated => {
                    let upper = base.saturating_mul(3).min(p.max_delay());
                    (p.initial_delay().min(upper), upper)
                }
            };
            prop_assume!(high - low >= Duration::from_millis(1));
            // 64 uniform draws all in one half of the range: a chance of
            // 2^-63 for a jitter that spreads, a certainty for one that
            // does not (one that always returns `base`, say).
            let mut rng = StdRng::seed_from_u64(seed);
            let middle = low + (high - low) / 2;
            let draws: Vec<Duration> = (0..64).map(|_| p.delay(attempt, &mut rng)).collect();
            prop_assert!(draws.iter().any(|d| *d < middle), "none below {middle:?}: {draws:?}");
            prop_assert!(draws.iter().any(|d| *d > middle), "none above {middle:?}: {draws:?}");
        }

        #[test]
        fn the_attempt_cap_stops_retrying(p in policy(), extra in 0u32..10, seed: u64) {
            let mut rng = StdRng::seed_from_u64(seed);
            let now = Timestamp::from_micros(1_000_000_000);
            let attempt = p.max_attempts() + extra;
            let d = p.decide(StepErrorKind::Retryable, attempt, now, now, &mut rng);
            prop_assert_eq!(d, RetryDecision::GiveUp(GiveUpReason::AttemptsExhausted { attempts: attempt }));
        }

        #[test]
        fn below_both_caps_a_transient_error_is_retried_in_the_future(
            p in policy(), seed: u64, timeout: bool,
        ) {
            prop_assume!(p.max_attempts() > 1);
            let mut rng = StdRng::seed_from_u64(seed);
            let now = Timestamp::from_micros(1_000_000_000);
            let kind = if timeout { StepErrorKind::Timeout } else { StepErrorKind::Retryable };
            match p.decide(kind, 1, now, now, &mut rng) {
                RetryDecision::RetryAt { at, delay } => {
                    prop_assert_eq!(at, now + delay);
                    prop_assert!(at >= now);
                }
                // Only the elapsed cap may refuse a first retry.
                RetryDecision::GiveUp(GiveUpReason::ElapsedExhausted { .. }) => {
                    prop_assert!(p.max_elapsed().is_some_and(|m| m < p.max_delay()));
                }
                other => prop_assert!(false, "unexpected {other:?}"),
            }
        }

        #[test]
        fn the_elapsed_cap_stops_retrying(
            p in policy(), attempt in 1u32..20, elapsed_ms in 0u64..7_200_000, seed: u64,
        ) {
            let mut rng = StdRng::seed_from_u64(seed);
            let first = Timestamp::from_micros(1_000_000_000);
            let now = first + Duration::from_millis(elapsed_ms);
            let decision = p.decide(StepErrorKind::Retryable, attempt, first, now, &mut rng);
            if let (Some(max), RetryDecision::RetryAt { at, .. }) = (p.max_elapsed(), decision) {
                prop_assert!(at.saturating_duration_since(first) <= max);
            }
            if let Some(max) = p.max_elapsed()
                && now.saturating_duration_since(first) > max
            {
                prop_assert!(matches!(decision, RetryDecision::GiveUp(_)));
            }
        }

        #[test]
        fn a_permanent_error_never_retries(p in policy(), attempt in 1u32..20, seed: u64) {
            let mut rng = StdRng::seed_from_u64(seed);
            let now = Timestamp::from_micros(0);
            prop_assert_eq!(
                p.decide(StepErrorKind::Permanent, attempt, now, now, &mut rng),
                RetryDecision::GiveUp(GiveUpReason::Permanent)
            );
        }

        #[test]
        fn policies_round_trip_through_json(p in policy()) {
            let json = serde_json::to_string(&p).unwrap();
            let back: RetryPolicy = serde_json::from_str(&json).unwrap();
            prop_assert_eq!(back, p);
        }
    }

    #[test]
    fn the_builder_refuses_nonsense() {
        let cases = [
            RetryPolicy::builder().max_attempts(0).build(),
            RetryPolicy::builder().initial_delay(Duration::ZERO).build(),
            RetryPolicy::builder().multiplier(0.5).build(),
            RetryPolicy::builder().multiplier(f64::NAN).build(),
            RetryPolicy::builder()
                .initial_delay(Duration::from_secs(10))
                .max_delay(Duration::from_secs(1))
                .build(),
            RetryPolicy::builder().max_elapsed(Duration::ZERO).build(),
        ];
        for case in cases {
            assert!(case.is_err(), "{case:?}");
        }
    }

    #[test]
    fn deserializing_validates_too() {
        let bad = r#"{"initial_delay":{"secs":0,"nanos":0},"multiplier":2.0,
            "max_delay":{"secs":1,"nanos":0},"max_attempts":3,"jitter":"full"}"#;
        let err = serde_json::from_str::<RetryPolicy>(bad).unwrap_err();
        assert!(err.to_string().contains("initial_delay"), "{err}");
        let unknown = r#"{"initial_delay":{"secs":1,"nanos":0},"multiplier":2.0,
            "max_delay":{"secs":1,"nanos":0},"max_attempts":3,"jitter":"full","max_retries":9}"#;
        assert!(serde_json::from_str::<RetryPolicy>(unknown).is_err());
    }

    #[test]
    fn defaults_are_conservative() {
        let p = RetryPolicy::default();
        assert!(p.initial_delay() >= Duration::from_secs(1));
        assert!((3..=5).contains(&p.max_attempts()));
        assert!(p.max_elapsed().is_some());
        let c = RetryPolicy::compensation_default();
        assert!(c.max_attempts() > p.max_attempts());
        assert!(c.max_elapsed().is_some());
    }
}
