//! What the proxy and its connections share: the armed cut, the holds,
//! the latency, the counters.

use std::{
    net::SocketAddr,
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{sync::watch, task::JoinHandle};

use super::hold::HoldSpec;
use super::intercepted::{CutRecord, Intercepted, contains_ignoring_case};

/// Where to cut the next connection that runs a statement.
///
/// A statement is run by a simple Query message (`Q`) or by an Execute
/// message (`E`) of the extended protocol. The trigger fires once, on the
/// first matching message of any connection, and then disarms.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Cut {
    /// Forward the statement and the rest of its batch (up to and including
    /// the next Sync, or Flush; for a simple Query, the Query itself) to the
    /// server, then close the client's side and discard whatever the server
    /// answers. The server side stays open until the server has answered
    /// the batch (ReadyForQuery), so the statement runs to completion and,
    /// outside an explicit transaction, commits: an ambiguous commit.
    AfterExecute,
    /// Close the client's side instead of forwarding the statement: neither
    /// it nor anything the client sent with it reaches the server, which
    /// then sees its connection closed.
    BeforeExecute,
    /// [`Cut::AfterExecute`], but only for a statement whose SQL text (of
    /// the Query, or of the Parse behind the executed portal) contains this
    /// text, ignoring ASCII case. `AfterQueryContaining("COMMIT".into())`
    /// cuts a connection while its transaction commits.
    AfterQueryContaining(String),
    /// [`Cut::BeforeExecute`], but only for a statement whose SQL text
    /// contains this text, ignoring ASCII case.
    BeforeQueryContaining(String),
}

/// Counters of a [`FaultProxy`](super::FaultProxy).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProxyStats {
    /// Connections accepted and forwarded.
    pub accepted: u64,
    /// Connections accepted and closed at once because of
    /// [`FaultProxy::refuse_new`](super::FaultProxy::refuse_new).
    pub refused: u64,
    /// Live connections closed by [`FaultProxy::reset_all`](super::FaultProxy::reset_all).
    pub resets: u64,
    /// Cuts carried out (see [`FaultProxy::fired`](super::FaultProxy::fired)).
    pub cuts_fired: u64,
    /// Connections being forwarded now.
    pub live: u64,
    /// Chunks of bytes delayed by [`FaultProxy::set_latency`](super::FaultProxy::set_latency).
    pub delayed: u64,
}

/// Which side of the statement the cut falls on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum When {
    Before,
    After,
}

#[derive(Debug, Default)]
pub(super) struct Trigger {
    pub(super) armed: Option<Cut>,
    /// Cuts claimed by a connection so far.
    pub(super) claimed: u64,
    /// The cut count that the latest `arm` waits for.
    pub(super) target: u64,
}

#[derive(Debug)]
pub(super) struct Shared {
    pub(super) upstream: SocketAddr,
    pub(super) latency_micros: AtomicU64,
    pub(super) refuse_new: AtomicBool,
    pub(super) accepted: AtomicU64,
    pub(super) refused: AtomicU64,
    pub(super) resets: AtomicU64,
    pub(super) trigger: Mutex<Trigger>,
    /// Every cut claimed, with its statement.
    pub(super) cuts: Mutex<Vec<CutRecord>>,
    /// Statements to hold back, waiting for a match.
    pub(super) holds: Mutex<Vec<HoldSpec>>,
    pub(super) next_hold: AtomicU64,
    pub(super) delayed: AtomicU64,
    /// The number of cuts carried out.
    pub(super) fired: watch::Sender<u64>,
    pub(super) connections: Mutex<Vec<JoinHandle<()>>>,
}

impl Shared {
    pub(super) async fn delay(&self) {
        let micros = self.latency_micros.load(Ordering::Relaxed);
        if micros > 0 {
            self.delayed.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_micros(micros)).await;
        }
    }

    /// Takes the armed trigger if this statement matches it, and records
    /// the cut.
    pub(super) fn claim(&self, statement: &Intercepted) -> Option<When> {
        let sql = statement.sql.as_deref();
        let mut trigger = self.trigger.lock().unwrap_or_else(PoisonError::into_inner);
        let when = match trigger.armed.as_ref()? {
            Cut::AfterExecute => When::After,
            Cut::BeforeExecute => When::Before,
            Cut::AfterQueryContaining(text) if contains_ignoring_case(sql, text) => When::After,
            Cut::BeforeQueryContaining(text) if contains_ignoring_case(sql, text) => When::Before,
            Cut::AfterQueryContaining(_) | Cut::BeforeQueryContaining(_) => return None,
        };
        trigger.armed = None;
        trigger.claimed += 1;
        self.cuts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(CutRecord {
                after: when == When::After,
                statement: statement.clone(),
            });
        Some(when)
    }

    /// Takes the first hold this statement matches: tells its owner, and
    /// returns what releases it.
    pub(super) fn take_hold(&self, statement: &Intercepted) -> Option<watch::Receiver<bool>> {
        let mut holds = self.holds.lock().unwrap_or_else(PoisonError::into_inner);
        let index = holds.iter().position(|hold| hold.matches(statement))?;
        let hold = holds.remove(index);
        let _ = hold.reached.send(Some(statement.clone()));
        Some(hold.release)
    }

    pub(super) fn cut_done(&self) {
        self.fired.send_modify(|fired| *fired += 1);
    }

    pub(super) fn connections(&self) -> std::sync::MutexGuard<'_, Vec<JoinHandle<()>>> {
        self.connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}
