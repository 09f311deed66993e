//! Shared by the outbox, inbox and NATS tests: a fresh migrated schema per
//! test, and a publisher that records what it was given and fails on
//! demand.
#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use saga_core::{Jitter, ManualClock, Message, MessageId, RetryPolicy, Timestamp};
use saga_postgres::deadpool_postgres::Pool;
use saga_postgres::outbox::{Dispatcher, Outbox, Outgoing, PublishError, Publisher};
use saga_postgres::{SchemaName, pool_from_config};
use saga_test_support::TestSchema;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

/// How long a test waits for a signal before failing.
pub const WAIT: Duration = Duration::from_secs(20);

/// A migrated schema of its own, a pool on it, a manual clock, an outbox.
pub struct Env {
    pub pool: Pool,
    pub schema: SchemaName,
    pub clock: Arc<ManualClock>,
    pub outbox: Outbox,
    // Last: dropping it drops the schema (kept if the test failed).
    pub test_schema: TestSchema,
}

/// A fresh, migrated schema on the test server (DATABASE_URL, or a
/// throwaway local cluster).
pub async fn env() -> Env {
    let test_schema = saga_test_support::fresh_schema()
        .await
        .expect("a test PostgreSQL server");
    let schema = SchemaName::new(test_schema.name()).unwrap();
    let pool = pool_from_config(test_schema.config(), 8).unwrap();
    let mut client = pool.get().await.unwrap();
    saga_postgres::migrate(&mut client, &schema).await.unwrap();
    drop(client);
    let clock = Arc::new(ManualClock::new(Timestamp::from_micros(
        1_700_000_000_000_000,
    )));
    let outbox = Outbox::builder(pool.clone(), schema.clone())
        .clock(clock.clone())
        .build();
    Env {
        pool,
        schema,
        clock,
        outbox,
        test_schema,
    }
}

impl Env {
    /// Enqueues `messages` in one committed transaction.
    pub async fn enqueue(&self, messages: Vec<Message>) -> Vec<MessageId> {
        let mut client = self.pool.get().await.unwrap();
        let tx = client.transaction().await.unwrap();
        let ids = self.outbox.enqueue_all_in_tx(&tx, messages).await.unwrap();
        tx.commit().await.unwrap();
        ids
    }

    /// The number of rows in the outbox (pending, in flight or dead).
    pub async fn outbox_rows(&self) -> i64 {
        let client = self.pool.get().await.unwrap();
        client
            .query_one(
                &format!("SELECT count(*) FROM {}.outbox", self.schema.quoted()),
                &[],
            )
            .await
            .unwrap()
            .get(0)
    }

    /// Reads `attempts, last_error, available_at, dead_at IS NOT NULL` of a
    /// row (`None`: no such row).
    pub async fn row(&self, id: MessageId) -> Option<(i32, Option<String>, SystemTime, bool)> {
        let client = self.pool.get().await.unwrap();
        client
            .query_opt(
                &format!(
                    "SELECT attempts, last_error, available_at, dead_at IS NOT NULL
                     FROM {}.outbox WHERE id = $1",
                    self.schema.quoted()
                ),
                &[&id.as_uuid()],
            )
            .await
            .unwrap()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
    }
}

/// A fixed 1 s backoff and a budget of `attempts`.
pub fn fixed_policy(attempts: u32) -> RetryPolicy {
    RetryPolicy::builder()
        .initial_delay(Duration::from_secs(1))
        .multiplier(1.0)
        .max_delay(Duration::from_secs(1))
        .max_attempts(attempts)
        .no_max_elapsed()
        .jitter(Jitter::None)
        .build()
        .unwrap()
}

/// A dispatcher running [`Dispatcher::run`] in the background until
/// [`stop`](Running::stop).
pub struct Running {
    pub dispatcher: Dispatcher<Recorder>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Running {
    pub fn start(dispatcher: Dispatcher<Recorder>) -> Self {
        let (stop, stopped) = oneshot::channel::<()>();
        let running = dispatcher.clone();
        let task = tokio::spawn(async move {
            running
                .run(async {
                    let _ = stopped.await;
                })
                .await;
        });
        Running {
            dispatcher,
            stop,
            task,
        }
    }

    /// Stops it and waits until `run` has returned.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(WAIT, self.task)
            .await
            .unwrap()
            .unwrap();
    }
}

/// A JSON message on `topic` carrying `n`.
pub fn msg(topic: &str, n: u64) -> Message {
    Message::json(topic, &serde_json::json!({ "n": n })).unwrap()
}

/// The `n` of a message made by [`msg`].
pub fn n_of(out: &Outgoing) -> u64 {
    match &out.message.payload {
        saga_core::Payload::Json(v) => v["n"].as_u64().unwrap(),
        saga_core::Payload::Bytes(_) => panic!("not a test message"),
    }
}

