//! Holding one chosen statement back until released.

use std::sync::{Arc, PoisonError};

use tokio::sync::watch;

use super::intercepted::{Intercepted, contains_ignoring_case};
use super::shared::Shared;

/// A statement to hold back: its SQL contains `text` and one of its bind
/// parameters is `param`.
#[derive(Debug)]
pub(super) struct HoldSpec {
    pub(super) id: u64,
    pub(super) text: String,
    pub(super) param: Vec<u8>,
    pub(super) reached: watch::Sender<Option<Intercepted>>,
    pub(super) release: watch::Receiver<bool>,
}

impl HoldSpec {
    pub(super) fn matches(&self, statement: &Intercepted) -> bool {
        contains_ignoring_case(statement.sql.as_deref(), &self.text)
            && statement
                .params
                .iter()
                .any(|p| p.as_deref() == Some(self.param.as_slice()))
    }
}

/// A statement held back by [`FaultProxy::hold`](super::FaultProxy::hold). Dropping it releases the
/// statement (or, if none matched yet, withdraws the hold).
#[derive(Debug)]
pub struct Hold {
    pub(super) id: u64,
    pub(super) shared: Arc<Shared>,
    pub(super) reached: watch::Receiver<Option<Intercepted>>,
    pub(super) release: watch::Sender<bool>,
}

impl Hold {
    /// Resolves once a matching statement has arrived and is being held,
    /// with that statement; never, if none comes: wrap it in a timeout.
    pub async fn reached(&mut self) -> Intercepted {
        let held = self
            .reached
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|held| held.clone());
        match held {
            Some(held) => held,
            None => std::future::pending().await,
        }
    }

    /// The statement held, if one has arrived.
    pub fn held(&self) -> Option<Intercepted> {
        self.reached.borrow().clone()
    }

    /// Forwards the held statement (and what the client sent after it).
    pub fn release(self) {
        drop(self);
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.shared
            .holds
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|hold| hold.id != self.id);
        let _ = self.release.send(true);
    }
}
