//! The Postgres store passes saga-core's store conformance suite, unchanged.

mod common;

saga_core::store_conformance_tests!(common::fresh_store);
