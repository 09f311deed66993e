//! Executor behaviour that does not depend on the store: timeouts, panics,
//! heartbeats, shutdown, concurrency, size caps, metrics and tracing.
//! Store-dependent behaviour is in the conformance suite.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use saga_core::store::{ClaimRequest, ClaimedSaga, Lease, NewSaga, Record, SagaStore};
use saga_core::testing::{Behavior, Gate, LEASE, Script, TestState, scripted_saga};
use saga_core::{
    BuildError, Clock, DefinitionProblem, Direction, Error, Executor, HistoryEntry,
    InMemorySagaStore, LeaseToken, Limits, ManualClock, Message, OutboxMessage, Outcome,
    SagaDefinition, SagaId, SagaKind, SagaShape, SagaSnapshot, ShapeFingerprint, StartKey, Started,
    Status, Step, StepContext, StepError, Timestamp,
};
use tokio::sync::{Notify, mpsc, oneshot};

const F: Direction = Direction::Forward;

struct Setup {
    clock: Arc<ManualClock>,
    store: Arc<InMemorySagaStore>,
    script: Arc<Script>,
    saga: SagaDefinition<TestState>,
}

fn setup() -> Setup {
    let clock = Arc::new(ManualClock::new(Timestamp::from_micros(
        1_750_000_000_000_000,
    )));
    let store = Arc::new(InMemorySagaStore::with_clock(clock.clone()));
    let script = Script::new();
    let saga = scripted_saga(&script, 1);
    Setup {
        clock,
        store,
        script,
        saga,
    }
}

impl Setup {
    fn executor(&self) -> Executor<InMemorySagaStore> {
        Executor::builder_from_arc(self.store.clone())
            .register(self.saga.clone())
            .lease_duration(LEASE)
            .heartbeat_interval(LEASE - Duration::from_secs(1))
            .build()
            .unwrap()
    }

    async fn start(&self, order: u32) -> SagaId {
        self.executor()
            .client()
            .start(&self.saga, key(order), &TestState::order(order))
            .await
            .unwrap()
            .id
    }

    async fn history(&self, id: SagaId) -> Vec<HistoryEntry> {
        self.store.history(id).await.unwrap()
    }
}

fn key(order: u32) -> StartKey {
    StartKey::new(format!("order-{order}")).unwrap()
}

/// Runs `exec` in a task until `stop` is sent (or dropped); the task ends
/// when [`Executor::run`] returns.
fn spawn_run<St: SagaStore>(
    exec: &Executor<St>,
) -> (
    oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), Error>>,
) {
    let (stop, stopped) = oneshot::channel::<()>();
    let exec = exec.clone();
    let running = tokio::spawn(async move {
        exec.run(async {
            let _ = stopped.await;
        })
        .await
    });
    (stop, running)
}

#[tokio::test(start_paused = true)]
async fn an_attempt_that_outlives_its_timeout_is_a_retryable_failure() {
    let s = setup();
    s.script.on(1, "charge", F, [Behavior::Hang]);
    let id = s.start(1).await;
    s.executor().run_until_idle().await.unwrap();
    let snap = s.store.load(id).await.unwrap().unwrap();
    assert_eq!(
        (snap.status, snap.step.as_str(), snap.attempt),
        (Status::Running, "charge", 1)
    );
    let last = s.history(id).await.pop().unwrap();
    assert_eq!(last.outcome, Outcome::RetryScheduled);
    let error = last.error.unwrap();
    assert!(
        error.starts_with("timeout: the attempt did not finish within 5s"),
        "{error}"
    );
    s.clock.advance(Duration::from_secs(1));
    s.executor().run_until_idle().await.unwrap();
    assert_eq!(
        s.store.load(id).await.unwrap().unwrap().status,
        Status::Completed
    );
}

#[tokio::test]
async fn a_panicking_step_is_a_retryable_failure_and_the_worker_carries_on() {
    let s = setup();
    s.script.on(1, "reserve", F, [Behavior::Panic]);
    let id = s.start(1).await;
    let other = s.start(2).await;
    s.executor().run_until_idle().await.unwrap();
    let last = s.history(id).await.pop().unwrap();
    assert_eq!(last.outcome, Outcome::RetryScheduled);
    assert!(
        last.error
            .unwrap()
            .contains("the step panicked: scripted panic in reserve")
    );
    assert_eq!(
        s.store.load(other).await.unwrap().unwrap().status,
        Status::Completed
    );
    s.clock.advance(Duration::from_secs(1));
    s.executor().run_until_idle().await.unwrap();
    assert_eq!(
        s.store.load(id).await.unwrap().unwrap().status,
        Status::Completed
    );
}

/// A store that signals each heartbeat and claim it serves, and reports
/// each check for unregistered kinds with the (tokio) time it was made.
struct SignallingStore {
    inner: InMemorySagaStore,
    heartbeats: Notify,
    claims: Notify,
    /// The lease of every instance claimed, in order.
    leases: Mutex<Vec<LeaseToken>>,
    unregistered_checks: mpsc::UnboundedSender<tokio::time::Instant>,
}

impl SignallingStore {
    fn new(clock: Arc<ManualClock>) -> (Arc<Self>, mpsc::UnboundedReceiver<tokio::time::Instant>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let store = SignallingStore {
            inner: InMemorySagaStore::with_clock(clock),
            heartbeats: Notify::new(),
            claims: Notify::new(),
            leases: Mutex::default(),
            unregistered_checks: tx,
        };
        (Arc::new(store), rx)
    }
}

