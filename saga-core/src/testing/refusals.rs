//! Conformance cases: what a store refuses to write (data it cannot keep
//! as given, data over its caps), and that a refusal writes nothing.

use serde_json::json;

use super::conformance::{Harness, StoreFactory, claim_req, key, retry_record};
use super::script::TestState;
use crate::client::Limits;
use crate::error::Error;
use crate::ids::{MessageId, StepName};
use crate::machine::Status;
use crate::outbox::{Message, OutboxMessage, Payload};
use crate::store::{NewSaga, SagaStore};
use crate::time::Clock;

/// A start, state or outbox payload that is not storable JSON (a NUL
/// character) or is over the store's [`limits`](SagaStore::limits) is
/// refused with a typed error that [`refuses_data`](Error::refuses_data),
/// before anything is written; a refused transition leaves the lease held,
/// so that the worker can record the step's failure instead.
pub async fn a_store_refuses_data_it_cannot_keep_and_writes_nothing<Fa: StoreFactory>(f: &Fa) {
    let h = Harness::new(f).await;
    let limits = h.store.limits();
    let kinds = [h.saga.kind().clone()];
    let fps = [h.saga.shape().fingerprint()];
    let now = h.clock.now();

    // A start handed to the store unchecked (a caller filling in
    // `NewSaga` itself).
    let unchecked = |state: serde_json::Value| NewSaga {
        state,
        ..NewSaga::new(
            &h.saga,
            key(1),
            &TestState::order(1),
            &Limits::default(),
            now,
        )
        .expect("a valid start")
    };
    let err = h
        .store
        .start(unchecked(json!({ "order": 1, "done": ["a\u{0}b"] })))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Unstorable {
                what: "saga input",
                ..
            }
        ),
        "{err:?}"
    );
    let oversized = json!({ "order": 1, "done": ["x".repeat(limits.max_state_bytes)] });
    let err = h
        .store
        .start(unchecked(oversized.clone()))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::TooLarge {
                what: "saga input",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.refuses_data());

    // Nothing was written: the key is still free.
    let id = h.start(1).await;
    let c = h
        .store
        .claim(claim_req(&kinds, &fps, 1))
        .await
        .unwrap()
        .remove(0);
    let before = h.store.load(id).await.unwrap().unwrap();
    let history = h.store.history(id).await.unwrap();

    let message = |payload: Payload| OutboxMessage {
        id: MessageId::new(),
        topic: "order.validated".into(),
        key: None,
        payload,
        headers: Default::default(),
        available_at: now,
    };
    let mut refused = Vec::new();
    let mut with_state = retry_record("validate", 1, now, Vec::new());
    with_state.state = Some(json!({ "order": 1, "done": ["\u{0}"] }));
    refused.push(("saga state", with_state));
    let mut too_large = retry_record("validate", 1, now, Vec::new());
    too_large.state = Some(oversized);
    refused.push(("saga state", too_large));
    refused.push((
        "outbox payload",
        retry_record(
            "validate",
            1,
            now,
            vec![message(Payload::Json(json!({ "note": "\u{0}" })))],
        ),
    ));
    refused.push((
        "outbox payload",
        retry_record(
            "validate",
            1,
            now,
            vec![message(Payload::Bytes(vec![
                0;
                limits.max_payload_bytes + 1
            ]))],
        ),
    ));
    for (what, record) in refused {
        let err = h.store.record(&c.lease, record).await.unwrap_err();
        assert!(err.refuses_data(), "{what}: {err:?}");
        let named = match &err {
            Error::Unstorable { what, .. } | Error::TooLarge { what, .. } => *what,
            other => panic!("{what}: {other:?}"),
        };
        assert_eq!(named, what, "{err:?}");
        assert_eq!(h.store.load(id).await.unwrap().unwrap(), before, "{what}");
    }
    assert_eq!(h.store.history(id).await.unwrap(), history);
    assert!(h.store.outbox_for(id).await.unwrap().is_empty());

    // The lease is still held: the worker records the failure instead.
    let mut failed = retry_record("validate", 1, now, Vec::new());
    failed.history.error = Some("permanent: saga state cannot be stored".into());
    h.store.record(&c.lease, failed).await.unwrap();
    let s = h.store.load(id).await.unwrap().unwrap();
    assert_eq!(
        (s.status, &s.step),
        (Status::Running, &StepName::new("validate").unwrap())
    );
    // A payload built through `Message` is checked there already.
    assert!(Message::new("t", Payload::Json(json!(["\u{0}"]))).is_err());
}
