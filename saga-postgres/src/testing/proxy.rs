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
//! use saga_postgres::testing::{fresh_database, proxy::{Cut, FaultProxy}};
//!
//! let db = fresh_database().await?;
//! let proxy = FaultProxy::start(saga_postgres::testing::test_server().await?.socket_addr().await?).await?;
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

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpListener, TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
    sync::{oneshot, watch},
    task::JoinHandle,
};

/// The request codes of the untyped packets a client may send first.
const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;
const CANCEL_REQUEST: u32 = 80_877_102;
/// libpq's limit on a startup packet.
const MAX_STARTUP_LEN: usize = 10_000;
/// How long, after a cut, the server side stays open for the server to
/// answer the batch it was sent.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);
/// The Terminate message.
const TERMINATE: [u8; 5] = [b'X', 0, 0, 0, 4];
const BUFFER: usize = 16 * 1024;

/// Where to cut the next connection that runs a statement.
///
/// A statement is run by a simple Query message (`Q`) or by an Execute
/// message (`E`) of the extended protocol. The trigger fires once, on the
/// first matching message of any connection, and then disarms.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Cut {
    /// Forward the statement and the rest of its batch (up to and including
    /// the next Sync, or Flush; for a simple Query, the Query itself) to the
    /// server, then close the client's side and discard whatever the server
    /// answers. The server side stays open until the server has answered
    /// the batch (ReadyForQuery), so the statement runs to completion and,
    /// outside an explicit transaction, commits: an ambiguous commit.
    AfterExecute,
    /// Close the client's side instead of forwarding the statement: neither
    /// it nor anything the client sent with it reaches the server, which
    /// then sees its connection closed.
    BeforeExecute,
    /// [`Cut::AfterExecute`], but only for a statement whose SQL text (of
    /// the Query, or of the Parse behind the executed portal) contains this
    /// text, ignoring ASCII case. `AfterQueryContaining("COMMIT".into())`
    /// cuts a connection while its transaction commits.
    AfterQueryContaining(String),
    /// [`Cut::BeforeExecute`], but only for a statement whose SQL text
    /// contains this text, ignoring ASCII case.
    BeforeQueryContaining(String),
}

/// Counters of a [`FaultProxy`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProxyStats {
    /// Connections accepted and forwarded.
    pub accepted: u64,
    /// Connections accepted and closed at once because of
    /// [`FaultProxy::refuse_new`].
    pub refused: u64,
    /// Live connections closed by [`FaultProxy::reset_all`].
    pub resets: u64,
    /// Cuts carried out (see [`FaultProxy::fired`]).
    pub cuts_fired: u64,
    /// Connections being forwarded now.
    pub live: u64,
    /// Chunks of bytes delayed by [`FaultProxy::set_latency`].
    pub delayed: u64,
}

/// A statement the proxy intercepted (cut or held).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Intercepted {
    /// Its SQL text, if known (the Query's, or that of the Parse behind
    /// the executed portal).
    pub sql: Option<String>,
    /// Its bind parameters as sent (`None` for NULL), in the format the
    /// client chose (tokio-postgres sends binary: a `uuid` is its 16
    /// bytes). Empty for a simple Query.
    pub params: Vec<Option<Vec<u8>>>,
    /// The `application_name` of the client's startup message.
    pub application_name: Option<String>,
    /// The local port of the proxy's connection to the server: what the
    /// server reports as `inet_client_port()` for this session.
    pub upstream_port: Option<u16>,
}

impl Intercepted {
    /// The parameter `$n` (numbered from 1, as in SQL).
    pub fn param(&self, n: usize) -> Option<&[u8]> {
        self.params.get(n.checked_sub(1)?)?.as_deref()
    }
}

/// A cut the proxy carried out (see [`FaultProxy::cuts`]).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct CutRecord {
    /// `true` for a cut after the statement was forwarded (its reply is
    /// lost), `false` for one before (it never reached the server).
    pub after: bool,
    /// The statement the cut fell on.
    pub statement: Intercepted,
}

