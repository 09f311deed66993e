//! [`PgSagaStore`]: the `SagaStore` contract on PostgreSQL.
//!
//! Every operation is one statement (one round trip, one implicit
//! transaction): a claim leases a whole batch with `FOR UPDATE SKIP LOCKED`;
//! a transition updates the instance (guarded by the lease token), appends
//! its history row and enqueues its outbox messages together. No
//! transaction is ever open while a step runs.
//!
//! ## Lost connections and ambiguous commits
//!
//! If the connection drops while a transition's statement is in flight, the
//! store cannot know whether it committed. It reconnects (with backoff) and
//! looks up the transition's id, written under a unique constraint by the
//! same statement: found, the transition took effect; not found, it is
//! written again, still guarded by the lease, so it can never apply twice
//! (and a late commit of the first attempt makes the second change nothing,
//! which the store detects by looking the id up once more).

use std::collections::BTreeMap;
use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use backon::BackoffBuilder;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use saga_core::{
    ClaimRequest, ClaimedSaga, Clock, Direction, Error, HistoryEntry, Lease, LeaseToken, MessageId,
    NewSaga, OutboxMessage, Payload, Record, SagaId, SagaKind, SagaName, SagaSnapshot, SagaStore,
    StartKey, Started, Status, StepName, SystemClock, Timestamp, TransitionId, WorkerId,
};
use tokio_postgres::NoTls;
use tokio_postgres::Row;
use uuid::Uuid;

use crate::error::{BoxError, PgError};
use crate::migrate;
use crate::schema::SchemaName;

/// Default size of the connection pool made by [`PgSagaStore::connect`].
pub const DEFAULT_POOL_SIZE: usize = 16;
/// Default time the store keeps retrying an operation while the database is
/// unreachable before giving the error to the caller.
pub const DEFAULT_RECONNECT_FOR: Duration = Duration::from_secs(30);

/// Counters of what the store had to recover from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Operations retried after a lost connection, a restart, a
    /// serialization failure or a deadlock.
    pub retries: u64,
    /// Transitions whose commit was ambiguous and turned out to have
    /// committed.
    pub ambiguous_committed: u64,
    /// Transitions whose commit was ambiguous and turned out not to have
    /// committed (they were written again).
    pub ambiguous_not_committed: u64,
    /// Transitions whose commit was ambiguous and that could not be
    /// resolved before the reconnect budget ran out (the caller got an
    /// error; the step runs again once its lease expires).
    pub ambiguous_unresolved: u64,
}

#[derive(Debug, Default)]
struct Counters {
    retries: AtomicU64,
    ambiguous_committed: AtomicU64,
    ambiguous_not_committed: AtomicU64,
    // A "not committed" answer later corrected to "committed" (the first
    // attempt's backend committed after the lookup): taken back from the
    // not-committed count.
    ambiguous_not_committed_undo: AtomicU64,
    ambiguous_unresolved: AtomicU64,
}

/// The SQL of every operation, rendered once for the schema.
#[derive(Debug)]
struct Sql {
    start: String,
    start_existing: String,
    claim: String,
    heartbeat: String,
    release: String,
    record_leased: String,
    record_unleased: String,
    transition_exists: String,
    current: String,
    load: String,
    history: String,
    outbox_for: String,
    due_unregistered: String,
}

const SNAPSHOT_COLUMNS: &str = "id, saga_name, saga_version, start_key, status, step, direction, \
    attempt, first_attempt_at, next_run_at, state, stuck_reason, lease_owner, lease_expires_at, \
    version, created_at, updated_at";

