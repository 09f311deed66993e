//! Data no store keeps as given (a NUL character, a non-finite number, a
//! state over the store's cap) is refused before anything is written: at
//! start with a typed error, from a step as one permanent failure (never a
//! rerun per lease expiry); and a result the store itself refuses for its
//! data fails the step for good with the store's reason.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use saga_core::store::{
    ClaimRequest, ClaimedSaga, Lease, NewSaga, Record, SagaStore, StoreFailure,
};
use saga_core::{
    Clock, Error, Executor, HistoryEntry, InMemorySagaStore, Limits, ManualClock, Message,
    OutboxMessage, Outcome, SagaDefinition, SagaId, SagaKind, SagaSnapshot, StartKey, Started,
    Status, Step, StepContext, StepError, Unstorable,
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Order {
    note: String,
    total: f64,
}

/// What the `stamp` step does to the state, or emits.
#[derive(Debug, Clone, Copy)]
enum Stamp {
    Nul,
    NaN,
    NaNMessage,
    Big,
    Marked,
}

/// Counts the calls of each step and compensation.
#[derive(Default)]
struct Calls {
    stamp: AtomicU32,
    undo: AtomicU32,
}

fn saga(name: &str, stamp: Stamp, past_pivot: bool, calls: &Arc<Calls>) -> SagaDefinition<Order> {
    let c = calls.clone();
    let step = saga_core::action_fn(move |ctx: &mut StepContext, order: &mut Order| {
        c.stamp.fetch_add(1, Ordering::SeqCst);
        let emitted = match stamp {
            Stamp::Nul => {
                order.note = "gift\u{0}wrap".into();
                Ok(())
            }
            Stamp::NaN => {
                order.total = f64::NAN;
                Ok(())
            }
            Stamp::NaNMessage => Message::json("order.total", &[1.0, f64::INFINITY])
                .map_err(StepError::from)
                .and_then(|m| ctx.emit(m).map(|_| ())),
            Stamp::Big => {
                order.note = "x".repeat(2000);
                Ok(())
            }
            Stamp::Marked => {
                order.note = "refuse me".into();
                Ok(())
            }
        };
        Box::pin(async move { emitted })
    });
    let c = calls.clone();
    let undo = saga_core::action_fn(move |_, _: &mut Order| {
        c.undo.fetch_add(1, Ordering::SeqCst);
        Box::pin(async { Ok(()) })
    });
    let builder = SagaDefinition::<Order>::builder(name, 1);
    if past_pivot {
        builder
            .pivot(Step::new("confirm", noop))
            .step(Step::new("stamp", step))
            .build()
            .unwrap()
    } else {
        builder
            .step(Step::new("stamp", step).compensate_with(undo))
            .build()
            .unwrap()
    }
}

async fn noop(_: &mut StepContext, _: &mut Order) -> Result<(), StepError> {
    Ok(())
}

fn key() -> StartKey {
    StartKey::new("order-1").unwrap()
}

fn store() -> Arc<InMemorySagaStore> {
    Arc::new(InMemorySagaStore::with_clock(Arc::new(
        ManualClock::starting_now(),
    )))
}

/// Runs one instance of `saga` on `store` until nothing is due.
async fn run_one<St: SagaStore>(store: &Arc<St>, saga: &SagaDefinition<Order>) -> SagaId {
    let exec = Executor::builder_from_arc(store.clone())
        .register(saga.clone())
        .build()
        .unwrap();
    let id = exec
        .client()
        .start(saga, key(), &Order::default())
        .await
        .unwrap()
        .id;
    let report = exec.run_until_idle().await.unwrap();
    assert_eq!(report.store_errors, 0, "{report:?}");
    id
}

/// The history row of the step's failure.
async fn failure<St: SagaStore>(store: &St, id: SagaId) -> HistoryEntry {
    let history = store.history(id).await.unwrap();
    let failed: Vec<_> = history
        .iter()
        .filter(|e| {
            e.step.as_str() == "stamp"
                && !matches!(e.outcome, Outcome::Succeeded | Outcome::Created)
        })
        .collect();
    assert_eq!(failed.len(), 1, "one failure, no retries: {history:#?}");
    assert_eq!(failed[0].outcome, Outcome::FailedForGood);
    failed[0].clone()
}

#[tokio::test]
async fn a_nul_in_a_steps_state_fails_it_once_for_good_and_compensates() {
    let store = store();
    let calls = Arc::new(Calls::default());
    let id = run_one(&store, &saga("nul", Stamp::Nul, false, &calls)).await;
    let s = store.load(id).await.unwrap().unwrap();
    assert_eq!(s.status, Status::Compensated);
    assert_eq!(s.state["note"], "", "the state was not written");
    let error = failure(&*store, id).await.error.unwrap();
    assert!(error.starts_with("permanent"), "{error}");
    assert!(
        error.contains(
            "saga state cannot be stored: a NUL character (\\u0000) in a string at $.note"
        ),
        "{error}"
    );
    assert_eq!(calls.stamp.load(Ordering::SeqCst), 1, "the step ran once");
    assert_eq!(calls.undo.load(Ordering::SeqCst), 1, "and was compensated");
}

#[tokio::test]
async fn a_nul_in_a_steps_state_past_the_pivot_parks_it_with_the_reason() {
    let store = store();
    let calls = Arc::new(Calls::default());
    let id = run_one(&store, &saga("nul", Stamp::Nul, true, &calls)).await;
    let s = store.load(id).await.unwrap().unwrap();
    assert_eq!(s.status, Status::Stuck);
    let reason = s.stuck_reason.unwrap();
    assert!(reason.contains("a NUL character"), "{reason}");
    assert!(!reason.contains("lost leases"), "{reason}");
    failure(&*store, id).await;
    assert_eq!(calls.stamp.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_non_finite_number_at_start_is_a_typed_error_and_nothing_is_written() {
    let store = store();
    let calls = Arc::new(Calls::default());
    let saga = saga("nan", Stamp::NaN, false, &calls);
    let exec = Executor::builder_from_arc(store.clone())
        .register(saga.clone())
        .build()
        .unwrap();
    for (input, at) in [
        (
            Order {
                total: f64::NAN,
                ..Order::default()
            },
            "NaN",
        ),
        (
            Order {
                total: f64::NEG_INFINITY,
                ..Order::default()
            },
            "-inf",
        ),
    ] {
        let err = exec.client().start(&saga, key(), &input).await.unwrap_err();
        let Error::Unstorable {
            what: "saga input",
            problem: Unstorable::NonFinite { path, value },
        } = &err
        else {
            panic!("{err:?}");
        };
        assert_eq!((path.as_str(), *value), ("$.total", at));
        assert!(err.refuses_data());
    }
    let err = exec
        .client()
        .start(
            &saga,
            key(),
            &Order {
                note: "\u{0}".into(),
                ..Order::default()
            },
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Unstorable {
                what: "saga input",
                problem: Unstorable::Nul { .. }
            }
        ),
        "{err:?}"
    );
    assert!(store.snapshots().is_empty(), "nothing written");
}

#[tokio::test]
async fn a_non_finite_number_in_a_state_or_a_message_fails_the_step_for_good() {
    for (stamp, expected) in [
        (
            Stamp::NaN,
            "saga state cannot be stored: a non-finite number (NaN) at $.total",
        ),
        (
            Stamp::NaNMessage,
            "the message payload cannot be stored: a non-finite number (inf) at $[1]",
        ),
    ] {
        let store = store();
        let calls = Arc::new(Calls::default());
        let id = run_one(&store, &saga("nan", stamp, false, &calls)).await;
        let s = store.load(id).await.unwrap().unwrap();
        assert_eq!(s.status, Status::Compensated, "{stamp:?}");
        assert_eq!(s.state["total"], 0.0, "the state was not written");
        let error = failure(&*store, id).await.error.unwrap();
        assert!(error.starts_with("permanent"), "{stamp:?}: {error}");
        assert!(error.contains(expected), "{stamp:?}: {error}");
        assert_eq!(calls.stamp.load(Ordering::SeqCst), 1, "{stamp:?}");
        assert!(store.outbox().is_empty());
    }
}

#[tokio::test]
async fn a_state_over_the_stores_cap_fails_the_step_once_for_good() {
    // The executor has no cap of its own: it checks against the store's.
    let store = Arc::new(
        InMemorySagaStore::with_clock(Arc::new(ManualClock::starting_now()))
            .with_limits(Limits::new(1024, 1024)),
    );
    let calls = Arc::new(Calls::default());
    let id = run_one(&store, &saga("big", Stamp::Big, false, &calls)).await;
    let s = store.load(id).await.unwrap().unwrap();
    assert_eq!(s.status, Status::Compensated);
    let error = failure(&*store, id).await.error.unwrap();
    assert!(error.contains("over the limit of 1024 bytes"), "{error}");
    assert_eq!(calls.stamp.load(Ordering::SeqCst), 1, "the step ran once");
    assert_eq!(calls.undo.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn the_stores_own_refusals_of_data_are_refused_and_nothing_is_written() {
    let store = store();
    let calls = Arc::new(Calls::default());
    let saga = saga("direct", Stamp::Marked, false, &calls);
    let new = |input: &serde_json::Value| NewSaga {
        state: input.clone(),
        ..NewSaga::new(
            &saga,
            key(),
            &Order::default(),
            &Limits::default(),
            store.clock().now(),
        )
        .unwrap()
    };
    // A start handed to the store unchecked.
    let err = store
        .start(new(&serde_json::json!({"note": "\u{0}", "total": 0.0})))
        .await
        .unwrap_err();
    assert!(err.refuses_data(), "{err:?}");
    let big = serde_json::json!({"note": "x".repeat(DEFAULT), "total": 0.0});
    let err = store.start(new(&big)).await.unwrap_err();
    assert!(matches!(err, Error::TooLarge { .. }), "{err:?}");
    assert!(store.snapshots().is_empty());
}

const DEFAULT: usize = saga_core::DEFAULT_MAX_BYTES;

/// A store that refuses, as a database would (a data exception), any
/// transition whose state says "refuse me": data the engine's own checks
/// let through.
struct Refusing {
    inner: InMemorySagaStore,
    refused: AtomicU32,
}

#[derive(Debug, thiserror::Error)]
#[error("database error 22P05: unsupported Unicode escape sequence")]
struct DataException;

impl StoreFailure for DataException {
    fn is_retryable(&self) -> bool {
        false
    }
    fn code(&self) -> Option<&str> {
        Some("22P05")
    }
    fn refuses_data(&self) -> bool {
        true
    }
}

impl SagaStore for Refusing {
    fn clock(&self) -> &Arc<dyn Clock> {
        self.inner.clock()
    }
    fn limits(&self) -> Limits {
        self.inner.limits()
    }
    async fn start(&self, new: NewSaga) -> Result<Started, Error> {
        self.inner.start(new).await
    }
    async fn claim(&self, request: ClaimRequest<'_>) -> Result<Vec<ClaimedSaga>, Error> {
        self.inner.claim(request).await
    }
    async fn heartbeat(&self, lease: &Lease, lease_for: Duration) -> Result<Lease, Error> {
        self.inner.heartbeat(lease, lease_for).await
    }
    async fn release(&self, lease: &Lease) -> Result<(), Error> {
        self.inner.release(lease).await
    }
    async fn record(&self, lease: &Lease, record: Record) -> Result<(), Error> {
        if record
            .state
            .as_ref()
            .is_some_and(|s| s["note"] == "refuse me")
        {
            self.refused.fetch_add(1, Ordering::SeqCst);
            return Err(Error::store(DataException));
        }
        self.inner.record(lease, record).await
    }
    async fn record_unleased(&self, id: SagaId, version: u64, record: Record) -> Result<(), Error> {
        self.inner.record_unleased(id, version, record).await
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
        self.inner.due_unregistered(kinds).await
    }
    async fn due_unmatched(
        &self,
        kinds: &[SagaKind],
        fingerprints: &[saga_core::ShapeFingerprint],
    ) -> Result<Vec<(SagaKind, saga_core::ShapeFingerprint, u64)>, Error> {
        self.inner.due_unmatched(kinds, fingerprints).await
    }
    async fn register_definition(
        &self,
        shape: &saga_core::SagaShape,
    ) -> Result<saga_core::ShapeFingerprint, Error> {
        self.inner.register_definition(shape).await
    }
}

#[tokio::test]
async fn a_result_the_store_refuses_for_its_data_fails_the_step_for_good_with_its_reason() {
    for past_pivot in [false, true] {
        let store = Arc::new(Refusing {
            inner: InMemorySagaStore::with_clock(Arc::new(ManualClock::starting_now())),
            refused: AtomicU32::new(0),
        });
        let calls = Arc::new(Calls::default());
        let id = run_one(&store, &saga("refused", Stamp::Marked, past_pivot, &calls)).await;
        let s = store.load(id).await.unwrap().unwrap();
        let error = failure(&*store, id).await.error.unwrap();
        assert!(
            error.contains("the store refused to record the step's result: database error 22P05"),
            "{error}"
        );
        if past_pivot {
            assert_eq!(s.status, Status::Stuck);
            assert!(s.stuck_reason.unwrap().contains("22P05"));
        } else {
            assert_eq!(s.status, Status::Compensated);
            assert_eq!(calls.undo.load(Ordering::SeqCst), 1);
        }
        assert_eq!(calls.stamp.load(Ordering::SeqCst), 1, "the step ran once");
        assert_eq!(store.refused.load(Ordering::SeqCst), 1, "refused once");
    }
}