/// Which side of the statement the cut falls on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum When {
    Before,
    After,
}

#[derive(Debug, Default)]
struct Trigger {
    armed: Option<Cut>,
    /// Cuts claimed by a connection so far.
    claimed: u64,
    /// The cut count that the latest `arm` waits for.
    target: u64,
}

#[derive(Debug)]
struct Shared {
    upstream: SocketAddr,
    latency_micros: AtomicU64,
    refuse_new: AtomicBool,
    accepted: AtomicU64,
    refused: AtomicU64,
    resets: AtomicU64,
    trigger: Mutex<Trigger>,
    /// Every cut claimed, with its statement.
    cuts: Mutex<Vec<CutRecord>>,
    /// Statements to hold back, waiting for a match.
    holds: Mutex<Vec<HoldSpec>>,
    next_hold: AtomicU64,
    delayed: AtomicU64,
    /// The number of cuts carried out.
    fired: watch::Sender<u64>,
    connections: Mutex<Vec<JoinHandle<()>>>,
}

impl Shared {
    async fn delay(&self) {
        let micros = self.latency_micros.load(Ordering::Relaxed);
        if micros > 0 {
            self.delayed.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_micros(micros)).await;
        }
    }

    /// Takes the armed trigger if this statement matches it, and records
    /// the cut.
    fn claim(&self, statement: &Intercepted) -> Option<When> {
        let sql = statement.sql.as_deref();
        let mut trigger = self.trigger.lock().unwrap_or_else(PoisonError::into_inner);
        let when = match trigger.armed.as_ref()? {
            Cut::AfterExecute => When::After,
            Cut::BeforeExecute => When::Before,
            Cut::AfterQueryContaining(text) if contains_ignoring_case(sql, text) => When::After,
            Cut::BeforeQueryContaining(text) if contains_ignoring_case(sql, text) => When::Before,
            Cut::AfterQueryContaining(_) | Cut::BeforeQueryContaining(_) => return None,
        };
        trigger.armed = None;
        trigger.claimed += 1;
        self.cuts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(CutRecord {
                after: when == When::After,
                statement: statement.clone(),
            });
        Some(when)
    }

    /// Takes the first hold this statement matches: tells its owner, and
    /// returns what releases it.
    fn take_hold(&self, statement: &Intercepted) -> Option<watch::Receiver<bool>> {
        let mut holds = self.holds.lock().unwrap_or_else(PoisonError::into_inner);
        let index = holds.iter().position(|hold| hold.matches(statement))?;
        let hold = holds.remove(index);
        let _ = hold.reached.send(Some(statement.clone()));
        Some(hold.release)
    }

    fn cut_done(&self) {
        self.fired.send_modify(|fired| *fired += 1);
    }

    fn connections(&self) -> std::sync::MutexGuard<'_, Vec<JoinHandle<()>>> {
        self.connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// A statement to hold back: its SQL contains `text` and one of its bind
/// parameters is `param`.
#[derive(Debug)]
struct HoldSpec {
    id: u64,
    text: String,
    param: Vec<u8>,
    reached: watch::Sender<Option<Intercepted>>,
    release: watch::Receiver<bool>,
}

impl HoldSpec {
    fn matches(&self, statement: &Intercepted) -> bool {
        contains_ignoring_case(statement.sql.as_deref(), &self.text)
            && statement
                .params
                .iter()
                .any(|p| p.as_deref() == Some(self.param.as_slice()))
    }
}

/// A statement held back by [`FaultProxy::hold`]. Dropping it releases the
/// statement (or, if none matched yet, withdraws the hold).
#[derive(Debug)]
pub struct Hold {
    id: u64,
    shared: Arc<Shared>,
    reached: watch::Receiver<Option<Intercepted>>,
    release: watch::Sender<bool>,
}

