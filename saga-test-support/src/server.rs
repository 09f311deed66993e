//! The shared test server, and databases and schemas made on it.

use std::{
    env, fmt,
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    str::FromStr,
};

use tokio::sync::OnceCell;
use tokio_postgres::{Client, Config, NoTls, config::Host, error::SqlState};
use uuid::Uuid;

use super::{
    TestDbError,
    cluster::{self, Cluster},
};
use crate::error::chain;

/// The database that holds the schemas made by [`fresh_schema`].
const SCHEMAS_DATABASE: &str = "saga_test_schemas";

/// The server shared by every test of this process.
static SERVER: OnceCell<TestServer> = OnceCell::const_new();

/// The PostgreSQL server shared by every test of this process, started on
/// first use: `DATABASE_URL` if set, else a throwaway local cluster, else
/// (with the `testcontainers` feature) a Docker container. See the
/// [module documentation](super).
///
/// The server does not belong to any tokio runtime: tests running on
/// different runtimes share it.
pub async fn test_server() -> Result<&'static TestServer, TestDbError> {
    SERVER.get_or_try_init(TestServer::start).await
}

/// Creates a database with a unique name on the [`test_server`]; see
/// [`TestDatabase`].
pub async fn fresh_database() -> Result<TestDatabase, TestDbError> {
    test_server().await?.fresh_database().await
}

/// Creates a schema with a unique name in a database shared by the tests of
/// the [`test_server`]; see [`TestSchema`]. Cheaper than [`fresh_database`].
pub async fn fresh_schema() -> Result<TestSchema, TestDbError> {
    test_server().await?.fresh_schema().await
}

/// Where the [`TestServer`] comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ServerSource {
    /// The server named by the `DATABASE_URL` environment variable.
    DatabaseUrl,
    /// A throwaway cluster made with the local PostgreSQL binaries.
    LocalCluster,
    /// A Docker container (feature `testcontainers`).
    Container,
}

/// A PostgreSQL server on which the tests may create databases.
pub struct TestServer {
    source: ServerSource,
    host: String,
    port: u16,
    admin_url: String,
    admin_config: Config,
    urls: Urls,
    schemas_database: OnceCell<()>,
    /// Appended to the message printed when a failed test's database or
    /// schema is kept.
    keep_note: &'static str,
    /// Keeps the throwaway cluster alive; never dropped for the shared
    /// server, whose cluster goes when the process exits.
    cluster: Option<Cluster>,
    #[cfg(feature = "testcontainers")]
    _container: Option<super::container::RunningContainer>,
}

impl fmt::Debug for TestServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestServer")
            .field("source", &self.source)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("data_dir", &self.data_dir())
            .finish_non_exhaustive()
    }
}

impl TestServer {
    async fn start() -> Result<Self, TestDbError> {
        if let Some(url) = env::var("DATABASE_URL")
            .ok()
            .filter(|url| !url.trim().is_empty())
        {
            return Self::external(url);
        }
        let searched = match cluster::find_pg_bin() {
            Ok(bin) => {
                let keep = env::var(cluster::KEEP_CLUSTER_ENV).is_ok_and(|keep| keep == "1");
                let cluster =
                    tokio::task::spawn_blocking(move || Cluster::start_blocking(&bin, keep))
                        .await
                        .map_err(TestDbError::Task)??;
                if keep {
                    let dir = cluster.data_dir().display();
                    eprintln!(
                        "saga-test-support: {}=1: the test cluster in {dir} (port {}) is left \
                         running after the tests; stop it with `pg_ctl -D {dir} stop` (as the \
                         `postgres` user if the tests run as root)",
                        cluster::KEEP_CLUSTER_ENV,
                        cluster.port(),
                    );
                }
                return Self::local(cluster, keep);
            }
            Err(searched) => searched,
        };
        #[cfg(feature = "testcontainers")]
        {
            let docker = tokio::task::spawn_blocking(super::container::docker_answers)
                .await
                .map_err(TestDbError::Task)?;
            if docker {
                return Self::container().await;
            }
        }
        Err(TestDbError::NoPostgres { searched })
    }