impl SagaStore for SignallingStore {
    fn clock(&self) -> &Arc<dyn Clock> {
        self.inner.clock()
    }
    fn limits(&self) -> saga_core::Limits {
        self.inner.limits()
    }
    async fn start(&self, new: NewSaga) -> Result<Started, Error> {
        self.inner.start(new).await
    }
    async fn claim(&self, request: ClaimRequest<'_>) -> Result<Vec<ClaimedSaga>, Error> {
        let r = self.inner.claim(request).await;
        if let Ok(claimed) = &r {
            let mut leases = self.leases.lock().unwrap();
            leases.extend(claimed.iter().map(|c| c.lease.token));
        }
        self.claims.notify_one();
        r
    }
    async fn heartbeat(&self, lease: &Lease, lease_for: Duration) -> Result<Lease, Error> {
        let r = self.inner.heartbeat(lease, lease_for).await;
        self.heartbeats.notify_one();
        r
    }
    async fn release(&self, lease: &Lease) -> Result<(), Error> {
        self.inner.release(lease).await
    }
    async fn record(&self, lease: &Lease, record: Record) -> Result<(), Error> {
        self.inner.record(lease, record).await
    }
    async fn record_unleased(&self, id: SagaId, v: u64, record: Record) -> Result<(), Error> {
        self.inner.record_unleased(id, v, record).await
    }
    async fn load(&self, id: SagaId) -> Result<Option<SagaSnapshot>, Error> {
        self.inner.load(id).await
    }
    async fn history(&self, id: SagaId) -> Result<Vec<HistoryEntry>, Error> {
        self.inner.history(id).await
    }
    async fn outbox_for(&self, id: SagaId) -> Result<Vec<OutboxMessage>, Error> {
        self.inner.outbox_for(id).await
    }
    async fn due_unregistered(&self, kinds: &[SagaKind]) -> Result<Vec<(SagaKind, u64)>, Error> {
        let r = self.inner.due_unregistered(kinds).await;
        let _ = self.unregistered_checks.send(tokio::time::Instant::now());
        r
    }
    async fn due_unmatched(
        &self,
        kinds: &[SagaKind],
        fingerprints: &[ShapeFingerprint],
    ) -> Result<Vec<(SagaKind, ShapeFingerprint, u64)>, Error> {
        self.inner.due_unmatched(kinds, fingerprints).await
    }
    async fn register_definition(&self, shape: &SagaShape) -> Result<ShapeFingerprint, Error> {
        self.inner.register_definition(shape).await
    }
}

#[tokio::test(start_paused = true)]
async fn heartbeats_keep_a_long_step_leased() {
    let s = setup();
    let (store, _) = SignallingStore::new(s.clock.clone());
    let exec = Executor::builder_from_arc(store.clone())
        .register(s.saga.clone())
        .lease_duration(LEASE)
        .heartbeat_interval(Duration::from_secs(2))
        .build()
        .unwrap();
    let gate = Gate::new();
    s.script
        .on(1, "validate", F, [Behavior::Wait(gate.clone())]);
    let id = exec
        .client()
        .start(&s.saga, key(1), &TestState::order(1))
        .await
        .unwrap()
        .id;
    let running = tokio::spawn({
        let exec = exec.clone();
        async move { exec.run_until_idle().await }
    });
    gate.entered().await;
    s.clock.advance(LEASE - Duration::from_secs(5));
    // Two seconds of the worker's timer pass (less than the step's
    // timeout): it heartbeats.
    tokio::time::advance(Duration::from_secs(2)).await;
    store.heartbeats.notified().await;
    s.clock.advance(Duration::from_secs(10)); // past the original expiry
    let kinds = [s.saga.kind().clone()];
    let fps = [s.saga.shape().fingerprint()];
    let other = store
        .claim(ClaimRequest {
            worker: saga_core::WorkerId::new(),
            kinds: &kinds,
            fingerprints: &fps,
            limit: 10,
            lease_for: LEASE,
        })
        .await
        .unwrap();
    assert!(other.is_empty(), "the heartbeat kept the lease");
    gate.open();
    let report = running.await.unwrap().unwrap();
    assert_eq!(report.leases_lost, 0);
    assert_eq!(
        store.load(id).await.unwrap().unwrap().status,
        Status::Completed
    );
}

#[tokio::test]
async fn run_stops_claiming_on_shutdown_and_lets_the_step_in_flight_finish() {
    let s = setup();
    let gate = Gate::new();
    s.script.on(1, "charge", F, [Behavior::Wait(gate.clone())]);
    let exec = Executor::builder_from_arc(s.store.clone())
        .register(s.saga.clone())
        .poll_interval(Duration::from_secs(3600))
        .build()
        .unwrap();
    let (stop, running) = spawn_run(&exec);
    // The long poll interval means only the start's wake-up gets it going.
    let id = exec
        .client()
        .start(&s.saga, key(1), &TestState::order(1))
        .await
        .unwrap()
        .id;
    gate.entered().await;
    stop.send(()).unwrap();
    gate.open();
    tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .expect("run returns after shutdown")
        .unwrap()
        .expect("run succeeds");
    let snap = s.store.load(id).await.unwrap().unwrap();
    assert_eq!(
        (snap.status, snap.step.as_str(), snap.attempt),
        (Status::Running, "reserve", 0),
        "charge was recorded; reserve was not started after shutdown"
    );
    assert_eq!(snap.lease, None);
    assert_eq!(s.script.trace(1), ["validate:forward", "charge:forward"]);
}

#[tokio::test(start_paused = true)]
async fn steps_still_running_after_the_grace_period_are_abandoned_and_resumed_elsewhere() {
    let s = setup();
    let never_opened = Gate::new();
    s.script
        .on(1, "validate", F, [Behavior::Wait(never_opened.clone())]);
    let exec = Executor::builder_from_arc(s.store.clone())
        .register(s.saga.clone())
        .lease_duration(LEASE)
        .heartbeat_interval(Duration::from_secs(20))
        .shutdown_grace(Duration::from_secs(2))
        .build()
        .unwrap();
    let id = exec
        .client()
        .start(&s.saga, key(1), &TestState::order(1))
        .await
        .unwrap()
        .id;
    let (stop, running) = spawn_run(&exec);
    never_opened.entered().await;
    stop.send(()).unwrap();
    running.await.unwrap().expect("run succeeds");
    // Abandoned: still leased, nothing recorded.
    assert!(s.store.load(id).await.unwrap().unwrap().lease.is_some());
    assert!(s.executor().run_until_idle().await.unwrap().claimed == 0);
    s.clock.advance(LEASE);
    s.executor().run_until_idle().await.unwrap();
    assert_eq!(
        s.store.load(id).await.unwrap().unwrap().status,
        Status::Completed
    );
}

