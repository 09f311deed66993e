//! Per-key ordering: a key's messages go out in enqueue order, one at a
//! time across every dispatcher, while other keys proceed; a message that
//! exhausts its budget is dead-lettered and its key moves on.

mod outbox_support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use outbox_support::{Fate, Recorder, env, fixed_policy, n_of};
use saga_core::Message;
use saga_postgres::outbox::{DeliveryOrder, Dispatcher, DispatcherBuilder, Outbox};
use saga_postgres::pool_from_config;

fn keyed(key: Option<&str>, n: u64) -> Message {
    let m = Message::json("t", &serde_json::json!({ "n": n })).unwrap();
    match key {
        Some(k) => m.key(k).unwrap(),
        None => m,
    }
}

fn ordered(
    outbox: Outbox,
    recorder: &Arc<Recorder>,
    batch: usize,
    attempts: u32,
) -> Dispatcher<Recorder> {
    DispatcherBuilder::from_arc(outbox, recorder.clone())
        .order(DeliveryOrder::PerKey)
        .batch_size(batch)
        .lease_for(Duration::from_secs(30))
        .publish_timeout(Duration::from_secs(10))
        .retry_policy(fixed_policy(attempts))
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn per_key_order_holds_under_concurrent_dispatchers() {
    const KEYS: u64 = 6;
    const PER_KEY: u64 = 15;
    let env = env().await;
    let recorder = Recorder::new();

    // Keys interleaved, across several transactions; n = key * 100 + index,
    // keyless messages n >= 1000.
    let mut all = Vec::new();
    for i in 0..PER_KEY {
        for k in 0..KEYS {
            all.push((Some(format!("k{k}")), k * 100 + i));
        }
        if i % 2 == 0 {
            all.push((None, 1000 + i));
        }
    }
    let mut ids = Vec::new();
    for chunk in all.chunks(17) {
        let messages = chunk.iter().map(|(k, n)| keyed(k.as_deref(), *n)).collect();
        ids.extend(env.enqueue(messages).await);
    }
    // Transient failures sprinkled over keys and positions.
    for ((key, n), id) in all.iter().zip(&ids) {
        let i = n % 100;
        let k = n / 100;
        if key.is_some() && (i + k) % 4 == 0 {
            recorder.set_fate(*id, Fate::FailTimes(1));
        } else if (i * (k + 1)) % 7 == 3 {
            recorder.set_fate(*id, Fate::FailTimes(2));
        }
    }

    // Three dispatchers, each with its own pool, racing every round; the
    // clock moves past the backoff between rounds.
    let dispatchers: Vec<_> = (0..3)
        .map(|_| {
            let pool = pool_from_config(env.test_schema.config(), 2).unwrap();
            let outbox = Outbox::builder(pool, env.schema.clone())
                .clock(env.clock.clone())
                .build();
            ordered(outbox, &recorder, 4, 10)
        })
        .collect();
    let mut rounds = 0;
    while env.outbox_rows().await > 0 {
        rounds += 1;
        assert!(rounds <= 40, "not drained after 40 rounds");
        let tasks: Vec<_> = dispatchers
            .iter()
            .cloned()
            .map(|d| tokio::spawn(async move { d.run_until_idle().await.unwrap() }))
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        env.clock.advance(Duration::from_secs(1));
    }

    // Every message published exactly once.
    let published = recorder.published();
    assert_eq!(published.len(), all.len());
    let distinct: BTreeSet<_> = published.iter().map(|o| o.message.id).collect();
    assert_eq!(distinct.len(), all.len());

    // Per key: attempts never run ahead of an unpublished predecessor, and
    // successes come in enqueue order.
    let mut next: HashMap<String, u64> = HashMap::new();
    let mut keys_per_call: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for a in recorder.attempts() {
        let Some(key) = a.out.message.key.clone() else {
            continue;
        };
        let i = n_of(&a.out) % 100;
        let expected = next.entry(key.clone()).or_insert(0);
        assert_eq!(
            i, *expected,
            "key {key}: attempt of #{i} while #{expected} is not published"
        );
        if a.ok {
            *expected += 1;
        }
        keys_per_call.entry(a.call).or_default().push(key);
    }
    assert!(next.values().all(|n| *n == PER_KEY), "{next:?}");
    // A batch never holds two messages of one key, and different keys
    // travel together.
    for keys in keys_per_call.values() {
        let set: BTreeSet<_> = keys.iter().collect();
        assert_eq!(
            set.len(),
            keys.len(),
            "one message per key per batch: {keys:?}"
        );
    }
    assert!(keys_per_call.values().any(|keys| keys.len() > 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_message_is_dead_lettered_and_its_key_moves_on() {
    let env = env().await;
    let recorder = Recorder::new();
    let ids = env
        .enqueue(vec![
            keyed(Some("a"), 0),
            keyed(Some("b"), 10),
            keyed(Some("a"), 1),
            keyed(Some("b"), 11),
            keyed(Some("a"), 2),
        ])
        .await;
    let (a0, b0, a1, b1, a2) = (ids[0], ids[1], ids[2], ids[3], ids[4]);
    recorder.set_fate(a0, Fate::AlwaysFail);
    let d = ordered(env.outbox.clone(), &recorder, 10, 2);

    // a0 fails and blocks key a; key b goes on.
    d.run_until_idle().await.unwrap();
    assert_eq!(recorder.published_ids(), vec![b0, b1]);
    let tried: Vec<_> = recorder
        .attempts()
        .iter()
        .map(|a| a.out.message.id)
        .collect();
    assert!(
        !tried.contains(&a1) && !tried.contains(&a2),
        "a1, a2 wait behind a0"
    );

    // a0 fails its last attempt: dead-lettered, and key a moves on, in order.
    env.clock.advance(Duration::from_secs(1));
    let report = d.run_until_idle().await.unwrap();
    assert_eq!(report.dead_lettered, 1);
    assert_eq!(recorder.published_ids(), vec![b0, b1, a1, a2]);
    let dead = env.outbox.dead_letters(10, None).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].message.id, a0);

    // Redriven, it goes out on its own.
    recorder.set_fate(a0, Fate::FailTimes(0));
    assert!(env.outbox.redrive(a0).await.unwrap());
    d.run_until_idle().await.unwrap();
    assert_eq!(recorder.published_ids(), vec![b0, b1, a1, a2, a0]);
    assert_eq!(env.outbox_rows().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redriven_dead_letter_goes_out_before_its_keys_later_pending_messages() {
    let env = env().await;
    let recorder = Recorder::new();
    let ids = env
        .enqueue(vec![keyed(Some("a"), 0), keyed(Some("a"), 1)])
        .await;
    recorder.set_fate(ids[0], Fate::Permanent);
    // a1 is delayed by failing once, so it is still pending when a0 returns.
    recorder.set_fate(ids[1], Fate::FailTimes(1));
    let d = ordered(env.outbox.clone(), &recorder, 10, 5);
    d.run_until_idle().await.unwrap();
    assert_eq!(env.outbox.stats().await.unwrap().dead, 1);
    // Redriven after a1 became due again: a1 would go first if it were not
    // behind a0 in its key.
    env.clock.advance(Duration::from_secs(2));
    recorder.set_fate(ids[0], Fate::FailTimes(0));
    assert!(env.outbox.redrive(ids[0]).await.unwrap());
    d.run_until_idle().await.unwrap();
    assert_eq!(recorder.published_ids(), vec![ids[0], ids[1]]);
}

/// A per-key dispatcher of its own that claims what it can and hangs while
/// "publishing" it, as if busy with a slow broker: its messages stay in
/// flight until their lease expires. Returns it running, and its recorder.
async fn hold_in_flight(outbox: Outbox) -> (tokio::task::JoinHandle<()>, Arc<Recorder>) {
    let recorder = Recorder::new();
    recorder.hang_after_publish(true);
    let d = ordered(outbox, &recorder, 10, 5);
    let task = tokio::spawn(async move {
        let _ = d.dispatch_once().await;
    });
    recorder.wait_calls(1).await;
    (task, recorder)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_redriven_while_a_later_message_of_its_key_is_in_flight_waits_for_it() {
    let env = env().await;
    let recorder = Recorder::new();
    let ids = env
        .enqueue(vec![keyed(Some("a"), 0), keyed(Some("a"), 1)])
        .await;
    let (a0, a1) = (ids[0], ids[1]);
    recorder.set_fate(a0, Fate::Permanent);
    let d = ordered(env.outbox.clone(), &recorder, 10, 5);
    assert_eq!(d.dispatch_once().await.unwrap().dead_lettered, 1);

    // a1 is being published by another dispatcher when a0 is redriven.
    let (busy, busy_recorder) = hold_in_flight(env.outbox.clone()).await;
    let in_flight: Vec<_> = busy_recorder
        .attempts()
        .iter()
        .map(|a| a.out.message.id)
        .collect();
    assert_eq!(in_flight, vec![a1]);
    recorder.set_fate(a0, Fate::FailTimes(0));
    assert!(env.outbox.redrive(a0).await.unwrap());

    // a0 is older, but the key has a message in flight: it waits.
    assert_eq!(d.run_until_idle().await.unwrap().claimed, 0);
    let stats = env.outbox.stats().await.unwrap();
    assert_eq!((stats.pending, stats.in_flight), (1, 1), "{stats:?}");

    // The busy dispatcher dies; once a1's lease has expired the key moves
    // on, in enqueue order.
    busy.abort();
    let _ = busy.await;
    env.clock.advance(Duration::from_secs(31));
    d.run_until_idle().await.unwrap();
    assert_eq!(recorder.published_ids(), vec![a0, a1]);
    assert_eq!(env.outbox_rows().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lower_seq_committed_while_its_key_has_a_message_in_flight_waits_for_it() {
    let env = env().await;
    let recorder = Recorder::new();
    // The slow transaction takes the lower sequence number...
    let mut slow_client = env.pool.get().await.unwrap();
    let slow = slow_client.transaction().await.unwrap();
    let early = env
        .outbox
        .enqueue_in_tx(&slow, keyed(Some("a"), 0))
        .await
        .unwrap();
    // ...a later message of the key commits and is being published...
    let late = env.enqueue(vec![keyed(Some("a"), 1)]).await[0];
    let (busy, busy_recorder) = hold_in_flight(env.outbox.clone()).await;
    assert_eq!(busy_recorder.attempts()[0].out.message.id, late);
    // ...when the slow transaction commits.
    slow.commit().await.unwrap();

    let d = ordered(env.outbox.clone(), &recorder, 10, 5);
    assert_eq!(d.run_until_idle().await.unwrap().claimed, 0);

    busy.abort();
    let _ = busy.await;
    env.clock.advance(Duration::from_secs(31));
    d.run_until_idle().await.unwrap();
    assert_eq!(recorder.published_ids(), vec![early, late]);
}