impl Hold {
    /// Resolves once a matching statement has arrived and is being held,
    /// with that statement; never, if none comes: wrap it in a timeout.
    pub async fn reached(&mut self) -> Intercepted {
        let held = self
            .reached
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|held| held.clone());
        match held {
            Some(held) => held,
            None => std::future::pending().await,
        }
    }

    /// The statement held, if one has arrived.
    pub fn held(&self) -> Option<Intercepted> {
        self.reached.borrow().clone()
    }

    /// Forwards the held statement (and what the client sent after it).
    pub fn release(self) {
        drop(self);
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.shared
            .holds
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|hold| hold.id != self.id);
        let _ = self.release.send(true);
    }
}

fn contains_ignoring_case(haystack: Option<&str>, needle: &str) -> bool {
    haystack.is_some_and(|haystack| {
        haystack
            .to_ascii_lowercase()
            .contains(&needle.to_ascii_lowercase())
    })
}

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

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let client = match listener.accept().await {
            Ok((client, _)) => client,
            Err(_) => {
                // Out of file descriptors or the like: try again shortly
                // rather than spin.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if shared.refuse_new.load(Ordering::SeqCst) {
            shared.refused.fetch_add(1, Ordering::SeqCst);
            drop(client);
            continue;
        }
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        let task = tokio::spawn(proxy_connection(client, Arc::clone(&shared)));
        let mut connections = shared.connections();
        connections.retain(|connection| !connection.is_finished());
        connections.push(task);
    }
}

/// The server's side of a connection, handed over when the client's side
/// is cut.
struct CutOrder {
    when: When,
    server: OwnedWriteHalf,
    firing: Firing,
}

/// A claimed cut, counted as carried out when dropped: once the cut is
/// complete, or if the connection ends (or is reset) first.
struct Firing(Arc<Shared>);

impl Drop for Firing {
    fn drop(&mut self) {
        self.0.cut_done();
    }
}

async fn proxy_connection(mut client: TcpStream, shared: Arc<Shared>) {
    let _ = client.set_nodelay(true);
    let Ok(Some(startup)) = read_startup(&mut client).await else {
        return;
    };
    let Ok(mut server) = TcpStream::connect(shared.upstream).await else {
        return;
    };
    let _ = server.set_nodelay(true);
    let session = Session {
        application_name: startup_parameter(&startup.bytes, "application_name"),
        upstream_port: server.local_addr().ok().map(|addr| addr.port()),
    };
    shared.delay().await;
    if server.write_all(&startup.bytes).await.is_err() {
        return;
    }
    // After a startup message the protocol is framed; after a cancel
    // request the bytes are forwarded as they come.
    let framed = startup.code != CANCEL_REQUEST;
    // The server sends one ReadyForQuery after the startup, and one per
    // Sync, Query or FunctionCall.
    let ready_expected = AtomicU64::new(u64::from(framed));
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let (cut_tx, cut_rx) = oneshot::channel();
    let upstream = client_to_server(
        client_read,
        server_write,
        framed,
        &shared,
        &session,
        cut_tx,
        &ready_expected,
    );
    let downstream = server_to_client(server_read, client_write, &shared, cut_rx, &ready_expected);
    tokio::pin!(upstream, downstream);
    let mut upstream_done = false;
    // The connection ends when the server's side ends (the client may have
    // left earlier: the server then closes after the Terminate or EOF).
    loop {
        tokio::select! {
            () = &mut upstream, if !upstream_done => upstream_done = true,
            () = &mut downstream => break,
        }
    }
}

struct Startup {
    bytes: Vec<u8>,
    code: u32,
}

/// What a connection's startup said about it.
#[derive(Debug, Default)]
struct Session {
    application_name: Option<String>,
    upstream_port: Option<u16>,
}

/// The value of `name` among a startup message's parameters (pairs of
/// NUL-terminated strings after the length and protocol version).
fn startup_parameter(startup: &[u8], name: &str) -> Option<String> {
    let mut rest = startup.get(8..)?;
    while let Some((key, after_key)) = c_string(rest) {
        if key.is_empty() {
            return None;
        }
        let (value, after_value) = c_string(after_key)?;
        if key == name {
            return Some(value);
        }
        rest = after_value;
    }
    None
}

