-- The idempotency index: which event each client-given event_id of a tenant names, as a
-- digest of its content. Ingest claims ids before acknowledging, so the same id for a
-- different event is refused; rows older than the longest tenant horizon are pruned (an
-- event older than that is refused anyway). Portable SQL (SQLite and PostgreSQL); times
-- are Unix ms.

CREATE TABLE event_ids (
    tenant_id TEXT NOT NULL,
    event_id TEXT NOT NULL,
    digest TEXT NOT NULL,
    first_seen BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, event_id)
);
CREATE INDEX event_ids_first_seen ON event_ids (first_seen);
