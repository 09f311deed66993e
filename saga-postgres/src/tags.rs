//! Stable tags on the statements this crate sends, for tools that watch the
//! wire (a fault-injecting proxy, a statement log) and need to recognise a
//! statement without parsing its SQL, which is private and changes between
//! releases.
//!
//! These names and values are part of the crate's public API: they change
//! only in a breaking release.

/// The text every statement that records a saga transition starts with
/// (leased and unleased transitions, and any batched variant).
pub const TRANSITION: &str = "/* saga:transition */";

/// The 1-based `$n` position of the saga instance's id (`uuid`) in every
/// statement tagged [`TRANSITION`].
pub const TRANSITION_SAGA_ID_PARAM: usize = 1;

/// The 1-based `$n` position of the transition's id (`uuid`, the
/// [`TransitionId`](saga_core::TransitionId) written under a unique
/// constraint with the history row) in every statement tagged
/// [`TRANSITION`].
pub const TRANSITION_ID_PARAM: usize = 2;