impl Sql {
    fn new(schema: &SchemaName, fencing: bool) -> Self {
        let s = schema.quoted();
        // The common tail of a transition: history row, outbox rows, one
        // notification for the whole transaction if anything was enqueued.
        let transition_tail = format!(
            "hist AS (
                INSERT INTO {s}.saga_history (transition_id, saga_id, step, direction, attempt,
                    outcome, error, from_status, to_status, started_at, finished_at)
                SELECT $12::uuid, id, $13::text, $14::text, $15::int4, $16::text, $17::text,
                    $18::text, $19::text, $20::timestamptz, $21::timestamptz
                FROM upd
            ),
            ob AS (
                INSERT INTO {s}.outbox (id, topic, key, payload_json, payload_bytes, headers,
                    saga_id, created_at, available_at)
                SELECT m.id, m.topic, m.key, m.payload_json, m.payload_bytes, m.headers, upd.id,
                    $11::timestamptz, m.available_at
                FROM upd, unnest($22::uuid[], $23::text[], $24::text[], $25::jsonb[],
                    $26::bytea[], $27::jsonb[], $28::timestamptz[])
                    AS m(id, topic, key, payload_json, payload_bytes, headers, available_at)
                ON CONFLICT (id) DO NOTHING
                RETURNING 1
            ),
            notified AS (
                SELECT pg_notify($29::text, '') FROM (SELECT 1 FROM ob LIMIT 1) AS one
            )
            SELECT (SELECT count(*) FROM upd), (SELECT count(*) FROM notified)"
        );
        let set_transition = "status = $3::text, step = $4::text, direction = $5::text,
                attempt = $6::int4, first_attempt_at = $7::timestamptz,
                next_run_at = $8::timestamptz, state = coalesce($9::jsonb, state),
                stuck_reason = $10::text, lease_owner = NULL, lease_token = NULL,
                lease_expires_at = NULL, version = version + 1, updated_at = $11::timestamptz";
        Sql {
            start: format!(
                "WITH ins AS (
                    INSERT INTO {s}.saga_instances (id, saga_name, saga_version, start_key,
                        input_digest, status, step, direction, attempt, next_run_at, state,
                        version, created_at, updated_at)
                    VALUES ($1::uuid, $2::text, $3::int4, $4::text, $5::bytea, 'running',
                        $6::text, 'forward', 0, $7::timestamptz, $8::jsonb, 1, $7::timestamptz,
                        $7::timestamptz)
                    ON CONFLICT ON CONSTRAINT saga_instances_start_key DO NOTHING
                    RETURNING id, input_digest
                ),
                hist AS (
                    INSERT INTO {s}.saga_history (transition_id, saga_id, step, direction,
                        attempt, outcome, error, from_status, to_status, started_at, finished_at)
                    SELECT $9::uuid, id, $6::text, 'forward', 0, 'created', NULL, NULL,
                        'running', $7::timestamptz, $7::timestamptz
                    FROM ins
                )
                SELECT id, input_digest FROM ins"
            ),
            start_existing: format!(
                "SELECT id, input_digest FROM {s}.saga_instances
                 WHERE saga_name = $1::text AND start_key = $2::text"
            ),
            claim: format!(
                "WITH kinds AS (
                    SELECT * FROM unnest($4::text[], $5::int4[]) AS k(name, version)
                ),
                due AS (
                    SELECT i.id, i.next_run_at AS due_at
                    FROM {s}.saga_instances i
                    WHERE i.status IN ('running', 'compensating')
                      AND i.next_run_at <= $1::timestamptz
                      AND (i.lease_expires_at IS NULL OR i.lease_expires_at <= $1::timestamptz)
                      AND EXISTS (SELECT 1 FROM kinds k
                                  WHERE k.name = i.saga_name AND k.version = i.saga_version)
                    ORDER BY i.next_run_at
                    LIMIT $3::int8
                    FOR UPDATE OF i SKIP LOCKED
                )
                UPDATE {s}.saga_instances i SET
                    lease_owner = $2::uuid,
                    lease_token = gen_random_uuid(),
                    lease_expires_at = $6::timestamptz,
                    next_run_at = $6::timestamptz,
                    attempt = i.attempt + 1,
                    first_attempt_at = coalesce(i.first_attempt_at, $1::timestamptz),
                    version = i.version + 1,
                    updated_at = $1::timestamptz
                FROM due
                WHERE i.id = due.id
                RETURNING i.id, i.lease_token, i.lease_expires_at, i.saga_name, i.saga_version,
                    i.status, i.step, i.direction, i.attempt, i.first_attempt_at, i.state,
                    due.due_at"
            ),
            heartbeat: format!(
                "UPDATE {s}.saga_instances
                 SET lease_expires_at = $3::timestamptz, next_run_at = $3::timestamptz
                 WHERE id = $1::uuid AND {guard}
                 RETURNING lease_expires_at",
                guard = if fencing {
                    "lease_token = $2::uuid AND lease_expires_at > $4::timestamptz"
                } else {
                    "($2::uuid IS NOT NULL OR $4::timestamptz IS NOT NULL)"
                }
            ),
            release: format!(
                "UPDATE {s}.saga_instances
                 SET lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL,
                     attempt = greatest(attempt - 1, 0),
                     first_attempt_at = CASE WHEN attempt <= 1 THEN NULL ELSE first_attempt_at END,
                     next_run_at = $3::timestamptz, version = version + 1,
                     updated_at = $3::timestamptz
                 WHERE id = $1::uuid AND lease_token = $2::uuid
                   AND lease_expires_at > $3::timestamptz"
            ),
            record_leased: format!(
                "WITH upd AS (
                    UPDATE {s}.saga_instances SET {set_transition}
                    WHERE id = $1::uuid AND {guard}
                    RETURNING id
                ),
                {transition_tail}",
                guard = if fencing {
                    "lease_token = $2::uuid AND lease_expires_at > $11::timestamptz"
                } else {
                    // Negative control only: any worker may write.
                    "($2::uuid IS NOT NULL OR $11::timestamptz IS NOT NULL)"
                }
            ),
            record_unleased: format!(
                "WITH upd AS (
                    UPDATE {s}.saga_instances SET {set_transition}
                    WHERE id = $1::uuid AND version = $2::int8
                      AND (lease_expires_at IS NULL OR lease_expires_at <= $11::timestamptz)
                    RETURNING id
                ),
                {transition_tail}"
            ),
            transition_exists: format!(
                "SELECT EXISTS (SELECT 1 FROM {s}.saga_history WHERE transition_id = $1::uuid)"
            ),
            current: format!(
                "SELECT lease_token, lease_expires_at, version FROM {s}.saga_instances
                 WHERE id = $1::uuid"
            ),
            load: format!("SELECT {SNAPSHOT_COLUMNS} FROM {s}.saga_instances WHERE id = $1::uuid"),
            history: format!(
                "SELECT transition_id, step, direction, attempt, outcome, error, from_status,
                    to_status, started_at, finished_at
                 FROM {s}.saga_history WHERE saga_id = $1::uuid ORDER BY seq"
            ),
            outbox_for: format!(
                "SELECT id, topic, key, payload_json, payload_bytes, headers, available_at
                 FROM {s}.outbox WHERE saga_id = $1::uuid ORDER BY seq"
            ),
            due_unregistered: format!(
                "SELECT i.saga_name, i.saga_version, count(*)
                 FROM {s}.saga_instances i
                 WHERE i.status IN ('running', 'compensating')
                   AND i.next_run_at <= $1::timestamptz
                   AND NOT EXISTS (
                       SELECT 1 FROM unnest($2::text[], $3::int4[]) AS k(name, version)
                       WHERE k.name = i.saga_name AND k.version = i.saga_version)
                 GROUP BY i.saga_name, i.saga_version
                 ORDER BY i.saga_name, i.saga_version"
            ),
        }
    }
}

