//! Wake-up by `LISTEN/NOTIFY` is a hint: it wakes an idle dispatcher, it
//! reconnects after a drop, and while it is down polling still delivers.

mod outbox_support;

use std::sync::Arc;
use std::time::Duration;

use outbox_support::{Env, Recorder, Running, WAIT, env, msg};
use saga_postgres::outbox::{DispatcherBuilder, ListenerStatus};
use saga_test_support::proxy::FaultProxy;
use tokio::sync::watch;

/// A dispatcher that listens on `listen` and polls every `poll`, running
/// in the background.
fn start(
    env: &Env,
    recorder: &Arc<Recorder>,
    listen: tokio_postgres::Config,
    poll: Duration,
) -> Running {
    let dispatcher = DispatcherBuilder::from_arc(env.outbox.clone(), recorder.clone())
        .poll_interval(poll)
        .stats_interval(None)
        .listen(listen)
        .build()
        .unwrap();
    Running::start(dispatcher)
}

async fn wait_status(
    rx: &mut watch::Receiver<ListenerStatus>,
    what: &str,
    f: impl FnMut(&ListenerStatus) -> bool,
) {
    tokio::time::timeout(WAIT, rx.wait_for(f))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for the listener to be {what}"))
        .unwrap();
}

/// Long enough that a delivery within the test's wait cannot come from
/// polling.
const NEVER: Duration = Duration::from_secs(3600);

/// Waits until the claim loops have answered every wake-up sent so far, the
/// catch-up after the last (re)connection included: from then on, with
/// polling out of the picture, only a new notification makes the dispatcher
/// look at the outbox again. Returns the status at that point.
async fn wait_idle(rx: &mut watch::Receiver<ListenerStatus>) -> ListenerStatus {
    let sent = rx.borrow().wake_ups;
    assert!(sent >= 1, "the catch-up wake-up is counted once listening");
    wait_status(rx, "caught up", |s| s.wake_ups_handled >= sent).await;
    *rx.borrow()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notification_wakes_an_idle_dispatcher() {
    let env = env().await;
    let recorder = Recorder::new();
    let running = start(&env, &recorder, env.test_schema.config(), NEVER);
    let mut status = running.dispatcher.listener_status();
    wait_status(&mut status, "listening", |s| s.listening).await;
    let idle = wait_idle(&mut status).await;

    let ids = env.enqueue(vec![msg("t", 1)]).await;
    recorder.wait_published(1).await;
    assert_eq!(recorder.published_ids(), ids);
    // Woken by the notification: one more wake-up, on the same connection.
    let now = *status.borrow();
    assert!(now.wake_ups > idle.wake_ups, "{idle:?} -> {now:?}");
    assert_eq!(now.connections, 1);
    running.stop().await;
    assert_eq!(env.outbox_rows().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_reconnects_after_its_connection_drops() {
    let env = env().await;
    let server = saga_test_support::test_server().await.unwrap();
    let proxy = FaultProxy::start(server.socket_addr().await.unwrap())
        .await
        .unwrap();
    let recorder = Recorder::new();
    let running = start(
        &env,
        &recorder,
        env.test_schema.config_via(proxy.addr()),
        NEVER,
    );
    let mut status = running.dispatcher.listener_status();
    wait_status(&mut status, "listening", |s| {
        s.listening && s.connections == 1
    })
    .await;

    assert_eq!(proxy.reset_all().await, 1, "the listener's connection");
    wait_status(&mut status, "listening again", |s| {
        s.listening && s.connections == 2
    })
    .await;
    let idle = wait_idle(&mut status).await;

    // Notifications reach it again (polling would take an hour, and the
    // catch-up after the reconnection is over).
    let ids = env.enqueue(vec![msg("t", 1)]).await;
    recorder.wait_published(1).await;
    assert_eq!(recorder.published_ids(), ids);
    let now = *status.borrow();
    assert!(now.wake_ups > idle.wake_ups, "{idle:?} -> {now:?}");
    assert_eq!(now.connections, 2);
    running.stop().await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_listen_connection_dropped_polling_still_delivers() {
    let env = env().await;
    let server = saga_test_support::test_server().await.unwrap();
    let proxy = FaultProxy::start(server.socket_addr().await.unwrap())
        .await
        .unwrap();
    let recorder = Recorder::new();
    let running = start(
        &env,
        &recorder,
        env.test_schema.config_via(proxy.addr()),
        Duration::from_millis(100),
    );
    let mut status = running.dispatcher.listener_status();
    wait_status(&mut status, "listening", |s| s.listening).await;

    // The listener's connection drops and cannot come back.
    proxy.refuse_new(true);
    proxy.reset_all().await;
    wait_status(&mut status, "down", |s| !s.listening).await;

    let ids = env.enqueue(vec![msg("t", 1), msg("t", 2)]).await;
    recorder.wait_published(2).await;
    assert_eq!(recorder.published_ids(), ids);
    // Delivered while the listener was still down: polling did it.
    let now = *status.borrow();
    assert!(!now.listening && now.connections == 1, "{now:?}");

    // And once the network is back, it listens again.
    proxy.refuse_new(false);
    wait_status(&mut status, "listening again", |s| {
        s.listening && s.connections == 2
    })
    .await;
    running.stop().await;
    proxy.stop().await;
}
