//! Enqueueing in the caller's transaction: the message commits or rolls
//! back with the business write; caps; idempotent ids; one notification
//! per transaction.

mod outbox_support;

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use outbox_support::{Recorder, WAIT, env, msg};
use saga_core::{Clock, Message, MessageId, OutboxMessage, Payload};
use saga_postgres::outbox::{DispatcherBuilder, OutboxError};
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, NoTls};

async fn create_orders(env: &outbox_support::Env) {
    let client = env.pool.get().await.unwrap();
    client
        .batch_execute(&format!(
            "CREATE TABLE {}.orders (id bigint PRIMARY KEY)",
            env.schema.quoted()
        ))
        .await
        .unwrap();
}

async fn orders(env: &outbox_support::Env) -> i64 {
    let client = env.pool.get().await.unwrap();
    client
        .query_one(
            &format!("SELECT count(*) FROM {}.orders", env.schema.quoted()),
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enqueued_message_commits_with_the_business_write() {
    let env = env().await;
    create_orders(&env).await;
    let now = env.clock.now();
    let mut client = env.pool.get().await.unwrap();
    let tx = client.transaction().await.unwrap();
    tx.execute(
        &format!("INSERT INTO {}.orders VALUES (17)", env.schema.quoted()),
        &[],
    )
    .await
    .unwrap();
    let message = Message::json("order.paid", &serde_json::json!({"order": 17}))
        .unwrap()
        .key("order-17")
        .unwrap()
        .header("content-type", "application/json")
        .unwrap()
        .deliver_after(Duration::from_secs(5))
        .unwrap();
    let id = env.outbox.enqueue_in_tx(&tx, message).await.unwrap();
    tx.commit().await.unwrap();

    assert_eq!(orders(&env).await, 1);
    let row = client
        .query_one(
            &format!(
                "SELECT topic, key, payload_json, payload_bytes, headers, created_at, available_at,
                    attempts, dead_at IS NULL, lease_token IS NULL
                 FROM {}.outbox WHERE id = $1",
                env.schema.quoted()
            ),
            &[&id.as_uuid()],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, &str>(0), "order.paid");
    assert_eq!(row.get::<_, Option<&str>>(1), Some("order-17"));
    assert_eq!(
        row.get::<_, serde_json::Value>(2),
        serde_json::json!({"order": 17})
    );
    assert_eq!(row.get::<_, Option<Vec<u8>>>(3), None);
    assert_eq!(
        row.get::<_, serde_json::Value>(4),
        serde_json::json!({"content-type": "application/json"})
    );
    assert_eq!(row.get::<_, SystemTime>(5), now.to_system_time());
    assert_eq!(
        row.get::<_, SystemTime>(6),
        (now + Duration::from_secs(5)).to_system_time()
    );
    assert_eq!(row.get::<_, i32>(7), 0);
    assert!(row.get::<_, bool>(8));
    assert!(row.get::<_, bool>(9));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_business_transaction_leaves_no_message() {
    let env = env().await;
    create_orders(&env).await;
    let mut client = env.pool.get().await.unwrap();
    let tx = client.transaction().await.unwrap();
    tx.execute(
        &format!("INSERT INTO {}.orders VALUES (18)", env.schema.quoted()),
        &[],
    )
    .await
    .unwrap();
    env.outbox
        .enqueue_all_in_tx(&tx, [msg("order.paid", 1), msg("order.paid", 2)])
        .await
        .unwrap();
    tx.rollback().await.unwrap();

    assert_eq!(orders(&env).await, 0);
    assert_eq!(env.outbox_rows().await, 0);
    // And a dispatcher finds nothing to publish.
    let recorder = Recorder::new();
    let dispatcher = DispatcherBuilder::from_arc(env.outbox.clone(), recorder.clone())
        .build()
        .unwrap();
    let report = dispatcher.run_until_idle().await.unwrap();
    assert_eq!(report.claimed, 0);
    assert!(recorder.attempts().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_payload_is_a_typed_error_and_nothing_is_written() {
    let env = env().await;
    let outbox = saga_postgres::Outbox::builder(env.pool.clone(), env.schema.clone())
        .clock(env.clock.clone())
        .max_payload_bytes(16)
        .build();
    let mut client = env.pool.get().await.unwrap();
    let tx = client.transaction().await.unwrap();
    let small = Message::bytes("t", vec![1; 16]).unwrap();
    let big = Message::bytes("t", vec![1; 17]).unwrap();
    let err = outbox
        .enqueue_all_in_tx(&tx, [small, big])
        .await
        .unwrap_err();
    match err {
        OutboxError::PayloadTooLarge { size, limit, .. } => {
            assert_eq!((size, limit), (17, 16));
        }
        other => panic!("expected PayloadTooLarge, got {other:?}"),
    }
    // The transaction is still usable, and nothing of the batch was written.
    tx.commit().await.unwrap();
    assert_eq!(env.outbox_rows().await, 0);
    // JSON payloads are measured as serialized.
    let tx = client.transaction().await.unwrap();
    let json = Message::json("t", &"x".repeat(20)).unwrap();
    assert!(matches!(
        outbox.enqueue_in_tx(&tx, json).await,
        Err(OutboxError::PayloadTooLarge { size: 22, .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caller_chosen_ids_are_written_once() {
    let env = env().await;
    let message = OutboxMessage {
        id: MessageId::new(),
        topic: "invoice.issued".into(),
        key: None,
        payload: Payload::Bytes(b"pdf".to_vec()),
        headers: BTreeMap::new(),
        available_at: env.clock.now(),
    };
    let mut client = env.pool.get().await.unwrap();
    for expected in [1, 0] {
        let tx = client.transaction().await.unwrap();
        let written = env
            .outbox
            .enqueue_with_ids_in_tx(&tx, std::slice::from_ref(&message))
            .await
            .unwrap();
        tx.commit().await.unwrap();
        assert_eq!(written, expected);
    }
    assert_eq!(env.outbox_rows().await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_sends_one_notification_however_many_messages_it_enqueues() {
    let env = env().await;
    let channel = env.schema.outbox_channel();
    // A listening connection whose notifications we read.
    let (client, mut connection) = env.test_schema.config().connect(NoTls).await.unwrap();
    let (note_tx, mut notes) = mpsc::unbounded_channel::<String>();
    let driver = tokio::spawn(async move {
        while let Some(Ok(m)) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            if let AsyncMessage::Notification(n) = m {
                let _ = note_tx.send(n.payload().to_owned());
            }
        }
    });
    client
        .batch_execute(&format!("LISTEN \"{channel}\""))
        .await
        .unwrap();

    let mut writer = env.pool.get().await.unwrap();
    // Three statements, five messages, one transaction.
    let tx = writer.transaction().await.unwrap();
    env.outbox.enqueue_in_tx(&tx, msg("t", 1)).await.unwrap();
    env.outbox
        .enqueue_all_in_tx(&tx, [msg("t", 2), msg("t", 3)])
        .await
        .unwrap();
    env.outbox
        .enqueue_all_in_tx(&tx, [msg("t", 4), msg("t", 5)])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    // A transaction that enqueues nothing new sends nothing.
    let existing = OutboxMessage {
        id: MessageId::new(),
        topic: "t".into(),
        key: None,
        payload: Payload::Bytes(vec![]),
        headers: BTreeMap::new(),
        available_at: env.clock.now(),
    };
    let tx = writer.transaction().await.unwrap();
    env.outbox
        .enqueue_with_ids_in_tx(&tx, std::slice::from_ref(&existing))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let tx = writer.transaction().await.unwrap();
    let again = env
        .outbox
        .enqueue_with_ids_in_tx(&tx, std::slice::from_ref(&existing))
        .await
        .unwrap();
    assert_eq!(again, 0);
    tx.commit().await.unwrap();
    // Notifications arrive in commit order: once the marker is here, every
    // notification of the transactions above has arrived.
    writer
        .execute("SELECT pg_notify($1, 'marker')", &[&channel])
        .await
        .unwrap();
    let mut seen = Vec::new();
    loop {
        let note = tokio::time::timeout(WAIT, notes.recv())
            .await
            .expect("the marker notification")
            .unwrap();
        if note == "marker" {
            break;
        }
        seen.push(note);
    }
    // One for the five-message transaction, one for the first write of
    // `existing`, none for the repeated write.
    assert_eq!(seen, vec![String::new(), String::new()]);
    drop(client);
    driver.abort();
}
