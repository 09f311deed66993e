//! [`Dispatcher`]: claim short, publish outside, settle short.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use backon::BackoffBuilder;
use rand::rngs::StdRng;
use saga_core::{RetryDecision, StepErrorKind, Timestamp};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::task::AbortOnDropHandle;
use uuid::Uuid;

use super::admin::read_message;
use super::builder::DispatcherBuilder;
use super::config::{DeliveryOrder, DispatchReport, DispatcherConfig};
use super::enqueue::Outbox;
use super::error::OutboxError;
use super::listener::{ListenerStatus, listen};
use super::outage::{Disposal, Fared, OutageStreak, Verdict, disposal, verdict};
use super::publisher::{Outgoing, PublishError, Publisher};
use crate::db::Budget;
use crate::db::ambiguity::{AmbiguityCounters, claim_once};
use crate::db::rows::{col, count64, micros, only, ts};
use crate::error::chain;
use crate::tls::ConnectConfig;

/// The longest `last_error` text stored, in bytes.
const MAX_ERROR_LEN: usize = 2000;

struct Inner<P> {
    outbox: Outbox,
    publisher: Arc<P>,
    config: DispatcherConfig,
    listen: Option<ConnectConfig>,
    rng: Mutex<StdRng>,
    status: watch::Sender<ListenerStatus>,
    ambiguity: AmbiguityCounters,
    outage: OutageStreak,
}

/// Publishes outbox messages through a [`Publisher`], at least once.
///
/// Each cycle claims a batch of due messages in one short statement
/// (`FOR UPDATE SKIP LOCKED`, setting a lease on the rows), publishes them
/// with no transaction open, then, in one statement guarded by the lease
/// token, deletes the published ones and reschedules (or dead-letters) the
/// failed ones. Several dispatchers, in one process or many, share the work
/// safely. Cheap to clone.
pub struct Dispatcher<P> {
    inner: Arc<Inner<P>>,
}

impl<P> Clone for Dispatcher<P> {
    fn clone(&self) -> Self {
        Dispatcher {
            inner: self.inner.clone(),
        }
    }
}

impl<P> std::fmt::Debug for Dispatcher<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher")
            .field("outbox", &self.inner.outbox)
            .field("config", &self.inner.config)
            .field("listens", &self.inner.listen.is_some())
            .finish_non_exhaustive()
    }
}

/// What one settle statement did, row counts.
struct Settled {
    published: u64,
    retried: u64,
    dead: u64,
    released: u64,
}

/// Why a publish attempt as a whole failed.
#[derive(Debug, thiserror::Error)]
enum BatchFailure {
    #[error("the publisher did not finish within {0:?}; the outcome is unknown")]
    TimedOut(Duration),
    #[error("the publisher panicked: {0}")]
    Panicked(String),
    #[error("the publisher returned no result for this message")]
    NoResult,
}

