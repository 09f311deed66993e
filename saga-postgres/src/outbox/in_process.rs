//! [`InProcessPublisher`]: hands messages to async handlers in this process.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use saga_core::BoxFuture;
use tokio::task::JoinSet;

use super::publisher::{Outgoing, PublishError, Publisher};
use crate::error::BoxError;

type Handler = Arc<dyn Fn(Outgoing) -> BoxFuture<'static, Result<(), BoxError>> + Send + Sync>;

/// No handler is registered for a message's topic. Permanent: the message
/// is dead-lettered, to be redriven once a handler exists.
#[derive(Debug, thiserror::Error)]
#[error("no in-process handler is registered for topic `{topic}`")]
pub struct NoHandler {
    /// The topic.
    pub topic: String,
}

/// A handler task panicked.
#[derive(Debug, thiserror::Error)]
#[error("an in-process handler panicked: {0}")]
pub struct HandlerPanicked(pub String);

/// A [`Publisher`] for consumers inside the same service: each message goes
/// to every handler registered for its topic.
///
/// A message counts as published once all its handlers have succeeded; if
/// one fails, the message is retried and *every* handler of its topic sees
/// it again, so handlers must be idempotent (the
/// [`Inbox`](crate::inbox::Inbox) makes their effect exactly once). A
/// handler's error is transient unless it is a
/// [`PublishError::permanent`]. The messages of a batch (and the handlers
/// of a message) run concurrently, each in its own task.
///
/// ```
/// use saga_postgres::outbox::InProcessPublisher;
///
/// let publisher = InProcessPublisher::new().handle("order.paid", |msg| async move {
///     println!("order paid: {:?}", msg.message.payload);
///     Ok(())
/// });
/// assert_eq!(publisher.topics().count(), 1);
/// ```
#[derive(Clone, Default)]
#[must_use]
pub struct InProcessPublisher {
    routes: HashMap<String, Vec<Handler>>,
}

impl std::fmt::Debug for InProcessPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut topics: Vec<(&String, usize)> =
            self.routes.iter().map(|(t, h)| (t, h.len())).collect();
        topics.sort();
        f.debug_struct("InProcessPublisher")
            .field("handlers_by_topic", &topics)
            .finish()
    }
}

impl InProcessPublisher {
    /// A publisher with no handlers.
    pub fn new() -> Self {
        InProcessPublisher::default()
    }

    /// Registers `handler` for `topic` (a topic may have several).
    pub fn handle<F, Fut>(mut self, topic: impl Into<String>, handler: F) -> Self
    where
        F: Fn(Outgoing) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), BoxError>> + Send + 'static,
    {
        let handler: Handler = Arc::new(move |m| Box::pin(handler(m)));
        self.routes.entry(topic.into()).or_default().push(handler);
        self
    }

    /// The topics that have handlers.
    pub fn topics(&self) -> impl Iterator<Item = &str> {
        self.routes.keys().map(String::as_str)
    }
}

impl Publisher for InProcessPublisher {
    async fn publish(&self, batch: &[Outgoing]) -> Vec<Result<(), PublishError>> {
        let mut results: Vec<Result<(), PublishError>> = Vec::with_capacity(batch.len());
        let mut tasks = JoinSet::new();
        let mut index_of = HashMap::new();
        for (i, out) in batch.iter().enumerate() {
            match self.routes.get(&out.message.topic) {
                None => results.push(Err(PublishError::permanent(NoHandler {
                    topic: out.message.topic.clone(),
                }))),
                Some(handlers) => {
                    results.push(Ok(()));
                    for handler in handlers {
                        let task = tasks.spawn(handler(out.clone()));
                        index_of.insert(task.id(), i);
                    }
                }
            }
        }
        while let Some(joined) = tasks.join_next_with_id().await {
            let (id, error) = match joined {
                Ok((_, Ok(()))) => continue,
                Ok((id, Err(e))) => (id, PublishError::from_boxed(e)),
                Err(join) => {
                    let text = if join.is_panic() {
                        let id = join.id();
                        let text = saga_core::panic_message(&*join.into_panic()).to_owned();
                        (id, text)
                    } else {
                        (join.id(), "cancelled".to_owned())
                    };
                    (text.0, PublishError::transient(HandlerPanicked(text.1)))
                }
            };
            let Some(&i) = index_of.get(&id) else {
                continue;
            };
            // Keep the first error of a message; a permanent one wins.
            let slot = &mut results[i];
            match slot {
                Ok(()) => *slot = Err(error),
                Err(prev) if !prev.is_permanent() && error.is_permanent() => *slot = Err(error),
                Err(_) => {}
            }
        }
        results
    }
}
