//! Caller-chosen ids never drop a message silently: an id reused for a
//! different message is a typed conflict, a call with one id twice is
//! refused, the same message again is a no-op; and a delivery time past
//! the cap is refused.

mod outbox_support;

use std::collections::BTreeMap;
use std::time::Duration;

use outbox_support::{Recorder, WAIT, env};
use saga_core::{Clock, MAX_DELIVERY_DELAY, MessageId, OutboxMessage, Payload};
use saga_postgres::outbox::{DispatcherBuilder, OutboxError};

fn message(env: &outbox_support::Env, id: MessageId, body: serde_json::Value) -> OutboxMessage {
    OutboxMessage {
        id,
        topic: "invoice.issued".into(),
        key: Some("invoice-7".into()),
        payload: Payload::Json(body),
        headers: BTreeMap::from([("content-type".into(), "application/json".into())]),
        available_at: env.clock.now(),
    }
}

async fn enqueue(
    env: &outbox_support::Env,
    messages: &[OutboxMessage],
) -> Result<u64, OutboxError> {
    let mut client = env.pool.get().await.unwrap();
    let tx = client.transaction().await.unwrap();
    let result = env.outbox.enqueue_with_ids_in_tx(&tx, messages).await;
    // The transaction stays usable after a refusal: commit whatever it has.
    tx.commit().await.unwrap();
    result
}