    fn external(url: String) -> Result<Self, TestDbError> {
        let admin_config = Config::from_str(&url).map_err(TestDbError::InvalidDatabaseUrl)?;
        let host = match admin_config.get_hosts().first() {
            Some(Host::Tcp(host)) => host.clone(),
            Some(Host::Unix(path)) => path.display().to_string(),
            None => "localhost".to_owned(),
        };
        let port = admin_config.get_ports().first().copied().unwrap_or(5432);
        Ok(Self {
            source: ServerSource::DatabaseUrl,
            host,
            port,
            urls: Urls::parse(&url),
            admin_url: url,
            admin_config,
            schemas_database: OnceCell::new(),
            keep_note: "",
            cluster: None,
            #[cfg(feature = "testcontainers")]
            _container: None,
        })
    }

    fn local(cluster: Cluster, kept_at_exit: bool) -> Result<Self, TestDbError> {
        let admin_url = cluster.url("postgres");
        Ok(Self {
            source: ServerSource::LocalCluster,
            host: Ipv4Addr::LOCALHOST.to_string(),
            port: cluster.port(),
            urls: Urls::parse(&admin_url),
            admin_config: parse_config(&admin_url)?,
            admin_url,
            schemas_database: OnceCell::new(),
            keep_note: if kept_at_exit {
                " (SAGA_TEST_KEEP_CLUSTER=1: the cluster is left running after the tests)"
            } else {
                " (the throwaway cluster is removed when the test process exits; set \
                 SAGA_TEST_KEEP_CLUSTER=1 to keep it)"
            },
            cluster: Some(cluster),
            #[cfg(feature = "testcontainers")]
            _container: None,
        })
    }

    #[cfg(feature = "testcontainers")]
    async fn container() -> Result<Self, TestDbError> {
        let running = tokio::task::spawn_blocking(super::container::start)
            .await
            .map_err(TestDbError::Task)??;
        let admin_url = running.url("postgres");
        Ok(Self {
            source: ServerSource::Container,
            host: running.host().to_owned(),
            port: running.port(),
            urls: Urls::parse(&admin_url),
            admin_config: parse_config(&admin_url)?,
            admin_url,
            schemas_database: OnceCell::new(),
            keep_note: " (the container is removed when the test process exits)",
            cluster: None,
            _container: Some(running),
        })
    }

    /// Where the server comes from.
    pub fn source(&self) -> ServerSource {
        self.source
    }

    /// A URL (or, if `DATABASE_URL` was given in key-value form, a
    /// connection string) for an account that may create databases.
    pub fn admin_url(&self) -> &str {
        &self.admin_url
    }

    /// The driver configuration of [`TestServer::admin_url`].
    pub fn admin_config(&self) -> Config {
        self.admin_config.clone()
    }

    /// The server's host (`127.0.0.1` for a local cluster).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The server's TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's TCP address (the host name resolved), e.g. to put a
    /// [`FaultProxy`](super::proxy::FaultProxy) in front of it.
    pub async fn socket_addr(&self) -> Result<SocketAddr, TestDbError> {
        if self.host.starts_with('/') {
            return Err(TestDbError::NotTcp {
                host: self.host.clone(),
            });
        }
        let context = || format!("resolving {}:{}", self.host, self.port);
        tokio::net::lookup_host((self.host.as_str(), self.port))
            .await
            .map_err(|source| TestDbError::io(context(), source))?
            .next()
            .ok_or_else(|| {
                TestDbError::io(
                    context(),
                    std::io::Error::new(std::io::ErrorKind::NotFound, "no address"),
                )
            })
    }

    /// The admin URL with its database replaced by `dbname`.
    pub fn url(&self, dbname: &str) -> String {
        self.urls.url(dbname)
    }

    /// The data directory of the throwaway cluster, if the server is one.
    pub fn data_dir(&self) -> Option<&Path> {
        self.cluster.as_ref().map(Cluster::data_dir)
    }

    /// The process id of the supervisor that removes the throwaway cluster
    /// when this process exits, if the server is one (for tests of that
    /// clean-up).
    pub fn supervisor_pid(&self) -> Option<u32> {
        self.cluster.as_ref().map(Cluster::supervisor_pid)
    }

