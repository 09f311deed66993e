//! What an executor reports: [`RunReport`] for one
//! [`run_until_idle`](Executor::run_until_idle), [`ExecutorStats`] since
//! it was built, and the metrics it counts.

use std::sync::atomic::{AtomicU64, Ordering};

use super::Executor;
use crate::fingerprint::ShapeFingerprint;
use crate::ids::{SagaId, SagaKind};
use crate::machine::{Status, TransitionKind};
use crate::metrics as m;
use crate::store::SagaStore;

#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) claimed: AtomicU64,
    pub(super) recorded: AtomicU64,
    pub(super) leases_lost: AtomicU64,
    pub(super) store_errors: AtomicU64,
}

impl Counters {
    /// Counts a failed store operation, in the stats and the metric.
    pub(super) fn store_failed(&self, operation: &'static str) {
        self.store_errors.fetch_add(1, Ordering::Relaxed);
        store_error(operation);
    }
}

/// What an executor has done since it was built (all its clones together).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ExecutorStats {
    /// Instances claimed.
    pub claimed: u64,
    /// Transitions recorded.
    pub recorded: u64,
    /// Results refused because the lease had been lost (fenced writes).
    pub leases_lost: u64,
    /// Store operations that failed.
    pub store_errors: u64,
}

/// What a call to [`Executor::run_until_idle`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RunReport {
    /// Instances claimed.
    pub claimed: usize,
    /// Transitions recorded, in the order they were recorded.
    pub transitions: Vec<(SagaId, TransitionKind)>,
    /// Results refused because the lease had been lost.
    pub leases_lost: usize,
    /// Claims given back (saga kind no longer registered).
    pub released: usize,
    /// Store operations that failed.
    pub store_errors: usize,
    /// Due instances of saga kinds not registered here.
    pub unregistered: Vec<(SagaKind, u64)>,
    /// Due instances of kinds registered here but started under another
    /// definition shape (by kind and the fingerprint they were started
    /// under): left for a worker whose definition matches.
    pub unmatched: Vec<(SagaKind, ShapeFingerprint, u64)>,
}

/// How processing one claimed instance ended.
#[derive(Debug)]
pub(super) enum Processed {
    Recorded(SagaId, TransitionKind),
    LeaseLost,
    Released,
    StoreError,
}

impl RunReport {
    pub(super) fn add(&mut self, p: Processed) {
        match p {
            Processed::Recorded(id, kind) => self.transitions.push((id, kind)),
            Processed::LeaseLost => self.leases_lost += 1,
            Processed::Released => self.released += 1,
            Processed::StoreError => self.store_errors += 1,
        }
    }
}

impl<St: SagaStore> Executor<St> {
    /// What this executor has done so far.
    #[must_use]
    pub fn stats(&self) -> ExecutorStats {
        let c = &self.shared.counters;
        ExecutorStats {
            claimed: c.claimed.load(Ordering::Relaxed),
            recorded: c.recorded.load(Ordering::Relaxed),
            leases_lost: c.leases_lost.load(Ordering::Relaxed),
            store_errors: c.store_errors.load(Ordering::Relaxed),
        }
    }
}

pub(super) fn store_error(operation: &'static str) {
    metrics::counter!(m::STORE_ERRORS, "operation" => operation).increment(1);
}

pub(super) fn count_status(kind: &SagaKind, status: Status) {
    let name = match status {
        Status::Completed => m::SAGAS_COMPLETED,
        Status::Compensated => m::SAGAS_COMPENSATED,
        Status::Stuck => m::SAGAS_STUCK,
        _ => return,
    };
    metrics::counter!(name, "saga" => kind.name.to_string()).increment(1);
}
