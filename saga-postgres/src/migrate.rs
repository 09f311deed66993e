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
    /// The oldest binary that still works on a schema with this migration
    /// applied, named by the latest migration that binary knows (its
    /// [`latest_version`]). Recorded in `saga_migrations` when the
    /// migration is applied; [`check`] and [`migrate`] refuse a binary that
    /// knows fewer migrations than an applied one's `compatible_from`
    /// ([`PgError::SchemaTooNew`]).
    ///
    /// The rule (see the operations guide): a migration that only adds what
    /// older binaries can ignore (a table, an index, a column that is
    /// nullable or has a default and that they never need to fill) keeps
    /// the previous migration's value; one that changes what older binaries
    /// read or write (a column they must fill, a constraint their writes
    /// break, a renamed or dropped column, a value they do not know) sets
    /// it to its own version. It never decreases from one migration to the
    /// next.
    pub compatible_from: i32,
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
        // The first: every binary knows it.
        compatible_from: 1,
    },
    Migration {
        version: 2,
        name: "inbox",
        sql: include_str!("../migrations/0002_inbox.sql"),
        // A new table, which older binaries do not use.
        compatible_from: 1,
    },
    Migration {
        version: 3,
        name: "outbox_attempt_and_due_times",
        sql: include_str!("../migrations/0003_outbox_attempt_and_due_times.sql"),
        // Nullable columns and an index, which older binaries ignore.
        compatible_from: 1,
    },
    Migration {
        version: 4,
        name: "claims_by_kind",
        sql: include_str!("../migrations/0004_claims_by_kind.sql"),
        // A nullable column and a wider index, which older binaries ignore.
        compatible_from: 1,
    },
    Migration {
        version: 5,
        name: "definition_fingerprints",
        sql: include_str!("../migrations/0005_definition_fingerprints.sql"),
        // A new table and a nullable column: an older binary ignores both
        // (its starts leave the fingerprint NULL, which every worker of the
        // kind may claim, as before), so a rollback past it still works.
        compatible_from: 1,
    },
    Migration {
        version: 6,
        name: "attempt_bound",
        sql: include_str!("../migrations/0006_attempt_bound.sql"),
        // A narrower CHECK that only a hand edit or a retry budget of over a
        // million attempts reaches; older binaries' writes stay within it.
        compatible_from: 1,
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

/// The version of this library, recorded with each migration it applies
/// and named by [`PgError::SchemaTooNew`].
const LIBRARY_VERSION: &str = env!("CARGO_PKG_VERSION");

/// A connection that [`migrate`] and [`check`] can run on: a driver
/// [`Client`], or a pooled connection as the pool hands it out, so that
/// `migrate(&mut pool.get().await?, &schema)` compiles as written.
///
/// ```no_run
/// # async fn run(pool: saga_postgres::deadpool_postgres::Pool) -> Result<(), Box<dyn std::error::Error>> {
/// use saga_postgres::{SchemaName, check_migrations, migrate};
///
/// let schema = SchemaName::new("saga")?;
/// migrate(&mut pool.get().await?, &schema).await?;
/// check_migrations(&pool.get().await?, &schema).await?;
/// # Ok(())
/// # }
/// ```
pub trait MigrationClient: Send + Sync {
    /// The driver's client.
    fn client(&self) -> &Client;
    /// The driver's client, to open a transaction on.
    fn client_mut(&mut self) -> &mut Client;
}

impl MigrationClient for Client {
    fn client(&self) -> &Client {
        self
    }
    fn client_mut(&mut self) -> &mut Client {
        self
    }
}

impl MigrationClient for deadpool_postgres::ClientWrapper {
    fn client(&self) -> &Client {
        self
    }
    fn client_mut(&mut self) -> &mut Client {
        self
    }
}

impl MigrationClient for deadpool_postgres::Object {
    fn client(&self) -> &Client {
        self
    }
    fn client_mut(&mut self) -> &mut Client {
        self
    }
}

/// Applies every pending migration to `schema` (creating it if needed), in
/// one transaction under an advisory lock. An applied migration whose text
/// changed is an error ([`PgError::MigrationEdited`]) and nothing is applied;
/// so is a schema that a newer binary migrated past what this one can work
/// with ([`PgError::SchemaTooNew`], see [`Migration::compatible_from`]).
pub async fn migrate(
    client: &mut impl MigrationClient,
    schema: &SchemaName,
) -> Result<MigrationReport, PgError> {
    migrate_with(client, schema, MIGRATIONS).await
}

/// [`migrate`] with an explicit list of migrations (for tests: a list
/// longer than [`MIGRATIONS`] stands for a newer binary).
pub async fn migrate_with(
    client: &mut impl MigrationClient,
    schema: &SchemaName,
    migrations: &[Migration],
) -> Result<MigrationReport, PgError> {
    let q = schema.quoted();
    let tx = client.client_mut().transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&lock_key(schema)])
        .await?;
    // `compatible_from` and `applied_by` came after the table: added to
    // a table made without them, and filled in for the rows this binary
    // knows (rows applied by a binary that did not record them).
    tx.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS {q};
         CREATE TABLE IF NOT EXISTS {q}.saga_migrations (
             version    integer     PRIMARY KEY,
             name       text        NOT NULL,
             checksum   bytea       NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now()
         );
         ALTER TABLE {q}.saga_migrations
             ADD COLUMN IF NOT EXISTS compatible_from integer,
             ADD COLUMN IF NOT EXISTS applied_by      text;"
    ))
    .await?;
    let (versions, compatible): (Vec<i32>, Vec<i32>) = migrations
        .iter()
        .map(|m| (m.version, m.compatible_from))
        .unzip();
    tx.execute(
        &format!(
            "UPDATE {q}.saga_migrations m SET compatible_from = k.compatible_from
             FROM unnest($1::int4[], $2::int4[]) AS k (version, compatible_from)
             WHERE m.version = k.version AND m.compatible_from IS NULL"
        ),
        &[&versions, &compatible],
    )
    .await?;
    let applied = tx
        .query(
            &format!(
                "SELECT version, name, checksum, compatible_from, applied_by
                 FROM {q}.saga_migrations ORDER BY version"
            ),
            &[],
        )
        .await?;
    let mut recorded = Vec::with_capacity(applied.len());
    for row in &applied {
        recorded.push(Applied {
            version: col(row, "version")?,
            compatible_from: col(row, "compatible_from")?,
            applied_by: col(row, "applied_by")?,
        });
    }
    if let Some(needs) = too_new(&recorded, migrations) {
        return Err(needs.error(schema, binary_level(migrations)));
    }
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
                "INSERT INTO {q}.saga_migrations
                     (version, name, checksum, compatible_from, applied_by)
                 VALUES ($1, $2, $3, $4, $5)"
            ),
            &[
                &m.version,
                &m.name,
                &m.checksum(),
                &m.compatible_from,
                &LIBRARY_VERSION,
            ],
        )
        .await?;
        report.applied.push(m.version);
    }
    tx.commit().await?;
    if !report.unknown.is_empty() {
        tracing::warn!(schema = %schema, unknown = ?report.unknown,
            "the schema has migrations this binary does not know; a newer version migrated it \
             (their `compatible_from` says this binary still works with them)");
    }
    Ok(report)
}

