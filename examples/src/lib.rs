//! The checkout service: the saga users run first, and the scenario the
//! chaos harness attacks.
//!
//! validate order → charge payment → reserve inventory → confirm order
//! (the pivot) → send confirmation, over fake payment, inventory and email
//! services reached over HTTP, each with its own ledger of effects.
//! Everything here is built on the public API of `saga-core` and
//! `saga-postgres`, as a user would.

pub mod audit;
pub mod clients;
pub mod demo;
pub mod deploy;
mod error;
pub mod faults;
pub mod model;
pub mod saga;
pub mod services;
pub mod shop;

pub use error::{Error, describe};

/// `docs/walkthrough.md`: its code blocks, compiled and run as doctests.
#[doc = include_str!("../../docs/walkthrough.md")]
#[cfg(doctest)]
pub struct WalkthroughDoctests;

/// `docs/guarantees.md`: its code blocks, compiled and run as doctests.
#[doc = include_str!("../../docs/guarantees.md")]
#[cfg(doctest)]
pub struct GuaranteesDoctests;

/// `docs/operations.md`: its code blocks, compiled and run as doctests.
#[doc = include_str!("../../docs/operations.md")]
#[cfg(doctest)]
pub struct OperationsDoctests;

/// `docs/ARCHITECTURE.md`: its code blocks, compiled and run as doctests.
#[doc = include_str!("../../docs/ARCHITECTURE.md")]
#[cfg(doctest)]
pub struct ArchitectureDoctests;

/// `docs/chaos.md`: its code blocks, compiled and run as doctests.
#[doc = include_str!("../../docs/chaos.md")]
#[cfg(doctest)]
pub struct ChaosDoctests;

/// `docs/dependencies.md`: its code blocks, compiled and run as doctests.
#[doc = include_str!("../../docs/dependencies.md")]
#[cfg(doctest)]
pub struct DependenciesDoctests;
