-- Groups whose aggregates have been shown, per tenant: a new group nested with one of
-- these at a distance under k is refused (disclosure by difference).
CREATE TABLE released_groups (
    tenant_id TEXT NOT NULL,
    members_hash TEXT NOT NULL,
    -- JSON array of user ids, sorted.
    members TEXT NOT NULL,
    released_at BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, members_hash)
);
