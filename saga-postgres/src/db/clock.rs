//! Whose time the statements use: the database server's, or a clock a
//! test injected.
//!
//! Leases, due times, lease guards, outbox availability and inbox times are
//! compared and computed on the server (`now()`), so that workers whose
//! clocks disagree still agree on who holds a lease. Every statement takes
//! a `$now` parameter and reads `coalesce($now, now())`: NULL, unless a test
//! injected a clock (a [`ManualClock`](saga_core::ManualClock) driving the
//! conformance suite), whose time is then bound instead.
//!
//! The executor still reads a [`Clock`] (for retry times, deadlines, the
//! history's times). By default that is a [`ServerClock`]: the worker's own
//! clock plus an offset learned from the server's replies, so that
//! `now + delay` lands on the server's timeline even on a worker whose
//! clock runs minutes ahead.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use saga_core::{Clock, Timestamp};

use super::rows::col;
use super::statement::Statement;
use super::{Budget, Db};

/// The server's time as statements read it: the bound `$now` (a test
/// clock's) or, when NULL, the statement's own `now()`.
pub(crate) const NOW: &str = "coalesce($now::timestamptz, now())";

/// How old the learned offset may get before the next operation asks the
/// server again.
const RESYNC_AFTER: Duration = Duration::from_secs(30);

/// Longest wait for the server's time.
const SYNC_DEADLINE: Duration = Duration::from_secs(5);

/// The worker's clock corrected by the offset to the database server's
/// clock, as last measured.
#[derive(Debug)]
pub(crate) struct ServerClock {
    local: Arc<dyn Clock>,
    offset_micros: AtomicI64,
    synced_at: Mutex<Option<std::time::Instant>>,
}

impl Clock for ServerClock {
    fn now(&self) -> Timestamp {
        let local = self.local.now().as_micros();
        Timestamp::from_micros(local.saturating_add(self.offset_micros.load(Ordering::Relaxed)))
    }
}

impl ServerClock {
    fn new(local: Arc<dyn Clock>) -> Self {
        ServerClock {
            local,
            offset_micros: AtomicI64::new(0),
            synced_at: Mutex::new(None),
        }
    }

    fn stale(&self) -> bool {
        let at = self.synced_at.lock().unwrap_or_else(|e| e.into_inner());
        at.is_none_or(|t| t.elapsed() >= RESYNC_AFTER)
    }

    /// Learns the offset from a server time read before `received` on the
    /// local clock. The server read its time at some point of the round
    /// trip, so `server - received` is at most the true offset: the
    /// estimate runs behind the server by at most the round trip, never
    /// ahead, and a time computed as "now" (a step due at once) is never in
    /// the server's future.
    fn learn(&self, server: Timestamp, received: Timestamp) {
        self.offset_micros.store(
            server.as_micros().saturating_sub(received.as_micros()),
            Ordering::Relaxed,
        );
        *self.synced_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(std::time::Instant::now());
    }
}

/// The time a component's statements use, and the clock it reports.
#[derive(Debug, Clone)]
pub(crate) struct DbClock {
    clock: Arc<dyn Clock>,
    server: Option<Arc<ServerClock>>,
}

impl DbClock {
    /// What a builder was given: the `injected` clock if there is one
    /// ([`injected`](Self::injected)), else the server's time with `local`
    /// as the process's own clock ([`server`](Self::server)).
    pub(crate) fn new(injected: Option<Arc<dyn Clock>>, local: Arc<dyn Clock>) -> Self {
        match injected {
            Some(clock) => DbClock::injected(clock),
            None => DbClock::server(local),
        }
    }

    /// The server's time; the reported clock is `local` corrected by the
    /// offset learned from the server.
    pub(crate) fn server(local: Arc<dyn Clock>) -> Self {
        let server = Arc::new(ServerClock::new(local));
        DbClock {
            clock: server.clone(),
            server: Some(server),
        }
    }

    /// A clock injected by a test: bound into every statement.
    pub(crate) fn injected(clock: Arc<dyn Clock>) -> Self {
        DbClock {
            clock,
            server: None,
        }
    }

    /// The clock to report (and to compute retry times from).
    pub(crate) fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// The value of `$now`: the injected clock's time, or NULL for the
    /// server's.
    pub(crate) fn bind(&self) -> Option<SystemTime> {
        match self.server {
            Some(_) => None,
            None => Some(self.clock.now().to_system_time()),
        }
    }

    /// Asks the server for its time if the offset is old. A failure is
    /// logged and leaves the old offset: the operation that follows meets
    /// the same failure and reports it.
    pub(crate) async fn sync(&self, db: &Db, stmt: &Statement) {
        let Some(server) = &self.server else { return };
        if !server.stale() {
            return;
        }
        // One attempt, briefly: the operation that follows has the whole
        // deadline for its own retries.
        let budget = Budget::new(db.operation_deadline().min(SYNC_DEADLINE));
        match db.attempt(budget.deadline(), stmt, &[]).await {
            Ok(rows) => {
                let received = server.local.now();
                match rows.first().map(|r| col::<SystemTime>(r, "server_now")) {
                    Some(Ok(t)) => server.learn(Timestamp::from_system_time(t), received),
                    Some(Err(e)) => tracing::warn!(error = %e, "could not read the server's time"),
                    None => {}
                }
            }
            Err(failed) => {
                tracing::debug!(error = %failed.error, "could not read the server's time");
            }
        }
    }
}

/// The statement [`DbClock::sync`] sends.
pub(crate) fn server_time() -> Statement {
    Statement::new("server_time", "SELECT now() AS server_now", &[])
}

#[cfg(test)]
mod tests {
    use saga_core::ManualClock;

    use super::*;

    #[test]
    fn the_server_clock_reads_local_time_plus_the_learned_offset() {
        let local = Arc::new(ManualClock::new(Timestamp::from_micros(1_000_000_000)));
        let clock = ServerClock::new(local.clone());
        assert!(clock.stale());
        // Answered at +2 ms, the server saying 90 s earlier.
        clock.learn(
            Timestamp::from_micros(1_000_000_000 + 2_000 - 90_000_000),
            Timestamp::from_micros(1_000_000_000 + 2_000),
        );
        assert!(!clock.stale());
        assert_eq!(clock.now().as_micros(), 1_000_000_000 - 90_000_000);
        local.advance(Duration::from_secs(1));
        assert_eq!(clock.now().as_micros(), 1_001_000_000 - 90_000_000);
    }

    #[test]
    fn only_an_injected_clock_is_bound() {
        let manual: Arc<dyn Clock> = Arc::new(ManualClock::starting_now());
        assert!(DbClock::server(manual.clone()).bind().is_none());
        assert_eq!(
            DbClock::injected(manual.clone()).bind(),
            Some(manual.now().to_system_time())
        );
    }
}
