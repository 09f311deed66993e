//! Metric names of the PostgreSQL store. Every metric name of the
//! workspace is owned, with its description, by [`saga_core::metrics`];
//! these are re-exported from there.

pub use saga_core::metrics::{AMBIGUOUS_COMMITS, STORE_RETRIES};
