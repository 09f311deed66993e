//! The store conformance suite.
//!
//! Every case takes a [`StoreFactory`] that makes a fresh, empty store on a
//! given clock. Run them all with [`store_conformance_tests!`](crate::store_conformance_tests).
//! The cases drive the store both directly (claims, leases, fencing,
//! history, outbox) and through a real [`Executor`] running the
//! [scripted saga](super::scripted_saga), so that a store that passes gives
//! the engine the semantics it relies on.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::script::{
    Behavior, Gate, STEPS, Script, TestState, scripted_saga, scripted_saga_with, test_policy,
};
use crate::client::SagaClient;
use crate::definition::{SagaDefinition, Step};
use crate::error::{Error, StepError};
use crate::executor::{Executor, RunReport};
use crate::fingerprint::ShapeFingerprint;
use crate::ids::{
    Direction, IdempotencyKey, MessageId, SagaId, StartKey, StepName, TransitionId, WorkerId,
};
use crate::machine::{Status, TransitionKind};
use crate::outbox::Message;
use crate::store::{ClaimRequest, HistoryEntry, Outcome, Record, SagaStore};
use crate::time::{Clock, ManualClock, Timestamp};

pub use super::definitions::{
    a_claim_takes_only_instances_of_its_own_shape,
    a_worker_with_swapped_steps_is_refused_and_runs_nothing,
    register_definition_keeps_the_first_shape_and_refuses_another,
};
pub use super::refusals::a_store_refuses_data_it_cannot_keep_and_writes_nothing;

use Direction::{Compensate as C, Forward as F};

/// Makes a fresh, empty store reading `clock`.
pub trait StoreFactory: Send + Sync {
    /// The store made.
    type Store: SagaStore;
    /// Makes one.
    fn make(&self, clock: Arc<dyn Clock>) -> impl Future<Output = Self::Store> + Send;
}

impl<Fun, Fut, St> StoreFactory for Fun
where
    Fun: Fn(Arc<dyn Clock>) -> Fut + Send + Sync,
    Fut: Future<Output = St> + Send,
    St: SagaStore,
{
    type Store = St;
    fn make(&self, clock: Arc<dyn Clock>) -> impl Future<Output = St> + Send {
        self(clock)
    }
}

/// Lease length used by the suite's executors.
pub const LEASE: Duration = Duration::from_secs(30);

/// A store, a clock, a script and the scripted saga, wired together.
pub struct Harness<St> {
    /// The clock every store read uses.
    pub clock: Arc<ManualClock>,
    /// The store under test.
    pub store: Arc<St>,
    /// The script the saga follows.
    pub script: Arc<Script>,
    /// The scripted saga, version 1.
    pub saga: SagaDefinition<TestState>,
}

impl<St: SagaStore> Harness<St> {
    /// A fresh store from `factory`, on a manual clock.
    pub async fn new<Fa: StoreFactory<Store = St>>(factory: &Fa) -> Self {
        let clock = Arc::new(ManualClock::new(Timestamp::from_micros(
            1_750_000_000_000_000,
        )));
        let store = Arc::new(factory.make(clock.clone()).await);
        let script = Script::new();
        let saga = scripted_saga(&script, 1);
        Harness {
            clock,
            store,
            script,
            saga,
        }
    }

    /// A new worker on the store, running the scripted saga.
    pub fn executor(&self) -> Executor<St> {
        Executor::builder_from_arc(self.store.clone())
            .register(self.saga.clone())
            .lease_duration(LEASE)
            .heartbeat_interval(LEASE - Duration::from_secs(1))
            .rng_seed(7)
            .build()
            .expect("valid executor")
    }

    /// A client on the store.
    pub fn client(&self) -> SagaClient<St> {
        SagaClient::from_arc(self.store.clone())
    }

    /// Starts order `order`.
    pub async fn start(&self, order: u32) -> SagaId {
        let started = self
            .client()
            .start(&self.saga, key(order), &TestState::order(order))
            .await
            .expect("start");
        assert!(started.created, "order {order} started twice");
        started.id
    }

    /// Runs a fresh worker until nothing is due.
    pub async fn drain(&self) -> RunReport {
        self.executor().run_until_idle().await.expect("run")
    }

    /// Moves the clock on by `d`, then drains.
    pub async fn advance_and_drain(&self, d: Duration) -> RunReport {
        self.clock.advance(d);
        self.drain().await
    }

    /// The instance's status.
    pub async fn status(&self, id: SagaId) -> Status {
        self.store
            .load(id)
            .await
            .expect("load")
            .expect("exists")
            .status
    }

    /// The instance's history as `(step, direction, outcome)`.
    pub async fn outcomes(&self, id: SagaId) -> Vec<(String, Direction, Outcome)> {
        self.store
            .history(id)
            .await
            .expect("history")
            .into_iter()
            .map(|h| (h.step.to_string(), h.direction, h.outcome))
            .collect()
    }
}

pub(super) fn key(order: u32) -> StartKey {
    StartKey::new(format!("order-{order}")).expect("valid key")
}

fn step(name: &str) -> StepName {
    StepName::new(name).expect("valid step name")
}

pub(super) fn claim_req<'a>(
    kinds: &'a [crate::ids::SagaKind],
    fingerprints: &'a [ShapeFingerprint],
    limit: usize,
) -> ClaimRequest<'a> {
    ClaimRequest {
        worker: WorkerId::new(),
        kinds,
        fingerprints,
        limit,
        lease_for: LEASE,
    }
}

/// A record that keeps the instance where it is and due again at `at`.
pub(super) fn retry_record(
    step_name: &str,
    attempt: u32,
    at: Timestamp,
    outbox: Vec<crate::outbox::OutboxMessage>,
) -> Record {
    let transition_id = TransitionId::new();
    Record {
        transition_id,
        status: Status::Running,
        step: step(step_name),
        direction: F,
        attempt,
        first_attempt_at: Some(at),
        next_run_at: Some(at),
        state: None,
        stuck_reason: None,
        outbox,
        history: HistoryEntry {
            transition_id,
            step: step(step_name),
            direction: F,
            attempt,
            outcome: Outcome::RetryScheduled,
            error: Some("retryable: test".into()),
            from_status: Some(Status::Running),
            to_status: Status::Running,
            started_at: at,
            finished_at: at,
        },
    }
}

fn fwd(steps: &[&str]) -> Vec<String> {
    steps.iter().map(|s| format!("{s}:forward")).collect()
}

// ---------------------------------------------------------------------------
// Starting
// ---------------------------------------------------------------------------