/// Checks that `schema` has every migration this binary needs, and none
/// that needs a newer binary, without changing anything (the runtime role
/// needs no DDL rights for this).
///
/// Every migration of [`MIGRATIONS`] must be recorded, not only the highest
/// version: versions may have gaps, and a schema migrated by a build that
/// lacked one of them is refused ([`PgError::NotMigrated`] names the lowest
/// one missing). A recorded migration whose
/// [`compatible_from`](Migration::compatible_from) is above this binary's
/// [`latest_version`] is refused with [`PgError::SchemaTooNew`].
pub async fn check(client: &impl MigrationClient, schema: &SchemaName) -> Result<(), PgError> {
    let client = client.client();
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
    // Read through `to_jsonb`, so that a table that a binary before
    // `compatible_from` made (without the columns) reads as NULLs.
    let recorded: Vec<Applied> = if exists {
        let rows = client
            .query(
                &format!(
                    "SELECT version, (to_jsonb(m) ->> 'compatible_from')::int4 AS compatible_from,
                        to_jsonb(m) ->> 'applied_by' AS applied_by
                     FROM {q}.saga_migrations m"
                ),
                &[],
            )
            .await?;
        let mut recorded = Vec::with_capacity(rows.len());
        for row in &rows {
            recorded.push(Applied {
                version: col(row, "version")?,
                compatible_from: col(row, "compatible_from")?,
                applied_by: col(row, "applied_by")?,
            });
        }
        recorded
    } else {
        Vec::new()
    };
    if let Some(needs) = too_new(&recorded, MIGRATIONS) {
        return Err(needs.error(schema, latest_version()));
    }
    let applied: Vec<i32> = recorded.iter().map(|a| a.version).collect();
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

/// A row of `saga_migrations`, as far as compatibility goes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Applied {
    version: i32,
    /// `None`: applied by a binary that did not record it.
    compatible_from: Option<i32>,
    /// `None`: applied by a binary that did not record it.
    applied_by: Option<String>,
}

