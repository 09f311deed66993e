//! Two worker processes, each with its own pool, on one database: every
//! instance finishes, every step's effect is applied once downstream, and
//! no transition is recorded twice.
//!
//! The test binary re-runs itself as the workers (`worker_process`, which
//! does nothing unless the parent set `SAGA_MW_URL`). Each runs
//! `Executor::run` until a test-only trigger has announced, over
//! `LISTEN/NOTIFY`, that no instance is left running.

mod common;

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use saga_core::store::SagaStore;
use saga_core::{
    Direction, Executor, IdempotencyKey, Jitter, Outcome, RetryPolicy, SagaClient, SagaDefinition,
    StartKey, Status, Step, StepError, StepName, action_fn,
};
use saga_postgres::deadpool_postgres::Pool;
use saga_postgres::tokio_postgres::{self, AsyncMessage, Client, NoTls};
use saga_postgres::{PgSagaStore, SchemaName};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use uuid::Uuid;

const INSTANCES: u32 = 200;
const STEPS: [&str; 4] = ["reserve", "charge", "confirm", "notify"];

#[derive(Serialize, Deserialize)]
struct Order {
    n: u32,
}

#[derive(Debug, thiserror::Error)]
#[error("downstream hiccup")]
struct Hiccup;

/// A deterministic pseudo-random number in 0..100 for this attempt.
fn roll(key: &str, attempt: u32) -> u8 {
    Sha256::digest(format!("{key}/{attempt}").as_bytes())[0] % 100
}

/// The saga the workers run: each step calls a fake downstream that records
/// calls by idempotency key and applies each key's effect once. 20% of
/// attempts fail before the call, 10% fail after it (the effect happened,
/// the reply was lost).
fn saga(pool: Arc<Pool>, schema: SchemaName) -> SagaDefinition<Order> {
    let policy = RetryPolicy::builder()
        .initial_delay(Duration::from_millis(10))
        .max_delay(Duration::from_millis(50))
        .max_attempts(12)
        .no_max_elapsed()
        .jitter(Jitter::Full)
        .build()
        .unwrap();
    let call = |step: &'static str| {
        let pool = pool.clone();
        let table = format!("{}.downstream", schema.quoted());
        action_fn(move |ctx, _: &mut Order| {
            let pool = pool.clone();
            let table = table.clone();
            Box::pin(async move {
                let key = ctx.idempotency_key().to_string();
                let r = roll(&key, ctx.attempt());
                if r < 20 {
                    return Err(StepError::retryable(Hiccup));
                }
                let client = pool.get().await?;
                client
                    .execute(
                        &format!(
                            "INSERT INTO {table} (key, step, calls) VALUES ($1, $2, 1)
                             ON CONFLICT (key) DO UPDATE SET calls = {table}.calls + 1"
                        ),
                        &[&ctx.idempotency_key().as_uuid(), &step],
                    )
                    .await?;
                if r < 30 {
                    return Err(StepError::timeout(Hiccup));
                }
                Ok(())
            })
        })
    };
    SagaDefinition::builder("multi", 1)
        .step(
            Step::new("reserve", call("reserve"))
                .retry(policy.clone())
                .compensate_with(call("release")),
        )
        .step(
            Step::new("charge", call("charge"))
                .retry(policy.clone())
                .compensate_with(call("refund")),
        )
        .pivot(Step::new("confirm", call("confirm")).retry(policy.clone()))
        .step(Step::new("notify", call("notify")).retry(policy))
        .build()
        .unwrap()
}

/// The channel on which the test trigger announces that an instance has
/// reached a terminal status (or is stuck: the workers stop then too, and
/// the test fails on it rather than waiting forever).
fn terminal_channel(schema: &SchemaName) -> String {
    format!("{schema}_terminal")
}

/// Test-only: notifies [`terminal_channel`] whenever an instance leaves
/// `running`/`compensating` for good.
fn terminal_trigger(schema: &SchemaName) -> String {
    let s = schema.quoted();
    let channel = terminal_channel(schema);
    format!(
        "CREATE FUNCTION {s}.notify_terminal() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             PERFORM pg_notify('{channel}', NEW.id::text);
             RETURN NULL;
         END $$;
         CREATE TRIGGER notify_terminal AFTER UPDATE OF status ON {s}.saga_instances
             FOR EACH ROW
             WHEN (NEW.status NOT IN ('running', 'compensating')
                   AND OLD.status IS DISTINCT FROM NEW.status)
             EXECUTE FUNCTION {s}.notify_terminal();"
    )
}