struct Inner {
    pool: Pool,
    schema: SchemaName,
    fencing: bool,
    clock: Arc<dyn Clock>,
    sql: Sql,
    reconnect_for: Duration,
    counters: Counters,
}

/// A [`SagaStore`] on PostgreSQL. Cheap to clone.
///
/// Tables live in one schema (default `saga`), created by
/// [`migrate`](crate::migrate()). Times are read from the store's clock
/// (the system clock unless [`with_clock`](PgSagaStore::with_clock) says
/// otherwise) and passed to every statement, so that every worker and the
/// executor agree on "now"; keep worker clocks in sync (NTP) and leases
/// well above any skew.
#[derive(Clone)]
pub struct PgSagaStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for PgSagaStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgSagaStore")
            .field("schema", &self.inner.schema)
            .field("reconnect_for", &self.inner.reconnect_for)
            .finish_non_exhaustive()
    }
}

/// A pool of `max_size` connections to `url` (no TLS). For TLS, build a
/// [`deadpool_postgres::Pool`] yourself and use [`PgSagaStore::new`].
pub fn pool_from_url(url: &str, max_size: usize) -> Result<Pool, PgError> {
    let config = tokio_postgres::Config::from_str(url).map_err(PgError::InvalidUrl)?;
    pool_from_config(config, max_size)
}

/// A pool of `max_size` connections with `config` (no TLS).
pub fn pool_from_config(
    mut config: tokio_postgres::Config,
    max_size: usize,
) -> Result<Pool, PgError> {
    if max_size == 0 {
        return Err(PgError::InvalidConfig(
            "the pool needs at least one connection",
        ));
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(5));
    }
    config.keepalives_idle(Duration::from_secs(30));
    let manager = Manager::from_config(
        config,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Ok(Pool::builder(manager)
        .max_size(max_size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_secs(10)))
        .create_timeout(Some(Duration::from_secs(5)))
        .recycle_timeout(Some(Duration::from_secs(5)))
        .build()?)
}

/// What guards a transition.
#[derive(Debug, Clone, Copy)]
enum Guard {
    Lease(Uuid),
    Version(i64),
}

impl PgSagaStore {
    /// A store on `pool`, with its tables in `schema`. Does not touch the
    /// database; see [`check_schema`](PgSagaStore::check_schema).
    #[must_use]
    pub fn new(pool: Pool, schema: SchemaName) -> Self {
        let sql = Sql::new(&schema, true);
        PgSagaStore {
            inner: Arc::new(Inner {
                pool,
                schema,
                fencing: true,
                clock: Arc::new(SystemClock),
                sql,
                reconnect_for: DEFAULT_RECONNECT_FOR,
                counters: Counters::default(),
            }),
        }
    }

    /// Connects to `url` with a pool of [`DEFAULT_POOL_SIZE`] connections and
    /// checks that `schema` is migrated.
    pub async fn connect(url: &str, schema: SchemaName) -> Result<Self, PgError> {
        let store = PgSagaStore::new(pool_from_url(url, DEFAULT_POOL_SIZE)?, schema);
        store.check_schema().await?;
        Ok(store)
    }

    fn with_inner(self, f: impl FnOnce(&mut Inner)) -> Self {
        let mut inner = Arc::try_unwrap(self.inner).unwrap_or_else(|shared| Inner {
            pool: shared.pool.clone(),
            schema: shared.schema.clone(),
            fencing: shared.fencing,
            clock: shared.clock.clone(),
            sql: Sql::new(&shared.schema, shared.fencing),
            reconnect_for: shared.reconnect_for,
            counters: Counters::default(),
        });
        f(&mut inner);
        PgSagaStore {
            inner: Arc::new(inner),
        }
    }

    /// Reads time from `clock` instead of the system clock (for tests).
    #[must_use]
    pub fn with_clock(self, clock: Arc<dyn Clock>) -> Self {
        self.with_inner(|i| i.clock = clock)
    }

    /// NEGATIVE CONTROL, for the chaos harness only: records a worker's
    /// result (and extends its lease) even if its lease expired or was
    /// taken over. This breaks the
    /// engine on purpose, so that a harness can show it notices.
    #[cfg(feature = "testing")]
    #[must_use]
    pub fn without_fencing_for_negative_control(self) -> Self {
        self.with_inner(|i| {
            i.fencing = false;
            i.sql = Sql::new(&i.schema, false);
        })
    }