#[tokio::test]
async fn no_more_steps_run_at_once_than_the_concurrency_allows() {
    let s = setup();
    let gates = [Gate::new(), Gate::new()];
    s.script
        .on(1, "validate", F, [Behavior::Wait(gates[0].clone())]);
    s.script
        .on(2, "validate", F, [Behavior::Wait(gates[1].clone())]);
    let ids = [s.start(1).await, s.start(2).await, s.start(3).await];
    let exec = Executor::builder_from_arc(s.store.clone())
        .register(s.saga.clone())
        .concurrency(2)
        .build()
        .unwrap();
    let running = tokio::spawn({
        let exec = exec.clone();
        async move { exec.run_until_idle().await }
    });
    gates[0].entered().await;
    gates[1].entered().await;
    let third = s.store.load(ids[2]).await.unwrap().unwrap();
    assert_eq!(
        (third.lease, third.attempt),
        (None, 0),
        "the third waits for a slot"
    );
    gates[0].open();
    gates[1].open();
    running.await.unwrap().unwrap();
    for id in ids {
        assert_eq!(
            s.store.load(id).await.unwrap().unwrap().status,
            Status::Completed
        );
    }
}

#[tokio::test]
async fn an_oversized_input_is_refused_before_anything_is_written() {
    let mut s = setup();
    s.store =
        Arc::new(InMemorySagaStore::with_clock(s.clock.clone()).with_limits(Limits::new(64, 64)));
    let client = s.executor().client();
    let mut big = TestState::order(1);
    big.done = vec!["x".repeat(100)];
    let err = client.start(&s.saga, key(1), &big).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::TooLarge {
                what: "saga input",
                limit: 64,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(s.store.snapshots().is_empty());
    // The same key is still free.
    client
        .start(&s.saga, key(1), &TestState::order(1))
        .await
        .unwrap();
}

async fn note_lease(ctx: &mut StepContext, s: &mut Vec<String>) -> Result<(), StepError> {
    s.push(ctx.lease_token().expect("run under a lease").to_string());
    Ok(())
}

#[tokio::test]
async fn each_attempt_sees_the_token_of_the_lease_it_runs_under() {
    let clock = Arc::new(ManualClock::starting_now());
    let (store, _checks) = SignallingStore::new(clock);
    let saga = SagaDefinition::<Vec<String>>::builder("leased", 1)
        .step(Step::new("first", note_lease).no_compensation())
        .pivot(Step::new("second", note_lease))
        .build()
        .unwrap();
    let exec = Executor::builder_from_arc(store.clone())
        .register(saga.clone())
        .build()
        .unwrap();
    let id = exec
        .client()
        .start(&saga, key(1), &Vec::new())
        .await
        .unwrap()
        .id;
    exec.run_until_idle().await.unwrap();
    let snap = store.load(id).await.unwrap().unwrap();
    assert_eq!(snap.status, Status::Completed);
    // One claim per step, each with its own token, and each step saw its
    // own claim's.
    let claimed: Vec<String> = store
        .leases
        .lock()
        .unwrap()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(snap.state, serde_json::json!(claimed));
    assert_eq!(claimed.len(), 2);
    assert_ne!(claimed[0], claimed[1]);
}

async fn bloat(_: &mut StepContext, s: &mut Vec<String>) -> Result<(), StepError> {
    s.push("y".repeat(1000));
    Ok(())
}
async fn ok(_: &mut StepContext, _: &mut Vec<String>) -> Result<(), StepError> {
    Ok(())
}
async fn emit_big(ctx: &mut StepContext, _: &mut Vec<String>) -> Result<(), StepError> {
    ctx.emit(Message::bytes("t", vec![0; 1000])?)?;
    Ok(())
}

#[tokio::test]
async fn a_state_or_payload_grown_past_the_cap_fails_the_step_for_good() {
    let clock = Arc::new(ManualClock::starting_now());
    let limits = Limits::new(512, 512);
    let store = Arc::new(InMemorySagaStore::with_clock(clock).with_limits(limits));
    let undo_calls = Arc::new(Mutex::new(0));
    let counted = undo_calls.clone();
    let undo = saga_core::action_fn(move |_, _: &mut Vec<String>| {
        *counted.lock().unwrap() += 1;
        Box::pin(async { Ok(()) })
    });
    let grows = SagaDefinition::<Vec<String>>::builder("grows", 1)
        .step(Step::new("bloat", bloat).compensate_with(undo))
        .build()
        .unwrap();
    let shouts = SagaDefinition::<Vec<String>>::builder("shouts", 1)
        .pivot(Step::new("confirm", ok))
        .step(Step::new("emit", emit_big))
        .build()
        .unwrap();
    let exec = Executor::builder_from_arc(store.clone())
        .register(grows.clone())
        .register(shouts.clone())
        .build()
        .unwrap();
    let a = exec
        .client()
        .start(&grows, key(1), &Vec::new())
        .await
        .unwrap()
        .id;
    let b = exec
        .client()
        .start(&shouts, key(1), &Vec::new())
        .await
        .unwrap()
        .id;
    exec.run_until_idle().await.unwrap();
    // Before the pivot: the step counts as started, so it is compensated.
    let snap = store.load(a).await.unwrap().unwrap();
    assert_eq!(snap.status, Status::Compensated);
    assert_eq!(
        snap.state,
        serde_json::json!([]),
        "the oversized state was not written"
    );
    assert_eq!(*undo_calls.lock().unwrap(), 1);
    let failed = store.history(a).await.unwrap();
    assert!(
        failed[1]
            .error
            .as_deref()
            .unwrap()
            .contains("saga state is")
    );
    // Past the pivot: parked.
    let snap = store.load(b).await.unwrap().unwrap();
    assert_eq!(snap.status, Status::Stuck);
    assert!(
        snap.stuck_reason
            .unwrap()
            .contains("message payload is 1000 bytes")
    );
    assert!(store.outbox().is_empty());
}

#[test]
fn definitions_refuse_bad_names_no_steps_and_duplicates() {
    let problem = |built: Result<SagaDefinition<Vec<String>>, BuildError>| match built {
        Err(BuildError::InvalidDefinition { saga, problem }) => {
            assert_eq!(saga.as_str(), "s");
            problem
        }
        other => panic!("expected an invalid definition, got {other:?}"),
    };
    let step = |name: &str| saga_core::StepName::new(name).unwrap();
    let dup = SagaDefinition::<Vec<String>>::builder("s", 1)
        .step(Step::new("a", ok).no_compensation())
        .step(Step::new("a", ok).no_compensation())
        .build();
    assert_eq!(problem(dup), DefinitionProblem::DuplicateStep(step("a")));
    let alias = SagaDefinition::<Vec<String>>::builder("s", 1)
        .step(Step::new("a", ok).no_compensation())
        .step(Step::new("b", ok).alias("a").no_compensation())
        .build();
    assert_eq!(problem(alias), DefinitionProblem::DuplicateStep(step("a")));
    let empty = SagaDefinition::<Vec<String>>::builder("s", 1).build();
    assert_eq!(problem(empty), DefinitionProblem::NoSteps);
    let version_0 = SagaDefinition::<Vec<String>>::builder("s", 0)
        .step(Step::new("a", ok).no_compensation())
        .build();
    assert_eq!(problem(version_0), DefinitionProblem::ZeroVersion);
    let bad = SagaDefinition::<Vec<String>>::builder("s", 1)
        .step(Step::new("bad name", ok).no_compensation())
        .build();
    match problem(bad) {
        DefinitionProblem::InvalidName(e) => assert_eq!(e.what(), "step name"),
        other => panic!("{other:?}"),
    }
    let bad = SagaDefinition::<Vec<String>>::builder("", 1)
        .step(Step::new("a", ok).no_compensation())
        .build()
        .unwrap_err();
    assert!(matches!(bad, BuildError::InvalidName(_)), "{bad:?}");
    let zero = SagaDefinition::<Vec<String>>::builder("s", 1)
        .step(Step::new("a", ok).timeout(Duration::ZERO).no_compensation())
        .build();
    assert_eq!(problem(zero), DefinitionProblem::ZeroTimeout(step("a")));
}

async fn later(_: &mut StepContext, _: &mut Vec<String>) -> Result<(), StepError> {
    Err(StepError::snooze(Duration::from_secs(3600)))
}

/// A rename under the same version, even with the old name as an alias,
/// is a new shape: the instance row records the step's current name, which
/// a worker still on the old definition could not resolve. The renamed
/// worker is refused and touches nothing. (The alias still resolves rows
/// recorded before fingerprints existed; see saga-postgres's
/// `tests/definitions.rs`.)
#[tokio::test]
async fn a_step_renamed_under_the_same_version_is_refused_and_touches_nothing() {
    let clock = Arc::new(ManualClock::starting_now());
    let store = Arc::new(InMemorySagaStore::with_clock(clock.clone()));
    let old = SagaDefinition::<Vec<String>>::builder("renames", 1)
        .step(Step::new("first", ok).no_compensation())
        .step(Step::new("old_name", later).no_compensation())
        .build()
        .unwrap();
    let id = saga_core::SagaClient::from_arc(store.clone())
        .start(&old, key(1), &Vec::new())
        .await
        .unwrap()
        .id;
    Executor::builder_from_arc(store.clone())
        .register(old)
        .build()
        .unwrap()
        .run_until_idle()
        .await
        .unwrap();
    let before = store.load(id).await.unwrap().unwrap();
    assert_eq!(before.step.as_str(), "old_name");

    let renamed = SagaDefinition::<Vec<String>>::builder("renames", 1)
        .step(Step::new("first", ok).no_compensation())
        .step(
            Step::new("new_name", ok)
                .alias("old_name")
                .no_compensation(),
        )
        .build()
        .unwrap();
    clock.advance(Duration::from_secs(3600));
    let err = Executor::builder_from_arc(store.clone())
        .register(renamed)
        .build()
        .unwrap()
        .run_until_idle()
        .await
        .unwrap_err();
    let Error::DefinitionChanged {
        first_difference, ..
    } = &err
    else {
        panic!("{err:?}");
    };
    assert_eq!(
        **first_difference,
        saga_core::ShapeDifference::Names {
            index: 1,
            stored: vec![saga_core::StepName::new("old_name").unwrap()],
            registered: vec![
                saga_core::StepName::new("new_name").unwrap(),
                saga_core::StepName::new("old_name").unwrap()
            ],
        }
    );
    assert_eq!(store.load(id).await.unwrap().unwrap(), before);
}

#[test]
fn the_executor_refuses_bad_configuration() {
    let s = setup();
    let dup = Executor::builder_from_arc(s.store.clone())
        .register(s.saga.clone())
        .register(s.saga.clone())
        .build()
        .unwrap_err();
    assert!(
        matches!(dup, BuildError::DuplicateRegistration(_)),
        "{dup:?}"
    );
    let none = Executor::builder_from_arc(s.store.clone())
        .build()
        .unwrap_err();
    assert_eq!(none, BuildError::NoSagasRegistered);
    let hb = Executor::builder_from_arc(s.store.clone())
        .register(s.saga.clone())
        .lease_duration(Duration::from_secs(10))
        .heartbeat_interval(Duration::from_secs(10))
        .build()
        .unwrap_err();
    assert!(matches!(hb, BuildError::InvalidConfig(_)), "{hb:?}");
    let zero = Executor::builder_from_arc(s.store.clone())
        .register(s.saga.clone())
        .concurrency(0)
        .build()
        .unwrap_err();
    assert!(matches!(zero, BuildError::InvalidConfig(_)), "{zero:?}");
    let zero = Executor::builder_from_arc(s.store.clone())
        .register(s.saga.clone())
        .unregistered_check_interval(Duration::ZERO)
        .build()
        .unwrap_err();
    assert!(matches!(zero, BuildError::InvalidConfig(_)), "{zero:?}");
}

#[test]
fn metrics_count_starts_attempts_outcomes_and_durations_with_bounded_labels() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    metrics::with_local_recorder(&recorder, || {
        rt.block_on(async {
            let s = setup();
            s.script.on(1, "charge", F, [Behavior::Retryable]);
            s.script.on(2, "reserve", F, [Behavior::Permanent]);
            s.start(1).await;
            s.start(2).await;
            s.executor().run_until_idle().await.unwrap();
            s.clock.advance(Duration::from_secs(1));
            s.executor().run_until_idle().await.unwrap();
        });
    });
    let snapshot = snapshotter.snapshot().into_vec();
    let counter = |name: &str, labels: &[(&str, &str)]| -> u64 {
        snapshot
            .iter()
            .filter(|(key, _, _, _)| {
                key.key().name() == name
                    && labels
                        .iter()
                        .all(|(k, v)| key.key().labels().any(|l| l.key() == *k && l.value() == *v))
            })
            .map(|(_, _, _, value)| match value {
                DebugValue::Counter(n) => *n,
                other => panic!("{name} is not a counter: {other:?}"),
            })
            .sum()
    };
    use saga_core::metrics as m;
    assert_eq!(counter(m::SAGAS_STARTED, &[("saga", "scripted")]), 2);
    assert_eq!(counter(m::SAGAS_COMPLETED, &[("saga", "scripted")]), 1);
    assert_eq!(counter(m::SAGAS_COMPENSATED, &[("saga", "scripted")]), 1);
    assert_eq!(counter(m::SAGAS_STUCK, &[]), 0);
    assert_eq!(
        counter(
            m::STEP_ATTEMPTS,
            &[
                ("step", "charge"),
                ("direction", "forward"),
                ("outcome", "retryable")
            ]
        ),
        1
    );
    assert_eq!(
        counter(
            m::STEP_ATTEMPTS,
            &[
                ("step", "charge"),
                ("direction", "forward"),
                ("outcome", "succeeded")
            ]
        ),
        2
    );
    assert_eq!(
        counter(
            m::STEP_ATTEMPTS,
            &[("step", "reserve"), ("outcome", "permanent")]
        ),
        1
    );
    assert_eq!(
        counter(
            m::STEP_ATTEMPTS,
            &[
                ("step", "charge"),
                ("direction", "compensate"),
                ("outcome", "succeeded")
            ]
        ),
        1
    );
    let durations = snapshot
        .iter()
        .filter(|(key, _, _, _)| key.key().name() == m::STEP_DURATION)
        .map(|(_, _, _, v)| match v {
            DebugValue::Histogram(h) => h.len(),
            other => panic!("not a histogram: {other:?}"),
        })
        .sum::<usize>();
    // Order 1: 5 steps and a retry. Order 2: 3 forward attempts, then the
    // compensations of reserve (the failed step) and charge.
    assert_eq!(durations, 11);
    // No label carries an instance id.
    for (key, _, _, _) in &snapshot {
        for label in key.key().labels() {
            assert!(uuid::Uuid::parse_str(label.value()).is_err(), "{key:?}");
        }
    }
}

