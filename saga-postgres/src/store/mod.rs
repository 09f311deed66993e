//! [`PgSagaStore`]: the `SagaStore` contract on PostgreSQL.
//!
//! Every operation is one statement (one round trip, one implicit
//! transaction): a claim leases a whole batch with `FOR UPDATE SKIP LOCKED`;
//! a transition updates the instance (guarded by the lease token), appends
//! its history row and enqueues its outbox messages together. No
//! transaction is ever open while a step runs.
//!
//! Deadlines, retries and lost replies are handled by [`crate::db`]; the
//! times leases and due times are compared with are the server's
//! ([`crate::db::clock`]).
//!
//! - `sql.rs`: the statements;
//! - `params.rs`: what a start and a transition bind;
//! - `rows.rs`: reading rows back;
//! - `saga_store.rs`: the [`SagaStore`](saga_core::store::SagaStore) operations.

mod params;
mod rows;
mod saga_store;
pub(crate) mod sql;

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use deadpool_postgres::Pool;
use saga_core::store::{NewSaga, Record};
use saga_core::{Clock, Error, Limits, Payload, SagaKind, ShapeFingerprint, Started, SystemClock};
use uuid::Uuid;

use params::{StartParams, to_i32};
pub(crate) use rows::outbox_message;
use sql::Sql;

use crate::db::Db;
use crate::db::ambiguity::AmbiguityCounters;
use crate::db::clock::DbClock;
use crate::db::rows::col;
use crate::error::PgError;
use crate::migrate;
use crate::pool::{DEFAULT_POOL_SIZE, pool_from_url};
use crate::schema::SchemaName;

/// Default time an operation may take, retries included, while the database
/// is unreachable or failing, before the error goes back to the caller.
pub const DEFAULT_OPERATION_DEADLINE: Duration = Duration::from_secs(30);

/// Counters of what the store had to recover from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoreStats {
    /// Operations retried after a lost connection, a restart, a
    /// serialization failure, a deadlock or a read-only session.
    pub retries: u64,
    /// Transitions whose commit was ambiguous and turned out to have
    /// committed.
    pub ambiguous_committed: u64,
    /// Transitions whose commit was ambiguous and turned out not to have
    /// committed (they were written again).
    pub ambiguous_not_committed: u64,
    /// Transitions whose commit was ambiguous and that could not be
    /// resolved before the operation's deadline (the caller got an error;
    /// the step runs again once its lease expires).
    pub ambiguous_unresolved: u64,
    /// Claims whose reply was lost after they committed: the rows they
    /// leased were looked up by claim id and handed out.
    pub claims_recovered: u64,
    /// Claimed rows that could not be read (a malformed column, written by
    /// hand) and were parked as `Stuck` instead of failing the whole batch.
    pub malformed_parked: u64,
    /// Claimed rows whose attempt count was at its bound (1,000,000; a
    /// count written by hand), so that no claim could count another
    /// attempt: parked as `Stuck` by themselves, the rest of the batch
    /// claimed.
    pub unclaimable_parked: u64,
}

struct Inner {
    db: Db,
    schema: SchemaName,
    clock: DbClock,
    sql: Sql,
    limits: Limits,
    ambiguity: AmbiguityCounters,
    malformed_parked: AtomicU64,
    unclaimable_parked: AtomicU64,
}

/// A [`SagaStore`](saga_core::store::SagaStore) on PostgreSQL. Cheap to clone:
/// clones share the pool, the configuration and the counters.
///
/// Tables live in one schema (default `saga`), created by
/// [`migrate`](crate::migrate()). Leases, due times and lease guards are
/// compared on the database server's clock, so that workers whose clocks
/// disagree cannot take over each other's live leases; the store's
/// [`clock`](saga_core::store::SagaStore::clock), from which the executor
/// computes retry times, is the worker's clock corrected by its offset to
/// the server's. Build one with [`PgSagaStore::builder`] (or
/// [`new`](PgSagaStore::new) / [`connect`](PgSagaStore::connect) for the
/// defaults).
#[derive(Clone)]
pub struct PgSagaStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for PgSagaStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgSagaStore")
            .field("schema", &self.inner.schema)
            .field("operation_deadline", &self.inner.db.operation_deadline())
            .field("limits", &self.inner.limits)
            .finish_non_exhaustive()
    }
}

