-- Saga instances, their history, and the transactional outbox.
-- `{schema}` is replaced by the configured, validated and quoted schema name.

-- One row per saga instance. Every write bumps `version`; a worker's write
-- is guarded by `lease_token` (fencing), an operator's by `version`.
CREATE TABLE {schema}.saga_instances (
    id               uuid        PRIMARY KEY,
    saga_name        text        NOT NULL,
    saga_version     integer     NOT NULL,
    start_key        text        NOT NULL,
    -- SHA-256 of the canonical input: a repeated start with the same key
    -- and input returns this row; a different input is refused.
    input_digest     bytea       NOT NULL,
    status           text        NOT NULL
        CHECK (status IN ('running', 'compensating', 'completed', 'compensated', 'stuck')),
    step             text        NOT NULL,
    direction        text        NOT NULL CHECK (direction IN ('forward', 'compensate')),
    -- Attempts claimed on (step, direction); a claim counts one.
    attempt          integer     NOT NULL DEFAULT 0 CHECK (attempt >= 0),
    first_attempt_at timestamptz,
    -- When the instance is due; NULL once terminal or stuck. While leased it
    -- is set to the lease expiry, so claims skip leased rows in the index.
    next_run_at      timestamptz,
    state            jsonb       NOT NULL,
    stuck_reason     text,
    lease_owner      uuid,
    lease_token      uuid,
    lease_expires_at timestamptz,
    version          bigint      NOT NULL DEFAULT 1,
    created_at       timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL,
    CONSTRAINT saga_instances_start_key UNIQUE (saga_name, start_key),
    CONSTRAINT saga_instances_runnable_is_scheduled
        CHECK (status NOT IN ('running', 'compensating') OR next_run_at IS NOT NULL)
);

-- Claims: only runnable rows are indexed, ordered by due time, so a claim
-- touches due rows only and never scans finished sagas.
CREATE INDEX saga_instances_due
    ON {schema}.saga_instances (next_run_at)
    WHERE status IN ('running', 'compensating');

-- Operators: the stuck instances, oldest first.
CREATE INDEX saga_instances_stuck
    ON {schema}.saga_instances (updated_at)
    WHERE status = 'stuck';

-- One row per transition, appended in the transition's own statement.
-- `transition_id` is unique: after a commit whose reply was lost, looking it
-- up tells whether the transition took effect.
CREATE TABLE {schema}.saga_history (
    seq           bigint      GENERATED ALWAYS AS IDENTITY,
    transition_id uuid        PRIMARY KEY,
    saga_id       uuid        NOT NULL REFERENCES {schema}.saga_instances (id) ON DELETE CASCADE,
    step          text        NOT NULL,
    direction     text        NOT NULL,
    attempt       integer     NOT NULL,
    outcome       text        NOT NULL,
    error         text,
    from_status   text,
    to_status     text        NOT NULL,
    started_at    timestamptz NOT NULL,
    finished_at   timestamptz NOT NULL
);

-- An instance's history, in order.
CREATE INDEX saga_history_by_saga ON {schema}.saga_history (saga_id, seq);

-- The transactional outbox. Rows are written in the same transaction as the
-- business write (or the saga transition) that caused them, and removed only
-- once published.
CREATE TABLE {schema}.outbox (
    -- Enqueue order (for per-key ordering).
    seq           bigint      GENERATED ALWAYS AS IDENTITY,
    id            uuid        PRIMARY KEY,
    topic         text        NOT NULL,
    key           text,
    payload_json  jsonb,
    payload_bytes bytea,
    headers       jsonb       NOT NULL DEFAULT '{}',
    -- The saga instance whose step emitted the message, if any.
    saga_id       uuid,
    created_at    timestamptz NOT NULL,
    available_at  timestamptz NOT NULL,
    -- Publish attempts made; the last failure; when it was dead-lettered.
    attempts      integer     NOT NULL DEFAULT 0,
    last_error    text,
    dead_at       timestamptz,
    -- A dispatcher's claim: held while it publishes, outside any transaction.
    lease_token   uuid,
    lease_expires_at timestamptz,
    CONSTRAINT outbox_one_payload CHECK ((payload_json IS NULL) <> (payload_bytes IS NULL))
);

-- Dispatch: pending (not dead) messages by availability, then enqueue order.
CREATE INDEX outbox_pending
    ON {schema}.outbox (available_at, seq)
    WHERE dead_at IS NULL;

-- Per-key ordering: the oldest pending message of each key.
CREATE INDEX outbox_pending_by_key
    ON {schema}.outbox (key, seq)
    WHERE dead_at IS NULL AND key IS NOT NULL;

-- Dead letters, for operators.
CREATE INDEX outbox_dead
    ON {schema}.outbox (dead_at)
    WHERE dead_at IS NOT NULL;

-- The messages of one saga instance.
CREATE INDEX outbox_by_saga
    ON {schema}.outbox (saga_id)
    WHERE saga_id IS NOT NULL;