/// Reads the untyped packets that open a connection, answering `N` (no) to
/// SSL and GSS encryption requests, up to the startup message or cancel
/// request, which is returned to be forwarded.
async fn read_startup(client: &mut TcpStream) -> io::Result<Option<Startup>> {
    loop {
        let mut length = [0_u8; 4];
        client.read_exact(&mut length).await?;
        let len = u32::from_be_bytes(length) as usize;
        if !(8..=MAX_STARTUP_LEN).contains(&len) {
            return Ok(None);
        }
        let mut bytes = vec![0_u8; len];
        bytes[..4].copy_from_slice(&length);
        client.read_exact(&mut bytes[4..]).await?;
        let code = u32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
        if code == SSL_REQUEST || code == GSSENC_REQUEST {
            client.write_all(b"N").await?;
            continue;
        }
        return Ok(Some(Startup { bytes, code }));
    }
}

async fn client_to_server(
    mut client: OwnedReadHalf,
    mut server: OwnedWriteHalf,
    framed: bool,
    shared: &Arc<Shared>,
    session: &Session,
    cut_tx: oneshot::Sender<CutOrder>,
    ready_expected: &AtomicU64,
) {
    let mut framer = Framer {
        buffer: Vec::new(),
        opaque: !framed,
    };
    let mut statements = Statements::default();
    let mut buffer = vec![0_u8; BUFFER];
    // Set once a cut has matched.
    let mut firing = None;
    loop {
        let read = match client.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(read) => read,
        };
        framer.push(&buffer[..read]);
        let mut out = Vec::new();
        let mut cut = None;
        while let Some(frame) = framer.next() {
            let (tag, bytes) = match frame {
                Frame::Opaque(bytes) => {
                    out.extend_from_slice(&bytes);
                    continue;
                }
                Frame::Message { tag, bytes } => (tag, bytes),
            };
            let executes = statements
                .observe(tag, &bytes[5..])
                .map(|executed| Intercepted {
                    sql: executed.sql,
                    params: executed.params,
                    application_name: session.application_name.clone(),
                    upstream_port: session.upstream_port,
                });
            if let Some(statement) = &executes
                && let Some(mut release) = shared.take_hold(statement)
            {
                // Forward what came before it, then wait.
                if !out.is_empty() {
                    shared.delay().await;
                    if server.write_all(&out).await.is_err() {
                        return;
                    }
                    out.clear();
                }
                let _ = release.wait_for(|released| *released).await;
            }
            if firing.is_none()
                && let Some(statement) = &executes
                && let Some(when) = shared.claim(statement)
            {
                firing = Some(Firing(Arc::clone(shared)));
                if when == When::Before {
                    cut = Some(When::Before);
                    break;
                }
            }
            out.extend_from_slice(&bytes);
            if matches!(tag, b'S' | b'Q' | b'F') {
                ready_expected.fetch_add(1, Ordering::SeqCst);
            }
            // After an "after" cut has matched, forward up to the end of
            // the batch.
            if firing.is_some() && matches!(tag, b'S' | b'H' | b'Q') {
                cut = Some(When::After);
                break;
            }
        }
        if cut == Some(When::Before) {
            // Nothing from this read reaches the server.
            out.clear();
        }
        if !out.is_empty() {
            shared.delay().await;
            if server.write_all(&out).await.is_err() {
                return;
            }
        }
        if let Some(when) = cut
            && let Some(firing) = firing.take()
        {
            // Returning drops the client's read half; the other side drops
            // the write half and so closes the client's connection.
            let _ = cut_tx.send(CutOrder {
                when,
                server,
                firing,
            });
            return;
        }
    }
}

