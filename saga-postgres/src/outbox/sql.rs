//! The outbox's SQL, rendered once per schema.

use crate::schema::SchemaName;

/// Columns read back for a claimed message, in this order: `id, topic, key,
/// payload_json, payload_bytes, headers, due_at, created_at, attempts,
/// saga_id, abandoned, first_attempt_at`.
#[derive(Debug)]
pub(crate) struct OutboxSql {
    pub(crate) channel: String,
    pub(crate) enqueue: String,
    pub(crate) claim_unordered: String,
    pub(crate) claim_by_key: String,
    pub(crate) settle: String,
    pub(crate) dead_letters: String,
    pub(crate) redrive_one: String,
    pub(crate) redrive_all: String,
    pub(crate) purge_one: String,
    pub(crate) purge_all: String,
    pub(crate) stats: String,
}

/// Builds the claim statement; `head_of_key` restricts it to the oldest
/// non-dead message of each key, and only while no message of its key is
/// in flight (per-key ordering).
fn claim(s: &str, head_of_key: bool) -> String {
    let head = if head_of_key {
        // Only the head of its key: no older message of the same key that is
        // not dead, whether due, leased or waiting for a retry. And none of
        // its key in flight (leased, lease not expired), even a younger one:
        // a dead letter redriven, or a transaction with a lower `seq` that
        // committed late, waits until the key's message being published is
        // settled.
        format!(
            "AND (o.key IS NULL OR (
                NOT EXISTS (
                    SELECT 1 FROM {s}.outbox p
                    WHERE p.key = o.key AND p.dead_at IS NULL AND p.seq < o.seq)
                AND NOT EXISTS (
                    SELECT 1 FROM {s}.outbox f
                    WHERE f.key = o.key AND f.lease_token IS NOT NULL
                        AND f.lease_expires_at > $1::timestamptz)))"
        )
    } else {
        String::new()
    };
    // $1 now, $2 limit, $3 lease token, $4 lease expiry, $5 max attempts.
    //
    // Leased rows have `available_at` = lease expiry, so the partial index
    // `outbox_pending` yields due, unleased rows only. A row still carrying
    // a lease token was claimed and never settled (its dispatcher died or
    // hung); past the attempt budget it is dead-lettered here instead of
    // being claimed again, so a message that kills its dispatcher cannot
    // loop forever.
    //
    // The first claim since the enqueue (or the last redrive) records when
    // the message became due (`pending_since`, from `available_at` before it
    // moves to the lease expiry) and when it was first attempted
    // (`first_attempt_at`, from which the retry policy's elapsed time counts).
    format!(
        "WITH due AS (
            SELECT o.id, o.available_at AS due_at,
                (o.lease_token IS NOT NULL AND o.attempts >= $5::int4) AS abandoned
            FROM {s}.outbox o
            WHERE o.dead_at IS NULL AND o.available_at <= $1::timestamptz
            {head}
            ORDER BY o.available_at, o.seq
            LIMIT $2::int8
            FOR UPDATE OF o SKIP LOCKED
        )
        UPDATE {s}.outbox o SET
            attempts = o.attempts + CASE WHEN due.abandoned THEN 0 ELSE 1 END,
            lease_token = CASE WHEN due.abandoned THEN NULL ELSE $3::uuid END,
            lease_expires_at = CASE WHEN due.abandoned THEN NULL ELSE $4::timestamptz END,
            available_at = CASE WHEN due.abandoned THEN o.available_at ELSE $4::timestamptz END,
            dead_at = CASE WHEN due.abandoned THEN $1::timestamptz END,
            first_attempt_at = coalesce(o.first_attempt_at, $1::timestamptz),
            pending_since = coalesce(o.pending_since, o.available_at),
            last_error = CASE WHEN due.abandoned
                THEN 'abandoned: claimed ' || o.attempts || ' times without a recorded result '
                    || '(the dispatcher crashed, hung, or lost its database connection while '
                    || 'publishing)' || coalesce('; last error: ' || o.last_error, '')
                ELSE o.last_error END
        FROM due
        WHERE o.id = due.id
        RETURNING o.id, o.topic, o.key, o.payload_json, o.payload_bytes, o.headers, due.due_at,
            o.created_at, o.attempts, o.saga_id, due.abandoned, o.first_attempt_at"
    )
}

/// `WITH <cte> AS (...)` followed by this tail notifies `channel` (`$n`) once
/// if `<cte>` returned any row, and returns the row count.
fn count_and_notify(cte: &str, channel_param: u8) -> String {
    format!(
        "notified AS (
            SELECT pg_notify(${channel_param}::text, '') FROM (SELECT 1 FROM {cte} LIMIT 1) AS one
        )
        SELECT (SELECT count(*) FROM {cte}), (SELECT count(*) FROM notified)"
    )
}