/// `start` creates a `Running` instance due at once, at the first step,
/// with a `Created` history row.
pub async fn start_creates_a_due_running_instance<Fa: StoreFactory>(f: &Fa) {
    let h = Harness::new(f).await;
    let now = h.clock.now();
    let id = h.start(1).await;
    let s = h.store.load(id).await.unwrap().unwrap();
    assert_eq!(s.id, id);
    assert_eq!(s.kind, *h.saga.kind());
    assert_eq!(s.start_key, key(1));
    assert_eq!(s.status, Status::Running);
    assert_eq!(
        (s.step.as_str(), s.direction, s.attempt),
        ("validate", F, 0)
    );
    assert_eq!(s.next_run_at, Some(now));
    assert_eq!(s.first_attempt_at, None);
    assert_eq!(s.lease, None);
    assert_eq!(s.state, serde_json::to_value(TestState::order(1)).unwrap());
    assert_eq!(s.created_at, now);
    assert_eq!(
        h.outcomes(id).await,
        vec![("validate".into(), F, Outcome::Created)]
    );
    assert!(h.store.load(SagaId::new()).await.unwrap().is_none());
}

/// The same start key and input give back the first instance; a different
/// input is refused and writes nothing; the key is scoped by saga name.
pub async fn start_is_idempotent_on_the_start_key<Fa: StoreFactory>(f: &Fa) {
    let h = Harness::new(f).await;
    let client = h.client();
    let first = client
        .start(&h.saga, key(1), &TestState::order(1))
        .await
        .unwrap();
    assert!(first.created);
    let again = client
        .start(&h.saga, key(1), &TestState::order(1))
        .await
        .unwrap();
    assert_eq!(again.id, first.id);
    assert!(!again.created);

    let err = client
        .start(&h.saga, key(1), &TestState::order(2))
        .await
        .unwrap_err();
    match err {
        Error::StartKeyConflict { existing, .. } => assert_eq!(existing, first.id),
        other => panic!("expected a start key conflict, got {other:?}"),
    }
    let s = h.store.load(first.id).await.unwrap().unwrap();
    assert_eq!(s.state, serde_json::to_value(TestState::order(1)).unwrap());
    assert_eq!(h.store.history(first.id).await.unwrap().len(), 1);

    let other_saga = SagaDefinition::<TestState>::builder("scripted-other", 1)
        .step(Step::new("validate", noop).no_compensation())
        .build()
        .unwrap();
    let other = client
        .start(&other_saga, key(1), &TestState::order(1))
        .await
        .unwrap();
    assert!(other.created);
    assert_ne!(other.id, first.id);
}

/// Start keys span a saga's versions: a start of version 2 with a key that
/// started a version 1 instance returns that instance (equal input) and
/// says it is version 1, or is refused (different input).
pub async fn a_start_key_spans_versions<Fa: StoreFactory>(f: &Fa) {
    let h = Harness::new(f).await;
    let client = h.client();
    let v1 = client
        .start(&h.saga, key(1), &TestState::order(1))
        .await
        .unwrap();
    assert_eq!((v1.created, &v1.kind), (true, h.saga.kind()));
    let v2_saga = scripted_saga(&h.script, 2);
    let v2 = client
        .start(&v2_saga, key(1), &TestState::order(1))
        .await
        .unwrap();
    assert_eq!(v2.id, v1.id, "the version 1 instance");
    assert!(!v2.created);
    assert_eq!(v2.kind, *h.saga.kind(), "says it is version 1");
    assert_eq!(v2.kind.version, 1);
    let err = client
        .start(&v2_saga, key(1), &TestState::order(2))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::StartKeyConflict { existing, .. } if existing == v1.id),
        "{err:?}"
    );
    // A new key starts version 2.
    let fresh = client
        .start(&v2_saga, key(2), &TestState::order(2))
        .await
        .unwrap();
    assert_eq!((fresh.created, &fresh.kind), (true, v2_saga.kind()));
    assert_eq!(h.store.load(v1.id).await.unwrap().unwrap().kind.version, 1);
}

async fn noop(_: &mut crate::StepContext, _: &mut TestState) -> Result<(), StepError> {
    Ok(())
}

/// A state type the scripted saga's state does not deserialize as (its
/// `order` is a number): "scripted" version 1 changed without a bump.
#[derive(Serialize, Deserialize)]
struct Incompatible {
    order: String,
}

async fn never(_: &mut crate::StepContext, _: &mut Incompatible) -> Result<(), StepError> {
    panic!("must not run with an unreadable state");
}

/// Version 1 of "scripted" with the same steps (so the same fingerprint)
/// but a state type its stored state does not deserialize as.
fn incompatible_scripted() -> SagaDefinition<Incompatible> {
    SagaDefinition::<Incompatible>::builder("scripted", 1)
        .step(Step::new("validate", never).no_compensation())
        .step(Step::new("charge", never).compensate_with(never))
        .step(Step::new("reserve", never).compensate_with(never))
        .pivot(Step::new("confirm", never))
        .step(Step::new("notify", never))
        .build()
        .expect("valid definition")
}

// ---------------------------------------------------------------------------
// Claims, leases, fencing
// ---------------------------------------------------------------------------

/// A claim leases each due instance to one worker, counts an attempt and
/// respects its limit; leased instances are not claimed again.
pub async fn claim_leases_each_due_instance_once<Fa: StoreFactory>(f: &Fa) {
    let h = Harness::new(f).await;
    let kinds = [h.saga.kind().clone()];
    let fps = [h.saga.shape().fingerprint()];
    let ids = [h.start(1).await, h.start(2).await, h.start(3).await];
    let now = h.clock.now();
    let a = h.store.claim(claim_req(&kinds, &fps, 2)).await.unwrap();
    assert_eq!(a.len(), 2);
    let b = h.store.claim(claim_req(&kinds, &fps, 10)).await.unwrap();
    assert_eq!(b.len(), 1);
    assert!(
        h.store
            .claim(claim_req(&kinds, &fps, 10))
            .await
            .unwrap()
            .is_empty()
    );
    let mut seen: Vec<SagaId> = a.iter().chain(&b).map(|c| c.lease.saga_id).collect();
    seen.sort();
    let mut expected = ids.to_vec();
    expected.sort();
    assert_eq!(seen, expected);
    for c in a.iter().chain(&b) {
        assert_eq!(c.attempt, 1);
        assert_eq!(c.first_attempt_at, now);
        assert_eq!(c.lease.expires_at, now + LEASE);
        assert_eq!(
            h.store
                .load(c.lease.saga_id)
                .await
                .unwrap()
                .unwrap()
                .next_run_at,
            Some(now + LEASE)
        );
        assert_eq!(
            (c.step.as_str(), c.direction, c.status),
            ("validate", F, Status::Running)
        );
        let s = h.store.load(c.lease.saga_id).await.unwrap().unwrap();
        assert_eq!(s.attempt, 1);
        assert!(s.lease.is_some());
    }
    assert_ne!(a[0].lease.token, a[1].lease.token);
    assert!(
        h.store
            .claim(claim_req(&kinds, &fps, 0))
            .await
            .unwrap()
            .is_empty()
    );
}

