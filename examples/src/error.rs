//! The example's error.

/// Everything that can go wrong running the checkout.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The saga engine failed.
    #[error(transparent)]
    Saga(#[from] saga_core::Error),
    /// A saga definition or the executor's configuration was refused.
    #[error(transparent)]
    Build(#[from] saga_core::BuildError),
    /// The Postgres store failed.
    #[error(transparent)]
    Store(#[from] saga_postgres::PgError),
    /// A database statement failed.
    #[error("database error")]
    Db(#[from] saga_postgres::tokio_postgres::Error),
    /// No connection could be had.
    #[error("no database connection")]
    Pool(#[from] saga_postgres::deadpool_postgres::PoolError),
    /// An invalid name or key.
    #[error(transparent)]
    InvalidName(#[from] saga_core::InvalidName),
    /// JSON (de)serialization failed.
    #[error("JSON error")]
    Json(#[from] serde_json::Error),
    /// The HTTP client could not be built.
    #[error("HTTP client error")]
    Http(#[source] reqwest::Error),
    /// The throwaway database could not be started.
    #[error("could not start a throwaway database")]
    TestDatabase(#[source] saga_postgres::testing::TestDbError),
    /// The outbox dispatcher could not be set up.
    #[error("outbox error")]
    Outbox(#[source] saga_postgres::outbox::OutboxError),
    /// A socket could not be opened.
    #[error("I/O error")]
    Io(#[from] std::io::Error),
}

/// An error and its causes on one line, `: `-separated, for a CLI's last
/// word.
#[must_use]
pub fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    saga_core::ErrorChain(error).to_string()
}