/// Builds a [`PgSagaStore`]: [`PgSagaStore::builder`].
#[must_use]
pub struct PgSagaStoreBuilder {
    pool: Pool,
    schema: SchemaName,
    clock: Option<Arc<dyn Clock>>,
    local_clock: Arc<dyn Clock>,
    operation_deadline: Duration,
    limits: Limits,
}

impl std::fmt::Debug for PgSagaStoreBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgSagaStoreBuilder")
            .field("schema", &self.schema)
            .field("clock", &self.clock)
            .field("operation_deadline", &self.operation_deadline)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl PgSagaStoreBuilder {
    /// Drives time with `clock` instead of the server's (for tests: a
    /// [`ManualClock`](saga_core::ManualClock)): its time is bound into
    /// every statement, and it is the store's
    /// [`clock`](saga_core::store::SagaStore::clock).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = Some(clock);
        self
    }

    /// The worker's own clock, read (corrected by the offset learned from
    /// the server) as the store's clock when no [`clock`](Self::clock) is
    /// injected. Default: the system clock. For tests of clock skew.
    pub fn local_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.local_clock = clock;
        self
    }

    /// How long one operation may take, retries included, while the
    /// database is unreachable or failing (default
    /// [`DEFAULT_OPERATION_DEADLINE`], 30 s): a wall-clock deadline from
    /// the start of the operation, covering connecting, waiting for a
    /// pooled connection, every attempt, the waits between attempts and the
    /// lookups that resolve an ambiguous commit. At the deadline, or when
    /// the next attempt would start after it, the operation fails: with the
    /// last attempt's error, or [`PgError::DeadlineExceeded`] if an attempt
    /// was still pending.
    pub fn operation_deadline(mut self, d: Duration) -> Self {
        self.operation_deadline = d;
        self
    }

    /// The size caps (default [`Limits::default`], 256 KiB): a start's
    /// input and a transition's state over `max_state_bytes`, or an outbox
    /// payload over `max_payload_bytes`, are refused with
    /// [`Error::TooLarge`] before anything is written. The one source of
    /// the caps: clients and executors on this store read them
    /// ([`SagaStore::limits`](saga_core::store::SagaStore::limits)), so that
    /// an oversized start is refused at once and an oversized state fails
    /// its step for good.
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// The store. Does not touch the database; see
    /// [`check_schema`](PgSagaStore::check_schema).
    pub fn build(self) -> PgSagaStore {
        let sql = Sql::new(&self.schema);
        let clock = DbClock::new(self.clock, self.local_clock);
        PgSagaStore {
            inner: Arc::new(Inner {
                db: Db::new(self.pool, self.operation_deadline),
                schema: self.schema,
                clock,
                sql,
                limits: self.limits,
                ambiguity: AmbiguityCounters::default(),
                malformed_parked: AtomicU64::new(0),
                unclaimable_parked: AtomicU64::new(0),
            }),
        }
    }
}

/// A value's size as compact JSON, without building the text.
fn json_size(value: &serde_json::Value) -> usize {
    struct Count(usize);
    impl io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Writing a `Value` to a writer that never fails cannot fail.
    let _ = serde_json::to_writer(&mut count, value);
    count.0
}

fn check_size(what: &'static str, size: usize, limit: usize) -> Result<(), Error> {
    if size > limit {
        return Err(Error::TooLarge { what, size, limit });
    }
    Ok(())
}

/// Refuses `value`, as `what`, unless PostgreSQL can keep it as given.
fn check_storable(what: &'static str, value: &serde_json::Value) -> Result<(), Error> {
    saga_core::storable::check(value).map_err(|problem| Error::Unstorable { what, problem })
}