/// Instances due later, of other saga kinds, or finished are not claimed;
/// due instances of unregistered kinds are counted.
pub async fn claim_skips_future_unregistered_and_finished_instances<Fa: StoreFactory>(f: &Fa) {
    let h = Harness::new(f).await;
    let kinds = [h.saga.kind().clone()];
    let fps = [h.saga.shape().fingerprint()];
    let v2 = scripted_saga(&h.script, 2);
    let other = h
        .client()
        .start(&v2, key(99), &TestState::order(99))
        .await
        .unwrap()
        .id;
    let later = h.start(1).await;
    let c = h.store.claim(claim_req(&kinds, &fps, 10)).await.unwrap();
    assert_eq!(c.len(), 1);
    let at = h.clock.now() + Duration::from_secs(10);
    h.store
        .record(&c[0].lease, retry_record("validate", 1, at, Vec::new()))
        .await
        .unwrap();
    assert!(
        h.store
            .claim(claim_req(&kinds, &fps, 10))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        h.store.due_unregistered(&kinds).await.unwrap(),
        vec![(v2.kind().clone(), 1)]
    );
    h.clock.advance(Duration::from_secs(10));
    let c = h.store.claim(claim_req(&kinds, &fps, 10)).await.unwrap();
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].lease.saga_id, later);
    assert_eq!(c[0].attempt, 2, "the retry's attempt count was kept");
    let s = h.store.load(other).await.unwrap().unwrap();
    assert_eq!((s.status, s.attempt, s.lease), (Status::Running, 0, None));
    let both = [h.saga.kind().clone(), v2.kind().clone()];
    assert!(h.store.due_unregistered(&both).await.unwrap().is_empty());
}

/// An expired lease makes the instance claimable with a new token; the old
/// token can neither record nor heartbeat, and its writes change nothing.
pub async fn an_expired_lease_is_fenced<Fa: StoreFactory>(f: &Fa) {
    let h = Harness::new(f).await;
    let kinds = [h.saga.kind().clone()];
    let fps = [h.saga.shape().fingerprint()];
    let id = h.start(1).await;
    let old = h
        .store
        .claim(claim_req(&kinds, &fps, 1))
        .await
        .unwrap()
        .remove(0);
    h.clock.advance(LEASE);
    let new = h
        .store
        .claim(claim_req(&kinds, &fps, 1))
        .await
        .unwrap()
        .remove(0);
    assert_eq!(new.lease.saga_id, id);
    assert_ne!(new.lease.token, old.lease.token);
    assert_eq!(new.attempt, 2);
    let before = h.store.load(id).await.unwrap().unwrap();

    let at = h.clock.now();
    let err = h
        .store
        .record(&old.lease, retry_record("validate", 1, at, Vec::new()))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::LeaseLost(x) if x == id), "{err:?}");
    let err = h.store.heartbeat(&old.lease, LEASE).await.unwrap_err();
    assert!(matches!(err, Error::LeaseLost(_)), "{err:?}");
    let err = h.store.release(&old.lease).await.unwrap_err();
    assert!(matches!(err, Error::LeaseLost(_)), "{err:?}");
    assert_eq!(h.store.load(id).await.unwrap().unwrap(), before);
    assert_eq!(h.store.history(id).await.unwrap().len(), 1);

    h.store
        .record(&new.lease, retry_record("validate", 2, at, Vec::new()))
        .await
        .unwrap();
    let after = h.store.load(id).await.unwrap().unwrap();
    assert_eq!(after.lease, None);
    assert!(after.version > before.version);
    // A lease is spent by its write.
    let err = h
        .store
        .record(&new.lease, retry_record("validate", 2, at, Vec::new()))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::LeaseLost(_)), "{err:?}");
}

/// A lease that expired, even if nobody claimed the instance since, no
/// longer allows writes.
pub async fn an_expired_lease_refuses_writes_even_unclaimed<Fa: StoreFactory>(f: &Fa) {
    let h = Harness::new(f).await;
    let kinds = [h.saga.kind().clone()];
    let fps = [h.saga.shape().fingerprint()];
    let id = h.start(1).await;
    let c = h
        .store
        .claim(claim_req(&kinds, &fps, 1))
        .await
        .unwrap()
        .remove(0);
    h.clock.advance(LEASE + Duration::from_millis(1));
    let at = h.clock.now();
    let err = h
        .store
        .record(&c.lease, retry_record("validate", 1, at, Vec::new()))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::LeaseLost(_)), "{err:?}");
    let s = h.store.load(id).await.unwrap().unwrap();
    assert_eq!(
        (s.status, s.step.as_str(), s.attempt),
        (Status::Running, "validate", 1)
    );
}

/// A heartbeat extends a live lease, keeping other workers off.
pub async fn heartbeats_extend_the_lease<Fa: StoreFactory>(f: &Fa) {
    let h = Harness::new(f).await;
    let kinds = [h.saga.kind().clone()];
    let fps = [h.saga.shape().fingerprint()];
    h.start(1).await;
    let c = h
        .store
        .claim(claim_req(&kinds, &fps, 1))
        .await
        .unwrap()
        .remove(0);
    h.clock.advance(LEASE - Duration::from_secs(5));
    let extended = h.store.heartbeat(&c.lease, LEASE).await.unwrap();
    assert_eq!(extended.token, c.lease.token);
    assert_eq!(extended.expires_at, h.clock.now() + LEASE);
    h.clock.advance(Duration::from_secs(10));
    assert!(
        h.store
            .claim(claim_req(&kinds, &fps, 1))
            .await
            .unwrap()
            .is_empty()
    );
    let at = h.clock.now();
    h.store
        .record(&extended, retry_record("validate", 1, at, Vec::new()))
        .await
        .unwrap();
}

/// Releasing a lease refunds the attempt and leaves the instance due.
pub async fn release_refunds_the_attempt<Fa: StoreFactory>(f: &Fa) {
    let h = Harness::new(f).await;
    let kinds = [h.saga.kind().clone()];
    let fps = [h.saga.shape().fingerprint()];
    let id = h.start(1).await;
    let c = h
        .store
        .claim(claim_req(&kinds, &fps, 1))
        .await
        .unwrap()
        .remove(0);
    h.store.release(&c.lease).await.unwrap();
    let s = h.store.load(id).await.unwrap().unwrap();
    assert_eq!((s.attempt, s.first_attempt_at, s.lease), (0, None, None));
    let again = h.store.claim(claim_req(&kinds, &fps, 1)).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].attempt, 1);
}

