//! A definition's identity: the [`ShapeFingerprint`] of its
//! [`SagaShape`], and the [`first_difference`] between two shapes.
//!
//! ## What the fingerprint covers
//!
//! Everything that decides which instances two workers may run side by
//! side, and nothing else:
//!
//! - the saga's name and version;
//! - the steps, in order;
//! - each step's names: its current name and every alias, in order;
//! - each step's role ([`StepKind`]) and whether it has a compensation.
//!
//! Retry policies and timeouts are left out: they may change under the
//! same version, and workers with different ones run the same instances.
//!
//! Every name is covered, not only the oldest one the keys derive from
//! ([`StepShape::key_name`]), because an instance row records the step's
//! *current* name: after a worker renamed `bill` to
//! `charge` (with `.alias("bill")`) moved an instance to `charge`, a worker
//! still on the old definition cannot resolve it. A rename therefore
//! changes the fingerprint, like a reordering, an added or removed step, a
//! changed role or a new alias (which would change the step's key name):
//! each is a new version.

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::ids::StepName;
use crate::machine::StepKind;
use crate::shape::{SagaShape, StepShape};

/// SHA-256 over a canonical encoding of a [`SagaShape`]'s identity (see
/// the [module](self) documentation for what it covers). Displays as 64
/// lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ShapeFingerprint([u8; 32]);

impl ShapeFingerprint {
    /// The fingerprint with these bytes (as a store reads it back).
    #[must_use]
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        ShapeFingerprint(bytes)
    }

    /// Its 32 bytes.
    #[must_use]
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for ShapeFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for ShapeFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ShapeFingerprint({self})")
    }
}

/// Bumped if the encoding ever changes, so an old and a new encoding never
/// collide.
const DOMAIN: &[u8] = b"saga-core shape fingerprint v1\0";

fn put_str(hash: &mut Sha256, s: &str) {
    hash.update((s.len() as u64).to_be_bytes());
    hash.update(s.as_bytes());
}

fn put_len(hash: &mut Sha256, n: usize) {
    hash.update((n as u64).to_be_bytes());
}

impl SagaShape {
    /// The fingerprint of the definition's identity: name, version, and
    /// each step's names, role and compensation, in order; not its retry
    /// policies or timeouts. Pure; see [`crate::fingerprint`].
    ///
    /// ```
    /// use std::time::Duration;
    /// use saga_core::{SagaDefinition, Step, StepContext, StepError};
    /// async fn ok(_: &mut StepContext, _: &mut u8) -> Result<(), StepError> { Ok(()) }
    ///
    /// let a = SagaDefinition::<u8>::builder("pay", 1)
    ///     .step(Step::new("charge", ok).compensate_with(ok))
    ///     .build()?;
    /// let slower = SagaDefinition::<u8>::builder("pay", 1)
    ///     .step(Step::new("charge", ok).timeout(Duration::from_secs(90)).compensate_with(ok))
    ///     .build()?;
    /// let renamed = SagaDefinition::<u8>::builder("pay", 1)
    ///     .step(Step::new("bill", ok).alias("charge").compensate_with(ok))
    ///     .build()?;
    /// assert_eq!(a.shape().fingerprint(), slower.shape().fingerprint());
    /// assert_ne!(a.shape().fingerprint(), renamed.shape().fingerprint());
    /// # Ok::<(), saga_core::BuildError>(())
    /// ```
    #[must_use]
    pub fn fingerprint(&self) -> ShapeFingerprint {
        let mut hash = Sha256::new();
        hash.update(DOMAIN);
        put_str(&mut hash, self.kind.name.as_str());
        hash.update(self.kind.version.to_be_bytes());
        put_len(&mut hash, self.steps.len());
        for step in &self.steps {
            let names = names(step);
            put_len(&mut hash, names.len());
            for name in names {
                put_str(&mut hash, name.as_str());
            }
            put_str(&mut hash, step.kind.as_str());
            hash.update([u8::from(step.compensation.is_some())]);
        }
        ShapeFingerprint(hash.finalize().into())
    }
}

