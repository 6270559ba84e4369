-- Group releases are decided per window range and in one transaction per tenant.
-- A release covers the windows in [from_ms, to_ms). When the same group is shown again,
-- its range widens to cover both. Groups released before this migration cover every
-- window. The lock row serializes a tenant's release decisions across API nodes: each
-- decision updates it first, so a second node deciding at the same time waits for the
-- first to commit and then sees its release.

ALTER TABLE released_groups ADD COLUMN from_ms BIGINT NOT NULL DEFAULT 0;
ALTER TABLE released_groups ADD COLUMN to_ms BIGINT NOT NULL DEFAULT 9000000000000000;

CREATE TABLE group_release_locks (
    tenant_id TEXT PRIMARY KEY,
    decisions BIGINT NOT NULL
);
