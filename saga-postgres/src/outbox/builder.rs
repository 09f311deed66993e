//! [`DispatcherBuilder`]: a [`Dispatcher`]'s configuration, validated.

use std::sync::Arc;
use std::time::Duration;

use rand::SeedableRng;
use rand::rngs::StdRng;
use saga_core::RetryPolicy;

use super::config::{DeliveryOrder, DispatcherConfig};
use super::dispatcher::Dispatcher;
use super::enqueue::Outbox;
use super::error::OutboxError;
use super::publisher::Publisher;
use crate::tls::ConnectConfig;

/// Builds a [`Dispatcher`].
#[must_use]
pub struct DispatcherBuilder<P> {
    outbox: Outbox,
    publisher: Arc<P>,
    config: DispatcherConfig,
    listen: Option<ConnectConfig>,
    seed: Option<u64>,
}

impl<P> std::fmt::Debug for DispatcherBuilder<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DispatcherBuilder")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<P: Publisher> DispatcherBuilder<P> {
    /// Replaces the whole configuration.
    pub fn config(mut self, config: DispatcherConfig) -> Self {
        self.config = config;
        self
    }

    /// Most messages per batch (default 100).
    pub fn batch_size(mut self, n: usize) -> Self {
        self.config.batch_size = n;
        self
    }

    /// Lease on a claimed batch (default 60 s).
    pub fn lease_for(mut self, d: Duration) -> Self {
        self.config.lease_for = d;
        self
    }

    /// Longest wait for the publisher (default 20 s).
    pub fn publish_timeout(mut self, d: Duration) -> Self {
        self.config.publish_timeout = d;
        self
    }

    /// How often an idle dispatcher polls (default 1 s).
    pub fn poll_interval(mut self, d: Duration) -> Self {
        self.config.poll_interval = d;
        self
    }

    /// Backoff and attempt budget (default [`default_retry_policy`](super::default_retry_policy)).
    pub fn retry_policy(mut self, policy: RetryPolicy) -> Self {
        self.config.retry = policy;
        self
    }

    /// The backoff while the broker is unavailable (default
    /// [`default_outage_backoff`](super::default_outage_backoff); see
    /// [`DispatcherConfig::outage_backoff`]).
    pub fn outage_backoff(mut self, policy: RetryPolicy) -> Self {
        self.config.outage_backoff = policy;
        self
    }

    /// Unordered (default) or ordered per key.
    pub fn order(mut self, order: DeliveryOrder) -> Self {
        self.config.order = order;
        self
    }

    /// Batches worked on at once (default 1).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.config.concurrency = n;
        self
    }

    /// How often to refresh the outbox gauges (default 15 s; `None`: never).
    pub fn stats_interval(mut self, d: Option<Duration>) -> Self {
        self.config.stats_interval = d;
        self
    }

    /// Listens for `NOTIFY` on its own connection made with `config`, to
    /// wake up as soon as a transaction enqueues messages. Without it the
    /// dispatcher only polls. `config` is a [`ConnectConfig`] (e.g. parsed
    /// from the same URL as the pool, `sslmode` and all) or a driver
    /// configuration (secured as its own `ssl_mode` says). A connection
    /// that fails is logged with its cause, counted in
    /// [`ListenerStatus::failures`](super::ListenerStatus::failures), and retried; polling delivers
    /// meanwhile.
    pub fn listen(mut self, config: impl Into<ConnectConfig>) -> Self {
        self.listen = Some(config.into());
        self
    }

    /// Seeds the jitter of the retry delays (for reproducible tests).
    pub fn rng_seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Validates the configuration.
    pub fn build(self) -> Result<Dispatcher<P>, OutboxError> {
        let c = &self.config;
        if c.batch_size == 0 {
            return Err(OutboxError::InvalidConfig("batch_size must be at least 1"));
        }
        if c.concurrency == 0 {
            return Err(OutboxError::InvalidConfig("concurrency must be at least 1"));
        }
        if c.publish_timeout.is_zero() || c.publish_timeout >= c.lease_for {
            return Err(OutboxError::InvalidConfig(
                "publish_timeout must be above zero and below lease_for",
            ));
        }
        if c.poll_interval.is_zero() {
            return Err(OutboxError::InvalidConfig(
                "poll_interval must be above zero",
            ));
        }
        if c.listen_health_interval.is_zero() || c.stats_interval.is_some_and(|d| d.is_zero()) {
            return Err(OutboxError::InvalidConfig("intervals must be above zero"));
        }
        let rng = match self.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Ok(Dispatcher::assemble(
            self.outbox,
            self.publisher,
            self.config,
            self.listen,
            rng,
        ))
    }
}

impl<P: Publisher> DispatcherBuilder<P> {
    /// A builder around a shared publisher.
    pub fn from_arc(outbox: Outbox, publisher: Arc<P>) -> Self {
        DispatcherBuilder {
            outbox,
            publisher,
            config: DispatcherConfig::default(),
            listen: None,
            seed: None,
        }
    }
}
