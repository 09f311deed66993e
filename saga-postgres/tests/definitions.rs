//! Definition drift and start-up checks on PostgreSQL: two deployments of
//! one saga name and version sharing a database, an executor on a schema
//! that was never migrated, and instances from before fingerprints.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use saga_core::testing::{Script, TestState, scripted_saga, scripted_saga_swapped};
use saga_core::{
    Direction, Error, Executor, IdempotencyKey, ManualClock, SagaClient, SagaDefinition,
    ShapeDifference, StartKey, Status, Step, StepContext, StepError, StepName, action_fn,
};
use saga_postgres::{MIGRATIONS, PgError, PgSagaStore, SchemaName};

/// How long a test waits for what must happen at once (never reached
/// unless the behaviour is broken).
const GUARD: Duration = Duration::from_secs(30);

fn step(name: &str) -> StepName {
    StepName::new(name).unwrap()
}

/// A second deployment's store on the same schema: its own pool.
fn second_deployment(url: &str, schema: &SchemaName, clock: Arc<ManualClock>) -> PgSagaStore {
    let pool = saga_postgres::pool_from_url(url, 4).unwrap();
    PgSagaStore::builder(pool, schema.clone())
        .clock(clock)
        .build()
}

/// The issue's case: the second deployment has two steps swapped. It is
/// refused when it starts, with both fingerprints and the first difference,
/// and claims nothing; the instance the first started completes with every
/// step run once, in the first's order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_deployment_with_swapped_steps_is_refused_and_the_first_completes() {
    let clock = Arc::new(ManualClock::starting_now());
    let first_store = common::fresh_store(clock.clone()).await;
    let script = Script::new();
    let saga = scripted_saga(&script, 1);
    let first = Executor::builder(first_store.store.clone())
        .register(saga.clone())
        .build()
        .unwrap();
    first.check().await.unwrap();
    let id = first
        .client()
        .start(
            &saga,
            StartKey::new("order-1").unwrap(),
            &TestState::order(1),
        )
        .await
        .unwrap()
        .id;

    let second_store = second_deployment(&first_store.url, first_store.schema(), clock.clone());
    let second = Executor::builder(second_store)
        .register(scripted_saga_swapped(&script, 1))
        .build()
        .unwrap();
    let refused = tokio::time::timeout(GUARD, second.run(std::future::pending()))
        .await
        .expect("a refused executor returns at once")
        .unwrap_err();
    let Error::DefinitionChanged {
        kind,
        stored,
        registered,
        first_difference,
    } = &refused
    else {
        panic!("{refused:?}");
    };
    assert_eq!(kind, saga.kind());
    assert_eq!(*stored, saga.shape().fingerprint());
    assert_eq!(
        *registered,
        scripted_saga_swapped(&script, 1).shape().fingerprint()
    );
    assert_eq!(
        **first_difference,
        ShapeDifference::Names {
            index: 1,
            stored: vec![step("charge")],
            registered: vec![step("reserve")],
        }
    );
    assert!(
        refused
            .to_string()
            .contains("step 2 is `charge` in the stored shape and `reserve` in the registered one"),
        "{refused}"
    );
    assert_eq!(second.stats().claimed, 0);
    assert!(script.calls().is_empty());

    // A client deployed with the swapped definition starts an instance: no
    // worker of the first shape runs it, and the guide's queries show it.
    let swapped = scripted_saga_swapped(&script, 1);
    let stray = first
        .client()
        .start(
            &swapped,
            StartKey::new("order-2").unwrap(),
            &TestState::order(2),
        )
        .await
        .unwrap()
        .id;
    let (stored_rows, waiting) = guide_queries(&first_store).await;
    assert_eq!(
        stored_rows,
        [(
            "scripted".to_owned(),
            1,
            saga.shape().fingerprint().to_string(),
            serde_json::json!(["validate", "charge", "reserve", "confirm", "notify"])
        )]
    );
    assert_eq!(
        waiting,
        [(
            "scripted".to_owned(),
            1,
            swapped.shape().fingerprint().to_string(),
            1
        )]
    );

    let report = first.run_until_idle().await.unwrap();
    assert_eq!(
        report.unmatched,
        [(saga.kind().clone(), swapped.shape().fingerprint(), 1)]
    );
    assert_eq!(
        first.client().snapshot(stray).await.unwrap().attempt,
        0,
        "left untouched"
    );
    let snapshot = first.client().snapshot(id).await.unwrap();
    assert_eq!(snapshot.status, Status::Completed);
    assert_eq!(
        script.trace(1),
        [
            "validate:forward",
            "charge:forward",
            "reserve:forward",
            "confirm:forward",
            "notify:forward"
        ],
        "every step ran once, in the first deployment's order"
    );
    // What is stored: the first shape, and the instance's fingerprint.
    let db = first_store.pool().get().await.unwrap();
    let s = first_store.schema().quoted();
    let row = db
        .query_one(
            &format!(
                "SELECT d.fingerprint, i.definition_fingerprint, d.shape->'steps'->1->>'name'
                 FROM {s}.saga_definitions d
                 JOIN {s}.saga_instances i
                   ON i.saga_name = d.saga_name AND i.saga_version = d.saga_version
                 WHERE i.id = $1"
            ),
            &[&id.as_uuid()],
        )
        .await
        .unwrap();
    let fingerprint = saga.shape().fingerprint().as_bytes().to_vec();
    assert_eq!(row.get::<_, Vec<u8>>(0), fingerprint);
    assert_eq!(row.get::<_, Option<Vec<u8>>>(1), Some(fingerprint));
    assert_eq!(row.get::<_, String>(2), "charge");
}

type StoredRow = (String, i32, String, serde_json::Value);
type WaitingRow = (String, i32, String, i64);

