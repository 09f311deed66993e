//! Migrations: ordered, checksummed, idempotent, safe to run concurrently.

mod common;

use saga_postgres::{MIGRATIONS, Migration, PgError, PgSagaStore, migrate, migrate_with};

/// The versions of every embedded migration.
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
        matches!(err, PgError::NotMigrated { found: 0, .. }),
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
            "saga_history",
            "saga_instances",
            "saga_migrations"
        ]
    );
}

#[tokio::test]
async fn concurrent_migrations_serialize_on_the_advisory_lock() {
    let common::FreshSchema {
        pool,
        schema,
        guard: _guard,
        ..
    } = common::fresh_schema().await;
    let runs = (0..4).map(|_| {
        let pool = pool.clone();
        let schema = schema.clone();
        tokio::spawn(async move {
            let mut client = pool.get().await.unwrap();
            migrate(&mut client, &schema).await
        })
    });
    let mut applied = Vec::new();
    for run in runs {
        applied.extend(run.await.unwrap().expect("no migration run fails").applied);
    }
    assert_eq!(
        applied,
        all_versions(),
        "exactly one run applied the migrations"
    );
}

const V1: Migration = Migration {
    version: 1,
    name: "one",
    sql: "CREATE TABLE {schema}.one (id int);",
};
const V2: Migration = Migration {
    version: 2,
    name: "two",
    sql: "CREATE TABLE {schema}.two (id int);",
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
