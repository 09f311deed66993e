//! Reading the saga store's rows back, by column name.

use std::collections::BTreeMap;
use std::time::SystemTime;

use saga_core::store::{ClaimedSaga, Lease};
use saga_core::{
    Direction, HistoryEntry, LeaseToken, MessageId, OutboxMessage, Payload, SagaId, SagaKind,
    SagaName, SagaSnapshot, StartKey, Status, StepName, TransitionId, WorkerId,
};
use tokio_postgres::Row;
use uuid::Uuid;

use crate::db::rows::{col, corrupt, count, count64, parse, parsed, time, time_opt};
use crate::error::PgError;
use saga_core::ShapeFingerprint;

fn kind(row: &Row) -> Result<SagaKind, PgError> {
    Ok(SagaKind {
        name: parsed::<SagaName>(row, "saga_name")?,
        version: count(row, "saga_version")?,
    })
}

fn saga_id(row: &Row, name: &'static str) -> Result<SagaId, PgError> {
    Ok(SagaId::from_uuid(col(row, name)?))
}

pub(crate) fn snapshot(row: &Row) -> Result<SagaSnapshot, PgError> {
    let lease_owner: Option<Uuid> = col(row, "lease_owner")?;
    let lease_expires = time_opt(row, "lease_expires_at")?;
    Ok(SagaSnapshot {
        id: saga_id(row, "id")?,
        kind: kind(row)?,
        start_key: StartKey::new(col::<&str>(row, "start_key")?)
            .map_err(|e| corrupt("start_key", e))?,
        status: parsed::<Status>(row, "status")?,
        step: parsed::<StepName>(row, "step")?,
        direction: parsed::<Direction>(row, "direction")?,
        attempt: count(row, "attempt")?,
        first_attempt_at: time_opt(row, "first_attempt_at")?,
        next_run_at: time_opt(row, "next_run_at")?,
        state: col(row, "state")?,
        stuck_reason: col(row, "stuck_reason")?,
        lease: lease_owner
            .zip(lease_expires)
            .map(|(o, e)| (WorkerId::from_uuid(o), e)),
        version: count64(row, "version")?,
        created_at: time(row, "created_at")?,
        updated_at: time(row, "updated_at")?,
    })
}

/// Reads a claimed row: its columns (see the claim statement), then the
/// due time it had (`due_at`, unknown for rows found again after a lost
/// reply).
pub(crate) fn claimed(row: &Row) -> Result<(Option<SystemTime>, ClaimedSaga), PgError> {
    let id = saga_id(row, "id")?;
    Ok((
        col(row, "due_at")?,
        ClaimedSaga {
            lease: Lease {
                saga_id: id,
                token: LeaseToken::from_uuid(col(row, "lease_token")?),
                expires_at: time(row, "lease_expires_at")?,
            },
            kind: kind(row)?,
            status: parsed::<Status>(row, "status")?,
            step: parsed::<StepName>(row, "step")?,
            direction: parsed::<Direction>(row, "direction")?,
            attempt: count(row, "attempt")?,
            first_attempt_at: time(row, "first_attempt_at")?,
            state: col(row, "state")?,
        },
    ))
}

/// The raw text of a claimed row that could not be read, to park it.
pub(crate) struct Unreadable<'a> {
    pub(crate) id: Uuid,
    pub(crate) token: Uuid,
    pub(crate) step: &'a str,
    pub(crate) direction: &'a str,
    pub(crate) attempt: i32,
    pub(crate) status: &'a str,
}

pub(crate) fn unreadable(row: &Row) -> Result<Unreadable<'_>, PgError> {
    Ok(Unreadable {
        id: col(row, "id")?,
        token: col(row, "lease_token")?,
        step: col(row, "step")?,
        direction: col(row, "direction")?,
        attempt: col(row, "attempt")?,
        status: col(row, "status")?,
    })
}

pub(crate) fn history_entry(row: &Row) -> Result<HistoryEntry, PgError> {
    Ok(HistoryEntry {
        transition_id: TransitionId::from_uuid(col(row, "transition_id")?),
        step: parsed::<StepName>(row, "step")?,
        direction: parsed::<Direction>(row, "direction")?,
        attempt: count(row, "attempt")?,
        outcome: parsed(row, "outcome")?,
        error: col(row, "error")?,
        from_status: col::<Option<&str>>(row, "from_status")?
            .map(|s| parse("from_status", s))
            .transpose()?,
        to_status: parsed(row, "to_status")?,
        started_at: time(row, "started_at")?,
        finished_at: time(row, "finished_at")?,
    })
}

/// Reads an outbox row (`id, topic, key, payload_json, payload_bytes,
/// headers, available_at`).
pub(crate) fn outbox_message(row: &Row) -> Result<OutboxMessage, PgError> {
    let json: Option<serde_json::Value> = col(row, "payload_json")?;
    let bytes: Option<Vec<u8>> = col(row, "payload_bytes")?;
    let payload = match (json, bytes) {
        (Some(v), None) => Payload::Json(v),
        (None, Some(b)) => Payload::Bytes(b),
        _ => {
            return Err(corrupt(
                "payload_json",
                "exactly one of payload_json and payload_bytes must be set",
            ));
        }
    };
    let headers: BTreeMap<String, String> =
        serde_json::from_value(col(row, "headers")?).map_err(|e| corrupt("headers", e))?;
    Ok(OutboxMessage {
        id: MessageId::from_uuid(col(row, "id")?),
        topic: col(row, "topic")?,
        key: col(row, "key")?,
        payload,
        headers,
        available_at: time(row, "available_at")?,
    })
}

/// A row of `due_unregistered`.
pub(crate) fn due_kind(row: &Row) -> Result<(SagaKind, u64), PgError> {
    Ok((kind(row)?, count64(row, "due")?))
}

/// A stored fingerprint: 32 bytes.
fn fingerprint(row: &Row, what: &'static str) -> Result<ShapeFingerprint, PgError> {
    let bytes: Vec<u8> = col(row, what)?;
    let bytes: [u8; 32] = bytes
        .try_into()
        .map_err(|b: Vec<u8>| corrupt(what, format!("{} bytes, not 32", b.len())))?;
    Ok(ShapeFingerprint::from_bytes(bytes))
}

/// A row of `due_unmatched`.
pub(crate) fn due_unmatched(row: &Row) -> Result<(SagaKind, ShapeFingerprint, u64), PgError> {
    Ok((
        kind(row)?,
        fingerprint(row, "fingerprint")?,
        count64(row, "due")?,
    ))
}

/// A row of `saga_definitions`: the stored fingerprint and shape.
pub(crate) fn stored_definition(
    row: &Row,
) -> Result<(ShapeFingerprint, serde_json::Value), PgError> {
    Ok((fingerprint(row, "fingerprint")?, col(row, "shape")?))
}

/// The row found under a start key: its id, input digest and kind.
pub(crate) struct StartWinner {
    pub(crate) id: Uuid,
    pub(crate) digest: Vec<u8>,
    pub(crate) kind: SagaKind,
}

pub(crate) fn start_winner(row: &Row) -> Result<StartWinner, PgError> {
    Ok(StartWinner {
        id: col(row, "id")?,
        digest: col(row, "input_digest")?,
        kind: kind(row)?,
    })
}
