//! The pure decision step: from what came of one claimed attempt to the
//! status machine's answer and what to record.
//!
//! No I/O, no clock, no locks: [`decide`] takes the claimed row, where the
//! definition places it, what came of the attempt, the time and a random
//! source (for the retry policy's jitter), and returns a [`Verdict`]. The
//! executor runs the step before and writes the verdict after; every
//! status and position change is the [status machine](crate::machine)'s,
//! through [`machine::transition`], or [`machine::park_in_place`] for a row
//! the machine cannot place. Every path has a [`Rule`]; the table test
//! asserts that each one is exercised.

use std::time::Duration;

use rand::Rng;

use crate::error::{Error, ErrorChain, StepError, StepErrorKind};
use crate::machine::{self, Command, Event, ParkedInPlace, Position, StepKind, Transition};
use crate::machine::{Status, TransitionKind};
use crate::outbox::OutboxMessage;
use crate::retry::{GiveUpReason, RetryDecision, RetryPolicy};
use crate::store::{ClaimedSaga, Outcome};
use crate::time::Timestamp;

use super::registry::StepPanicked;

/// Where the definition places a claimed row, and the policy of the step
/// and direction found there.
#[derive(Debug, Clone, Copy)]
pub(super) struct Located<'a> {
    /// The stored step's index and the stored direction.
    pub(super) position: Position,
    /// The retry policy of that step in that direction.
    pub(super) policy: &'a RetryPolicy,
}

/// What came of a claimed attempt.
#[derive(Debug)]
pub(super) enum Attempted<'a> {
    /// Not run: the stored step is not one the definition has in the stored
    /// direction. The error says which ([`Error::UnknownStep`]).
    Unplaced(Error),
    /// Not run: the claim's attempt number is past the policy's budget
    /// ([`budget_spent`]): earlier attempts never recorded a result.
    BudgetSpent(Located<'a>),
    /// Not run: the attempt could not be made ready (the stored state does
    /// not deserialize, say).
    NotReady(Position, Error),
    /// Ran to an end: the new state and the messages the step emitted, or
    /// its error (a timeout and a panic included).
    Ran(
        Located<'a>,
        Result<(serde_json::Value, Vec<OutboxMessage>), StepError>,
    ),
}