/// The kinds and their fingerprints (index for index) as three arrays for
/// `unnest`, one entry per kind (the first fingerprint given for it); a kind
/// without a fingerprint is left out, so it claims nothing.
fn fingerprinted_kind_arrays<'a>(
    kinds: &'a [SagaKind],
    fingerprints: &[ShapeFingerprint],
) -> (Vec<&'a str>, Vec<i32>, Vec<Vec<u8>>) {
    let mut triples: Vec<(&str, i32, Vec<u8>)> = kinds
        .iter()
        .zip(fingerprints)
        .map(|(k, f)| (k.name.as_str(), to_i32(k.version), f.as_bytes().to_vec()))
        .collect();
    // Stable: the first fingerprint given for a kind stays first.
    triples.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
    triples.dedup_by(|a, b| (a.0, a.1) == (b.0, b.1));
    let mut out = (Vec::new(), Vec::new(), Vec::new());
    for (name, version, fingerprint) in triples {
        out.0.push(name);
        out.1.push(version);
        out.2.push(fingerprint);
    }
    out
}

/// The kinds as two arrays for `unnest`, without duplicates.
fn kind_arrays(kinds: &[SagaKind]) -> (Vec<&str>, Vec<i32>) {
    let mut pairs: Vec<(&str, i32)> = kinds
        .iter()
        .map(|k| (k.name.as_str(), to_i32(k.version)))
        .collect();
    pairs.sort_unstable();
    pairs.dedup();
    pairs.into_iter().unzip()
}

impl PgSagaStore {
    /// A builder for a store on `pool`, with its tables in `schema`.
    pub fn builder(pool: Pool, schema: SchemaName) -> PgSagaStoreBuilder {
        PgSagaStoreBuilder {
            pool,
            schema,
            clock: None,
            local_clock: Arc::new(SystemClock),
            operation_deadline: DEFAULT_OPERATION_DEADLINE,
            limits: Limits::default(),
        }
    }

    /// A store on `pool`, with its tables in `schema`, with the defaults
    /// ([`builder`](PgSagaStore::builder) for others). Does not touch the
    /// database; see [`check_schema`](PgSagaStore::check_schema).
    #[must_use]
    pub fn new(pool: Pool, schema: SchemaName) -> Self {
        PgSagaStore::builder(pool, schema).build()
    }

    /// Connects to `url` with a pool of [`DEFAULT_POOL_SIZE`] connections and
    /// checks that `schema` is migrated.
    pub async fn connect(url: &str, schema: SchemaName) -> Result<Self, PgError> {
        let store = PgSagaStore::new(pool_from_url(url, DEFAULT_POOL_SIZE)?, schema);
        store.check_schema().await?;
        Ok(store)
    }

    /// The size caps set by [`limits`](PgSagaStoreBuilder::limits).
    #[must_use]
    pub fn limits(&self) -> Limits {
        self.inner.limits
    }

    /// The operation deadline set by
    /// [`operation_deadline`](PgSagaStoreBuilder::operation_deadline).
    #[must_use]
    pub fn operation_deadline(&self) -> Duration {
        self.inner.db.operation_deadline()
    }

    /// The connection pool.
    #[must_use]
    pub fn pool(&self) -> &Pool {
        self.inner.db.pool()
    }

    /// The schema.
    #[must_use]
    pub fn schema(&self) -> &SchemaName {
        &self.inner.schema
    }

    /// What the store has had to recover from so far.
    #[must_use]
    pub fn stats(&self) -> StoreStats {
        let a = &self.inner.ambiguity;
        StoreStats {
            retries: self.inner.db.retries(),
            ambiguous_committed: a.committed.load(Ordering::Relaxed),
            ambiguous_not_committed: a.not_committed(),
            ambiguous_unresolved: a.unresolved.load(Ordering::Relaxed),
            claims_recovered: a.claims_recovered.load(Ordering::Relaxed),
            malformed_parked: self.inner.malformed_parked.load(Ordering::Relaxed),
            unclaimable_parked: self.inner.unclaimable_parked.load(Ordering::Relaxed),
        }
    }

    /// Fails with [`PgError::NotMigrated`] unless the schema has every
    /// migration this binary needs, and with [`PgError::SchemaTooNew`] if a
    /// newer binary applied a migration this one cannot work with (see
    /// [`Migration::compatible_from`](crate::Migration::compatible_from)).
    pub async fn check_schema(&self) -> Result<(), PgError> {
        let client = self.inner.db.pool().get().await?;
        migrate::check(&client, &self.inner.schema).await
    }

