//! The in-process publisher through the dispatcher: a topic nobody handles
//! is dead-lettered; a failing or panicking handler makes the message come
//! back to every handler of its topic; a permanent error dead-letters it at
//! once.

mod outbox_support;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outbox_support::{Env, env, fixed_policy, msg};
use saga_core::MessageId;
use saga_postgres::outbox::{Dispatcher, InProcessPublisher, Outgoing, PublishError};

fn dispatcher(env: &Env, publisher: InProcessPublisher) -> Dispatcher<InProcessPublisher> {
    Dispatcher::builder(env.outbox.clone(), publisher)
        .retry_policy(fixed_policy(3))
        .build()
        .unwrap()
}

/// What a handler was given: (message id, attempt), in order.
type Seen = Arc<Mutex<Vec<(MessageId, u32)>>>;

fn seen(log: &Seen) -> Vec<(MessageId, u32)> {
    log.lock().unwrap().clone()
}

fn record(log: &Seen, out: &Outgoing) {
    log.lock().unwrap().push((out.message.id, out.attempt));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_with_no_handler_is_dead_lettered_and_its_last_error_says_so() {
    let env = env().await;
    let ids = env
        .enqueue(vec![msg("nobody.listens", 0), msg("handled", 1)])
        .await;
    let handled = Seen::default();
    let log = handled.clone();
    let publisher = InProcessPublisher::new().handle("handled", move |out| {
        record(&log, &out);
        async { Ok(()) }
    });
    let d = dispatcher(&env, publisher);

    let report = d.dispatch_once().await.unwrap();
    assert_eq!((report.claimed, report.published), (2, 1));
    assert_eq!((report.retried, report.dead_lettered), (0, 1));
    assert_eq!(seen(&handled), vec![(ids[1], 1)]);

    let dead = env.outbox.dead_letters(10, None).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].message.id, ids[0]);
    assert_eq!(dead[0].attempts, 1, "dead at once, not retried");
    let error = dead[0].last_error.as_deref().unwrap();
    assert!(
        error.contains("no in-process handler is registered for topic `nobody.listens`"),
        "{error}"
    );
    assert_eq!(env.outbox_rows().await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_fails_once_makes_every_handler_of_the_topic_see_the_message_again() {
    let env = env().await;
    let id = env.enqueue(vec![msg("order.paid", 0)]).await[0];
    let (flaky_seen, steady_seen) = (Seen::default(), Seen::default());
    let (flaky_log, steady_log) = (flaky_seen.clone(), steady_seen.clone());
    let calls = Arc::new(AtomicU32::new(0));
    let publisher = InProcessPublisher::new()
        .handle("order.paid", move |out| {
            record(&flaky_log, &out);
            let call = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                if call == 0 {
                    Err("ledger unavailable".into())
                } else {
                    Ok(())
                }
            }
        })
        .handle("order.paid", move |out| {
            record(&steady_log, &out);
            async { Ok(()) }
        });
    let d = dispatcher(&env, publisher);

    // Attempt 1: one handler fails, so the message is rescheduled...
    let report = d.dispatch_once().await.unwrap();
    assert_eq!((report.retried, report.published), (1, 0));
    let (attempts, error, _, dead) = env.row(id).await.unwrap();
    assert_eq!((attempts, dead), (1, false));
    let error = error.unwrap();
    assert!(error.contains("ledger unavailable"), "{error}");

    // ...and attempt 2 goes to both handlers again, the one that had
    // succeeded included.
    env.clock.advance(Duration::from_secs(1));
    let report = d.dispatch_once().await.unwrap();
    assert_eq!(report.published, 1);
    assert_eq!(seen(&flaky_seen), vec![(id, 1), (id, 2)]);
    assert_eq!(seen(&steady_seen), vec![(id, 1), (id, 2)]);
    assert_eq!(env.outbox_rows().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_fails_its_message_which_is_retried_with_the_panic_as_last_error() {
    let env = env().await;
    let ids = env.enqueue(vec![msg("t", 0), msg("t", 1)]).await;
    let poisoned = ids[0];
    let handled = Seen::default();
    let log = handled.clone();
    let panicked = Arc::new(AtomicU32::new(0));
    let publisher = InProcessPublisher::new().handle("t", move |out| {
        record(&log, &out);
        let panics = out.message.id == poisoned && panicked.fetch_add(1, Ordering::SeqCst) == 0;
        async move {
            if panics {
                panic!("handler bug");
            }
            Ok(())
        }
    });
    let d = dispatcher(&env, publisher);

    let report = d.dispatch_once().await.unwrap();
    assert_eq!((report.published, report.retried), (1, 1), "{report:?}");
    let (attempts, error, _, dead) = env.row(poisoned).await.unwrap();
    assert_eq!((attempts, dead), (1, false), "retried, not dead");
    let error = error.unwrap();
    assert!(
        error.contains("an in-process handler panicked: handler bug"),
        "{error}"
    );

    env.clock.advance(Duration::from_secs(1));
    assert_eq!(d.dispatch_once().await.unwrap().published, 1);
    let mut got = seen(&handled);
    got.sort();
    let mut want = vec![(ids[0], 1), (ids[0], 2), (ids[1], 1)];
    want.sort();
    assert_eq!(got, want);
    assert_eq!(env.outbox_rows().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_returning_a_permanent_error_is_dead_lettered_at_once() {
    let env = env().await;
    let id = env.enqueue(vec![msg("t", 0)]).await[0];
    let handled = Seen::default();
    let log = handled.clone();
    let publisher = InProcessPublisher::new().handle("t", move |out| {
        record(&log, &out);
        async { Err(PublishError::permanent("order 17 does not exist").into()) }
    });
    let d = dispatcher(&env, publisher);

    let report = d.dispatch_once().await.unwrap();
    assert_eq!((report.retried, report.dead_lettered), (0, 1));
    let dead = env.outbox.dead_letters(10, None).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!((dead[0].message.id, dead[0].attempts), (id, 1));
    let error = dead[0].last_error.as_deref().unwrap();
    assert!(error.contains("order 17 does not exist"), "{error}");
    assert!(error.contains("dead-lettered"), "{error}");

    // Its budget (3 attempts) is not spent on it: nothing comes back.
    env.clock.advance(Duration::from_secs(3600));
    assert_eq!(d.run_until_idle().await.unwrap().claimed, 0);
    assert_eq!(seen(&handled), vec![(id, 1)]);
}
