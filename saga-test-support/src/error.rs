//! The one error type of the test-database helpers.

use std::{error::Error as StdError, io, path::PathBuf};

/// What to do when no PostgreSQL server can be found for the tests.
pub(crate) const INSTALL_HINT: &str = "install PostgreSQL (initdb, pg_ctl and postgres on PATH, \
     e.g. apt install postgresql / brew install postgresql@15), or set DATABASE_URL to a server \
     where this user may create databases, or enable the `testcontainers` feature with Docker running";

/// Why a test database, schema or cluster could not be provided.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TestDbError {
    /// No `DATABASE_URL`, no local PostgreSQL binaries and no Docker engine.
    #[error("no PostgreSQL server for the tests: {INSTALL_HINT}")]
    NoPostgres {
        /// The directories searched for `initdb`, `pg_ctl` and `postgres`.
        searched: Vec<PathBuf>,
    },

    /// `DATABASE_URL` is set but is not a PostgreSQL connection string.
    #[error("DATABASE_URL is not a valid PostgreSQL connection string")]
    InvalidDatabaseUrl(#[source] tokio_postgres::Error),

    /// The server is reached over a Unix socket, so it has no TCP address.
    #[error("the test server at {host} is not reached over TCP")]
    NotTcp {
        /// The server's host as configured (a socket directory).
        host: String,
    },

    /// The process runs as root, which `initdb` refuses, and there is no
    /// unprivileged OS user to run the throwaway cluster as.
    #[error(
        "running as root, and initdb refuses to run as root: no `{user}` OS user to run the \
         throwaway cluster as (create it, run the tests as another user, or set DATABASE_URL)"
    )]
    NoUnprivilegedUser {
        /// The OS user that was looked up.
        user: &'static str,
    },

    /// A step of setting up or driving a throwaway cluster failed; `log`
    /// holds the end of the relevant log file.
    #[error("throwaway PostgreSQL cluster: {step} failed:\n{log}")]
    Cluster {
        /// What failed (`initdb`, `pg_ctl start`, ...).
        step: &'static str,
        /// The last lines of the log written by that step.
        log: String,
    },

    /// An operating-system call failed.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// Connecting to the test server failed.
    #[error("could not connect to the test server at {target}")]
    Connect {
        /// Where (host, port and database; no password).
        target: String,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },

    /// A statement run by the helpers failed.
    #[error("`{statement}` failed")]
    Sql {
        /// The statement.
        statement: String,
        /// The driver's error (its SQLSTATE is kept).
        #[source]
        source: tokio_postgres::Error,
    },

    /// A blocking helper task panicked or was cancelled.
    #[error("a blocking helper task of the test support failed")]
    Task(#[source] tokio::task::JoinError),

    /// Starting a PostgreSQL container failed.
    #[cfg(feature = "testcontainers")]
    #[error("could not start a PostgreSQL container")]
    Container(#[source] testcontainers::TestcontainersError),
}

impl TestDbError {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn sql(statement: impl Into<String>, source: tokio_postgres::Error) -> Self {
        Self::Sql {
            statement: statement.into(),
            source,
        }
    }
}

/// `error` and its causes, one line: `outer: cause: root cause`.
pub(crate) fn chain(error: &(dyn StdError + 'static)) -> String {
    saga_core::ErrorChain(error).to_string()
}
