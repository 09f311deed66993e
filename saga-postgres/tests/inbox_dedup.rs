//! The inbox: a message's effect is applied once per consumer, however many
//! times and however concurrently it is delivered; old rows are pruned.

mod outbox_support;

use std::sync::Arc;
use std::time::Duration;

use outbox_support::{Env, WAIT, env};
use saga_core::MessageId;
use saga_postgres::inbox::{ConsumerName, Delivery, Inbox};
use saga_postgres::pool_from_config;

async fn effects_table(env: &Env) {
    let client = env.pool.get().await.unwrap();
    client
        .batch_execute(&format!(
            "CREATE TABLE {}.effects (consumer text NOT NULL, message_id uuid NOT NULL)",
            env.schema.quoted()
        ))
        .await
        .unwrap();
}

/// One delivery: in one transaction, claim the id and (if first) apply the
/// effect. Returns what the inbox said.
async fn deliver(env: &Env, inbox: &Inbox, consumer: &ConsumerName, id: MessageId) -> Delivery {
    let mut client = env.pool.get().await.unwrap();
    let tx = client.transaction().await.unwrap();
    let delivery = inbox.process_once_in_tx(&tx, consumer, id).await.unwrap();
    if delivery == Delivery::First {
        tx.execute(
            &format!(
                "INSERT INTO {}.effects VALUES ($1, $2)",
                env.schema.quoted()
            ),
            &[&consumer.as_str(), &id.as_uuid()],
        )
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();
    delivery
}

/// `(effects, distinct messages with an effect)` for `consumer`.
async fn effects(env: &Env, consumer: &str) -> (i64, i64) {
    let client = env.pool.get().await.unwrap();
    let row = client
        .query_one(
            &format!(
                "SELECT count(*), count(DISTINCT message_id) FROM {}.effects WHERE consumer = $1",
                env.schema.quoted()
            ),
            &[&consumer],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_concurrent_consumers_with_duplicate_deliveries_apply_each_effect_once() {
    let env = env().await;
    effects_table(&env).await;
    let ids: Vec<MessageId> = (0..40).map(|_| MessageId::new()).collect();
    let consumer = ConsumerName::new("billing").unwrap();
    // Two instances of the consumer, each with its own pool, each getting
    // every message three times (injected duplicates), in different orders.
    let mut tasks = Vec::new();
    for instance in 0..2_usize {
        let pool = pool_from_config(env.test_schema.config(), 3).unwrap();
        let inbox = Inbox::new(pool.clone(), env.schema.clone());
        let mut deliveries: Vec<MessageId> = ids.iter().flat_map(|id| [*id, *id, *id]).collect();
        if instance == 1 {
            deliveries.reverse();
        }
        let consumer = consumer.clone();
        let env_schema = env.schema.clone();
        tasks.push(tokio::spawn(async move {
            let mut firsts = Vec::new();
            // Three deliveries in flight at once per instance.
            for chunk in deliveries.chunks(3) {
                let mut inflight = Vec::new();
                for id in chunk {
                    let (pool, inbox, consumer, schema, id) = (
                        pool.clone(),
                        inbox.clone(),
                        consumer.clone(),
                        env_schema.clone(),
                        *id,
                    );
                    inflight.push(tokio::spawn(async move {
                        let mut client = pool.get().await.unwrap();
                        let tx = client.transaction().await.unwrap();
                        let d = inbox.process_once_in_tx(&tx, &consumer, id).await.unwrap();
                        if d == Delivery::First {
                            tx.execute(
                                &format!("INSERT INTO {}.effects VALUES ($1, $2)", schema.quoted()),
                                &[&consumer.as_str(), &id.as_uuid()],
                            )
                            .await
                            .unwrap();
                        }
                        tx.commit().await.unwrap();
                        (id, d)
                    }));
                }
                for t in inflight {
                    let (id, d) = t.await.unwrap();
                    if d == Delivery::First {
                        firsts.push(id);
                    }
                }
            }
            firsts
        }));
    }
    let mut firsts = Vec::new();
    for t in tasks {
        firsts.extend(t.await.unwrap());
    }
    assert_eq!(firsts.len(), ids.len(), "one first delivery per message");
    assert_eq!(effects(&env, "billing").await, (40, 40));
}

/// The backend pid of a connection.
async fn pid_of(client: &tokio_postgres::Client) -> i32 {
    client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0)
}

/// Waits until backend `pid` is blocked on a lock (polling the server's
/// own view of it, no sleeping).
async fn wait_blocked(env: &Env, pid: i32) {
    let client = env.pool.get().await.unwrap();
    tokio::time::timeout(WAIT, async {
        loop {
            let blocked: bool = client
                .query_one(
                    "SELECT coalesce(cardinality(pg_blocking_pids($1)) > 0, false)",
                    &[&pid],
                )
                .await
                .unwrap()
                .get(0);
            if blocked {
                return;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the duplicate delivery to wait for the first one");
}

/// The first delivery holds its claim uncommitted while a duplicate
/// arrives; `commit` decides how the first one ends.
async fn race(commit: bool) -> (Delivery, (i64, i64)) {
    let env = Arc::new(env().await);
    effects_table(&env).await;
    let inbox = Inbox::new(env.pool.clone(), env.schema.clone());
    let consumer = ConsumerName::new("mailer").unwrap();
    let id = MessageId::new();

    let mut first_client = env.pool.get().await.unwrap();
    let first = first_client.transaction().await.unwrap();
    assert_eq!(
        inbox
            .process_once_in_tx(&first, &consumer, id)
            .await
            .unwrap(),
        Delivery::First
    );
    first
        .execute(
            &format!(
                "INSERT INTO {}.effects VALUES ($1, $2)",
                env.schema.quoted()
            ),
            &[&consumer.as_str(), &id.as_uuid()],
        )
        .await
        .unwrap();

    // The duplicate, on another connection, must wait for the first.
    let mut dup_client = env.pool.get().await.unwrap();
    let dup_pid = pid_of(&dup_client).await;
    let duplicate = {
        let (env, inbox, consumer) = (env.clone(), inbox.clone(), consumer.clone());
        tokio::spawn(async move {
            let tx = dup_client.transaction().await.unwrap();
            let d = inbox.process_once_in_tx(&tx, &consumer, id).await.unwrap();
            if d == Delivery::First {
                tx.execute(
                    &format!(
                        "INSERT INTO {}.effects VALUES ($1, $2)",
                        env.schema.quoted()
                    ),
                    &[&consumer.as_str(), &id.as_uuid()],
                )
                .await
                .unwrap();
            }
            tx.commit().await.unwrap();
            d
        })
    };
    wait_blocked(&env, dup_pid).await;
    assert!(!duplicate.is_finished());
    if commit {
        first.commit().await.unwrap();
    } else {
        first.rollback().await.unwrap();
    }
    let d = tokio::time::timeout(WAIT, duplicate)
        .await
        .unwrap()
        .unwrap();
    (d, effects(&env, "mailer").await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrent_duplicate_waits_and_is_skipped_when_the_first_delivery_commits() {
    let (duplicate, effects) = race(true).await;
    assert_eq!(duplicate, Delivery::Duplicate);
    assert_eq!(effects, (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrent_duplicate_applies_the_effect_when_the_first_delivery_rolls_back() {
    let (duplicate, effects) = race(false).await;
    assert_eq!(duplicate, Delivery::First);
    assert_eq!(effects, (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_consumer_deduplicates_on_its_own() {
    let env = env().await;
    effects_table(&env).await;
    let inbox = Inbox::new(env.pool.clone(), env.schema.clone());
    let (a, b) = (
        ConsumerName::new("a").unwrap(),
        ConsumerName::new("b").unwrap(),
    );
    let id = MessageId::new();
    assert_eq!(deliver(&env, &inbox, &a, id).await, Delivery::First);
    assert_eq!(deliver(&env, &inbox, &b, id).await, Delivery::First);
    assert_eq!(deliver(&env, &inbox, &a, id).await, Delivery::Duplicate);
    assert!(inbox.was_processed(&a, id).await.unwrap());
    assert!(!inbox.was_processed(&a, MessageId::new()).await.unwrap());
    assert_eq!(effects(&env, "a").await, (1, 1));
    assert_eq!(effects(&env, "b").await, (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_inbox_rows_are_pruned_after_the_retention() {
    let env = env().await;
    effects_table(&env).await;
    let inbox = Inbox::builder(env.pool.clone(), env.schema.clone())
        .clock(env.clock.clone())
        .retention(Duration::from_secs(3600))
        .build();
    let consumer = ConsumerName::new("c").unwrap();
    let old: Vec<MessageId> = (0..3).map(|_| MessageId::new()).collect();
    for id in &old {
        let _ = deliver(&env, &inbox, &consumer, *id).await;
    }
    env.clock.advance(Duration::from_secs(1800));
    let recent = MessageId::new();
    let _ = deliver(&env, &inbox, &consumer, recent).await;
    // Not yet: the oldest rows are 1800 s old.
    assert_eq!(inbox.prune().await.unwrap(), 0);
    env.clock.advance(Duration::from_secs(1801));
    assert_eq!(inbox.prune().await.unwrap(), 3);
    for id in &old {
        assert!(!inbox.was_processed(&consumer, *id).await.unwrap());
    }
    assert!(inbox.was_processed(&consumer, recent).await.unwrap());
    // Within the retention a duplicate is still caught.
    assert_eq!(
        deliver(&env, &inbox, &consumer, recent).await,
        Delivery::Duplicate
    );
}

#[test]
fn consumer_names_are_validated() {
    assert!(ConsumerName::new("email-sender").is_ok());
    assert!(ConsumerName::new("").is_err());
    assert!(ConsumerName::new("a\nb").is_err());
    assert!(ConsumerName::new("x".repeat(256)).is_err());
}
