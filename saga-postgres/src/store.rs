//! [`PgSagaStore`]: the `SagaStore` contract on PostgreSQL.
//!
//! Every operation is one statement (one round trip, one implicit
//! transaction): a claim leases a whole batch with `FOR UPDATE SKIP LOCKED`;
//! a transition updates the instance (guarded by the lease token), appends
//! its history row and enqueues its outbox messages together. No
//! transaction is ever open while a step runs.
//!
//! ## Retries and their deadline
//!
//! Each operation has one wall-clock deadline, `with_reconnect_for` after
//! it starts. Every attempt, every wait between attempts and every lookup
//! that resolves an ambiguity runs before that deadline; a connection, a
//! pool wait or a statement still pending at the deadline is abandoned
//! (its statement cancelled, its connection closed rather than given back
//! to the pool) and the operation fails.
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
//!
//! A claim is identified the same way: the worker generates a claim id that
//! the claim's statement writes into every row it leases. If the reply is
//! lost, the store looks those rows up and hands them out, rather than
//! claiming other rows and leaving these leased, with an attempt spent,
//! until their lease expires.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use backon::BackoffBuilder;
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use saga_core::store::{ClaimRequest, ClaimedSaga, Lease, NewSaga, Record, SagaStore};
use saga_core::{
    Clock, Direction, Error, HistoryEntry, LeaseToken, Limits, MessageId, OutboxMessage, Payload,
    SagaId, SagaKind, SagaName, SagaSnapshot, StartKey, Started, Status, StepName, SystemClock,
    Timestamp, TransitionId, WorkerId,
};
use tokio::time::Instant;
use tokio_postgres::NoTls;
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use crate::error::{BoxError, PgError};
use crate::migrate;
use crate::schema::SchemaName;

/// Default size of the connection pool made by [`PgSagaStore::connect`].
pub const DEFAULT_POOL_SIZE: usize = 16;
/// Default time an operation may take, retries included, while the database
/// is unreachable or failing before the error goes back to the caller.
pub const DEFAULT_RECONNECT_FOR: Duration = Duration::from_secs(30);

/// Counters of what the store had to recover from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
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
    /// resolved before the operation's deadline (the caller got an error;
    /// the step runs again once its lease expires).
    pub ambiguous_unresolved: u64,
    /// Claims whose reply was lost after they committed: the rows they
    /// leased were looked up by claim id and handed out.
    pub claims_recovered: u64,
    /// Claimed rows that could not be read (a malformed column, written by
    /// hand) and were parked as `Stuck` instead of failing the whole batch.
    pub malformed_parked: u64,
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
    claims_recovered: AtomicU64,
    malformed_parked: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// The SQL of every operation, rendered once for the schema.
