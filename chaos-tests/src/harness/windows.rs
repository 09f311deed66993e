//! What each fault window hit: the counter of the thing it attacks (a
//! service's injected 503s, refusals, delays, lost replies; the proxy's
//! delayed chunks) read when the window opens and when it closes (at its
//! end, or when a later window on the same target replaces it).

use std::collections::BTreeMap;
use std::sync::Mutex;

use checkout::services::Injected;

use crate::check::WindowTally;
use crate::schedule::FaultKind;

/// The counter a window of `kind` moves on a service.
pub(super) fn service_counter(injected: &Injected, kind: FaultKind) -> u64 {
    match kind {
        FaultKind::DownstreamOutage => injected.outage_rejections,
        FaultKind::DownstreamErrors => injected.errors,
        FaultKind::DownstreamLatency => injected.delayed,
        FaultKind::LostReplies => injected.lost_replies,
        _ => 0,
    }
}

struct Open {
    id: u64,
    kind: FaultKind,
    start: u64,
}

/// The windows open on each target, and the tally of those closed.
#[derive(Default)]
pub(super) struct Windows {
    open: Mutex<BTreeMap<String, Open>>,
    next: Mutex<u64>,
    tally: Mutex<BTreeMap<FaultKind, WindowTally>>,
}

impl Windows {
    /// A window of `kind` opens on `target`, replacing (closing) the one
    /// open there; `read` gives the target's counter for a kind now.
    /// Returns the window's id, for [`close`](Self::close).
    pub(super) fn open(
        &self,
        target: &str,
        kind: FaultKind,
        read: &dyn Fn(FaultKind) -> u64,
    ) -> u64 {
        let id = {
            let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
            *next += 1;
            *next
        };
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(previous) = open.remove(target) {
            self.closed(previous, read);
        }
        open.insert(
            target.to_owned(),
            Open {
                id,
                kind,
                start: read(kind),
            },
        );
        id
    }

    /// Window `id` on `target` ends (nothing, if a later one replaced it).
    pub(super) fn close(&self, target: &str, id: u64, read: &dyn Fn(FaultKind) -> u64) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if open.get(target).is_some_and(|o| o.id == id)
            && let Some(window) = open.remove(target)
        {
            self.closed(window, read);
        }
    }

    /// A one-off event of `kind` that hit something or not (a redelivery
    /// the inbox absorbed).
    pub(super) fn event(&self, kind: FaultKind, hit: bool) {
        let mut tally = self.tally.lock().unwrap_or_else(|e| e.into_inner());
        let t = tally.entry(kind).or_default();
        t.opened += 1;
        t.hit += u64::from(hit);
    }

    fn closed(&self, window: Open, read: &dyn Fn(FaultKind) -> u64) {
        self.event(window.kind, read(window.kind) > window.start);
    }

    /// Per kind, windows opened and closed, and how many hit something.
    pub(super) fn tally(&self) -> BTreeMap<FaultKind, WindowTally> {
        self.tally.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    #[test]
    fn a_window_counts_as_hit_only_if_its_counter_moved_while_it_was_open() {
        let errors = AtomicU64::new(5);
        let outage = AtomicU64::new(0);
        let read = |kind: FaultKind| match kind {
            FaultKind::DownstreamErrors => errors.load(Ordering::Relaxed),
            _ => outage.load(Ordering::Relaxed),
        };
        let w = Windows::default();
        // An error window that failed nothing.
        let a = w.open("payment", FaultKind::DownstreamErrors, &read);
        w.close("payment", a, &read);
        // One that failed two requests.
        let b = w.open("payment", FaultKind::DownstreamErrors, &read);
        errors.fetch_add(2, Ordering::Relaxed);
        // Replaced by an outage before its end: closed then, and its own
        // end changes nothing.
        let c = w.open("payment", FaultKind::DownstreamOutage, &read);
        w.close("payment", b, &read);
        // Errors counted after it was replaced are not its own.
        errors.fetch_add(1, Ordering::Relaxed);
        outage.fetch_add(1, Ordering::Relaxed);
        w.close("payment", c, &read);
        w.event(FaultKind::DuplicateDelivery, false);
        let tally = w.tally();
        assert_eq!(
            tally[&FaultKind::DownstreamErrors],
            WindowTally { opened: 2, hit: 1 }
        );
        assert_eq!(
            tally[&FaultKind::DownstreamOutage],
            WindowTally { opened: 1, hit: 1 }
        );
        assert_eq!(
            tally[&FaultKind::DuplicateDelivery],
            WindowTally { opened: 1, hit: 0 }
        );
    }

    #[test]
    fn each_downstream_kind_reads_its_own_counter() {
        let i = Injected {
            errors: 1,
            outage_rejections: 2,
            delayed: 3,
            lost_replies: 4,
            duplicates_absorbed: 5,
        };
        assert_eq!(service_counter(&i, FaultKind::DownstreamErrors), 1);
        assert_eq!(service_counter(&i, FaultKind::DownstreamOutage), 2);
        assert_eq!(service_counter(&i, FaultKind::DownstreamLatency), 3);
        assert_eq!(service_counter(&i, FaultKind::LostReplies), 4);
        assert_eq!(service_counter(&i, FaultKind::WorkerKill), 0);
    }
}
