//! The [`SagaStore`] operations of [`PgSagaStore`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use saga_core::store::{
    ClaimRequest, ClaimedSaga, Lease, MalformedSaga, NewSaga, Record, SagaStore,
};
use saga_core::{
    Clock, Error, HistoryEntry, Limits, OutboxMessage, SagaId, SagaKind, SagaSnapshot, Started,
    TransitionId,
};
use tokio_postgres::Row;
use uuid::Uuid;

use super::params::to_i32;
use super::params::{StartParams, TransitionParams};
use super::rows::{self, StartWinner, claimed, due_kind, history_entry, outbox_message, snapshot};
use super::sql::ATTEMPT_BOUND;
use super::{PgSagaStore, fingerprinted_kind_arrays, kind_arrays};
use crate::db::Budget;
use crate::db::ambiguity::{Written, claim_once, write_once};
use crate::db::rows::{col, corrupt, micros, only, time};
use crate::db::statement::Param;
use crate::error::PgError;
use saga_core::{SagaShape, ShapeFingerprint};
use tokio_postgres::error::SqlState;

/// What guards a transition.
#[derive(Debug, Clone, Copy)]
enum Guard {
    Lease(Uuid),
    Version(i64),
}

pub(super) fn winner(rows: &[Row]) -> Result<StartWinner, PgError> {
    let row = rows.first().ok_or_else(|| {
        corrupt(
            "start_key",
            "the conflicting row vanished; was it deleted by hand?",
        )
    })?;
    rows::start_winner(row)
}

/// The answer to a start, given the row found under the start key.
pub(super) fn started(new: NewSaga, winner: StartWinner) -> Result<Started, Error> {
    if winner.id == new.id.as_uuid() {
        return Ok(Started {
            id: new.id,
            created: true,
            kind: new.kind,
        });
    }
    let existing = SagaId::from_uuid(winner.id);
    if winner.digest != new.input_digest {
        return Err(Error::StartKeyConflict {
            saga: new.kind.name,
            key: new.start_key,
            existing,
        });
    }
    Ok(Started {
        id: existing,
        created: false,
        kind: winner.kind,
    })
}

impl PgSagaStore {
    /// Refreshes the offset to the server's clock if it is old.
    async fn sync_clock(&self) {
        let inner = &*self.inner;
        inner.clock.sync(&inner.db, &inner.sql.server_time).await;
    }

    /// Applies a transition under `guard`, resolving ambiguous commits
    /// (see [`crate::db::ambiguity`]).
    async fn apply(&self, id: SagaId, guard: Guard, record: Record) -> Result<(), Error> {
        self.check_record(&record)?;
        let inner = &*self.inner;
        let tid = record.transition_id.as_uuid();
        let p = TransitionParams::new(&record, &inner.schema);
        let stmt = match guard {
            Guard::Lease(_) => &inner.sql.record_leased,
            Guard::Version(_) => &inner.sql.record_unleased,
        };
        let uuid = id.as_uuid();
        let (p, uuid, tid) = (&p, &uuid, &tid);
        let mut budget = inner.db.budget();
        let written = write_once(
            &inner.db,
            "record",
            &mut budget,
            &inner.ambiguity,
            |d| async move {
                let now = inner.clock.bind();
                let (token, version);
                let guard: (&str, Param<'_>) = match guard {
                    Guard::Lease(t) => {
                        token = t;
                        ("lease_token", &token)
                    }
                    Guard::Version(v) => {
                        version = v;
                        ("expected_version", &version)
                    }
                };
                let rows = inner
                    .db
                    .attempt(d, stmt, &p.bind(uuid, guard, &now))
                    .await?;
                Ok(col::<i64>(only(&rows, "updated")?, "updated")? == 1)
            },
            |d| async move {
                let rows = inner
                    .db
                    .attempt(d, &inner.sql.transition_exists, &[("transition_id", tid)])
                    .await?;
                Ok(col::<bool>(only(&rows, "found")?, "found")?)
            },
        )
        .await
        .map_err(|e| {
            tracing::warn!(saga_id = %id, transition = %TransitionId::from_uuid(*tid), error = %e,
                "transition failed");
            e
        })?;
        match written {
            Written::Applied => Ok(()),
            Written::Refused => Err(self.refusal(&mut budget, id, guard).await?),
        }
    }

