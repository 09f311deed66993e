//! What an executor checks against its store: at start, that each
//! registered definition has the shape stored for its saga name and version
//! ([`Executor::check`]); while running, how many due instances were
//! started under another shape and are left for a worker that matches.

use std::collections::HashSet;

use super::Executor;
use crate::error::{Error, ErrorChain};
use crate::fingerprint::ShapeFingerprint;
use crate::ids::SagaKind;
use crate::metrics as m;
use crate::store::SagaStore;

impl<St: SagaStore> Executor<St> {
    /// Registers every definition of this executor with the store
    /// ([`SagaStore::register_definition`]): the first worker to register a
    /// saga name and version stores its shape's fingerprint, and a worker
    /// whose shape differs is refused with [`Error::DefinitionChanged`],
    /// naming the first difference. A store that cannot answer fails here
    /// too (the PostgreSQL store says so when its schema was never
    /// migrated).
    ///
    /// [`run`](Executor::run) and [`run_until_idle`](Executor::run_until_idle)
    /// call it before they claim anything; call it yourself to fail a
    /// deployment's readiness check early. Once it has succeeded it is not
    /// repeated.
    ///
    /// ```
    /// use saga_core::{Error, Executor, InMemorySagaStore, SagaDefinition, Step, StepContext, StepError};
    /// async fn ok(_: &mut StepContext, _: &mut u8) -> Result<(), StepError> { Ok(()) }
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// let store = InMemorySagaStore::new();
    /// let first = SagaDefinition::<u8>::builder("trip", 1)
    ///     .step(Step::new("hotel", ok).compensate_with(ok))
    ///     .step(Step::new("flight", ok).compensate_with(ok))
    ///     .build()?;
    /// let swapped = SagaDefinition::<u8>::builder("trip", 1)
    ///     .step(Step::new("flight", ok).compensate_with(ok))
    ///     .step(Step::new("hotel", ok).compensate_with(ok))
    ///     .build()?;
    /// Executor::builder(store.clone()).register(first).build()?.check().await?;
    /// let refused = Executor::builder(store).register(swapped).build()?.check().await;
    /// assert!(matches!(refused, Err(Error::DefinitionChanged { .. })));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    pub async fn check(&self) -> Result<(), Error> {
        self.shared
            .checked
            .get_or_try_init(|| async {
                for kind in &self.shared.registry.kinds {
                    let saga = &self.shared.registry.sagas[kind];
                    self.shared
                        .store
                        .register_definition(saga.shape())
                        .await
                        .inspect_err(|e| {
                            if matches!(e, Error::Store(_)) {
                                self.shared.counters.store_failed("register_definition");
                            }
                            tracing::error!(saga = %kind.name, version = kind.version,
                                error = %ErrorChain(e),
                                "the saga definition could not be registered; this executor claims nothing");
                        })?;
                }
                Ok(())
            })
            .await
            .map(|_| ())
    }

    /// Logs and counts due instances of registered kinds that were started
    /// under another fingerprint; the gauge of one found last time and not
    /// now goes back to zero.
    pub(super) async fn check_unmatched(
        &self,
    ) -> Result<Vec<(SagaKind, ShapeFingerprint, u64)>, Error> {
        let registry = &self.shared.registry;
        let found = self
            .shared
            .store
            .due_unmatched(&registry.kinds, &registry.fingerprints)
            .await
            .inspect_err(|_| self.shared.counters.store_failed("due_unmatched"))?;
        let gauge = |kind: &SagaKind, fingerprint: &ShapeFingerprint| {
            metrics::gauge!(m::UNMATCHED_DUE,
                "saga" => kind.name.to_string(),
                "version" => kind.version.to_string(),
                "fingerprint" => fingerprint.to_string())
        };
        for (kind, fingerprint, count) in &found {
            let ours = registry
                .kinds
                .iter()
                .position(|k| k == kind)
                .map(|i| registry.fingerprints[i].to_string());
            tracing::warn!(
                saga = %kind.name,
                version = kind.version,
                due = count,
                started_under = %fingerprint,
                registered_here = ours.as_deref().unwrap_or("-"),
                "due saga instances started under another definition shape are left for a worker whose definition matches"
            );
            gauge(kind, fingerprint).set(*count as f64);
        }
        let found_now: HashSet<(SagaKind, ShapeFingerprint)> =
            found.iter().map(|(k, f, _)| (k.clone(), *f)).collect();
        let gone: Vec<(SagaKind, ShapeFingerprint)> = {
            let mut reported = self
                .shared
                .unmatched
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let gone = reported.difference(&found_now).cloned().collect();
            *reported = found_now;
            gone
        };
        for (kind, fingerprint) in &gone {
            gauge(kind, fingerprint).set(0.0);
        }
        Ok(found)
    }
}
