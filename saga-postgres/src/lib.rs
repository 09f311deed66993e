#![doc = include_str!("../README.md")]

mod error;
pub mod inbox;
pub mod metrics;
mod migrate;
pub mod outbox;
mod schema;
mod store;
pub mod tags;
mod tls;

pub use error::{BoxError, PgError};
pub use inbox::{ConsumerName, Delivery, Inbox};
pub use migrate::{
    MIGRATIONS, Migration, MigrationReport, check as check_migrations, latest_version,
    lock_key as migration_lock_key, migrate, migrate_with,
};
pub use outbox::{Dispatcher, Outbox, OutboxError};
pub use schema::{MAX_SCHEMA_LEN, SchemaName};
pub use store::{
    DEFAULT_POOL_SIZE, DEFAULT_RECONNECT_FOR, PgSagaStore, StoreStats, pool_from_config,
    pool_from_url,
};
pub use tls::{ConnectConfig, RootCerts, SslMode, TlsError};

/// Re-exported so that users build pools and clients with the same versions.
pub use deadpool_postgres;
/// Re-exported so that users build pools and clients with the same versions.
pub use tokio_postgres;
/// Re-exported for [`ConnectConfig::with_client_config`] and
/// [`ConnectConfig::connector`].
pub use {rustls, tokio_postgres_rustls};
