//! The self-provisioning test database: the shared server, fresh databases
//! and schemas (dropped, or kept when the test fails), and dedicated
//! clusters that a test may crash.

use std::{net::TcpStream, path::PathBuf, sync::mpsc, time::Duration};

use saga_test_support::{
    ServerSource, TestCluster, TestDbError, TestServer, fresh_database, fresh_schema, test_server,
};
use tokio_postgres::{Client, Config, NoTls};

/// This test binary run again, for the child test `name` alone.
fn child(name: &str) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(std::env::current_exe().expect("test binary"));
    command.args([name, "--exact", "--nocapture", "--test-threads=1"]);
    command
}

async fn connect(config: &Config) -> Client {
    let (client, connection) = config.connect(NoTls).await.expect("connect");
    tokio::spawn(connection);
    client
}

async fn admin() -> Client {
    connect(&test_server().await.expect("test server").admin_config()).await
}

async fn database_exists(name: &str) -> bool {
    admin()
        .await
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await
        .expect("query pg_database")
        .is_some()
}

async fn schema_exists(client: &Client, name: &str) -> bool {
    client
        .query_opt("SELECT 1 FROM pg_namespace WHERE nspname = $1", &[&name])
        .await
        .expect("query pg_namespace")
        .is_some()
}

fn current_thread_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

#[tokio::test]
async fn the_test_server_is_shared_and_answers() {
    let first = test_server().await.expect("test server");
    let second = test_server().await.expect("test server");
    assert!(std::ptr::eq(first, second), "one server per process");

    let client = connect(&first.admin_url().parse().expect("admin url")).await;
    let one: i32 = client
        .query_one("SELECT 1", &[])
        .await
        .expect("select")
        .get(0);
    assert_eq!(one, 1);

    if first.source() == ServerSource::LocalCluster {
        assert_eq!(first.host(), "127.0.0.1");
        assert_ne!(first.port(), 5432, "never the shared server's port");
        assert!(first.admin_url().contains(&format!(":{}/", first.port())));
        let data_dir = first
            .data_dir()
            .expect("a local cluster has a data directory");
        assert!(data_dir.join("PG_VERSION").is_file());
        let settings: String = client
            .query_one("SELECT current_setting('fsync')", &[])
            .await
            .expect("show fsync")
            .get(0);
        assert_eq!(settings, "off");
    }
}

#[test]
fn the_server_is_used_from_one_runtime_after_another() {
    let mut servers: Vec<*const TestServer> = Vec::new();
    for _ in 0..2 {
        let runtime = current_thread_runtime();
        runtime.block_on(async {
            let server = test_server().await.expect("test server");
            servers.push(server);
            let db = fresh_database().await.expect("fresh database");
            let client = db.connect().await.expect("connect");
            client.batch_execute("SELECT 1").await.expect("query");
        });
        // The runtime that may have started the server is gone.
        drop(runtime);
    }
    assert_eq!(servers[0], servers[1]);
}

#[tokio::test]
async fn fresh_databases_are_unique_usable_and_dropped() {
    let first = fresh_database().await.expect("fresh database");
    let second = fresh_database().await.expect("fresh database");
    assert_ne!(first.name(), second.name());
    assert!(first.name().starts_with("saga_test_"));
    assert!(first.url().ends_with(&format!("/{}", first.name())));

    // The URL is usable as it is, by tokio-postgres's parser.
    let from_url = connect(&first.url().parse().expect("url")).await;
    from_url
        .batch_execute("CREATE TABLE t (id int); INSERT INTO t VALUES (1)")
        .await
        .expect("create");
    let current: String = from_url
        .query_one("SELECT current_database()", &[])
        .await
        .expect("current_database")
        .get(0);
    assert_eq!(current, first.name());
    drop(from_url);

    // Nothing of the first database shows in the second.
    let other = second.connect().await.expect("connect");
    let tables: i64 = other
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'",
            &[],
        )
        .await
        .expect("count tables")
        .get(0);
    assert_eq!(tables, 0);

    let name = first.name().to_owned();
    assert!(database_exists(&name).await);
    drop(first);
    assert!(!database_exists(&name).await, "dropped with the value");
}

