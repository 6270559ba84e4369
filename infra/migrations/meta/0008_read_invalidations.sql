-- Deletions every API node's read cache must apply: a person's data deleted (user_id set)
-- or a tenant's old data removed by retention (user_id NULL). Each takes a revision of the
-- store's one counter, so nodes follow them in commit order as they follow account and
-- key changes. Rows older than a day are pruned as new ones are written: a node that was
-- away longer has re-read everything since (its cache re-reads after query.cache_ttl_secs).

CREATE TABLE read_invalidations (
    revision BIGINT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    user_id TEXT,
    created_at BIGINT NOT NULL
);
