//! Shared by this crate's saga store tests: a fresh schema per test on the
//! test server (`DATABASE_URL`, or a throwaway local cluster), dropped when
//! the test passes and kept (its name printed) when it fails.
#![allow(dead_code, unreachable_pub)]

use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::Duration;

use saga_core::store::{ClaimRequest, ClaimedSaga, Lease, NewSaga, Record, SagaStore};
use saga_core::testing::TestState;
use saga_core::{
    Clock, Direction, Error, HistoryEntry, Message, MessageId, OutboxMessage, Outcome, SagaClient,
    SagaDefinition, SagaId, SagaKind, SagaSnapshot, StartKey, Started, Status, StepName, Timestamp,
    TransitionId,
};
use saga_postgres::deadpool_postgres::Pool;
use saga_postgres::tokio_postgres::Client;
use saga_postgres::tokio_postgres::types::ToSql;
use saga_postgres::{PgError, PgSagaStore, PgSagaStoreBuilder, SchemaName, pool_from_config};
use saga_test_support::TestSchema;

/// A pool on a fresh schema (not migrated yet), and its guard.
pub struct FreshSchema {
    pub pool: Pool,
    pub schema: SchemaName,
    pub url: String,
    // Last: dropping it drops the schema.
    pub guard: TestSchema,
}

pub async fn fresh_schema() -> FreshSchema {
    let guard = saga_test_support::fresh_schema()
        .await
        .expect("a test PostgreSQL server");
    FreshSchema {
        pool: pool_from_config(guard.config(), 8).unwrap(),
        schema: SchemaName::new(guard.name()).unwrap(),
        url: guard.url().to_owned(),
        guard,
    }
}

/// A Postgres store on a fresh, migrated schema, with the schema's guard.
pub struct TestStore {
    pub store: PgSagaStore,
    pub url: String,
    _guard: TestSchema,
}

impl TestStore {
    /// The same schema, with a store built again, changed by `f`.
    pub fn map(self, f: impl FnOnce(PgSagaStoreBuilder) -> PgSagaStoreBuilder) -> Self {
        let builder = PgSagaStore::builder(self.store.pool().clone(), self.store.schema().clone())
            .clock(self.store.clock().clone())
            .operation_deadline(self.store.operation_deadline());
        TestStore {
            store: f(builder).build(),
            ..self
        }
    }
}

impl std::ops::Deref for TestStore {
    type Target = PgSagaStore;
    fn deref(&self) -> &PgSagaStore {
        &self.store
    }
}

/// A store on a fresh, migrated schema, reading `clock`.
pub async fn fresh_store(clock: Arc<dyn Clock>) -> TestStore {
    let FreshSchema {
        pool,
        schema,
        url,
        guard,
    } = fresh_schema().await;
    let mut client = pool.get().await.unwrap();
    saga_postgres::migrate(&mut client, &schema).await.unwrap();
    drop(client);
    TestStore {
        store: PgSagaStore::builder(pool, schema)
            .clock(clock)
            .operation_deadline(Duration::from_secs(20))
            .build(),
        url,
        _guard: guard,
    }
}

impl SagaStore for TestStore {
    fn clock(&self) -> &Arc<dyn Clock> {
        self.store.clock()
    }
    fn limits(&self) -> saga_core::Limits {
        self.store.limits()
    }
    async fn start(&self, new: NewSaga) -> Result<Started, Error> {
        self.store.start(new).await
    }
    async fn claim(&self, request: ClaimRequest<'_>) -> Result<Vec<ClaimedSaga>, Error> {
        self.store.claim(request).await
    }
    async fn heartbeat(&self, lease: &Lease, lease_for: Duration) -> Result<Lease, Error> {
        self.store.heartbeat(lease, lease_for).await
    }
    async fn release(&self, lease: &Lease) -> Result<(), Error> {
        self.store.release(lease).await
    }
    async fn record(&self, lease: &Lease, record: Record) -> Result<(), Error> {
        self.store.record(lease, record).await
    }
    async fn record_unleased(&self, id: SagaId, version: u64, record: Record) -> Result<(), Error> {
        self.store.record_unleased(id, version, record).await
    }
    async fn load(&self, id: SagaId) -> Result<Option<SagaSnapshot>, Error> {
        self.store.load(id).await
    }
    async fn history(&self, id: SagaId) -> Result<Vec<HistoryEntry>, Error> {
        self.store.history(id).await
    }
    async fn outbox_for(&self, id: SagaId) -> Result<Vec<OutboxMessage>, Error> {
        self.store.outbox_for(id).await
    }
    async fn due_unregistered(&self, kinds: &[SagaKind]) -> Result<Vec<(SagaKind, u64)>, Error> {
        self.store.due_unregistered(kinds).await
    }
    async fn due_unmatched(
        &self,
        kinds: &[SagaKind],
        fingerprints: &[saga_core::ShapeFingerprint],
    ) -> Result<Vec<(SagaKind, saga_core::ShapeFingerprint, u64)>, Error> {
        self.store.due_unmatched(kinds, fingerprints).await
    }
    async fn register_definition(
        &self,
        shape: &saga_core::SagaShape,
    ) -> Result<saga_core::ShapeFingerprint, Error> {
        self.store.register_definition(shape).await
    }
}