/// A record writes status, position, state, outbox messages and a history
/// row together; a message id already in the outbox is not written twice.
pub async fn records_are_atomic_and_outbox_ids_are_unique<Fa: StoreFactory>(f: &Fa) {
    let h = Harness::new(f).await;
    let kinds = [h.saga.kind().clone()];
    let fps = [h.saga.shape().fingerprint()];
    let id = h.start(1).await;
    let notify = step("notify");
    let msg = |index: u32| {
        Message::json("order.confirmed", &serde_json::json!({ "order": 1 }))
            .unwrap()
            .key("order-1")
            .unwrap()
            .header("trace", "abc")
            .unwrap()
            .into_outbox(MessageId::derive(id, &notify, F, index), h.clock.now())
    };
    let c = h
        .store
        .claim(claim_req(&kinds, &fps, 1))
        .await
        .unwrap()
        .remove(0);
    let at = h.clock.now();
    let mut rec = retry_record("validate", 1, at, vec![msg(0), msg(1)]);
    rec.state = Some(serde_json::json!({ "order": 1, "done": ["x"] }));
    h.store.record(&c.lease, rec).await.unwrap();
    let c = h
        .store
        .claim(claim_req(&kinds, &fps, 1))
        .await
        .unwrap()
        .remove(0);
    // The step ran again and emitted the same first message.
    h.store
        .record(&c.lease, retry_record("validate", 2, at, vec![msg(0)]))
        .await
        .unwrap();
    let outbox = h.store.outbox_for(id).await.unwrap();
    assert_eq!(outbox, vec![msg(0), msg(1)]);
    let s = h.store.load(id).await.unwrap().unwrap();
    assert_eq!(s.state, serde_json::json!({ "order": 1, "done": ["x"] }));
    assert_eq!(s.attempt, 2);
    let history = h.store.history(id).await.unwrap();
    assert_eq!(history.len(), 3);
    assert_eq!(history[1].attempt, 1);
    assert_eq!(history[2].attempt, 2);
    assert!(h.store.outbox_for(SagaId::new()).await.unwrap().is_empty());
}

/// Operator writes need the expected version and no live lease.
pub async fn operator_writes_check_version_and_lease<Fa: StoreFactory>(f: &Fa) {
    let h = Harness::new(f).await;
    let kinds = [h.saga.kind().clone()];
    let fps = [h.saga.shape().fingerprint()];
    let id = h.start(1).await;
    let v1 = h.store.load(id).await.unwrap().unwrap().version;
    let at = h.clock.now();
    let c = h
        .store
        .claim(claim_req(&kinds, &fps, 1))
        .await
        .unwrap()
        .remove(0);
    let v2 = h.store.load(id).await.unwrap().unwrap().version;
    assert!(v2 > v1, "a claim bumps the version");
    let err = h
        .store
        .record_unleased(id, v2, retry_record("validate", 1, at, Vec::new()))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Conflict(_)), "live lease: {err:?}");
    h.clock.advance(LEASE);
    let err = h
        .store
        .record_unleased(id, v1, retry_record("validate", 1, at, Vec::new()))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Conflict(_)), "stale version: {err:?}");
    h.store
        .record_unleased(id, v2, retry_record("validate", 1, at, Vec::new()))
        .await
        .unwrap();
    // The expired lease was voided by the operator write.
    let err = h
        .store
        .record(&c.lease, retry_record("validate", 1, at, Vec::new()))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::LeaseLost(_)), "{err:?}");
    let err = h
        .store
        .record_unleased(
            SagaId::new(),
            1,
            retry_record("validate", 1, at, Vec::new()),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotFound(_)), "{err:?}");
}

// ---------------------------------------------------------------------------
// The engine on this store
// ---------------------------------------------------------------------------

/// Every step runs once, in order; the state and the outbox message are
/// recorded; the history shows each step succeeding.
pub async fn happy_path_completes<Fa: StoreFactory>(f: &Fa) {
    let h = Harness::new(f).await;
    let id = h.start(1).await;
    let report = h.drain().await;
    assert_eq!(h.status(id).await, Status::Completed);
    assert_eq!(h.script.trace(1), fwd(&STEPS));
    assert_eq!(
        report.transitions.last(),
        Some(&(id, TransitionKind::ForwardSucceededLast))
    );
    let s = h.store.load(id).await.unwrap().unwrap();
    let state: TestState = serde_json::from_value(s.state).unwrap();
    assert_eq!(state.done, fwd(&STEPS));
    assert_eq!((s.next_run_at, s.lease), (None, None));
    let mut expected = vec![("validate".to_owned(), F, Outcome::Created)];
    expected.extend(STEPS.iter().map(|s| (s.to_string(), F, Outcome::Succeeded)));
    assert_eq!(h.outcomes(id).await, expected);
    let outbox = h.store.outbox_for(id).await.unwrap();
    assert_eq!(outbox.len(), 1);
    assert_eq!(outbox[0].id, MessageId::derive(id, &step("notify"), F, 0));
    assert_eq!(outbox[0].topic, "order.confirmed");
    assert_eq!(outbox[0].key.as_deref(), Some("order-1"));
    assert!(h.drain().await.transitions.is_empty(), "nothing left to do");
}

/// A permanent failure at each step up to the pivot compensates, in reverse
/// order, every step that was started, the failed one included.
pub async fn permanent_failure_before_the_pivot_compensates_in_reverse<Fa: StoreFactory>(f: &Fa) {
    let h = Harness::new(f).await;
    // Per failing step: the compensations expected, in order.
    let cases: [(&str, &[&str]); 4] = [
        ("validate", &[]),
        ("charge", &["charge"]),
        ("reserve", &["reserve", "charge"]),
        ("confirm", &["reserve", "charge"]),
    ];
    for (order, (failing, compensations)) in (1..).zip(cases) {
        h.script.on(order, failing, F, [Behavior::Permanent]);
        let id = h.start(order).await;
        h.drain().await;
        assert_eq!(h.status(id).await, Status::Compensated, "failing {failing}");
        let failed_at = STEPS.iter().position(|s| *s == failing).unwrap();
        let mut expected = fwd(&STEPS[..=failed_at]);
        expected.extend(compensations.iter().map(|s| format!("{s}:compensate")));
        assert_eq!(h.script.trace(order), expected, "failing {failing}");
        let history = h.outcomes(id).await;
        assert!(history.contains(&(failing.to_owned(), F, Outcome::FailedForGood)));
        assert!(!history.iter().any(|(s, _, _)| s == "notify"));
        // The compensation of a step gets that step's forward key.
        for call in h
            .script
            .calls()
            .iter()
            .filter(|c| c.order == order && c.direction == C)
        {
            let fwd_call = h
                .script
                .calls()
                .into_iter()
                .find(|x| x.order == order && x.step == call.step && x.direction == F)
                .unwrap();
            assert_eq!(call.forward_key, fwd_call.key);
            assert_ne!(call.key, fwd_call.key);
        }
    }
}