#[test]
fn metrics_count_stuck_sagas_timeouts_panics_spent_budgets_and_lost_leases() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    // Paused time: the hanging attempt times out without waiting.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    metrics::with_local_recorder(&recorder, || {
        rt.block_on(async {
            // Stuck past the pivot; a timeout; a panic.
            let s = setup();
            s.script.on(1, "notify", F, [Behavior::Permanent]);
            s.script.on(2, "validate", F, [Behavior::Hang]);
            s.script.on(3, "reserve", F, [Behavior::Panic]);
            let stuck = s.start(1).await;
            s.start(2).await;
            s.start(3).await;
            s.executor().run_until_idle().await.unwrap();
            let snap = s.store.load(stuck).await.unwrap().unwrap();
            assert_eq!(snap.status, Status::Stuck);

            // A budget spent by workers that claimed and vanished.
            let s = setup();
            let kinds = [s.saga.kind().clone()];
            let fps = [s.saga.shape().fingerprint()];
            s.start(1).await;
            for _ in 0..3 {
                let claimed = s
                    .store
                    .claim(ClaimRequest {
                        worker: saga_core::WorkerId::new(),
                        kinds: &kinds,
                        fingerprints: &fps,
                        limit: 1,
                        lease_for: LEASE,
                    })
                    .await
                    .unwrap();
                assert_eq!(claimed.len(), 1);
                s.clock.advance(LEASE);
            }
            s.executor().run_until_idle().await.unwrap();

            // A lease lost mid-step: the stale result is refused.
            let mut s = setup();
            s.saga = saga_core::testing::scripted_saga_with(
                &s.script,
                1,
                &saga_core::testing::test_policy(),
                Duration::from_secs(3600),
            );
            let gate = Gate::new();
            s.script.on(1, "charge", F, [Behavior::Wait(gate.clone())]);
            s.start(1).await;
            let stale = s.executor();
            let stale_run = tokio::spawn(async move { stale.run_until_idle().await });
            gate.entered().await;
            s.clock.advance(LEASE + Duration::from_secs(1));
            s.executor().run_until_idle().await.unwrap();
            gate.open();
            assert_eq!(stale_run.await.unwrap().unwrap().leases_lost, 1);
        });
    });
    let snapshot = snapshotter.snapshot().into_vec();
    let counter = |name: &str, labels: &[(&str, &str)]| -> u64 {
        snapshot
            .iter()
            .filter(|(key, _, _, _)| {
                key.key().name() == name
                    && labels
                        .iter()
                        .all(|(k, v)| key.key().labels().any(|l| l.key() == *k && l.value() == *v))
            })
            .map(|(_, _, _, value)| match value {
                DebugValue::Counter(n) => *n,
                other => panic!("{name} is not a counter: {other:?}"),
            })
            .sum()
    };
    use saga_core::metrics as m;
    assert_eq!(counter(m::SAGAS_STUCK, &[("saga", "scripted")]), 1);
    let attempts = |step: &str, outcome: &str| {
        counter(
            m::STEP_ATTEMPTS,
            &[
                ("saga", "scripted"),
                ("step", step),
                ("direction", "forward"),
                ("outcome", outcome),
            ],
        )
    };
    assert_eq!(attempts("validate", "timeout"), 1);
    assert_eq!(attempts("reserve", "panicked"), 1);
    assert_eq!(attempts("validate", "exhausted"), 1);
    assert_eq!(counter(m::LEASES_LOST, &[("saga", "scripted")]), 1);
}

