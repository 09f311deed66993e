-- Definition drift: the shape each saga name and version was first
-- registered with, and the shape each instance was started under.
-- `{schema}` is replaced by the configured, validated and quoted schema name.

-- One row per saga name and version, written by the first worker that
-- registers it (`SagaStore::register_definition`, when an executor starts)
-- and never changed by the library. `fingerprint` is SHA-256 over the
-- definition's identity (step names and aliases, order, roles,
-- compensations; not retry policies or timeouts); `shape` is the whole
-- shape as first registered, so that a refused worker is told where its
-- own differs. A worker whose fingerprint differs is refused at start.
CREATE TABLE {schema}.saga_definitions (
    saga_name     text        NOT NULL,
    saga_version  integer     NOT NULL,
    fingerprint   bytea       NOT NULL CHECK (octet_length(fingerprint) = 32),
    shape         jsonb       NOT NULL,
    registered_at timestamptz NOT NULL,
    PRIMARY KEY (saga_name, saga_version)
);

-- The fingerprint of the definition an instance was started under: a
-- claim takes the instance only for a worker whose registered definition
-- has the same one. NULL on rows started before this migration: those are
-- claimed by any worker of their name and version, as before.
-- Adding a nullable column without a default rewrites nothing; the check
-- is NOT VALID so that existing rows (all NULL) are not scanned.
ALTER TABLE {schema}.saga_instances ADD COLUMN definition_fingerprint bytea;
ALTER TABLE {schema}.saga_instances ADD CONSTRAINT saga_instances_definition_fingerprint_length
    CHECK (definition_fingerprint IS NULL OR octet_length(definition_fingerprint) = 32) NOT VALID;
