//! TLS against a real server: a throwaway cluster that accepts TCP
//! connections only over TLS (`hostssl`; `hostnossl … reject`), with a CA
//! and a server certificate (for `db.test` and 127.0.0.1) generated for the
//! test. Every connection of the crate honours `sslmode`: the store's pool,
//! query cancellation, and the outbox dispatcher's `LISTEN` connection.

mod outbox_support;

use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use outbox_support::{Recorder, Running, WAIT, msg};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use saga_core::{
    Executor, Message, SagaDefinition, StartKey, Status, Step, StepContext, StepError,
};
use saga_postgres::deadpool_postgres::Pool;
use saga_postgres::outbox::{DispatcherBuilder, ListenerStatus, Outbox};
use saga_postgres::rustls::{self, CertificateError};
use saga_postgres::tokio_postgres::error::SqlState;
use saga_postgres::tokio_postgres::{self, Client, NoTls};
use saga_postgres::{ConnectConfig, PgSagaStore, SchemaName, SslMode, pool_from_url};
use saga_test_support::TestCluster;
use tokio::sync::{OnceCell, watch};

/// The TLS-only cluster shared by this file's tests (stopped and removed
/// when the test process exits), and the files the clients trust.
struct TlsServer {
    cluster: TestCluster,
    /// The CA that signed the server's certificate (PEM).
    ca: PathBuf,
    /// Another CA, that signed nothing the server holds.
    other_ca: PathBuf,
}

static SERVER: OnceCell<TlsServer> = OnceCell::const_new();

async fn server() -> &'static TlsServer {
    SERVER.get_or_init(TlsServer::start).await
}

impl TlsServer {
    async fn start() -> TlsServer {
        let cluster = TestCluster::start()
            .await
            .expect("local PostgreSQL binaries");
        let data = cluster.data_dir().to_path_buf();
        // The cluster's directory, removed with it.
        let root = data.parent().unwrap().to_path_buf();

        let (ca, server_cert, server_key) = certificates("saga-postgres test CA");
        let (other_ca, _, _) = certificates("another test CA");
        let ca_path = root.join("ca.pem");
        let other_ca_path = root.join("other-ca.pem");
        std::fs::write(&ca_path, ca).unwrap();
        std::fs::write(&other_ca_path, other_ca).unwrap();

        // The server's files belong to the OS user that runs it; the key is
        // readable by it alone, or the server refuses it.
        let owner = std::fs::metadata(&data).unwrap();
        for (name, text, mode) in [
            ("server.crt", &server_cert, 0o644),
            ("server.key", &server_key, 0o600),
        ] {
            let path = data.join(name);
            std::fs::write(&path, text).unwrap();
            std::os::unix::fs::chown(&path, Some(owner.uid()), Some(owner.gid())).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        let (admin, connection) = cluster.config("postgres").connect(NoTls).await.unwrap();
        let driver = tokio::spawn(connection);
        for setting in [
            "ALTER SYSTEM SET ssl = on",
            "ALTER SYSTEM SET ssl_cert_file = 'server.crt'",
            "ALTER SYSTEM SET ssl_key_file = 'server.key'",
        ] {
            admin.batch_execute(setting).await.unwrap();
        }
        drop(admin);
        let _ = driver.await;
        // TCP only over TLS.
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\n\
             hostssl all all 127.0.0.1/32 trust\n\
             hostnossl all all 127.0.0.1/32 reject\n",
        )
        .unwrap();
        // A restart rather than `pg_reload_conf()`, whose effect is not
        // synchronous: `start_again` returns once the server, with the new
        // settings, accepts connections.
        cluster.stop_immediate().await.unwrap();
        cluster.start_again().await.unwrap();
        TlsServer {
            cluster,
            ca: ca_path,
            other_ca: other_ca_path,
        }
    }

    /// A URL for the `postgres` database on 127.0.0.1 with `params`.
    fn url(&self, params: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres?{params}",
            self.cluster.port()
        )
    }

    /// A key-value string reaching 127.0.0.1 under the host name `host`
    /// (the name the certificate is checked against), with `params`.
    fn by_name(&self, host: &str, params: &str) -> String {
        format!(
            "host={host} hostaddr=127.0.0.1 port={} user=postgres dbname=postgres {params}",
            self.cluster.port()
        )
    }

    fn ca(&self) -> &str {
        self.ca.to_str().unwrap()
    }

    fn other_ca(&self) -> &str {
        self.other_ca.to_str().unwrap()
    }
}

