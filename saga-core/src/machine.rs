//! The pure status machine: `(status, position, event) -> transition`.
//!
//! No I/O, no clock, no randomness: the executor turns a step's outcome into
//! an [`Event`] (consulting the retry policy first), asks [`transition`]
//! what follows, and persists the answer in one guarded write. Every edge of
//! the machine has a [`TransitionKind`]; the table test asserts that each
//! one is exercised.
//!
//! ```text
//! Running ──► Completed
//! Running ──► Compensating ──► Compensated
//!                  │
//!                  └──► Stuck ──(resume)──► Compensating
//! Running ──► Stuck ──(resume)──► Running      (a step past the pivot gave up)
//! ```

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::InvalidName;
use crate::ids::Direction;
use crate::time::Timestamp;

/// The status of a saga instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Status {
    /// Running forward steps.
    Running,
    /// A step failed for good (or the saga was cancelled): running
    /// compensations in reverse order.
    Compensating,
    /// Every forward step succeeded. Terminal.
    Completed,
    /// Every started step was compensated. Terminal.
    Compensated,
    /// Parked for a person: a compensation kept failing, a step past the
    /// pivot gave up, or the state could not be read. Never dropped;
    /// [`Executor::resume`](crate::Executor::resume) takes it up again.
    Stuck,
}

impl Status {
    /// Every status, for tables and tests.
    pub const ALL: [Status; 5] = [
        Status::Running,
        Status::Compensating,
        Status::Completed,
        Status::Compensated,
        Status::Stuck,
    ];

    /// The stored name: `running`, `compensating`, `completed`,
    /// `compensated`, `stuck`.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Status::Running => "running",
            Status::Compensating => "compensating",
            Status::Completed => "completed",
            Status::Compensated => "compensated",
            Status::Stuck => "stuck",
        }
    }

    /// `Completed` or `Compensated`.
    #[must_use]
    pub const fn is_terminal(self) -> bool {
        matches!(self, Status::Completed | Status::Compensated)
    }

    /// `Running` or `Compensating`: a worker may claim it when due.
    #[must_use]
    pub const fn is_runnable(self) -> bool {
        matches!(self, Status::Running | Status::Compensating)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Status {
    type Err = InvalidName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Status::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| InvalidName::new("status", s, "not a saga status"))
    }
}

/// The role of a step in its saga, fixed by the definition's builder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum StepKind {
    /// Before the pivot, with a compensation.
    Compensatable,
    /// Before the pivot, declared to change nothing (a validation, a read).
    NoCompensation,
    /// The point of no return. Once it succeeds the saga only goes forward;
    /// if it fails for good the steps before it are compensated.
    Pivot,
    /// After the pivot: retried until it succeeds, or parked. Never
    /// compensated.
    Retryable,
}

impl StepKind {
    /// Whether the step has a compensation to run.
    #[must_use]
    pub const fn has_compensation(self) -> bool {
        matches!(self, StepKind::Compensatable)
    }

    /// The stored name.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            StepKind::Compensatable => "compensatable",
            StepKind::NoCompensation => "no_compensation",
            StepKind::Pivot => "pivot",
            StepKind::Retryable => "retryable",
        }
    }
}

/// Where an instance is: which step, which direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Position {
    /// Index of the step in the definition.
    pub step: usize,
    /// Forward or compensating.
    pub direction: Direction,
}

impl Position {
    /// The forward action of step `step`.
    #[must_use]
    pub const fn forward(step: usize) -> Self {
        Position {
            step,
            direction: Direction::Forward,
        }
    }

    /// The compensation of step `step`.
    #[must_use]
    pub const fn compensate(step: usize) -> Self {
        Position {
            step,
            direction: Direction::Compensate,
        }
    }
}