#[test]
fn each_attempt_runs_in_a_span_naming_saga_step_direction_and_attempt() {
    use tracing_subscriber::layer::{Context, SubscriberExt};

    #[derive(Default, Clone)]
    struct Spans(Arc<Mutex<Vec<String>>>);
    struct Fields<'a>(&'a mut String);
    impl tracing::field::Visit for Fields<'_> {
        fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
            use std::fmt::Write;
            let _ = write!(self.0, "{}={:?} ", field.name(), value);
        }
    }
    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Spans {
        fn on_new_span(
            &self,
            attrs: &tracing::span::Attributes<'_>,
            _: &tracing::span::Id,
            _: Context<'_, S>,
        ) {
            let mut line = format!("{} ", attrs.metadata().name());
            attrs.record(&mut Fields(&mut line));
            self.0.lock().unwrap().push(line);
        }
    }

    let spans = Spans::default();
    let subscriber = tracing_subscriber::registry().with(spans.clone());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let id = tracing::subscriber::with_default(subscriber, || {
        rt.block_on(async {
            let s = setup();
            s.script.on(1, "validate", F, [Behavior::Retryable]);
            let id = s.start(1).await;
            s.executor().run_until_idle().await.unwrap();
            s.clock.advance(Duration::from_secs(1));
            s.executor().run_until_idle().await.unwrap();
            id
        })
    });
    let spans = spans.0.lock().unwrap().clone();
    let steps: Vec<_> = spans
        .iter()
        .filter(|l| l.starts_with("saga_step "))
        .collect();
    assert_eq!(steps.len(), 6, "{spans:#?}");
    let first = steps[0];
    assert!(first.contains(&format!("saga_id={id}")), "{first}");
    assert!(first.contains("saga=scripted"), "{first}");
    assert!(first.contains("step=validate"), "{first}");
    assert!(first.contains("direction=forward"), "{first}");
    assert!(first.contains("attempt=1"), "{first}");
    assert!(steps[1].contains("step=validate") && steps[1].contains("attempt=2"));
}

