//! Test support: the store conformance suite and a scripted saga.
//!
//! Enabled by the `testing` feature. Store implementations run the suite
//! with [`store_conformance_tests!`](crate::store_conformance_tests); the
//! in-memory store and the Postgres store pass the same cases.

pub mod conformance;
mod definitions;
mod refusals;
mod script;

pub use conformance::{Harness, LEASE, StoreFactory};
pub use script::{
    Behavior, Call, Gate, STEPS, Script, ScriptedFailure, TEST_TIMEOUT, TestState, scripted_saga,
    scripted_saga_swapped, scripted_saga_with, test_policy,
};