async fn unfinished(client: &Client, schema: &SchemaName) -> i64 {
    client
        .query_one(
            &format!(
                "SELECT count(*) FROM {}.saga_instances
                 WHERE status IN ('running', 'compensating')",
                schema.quoted()
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// Resolves once no instance is running or compensating: listens on
/// [`terminal_channel`], counts once listening (so nothing that finished
/// before is missed), then again on every notification.
async fn all_finished(url: String, schema: SchemaName) {
    let (client, mut connection) = tokio_postgres::connect(&url, NoTls).await.unwrap();
    let (tx, mut notified) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            match message {
                Ok(AsyncMessage::Notification(_)) => {
                    if tx.send(()).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => panic!("the listening connection failed: {e}"),
            }
        }
    });
    client
        .batch_execute(&format!("LISTEN \"{}\"", terminal_channel(&schema)))
        .await
        .unwrap();
    while unfinished(&client, &schema).await > 0 {
        notified
            .recv()
            .await
            .expect("the listening connection stays up");
        // One count for everything that arrived together.
        while notified.try_recv().is_ok() {}
    }
}

/// One worker process: runs the executor until every instance has
/// finished, then reports how many transitions it recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_process() {
    let (Ok(url), Ok(schema)) = (
        std::env::var("SAGA_MW_URL"),
        std::env::var("SAGA_MW_SCHEMA"),
    ) else {
        return; // Not started by the parent test: nothing to do.
    };
    let schema = SchemaName::new(schema).unwrap();
    let pool = Arc::new(saga_postgres::pool_from_url(&url, 6).unwrap());
    let store = PgSagaStore::new((*pool).clone(), schema.clone());
    let exec = Executor::builder(store.clone())
        .register(saga(pool, schema.clone()))
        .concurrency(8)
        .lease_duration(Duration::from_secs(10))
        .heartbeat_interval(Duration::from_secs(2))
        // Retries fall due within tens of milliseconds; so does polling.
        .poll_interval(Duration::from_millis(50))
        .build()
        .unwrap();
    tokio::time::timeout(
        Duration::from_secs(150),
        exec.run(all_finished(url, schema)),
    )
    .await
    .expect("every instance finished in time")
    .expect("the worker started");
    println!("WORKER_RECORDED={}", exec.stats().recorded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_worker_processes_finish_every_instance_and_apply_each_effect_once() {
    if std::env::var("SAGA_MW_URL").is_ok() {
        return; // We are a worker: the parent runs this.
    }
    let common::FreshSchema {
        pool,
        schema,
        url,
        guard: _guard,
    } = common::fresh_schema().await;
    let mut client = pool.get().await.unwrap();
    saga_postgres::migrate(&mut client, &schema).await.unwrap();
    client
        .batch_execute(&format!(
            "CREATE TABLE {}.downstream (key uuid PRIMARY KEY, step text NOT NULL, calls int NOT NULL);
             {}",
            schema.quoted(),
            terminal_trigger(&schema),
        ))
        .await
        .unwrap();
    drop(client);
    let store = PgSagaStore::new(pool.clone(), schema.clone());
    let definition = saga(Arc::new(pool.clone()), schema.clone());
    let client = SagaClient::new(store.clone());
    let mut ids = Vec::new();
    for n in 0..INSTANCES {
        let key = StartKey::new(format!("order-{n}")).unwrap();
        ids.push(
            client
                .start(&definition, key, &Order { n })
                .await
                .unwrap()
                .id,
        );
    }

    let workers: Vec<_> = (0..2)
        .map(|_| {
            common::this_test("worker_process")
                .env("SAGA_MW_URL", &url)
                .env("SAGA_MW_SCHEMA", schema.as_str())
                .stdout(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .unwrap()
        })
        .collect();
    let mut per_worker = Vec::new();
    for worker in workers {
        let out = tokio::time::timeout(Duration::from_secs(180), worker.wait_with_output())
            .await
            .expect("worker exits")
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "worker failed: {stdout}");
        let recorded: u64 = stdout
            .lines()
            .find_map(|l| l.split("WORKER_RECORDED=").nth(1))
            .unwrap_or_else(|| panic!("worker reports its transitions: {stdout}"))
            .trim()
            .parse()
            .unwrap();
        per_worker.push(recorded);
    }
    assert!(
        per_worker.iter().all(|&n| n > 0),
        "both workers recorded transitions: {per_worker:?}"
    );

    // Every instance completed, with exactly the expected successful steps,
    // in order, and nothing else succeeded (no compensation).
    for id in &ids {
        let snapshot = store.load(*id).await.unwrap().unwrap();
        assert_eq!(snapshot.status, Status::Completed, "{id}");
        let succeeded: Vec<(String, Direction)> = store
            .history(*id)
            .await
            .unwrap()
            .iter()
            .filter(|h| h.outcome == Outcome::Succeeded)
            .map(|h| (h.step.to_string(), h.direction))
            .collect();
        let expected: Vec<(String, Direction)> = STEPS
            .iter()
            .map(|s| ((*s).to_owned(), Direction::Forward))
            .collect();
        assert_eq!(succeeded, expected, "{id}");
    }
    let db = pool.get().await.unwrap();
    let s = schema.quoted();
    // No step result recorded twice, whichever worker recorded it.
    let duplicates: i64 = db
        .query_one(
            &format!(
                "SELECT count(*) FROM (
                     SELECT saga_id, step, direction FROM {s}.saga_history
                     WHERE outcome = 'succeeded'
                     GROUP BY saga_id, step, direction HAVING count(*) > 1) AS d"
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(duplicates, 0, "a step's success was recorded twice");

    // Downstream: exactly one effect per (instance, step), under the key
    // derived from that instance and step, whatever the retries.
    let mut expected: HashMap<Uuid, &str> = HashMap::new();
    for id in &ids {
        for step in STEPS {
            let key =
                IdempotencyKey::derive(*id, &StepName::new(step).unwrap(), Direction::Forward);
            expected.insert(key.as_uuid(), step);
        }
    }
    assert_eq!(expected.len(), ids.len() * STEPS.len(), "keys are distinct");
    let effects: Vec<(Uuid, String, i32)> = db
        .query(&format!("SELECT key, step, calls FROM {s}.downstream"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        effects.len(),
        expected.len(),
        "effects == instances x steps"
    );
    for (key, step, _) in &effects {
        assert_eq!(
            expected.get(key).copied(),
            Some(step.as_str()),
            "key {key} was derived from another step, or from nothing"
        );
    }
    let calls: i64 = effects.iter().map(|(_, _, c)| i64::from(*c)).sum();
    assert!(
        calls > effects.len() as i64,
        "some calls were repeated with the same key: {calls}"
    );
    println!(
        "transitions per worker {per_worker:?}; {} effects from {calls} downstream calls; \
         store retries {:?}",
        effects.len(),
        store.stats()
    );
}