    /// How long an operation keeps retrying while the database is
    /// unreachable (default 30 s) before failing.
    #[must_use]
    pub fn with_reconnect_for(self, d: Duration) -> Self {
        self.with_inner(|i| i.reconnect_for = d)
    }

    /// The connection pool.
    #[must_use]
    pub fn pool(&self) -> &Pool {
        &self.inner.pool
    }

    /// The schema.
    #[must_use]
    pub fn schema(&self) -> &SchemaName {
        &self.inner.schema
    }

    /// What the store has had to recover from so far.
    #[must_use]
    pub fn stats(&self) -> StoreStats {
        let c = &self.inner.counters;
        StoreStats {
            retries: c.retries.load(Ordering::Relaxed),
            ambiguous_committed: c.ambiguous_committed.load(Ordering::Relaxed),
            ambiguous_not_committed: c
                .ambiguous_not_committed
                .load(Ordering::Relaxed)
                .saturating_sub(c.ambiguous_not_committed_undo.load(Ordering::Relaxed)),
            ambiguous_unresolved: c.ambiguous_unresolved.load(Ordering::Relaxed),
        }
    }

    /// Fails with [`PgError::NotMigrated`] unless the schema has every
    /// migration this binary needs.
    pub async fn check_schema(&self) -> Result<(), PgError> {
        let client = self.inner.pool.get().await?;
        migrate::check(&client, &self.inner.schema).await
    }

    fn now(&self) -> Timestamp {
        self.inner.clock.now()
    }

