//! The saga store's SQL, rendered once per schema.
//!
//! Every statement reads the time as [`NOW`]: the server's `now()`, unless
//! a test injected a clock (see [`crate::db::clock`]). Durations travel as
//! whole microseconds (`$lease_for_us`).

use crate::db::clock::{NOW, server_time};
use crate::db::statement::Statement;
use crate::schema::SchemaName;
use crate::tags;

/// The largest attempt count a row may hold (the check constraint
/// `saga_instances_attempt_bound`, migration 6). A claim never counts past
/// it: a row found at it is leased without counting and flagged
/// `unclaimable`, and the store parks it by itself.
pub(crate) const ATTEMPT_BOUND: i32 = 1_000_000;

/// What a claim returns for each row (read by
/// [`claimed`](super::rows::claimed)).
const CLAIMED_COLUMNS: &str = "i.id, i.lease_token, i.lease_expires_at, i.saga_name, \
    i.saga_version, i.status, i.step, i.direction, i.attempt, i.first_attempt_at, i.state";

const SNAPSHOT_COLUMNS: &str = "id, saga_name, saga_version, start_key, status, step, direction, \
    attempt, first_attempt_at, next_run_at, state, stuck_reason, lease_owner, lease_expires_at, \
    version, created_at, updated_at";

/// The parameters of a transition, `$1` first: the saga id and the
/// transition id at the positions [`tags`] documents, then the guard
/// (`lease_token` or `expected_version`, by statement), the time, the new
/// row, the history row and the outbox messages (one array per column).
const fn transition_params(guard: &'static str) -> [&'static str; 29] {
    [
        "saga_id",
        "transition_id",
        guard,
        "now",
        "status",
        "step",
        "direction",
        "attempt",
        "first_attempt_at",
        "next_run_at",
        "state",
        "stuck_reason",
        "h_step",
        "h_direction",
        "h_attempt",
        "h_outcome",
        "h_error",
        "h_from",
        "h_to",
        "h_started",
        "h_finished",
        "m_ids",
        "m_topics",
        "m_keys",
        "m_json",
        "m_bytes",
        "m_headers",
        "m_available",
        "channel",
    ]
}

const RECORD_LEASED_PARAMS: [&str; 29] = transition_params("lease_token");
const RECORD_UNLEASED_PARAMS: [&str; 29] = transition_params("expected_version");

/// Every statement of the saga store.
#[derive(Debug)]
pub(crate) struct Sql {
    pub(crate) server_time: Statement,
    pub(crate) start: Statement,
    pub(crate) start_existing: Statement,
    pub(crate) claim: Statement,
    pub(crate) claimed_by: Statement,
    pub(crate) park_malformed: Statement,
    pub(crate) heartbeat: Statement,
    pub(crate) release: Statement,
    pub(crate) record_leased: Statement,
    pub(crate) record_unleased: Statement,
    pub(crate) transition_exists: Statement,
    pub(crate) current: Statement,
    pub(crate) load: Statement,
    pub(crate) load_raw: Statement,
    pub(crate) history: Statement,
    pub(crate) outbox_for: Statement,
    pub(crate) due_unregistered: Statement,
    pub(crate) due_unmatched: Statement,
    pub(crate) register_definition: Statement,
    pub(crate) stored_definition: Statement,
}