/// One call of [`Recorder::publish`] for one message.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub out: Outgoing,
    pub ok: bool,
    /// Which call of `publish` (from 0) it was part of.
    pub call: usize,
}

/// What a [`Recorder`] does with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Fail (transiently) this many more times, then succeed.
    FailTimes(u32),
    /// Always fail transiently.
    AlwaysFail,
    /// Fail permanently.
    Permanent,
}

/// A publisher that records every attempt, fails on demand, and can hang
/// after "publishing" (to simulate a dispatcher killed between publish and
/// delete).
#[derive(Default)]
pub struct Recorder {
    attempts: Mutex<Vec<Attempt>>,
    fates: Mutex<HashMap<MessageId, Fate>>,
    topic_fates: Mutex<HashMap<String, Fate>>,
    hang: Mutex<bool>,
    batches: Mutex<Vec<usize>>,
    successes: watch::Sender<usize>,
    calls: watch::Sender<usize>,
}

impl Recorder {
    pub fn new() -> Arc<Self> {
        Arc::new(Recorder::default())
    }

    pub fn set_fate(&self, id: MessageId, fate: Fate) {
        self.fates.lock().unwrap().insert(id, fate);
    }

    pub fn set_topic_fate(&self, topic: &str, fate: Option<Fate>) {
        let mut fates = self.topic_fates.lock().unwrap();
        match fate {
            Some(f) => fates.insert(topic.to_owned(), f),
            None => fates.remove(topic),
        };
    }

    /// After recording a batch as published, never return.
    pub fn hang_after_publish(&self, hang: bool) {
        *self.hang.lock().unwrap() = hang;
    }

    /// The size of each batch handed over, in order.
    pub fn batch_sizes(&self) -> Vec<usize> {
        self.batches.lock().unwrap().clone()
    }

    pub fn attempts(&self) -> Vec<Attempt> {
        self.attempts.lock().unwrap().clone()
    }

    /// The successful publishes, in order.
    pub fn published(&self) -> Vec<Outgoing> {
        self.attempts()
            .into_iter()
            .filter(|a| a.ok)
            .map(|a| a.out)
            .collect()
    }

    pub fn published_ids(&self) -> Vec<MessageId> {
        self.published().iter().map(|o| o.message.id).collect()
    }

    /// Waits until at least `n` successful publishes were recorded.
    pub async fn wait_published(&self, n: usize) {
        let mut rx = self.successes.subscribe();
        tokio::time::timeout(WAIT, rx.wait_for(|c| *c >= n))
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {n} publishes"))
            .unwrap();
    }

    /// Waits until `publish` was called at least `n` times.
    pub async fn wait_calls(&self, n: usize) {
        let mut rx = self.calls.subscribe();
        tokio::time::timeout(WAIT, rx.wait_for(|c| *c >= n))
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {n} publish calls"))
            .unwrap();
    }

    fn fate(&self, out: &Outgoing) -> Option<Fate> {
        let mut fates = self.fates.lock().unwrap();
        if let Some(fate) = fates.get_mut(&out.message.id) {
            return match fate {
                Fate::FailTimes(0) => None,
                Fate::FailTimes(n) => {
                    *n -= 1;
                    Some(Fate::FailTimes(*n + 1))
                }
                other => Some(*other),
            };
        }
        self.topic_fates
            .lock()
            .unwrap()
            .get(&out.message.topic)
            .copied()
    }
}

impl Publisher for Recorder {
    async fn publish(&self, batch: &[Outgoing]) -> Vec<Result<(), PublishError>> {
        // Let concurrent dispatchers interleave.
        tokio::task::yield_now().await;
        let mut results = Vec::with_capacity(batch.len());
        {
            let mut batches = self.batches.lock().unwrap();
            let call = batches.len();
            batches.push(batch.len());
            let mut attempts = self.attempts.lock().unwrap();
            for out in batch {
                let result = match self.fate(out) {
                    None => Ok(()),
                    Some(Fate::Permanent) => Err(PublishError::permanent("refused for good")),
                    Some(_) => Err(PublishError::transient("broker unavailable")),
                };
                attempts.push(Attempt {
                    out: out.clone(),
                    ok: result.is_ok(),
                    call,
                });
                results.push(result);
            }
        }
        let ok = results.iter().filter(|r| r.is_ok()).count();
        self.successes.send_modify(|c| *c += ok);
        self.calls.send_modify(|c| *c += 1);
        if *self.hang.lock().unwrap() {
            std::future::pending::<()>().await;
        }
        results
    }
}
