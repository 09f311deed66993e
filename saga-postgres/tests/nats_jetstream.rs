//! The NATS JetStream publisher against a real server: the one on
//! 127.0.0.1:4222 when it is up (with JetStream), else a throwaway
//! `nats-server -js` from PATH on a free port. With neither, the tests fail
//! and say what to install, unless SAGA_SKIP_NATS_TESTS=1 is set.

mod outbox_support;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use outbox_support::{Env, WAIT, env};
use saga_core::{Message, MessageId};
use saga_postgres::outbox::nats::{KEY_HEADER, MSG_ID_HEADER};
use saga_postgres::outbox::{Dispatcher, NatsPublisher, Outgoing, PublishError, Publisher};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::Notify;

/// The variable that lets the NATS tests pass without a NATS server.
const OPT_OUT: &str = "SAGA_SKIP_NATS_TESTS";
const SHARED: &str = "127.0.0.1:4222";
const LEASE: Duration = Duration::from_secs(30);

/// A NATS server with JetStream, and the child process if we started it.
struct Nats {
    client: async_nats::Client,
    _server: Option<ThrowawayServer>,
}

struct ThrowawayServer {
    _child: tokio::process::Child,
    dir: PathBuf,
}

impl Drop for ThrowawayServer {
    fn drop(&mut self) {
        // The child is killed on drop (`kill_on_drop`).
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn connect(addr: &str) -> Option<async_nats::Client> {
    let client = tokio::time::timeout(
        Duration::from_secs(5),
        async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(2))
            .connect(addr),
    )
    .await
    .ok()?
    .ok()?;
    Some(client)
}

fn nats_server_on_path() -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join("nats-server"))
        .find(|p| p.is_file())
}

/// The NATS server to test against, or `None` if the tests are opted out.
async fn nats() -> Option<Nats> {
    // What the server on SHARED (if any) lacks, for the messages below.
    let mut shared = format!("none answers on {SHARED}");
    if tokio::net::TcpStream::connect(SHARED).await.is_ok()
        && let Some(client) = connect(SHARED).await
    {
        if client.server_info().jetstream {
            return Some(Nats {
                client,
                _server: None,
            });
        }
        shared = format!("the one on {SHARED} has JetStream disabled");
        eprintln!("the NATS server on {SHARED} has no JetStream; starting a throwaway one");
    }
    if let Some(bin) = nats_server_on_path() {
        return Some(start_throwaway(bin).await);
    }
    if std::env::var(OPT_OUT).is_ok_and(|v| v == "1") {
        eprintln!("no NATS server with JetStream ({shared}): skipping ({OPT_OUT}=1)");
        return None;
    }
    panic!(
        "the NATS tests need a NATS server with JetStream: {shared} and \
         `nats-server` is not on PATH. Install it (e.g. `apt-get install nats-server`, \
         `brew install nats-server`, or `go install github.com/nats-io/nats-server/v2@latest`), \
         or set {OPT_OUT}=1 to skip these tests"
    );
}

async fn start_throwaway(bin: PathBuf) -> Nats {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = std::env::temp_dir().join(format!("saga-nats-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut child = tokio::process::Command::new(&bin)
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(&dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("could not start {}: {e}", bin.display()));
    // It says so on stderr when it accepts clients.
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    tokio::time::timeout(WAIT, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("Server is ready") {
                return;
            }
        }
        panic!("nats-server exited before it was ready");
    })
    .await
    .expect("nats-server to be ready");
    // Keep draining its log so that it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let client = connect(&format!("127.0.0.1:{port}"))
        .await
        .expect("a connection to the throwaway nats-server");
    Nats {
        client,
        _server: Some(ThrowawayServer { _child: child, dir }),
    }
}

/// A uniquely named stream on `<prefix>>`, deleted when dropped.
struct TestStream {
    js: jetstream::Context,
    name: String,
    prefix: String,
}

impl TestStream {
    async fn create(js: &jetstream::Context) -> Self {
        let id = uuid::Uuid::now_v7().simple().to_string();
        let name = format!("SAGA_TEST_{}", id.to_uppercase());
        let prefix = format!("saga_test_{id}.");
        js.create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![format!("{prefix}>")],
            storage: stream::StorageType::Memory,
            duplicate_window: Duration::from_secs(120),
            max_age: Duration::from_secs(600),
            ..Default::default()
        })
        .await
        .unwrap();
        TestStream {
            js: js.clone(),
            name,
            prefix,
        }
    }

    async fn messages(&self) -> u64 {
        let mut stream = self.js.get_stream(&self.name).await.unwrap();
        stream.info().await.unwrap().state.messages
    }

    async fn stored(&self) -> HashMap<String, jetstream::message::StreamMessage> {
        let stream = self.js.get_stream(&self.name).await.unwrap();
        let mut out = HashMap::new();
        for seq in 1..=self.messages().await {
            let m = stream.get_raw_message(seq).await.unwrap();
            let id = m.headers.get(MSG_ID_HEADER).unwrap().as_str().to_owned();
            out.insert(id, m);
        }
        out
    }
}

impl Drop for TestStream {
    fn drop(&mut self) {
        let (js, name) = (self.js.clone(), self.name.clone());
        tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(async move {
                let _ = js.delete_stream(&name).await;
            });
        });
    }
}