/// A compensation that fails transiently is retried per its policy and
/// then succeeds.
pub async fn a_compensation_retries_then_succeeds<Fa: StoreFactory>(f: &Fa) {
    let h = Harness::new(f).await;
    h.script.on(1, "reserve", F, [Behavior::Permanent]);
    h.script
        .on(1, "charge", C, [Behavior::Retryable, Behavior::Retryable]);
    let id = h.start(1).await;
    h.drain().await;
    assert_eq!(h.status(id).await, Status::Compensating);
    let s = h.store.load(id).await.unwrap().unwrap();
    assert_eq!((s.step.as_str(), s.direction, s.attempt), ("charge", C, 1));
    assert_eq!(s.next_run_at, Some(h.clock.now() + Duration::from_secs(1)));
    // Not due yet: nothing runs.
    assert!(h.drain().await.transitions.is_empty());
    h.advance_and_drain(Duration::from_secs(1)).await;
    assert_eq!(h.status(id).await, Status::Compensating);
    h.advance_and_drain(Duration::from_secs(2)).await;
    assert_eq!(h.status(id).await, Status::Compensated);
    let attempts: Vec<u32> = h
        .script
        .calls()
        .iter()
        .filter(|c| c.step == "charge" && c.direction == C)
        .map(|c| c.attempt)
        .collect();
    assert_eq!(attempts, [1, 2, 3]);
    let keys: Vec<IdempotencyKey> = h
        .script
        .calls()
        .iter()
        .filter(|c| c.step == "charge" && c.direction == C)
        .map(|c| c.key)
        .collect();
    assert!(keys.windows(2).all(|w| w[0] == w[1]));
}

/// A compensation that exhausts its policy parks the instance as `Stuck`
/// with the reason; `resume` takes it up again and it completes.
pub async fn an_exhausted_compensation_is_stuck_until_resumed<Fa: StoreFactory>(f: &Fa) {
    let h = Harness::new(f).await;
    h.script.on(1, "reserve", F, [Behavior::Permanent]);
    h.script.on(
        1,
        "reserve",
        C,
        [
            Behavior::Retryable,
            Behavior::Retryable,
            Behavior::Retryable,
        ],
    );
    let id = h.start(1).await;
    h.drain().await;
    h.advance_and_drain(Duration::from_secs(1)).await;
    h.advance_and_drain(Duration::from_secs(2)).await;
    let s = h.store.load(id).await.unwrap().unwrap();
    assert_eq!(s.status, Status::Stuck);
    assert_eq!((s.step.as_str(), s.direction), ("reserve", C));
    let reason = s.stuck_reason.expect("a stuck instance says why");
    assert!(reason.contains("3 attempts"), "{reason}");
    assert!(reason.contains("scripted retryable failure"), "{reason}");
    assert_eq!(s.next_run_at, None);
    // Stuck instances are never picked up by themselves.
    assert!(
        h.advance_and_drain(Duration::from_secs(3600))
            .await
            .transitions
            .is_empty()
    );

    let exec = h.executor();
    exec.resume(id).await.unwrap();
    assert_eq!(h.status(id).await, Status::Compensating);
    let err = exec.resume(id).await.unwrap_err();
    assert!(matches!(err, Error::InvalidStatus { .. }), "{err:?}");
    h.drain().await;
    assert_eq!(h.status(id).await, Status::Compensated);
    let tail: Vec<String> = h.script.trace(1).into_iter().rev().take(2).collect();
    assert_eq!(tail, ["charge:compensate", "reserve:compensate"]);
    let history = h.outcomes(id).await;
    assert!(history.contains(&("reserve".into(), C, Outcome::Resumed)));
}

/// A step past the pivot that keeps failing is retried per its policy,
/// then parked as `Stuck`, whether it ends with a permanent error or spends
/// its budget of attempts; nothing is ever compensated, and the saga can no
/// longer be cancelled. Resumed, it completes.
pub async fn a_failing_step_after_the_pivot_is_stuck_never_compensated<Fa: StoreFactory>(f: &Fa) {
    let h = Harness::new(f).await;
    use Behavior::{Permanent, Retryable};
    // Order 1 ends with a permanent error; order 2 spends its 3 attempts.
    h.script
        .on(1, "notify", F, [Retryable, Retryable, Permanent]);
    h.script
        .on(2, "notify", F, [Retryable, Retryable, Retryable]);
    let ids = [h.start(1).await, h.start(2).await];
    h.drain().await;
    h.advance_and_drain(Duration::from_secs(1)).await;
    h.advance_and_drain(Duration::from_secs(2)).await;
    let reasons = ["permanent error", "retry budget spent after 3 attempts"];
    for (order, (id, reason)) in (1..).zip(ids.into_iter().zip(reasons)) {
        let s = h.store.load(id).await.unwrap().unwrap();
        assert_eq!(s.status, Status::Stuck, "order {order}");
        assert_eq!((s.step.as_str(), s.direction), ("notify", F));
        let stuck = s.stuck_reason.unwrap();
        assert!(stuck.contains(reason), "order {order}: {stuck}");
        let notify_calls = h
            .script
            .calls()
            .iter()
            .filter(|c| c.order == order && c.step == "notify")
            .map(|c| c.attempt)
            .collect::<Vec<_>>();
        assert_eq!(notify_calls, [1, 2, 3], "order {order}");
        assert!(h.store.outbox_for(id).await.unwrap().is_empty());
        let err = h.executor().cancel(id, "too late").await.unwrap_err();
        match err {
            Error::InvalidStatus {
                status: Status::Stuck,
                source,
                ..
            } => assert_eq!(
                source.why,
                "only a saga stuck at or before its pivot can be cancelled"
            ),
            other => panic!("order {order}: {other:?}"),
        }
    }
    assert!(
        h.script.calls().iter().all(|c| c.direction == F),
        "nothing compensated"
    );

    for id in ids {
        h.executor().resume(id).await.unwrap();
    }
    h.drain().await;
    for id in ids {
        assert_eq!(h.status(id).await, Status::Completed);
        assert_eq!(h.store.outbox_for(id).await.unwrap().len(), 1);
    }
    assert!(h.script.calls().iter().all(|c| c.direction == F));
}

/// A pivot that runs out of budget without a definitive answer may have
/// taken effect: it is parked, not compensated. An operator who knows it
/// did not happen cancels, and the steps before it are compensated.
pub async fn a_pivot_that_gives_up_in_doubt_is_parked_until_an_operator_decides<
    Fa: StoreFactory,
>(
    f: &Fa,
) {
    let h = Harness::new(f).await;
    h.script.on(
        1,
        "confirm",
        F,
        [
            Behavior::Retryable,
            Behavior::Retryable,
            Behavior::Retryable,
        ],
    );
    let id = h.start(1).await;
    h.drain().await;
    h.advance_and_drain(Duration::from_secs(1)).await;
    h.advance_and_drain(Duration::from_secs(2)).await;
    let s = h.store.load(id).await.unwrap().unwrap();
    assert_eq!(
        (s.status, s.step.as_str(), s.direction),
        (Status::Stuck, "confirm", F)
    );
    assert!(
        s.stuck_reason
            .unwrap()
            .contains("the pivot's outcome is unknown")
    );
    assert!(
        h.script.calls().iter().all(|c| c.direction == F),
        "nothing was compensated while the pivot was in doubt"
    );
    h.executor()
        .cancel(id, "confirmed it never happened")
        .await
        .unwrap();
    h.drain().await;
    assert_eq!(h.status(id).await, Status::Compensated);
    let tail: Vec<String> = h.script.trace(1).into_iter().rev().take(2).collect();
    assert_eq!(tail, ["charge:compensate", "reserve:compensate"]);
    assert!(
        h.outcomes(id)
            .await
            .contains(&("confirm".into(), F, Outcome::Cancelled))
    );
}