#[derive(Debug)]
struct Sql {
    start: String,
    start_existing: String,
    claim: String,
    claimed_by: String,
    park_malformed: String,
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

/// What a claim returns for each row (read by [`claimed`]).
const CLAIMED_COLUMNS: &str = "i.id, i.lease_token, i.lease_expires_at, i.saga_name, \
    i.saga_version, i.status, i.step, i.direction, i.attempt, i.first_attempt_at, i.state";

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
            // Per kind, the oldest due rows through `saga_instances_due
            // (saga_name, saga_version, next_run_at)`, so that due rows of
            // kinds not asked for are never walked; then the oldest of
            // those. Rows locked by a kind's subquery but cut by the outer
            // limit stay locked (not leased) until the statement ends.
            claim: format!(
                "WITH due AS (
                    SELECT c.id, c.due_at
                    FROM unnest($4::text[], $5::int4[]) AS k(name, version)
                    CROSS JOIN LATERAL (
                        SELECT i.id, i.next_run_at AS due_at
                        FROM {s}.saga_instances i
                        WHERE i.saga_name = k.name AND i.saga_version = k.version
                          AND i.status IN ('running', 'compensating')
                          AND i.next_run_at <= $1::timestamptz
                          AND (i.lease_expires_at IS NULL
                               OR i.lease_expires_at <= $1::timestamptz)
                        ORDER BY i.next_run_at
                        LIMIT $3::int8
                        FOR UPDATE OF i SKIP LOCKED
                    ) AS c
                    ORDER BY c.due_at
                    LIMIT $3::int8
                )
                UPDATE {s}.saga_instances i SET
                    lease_owner = $2::uuid,
                    lease_token = gen_random_uuid(),
                    lease_expires_at = $6::timestamptz,
                    next_run_at = $6::timestamptz,
                    claim_id = $7::uuid,
                    attempt = i.attempt + 1,
                    first_attempt_at = coalesce(i.first_attempt_at, $1::timestamptz),
                    version = i.version + 1,
                    updated_at = $1::timestamptz
                FROM due
                WHERE i.id = due.id
                RETURNING {CLAIMED_COLUMNS}, due.due_at"
            ),
            // The rows a claim whose reply was lost leased, still under its
            // lease: found through the due index by kind and lease expiry
            // (the leased rows' `next_run_at`), then by claim id. The due
            // time they had is gone; they are ordered by id.
            claimed_by: format!(
                "SELECT {CLAIMED_COLUMNS}, NULL::timestamptz AS due_at
                 FROM unnest($1::text[], $2::int4[]) AS k(name, version)
                 JOIN {s}.saga_instances i
                   ON i.saga_name = k.name AND i.saga_version = k.version
                 WHERE i.status IN ('running', 'compensating')
                   AND i.next_run_at = ANY($3::timestamptz[])
                   AND i.claim_id = $4::uuid
                   AND i.lease_owner = $5::uuid
                   AND i.lease_expires_at > $6::timestamptz"
            ),
            // A claimed row that cannot be read: parked for an operator,
            // under the lease the claim just took. The history row takes
            // the row's own text, malformed or not.
            park_malformed: format!(
                "WITH upd AS (
                    UPDATE {s}.saga_instances
                    SET status = 'stuck', stuck_reason = $3::text, next_run_at = NULL,
                        lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL,
                        version = version + 1, updated_at = $4::timestamptz
                    WHERE id = $1::uuid AND lease_token = $2::uuid
                    RETURNING id
                )
                INSERT INTO {s}.saga_history (transition_id, saga_id, step, direction, attempt,
                    outcome, error, from_status, to_status, started_at, finished_at)
                SELECT $5::uuid, id, $6::text, $7::text, $8::int4, 'parked', $3::text, $9::text,
                    'stuck', $4::timestamptz, $4::timestamptz
                FROM upd"
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
                   AND lease_expires_at > $3::timestamptz
                 RETURNING id"
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
    limits: Limits,
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
            .field("limits", &self.inner.limits)
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

/// One operation's retry budget: a wall-clock deadline for all of it
/// (attempts, waits between them, lookups), and the backoff between
/// attempts.
struct Budget {
    deadline: Instant,
    backoff: backon::ExponentialBackoff,
    /// The last error an attempt failed with, kept as the cause of
    /// [`PgError::DeadlineExceeded`].
    last: Option<PgError>,
}

impl Budget {
    fn new(reconnect_for: Duration) -> Self {
        Budget {
            deadline: Instant::now() + reconnect_for,
            backoff: backon::ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(20))
                .with_max_delay(Duration::from_secs(2))
                .with_jitter()
                .without_max_times()
                .build(),
            last: None,
        }
    }
}

/// Why one attempt at a statement failed.
struct Failed {
    error: PgError,
    /// Whether the statement itself had been sent: it may have taken
    /// effect. False when no connection could be had or the statement could
    /// not be prepared.
    in_flight: bool,
}

impl Failed {
    fn before(error: PgError) -> Self {
        Failed {
            error,
            in_flight: false,
        }
    }

    /// Whether the statement may or may not have taken effect.
    fn ambiguous(&self) -> bool {
        self.in_flight && self.error.is_connection_error()
    }
}