    /// Creates a database with a unique name on this server; see
    /// [`TestDatabase`].
    pub async fn fresh_database(&self) -> Result<TestDatabase, TestDbError> {
        create_database(&self.admin_url, |name| self.url(name), self.keep_note).await
    }

    /// Creates a schema with a unique name in a database shared by the
    /// tests; see [`TestSchema`].
    pub async fn fresh_schema(&self) -> Result<TestSchema, TestDbError> {
        self.schemas_database
            .get_or_try_init(|| self.ensure_database(SCHEMAS_DATABASE))
            .await?;
        let name = unique_name();
        let url = self.url(SCHEMAS_DATABASE);
        let database_config = parse_config(&url)?;
        let client = connect(&database_config).await?;
        let statement = format!("CREATE SCHEMA \"{name}\"");
        client
            .batch_execute(&statement)
            .await
            .map_err(|source| TestDbError::sql(statement, source))?;
        let mut config = database_config.clone();
        let options = match database_config.get_options() {
            Some(options) if !options.trim().is_empty() => {
                format!("{options} -c search_path={name}")
            }
            _ => format!("-c search_path={name}"),
        };
        config.options(options);
        Ok(TestSchema {
            name,
            keep_note: self.keep_note,
            database: SCHEMAS_DATABASE.to_owned(),
            url,
            database_config,
            config,
        })
    }

    /// Creates `name` unless it exists (other test processes may race).
    async fn ensure_database(&self, name: &str) -> Result<(), TestDbError> {
        let client = connect(&self.admin_config).await?;
        let query = "SELECT 1 FROM pg_database WHERE datname = $1";
        let exists = client
            .query_opt(query, &[&name])
            .await
            .map_err(|source| TestDbError::sql(query, source))?
            .is_some();
        if exists {
            return Ok(());
        }
        let statement = format!("CREATE DATABASE \"{name}\"");
        match client.batch_execute(&statement).await {
            Ok(()) => Ok(()),
            Err(error)
                if error.code() == Some(&SqlState::DUPLICATE_DATABASE)
                    || error.code() == Some(&SqlState::UNIQUE_VIOLATION) =>
            {
                Ok(())
            }
            Err(source) => Err(TestDbError::sql(statement, source)),
        }
    }
}

/// How to make a URL for another database of the same server.
#[derive(Debug)]
enum Urls {
    /// `scheme://authority/` + database + `?query`.
    Url { prefix: String, query: String },
    /// A key-value connection string: `dbname=` is appended (the last
    /// occurrence wins).
    KeyValue(String),
}

impl Urls {
    fn parse(url: &str) -> Self {
        let scheme = ["postgres://", "postgresql://"]
            .into_iter()
            .find(|scheme| url.starts_with(scheme));
        let Some(scheme) = scheme else {
            return Self::KeyValue(url.to_owned());
        };
        let rest = &url[scheme.len()..];
        let (before_query, query) = match rest.find('?') {
            Some(at) => rest.split_at(at),
            None => (rest, ""),
        };
        let authority = before_query.split('/').next().unwrap_or_default();
        Self::Url {
            prefix: format!("{scheme}{authority}/"),
            query: query.to_owned(),
        }
    }

    fn url(&self, dbname: &str) -> String {
        match self {
            Self::Url { prefix, query } => format!("{prefix}{dbname}{query}"),
            Self::KeyValue(connection_string) => format!("{connection_string} dbname={dbname}"),
        }
    }
}

/// A database with a unique name (`saga_test_<uuid>`), made for one test.
///
/// Dropped (`DROP DATABASE ... WITH (FORCE)`) when this value is dropped,
/// unless the thread is panicking — a failed test — in which case it is
/// kept and its name and URL are printed so that it can be inspected. The
/// drop runs on a short-lived thread of its own, so it works inside and
/// outside a tokio runtime.
pub struct TestDatabase {
    name: String,
    keep_note: &'static str,
    url: String,
    config: Config,
    admin_config: Config,
}