    /// Starts an instance inside the caller's own transaction, next to
    /// their business write: the instance exists if and only if that
    /// transaction commits. Prepare `new` with [`NewSaga::new`]. Same
    /// idempotency on the start key as [`SagaStore::start`]; use READ
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
        let now = self.now().to_system_time();
        let p = StartParams::new(&new);
        let sql = &self.inner.sql;
        let rows = tx
            .query(&sql.start, &p.params(&now, &new.state))
            .await
            .map_err(PgError::from)?;
        let existing = match rows.first() {
            Some(row) => (row.get(0), row.get(1)),
            None => {
                let rows = tx
                    .query(&sql.start_existing, &[&p.name, &p.key])
                    .await
                    .map_err(PgError::from)?;
                winner(&rows)?
            }
        };
        started(new, existing)
    }

    /// The query plan of a claim for `kinds` (`EXPLAIN` output, one line
    /// per row), to check that claims use the `saga_instances_due` partial
    /// index and touch only due rows. Claims nothing.
    pub async fn explain_claim(&self, kinds: &[SagaKind], limit: usize) -> Result<String, PgError> {
        let (names, versions) = kind_arrays(kinds);
        let now = self.now();
        let (now, expires) = (
            now.to_system_time(),
            (now + Duration::from_secs(60)).to_system_time(),
        );
        let worker = Uuid::nil();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut client = self.inner.pool.get().await?;
        // EXPLAIN ANALYZE would run the UPDATE: explain inside a transaction
        // that is rolled back, without ANALYZE, so nothing changes.
        let tx = client.transaction().await?;
        let rows = tx
            .query(
                &format!("EXPLAIN {}", self.inner.sql.claim),
                &[&now, &worker, &limit, &names, &versions, &expires],
            )
            .await?;
        tx.rollback().await?;
        Ok(rows
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>()
            .join("\n"))
    }

    fn backoff(&self) -> impl Iterator<Item = Duration> + use<> {
        backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(20))
            .with_max_delay(Duration::from_secs(2))
            .with_jitter()
            .without_max_times()
            .with_total_delay(Some(self.inner.reconnect_for))
            .build()
    }

    /// Waits before retrying `op` after `e`, or gives `e` back when the
    /// error is not worth retrying or the budget is spent.
    async fn pause(
        &self,
        op: &'static str,
        e: PgError,
        backoff: &mut impl Iterator<Item = Duration>,
    ) -> Result<(), PgError> {
        if !e.is_retryable() {
            return Err(e);
        }
        let Some(delay) = backoff.next() else {
            tracing::error!(op, error = %e, "database still failing; giving up");
            return Err(e);
        };
        self.inner.counters.retries.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(crate::metrics::STORE_RETRIES, "operation" => op).increment(1);
        tracing::warn!(op, error = %e, code = ?e.code(), retry_in = ?delay, "database operation failed; retrying");
        tokio::time::sleep(delay).await;
        Ok(())
    }

    /// Runs `f` until it succeeds or fails with an error not worth
    /// retrying. Only for operations that are safe to repeat.
    async fn retrying<T, F, Fut>(&self, op: &'static str, mut f: F) -> Result<T, PgError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, PgError>>,
    {
        let mut backoff = self.backoff();
        loop {
            match f().await {
                Ok(v) => return Ok(v),
                Err(e) => self.pause(op, e, &mut backoff).await?,
            }
        }
    }

    async fn query(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<Row>, PgError> {
        let client = self.inner.pool.get().await?;
        let stmt = client.prepare_cached(sql).await?;
        Ok(client.query(&stmt, params).await?)
    }

    async fn transition_applied(&self, id: TransitionId) -> Result<bool, PgError> {
        let tid = id.as_uuid();
        self.retrying("lookup_transition", || async {
            let rows = self
                .query(&self.inner.sql.transition_exists, &[&tid])
                .await?;
            Ok(rows[0].get::<_, bool>(0))
        })
        .await
    }

    /// Applies a transition under `guard`, resolving ambiguous commits.
    ///
    /// An ambiguity is *resolved* once the transition id has been looked up:
    /// found, it committed; not found, it did not (and is written again,
    /// still guarded, which may then be refused because the lease lapsed
    /// meanwhile). It stays *unresolved* only if the lookup itself cannot
    /// be made before the reconnect budget runs out.
    async fn apply(&self, id: SagaId, guard: Guard, record: Record) -> Result<(), Error> {
        let tid = record.transition_id;
        let p = TransitionParams::new(&record, &self.inner.schema);
        let sql = match guard {
            Guard::Lease(_) => &self.inner.sql.record_leased,
            Guard::Version(_) => &self.inner.sql.record_unleased,
        };
        let counters = &self.inner.counters;
        let count = |c: &AtomicU64| {
            c.fetch_add(1, Ordering::Relaxed);
        };
        let mut backoff = self.backoff();
        // Whether an earlier attempt's outcome is unknown and not yet
        // looked up.
        let mut in_doubt = false;
        loop {
            let now = self.now().to_system_time();
            let attempt = async {
                let client = self.inner.pool.get().await?;
                let stmt = client.prepare_cached(sql).await?;
                let id = id.as_uuid();
                let rows = match guard {
                    Guard::Lease(t) => client.query(&stmt, &p.params(&id, &t, &now)).await?,
                    Guard::Version(v) => client.query(&stmt, &p.params(&id, &v, &now)).await?,
                };
                Ok::<i64, PgError>(rows[0].get(0))
            }
            .await;
            match attempt {
                Ok(1) => return Ok(()),
                Ok(_) => {
                    // The guard refused. An earlier attempt whose reply was
                    // lost may have committed meanwhile (its backend was
                    // still running): look once more.
                    if in_doubt {
                        match self.transition_applied(tid).await {
                            Ok(true) => {
                                count(&counters.ambiguous_committed);
                                count(&counters.ambiguous_not_committed_undo);
                                return Ok(());
                            }
                            Ok(false) => {}
                            Err(e) => {
                                count(&counters.ambiguous_unresolved);
                                count(&counters.ambiguous_not_committed_undo);
                                return Err(e.into());
                            }
                        }
                    }
                    return Err(self.refusal(id, guard).await?);
                }
                Err(e) if e.is_connection_error() => {
                    tracing::warn!(saga_id = %id, transition = %tid, error = %e,
                        "connection lost while a transition was in flight; checking whether it committed");
                    metrics::counter!(crate::metrics::AMBIGUOUS_COMMITS).increment(1);
                    if let Err(e) = self.pause("record", e, &mut backoff).await {
                        count(&counters.ambiguous_unresolved);
                        return Err(e.into());
                    }
                    match self.transition_applied(tid).await {
                        Ok(true) => {
                            count(&counters.ambiguous_committed);
                            return Ok(());
                        }
                        Ok(false) => {
                            // Resolved: it did not commit. Write it again.
                            count(&counters.ambiguous_not_committed);
                            in_doubt = true;
                        }
                        Err(e) => {
                            count(&counters.ambiguous_unresolved);
                            return Err(e.into());
                        }
                    }
                }
                Err(e) => self.pause("record", e, &mut backoff).await?,
            }
        }
    }

    /// Why a guarded write changed nothing.
    async fn refusal(&self, id: SagaId, guard: Guard) -> Result<Error, PgError> {
        let uuid = id.as_uuid();
        let rows = self
            .retrying("lookup_instance", || async {
                self.query(&self.inner.sql.current, &[&uuid]).await
            })
            .await?;
        if rows.is_empty() {
            return Ok(Error::NotFound(id));
        }
        Ok(match guard {
            Guard::Lease(_) => Error::LeaseLost(id),
            Guard::Version(_) => Error::Conflict(id),
        })
    }
}

/// The parameters of a transition statement, converted once.
struct TransitionParams {
    status: &'static str,
    step: String,
    direction: &'static str,
    attempt: i32,
    first_attempt_at: Option<SystemTime>,
    next_run_at: Option<SystemTime>,
    state: Option<serde_json::Value>,
    stuck_reason: Option<String>,
    transition_id: Uuid,
    h_step: String,
    h_direction: &'static str,
    h_attempt: i32,
    h_outcome: &'static str,
    h_error: Option<String>,
    h_from: Option<&'static str>,
    h_to: &'static str,
    h_started: SystemTime,
    h_finished: SystemTime,
    m_ids: Vec<Uuid>,
    m_topics: Vec<String>,
    m_keys: Vec<Option<String>>,
    m_json: Vec<Option<serde_json::Value>>,
    m_bytes: Vec<Option<Vec<u8>>>,
    m_headers: Vec<serde_json::Value>,
    m_available: Vec<SystemTime>,
    channel: String,
}

fn to_i32(n: u32) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

impl TransitionParams {
    fn new(r: &Record, schema: &SchemaName) -> Self {
        let h = &r.history;
        let mut p = TransitionParams {
            status: r.status.as_str(),
            step: r.step.to_string(),
            direction: r.direction.as_str(),
            attempt: to_i32(r.attempt),
            first_attempt_at: r.first_attempt_at.map(Timestamp::to_system_time),
            next_run_at: r.next_run_at.map(Timestamp::to_system_time),
            state: r.state.clone(),
            stuck_reason: r.stuck_reason.clone(),
            transition_id: r.transition_id.as_uuid(),
            h_step: h.step.to_string(),
            h_direction: h.direction.as_str(),
            h_attempt: to_i32(h.attempt),
            h_outcome: h.outcome.as_str(),
            h_error: h.error.clone(),
            h_from: h.from_status.map(Status::as_str),
            h_to: h.to_status.as_str(),
            h_started: h.started_at.to_system_time(),
            h_finished: h.finished_at.to_system_time(),
            m_ids: Vec::with_capacity(r.outbox.len()),
            m_topics: Vec::with_capacity(r.outbox.len()),
            m_keys: Vec::with_capacity(r.outbox.len()),
            m_json: Vec::with_capacity(r.outbox.len()),
            m_bytes: Vec::with_capacity(r.outbox.len()),
            m_headers: Vec::with_capacity(r.outbox.len()),
            m_available: Vec::with_capacity(r.outbox.len()),
            channel: schema.outbox_channel(),
        };
        for m in &r.outbox {
            p.m_ids.push(m.id.as_uuid());
            p.m_topics.push(m.topic.clone());
            p.m_keys.push(m.key.clone());
            let (json, bytes) = match &m.payload {
                Payload::Json(v) => (Some(v.clone()), None),
                Payload::Bytes(b) => (None, Some(b.clone())),
            };
            p.m_json.push(json);
            p.m_bytes.push(bytes);
            p.m_headers
                .push(serde_json::to_value(&m.headers).unwrap_or_else(|_| serde_json::json!({})));
            p.m_available.push(m.available_at.to_system_time());
        }
        p
    }

    fn params<'a>(
        &'a self,
        id: &'a Uuid,
        guard: &'a (dyn tokio_postgres::types::ToSql + Sync),
        now: &'a SystemTime,
    ) -> [&'a (dyn tokio_postgres::types::ToSql + Sync); 29] {
        [
            id,
            guard,
            &self.status,
            &self.step,
            &self.direction,
            &self.attempt,
            &self.first_attempt_at,
            &self.next_run_at,
            &self.state,
            &self.stuck_reason,
            now,
            &self.transition_id,
            &self.h_step,
            &self.h_direction,
            &self.h_attempt,
            &self.h_outcome,
            &self.h_error,
            &self.h_from,
            &self.h_to,
            &self.h_started,
            &self.h_finished,
            &self.m_ids,
            &self.m_topics,
            &self.m_keys,
            &self.m_json,
            &self.m_bytes,
            &self.m_headers,
            &self.m_available,
            &self.channel,
        ]
    }
}

