//! A fault-injecting TCP proxy that understands PostgreSQL's framing.
//!
//! [`FaultProxy`] listens on 127.0.0.1 and forwards each connection to an
//! upstream server (PostgreSQL, or any TCP server for the faults that need
//! no protocol knowledge). It can add latency, refuse new connections, close
//! every live connection, and — the reason it exists — cut one connection
//! exactly around the statement that commits, so that a test can produce an
//! *ambiguous commit*: the client's connection dies, yet the server
//! committed.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use saga_test_support::{fresh_database, proxy::{Cut, FaultProxy}};
//!
//! let db = fresh_database().await?;
//! let proxy = FaultProxy::start(saga_test_support::test_server().await?.socket_addr().await?).await?;
//! let (client, connection) = db.config_via(proxy.addr()).connect(tokio_postgres::NoTls).await?;
//! tokio::spawn(connection);
//!
//! proxy.arm(Cut::AfterExecute);
//! let fired = proxy.fired();
//! let result = client.batch_execute("CREATE TABLE t (id int)").await;
//! assert!(result.is_err()); // the client saw its connection die...
//! fired.await; // ...and once the cut is complete, the server has committed.
//! # Ok(()) }
//! ```
//!
//! Each cut is recorded ([`FaultProxy::cuts`]) with the statement it hit:
//! its SQL, its bind parameters, the client's `application_name` and the
//! port the server sees the connection come from (`inet_client_port()`),
//! so that a test can tell afterwards, from the database itself, which
//! write was cut and whether it committed. [`FaultProxy::hold`] holds one
//! chosen statement back until released: a write that reaches the server
//! late, as from a worker that stalled just before sending it.
//!
//! The proxy's tasks run on the tokio runtime that called
//! [`FaultProxy::start`].

mod connection;
mod hold;
mod intercepted;
mod shared;
mod wire;

