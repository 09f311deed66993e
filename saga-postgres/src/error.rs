//! This crate's error, keeping PostgreSQL's own error (and its SQLSTATE) as
//! the source.

use std::error::Error as StdError;
use std::io;

use tokio_postgres::error::SqlState;

pub use saga_core::BoxError;

/// Everything that can go wrong in `saga-postgres`.
///
/// Inside the [`SagaStore`](saga_core::store::SagaStore) methods it travels as
/// [`saga_core::Error::Store`] (a [`StoreFailure`](saga_core::store::StoreFailure)); ask it
/// [`PgError::code`], [`PgError::is_retryable`] or [`PgError::is_connection_error`],
/// or the [`saga_core::Error`] its `is_retryable()` and `code()`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PgError {
    /// The configured schema name is not a safe identifier.
    #[error("invalid schema name {name:?}: {reason}")]
    InvalidSchemaName {
        /// The name given (truncated).
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// PostgreSQL (or the connection to it) failed. The SQLSTATE, if the
    /// server sent one, is available from [`PgError::code`]; the message
    /// says it, and what the server said.
    #[error("{}", describe(.0))]
    Db(#[from] tokio_postgres::Error),

    /// No connection could be had from the pool.
    #[error("could not get a database connection from the pool")]
    Pool(#[from] deadpool_postgres::PoolError),

    /// The pool could not be built.
    #[error("could not build the connection pool")]
    BuildPool(#[from] deadpool_postgres::BuildError),

    /// The connection string does not parse.
    #[error("invalid database URL")]
    InvalidUrl(#[source] tokio_postgres::Error),

    /// The connection configuration names no host (`postgresql://`, say).
    /// tokio-postgres, unlike libpq, has no default host or socket, so every
    /// connection would fail; the user and database do have defaults (the
    /// user running the process, and a database named after the user).
    #[error(
        "the database URL names no host: add one (`postgresql://user@localhost/db`, or \
         `host=/var/run/postgresql` for a Unix socket)"
    )]
    NoHost,

    /// The connection's TLS settings (`sslmode`, `sslrootcert`) are
    /// invalid, or its root certificates unreadable.
    #[error("invalid TLS settings")]
    Tls(#[from] crate::tls::TlsError),

    /// An applied migration's text differs from the one in this binary.
    #[error(
        "migration {version} `{name}` was changed after it was applied (checksum mismatch): \
         restore its original text and put the change in a new migration"
    )]
    MigrationEdited {
        /// The migration's version.
        version: i32,
        /// Its name.
        name: String,
    },

    /// The schema has not been migrated to what this binary needs.
    #[error(
        "schema `{schema}` lacks migration {missing} (the latest applied is {found}), this \
         binary needs every migration up to {needed}: run `saga_postgres::migrate` (with a role \
         allowed to run DDL) first"
    )]
    NotMigrated {
        /// The schema.
        schema: String,
        /// The latest migration applied (0: none).
        found: i32,
        /// The lowest migration this binary needs that is not applied.
        missing: i32,
        /// The latest migration this binary knows.
        needed: i32,
    },

    /// The schema has a migration, applied by a newer binary, that needs a
    /// binary knowing more migrations than this one (see
    /// [`Migration::compatible_from`](crate::Migration::compatible_from)):
    /// this binary would fail on it. Nothing was changed.
    #[error(
        "schema `{schema}` has migration {migration}{}, which needs a binary that knows migration \
         {needs} or later; this binary (saga-postgres {binary_version}) knows migrations up to \
         {binary}: deploy a newer binary (or roll the database back with the newer release's \
         instructions)",
        applied_by.as_ref().map(|v| format!(" (applied by saga-postgres {v})")).unwrap_or_default()
    )]
    SchemaTooNew {
        /// The schema.
        schema: String,
        /// The applied migration that needs a newer binary.
        migration: i32,
        /// The latest migration a binary must know to work with it.
        needs: i32,
        /// The library version that applied it, if it was recorded.
        applied_by: Option<String>,
        /// The latest migration this binary knows.
        binary: i32,
        /// This binary's library version.
        binary_version: &'static str,
    },

    /// A stored row could not be read back (an unknown status, a malformed
    /// name, a column missing or of another type): somebody wrote to the
    /// tables by hand, or the schema is not the one this binary expects.
    #[error("malformed {what} in a stored row")]
    CorruptRow {
        /// Which column.
        what: &'static str,
        /// Why it does not parse.
        #[source]
        source: BoxError,
    },

    /// A configuration value makes no sense.
    #[error("invalid configuration: {0}")]
    InvalidConfig(&'static str),

    /// A statement was sent without one of its parameters, or with one it
    /// does not have: a bug in this crate.
    #[error("statement `{statement}` bound without, or with an unknown, parameter `{param}`")]
    Unbound {
        /// The statement.
        statement: &'static str,
        /// The parameter.
        param: String,
    },

    /// The operation's deadline
    /// ([`operation_deadline`](crate::PgSagaStoreBuilder::operation_deadline)) passed
    /// while an attempt was still pending (a connection being made, a wait
    /// for a pooled connection, a statement running). The pending statement
    /// was cancelled, but may or may not have taken effect: this counts as
    /// a connection error. The source, if any, is the error of the attempt
    /// before.
    #[error("the database did not answer within the operation's deadline of {after:?}")]
    DeadlineExceeded {
        /// The deadline, measured from the start of the operation.
        after: std::time::Duration,
        /// What the previous attempt failed with, if there was one.
        #[source]
        last: Option<Box<PgError>>,
    },
}

