//! How a [`Dispatcher`](super::Dispatcher) works, and what it reports.

use std::time::Duration;

use saga_core::{Jitter, RetryPolicy};

#[cfg(doc)]
use super::Dispatcher;

/// Which order messages are published in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum DeliveryOrder {
    /// No order: every due message may be published at once, by any
    /// dispatcher. The fastest.
    #[default]
    Unordered,
    /// Messages with the same key are published one at a time in enqueue
    /// order; different keys (and messages without a key) proceed in
    /// parallel. A key's next message waits until the previous one is
    /// published or dead-lettered (see the [module docs](super)). Every
    /// dispatcher of the outbox must use it: one
    /// [`Unordered`](DeliveryOrder::Unordered) dispatcher beside them voids
    /// the ordering.
    PerKey,
}

/// The outbox's default retry policy: 1 s doubling to at most 5 minutes,
/// 20 attempts (about an hour of failures), equal jitter, no time cap.
/// Patient, because a broker outage should delay messages, not dead-letter
/// them.
#[must_use]
pub fn default_retry_policy() -> RetryPolicy {
    RetryPolicy::builder()
        .initial_delay(Duration::from_secs(1))
        .multiplier(2.0)
        .max_delay(Duration::from_secs(300))
        .max_attempts(20)
        .no_max_elapsed()
        .jitter(Jitter::Equal)
        .build()
        .expect("the default outbox retry policy is valid")
}

/// The dispatcher's default backoff while the broker is unavailable: 1 s
/// doubling to at most 60 s, equal jitter. Only its delays are used (its
/// attempt budget is not: an outage never gives up).
#[must_use]
pub fn default_outage_backoff() -> RetryPolicy {
    RetryPolicy::builder()
        .initial_delay(Duration::from_secs(1))
        .multiplier(2.0)
        .max_delay(Duration::from_secs(60))
        .max_attempts(u32::MAX)
        .no_max_elapsed()
        .jitter(Jitter::Equal)
        .build()
        .expect("the default outage backoff is valid")
}

/// How a [`Dispatcher`] works. Build one with [`Dispatcher::builder`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DispatcherConfig {
    /// Most messages claimed (and handed to the publisher) at once.
    pub batch_size: usize,
    /// How long a claim is held. A dispatcher that dies leaves its batch to
    /// others once this has passed (on the database server's clock); keep
    /// it well above `publish_timeout`.
    pub lease_for: Duration,
    /// Longest wait for the publisher; past it the batch counts as failed
    /// (outcome unknown: it is published again later, with the same ids).
    pub publish_timeout: Duration,
    /// How often an idle dispatcher looks for due messages. Notifications
    /// wake it sooner; polling is what guarantees delivery.
    pub poll_interval: Duration,
    /// Per-message backoff and the attempt budget before dead-lettering.
    /// Attempts count claims; elapsed time (`max_elapsed`) counts from the
    /// message's first claim, so a message delayed with `deliver_after` or
    /// a dead letter redriven long after its enqueue gets the whole budget.
    pub retry: RetryPolicy,
    /// The backoff while the broker is unavailable (a publisher reported
    /// [`PublishError::unavailable`](super::PublishError::unavailable) and
    /// nothing of the batch was published): the batch is released without
    /// spending the messages' attempts, due again after
    /// `delay(n)` for the `n`th consecutive such cycle, and this
    /// dispatcher's loop waits as long before claiming again. Only the
    /// policy's delays are used. Default [`default_outage_backoff`].
    pub outage_backoff: RetryPolicy,
    /// Unordered, or ordered per key.
    pub order: DeliveryOrder,
    /// Batches this dispatcher works on at once (each its own
    /// claim-publish-settle loop).
    pub concurrency: usize,
    /// How often [`run`](Dispatcher::run) refreshes the outbox gauges;
    /// `None`: never.
    pub stats_interval: Option<Duration>,
    /// How often the `LISTEN` connection is checked for life.
    pub listen_health_interval: Duration,
}

impl Default for DispatcherConfig {
    fn default() -> Self {
        DispatcherConfig {
            batch_size: 100,
            lease_for: Duration::from_secs(60),
            publish_timeout: Duration::from_secs(20),
            poll_interval: Duration::from_secs(1),
            retry: default_retry_policy(),
            outage_backoff: default_outage_backoff(),
            order: DeliveryOrder::Unordered,
            concurrency: 1,
            stats_interval: Some(Duration::from_secs(15)),
            listen_health_interval: Duration::from_secs(30),
        }
    }
}

/// What one [`dispatch_once`](Dispatcher::dispatch_once) (or a series of
/// them) did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct DispatchReport {
    /// Messages claimed.
    pub claimed: u64,
    /// Messages published and deleted.
    pub published: u64,
    /// Messages that failed and were rescheduled.
    pub retried: u64,
    /// Messages dead-lettered (failed past their budget, failed
    /// permanently, or abandoned by dispatchers past their budget).
    pub dead_lettered: u64,
    /// Messages put back without spending an attempt because the broker
    /// was unavailable (due again after the outage backoff).
    pub released: u64,
    /// Cycles that found the broker unavailable (nothing published, the
    /// publisher said so) and backed off as a whole.
    pub outages: u64,
    /// Messages whose lease was taken over by another dispatcher before
    /// this one could settle them (they will be published again).
    pub lost_leases: u64,
}

impl std::ops::AddAssign for DispatchReport {
    fn add_assign(&mut self, o: Self) {
        self.claimed += o.claimed;
        self.published += o.published;
        self.retried += o.retried;
        self.dead_lettered += o.dead_lettered;
        self.lost_leases += o.lost_leases;
        self.released += o.released;
        self.outages += o.outages;
    }
}