    /// Why a guarded write changed nothing.
    async fn refusal(
        &self,
        budget: &mut Budget,
        id: SagaId,
        guard: Guard,
    ) -> Result<Error, PgError> {
        let uuid = id.as_uuid();
        let rows = self
            .inner
            .db
            .query_in(budget, &self.inner.sql.current, &[("id", &uuid)])
            .await?;
        if rows.is_empty() {
            return Ok(Error::NotFound(id));
        }
        Ok(match guard {
            Guard::Lease(_) => Error::LeaseLost(id),
            Guard::Version(_) => Error::Conflict(id),
        })
    }

    /// Parks a claimed row that cannot be read, or whose attempt count is
    /// at its bound, under the lease the claim just took, so that the rest
    /// of the batch goes on; counts it in `parked`. If even that fails, the
    /// row stays leased until its lease expires.
    async fn park_claimed(
        &self,
        budget: &mut Budget,
        row: &Row,
        reason: String,
        parked: &AtomicU64,
    ) {
        let inner = &*self.inner;
        let raw = match rows::unreadable(row) {
            Ok(raw) => raw,
            Err(e) => {
                tracing::error!(error = %reason, also = %e,
                    "claimed a row too malformed to park; it stays leased until its lease expires");
                return;
            }
        };
        tracing::error!(saga_id = %raw.id, error = %reason,
            "claimed a saga instance no worker can run; parking it as stuck");
        let now = inner.clock.bind();
        let tid = TransitionId::new().as_uuid();
        let written = inner
            .db
            .query_in(
                budget,
                &inner.sql.park_malformed,
                &[
                    ("id", &raw.id),
                    ("token", &raw.token),
                    ("reason", &reason),
                    ("now", &now),
                    ("transition_id", &tid),
                    ("step", &raw.step),
                    ("direction", &raw.direction),
                    ("attempt", &raw.attempt),
                    ("status", &raw.status),
                ],
            )
            .await;
        match written {
            Ok(_) => {
                parked.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => tracing::error!(saga_id = %raw.id, error = %e,
                "could not park the malformed instance; it stays leased until its lease expires"),
        }
    }

    /// The error for a row `load` could not read (`error`): its raw
    /// columns and the reason, as [`Error::Malformed`].
    async fn malformed(&self, id: SagaId, error: PgError) -> Result<Error, PgError> {
        let uuid = id.as_uuid();
        let rows = self
            .inner
            .db
            .query(&self.inner.sql.load_raw, &[("id", &uuid)])
            .await?;
        let columns = rows
            .iter()
            .map(|row| Ok((col(row, "column_name")?, col(row, "value")?)))
            .collect::<Result<_, PgError>>()?;
        Ok(Error::Malformed {
            saga: Box::new(MalformedSaga {
                id,
                reason: crate::error::chain(&error),
                columns,
            }),
            source: Box::new(error),
        })
    }

    /// Reads claimed rows one by one: good ones are returned (oldest due
    /// first); malformed ones, and ones at the attempt bound, parked.
    async fn read_claimed(&self, budget: &mut Budget, rows: Vec<Row>) -> Vec<ClaimedSaga> {
        let inner = &*self.inner;
        let mut good = Vec::with_capacity(rows.len());
        for row in &rows {
            if col::<bool>(row, "unclaimable").unwrap_or(false) {
                let reason = format!(
                    "the attempt count is at its bound ({ATTEMPT_BOUND}): no claim can count \
                     another attempt (was it written by hand?); set `attempt` lower to run \
                     the step again"
                );
                self.park_claimed(budget, row, reason, &inner.unclaimable_parked)
                    .await;
                continue;
            }
            match claimed(row) {
                Ok(c) => good.push(c),
                Err(e) => {
                    let reason =
                        format!("the stored row cannot be read: {}", crate::error::chain(&e));
                    self.park_claimed(budget, row, reason, &inner.malformed_parked)
                        .await;
                }
            }
        }
        good.sort_by_key(|(due, c)| (*due, c.lease.saga_id));
        good.into_iter().map(|(_, c)| c).collect()
    }
}

impl SagaStore for PgSagaStore {
    fn clock(&self) -> &Arc<dyn Clock> {
        self.inner.clock.clock()
    }

