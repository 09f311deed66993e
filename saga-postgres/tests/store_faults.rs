//! Failures of the database itself: a connection dropped while a
//! transition's or a claim's statement is in flight, a first attempt that
//! commits after the store concluded it had not, an outage that outlasts
//! an operation's deadline, and a PostgreSQL crash and restart.

mod common;

use std::error::Error as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use saga_core::store::{ClaimRequest, ClaimedSaga, SagaStore};
use saga_core::testing::{Behavior, Gate, Script, TestState, scripted_saga};
use saga_core::{
    Clock, Direction, Error, Executor, ManualClock, Outcome, SagaClient, SagaId, SagaKind,
    StartKey, Status, WorkerId,
};
use saga_postgres::deadpool_postgres::Object;
use saga_postgres::{PgError, PgSagaStore, SchemaName, StoreStats, pool_from_config};
use saga_test_support::proxy::{Cut, FaultProxy};
use saga_test_support::{TestCluster, test_server};

const LEASE: Duration = Duration::from_secs(30);
const WAIT: Duration = Duration::from_secs(60);

/// A migrated schema, a store reaching it through a fault proxy (a pool of
/// `pool_size`), and a direct connection for the test's own queries.
struct Setup {
    store: PgSagaStore,
    proxy: FaultProxy,
    clock: Arc<ManualClock>,
    direct: Object,
    saga: saga_core::SagaDefinition<TestState>,
    fresh: common::FreshSchema,
}

impl Setup {
    async fn new(pool_size: usize) -> Self {
        let fresh = common::fresh_schema().await;
        let mut direct = fresh.pool.get().await.unwrap();
        saga_postgres::migrate(&mut direct, &fresh.schema)
            .await
            .unwrap();
        let server = test_server().await.unwrap();
        let proxy = FaultProxy::start(server.socket_addr().await.unwrap())
            .await
            .unwrap();
        let clock = Arc::new(ManualClock::starting_now());
        let store = PgSagaStore::builder(
            pool_from_config(fresh.guard.config_via(proxy.addr()), pool_size).unwrap(),
            fresh.schema.clone(),
        )
        .clock(clock.clone())
        .build();
        Setup {
            store,
            proxy,
            clock,
            direct,
            saga: scripted_saga(&Script::new(), 1),
            fresh,
        }
    }

    /// A store on the same pool with another operation deadline.
    fn store_with_deadline(&self, deadline: Duration) -> PgSagaStore {
        PgSagaStore::builder(self.store.pool().clone(), self.fresh.schema.clone())
            .clock(self.clock.clone())
            .operation_deadline(deadline)
            .build()
    }

    fn kinds(&self) -> [SagaKind; 1] {
        [self.saga.kind().clone()]
    }

    async fn start(&self, order: u32) -> SagaId {
        SagaClient::new(self.store.clone())
            .start(
                &self.saga,
                StartKey::new(format!("order-{order}")).unwrap(),
                &TestState::order(order),
            )
            .await
            .unwrap()
            .id
    }

    async fn claim(&self, worker: WorkerId, limit: usize) -> Result<Vec<ClaimedSaga>, Error> {
        self.store
            .claim(ClaimRequest {
                worker,
                kinds: &self.kinds(),
                fingerprints: &[self.saga.shape().fingerprint()],
                limit,
                lease_for: LEASE,
            })
            .await
    }

    /// One `bigint` from `sql`, `{s}` standing for the quoted schema.
    async fn count(
        &self,
        sql: &str,
        params: &[&(dyn saga_postgres::tokio_postgres::types::ToSql + Sync)],
    ) -> i64 {
        let sql = sql.replace("{s}", &self.fresh.schema.quoted());
        common::count(&self.direct, &sql, params).await
    }

    async fn stop(self) {
        drop(self.direct);
        self.proxy.stop().await;
    }
}

/// How a transition is guarded.
#[derive(Clone, Copy, Debug)]
enum Write {
    /// `record`, under the lease of a claim.
    Leased,
    /// `record_unleased`, under the instance's version (an operator's).
    Unleased,
}

/// An instance ready for a transition of kind `write`: claimed if leased.
/// Returns its id and the lease, if any.
async fn ready(setup: &Setup, write: Write) -> (SagaId, Option<saga_core::store::Lease>) {
    let id = setup.start(1).await;
    match write {
        Write::Leased => {
            let claimed = setup.claim(WorkerId::new(), 1).await.unwrap().remove(0);
            (id, Some(claimed.lease))
        }
        Write::Unleased => (id, None),
    }
}

