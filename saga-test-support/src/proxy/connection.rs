//! One proxied connection: the startup, then the client's messages
//! forwarded to the server (held, cut, delayed as armed) and the server's
//! answers back.

use std::{
    io,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpListener, TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
    sync::oneshot,
};

use super::intercepted::Intercepted;
use super::shared::{Shared, When};
use super::wire::{
    CANCEL_REQUEST, Frame, Framer, GSSENC_REQUEST, MAX_STARTUP_LEN, ReadyCounter, SSL_REQUEST,
    Statements, TERMINATE, startup_parameter,
};

/// How long, after a cut, the server side stays open for the server to
/// answer the batch it was sent.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);
const BUFFER: usize = 16 * 1024;

pub(super) async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
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