/// The applied migration that needs a newer binary than one knowing
/// `migrations`, with what it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TooNew {
    migration: i32,
    needs: i32,
    applied_by: Option<String>,
}

impl TooNew {
    fn error(self, schema: &SchemaName, binary: i32) -> PgError {
        PgError::SchemaTooNew {
            schema: schema.to_string(),
            migration: self.migration,
            needs: self.needs,
            applied_by: self.applied_by,
            binary,
            binary_version: LIBRARY_VERSION,
        }
    }
}

/// The latest migration a binary knowing `migrations` knows.
fn binary_level(migrations: &[Migration]) -> i32 {
    migrations.iter().map(|m| m.version).max().unwrap_or(0)
}

/// Whether a binary knowing `migrations` is too old for the `applied`
/// ones: the applied migration with the highest requirement above the
/// binary's level, if any. A row without a recorded requirement takes the
/// one this binary declares for it, or, for a migration this binary does
/// not know, its own version (unknown, so assumed breaking).
fn too_new(applied: &[Applied], migrations: &[Migration]) -> Option<TooNew> {
    let level = binary_level(migrations);
    applied
        .iter()
        .map(|a| {
            let needs = a.compatible_from.unwrap_or_else(|| {
                migrations
                    .iter()
                    .find(|m| m.version == a.version)
                    .map_or(a.version, |m| m.compatible_from)
            });
            TooNew {
                migration: a.version,
                needs,
                applied_by: a.applied_by.clone(),
            }
        })
        .filter(|t| t.needs > level)
        .max_by_key(|t| (t.needs, t.migration))
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
        compatible(version, 1)
    }

    const fn compatible(version: i32, compatible_from: i32) -> Migration {
        Migration {
            version,
            name: "m",
            sql: "",
            compatible_from,
        }
    }

    fn applied(version: i32, compatible_from: Option<i32>) -> Applied {
        Applied {
            version,
            compatible_from,
            applied_by: Some("9.9.9".into()),
        }
    }

    #[test]
    fn a_binary_older_than_an_applied_migration_requires_is_too_new_for() {
        let binary = [m(1), m(2), m(4)];
        let needs = |applied: &[Applied]| too_new(applied, &binary).map(|t| (t.migration, t.needs));
        // Its own migrations, and a newer additive one: fine.
        assert_eq!(needs(&[applied(1, Some(1)), applied(4, Some(1))]), None);
        assert_eq!(needs(&[applied(4, Some(1)), applied(5, Some(4))]), None);
        // A newer migration that needs a binary knowing 5 (or 6).
        assert_eq!(
            needs(&[applied(4, Some(1)), applied(5, Some(5))]),
            Some((5, 5))
        );
        assert_eq!(
            needs(&[
                applied(5, Some(5)),
                applied(6, Some(6)),
                applied(7, Some(6))
            ]),
            Some((7, 6)),
            "the highest requirement, then the latest migration with it"
        );
        // Not recorded: this binary's own declaration, or, for a migration
        // it does not know, its own version.
        assert_eq!(needs(&[applied(2, None)]), None);
        assert_eq!(needs(&[applied(5, None)]), Some((5, 5)));
        assert_eq!(
            too_new(&[applied(5, None)], &[compatible(5, 1)]),
            None,
            "a binary that knows 5"
        );
    }

    #[test]
    fn embedded_compatibility_never_decreases_and_never_passes_its_migration() {
        assert!(
            MIGRATIONS
                .windows(2)
                .all(|w| w[0].compatible_from <= w[1].compatible_from)
        );
        assert!(
            MIGRATIONS
                .iter()
                .all(|m| (1..=m.version).contains(&m.compatible_from))
        );
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