async fn server_to_client(
    mut server: OwnedReadHalf,
    client: OwnedWriteHalf,
    shared: &Shared,
    cut_rx: oneshot::Receiver<CutOrder>,
    ready_expected: &AtomicU64,
) {
    let mut client = client;
    let mut cut_rx = Some(cut_rx);
    let mut counter = ReadyCounter::default();
    let mut buffer = vec![0_u8; BUFFER];
    let order = loop {
        tokio::select! {
            biased;
            order = next_order(&mut cut_rx) => match order {
                Some(order) => break order,
                // The client left without a cut: keep forwarding until the
                // server closes.
                None => cut_rx = None,
            },
            read = server.read(&mut buffer) => {
                let read = match read {
                    Ok(0) | Err(_) => return,
                    Ok(read) => read,
                };
                counter.feed(&buffer[..read]);
                shared.delay().await;
                if client.write_all(&buffer[..read]).await.is_err() {
                    return;
                }
            }
        }
    };
    drop(client);
    let CutOrder {
        when,
        server: mut server_write,
        firing,
    } = order;
    if when == When::After {
        let target = ready_expected.load(Ordering::SeqCst);
        let _ = tokio::time::timeout(DRAIN_LIMIT, async {
            while counter.ready < target {
                match server.read(&mut buffer).await {
                    Ok(0) | Err(_) => break,
                    Ok(read) => counter.feed(&buffer[..read]),
                }
            }
        })
        .await;
        let _ = server_write.write_all(&TERMINATE).await;
    }
    drop(server_write);
    drop(server);
    drop(firing);
}

async fn next_order(cut_rx: &mut Option<oneshot::Receiver<CutOrder>>) -> Option<CutOrder> {
    match cut_rx {
        Some(receiver) => receiver.await.ok(),
        None => std::future::pending().await,
    }
}

/// One unit of the client's byte stream.
#[derive(Debug, PartialEq, Eq)]
enum Frame {
    /// A whole message: type byte, length, body.
    Message { tag: u8, bytes: Vec<u8> },
    /// Bytes forwarded without looking (after a cancel request, or once
    /// the stream stopped making sense).
    Opaque(Vec<u8>),
}

/// Splits the client's stream (after the startup packet) into messages.
#[derive(Debug, Default)]
struct Framer {
    buffer: Vec<u8>,
    opaque: bool,
}

impl Framer {
    fn push(&mut self, data: &[u8]) {
        self.buffer.extend_from_slice(data);
    }

    fn next(&mut self) -> Option<Frame> {
        if self.buffer.is_empty() {
            return None;
        }
        if self.opaque {
            return Some(Frame::Opaque(std::mem::take(&mut self.buffer)));
        }
        if self.buffer.len() < 5 {
            return None;
        }
        let len = u32::from_be_bytes([
            self.buffer[1],
            self.buffer[2],
            self.buffer[3],
            self.buffer[4],
        ]) as usize;
        if len < 4 {
            self.opaque = true;
            return self.next();
        }
        let total = len + 1;
        if self.buffer.len() < total {
            return None;
        }
        let bytes: Vec<u8> = self.buffer.drain(..total).collect();
        Some(Frame::Message {
            tag: bytes[0],
            bytes,
        })
    }
}

/// Counts the server's ReadyForQuery messages without buffering its stream.
#[derive(Debug, Default)]
struct ReadyCounter {
    header: [u8; 5],
    header_len: usize,
    /// Body bytes of the current message still to skip.
    remaining: usize,
    ready: u64,
}

impl ReadyCounter {
    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.remaining > 0 {
                let skip = self.remaining.min(data.len());
                self.remaining -= skip;
                data = &data[skip..];
                continue;
            }
            let take = (5 - self.header_len).min(data.len());
            self.header[self.header_len..self.header_len + take].copy_from_slice(&data[..take]);
            self.header_len += take;
            data = &data[take..];
            if self.header_len == 5 {
                let len = u32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]) as usize;
                if self.header[0] == b'Z' {
                    self.ready += 1;
                }
                self.remaining = len.saturating_sub(4);
                self.header_len = 0;
            }
        }
    }
}

/// The SQL behind prepared statements and portals, to know what an
/// Execute runs.
#[derive(Debug, Default)]
struct Statements {
    prepared: HashMap<String, String>,
    portals: HashMap<String, Executed>,
}