/// Writes `record` the way `write` says, expecting `version` for an
/// unleased write.
async fn write_transition(
    store: &PgSagaStore,
    write: Write,
    id: SagaId,
    lease: Option<saga_core::store::Lease>,
    version: u64,
    record: saga_core::store::Record,
) -> Result<(), Error> {
    match write {
        Write::Leased => store.record(&lease.unwrap(), record).await,
        Write::Unleased => store.record_unleased(id, version, record).await,
    }
}

/// Checks that the transition `tid` was applied exactly once on top of
/// `before`: one history row for it, one version bump, one copy of its
/// message, no lease left.
async fn applied_once(
    store: &PgSagaStore,
    id: SagaId,
    tid: saga_core::TransitionId,
    before: &saga_core::SagaSnapshot,
) {
    let history = store.history(id).await.unwrap();
    assert_eq!(history.iter().filter(|h| h.transition_id == tid).count(), 1);
    assert_eq!(history.len(), 2, "created + this transition: {history:#?}");
    let after = store.load(id).await.unwrap().unwrap();
    assert_eq!(after.version, before.version + 1);
    assert_eq!(
        (after.step.as_str(), after.attempt, after.lease),
        ("charge", 0, None)
    );
    assert_eq!(store.outbox_for(id).await.unwrap().len(), 1);
}