/// What happened to an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// The current step (either direction) succeeded.
    Succeeded,
    /// The current step failed and its policy allows another attempt at `at`.
    RetryScheduled {
        /// When to try again.
        at: Timestamp,
    },
    /// The step asked to be run again at `until` without spending an attempt.
    Snoozed {
        /// When to try again.
        until: Timestamp,
    },
    /// The current step failed for good: a permanent error, or its retry
    /// budget is spent.
    FailedForGood {
        /// Why, for the history and for an operator.
        reason: String,
        /// Whether the step is known not to have taken effect (it returned
        /// a permanent error). A budget spent on transient errors, timeouts
        /// or lost attempts leaves the outcome in doubt. Only matters for
        /// the pivot: a pivot in doubt is parked, not compensated.
        definitive: bool,
    },
    /// The saga is cancelled before the pivot succeeded: undo what was
    /// started. From `Stuck` at the pivot (or before it), an operator's
    /// decision that the stuck step did not take effect.
    Cancel {
        /// Why.
        reason: String,
        /// Whether the current forward step has started: an attempt was
        /// claimed, or one snoozed (its outcome may be unknown, so it is
        /// compensated too).
        current_step_started: bool,
    },
    /// The engine cannot run the instance (its state does not deserialize,
    /// its step is unknown): park it for a person.
    Park {
        /// Why.
        reason: String,
    },
    /// An operator takes a stuck instance up again, with a fresh retry
    /// budget for the step it was stuck on.
    Resume,
}

impl Event {
    /// A short label for errors and logs.
    #[must_use]
    pub fn name(&self) -> &'static str {
        match self {
            Event::Succeeded => "succeeded",
            Event::RetryScheduled { .. } => "retry_scheduled",
            Event::Snoozed { .. } => "snoozed",
            Event::FailedForGood { .. } => "failed_for_good",
            Event::Cancel { .. } => "cancel",
            Event::Park { .. } => "park",
            Event::Resume => "resume",
        }
    }
}

/// What happens to the attempt count of the step the instance lands on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Attempts {
    /// A new step or a resumed one: the budget starts afresh.
    Reset,
    /// A retry of the same step: the attempt just made stays spent.
    Keep,
    /// A snooze: the attempt just made is given back.
    Refund,
}

/// What the executor must persist.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Command {
    /// Run the step at the new position, at `at` (`None`: at once).
    Schedule {
        /// When the step is due; `None` means now.
        at: Option<Timestamp>,
        /// What happens to the attempt count.
        attempts: Attempts,
    },
    /// The instance reached a terminal status.
    Finish,
    /// The instance is parked as [`Status::Stuck`].
    Park {
        /// Why, for the operator.
        reason: String,
    },
}