fn dispatcher<P: Publisher>(env: &Env, publisher: P) -> Dispatcher<P> {
    Dispatcher::builder(env.outbox.clone(), publisher)
        .lease_for(LEASE)
        .publish_timeout(Duration::from_secs(15))
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_reach_jetstream_with_their_id_as_nats_msg_id_and_rows_go_after_the_ack() {
    let Some(nats) = nats().await else { return };
    let env = env().await;
    let publisher = NatsPublisher::new(nats.client.clone());
    let stream = TestStream::create(publisher.context()).await;
    let ids = env
        .enqueue(vec![
            Message::json("order.paid", &serde_json::json!({"order": 1}))
                .unwrap()
                .key("order-1")
                .unwrap()
                .header("content-type", "application/json")
                .unwrap(),
            Message::bytes("order.shipped", b"\x00\x01binary".to_vec()).unwrap(),
            Message::json("order.paid", &serde_json::json!({"order": 2})).unwrap(),
        ])
        .await;
    let d = dispatcher(&env, publisher.subject_prefix(stream.prefix.clone()));

    let report = d.run_until_idle().await.unwrap();

    assert_eq!(report.published, 3);
    assert_eq!(env.outbox_rows().await, 0, "removed once acknowledged");
    let stored = stream.stored().await;
    assert_eq!(stored.len(), 3);
    let first = &stored[&ids[0].to_string()];
    assert_eq!(
        first.subject.as_str(),
        format!("{}order.paid", stream.prefix)
    );
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&first.payload).unwrap(),
        serde_json::json!({"order": 1})
    );
    assert_eq!(first.headers.get(KEY_HEADER).unwrap().as_str(), "order-1");
    assert_eq!(
        first.headers.get("content-type").unwrap().as_str(),
        "application/json"
    );
    let second = &stored[&ids[1].to_string()];
    assert_eq!(
        second.subject.as_str(),
        format!("{}order.shipped", stream.prefix)
    );
    assert_eq!(&second.payload[..], b"\x00\x01binary");
    assert!(second.headers.get(KEY_HEADER).is_none());
    assert!(stored.contains_key(&ids[2].to_string()));
}

/// Publishes through NATS, then hangs: a dispatcher killed between the
/// publish (acknowledged) and the delete.
struct PublishThenHang {
    inner: NatsPublisher,
    published: Arc<Notify>,
}

impl Publisher for PublishThenHang {
    async fn publish(&self, batch: &[Outgoing]) -> Vec<Result<(), PublishError>> {
        let results = self.inner.publish(batch).await;
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        self.published.notify_one();
        std::future::pending().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_republish_after_a_crash_is_dropped_by_jetstreams_duplicate_window() {
    let Some(nats) = nats().await else { return };
    let env = env().await;
    let publisher = NatsPublisher::new(nats.client.clone());
    let stream = TestStream::create(publisher.context()).await;
    let publisher = publisher.subject_prefix(stream.prefix.clone());
    let ids = env
        .enqueue((0..4).map(|n| outbox_support::msg("evt", n)).collect())
        .await;

    // Dispatcher A publishes (JetStream acknowledges) and dies before the
    // delete.
    let published = Arc::new(Notify::new());
    let a = dispatcher(
        &env,
        PublishThenHang {
            inner: publisher.clone(),
            published: published.clone(),
        },
    );
    let killed = tokio::spawn(async move { a.dispatch_once().await });
    tokio::time::timeout(WAIT, published.notified())
        .await
        .unwrap();
    killed.abort();
    let _ = killed.await;
    assert_eq!(stream.messages().await, 4);
    assert_eq!(env.outbox_rows().await, 4, "nothing deleted yet");

    // Dispatcher B re-publishes after the lease expires: JetStream drops
    // the copies, acknowledges them, and the rows go.
    env.clock.advance(LEASE + Duration::from_secs(1));
    let b = dispatcher(&env, publisher);
    let report = b.run_until_idle().await.unwrap();
    assert_eq!(report.published, 4);
    assert_eq!(env.outbox_rows().await, 0);
    assert_eq!(stream.messages().await, 4, "no duplicates in the stream");
    let stored = stream.stored().await;
    for id in &ids {
        assert!(stored.contains_key(&id.to_string()));
    }

    // The same message id sent again by hand is acknowledged as a duplicate.
    let ack = stream
        .js
        .send_publish(
            format!("{}evt", stream.prefix),
            jetstream::message::PublishMessage::build()
                .payload("again".into())
                .message_id(ids[0].to_string()),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(ack.duplicate);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_acknowledgement_the_row_stays_and_is_retried() {
    let Some(nats) = nats().await else { return };
    let env = env().await;
    // No stream listens on this prefix: JetStream cannot acknowledge.
    let prefix = format!("saga_nostream_{}.", uuid::Uuid::now_v7().simple());
    let publisher = NatsPublisher::new(nats.client.clone()).subject_prefix(prefix);
    let id: MessageId = env.enqueue(vec![outbox_support::msg("evt", 0)]).await[0];
    let d = dispatcher(&env, publisher);

    let report = d.dispatch_once().await.unwrap();

    assert_eq!(
        (report.claimed, report.published, report.retried),
        (1, 0, 1)
    );
    let (attempts, error, _, dead) = env.row(id).await.unwrap();
    assert_eq!(attempts, 1);
    let error = error.unwrap();
    assert!(!error.is_empty());
    assert!(!dead, "retried, not dead");
}