impl fmt::Debug for TestDatabase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestDatabase")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl TestDatabase {
    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A URL for it, e.g. `postgres://postgres@127.0.0.1:PORT/NAME`, that
    /// `tokio_postgres::Config::from_str` accepts.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The driver configuration of [`TestDatabase::url`].
    pub fn config(&self) -> Config {
        self.config.clone()
    }

    /// The same configuration, but connecting to `addr` (e.g. a
    /// [`FaultProxy`](super::proxy::FaultProxy)) instead of the server.
    pub fn config_via(&self, addr: SocketAddr) -> Config {
        config_via(&self.config, addr)
    }

    /// Connects, and drives the connection on a task of the current tokio
    /// runtime.
    pub async fn connect(&self) -> Result<Client, TestDbError> {
        connect(&self.config).await
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "saga-test-support: the test failed; keeping database `{}` for inspection: {}{}",
                self.name, self.url, self.keep_note
            );
            return;
        }
        let statement = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name);
        if let Err(error) = execute_detached(self.admin_config.clone(), statement) {
            eprintln!(
                "saga-test-support: could not drop test database `{}`: {}",
                self.name,
                chain(&error)
            );
        }
    }
}

/// A schema with a unique name (`saga_test_<uuid>`) in a database shared by
/// the tests of the server, made for one test: cheaper than a database.
///
/// [`TestSchema::config`] sets `search_path` to the schema, so unqualified
/// names resolve in it. Dropped (`DROP SCHEMA ... CASCADE`) when this value
/// is dropped, unless the thread is panicking — a failed test — in which
/// case it is kept and printed, like [`TestDatabase`].
pub struct TestSchema {
    name: String,
    keep_note: &'static str,
    database: String,
    url: String,
    database_config: Config,
    config: Config,
}

impl fmt::Debug for TestSchema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestSchema")
            .field("name", &self.name)
            .field("database", &self.database)
            .finish_non_exhaustive()
    }
}

impl TestSchema {
    /// The schema's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The name of the (shared) database that holds the schema.
    pub fn database_name(&self) -> &str {
        &self.database
    }

    /// A URL for the database that holds the schema (it does not set
    /// `search_path`; [`TestSchema::config`] does).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The driver configuration for the database, with `search_path` set to
    /// the schema.
    pub fn config(&self) -> Config {
        self.config.clone()
    }

    /// The same as [`TestSchema::config`], but connecting to `addr` (e.g. a
    /// [`FaultProxy`](super::proxy::FaultProxy)) instead of the server.
    pub fn config_via(&self, addr: SocketAddr) -> Config {
        config_via(&self.config, addr)
    }

    /// Connects with `search_path` set to the schema, and drives the
    /// connection on a task of the current tokio runtime.
    pub async fn connect(&self) -> Result<Client, TestDbError> {
        connect(&self.config).await
    }
}

impl Drop for TestSchema {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "saga-test-support: the test failed; keeping schema `{}` for inspection in {}{}",
                self.name, self.url, self.keep_note
            );
            return;
        }
        // A connection the test left inside a transaction (on a runtime this
        // drop now blocks) would hold its locks forever: end the sessions
        // holding locks on the schema's objects first. The name is ours and
        // validated, so it is safe to inline.
        let statement = format!(
            "SELECT pg_terminate_backend(pid) FROM (
                 SELECT DISTINCT l.pid FROM pg_locks l
                 JOIN pg_class c ON c.oid = l.relation
                 JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname = '{name}' AND l.pid <> pg_backend_pid()) AS holders;
             DROP SCHEMA IF EXISTS \"{name}\" CASCADE",
            name = self.name
        );
        if let Err(error) = execute_detached(self.database_config.clone(), statement) {
            eprintln!(
                "saga-test-support: could not drop test schema `{}`: {}",
                self.name,
                chain(&error)
            );
        }
    }
}

/// `CREATE DATABASE` with a unique name through `admin_url`.
pub(crate) async fn create_database(
    admin_url: &str,
    url_of: impl Fn(&str) -> String,
    keep_note: &'static str,
) -> Result<TestDatabase, TestDbError> {
    let admin_config = parse_config(admin_url)?;
    let name = unique_name();
    let url = url_of(&name);
    let config = parse_config(&url)?;
    let client = connect(&admin_config).await?;
    let statement = format!("CREATE DATABASE \"{name}\"");
    client
        .batch_execute(&statement)
        .await
        .map_err(|source| TestDbError::sql(statement, source))?;
    Ok(TestDatabase {
        name,
        keep_note,
        url,
        config,
        admin_config,
    })
}

