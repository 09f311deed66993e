#![doc = include_str!("../README.md")]

mod db;
mod error;
pub mod inbox;
pub mod metrics;
mod migrate;
pub mod outbox;
mod pool;
mod schema;
mod store;
pub mod tags;
mod tls;

pub use error::{BoxError, PgError};
pub use inbox::{ConsumerName, Delivery, Inbox, InboxBuilder};
pub use migrate::{
    MIGRATIONS, Migration, MigrationClient, MigrationReport, check as check_migrations,
    latest_version, lock_key as migration_lock_key, migrate, migrate_with,
};
pub use outbox::{Dispatcher, Outbox, OutboxBuilder, OutboxError};
pub use pool::{
    DEFAULT_MAX_CONNECTION_LIFETIME, DEFAULT_POOL_SIZE, PoolOptions, pool_from_config,
    pool_from_url, pool_with_options,
};
pub use schema::{MAX_SCHEMA_LEN, SchemaName};
pub use store::{DEFAULT_OPERATION_DEADLINE, PgSagaStore, PgSagaStoreBuilder, StoreStats};
pub use tls::{ConnectConfig, RootCerts, SslMode, TlsError};

/// Re-exported so that users build pools and clients with the same versions.
pub use deadpool_postgres;
/// Re-exported so that users build pools and clients with the same versions.
pub use tokio_postgres;
/// Re-exported for [`ConnectConfig::with_client_config`] and
/// [`ConnectConfig::connector`].
pub use {rustls, tokio_postgres_rustls};

/// Every statement the crate sends (named `component.statement`), in the
/// form sent, with the number of parameters its binder binds: for the
/// crate's own statement tests. Not part of the API.
#[doc(hidden)]
#[must_use]
pub fn __statements(schema: &SchemaName) -> Vec<(String, String, usize)> {
    let mut all = Vec::new();
    let mut add = |component: &str, statements: Vec<db::statement::Statement>| {
        for s in statements {
            all.push((
                format!("{component}.{}", s.name()),
                s.text().to_owned(),
                s.params().len(),
            ));
        }
    };
    add("store", store::PgSagaStore::statements(schema));
    add("outbox", outbox::statements(schema));
    add("inbox", inbox::statements(schema));
    all
}