#[tokio::test]
async fn a_database_with_open_connections_is_still_dropped() {
    let db = fresh_database().await.expect("fresh database");
    let name = db.name().to_owned();
    let client = db.connect().await.expect("connect");
    drop(db);
    assert!(!database_exists(&name).await);
    let error = client.batch_execute("SELECT 1").await.unwrap_err();
    assert!(error.is_closed() || error.code().is_some(), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_is_dropped_from_a_multi_thread_runtime() {
    let db = fresh_database().await.expect("fresh database");
    let name = db.name().to_owned();
    drop(db);
    assert!(!database_exists(&name).await);
}

#[test]
fn a_database_is_dropped_outside_any_runtime() {
    let runtime = current_thread_runtime();
    let db = runtime.block_on(fresh_database()).expect("fresh database");
    let name = db.name().to_owned();
    drop(runtime);
    drop(db);
    assert!(!current_thread_runtime().block_on(database_exists(&name)));
}

/// Runs `make` on a thread of its own that then panics, as a failing test
/// would, while the value is alive; returns what `make` returned.
fn create_then_panic<T: Send + 'static>(
    make: impl FnOnce(&tokio::runtime::Runtime) -> (T, Box<dyn std::any::Any + Send>) + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    let failing_test = std::thread::spawn(move || {
        let runtime = current_thread_runtime();
        let (report, keep_alive) = make(&runtime);
        tx.send(report).expect("send");
        let _alive_while_panicking = keep_alive;
        panic!("a failing test (expected by the test that runs it)");
    });
    assert!(failing_test.join().is_err(), "the thread panicked");
    rx.recv().expect("report")
}

#[tokio::test]
async fn a_failed_tests_database_is_kept() {
    let name = create_then_panic(|runtime| {
        let db = runtime.block_on(fresh_database()).expect("fresh database");
        (db.name().to_owned(), Box::new(db))
    });
    assert!(database_exists(&name).await, "kept for inspection");
    admin()
        .await
        .batch_execute(&format!("DROP DATABASE \"{name}\""))
        .await
        .expect("clean up the kept database");
}

#[tokio::test]
async fn fresh_schemas_isolate_unqualified_names() {
    let first = fresh_schema().await.expect("fresh schema");
    let second = fresh_schema().await.expect("fresh schema");
    assert_ne!(first.name(), second.name());
    assert_eq!(first.database_name(), second.database_name());

    let a = first.connect().await.expect("connect");
    let b = second.connect().await.expect("connect");
    a.batch_execute("CREATE TABLE t (id int); INSERT INTO t VALUES (1), (2)")
        .await
        .expect("create in the first schema");
    b.batch_execute("CREATE TABLE t (id int)")
        .await
        .expect("the same name in the second schema");
    let in_first: i64 = a
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .expect("count")
        .get(0);
    let in_second: i64 = b
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!((in_first, in_second), (2, 0));
    let schema: String = a
        .query_one(
            "SELECT schemaname::text FROM pg_tables WHERE tablename = 't' AND schemaname = current_schema()",
            &[],
        )
        .await
        .expect("where t is")
        .get(0);
    assert_eq!(schema, first.name());

    let name = first.name().to_owned();
    drop(a);
    drop(first);
    assert!(!schema_exists(&b, &name).await, "dropped with the value");
    assert!(schema_exists(&b, second.name()).await);
}

#[tokio::test]
async fn a_failed_tests_schema_is_kept() {
    let (name, url) = create_then_panic(|runtime| {
        let schema = runtime.block_on(fresh_schema()).expect("fresh schema");
        (
            (schema.name().to_owned(), schema.url().to_owned()),
            Box::new(schema),
        )
    });
    let client = connect(&url.parse().expect("url")).await;
    assert!(schema_exists(&client, &name).await, "kept for inspection");
    client
        .batch_execute(&format!("DROP SCHEMA \"{name}\" CASCADE"))
        .await
        .expect("clean up the kept schema");
}

#[tokio::test]
async fn a_dedicated_cluster_survives_a_crash_and_restarts_on_the_same_port() {
    let cluster = TestCluster::start().await.expect("cluster");
    let shared = test_server().await.expect("test server");
    assert_ne!(cluster.port(), 5432);
    if shared.source() == ServerSource::LocalCluster {
        assert_ne!(cluster.port(), shared.port(), "a cluster of its own");
    }
    assert!(cluster.is_running());
    let port = cluster.port();

    let db = cluster.fresh_database().await.expect("fresh database");
    let client = db.connect().await.expect("connect");
    client
        .batch_execute("CREATE TABLE t (id int); INSERT INTO t VALUES (42)")
        .await
        .expect("committed before the crash");

    cluster.stop_immediate().await.expect("crash");
    assert!(!cluster.is_running());
    let error = client.batch_execute("SELECT 1").await.unwrap_err();
    assert!(error.is_closed() || error.code().is_some(), "{error}");

    cluster.start_again().await.expect("restart");
    assert!(cluster.is_running());
    assert_eq!(cluster.port(), port);
    let client = db.connect().await.expect("reconnect");
    let id: i32 = client
        .query_one("SELECT id FROM t", &[])
        .await
        .expect("the committed row survived")
        .get(0);
    assert_eq!(id, 42);

    let data_dir: PathBuf = cluster.data_dir().to_owned();
    drop(client);
    drop(db);
    drop(cluster);
    assert!(!data_dir.exists(), "removed on drop");
    assert!(
        !data_dir.parent().expect("the cluster's root").exists(),
        "the whole temporary directory is removed"
    );
    assert!(
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(1)).is_err(),
        "nothing listens on the port any more"
    );
}

