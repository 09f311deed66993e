//! Stable tags on the store's statements, for tools that watch the wire
//! (a fault-injecting proxy, a statement log): which statements record a
//! transition, and where their ids are bound.

/// Every statement that records a transition (a worker's result or an
/// operator's write: the instance's update and its history row) starts
/// with this comment.
pub const TRANSITION: &str = "/* saga:transition */";

/// The 1-based `$n` position of the saga id in a [`TRANSITION`] statement.
pub const TRANSITION_SAGA_ID_PARAM: usize = 1;

/// The 1-based `$n` position of the transition id (the history row's key)
/// in a [`TRANSITION`] statement.
pub const TRANSITION_ID_PARAM: usize = 12;