/// The stored payload of `id`, if it is in the outbox.
async fn stored(env: &outbox_support::Env, id: MessageId) -> Option<serde_json::Value> {
    let client = env.pool.get().await.unwrap();
    client
        .query_opt(
            &format!(
                "SELECT payload_json FROM {}.outbox WHERE id = $1",
                env.schema.quoted()
            ),
            &[&id.as_uuid()],
        )
        .await
        .unwrap()
        .map(|r| r.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_reused_for_a_different_message_is_a_typed_conflict_and_nothing_is_written() {
    let env = env().await;
    let id = MessageId::new();
    let first = message(&env, id, serde_json::json!({"amount": 10}));
    assert_eq!(
        enqueue(&env, std::slice::from_ref(&first)).await.unwrap(),
        1
    );

    // A different payload under the same id, beside a new message.
    let other = MessageId::new();
    let batch = [
        message(&env, other, serde_json::json!({"amount": 1})),
        message(&env, id, serde_json::json!({"amount": 99})),
    ];
    match enqueue(&env, &batch).await {
        Err(OutboxError::Conflict { ids }) => assert_eq!(ids, vec![id]),
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(
        stored(&env, id).await,
        Some(serde_json::json!({"amount": 10}))
    );
    assert_eq!(
        stored(&env, other).await,
        None,
        "nothing of the call is written"
    );

    // Each field of the message counts, the delivery time does not.
    let mut topic = first.clone();
    topic.topic = "invoice.voided".into();
    let mut key = first.clone();
    key.key = None;
    let mut header = first.clone();
    header.headers.insert("x".into(), "y".into());
    let mut bytes = first.clone();
    bytes.payload = Payload::Bytes(b"{\"amount\":10}".to_vec());
    for changed in [topic, key, header, bytes] {
        assert!(
            matches!(
                enqueue(&env, std::slice::from_ref(&changed)).await,
                Err(OutboxError::Conflict { .. })
            ),
            "{changed:?}"
        );
    }
    let mut later = first.clone();
    later.available_at = env.clock.now() + Duration::from_secs(60);
    assert_eq!(enqueue(&env, &[later]).await.unwrap(), 0);
    assert_eq!(env.outbox_rows().await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_message_again_is_an_idempotent_no_op() {
    let env = env().await;
    let id = MessageId::new();
    let m = message(&env, id, serde_json::json!({"a": 1, "b": [1, 2]}));
    assert_eq!(enqueue(&env, std::slice::from_ref(&m)).await.unwrap(), 1);
    // The same JSON written with another key order is the same message.
    let mut reordered = m.clone();
    reordered.payload = Payload::Json(serde_json::from_str(r#"{"b":[1,2],"a":1}"#).unwrap());
    let new = message(&env, MessageId::new(), serde_json::json!({}));
    assert_eq!(enqueue(&env, &[m.clone(), new]).await.unwrap(), 1);
    assert_eq!(enqueue(&env, &[reordered]).await.unwrap(), 0);
    assert_eq!(env.outbox_rows().await, 2);

    // A dead letter keeps its id too.
    let client = env.pool.get().await.unwrap();
    client
        .execute(
            &format!(
                "UPDATE {}.outbox SET dead_at = now() WHERE id = $1",
                env.schema.quoted()
            ),
            &[&id.as_uuid()],
        )
        .await
        .unwrap();
    assert_eq!(enqueue(&env, std::slice::from_ref(&m)).await.unwrap(), 0);
    let mut changed = m.clone();
    changed.payload = Payload::Json(serde_json::json!({"a": 2}));
    assert!(matches!(
        enqueue(&env, &[changed]).await,
        Err(OutboxError::Conflict { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_messages_with_one_id_in_one_call_are_refused_and_nothing_is_written() {
    let env = env().await;
    let id = MessageId::new();
    let a = message(&env, id, serde_json::json!({"v": 1}));
    let b = message(&env, id, serde_json::json!({"v": 2}));
    let other = message(&env, MessageId::new(), serde_json::json!({}));
    for batch in [vec![other.clone(), a.clone(), b], vec![a.clone(), a]] {
        match enqueue(&env, &batch).await {
            Err(OutboxError::DuplicateId { id: dup }) => assert_eq!(dup, id),
            other => panic!("expected DuplicateId, got {other:?}"),
        }
    }
    assert_eq!(env.outbox_rows().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrent_enqueue_of_the_id_is_compared_once_it_commits() {
    let env = env().await;
    let id = MessageId::new();
    for same in [true, false] {
        // Transaction A writes the id and holds it, uncommitted.
        let mut a = env.pool.get().await.unwrap();
        let tx_a = a.transaction().await.unwrap();
        let first = message(&env, id, serde_json::json!({"v": 1}));
        env.outbox
            .enqueue_with_ids_in_tx(&tx_a, std::slice::from_ref(&first))
            .await
            .unwrap();
        // Transaction B writes a new message and the same id: it waits on A.
        let body = if same {
            serde_json::json!({"v": 1})
        } else {
            serde_json::json!({"v": 2})
        };
        let fresh = MessageId::new();
        let batch = vec![
            message(&env, fresh, serde_json::json!({"fresh": true})),
            message(&env, id, body),
        ];
        let outbox = env.outbox.clone();
        let pool = env.pool.clone();
        let b = tokio::spawn(async move {
            let mut client = pool.get().await.unwrap();
            let tx = client.transaction().await.unwrap();
            let result = outbox.enqueue_with_ids_in_tx(&tx, &batch).await;
            // As documented: commit on success, roll back on any error.
            if result.is_ok() {
                tx.commit().await.unwrap();
            } else {
                tx.rollback().await.unwrap();
            }
            result
        });
        // Until B is blocked on A's row (a signal, not a sleep).
        let watcher = env.pool.get().await.unwrap();
        tokio::time::timeout(WAIT, async {
            loop {
                let n: i64 = watcher
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity
                         WHERE datname = current_database() AND pid <> pg_backend_pid()
                           AND cardinality(pg_blocking_pids(pid)) > 0",
                        &[],
                    )
                    .await
                    .unwrap()
                    .get(0);
                if n > 0 {
                    break;
                }
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("B waits for A");
        tx_a.commit().await.unwrap();
        let result = tokio::time::timeout(WAIT, b).await.unwrap().unwrap();
        if same {
            assert_eq!(
                result.unwrap(),
                1,
                "the fresh one is written, the same one skipped"
            );
            assert!(stored(&env, fresh).await.is_some());
        } else {
            match result {
                Err(OutboxError::Conflict { ids }) => assert_eq!(ids, vec![id]),
                other => panic!("expected a conflict, got {other:?}"),
            }
            assert_eq!(
                stored(&env, fresh).await,
                None,
                "B rolled back on the refusal: its call left nothing"
            );
        }
        assert_eq!(stored(&env, id).await, Some(serde_json::json!({"v": 1})));
        // Clean up for the next round.
        watcher
            .execute(&format!("DELETE FROM {}.outbox", env.schema.quoted()), &[])
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_delivered_an_id_is_forgotten_and_enqueued_again_as_a_new_message() {
    // The documented window: conflicts are checked against the messages
    // still in the outbox; a delivered message's row is gone.
    let env = env().await;
    let id = MessageId::new();
    enqueue(&env, &[message(&env, id, serde_json::json!({"v": 1}))])
        .await
        .unwrap();
    let recorder = Recorder::new();
    let dispatcher = DispatcherBuilder::from_arc(env.outbox.clone(), recorder.clone())
        .build()
        .unwrap();
    assert_eq!(dispatcher.run_until_idle().await.unwrap().published, 1);
    assert_eq!(
        enqueue(&env, &[message(&env, id, serde_json::json!({"v": 2}))])
            .await
            .unwrap(),
        1
    );
    assert_eq!(dispatcher.run_until_idle().await.unwrap().published, 1);
    assert_eq!(
        recorder.published_ids(),
        vec![id, id],
        "same id, delivered twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_due_past_the_maximum_delay_is_refused_and_nothing_is_written() {
    let env = env().await;
    let now = env.clock.now();
    let mut ok = message(&env, MessageId::new(), serde_json::json!({}));
    ok.available_at = now + MAX_DELIVERY_DELAY;
    let mut far = message(&env, MessageId::new(), serde_json::json!({}));
    far.available_at = now + MAX_DELIVERY_DELAY + Duration::from_secs(1);
    let mut never = message(&env, MessageId::new(), serde_json::json!({}));
    never.available_at = now + Duration::MAX;
    for late in [far, never] {
        let late_id = late.id;
        match enqueue(&env, &[ok.clone(), late]).await {
            Err(OutboxError::DueTooLate { id, delay, max }) => {
                assert_eq!(id, late_id);
                assert!(delay > max && max == MAX_DELIVERY_DELAY);
            }
            other => panic!("expected DueTooLate, got {other:?}"),
        }
    }
    assert_eq!(env.outbox_rows().await, 0);
    assert_eq!(enqueue(&env, &[ok]).await.unwrap(), 1);
    // `Message::deliver_after` refuses such delays at the source.
    assert!(matches!(
        outbox_support::msg("t", 1).deliver_after(Duration::MAX),
        Err(saga_core::MessageError::DelayTooLong { .. })
    ));
}