/// A worker whose lease expires mid-step loses the instance to another
/// worker, which finishes it; the stale worker's result is refused and
/// changes nothing.
pub async fn a_lease_lost_mid_step_is_taken_over_and_the_stale_result_refused<Fa: StoreFactory>(
    f: &Fa,
) {
    let mut h = Harness::new(f).await;
    // No timer of the workers' own may fire during the test: attempts time
    // out after an hour, and the stale worker, whose lease lasts an hour of
    // the manual clock, would heartbeat after 59 minutes. Only the manual
    // clock ends its lease.
    let hour = Duration::from_secs(3600);
    h.saga = scripted_saga_with(&h.script, 1, &test_policy(), hour);
    let gate = Gate::new();
    h.script.on(1, "charge", F, [Behavior::Wait(gate.clone())]);
    let id = h.start(1).await;
    let stale_exec = Executor::builder_from_arc(h.store.clone())
        .register(h.saga.clone())
        .lease_duration(hour)
        .heartbeat_interval(hour - Duration::from_secs(60))
        .build()
        .expect("valid executor");
    let stale = stale_exec.clone();
    let stale_run = tokio::spawn(async move { stale.run_until_idle().await });
    gate.entered().await;
    // The stale worker is inside `charge`, holding the lease. Time passes.
    h.clock.advance(hour + Duration::from_secs(1));
    let fresh = h.drain().await;
    assert_eq!(fresh.leases_lost, 0);
    assert_eq!(h.status(id).await, Status::Completed);
    let before = h.store.load(id).await.unwrap().unwrap();
    let history_before = h.store.history(id).await.unwrap();

    gate.open();
    let stale = stale_run.await.unwrap().unwrap();
    assert_eq!(stale.leases_lost, 1);
    assert_eq!(
        stale_exec.stats().leases_lost,
        1,
        "the executor counts fenced writes"
    );
    assert_eq!(h.store.load(id).await.unwrap().unwrap(), before);
    assert_eq!(h.store.history(id).await.unwrap(), history_before);

    let charges: Vec<_> = h
        .script
        .calls()
        .into_iter()
        .filter(|c| c.step == "charge")
        .collect();
    assert_eq!(
        charges.len(),
        2,
        "at least once: both workers called charge"
    );
    assert_eq!(
        charges[0].key, charges[1].key,
        "with the same idempotency key"
    );
    assert_eq!((charges[0].attempt, charges[1].attempt), (1, 2));
    let recorded = h
        .outcomes(id)
        .await
        .into_iter()
        .filter(|(s, d, o)| s == "charge" && *d == F && *o == Outcome::Succeeded)
        .count();
    assert_eq!(recorded, 1, "the result is recorded once");
}

/// The idempotency key is the same on every attempt, whichever worker makes
/// it, and differs between directions and steps.
pub async fn the_idempotency_key_is_stable_across_retries_and_workers<Fa: StoreFactory>(f: &Fa) {
    let h = Harness::new(f).await;
    h.script
        .on(1, "charge", F, [Behavior::Retryable, Behavior::Retryable]);
    h.script.on(1, "reserve", F, [Behavior::Permanent]);
    let id = h.start(1).await;
    let a = h.executor();
    let b = h.executor();
    assert_ne!(a.worker_id(), b.worker_id());
    a.run_until_idle().await.unwrap();
    h.clock.advance(Duration::from_secs(1));
    b.run_until_idle().await.unwrap();
    h.clock.advance(Duration::from_secs(2));
    a.run_until_idle().await.unwrap();
    assert_eq!(h.status(id).await, Status::Compensated);
    let calls = h.script.calls();
    let charge: Vec<_> = calls.iter().filter(|c| c.step == "charge").collect();
    assert_eq!(charge.len(), 4, "three forward attempts and a compensation");
    let expected = IdempotencyKey::derive(id, &step("charge"), F);
    assert!(
        charge[..3]
            .iter()
            .all(|c| c.key == expected && c.direction == F)
    );
    assert_eq!(charge[3].direction, C);
    assert_eq!(
        charge[3].key,
        IdempotencyKey::derive(id, &step("charge"), C)
    );
    assert_eq!(charge[3].forward_key, expected);
    let reserve = calls.iter().find(|c| c.step == "reserve").unwrap();
    assert_ne!(reserve.key, expected);
}

/// A snooze defers the step without spending an attempt.
pub async fn a_snooze_does_not_spend_an_attempt<Fa: StoreFactory>(f: &Fa) {
    let h = Harness::new(f).await;
    let ten = Duration::from_secs(10);
    h.script.on(
        1,
        "charge",
        F,
        [
            Behavior::Snooze(ten),
            Behavior::Snooze(ten),
            Behavior::Retryable,
            Behavior::Retryable,
        ],
    );
    let id = h.start(1).await;
    h.drain().await;
    let s = h.store.load(id).await.unwrap().unwrap();
    assert_eq!((s.step.as_str(), s.attempt), ("charge", 0));
    assert_eq!(s.next_run_at, Some(h.clock.now() + ten));
    assert!(
        h.advance_and_drain(ten - Duration::from_secs(1))
            .await
            .transitions
            .is_empty()
    );
    h.advance_and_drain(Duration::from_secs(1)).await;
    h.advance_and_drain(ten).await;
    h.advance_and_drain(Duration::from_secs(1)).await;
    h.advance_and_drain(Duration::from_secs(2)).await;
    // With a budget of 3, two snoozes and two failures still leave room
    // for the third, successful attempt.
    assert_eq!(h.status(id).await, Status::Completed);
    let attempts: Vec<u32> = h
        .script
        .calls()
        .iter()
        .filter(|c| c.step == "charge")
        .map(|c| c.attempt)
        .collect();
    assert_eq!(attempts, [1, 1, 1, 2, 3]);
    let snoozes = h
        .outcomes(id)
        .await
        .into_iter()
        .filter(|(_, _, o)| *o == Outcome::Snoozed)
        .count();
    assert_eq!(snoozes, 2);
}

/// A snoozed step has started (the payment it found pending may still go
/// through): cancelling the saga while it is snoozed compensates it too,
/// with the forward step's key to look up what to undo.
pub async fn a_cancel_while_a_step_is_snoozed_compensates_it<Fa: StoreFactory>(f: &Fa) {
    let h = Harness::new(f).await;
    h.script
        .on(1, "charge", F, [Behavior::Snooze(Duration::from_secs(60))]);
    let id = h.start(1).await;
    h.drain().await;
    let s = h.store.load(id).await.unwrap().unwrap();
    assert_eq!(
        (s.status, s.step.as_str(), s.attempt),
        (Status::Running, "charge", 0),
        "the snooze gave its attempt back"
    );
    assert!(s.first_attempt_at.is_some(), "but the step has started");
    h.executor()
        .cancel(id, "the customer gave up waiting")
        .await
        .unwrap();
    let s = h.store.load(id).await.unwrap().unwrap();
    assert_eq!(
        (s.status, s.step.as_str(), s.direction),
        (Status::Compensating, "charge", C)
    );
    h.drain().await;
    assert_eq!(h.status(id).await, Status::Compensated);
    assert_eq!(
        h.script.trace(1),
        ["validate:forward", "charge:forward", "charge:compensate"]
    );
    let undo = h
        .script
        .calls()
        .into_iter()
        .find(|c| c.direction == C)
        .unwrap();
    assert_eq!(
        undo.forward_key,
        IdempotencyKey::derive(id, &step("charge"), F)
    );
}