#[tokio::test]
async fn a_cluster_can_be_stopped_and_started_again_repeatedly() {
    let cluster = TestCluster::start().await.expect("cluster");
    let config = cluster.config("postgres");
    for _ in 0..2 {
        cluster.stop_immediate().await.expect("stop");
        assert!(!cluster.is_running());
        assert!(config.connect(NoTls).await.is_err(), "no server");
        cluster.start_again().await.expect("start");
        let client = connect(&config).await;
        client.batch_execute("SELECT 1").await.expect("query");
    }
    assert!(
        cluster
            .url("postgres")
            .ends_with(&format!(":{}/postgres", cluster.port()))
    );
}

const CHILD_ENV: &str = "SAGA_TESTING_DATABASE_URL_CHILD";

/// The child's part of the `DATABASE_URL` tests below; does nothing
/// unless run by them.
#[tokio::test]
async fn child_uses_database_url() {
    let Ok(expected) = std::env::var(CHILD_ENV) else {
        return;
    };
    if expected == "invalid" {
        let error = test_server().await.unwrap_err();
        assert!(
            matches!(error, TestDbError::InvalidDatabaseUrl(_)),
            "{error:?}"
        );
        return;
    }
    let server = test_server().await.expect("test server");
    assert_eq!(server.source(), ServerSource::DatabaseUrl);
    assert!(server.data_dir().is_none(), "no cluster of its own");
    println!("PORT {}", server.port());
    let db = fresh_database().await.expect("fresh database");
    db.connect()
        .await
        .expect("connect")
        .batch_execute("SELECT 1")
        .await
        .expect("query");
    println!("DATABASE {}", db.name());
    let schema = fresh_schema().await.expect("fresh schema");
    schema
        .connect()
        .await
        .expect("connect")
        .batch_execute("CREATE TABLE t (id int)")
        .await
        .expect("create in the schema");
}

async fn run_child(database_url: &str, expected: &str) -> String {
    let output = child("child_uses_database_url")
        .env(CHILD_ENV, expected)
        .env("DATABASE_URL", database_url)
        .output()
        .await
        .expect("run the child");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "the child failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[tokio::test]
async fn database_url_is_preferred_to_the_local_binaries() {
    // Another throwaway cluster stands for a server named by DATABASE_URL.
    let cluster = TestCluster::start().await.expect("cluster");
    let stdout = run_child(&cluster.url("postgres"), "valid").await;
    assert!(
        stdout.contains(&format!("PORT {}", cluster.port())),
        "{stdout}"
    );
    let (_, rest) = stdout
        .split_once("DATABASE ")
        .expect("the child's database");
    let name = rest.split_whitespace().next().expect("a name");

    let client = connect(&cluster.config("postgres")).await;
    let databases: Vec<String> = client
        .query("SELECT datname::text FROM pg_database", &[])
        .await
        .expect("list databases")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert!(
        !databases.iter().any(|database| database == name),
        "the child's database was made there and dropped: {databases:?}"
    );
    assert!(
        databases
            .iter()
            .any(|database| database == "saga_test_schemas"),
        "the schemas' database was made there: {databases:?}"
    );
}

#[tokio::test]
async fn an_invalid_database_url_is_a_typed_error() {
    run_child("postgres://[not a url", "invalid").await;
}

#[tokio::test]
async fn a_schema_is_dropped_even_if_the_test_left_a_transaction_open() {
    let schema = saga_test_support::fresh_schema().await.unwrap();
    let name = schema.name().to_owned();
    let mut client = schema.connect().await.unwrap();
    client
        .batch_execute("CREATE TABLE t (id int)")
        .await
        .unwrap();
    let tx = client.transaction().await.unwrap();
    tx.execute("INSERT INTO t VALUES (1)", &[]).await.unwrap();
    // Leak the open transaction: its connection keeps its locks.
    std::mem::forget(tx);
    // Dropping the schema here blocks this (current-thread) runtime, so the
    // connection cannot make progress; the drop must not wait for it.
    drop(schema);
    let admin = saga_test_support::fresh_schema().await.unwrap();
    let probe = admin.connect().await.unwrap();
    let exists: bool = probe
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
            &[&name],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!exists, "schema {name} was dropped");
}