/// A step's names as the fingerprint sees them: current name, then its
/// aliases, oldest first.
fn names(step: &StepShape) -> Vec<&StepName> {
    std::iter::once(&step.name).chain(&step.aliases).collect()
}

/// The first place where two shapes' identities differ, in the order the
/// fingerprint reads them: what [`Error::DefinitionChanged`] shows.
///
/// [`Error::DefinitionChanged`]: crate::Error::DefinitionChanged
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ShapeDifference {
    /// The saga names or versions differ.
    Kind {
        /// The stored shape's `name@vN`.
        stored: String,
        /// The registered shape's.
        registered: String,
    },
    /// Step `index` has other names (a rename, a swap, a new alias).
    Names {
        /// The step's position, from 0.
        index: usize,
        /// The stored shape's names of that step: current, then aliases.
        stored: Vec<StepName>,
        /// The registered shape's.
        registered: Vec<StepName>,
    },
    /// Step `index` has another role or compensation.
    Role {
        /// The step's position, from 0.
        index: usize,
        /// The step's (registered) name.
        step: StepName,
        /// The stored role, and whether it compensates.
        stored: (StepKind, bool),
        /// The registered one.
        registered: (StepKind, bool),
    },
    /// One shape has more steps; the steps both have are alike.
    StepCount {
        /// The stored shape's number of steps.
        stored: usize,
        /// The registered shape's.
        registered: usize,
    },
    /// The fingerprints differ but the difference cannot be shown (the
    /// stored shape is unreadable, say).
    NotShown {
        /// Why.
        reason: String,
    },
}

fn list(names: &[StepName]) -> String {
    let names: Vec<&str> = names.iter().map(StepName::as_str).collect();
    names.join("|")
}

fn role((kind, compensates): (StepKind, bool)) -> String {
    if compensates {
        format!("{} (compensated)", kind.as_str())
    } else {
        format!("{} (not compensated)", kind.as_str())
    }
}

impl fmt::Display for ShapeDifference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ShapeDifference::Kind { stored, registered } => {
                write!(
                    f,
                    "the stored shape is {stored}, the registered {registered}"
                )
            }
            ShapeDifference::Names {
                index,
                stored,
                registered,
            } => write!(
                f,
                "step {} is `{}` in the stored shape and `{}` in the registered one",
                index + 1,
                list(stored),
                list(registered)
            ),
            ShapeDifference::Role {
                index,
                step,
                stored,
                registered,
            } => write!(
                f,
                "step {} `{step}` is {} in the stored shape and {} in the registered one",
                index + 1,
                role(*stored),
                role(*registered)
            ),
            ShapeDifference::StepCount { stored, registered } => write!(
                f,
                "the stored shape has {stored} steps, the registered one {registered}"
            ),
            ShapeDifference::NotShown { reason } => {
                write!(f, "the first difference cannot be shown: {reason}")
            }
        }
    }
}

