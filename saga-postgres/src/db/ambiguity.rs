//! Resolving a reply lost with the statement in flight.
//!
//! When the connection drops while a write is in flight, nothing says
//! whether it committed. Two shapes of write resolve that here:
//!
//! - **A write identified by an id** ([`write_once`]): the statement writes
//!   its id under a unique constraint. After a lost reply the id is looked
//!   up: found, the write took effect; not found, it is written again,
//!   still guarded (a lease, a version), so it can never apply twice. A
//!   late commit of the first attempt makes the second change nothing,
//!   which is detected by looking the id up once more.
//! - **A claim identified by a claim id** ([`claim_once`]): the claimer
//!   generates an id that the claim's statement writes into every row it
//!   leases. After a lost reply the rows carrying it, still under their
//!   lease, are looked up and handed out, rather than claiming other rows
//!   and leaving these leased, with an attempt spent, until their lease
//!   expires.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio_postgres::Row;

use super::{Budget, Db, Deadline, Failed};
use crate::error::PgError;

/// What [`write_once`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Written {
    /// The write took effect (now, or in an attempt whose reply was lost).
    Applied,
    /// Its guard refused it.
    Refused,
}

/// How ambiguous writes turned out.
#[derive(Debug, Default)]
pub(crate) struct AmbiguityCounters {
    pub(crate) committed: AtomicU64,
    not_committed: AtomicU64,
    // A "not committed" answer later corrected to "committed" (the first
    // attempt's backend committed after the lookup): taken back from the
    // not-committed count.
    not_committed_undo: AtomicU64,
    pub(crate) unresolved: AtomicU64,
    pub(crate) claims_recovered: AtomicU64,
}

impl AmbiguityCounters {
    pub(crate) fn not_committed(&self) -> u64 {
        self.not_committed
            .load(Ordering::Relaxed)
            .saturating_sub(self.not_committed_undo.load(Ordering::Relaxed))
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Applies a guarded write identified by an id, resolving lost replies.
///
/// `write` makes one attempt and says whether the guard let it through;
/// `applied` makes one attempt at looking the id up. An ambiguity is
/// *resolved* once the id has been looked up; it stays *unresolved* only if
/// the lookup cannot be made before the operation's deadline.
pub(crate) async fn write_once<W, WF, L, LF>(
    db: &Db,
    op: &'static str,
    budget: &mut Budget,
    counters: &AmbiguityCounters,
    mut write: W,
    mut applied: L,
) -> Result<Written, PgError>
where
    W: FnMut(Deadline) -> WF,
    WF: Future<Output = Result<bool, Failed>>,
    L: FnMut(Deadline) -> LF,
    LF: Future<Output = Result<bool, Failed>>,
{
    // Whether an earlier attempt's outcome was looked up, found "not
    // committed", and might still commit late.
    let mut in_doubt = false;
    loop {
        match write(budget.deadline()).await {
            Ok(true) => return Ok(Written::Applied),
            Ok(false) => {
                // The guard refused. An earlier attempt whose reply was
                // lost may have committed meanwhile (its backend was still
                // running): look once more.
                if in_doubt {
                    let found = db.retrying(op, budget, &mut applied).await;
                    bump(&counters.not_committed_undo);
                    match found {
                        Ok(true) => {
                            bump(&counters.committed);
                            return Ok(Written::Applied);
                        }
                        Ok(false) => {}
                        Err(e) => {
                            bump(&counters.unresolved);
                            return Err(e);
                        }
                    }
                }
                return Ok(Written::Refused);
            }
            Err(failed) if failed.ambiguous() => {
                let e = failed.error;
                tracing::warn!(op, error = %e,
                    "connection lost while a write was in flight; checking whether it committed");
                metrics::counter!(crate::metrics::AMBIGUOUS_COMMITS).increment(1);
                if let Err(e) = db.pause(op, e, budget).await {
                    bump(&counters.unresolved);
                    return Err(e);
                }
                match db.retrying(op, budget, &mut applied).await {
                    Ok(true) => {
                        bump(&counters.committed);
                        return Ok(Written::Applied);
                    }
                    Ok(false) => {
                        // Resolved: it did not commit (yet). Write it again.
                        if !in_doubt {
                            bump(&counters.not_committed);
                        }
                        in_doubt = true;
                    }
                    Err(e) => {
                        bump(&counters.unresolved);
                        return Err(e);
                    }
                }
            }
            Err(failed) => db.pause(op, failed.error, budget).await?,
        }
    }
}

/// Runs a claim identified by a claim id, resolving lost replies: after an
/// attempt whose reply was lost, `recover` (one attempt at looking up the
/// rows leased under the claim id) runs first; rows found are returned as
/// recovered, none found means no attempt committed, and the claim is made
/// again. Returns the rows and whether they were recovered.
pub(crate) async fn claim_once<C, CF, R, RF>(
    db: &Db,
    op: &'static str,
    budget: &mut Budget,
    counters: &AmbiguityCounters,
    mut claim: C,
    mut recover: R,
) -> Result<Vec<Row>, PgError>
where
    C: FnMut(Deadline) -> CF,
    CF: Future<Output = Result<Vec<Row>, Failed>>,
    R: FnMut(Deadline) -> RF,
    RF: Future<Output = Result<Vec<Row>, Failed>>,
{
    let mut in_doubt = false;
    loop {
        if in_doubt {
            match recover(budget.deadline()).await {
                Ok(rows) if rows.is_empty() => {
                    tracing::info!(
                        op,
                        "a claim whose reply was lost did not commit; claiming again"
                    );
                }
                Ok(rows) => {
                    bump(&counters.claims_recovered);
                    tracing::info!(
                        op,
                        rows = rows.len(),
                        "a claim whose reply was lost had committed; handing out what it leased"
                    );
                    return Ok(rows);
                }
                Err(failed) => {
                    db.pause(op, failed.error, budget).await?;
                    continue;
                }
            }
        }
        match claim(budget.deadline()).await {
            Ok(rows) => return Ok(rows),
            Err(failed) => {
                in_doubt |= failed.ambiguous();
                db.pause(op, failed.error, budget).await?;
            }
        }
    }
}
