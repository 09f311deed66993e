//! Negative controls: stores broken on purpose, so that a harness can show
//! that it notices. Never use them outside tests.
//!
//! [`Unfenced`] is a [`SagaStore`] that does not fence: a worker whose
//! lease expired or was taken over still gets its result recorded and its
//! lease extended. It is built from outside the library, around a real,
//! fenced store: when the store refuses a guarded write (a
//! [`record`](SagaStore::record) or [`heartbeat`](SagaStore::heartbeat))
//! because the caller's lease is no longer the current one, the wrapper
//! re-points the row's lease to the caller's token with a direct `UPDATE`
//! and sends the write again, which the real, fenced statement then
//! accepts. As its callers see it, the store accepts every stale write.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use saga_core::store::{ClaimRequest, ClaimedSaga, Lease, NewSaga, Record, SagaStore};
use saga_core::{
    Clock, Error, HistoryEntry, OutboxMessage, SagaId, SagaKind, SagaSnapshot, Started,
};
use saga_postgres::deadpool_postgres::Pool;
use saga_postgres::{PgError, PgSagaStore, SchemaName};
use uuid::Uuid;

/// How long a re-pointed lease lasts: long enough for the write that
/// follows, short enough that a write that then fails leaves the saga
/// claimable again soon.
pub const REPOINTED_LEASE: Duration = Duration::from_secs(10);

/// NEGATIVE CONTROL: `St`, with fencing defeated from outside (see the
/// [module](self)). Every other method delegates unchanged.
#[derive(Debug, Clone)]
pub struct Unfenced<St> {
    inner: St,
    pool: Pool,
    repoint: Arc<str>,
    repointed: Arc<AtomicU64>,
}

impl Unfenced<PgSagaStore> {
    /// `store`, unfenced; the re-pointing runs on its own pool and schema.
    #[must_use]
    pub fn postgres(store: PgSagaStore) -> Self {
        let (pool, schema) = (store.pool().clone(), store.schema().clone());
        Unfenced::new(store, pool, &schema)
    }
}

impl<St: SagaStore> Unfenced<St> {
    /// `inner`, unfenced; its instances live in `schema`'s
    /// `saga_instances`, reached through `pool`.
    #[must_use]
    pub fn new(inner: St, pool: Pool, schema: &SchemaName) -> Self {
        // The lease lasts from the later of the store's clock and the
        // server's, so that the store's guard (`lease_expires_at > now`,
        // on either clock) passes.
        let repoint = format!(
            "UPDATE {}.saga_instances
             SET lease_token = $2::uuid,
                 lease_expires_at = greatest(clock_timestamp(), $3::timestamptz)
                     + $4::float8 * interval '1 second'
             WHERE id = $1::uuid",
            schema.quoted()
        );
        Unfenced {
            inner,
            pool,
            repoint: repoint.into(),
            repointed: Arc::default(),
        }
    }

    /// The wrapped store.
    #[must_use]
    pub fn inner(&self) -> &St {
        &self.inner
    }

    /// How many stale writes were let through so far.
    #[must_use]
    pub fn repointed(&self) -> u64 {
        self.repointed.load(Ordering::Relaxed)
    }

    /// Makes `lease` the current lease of its saga again, whoever holds
    /// it now; returns whether the saga exists.
    async fn repoint(&self, lease: &Lease) -> Result<bool, Error> {
        let client = self
            .pool
            .get()
            .await
            .map_err(|e| Error::store(PgError::from(e)))?;
        let now = self.inner.clock().now().to_system_time();
        let n = client
            .execute(
                &*self.repoint,
                &[
                    &Uuid::from(lease.saga_id),
                    &Uuid::from(lease.token),
                    &now,
                    &REPOINTED_LEASE.as_secs_f64(),
                ],
            )
            .await
            .map_err(|e| Error::store(PgError::from(e)))?;
        if n > 0 {
            self.repointed.fetch_add(1, Ordering::Relaxed);
        }
        Ok(n > 0)
    }
}

impl<St: SagaStore> SagaStore for Unfenced<St> {
    fn clock(&self) -> &Arc<dyn Clock> {
        self.inner.clock()
    }

    fn limits(&self) -> saga_core::Limits {
        self.inner.limits()
    }

    async fn start(&self, new: NewSaga) -> Result<Started, Error> {
        self.inner.start(new).await
    }

    async fn claim(&self, request: ClaimRequest<'_>) -> Result<Vec<ClaimedSaga>, Error> {
        self.inner.claim(request).await
    }

    async fn heartbeat(&self, lease: &Lease, lease_for: Duration) -> Result<Lease, Error> {
        match self.inner.heartbeat(lease, lease_for).await {
            Err(Error::LeaseLost(_)) if self.repoint(lease).await? => {
                self.inner.heartbeat(lease, lease_for).await
            }
            other => other,
        }
    }

    async fn release(&self, lease: &Lease) -> Result<(), Error> {
        self.inner.release(lease).await
    }

    async fn record(&self, lease: &Lease, record: Record) -> Result<(), Error> {
        match self.inner.record(lease, record.clone()).await {
            Err(Error::LeaseLost(_)) if self.repoint(lease).await? => {
                self.inner.record(lease, record).await
            }
            other => other,
        }
    }

    async fn record_unleased(
        &self,
        id: SagaId,
        expected_version: u64,
        record: Record,
    ) -> Result<(), Error> {
        self.inner
            .record_unleased(id, expected_version, record)
            .await
    }

    async fn load(&self, id: SagaId) -> Result<Option<SagaSnapshot>, Error> {
        self.inner.load(id).await
    }

    async fn history(&self, id: SagaId) -> Result<Vec<HistoryEntry>, Error> {
        self.inner.history(id).await
    }

    async fn outbox_for(&self, id: SagaId) -> Result<Vec<OutboxMessage>, Error> {
        self.inner.outbox_for(id).await
    }

    async fn due_unregistered(&self, kinds: &[SagaKind]) -> Result<Vec<(SagaKind, u64)>, Error> {
        self.inner.due_unregistered(kinds).await
    }

    async fn due_unmatched(
        &self,
        kinds: &[SagaKind],
        fingerprints: &[saga_core::ShapeFingerprint],
    ) -> Result<Vec<(SagaKind, saga_core::ShapeFingerprint, u64)>, Error> {
        self.inner.due_unmatched(kinds, fingerprints).await
    }

    async fn register_definition(
        &self,
        shape: &saga_core::SagaShape,
    ) -> Result<saga_core::ShapeFingerprint, Error> {
        self.inner.register_definition(shape).await
    }
}
