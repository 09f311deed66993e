//! The chaos harness: many concurrent checkout sagas driven through the
//! checkout example's services and worker processes while a seeded
//! schedule injects faults — killed and frozen workers, PostgreSQL
//! restarts, connections cut around COMMIT, downstream outages and lost
//! replies, duplicate deliveries — and then, once the faults stop and the
//! system quiesces, the checkout invariants checked from ground truth: the
//! services' ledgers, the database rows, and the harness's own records
//! (every outbox and history row ever inserted and every lease change,
//! copied by triggers; every statement the proxy cut; every zombie it
//! froze), and the services' logs of which lease made each call.
//!
//! Run it with `cargo run -p chaos-tests --bin chaos -- run --help`; see
//! `docs/chaos.md`.

pub mod check;
pub mod harness;
pub mod report;
pub mod schedule;
pub mod worker;

pub use harness::{Config, Error, NegativeControl, Report, run};