/// Runs one transition through a proxy armed with `cut` and checks it was
/// applied exactly once. Returns the store's stats.
async fn transition_through(cut: Cut, write: Write) -> StoreStats {
    let setup = Setup::new(4).await;
    let (id, lease) = ready(&setup, write).await;
    let before = setup.store.load(id).await.unwrap().unwrap();
    let record = common::advance(id, setup.clock.now());
    let tid = record.transition_id;

    setup.proxy.arm(cut);
    let fired = setup.proxy.fired();
    write_transition(&setup.store, write, id, lease, before.version, record)
        .await
        .expect("the store resolves the ambiguity and reports success");
    tokio::time::timeout(WAIT, fired)
        .await
        .expect("the cut fired");
    assert_eq!(setup.proxy.fired_count(), 1);
    applied_once(&setup.store, id, tid, &before).await;
    let stats = setup.store.stats();
    setup.stop().await;
    stats
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_reply_is_lost_is_found_committed_and_not_applied_again() {
    let stats = transition_through(Cut::AfterExecute, Write::Leased).await;
    assert_eq!(stats.ambiguous_committed, 1, "{stats:?}");
    assert_eq!(stats.ambiguous_not_committed, 0, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_that_never_reached_the_server_is_found_missing_and_written_again() {
    let stats = transition_through(Cut::BeforeExecute, Write::Leased).await;
    assert_eq!(stats.ambiguous_committed, 0, "{stats:?}");
    assert_eq!(stats.ambiguous_not_committed, 1, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_write_whose_reply_is_lost_is_found_committed_and_not_applied_again() {
    let stats = transition_through(Cut::AfterExecute, Write::Unleased).await;
    assert_eq!(stats.ambiguous_committed, 1, "{stats:?}");
    assert_eq!(stats.ambiguous_not_committed, 0, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_write_that_never_reached_the_server_is_written_again() {
    let stats = transition_through(Cut::BeforeExecute, Write::Unleased).await;
    assert_eq!(stats.ambiguous_committed, 0, "{stats:?}");
    assert_eq!(stats.ambiguous_not_committed, 1, "{stats:?}");
}

/// The first attempt's statement reaches the server but waits on a row
/// lock the test holds; its connection is cut. The store looks the
/// transition up (not there: the first attempt has not committed) and
/// writes it again, which waits on the same lock. Once the test lets go,
/// the first attempt commits *after* the lookup said it had not; the second
/// finds the guard moved and changes nothing. The store must notice that
/// the transition did commit, and apply it once.
async fn a_late_commit(write: Write) {
    let setup = Setup::new(4).await;
    let (id, lease) = ready(&setup, write).await;
    let before = setup.store.load(id).await.unwrap().unwrap();
    let record = common::advance(id, setup.clock.now());
    let tid = record.transition_id;

    let mut holder = setup.fresh.pool.get().await.unwrap();
    let tx = holder.transaction().await.unwrap();
    tx.query_one(
        &format!(
            "SELECT 1 FROM {}.saga_instances WHERE id = $1 FOR UPDATE",
            setup.fresh.schema.quoted()
        ),
        &[&id.as_uuid()],
    )
    .await
    .unwrap();

    setup.proxy.arm(Cut::AfterExecute);
    let fired = setup.proxy.fired();
    let writing = tokio::spawn({
        let store = setup.store.clone();
        async move { write_transition(&store, write, id, lease, before.version, record).await }
    });
    // Both attempts wait on the test's row lock (the second, perhaps, behind
    // the first): the lookup between them found nothing.
    let schema = setup.fresh.schema.as_str().to_owned();
    let update = format!("UPDATE \"{schema}\".saga_instances");
    common::wait_until_count(&setup.direct, common::LOCK_WAITERS, &[&update], 2).await;
    assert!(!writing.is_finished());
    tx.commit().await.unwrap();

    tokio::time::timeout(WAIT, writing)
        .await
        .expect("the write finishes")
        .unwrap()
        .expect("the store finds that the first attempt committed");
    tokio::time::timeout(WAIT, fired)
        .await
        .expect("the cut fired");
    applied_once(&setup.store, id, tid, &before).await;
    let stats = setup.store.stats();
    assert_eq!(stats.ambiguous_committed, 1, "{stats:?}");
    assert_eq!(
        stats.ambiguous_not_committed, 0,
        "the not-committed answer was taken back: {stats:?}"
    );
    assert_eq!(stats.ambiguous_unresolved, 0, "{stats:?}");
    assert_eq!(stats.retries, 1, "one wait before the lookup: {stats:?}");
    setup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transition_that_commits_after_it_was_found_missing_is_applied_once() {
    a_late_commit(Write::Leased).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_write_that_commits_after_it_was_found_missing_is_applied_once() {
    a_late_commit(Write::Unleased).await;
}

/// Claims two of four due instances through a proxy armed with `cut`: the
/// claim returns the rows it leased, each leased once with one attempt
/// counted, and leaves the others alone.
async fn claim_through(cut: Cut) -> StoreStats {
    let setup = Setup::new(4).await;
    let mut ids = Vec::new();
    for n in 1..=4 {
        ids.push(setup.start(n).await);
    }
    let worker = WorkerId::new();
    setup.proxy.arm(cut);
    let fired = setup.proxy.fired();
    let claimed = setup
        .claim(worker, 2)
        .await
        .expect("the claim goes through");
    tokio::time::timeout(WAIT, fired)
        .await
        .expect("the cut fired");

    assert_eq!(claimed.len(), 2, "{claimed:#?}");
    for c in &claimed {
        assert_eq!(c.attempt, 1);
        let s = setup.store.load(c.lease.saga_id).await.unwrap().unwrap();
        assert_eq!(s.attempt, 1, "one attempt counted");
        assert_eq!(s.lease, Some((worker, c.lease.expires_at)));
        // The lease handed out is the one in the row.
        setup.store.heartbeat(&c.lease, LEASE).await.unwrap();
    }
    let leased = setup
        .count(
            "SELECT count(*) FROM {s}.saga_instances WHERE lease_token IS NOT NULL",
            &[],
        )
        .await;
    assert_eq!(leased, 2, "no other row was leased");
    let spent = setup
        .count(
            "SELECT coalesce(sum(attempt), 0)::int8 FROM {s}.saga_instances",
            &[],
        )
        .await;
    assert_eq!(spent, 2, "no attempt was spent on a row nobody runs");
    // The other two are still there for the next claim.
    let rest = setup.claim(WorkerId::new(), 4).await.unwrap();
    assert_eq!(rest.len(), 2);
    let stats = setup.store.stats();
    setup.stop().await;
    stats
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_whose_reply_is_lost_hands_out_the_rows_it_leased() {
    let stats = claim_through(Cut::AfterExecute).await;
    assert_eq!(stats.claims_recovered, 1, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_that_never_reached_the_server_claims_again() {
    let stats = claim_through(Cut::BeforeExecute).await;
    assert_eq!(stats.claims_recovered, 0, "{stats:?}");
    assert_eq!(stats.retries, 1, "{stats:?}");
}

/// Whether the driver's error for a lost or refused connection is in the
/// chain: the cause was kept, not flattened.
fn keeps_the_closed_connection(err: &dyn std::error::Error) -> bool {
    let mut source = err.source();
    while let Some(e) = source {
        if e.downcast_ref::<saga_postgres::tokio_postgres::Error>()
            .is_some_and(|e| {
                e.is_closed() || e.source().is_some_and(|io| io.is::<std::io::Error>())
            })
        {
            return true;
        }
        source = e.source();
    }
    false
}

/// How long past its deadline an operation may take to give up: generous,
/// for a loaded machine. The point is that it is bounded at all: before,
/// each attempt could block for the connect, create and wait timeouts.
const SLACK: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operation_stuck_on_an_unanswered_statement_gives_up_at_its_deadline() {
    let setup = Setup::new(1).await;
    let id = setup.start(1).await;
    let reconnect_for = Duration::from_secs(2);
    let store = setup.store_with_deadline(reconnect_for);
    // The server's answers (and the statements) now take an hour.
    setup.proxy.set_latency(Duration::from_secs(3600));
    let started = Instant::now();
    let err = tokio::time::timeout(WAIT, store.load(id))
        .await
        .expect("bounded by the deadline")
        .unwrap_err();
    let took = started.elapsed();
    assert!(took >= reconnect_for, "{took:?}");
    assert!(took < reconnect_for + SLACK, "{took:?}");
    let pg = common::pg(&err);
    assert!(
        matches!(pg, PgError::DeadlineExceeded { after, .. } if *after == reconnect_for),
        "{pg:?}"
    );
    assert!(pg.is_connection_error() && pg.is_retryable());
    setup.proxy.set_latency(Duration::ZERO);
    setup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_longer_than_the_deadline_fails_with_the_connection_error() {
    let setup = Setup::new(2).await;
    let id = setup.start(1).await;
    let reconnect_for = Duration::from_secs(2);
    let store = setup.store_with_deadline(reconnect_for);
    // An outage: live connections are reset, new ones refused.
    setup.proxy.refuse_new(true);
    setup.proxy.reset_all().await;
    let started = Instant::now();
    let err = tokio::time::timeout(WAIT, store.load(id))
        .await
        .expect("bounded by the deadline")
        .unwrap_err();
    let took = started.elapsed();
    assert!(took < reconnect_for + SLACK, "{took:?}");
    let pg = common::pg(&err);
    assert!(pg.is_connection_error(), "{pg:?}");
    assert!(
        !matches!(pg, PgError::DeadlineExceeded { .. }),
        "the last attempt's own error, not a timeout: {pg:?}"
    );
    assert!(keeps_the_closed_connection(pg), "the cause is kept: {pg:?}");
    assert!(store.stats().retries > 0, "{:?}", store.stats());
    assert!(setup.proxy.stats().refused > 0);
    setup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ambiguous_commit_that_cannot_be_looked_up_in_time_is_counted_unresolved() {
    // One connection: once it is cut, the lookup needs a new one.
    let setup = Setup::new(1).await;
    let (id, lease) = ready(&setup, Write::Leased).await;
    let before = setup.store.load(id).await.unwrap().unwrap();
    let reconnect_for = Duration::from_secs(2);
    let store = setup.store_with_deadline(reconnect_for);
    let record = common::advance(id, setup.clock.now());
    let tid = record.transition_id;

    // The statement reaches the server and commits, the reply is lost, and
    // no new connection can be made to find out.
    setup.proxy.refuse_new(true);
    setup.proxy.arm(Cut::AfterExecute);
    let fired = setup.proxy.fired();
    let started = Instant::now();
    let err = tokio::time::timeout(WAIT, store.record(&lease.unwrap(), record))
        .await
        .expect("bounded by the deadline")
        .unwrap_err();
    let took = started.elapsed();
    assert!(took < reconnect_for + SLACK, "{took:?}");
    let pg = common::pg(&err);
    assert!(pg.is_connection_error(), "{pg:?}");
    assert!(keeps_the_closed_connection(pg), "the cause is kept: {pg:?}");
    let stats = store.stats();
    assert_eq!(stats.ambiguous_unresolved, 1, "{stats:?}");
    assert_eq!(
        stats.ambiguous_committed + stats.ambiguous_not_committed,
        0,
        "{stats:?}"
    );

    // It had in fact committed, once.
    tokio::time::timeout(WAIT, fired)
        .await
        .expect("the cut fired");
    setup.proxy.refuse_new(false);
    applied_once(&setup.store, id, tid, &before).await;
    setup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_survives_a_postgres_crash_and_restart() {
    let cluster = TestCluster::start()
        .await
        .expect("local PostgreSQL binaries");
    let db = cluster.fresh_database().await.unwrap();
    let schema = SchemaName::new("saga").unwrap();
    let pool = pool_from_config(db.config(), 4).unwrap();
    saga_postgres::migrate(&mut pool.get().await.unwrap(), &schema)
        .await
        .unwrap();
    let store = PgSagaStore::builder(pool, schema)
        .operation_deadline(Duration::from_secs(60))
        .build();
    let script = Script::new();
    let saga = scripted_saga(&script, 1);
    let gate = Gate::new();
    script.on(
        1,
        "charge",
        Direction::Forward,
        [Behavior::Wait(gate.clone())],
    );
    let exec = Executor::builder(store.clone())
        .register(saga.clone())
        .concurrency(4)
        .build()
        .unwrap();
    let client = exec.client();
    let ids = common::start_orders(&client, &saga, 1..=8).await;
    let worker = tokio::spawn({
        let exec = exec.clone();
        async move { exec.run_until_idle().await }
    });
    // Order 1 is inside `charge` when the server crashes.
    tokio::time::timeout(WAIT, gate.entered()).await.unwrap();
    cluster.stop_immediate().await.unwrap();
    assert!(!cluster.is_running());
    // The step finishes while the database is down; its result waits for
    // the server to come back.
    gate.open();
    cluster.start_again().await.unwrap();
    let report = tokio::time::timeout(WAIT, worker)
        .await
        .expect("the worker finishes")
        .unwrap()
        .expect("no operator action needed");
    for id in ids {
        assert_eq!(
            store.load(id).await.unwrap().unwrap().status,
            Status::Completed,
            "{id}"
        );
    }
    assert!(
        store.stats().retries > 0,
        "the crash was noticed: {:?}",
        store.stats()
    );
    assert_eq!(report.store_errors, 0, "{report:?}");
    let charge_successes = store
        .history(exec_first(&script))
        .await
        .unwrap()
        .iter()
        .filter(|h| h.step.as_str() == "charge" && h.outcome == Outcome::Succeeded)
        .count();
    assert_eq!(charge_successes, 1);
}

/// The instance of order 1, found through the script's call log.
fn exec_first(script: &Script) -> saga_core::SagaId {
    script
        .calls()
        .iter()
        .find(|c| c.order == 1)
        .expect("order 1 ran")
        .saga_id
}

/// A watcher of the wire (the chaos harness) finds a transition by
/// `saga_postgres::tags`: the statement starts with the tag and carries the
/// saga id and the transition id where the tags say, leased or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transition_on_the_wire_carries_its_tag_and_its_ids_where_the_tags_say() {
    for write in [Write::Leased, Write::Unleased] {
        let setup = Setup::new(2).await;
        let (id, lease) = ready(&setup, write).await;
        let before = setup.store.load(id).await.unwrap().unwrap();
        let record = common::advance(id, setup.clock.now());
        let tid = record.transition_id;
        let mut hold = setup
            .proxy
            .hold(saga_postgres::tags::TRANSITION, id.as_uuid().as_bytes());
        let store = setup.store.clone();
        let writing = tokio::spawn(async move {
            write_transition(&store, write, id, lease, before.version, record).await
        });
        let seen = tokio::time::timeout(WAIT, hold.reached())
            .await
            .expect("the transition was sent");
        hold.release();
        writing.await.unwrap().unwrap();

        let sql = seen.sql.as_deref().unwrap_or_default();
        assert!(
            sql.starts_with(saga_postgres::tags::TRANSITION),
            "{write:?}: {sql}"
        );
        assert_eq!(
            seen.param(saga_postgres::tags::TRANSITION_SAGA_ID_PARAM),
            Some(id.as_uuid().as_bytes().as_slice()),
            "{write:?}"
        );
        assert_eq!(
            seen.param(saga_postgres::tags::TRANSITION_ID_PARAM),
            Some(tid.as_uuid().as_bytes().as_slice()),
            "{write:?}"
        );
        setup.stop().await;
    }
}
