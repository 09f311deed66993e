//! The values a start and a transition bind, converted once and bound by
//! name.

use std::time::SystemTime;

use saga_core::store::{NewSaga, Record};
use saga_core::{Payload, Status, Timestamp};
use uuid::Uuid;

use crate::db::statement::Param;
use crate::schema::SchemaName;

/// Free text the engine wrote (a history row's error, a stuck reason),
/// with any NUL character, which PostgreSQL's `text` refuses (22P05),
/// written as the escape `\0`: a step's error message holding one must
/// not make its failure unrecordable.
fn storable_text(text: Option<&String>) -> Option<String> {
    text.map(|t| t.replace('\0', "\\0"))
}

pub(crate) fn to_i32(n: u32) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// The parameters of a start.
pub(crate) struct StartParams {
    pub(crate) id: Uuid,
    pub(crate) name: String,
    version: i32,
    pub(crate) key: String,
    digest: Vec<u8>,
    step: String,
    tid: Uuid,
    fingerprint: Vec<u8>,
}

impl StartParams {
    pub(crate) fn new(new: &NewSaga) -> Self {
        StartParams {
            id: new.id.as_uuid(),
            name: new.kind.name.to_string(),
            version: to_i32(new.kind.version),
            key: new.start_key.to_string(),
            digest: new.input_digest.to_vec(),
            step: new.first_step.to_string(),
            tid: new.history.transition_id.as_uuid(),
            fingerprint: new.fingerprint.as_bytes().to_vec(),
        }
    }

    pub(crate) fn bind<'a>(
        &'a self,
        now: &'a Option<SystemTime>,
        state: &'a serde_json::Value,
    ) -> [(&'static str, Param<'a>); 10] {
        [
            ("id", &self.id),
            ("name", &self.name),
            ("version", &self.version),
            ("key", &self.key),
            ("digest", &self.digest),
            ("step", &self.step),
            ("now", now),
            ("state", state),
            ("transition_id", &self.tid),
            ("fingerprint", &self.fingerprint),
        ]
    }

    pub(crate) fn bind_existing(&self) -> [(&'static str, Param<'_>); 2] {
        [("name", &self.name), ("key", &self.key)]
    }
}

/// A transition's new row values.
struct Row {
    status: &'static str,
    step: String,
    direction: &'static str,
    attempt: i32,
    first_attempt_at: Option<SystemTime>,
    next_run_at: Option<SystemTime>,
    state: Option<serde_json::Value>,
    stuck_reason: Option<String>,
}

/// A transition's history row.
struct History {
    step: String,
    direction: &'static str,
    attempt: i32,
    outcome: &'static str,
    error: Option<String>,
    from: Option<&'static str>,
    to: &'static str,
    started: SystemTime,
    finished: SystemTime,
}

/// A transition's outbox messages, one array per column.
#[derive(Default)]
struct Messages {
    ids: Vec<Uuid>,
    topics: Vec<String>,
    keys: Vec<Option<String>>,
    json: Vec<Option<serde_json::Value>>,
    bytes: Vec<Option<Vec<u8>>>,
    headers: Vec<serde_json::Value>,
    available: Vec<SystemTime>,
}

/// The parameters of a transition statement: the saga, its transition id,
/// the new row, its history row and its outbox messages, each group bound
/// by its names.
pub(crate) struct TransitionParams {
    transition_id: Uuid,
    row: Row,
    history: History,
    messages: Messages,
    channel: String,
}

impl TransitionParams {
    pub(crate) fn new(r: &Record, schema: &SchemaName) -> Self {
        let h = &r.history;
        let mut messages = Messages::default();
        for m in &r.outbox {
            messages.ids.push(m.id.as_uuid());
            messages.topics.push(m.topic.clone());
            messages.keys.push(m.key.clone());
            let (json, bytes) = match &m.payload {
                Payload::Json(v) => (Some(v.clone()), None),
                Payload::Bytes(b) => (None, Some(b.clone())),
            };
            messages.json.push(json);
            messages.bytes.push(bytes);
            messages.headers.push(serde_json::Value::Object(
                m.headers
                    .iter()
                    .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                    .collect(),
            ));
            messages.available.push(m.available_at.to_system_time());
        }
        TransitionParams {
            transition_id: r.transition_id.as_uuid(),
            row: Row {
                status: r.status.as_str(),
                step: r.step.to_string(),
                direction: r.direction.as_str(),
                attempt: to_i32(r.attempt),
                first_attempt_at: r.first_attempt_at.map(Timestamp::to_system_time),
                next_run_at: r.next_run_at.map(Timestamp::to_system_time),
                state: r.state.clone(),
                stuck_reason: storable_text(r.stuck_reason.as_ref()),
            },
            history: History {
                step: h.step.to_string(),
                direction: h.direction.as_str(),
                attempt: to_i32(h.attempt),
                outcome: h.outcome.as_str(),
                error: storable_text(h.error.as_ref()),
                from: h.from_status.map(Status::as_str),
                to: h.to_status.as_str(),
                started: h.started_at.to_system_time(),
                finished: h.finished_at.to_system_time(),
            },
            messages,
            channel: schema.outbox_channel(),
        }
    }

    /// Every parameter, by name; `guard` is `("lease_token", token)` or
    /// `("expected_version", version)`.
    pub(crate) fn bind<'a>(
        &'a self,
        saga_id: &'a Uuid,
        guard: (&'static str, Param<'a>),
        now: &'a Option<SystemTime>,
    ) -> Vec<(&'static str, Param<'a>)> {
        let (r, h, m) = (&self.row, &self.history, &self.messages);
        vec![
            ("saga_id", saga_id),
            ("transition_id", &self.transition_id),
            guard,
            ("now", now),
            ("status", &r.status),
            ("step", &r.step),
            ("direction", &r.direction),
            ("attempt", &r.attempt),
            ("first_attempt_at", &r.first_attempt_at),
            ("next_run_at", &r.next_run_at),
            ("state", &r.state),
            ("stuck_reason", &r.stuck_reason),
            ("h_step", &h.step),
            ("h_direction", &h.direction),
            ("h_attempt", &h.attempt),
            ("h_outcome", &h.outcome),
            ("h_error", &h.error),
            ("h_from", &h.from),
            ("h_to", &h.to),
            ("h_started", &h.started),
            ("h_finished", &h.finished),
            ("m_ids", &m.ids),
            ("m_topics", &m.topics),
            ("m_keys", &m.keys),
            ("m_json", &m.json),
            ("m_bytes", &m.bytes),
            ("m_headers", &m.headers),
            ("m_available", &m.available),
            ("channel", &self.channel),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nul_in_free_text_is_escaped_and_nothing_else_changes() {
        let cases = [
            ("plain", "plain"),
            ("a\0b", "a\\0b"),
            ("\0\0", "\\0\\0"),
            ("tab\tok", "tab\tok"),
        ];
        for (given, stored) in cases {
            assert_eq!(
                storable_text(Some(&given.to_owned())).as_deref(),
                Some(stored),
                "{given:?}"
            );
        }
        assert_eq!(storable_text(None), None);
    }
}
