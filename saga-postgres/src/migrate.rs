//! Embedded, ordered, checksummed migrations, run under an advisory lock.
//!
//! Run them with a role allowed to run DDL (see the operations guide); the
//! store itself only needs DML. [`migrate`] is safe to call from several
//! processes at once: they serialize on a transaction-scoped advisory lock,
//! and all pending migrations apply in one transaction, so a failure leaves
//! the schema as it was.

use sha2::{Digest, Sha256};
use tokio_postgres::Client;

use crate::db::rows::col;
use crate::error::PgError;
use crate::schema::SchemaName;

/// One embedded migration.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// Its version: migrations apply in increasing order.
    pub version: i32,
    /// A short name.
    pub name: &'static str,
    /// The SQL, with `{schema}` standing for the quoted schema name.
    pub sql: &'static str,
}

impl Migration {
    /// SHA-256 of the migration's text (before the schema is substituted).
    #[must_use]
    pub fn checksum(&self) -> Vec<u8> {
        Sha256::digest(self.sql.as_bytes()).to_vec()
    }

    fn render(&self, schema: &SchemaName) -> String {
        self.sql.replace("{schema}", &schema.quoted())
    }
}

/// Every migration this binary knows, in order.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "sagas_and_outbox",
        sql: include_str!("../migrations/0001_sagas_and_outbox.sql"),
    },
    Migration {
        version: 2,
        name: "inbox",
        sql: include_str!("../migrations/0002_inbox.sql"),
    },
    Migration {
        version: 3,
        name: "outbox_attempt_and_due_times",
        sql: include_str!("../migrations/0003_outbox_attempt_and_due_times.sql"),
    },
    Migration {
        version: 4,
        name: "claims_by_kind",
        sql: include_str!("../migrations/0004_claims_by_kind.sql"),
    },
    Migration {
        version: 5,
        name: "definition_fingerprints",
        sql: include_str!("../migrations/0005_definition_fingerprints.sql"),
    },
];

/// The latest migration this binary knows.
#[must_use]
pub fn latest_version() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

/// What [`migrate`] did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct MigrationReport {
    /// Versions applied by this call.
    pub applied: Vec<i32>,
    /// Versions found in the database that this binary does not know (a
    /// newer binary migrated it); left alone.
    pub unknown: Vec<i32>,
}

/// The key of the transaction-scoped advisory lock that [`migrate`] takes
/// for `schema` (`pg_advisory_xact_lock(key)`): a session holding
/// `pg_advisory_lock(key)` keeps every migration of that schema waiting.
#[must_use]
pub fn lock_key(schema: &SchemaName) -> i64 {
    let digest = Sha256::digest(format!("saga-postgres migrate {schema}").as_bytes());
    i64::from_be_bytes(digest[..8].try_into().expect("8 bytes"))
}

/// Applies every pending migration to `schema` (creating it if needed), in
/// one transaction under an advisory lock. An applied migration whose text
/// changed is an error ([`PgError::MigrationEdited`]) and nothing is applied.
pub async fn migrate(client: &mut Client, schema: &SchemaName) -> Result<MigrationReport, PgError> {
    migrate_with(client, schema, MIGRATIONS).await
}

/// [`migrate`] with an explicit list of migrations (for tests).
pub async fn migrate_with(
    client: &mut Client,
    schema: &SchemaName,
    migrations: &[Migration],
) -> Result<MigrationReport, PgError> {
    let q = schema.quoted();
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&lock_key(schema)])
        .await?;
    tx.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS {q};
         CREATE TABLE IF NOT EXISTS {q}.saga_migrations (
             version    integer     PRIMARY KEY,
             name       text        NOT NULL,
             checksum   bytea       NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now()
         );"
    ))
    .await?;
    let applied = tx
        .query(
            &format!("SELECT version, name, checksum FROM {q}.saga_migrations ORDER BY version"),
            &[],
        )
        .await?;
    let mut report = MigrationReport::default();
    let mut done = Vec::with_capacity(applied.len());
    for row in applied {
        let version: i32 = col(&row, "version")?;
        let checksum: Vec<u8> = col(&row, "checksum")?;
        match migrations.iter().find(|m| m.version == version) {
            Some(m) if m.checksum() != checksum => {
                return Err(PgError::MigrationEdited {
                    version,
                    name: m.name.to_owned(),
                });
            }
            Some(_) => done.push(version),
            None => report.unknown.push(version),
        }
    }
    let mut pending: Vec<&Migration> = migrations
        .iter()
        .filter(|m| !done.contains(&m.version))
        .collect();
    pending.sort_by_key(|m| m.version);
    for m in pending {
        tracing::info!(schema = %schema, version = m.version, name = m.name, "applying migration");
        tx.batch_execute(&m.render(schema)).await?;
        tx.execute(
            &format!(
                "INSERT INTO {q}.saga_migrations (version, name, checksum) VALUES ($1, $2, $3)"
            ),
            &[&m.version, &m.name, &m.checksum()],
        )
        .await?;
        report.applied.push(m.version);
    }
    tx.commit().await?;
    if !report.unknown.is_empty() {
        tracing::warn!(schema = %schema, unknown = ?report.unknown,
            "the schema has migrations this binary does not know; a newer version migrated it");
    }
    Ok(report)
}

/// Checks that `schema` has every migration this binary needs, without
/// changing anything (the runtime role needs no DDL rights for this).
///
/// Every migration of [`MIGRATIONS`] must be recorded, not only the highest
/// version: versions may have gaps, and a schema migrated by a build that
/// lacked one of them is refused ([`PgError::NotMigrated`] names the lowest
/// one missing).
pub async fn check(client: &Client, schema: &SchemaName) -> Result<(), PgError> {
    let q = schema.quoted();
    let exists: bool = col(
        &client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM information_schema.tables \
                 WHERE table_schema = $1 AND table_name = 'saga_migrations') AS found",
                &[&schema.as_str()],
            )
            .await?,
        "found",
    )?;
    let applied: Vec<i32> = if exists {
        client
            .query(&format!("SELECT version FROM {q}.saga_migrations"), &[])
            .await?
            .iter()
            .map(|row| col(row, "version"))
            .collect::<Result<_, _>>()?
    } else {
        Vec::new()
    };
    match missing(&applied, MIGRATIONS) {
        None => Ok(()),
        Some(missing) => Err(PgError::NotMigrated {
            schema: schema.to_string(),
            found: applied.iter().copied().max().unwrap_or(0),
            missing,
            needed: latest_version(),
        }),
    }
}

/// The lowest version of `migrations` that is not in `applied`.
fn missing(applied: &[i32], migrations: &[Migration]) -> Option<i32> {
    migrations
        .iter()
        .map(|m| m.version)
        .filter(|v| !applied.contains(v))
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn m(version: i32) -> Migration {
        Migration {
            version,
            name: "m",
            sql: "",
        }
    }

    #[test]
    fn every_known_migration_must_be_applied_not_only_the_highest() {
        let known = [m(1), m(2), m(4)];
        assert_eq!(missing(&[1, 2, 4], &known), None);
        assert_eq!(missing(&[1, 2, 4, 5], &known), None, "a newer binary's");
        assert_eq!(missing(&[1, 4], &known), Some(2), "a gap below the top");
        assert_eq!(missing(&[], &known), Some(1));
    }

    #[test]
    fn embedded_versions_increase() {
        assert!(MIGRATIONS.windows(2).all(|w| w[0].version < w[1].version));
        assert_eq!(latest_version(), MIGRATIONS.last().unwrap().version);
    }
}
