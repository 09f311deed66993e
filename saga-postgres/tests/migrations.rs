//! Migrations: ordered, checksummed, idempotent, safe to run concurrently.

mod common;

use std::process::Stdio;
use std::time::Duration;

use saga_postgres::{
    MIGRATIONS, Migration, PgError, PgSagaStore, SchemaName, check_migrations, latest_version,
    migrate, migrate_with, migration_lock_key,
};

/// Every embedded version, in order.
fn all_versions() -> Vec<i32> {
    MIGRATIONS.iter().map(|m| m.version).collect()
}

#[tokio::test]
async fn migrating_creates_the_schema_once_and_then_does_nothing() {
    let common::FreshSchema {
        pool,
        schema,
        guard: _guard,
        ..
    } = common::fresh_schema().await;
    let store = PgSagaStore::new(pool.clone(), schema.clone());
    let err = store.check_schema().await.unwrap_err();
    assert!(
        matches!(
            err,
            PgError::NotMigrated {
                found: 0,
                missing: 1,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("run `saga_postgres::migrate`"),
        "{err}"
    );

    let mut client = pool.get().await.unwrap();
    let first = migrate(&mut client, &schema).await.unwrap();
    assert_eq!(first.applied, all_versions());
    let again = migrate(&mut client, &schema).await.unwrap();
    assert!(again.applied.is_empty() && again.unknown.is_empty());
    store.check_schema().await.unwrap();
    let tables: Vec<String> = client
        .query(
            "SELECT table_name::text FROM information_schema.tables WHERE table_schema = $1 ORDER BY 1",
            &[&schema.as_str()],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        tables,
        [
            "inbox",
            "outbox",
            "saga_definitions",
            "saga_history",
            "saga_instances",
            "saga_migrations"
        ]
    );
}

#[tokio::test]
async fn a_schema_missing_a_migration_below_the_highest_is_not_migrated() {
    let common::FreshSchema {
        pool,
        schema,
        guard: _guard,
        ..
    } = common::fresh_schema().await;
    let mut client = pool.get().await.unwrap();
    // All but 2: the highest version is there, one below it is not.
    let without_2: Vec<Migration> = MIGRATIONS
        .iter()
        .copied()
        .filter(|m| m.version != 2)
        .collect();
    migrate_with(&mut client, &schema, &without_2)
        .await
        .unwrap();
    let store = PgSagaStore::new(pool.clone(), schema.clone());
    let err = store.check_schema().await.unwrap_err();
    // Not a literal: other changes add migrations.
    let latest = MIGRATIONS.last().unwrap().version;
    let PgError::NotMigrated {
        found,
        missing,
        needed,
        ..
    } = err
    else {
        panic!("{err:?}");
    };
    assert_eq!((found, missing, needed), (latest, 2, latest), "{err:?}");
    assert!(err.to_string().contains("lacks migration 2"), "{err}");
    // Migrating adds the missing one.
    let report = migrate(&mut client, &schema).await.unwrap();
    assert_eq!(report.applied, vec![2]);
    store.check_schema().await.unwrap();
}

const MIGRATOR_URL: &str = "SAGA_TEST_MIGRATOR_URL";
const MIGRATOR_SCHEMA: &str = "SAGA_TEST_MIGRATOR_SCHEMA";

/// A migrating process: started by the test below (this test binary run
/// again); does nothing otherwise.
#[tokio::test]
async fn migrator_process() {
    let (Ok(url), Ok(schema)) = (std::env::var(MIGRATOR_URL), std::env::var(MIGRATOR_SCHEMA))
    else {
        return;
    };
    let schema = SchemaName::new(schema).unwrap();
    let (mut client, connection) = url
        .parse::<saga_postgres::tokio_postgres::Config>()
        .unwrap()
        .connect(saga_postgres::tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let report = migrate(&mut client, &schema).await.expect("migrating");
    println!("APPLIED {:?}", report.applied);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_migrations_serialize_on_the_advisory_lock() {
    if std::env::var(MIGRATOR_URL).is_ok() {
        return; // A migrator: the parent runs this.
    }
    let common::FreshSchema {
        pool,
        schema,
        url,
        guard: _guard,
    } = common::fresh_schema().await;
    // Hold the migration lock, so that both migrators must queue on it.
    let holder = pool.get().await.unwrap();
    let key = migration_lock_key(&schema);
    holder
        .execute("SELECT pg_advisory_lock($1)", &[&key])
        .await
        .unwrap();

    let migrators: Vec<_> = (0..2)
        .map(|_| {
            common::this_test("migrator_process")
                .env(MIGRATOR_URL, &url)
                .env(MIGRATOR_SCHEMA, schema.as_str())
                .stdout(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .unwrap()
        })
        .collect();

    // Both wait for the lock (an advisory lock on a bigint key is recorded
    // as classid = high 32 bits, objid = low 32 bits, objsubid = 1).
    let key_bits = key as u64;
    let (high, low) = (
        i64::from((key_bits >> 32) as u32),
        i64::from(key_bits as u32),
    );
    let waiting = "SELECT count(*) FROM pg_locks
         WHERE locktype = 'advisory' AND NOT granted
           AND classid::bigint = $1 AND objid::bigint = $2 AND objsubid = 1";
    common::wait_until_count(&holder, waiting, &[&high, &low], 2).await;
    let granted = "SELECT count(*) FROM pg_locks
         WHERE locktype = 'advisory' AND granted
           AND classid::bigint = $1 AND objid::bigint = $2 AND objsubid = 1";
    assert_eq!(
        common::count(&holder, granted, &[&high, &low]).await,
        1,
        "only ours"
    );
    let before: bool = holder
        .query_one(
            "SELECT to_regclass($1) IS NULL",
            &[&format!("{}.saga_migrations", schema.quoted())],
        )
        .await
        .unwrap()
        .get(0);
    assert!(before, "nothing was migrated while the lock was held");

    holder
        .execute("SELECT pg_advisory_unlock($1)", &[&key])
        .await
        .unwrap();
    let mut reports = Vec::new();
    for migrator in migrators {
        let out = tokio::time::timeout(Duration::from_secs(120), migrator.wait_with_output())
            .await
            .expect("the migrator exits")
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "the migrator failed: {stdout}");
        let applied = stdout
            .lines()
            .find_map(|l| l.split("APPLIED ").nth(1))
            .unwrap_or_else(|| panic!("the migrator reports: {stdout}"))
            .trim()
            .to_owned();
        reports.push(applied);
    }
    reports.sort();
    assert_eq!(
        reports,
        [format!("{:?}", all_versions()), "[]".to_owned()],
        "one migrator applied every migration, the other found nothing to do"
    );
    let recorded: Vec<i32> = holder
        .query(
            &format!(
                "SELECT version FROM {}.saga_migrations ORDER BY version",
                schema.quoted()
            ),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(recorded, all_versions());
}

const V1: Migration = Migration {
    version: 1,
    name: "one",
    sql: "CREATE TABLE {schema}.one (id int);",
    compatible_from: 1,
};
const V2: Migration = Migration {
    version: 2,
    name: "two",
    sql: "CREATE TABLE {schema}.two (id int);",
    compatible_from: 1,
};

#[tokio::test]
async fn an_edited_migration_is_refused_and_nothing_is_applied() {
    let common::FreshSchema {
        pool,
        schema,
        guard: _guard,
        ..
    } = common::fresh_schema().await;
    let mut client = pool.get().await.unwrap();
    migrate_with(&mut client, &schema, &[V1]).await.unwrap();
    let edited = Migration {
        sql: "CREATE TABLE {schema}.one (id bigint);",
        ..V1
    };
    let err = migrate_with(&mut client, &schema, &[edited, V2])
        .await
        .unwrap_err();
    assert!(
        matches!(err, PgError::MigrationEdited { version: 1, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("checksum mismatch"), "{err}");
    let two_exists: bool = client
        .query_one(
            "SELECT to_regclass($1) IS NOT NULL",
            &[&format!("{}.two", schema.quoted())],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!two_exists, "no migration after the edited one was applied");
}

#[tokio::test]
async fn migrations_apply_in_order_and_a_failing_one_rolls_all_back() {
    let common::FreshSchema {
        pool,
        schema,
        guard: _guard,
        ..
    } = common::fresh_schema().await;
    let mut client = pool.get().await.unwrap();
    let broken = Migration {
        version: 3,
        name: "broken",
        sql: "CREATE TABLE {schema}.three (id int REFERENCES {schema}.nowhere (id));",
        compatible_from: 1,
    };
    // Given out of order; applied in order; the last one fails.
    let err = migrate_with(&mut client, &schema, &[broken, V2, V1])
        .await
        .unwrap_err();
    let code = err.code().cloned();
    assert_eq!(
        code,
        Some(saga_postgres::tokio_postgres::error::SqlState::UNDEFINED_TABLE)
    );
    let tables: i64 = client
        .query_one(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = $1",
            &[&schema.as_str()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(tables, 0, "the whole run rolled back, bookkeeping included");
    let report = migrate_with(&mut client, &schema, &[V2, V1]).await.unwrap();
    assert_eq!(report.applied, vec![1, 2]);
    // A newer binary's migration is reported, not refused.
    let report = migrate_with(&mut client, &schema, &[V1]).await.unwrap();
    assert_eq!(report.unknown, vec![2]);
}

/// This binary's migrations and one more, as a newer binary has them.
fn newer_binary(compatible_from: i32) -> Vec<Migration> {
    let mut newer = MIGRATIONS.to_vec();
    newer.push(Migration {
        version: latest_version() + 1,
        name: "from_the_future",
        sql: "ALTER TABLE {schema}.saga_instances ADD COLUMN future int NOT NULL DEFAULT 0;",
        compatible_from,
    });
    newer
}

#[tokio::test]
async fn an_older_binary_is_refused_on_a_schema_a_newer_one_migrated_past_it() {
    let common::FreshSchema {
        pool,
        schema,
        guard: _guard,
        ..
    } = common::fresh_schema().await;
    let next = latest_version() + 1;
    let newer = newer_binary(next);
    let report = migrate_with(&mut pool.get().await.unwrap(), &schema, &newer)
        .await
        .unwrap();
    assert_eq!(
        report.applied,
        all_versions().into_iter().chain([next]).collect::<Vec<_>>()
    );

    // This binary is the older one: its check and its migrate refuse.
    let store = PgSagaStore::new(pool.clone(), schema.clone());
    let err = store.check_schema().await.unwrap_err();
    let PgError::SchemaTooNew {
        migration,
        needs,
        binary,
        applied_by,
        ..
    } = &err
    else {
        panic!("{err:?}");
    };
    assert_eq!(
        (*migration, *needs, *binary),
        (next, next, latest_version())
    );
    assert_eq!(applied_by.as_deref(), Some(env!("CARGO_PKG_VERSION")));
    let text = err.to_string();
    assert!(
        text.contains(&format!(
            "needs a binary that knows migration {next} or later"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!("knows migrations up to {}", latest_version())),
        "{text}"
    );
    let err = migrate(&mut pool.get().await.unwrap(), &schema)
        .await
        .unwrap_err();
    assert!(matches!(err, PgError::SchemaTooNew { .. }), "{err:?}");
    // The newer binary itself is fine.
    migrate_with(&mut pool.get().await.unwrap(), &schema, &newer)
        .await
        .unwrap();
}

#[tokio::test]
async fn an_older_binary_works_on_a_schema_with_a_newer_additive_migration() {
    let common::FreshSchema {
        pool,
        schema,
        guard: _guard,
        ..
    } = common::fresh_schema().await;
    let next = latest_version() + 1;
    migrate_with(&mut pool.get().await.unwrap(), &schema, &newer_binary(1))
        .await
        .unwrap();
    check_migrations(&pool.get().await.unwrap(), &schema)
        .await
        .unwrap();
    let report = migrate(&mut pool.get().await.unwrap(), &schema)
        .await
        .unwrap();
    assert_eq!(report.unknown, vec![next]);
}

#[tokio::test]
async fn a_migrations_table_from_before_compatibility_is_checked_and_then_filled_in() {
    let common::FreshSchema {
        pool,
        schema,
        guard: _guard,
        ..
    } = common::fresh_schema().await;
    migrate(&mut pool.get().await.unwrap(), &schema)
        .await
        .unwrap();
    let client = pool.get().await.unwrap();
    let table = format!("{}.saga_migrations", schema.quoted());
    // As a binary from before `compatible_from` left it.
    client
        .batch_execute(&format!(
            "ALTER TABLE {table} DROP COLUMN compatible_from, DROP COLUMN applied_by"
        ))
        .await
        .unwrap();
    PgSagaStore::new(pool.clone(), schema.clone())
        .check_schema()
        .await
        .unwrap();
    let report = migrate(&mut pool.get().await.unwrap(), &schema)
        .await
        .unwrap();
    assert!(report.applied.is_empty());
    let rows = client
        .query(
            &format!("SELECT version, compatible_from, applied_by FROM {table} ORDER BY version"),
            &[],
        )
        .await
        .unwrap();
    let recorded: Vec<(i32, i32, Option<String>)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let declared: Vec<(i32, i32, Option<String>)> = MIGRATIONS
        .iter()
        .map(|m| (m.version, m.compatible_from, None))
        .collect();
    assert_eq!(recorded, declared, "filled in from the declarations");
}