/// SQLSTATEs after which the whole operation may simply be tried again.
const RETRYABLE_STATES: &[SqlState] = &[
    SqlState::T_R_SERIALIZATION_FAILURE,
    SqlState::T_R_DEADLOCK_DETECTED,
    SqlState::ADMIN_SHUTDOWN,
    SqlState::CRASH_SHUTDOWN,
    SqlState::CANNOT_CONNECT_NOW,
    SqlState::CONNECTION_EXCEPTION,
    SqlState::CONNECTION_DOES_NOT_EXIST,
    SqlState::CONNECTION_FAILURE,
    SqlState::SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
    SqlState::SQLSERVER_REJECTED_ESTABLISHMENT_OF_SQLCONNECTION,
    SqlState::TOO_MANY_CONNECTIONS,
    // A session that started while the database was read-only: the crate
    // drops the connection, and the next attempt gets a fresh session.
    SqlState::READ_ONLY_SQL_TRANSACTION,
];

/// Whether a SQLSTATE says the data itself was refused: class 22 (data
/// exception) or 54000 (program limit exceeded).
fn refuses_data(code: &SqlState) -> bool {
    code.code().starts_with("22") || *code == SqlState::PROGRAM_LIMIT_EXCEEDED
}

/// What a database error says: its SQLSTATE and the server's message, or
/// what went wrong with the connection.
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!(
            "database error {} ({}): {}",
            db.code().code(),
            db.severity(),
            db.message()
        ),
        None if e.is_closed() => "database connection closed".to_owned(),
        None => "database connection failed".to_owned(),
    }
}

impl PgError {
    /// The SQLSTATE the server sent, if any.
    #[must_use]
    pub fn code(&self) -> Option<&SqlState> {
        match self {
            PgError::Db(e) | PgError::InvalidUrl(e) => e.code(),
            PgError::Pool(deadpool_postgres::PoolError::Backend(e)) => e.code(),
            PgError::DeadlineExceeded { last: Some(e), .. } => e.code(),
            _ => None,
        }
    }

    /// Whether the connection to the server was lost or could not be made:
    /// a statement sent on it may or may not have taken effect.
    #[must_use]
    pub fn is_connection_error(&self) -> bool {
        let pg = match self {
            PgError::Db(e) => e,
            PgError::Pool(deadpool_postgres::PoolError::Backend(e)) => e,
            PgError::Pool(deadpool_postgres::PoolError::Timeout(_))
            | PgError::DeadlineExceeded { .. } => return true,
            _ => return false,
        };
        if pg.is_closed() {
            return true;
        }
        if let Some(code) = pg.code() {
            return matches!(
                *code,
                SqlState::ADMIN_SHUTDOWN
                    | SqlState::CRASH_SHUTDOWN
                    | SqlState::CANNOT_CONNECT_NOW
                    | SqlState::CONNECTION_EXCEPTION
                    | SqlState::CONNECTION_DOES_NOT_EXIST
                    | SqlState::CONNECTION_FAILURE
                    | SqlState::SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION
                    | SqlState::SQLSERVER_REJECTED_ESTABLISHMENT_OF_SQLCONNECTION
                    | SqlState::TOO_MANY_CONNECTIONS
            );
        }
        // No SQLSTATE: an I/O failure on the socket, or a failure to connect.
        let mut source = pg.source();
        while let Some(e) = source {
            if e.is::<io::Error>() {
                return true;
            }
            source = e.source();
        }
        false
    }

    /// Whether the server refused the data the statement carried, so that
    /// the same statement fails however often it is sent: a data exception
    /// (SQLSTATE class 22: a NUL in text or `jsonb`, 22P05; an invalid byte
    /// sequence, 22021; a number out of range, 22003) or a program limit
    /// exceeded (54000, a value too large to store). Never retryable.
    #[must_use]
    pub fn refuses_data(&self) -> bool {
        self.code().is_some_and(refuses_data)
    }

    /// Whether the operation may be retried as a whole: a lost connection,
    /// a server restart, a serialization failure, a deadlock, or a session
    /// that refuses writes because the database was read-only when it
    /// started.
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        self.is_connection_error() || self.code().is_some_and(|c| RETRYABLE_STATES.contains(c))
    }
}

/// An error and its causes on one line (for stored reasons and logs; the
/// error itself keeps the chain), as [`saga_core::ErrorChain`] renders it.
pub(crate) fn chain(error: &(dyn StdError + 'static)) -> String {
    saga_core::ErrorChain(error).to_string()
}

impl saga_core::store::StoreFailure for PgError {
    fn is_retryable(&self) -> bool {
        PgError::is_retryable(self)
    }

    fn code(&self) -> Option<&str> {
        PgError::code(self).map(SqlState::code)
    }

    fn refuses_data(&self) -> bool {
        PgError::refuses_data(self)
    }
}

impl From<PgError> for saga_core::Error {
    fn from(e: PgError) -> Self {
        saga_core::Error::store(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_exceptions_and_program_limits_refuse_the_data_and_are_not_retried() {
        let table = [
            ("22P05", true),
            ("22021", true),
            ("22003", true),
            ("22001", true),
            ("54000", true),
            ("40001", false),
            ("23505", false),
            ("42P01", false),
            ("08006", false),
        ];
        for (code, refused) in table {
            let state = SqlState::from_code(code);
            assert_eq!(refuses_data(&state), refused, "{code}");
            // Whatever refuses the data is never worth retrying.
            assert!(!(refused && RETRYABLE_STATES.contains(&state)), "{code}");
        }
    }

    #[test]
    fn a_pg_error_answers_as_a_store_failure() {
        let err = saga_core::Error::from(PgError::InvalidSchemaName {
            name: "x;".into(),
            reason: "not an identifier",
        });
        assert!(!err.is_retryable());
        assert_eq!(err.code(), None);
        assert_eq!(
            err.to_string(),
            r#"invalid schema name "x;": not an identifier"#
        );
    }
}