/// Declares [`TransitionKind`] and [`TransitionKind::ALL`] from one list of
/// edges, so that `ALL` cannot leave one out.
macro_rules! transition_kinds {
    ($($(#[$doc:meta])* $kind:ident,)*) => {
        /// Every edge of the machine.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[non_exhaustive]
        pub enum TransitionKind {
            $($(#[$doc])* $kind,)*
        }

        impl TransitionKind {
            /// Every edge, in declaration order, so that a test can check
            /// each was exercised. Generated with the enum: a new edge is
            /// in it.
            pub const ALL: [TransitionKind; [$(TransitionKind::$kind),*].len()] =
                [$(TransitionKind::$kind),*];
        }
    };
}

transition_kinds! {
    /// Running → Running: a forward step succeeded; the next one is due.
    ForwardSucceeded,
    /// Running → Completed: the last forward step succeeded.
    ForwardSucceededLast,
    /// Running → Running: a forward step failed; retry scheduled.
    ForwardRetry,
    /// Running → Running: a forward step snoozed.
    ForwardSnoozed,
    /// Running → Compensating: a step up to the pivot failed for good.
    ForwardFailedCompensate,
    /// Running → Compensated: a step up to the pivot failed for good and
    /// nothing before it has a compensation.
    ForwardFailedNothingToCompensate,
    /// Running → Stuck: a step after the pivot gave up.
    ForwardFailedAfterPivot,
    /// Running → Stuck: the pivot gave up without a definitive answer (its
    /// effect may have happened): parked for a person, not compensated.
    PivotInDoubt,
    /// Running → Compensating: cancelled before the pivot succeeded.
    CancelCompensate,
    /// Running → Compensated: cancelled with nothing to undo.
    CancelNothingToCompensate,
    /// Running → Stuck: the engine could not run the instance.
    ParkForward,
    /// Compensating → Compensating: a compensation succeeded; the next is due.
    CompensationSucceeded,
    /// Compensating → Compensated: the last compensation succeeded.
    CompensationSucceededLast,
    /// Compensating → Compensating: a compensation failed; retry scheduled.
    CompensationRetry,
    /// Compensating → Compensating: a compensation snoozed.
    CompensationSnoozed,
    /// Compensating → Stuck: a compensation gave up.
    CompensationFailed,
    /// Compensating → Stuck: the engine could not run the instance.
    ParkCompensation,
    /// Stuck → Running: an operator resumed a stuck forward step.
    ResumeForward,
    /// Stuck → Compensating: an operator resumed a stuck compensation.
    ResumeCompensation,
    /// Stuck → Compensating: an operator cancelled a saga stuck at (or
    /// before) the pivot, deciding that the stuck step did not take effect.
    CancelStuckCompensate,
    /// Stuck → Compensated: the same, with nothing to undo.
    CancelStuckNothingToCompensate,
}

/// The machine's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Transition {
    /// Which edge was taken.
    pub kind: TransitionKind,
    /// The new status.
    pub status: Status,
    /// The new position.
    pub position: Position,
    /// What the executor must persist.
    pub command: Command,
}

/// An event that does not apply in the current status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("event `{event}` does not apply to a saga that is {status} at {position:?}: {why}")]
pub struct InvalidTransition {
    /// The status the instance was in.
    pub status: Status,
    /// Its position.
    pub position: Position,
    /// The event's name.
    pub event: &'static str,
    /// Why it does not apply.
    pub why: &'static str,
}

/// The next state of an instance of a saga whose steps have the roles in
/// `plan`, that is `status` at `position`, after `event`.
pub fn transition(
    plan: &[StepKind],
    status: Status,
    position: Position,
    event: &Event,
) -> Result<Transition, InvalidTransition> {
    let invalid = |why| InvalidTransition {
        status,
        position,
        event: event.name(),
        why,
    };
    if position.step >= plan.len() {
        return Err(invalid("the position is past the last step"));
    }
    let expected = match status {
        Status::Running => Some(Direction::Forward),
        Status::Compensating => Some(Direction::Compensate),
        _ => None,
    };
    if expected.is_some_and(|d| d != position.direction) {
        return Err(invalid(
            "the position's direction does not match the status",
        ));
    }
    if position.direction == Direction::Compensate && !plan[position.step].has_compensation() {
        return Err(invalid("the step at the position has no compensation"));
    }

    let to = |kind, status, position, command| {
        Ok(Transition {
            kind,
            status,
            position,
            command,
        })
    };
    let schedule = |at, attempts| Command::Schedule { at, attempts };
    let i = position.step;

    match (status, event) {
        (Status::Running, Event::Succeeded) => {
            if i + 1 == plan.len() {
                to(
                    TransitionKind::ForwardSucceededLast,
                    Status::Completed,
                    position,
                    Command::Finish,
                )
            } else {
                to(
                    TransitionKind::ForwardSucceeded,
                    Status::Running,
                    Position::forward(i + 1),
                    schedule(None, Attempts::Reset),
                )
            }
        }
        (Status::Running, Event::RetryScheduled { at }) => to(
            TransitionKind::ForwardRetry,
            Status::Running,
            position,
            schedule(Some(*at), Attempts::Keep),
        ),
        (Status::Running, Event::Snoozed { until }) => to(
            TransitionKind::ForwardSnoozed,
            Status::Running,
            position,
            schedule(Some(*until), Attempts::Refund),
        ),
        (Status::Running, Event::FailedForGood { reason, definitive }) => {
            if plan[i] == StepKind::Retryable {
                return to(
                    TransitionKind::ForwardFailedAfterPivot,
                    Status::Stuck,
                    position,
                    Command::Park {
                        reason: reason.clone(),
                    },
                );
            }
            if plan[i] == StepKind::Pivot && !definitive {
                // The pivot may have taken effect: undoing the steps before
                // it could refund a confirmed order. A person decides
                // (resume to retry it, cancel if it did not happen).
                return to(
                    TransitionKind::PivotInDoubt,
                    Status::Stuck,
                    position,
                    Command::Park {
                        reason: format!("the pivot's outcome is unknown: {reason}"),
                    },
                );
            }
            // The failed step was started, so its outcome may be unknown:
            // compensation starts with it (if it has a compensation).
            match last_compensatable(plan, Some(i)) {
                Some(k) => to(
                    TransitionKind::ForwardFailedCompensate,
                    Status::Compensating,
                    Position::compensate(k),
                    schedule(None, Attempts::Reset),
                ),
                None => to(
                    TransitionKind::ForwardFailedNothingToCompensate,
                    Status::Compensated,
                    position,
                    Command::Finish,
                ),
            }
        }
        (
            Status::Running,
            Event::Cancel {
                current_step_started,
                ..
            },
        ) => {
            if plan[i] == StepKind::Retryable {
                return Err(invalid(
                    "the pivot has succeeded; the saga only goes forward",
                ));
            }
            let from = if *current_step_started {
                Some(i)
            } else {
                i.checked_sub(1)
            };
            match last_compensatable(plan, from) {
                Some(k) => to(
                    TransitionKind::CancelCompensate,
                    Status::Compensating,
                    Position::compensate(k),
                    schedule(None, Attempts::Reset),
                ),
                None => to(
                    TransitionKind::CancelNothingToCompensate,
                    Status::Compensated,
                    position,
                    Command::Finish,
                ),
            }
        }
        (Status::Running, Event::Park { reason }) => to(
            TransitionKind::ParkForward,
            Status::Stuck,
            position,
            Command::Park {
                reason: reason.clone(),
            },
        ),
        (Status::Compensating, Event::Succeeded) => {
            match last_compensatable(plan, i.checked_sub(1)) {
                Some(k) => to(
                    TransitionKind::CompensationSucceeded,
                    Status::Compensating,
                    Position::compensate(k),
                    schedule(None, Attempts::Reset),
                ),
                None => to(
                    TransitionKind::CompensationSucceededLast,
                    Status::Compensated,
                    position,
                    Command::Finish,
                ),
            }
        }
        (Status::Compensating, Event::RetryScheduled { at }) => to(
            TransitionKind::CompensationRetry,
            Status::Compensating,
            position,
            schedule(Some(*at), Attempts::Keep),
        ),
        (Status::Compensating, Event::Snoozed { until }) => to(
            TransitionKind::CompensationSnoozed,
            Status::Compensating,
            position,
            schedule(Some(*until), Attempts::Refund),
        ),
        (Status::Compensating, Event::FailedForGood { reason, .. }) => to(
            TransitionKind::CompensationFailed,
            Status::Stuck,
            position,
            Command::Park {
                reason: reason.clone(),
            },
        ),
        (Status::Compensating, Event::Park { reason }) => to(
            TransitionKind::ParkCompensation,
            Status::Stuck,
            position,
            Command::Park {
                reason: reason.clone(),
            },
        ),
        (Status::Compensating, Event::Cancel { .. }) => {
            Err(invalid("the saga is already being compensated"))
        }
        (Status::Stuck, Event::Resume) => match position.direction {
            Direction::Forward => to(
                TransitionKind::ResumeForward,
                Status::Running,
                position,
                schedule(None, Attempts::Reset),
            ),
            Direction::Compensate => to(
                TransitionKind::ResumeCompensation,
                Status::Compensating,
                position,
                schedule(None, Attempts::Reset),
            ),
        },
        (Status::Stuck, Event::Cancel { .. }) => {
            if position.direction != Direction::Forward || plan[i] == StepKind::Retryable {
                return Err(invalid(
                    "only a saga stuck at or before its pivot can be cancelled",
                ));
            }
            // The operator decides the stuck step did not take effect; its
            // own compensation (if it has one) still runs, as it was started.
            match last_compensatable(plan, Some(i)) {
                Some(k) => to(
                    TransitionKind::CancelStuckCompensate,
                    Status::Compensating,
                    Position::compensate(k),
                    schedule(None, Attempts::Reset),
                ),
                None => to(
                    TransitionKind::CancelStuckNothingToCompensate,
                    Status::Compensated,
                    position,
                    Command::Finish,
                ),
            }
        }
        (Status::Running | Status::Compensating, Event::Resume) => {
            Err(invalid("only a stuck saga can be resumed"))
        }
        (Status::Stuck, _) => Err(invalid("a stuck saga only accepts resume or cancel")),
        (Status::Completed | Status::Compensated, _) => Err(invalid("the saga has finished")),
    }
}

/// The machine's answer for an instance it cannot place: its stored step
/// is not in the plan, the step has no side in the stored direction, or
/// its status and position disagree. The instance is parked where it is:
/// it keeps its stored step name and direction, which may be ones the
/// definition does not know, so that a person sees what was stored.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ParkedInPlace {
    /// [`TransitionKind::ParkForward`] or [`TransitionKind::ParkCompensation`].
    pub kind: TransitionKind,
    /// Always [`Status::Stuck`].
    pub status: Status,
    /// A [`Command::Park`] with the reason.
    pub command: Command,
}

/// Parks an instance that is `status` at a position the machine cannot
/// place (see [`ParkedInPlace`]). `None` unless the status is runnable
/// (`Running` or `Compensating`): a stuck or finished instance is never
/// claimed, so there is nothing to park.
#[must_use]
pub fn park_in_place(status: Status, reason: String) -> Option<ParkedInPlace> {
    let kind = match status {
        Status::Running => TransitionKind::ParkForward,
        Status::Compensating => TransitionKind::ParkCompensation,
        Status::Completed | Status::Compensated | Status::Stuck => return None,
    };
    Some(ParkedInPlace {
        kind,
        status: Status::Stuck,
        command: Command::Park { reason },
    })
}

/// The highest step index `<= from` that has a compensation.
fn last_compensatable(plan: &[StepKind], from: Option<usize>) -> Option<usize> {
    let from = from?;
    (0..=from).rev().find(|&k| plan[k].has_compensation())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    use StepKind::{Compensatable as C, NoCompensation as N, Pivot as P, Retryable as R};

    /// validate, charge, reserve, confirm (pivot), notify.
    const CHECKOUT: &[StepKind] = &[N, C, C, P, R];
    const T: Timestamp = Timestamp::from_micros(42);

    fn fail() -> Event {
        Event::FailedForGood {
            reason: "boom".into(),
            definitive: true,
        }
    }
    fn give_up() -> Event {
        Event::FailedForGood {
            reason: "boom".into(),
            definitive: false,
        }
    }
    fn park() -> Event {
        Event::Park {
            reason: "bad state".into(),
        }
    }
    fn cancel(started: bool) -> Event {
        Event::Cancel {
            reason: "customer cancelled".into(),
            current_step_started: started,
        }
    }
    fn now(attempts: Attempts) -> Command {
        Command::Schedule { at: None, attempts }
    }
    fn parked(reason: &str) -> Command {
        Command::Park {
            reason: reason.into(),
        }
    }

    struct Row {
        plan: &'static [StepKind],
        status: Status,
        at: Position,
        event: Event,
        /// The transition, or the reason it is refused.
        expect: Result<(TransitionKind, Status, Position, Command), &'static str>,
    }

    fn row(
        plan: &'static [StepKind],
        status: Status,
        at: Position,
        event: Event,
        expect: (TransitionKind, Status, Position, Command),
    ) -> Row {
        Row {
            plan,
            status,
            at,
            event,
            expect: Ok(expect),
        }
    }

    fn refused(
        plan: &'static [StepKind],
        status: Status,
        at: Position,
        event: Event,
        why: &'static str,
    ) -> Row {
        Row {
            plan,
            status,
            at,
            event,
            expect: Err(why),
        }
    }

    fn table() -> Vec<Row> {
        use Position as Pos;
        use Status::*;
        use TransitionKind as K;
        vec![
            // Forward progress.
            row(
                CHECKOUT,
                Running,
                Pos::forward(0),
                Event::Succeeded,
                (
                    K::ForwardSucceeded,
                    Running,
                    Pos::forward(1),
                    now(Attempts::Reset),
                ),
            ),
            row(
                CHECKOUT,
                Running,
                Pos::forward(3),
                Event::Succeeded,
                (
                    K::ForwardSucceeded,
                    Running,
                    Pos::forward(4),
                    now(Attempts::Reset),
                ),
            ),
            row(
                CHECKOUT,
                Running,
                Pos::forward(4),
                Event::Succeeded,
                (
                    K::ForwardSucceededLast,
                    Completed,
                    Pos::forward(4),
                    Command::Finish,
                ),
            ),
            row(
                CHECKOUT,
                Running,
                Pos::forward(1),
                Event::RetryScheduled { at: T },
                (
                    K::ForwardRetry,
                    Running,
                    Pos::forward(1),
                    Command::Schedule {
                        at: Some(T),
                        attempts: Attempts::Keep,
                    },
                ),
            ),
            row(
                CHECKOUT,
                Running,
                Pos::forward(4),
                Event::Snoozed { until: T },
                (
                    K::ForwardSnoozed,
                    Running,
                    Pos::forward(4),
                    Command::Schedule {
                        at: Some(T),
                        attempts: Attempts::Refund,
                    },
                ),
            ),
            // A failure for good compensates every started step, the failed
            // one included, in reverse order.
            row(
                CHECKOUT,
                Running,
                Pos::forward(2),
                fail(),
                (
                    K::ForwardFailedCompensate,
                    Compensating,
                    Pos::compensate(2),
                    now(Attempts::Reset),
                ),
            ),
            row(
                CHECKOUT,
                Running,
                Pos::forward(1),
                fail(),
                (
                    K::ForwardFailedCompensate,
                    Compensating,
                    Pos::compensate(1),
                    now(Attempts::Reset),
                ),
            ),
            // The pivot refusing for certain compensates what came before it.
            row(
                CHECKOUT,
                Running,
                Pos::forward(3),
                fail(),
                (
                    K::ForwardFailedCompensate,
                    Compensating,
                    Pos::compensate(2),
                    now(Attempts::Reset),
                ),
            ),
            // The pivot giving up in doubt is parked: it may have happened.
            row(
                CHECKOUT,
                Running,
                Pos::forward(3),
                give_up(),
                (
                    K::PivotInDoubt,
                    Stuck,
                    Pos::forward(3),
                    parked("the pivot's outcome is unknown: boom"),
                ),
            ),
            // Before the pivot, doubt does not matter: compensations cope.
            row(
                CHECKOUT,
                Running,
                Pos::forward(2),
                give_up(),
                (
                    K::ForwardFailedCompensate,
                    Compensating,
                    Pos::compensate(2),
                    now(Attempts::Reset),
                ),
            ),
            row(
                CHECKOUT,
                Running,
                Pos::forward(4),
                give_up(),
                (
                    K::ForwardFailedAfterPivot,
                    Stuck,
                    Pos::forward(4),
                    parked("boom"),
                ),
            ),
            // An operator cancels a pivot in doubt: it did not happen.
            row(
                CHECKOUT,
                Stuck,
                Pos::forward(3),
                cancel(true),
                (
                    K::CancelStuckCompensate,
                    Compensating,
                    Pos::compensate(2),
                    now(Attempts::Reset),
                ),
            ),
            row(
                &[N, P, R],
                Stuck,
                Pos::forward(1),
                cancel(true),
                (
                    K::CancelStuckNothingToCompensate,
                    Compensated,
                    Pos::forward(1),
                    Command::Finish,
                ),
            ),
            refused(
                CHECKOUT,
                Stuck,
                Pos::forward(4),
                cancel(true),
                "only a saga stuck at or before its pivot can be cancelled",
            ),
            refused(
                CHECKOUT,
                Stuck,
                Pos::compensate(2),
                cancel(true),
                "only a saga stuck at or before its pivot can be cancelled",
            ),
            // A failing step without compensation skips itself.
            row(
                &[C, N, P],
                Running,
                Pos::forward(1),
                fail(),
                (
                    K::ForwardFailedCompensate,
                    Compensating,
                    Pos::compensate(0),
                    now(Attempts::Reset),
                ),
            ),
            row(
                CHECKOUT,
                Running,
                Pos::forward(0),
                fail(),
                (
                    K::ForwardFailedNothingToCompensate,
                    Compensated,
                    Pos::forward(0),
                    Command::Finish,
                ),
            ),
            row(
                CHECKOUT,
                Running,
                Pos::forward(4),
                fail(),
                (
                    K::ForwardFailedAfterPivot,
                    Stuck,
                    Pos::forward(4),
                    parked("boom"),
                ),
            ),
            // Cancellation.
            row(
                CHECKOUT,
                Running,
                Pos::forward(2),
                cancel(true),
                (
                    K::CancelCompensate,
                    Compensating,
                    Pos::compensate(2),
                    now(Attempts::Reset),
                ),
            ),
            row(
                CHECKOUT,
                Running,
                Pos::forward(2),
                cancel(false),
                (
                    K::CancelCompensate,
                    Compensating,
                    Pos::compensate(1),
                    now(Attempts::Reset),
                ),
            ),
            row(
                CHECKOUT,
                Running,
                Pos::forward(1),
                cancel(false),
                (
                    K::CancelNothingToCompensate,
                    Compensated,
                    Pos::forward(1),
                    Command::Finish,
                ),
            ),
            row(
                CHECKOUT,
                Running,
                Pos::forward(0),
                cancel(false),
                (
                    K::CancelNothingToCompensate,
                    Compensated,
                    Pos::forward(0),
                    Command::Finish,
                ),
            ),
            refused(
                CHECKOUT,
                Running,
                Pos::forward(4),
                cancel(true),
                "the pivot has succeeded; the saga only goes forward",
            ),
            // Parking.
            row(
                CHECKOUT,
                Running,
                Pos::forward(1),
                park(),
                (K::ParkForward, Stuck, Pos::forward(1), parked("bad state")),
            ),
            row(
                CHECKOUT,
                Compensating,
                Pos::compensate(1),
                park(),
                (
                    K::ParkCompensation,
                    Stuck,
                    Pos::compensate(1),
                    parked("bad state"),
                ),
            ),
            // Compensation walks backwards over steps with compensations.
            row(
                CHECKOUT,
                Compensating,
                Pos::compensate(2),
                Event::Succeeded,
                (
                    K::CompensationSucceeded,
                    Compensating,
                    Pos::compensate(1),
                    now(Attempts::Reset),
                ),
            ),
            row(
                CHECKOUT,
                Compensating,
                Pos::compensate(1),
                Event::Succeeded,
                (
                    K::CompensationSucceededLast,
                    Compensated,
                    Pos::compensate(1),
                    Command::Finish,
                ),
            ),
            row(
                CHECKOUT,
                Compensating,
                Pos::compensate(1),
                Event::RetryScheduled { at: T },
                (
                    K::CompensationRetry,
                    Compensating,
                    Pos::compensate(1),
                    Command::Schedule {
                        at: Some(T),
                        attempts: Attempts::Keep,
                    },
                ),
            ),
            row(
                CHECKOUT,
                Compensating,
                Pos::compensate(2),
                Event::Snoozed { until: T },
                (
                    K::CompensationSnoozed,
                    Compensating,
                    Pos::compensate(2),
                    Command::Schedule {
                        at: Some(T),
                        attempts: Attempts::Refund,
                    },
                ),
            ),
            row(
                CHECKOUT,
                Compensating,
                Pos::compensate(2),
                fail(),
                (
                    K::CompensationFailed,
                    Stuck,
                    Pos::compensate(2),
                    parked("boom"),
                ),
            ),
            refused(
                CHECKOUT,
                Compensating,
                Pos::compensate(2),
                cancel(true),
                "the saga is already being compensated",
            ),
            // Operators resume stuck instances where they stopped.
            row(
                CHECKOUT,
                Stuck,
                Pos::forward(4),
                Event::Resume,
                (
                    K::ResumeForward,
                    Running,
                    Pos::forward(4),
                    now(Attempts::Reset),
                ),
            ),
            row(
                CHECKOUT,
                Stuck,
                Pos::compensate(2),
                Event::Resume,
                (
                    K::ResumeCompensation,
                    Compensating,
                    Pos::compensate(2),
                    now(Attempts::Reset),
                ),
            ),
            // Everything else is refused.
            refused(
                CHECKOUT,
                Running,
                Pos::forward(1),
                Event::Resume,
                "only a stuck saga can be resumed",
            ),
            refused(
                CHECKOUT,
                Compensating,
                Pos::compensate(1),
                Event::Resume,
                "only a stuck saga can be resumed",
            ),
            refused(
                CHECKOUT,
                Stuck,
                Pos::forward(4),
                Event::Succeeded,
                "a stuck saga only accepts resume or cancel",
            ),
            refused(
                CHECKOUT,
                Stuck,
                Pos::compensate(1),
                fail(),
                "a stuck saga only accepts resume or cancel",
            ),
            refused(
                CHECKOUT,
                Completed,
                Pos::forward(4),
                Event::Succeeded,
                "the saga has finished",
            ),
            refused(
                CHECKOUT,
                Completed,
                Pos::forward(4),
                Event::Resume,
                "the saga has finished",
            ),
            refused(
                CHECKOUT,
                Compensated,
                Pos::compensate(1),
                fail(),
                "the saga has finished",
            ),
            refused(
                CHECKOUT,
                Compensated,
                Pos::compensate(1),
                cancel(true),
                "the saga has finished",
            ),
            // Inconsistent positions are refused, not guessed at.
            refused(
                CHECKOUT,
                Running,
                Pos::compensate(1),
                Event::Succeeded,
                "the position's direction does not match the status",
            ),
            refused(
                CHECKOUT,
                Compensating,
                Pos::forward(1),
                Event::Succeeded,
                "the position's direction does not match the status",
            ),
            refused(
                CHECKOUT,
                Running,
                Pos::forward(5),
                Event::Succeeded,
                "the position is past the last step",
            ),
            refused(
                CHECKOUT,
                Compensating,
                Pos::compensate(0),
                Event::Succeeded,
                "the step at the position has no compensation",
            ),
            refused(
                CHECKOUT,
                Stuck,
                Pos::compensate(3),
                Event::Resume,
                "the step at the position has no compensation",
            ),
        ]
    }

    #[test]
    fn every_row_of_the_table_holds_and_every_edge_is_exercised() {
        let mut seen = BTreeSet::new();
        for (n, r) in table().into_iter().enumerate() {
            let got = transition(r.plan, r.status, r.at, &r.event);
            match (&r.expect, got) {
                (Ok((kind, status, position, command)), Ok(t)) => {
                    assert_eq!(
                        (t.kind, t.status, t.position, &t.command),
                        (*kind, *status, *position, command),
                        "row {n}: {:?} {:?} {:?}",
                        r.status,
                        r.at,
                        r.event
                    );
                    seen.insert(t.kind);
                }
                (Err(why), Err(refused)) => {
                    assert_eq!(
                        (refused.why, refused.status, refused.position, refused.event),
                        (*why, r.status, r.at, r.event.name()),
                        "row {n}"
                    );
                }
                (expect, got) => panic!(
                    "row {n}: {:?} {:?} {:?}: expected {expect:?}, got {got:?}",
                    r.status, r.at, r.event
                ),
            }
        }
        let all: BTreeSet<_> = TransitionKind::ALL.into_iter().collect();
        let missing: Vec<_> = all.difference(&seen).collect();
        assert!(missing.is_empty(), "edges never exercised: {missing:?}");
    }

    #[test]
    fn every_status_and_event_pair_is_answered_without_panicking() {
        let events = [
            Event::Succeeded,
            Event::RetryScheduled { at: T },
            Event::Snoozed { until: T },
            fail(),
            give_up(),
            cancel(true),
            cancel(false),
            park(),
            Event::Resume,
        ];
        for status in Status::ALL {
            for step in 0..CHECKOUT.len() {
                for direction in [Direction::Forward, Direction::Compensate] {
                    for event in &events {
                        let at = Position { step, direction };
                        if let Ok(t) = transition(CHECKOUT, status, at, event) {
                            // Compensations only ever run on steps that have one.
                            if t.status == Status::Compensating {
                                assert!(CHECKOUT[t.position.step].has_compensation());
                                assert!(t.position.step <= step);
                            }
                            assert!(!status.is_terminal());
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn an_unplaceable_instance_is_parked_in_place_only_while_runnable() {
        use TransitionKind as K;
        let cases = [
            (Status::Running, Some(K::ParkForward)),
            (Status::Compensating, Some(K::ParkCompensation)),
            (Status::Stuck, None),
            (Status::Completed, None),
            (Status::Compensated, None),
        ];
        for (status, kind) in cases {
            let got = park_in_place(status, "unknown step".into());
            let want = kind.map(|kind| ParkedInPlace {
                kind,
                status: Status::Stuck,
                command: parked("unknown step"),
            });
            assert_eq!(got, want, "{status}");
        }
    }

    #[test]
    fn statuses_round_trip_through_their_names() {
        for s in Status::ALL {
            assert_eq!(s.as_str().parse::<Status>().unwrap(), s);
        }
        assert!("paused".parse::<Status>().is_err());
    }
}
