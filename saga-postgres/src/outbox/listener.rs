//! The `LISTEN` connection: a hint that messages were enqueued, never the
//! only way to find them.

use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_postgres::AsyncMessage;
use tokio_util::task::AbortOnDropHandle;

use super::dispatcher::loop_backoff;
use crate::error::chain;
use crate::tls::ConnectConfig;

/// The state of a dispatcher's `LISTEN` connection, and how far its claim
/// loops have caught up with the wake-ups it sent them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct ListenerStatus {
    /// Whether it is connected and listening right now.
    pub listening: bool,
    /// How many times it has connected and started listening (so a
    /// reconnection shows as a change even if it was quick).
    pub connections: u64,
    /// Wake-ups sent to the claim loops: one on each (re)connection (to
    /// catch up on what was committed while nobody listened; counted here
    /// by the time `listening` turns true), and one per burst of
    /// notifications.
    pub wake_ups: u64,
    /// The latest wake-up that a claim cycle has answered: a cycle that
    /// started after that wake-up was sent has finished without filling its
    /// batch. Once it reaches `wake_ups`, every message that was due and
    /// committed before the last wake-up has been claimed; the next cycle
    /// comes with the next notification (or the next poll).
    pub wake_ups_handled: u64,
    /// Times it failed: a connection attempt refused or cut short (wrong
    /// `sslmode` or certificate, authentication, an unreachable server)
    /// or a connection lost. Each is logged with its cause; polling
    /// delivers meanwhile.
    pub failures: u64,
}

/// Longest wait for a health check of the listening connection.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest pause between two reconnection attempts.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
enum ListenError {
    #[error("could not connect the listen connection")]
    Connect(#[source] tokio_postgres::Error),
    #[error("listen connection failed")]
    Db(#[from] tokio_postgres::Error),
    #[error("listen connection did not answer a health check within {0:?}")]
    Unresponsive(Duration),
    #[error("listen connection closed")]
    Closed,
}

/// Listens on `channel` until `stop`, bumping `wake` on every notification
/// and after every (re)connection (to catch up on what was committed while
/// not listening). Reconnects with backoff after a drop.
pub(crate) async fn listen(
    mut connect: ConnectConfig,
    schema: String,
    channel: String,
    health_every: Duration,
    wake: watch::Sender<u64>,
    status: watch::Sender<ListenerStatus>,
    mut stop: watch::Receiver<bool>,
) {
    let config = connect.config_mut();
    if config.get_application_name().is_none() {
        config.application_name("saga-outbox-listener");
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(5));
    }
    config.keepalives_idle(Duration::from_secs(30));
    let mut backoff = loop_backoff(MAX_RECONNECT_DELAY);
    loop {
        if *stop.borrow() {
            break;
        }
        let result = listen_once(
            &connect,
            &schema,
            &channel,
            health_every,
            &wake,
            &status,
            &mut stop,
        )
        .await;
        let was_listening = status.borrow().listening;
        status.send_modify(|s| s.listening = false);
        ::metrics::gauge!(crate::metrics::OUTBOX_LISTENER_CONNECTED, "schema" => schema.clone())
            .set(0.0);
        match result {
            Ok(()) => break,
            Err(e) => {
                if was_listening {
                    // It worked until now: start the backoff afresh.
                    backoff = loop_backoff(MAX_RECONNECT_DELAY);
                }
                let delay = backoff.next().unwrap_or(MAX_RECONNECT_DELAY);
                status.send_modify(|s| s.failures += 1);
                ::metrics::counter!(crate::metrics::OUTBOX_LISTENER_FAILURES, "schema" => schema.clone())
                    .increment(1);
                if was_listening {
                    tracing::warn!(channel = %channel, error = %chain(&e), retry_in = ?delay,
                        "outbox listener lost its connection; polling carries on; reconnecting");
                } else {
                    // Never listening: a setting (sslmode, certificate,
                    // password, host) is probably wrong, and wake-ups wait
                    // for the poll interval until it is fixed.
                    tracing::error!(channel = %channel, error = %chain(&e), retry_in = ?delay,
                        sslmode = %connect.ssl_mode(),
                        "outbox listener could not connect; polling carries on; retrying");
                }
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    _ = stop.changed() => {}
                }
            }
        }
    }
}

/// One connection's life: `Ok` when stopped, `Err` when the connection
/// failed.
async fn listen_once(
    connect: &ConnectConfig,
    schema: &str,
    channel: &str,
    health_every: Duration,
    wake: &watch::Sender<u64>,
    status: &watch::Sender<ListenerStatus>,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), ListenError> {
    let (client, mut connection) = connect
        .config()
        .connect(connect.connector())
        .await
        .map_err(ListenError::Connect)?;
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    // Drives the connection and forwards notifications.
    let driver = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(_))) => {
                    if tx.send(()).is_err() {
                        return;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "outbox listener connection failed");
                    return;
                }
                None => return,
            }
        }
    });
    // Aborted when this connection's life ends.
    let _driver = AbortOnDropHandle::new(driver);
    // The channel name is `<validated schema>_outbox`: a safe identifier.
    client
        .batch_execute(&format!("LISTEN \"{channel}\""))
        .await?;
    // Whatever was committed while nobody listened: whoever sees
    // `listening` also sees this catch-up wake-up counted in `wake_ups`.
    wake_up(wake, status, |s| {
        s.listening = true;
        s.connections += 1;
    });
    ::metrics::gauge!(crate::metrics::OUTBOX_LISTENER_CONNECTED, "schema" => schema.to_owned())
        .set(1.0);
    ::metrics::counter!(crate::metrics::OUTBOX_LISTENER_CONNECTIONS, "schema" => schema.to_owned())
        .increment(1);
    tracing::debug!(channel, "outbox listener is listening");
    let mut health = tokio::time::interval(health_every);
    health.tick().await;
    loop {
        tokio::select! {
            got = rx.recv() => match got {
                Some(()) => {
                    // One wake-up for everything that arrived together.
                    while rx.try_recv().is_ok() {}
                    wake_up(wake, status, |_| {});
                }
                None => return Err(ListenError::Closed),
            },
            _ = health.tick() => {
                match tokio::time::timeout(HEALTH_TIMEOUT, client.check_connection()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(e.into()),
                    Err(_) => return Err(ListenError::Unresponsive(HEALTH_TIMEOUT)),
                }
            }
            _ = stop.changed() => return Ok(()),
        }
    }
}

/// Wakes the claim loops, counting the wake-up in `status` (with `also`)
/// first: whoever sees a wake-up's effect finds it counted.
fn wake_up(
    wake: &watch::Sender<u64>,
    status: &watch::Sender<ListenerStatus>,
    also: impl FnOnce(&mut ListenerStatus),
) {
    let next = *wake.borrow() + 1;
    status.send_modify(|s| {
        s.wake_ups = s.wake_ups.max(next);
        also(s);
    });
    wake.send_replace(next);
}
