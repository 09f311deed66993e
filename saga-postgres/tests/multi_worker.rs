//! Two worker processes, each with its own pool, on one database: every
//! instance finishes, every step's effect is applied once downstream, and
//! no transition is recorded twice.
//!
//! The test binary re-runs itself as the workers (`worker_process`, which
//! does nothing unless the parent set `SAGA_MW_URL`).

mod common;

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use saga_core::{
    Executor, Jitter, Outcome, RetryPolicy, SagaClient, SagaDefinition, SagaStore, StartKey,
    Status, Step, StepError, action_fn,
};
use saga_postgres::deadpool_postgres::Pool;
use saga_postgres::{PgSagaStore, SchemaName};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

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

async fn unfinished(store: &PgSagaStore) -> i64 {
    let client = store.pool().get().await.unwrap();
    client
        .query_one(
            &format!(
                "SELECT count(*) FROM {}.saga_instances WHERE status NOT IN ('completed', 'compensated')",
                store.schema().quoted()
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// One worker process: runs until every instance has finished.
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
        .register(saga(pool, schema))
        .concurrency(8)
        .lease_duration(Duration::from_secs(10))
        .heartbeat_interval(Duration::from_secs(2))
        .build()
        .unwrap();
    let mut steps = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while unfinished(&store).await > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "workers did not finish in time"
        );
        steps += exec.run_until_idle().await.unwrap().transitions.len();
        // Nothing due here right now: the rest is leased by the other worker
        // or scheduled for a retry. Poll again shortly, as `run` would.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("WORKER_STEPS={steps}");
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
            "CREATE TABLE {}.downstream (key uuid PRIMARY KEY, step text NOT NULL, calls int NOT NULL)",
            schema.quoted()
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

    let exe = std::env::current_exe().unwrap();
    let workers: Vec<_> = (0..2)
        .map(|_| {
            tokio::process::Command::new(&exe)
                .args([
                    "--exact",
                    "worker_process",
                    "--nocapture",
                    "--test-threads",
                    "1",
                ])
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
        let steps: usize = stdout
            .lines()
            .find_map(|l| l.split("WORKER_STEPS=").nth(1))
            .unwrap_or_else(|| panic!("worker reports its steps: {stdout}"))
            .trim()
            .parse()
            .unwrap();
        per_worker.push(steps);
    }
    assert!(
        per_worker.iter().all(|&s| s > 0),
        "both workers worked: {per_worker:?}"
    );

    // Every instance finished; each forward step succeeded exactly once.
    for id in &ids {
        let snapshot = store.load(*id).await.unwrap().unwrap();
        assert_eq!(snapshot.status, Status::Completed, "{id}");
        let history = store.history(*id).await.unwrap();
        for step in STEPS {
            let recorded = history
                .iter()
                .filter(|h| h.step.as_str() == step && h.outcome == Outcome::Succeeded)
                .count();
            assert_eq!(recorded, 1, "{id} {step}: {history:#?}");
        }
    }
    // Downstream: one effect per (instance, step), whatever the retries.
    let db = pool.get().await.unwrap();
    let row = db
        .query_one(
            &format!(
                "SELECT count(*), count(DISTINCT key), sum(calls), min(calls) FROM {}.downstream",
                schema.quoted()
            ),
            &[],
        )
        .await
        .unwrap();
    let (effects, keys, calls, min_calls): (i64, i64, i64, i32) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    assert_eq!(effects, i64::from(INSTANCES) * STEPS.len() as i64);
    assert_eq!(keys, effects);
    assert!(min_calls >= 1);
    assert!(
        calls > effects,
        "some calls were repeated with the same key: {calls}"
    );
    println!(
        "steps per worker {per_worker:?}; {effects} effects from {calls} downstream calls; \
         store retries {:?}",
        store.stats()
    );
}
