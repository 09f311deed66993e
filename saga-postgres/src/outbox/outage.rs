//! Telling a broker outage from a message's own failure.
//!
//! A message's attempt budget ([`DispatcherConfig::retry`]) is meant for
//! failures of *that message*. A broker that is down fails every message,
//! and spending their budgets would dead-letter the whole backlog once an
//! outage outlasts the budget (an hour with the defaults). So a publisher
//! reports failures that are the broker's with
//! [`PublishError::unavailable`], and the dispatcher, per batch:
//!
//! - puts a message that failed that way back without spending an attempt
//!   (*released*: due again after the outage backoff);
//! - when no message of the batch was published and at least one failed
//!   that way, judges the broker down: it releases every message that
//!   failed transiently too (with the broker down their failures say
//!   nothing about them), and backs off as a whole for the
//!   [`outage_backoff`](DispatcherConfig::outage_backoff) delay, growing
//!   with each consecutive outage cycle;
//! - still spends the budget of a message that failed on its own while
//!   others were published, and still dead-letters at once a message the
//!   publisher calls permanently unpublishable.
//!
//! The decision is pure ([`verdict`], [`disposal`]); the dispatcher does the
//! I/O and the waiting (never inside a transaction).
//!
//! [`DispatcherConfig::retry`]: super::DispatcherConfig::retry
//! [`PublishError::unavailable`]: super::PublishError::unavailable

use std::sync::atomic::{AtomicU32, Ordering};

#[cfg(doc)]
use super::DispatcherConfig;

/// How one message of a batch fared with the publisher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fared {
    /// Published.
    Published,
    /// Failed, maybe worth retrying (includes a publish timeout, a
    /// panicking publisher, a missing result).
    Failed,
    /// Refused for good: the publisher called it permanent.
    Refused,
    /// The broker was unavailable.
    Unavailable,
}

/// What a batch says about the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The broker works (or the batch says nothing against it): failures
    /// are the messages'.
    Up,
    /// Nothing was published and the publisher said the broker is
    /// unavailable: back off as a whole.
    Down,
}

/// What becomes of a message that was not published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Disposal {
    /// Its failure counts: the retry policy reschedules it or, past its
    /// budget, dead-letters it.
    Spend,
    /// Put back, its attempt not counted, due after the outage backoff.
    Release,
    /// Dead-lettered now.
    DeadLetter,
}

/// The broker is down when no message of the batch was published and the
/// publisher reported it unavailable for at least one.
pub(crate) fn verdict(batch: &[Fared]) -> Verdict {
    let published = batch.contains(&Fared::Published);
    let unavailable = batch.contains(&Fared::Unavailable);
    if unavailable && !published {
        Verdict::Down
    } else {
        Verdict::Up
    }
}

/// What to do with a message that fared `fared` in a batch judged
/// `verdict`; `None` for a published one.
pub(crate) fn disposal(verdict: Verdict, fared: Fared) -> Option<Disposal> {
    match (verdict, fared) {
        (_, Fared::Published) => None,
        (_, Fared::Refused) => Some(Disposal::DeadLetter),
        (_, Fared::Unavailable) | (Verdict::Down, Fared::Failed) => Some(Disposal::Release),
        (Verdict::Up, Fared::Failed) => Some(Disposal::Spend),
    }
}

/// Consecutive cycles that found the broker down, shared by a dispatcher's
/// loops: the outage backoff grows with it.
#[derive(Debug, Default)]
pub(crate) struct OutageStreak(AtomicU32);

impl OutageStreak {
    /// Records a batch: returns the streak to compute the backoff from
    /// (at least 1) if anything was released, or `None`. A published
    /// message ends the streak.
    pub(crate) fn record(&self, verdict: Verdict, published: bool, released: bool) -> Option<u32> {
        if published {
            self.0.store(0, Ordering::Relaxed);
        }
        match verdict {
            Verdict::Down => Some(self.0.fetch_add(1, Ordering::Relaxed).saturating_add(1)),
            Verdict::Up if released => Some(self.0.load(Ordering::Relaxed).max(1)),
            Verdict::Up => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Fared::{Failed, Published, Refused, Unavailable};

    #[test]
    fn the_broker_is_down_only_when_nothing_was_published_and_it_said_so() {
        let table: &[(&[Fared], Verdict)] = &[
            (&[Unavailable], Verdict::Down),
            (&[Unavailable, Unavailable, Unavailable], Verdict::Down),
            (&[Unavailable, Failed], Verdict::Down),
            (&[Failed, Unavailable, Refused], Verdict::Down),
            (&[Published, Unavailable], Verdict::Up),
            (&[Unavailable, Published], Verdict::Up),
            // Transient failures alone say nothing about the broker: a
            // poison message alone in its batch must still use its budget.
            (&[Failed], Verdict::Up),
            (&[Failed, Failed, Failed], Verdict::Up),
            (&[Refused], Verdict::Up),
            (&[Published, Failed], Verdict::Up),
            (&[], Verdict::Up),
        ];
        for (batch, expected) in table {
            assert_eq!(verdict(batch), *expected, "{batch:?}");
        }
    }

    #[test]
    fn only_a_message_s_own_failure_spends_its_budget() {
        use Disposal::{DeadLetter, Release, Spend};
        let table = [
            (Verdict::Up, Published, None),
            (Verdict::Up, Failed, Some(Spend)),
            (Verdict::Up, Refused, Some(DeadLetter)),
            (Verdict::Up, Unavailable, Some(Release)),
            (Verdict::Down, Published, None),
            (Verdict::Down, Failed, Some(Release)),
            (Verdict::Down, Refused, Some(DeadLetter)),
            (Verdict::Down, Unavailable, Some(Release)),
        ];
        for (v, fared, expected) in table {
            assert_eq!(disposal(v, fared), expected, "{v:?} {fared:?}");
        }
    }

    #[test]
    fn the_outage_streak_grows_until_a_message_is_published() {
        let streak = OutageStreak::default();
        assert_eq!(streak.record(Verdict::Up, true, false), None);
        assert_eq!(streak.record(Verdict::Down, false, true), Some(1));
        assert_eq!(streak.record(Verdict::Down, false, true), Some(2));
        assert_eq!(streak.record(Verdict::Up, false, false), None);
        assert_eq!(streak.record(Verdict::Down, false, true), Some(3));
        // Released beside published messages: the shortest backoff.
        assert_eq!(streak.record(Verdict::Up, true, true), Some(1));
        assert_eq!(streak.record(Verdict::Down, false, true), Some(1));
    }
}