/// Declares [`Rule`] and [`Rule::ALL`] from one list, so that `ALL` cannot
/// leave one out.
macro_rules! rules {
    ($($(#[$doc:meta])* $rule:ident,)*) => {
        /// Which path of the decision was taken.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub(super) enum Rule {
            $($(#[$doc])* $rule,)*
        }

        impl Rule {
            /// Every path, so that a test can check each was exercised.
            #[cfg(test)]
            const ALL: [Rule; [$(Rule::$rule),*].len()] = [$(Rule::$rule),*];
        }
    };
}

rules! {
    /// The stored step is unknown: parked in place.
    UnknownStep,
    /// The budget was spent before this attempt: failed for good, in doubt.
    BudgetSpent,
    /// The attempt could not be made ready: parked.
    NotReady,
    /// The step succeeded.
    Succeeded,
    /// The step snoozed.
    Snoozed,
    /// The step failed and the policy retries it.
    RetryScheduled,
    /// The step failed permanently: failed for good, definitively.
    GaveUpPermanent,
    /// The step failed and its attempts are spent: failed for good, in doubt.
    GaveUpAttempts,
    /// The step failed and its time is spent: failed for good, in doubt.
    GaveUpElapsed,
    /// The machine refused the event for the row (its status and direction
    /// disagree, say): parked in place.
    MachineRefused,
}

/// The write a verdict asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Settled {
    /// An edge of the machine from a placed row.
    Move(Transition),
    /// A row the machine cannot place, parked where it is.
    ParkInPlace(ParkedInPlace),
}

impl Settled {
    /// The edge taken.
    pub(crate) fn kind(&self) -> TransitionKind {
        match self {
            Settled::Move(t) => t.kind,
            Settled::ParkInPlace(p) => p.kind,
        }
    }

    /// The new status.
    pub(crate) fn status(&self) -> Status {
        match self {
            Settled::Move(t) => t.status,
            Settled::ParkInPlace(p) => p.status,
        }
    }

    /// What to persist.
    pub(crate) fn command(&self) -> &Command {
        match self {
            Settled::Move(t) => &t.command,
            Settled::ParkInPlace(p) => &p.command,
        }
    }
}

/// What to record for one claimed attempt.
#[derive(Debug)]
pub(super) struct Verdict {
    /// The path taken.
    pub(super) rule: Rule,
    /// The write.
    pub(super) settled: Settled,
    /// The history row's outcome.
    pub(super) outcome: Outcome,
    /// The history row's error text.
    pub(super) error: Option<String>,
    /// The new state (`None` keeps the stored one).
    pub(super) state: Option<serde_json::Value>,
    /// The messages to enqueue.
    pub(super) emitted: Vec<OutboxMessage>,
    /// The `outcome` label of the step-attempt metric, for an attempt that
    /// was counted (run, or refused for a spent budget).
    pub(super) attempt_label: Option<&'static str>,
    /// How long until the retry, when one is scheduled.
    pub(super) retry_in: Option<Duration>,
}

/// A claimed row that is not runnable (neither `Running` nor
/// `Compensating`): nothing to record; the claim is given back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a claimed saga instance is {status}, which no worker runs: {reason}")]
pub(super) struct NotRunnable {
    /// The claimed status.
    pub(super) status: Status,
    /// What the decision would have parked it for.
    pub(super) reason: String,
}

/// Whether attempt number `attempt` is past the policy's budget: the claim
/// counted it, but earlier attempts never recorded a result (worker
/// crashes, lost leases). Such an attempt is not run.
pub(super) fn budget_spent(attempt: u32, policy: &RetryPolicy) -> bool {
    attempt > policy.max_attempts()
}

/// The decision: what `attempted` means for `claimed`, an instance of a
/// saga whose steps have the roles in `plan`, at `now`. `rng` feeds the
/// retry policy's jitter.
pub(super) fn decide<R: Rng + ?Sized>(
    claimed: &ClaimedSaga,
    plan: &[StepKind],
    attempted: Attempted<'_>,
    now: Timestamp,
    rng: &mut R,
) -> Result<Verdict, NotRunnable> {
    let verdict = |rule, event, position, outcome, error| Pending {
        rule,
        event,
        position,
        outcome,
        error,
        state: None,
        emitted: Vec::new(),
        attempt_label: None,
        retry_in: None,
    };
    let pending = match attempted {
        Attempted::Unplaced(problem) => {
            let reason = ErrorChain(&problem).to_string();
            return park_in_place(claimed, Rule::UnknownStep, reason);
        }
        Attempted::BudgetSpent(at) => {
            let reason = exhausted_reason(claimed.attempt, at.policy);
            Pending {
                attempt_label: Some("exhausted"),
                ..verdict(
                    Rule::BudgetSpent,
                    Event::FailedForGood {
                        reason: reason.clone(),
                        definitive: false,
                    },
                    at.position,
                    Outcome::FailedForGood,
                    Some(reason),
                )
            }
        }
        Attempted::NotReady(position, problem) => {
            let reason = ErrorChain(&problem).to_string();
            verdict(
                Rule::NotReady,
                Event::Park { reason },
                position,
                Outcome::Parked,
                None,
            )
        }
        Attempted::Ran(at, Ok((state, messages))) => Pending {
            state: Some(state),
            emitted: messages,
            attempt_label: Some("succeeded"),
            ..verdict(
                Rule::Succeeded,
                Event::Succeeded,
                at.position,
                Outcome::Succeeded,
                None,
            )
        },
        Attempted::Ran(at, Err(err)) => {
            let label = if err.source().is_some_and(|s| s.is::<StepPanicked>()) {
                "panicked"
            } else {
                err.kind().as_str()
            };
            let described = err.describe();
            let failed = match err.kind() {
                StepErrorKind::Snooze(d) => verdict(
                    Rule::Snoozed,
                    Event::Snoozed { until: now + d },
                    at.position,
                    Outcome::Snoozed,
                    Some(described),
                ),
                kind => match at.policy.decide(
                    kind,
                    claimed.attempt,
                    claimed.first_attempt_at,
                    now,
                    rng,
                ) {
                    RetryDecision::RetryAt { at: when, delay } => Pending {
                        retry_in: Some(delay),
                        ..verdict(
                            Rule::RetryScheduled,
                            Event::RetryScheduled { at: when },
                            at.position,
                            Outcome::RetryScheduled,
                            Some(described),
                        )
                    },
                    RetryDecision::GiveUp(why) => {
                        let rule = match why {
                            GiveUpReason::Permanent => Rule::GaveUpPermanent,
                            GiveUpReason::AttemptsExhausted { .. } => Rule::GaveUpAttempts,
                            GiveUpReason::ElapsedExhausted { .. } => Rule::GaveUpElapsed,
                        };
                        // A permanent error's reason says "permanent" once:
                        // the cause follows the give-up reason directly.
                        let reason = match (why, err.source()) {
                            (GiveUpReason::Permanent, Some(cause)) => {
                                format!("{why}: {}", ErrorChain(cause))
                            }
                            _ => format!("{why}: {described}"),
                        };
                        verdict(
                            rule,
                            Event::FailedForGood {
                                reason: reason.clone(),
                                definitive: why == GiveUpReason::Permanent,
                            },
                            at.position,
                            Outcome::FailedForGood,
                            Some(reason),
                        )
                    }
                },
            };
            Pending {
                attempt_label: Some(label),
                ..failed
            }
        }
    };
    match machine::transition(plan, claimed.status, pending.position, &pending.event) {
        Ok(t) => Ok(Verdict {
            rule: pending.rule,
            settled: Settled::Move(t),
            outcome: pending.outcome,
            error: pending.error,
            state: pending.state,
            emitted: pending.emitted,
            attempt_label: pending.attempt_label,
            retry_in: pending.retry_in,
        }),
        // A stored row the machine cannot place (a status and direction
        // that disagree): park it for a person. The attempt's result, if
        // any, is not kept.
        Err(invalid) => {
            let reason = format!("cannot continue: {invalid}");
            park_in_place(claimed, Rule::MachineRefused, reason).map(|v| Verdict {
                attempt_label: pending.attempt_label,
                ..v
            })
        }
    }
}

/// A decision before it is put to the machine.
struct Pending {
    rule: Rule,
    event: Event,
    position: Position,
    outcome: Outcome,
    error: Option<String>,
    state: Option<serde_json::Value>,
    emitted: Vec<OutboxMessage>,
    attempt_label: Option<&'static str>,
    retry_in: Option<Duration>,
}

fn park_in_place(
    claimed: &ClaimedSaga,
    rule: Rule,
    reason: String,
) -> Result<Verdict, NotRunnable> {
    match machine::park_in_place(claimed.status, reason.clone()) {
        Some(parked) => Ok(Verdict {
            rule,
            settled: Settled::ParkInPlace(parked),
            outcome: Outcome::Parked,
            error: None,
            state: None,
            emitted: Vec::new(),
            attempt_label: None,
            retry_in: None,
        }),
        None => Err(NotRunnable {
            status: claimed.status,
            reason,
        }),
    }
}

/// Claims are spent: why the step was not run.
fn exhausted_reason(attempt: u32, policy: &RetryPolicy) -> String {
    format!(
        "retry budget spent: attempt {attempt} of at most {} was claimed, earlier attempts never \
         recorded a result (worker crashes or lost leases)",
        policy.max_attempts()
    )
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;
    use crate::ids::{LeaseToken, SagaId, SagaKind, SagaName, StepName};
    use crate::machine::Attempts;
    use crate::retry::Jitter;
    use crate::store::Lease;

    use StepKind::{Compensatable as C, NoCompensation as N, Pivot as P, Retryable as R};

    /// validate, charge, reserve, confirm (pivot), notify.
    const CHECKOUT: &[StepKind] = &[N, C, C, P, R];
    const NOW: Timestamp = Timestamp::from_micros(1_000_000_000_000);

    /// 1 s doubling, 3 attempts, 60 s in all, no jitter: delays are exact.
    fn policy() -> RetryPolicy {
        RetryPolicy::builder()
            .initial_delay(Duration::from_secs(1))
            .multiplier(2.0)
            .max_delay(Duration::from_secs(10))
            .max_attempts(3)
            .max_elapsed(Duration::from_secs(60))
            .jitter(Jitter::None)
            .build()
            .unwrap()
    }

    /// What came of the attempt, as a table can say it.
    #[derive(Debug, Clone, Copy)]
    enum Got {
        UnknownStep,
        BudgetSpent,
        NotReady,
        Ok,
        Snooze(Duration),
        Retryable,
        Timeout,
        Panic,
        Permanent,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("gateway said 503")]
    struct Gateway;

    fn attempted(got: Got, at: Position, policy: &RetryPolicy) -> Attempted<'_> {
        let located = Located {
            position: at,
            policy,
        };
        let failed = |e| Attempted::Ran(located, Err(e));
        match got {
            Got::UnknownStep => Attempted::Unplaced(Error::UnknownStep {
                id: SagaId::new(),
                saga: kind(),
                step: StepName::new("gone").unwrap(),
                direction: at.direction,
            }),
            Got::BudgetSpent => Attempted::BudgetSpent(located),
            Got::NotReady => Attempted::NotReady(
                at,
                Error::DeserializeState {
                    saga: kind(),
                    source: serde_json::from_str::<u32>("\"x\"").unwrap_err(),
                },
            ),
            Got::Ok => Attempted::Ran(located, Ok((serde_json::json!({ "n": 1 }), Vec::new()))),
            Got::Snooze(d) => failed(StepError::snooze(d)),
            Got::Retryable => failed(StepError::retryable(Gateway)),
            Got::Timeout => failed(StepError::timeout(Gateway)),
            Got::Panic => failed(StepError::retryable(StepPanicked("boom".into()))),
            Got::Permanent => failed(StepError::permanent(Gateway)),
        }
    }

    fn kind() -> SagaKind {
        SagaKind {
            name: SagaName::new("checkout").unwrap(),
            version: 1,
        }
    }

    fn claimed(status: Status, at: Position, attempt: u32, elapsed: Duration) -> ClaimedSaga {
        ClaimedSaga {
            lease: Lease {
                saga_id: SagaId::new(),
                token: LeaseToken::new(),
                expires_at: NOW,
            },
            kind: kind(),
            status,
            step: StepName::new("stored").unwrap(),
            direction: at.direction,
            attempt,
            first_attempt_at: NOW - elapsed,
            state: serde_json::json!({}),
        }
    }

    struct Row {
        status: Status,
        at: Position,
        attempt: u32,
        elapsed: Duration,
        got: Got,
        /// Rule, edge, new status, history outcome, attempt label; or the
        /// status a claim is refused for.
        expect: Result<(Rule, TransitionKind, Status, Outcome, Option<&'static str>), Status>,
        /// The command, when the row pins it.
        command: Option<Command>,
        /// How the history's error text starts, when it has one.
        error: Option<&'static str>,
    }

    fn row(
        status: Status,
        at: Position,
        attempt: u32,
        got: Got,
        expect: (Rule, TransitionKind, Status, Outcome, Option<&'static str>),
    ) -> Row {
        Row {
            status,
            at,
            attempt,
            elapsed: Duration::ZERO,
            got,
            expect: Ok(expect),
            command: None,
            error: None,
        }
    }

    impl Row {
        fn command(self, command: Command) -> Self {
            Row {
                command: Some(command),
                ..self
            }
        }
        fn error(self, starts: &'static str) -> Self {
            Row {
                error: Some(starts),
                ..self
            }
        }
        fn elapsed(self, elapsed: Duration) -> Self {
            Row { elapsed, ..self }
        }
    }

    fn at(secs: u64, attempts: Attempts) -> Command {
        Command::Schedule {
            at: Some(NOW + Duration::from_secs(secs)),
            attempts,
        }
    }

    fn table() -> Vec<Row> {
        use Position as Pos;
        use Rule as U;
        use Status::*;
        use TransitionKind as K;
        let s = Duration::from_secs;
        vec![
            // A step the definition does not have is parked where it is,
            // under its stored name: no position is made up for it.
            row(
                Running,
                Pos::forward(1),
                1,
                Got::UnknownStep,
                (U::UnknownStep, K::ParkForward, Stuck, Outcome::Parked, None),
            ),
            row(
                Compensating,
                Pos::compensate(1),
                1,
                Got::UnknownStep,
                (
                    U::UnknownStep,
                    K::ParkCompensation,
                    Stuck,
                    Outcome::Parked,
                    None,
                ),
            ),
            Row {
                expect: Err(Stuck),
                ..row(
                    Stuck,
                    Pos::forward(1),
                    1,
                    Got::UnknownStep,
                    (U::UnknownStep, K::ParkForward, Stuck, Outcome::Parked, None),
                )
            },
            // A budget spent by attempts that never recorded: failed for
            // good, in doubt (a pivot in doubt is parked, not compensated).
            row(
                Running,
                Pos::forward(1),
                4,
                Got::BudgetSpent,
                (
                    U::BudgetSpent,
                    K::ForwardFailedCompensate,
                    Compensating,
                    Outcome::FailedForGood,
                    Some("exhausted"),
                ),
            )
            .error("retry budget spent: attempt 4 of at most 3"),
            row(
                Running,
                Pos::forward(3),
                4,
                Got::BudgetSpent,
                (
                    U::BudgetSpent,
                    K::PivotInDoubt,
                    Stuck,
                    Outcome::FailedForGood,
                    Some("exhausted"),
                ),
            ),
            row(
                Running,
                Pos::forward(2),
                1,
                Got::NotReady,
                (U::NotReady, K::ParkForward, Stuck, Outcome::Parked, None),
            ),
            row(
                Running,
                Pos::forward(0),
                1,
                Got::Ok,
                (
                    U::Succeeded,
                    K::ForwardSucceeded,
                    Running,
                    Outcome::Succeeded,
                    Some("succeeded"),
                ),
            )
            .command(Command::Schedule {
                at: None,
                attempts: Attempts::Reset,
            }),
            row(
                Running,
                Pos::forward(4),
                2,
                Got::Ok,
                (
                    U::Succeeded,
                    K::ForwardSucceededLast,
                    Completed,
                    Outcome::Succeeded,
                    Some("succeeded"),
                ),
            ),
            // A snooze gives its attempt back, whatever the budget.
            row(
                Running,
                Pos::forward(4),
                3,
                Got::Snooze(s(30)),
                (
                    U::Snoozed,
                    K::ForwardSnoozed,
                    Running,
                    Outcome::Snoozed,
                    Some("snooze"),
                ),
            )
            .command(at(30, Attempts::Refund))
            .error("snoozed for 30s"),
            row(
                Running,
                Pos::forward(1),
                1,
                Got::Retryable,
                (
                    U::RetryScheduled,
                    K::ForwardRetry,
                    Running,
                    Outcome::RetryScheduled,
                    Some("retryable"),
                ),
            )
            .command(at(1, Attempts::Keep))
            .error("retryable: gateway said 503"),
            row(
                Running,
                Pos::forward(1),
                2,
                Got::Timeout,
                (
                    U::RetryScheduled,
                    K::ForwardRetry,
                    Running,
                    Outcome::RetryScheduled,
                    Some("timeout"),
                ),
            )
            .command(at(2, Attempts::Keep)),
            row(
                Running,
                Pos::forward(2),
                1,
                Got::Panic,
                (
                    U::RetryScheduled,
                    K::ForwardRetry,
                    Running,
                    Outcome::RetryScheduled,
                    Some("panicked"),
                ),
            )
            .error("retryable: the step panicked: boom"),
            row(
                Compensating,
                Pos::compensate(2),
                1,
                Got::Retryable,
                (
                    U::RetryScheduled,
                    K::CompensationRetry,
                    Compensating,
                    Outcome::RetryScheduled,
                    Some("retryable"),
                ),
            ),
            // A permanent error is definitive: a pivot that returns one is
            // compensated from the step before it.
            row(
                Running,
                Pos::forward(3),
                1,
                Got::Permanent,
                (
                    U::GaveUpPermanent,
                    K::ForwardFailedCompensate,
                    Compensating,
                    Outcome::FailedForGood,
                    Some("permanent"),
                ),
            )
            .command(Command::Schedule {
                at: None,
                attempts: Attempts::Reset,
            })
            .error("permanent error: gateway said 503"),
            row(
                Compensating,
                Pos::compensate(1),
                1,
                Got::Permanent,
                (
                    U::GaveUpPermanent,
                    K::CompensationFailed,
                    Stuck,
                    Outcome::FailedForGood,
                    Some("permanent"),
                ),
            ),
            // Spent attempts leave the outcome in doubt.
            row(
                Running,
                Pos::forward(3),
                3,
                Got::Timeout,
                (
                    U::GaveUpAttempts,
                    K::PivotInDoubt,
                    Stuck,
                    Outcome::FailedForGood,
                    Some("timeout"),
                ),
            ),
            row(
                Running,
                Pos::forward(4),
                1,
                Got::Retryable,
                (
                    U::GaveUpElapsed,
                    K::ForwardFailedAfterPivot,
                    Stuck,
                    Outcome::FailedForGood,
                    Some("retryable"),
                ),
            )
            .elapsed(s(60)),
            // Rows whose status and direction disagree are parked in place.
            row(
                Running,
                Pos::compensate(1),
                1,
                Got::Ok,
                (
                    U::MachineRefused,
                    K::ParkForward,
                    Stuck,
                    Outcome::Parked,
                    Some("succeeded"),
                ),
            ),
            row(
                Compensating,
                Pos::forward(1),
                1,
                Got::Retryable,
                (
                    U::MachineRefused,
                    K::ParkCompensation,
                    Stuck,
                    Outcome::Parked,
                    Some("retryable"),
                ),
            ),
        ]
    }

    #[test]
    fn every_row_of_the_table_holds_and_every_rule_is_exercised() {
        let policy = policy();
        let mut rules = BTreeSet::new();
        let mut labels = BTreeSet::new();
        for (n, r) in table().into_iter().enumerate() {
            let claimed = claimed(r.status, r.at, r.attempt, r.elapsed);
            let mut rng = StdRng::seed_from_u64(n as u64);
            let got = decide(
                &claimed,
                CHECKOUT,
                attempted(r.got, r.at, &policy),
                NOW,
                &mut rng,
            );
            let ((rule, kind, status, outcome, label), v) = match (r.expect, got) {
                (Ok(expect), Ok(v)) => (expect, v),
                (Err(status), Err(refused)) => {
                    assert_eq!(refused.status, status, "row {n}");
                    continue;
                }
                (expect, got) => panic!("row {n} {:?}: expected {expect:?}, got {got:?}", r.got),
            };
            assert_eq!(
                (
                    v.rule,
                    v.settled.kind(),
                    v.settled.status(),
                    v.outcome,
                    v.attempt_label
                ),
                (rule, kind, status, outcome, label),
                "row {n}: {:?} {:?} {:?}",
                r.status,
                r.at,
                r.got
            );
            if let Some(command) = &r.command {
                assert_eq!(v.settled.command(), command, "row {n}");
            }
            if let Some(starts) = r.error {
                let text = v.error.as_deref().unwrap_or_default();
                assert!(text.starts_with(starts), "row {n}: {text:?}");
            }
            // What is kept follows from the path: only a success keeps a
            // new state; a parked row keeps its stored step and direction.
            assert_eq!(v.state.is_some(), rule == Rule::Succeeded, "row {n}");
            match &v.settled {
                Settled::ParkInPlace(_) => assert!(
                    matches!(rule, Rule::UnknownStep | Rule::MachineRefused),
                    "row {n}"
                ),
                Settled::Move(t) => {
                    if let Command::Park { .. } = t.command {
                        assert_eq!(t.position, r.at, "row {n}: parking never moves");
                    }
                }
            }
            if let Command::Park { reason } = v.settled.command() {
                assert!(!reason.is_empty(), "row {n}");
            }
            assert_eq!(
                v.retry_in.is_some(),
                rule == Rule::RetryScheduled,
                "row {n}"
            );
            rules.insert(rule);
            labels.extend(label);
        }
        let all: BTreeSet<_> = Rule::ALL.into_iter().collect();
        let missing: Vec<_> = all.difference(&rules).collect();
        assert!(missing.is_empty(), "rules never exercised: {missing:?}");
        let every_label = [
            "exhausted",
            "succeeded",
            "snooze",
            "retryable",
            "timeout",
            "panicked",
            "permanent",
        ];
        let missing: Vec<_> = every_label
            .iter()
            .filter(|l| !labels.contains(*l))
            .collect();
        assert!(
            missing.is_empty(),
            "attempt labels never produced: {missing:?}"
        );
    }

    #[test]
    fn the_stuck_reason_of_an_unplaceable_row_names_its_problem() {
        let policy = policy();
        let at = Position::forward(1);
        let claimed = claimed(Status::Running, at, 1, Duration::ZERO);
        let mut rng = StdRng::seed_from_u64(0);
        let v = decide(
            &claimed,
            CHECKOUT,
            attempted(Got::UnknownStep, at, &policy),
            NOW,
            &mut rng,
        )
        .unwrap();
        let Command::Park { reason } = v.settled.command() else {
            panic!("{v:?}");
        };
        assert!(reason.contains("step `gone` (forward)"), "{reason}");

        let claimed = self::claimed(Status::Running, Position::compensate(1), 1, Duration::ZERO);
        let v = decide(
            &claimed,
            CHECKOUT,
            attempted(Got::Ok, Position::compensate(1), &policy),
            NOW,
            &mut rng,
        )
        .unwrap();
        let Command::Park { reason } = v.settled.command() else {
            panic!("{v:?}");
        };
        assert!(
            reason.starts_with("cannot continue: event `succeeded`"),
            "{reason}"
        );
        assert!(v.emitted.is_empty() && v.state.is_none());
    }

    #[test]
    fn the_budget_is_spent_only_past_the_last_attempt() {
        let p = policy();
        assert!(!budget_spent(3, &p));
        assert!(budget_spent(4, &p));
    }
}