#[tokio::test]
async fn starting_twice_with_the_same_key_yields_one_instance_even_concurrently() {
    let s = setup();
    let client = s.executor().client();
    let starts = (0..8).map(|_| {
        let client = client.clone();
        let saga = s.saga.clone();
        tokio::spawn(async move { client.start(&saga, key(1), &TestState::order(1)).await })
    });
    let mut ids = Vec::new();
    let mut created = 0;
    for start in starts {
        let started = start.await.unwrap().unwrap();
        ids.push(started.id);
        created += usize::from(started.created);
    }
    assert_eq!(created, 1);
    ids.dedup();
    assert_eq!(ids.len(), 1);
    assert_eq!(s.store.snapshots().len(), 1);
}

/// Signals when the step's future is dropped (the step was stopped).
struct Dropped(Option<oneshot::Sender<()>>);

impl Drop for Dropped {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

fn hanging_saga(
    entered: Arc<Notify>,
    dropped: Arc<Mutex<Option<oneshot::Sender<()>>>>,
) -> SagaDefinition<Vec<String>> {
    let hang = saga_core::action_fn(move |_, _: &mut Vec<String>| {
        let entered = entered.clone();
        let guard = Dropped(dropped.lock().unwrap().take());
        Box::pin(async move {
            let _guard = guard;
            entered.notify_one();
            std::future::pending::<()>().await;
            Ok(())
        })
    });
    SagaDefinition::<Vec<String>>::builder("hangs", 1)
        .step(
            Step::new("hang", hang)
                .timeout(Duration::from_secs(3600))
                .no_compensation(),
        )
        .build()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_step_whose_lease_is_lost_is_stopped_not_left_running() {
    let clock = Arc::new(ManualClock::new(Timestamp::from_micros(
        1_750_000_000_000_000,
    )));
    let store = Arc::new(InMemorySagaStore::with_clock(clock.clone()));
    let entered = Arc::new(Notify::new());
    let (tx, stopped) = oneshot::channel();
    let saga = hanging_saga(entered.clone(), Arc::new(Mutex::new(Some(tx))));
    let exec = Executor::builder_from_arc(store.clone())
        .register(saga.clone())
        .lease_duration(LEASE)
        .heartbeat_interval(Duration::from_secs(10))
        .build()
        .unwrap();
    exec.client()
        .start(&saga, key(1), &Vec::new())
        .await
        .unwrap();
    let running = tokio::spawn({
        let exec = exec.clone();
        async move { exec.run_until_idle().await }
    });
    entered.notified().await;
    // The lease lapses (the worker was paused, say); the next heartbeat
    // finds it lost.
    clock.advance(LEASE + Duration::from_secs(1));
    let report = running.await.unwrap().unwrap();
    assert_eq!(report.leases_lost, 1);
    tokio::time::timeout(Duration::from_secs(5), stopped)
        .await
        .expect("the step was stopped")
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_step_abandoned_at_shutdown_is_stopped() {
    let clock = Arc::new(ManualClock::new(Timestamp::from_micros(
        1_750_000_000_000_000,
    )));
    let store = Arc::new(InMemorySagaStore::with_clock(clock));
    let entered = Arc::new(Notify::new());
    let (tx, stopped) = oneshot::channel();
    let saga = hanging_saga(entered.clone(), Arc::new(Mutex::new(Some(tx))));
    let exec = Executor::builder_from_arc(store)
        .register(saga.clone())
        .shutdown_grace(Duration::from_secs(1))
        .build()
        .unwrap();
    exec.client()
        .start(&saga, key(1), &Vec::new())
        .await
        .unwrap();
    let (stop, running) = spawn_run(&exec);
    entered.notified().await;
    stop.send(()).unwrap();
    running.await.unwrap().expect("run succeeds");
    tokio::time::timeout(Duration::from_secs(5), stopped)
        .await
        .expect("the abandoned step was stopped")
        .unwrap();
}

#[tokio::test]
async fn run_claims_nothing_once_shutdown_has_been_asked_for() {
    let s = setup();
    let exec = s.executor();
    // Due work, and a pending wake-up: the start notified the executor.
    let id = exec
        .client()
        .start(&s.saga, key(1), &TestState::order(1))
        .await
        .unwrap()
        .id;
    tokio::time::timeout(Duration::from_secs(30), exec.run(std::future::ready(())))
        .await
        .expect("run returns at once")
        .expect("run succeeds");
    assert_eq!(exec.stats().claimed, 0);
    let snap = s.store.load(id).await.unwrap().unwrap();
    assert_eq!((snap.attempt, snap.lease), (0, None));
    assert!(s.script.calls().is_empty());
}

#[tokio::test]
async fn a_shutdown_that_arrives_with_a_wake_up_claims_nothing() {
    let s = setup();
    let (store, _checks) = SignallingStore::new(s.clock.clone());
    let exec = Executor::builder_from_arc(store.clone())
        .register(s.saga.clone())
        .poll_interval(Duration::from_secs(3600))
        .build()
        .unwrap();
    let (stop, running) = spawn_run(&exec);
    // The executor has looked for work, found none, and waits.
    store.claims.notified().await;
    // A start wakes it just as shutdown is asked for.
    let id = exec
        .client()
        .start(&s.saga, key(1), &TestState::order(1))
        .await
        .unwrap()
        .id;
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .expect("run returns")
        .unwrap()
        .expect("run succeeds");
    assert_eq!(exec.stats().claimed, 0);
    assert_eq!(store.load(id).await.unwrap().unwrap().attempt, 0);
    assert!(s.script.calls().is_empty());
}

/// What the steps of `slot_saga` report.
#[derive(Default)]
struct Slots {
    in_flight: std::sync::atomic::AtomicUsize,
    most: std::sync::atomic::AtomicUsize,
    releases: Mutex<std::collections::HashMap<u32, oneshot::Receiver<()>>>,
}

/// A one-step saga over an order number whose step says when it starts and
/// waits until the test releases that order.
fn slot_saga(slots: Arc<Slots>, entered: mpsc::UnboundedSender<u32>) -> SagaDefinition<u32> {
    use std::sync::atomic::Ordering::SeqCst;
    let step = saga_core::action_fn(move |_, order: &mut u32| {
        let order = *order;
        let slots = slots.clone();
        let entered = entered.clone();
        Box::pin(async move {
            let now = slots.in_flight.fetch_add(1, SeqCst) + 1;
            slots.most.fetch_max(now, SeqCst);
            let release = slots.releases.lock().unwrap().remove(&order);
            entered.send(order).unwrap();
            if let Some(release) = release {
                let _ = release.await;
            }
            slots.in_flight.fetch_sub(1, SeqCst);
            Ok(())
        })
    });
    SagaDefinition::<u32>::builder("slots", 1)
        .step(
            Step::new("hold", step)
                .timeout(Duration::from_secs(3600))
                .no_compensation(),
        )
        .build()
        .unwrap()
}

#[tokio::test]
async fn run_keeps_at_most_concurrency_steps_in_flight_and_refills_freed_slots() {
    use std::sync::atomic::Ordering::SeqCst;
    let clock = Arc::new(ManualClock::starting_now());
    let store = Arc::new(InMemorySagaStore::with_clock(clock));
    let slots = Arc::new(Slots::default());
    let (entered_tx, mut entered) = mpsc::unbounded_channel();
    let saga = slot_saga(slots.clone(), entered_tx);
    let mut release = std::collections::HashMap::new();
    for order in 1..=5u32 {
        let (tx, rx) = oneshot::channel();
        slots.releases.lock().unwrap().insert(order, rx);
        release.insert(order, tx);
    }
    let exec = Executor::builder_from_arc(store.clone())
        .register(saga.clone())
        .concurrency(2)
        // Only finished steps (and starts) wake the loop.
        .poll_interval(Duration::from_secs(3600))
        .build()
        .unwrap();
    let mut ids = Vec::new();
    for order in 1..=5u32 {
        let started = exec.client().start(&saga, key(order), &order).await;
        ids.push(started.unwrap().id);
    }
    let (stop, running) = spawn_run(&exec);
    let next_entered = async |entered: &mut mpsc::UnboundedReceiver<u32>| {
        tokio::time::timeout(Duration::from_secs(30), entered.recv())
            .await
            .expect("a step starts")
            .unwrap()
    };
    let leased = async || {
        let mut n = 0;
        for id in &ids {
            n += usize::from(store.load(*id).await.unwrap().unwrap().lease.is_some());
        }
        n
    };
    let mut running_orders = vec![
        next_entered(&mut entered).await,
        next_entered(&mut entered).await,
    ];
    assert_eq!(leased().await, 2, "two slots, two claims");
    // Each step let go frees a slot, which the loop fills with the next
    // due instance: always two in flight until the work runs out.
    for _ in 0..3 {
        let done = running_orders.remove(0);
        release.remove(&done).unwrap().send(()).unwrap();
        running_orders.push(next_entered(&mut entered).await);
        assert_eq!(slots.in_flight.load(SeqCst), 2);
        assert_eq!(leased().await, 2);
    }
    for order in running_orders {
        release.remove(&order).unwrap().send(()).unwrap();
    }
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .expect("run returns")
        .unwrap()
        .expect("run succeeds");
    for id in &ids {
        assert_eq!(
            store.load(*id).await.unwrap().unwrap().status,
            Status::Completed
        );
    }
    assert_eq!(slots.most.load(SeqCst), 2, "never more than two at once");
    assert_eq!(exec.stats().claimed, 5);
}

#[tokio::test]
async fn operator_refusals_keep_their_cause_and_an_unknown_step_is_named() {
    let s = setup();
    s.script.on(1, "notify", F, [Behavior::Permanent]);
    let id = s.start(1).await;
    let exec = s.executor();
    exec.run_until_idle().await.unwrap();
    // Past the pivot: refused, and the status machine's reason kept.
    let err = exec.cancel(id, "too late").await.unwrap_err();
    match &err {
        Error::InvalidStatus {
            id: refused,
            action: "cancel",
            status: Status::Stuck,
            source,
        } => {
            assert_eq!(*refused, id);
            assert_eq!(
                source.why,
                "only a saga stuck at or before its pivot can be cancelled"
            );
        }
        other => panic!("{other:?}"),
    }
    let cause = std::error::Error::source(&err).expect("a cause");
    assert!(
        cause
            .downcast_ref::<saga_core::machine::InvalidTransition>()
            .is_some()
    );

    // A step removed under the same version: the changed executor is
    // refused before it acts on the instance, operator actions included
    // (a cancel planned on the wrong steps would compensate the wrong
    // ones).
    let clock = Arc::new(ManualClock::starting_now());
    let store = Arc::new(InMemorySagaStore::with_clock(clock.clone()));
    let before = SagaDefinition::<Vec<String>>::builder("changes", 1)
        .step(Step::new("first", ok).no_compensation())
        .step(Step::new("gone", later).no_compensation())
        .build()
        .unwrap();
    let after = SagaDefinition::<Vec<String>>::builder("changes", 1)
        .step(Step::new("first", ok).no_compensation())
        .step(Step::new("other", ok).no_compensation())
        .build()
        .unwrap();
    let id = saga_core::SagaClient::from_arc(store.clone())
        .start(&before, key(1), &Vec::new())
        .await
        .unwrap()
        .id;
    Executor::builder_from_arc(store.clone())
        .register(before)
        .build()
        .unwrap()
        .run_until_idle()
        .await
        .unwrap(); // snoozes at `gone`
    let snap = store.load(id).await.unwrap().unwrap();
    let exec = Executor::builder_from_arc(store.clone())
        .register(after.clone())
        .build()
        .unwrap();
    let is_drift =
        |err: &Error| matches!(err, Error::DefinitionChanged { kind, .. } if kind == after.kind());
    let err = exec.cancel(id, "x").await.unwrap_err();
    assert!(is_drift(&err), "{err:?}");
    clock.advance(Duration::from_secs(3600));
    let err = exec.run_until_idle().await.unwrap_err();
    assert!(is_drift(&err), "{err:?}");
    let err = exec.resume(id).await.unwrap_err();
    assert!(is_drift(&err), "{err:?}");
    assert_eq!(store.load(id).await.unwrap().unwrap(), snap, "untouched");
}

/// Records every value a gauge is set to, in order, as `name{labels}`.
#[derive(Default, Clone)]
struct GaugeLog(Arc<Mutex<Vec<(String, f64)>>>);

struct LoggedGauge(String, GaugeLog);

impl metrics::GaugeFn for LoggedGauge {
    fn increment(&self, _: f64) {}
    fn decrement(&self, _: f64) {}
    fn set(&self, value: f64) {
        self.1.0.lock().unwrap().push((self.0.clone(), value));
    }
}

impl metrics::Recorder for GaugeLog {
    fn describe_counter(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_gauge(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_histogram(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn register_counter(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        metrics::Counter::noop()
    }
    fn register_gauge(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        let labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        let name = format!("{}{{{}}}", key.name(), labels.join(","));
        metrics::Gauge::from_arc(Arc::new(LoggedGauge(name, self.clone())))
    }
    fn register_histogram(
        &self,
        _: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        metrics::Histogram::noop()
    }
}

#[test]
fn a_busy_executor_checks_for_unregistered_kinds_on_its_timer_and_zeroes_those_gone() {
    let log = GaugeLog::default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    let interval = Duration::from_secs(60);
    let checks = metrics::with_local_recorder(&log, || {
        rt.block_on(async {
            let clock = Arc::new(ManualClock::new(Timestamp::from_micros(
                1_750_000_000_000_000,
            )));
            let (store, mut checked) = SignallingStore::new(clock.clone());
            let entered = Arc::new(Notify::new());
            let busy = hanging_saga(entered.clone(), Arc::new(Mutex::new(None)));
            let exec = Executor::builder_from_arc(store.clone())
                .register(busy.clone())
                .concurrency(1)
                .lease_duration(LEASE)
                .heartbeat_interval(Duration::from_secs(20))
                .unregistered_check_interval(interval)
                .shutdown_grace(Duration::from_secs(1))
                .build()
                .unwrap();
            let hung = exec
                .client()
                .start(&busy, key(1), &Vec::new())
                .await
                .unwrap()
                .id;
            // Due work of a kind this worker does not have.
            let script = Script::new();
            let v2 = scripted_saga(&script, 2);
            saga_core::SagaClient::from_arc(store.clone())
                .start(&v2, key(1), &TestState::order(1))
                .await
                .unwrap();
            let (stop, running) = spawn_run(&exec);
            let next_check = async |checked: &mut mpsc::UnboundedReceiver<_>| {
                tokio::time::timeout(Duration::from_secs(600), checked.recv())
                    .await
                    .expect("a check while the only slot is taken")
                    .unwrap()
            };
            entered.notified().await; // the only slot is taken from here on
            let mut checks = vec![next_check(&mut checked).await];
            // The stray instance stops being due (a worker that has v2
            // took it); the next check finds nothing.
            let kinds = [v2.kind().clone()];
            let fps = [v2.shape().fingerprint()];
            let taken = store
                .claim(ClaimRequest {
                    worker: saga_core::WorkerId::new(),
                    kinds: &kinds,
                    fingerprints: &fps,
                    limit: 1,
                    lease_for: LEASE,
                })
                .await
                .unwrap();
            assert_eq!(taken.len(), 1);
            checks.push(next_check(&mut checked).await);
            let leased = store.load(hung).await.unwrap().unwrap().lease.is_some();
            assert!(leased, "the step was in flight throughout");
            stop.send(()).unwrap();
            running.await.unwrap().expect("run succeeds");
            checks
        })
    });
    assert_eq!(checks[1] - checks[0], interval, "on the executor's timer");
    let gauge = "saga_unregistered_due{saga=scripted,version=2}";
    let sets: Vec<f64> = log
        .0
        .lock()
        .unwrap()
        .iter()
        .filter(|(name, _)| name == gauge)
        .map(|(_, v)| *v)
        .collect();
    assert_eq!(sets, [1.0, 0.0], "{:?}", log.0.lock().unwrap());
}