/// A resume gives the step a fresh budget, which forgets that it had
/// started; the history does not. Cancelling the resumed saga before the
/// step runs again still compensates it: its first attempt may have
/// charged the card.
pub async fn a_cancel_after_a_resume_compensates_a_step_that_had_started<Fa: StoreFactory>(f: &Fa) {
    let h = Harness::new(f).await;
    h.script.on(1, "charge", F, [Behavior::Retryable]);
    let id = h.start(1).await;
    h.drain().await;
    let s = h.store.load(id).await.unwrap().unwrap();
    assert_eq!(
        (s.status, s.step.as_str(), s.attempt),
        (Status::Running, "charge", 1)
    );
    // A worker whose definition cannot read the state parks the saga.
    let changed = incompatible_scripted();
    h.clock.advance(Duration::from_secs(3600));
    Executor::builder_from_arc(h.store.clone())
        .register(changed)
        .lease_duration(LEASE)
        .heartbeat_interval(LEASE - Duration::from_secs(1))
        .build()
        .unwrap()
        .run_until_idle()
        .await
        .unwrap();
    assert_eq!(h.status(id).await, Status::Stuck);
    h.executor().resume(id).await.unwrap();
    let s = h.store.load(id).await.unwrap().unwrap();
    assert_eq!(
        (s.status, s.step.as_str(), s.attempt, s.first_attempt_at),
        (Status::Running, "charge", 0, None),
        "a fresh budget"
    );
    h.executor()
        .cancel(id, "the customer gave up")
        .await
        .unwrap();
    let s = h.store.load(id).await.unwrap().unwrap();
    assert_eq!(
        (s.status, s.step.as_str(), s.direction),
        (Status::Compensating, "charge", C),
        "the step that had started is compensated"
    );
    h.drain().await;
    assert_eq!(h.status(id).await, Status::Compensated);
    assert_eq!(
        h.script.trace(1),
        ["validate:forward", "charge:forward", "charge:compensate"]
    );
}

/// Time spent snoozed does not use up a step's elapsed-time budget: a step
/// that failed, then snoozed for longer than `max_elapsed`, is still
/// retried when it fails again.
pub async fn time_spent_snoozed_does_not_count_toward_max_elapsed<Fa: StoreFactory>(f: &Fa) {
    let mut h = Harness::new(f).await;
    let policy = crate::retry::RetryPolicy::builder()
        .initial_delay(Duration::from_secs(1))
        .multiplier(2.0)
        .max_delay(Duration::from_secs(10))
        .max_attempts(5)
        .max_elapsed(Duration::from_secs(30))
        .jitter(crate::retry::Jitter::None)
        .build()
        .unwrap();
    h.saga = scripted_saga_with(&h.script, 1, &policy, super::TEST_TIMEOUT);
    let hour = Duration::from_secs(3600);
    h.script.on(
        1,
        "charge",
        F,
        [
            Behavior::Retryable,
            Behavior::Snooze(hour),
            Behavior::Retryable,
        ],
    );
    let id = h.start(1).await;
    h.drain().await; // charge fails: retry in 1 s
    let first = h.store.load(id).await.unwrap().unwrap().first_attempt_at;
    let first = first.expect("charge has started");
    h.advance_and_drain(Duration::from_secs(1)).await; // snoozes an hour
    let s = h.store.load(id).await.unwrap().unwrap();
    assert_eq!((s.step.as_str(), s.attempt), ("charge", 1));
    assert_eq!(s.next_run_at, Some(h.clock.now() + hour));
    assert_eq!(
        s.first_attempt_at,
        Some(first + hour),
        "the budget's origin moves with the snooze"
    );
    // An hour later, well past `max_elapsed` since the first attempt, the
    // second failure is retried: 1 s of the budget was used, not 3601 s.
    h.advance_and_drain(hour).await;
    let s = h.store.load(id).await.unwrap().unwrap();
    assert_eq!(
        (s.status, s.step.as_str(), s.attempt),
        (Status::Running, "charge", 2)
    );
    assert_eq!(s.next_run_at, Some(h.clock.now() + Duration::from_secs(2)));
    h.advance_and_drain(Duration::from_secs(2)).await;
    assert_eq!(h.status(id).await, Status::Completed);
    let attempts: Vec<u32> = h
        .script
        .calls()
        .iter()
        .filter(|c| c.step == "charge")
        .map(|c| c.attempt)
        .collect();
    assert_eq!(attempts, [1, 2, 2, 3]);
}

/// State changes made by a failed attempt are discarded; the next attempt
/// sees the state as recorded after the last success.
pub async fn only_successful_attempts_change_the_state<Fa: StoreFactory>(f: &Fa) {
    let h = Harness::new(f).await;
    h.script.on(1, "reserve", F, [Behavior::Retryable]);
    let id = h.start(1).await;
    h.drain().await;
    let s = h.store.load(id).await.unwrap().unwrap();
    let state: TestState = serde_json::from_value(s.state).unwrap();
    assert_eq!(state.done, fwd(&["validate", "charge"]));
    h.advance_and_drain(Duration::from_secs(1)).await;
    let s = h.store.load(id).await.unwrap().unwrap();
    let state: TestState = serde_json::from_value(s.state).unwrap();
    assert_eq!(state.done, fwd(&STEPS));
}

/// Attempts claimed but never recorded (crashed workers) count: past the
/// budget the step fails for good without being called again.
pub async fn crashed_attempts_spend_the_budget<Fa: StoreFactory>(f: &Fa) {
    let h = Harness::new(f).await;
    let kinds = [h.saga.kind().clone()];
    let fps = [h.saga.shape().fingerprint()];
    let id = h.start(1).await;
    h.script.on(1, "charge", F, [Behavior::Retryable]);
    h.drain().await; // validate succeeds; charge fails once, retry in 1 s
    h.clock.advance(Duration::from_secs(1));
    // Two workers claim charge and die before recording.
    for attempt in [2, 3] {
        let c = h
            .store
            .claim(claim_req(&kinds, &fps, 1))
            .await
            .unwrap()
            .remove(0);
        assert_eq!((c.step.as_str(), c.attempt), ("charge", attempt));
        h.clock.advance(LEASE);
    }
    let calls_before = h.script.calls().len();
    h.drain().await;
    assert_eq!(h.status(id).await, Status::Compensated);
    let calls = h.script.calls();
    assert_eq!(
        calls[calls_before..]
            .iter()
            .map(|c| format!("{}:{}", c.step, c.direction))
            .collect::<Vec<_>>(),
        ["charge:compensate"],
        "charge is not called a fourth time"
    );
    let history = h.store.history(id).await.unwrap();
    let failed = history
        .iter()
        .find(|e| e.outcome == Outcome::FailedForGood)
        .unwrap();
    assert_eq!(failed.attempt, 4);
    assert!(
        failed
            .error
            .as_deref()
            .unwrap()
            .contains("retry budget spent")
    );
}

