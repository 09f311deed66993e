//! The transactional outbox: enqueueing in the caller's transaction, the
//! dispatcher, dead letters, and publishers (in-process; NATS JetStream with
//! feature `nats`).
//!
//! # Why
//!
//! A service that changes its database and then publishes an event does a
//! *dual write*: a crash between the two loses the event, or publishes one
//! for a change that rolled back. With the outbox the message is a row
//! written in the same transaction as the change ([`Outbox::enqueue_in_tx`],
//! or the saga store for the messages a step emits): it exists if and only
//! if the change committed. A [`Dispatcher`] then publishes it.
//!
//! # Delivery guarantees
//!
//! - **At least once.** A row is deleted only after its [`Publisher`]
//!   reported it delivered (for NATS: after JetStream's acknowledgement).
//!   The dispatcher claims a batch by putting a *lease* on the rows in one
//!   short statement, publishes with no transaction open and no row
//!   locked, then deletes the published rows in one statement guarded by
//!   its lease token. If it dies in between, the lease expires and another
//!   dispatcher publishes the batch again. So a message can be delivered
//!   more than once; it is never lost once its transaction committed.
//!   Leases, due times and availability are compared on the database
//!   server's clock (`now()`), never a dispatcher's own, so dispatchers
//!   whose clocks disagree cannot take over each other's live leases. Keep
//!   [`lease_for`](DispatcherBuilder::lease_for) well above
//!   [`publish_timeout`](DispatcherBuilder::publish_timeout).
//! - **Ids for deduplication.** Every message has a unique, stable id
//!   ([`MessageId`](saga_core::MessageId)): a UUIDv7 for messages enqueued
//!   by hand, an id derived from (instance, step, direction, index) for
//!   messages emitted by saga steps, so re-running a step after a crash
//!   cannot enqueue a second copy. Publishers pass the id on (the NATS
//!   publisher sets `Nats-Msg-Id`, so JetStream drops re-publishes within
//!   its duplicate window); consumers deduplicate on it with the
//!   [`Inbox`](crate::inbox::Inbox), turning at-least-once delivery into an
//!   exactly-once effect.
//! - **No skipped messages.** The dispatcher does not track a high-water
//!   mark: it claims whatever rows are due, so a transaction that took a
//!   lower sequence number and commits after higher ones is not skipped.
//! - **Wake-up is a hint.** Each enqueueing transaction sends one
//!   `NOTIFY` (PostgreSQL folds identical notifications of a transaction
//!   into one). A dispatcher configured with
//!   [`listen`](DispatcherBuilder::listen) wakes on it; polling every
//!   [`poll_interval`](DispatcherBuilder::poll_interval) is what guarantees
//!   delivery, and the listener reconnects (with backoff) after a drop.
//!
//! # Failures, backoff and dead letters
//!
//! A message that fails to publish is rescheduled with its own backoff
//! ([`RetryPolicy`](saga_core::RetryPolicy); default
//! [`default_retry_policy`]): its attempts, last error and next time are in
//! its row, nothing sleeps. Once its attempts reach the policy's
//! `max_attempts`, or at once if the publisher calls the failure
//! [`permanent`](PublishError::permanent), it becomes a **dead letter**:
//! kept, with its last error, never published again until an operator acts.
//! A message whose dispatchers keep dying while publishing it (so no
//! failure is ever recorded) is dead-lettered too once it has been claimed
//! `max_attempts` times.
//!
//! A failure that is the broker's, not the message's, spends no budget: a
//! publisher reports it with [`PublishError::unavailable`] (the NATS
//! publisher does while disconnected), and the message is put back with
//! its attempt not counted. A batch with nothing published and the broker
//! reported unavailable backs the dispatcher off as a whole
//! ([`outage_backoff`](DispatcherConfig::outage_backoff)), so an outage of
//! any length dead-letters nothing; see [`DispatchReport::outages`] and
//! [`DispatchReport::released`]. Operators list dead letters with
//! [`Outbox::dead_letters`], put them back in line with
//! [`Outbox::redrive`] / [`Outbox::redrive_all`] (due now, with a fresh
//! budget: its attempts start from zero, and a policy's `max_elapsed` counts
//! from its next claim), or delete them with [`Outbox::purge`] /
//! [`Outbox::purge_all`]. [`Outbox::stats`] counts pending, in-flight and
//! dead messages and measures how long the longest-waiting due message has
//! been due (the delivery lag; a message waiting for its
//! [`deliver_after`](saga_core::Message::deliver_after) time does not count
//! until then); [`Dispatcher::run`] exports them as gauges every
//! [`stats_interval`](DispatcherConfig::stats_interval) (see [`crate::metrics`]).
//!
//! # Retries inside the dispatcher
//!
//! A message's retries are never waited for in the process: they are
//! scheduled in its row. The dispatcher does wait in four places, always
//! with no transaction open, no row locked and no connection held while it
//! waits; the first three with an exponential backoff
//! ([`backon`](https://docs.rs/backon); each wait jittered up to twice its
//! length):
//!
//! - **Claiming and settling a batch**, through the crate's database layer
//!   (20 ms doubling to 2 s). A claim whose reply was lost finds the rows
//!   it leased again by its lease token and publishes them at once, rather
//!   than leaving them leased, with an attempt spent, until the lease
//!   expires. Settling is guarded by the lease token and safe to repeat, so
//!   a lost connection or a server restart is retried for up to `lease_for`.
//!   Past that the error is logged, and the batch, still leased, is
//!   published again once its lease expires.
//! - **A failed cycle** (the database is down): [`run`](Dispatcher::run)
//!   logs it, counts it in [`OUTBOX_DISPATCH_ERRORS`](crate::metrics::OUTBOX_DISPATCH_ERRORS), and tries again
//!   after 50 ms doubling to `max(poll_interval, 5 s)`, for as long as it
//!   runs.
//! - **The `LISTEN` connection**: reconnected after 50 ms doubling to 10 s,
//!   for as long as it runs; polling delivers meanwhile.
//! - **A broker outage** (nothing of a batch published, the publisher
//!   reported the broker unavailable): the batch is released, due again
//!   after the [`outage_backoff`](DispatcherConfig::outage_backoff) delay
//!   (a [`RetryPolicy`](saga_core::RetryPolicy)'s, 1 s doubling to 60 s by
//!   default, growing per consecutive outage cycle), and
//!   [`run`](Dispatcher::run) waits as long before claiming again.
//!
//! # Per-key ordering, and its trade-off
//!
//! With [`DeliveryOrder::PerKey`], a dispatcher claims a message only if it
//! is the *oldest* not-dead message of its key and no message of its key is
//! in flight (leased by a dispatcher whose lease has not expired), so a key
//! has one message in flight at a time across all dispatchers, and its
//! messages go out in enqueue order; different keys (and messages without a
//! key) proceed in parallel.
//!
//! - **Every dispatcher of an outbox must use the same order.** An
//!   [`Unordered`](DeliveryOrder::Unordered) dispatcher claims any due
//!   message, ignoring keys, so a single one running beside per-key
//!   dispatchers (during a rolling deploy that changes the setting, say)
//!   voids the ordering of every key. Change the order by stopping all
//!   dispatchers of the outbox first.
//! - A failing message **blocks its key** until it is published or
//!   dead-lettered: the later messages of that key wait (other keys do not).
//! - When a message exhausts its budget it is dead-lettered and **its key
//!   moves on**: the next message of the key is published. We chose
//!   liveness over strictness: one poisoned message must not stop a key
//!   forever. The price is a gap in the key's sequence (the dead letter)
//!   that consumers may see; if they cannot tolerate gaps, give the
//!   policy a large budget and alert on dead letters. A redriven dead letter
//!   keeps its place and goes out before the key's later pending messages,
//!   but after those already published, and after the one being published
//!   (if any) is settled.
//! - A hot key is published one message per claim cycle (claim, publish,
//!   delete), so per-key throughput is bounded by that latency; unordered
//!   delivery has no such bound.
//! - "Enqueue order" is the order in which the rows were inserted (their
//!   `seq`). For two transactions that enqueue for the same key
//!   concurrently, whichever commits first may go first: a transaction that
//!   took a lower `seq` but commits after later messages of its key were
//!   published goes out after them (it is never skipped), waits for the
//!   key's message in flight, and still goes out before the key's messages
//!   that are pending. Transactions that touch the same business row are
//!   serialized by PostgreSQL anyway, and their messages keep their commit
//!   order.
//!
//! # Example
//!
//! ```no_run
//! # async fn example(pool: saga_postgres::deadpool_postgres::Pool) -> Result<(), Box<dyn std::error::Error>> {
//! use saga_postgres::{ConnectConfig, SchemaName};
//! use saga_postgres::outbox::{DeliveryOrder, Dispatcher, InProcessPublisher, Outbox};
//!
//! let outbox = Outbox::new(pool, SchemaName::default());
//! let publisher = InProcessPublisher::new().handle("order.paid", |msg| async move {
//!     // Deduplicate with saga_postgres::inbox::Inbox, then act.
//!     let _ = msg.message.id;
//!     Ok(())
//! });
//! let dispatcher = Dispatcher::builder(outbox, publisher)
//!     .order(DeliveryOrder::PerKey)
//!     .listen(ConnectConfig::from_url("postgres://app@db/app?sslmode=verify-full")?)
//!     .build()?;
//! let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! dispatcher.run(async { let _ = stopped.await; }).await; // until `_stop` is used or dropped
//! # Ok(())
//! # }
//! ```

mod admin;
mod builder;
mod config;
mod dispatcher;
mod enqueue;
mod error;
mod in_process;
mod listener;
#[cfg(feature = "nats")]
pub mod nats;
mod outage;
mod publisher;
mod sql;

pub use admin::{DeadLetter, OutboxStats};
pub use builder::DispatcherBuilder;
pub use config::{
    DeliveryOrder, DispatchReport, DispatcherConfig, default_outage_backoff, default_retry_policy,
};
pub use dispatcher::Dispatcher;
pub use enqueue::{Outbox, OutboxBuilder};
pub use error::OutboxError;
pub use in_process::{HandlerPanicked, InProcessPublisher, NoHandler};
pub use listener::ListenerStatus;
#[cfg(feature = "nats")]
pub use nats::NatsPublisher;
pub use publisher::{Outgoing, PublishError, PublishErrorKind, Publisher};

/// Every statement of the outbox, for the crate's statement tests.
pub(crate) fn statements(schema: &crate::SchemaName) -> Vec<crate::db::statement::Statement> {
    sql::OutboxSql::new(schema)
        .all()
        .into_iter()
        .cloned()
        .collect()
}
