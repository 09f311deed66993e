-- The inbox, and how the outbox dispatcher uses the outbox columns of 0001.
-- `{schema}` is replaced by the configured, validated and quoted schema name.

-- How the dispatcher (saga_postgres::outbox) uses {schema}.outbox; no schema
-- change is needed for it:
--
-- * A claim (one statement, `FOR UPDATE SKIP LOCKED`) sets `lease_token` and
--   `lease_expires_at`, counts one in `attempts`, and moves `available_at` to
--   the lease expiry. The partial index `outbox_pending (available_at, seq)
--   WHERE dead_at IS NULL` therefore yields only due, unleased rows, and a
--   row whose dispatcher died becomes due again by itself once its lease
--   expires. No lock is held while the claimed rows are published.
-- * Published rows are deleted in one statement guarded by the lease token.
--   Failed rows get `last_error`, lose their lease and get
--   `available_at = now + backoff`, or `dead_at` once their budget is spent.
-- * With per-key ordering, only the oldest non-dead row of a key (by `seq`)
--   may be claimed; `outbox_pending_by_key (key, seq)` answers that.

-- One row per (consumer, message) whose effect was applied. The consumer
-- inserts it in its own transaction, before the effect: a second delivery of
-- the same message finds the row (or waits on the first delivery's
-- uncommitted insert, then finds it) and skips the effect. If the consumer's
-- transaction rolls back, the row goes with it and a redelivery applies the
-- effect. Rows older than the retention are pruned: a duplicate delivered
-- after that is applied again, so keep the retention above the longest
-- redelivery window (retries, dead-letter redrives, broker replays).
CREATE TABLE {schema}.inbox (
    consumer     text        NOT NULL CHECK (length(consumer) BETWEEN 1 AND 255),
    message_id   uuid        NOT NULL,
    processed_at timestamptz NOT NULL,
    PRIMARY KEY (consumer, message_id)
);

-- Pruning: the rows processed before the retention cut-off, oldest first.
CREATE INDEX inbox_processed_at ON {schema}.inbox (processed_at);