const NO_POSTGRES_ENV: &str = "SAGA_TESTING_NO_POSTGRES_CHILD";

/// The child's part of the test below: with no `DATABASE_URL`, binaries
/// searched for only in an empty directory and no Docker engine, there is
/// no server. Does nothing unless run by that test.
#[tokio::test]
async fn child_without_postgres() {
    let Ok(searched_dir) = std::env::var(NO_POSTGRES_ENV) else {
        return;
    };
    let error = test_server().await.unwrap_err();
    let TestDbError::NoPostgres { searched } = &error else {
        panic!("expected NoPostgres, got {error:?}");
    };
    assert_eq!(
        searched,
        &[PathBuf::from(&searched_dir)],
        "only that directory"
    );
    let dedicated = TestCluster::start().await.unwrap_err();
    assert!(
        matches!(dedicated, TestDbError::NoPostgres { .. }),
        "{dedicated:?}"
    );
    println!("NO_POSTGRES {error}");
}

#[tokio::test]
async fn without_any_postgres_the_error_says_what_to_install() {
    let empty = tempfile::tempdir().expect("an empty directory");
    let output = child("child_without_postgres")
        .env(NO_POSTGRES_ENV, empty.path())
        .env_remove("DATABASE_URL")
        .env("SAGA_TEST_PG_BIN_DIR", empty.path())
        .env("SAGA_TEST_PG_BIN_DIR_ONLY", "1")
        // With the `testcontainers` feature, no Docker engine either.
        .env("DOCKER_HOST", "unix:///nonexistent/docker.sock")
        .output()
        .await
        .expect("run the child");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the child failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let message = stdout
        .lines()
        .find_map(|line| line.split("NO_POSTGRES ").nth(1))
        .unwrap_or_else(|| panic!("the child reports the error: {stdout}"));
    assert!(
        message.starts_with("no PostgreSQL server for the tests: install PostgreSQL"),
        "{message}"
    );
    assert!(message.contains("or set DATABASE_URL"), "{message}");
}

const FAILING_ENV: &str = "SAGA_TESTING_FAILING_CHILD";

/// A failing test, run as a child by the test below: it makes a database
/// and a schema, says their names, and panics while holding them.
#[tokio::test]
async fn child_fails_holding_a_database_and_a_schema() {
    if std::env::var(FAILING_ENV).is_err() {
        return;
    }
    let db = fresh_database().await.expect("fresh database");
    let schema = fresh_schema().await.expect("fresh schema");
    println!("NAMES {} {} {}", db.name(), schema.name(), schema.url());
    panic!("a failing test (expected by the test that runs it)");
}

#[tokio::test]
async fn a_failed_tests_kept_names_are_printed() {
    let server = test_server().await.expect("test server");
    let output = child("child_fails_holding_a_database_and_a_schema")
        .env(FAILING_ENV, "1")
        // The child uses this process's server, where what it keeps stays.
        .env("DATABASE_URL", server.admin_url())
        .output()
        .await
        .expect("run the child");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "the child test failed: {stdout}");
    let names = stdout
        .lines()
        .find_map(|line| line.split("NAMES ").nth(1))
        .unwrap_or_else(|| panic!("the child says its names: {stdout}"));
    let [database, schema, schema_url] = names.split_whitespace().collect::<Vec<_>>()[..] else {
        panic!("bad line {names:?}");
    };
    assert!(
        stderr.contains(&format!("keeping database `{database}` for inspection")),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("keeping schema `{schema}` for inspection")),
        "{stderr}"
    );

    // Kept indeed; clean them up.
    assert!(database_exists(database).await);
    admin()
        .await
        .batch_execute(&format!("DROP DATABASE \"{database}\""))
        .await
        .expect("drop the kept database");
    let client = connect(&schema_url.parse().expect("url")).await;
    assert!(schema_exists(&client, schema).await);
    client
        .batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .await
        .expect("drop the kept schema");
}
