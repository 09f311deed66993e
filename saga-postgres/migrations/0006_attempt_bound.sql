-- A bound on attempt counts, so that a claim can always count one more.
-- `{schema}` is replaced by the configured, validated and quoted schema name.

-- A claim counts an attempt with `attempt + 1`. A row whose count was at the
-- integer maximum (2147483647, written by hand) made every claim of its kind
-- fail (22003, integer out of range): one row blocked all the others. Counts
-- are now at most 1,000,000, far past any retry policy's budget. A claim
-- never counts past the bound: it parks a row found at the bound by itself,
-- with a reason and a history row, for a person, and leases the rest (see
-- `claim` in src/store/sql.rs). A write of a larger count is refused (23514).
--
-- Rows already past the bound are set at it, so that the next claim of their
-- kind parks them (a row that is not runnable is never claimed again).
UPDATE {schema}.saga_instances SET attempt = 1000000 WHERE attempt > 1000000;

ALTER TABLE {schema}.saga_instances
    ADD CONSTRAINT saga_instances_attempt_bound CHECK (attempt <= 1000000);
