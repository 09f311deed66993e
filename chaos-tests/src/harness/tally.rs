//! Fired fault events, what they hit, and when the last one ended.

use std::collections::BTreeMap;
use std::time::Instant;

use crate::schedule::FaultKind;

/// Fired fault events, and when the last one ended.
#[derive(Default)]
pub(super) struct Tally {
    pub(super) fired: std::sync::Mutex<BTreeMap<FaultKind, u64>>,
    pub(super) affected: std::sync::Mutex<BTreeMap<FaultKind, u64>>,
    last: std::sync::Mutex<Option<Instant>>,
}

impl Tally {
    pub(super) fn fired(&self, kind: FaultKind) {
        *self
            .fired
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(kind)
            .or_default() += 1;
        self.touch();
    }

    pub(super) fn affected(&self, kind: FaultKind, n: u64) {
        *self
            .affected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(kind)
            .or_default() += n;
    }

    /// A fault's effect ended now.
    pub(super) fn touch(&self) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }

    pub(super) fn last(&self) -> Option<Instant> {
        *self.last.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn total(&self) -> u64 {
        self.fired
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .sum()
    }
}

/// What `affected` counts for each kind.
pub(super) fn unit(kind: FaultKind) -> &'static str {
    match kind {
        FaultKind::WorkerKill => "workers killed",
        FaultKind::CrashAfterEffect => "workers killed after an effect",
        FaultKind::ZombieWorker => "zombies fenced off (verified)",
        FaultKind::PostgresRestart => "restarts",
        FaultKind::CommitCut => "transitions cut",
        FaultKind::ConnectionReset => "connections closed",
        FaultKind::NetworkLatency => "chunks delayed",
        FaultKind::DownstreamOutage => "requests refused (outage 503)",
        FaultKind::DownstreamErrors => "requests failed (injected 503)",
        FaultKind::DownstreamLatency => "requests delayed",
        FaultKind::LostReplies => "replies lost after the effect",
        FaultKind::DuplicateDelivery => "redeliveries absorbed by the inbox",
        FaultKind::DispatcherCrash => "dispatchers killed after publishing",
    }
}