impl Sql {
    pub(crate) fn new(schema: &SchemaName) -> Self {
        let s = schema.quoted();
        // The common tail of a transition: history row, outbox rows, one
        // notification for the whole transaction if anything was enqueued.
        let transition_tail = format!(
            "hist AS (
                INSERT INTO {s}.saga_history (transition_id, saga_id, step, direction, attempt,
                    outcome, error, from_status, to_status, started_at, finished_at)
                SELECT $transition_id::uuid, id, $h_step::text, $h_direction::text,
                    $h_attempt::int4, $h_outcome::text, $h_error::text, $h_from::text,
                    $h_to::text, $h_started::timestamptz, $h_finished::timestamptz
                FROM upd
            ),
            ob AS (
                INSERT INTO {s}.outbox (id, topic, key, payload_json, payload_bytes, headers,
                    saga_id, created_at, available_at)
                SELECT m.id, m.topic, m.key, m.payload_json, m.payload_bytes, m.headers, upd.id,
                    {NOW}, m.available_at
                FROM upd, unnest($m_ids::uuid[], $m_topics::text[], $m_keys::text[],
                    $m_json::jsonb[], $m_bytes::bytea[], $m_headers::jsonb[],
                    $m_available::timestamptz[])
                    AS m(id, topic, key, payload_json, payload_bytes, headers, available_at)
                ON CONFLICT (id) DO NOTHING
                RETURNING 1
            ),
            notified AS (
                SELECT pg_notify($channel::text, '') FROM (SELECT 1 FROM ob LIMIT 1) AS one
            )
            SELECT (SELECT count(*) FROM upd) AS updated, (SELECT count(*) FROM notified) AS notified"
        );
        let set_transition = format!(
            "status = $status::text, step = $step::text, direction = $direction::text,
                attempt = $attempt::int4, first_attempt_at = $first_attempt_at::timestamptz,
                next_run_at = $next_run_at::timestamptz, state = coalesce($state::jsonb, state),
                stuck_reason = $stuck_reason::text, lease_owner = NULL, lease_token = NULL,
                lease_expires_at = NULL, version = version + 1, updated_at = {NOW}"
        );
        // A transition names the saga id before the transition id, so that
        // they are `$1` and `$2` (see `tags`).
        let transition = |guard: &str| {
            format!(
                "{tag}
                WITH upd AS (
                    UPDATE {s}.saga_instances SET {set_transition}
                    WHERE id = $saga_id::uuid AND {guard}
                    RETURNING id
                ),
                {transition_tail}",
                tag = tags::TRANSITION,
            )
        };
        Sql {
            server_time: server_time(),
            start: Statement::new(
                "start",
                &format!(
                    "WITH ins AS (
                        INSERT INTO {s}.saga_instances (id, saga_name, saga_version, start_key,
                            input_digest, status, step, direction, attempt, next_run_at, state,
                            version, created_at, updated_at, definition_fingerprint)
                        VALUES ($id::uuid, $name::text, $version::int4, $key::text,
                            $digest::bytea, 'running', $step::text, 'forward', 0, {NOW},
                            $state::jsonb, 1, {NOW}, {NOW}, $fingerprint::bytea)
                        ON CONFLICT ON CONSTRAINT saga_instances_start_key DO NOTHING
                        RETURNING id, input_digest, saga_name, saga_version
                    ),
                    hist AS (
                        INSERT INTO {s}.saga_history (transition_id, saga_id, step, direction,
                            attempt, outcome, error, from_status, to_status, started_at,
                            finished_at)
                        SELECT $transition_id::uuid, id, $step::text, 'forward', 0, 'created',
                            NULL, NULL, 'running', {NOW}, {NOW}
                        FROM ins
                    )
                    SELECT id, input_digest, saga_name, saga_version FROM ins"
                ),
                &[
                    "id",
                    "name",
                    "version",
                    "key",
                    "digest",
                    "step",
                    "now",
                    "state",
                    "transition_id",
                    "fingerprint",
                ],
            ),
            start_existing: Statement::new(
                "start_existing",
                &format!(
                    "SELECT id, input_digest, saga_name, saga_version FROM {s}.saga_instances
                     WHERE saga_name = $name::text AND start_key = $key::text"
                ),
                &["name", "key"],
            ),
            // Per kind, the oldest due rows through `saga_instances_due
            // (saga_name, saga_version, next_run_at)`, so that due rows of
            // kinds not asked for are never walked; then the oldest of
            // those. A row started under another definition shape is
            // skipped (left for a worker whose shape matches); one with no
            // recorded shape (from before 0005) is claimed. Rows locked by a kind's subquery but cut by the outer
            // limit stay locked (not leased) until the statement ends.
            claim: Statement::new(
                "claim",
                &format!(
                    "WITH due AS (
                        SELECT c.id, c.due_at, c.attempt AS prior_attempt
                        FROM unnest($names::text[], $versions::int4[], $fingerprints::bytea[])
                            AS k(name, version, fingerprint)
                        CROSS JOIN LATERAL (
                            SELECT i.id, i.next_run_at AS due_at, i.attempt
                            FROM {s}.saga_instances i
                            WHERE i.saga_name = k.name AND i.saga_version = k.version
                              AND (i.definition_fingerprint IS NULL
                                   OR i.definition_fingerprint = k.fingerprint)
                              AND i.status IN ('running', 'compensating')
                              AND i.next_run_at <= {NOW}
                              AND (i.lease_expires_at IS NULL OR i.lease_expires_at <= {NOW})
                            ORDER BY i.next_run_at
                            LIMIT $limit::int8
                            FOR UPDATE OF i SKIP LOCKED
                        ) AS c
                        ORDER BY c.due_at
                        LIMIT $limit::int8
                    )
                    UPDATE {s}.saga_instances i SET
                        lease_owner = $worker::uuid,
                        lease_token = gen_random_uuid(),
                        lease_expires_at = {NOW} + $lease_for_us::int8 * interval '1 microsecond',
                        next_run_at = {NOW} + $lease_for_us::int8 * interval '1 microsecond',
                        claim_id = $claim_id::uuid,
                        attempt = CASE WHEN i.attempt < {ATTEMPT_BOUND} THEN i.attempt + 1
                            ELSE i.attempt END,
                        first_attempt_at = coalesce(i.first_attempt_at, {NOW}),
                        version = i.version + 1,
                        updated_at = {NOW}
                    FROM due
                    WHERE i.id = due.id
                    RETURNING {CLAIMED_COLUMNS}, due.due_at,
                        due.prior_attempt >= {ATTEMPT_BOUND} AS unclaimable"
                ),
                &[
                    "now",
                    "worker",
                    "limit",
                    "names",
                    "versions",
                    "fingerprints",
                    "lease_for_us",
                    "claim_id",
                ],
            ),
            // The rows a claim whose reply was lost leased, still under its
            // lease: found through the due index by kind and lease expiry
            // (the leased rows' `next_run_at`, which lies between now and
            // now plus the lease, since the claim was made before now),
            // then by claim id. The due time they had is gone; they are
            // ordered by id. Whether a row was at the attempt bound before
            // the claim is gone too: a row found at it is taken to be.
            claimed_by: Statement::new(
                "claimed_by",
                &format!(
                    "SELECT {CLAIMED_COLUMNS}, NULL::timestamptz AS due_at,
                        i.attempt >= {ATTEMPT_BOUND} AS unclaimable
                     FROM unnest($names::text[], $versions::int4[]) AS k(name, version)
                     JOIN {s}.saga_instances i
                       ON i.saga_name = k.name AND i.saga_version = k.version
                     WHERE i.status IN ('running', 'compensating')
                       AND i.next_run_at > {NOW}
                       AND i.next_run_at <= {NOW} + $lease_for_us::int8 * interval '1 microsecond'
                       AND i.claim_id = $claim_id::uuid
                       AND i.lease_owner = $worker::uuid
                       AND i.lease_expires_at > {NOW}"
                ),
                &[
                    "names",
                    "versions",
                    "lease_for_us",
                    "claim_id",
                    "worker",
                    "now",
                ],
            ),
            // A claimed row that cannot be read, or that no claim can count
            // another attempt of: parked for an operator,
            // under the lease the claim just took. The history row takes
            // the row's own text, malformed or not.
            park_malformed: Statement::new(
                "park_malformed",
                &format!(
                    "WITH upd AS (
                        UPDATE {s}.saga_instances
                        SET status = 'stuck', stuck_reason = $reason::text, next_run_at = NULL,
                            lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL,
                            version = version + 1, updated_at = {NOW}
                        WHERE id = $id::uuid AND lease_token = $token::uuid
                        RETURNING id
                    )
                    INSERT INTO {s}.saga_history (transition_id, saga_id, step, direction,
                        attempt, outcome, error, from_status, to_status, started_at,
                        finished_at)
                    SELECT $transition_id::uuid, id, $step::text, $direction::text,
                        $attempt::int4, 'parked', $reason::text, $status::text, 'stuck',
                        {NOW}, {NOW}
                    FROM upd"
                ),
                &[
                    "id",
                    "token",
                    "reason",
                    "now",
                    "transition_id",
                    "step",
                    "direction",
                    "attempt",
                    "status",
                ],
            ),
            heartbeat: Statement::new(
                "heartbeat",
                &format!(
                    "UPDATE {s}.saga_instances
                     SET lease_expires_at = {NOW} + $lease_for_us::int8 * interval '1 microsecond',
                         next_run_at = {NOW} + $lease_for_us::int8 * interval '1 microsecond'
                     WHERE id = $id::uuid AND lease_token = $token::uuid
                       AND lease_expires_at > {NOW}
                     RETURNING lease_expires_at"
                ),
                &["id", "token", "lease_for_us", "now"],
            ),
            release: Statement::new(
                "release",
                &format!(
                    "UPDATE {s}.saga_instances
                     SET lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL,
                         attempt = greatest(attempt - 1, 0),
                         first_attempt_at = CASE WHEN attempt <= 1 THEN NULL
                             ELSE first_attempt_at END,
                         next_run_at = {NOW}, version = version + 1, updated_at = {NOW}
                     WHERE id = $id::uuid AND lease_token = $token::uuid
                       AND lease_expires_at > {NOW}
                     RETURNING id"
                ),
                &["id", "token", "now"],
            ),
            record_leased: Statement::new(
                "record_leased",
                &transition(&format!(
                    "lease_token = $lease_token::uuid AND lease_expires_at > {NOW}"
                )),
                &RECORD_LEASED_PARAMS,
            ),
            record_unleased: Statement::new(
                "record_unleased",
                &transition(&format!(
                    "version = $expected_version::int8
                      AND (lease_expires_at IS NULL OR lease_expires_at <= {NOW})"
                )),
                &RECORD_UNLEASED_PARAMS,
            ),
            transition_exists: Statement::new(
                "transition_exists",
                &format!(
                    "SELECT EXISTS (SELECT 1 FROM {s}.saga_history
                     WHERE transition_id = $transition_id::uuid) AS found"
                ),
                &["transition_id"],
            ),
            current: Statement::new(
                "current",
                &format!(
                    "SELECT lease_token, lease_expires_at, version FROM {s}.saga_instances
                     WHERE id = $id::uuid"
                ),
                &["id"],
            ),
            load: Statement::new(
                "load",
                &format!("SELECT {SNAPSHOT_COLUMNS} FROM {s}.saga_instances WHERE id = $id::uuid"),
                &["id"],
            ),
            // A row that `load` cannot read: every column as text, for
            // an operator to see.
            load_raw: Statement::new(
                "load_raw",
                &format!(
                    "SELECT c.key AS column_name, c.value AS value
                     FROM {s}.saga_instances i, jsonb_each_text(to_jsonb(i)) AS c
                     WHERE i.id = $id::uuid
                     ORDER BY c.key"
                ),
                &["id"],
            ),
            history: Statement::new(
                "history",
                &format!(
                    "SELECT transition_id, step, direction, attempt, outcome, error, from_status,
                        to_status, started_at, finished_at
                     FROM {s}.saga_history WHERE saga_id = $id::uuid ORDER BY seq"
                ),
                &["id"],
            ),
            outbox_for: Statement::new(
                "outbox_for",
                &format!(
                    "SELECT id, topic, key, payload_json, payload_bytes, headers, available_at
                     FROM {s}.outbox WHERE saga_id = $id::uuid ORDER BY seq"
                ),
                &["id"],
            ),
            due_unregistered: Statement::new(
                "due_unregistered",
                &format!(
                    "SELECT i.saga_name, i.saga_version, count(*) AS due
                     FROM {s}.saga_instances i
                     WHERE i.status IN ('running', 'compensating')
                       AND i.next_run_at <= {NOW}
                       AND NOT EXISTS (
                           SELECT 1 FROM unnest($names::text[], $versions::int4[])
                               AS k(name, version)
                           WHERE k.name = i.saga_name AND k.version = i.saga_version)
                     GROUP BY i.saga_name, i.saga_version
                     ORDER BY i.saga_name, i.saga_version"
                ),
                &["now", "names", "versions"],
            ),
            due_unmatched: Statement::new(
                "due_unmatched",
                &format!(
                    "SELECT i.saga_name, i.saga_version, i.definition_fingerprint AS fingerprint,
                        count(*) AS due
                     FROM unnest($names::text[], $versions::int4[], $fingerprints::bytea[])
                         AS k(name, version, fingerprint)
                     JOIN {s}.saga_instances i
                       ON i.saga_name = k.name AND i.saga_version = k.version
                     WHERE i.status IN ('running', 'compensating')
                       AND i.next_run_at <= {NOW}
                       AND i.definition_fingerprint IS NOT NULL
                       AND i.definition_fingerprint <> k.fingerprint
                     GROUP BY i.saga_name, i.saga_version, i.definition_fingerprint
                     ORDER BY i.saga_name, i.saga_version, i.definition_fingerprint"
                ),
                &["now", "names", "versions", "fingerprints"],
            ),
            // The first registration of a name and version wins; a later
            // one reads what is stored (in a statement of its own, which
            // sees a row a concurrent registration committed meanwhile).
            register_definition: Statement::new(
                "register_definition",
                &format!(
                    "INSERT INTO {s}.saga_definitions (saga_name, saga_version, fingerprint,
                        shape, registered_at)
                     VALUES ($name::text, $version::int4, $fingerprint::bytea, $shape::jsonb,
                        {NOW})
                     ON CONFLICT (saga_name, saga_version) DO NOTHING
                     RETURNING fingerprint, shape"
                ),
                &["name", "version", "fingerprint", "shape", "now"],
            ),
            stored_definition: Statement::new(
                "stored_definition",
                &format!(
                    "SELECT fingerprint, shape FROM {s}.saga_definitions
                     WHERE saga_name = $name::text AND saga_version = $version::int4"
                ),
                &["name", "version"],
            ),
        }
    }

    /// Every statement, for the crate's statement tests.
    pub(crate) fn all(&self) -> Vec<&Statement> {
        vec![
            &self.server_time,
            &self.start,
            &self.start_existing,
            &self.claim,
            &self.claimed_by,
            &self.park_malformed,
            &self.heartbeat,
            &self.release,
            &self.record_leased,
            &self.record_unleased,
            &self.transition_exists,
            &self.current,
            &self.load,
            &self.load_raw,
            &self.history,
            &self.outbox_for,
            &self.due_unregistered,
            &self.due_unmatched,
            &self.register_definition,
            &self.stored_definition,
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::ATTEMPT_BOUND;

    #[test]
    fn the_claims_attempt_bound_is_the_schemas() {
        let migration = include_str!("../../migrations/0006_attempt_bound.sql");
        assert!(migration.contains(&format!("CHECK (attempt <= {ATTEMPT_BOUND})")));
        assert!(migration.contains(&format!("SET attempt = {ATTEMPT_BOUND} WHERE")));
    }
}
