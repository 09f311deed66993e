//! The test support against a real saga store: the negative control that
//! turns fencing off from outside, and reading a transition's ids from its
//! statement on the wire.

use std::sync::Arc;
use std::time::Duration;

use saga_core::store::{ClaimRequest, ClaimedSaga, Lease, Record, SagaStore};
use saga_core::testing::{Script, TestState, scripted_saga};
use saga_core::{
    Clock, Direction, Error, HistoryEntry, ManualClock, Outcome, SagaClient, SagaId, SagaKind,
    StartKey, Status, StepName, Timestamp, TransitionId, WorkerId,
};
use saga_postgres::tags;
use saga_postgres::{PgSagaStore, SchemaName, pool_from_config};
use saga_test_support::negative::Unfenced;
use saga_test_support::proxy::{FaultProxy, transition_ids};
use saga_test_support::{TestSchema, fresh_schema, test_server};

const LEASE: Duration = Duration::from_secs(10);

/// A store on a fresh, migrated schema (reached through `via`, if given),
/// reading `clock`; and the schema's guard.
async fn store(
    clock: Arc<dyn Clock>,
    via: Option<std::net::SocketAddr>,
) -> (PgSagaStore, TestSchema) {
    let guard = fresh_schema().await.expect("a test PostgreSQL server");
    let schema = SchemaName::new(guard.name()).unwrap();
    let config = match via {
        Some(addr) => guard.config_via(addr),
        None => guard.config(),
    };
    let pool = pool_from_config(config, 4).unwrap();
    saga_postgres::migrate(&mut pool.get().await.unwrap(), &schema)
        .await
        .unwrap();
    (
        PgSagaStore::builder(pool, schema).clock(clock).build(),
        guard,
    )
}

/// Claims as a worker running the scripted saga of `kind` (version 1, the
/// only one these tests start).
async fn claim(store: &impl SagaStore, kind: &SagaKind) -> Option<ClaimedSaga> {
    let fingerprints = [scripted_saga(&Script::new(), 1).shape().fingerprint()];
    store
        .claim(ClaimRequest {
            worker: WorkerId::new(),
            kinds: std::slice::from_ref(kind),
            fingerprints: &fingerprints,
            limit: 1,
            lease_for: LEASE,
        })
        .await
        .unwrap()
        .into_iter()
        .next()
}

/// Starts one instance of the scripted saga and claims it.
async fn started_and_claimed(store: &PgSagaStore) -> (SagaKind, ClaimedSaga) {
    let saga = scripted_saga(&Script::new(), 1);
    SagaClient::new(store.clone())
        .start(
            &saga,
            StartKey::new("order-1").unwrap(),
            &TestState::order(1),
        )
        .await
        .unwrap();
    let claimed = claim(store, saga.kind()).await.expect("claimed");
    (saga.kind().clone(), claimed)
}

