//! The crate's one way to talk to PostgreSQL: run a statement under the
//! operation's deadline, retry what is retryable, resolve an ambiguous
//! reply. The saga store, the outbox (enqueue aside, which runs in the
//! caller's transaction), its dispatcher and the inbox all go through it.
//!
//! ## Deadlines
//!
//! Each operation has one wall-clock deadline (the component's
//! `operation_deadline`). Every attempt, every wait between attempts and
//! every lookup that resolves an ambiguity runs before it; a connection, a
//! pool wait or a statement still pending at the deadline is abandoned (its
//! statement cancelled, its connection closed rather than given back to the
//! pool) and the operation fails.
//!
//! ## Connections whose session is unusable
//!
//! A connection whose session refuses writes (SQLSTATE 25006: it started
//! while the database was read-only, as managed services make a database
//! whose disk is full, and keeps that setting for its life) is discarded
//! instead of going back to the pool, so that the next attempt gets a fresh
//! session. The error is retryable: the database may become writable again.
//!
//! ## Ambiguous replies
//!
//! See [`ambiguity`]: a write identified by an id is looked up after a lost
//! reply; a claim identified by a claim id finds its rows again.

pub(crate) mod ambiguity;
mod budget;
pub(crate) mod clock;
pub(crate) mod rows;
pub(crate) mod statement;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use deadpool_postgres::{Object, Pool};
use tokio::time::Instant;
use tokio_postgres::Row;
use tokio_postgres::error::SqlState;

pub(crate) use budget::{Budget, Deadline, Failed};
use statement::{Param, Statement};

use crate::error::PgError;

/// A pool, the deadline of each operation on it, and what it retried.
#[derive(Debug)]
pub(crate) struct Db {
    pool: Pool,
    operation_deadline: Duration,
    retries: AtomicU64,
}

impl Db {
    pub(crate) fn new(pool: Pool, operation_deadline: Duration) -> Self {
        Db {
            pool,
            operation_deadline,
            retries: AtomicU64::new(0),
        }
    }

    pub(crate) fn pool(&self) -> &Pool {
        &self.pool
    }

    pub(crate) fn operation_deadline(&self) -> Duration {
        self.operation_deadline
    }

    /// Operations retried so far.
    pub(crate) fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    /// A fresh budget for one operation.
    pub(crate) fn budget(&self) -> Budget {
        Budget::new(self.operation_deadline)
    }

    /// One attempt at one statement, before `deadline`.
    pub(crate) async fn attempt(
        &self,
        deadline: Deadline,
        stmt: &Statement,
        values: &[(&str, Param<'_>)],
    ) -> Result<Vec<Row>, Failed> {
        let params = stmt.bind(values)?;
        let prepared = tokio::time::timeout_at(deadline.at, async {
            let client = self.pool.get().await?;
            let prepared = client.prepare_cached(stmt.text()).await;
            match prepared {
                Ok(prepared) => Ok((client, prepared)),
                Err(e) => {
                    discard_if_unusable(client, &e);
                    Err(PgError::from(e))
                }
            }
        })
        .await;
        let (client, prepared) = match prepared {
            Ok(Ok(ready)) => ready,
            Ok(Err(e)) => return Err(Failed::before(e)),
            Err(_) => return Err(Failed::before(deadline.exceeded())),
        };
        match tokio::time::timeout_at(deadline.at, client.query(&prepared, &params)).await {
            Ok(Ok(rows)) => Ok(rows),
            Ok(Err(e)) => {
                discard_if_unusable(client, &e);
                Err(Failed {
                    error: e.into(),
                    in_flight: true,
                })
            }
            Err(_) => {
                abandon(client);
                Err(Failed {
                    error: deadline.exceeded(),
                    in_flight: true,
                })
            }
        }
    }

    /// Waits before retrying `op` after `e`, or gives `e` back when the
    /// error is not worth retrying or the next attempt would start after
    /// the deadline.
    pub(crate) async fn pause(
        &self,
        op: &'static str,
        e: PgError,
        budget: &mut Budget,
    ) -> Result<(), PgError> {
        if !e.is_retryable() {
            return Err(e);
        }
        let delay = budget.next_delay();
        if Instant::now() + delay >= budget.deadline {
            tracing::error!(op, error = %e, code = ?e.code(), budget = ?budget.allowance,
                "database still failing at the operation's deadline; giving up");
            return Err(budget.with_last(e));
        }
        self.retries.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(crate::metrics::STORE_RETRIES, "operation" => op).increment(1);
        tracing::warn!(op, error = %e, code = ?e.code(), retry_in = ?delay,
            "database operation failed; retrying");
        budget.remember(e);
        tokio::time::sleep(delay).await;
        Ok(())
    }

    /// Runs `f` until it succeeds, fails with an error not worth retrying,
    /// or the budget's deadline passes. Only for operations that are safe
    /// to repeat.
    pub(crate) async fn retrying<T, F, Fut>(
        &self,
        op: &'static str,
        budget: &mut Budget,
        mut f: F,
    ) -> Result<T, PgError>
    where
        F: FnMut(Deadline) -> Fut,
        Fut: Future<Output = Result<T, Failed>>,
    {
        loop {
            match f(budget.deadline()).await {
                Ok(v) => return Ok(v),
                Err(failed) => self.pause(op, failed.error, budget).await?,
            }
        }
    }

    /// One statement that is safe to repeat, retried within `budget`.
    pub(crate) async fn query_in(
        &self,
        budget: &mut Budget,
        stmt: &Statement,
        values: &[(&str, Param<'_>)],
    ) -> Result<Vec<Row>, PgError> {
        self.retrying(stmt.name(), budget, |d| self.attempt(d, stmt, values))
            .await
    }

    /// One statement that is safe to repeat, retried within a fresh budget.
    pub(crate) async fn query(
        &self,
        stmt: &Statement,
        values: &[(&str, Param<'_>)],
    ) -> Result<Vec<Row>, PgError> {
        self.query_in(&mut self.budget(), stmt, values).await
    }
}

/// Whether `e` says the session itself can no longer serve the crate's
/// statements: started while the database was read-only.
pub(crate) fn session_unusable(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::READ_ONLY_SQL_TRANSACTION)
}

/// Drops a connection whose session is unusable instead of giving it back
/// to the pool.
fn discard_if_unusable(client: Object, e: &tokio_postgres::Error) {
    if session_unusable(e) {
        tracing::warn!(error = %e,
            "discarding a pooled connection whose session refuses writes (read-only)");
        drop(Object::take(client));
    }
}

/// Gives up a connection whose statement is still running (its operation's
/// deadline passed): cancels the statement and closes the connection rather
/// than handing it back to the pool with a reply pending.
fn abandon(client: Object) {
    let cancel = client.cancel_token();
    drop(Object::take(client));
    tokio::spawn(async move {
        // Best effort: if it fails, the server ends the statement when it
        // next notices that the connection is gone.
        let _ = cancel.cancel_query(crate::tls::cancel_connector()).await;
    });
}