use std::{
    future::Future,
    io,
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{net::TcpListener, sync::watch, task::JoinHandle};

pub use hold::Hold;
pub use intercepted::{CutRecord, Intercepted, transition_ids};
pub use shared::{Cut, ProxyStats};

use connection::accept_loop;
use hold::HoldSpec;
use shared::{Shared, Trigger};

/// A TCP proxy on 127.0.0.1 that injects network faults between clients
/// and a PostgreSQL server. See the [module documentation](self).
///
/// Dropping it stops it: the listener and every connection are closed.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

impl FaultProxy {
    /// Starts a proxy to `upstream`, listening on `127.0.0.1` on a free port.
    pub async fn start(upstream: SocketAddr) -> io::Result<Self> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            upstream,
            latency_micros: AtomicU64::new(0),
            refuse_new: AtomicBool::new(false),
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            resets: AtomicU64::new(0),
            trigger: Mutex::new(Trigger::default()),
            cuts: Mutex::new(Vec::new()),
            holds: Mutex::new(Vec::new()),
            next_hold: AtomicU64::new(0),
            delayed: AtomicU64::new(0),
            fired: watch::Sender::new(0),
            connections: Mutex::new(Vec::new()),
        });
        let accept = tokio::spawn(accept_loop(listener, Arc::clone(&shared)));
        Ok(Self {
            addr,
            shared,
            accept,
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server the proxy forwards to.
    pub fn upstream(&self) -> SocketAddr {
        self.shared.upstream
    }

    /// Delays each forwarded chunk of bytes, in both directions, by
    /// `latency` (zero turns it off). Applies to live connections too.
    pub fn set_latency(&self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.shared.latency_micros.store(micros, Ordering::Relaxed);
    }

    /// The latency set by [`FaultProxy::set_latency`].
    pub fn latency(&self) -> Duration {
        Duration::from_micros(self.shared.latency_micros.load(Ordering::Relaxed))
    }

    /// While `true`, new connections are accepted and closed at once, as in
    /// an outage; live connections are left alone.
    pub fn refuse_new(&self, refuse: bool) {
        self.shared.refuse_new.store(refuse, Ordering::SeqCst);
    }

    /// Closes both sides of every live connection, and returns how many it
    /// closed. When it returns, the sockets are closed.
    pub async fn reset_all(&self) -> usize {
        let connections = std::mem::take(&mut *self.shared.connections());
        let mut reset = 0;
        for connection in connections {
            if connection.is_finished() {
                continue;
            }
            connection.abort();
            if connection.await.is_err_and(|error| error.is_cancelled()) {
                reset += 1;
            }
        }
        self.shared.resets.fetch_add(reset as u64, Ordering::SeqCst);
        reset
    }

    /// Arms a one-shot [`Cut`], replacing any armed one.
    pub fn arm(&self, cut: Cut) {
        let mut trigger = self
            .shared
            .trigger
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        trigger.armed = Some(cut);
        trigger.target = trigger.claimed + 1;
    }

    /// Disarms the trigger; returns it if it had not fired.
    pub fn disarm(&self) -> Option<Cut> {
        self.shared
            .trigger
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .armed
            .take()
    }

    /// A future that resolves once the cut armed last (before this call) has
    /// been carried out: for a cut *before*, once the client's side is
    /// closed; for a cut *after*, once the server has also answered the
    /// batch (or closed, or 30 s passed) — so the statement has committed by
    /// then, if it commits at all. It also resolves if the connection ends,
    /// or is reset, before the cut is complete. It resolves at once if
    /// nothing was ever armed, and never for a trigger that is disarmed or
    /// never matches: wrap it in a timeout.
    pub fn fired(&self) -> impl Future<Output = ()> + Send + 'static {
        let target = self
            .shared
            .trigger
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .target;
        let mut fired = self.shared.fired.subscribe();
        async move {
            // The sender lives as long as the proxy's tasks; if it is gone,
            // so is any cut still to come.
            let _ = fired.wait_for(|count| *count >= target).await;
        }
    }

    /// How many cuts have been carried out.
    pub fn fired_count(&self) -> u64 {
        *self.shared.fired.borrow()
    }

    /// Every cut claimed so far, in order, with the statement it fell on.
    pub fn cuts(&self) -> Vec<CutRecord> {
        self.shared
            .cuts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Holds back the next statement, on any connection, whose SQL text
    /// contains `text` (ignoring ASCII case) and one of whose bind
    /// parameters is exactly `param` (as sent: binary for tokio-postgres).
    /// Bytes the client sent before it are forwarded; the statement and
    /// whatever follows on its connection wait until the [`Hold`] is
    /// released or dropped. The connection's other direction goes on.
    pub fn hold(&self, text: &str, param: &[u8]) -> Hold {
        let id = self.shared.next_hold.fetch_add(1, Ordering::Relaxed);
        let (reached_tx, reached) = watch::channel(None);
        let (release, release_rx) = watch::channel(false);
        self.shared
            .holds
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(HoldSpec {
                id,
                text: text.to_owned(),
                param: param.to_vec(),
                reached: reached_tx,
                release: release_rx,
            });
        Hold {
            id,
            shared: Arc::clone(&self.shared),
            reached,
            release,
        }
    }

    /// The proxy's counters.
    pub fn stats(&self) -> ProxyStats {
        let live = self
            .shared
            .connections()
            .iter()
            .filter(|connection| !connection.is_finished())
            .count();
        ProxyStats {
            accepted: self.shared.accepted.load(Ordering::SeqCst),
            refused: self.shared.refused.load(Ordering::SeqCst),
            resets: self.shared.resets.load(Ordering::SeqCst),
            cuts_fired: self.fired_count(),
            live: live as u64,
            delayed: self.shared.delayed.load(Ordering::Relaxed),
        }
    }

    /// Stops listening and closes every connection; when it returns, all
    /// the proxy's sockets are closed.
    pub async fn stop(mut self) {
        self.accept.abort();
        let _ = (&mut self.accept).await;
        let connections = std::mem::take(&mut *self.shared.connections());
        for connection in &connections {
            connection.abort();
        }
        for connection in connections {
            let _ = connection.await;
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        for connection in self.shared.connections().drain(..) {
            connection.abort();
        }
    }
}