/// Gives up a connection whose statement is still running (its operation's
/// deadline passed): cancels the statement and closes the connection rather
/// than handing it back to the pool with a reply pending.
fn abandon(client: Object) {
    let cancel = client.cancel_token();
    drop(Object::take(client));
    tokio::spawn(async move {
        // Best effort: if it fails, the server ends the statement when it
        // next notices that the connection is gone.
        let _ = cancel.cancel_query(NoTls).await;
    });
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
                limits: Limits::default(),
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
            limits: shared.limits,
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

    /// How long one operation may take, retries included, while the
    /// database is unreachable or failing (default 30 s): a wall-clock
    /// deadline from the start of the operation, covering connecting,
    /// waiting for a pooled connection, every attempt, the waits between
    /// attempts and the lookups that resolve an ambiguous commit. At the
    /// deadline, or when the next attempt would start after it, the
    /// operation fails: with the last attempt's error, or
    /// [`PgError::DeadlineExceeded`] if an attempt was still pending.
    #[must_use]
    pub fn with_reconnect_for(self, d: Duration) -> Self {
        self.with_inner(|i| i.reconnect_for = d)
    }

    /// The size caps the store enforces itself, whoever prepared the
    /// values (default [`Limits::default`], 256 KiB): a start's input and
    /// a transition's state over `max_state_bytes`, or an outbox payload
    /// over `max_payload_bytes`, are refused with
    /// [`Error::TooLarge`] before anything is written. Keep them at least
    /// as large as the executor's and clients' limits, which refuse
    /// earlier and route an oversized state to compensation.
    #[must_use]
    pub fn with_limits(self, limits: Limits) -> Self {
        self.with_inner(|i| i.limits = limits)
    }

    /// The size caps set by [`with_limits`](PgSagaStore::with_limits).
    #[must_use]
    pub fn limits(&self) -> Limits {
        self.inner.limits
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
            claims_recovered: c.claims_recovered.load(Ordering::Relaxed),
            malformed_parked: c.malformed_parked.load(Ordering::Relaxed),
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

    fn budget(&self) -> Budget {
        Budget::new(self.inner.reconnect_for)
    }

    /// Refuses a start whose input is over the cap.
    fn check_start(&self, new: &NewSaga) -> Result<(), Error> {
        check_size(
            "saga input",
            json_size(&new.state),
            self.inner.limits.max_state_bytes,
        )
    }

    /// Refuses a transition whose state or messages are over the caps.
    fn check_record(&self, record: &Record) -> Result<(), Error> {
        let limits = &self.inner.limits;
        if let Some(state) = &record.state {
            check_size("saga state", json_size(state), limits.max_state_bytes)?;
        }
        for m in &record.outbox {
            check_size("outbox payload", m.payload.len(), limits.max_payload_bytes)?;
        }
        Ok(())
    }

    /// Starts an instance inside the caller's own transaction, next to
    /// their business write: the instance exists if and only if that
    /// transaction commits. Prepare `new` with [`NewSaga::new`]; an input
    /// over the store's cap ([`with_limits`](PgSagaStore::with_limits)) is
    /// refused with [`Error::TooLarge`] before anything is sent. Same
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
        self.check_start(&new)?;
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
    /// index and touch only due rows of those kinds. Claims nothing.
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
                &[
                    &now,
                    &worker,
                    &limit,
                    &names,
                    &versions,
                    &expires,
                    &Uuid::nil(),
                ],
            )
            .await?;
        tx.rollback().await?;
        Ok(rows
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>()
            .join("\n"))
    }

    /// Waits before retrying `op` after `e`, or gives `e` back when the
    /// error is not worth retrying or the next attempt would start after
    /// the deadline.
    async fn pause(
        &self,
        op: &'static str,
        e: PgError,
        budget: &mut Budget,
    ) -> Result<(), PgError> {
        if !e.is_retryable() {
            return Err(e);
        }
        let delay = budget.backoff.next().unwrap_or(Duration::from_secs(2));
        if Instant::now() + delay >= budget.deadline {
            tracing::error!(op, error = %e, code = ?e.code(), budget = ?self.inner.reconnect_for,
                "database still failing at the operation's deadline; giving up");
            return Err(with_last(e, budget));
        }
        bump(&self.inner.counters.retries);
        metrics::counter!(crate::metrics::STORE_RETRIES, "operation" => op).increment(1);
        tracing::warn!(op, error = %e, code = ?e.code(), retry_in = ?delay, "database operation failed; retrying");
        budget.last = Some(e);
        tokio::time::sleep(delay).await;
        Ok(())
    }

    /// Runs `f` until it succeeds, fails with an error not worth retrying,
    /// or the budget's deadline passes. Only for operations that are safe
    /// to repeat.
    async fn retrying<T, F, Fut>(
        &self,
        op: &'static str,
        budget: &mut Budget,
        mut f: F,
    ) -> Result<T, PgError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Failed>>,
    {
        loop {
            match f().await {
                Ok(v) => return Ok(v),
                Err(failed) => self.pause(op, failed.error, budget).await?,
            }
        }
    }

    /// One attempt at one statement, within the budget's deadline.
    async fn attempt(
        &self,
        deadline: Instant,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, Failed> {
        let prepared = tokio::time::timeout_at(deadline, async {
            let client = self.inner.pool.get().await?;
            let stmt = client.prepare_cached(sql).await?;
            Ok::<_, PgError>((client, stmt))
        })
        .await;
        let (client, stmt) = match prepared {
            Ok(Ok(ready)) => ready,
            Ok(Err(e)) => return Err(Failed::before(e)),
            Err(_) => return Err(Failed::before(self.deadline_error())),
        };
        match tokio::time::timeout_at(deadline, client.query(&stmt, params)).await {
            Ok(Ok(rows)) => Ok(rows),
            Ok(Err(e)) => Err(Failed {
                error: e.into(),
                in_flight: true,
            }),
            Err(_) => {
                abandon(client);
                Err(Failed {
                    error: self.deadline_error(),
                    in_flight: true,
                })
            }
        }
    }

    /// An attempt cut off at the deadline; [`pause`](Self::pause) adds
    /// the budget's last error as its cause.
    fn deadline_error(&self) -> PgError {
        PgError::DeadlineExceeded {
            after: self.inner.reconnect_for,
            last: None,
        }
    }

    /// One statement, retried within the budget (only for statements that
    /// are safe to repeat).
    async fn query(
        &self,
        op: &'static str,
        budget: &mut Budget,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, PgError> {
        let deadline = budget.deadline;
        self.retrying(op, budget, || self.attempt(deadline, sql, params))
            .await
    }

    async fn transition_applied(
        &self,
        budget: &mut Budget,
        id: TransitionId,
    ) -> Result<bool, PgError> {
        let tid = id.as_uuid();
        let rows = self
            .query(
                "lookup_transition",
                budget,
                &self.inner.sql.transition_exists,
                &[&tid],
            )
            .await?;
        Ok(rows[0].get::<_, bool>(0))
    }

    /// Applies a transition under `guard`, resolving ambiguous commits.
    ///
    /// An ambiguity is *resolved* once the transition id has been looked up:
    /// found, it committed; not found, it did not (and is written again,
    /// still guarded, which may then be refused because the lease lapsed
    /// meanwhile). It stays *unresolved* only if the lookup itself cannot
    /// be made before the operation's deadline.
    async fn apply(&self, id: SagaId, guard: Guard, record: Record) -> Result<(), Error> {
        self.check_record(&record)?;
        let tid = record.transition_id;
        let p = TransitionParams::new(&record, &self.inner.schema);
        let sql = match guard {
            Guard::Lease(_) => &self.inner.sql.record_leased,
            Guard::Version(_) => &self.inner.sql.record_unleased,
        };
        let counters = &self.inner.counters;
        let mut budget = self.budget();
        let uuid = id.as_uuid();
        // Whether an earlier attempt's outcome was looked up, found "not
        // committed", and might still commit late.
        let mut in_doubt = false;
        loop {
            let now = self.now().to_system_time();
            let params = match &guard {
                Guard::Lease(t) => p.params(&uuid, t, &now),
                Guard::Version(v) => p.params(&uuid, v, &now),
            };
            match self.attempt(budget.deadline, sql, &params).await {
                Ok(rows) if rows[0].get::<_, i64>(0) == 1 => return Ok(()),
                Ok(_) => {
                    // The guard refused. An earlier attempt whose reply was
                    // lost may have committed meanwhile (its backend was
                    // still running): look once more.
                    if in_doubt {
                        match self.transition_applied(&mut budget, tid).await {
                            Ok(true) => {
                                bump(&counters.ambiguous_committed);
                                bump(&counters.ambiguous_not_committed_undo);
                                return Ok(());
                            }
                            Ok(false) => {}
                            Err(e) => {
                                bump(&counters.ambiguous_unresolved);
                                bump(&counters.ambiguous_not_committed_undo);
                                return Err(e.into());
                            }
                        }
                    }
                    return Err(self.refusal(&mut budget, id, guard).await?);
                }
                Err(failed) if failed.ambiguous() => {
                    let e = failed.error;
                    tracing::warn!(saga_id = %id, transition = %tid, error = %e,
                        "connection lost while a transition was in flight; checking whether it committed");
                    metrics::counter!(crate::metrics::AMBIGUOUS_COMMITS).increment(1);
                    if let Err(e) = self.pause("record", e, &mut budget).await {
                        bump(&counters.ambiguous_unresolved);
                        return Err(e.into());
                    }
                    match self.transition_applied(&mut budget, tid).await {
                        Ok(true) => {
                            bump(&counters.ambiguous_committed);
                            return Ok(());
                        }
                        Ok(false) => {
                            // Resolved: it did not commit (yet). Write it
                            // again.
                            if !in_doubt {
                                bump(&counters.ambiguous_not_committed);
                            }
                            in_doubt = true;
                        }
                        Err(e) => {
                            bump(&counters.ambiguous_unresolved);
                            return Err(e.into());
                        }
                    }
                }
                Err(failed) => self.pause("record", failed.error, &mut budget).await?,
            }
        }
    }

    /// Why a guarded write changed nothing.
    async fn refusal(
        &self,
        budget: &mut Budget,
        id: SagaId,
        guard: Guard,
    ) -> Result<Error, PgError> {
        let uuid = id.as_uuid();
        let rows = self
            .query("lookup_instance", budget, &self.inner.sql.current, &[&uuid])
            .await?;
        if rows.is_empty() {
            return Ok(Error::NotFound(id));
        }
        Ok(match guard {
            Guard::Lease(_) => Error::LeaseLost(id),
            Guard::Version(_) => Error::Conflict(id),
        })
    }

    /// Parks a claimed row that cannot be read, under the lease the claim
    /// just took, so that the rest of the batch goes on. If even that
    /// fails, the row stays leased until its lease expires.
    async fn park_malformed(&self, budget: &mut Budget, row: &Row, error: PgError) {
        let id: Uuid = row.get(0);
        let token: Uuid = row.get(1);
        let reason = format!(
            "the stored row cannot be read: {}",
            crate::error::chain(&error)
        );
        tracing::error!(saga_id = %id, error = %reason,
            "claimed a malformed saga instance; parking it as stuck");
        let now = self.now().to_system_time();
        let tid = TransitionId::new().as_uuid();
        let (step, direction, attempt, status): (&str, &str, i32, &str) =
            (row.get(6), row.get(7), row.get(8), row.get(5));
        let parked = self
            .query(
                "park_malformed",
                budget,
                &self.inner.sql.park_malformed,
                &[
                    &id, &token, &reason, &now, &tid, &step, &direction, &attempt, &status,
                ],
            )
            .await;
        match parked {
            Ok(_) => bump(&self.inner.counters.malformed_parked),
            Err(e) => tracing::error!(saga_id = %id, error = %e,
                "could not park the malformed instance; it stays leased until its lease expires"),
        }
    }

    /// Reads claimed rows one by one: good ones are returned (oldest due
    /// first), malformed ones parked.
    async fn read_claimed(&self, budget: &mut Budget, rows: Vec<Row>) -> Vec<ClaimedSaga> {
        let mut good = Vec::with_capacity(rows.len());
        for row in &rows {
            match claimed(row) {
                Ok(c) => good.push(c),
                Err(e) => self.park_malformed(budget, row, e).await,
            }
        }
        good.sort_by_key(|(due, c)| (*due, c.lease.saga_id));
        good.into_iter().map(|(_, c)| c).collect()
    }
}

/// `e`, or the deadline error with the budget's last error as its cause.
fn with_last(e: PgError, budget: &mut Budget) -> PgError {
    match e {
        PgError::DeadlineExceeded { after, last: None } => PgError::DeadlineExceeded {
            after,
            last: budget.last.take().map(Box::new),
        },
        e => e,
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

/// Reads a claimed row ([`CLAIMED_COLUMNS`], then the due time it had,
/// unknown for rows found again after a lost reply).
fn claimed(row: &Row) -> Result<(Option<SystemTime>, ClaimedSaga), PgError> {
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

impl SagaStore for PgSagaStore {
    fn clock(&self) -> &Arc<dyn Clock> {
        &self.inner.clock
    }

    async fn start(&self, new: NewSaga) -> Result<Started, Error> {
        self.check_start(&new)?;
        let now = self.now().to_system_time();
        let p = StartParams::new(&new);
        let sql = &self.inner.sql;
        let mut budget = self.budget();
        let deadline = budget.deadline;
        // Safe to repeat: a repeated insert finds the row (ours, if the
        // first attempt committed) by its start key.
        let existing = self
            .retrying("start", &mut budget, || async {
                let rows = self
                    .attempt(deadline, &sql.start, &p.params(&now, &new.state))
                    .await?;
                if let Some(row) = rows.first() {
                    return Ok((row.get::<_, Uuid>(0), row.get::<_, Vec<u8>>(1)));
                }
                // Taken: read the winner (a new statement sees a row that
                // a concurrent start committed while this one waited).
                let rows = self
                    .attempt(deadline, &sql.start_existing, &[&p.name, &p.key])
                    .await?;
                winner(&rows).map_err(Failed::before)
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
        // Written into every row this claim leases: if the reply is lost,
        // the rows are found again by it.
        let claim_id = Uuid::now_v7();
        let mut budget = self.budget();
        // The lease expiries of the attempts whose reply was lost.
        let mut in_doubt: Vec<SystemTime> = Vec::new();
        loop {
            if !in_doubt.is_empty() {
                let now = self.now().to_system_time();
                let found = self
                    .attempt(
                        budget.deadline,
                        &self.inner.sql.claimed_by,
                        &[&names, &versions, &in_doubt, &claim_id, &worker, &now],
                    )
                    .await;
                match found {
                    Ok(rows) if rows.is_empty() => {
                        // None of them committed (or leased anything): claim
                        // again.
                        tracing::info!(claim = %claim_id,
                            "a claim whose reply was lost did not commit; claiming again");
                    }
                    Ok(rows) => {
                        bump(&self.inner.counters.claims_recovered);
                        tracing::info!(claim = %claim_id, rows = rows.len(),
                            "a claim whose reply was lost had committed; running what it leased");
                        return Ok(self.read_claimed(&mut budget, rows).await);
                    }
                    Err(failed) => {
                        self.pause("claim", failed.error, &mut budget).await?;
                        continue;
                    }
                }
            }
            let now = self.now();
            let expires = (now + request.lease_for).to_system_time();
            let now = now.to_system_time();
            let attempt = self
                .attempt(
                    budget.deadline,
                    &self.inner.sql.claim,
                    &[
                        &now, &worker, &limit, &names, &versions, &expires, &claim_id,
                    ],
                )
                .await;
            match attempt {
                Ok(rows) => return Ok(self.read_claimed(&mut budget, rows).await),
                Err(failed) => {
                    if failed.ambiguous() {
                        in_doubt.push(expires);
                    }
                    self.pause("claim", failed.error, &mut budget).await?;
                }
            }
        }
    }

    async fn heartbeat(&self, lease: &Lease, lease_for: Duration) -> Result<Lease, Error> {
        let id = lease.saga_id.as_uuid();
        let token = lease.token.as_uuid();
        let mut budget = self.budget();
        let deadline = budget.deadline;
        let rows = self
            .retrying("heartbeat", &mut budget, || async {
                let now = self.now();
                let expires = (now + lease_for).to_system_time();
                let now = now.to_system_time();
                self.attempt(
                    deadline,
                    &self.inner.sql.heartbeat,
                    &[&id, &token, &expires, &now],
                )
                .await
            })
            .await?;
        match rows.first() {
            Some(row) => Ok(Lease {
                expires_at: ts(row.get(0)),
                ..*lease
            }),
            None => Err(self
                .refusal(&mut budget, lease.saga_id, Guard::Lease(token))
                .await?),
        }
    }

    async fn release(&self, lease: &Lease) -> Result<(), Error> {
        let id = lease.saga_id.as_uuid();
        let token = lease.token.as_uuid();
        let mut budget = self.budget();
        let mut ambiguous = false;
        loop {
            let now = self.now().to_system_time();
            match self
                .attempt(
                    budget.deadline,
                    &self.inner.sql.release,
                    &[&id, &token, &now],
                )
                .await
            {
                Ok(rows) if rows.len() == 1 => return Ok(()),
                // Our earlier, ambiguous attempt released it.
                Ok(_) if ambiguous => return Ok(()),
                Ok(_) => {
                    return Err(self
                        .refusal(&mut budget, lease.saga_id, Guard::Lease(token))
                        .await?);
                }
                Err(failed) => {
                    ambiguous |= failed.ambiguous();
                    self.pause("release", failed.error, &mut budget).await?;
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
            .query("load", &mut self.budget(), &self.inner.sql.load, &[&uuid])
            .await?;
        Ok(rows.first().map(snapshot).transpose()?)
    }

    async fn history(&self, id: SagaId) -> Result<Vec<HistoryEntry>, Error> {
        let uuid = id.as_uuid();
        let rows = self
            .query(
                "history",
                &mut self.budget(),
                &self.inner.sql.history,
                &[&uuid],
            )
            .await?;
        Ok(rows.iter().map(history_entry).collect::<Result<_, _>>()?)
    }

    async fn outbox_for(&self, id: SagaId) -> Result<Vec<OutboxMessage>, Error> {
        let uuid = id.as_uuid();
        let rows = self
            .query(
                "outbox_for",
                &mut self.budget(),
                &self.inner.sql.outbox_for,
                &[&uuid],
            )
            .await?;
        Ok(rows.iter().map(outbox_message).collect::<Result<_, _>>()?)
    }

    async fn due_unregistered(&self, kinds: &[SagaKind]) -> Result<Vec<(SagaKind, u64)>, Error> {
        let (names, versions) = kind_arrays(kinds);
        let mut budget = self.budget();
        let deadline = budget.deadline;
        let rows = self
            .retrying("due_unregistered", &mut budget, || async {
                let now = self.now().to_system_time();
                self.attempt(
                    deadline,
                    &self.inner.sql.due_unregistered,
                    &[&now, &names, &versions],
                )
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