    fn limits(&self) -> Limits {
        self.inner.limits
    }

    async fn start(&self, new: NewSaga) -> Result<Started, Error> {
        self.check_start(&new)?;
        self.sync_clock().await;
        let inner = &*self.inner;
        let p = StartParams::new(&new);
        let (p, state) = (&p, &new.state);
        let mut budget = inner.db.budget();
        // Safe to repeat: a repeated insert finds the row (ours, if the
        // first attempt committed) by its start key.
        let existing = inner
            .db
            .retrying("start", &mut budget, |d| async move {
                let now = inner.clock.bind();
                let rows = inner
                    .db
                    .attempt(d, &inner.sql.start, &p.bind(&now, state))
                    .await?;
                if let Some(row) = rows.first() {
                    return Ok(rows::start_winner(row)?);
                }
                // Taken: read the winner (a new statement sees a row that
                // a concurrent start committed while this one waited).
                let rows = inner
                    .db
                    .attempt(d, &inner.sql.start_existing, &p.bind_existing())
                    .await?;
                Ok(winner(&rows)?)
            })
            .await?;
        started(new, existing)
    }

    async fn claim(&self, request: ClaimRequest<'_>) -> Result<Vec<ClaimedSaga>, Error> {
        let (names, versions, fingerprints) =
            fingerprinted_kind_arrays(request.kinds, request.fingerprints);
        if request.limit == 0 || names.is_empty() {
            return Ok(Vec::new());
        }
        self.sync_clock().await;
        let inner = &*self.inner;
        let fingerprints = &fingerprints;
        let worker = request.worker.as_uuid();
        let limit = i64::try_from(request.limit).unwrap_or(i64::MAX);
        let lease_for = micros(request.lease_for);
        // Written into every row this claim leases: if the reply is lost,
        // the rows are found again by it.
        let claim_id = Uuid::now_v7();
        let (names, versions) = (&names, &versions);
        let (worker, limit, lease_for, claim_id) = (&worker, &limit, &lease_for, &claim_id);
        let mut budget = inner.db.budget();
        let rows = claim_once(
            &inner.db,
            "claim",
            &mut budget,
            &inner.ambiguity,
            |d| async move {
                let now = inner.clock.bind();
                inner
                    .db
                    .attempt(
                        d,
                        &inner.sql.claim,
                        &[
                            ("now", &now),
                            ("worker", worker),
                            ("limit", limit),
                            ("names", names),
                            ("versions", versions),
                            ("fingerprints", fingerprints),
                            ("lease_for_us", lease_for),
                            ("claim_id", claim_id),
                        ],
                    )
                    .await
            },
            |d| async move {
                let now = inner.clock.bind();
                inner
                    .db
                    .attempt(
                        d,
                        &inner.sql.claimed_by,
                        &[
                            ("names", names),
                            ("versions", versions),
                            ("lease_for_us", lease_for),
                            ("claim_id", claim_id),
                            ("worker", worker),
                            ("now", &now),
                        ],
                    )
                    .await
            },
        )
        .await?;
        Ok(self.read_claimed(&mut budget, rows).await)
    }