pub(crate) fn corrupt(what: &'static str, e: impl Into<BoxError>) -> PgError {
    PgError::CorruptRow {
        what,
        source: e.into(),
    }
}

fn parse<T: FromStr>(what: &'static str, s: &str) -> Result<T, PgError>
where
    T::Err: Into<BoxError>,
{
    s.parse().map_err(|e: T::Err| corrupt(what, e))
}

fn count(what: &'static str, n: i32) -> Result<u32, PgError> {
    u32::try_from(n).map_err(|e| corrupt(what, e))
}

fn ts(t: SystemTime) -> Timestamp {
    Timestamp::from_system_time(t)
}

fn snapshot(row: &Row) -> Result<SagaSnapshot, PgError> {
    let lease_owner: Option<Uuid> = row.get("lease_owner");
    let lease_expires: Option<SystemTime> = row.get("lease_expires_at");
    let version: i64 = row.get("version");
    Ok(SagaSnapshot {
        id: SagaId::from_uuid(row.get("id")),
        kind: SagaKind {
            name: parse::<SagaName>("saga_name", row.get("saga_name"))?,
            version: u32::try_from(row.get::<_, i32>("saga_version"))
                .map_err(|e| corrupt("saga_version", e))?,
        },
        start_key: StartKey::new(row.get::<_, &str>("start_key"))
            .map_err(|e| corrupt("start_key", e))?,
        status: parse("status", row.get("status"))?,
        step: parse::<StepName>("step", row.get("step"))?,
        direction: parse::<Direction>("direction", row.get("direction"))?,
        attempt: count("attempt", row.get("attempt"))?,
        first_attempt_at: row.get::<_, Option<SystemTime>>("first_attempt_at").map(ts),
        next_run_at: row.get::<_, Option<SystemTime>>("next_run_at").map(ts),
        state: row.get("state"),
        stuck_reason: row.get("stuck_reason"),
        lease: lease_owner
            .zip(lease_expires)
            .map(|(o, e)| (WorkerId::from_uuid(o), ts(e))),
        version: u64::try_from(version).map_err(|e| corrupt("version", e))?,
        created_at: ts(row.get("created_at")),
        updated_at: ts(row.get("updated_at")),
    })
}

fn claimed(row: &Row) -> Result<(SystemTime, ClaimedSaga), PgError> {
    let id = SagaId::from_uuid(row.get(0));
    Ok((
        row.get(11),
        ClaimedSaga {
            lease: Lease {
                saga_id: id,
                token: LeaseToken::from_uuid(row.get(1)),
                expires_at: ts(row.get(2)),
            },
            kind: SagaKind {
                name: parse::<SagaName>("saga_name", row.get(3))?,
                version: u32::try_from(row.get::<_, i32>(4))
                    .map_err(|e| corrupt("saga_version", e))?,
            },
            status: parse("status", row.get(5))?,
            step: parse::<StepName>("step", row.get(6))?,
            direction: parse::<Direction>("direction", row.get(7))?,
            attempt: count("attempt", row.get(8))?,
            first_attempt_at: ts(row.get(9)),
            state: row.get(10),
        },
    ))
}

fn history_entry(row: &Row) -> Result<HistoryEntry, PgError> {
    Ok(HistoryEntry {
        transition_id: TransitionId::from_uuid(row.get(0)),
        step: parse::<StepName>("history step", row.get(1))?,
        direction: parse::<Direction>("history direction", row.get(2))?,
        attempt: count("history attempt", row.get(3))?,
        outcome: parse("history outcome", row.get(4))?,
        error: row.get(5),
        from_status: row
            .get::<_, Option<&str>>(6)
            .map(|s| parse("history from_status", s))
            .transpose()?,
        to_status: parse("history to_status", row.get(7))?,
        started_at: ts(row.get(8)),
        finished_at: ts(row.get(9)),
    })
}

/// Reads an outbox row (`id, topic, key, payload_json, payload_bytes,
/// headers, available_at`).
pub(crate) fn outbox_message(row: &Row) -> Result<OutboxMessage, PgError> {
    let json: Option<serde_json::Value> = row.get(3);
    let bytes: Option<Vec<u8>> = row.get(4);
    let payload = match (json, bytes) {
        (Some(v), None) => Payload::Json(v),
        (None, Some(b)) => Payload::Bytes(b),
        _ => {
            return Err(corrupt(
                "outbox payload",
                "exactly one of payload_json and payload_bytes must be set",
            ));
        }
    };
    let headers: BTreeMap<String, String> =
        serde_json::from_value(row.get(5)).map_err(|e| corrupt("outbox headers", e))?;
    Ok(OutboxMessage {
        id: MessageId::from_uuid(row.get(0)),
        topic: row.get(1),
        key: row.get(2),
        payload,
        headers,
        available_at: ts(row.get(6)),
    })
}

/// The parameters of a start, converted once.
struct StartParams {
    id: Uuid,
    name: String,
    version: i32,
    key: String,
    digest: Vec<u8>,
    step: String,
    tid: Uuid,
}

impl StartParams {
    fn new(new: &NewSaga) -> Self {
        StartParams {
            id: new.id.as_uuid(),
            name: new.kind.name.to_string(),
            version: to_i32(new.kind.version),
            key: new.start_key.to_string(),
            digest: new.input_digest.to_vec(),
            step: new.first_step.to_string(),
            tid: new.history.transition_id.as_uuid(),
        }
    }

    fn params<'a>(
        &'a self,
        now: &'a SystemTime,
        state: &'a serde_json::Value,
    ) -> [&'a (dyn tokio_postgres::types::ToSql + Sync); 9] {
        [
            &self.id,
            &self.name,
            &self.version,
            &self.key,
            &self.digest,
            &self.step,
            now,
            state,
            &self.tid,
        ]
    }
}