/// The first difference between two shapes' identities, or `None` when
/// they have the same [`fingerprint`](SagaShape::fingerprint). Retry
/// policies and timeouts are not compared. Pure.
#[must_use]
pub fn first_difference(stored: &SagaShape, registered: &SagaShape) -> Option<ShapeDifference> {
    if stored.kind != registered.kind {
        return Some(ShapeDifference::Kind {
            stored: stored.kind.to_string(),
            registered: registered.kind.to_string(),
        });
    }
    for (index, (s, r)) in stored.steps.iter().zip(&registered.steps).enumerate() {
        let (sn, rn) = (names(s), names(r));
        if sn != rn {
            return Some(ShapeDifference::Names {
                index,
                stored: sn.into_iter().cloned().collect(),
                registered: rn.into_iter().cloned().collect(),
            });
        }
        let (sr, rr) = (
            (s.kind, s.compensation.is_some()),
            (r.kind, r.compensation.is_some()),
        );
        if sr != rr {
            return Some(ShapeDifference::Role {
                index,
                step: r.name.clone(),
                stored: sr,
                registered: rr,
            });
        }
    }
    if stored.steps.len() != registered.steps.len() {
        return Some(ShapeDifference::StepCount {
            stored: stored.steps.len(),
            registered: registered.steps.len(),
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::context::StepContext;
    use crate::definition::{SagaDefinition, Step};
    use crate::error::StepError;
    use crate::retry::RetryPolicy;

    async fn ok(_: &mut StepContext, _: &mut u8) -> Result<(), StepError> {
        Ok(())
    }

    fn n(s: &str) -> StepName {
        StepName::new(s).unwrap()
    }

    /// The shape of the definition `$body` builds from the builder `$b`.
    macro_rules! shape {
        ($name:expr, $version:expr, |$b:ident| $body:expr) => {{
            let $b = SagaDefinition::<u8>::builder($name, $version);
            let saga: SagaDefinition<u8> = $body.build().unwrap();
            saga.shape().clone()
        }};
    }

    /// `reserve` (compensated), `charge` (compensated), `confirm` (pivot),
    /// `notify` (after the pivot).
    fn base() -> SagaShape {
        shape!("book", 1, |b| {
            b.step(Step::new("reserve", ok).compensate_with(ok))
                .step(Step::new("charge", ok).compensate_with(ok))
                .pivot(Step::new("confirm", ok))
                .step(Step::new("notify", ok))
        })
    }

    /// Each change, whether it keeps the fingerprint, and the first
    /// difference it shows.
    #[test]
    fn what_keeps_the_fingerprint_and_what_changes_it() {
        let slow = RetryPolicy::builder()
            .max_attempts(9)
            .initial_delay(Duration::from_secs(5))
            .build()
            .unwrap();
        type Case = (&'static str, SagaShape, Option<ShapeDifference>);
        let cases: Vec<Case> = vec![
            ("the same definition", base(), None),
            (
                "other retry policies and timeouts",
                shape!("book", 1, |b| {
                    b.step(
                        Step::new("reserve", ok)
                            .retry(slow.clone())
                            .timeout(Duration::from_secs(300))
                            .compensate_with(ok)
                            .compensation_retry(slow.clone())
                            .compensation_timeout(Duration::from_secs(1)),
                    )
                    .step(Step::new("charge", ok).compensate_with(ok))
                    .pivot(Step::new("confirm", ok).retry(slow.clone()))
                    .step(Step::new("notify", ok).timeout(Duration::from_millis(5)))
                }),
                None,
            ),
            (
                "two steps swapped",
                shape!("book", 1, |b| {
                    b.step(Step::new("charge", ok).compensate_with(ok))
                        .step(Step::new("reserve", ok).compensate_with(ok))
                        .pivot(Step::new("confirm", ok))
                        .step(Step::new("notify", ok))
                }),
                Some(ShapeDifference::Names {
                    index: 0,
                    stored: vec![n("reserve")],
                    registered: vec![n("charge")],
                }),
            ),
            (
                "a rename, even with the old name as an alias",
                shape!("book", 1, |b| {
                    b.step(Step::new("reserve", ok).compensate_with(ok))
                        .step(Step::new("pay", ok).alias("charge").compensate_with(ok))
                        .pivot(Step::new("confirm", ok))
                        .step(Step::new("notify", ok))
                }),
                Some(ShapeDifference::Names {
                    index: 1,
                    stored: vec![n("charge")],
                    registered: vec![n("pay"), n("charge")],
                }),
            ),
            (
                "a new alias (it would change the key name)",
                shape!("book", 1, |b| {
                    b.step(Step::new("reserve", ok).alias("hold").compensate_with(ok))
                        .step(Step::new("charge", ok).compensate_with(ok))
                        .pivot(Step::new("confirm", ok))
                        .step(Step::new("notify", ok))
                }),
                Some(ShapeDifference::Names {
                    index: 0,
                    stored: vec![n("reserve")],
                    registered: vec![n("reserve"), n("hold")],
                }),
            ),
            (
                "a compensated step made uncompensated",
                shape!("book", 1, |b| {
                    b.step(Step::new("reserve", ok).compensate_with(ok))
                        .step(Step::new("charge", ok).no_compensation())
                        .pivot(Step::new("confirm", ok))
                        .step(Step::new("notify", ok))
                }),
                Some(ShapeDifference::Role {
                    index: 1,
                    step: n("charge"),
                    stored: (StepKind::Compensatable, true),
                    registered: (StepKind::NoCompensation, false),
                }),
            ),
            (
                "the pivot moved",
                shape!("book", 1, |b| {
                    b.step(Step::new("reserve", ok).compensate_with(ok))
                        .pivot(Step::new("charge", ok))
                        .step(Step::new("confirm", ok))
                        .step(Step::new("notify", ok))
                }),
                Some(ShapeDifference::Role {
                    index: 1,
                    step: n("charge"),
                    stored: (StepKind::Compensatable, true),
                    registered: (StepKind::Pivot, false),
                }),
            ),
            (
                "a step added at the end",
                shape!("book", 1, |b| {
                    b.step(Step::new("reserve", ok).compensate_with(ok))
                        .step(Step::new("charge", ok).compensate_with(ok))
                        .pivot(Step::new("confirm", ok))
                        .step(Step::new("notify", ok))
                        .step(Step::new("archive", ok))
                }),
                Some(ShapeDifference::StepCount {
                    stored: 4,
                    registered: 5,
                }),
            ),
            (
                "another version",
                shape!("book", 2, |b| {
                    b.step(Step::new("reserve", ok).compensate_with(ok))
                        .step(Step::new("charge", ok).compensate_with(ok))
                        .pivot(Step::new("confirm", ok))
                        .step(Step::new("notify", ok))
                }),
                Some(ShapeDifference::Kind {
                    stored: "book@v1".into(),
                    registered: "book@v2".into(),
                }),
            ),
        ];
        let stored = base();
        for (what, registered, difference) in cases {
            assert_eq!(first_difference(&stored, &registered), difference, "{what}");
            assert_eq!(
                stored.fingerprint() == registered.fingerprint(),
                difference.is_none(),
                "{what}: the fingerprint agrees with first_difference"
            );
        }
    }

    #[test]
    fn the_encoding_is_unambiguous_and_stable() {
        // Moving a character between two names changes the fingerprint.
        let ab = shape!("s", 1, |b| {
            b.step(Step::new("ab", ok).no_compensation())
                .step(Step::new("c", ok).no_compensation())
        });
        let a_bc = shape!("s", 1, |b| {
            b.step(Step::new("a", ok).no_compensation())
                .step(Step::new("bc", ok).no_compensation())
        });
        assert_ne!(ab.fingerprint(), a_bc.fingerprint());
        // An alias is not a second step.
        let alias = shape!("s", 1, |b| {
            b.step(Step::new("a", ok).alias("b").no_compensation())
        });
        let two = shape!("s", 1, |b| {
            b.step(Step::new("a", ok).no_compensation())
                .step(Step::new("b", ok).no_compensation())
        });
        assert_ne!(alias.fingerprint(), two.fingerprint());
        // Stored fingerprints must never move under a running system: the
        // encoding is pinned.
        assert_eq!(
            ab.fingerprint().to_string(),
            "29bd93c9853722a9e21aa9dc9b829cea603d8ac9e7d52203a626c37d3b870dbe"
        );
    }

    #[test]
    fn differences_read_as_sentences() {
        let d = ShapeDifference::Names {
            index: 0,
            stored: vec![n("reserve")],
            registered: vec![n("pay"), n("charge")],
        };
        assert_eq!(
            d.to_string(),
            "step 1 is `reserve` in the stored shape and `pay|charge` in the registered one"
        );
        let d = ShapeDifference::Role {
            index: 1,
            step: n("charge"),
            stored: (StepKind::Compensatable, true),
            registered: (StepKind::Pivot, false),
        };
        assert_eq!(
            d.to_string(),
            "step 2 `charge` is compensatable (compensated) in the stored shape and pivot \
             (not compensated) in the registered one"
        );
    }

    #[test]
    fn a_fingerprint_round_trips_through_its_bytes() {
        let f = base().fingerprint();
        assert_eq!(ShapeFingerprint::from_bytes(*f.as_bytes()), f);
        assert_eq!(f.to_string().len(), 64);
    }
}