fn truncate(mut s: String) -> String {
    if s.len() > MAX_ERROR_LEN {
        let mut end = MAX_ERROR_LEN;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

/// An exponential backoff for in-process retries (database errors in the
/// loop, reconnecting the listener).
pub(crate) fn loop_backoff(max: Duration) -> impl Iterator<Item = Duration> + Send {
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(max.max(Duration::from_millis(50)))
        .with_jitter()
        .without_max_times()
        .build()
}

impl<P: Publisher> Dispatcher<P> {
    /// A dispatcher of a validated configuration (by the builder).
    pub(super) fn assemble(
        outbox: Outbox,
        publisher: Arc<P>,
        config: DispatcherConfig,
        listen: Option<ConnectConfig>,
        rng: StdRng,
    ) -> Self {
        let (status, _) = watch::channel(ListenerStatus::default());
        Dispatcher {
            inner: Arc::new(Inner {
                outbox,
                publisher,
                config,
                listen,
                rng: Mutex::new(rng),
                status,
                ambiguity: AmbiguityCounters::default(),
                outage: OutageStreak::default(),
            }),
        }
    }

    /// A builder for a dispatcher of `outbox`'s messages through
    /// `publisher`.
    pub fn builder(outbox: Outbox, publisher: P) -> DispatcherBuilder<P> {
        DispatcherBuilder::from_arc(outbox, Arc::new(publisher))
    }

    /// The outbox.
    #[must_use]
    pub fn outbox(&self) -> &Outbox {
        &self.inner.outbox
    }

    /// The publisher.
    #[must_use]
    pub fn publisher(&self) -> &Arc<P> {
        &self.inner.publisher
    }

    /// The configuration.
    #[must_use]
    pub fn config(&self) -> &DispatcherConfig {
        &self.inner.config
    }

    /// Watches the `LISTEN` connection of [`run`](Dispatcher::run): whether
    /// it is listening, and how many times it has connected.
    #[must_use]
    pub fn listener_status(&self) -> watch::Receiver<ListenerStatus> {
        self.inner.status.subscribe()
    }

    /// One cycle: claims up to a batch of due messages, publishes them, and
    /// settles them (deletes the published, reschedules or dead-letters the
    /// failed, releases those the broker was unavailable for). Two
    /// statements in all (claim, settle), neither open while publishing.
    /// It never waits for a backoff: a cycle that finds the broker down
    /// (counted in [`DispatchReport::outages`]) makes its messages due
    /// after the outage backoff instead.
    pub async fn dispatch_once(&self) -> Result<DispatchReport, OutboxError> {
        Ok(self.cycle().await?.0)
    }

    /// [`dispatch_once`](Dispatcher::dispatch_once), also returning how
    /// many rows the claim returned, and how long to back off if the
    /// broker was found down.
    async fn cycle(&self) -> Result<(DispatchReport, u64, Option<Duration>), OutboxError> {
        let inner = &*self.inner;
        let outbox = &inner.outbox.inner;
        let config = &inner.config;
        let mut report = DispatchReport::default();

        // Claim. The lease token, written into every row leased, finds
        // them again if the reply is lost.
        outbox.clock.sync(&outbox.db, &outbox.sql.server_time).await;
        let token = Uuid::now_v7();
        let lease_for = micros(config.lease_for);
        let limit = i64::try_from(config.batch_size).unwrap_or(i64::MAX);
        let max_attempts = i32::try_from(config.retry.max_attempts()).unwrap_or(i32::MAX);
        let stmt = match config.order {
            DeliveryOrder::Unordered => &outbox.sql.claim_unordered,
            DeliveryOrder::PerKey => &outbox.sql.claim_by_key,
        };
        let (tokenr, lease_forr, limitr, max_attemptsr) =
            (&token, &lease_for, &limit, &max_attempts);
        let rows = claim_once(
            &outbox.db,
            "outbox_claim",
            &mut outbox.db.budget(),
            &inner.ambiguity,
            |d| async move {
                let now = outbox.clock.bind();
                outbox
                    .db
                    .attempt(
                        d,
                        stmt,
                        &[
                            ("now", &now),
                            ("limit", limitr),
                            ("token", tokenr),
                            ("lease_for_us", lease_forr),
                            ("max_attempts", max_attemptsr),
                        ],
                    )
                    .await
            },
            |d| async move {
                let now = outbox.clock.bind();
                outbox
                    .db
                    .attempt(
                        d,
                        &outbox.sql.claimed_by,
                        &[
                            ("now", &now),
                            ("lease_for_us", lease_forr),
                            ("token", tokenr),
                        ],
                    )
                    .await
            },
        )
        .await?;
        let now = outbox.clock.clock().now();
        let rows_claimed = u64::try_from(rows.len()).unwrap_or(u64::MAX);
        if rows.is_empty() {
            return Ok((report, 0, None));
        }
        let mut batch = Vec::with_capacity(rows.len());
        // When each message of `batch` was first claimed (the retry policy's
        // elapsed time counts from it).
        let mut first_attempts = Vec::with_capacity(rows.len());
        let mut failed_ids = Vec::new();
        let mut failed_errors = Vec::new();
        let mut failed_retry_at: Vec<Option<SystemTime>> = Vec::new();
        let mut failed_release = Vec::new();
        for row in &rows {
            let id: Uuid = col(row, "id")?;
            if col::<bool>(row, "abandoned")? {
                tracing::error!(message_id = %id,
                    "outbox message dead-lettered: abandoned by dispatchers past its attempt budget");
                report.dead_lettered += 1;
                continue;
            }
            match read_message(row) {
                Ok((message, created_at, attempt, saga_id)) => {
                    let first_attempt: Option<SystemTime> = col(row, "first_attempt_at")?;
                    first_attempts.push(first_attempt.map_or(now, ts));
                    batch.push(Outgoing {
                        message,
                        created_at,
                        attempt,
                        saga_id,
                    });
                }
                Err(e) => {
                    // A row that cannot be read cannot be published: dead-
                    // letter it rather than let it come back forever.
                    let text = chain(&e);
                    tracing::error!(message_id = %id, error = %text,
                        "unreadable outbox row dead-lettered");
                    failed_ids.push(id);
                    failed_errors.push(truncate(format!("unreadable row: {text}")));
                    failed_retry_at.push(None);
                    failed_release.push(false);
                }
            }
        }
        report.claimed = rows_claimed - report.dead_lettered;

        // Publish, with nothing open and nothing locked.
        let batch = Arc::new(batch);
        let results = if batch.is_empty() {
            Vec::new()
        } else {
            self.publish(batch.clone()).await
        };

        // Settle. Was the broker down, or did messages fail on their own?
        let now = outbox.clock.clock().now();
        let fared: Vec<Fared> = (0..batch.len())
            .map(|i| match results.get(i) {
                Some(Ok(())) => Fared::Published,
                Some(Err(e)) if e.is_unavailable() => Fared::Unavailable,
                Some(Err(e)) if e.is_permanent() => Fared::Refused,
                _ => Fared::Failed,
            })
            .collect();
        let verdict = verdict(&fared);
        let released = fared
            .iter()
            .any(|f| disposal(verdict, *f) == Some(Disposal::Release));
        let release_delay = self
            .inner
            .outage
            .record(verdict, fared.contains(&Fared::Published), released)
            .map(|streak| {
                let mut rng = self.inner.rng.lock().unwrap_or_else(|e| e.into_inner());
                self.inner.config.outage_backoff.delay(streak, &mut *rng)
            });
        let mut published = Vec::with_capacity(batch.len());
        for (i, out) in batch.iter().enumerate() {
            let text = match results.get(i) {
                Some(Ok(())) => {
                    published.push(out.message.id.as_uuid());
                    continue;
                }
                Some(Err(e)) => chain(e),
                None => chain(&BatchFailure::NoResult),
            };
            let (retry_at, text, release) = match disposal(verdict, fared[i]) {
                Some(Disposal::Release) => {
                    let at = now + release_delay.unwrap_or_default();
                    tracing::debug!(message_id = %out.message.id, error = %text,
                        retry_at = ?at, "outbox message released: the broker is unavailable");
                    let text = format!("{text} (the broker was unavailable; attempt not counted)");
                    (Some(at.to_system_time()), text, true)
                }
                other => {
                    let permanent = other == Some(Disposal::DeadLetter);
                    let (retry_at, text) =
                        self.decide(out, first_attempts[i], permanent, now, text);
                    tracing::warn!(message_id = %out.message.id, topic = %out.message.topic,
                        attempt = out.attempt, error = %text, retry_at = ?retry_at.map(ts),
                        "outbox message failed to publish");
                    (retry_at, text, false)
                }
            };
            failed_ids.push(out.message.id.as_uuid());
            failed_errors.push(truncate(text));
            failed_retry_at.push(retry_at);
            failed_release.push(release);
        }
        let outage = (verdict == Verdict::Down).then(|| release_delay.unwrap_or_default());
        if published.is_empty() && failed_ids.is_empty() {
            self.count(&report);
            return Ok((report, rows_claimed, outage));
        }
        let settled = self
            .settle(
                &published,
                token,
                &failed_ids,
                &failed_errors,
                &failed_retry_at,
                &failed_release,
            )
            .await?;
        report.published = settled.published;
        report.retried = settled.retried;
        report.dead_lettered += settled.dead;
        report.released = settled.released;
        report.lost_leases = report
            .claimed
            .saturating_sub(settled.published + settled.retried + settled.dead + settled.released);
        if report.lost_leases > 0 {
            tracing::warn!(
                lost = report.lost_leases,
                "outbox lease expired during publishing and was taken over; those messages will be published again"
            );
        }
        if let Some(delay) = outage {
            report.outages = 1;
            tracing::warn!(released = report.released, dead_lettered = report.dead_lettered,
                retry_in = ?delay,
                "the broker is unavailable: the batch was put back without spending attempts; backing off");
        }
        self.count(&report);
        Ok((report, rows_claimed, outage))
    }

    /// Runs [`dispatch_once`](Dispatcher::dispatch_once) until a cycle
    /// claims nothing, and sums up what was done. Messages scheduled for
    /// later (delayed, or waiting for a retry) are left for later.
    pub async fn run_until_idle(&self) -> Result<DispatchReport, OutboxError> {
        let mut total = DispatchReport::default();
        loop {
            let (report, rows, _) = self.cycle().await?;
            total += report;
            if rows == 0 {
                return Ok(total);
            }
        }
    }

    /// Dispatches until `shutdown` completes: `concurrency` claim-publish-
    /// settle loops, woken by notifications (if configured with
    /// [`listen`](DispatcherBuilder::listen)) and by polling, plus the
    /// listener and the gauges. Database errors are logged and retried with
    /// backoff; nothing here gives up. On shutdown, batches being published
    /// are finished and settled first.
    pub async fn run(&self, shutdown: impl Future<Output = ()> + Send) {
        let (stop_tx, stop_rx) = watch::channel(false);
        // Wake-ups are numbered on from those of an earlier run, so that
        // `ListenerStatus::wake_ups` keeps counting up.
        let (wake_tx, _) = watch::channel(self.inner.status.borrow().wake_ups);
        let mut tasks = JoinSet::new();
        if let Some(config) = &self.inner.listen {
            tasks.spawn(listen(
                config.clone(),
                self.inner.outbox.inner.schema.to_string(),
                self.inner.outbox.inner.sql.channel.clone(),
                self.inner.config.listen_health_interval,
                wake_tx.clone(),
                self.inner.status.clone(),
                stop_rx.clone(),
            ));
        }
        for _ in 0..self.inner.config.concurrency {
            tasks.spawn(self.clone().work(wake_tx.subscribe(), stop_rx.clone()));
        }
        if let Some(every) = self.inner.config.stats_interval {
            let outbox = self.inner.outbox.clone();
            let mut stop = stop_rx.clone();
            tasks.spawn(async move {
                let mut tick = tokio::time::interval(every);
                loop {
                    tokio::select! {
                        _ = tick.tick() => {
                            if let Err(e) = outbox.record_stats().await {
                                tracing::warn!(error = %chain(&e), "could not read outbox stats");
                            }
                        }
                        _ = stop.changed() => return,
                    }
                }
            });
        }
        shutdown.await;
        let _ = stop_tx.send(true);
        while tasks.join_next().await.is_some() {}
    }

    /// One claim-publish-settle loop of [`run`](Dispatcher::run).
    async fn work(self, mut wake: watch::Receiver<u64>, mut stop: watch::Receiver<bool>) {
        let config = &self.inner.config;
        let batch = u64::try_from(config.batch_size).unwrap_or(u64::MAX);
        let mut errors: Option<Box<dyn Iterator<Item = Duration> + Send>> = None;
        loop {
            if *stop.borrow() {
                return;
            }
            // A wake-up from here on triggers another round.
            let woken_by = *wake.borrow_and_update();
            match self.cycle().await {
                Ok((_, rows, outage)) => {
                    errors = None;
                    if outage.is_none() && rows >= batch {
                        // A full batch: more is probably waiting.
                        continue;
                    }
                    if rows < batch {
                        // Everything due when `woken_by` was sent is claimed.
                        self.inner.status.send_if_modified(|s| {
                            let newer = woken_by > s.wake_ups_handled;
                            if newer {
                                s.wake_ups_handled = woken_by;
                            }
                            newer
                        });
                    }
                    if let Some(delay) = outage {
                        // The broker is down: wait (no transaction open,
                        // nothing leased) rather than claim again at once.
                        tokio::select! {
                            () = tokio::time::sleep(delay) => {}
                            _ = stop.changed() => {}
                        }
                        continue;
                    }
                }
                Err(e) => {
                    let delay = errors
                        .get_or_insert_with(|| {
                            Box::new(loop_backoff(
                                config.poll_interval.max(Duration::from_secs(5)),
                            ))
                        })
                        .next()
                        .unwrap_or(config.poll_interval);
                    tracing::warn!(error = %chain(&e), retry_in = ?delay,
                        "outbox dispatch failed; retrying");
                    ::metrics::counter!(crate::metrics::OUTBOX_DISPATCH_ERRORS).increment(1);
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        _ = stop.changed() => {}
                    }
                    continue;
                }
            }
            tokio::select! {
                r = wake.changed() => {
                    if r.is_err() {
                        // No more wake-ups can come: poll.
                        tokio::time::sleep(config.poll_interval).await;
                    }
                }
                () = tokio::time::sleep(config.poll_interval) => {}
                _ = stop.changed() => {}
            }
        }
    }

    /// Publishes `batch` in its own task (a panicking publisher fails the
    /// batch instead of the dispatcher), within the publish timeout.
    async fn publish(&self, batch: Arc<Vec<Outgoing>>) -> Vec<Result<(), PublishError>> {
        let n = batch.len();
        let publisher = self.inner.publisher.clone();
        let handle = tokio::spawn(async move { publisher.publish(&batch).await });
        // Aborted if this future is dropped or the publish times out.
        let handle = AbortOnDropHandle::new(handle);
        let failure = match tokio::time::timeout(self.inner.config.publish_timeout, handle).await {
            Ok(Ok(results)) => return results,
            Ok(Err(join)) => {
                let text = if join.is_panic() {
                    saga_core::panic_message(&*join.into_panic()).to_owned()
                } else {
                    "cancelled".to_owned()
                };
                BatchFailure::Panicked(text)
            }
            Err(_) => BatchFailure::TimedOut(self.inner.config.publish_timeout),
        };
        let text = failure.to_string();
        (0..n)
            .map(|_| Err(PublishError::transient(text.clone())))
            .collect()
    }

    /// When to try a failed message again (`None`: dead-letter it), and
    /// the text to store.
    fn decide(
        &self,
        out: &Outgoing,
        first_attempt_at: Timestamp,
        permanent: bool,
        now: Timestamp,
        text: String,
    ) -> (Option<SystemTime>, String) {
        let kind = if permanent {
            StepErrorKind::Permanent
        } else {
            StepErrorKind::Retryable
        };
        let decision = {
            let mut rng = self.inner.rng.lock().unwrap_or_else(|e| e.into_inner());
            self.inner
                .config
                .retry
                .decide(kind, out.attempt, first_attempt_at, now, &mut *rng)
        };
        match decision {
            RetryDecision::RetryAt { at, .. } => (Some(at.to_system_time()), text),
            RetryDecision::GiveUp(reason) => (None, format!("{text} (dead-lettered: {reason})")),
        }
    }

    /// Deletes the published and reschedules the failed, in one statement
    /// guarded by the lease token. Safe to repeat, so it is retried through
    /// connection failures (by [`crate::db`]) for up to the lease duration;
    /// past that, the messages are published again by whoever claims them
    /// next.
    async fn settle(
        &self,
        published: &[Uuid],
        token: Uuid,
        failed_ids: &[Uuid],
        failed_errors: &[String],
        failed_retry_at: &[Option<SystemTime>],
        failed_release: &[bool],
    ) -> Result<Settled, OutboxError> {
        let outbox = &self.inner.outbox.inner;
        let mut budget = Budget::new(self.inner.config.lease_for);
        let now = outbox.clock.bind();
        let rows = outbox
            .db
            .query_in(
                &mut budget,
                &outbox.sql.settle,
                &[
                    ("published", &published),
                    ("token", &token),
                    ("now", &now),
                    ("failed_ids", &failed_ids),
                    ("failed_errors", &failed_errors),
                    ("failed_retry_at", &failed_retry_at),
                    ("failed_release", &failed_release),
                ],
            )
            .await?;
        let row = only(&rows, "settle")?;
        Ok(Settled {
            published: count64(row, "published")?,
            retried: count64(row, "retried")?,
            dead: count64(row, "dead")?,
            released: count64(row, "released")?,
        })
    }

    fn count(&self, r: &DispatchReport) {
        ::metrics::counter!(crate::metrics::OUTBOX_PUBLISHED).increment(r.published);
        ::metrics::counter!(crate::metrics::OUTBOX_RETRIED).increment(r.retried);
        ::metrics::counter!(crate::metrics::OUTBOX_DEAD_LETTERED).increment(r.dead_lettered);
        ::metrics::counter!(crate::metrics::OUTBOX_RELEASED).increment(r.released);
        ::metrics::counter!(crate::metrics::OUTBOX_BROKER_UNAVAILABLE).increment(r.outages);
    }
}