    /// Refuses a start whose input is over the cap or not storable JSON
    /// (see [`saga_core::storable`]).
    fn check_start(&self, new: &NewSaga) -> Result<(), Error> {
        check_size(
            "saga input",
            json_size(&new.state),
            self.inner.limits.max_state_bytes,
        )?;
        check_storable("saga input", &new.state)
    }

    /// Refuses a transition whose state or messages are over the caps or
    /// not storable JSON.
    fn check_record(&self, record: &Record) -> Result<(), Error> {
        let limits = &self.inner.limits;
        if let Some(state) = &record.state {
            check_size("saga state", json_size(state), limits.max_state_bytes)?;
            check_storable("saga state", state)?;
        }
        for m in &record.outbox {
            check_size("outbox payload", m.payload.len(), limits.max_payload_bytes)?;
            if let Payload::Json(v) = &m.payload {
                check_storable("outbox payload", v)?;
            }
        }
        Ok(())
    }

    /// Starts an instance inside the caller's own transaction, next to
    /// their business write: the instance exists if and only if that
    /// transaction commits. Prepare `new` with [`NewSaga::new`]; an input
    /// over the store's cap ([`limits`](PgSagaStoreBuilder::limits)) is
    /// refused with [`Error::TooLarge`] before anything is sent. Same
    /// idempotency on the start key as
    /// [`SagaStore::start`](saga_core::store::SagaStore::start); use READ
    /// COMMITTED (the default) so that a start racing with another on the
    /// same key sees the winner. Nothing is retried: errors go back to the
    /// caller, whose transaction is then to be rolled back. Instances
    /// started this way are not counted by `saga_started_total` unless you
    /// call [`saga_core::count_started`] after the commit.
    pub async fn start_in_tx(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        new: NewSaga,
    ) -> Result<Started, Error> {
        self.check_start(&new)?;
        let now = self.inner.clock.bind();
        let p = StartParams::new(&new);
        let sql = &self.inner.sql;
        let rows = tx
            .query(
                sql.start.text(),
                &sql.start.bind(&p.bind(&now, &new.state))?,
            )
            .await
            .map_err(PgError::from)?;
        let existing = match rows.first() {
            Some(row) => rows::start_winner(row)?,
            None => {
                let rows = tx
                    .query(
                        sql.start_existing.text(),
                        &sql.start_existing.bind(&p.bind_existing())?,
                    )
                    .await
                    .map_err(PgError::from)?;
                saga_store::winner(&rows)?
            }
        };
        saga_store::started(new, existing)
    }

    /// The query plan of a claim for `kinds` (`EXPLAIN` output, one line
    /// per row), to check that claims use the `saga_instances_due` partial
    /// index and touch only due rows of those kinds. Claims nothing.
    pub async fn explain_claim(&self, kinds: &[SagaKind], limit: usize) -> Result<String, PgError> {
        let (names, versions) = kind_arrays(kinds);
        // The plan does not depend on which fingerprints are asked for.
        let fingerprints = vec![vec![0u8; 32]; names.len()];
        let now = self.inner.clock.bind();
        let lease_for = crate::db::rows::micros(Duration::from_secs(60));
        let worker = Uuid::nil();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let claim = &self.inner.sql.claim;
        let params = claim.bind(&[
            ("now", &now),
            ("worker", &worker),
            ("limit", &limit),
            ("names", &names),
            ("versions", &versions),
            ("fingerprints", &fingerprints),
            ("lease_for_us", &lease_for),
            ("claim_id", &worker),
        ])?;
        let mut client = self.inner.db.pool().get().await?;
        // EXPLAIN ANALYZE would run the UPDATE: explain inside a transaction
        // that is rolled back, without ANALYZE, so nothing changes.
        let tx = client.transaction().await?;
        let rows = tx
            .query(&format!("EXPLAIN {}", claim.text()), &params)
            .await?;
        tx.rollback().await?;
        rows.iter()
            .map(|r| col::<String>(r, "QUERY PLAN"))
            .collect::<Result<Vec<_>, _>>()
            .map(|lines| lines.join("\n"))
    }

    /// Every statement the store sends, for the crate's statement tests.
    pub(crate) fn statements(schema: &SchemaName) -> Vec<crate::db::statement::Statement> {
        Sql::new(schema).all().into_iter().cloned().collect()
    }
}
