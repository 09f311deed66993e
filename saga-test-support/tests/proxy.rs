//! The fault-injecting proxy, in front of the test server, driven with
//! tokio-postgres.

use std::{
    error::Error as _,
    time::{Duration, Instant},
};

use saga_test_support::{
    TestDatabase,
    proxy::{Cut, FaultProxy},
    test_server,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_postgres::{Client, Config, NoTls};

/// Bound on waiting for a cut to complete.
const WAIT: Duration = Duration::from_secs(30);

async fn setup() -> (TestDatabase, FaultProxy) {
    let server = test_server().await.expect("test server");
    let db = server.fresh_database().await.expect("fresh database");
    let upstream = server.socket_addr().await.expect("server address");
    let proxy = FaultProxy::start(upstream).await.expect("proxy");
    (db, proxy)
}

async fn connect(config: &Config) -> Client {
    let (client, connection) = config.connect(NoTls).await.expect("connect");
    tokio::spawn(connection);
    client
}

async fn create_table(db: &TestDatabase) -> Client {
    let direct = db.connect().await.expect("direct connection");
    direct
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .expect("create table");
    direct
}

async fn rows(direct: &Client) -> i64 {
    direct
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .expect("count rows")
        .get(0)
}

/// The client lost its connection (rather than, say, a SQL error).
fn is_connection_loss(error: &tokio_postgres::Error) -> bool {
    error.is_closed()
        || error
            .source()
            .is_some_and(|source| source.downcast_ref::<std::io::Error>().is_some())
}

#[tokio::test]
async fn queries_pass_through_the_proxy() {
    let (db, proxy) = setup().await;
    let client = connect(&db.config_via(proxy.addr())).await;
    let (database, one): (String, i32) = {
        let row = client
            .query_one("SELECT current_database(), 1", &[])
            .await
            .expect("query through the proxy");
        (row.get(0), row.get(1))
    };
    assert_eq!((database.as_str(), one), (db.name(), 1));
    let stats = proxy.stats();
    assert_eq!((stats.accepted, stats.live), (1, 1));
}

#[tokio::test]
async fn latency_slows_queries_down_but_they_still_work() {
    let (db, proxy) = setup().await;
    let client = connect(&db.config_via(proxy.addr())).await;
    let latency = Duration::from_millis(100);
    assert_eq!(proxy.stats().delayed, 0);
    proxy.set_latency(latency);
    assert_eq!(proxy.latency(), latency);
    let started = Instant::now();
    let messages = client
        .simple_query("SELECT 1")
        .await
        .expect("query with latency");
    let elapsed = started.elapsed();
    assert!(!messages.is_empty());
    assert!(
        elapsed >= 2 * latency,
        "one delay each way, took {elapsed:?}"
    );
    let delayed = proxy.stats().delayed;
    assert!(delayed >= 2, "both directions counted: {delayed}");
    proxy.set_latency(Duration::ZERO);
    client.simple_query("SELECT 1").await.expect("query");
    assert_eq!(proxy.stats().delayed, delayed, "no latency, no delay");
}

#[tokio::test]
async fn reset_all_closes_live_connections() {
    let (db, proxy) = setup().await;
    let client = connect(&db.config_via(proxy.addr())).await;
    client.batch_execute("SELECT 1").await.expect("query");

    assert_eq!(proxy.reset_all().await, 1);
    let error = client.batch_execute("SELECT 1").await.unwrap_err();
    assert!(is_connection_loss(&error), "{error:?}");
    assert_eq!(proxy.stats().resets, 1);

    let again = connect(&db.config_via(proxy.addr())).await;
    again
        .batch_execute("SELECT 1")
        .await
        .expect("new connections still work");
}

#[tokio::test]
async fn refused_connections_fail_while_live_ones_go_on() {
    let (db, proxy) = setup().await;
    let live = connect(&db.config_via(proxy.addr())).await;

    proxy.refuse_new(true);
    let refused = db.config_via(proxy.addr()).connect(NoTls).await;
    assert!(refused.is_err(), "a new connection is refused");
    assert_eq!(proxy.stats().refused, 1);
    live.batch_execute("SELECT 1")
        .await
        .expect("a live connection is left alone");

    proxy.refuse_new(false);
    connect(&db.config_via(proxy.addr()))
        .await
        .batch_execute("SELECT 1")
        .await
        .expect("accepted again");
}

#[tokio::test]
async fn a_cut_after_execute_commits_while_the_client_sees_its_connection_die() {
    let (db, proxy) = setup().await;
    let direct = create_table(&db).await;
    let client = connect(&db.config_via(proxy.addr())).await;
    // Prepared (Parse/Describe/Sync) before arming: only the Execute counts.
    let insert = client
        .prepare("INSERT INTO t VALUES ($1)")
        .await
        .expect("prepare");

    proxy.arm(Cut::AfterExecute);
    let fired = proxy.fired();
    let error = client.execute(&insert, &[&1_i32]).await.unwrap_err();
    assert!(is_connection_loss(&error), "{error:?}");
    tokio::time::timeout(WAIT, fired)
        .await
        .expect("the cut completes");

    assert_eq!(rows(&direct).await, 1, "the server committed the insert");
    assert_eq!(proxy.fired_count(), 1);
}

#[tokio::test]
async fn a_cut_after_a_simple_query_commits_it() {
    let (db, proxy) = setup().await;
    let direct = create_table(&db).await;
    let client = connect(&db.config_via(proxy.addr())).await;

    proxy.arm(Cut::AfterExecute);
    let fired = proxy.fired();
    let error = client
        .batch_execute("INSERT INTO t VALUES (1)")
        .await
        .unwrap_err();
    assert!(is_connection_loss(&error), "{error:?}");
    tokio::time::timeout(WAIT, fired)
        .await
        .expect("the cut completes");
    assert_eq!(rows(&direct).await, 1);
}

#[tokio::test]
async fn a_cut_before_execute_never_reaches_the_server() {
    let (db, proxy) = setup().await;
    let direct = create_table(&db).await;
    let client = connect(&db.config_via(proxy.addr())).await;

    proxy.arm(Cut::BeforeExecute);
    let fired = proxy.fired();
    let error = client
        .execute("INSERT INTO t VALUES (1)", &[])
        .await
        .unwrap_err();
    assert!(is_connection_loss(&error), "{error:?}");
    tokio::time::timeout(WAIT, fired)
        .await
        .expect("the cut completes");
    assert_eq!(rows(&direct).await, 0, "the insert never ran");
}

#[tokio::test]
async fn a_cut_during_commit_leaves_the_transaction_committed() {
    let (db, proxy) = setup().await;
    let direct = create_table(&db).await;
    let mut client = connect(&db.config_via(proxy.addr())).await;

    proxy.arm(Cut::AfterQueryContaining("commit".to_owned()));
    let fired = proxy.fired();
    let transaction = client.transaction().await.expect("BEGIN does not match");
    transaction
        .execute("INSERT INTO t VALUES (1)", &[])
        .await
        .expect("the insert does not match");
    let error = transaction.commit().await.unwrap_err();
    assert!(is_connection_loss(&error), "{error:?}");
    tokio::time::timeout(WAIT, fired)
        .await
        .expect("the cut completes");
    assert_eq!(
        rows(&direct).await,
        1,
        "committed though the client lost it"
    );
}

#[tokio::test]
async fn a_cut_before_commit_rolls_the_transaction_back() {
    let (db, proxy) = setup().await;
    let direct = create_table(&db).await;
    let mut client = connect(&db.config_via(proxy.addr())).await;

    proxy.arm(Cut::BeforeQueryContaining("COMMIT".to_owned()));
    let fired = proxy.fired();
    let transaction = client.transaction().await.expect("begin");
    transaction
        .execute("INSERT INTO t VALUES (1)", &[])
        .await
        .expect("insert");
    let error = transaction.commit().await.unwrap_err();
    assert!(is_connection_loss(&error), "{error:?}");
    tokio::time::timeout(WAIT, fired)
        .await
        .expect("the cut completes");
    // The server lost the connection inside the transaction: rolled back.
    // Whether or not it has noticed yet, the row is not visible.
    assert_eq!(rows(&direct).await, 0);
}

#[tokio::test]
async fn a_cut_fires_once_then_disarms() {
    let (db, proxy) = setup().await;
    let direct = create_table(&db).await;
    proxy.arm(Cut::BeforeExecute);
    let fired = proxy.fired();
    let first = connect(&db.config_via(proxy.addr())).await;
    assert!(
        first
            .batch_execute("INSERT INTO t VALUES (1)")
            .await
            .is_err()
    );
    tokio::time::timeout(WAIT, fired)
        .await
        .expect("the cut completes");

    let second = connect(&db.config_via(proxy.addr())).await;
    second
        .batch_execute("INSERT INTO t VALUES (2)")
        .await
        .expect("disarmed after firing");
    assert_eq!(rows(&direct).await, 1);
    assert_eq!(proxy.fired_count(), 1);
    assert_eq!(proxy.stats().cuts_fired, 1);

    proxy.arm(Cut::AfterExecute);
    assert_eq!(proxy.disarm(), Some(Cut::AfterExecute));
    second
        .batch_execute("INSERT INTO t VALUES (3)")
        .await
        .expect("disarmed by hand");
    assert_eq!(proxy.fired_count(), 1);
}

#[tokio::test]
async fn an_ssl_request_is_declined_and_the_startup_goes_through() {
    let (db, proxy) = setup().await;
    let mut raw = TcpStream::connect(proxy.addr()).await.expect("connect");
    // SSLRequest: length 8, code 80877103.
    raw.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
        .await
        .expect("send SSLRequest");
    let mut answer = [0_u8; 1];
    raw.read_exact(&mut answer).await.expect("answer");
    assert_eq!(&answer, b"N", "no TLS through the proxy");

    let mut body = Vec::new();
    body.extend_from_slice(&196_608_u32.to_be_bytes()); // protocol 3.0
    for value in ["user", "postgres", "database", db.name()] {
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut startup = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    startup.extend_from_slice(&body);
    raw.write_all(&startup).await.expect("send startup");

    // AuthenticationOk: 'R', length 8, code 0 (the test server trusts us).
    let mut authentication = [0_u8; 9];
    raw.read_exact(&mut authentication)
        .await
        .expect("authentication");
    assert_eq!(authentication, [b'R', 0, 0, 0, 8, 0, 0, 0, 0]);
}

#[tokio::test]
async fn stop_closes_the_listener_and_the_connections() {
    let (db, proxy) = setup().await;
    let addr = proxy.addr();
    let client = connect(&db.config_via(addr)).await;
    proxy.stop().await;
    let error = client.batch_execute("SELECT 1").await.unwrap_err();
    assert!(is_connection_loss(&error), "{error:?}");
    assert!(TcpStream::connect(addr).await.is_err(), "nothing listens");
}

#[tokio::test]
async fn a_cut_is_recorded_with_its_statement_and_session() {
    let (db, proxy) = setup().await;
    let direct = create_table(&db).await;
    let mut config = db.config_via(proxy.addr());
    config.application_name("cut-me");
    let client = connect(&config).await;
    // A statement that does not match goes through and is not recorded.
    client
        .execute("INSERT INTO t VALUES ($1)", &[&1_i32])
        .await
        .expect("an unmatched statement");

    proxy.arm(Cut::AfterQueryContaining("insert into t".into()));
    let fired = proxy.fired();
    let error = client
        .execute("INSERT INTO t VALUES ($1)", &[&42_i32])
        .await
        .unwrap_err();
    assert!(is_connection_loss(&error), "{error:?}");
    tokio::time::timeout(WAIT, fired)
        .await
        .expect("the cut completes");

    let cuts = proxy.cuts();
    assert_eq!(cuts.len(), 1, "{cuts:?}");
    let cut = &cuts[0];
    assert!(cut.after);
    assert_eq!(
        cut.statement.sql.as_deref(),
        Some("INSERT INTO t VALUES ($1)")
    );
    assert_eq!(cut.statement.param(1), Some(&42_i32.to_be_bytes()[..]));
    assert_eq!(cut.statement.param(2), None);
    assert_eq!(cut.statement.application_name.as_deref(), Some("cut-me"));
    assert!(cut.statement.upstream_port.is_some());
    assert_eq!(rows(&direct).await, 2);
}

#[tokio::test]
async fn a_held_statement_reaches_the_server_only_once_released() {
    let (db, proxy) = setup().await;
    let direct = create_table(&db).await;
    let client = connect(&db.config_via(proxy.addr())).await;
    let other = connect(&db.config_via(proxy.addr())).await;

    let mut hold = proxy.hold("INSERT INTO t", &7_i32.to_be_bytes());
    // The same statement with another parameter is not held.
    client
        .execute("INSERT INTO t VALUES ($1)", &[&6_i32])
        .await
        .expect("not held");
    let held = tokio::spawn(async move {
        client
            .query_one(
                "WITH ins AS (INSERT INTO t VALUES ($1) RETURNING 1) \
                 SELECT inet_client_port() FROM ins",
                &[&7_i32],
            )
            .await
            .map(|row| row.get::<_, i32>(0))
    });
    let statement = tokio::time::timeout(WAIT, hold.reached())
        .await
        .expect("the statement arrives");
    // Held: not run, and the proxy's other connections go on.
    let one: i32 = other
        .query_one("SELECT 1", &[])
        .await
        .expect("another connection")
        .get(0);
    assert_eq!(one, 1);
    assert_eq!(rows(&direct).await, 1, "only the statement not held ran");
    assert!(!held.is_finished());

    hold.release();
    let port = tokio::time::timeout(WAIT, held)
        .await
        .expect("released")
        .expect("joined")
        .expect("the held statement runs");
    assert_eq!(rows(&direct).await, 2);
    assert_eq!(
        statement.upstream_port.map(i32::from),
        Some(port),
        "the server sees the session on the recorded port"
    );
}
