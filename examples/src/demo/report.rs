//! What a run found.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use saga_core::{HistoryEntry, SagaId, Status};

use crate::audit::{Audit, Violation};
use crate::model::Order;

use super::Scenario;

/// One order, what was meant to happen, and what did.
#[derive(Debug, Clone)]
pub struct OrderReport {
    /// The order.
    pub order: Order,
    /// What it was set up to meet.
    pub scenario: Scenario,
    /// Its saga.
    pub saga_id: SagaId,
    /// The saga's status at the end of the run.
    pub status: Status,
    /// Why it is stuck, if it is.
    pub stuck_reason: Option<String>,
    /// The saga's history.
    pub history: Vec<HistoryEntry>,
}

impl OrderReport {
    /// Its saga is still running or compensating (the run stopped first).
    #[must_use]
    pub fn is_unfinished(&self) -> bool {
        self.status.is_runnable()
    }
}

/// The worker killed mid-run, or why none was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Crash {
    /// Not asked for.
    NotAsked,
    /// Asked for, but a crash needs a second worker to take over.
    NeedsTwoWorkers,
    /// Planned during `order`'s stock reservation, which never happened
    /// (the order failed before it, or the run stopped first).
    DidNotHappen {
        /// The order.
        order: String,
    },
    /// `worker` (from 1) was killed right after reserving `order`'s stock,
    /// before recording it.
    Happened {
        /// The worker, from 1.
        worker: usize,
        /// The order.
        order: String,
    },
}

/// What became of the run's schemas.
#[derive(Debug, Clone)]
pub enum Cleanup {
    /// A throwaway cluster, removed on exit.
    Throwaway,
    /// The schemas `<prefix>_*` were dropped.
    Dropped {
        /// Their prefix.
        prefix: String,
    },
    /// The schemas `<prefix>_*` were kept, as asked.
    Kept {
        /// Their prefix.
        prefix: String,
    },
    /// The schemas `<prefix>_*` could not be dropped.
    DropFailed {
        /// Their prefix.
        prefix: String,
        /// Why.
        error: Arc<crate::Error>,
    },
}

/// What the demo did.
#[derive(Debug, Clone)]
pub struct Report {
    /// Per order.
    pub orders: Vec<OrderReport>,
    /// The ledgers.
    pub audit: Audit,
    /// The crash.
    pub crash: Crash,
    /// Workers.
    pub workers: usize,
    /// Seed.
    pub seed: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// The deadline.
    pub deadline: Duration,
    /// Whether the run stopped before every saga finished and every
    /// message was delivered: the deadline was reached, or it was
    /// interrupted.
    pub stopped_early: bool,
    /// Whether it was interrupted.
    pub interrupted: bool,
    /// Outbox messages not delivered when the run stopped (dead letters
    /// excluded).
    pub undelivered: i64,
    /// The orders (message keys) of those messages.
    pub undelivered_orders: BTreeSet<String>,
    /// Dead letters left in the outbox.
    pub dead_letters: i64,
    /// Warnings about the options ([`warnings`](super::warnings)), but the skipped crash.
    pub notes: Vec<String>,
    /// What became of the run's schemas.
    pub cleanup: Cleanup,
}

/// How a run ended, for the exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Every saga completed or was compensated, and every invariant holds.
    AllGood,
    /// Every invariant holds, but some sagas are stuck (parked for an
    /// operator) or unfinished (the run stopped first).
    Unsettled,
    /// An invariant is broken.
    Violated,
}

impl Report {
    /// The orders whose saga is still running or compensating.
    pub fn unfinished(&self) -> impl Iterator<Item = &OrderReport> {
        self.orders.iter().filter(|o| o.is_unfinished())
    }

    /// The orders whose saga is stuck.
    pub fn stuck(&self) -> impl Iterator<Item = &OrderReport> {
        self.orders.iter().filter(|o| o.status == Status::Stuck)
    }

    /// Whether a violation only says that an order's ledgers are not
    /// final yet: an imbalance of an order whose saga has not finished
    /// (charged and not yet confirmed or refunded, deducted and not yet
    /// released...), or the missing email of a confirmed order whose
    /// message is still in the outbox. A second charge or deduction is
    /// never pending: it is wrong whenever it happens.
    #[must_use]
    pub fn is_pending(&self, violation: &Violation) -> bool {
        let Some(order) = violation.order() else {
            return false;
        };
        let unfinished = self
            .orders
            .iter()
            .any(|o| o.order.id == order && o.is_unfinished());
        match violation {
            Violation::ChargedTwice { .. }
            | Violation::DeductedTwice { .. }
            | Violation::StockNotConserved { .. } => false,
            Violation::WrongNetCharge { .. } | Violation::WrongNetDeduction { .. } => unfinished,
            Violation::WrongEmailCount { emails, .. } => {
                unfinished || (*emails == 0 && self.undelivered_orders.contains(order))
            }
        }
    }

    /// The broken invariants, pending ledgers ([`Report::is_pending`])
    /// left out.
    pub fn violations(&self) -> impl Iterator<Item = &Violation> {
        self.audit.violations.iter().filter(|v| !self.is_pending(v))
    }

    /// How the run ended.
    #[must_use]
    pub fn verdict(&self) -> Verdict {
        if self.violations().next().is_some() {
            Verdict::Violated
        } else if self.stopped_early
            || self.unfinished().next().is_some()
            || self.stuck().next().is_some()
        {
            Verdict::Unsettled
        } else {
            Verdict::AllGood
        }
    }

    /// The crashed worker (from 1) and order, if a worker was killed.
    #[must_use]
    pub fn crashed_during(&self) -> Option<(usize, &str)> {
        match &self.crash {
            Crash::Happened { worker, order } => Some((*worker, order)),
            _ => None,
        }
    }
}