/// The first step succeeded: the saga moves on to the second.
fn first_step_done(now: Timestamp) -> Record {
    let transition_id = TransitionId::new();
    Record {
        transition_id,
        status: Status::Running,
        step: StepName::new("charge").unwrap(),
        direction: Direction::Forward,
        attempt: 0,
        first_attempt_at: None,
        next_run_at: Some(now),
        state: None,
        stuck_reason: None,
        outbox: Vec::new(),
        history: HistoryEntry {
            transition_id,
            step: StepName::new("validate").unwrap(),
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

async fn recorded(store: &impl SagaStore, saga: SagaId, transition: TransitionId) -> bool {
    store
        .history(saga)
        .await
        .unwrap()
        .iter()
        .any(|h| h.transition_id == transition)
}

/// A worker's lease that lapsed, after another worker took the saga over.
async fn taken_over(store: &PgSagaStore, clock: &ManualClock) -> (Lease, Lease) {
    let (kind, first) = started_and_claimed(store).await;
    clock.advance(LEASE + Duration::from_secs(1));
    let second = claim(store, &kind).await.expect("taken over");
    assert_ne!(first.lease.token, second.lease.token);
    (first.lease, second.lease)
}

#[tokio::test]
async fn the_real_store_refuses_a_stale_write_that_unfenced_lets_through() {
    let clock = Arc::new(ManualClock::starting_now());
    let (store, _guard) = store(clock.clone(), None).await;
    let (stale, _current) = taken_over(&store, &clock).await;

    // The control: the store fences.
    let refused = first_step_done(clock.now());
    let err = store.record(&stale, refused.clone()).await.unwrap_err();
    assert!(
        matches!(err, Error::LeaseLost(id) if id == stale.saga_id),
        "{err:?}"
    );
    assert!(!recorded(&store, stale.saga_id, refused.transition_id).await);

    // Unfenced, the same stale write is accepted.
    let unfenced = Unfenced::postgres(store.clone());
    let accepted = first_step_done(clock.now());
    unfenced.record(&stale, accepted.clone()).await.unwrap();
    assert!(recorded(&store, stale.saga_id, accepted.transition_id).await);
    assert_eq!(unfenced.repointed(), 1);
}

#[tokio::test]
async fn a_stale_heartbeat_extends_the_lease_through_unfenced_only() {
    let clock = Arc::new(ManualClock::starting_now());
    let (store, _guard) = store(clock.clone(), None).await;
    let (stale, _current) = taken_over(&store, &clock).await;

    let err = store.heartbeat(&stale, LEASE).await.unwrap_err();
    assert!(matches!(err, Error::LeaseLost(_)), "{err:?}");

    let unfenced = Unfenced::postgres(store.clone());
    let extended = unfenced.heartbeat(&stale, LEASE).await.unwrap();
    assert_eq!(
        extended.token, stale.token,
        "the stale lease is current again"
    );
    assert_eq!(unfenced.repointed(), 1);
    // And the stale worker's result then goes through without re-pointing.
    let result = first_step_done(clock.now());
    unfenced.record(&extended, result.clone()).await.unwrap();
    assert!(recorded(&store, stale.saga_id, result.transition_id).await);
    assert_eq!(unfenced.repointed(), 1);
}

#[tokio::test]
async fn a_write_under_a_live_lease_is_passed_through_untouched() {
    let clock = Arc::new(ManualClock::starting_now());
    let (store, _guard) = store(clock.clone(), None).await;
    let unfenced = Unfenced::postgres(store.clone());
    let (_, claimed) = started_and_claimed(&store).await;
    let record = first_step_done(clock.now());
    unfenced
        .record(&claimed.lease, record.clone())
        .await
        .unwrap();
    assert!(recorded(&store, claimed.lease.saga_id, record.transition_id).await);
    assert_eq!(unfenced.repointed(), 0);
}

#[tokio::test]
async fn a_transition_statement_on_the_wire_gives_its_saga_and_transition_ids() {
    let server = test_server().await.expect("test server");
    let proxy = FaultProxy::start(server.socket_addr().await.unwrap())
        .await
        .unwrap();
    let clock = Arc::new(ManualClock::starting_now());
    let (store, _guard) = store(clock.clone(), Some(proxy.addr())).await;
    let (_, claimed) = started_and_claimed(&store).await;
    let record = first_step_done(clock.now());

    let mut hold = proxy.hold(tags::TRANSITION, claimed.lease.token.as_uuid().as_bytes());
    let writing = {
        let (store, lease, record) = (store.clone(), claimed.lease, record.clone());
        tokio::spawn(async move { store.record(&lease, record).await })
    };
    let statement = tokio::time::timeout(Duration::from_secs(30), hold.reached())
        .await
        .expect("the transition statement reaches the proxy");
    assert!(
        statement
            .sql
            .as_deref()
            .is_some_and(|sql| sql.starts_with(tags::TRANSITION)),
        "{:?}",
        statement.sql
    );
    assert_eq!(
        transition_ids(&statement),
        (
            Some(claimed.lease.saga_id.as_uuid()),
            Some(record.transition_id.as_uuid())
        )
    );
    hold.release();
    writing.await.unwrap().unwrap();
}