/// The `PgError` inside a store error.
pub fn pg(err: &Error) -> &PgError {
    let Error::Store(source) = err else {
        panic!("expected a store error, got {err:?}");
    };
    source
        .downcast_ref::<PgError>()
        .unwrap_or_else(|| panic!("the source is a PgError: {err:?}"))
}

/// Starts orders `orders` of `saga` (keys `order-{n}`) through `client`;
/// their ids, in that order.
pub async fn start_orders<St: SagaStore>(
    client: &SagaClient<St>,
    saga: &SagaDefinition<TestState>,
    orders: RangeInclusive<u32>,
) -> Vec<SagaId> {
    let mut ids = Vec::new();
    for n in orders {
        let key = StartKey::new(format!("order-{n}")).unwrap();
        ids.push(
            client
                .start(saga, key, &TestState::order(n))
                .await
                .unwrap()
                .id,
        );
    }
    ids
}

/// This test binary run again, for the test `name` alone (a child
/// process's part of a test).
pub fn this_test(name: &str) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(std::env::current_exe().unwrap());
    command.args(["--exact", name, "--nocapture", "--test-threads", "1"]);
    command
}

/// A record moving a scripted instance from `validate` to `charge`, with
/// one outbox message, as the executor would write it.
pub fn advance(id: SagaId, now: Timestamp) -> Record {
    let tid = TransitionId::new();
    let validate = StepName::new("validate").unwrap();
    let message = Message::json("order.validated", &serde_json::json!({ "ok": true }))
        .unwrap()
        .into_outbox(MessageId::derive(id, &validate, Direction::Forward, 0), now);
    Record {
        transition_id: tid,
        status: Status::Running,
        step: StepName::new("charge").unwrap(),
        direction: Direction::Forward,
        attempt: 0,
        first_attempt_at: None,
        next_run_at: Some(now),
        state: Some(serde_json::json!({ "order": 1, "done": ["validate:forward"] })),
        stuck_reason: None,
        outbox: vec![message],
        history: HistoryEntry {
            transition_id: tid,
            step: validate,
            direction: Direction::Forward,
            attempt: 1,
            outcome: Outcome::Succeeded,
            error: None,
            from_status: Some(Status::Running),
            to_status: Status::Running,
            started_at: now,
            finished_at: now,
        },
    }
}

/// One `bigint` from `sql`.
pub async fn count(db: &Client, sql: &str, params: &[&(dyn ToSql + Sync)]) -> i64 {
    db.query_one(sql, params).await.unwrap().get(0)
}

/// Waits until `sql` (one `bigint`) returns `want`: for what only the
/// server can tell, such as which backends wait on a lock
/// (`pg_locks`, `pg_blocking_pids`). The server has no way to announce
/// it, so this asks again every few milliseconds, for at most a minute.
pub async fn wait_until_count(db: &Client, sql: &str, params: &[&(dyn ToSql + Sync)], want: i64) {
    let asked = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let got = count(db, sql, params).await;
            if got == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let last = count(db, sql, params).await;
    assert!(
        asked.is_ok(),
        "still {last}, not {want}, after a minute: {sql}"
    );
}

/// Backends of the database (other than `db`'s) waiting on a lock while
/// running a statement that mentions `text`.
pub const LOCK_WAITERS: &str = "SELECT count(*) FROM pg_stat_activity
     WHERE datname = current_database() AND pid <> pg_backend_pid()
       AND cardinality(pg_blocking_pids(pid)) > 0
       AND strpos(query, $1) > 0";