/// A statement being run: its SQL text if known, and its parameters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Executed {
    sql: Option<String>,
    params: Vec<Option<Vec<u8>>>,
}

/// The parameter values of a Bind message's body after the portal and
/// statement names: format codes, then each value (length -1 is NULL).
fn bind_parameters(mut data: &[u8]) -> Option<Vec<Option<Vec<u8>>>> {
    fn take<'a>(data: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, tail) = (data.get(..n)?, data.get(n..)?);
        *data = tail;
        Some(head)
    }
    let formats = u16::from_be_bytes(take(&mut data, 2)?.try_into().ok()?);
    take(&mut data, 2 * usize::from(formats))?;
    let count = u16::from_be_bytes(take(&mut data, 2)?.try_into().ok()?);
    let mut params = Vec::with_capacity(usize::from(count));
    for _ in 0..count {
        let len = i32::from_be_bytes(take(&mut data, 4)?.try_into().ok()?);
        params.push(match usize::try_from(len) {
            Ok(len) => Some(take(&mut data, len)?.to_vec()),
            Err(_) => None,
        });
    }
    Some(params)
}

impl Statements {
    /// Records what a message defines. For a message that runs a statement
    /// (Query, Execute), returns `Some` with its SQL text (if known) and
    /// parameters.
    fn observe(&mut self, tag: u8, body: &[u8]) -> Option<Executed> {
        match tag {
            b'P' => {
                if let Some((name, rest)) = c_string(body)
                    && let Some((query, _)) = c_string(rest)
                {
                    self.prepared.insert(name, query);
                }
                None
            }
            b'B' => {
                if let Some((portal, rest)) = c_string(body) {
                    let named = c_string(rest);
                    let sql = named
                        .as_ref()
                        .and_then(|(name, _)| self.prepared.get(name).cloned());
                    let params = named
                        .and_then(|(_, rest)| bind_parameters(rest))
                        .unwrap_or_default();
                    self.portals.insert(portal, Executed { sql, params });
                }
                None
            }
            b'C' => {
                if let Some((&kind, rest)) = body.split_first()
                    && let Some((name, _)) = c_string(rest)
                {
                    match kind {
                        b'S' => {
                            self.prepared.remove(&name);
                        }
                        b'P' => {
                            self.portals.remove(&name);
                        }
                        _ => {}
                    }
                }
                None
            }
            b'Q' => Some(Executed {
                sql: c_string(body).map(|(query, _)| query),
                params: Vec::new(),
            }),
            b'E' => Some(
                c_string(body)
                    .and_then(|(portal, _)| self.portals.get(&portal).cloned())
                    .unwrap_or_default(),
            ),
            _ => None,
        }
    }
}

