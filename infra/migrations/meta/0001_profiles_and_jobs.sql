-- Metadata of the behavioral features: tenant settings, person profiles, recompute jobs.
-- Portable SQL (SQLite and PostgreSQL): TEXT, BIGINT, explicit keys; times are Unix ms.

-- One row holding the last revision handed out. Every write of settings or profiles
-- takes the next revision inside its transaction, so readers can follow changes in
-- commit order with `revision > last seen`.
CREATE TABLE meta_revision (
    id INTEGER PRIMARY KEY,
    value BIGINT NOT NULL
);
INSERT INTO meta_revision (id, value) VALUES (1, 0);

CREATE TABLE tenant_settings (
    tenant_id TEXT PRIMARY KEY,
    settings TEXT NOT NULL,
    revision BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX tenant_settings_revision ON tenant_settings (revision);

CREATE TABLE person_profiles (
    tenant_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    profile TEXT NOT NULL,
    -- Copied out of the profile for team views.
    team TEXT,
    manager TEXT,
    revision BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, user_id)
);
CREATE INDEX person_profiles_revision ON person_profiles (revision);
CREATE INDEX person_profiles_team ON person_profiles (tenant_id, team);

CREATE TABLE jobs (
    job_id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    done BIGINT NOT NULL,
    total BIGINT NOT NULL,
    message TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX jobs_tenant ON jobs (tenant_id, created_at);
