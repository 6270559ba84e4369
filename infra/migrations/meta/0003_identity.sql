-- Identity and security: tenants, accounts, roles and permissions, API keys, refresh-token
-- families (sessions), password resets and the audit log. Portable SQL (SQLite and
-- PostgreSQL); ids are text (UUIDv7, time-ordered); times are Unix ms. The triggers that
-- make audit_log append-only differ per backend and are applied by the store after the
-- migrations.

CREATE TABLE tenants (
    tenant_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

-- Roles and permissions are defined in code (digame_api::auth::rbac); these tables are a
-- copy kept in step on every start, for reporting and BI tools.
CREATE TABLE roles (
    role TEXT PRIMARY KEY,
    rank INTEGER NOT NULL,
    description TEXT NOT NULL
);
CREATE TABLE permissions (
    permission TEXT PRIMARY KEY,
    description TEXT NOT NULL
);
CREATE TABLE role_permissions (
    role TEXT NOT NULL,
    permission TEXT NOT NULL REFERENCES permissions (permission),
    PRIMARY KEY (role, permission)
);

CREATE TABLE accounts (
    account_id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants (tenant_id),
    -- Lower-cased; one account per address across the platform, so login needs no tenant.
    email TEXT NOT NULL UNIQUE,
    -- argon2id in PHC string form (algorithm, parameters, salt, hash).
    password_hash TEXT NOT NULL,
    role TEXT NOT NULL,
    -- The pseudonymous user id this account's own events carry, if any.
    person_id TEXT,
    display_name TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    disabled_at BIGINT
);
CREATE INDEX accounts_tenant ON accounts (tenant_id);
CREATE UNIQUE INDEX accounts_person ON accounts (tenant_id, person_id);

-- Keys for collectors, connectors and automation. Only a SHA-256 of the secret is kept
-- (the secret is 256 random bits, so a slow hash adds nothing); it is shown once.
CREATE TABLE api_keys (
    key_id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants (tenant_id),
    name TEXT NOT NULL,
    secret_hash TEXT NOT NULL,
    role TEXT NOT NULL,
    -- JSON arrays: the event sources the key may send (empty: any) and the endpoints it
    -- may call.
    sources TEXT NOT NULL,
    endpoints TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT,
    -- Taken from meta_revision on create and revoke, so nodes follow key changes.
    revision BIGINT NOT NULL
);
CREATE INDEX api_keys_tenant ON api_keys (tenant_id);
CREATE INDEX api_keys_revision ON api_keys (revision);

-- A login starts a session (a refresh-token family); every refresh spends one token and
-- issues the next in the same family. Presenting a spent token revokes the family.
CREATE TABLE sessions (
    family_id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts (account_id),
    tenant_id TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT,
    revoked_reason TEXT,
    -- meta_revision of the revocation, so nodes drop its access tokens at once.
    revision BIGINT
);
CREATE INDEX sessions_account ON sessions (account_id);
CREATE INDEX sessions_revision ON sessions (revision);

CREATE TABLE refresh_tokens (
    token_hash TEXT PRIMARY KEY,
    family_id TEXT NOT NULL REFERENCES sessions (family_id),
    issued_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    spent_at BIGINT
);
CREATE INDEX refresh_tokens_family ON refresh_tokens (family_id);

CREATE TABLE password_resets (
    token_hash TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts (account_id),
    expires_at BIGINT NOT NULL,
    used_at BIGINT
);

-- Who did what, when, from where, with what outcome. Append-only (triggers refuse
-- UPDATE and DELETE).
CREATE TABLE audit_log (
    event_id TEXT PRIMARY KEY,
    at BIGINT NOT NULL,
    tenant_id TEXT NOT NULL,
    actor TEXT NOT NULL,
    actor_kind TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    source_ip TEXT NOT NULL,
    request_id TEXT NOT NULL,
    outcome INTEGER NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX audit_log_tenant_at ON audit_log (tenant_id, at);
