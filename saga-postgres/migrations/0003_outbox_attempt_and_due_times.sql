-- Two times the outbox dispatcher keeps per message, and the index that
-- lets per-key ordering see a key's in-flight message.
-- `{schema}` is replaced by the configured, validated and quoted schema name.

-- `first_attempt_at`: when the dispatcher first claimed the message since it
-- was enqueued or last redriven (NULL until then). A retry policy's
-- `max_elapsed` counts from it, so a message delayed with `deliver_after`,
-- or a dead letter redriven long after its enqueue, gets its whole budget.
--
-- `pending_since`: when the message became due for delivery: its enqueue,
-- its `deliver_after` time, or its last redrive. NULL until the first
-- claim, which copies `available_at` into it (before `available_at` moves on
-- to the lease expiry and the retry times); until then `available_at` is
-- that time. The outbox's lag gauge measures from it, so a message waiting
-- for its `deliver_after` time is not counted as late.
ALTER TABLE {schema}.outbox
    ADD COLUMN first_attempt_at timestamptz,
    ADD COLUMN pending_since    timestamptz;

-- Messages claimed before this migration: their budget and their lag
-- counted from their enqueue, and still do.
UPDATE {schema}.outbox
SET first_attempt_at = created_at, pending_since = created_at
WHERE attempts > 0;

-- Per-key ordering: the messages being published (leased), by key. Small:
-- only the rows of the batches in flight.
CREATE INDEX outbox_leased_by_key
    ON {schema}.outbox (key)
    WHERE lease_token IS NOT NULL AND key IS NOT NULL;