impl OutboxSql {
    pub(crate) fn new(schema: &SchemaName) -> Self {
        let s = schema.quoted();
        let message_columns = "id, topic, key, payload_json, payload_bytes, headers, available_at, \
            created_at, attempts, saga_id, last_error, dead_at";
        OutboxSql {
            channel: schema.outbox_channel(),
            // $1..$7 arrays (id, topic, key, json, bytes, headers,
            // available_at), $8 created_at, $9 channel. Idempotent on the id.
            enqueue: format!(
                "WITH ins AS (
                    INSERT INTO {s}.outbox (id, topic, key, payload_json, payload_bytes, headers,
                        created_at, available_at)
                    SELECT m.id, m.topic, m.key, m.payload_json, m.payload_bytes, m.headers,
                        $8::timestamptz, m.available_at
                    FROM unnest($1::uuid[], $2::text[], $3::text[], $4::jsonb[], $5::bytea[],
                        $6::jsonb[], $7::timestamptz[]) WITH ORDINALITY
                        AS m(id, topic, key, payload_json, payload_bytes, headers, available_at, ord)
                    ORDER BY m.ord
                    ON CONFLICT (id) DO NOTHING
                    RETURNING 1
                ),
                {}",
                count_and_notify("ins", 9)
            ),
            claim_unordered: claim(&s, false),
            claim_by_key: claim(&s, true),
            // $1 published ids, $2 lease token, $3 now, $4..$6 failed (id,
            // error, retry_at; NULL retry_at: dead-letter). Both halves are
            // guarded by the lease token, so a dispatcher whose lease was
            // taken over changes nothing, and repeating the statement after
            // a lost connection is harmless.
            settle: format!(
                "WITH done AS (
                    DELETE FROM {s}.outbox
                    WHERE id = ANY($1::uuid[]) AND lease_token = $2::uuid
                    RETURNING 1
                ),
                failed AS (
                    UPDATE {s}.outbox o SET
                        last_error = f.error,
                        lease_token = NULL,
                        lease_expires_at = NULL,
                        available_at = coalesce(f.retry_at, o.available_at),
                        dead_at = CASE WHEN f.retry_at IS NULL THEN $3::timestamptz END
                    FROM unnest($4::uuid[], $5::text[], $6::timestamptz[]) AS f(id, error, retry_at)
                    WHERE o.id = f.id AND o.lease_token = $2::uuid
                    RETURNING f.retry_at IS NULL AS dead
                )
                SELECT (SELECT count(*) FROM done),
                    (SELECT count(*) FROM failed WHERE NOT dead),
                    (SELECT count(*) FROM failed WHERE dead)"
            ),
            // $1/$2 cursor (dead_at, id) or NULLs, $3 limit.
            dead_letters: format!(
                "SELECT {message_columns} FROM {s}.outbox
                 WHERE dead_at IS NOT NULL
                   AND ($1::timestamptz IS NULL OR (dead_at, id) > ($1::timestamptz, $2::uuid))
                 ORDER BY dead_at, id
                 LIMIT $3::int8"
            ),
            // $1 id, $2 now, $3 channel.
            redrive_one: format!(
                "WITH r AS (
                    UPDATE {s}.outbox SET dead_at = NULL, attempts = 0, available_at = $2::timestamptz,
                        lease_token = NULL, lease_expires_at = NULL,
                        first_attempt_at = NULL, pending_since = NULL
                    WHERE id = $1::uuid AND dead_at IS NOT NULL
                    RETURNING 1
                ),
                {}",
                count_and_notify("r", 3)
            ),
            // $1 topic or NULL, $2 now, $3 channel.
            redrive_all: format!(
                "WITH r AS (
                    UPDATE {s}.outbox SET dead_at = NULL, attempts = 0, available_at = $2::timestamptz,
                        lease_token = NULL, lease_expires_at = NULL,
                        first_attempt_at = NULL, pending_since = NULL
                    WHERE dead_at IS NOT NULL AND ($1::text IS NULL OR topic = $1::text)
                    RETURNING 1
                ),
                {}",
                count_and_notify("r", 3)
            ),
            purge_one: format!("DELETE FROM {s}.outbox WHERE id = $1::uuid AND dead_at IS NOT NULL"),
            purge_all: format!(
                "DELETE FROM {s}.outbox
                 WHERE dead_at IS NOT NULL AND ($1::text IS NULL OR topic = $1::text)"
            ),
            // $1 now. The lag: since when the longest-waiting message that
            // is due (or was: it is in flight or waiting for a retry) has
            // been due. A message never claimed is due at `available_at`;
            // one claimed since its enqueue or redrive, at `pending_since`.
            stats: format!(
                "SELECT
                    count(*) FILTER (WHERE dead_at IS NULL
                        AND (lease_expires_at IS NULL OR lease_expires_at <= $1::timestamptz)),
                    count(*) FILTER (WHERE dead_at IS NULL AND lease_expires_at > $1::timestamptz),
                    count(*) FILTER (WHERE dead_at IS NOT NULL),
                    min(coalesce(pending_since, available_at)) FILTER (WHERE dead_at IS NULL
                        AND coalesce(pending_since, available_at) <= $1::timestamptz)
                 FROM {s}.outbox"
            ),
        }
    }
}