fn winner(rows: &[Row]) -> Result<(Uuid, Vec<u8>), PgError> {
    let row = rows.first().ok_or_else(|| {
        corrupt(
            "start key",
            "the conflicting row vanished; was it deleted by hand?",
        )
    })?;
    Ok((row.get(0), row.get(1)))
}

/// The answer to a start, given the row found under the start key.
fn started(new: NewSaga, (existing, digest): (Uuid, Vec<u8>)) -> Result<Started, Error> {
    if existing == new.id.as_uuid() {
        return Ok(Started {
            id: new.id,
            created: true,
        });
    }
    let existing = SagaId::from_uuid(existing);
    if digest != new.input_digest {
        return Err(Error::StartKeyConflict {
            saga: new.kind.name,
            key: new.start_key,
            existing,
        });
    }
    Ok(Started {
        id: existing,
        created: false,
    })
}

fn kind_arrays(kinds: &[SagaKind]) -> (Vec<&str>, Vec<i32>) {
    kinds
        .iter()
        .map(|k| (k.name.as_str(), to_i32(k.version)))
        .unzip()
}

impl SagaStore for PgSagaStore {
    fn clock(&self) -> &Arc<dyn Clock> {
        &self.inner.clock
    }

    async fn start(&self, new: NewSaga) -> Result<Started, Error> {
        let now = self.now().to_system_time();
        let p = StartParams::new(&new);
        let sql = &self.inner.sql;
        // Safe to repeat: a repeated insert finds the row (ours, if the
        // first attempt committed) by its start key.
        let existing = self
            .retrying("start", || async {
                let rows = self.query(&sql.start, &p.params(&now, &new.state)).await?;
                if let Some(row) = rows.first() {
                    return Ok((row.get::<_, Uuid>(0), row.get::<_, Vec<u8>>(1)));
                }
                // Taken: read the winner (a new statement sees a row that
                // a concurrent start committed while this one waited).
                let rows = self.query(&sql.start_existing, &[&p.name, &p.key]).await?;
                winner(&rows)
            })
            .await?;
        started(new, existing)
    }