    async fn heartbeat(&self, lease: &Lease, lease_for: Duration) -> Result<Lease, Error> {
        self.sync_clock().await;
        let inner = &*self.inner;
        let id = lease.saga_id.as_uuid();
        let token = lease.token.as_uuid();
        let lease_for = micros(lease_for);
        let (idr, tokenr, lease_for) = (&id, &token, &lease_for);
        let mut budget = inner.db.budget();
        let rows = inner
            .db
            .retrying("heartbeat", &mut budget, |d| async move {
                let now = inner.clock.bind();
                inner
                    .db
                    .attempt(
                        d,
                        &inner.sql.heartbeat,
                        &[
                            ("id", idr),
                            ("token", tokenr),
                            ("lease_for_us", lease_for),
                            ("now", &now),
                        ],
                    )
                    .await
            })
            .await?;
        match rows.first() {
            Some(row) => Ok(Lease {
                expires_at: time(row, "lease_expires_at")?,
                ..*lease
            }),
            None => Err(self
                .refusal(&mut budget, lease.saga_id, Guard::Lease(token))
                .await?),
        }
    }

    async fn release(&self, lease: &Lease) -> Result<(), Error> {
        let inner = &*self.inner;
        let id = lease.saga_id.as_uuid();
        let token = lease.token.as_uuid();
        let mut budget = inner.db.budget();
        let mut ambiguous = false;
        loop {
            let now = inner.clock.bind();
            let attempt = inner
                .db
                .attempt(
                    budget.deadline(),
                    &inner.sql.release,
                    &[("id", &id), ("token", &token), ("now", &now)],
                )
                .await;
            match attempt {
                Ok(rows) if rows.len() == 1 => return Ok(()),
                // Our earlier, ambiguous attempt released it.
                Ok(_) if ambiguous => return Ok(()),
                Ok(_) => {
                    return Err(self
                        .refusal(&mut budget, lease.saga_id, Guard::Lease(token))
                        .await?);
                }
                Err(failed) => {
                    ambiguous |= failed.ambiguous();
                    inner.db.pause("release", failed.error, &mut budget).await?;
                }
            }
        }
    }

    async fn record(&self, lease: &Lease, record: Record) -> Result<(), Error> {
        self.apply(lease.saga_id, Guard::Lease(lease.token.as_uuid()), record)
            .await
    }

    async fn record_unleased(
        &self,
        id: SagaId,
        expected_version: u64,
        record: Record,
    ) -> Result<(), Error> {
        let version = i64::try_from(expected_version).unwrap_or(i64::MAX);
        self.apply(id, Guard::Version(version), record).await
    }

    async fn load(&self, id: SagaId) -> Result<Option<SagaSnapshot>, Error> {
        let uuid = id.as_uuid();
        let rows = self
            .inner
            .db
            .query(&self.inner.sql.load, &[("id", &uuid)])
            .await?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        match snapshot(row) {
            Ok(s) => Ok(Some(s)),
            Err(e) => Err(self.malformed(id, e).await?),
        }
    }

    async fn history(&self, id: SagaId) -> Result<Vec<HistoryEntry>, Error> {
        let uuid = id.as_uuid();
        let rows = self
            .inner
            .db
            .query(&self.inner.sql.history, &[("id", &uuid)])
            .await?;
        Ok(rows.iter().map(history_entry).collect::<Result<_, _>>()?)
    }

    async fn outbox_for(&self, id: SagaId) -> Result<Vec<OutboxMessage>, Error> {
        let uuid = id.as_uuid();
        let rows = self
            .inner
            .db
            .query(&self.inner.sql.outbox_for, &[("id", &uuid)])
            .await?;
        Ok(rows.iter().map(outbox_message).collect::<Result<_, _>>()?)
    }

