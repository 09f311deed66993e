//! The shape of a saga definition: everything about it but its actions.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ids::{SagaKind, StepName};
use crate::machine::StepKind;
use crate::retry::RetryPolicy;

/// What a saga definition is, apart from what its steps do: its name and
/// version, and each step's name, former names, role, retry policies and
/// timeouts, in order.
///
/// A plain value: built with no database, network or service clients,
/// comparable, serialisable. It is what a diagram is drawn from
/// ([`SagaShape::to_mermaid`]), what operator tools read, and what a
/// definition's fingerprint is computed from. Layers
/// ([`SagaDefinition::layer`](crate::SagaDefinition::layer)) never change
/// it.
///
/// ```
/// use saga_core::{SagaDefinition, Step, StepContext, StepError, StepKind};
/// async fn ok(_: &mut StepContext, _: &mut u8) -> Result<(), StepError> { Ok(()) }
///
/// let saga = SagaDefinition::<u8>::builder("pay", 2)
///     .step(Step::new("charge", ok).alias("bill").compensate_with(ok))
///     .pivot(Step::new("confirm", ok))
///     .build()?;
/// let shape = saga.shape();
/// assert_eq!(shape.kind.version, 2);
/// assert_eq!(shape.steps[0].name.as_str(), "charge");
/// assert_eq!(shape.steps[0].key_name().as_str(), "bill");
/// assert_eq!(shape.steps[0].kind, StepKind::Compensatable);
/// assert!(shape.steps[1].compensation.is_none());
/// let json = serde_json::to_string(shape).unwrap();
/// assert_eq!(&serde_json::from_str::<saga_core::SagaShape>(&json).unwrap(), shape);
/// # Ok::<(), saga_core::BuildError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SagaShape {
    /// The saga's name and version.
    pub kind: SagaKind,
    /// The steps, in order.
    pub steps: Vec<StepShape>,
}

/// One step of a [`SagaShape`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct StepShape {
    /// The step's name.
    pub name: StepName,
    /// Its former names, oldest first.
    pub aliases: Vec<StepName>,
    /// Its role.
    pub kind: StepKind,
    /// The forward action's retry policy and timeout.
    pub forward: SideShape,
    /// The compensation's retry policy and timeout, if it has one.
    pub compensation: Option<SideShape>,
}

impl StepShape {
    /// The name the step's idempotency keys and message ids derive from:
    /// its oldest name.
    #[must_use]
    pub fn key_name(&self) -> &StepName {
        self.aliases.first().unwrap_or(&self.name)
    }
}

/// How one direction of a step is run: its retry policy and per-attempt
/// timeout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SideShape {
    /// The retry policy.
    pub retry: RetryPolicy,
    /// The per-attempt timeout.
    pub timeout: Duration,
}

impl SagaShape {
    /// The role of each step, in order: what the status machine needs.
    pub fn plan(&self) -> impl Iterator<Item = StepKind> + '_ {
        self.steps.iter().map(|s| s.kind)
    }
}