/// Cancelling before the pivot compensates the started steps; a step that
/// has not started is not compensated.
pub async fn cancel_before_the_pivot_compensates_what_started<Fa: StoreFactory>(f: &Fa) {
    let h = Harness::new(f).await;
    h.script.on(1, "reserve", F, [Behavior::Retryable]);
    let id = h.start(1).await;
    h.drain().await;
    h.executor()
        .cancel(id, "customer changed their mind")
        .await
        .unwrap();
    let s = h.store.load(id).await.unwrap().unwrap();
    assert_eq!(
        (s.status, s.step.as_str(), s.direction),
        (Status::Compensating, "reserve", C)
    );
    h.drain().await;
    assert_eq!(h.status(id).await, Status::Compensated);
    assert_eq!(
        h.script.trace(1),
        [
            "validate:forward",
            "charge:forward",
            "reserve:forward",
            "reserve:compensate",
            "charge:compensate"
        ]
    );
    let err = h.executor().cancel(id, "again").await.unwrap_err();
    assert!(matches!(err, Error::InvalidStatus { .. }), "{err:?}");
    let err = h.executor().cancel(SagaId::new(), "who").await.unwrap_err();
    assert!(matches!(err, Error::NotFound(_)), "{err:?}");
}

/// An instance whose saga kind is not registered on the worker is left
/// untouched, and reported.
pub async fn unregistered_sagas_are_left_untouched<Fa: StoreFactory>(f: &Fa) {
    let h = Harness::new(f).await;
    let v2 = scripted_saga(&h.script, 2);
    let id = h
        .client()
        .start(&v2, key(1), &TestState::order(1))
        .await
        .unwrap()
        .id;
    let before = h.store.load(id).await.unwrap().unwrap();
    let report = h.drain().await;
    assert_eq!(report.claimed, 0);
    assert_eq!(report.unregistered, vec![(v2.kind().clone(), 1)]);
    assert_eq!(h.store.load(id).await.unwrap().unwrap(), before);
    assert!(h.script.calls().is_empty());
}

/// A stored state that no longer deserializes parks that instance with a
/// reason; the worker keeps serving the others.
pub async fn an_unreadable_state_parks_only_that_instance<Fa: StoreFactory>(f: &Fa) {
    let h = Harness::new(f).await;
    // Version 1 of "scripted" changed its state type without a version
    // bump, keeping its steps (so its fingerprint).
    let changed = incompatible_scripted();
    assert_eq!(changed.shape().fingerprint(), h.saga.shape().fingerprint());
    let good_saga = SagaDefinition::<TestState>::builder("healthy", 1)
        .step(Step::new("validate", noop).no_compensation())
        .build()
        .unwrap();
    let bad = h.start(1).await;
    let good = h
        .client()
        .start(&good_saga, key(2), &TestState::order(2))
        .await
        .unwrap()
        .id;
    let exec = Executor::builder_from_arc(h.store.clone())
        .register(changed)
        .register(good_saga)
        .lease_duration(LEASE)
        .heartbeat_interval(LEASE - Duration::from_secs(1))
        .build()
        .unwrap();
    exec.run_until_idle().await.unwrap();
    let s = h.store.load(bad).await.unwrap().unwrap();
    assert_eq!(s.status, Status::Stuck);
    let reason = s.stuck_reason.unwrap();
    assert!(reason.contains("does not deserialize"), "{reason}");
    // The deserializer's own message follows, as the cause.
    assert!(reason.contains("expected a string"), "{reason}");
    assert_eq!(
        s.state,
        serde_json::to_value(TestState::order(1)).unwrap(),
        "state kept"
    );
    assert_eq!(h.status(good).await, Status::Completed);
    assert!(
        h.outcomes(bad)
            .await
            .contains(&("validate".into(), F, Outcome::Parked))
    );
}

/// Defines one `#[tokio::test]` per conformance case, each on a fresh store
/// from `$factory` (an expression of a type implementing
/// [`StoreFactory`](crate::testing::StoreFactory)).
///
/// ```
/// # mod conformance {
/// saga_core::store_conformance_tests!(|clock| async move {
///     saga_core::InMemorySagaStore::with_clock(clock)
/// });
/// # }
/// # fn main() {}
/// ```
#[macro_export]
macro_rules! store_conformance_tests {
    ($factory:expr) => {
        $crate::store_conformance_tests!(@cases $factory;
            start_creates_a_due_running_instance,
            start_is_idempotent_on_the_start_key,
            a_start_key_spans_versions,
            claim_leases_each_due_instance_once,
            claim_skips_future_unregistered_and_finished_instances,
            an_expired_lease_is_fenced,
            an_expired_lease_refuses_writes_even_unclaimed,
            heartbeats_extend_the_lease,
            release_refunds_the_attempt,
            records_are_atomic_and_outbox_ids_are_unique,
            operator_writes_check_version_and_lease,
            happy_path_completes,
            permanent_failure_before_the_pivot_compensates_in_reverse,
            a_compensation_retries_then_succeeds,
            an_exhausted_compensation_is_stuck_until_resumed,
            a_failing_step_after_the_pivot_is_stuck_never_compensated,
            a_pivot_that_gives_up_in_doubt_is_parked_until_an_operator_decides,
            a_lease_lost_mid_step_is_taken_over_and_the_stale_result_refused,
            the_idempotency_key_is_stable_across_retries_and_workers,
            a_snooze_does_not_spend_an_attempt,
            a_cancel_while_a_step_is_snoozed_compensates_it,
            a_cancel_after_a_resume_compensates_a_step_that_had_started,
            time_spent_snoozed_does_not_count_toward_max_elapsed,
            only_successful_attempts_change_the_state,
            crashed_attempts_spend_the_budget,
            cancel_before_the_pivot_compensates_what_started,
            unregistered_sagas_are_left_untouched,
            an_unreadable_state_parks_only_that_instance,
            a_store_refuses_data_it_cannot_keep_and_writes_nothing,
            register_definition_keeps_the_first_shape_and_refuses_another,
            a_claim_takes_only_instances_of_its_own_shape,
            a_worker_with_swapped_steps_is_refused_and_runs_nothing,
        );
    };
    (@cases $factory:expr; $($case:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                $crate::testing::conformance::$case(&$factory).await;
            }
        )*
    };
}