/// Runs the two queries of the operations guide's "Changing a definition"
/// on `store`'s schema: the stored definitions, and the instances waiting
/// for another shape.
async fn guide_queries(store: &PgSagaStore) -> (Vec<StoredRow>, Vec<WaitingRow>) {
    let guide = include_str!("../../docs/operations.md");
    let start = guide
        .find("```sql\nSELECT saga_name, saga_version, encode(fingerprint")
        .expect("the guide's block");
    let block = &guide[start + "```sql\n".len()..];
    let block = &block[..block.find("```").unwrap()];
    let block = block.replace("saga.saga_", &format!("{}.saga_", store.schema().quoted()));
    let mut statements = block.split(";\n\n");
    let (stored, waiting) = (statements.next().unwrap(), statements.next().unwrap());
    let db = store.pool().get().await.unwrap();
    let stored = db
        .query(stored, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(4)))
        .collect();
    let waiting = db
        .query(waiting.trim_end().trim_end_matches(';'), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    (stored, waiting)
}

/// An executor on a schema that was never migrated (or lacks the
/// fingerprints' migration) fails at start with `NotMigrated`, which says
/// to run the migrations; it used to retry "relation does not exist"
/// forever and return `Ok` at shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_executor_on_a_schema_never_migrated_fails_at_start_saying_to_migrate() {
    let fresh = common::fresh_schema().await;
    let store = PgSagaStore::new(fresh.pool.clone(), fresh.schema.clone());
    let exec = Executor::builder(store)
        .register(scripted_saga(&Script::new(), 1))
        .build()
        .unwrap();
    let err = tokio::time::timeout(GUARD, exec.run(std::future::pending()))
        .await
        .expect("an executor on an unmigrated schema returns at once")
        .unwrap_err();
    let not_migrated = |err: &Error, found: i32, missing: i32| {
        let pg = common::pg(err);
        assert!(
            matches!(pg, PgError::NotMigrated { found: f, missing: m, .. }
                if *f == found && *m == missing),
            "{pg:?}"
        );
        assert!(
            err.to_string().contains("run `saga_postgres::migrate`"),
            "{err}"
        );
        assert!(!err.is_retryable());
    };
    not_migrated(&err, 0, 1);
    let err = exec.run_until_idle().await.unwrap_err();
    not_migrated(&err, 0, 1);

    // Migrated up to, not including, the fingerprints' migration.
    let before: Vec<_> = MIGRATIONS
        .iter()
        .copied()
        .filter(|m| m.version < 5)
        .collect();
    let mut client = fresh.pool.get().await.unwrap();
    saga_postgres::migrate_with(&mut client, &fresh.schema, &before)
        .await
        .unwrap();
    let err = exec.run_until_idle().await.unwrap_err();
    not_migrated(&err, 4, 5);

    saga_postgres::migrate(&mut client, &fresh.schema)
        .await
        .unwrap();
    exec.run_until_idle().await.unwrap();
}

async fn first(_: &mut StepContext, _: &mut Vec<String>) -> Result<(), StepError> {
    Ok(())
}

async fn later(_: &mut StepContext, _: &mut Vec<String>) -> Result<(), StepError> {
    Err(StepError::snooze(Duration::from_secs(3600)))
}

/// A row started before migration 0005 has no fingerprint: any worker of
/// its name and version claims it, as before. This is where a rename's
/// alias still serves: the instance, recorded under the old name, resumes
/// under the new one with the keys it had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_from_before_fingerprints_is_claimed_by_any_worker_of_its_kind() {
    let clock = Arc::new(ManualClock::starting_now());
    let store = common::fresh_store(clock.clone()).await;
    let old = SagaDefinition::<Vec<String>>::builder("renames", 1)
        .step(Step::new("first", first).no_compensation())
        .step(Step::new("old_name", later).no_compensation())
        .build()
        .unwrap();
    let id = SagaClient::new(store.store.clone())
        .start(&old, StartKey::new("k").unwrap(), &Vec::new())
        .await
        .unwrap()
        .id;
    // As a row from before the migration: no fingerprint, and no
    // definition registered yet.
    let db = store.pool().get().await.unwrap();
    let s = store.schema().quoted();
    db.execute(
        &format!("UPDATE {s}.saga_instances SET definition_fingerprint = NULL WHERE id = $1"),
        &[&id.as_uuid()],
    )
    .await
    .unwrap();

    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = {
        let seen = seen.clone();
        action_fn(move |ctx, _: &mut Vec<String>| {
            seen.lock()
                .unwrap()
                .push((ctx.step().to_string(), ctx.idempotency_key()));
            Box::pin(async { Ok(()) })
        })
    };
    let renamed = SagaDefinition::<Vec<String>>::builder("renames", 1)
        .step(Step::new("first", first).no_compensation())
        .step(
            Step::new("new_name", record)
                .alias("old_name")
                .no_compensation(),
        )
        .build()
        .unwrap();
    // The legacy row sits at the first step; a worker of the old shape
    // would be refused now that the renamed one registered first.
    let exec = Executor::builder(store.store.clone())
        .register(renamed)
        .build()
        .unwrap();
    exec.run_until_idle().await.unwrap();
    let snapshot = exec.client().snapshot(id).await.unwrap();
    assert_eq!(snapshot.status, Status::Completed);
    let old_key = IdempotencyKey::derive(id, &step("old_name"), Direction::Forward);
    assert_eq!(*seen.lock().unwrap(), [("new_name".to_owned(), old_key)]);
    let refused = Executor::builder(store.store.clone())
        .register(old)
        .build()
        .unwrap()
        .check()
        .await
        .unwrap_err();
    assert!(
        matches!(refused, Error::DefinitionChanged { .. }),
        "{refused:?}"
    );
}
