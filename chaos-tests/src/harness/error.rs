//! The harness's errors.

/// The harness's errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The checkout deployment failed.
    #[error(transparent)]
    Checkout(#[from] checkout::Error),
    /// The throwaway database failed.
    #[error("the test database failed")]
    TestDb(#[from] saga_test_support::TestDbError),
    /// A process or socket failed.
    #[error("I/O error")]
    Io(#[from] std::io::Error),
    /// A worker spec could not be encoded.
    #[error("JSON error")]
    Json(#[from] serde_json::Error),
}