fn unique_name() -> String {
    format!("saga_test_{}", Uuid::now_v7().simple())
}

fn parse_config(url: &str) -> Result<Config, TestDbError> {
    Config::from_str(url).map_err(TestDbError::InvalidDatabaseUrl)
}

/// Connects and drives the connection on a task of the current runtime.
pub(crate) async fn connect(config: &Config) -> Result<Client, TestDbError> {
    let (client, connection) =
        config
            .connect(NoTls)
            .await
            .map_err(|source| TestDbError::Connect {
                target: describe(config),
                source,
            })?;
    tokio::spawn(async move {
        // Its end (or error) shows up on the client's next call.
        let _ = connection.await;
    });
    Ok(client)
}

/// Host, port and database of a configuration (no password).
fn describe(config: &Config) -> String {
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(host)) => host.clone(),
        Some(Host::Unix(path)) => path.display().to_string(),
        None => "localhost".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let dbname = config.get_dbname().unwrap_or_default();
    format!("{host}:{port}/{dbname}")
}

fn config_via(base: &Config, addr: SocketAddr) -> Config {
    let mut config = Config::new();
    config.host(addr.ip().to_string()).port(addr.port());
    if let Some(user) = base.get_user() {
        config.user(user);
    }
    if let Some(password) = base.get_password() {
        config.password(password);
    }
    if let Some(dbname) = base.get_dbname() {
        config.dbname(dbname);
    }
    if let Some(options) = base.get_options() {
        config.options(options);
    }
    if let Some(name) = base.get_application_name() {
        config.application_name(name);
    }
    if let Some(timeout) = base.get_connect_timeout() {
        config.connect_timeout(*timeout);
    }
    config.ssl_mode(base.get_ssl_mode());
    config
}

/// Runs one statement on a short-lived thread with a runtime of its own, so
/// that it works from `Drop`, inside or outside a tokio runtime.
fn execute_detached(mut config: Config, statement: String) -> Result<(), TestDbError> {
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(std::time::Duration::from_secs(10));
    }
    let worker = std::thread::Builder::new()
        .name("saga-test-db-drop".to_owned())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|source| TestDbError::io("building a runtime for clean-up", source))?;
            runtime.block_on(async {
                let client = connect(&config).await?;
                client
                    .batch_execute(&statement)
                    .await
                    .map_err(|source| TestDbError::sql(statement.clone(), source))
            })
        })
        .map_err(|source| TestDbError::io("starting a clean-up thread", source))?;
    worker.join().unwrap_or_else(|_| {
        Err(TestDbError::io(
            "cleaning up",
            std::io::Error::other("the clean-up thread panicked"),
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_replace_the_database_and_keep_the_rest() {
        let urls = Urls::parse("postgres://me:secret@db.example:6543/postgres?sslmode=disable");
        assert_eq!(
            urls.url("other"),
            "postgres://me:secret@db.example:6543/other?sslmode=disable"
        );
        let urls = Urls::parse("postgresql://me@localhost");
        assert_eq!(urls.url("other"), "postgresql://me@localhost/other");
        let urls = Urls::parse("host=localhost user=me dbname=postgres");
        let config = Config::from_str(&urls.url("other")).unwrap();
        assert_eq!(config.get_dbname(), Some("other"));
        assert_eq!(config.get_user(), Some("me"));
    }

    #[test]
    fn config_via_keeps_the_account_and_database() {
        let base = Config::from_str("postgres://me:secret@db.example:6543/app").unwrap();
        let via = config_via(&base, "127.0.0.1:4000".parse().unwrap());
        assert_eq!(via.get_hosts(), &[Host::Tcp("127.0.0.1".to_owned())]);
        assert_eq!(via.get_ports(), &[4000]);
        assert_eq!(via.get_user(), Some("me"));
        assert_eq!(via.get_password(), Some(&b"secret"[..]));
        assert_eq!(via.get_dbname(), Some("app"));
    }

    #[test]
    fn unique_names_are_valid_unquoted_identifiers() {
        let name = unique_name();
        assert!(name.len() <= 63, "{name} is longer than NAMEDATALEN");
        assert!(
            name.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        );
        assert_ne!(name, unique_name());
    }
}
