//! Connection pools: the one place where connections are configured (and
//! their transport chosen).

use std::time::Duration;

use deadpool_postgres::{Hook, HookError, Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};

use crate::error::PgError;
use crate::tls::{ConnectConfig, TlsError};

/// Default size of the connection pool made by
/// [`PgSagaStore::connect`](crate::PgSagaStore::connect).
pub const DEFAULT_POOL_SIZE: usize = 16;
/// Default longest life of a pooled connection: 30 minutes. Past it, the
/// connection is closed when it next comes back to the pool, and replaced
/// by a fresh one (a new session, which picks up changed settings such as
/// `default_transaction_read_only`, and lets connections rebalance after a
/// failover).
pub const DEFAULT_MAX_CONNECTION_LIFETIME: Duration = Duration::from_secs(30 * 60);

/// How [`pool_with_options`] builds a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolOptions {
    /// Most connections open at once.
    pub max_size: usize,
    /// Longest life of a connection; `None`: unlimited.
    pub max_lifetime: Option<Duration>,
}

impl Default for PoolOptions {
    fn default() -> Self {
        PoolOptions {
            max_size: DEFAULT_POOL_SIZE,
            max_lifetime: Some(DEFAULT_MAX_CONNECTION_LIFETIME),
        }
    }
}

impl PoolOptions {
    /// Most connections open at once (default [`DEFAULT_POOL_SIZE`]).
    #[must_use]
    pub fn max_size(mut self, n: usize) -> Self {
        self.max_size = n;
        self
    }

    /// Longest life of a connection (default
    /// [`DEFAULT_MAX_CONNECTION_LIFETIME`]; `None`: unlimited).
    #[must_use]
    pub fn max_lifetime(mut self, d: Option<Duration>) -> Self {
        self.max_lifetime = d;
        self
    }
}

/// A pool of `max_size` connections to `url`, secured as its `sslmode` and
/// `sslrootcert` say (see [`ConnectConfig`]), with the default connection
/// lifetime.
pub fn pool_from_url(url: &str, max_size: usize) -> Result<Pool, PgError> {
    let config = ConnectConfig::from_url(url).map_err(|e| match e {
        TlsError::InvalidUrl(e) => PgError::InvalidUrl(e),
        e => PgError::Tls(e),
    })?;
    pool_from_config(config, max_size)
}

/// A pool of `max_size` connections with `config`: a [`ConnectConfig`], or
/// a driver configuration (secured as its own `ssl_mode` says, no
/// certificate checked); with the default connection lifetime.
pub fn pool_from_config(
    config: impl Into<ConnectConfig>,
    max_size: usize,
) -> Result<Pool, PgError> {
    pool_with_options(config, PoolOptions::default().max_size(max_size))
}

/// A pool with `config` (secured as [`ConnectConfig`] says) and `options`.
///
/// A configuration without a host fails with [`PgError::NoHost`] (the
/// driver has no default host, so no connection could ever be made).
///
/// Connections get a 5 s connect timeout (unless `config` sets one) and TCP
/// keepalives; waiting for a pooled connection, making one and recycling
/// one each time out. A connection older than
/// [`max_lifetime`](PoolOptions::max_lifetime) is closed instead of being
/// handed out again; one whose session turned out unusable (it refuses
/// writes, SQLSTATE 25006) is closed by the crate at once.
pub fn pool_with_options(
    config: impl Into<ConnectConfig>,
    options: PoolOptions,
) -> Result<Pool, PgError> {
    let connect = config.into();
    let mut config = connect.config().clone();
    if config.get_hosts().is_empty() && config.get_hostaddrs().is_empty() {
        return Err(PgError::NoHost);
    }
    if options.max_size == 0 {
        return Err(PgError::InvalidConfig(
            "the pool needs at least one connection",
        ));
    }
    if options.max_lifetime.is_some_and(|d| d.is_zero()) {
        return Err(PgError::InvalidConfig(
            "the connection lifetime must be above zero",
        ));
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(5));
    }
    config.keepalives_idle(Duration::from_secs(30));
    let manager = Manager::from_config(
        config,
        connect.connector(),
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let mut builder = Pool::builder(manager)
        .max_size(options.max_size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_secs(10)))
        .create_timeout(Some(Duration::from_secs(5)))
        .recycle_timeout(Some(Duration::from_secs(5)));
    if let Some(max) = options.max_lifetime {
        builder = builder.pre_recycle(Hook::sync_fn(move |_, metrics| {
            if metrics.age() >= max {
                return Err(HookError::Message(
                    "the connection reached its maximum lifetime".into(),
                ));
            }
            Ok(())
        }));
    }
    Ok(builder.build()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_url_without_a_host_is_refused_and_user_and_database_default() {
        for url in ["postgresql://", "postgres://app@/db", "dbname=app"] {
            let err = pool_from_url(url, 1).unwrap_err();
            assert!(matches!(err, PgError::NoHost), "{url}: {err:?}");
        }
        // The user (and the database, after it) default as in libpq.
        pool_from_url("postgresql://localhost", 1).unwrap();
        pool_from_url("host=/var/run/postgresql", 1).unwrap();
    }
}