/// A NUL-terminated string and what follows it.
fn c_string(data: &[u8]) -> Option<(String, &[u8])> {
    let end = data.iter().position(|&byte| byte == 0)?;
    Some((
        String::from_utf8_lossy(&data[..end]).into_owned(),
        &data[end + 1..],
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut bytes = vec![tag];
        bytes.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        bytes.extend_from_slice(body);
        bytes
    }

    #[test]
    fn the_framer_splits_messages_across_reads() {
        let parse = message(b'P', b"s1\0INSERT INTO t VALUES (1)\0\0\0");
        let sync = message(b'S', b"");
        let stream: Vec<u8> = [parse.clone(), sync.clone()].concat();
        let mut framer = Framer::default();
        framer.push(&stream[..3]);
        assert_eq!(framer.next(), None, "a header is not a message");
        framer.push(&stream[3..parse.len() + 2]);
        assert_eq!(
            framer.next(),
            Some(Frame::Message {
                tag: b'P',
                bytes: parse
            })
        );
        assert_eq!(framer.next(), None);
        framer.push(&stream[stream.len() - 3..]);
        assert_eq!(
            framer.next(),
            Some(Frame::Message {
                tag: b'S',
                bytes: sync
            })
        );
    }

    #[test]
    fn a_nonsense_length_makes_the_stream_opaque() {
        let mut framer = Framer::default();
        framer.push(&[b'Q', 0, 0, 0, 1, 42]);
        assert_eq!(
            framer.next(),
            Some(Frame::Opaque(vec![b'Q', 0, 0, 0, 1, 42]))
        );
        framer.push(b"more");
        assert_eq!(framer.next(), Some(Frame::Opaque(b"more".to_vec())));
    }

    #[test]
    fn ready_for_query_is_counted_across_chunks() {
        let stream: Vec<u8> = [
            message(b'C', b"INSERT 0 1\0"),
            message(b'Z', b"I"),
            message(b'D', b"ZZZZZZ"),
            message(b'Z', b"T"),
        ]
        .concat();
        for chunk in [1, 2, 3, 7, stream.len()] {
            let mut counter = ReadyCounter::default();
            for piece in stream.chunks(chunk) {
                counter.feed(piece);
            }
            assert_eq!(counter.ready, 2, "chunks of {chunk}");
        }
    }

    fn sql(executed: Option<Executed>) -> Option<Option<String>> {
        executed.map(|e| e.sql)
    }

    #[test]
    fn an_execute_is_traced_to_its_parse() {
        let mut statements = Statements::default();
        assert_eq!(statements.observe(b'P', b"s7\0COMMIT\0\0\0"), None);
        assert_eq!(statements.observe(b'B', b"\0s7\0\0\0\0\0\0\0"), None);
        assert_eq!(
            sql(statements.observe(b'E', b"\0\0\0\0\0")),
            Some(Some("COMMIT".to_owned()))
        );
        assert_eq!(statements.observe(b'C', b"Ss7\0"), None);
        assert_eq!(
            sql(statements.observe(b'Q', b"select 1\0")),
            Some(Some("select 1".to_owned()))
        );
        assert_eq!(
            sql(statements.observe(b'E', b"unknown\0\0\0\0\0")),
            Some(None)
        );
    }

    #[test]
    fn an_execute_carries_its_portal_parameters() {
        let mut statements = Statements::default();
        statements.observe(b'P', b"s1\0INSERT INTO t VALUES ($1, $2, $3)\0\0\0");
        // Portal "p", statement "s1", one format code (binary), three
        // parameters: 4 bytes, NULL, 2 bytes; then the result formats.
        let mut bind = b"p\0s1\0".to_vec();
        bind.extend_from_slice(&[0, 1, 0, 1, 0, 3]);
        bind.extend_from_slice(&[0, 0, 0, 4, 1, 2, 3, 4]);
        bind.extend_from_slice(&(-1_i32).to_be_bytes());
        bind.extend_from_slice(&[0, 0, 0, 2, 9, 9]);
        bind.extend_from_slice(&[0, 0]);
        assert_eq!(statements.observe(b'B', &bind), None);
        let executed = statements.observe(b'E', b"p\0\0\0\0\0").expect("runs");
        assert_eq!(
            executed.sql.as_deref(),
            Some("INSERT INTO t VALUES ($1, $2, $3)")
        );
        assert_eq!(
            executed.params,
            vec![Some(vec![1, 2, 3, 4]), None, Some(vec![9, 9])]
        );
        // A truncated Bind gives no parameters rather than garbage.
        assert_eq!(bind_parameters(&[0, 0, 0, 1, 0, 0, 0, 9, 1]), None);
    }

    #[test]
    fn the_application_name_is_read_from_the_startup_message() {
        let mut startup = vec![0, 0, 0, 0, 0, 3, 0, 0];
        startup.extend_from_slice(b"user\0postgres\0application_name\0worker-1\0\0");
        assert_eq!(
            startup_parameter(&startup, "application_name").as_deref(),
            Some("worker-1")
        );
        assert_eq!(startup_parameter(&startup, "database"), None);
    }

    #[test]
    fn query_matching_ignores_case() {
        assert!(contains_ignoring_case(Some("commit"), "COMMIT"));
        assert!(!contains_ignoring_case(Some("ROLLBACK"), "COMMIT"));
        assert!(!contains_ignoring_case(None, "COMMIT"));
    }
}