/// A CA named `ca_name` (PEM), and a server certificate it signed for
/// `db.test` and 127.0.0.1 with its key (PEM).
fn certificates(ca_name: &str) -> (String, String, String) {
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.distinguished_name.push(DnType::CommonName, ca_name);
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();

    let mut server =
        CertificateParams::new(vec!["db.test".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    server
        .distinguished_name
        .push(DnType::CommonName, "db.test");
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate().unwrap();
    let cert = server.signed_by(&key, &ca).unwrap();
    (ca.pem(), cert.pem(), key.serialize_pem())
}

/// Connects one client with `config`.
async fn connect(config: &ConnectConfig) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = config.config().connect(config.connector()).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// Whether `client`'s own connection is encrypted, as the server sees it.
async fn encrypted(client: &Client) -> bool {
    client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// The rustls error under a failed connection, if that is why it failed.
fn rustls_error(e: &tokio_postgres::Error) -> Option<&rustls::Error> {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(e) = next {
        if let Some(found) = e.downcast_ref::<rustls::Error>() {
            return Some(found);
        }
        // `io::Error::source` skips the error it wraps: look inside.
        if let Some(found) = e
            .downcast_ref::<io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(found);
        }
        next = e.source();
    }
    None
}

#[tokio::test]
async fn verify_full_accepts_the_right_ca_and_host_name() {
    let s = server().await;
    for url in [
        s.url(&format!("sslmode=verify-full&sslrootcert={}", s.ca())),
        s.by_name(
            "db.test",
            &format!("sslmode=verify-full sslrootcert={}", s.ca()),
        ),
    ] {
        let config = ConnectConfig::from_url(&url).unwrap();
        assert_eq!(config.ssl_mode(), SslMode::VerifyFull);
        let client = connect(&config)
            .await
            .unwrap_or_else(|e| panic!("{url}: {e:?}"));
        assert!(encrypted(&client).await, "{url}");
    }
}

#[tokio::test]
async fn verify_full_refuses_a_certificate_of_another_ca() {
    let s = server().await;
    let config = ConnectConfig::from_url(
        &s.url(&format!("sslmode=verify-full&sslrootcert={}", s.other_ca())),
    )
    .unwrap();
    let err = connect(&config).await.unwrap_err();
    assert!(
        matches!(
            rustls_error(&err),
            Some(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer
            ))
        ),
        "{err:?}"
    );

    // The same through the store's pool: the pool's error keeps the cause.
    let pool = pool_from_url(
        &s.url(&format!("sslmode=verify-full&sslrootcert={}", s.other_ca())),
        1,
    )
    .unwrap();
    let err = pool.get().await.unwrap_err();
    let saga_postgres::deadpool_postgres::PoolError::Backend(err) = err else {
        panic!("not a connection error: {err:?}");
    };
    assert!(
        matches!(
            rustls_error(&err),
            Some(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer
            ))
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn verify_full_refuses_a_certificate_for_another_host_name() {
    let s = server().await;
    let config = ConnectConfig::from_url(&s.by_name(
        "wrong.test",
        &format!("sslmode=verify-full sslrootcert={}", s.ca()),
    ))
    .unwrap();
    let err = connect(&config).await.unwrap_err();
    assert!(
        matches!(
            rustls_error(&err),
            Some(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. }
            ))
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn verify_ca_checks_the_chain_but_not_the_host_name() {
    let s = server().await;
    let right = ConnectConfig::from_url(&s.by_name(
        "wrong.test",
        &format!("sslmode=verify-ca sslrootcert={}", s.ca()),
    ))
    .unwrap();
    assert!(encrypted(&connect(&right).await.unwrap()).await);

    let wrong = ConnectConfig::from_url(&s.by_name(
        "wrong.test",
        &format!("sslmode=verify-ca sslrootcert={}", s.other_ca()),
    ))
    .unwrap();
    let err = connect(&wrong).await.unwrap_err();
    assert!(
        matches!(
            rustls_error(&err),
            Some(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer
            ))
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn require_and_prefer_encrypt_without_checking_the_certificate() {
    let s = server().await;
    for mode in ["require", "prefer"] {
        // No root given, and a host name the certificate does not bear.
        let config =
            ConnectConfig::from_url(&s.by_name("wrong.test", &format!("sslmode={mode}"))).unwrap();
        let client = connect(&config)
            .await
            .unwrap_or_else(|e| panic!("{mode}: {e:?}"));
        assert!(encrypted(&client).await, "{mode}");
    }
    // A driver configuration keeps its own mode (here the default,
    // `prefer`): encrypted too, where it was plain text before.
    let pool = saga_postgres::pool_from_config(s.cluster.config("postgres"), 1).unwrap();
    assert!(encrypted(&pool.get().await.unwrap()).await);
}

#[tokio::test]
async fn disable_is_refused_by_a_tls_only_server() {
    let s = server().await;
    let config = ConnectConfig::from_url(&s.url("sslmode=disable")).unwrap();
    let err = connect(&config).await.unwrap_err();
    assert_eq!(
        err.code(),
        Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION),
        "{err:?}"
    );
    let text = err.as_db_error().unwrap().message();
    assert!(text.contains("no encryption"), "{text}");
}

static SCHEMAS: AtomicUsize = AtomicUsize::new(0);

/// A pool over TLS (`verify-full`) on a fresh migrated schema.
async fn tls_schema(s: &TlsServer) -> (Pool, SchemaName) {
    let url = s.url(&format!("sslmode=verify-full&sslrootcert={}", s.ca()));
    let pool = pool_from_url(&url, 4).unwrap();
    let schema =
        SchemaName::new(format!("tls_{}", SCHEMAS.fetch_add(1, Ordering::Relaxed))).unwrap();
    let mut client = pool.get().await.unwrap();
    saga_postgres::migrate(&mut client, &schema).await.unwrap();
    (pool, schema)
}

async fn reserve(_: &mut StepContext, _: &mut u32) -> Result<(), StepError> {
    Ok(())
}

async fn confirm(ctx: &mut StepContext, order: &mut u32) -> Result<(), StepError> {
    ctx.emit(Message::json(
        "order.confirmed",
        &serde_json::json!({ "order": *order }),
    )?)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_runs_a_saga_over_tls() {
    let s = server().await;
    let (pool, schema) = tls_schema(s).await;
    let saga = SagaDefinition::<u32>::builder("tls_checkout", 1)
        .step(Step::new("reserve", reserve).compensate_with(reserve))
        .pivot(Step::new("confirm", confirm))
        .build()
        .unwrap();
    let executor = Executor::builder(PgSagaStore::new(pool.clone(), schema.clone()))
        .register(saga.clone())
        .build()
        .unwrap();
    let client = executor.client();
    let id = client
        .start(&saga, StartKey::new("order-1").unwrap(), &1)
        .await
        .unwrap()
        .id;
    executor.run_until_idle().await.unwrap();
    assert_eq!(client.snapshot(id).await.unwrap().status, Status::Completed);
    // Its message went to the outbox in the same transactions, over TLS.
    let db = pool.get().await.unwrap();
    assert!(encrypted(&db).await);
    let rows: i64 = db
        .query_one(
            &format!("SELECT count(*) FROM {}.outbox", schema.quoted()),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_past_its_deadline_is_cancelled_over_tls() {
    let s = server().await;
    let (pool, schema) = tls_schema(s).await;
    let q = schema.quoted();
    // A start that never ends on its own: it takes advisory lock 43 for its
    // transaction, then sleeps for an hour.
    let admin = pool.get().await.unwrap();
    admin
        .batch_execute(&format!(
            "CREATE FUNCTION {q}.hang() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 PERFORM pg_advisory_xact_lock(43);
                 PERFORM pg_sleep(3600);
                 RETURN NEW;
             END $$;
             CREATE TRIGGER hang BEFORE INSERT ON {q}.saga_instances
                 FOR EACH ROW EXECUTE FUNCTION {q}.hang();"
        ))
        .await
        .unwrap();
    let store = PgSagaStore::builder(pool.clone(), schema.clone())
        .operation_deadline(Duration::from_secs(3))
        .build();
    let saga = SagaDefinition::<u32>::builder("tls_cancel", 1)
        .step(Step::new("reserve", reserve).compensate_with(reserve))
        .build()
        .unwrap();
    let err = saga_core::SagaClient::new(store)
        .start(&saga, StartKey::new("order-1").unwrap(), &1)
        .await
        .unwrap_err();
    // The store gave up at its deadline and sent a cancel request, over
    // TLS as the connection's `verify-full` asks. Only the cancellation
    // ends the statement (the server does not notice the closed
    // connection while it sleeps), and with it the lock: waiting for the
    // lock is waiting for the cancellation to reach the server.
    admin
        .batch_execute("SET lock_timeout = '20s'")
        .await
        .unwrap();
    admin
        .execute("SELECT pg_advisory_lock(43)", &[])
        .await
        .unwrap_or_else(|e| panic!("the statement was not cancelled ({err}): {e:?}"));
    let log = std::fs::read_to_string(s.cluster.data_dir().parent().unwrap().join("postgres.log"))
        .unwrap();
    assert!(
        log.contains("canceling statement due to user request"),
        "the server log shows no cancelled statement:\n{log}"
    );
}

/// Long enough that a delivery within the test's wait cannot come from
/// polling.
const NEVER: Duration = Duration::from_secs(3600);

async fn wait_status(
    rx: &mut watch::Receiver<ListenerStatus>,
    what: &str,
    f: impl FnMut(&ListenerStatus) -> bool,
) -> ListenerStatus {
    *tokio::time::timeout(WAIT, rx.wait_for(f))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for the listener to be {what}"))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_wake_ups_arrive_over_tls() {
    let s = server().await;
    let (pool, schema) = tls_schema(s).await;
    let outbox = Outbox::new(pool.clone(), schema.clone());
    let recorder = Recorder::new();
    let listen =
        ConnectConfig::from_url(&s.url(&format!("sslmode=verify-full&sslrootcert={}", s.ca())))
            .unwrap();
    let dispatcher = DispatcherBuilder::from_arc(outbox.clone(), recorder.clone())
        .poll_interval(NEVER)
        .stats_interval(None)
        .listen(listen)
        .build()
        .unwrap();
    let running = Running::start(dispatcher);
    let mut status = running.dispatcher.listener_status();
    wait_status(&mut status, "listening", |s| s.listening).await;
    // Caught up with the wake-up of its connection: from here on only a
    // notification makes it look at the outbox (polling would take an hour).
    let sent = status.borrow().wake_ups;
    let idle = wait_status(&mut status, "caught up", |s| s.wake_ups_handled >= sent).await;

    let ids = {
        let mut client = pool.get().await.unwrap();
        let tx = client.transaction().await.unwrap();
        let ids = outbox
            .enqueue_all_in_tx(&tx, vec![msg("t", 1)])
            .await
            .unwrap();
        tx.commit().await.unwrap();
        ids
    };
    recorder.wait_published(1).await;
    assert_eq!(recorder.published_ids(), ids);
    let now = *status.borrow();
    assert!(now.wake_ups > idle.wake_ups, "{idle:?} -> {now:?}");
    assert_eq!((now.connections, now.failures), (1, 0), "{now:?}");
    // The listening connection is one of the server's encrypted ones.
    let listening_encrypted: Vec<bool> = pool
        .get()
        .await
        .unwrap()
        .query(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
             WHERE a.application_name = 'saga-outbox-listener'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(listening_encrypted, [true]);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_refused_by_the_server_is_counted_and_polling_delivers() {
    let s = server().await;
    let (pool, schema) = tls_schema(s).await;
    let outbox = Outbox::new(pool.clone(), schema.clone());
    let recorder = Recorder::new();
    // Plain text: the server refuses it.
    let listen = ConnectConfig::from_url(&s.url("sslmode=disable")).unwrap();
    let dispatcher = DispatcherBuilder::from_arc(outbox.clone(), recorder.clone())
        .poll_interval(Duration::from_millis(50))
        .stats_interval(None)
        .listen(listen)
        .build()
        .unwrap();
    let running = Running::start(dispatcher);
    let mut status = running.dispatcher.listener_status();
    let failed = wait_status(&mut status, "failing", |s| s.failures >= 1).await;
    assert!(!failed.listening, "{failed:?}");
    assert_eq!(failed.connections, 0, "{failed:?}");

    let ids = {
        let mut client = pool.get().await.unwrap();
        let tx = client.transaction().await.unwrap();
        let ids = outbox
            .enqueue_all_in_tx(&tx, vec![msg("t", 1)])
            .await
            .unwrap();
        tx.commit().await.unwrap();
        ids
    };
    recorder.wait_published(1).await;
    assert_eq!(recorder.published_ids(), ids);
    running.stop().await;
}