    async fn claim(&self, request: ClaimRequest<'_>) -> Result<Vec<ClaimedSaga>, Error> {
        if request.limit == 0 || request.kinds.is_empty() {
            return Ok(Vec::new());
        }
        let (names, versions) = kind_arrays(request.kinds);
        let worker = request.worker.as_uuid();
        let limit = i64::try_from(request.limit).unwrap_or(i64::MAX);
        let rows = self
            .retrying("claim", || async {
                let now = self.now();
                let expires = (now + request.lease_for).to_system_time();
                let now = now.to_system_time();
                self.query(
                    &self.inner.sql.claim,
                    &[&now, &worker, &limit, &names, &versions, &expires],
                )
                .await
            })
            .await?;
        let mut claimed = rows.iter().map(claimed).collect::<Result<Vec<_>, _>>()?;
        claimed.sort_by_key(|(due, c)| (*due, c.lease.saga_id));
        Ok(claimed.into_iter().map(|(_, c)| c).collect())
    }

    async fn heartbeat(&self, lease: &Lease, lease_for: Duration) -> Result<Lease, Error> {
        let id = lease.saga_id.as_uuid();
        let token = lease.token.as_uuid();
        let rows = self
            .retrying("heartbeat", || async {
                let now = self.now();
                let expires = (now + lease_for).to_system_time();
                let now = now.to_system_time();
                self.query(&self.inner.sql.heartbeat, &[&id, &token, &expires, &now])
                    .await
            })
            .await?;
        match rows.first() {
            Some(row) => Ok(Lease {
                expires_at: ts(row.get(0)),
                ..*lease
            }),
            None => Err(self.refusal(lease.saga_id, Guard::Lease(token)).await?),
        }
    }

    async fn release(&self, lease: &Lease) -> Result<(), Error> {
        let id = lease.saga_id.as_uuid();
        let token = lease.token.as_uuid();
        let mut backoff = self.backoff();
        let mut ambiguous = false;
        loop {
            let now = self.now().to_system_time();
            let result = async {
                let client = self.inner.pool.get().await?;
                let stmt = client.prepare_cached(&self.inner.sql.release).await?;
                Ok::<u64, PgError>(client.execute(&stmt, &[&id, &token, &now]).await?)
            }
            .await;
            match result {
                Ok(1) => return Ok(()),
                // Our earlier, ambiguous attempt released it.
                Ok(_) if ambiguous => return Ok(()),
                Ok(_) => return Err(self.refusal(lease.saga_id, Guard::Lease(token)).await?),
                Err(e) => {
                    ambiguous |= e.is_connection_error();
                    self.pause("release", e, &mut backoff).await?;
                }
            }
        }
    }

    async fn record(&self, lease: &Lease, record: Record) -> Result<(), Error> {
        self.apply(lease.saga_id, Guard::Lease(lease.token.as_uuid()), record)
            .await
    }

    async fn record_unleased(
        &self,
        id: SagaId,
        expected_version: u64,
        record: Record,
    ) -> Result<(), Error> {
        let version = i64::try_from(expected_version).unwrap_or(i64::MAX);
        self.apply(id, Guard::Version(version), record).await
    }

    async fn load(&self, id: SagaId) -> Result<Option<SagaSnapshot>, Error> {
        let uuid = id.as_uuid();
        let rows = self
            .retrying("load", || async {
                self.query(&self.inner.sql.load, &[&uuid]).await
            })
            .await?;
        Ok(rows.first().map(snapshot).transpose()?)
    }

    async fn history(&self, id: SagaId) -> Result<Vec<HistoryEntry>, Error> {
        let uuid = id.as_uuid();
        let rows = self
            .retrying("history", || async {
                self.query(&self.inner.sql.history, &[&uuid]).await
            })
            .await?;
        Ok(rows.iter().map(history_entry).collect::<Result<_, _>>()?)
    }

    async fn outbox_for(&self, id: SagaId) -> Result<Vec<OutboxMessage>, Error> {
        let uuid = id.as_uuid();
        let rows = self
            .retrying("outbox_for", || async {
                self.query(&self.inner.sql.outbox_for, &[&uuid]).await
            })
            .await?;
        Ok(rows.iter().map(outbox_message).collect::<Result<_, _>>()?)
    }

    async fn due_unregistered(&self, kinds: &[SagaKind]) -> Result<Vec<(SagaKind, u64)>, Error> {
        let (names, versions) = kind_arrays(kinds);
        let rows = self
            .retrying("due_unregistered", || async {
                let now = self.now().to_system_time();
                self.query(&self.inner.sql.due_unregistered, &[&now, &names, &versions])
                    .await
            })
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let kind = SagaKind {
                name: parse::<SagaName>("saga_name", row.get(0))?,
                version: u32::try_from(row.get::<_, i32>(1))
                    .map_err(|e| corrupt("saga_version", e))?,
            };
            let n: i64 = row.get(2);
            out.push((kind, u64::try_from(n).unwrap_or(0)));
        }
        Ok(out)
    }
}