    async fn due_unregistered(&self, kinds: &[SagaKind]) -> Result<Vec<(SagaKind, u64)>, Error> {
        let inner = &*self.inner;
        let (names, versions) = kind_arrays(kinds);
        let (names, versions) = (&names, &versions);
        let mut budget = inner.db.budget();
        let rows = inner
            .db
            .retrying("due_unregistered", &mut budget, |d| async move {
                let now = inner.clock.bind();
                inner
                    .db
                    .attempt(
                        d,
                        &inner.sql.due_unregistered,
                        &[("now", &now), ("names", names), ("versions", versions)],
                    )
                    .await
            })
            .await?;
        Ok(rows.iter().map(due_kind).collect::<Result<_, _>>()?)
    }

    async fn due_unmatched(
        &self,
        kinds: &[SagaKind],
        fingerprints: &[ShapeFingerprint],
    ) -> Result<Vec<(SagaKind, ShapeFingerprint, u64)>, Error> {
        let inner = &*self.inner;
        let (names, versions, fingerprints) = fingerprinted_kind_arrays(kinds, fingerprints);
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let (names, versions, fingerprints) = (&names, &versions, &fingerprints);
        let mut budget = inner.db.budget();
        let rows = inner
            .db
            .retrying("due_unmatched", &mut budget, |d| async move {
                let now = inner.clock.bind();
                inner
                    .db
                    .attempt(
                        d,
                        &inner.sql.due_unmatched,
                        &[
                            ("now", &now),
                            ("names", names),
                            ("versions", versions),
                            ("fingerprints", fingerprints),
                        ],
                    )
                    .await
            })
            .await?;
        Ok(rows
            .iter()
            .map(rows::due_unmatched)
            .collect::<Result<_, _>>()?)
    }

    async fn register_definition(&self, shape: &SagaShape) -> Result<ShapeFingerprint, Error> {
        let inner = &*self.inner;
        let fingerprint = shape.fingerprint();
        let json = serde_json::to_value(shape).map_err(|source| Error::SerializeState {
            saga: shape.kind.name.clone(),
            source,
        })?;
        let name = shape.kind.name.to_string();
        let version = to_i32(shape.kind.version);
        let bytes = fingerprint.as_bytes().to_vec();
        let (name, version, bytes, json) = (&name, &version, &bytes, &json);
        let mut budget = inner.db.budget();
        // Safe to repeat: a repeated insert finds the row it wrote.
        let stored = inner
            .db
            .retrying("register_definition", &mut budget, |d| async move {
                let now = inner.clock.bind();
                let mut rows = inner
                    .db
                    .attempt(
                        d,
                        &inner.sql.register_definition,
                        &[
                            ("name", name),
                            ("version", version),
                            ("fingerprint", bytes),
                            ("shape", json),
                            ("now", &now),
                        ],
                    )
                    .await?;
                if rows.is_empty() {
                    rows = inner
                        .db
                        .attempt(
                            d,
                            &inner.sql.stored_definition,
                            &[("name", name), ("version", version)],
                        )
                        .await?;
                }
                Ok(rows::stored_definition(only(&rows, "fingerprint")?)?)
            })
            .await;
        let (stored, stored_shape) = match stored {
            Ok(stored) => stored,
            Err(e) => return Err(self.not_migrated_or(e).await.into()),
        };
        if stored != fingerprint {
            return Err(Error::definition_changed(shape, stored, &stored_shape));
        }
        Ok(fingerprint)
    }
}

impl PgSagaStore {
    /// `error`, or [`PgError::NotMigrated`] if it is a missing table or
    /// column and the schema lacks a migration: an executor on a schema
    /// that was never migrated is told to run the migrations, at start.
    async fn not_migrated_or(&self, error: PgError) -> PgError {
        let missing = [SqlState::UNDEFINED_TABLE, SqlState::UNDEFINED_COLUMN];
        if !error.code().is_some_and(|c| missing.contains(c)) {
            return error;
        }
        match self.check_schema().await {
            Err(not_migrated @ PgError::NotMigrated { .. }) => not_migrated,
            _ => error,
        }
    }
}
