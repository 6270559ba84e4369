//! Identity records in the metadata store: tenants, accounts, the role/permission
//! catalogue, API keys, sessions with their refresh tokens, password resets and the audit
//! log.
//!
//! What it guarantees:
//! - **Only digests of secrets.** Refresh tokens, reset tokens and API-key secrets are
//!   stored as SHA-256 digests; passwords as the argon2id PHC string the caller computed.
//!   Nothing here can give a secret back.
//! - **Single use is atomic.** Spending a refresh token or a reset token is one
//!   conditional `UPDATE … WHERE spent_at IS NULL`, so two concurrent presentations of
//!   the same token cannot both succeed.
//! - **Tenant-scoped reads.** Every read by id also takes the caller's tenant; another
//!   tenant's id reads exactly as a missing one.
//! - **Followable revocations.** Revoking a session or an API key takes the next
//!   `meta_revision`, so every node picks the change up with one indexed query.
//! - **Append-only audit.** The store offers no update or delete of audit records, and
//!   the database refuses them (triggers).

use serde::Serialize;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::{Backend, MetaError, MetaStore, Result, decode, now_ms};

/// A tenant.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct TenantRecord {
    pub tenant_id: String,
    pub name: String,
    pub created_at: i64,
}

/// An account, without its password hash.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Account {
    pub account_id: String,
    pub tenant_id: String,
    pub email: String,
    pub role: String,
    pub person_id: Option<String>,
    pub display_name: String,
    pub created_at: i64,
    pub updated_at: i64,
    pub disabled: bool,
}

/// What a new account is made of.
#[derive(Clone, Debug)]
pub struct NewAccount<'a> {
    pub tenant_id: &'a str,
    pub email: &'a str,
    pub role: &'a str,
    pub person_id: Option<&'a str>,
    pub display_name: &'a str,
}

/// Changes to an account; `None` leaves a field as it is.
#[derive(Clone, Debug, Default)]
pub struct AccountChange {
    pub role: Option<String>,
    /// `Some(None)` clears the link to a person.
    pub person_id: Option<Option<String>>,
    pub display_name: Option<String>,
    pub disabled: Option<bool>,
}

/// An API key as stored (the secret's digest included, for verification).
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ApiKeyRecord {
    pub key_id: String,
    pub tenant_id: String,
    pub name: String,
    #[serde(skip)]
    pub secret_hash: String,
    pub role: String,
    pub sources: Vec<String>,
    pub endpoints: Vec<String>,
    pub created_by: String,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
}

/// What presenting a refresh token found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RefreshOutcome {
    /// The token was live and is now spent; issue the next one in `family_id`.
    Spent {
        family_id: String,
        account_id: String,
        tenant_id: String,
    },
    /// The token had been spent before: a replay. Its family is now revoked.
    Reused { family_id: String },
    /// Unknown, expired, or of a revoked session.
    Invalid,
}

/// One audit record.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct AuditRecord {
    pub event_id: String,
    pub at: i64,
    pub tenant_id: String,
    pub actor: String,
    pub actor_kind: String,
    pub action: String,
    pub target: String,
    pub source_ip: String,
    pub request_id: String,
    /// The HTTP status answered.
    pub outcome: i32,
    pub detail: String,
}

/// Which audit records to read.
#[derive(Clone, Debug, Default)]
pub struct AuditQuery {
    pub from: Option<i64>,
    pub to: Option<i64>,
    pub actor: Option<String>,
    /// Records whose action starts with this.
    pub action_prefix: Option<String>,
    pub limit: i64,
}

/// A role of the catalogue, for [`MetaStore::sync_catalogue`].
#[derive(Clone, Debug)]
pub struct RoleEntry {
    pub role: &'static str,
    pub rank: i32,
    pub description: &'static str,
    pub permissions: Vec<&'static str>,
}

/// SHA-256 of a secret, in hex: how token and key secrets are stored and looked up.
pub fn digest(secret: &str) -> String {
    use sha2::Digest;
    format!("{:x}", sha2::Sha256::digest(secret.as_bytes()))
}

async fn insert_tenant(
    conn: &mut sqlx::AnyConnection,
    tenant_id: &str,
    name: &str,
) -> Result<TenantRecord> {
    digame_schemas::validate::validate_tenant_id(tenant_id).map_err(MetaError::Invalid)?;
    let now = now_ms();
    sqlx::query("INSERT INTO tenants (tenant_id, name, created_at) VALUES ($1, $2, $3)")
        .bind(tenant_id)
        .bind(name)
        .bind(now)
        .execute(&mut *conn)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                MetaError::Conflict(format!("tenant `{tenant_id}` already exists"))
            } else {
                e.into()
            }
        })?;
    Ok(TenantRecord {
        tenant_id: tenant_id.into(),
        name: name.into(),
        created_at: now,
    })
}

async fn insert_account(
    conn: &mut sqlx::AnyConnection,
    new: &NewAccount<'_>,
    password_hash: &str,
) -> Result<Account> {
    let email = digame_schemas::validate::normalize_email(new.email).map_err(MetaError::Invalid)?;
    let now = now_ms();
    let account = Account {
        account_id: uuid::Uuid::now_v7().to_string(),
        tenant_id: new.tenant_id.into(),
        email,
        role: new.role.into(),
        person_id: new.person_id.map(str::to_string),
        display_name: new.display_name.into(),
        created_at: now,
        updated_at: now,
        disabled: false,
    };
    let revision = MetaStore::next_revision(conn).await?;
    sqlx::query(
        "INSERT INTO accounts (account_id, tenant_id, email, password_hash, role, person_id, display_name, created_at, updated_at, revision)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8, $9)",
    )
    .bind(&account.account_id)
    .bind(&account.tenant_id)
    .bind(&account.email)
    .bind(password_hash)
    .bind(&account.role)
    .bind(account.person_id.clone())
    .bind(&account.display_name)
    .bind(now)
    .bind(revision)
    .execute(&mut *conn)
    .await
    .map_err(|e| {
        if is_unique_violation(&e) {
            MetaError::Conflict(
                "an account with this email address (or for this person) already exists".into(),
            )
        } else {
            e.into()
        }
    })?;
    Ok(account)
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.is_unique_violation())
}

const ACCOUNT_COLUMNS: &str = "account_id, tenant_id, email, role, person_id, display_name, created_at, updated_at, disabled_at";

fn account_of(r: &AnyRow) -> Result<Account> {
    Ok(Account {
        account_id: r.try_get(0)?,
        tenant_id: r.try_get(1)?,
        email: r.try_get(2)?,
        role: r.try_get(3)?,
        person_id: r.try_get(4)?,
        display_name: r.try_get(5)?,
        created_at: r.try_get(6)?,
        updated_at: r.try_get(7)?,
        disabled: r.try_get::<Option<i64>, _>(8)?.is_some(),
    })
}

const KEY_COLUMNS: &str = "key_id, tenant_id, name, secret_hash, role, sources, endpoints, created_by, created_at, revoked_at";

fn key_of(r: &AnyRow) -> Result<ApiKeyRecord> {
    let key_id: String = r.try_get(0)?;
    let list = |i: usize| -> Result<Vec<String>> {
        decode(&r.try_get::<String, _>(i)?, || {
            format!("scopes of API key {key_id}")
        })
    };
    Ok(ApiKeyRecord {
        tenant_id: r.try_get(1)?,
        name: r.try_get(2)?,
        secret_hash: r.try_get(3)?,
        role: r.try_get(4)?,
        sources: list(5)?,
        endpoints: list(6)?,
        created_by: r.try_get(7)?,
        created_at: r.try_get(8)?,
        revoked_at: r.try_get(9)?,
        key_id,
    })
}

impl MetaStore {
    /// Makes UPDATE and DELETE on `audit_log` fail, on either backend (idempotent).
    pub(super) async fn append_only_triggers(&self) -> Result<()> {
        match self.backend {
            Backend::Sqlite => {
                for (name, op) in [
                    ("audit_log_no_update", "UPDATE"),
                    ("audit_log_no_delete", "DELETE"),
                ] {
                    let sql = format!(
                        "CREATE TRIGGER IF NOT EXISTS {name} BEFORE {op} ON audit_log \
                         BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END"
                    );
                    sqlx::query(&sql).execute(&self.pool).await?;
                }
            }
            Backend::Postgres => {
                sqlx::query(
                    "CREATE OR REPLACE FUNCTION audit_log_append_only() RETURNS trigger \
                     LANGUAGE plpgsql AS $$ BEGIN \
                     RAISE EXCEPTION 'audit_log is append-only'; END $$",
                )
                .execute(&self.pool)
                .await?;
                sqlx::query(
                    "CREATE OR REPLACE TRIGGER audit_log_append_only \
                     BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_log \
                     FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only()",
                )
                .execute(&self.pool)
                .await?;
            }
        }
        Ok(())
    }

    /// Replaces the stored copy of the role/permission catalogue with `roles` and
    /// `permissions` (name, description).
    pub async fn sync_catalogue(
        &self,
        roles: &[RoleEntry],
        permissions: &[(&'static str, &'static str)],
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM role_permissions")
            .execute(&mut *tx)
            .await?;
        for (name, description) in permissions {
            sqlx::query(
                "INSERT INTO permissions (permission, description) VALUES ($1, $2) \
                 ON CONFLICT (permission) DO UPDATE SET description = excluded.description",
            )
            .bind(*name)
            .bind(*description)
            .execute(&mut *tx)
            .await?;
        }
        for role in roles {
            sqlx::query(
                "INSERT INTO roles (role, rank, description) VALUES ($1, $2, $3) \
                 ON CONFLICT (role) DO UPDATE SET rank = excluded.rank, description = excluded.description",
            )
            .bind(role.role)
            .bind(role.rank)
            .bind(role.description)
            .execute(&mut *tx)
            .await?;
            for p in &role.permissions {
                sqlx::query("INSERT INTO role_permissions (role, permission) VALUES ($1, $2)")
                    .bind(role.role)
                    .bind(*p)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    /// The permissions the stored catalogue gives `role`, sorted.
    pub async fn role_permissions(&self, role: &str) -> Result<Vec<String>> {
        let rows = sqlx::query(
            "SELECT permission FROM role_permissions WHERE role = $1 ORDER BY permission",
        )
        .bind(role)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| r.try_get::<String, _>(0).map_err(MetaError::from))
            .collect()
    }

    /// Creates a tenant; `Conflict` when the id is taken.
    pub async fn create_tenant(&self, tenant_id: &str, name: &str) -> Result<TenantRecord> {
        let mut conn = self.pool.acquire().await?;
        insert_tenant(&mut conn, tenant_id, name).await
    }

    /// Creates a tenant and its first account in one transaction: when the account cannot
    /// be created (its address is taken or invalid), there is no tenant either.
    pub async fn create_tenant_with_admin(
        &self,
        tenant_id: &str,
        name: &str,
        admin: &NewAccount<'_>,
        password_hash: &str,
    ) -> Result<(TenantRecord, Account)> {
        let mut tx = self.pool.begin().await?;
        let tenant = insert_tenant(&mut tx, tenant_id, name).await?;
        let account = insert_account(&mut tx, admin, password_hash).await?;
        tx.commit().await?;
        Ok((tenant, account))
    }

    /// Every tenant, by id.
    pub async fn tenants(&self) -> Result<Vec<TenantRecord>> {
        let rows =
            sqlx::query("SELECT tenant_id, name, created_at FROM tenants ORDER BY tenant_id")
                .fetch_all(&self.pool)
                .await?;
        rows.iter()
            .map(|r| {
                Ok(TenantRecord {
                    tenant_id: r.try_get(0)?,
                    name: r.try_get(1)?,
                    created_at: r.try_get(2)?,
                })
            })
            .collect()
    }

    /// How many accounts exist (0 before bootstrap).
    pub async fn account_count(&self) -> Result<i64> {
        let row = sqlx::query("SELECT COUNT(*) FROM accounts")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get(0)?)
    }

    /// Creates an account with an already computed password hash; `Conflict` when the
    /// address (or the tenant's person link) is taken, `Invalid` when the address is not one.
    pub async fn create_account(
        &self,
        new: &NewAccount<'_>,
        password_hash: &str,
    ) -> Result<Account> {
        let mut tx = self.pool.begin().await?;
        let account = insert_account(&mut tx, new, password_hash).await?;
        tx.commit().await?;
        Ok(account)
    }

    /// The account with `email` (any tenant) and its password hash: for login only.
    pub async fn account_for_login(&self, email: &str) -> Result<Option<(Account, String)>> {
        let sql = format!("SELECT {ACCOUNT_COLUMNS}, password_hash FROM accounts WHERE email = $1");
        let row = sqlx::query(&sql)
            .bind(email.trim().to_lowercase())
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| Ok((account_of(&r)?, r.try_get(9)?)))
            .transpose()
    }

    /// One account of `tenant` with its password hash.
    pub async fn account_with_hash(
        &self,
        tenant: &str,
        account_id: &str,
    ) -> Result<Option<(Account, String)>> {
        let sql = format!(
            "SELECT {ACCOUNT_COLUMNS}, password_hash FROM accounts WHERE tenant_id = $1 AND account_id = $2"
        );
        let row = sqlx::query(&sql)
            .bind(tenant)
            .bind(account_id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| Ok((account_of(&r)?, r.try_get(9)?)))
            .transpose()
    }

    /// One account by id alone: for a password reset, whose token names the account.
    pub async fn account_by_id(&self, account_id: &str) -> Result<Option<Account>> {
        let sql = format!("SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE account_id = $1");
        let row = sqlx::query(&sql)
            .bind(account_id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(account_of).transpose()
    }

    /// One account of `tenant`.
    pub async fn account(&self, tenant: &str, account_id: &str) -> Result<Option<Account>> {
        Ok(self
            .account_with_hash(tenant, account_id)
            .await?
            .map(|(a, _)| a))
    }

    /// The tenant's accounts, by email.
    pub async fn accounts(&self, tenant: &str) -> Result<Vec<Account>> {
        let sql =
            format!("SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE tenant_id = $1 ORDER BY email");
        let rows = sqlx::query(&sql).bind(tenant).fetch_all(&self.pool).await?;
        rows.iter().map(account_of).collect()
    }

    /// Applies `change` to one account of `tenant`; `None` when there is no such account.
    /// Disabling also revokes the account's sessions.
    pub async fn update_account(
        &self,
        tenant: &str,
        account_id: &str,
        change: &AccountChange,
    ) -> Result<Option<Account>> {
        let Some(mut account) = self.account(tenant, account_id).await? else {
            return Ok(None);
        };
        if let Some(role) = &change.role {
            account.role = role.clone();
        }
        if let Some(person) = &change.person_id {
            account.person_id = person.clone();
        }
        if let Some(name) = &change.display_name {
            account.display_name = name.clone();
        }
        let now = now_ms();
        account.updated_at = now;
        let mut tx = self.pool.begin().await?;
        // A new revision, so that every node's follower sees the change (see
        // `account_changes_since`).
        let revision = Self::next_revision(&mut tx).await?;
        sqlx::query(
            "UPDATE accounts SET role = $1, person_id = $2, display_name = $3, updated_at = $4, revision = $7
             WHERE tenant_id = $5 AND account_id = $6",
        )
        .bind(&account.role)
        .bind(account.person_id.clone())
        .bind(&account.display_name)
        .bind(now)
        .bind(tenant)
        .bind(account_id)
        .bind(revision)
        .execute(&mut *tx)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                MetaError::Conflict("another account is already linked to this person".into())
            } else {
                e.into()
            }
        })?;
        let disable = change.disabled == Some(true) && !account.disabled;
        if let Some(d) = change.disabled.filter(|d| *d != account.disabled) {
            sqlx::query(
                "UPDATE accounts SET disabled_at = $1 WHERE tenant_id = $2 AND account_id = $3",
            )
            .bind(d.then_some(now))
            .bind(tenant)
            .bind(account_id)
            .execute(&mut *tx)
            .await?;
            account.disabled = d;
        }
        tx.commit().await?;
        if disable {
            self.revoke_account_sessions(account_id, "account disabled")
                .await?;
        }
        Ok(Some(account))
    }

    /// Accounts created or changed after `revision` (0: every account), in commit order,
    /// and the newest revision seen: what API nodes follow to apply role changes, relinks
    /// and disables to access tokens already issued.
    pub async fn account_changes_since(&self, revision: i64) -> Result<(Vec<Account>, i64)> {
        let sql = format!(
            "SELECT {ACCOUNT_COLUMNS}, revision FROM accounts WHERE revision > $1 ORDER BY revision"
        );
        self.changes_after(&sql, revision, 9, account_of).await
    }

    /// Rows of a change feed (`sql` selects rows whose revision, at column `revision_at`,
    /// is above `$1`, in revision order), decoded, and the newest revision seen.
    pub(super) async fn changes_after<T>(
        &self,
        sql: &str,
        revision: i64,
        revision_at: usize,
        decode: fn(&AnyRow) -> Result<T>,
    ) -> Result<(Vec<T>, i64)> {
        let rows = sqlx::query(sql)
            .bind(revision)
            .fetch_all(&self.pool)
            .await?;
        let mut newest = revision;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            out.push(decode(r)?);
            newest = newest.max(r.try_get(revision_at)?);
        }
        Ok((out, newest))
    }

    /// Replaces an account's password hash and revokes its sessions (every device must
    /// sign in again with the new password).
    pub async fn set_password(&self, account_id: &str, password_hash: &str) -> Result<()> {
        sqlx::query(
            "UPDATE accounts SET password_hash = $1, updated_at = $2 WHERE account_id = $3",
        )
        .bind(password_hash)
        .bind(now_ms())
        .bind(account_id)
        .execute(&self.pool)
        .await?;
        self.revoke_account_sessions(account_id, "password changed")
            .await
    }

    /// Starts a session for `account` with its first refresh token (stored as a digest).
    pub async fn start_session(
        &self,
        account: &Account,
        refresh_secret: &str,
        expires_at: i64,
    ) -> Result<String> {
        let family = uuid::Uuid::now_v7().to_string();
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO sessions (family_id, account_id, tenant_id, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(&family)
        .bind(&account.account_id)
        .bind(&account.tenant_id)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO refresh_tokens (token_hash, family_id, issued_at, expires_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(digest(refresh_secret))
        .bind(&family)
        .bind(now)
        .bind(expires_at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(family)
    }

    /// Spends a refresh token. A live one is marked spent and `next_secret` becomes the
    /// family's next token; a spent one revokes its whole family (the token was stolen
    /// or replayed).
    pub async fn rotate_refresh(
        &self,
        presented: &str,
        next_secret: &str,
        next_expires_at: i64,
    ) -> Result<RefreshOutcome> {
        let now = now_ms();
        let hash = digest(presented);
        let mut tx = self.pool.begin().await?;
        let spent = sqlx::query(
            "UPDATE refresh_tokens SET spent_at = $1 WHERE token_hash = $2 AND spent_at IS NULL AND expires_at > $1 \
             RETURNING family_id",
        )
        .bind(now)
        .bind(&hash)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = spent else {
            tx.rollback().await?;
            let row =
                sqlx::query("SELECT family_id, spent_at FROM refresh_tokens WHERE token_hash = $1")
                    .bind(&hash)
                    .fetch_optional(&self.pool)
                    .await?;
            return Ok(match row {
                Some(r) if r.try_get::<Option<i64>, _>(1)?.is_some() => {
                    let family_id: String = r.try_get(0)?;
                    self.revoke_session(&family_id, "refresh token reused")
                        .await?;
                    RefreshOutcome::Reused { family_id }
                }
                _ => RefreshOutcome::Invalid,
            });
        };
        let family_id: String = row.try_get(0)?;
        let session = sqlx::query(
            "SELECT account_id, tenant_id, revoked_at FROM sessions WHERE family_id = $1",
        )
        .bind(&family_id)
        .fetch_one(&mut *tx)
        .await?;
        if session.try_get::<Option<i64>, _>(2)?.is_some() {
            tx.rollback().await?;
            return Ok(RefreshOutcome::Invalid);
        }
        sqlx::query(
            "INSERT INTO refresh_tokens (token_hash, family_id, issued_at, expires_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(digest(next_secret))
        .bind(&family_id)
        .bind(now)
        .bind(next_expires_at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(RefreshOutcome::Spent {
            family_id,
            account_id: session.try_get(0)?,
            tenant_id: session.try_get(1)?,
        })
    }

    /// The session a refresh token belongs to, if the token is known.
    pub async fn session_of_refresh(&self, presented: &str) -> Result<Option<String>> {
        let row = sqlx::query("SELECT family_id FROM refresh_tokens WHERE token_hash = $1")
            .bind(digest(presented))
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.try_get(0)).transpose()?)
    }

    /// Revokes one session (idempotent).
    pub async fn revoke_session(&self, family_id: &str, reason: &str) -> Result<()> {
        self.revoke_sessions_where("family_id", family_id, reason)
            .await
    }

    /// Revokes every live session of an account.
    pub async fn revoke_account_sessions(&self, account_id: &str, reason: &str) -> Result<()> {
        self.revoke_sessions_where("account_id", account_id, reason)
            .await
    }

    /// Revokes the live sessions whose `column` (chosen by the caller above, never input)
    /// is `value`, under one new revision.
    async fn revoke_sessions_where(
        &self,
        column: &'static str,
        value: &str,
        reason: &str,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let revision = Self::next_revision(&mut tx).await?;
        let sql = format!(
            "UPDATE sessions SET revoked_at = $1, revoked_reason = $2, revision = $3 \
             WHERE {column} = $4 AND revoked_at IS NULL"
        );
        sqlx::query(&sql)
            .bind(now_ms())
            .bind(reason)
            .bind(revision)
            .bind(value)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Sessions revoked after `revision` (0: every revoked session younger than
    /// `since_ms`), and the newest revision seen.
    pub async fn revoked_sessions_since(
        &self,
        revision: i64,
        since_ms: i64,
    ) -> Result<(Vec<String>, i64)> {
        let rows = sqlx::query(
            "SELECT family_id, revision FROM sessions WHERE revision > $1 AND revoked_at > $2 ORDER BY revision",
        )
        .bind(revision)
        .bind(since_ms)
        .fetch_all(&self.pool)
        .await?;
        let mut newest = revision;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            out.push(r.try_get(0)?);
            newest = newest.max(r.try_get(1)?);
        }
        Ok((out, newest))
    }

    /// Stores a new API key (its secret as a digest).
    pub async fn create_api_key(&self, key: &ApiKeyRecord) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let revision = Self::next_revision(&mut tx).await?;
        sqlx::query(
            "INSERT INTO api_keys (key_id, tenant_id, name, secret_hash, role, sources, endpoints, created_by, created_at, revision)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(&key.key_id)
        .bind(&key.tenant_id)
        .bind(&key.name)
        .bind(&key.secret_hash)
        .bind(&key.role)
        .bind(serde_json::to_string(&key.sources).expect("lists serialize"))
        .bind(serde_json::to_string(&key.endpoints).expect("lists serialize"))
        .bind(&key.created_by)
        .bind(key.created_at)
        .bind(revision)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The tenant's API keys, revoked ones included, newest first.
    pub async fn api_keys(&self, tenant: &str) -> Result<Vec<ApiKeyRecord>> {
        let sql = format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE tenant_id = $1 ORDER BY created_at DESC, key_id DESC"
        );
        let rows = sqlx::query(&sql).bind(tenant).fetch_all(&self.pool).await?;
        rows.iter().map(key_of).collect()
    }

    /// Revokes one of the tenant's keys; `None` when the tenant has no such key.
    pub async fn revoke_api_key(&self, tenant: &str, key_id: &str) -> Result<Option<ApiKeyRecord>> {
        let mut tx = self.pool.begin().await?;
        let revision = Self::next_revision(&mut tx).await?;
        sqlx::query(
            "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, $1), revision = $2 \
             WHERE tenant_id = $3 AND key_id = $4",
        )
        .bind(now_ms())
        .bind(revision)
        .bind(tenant)
        .bind(key_id)
        .execute(&mut *tx)
        .await?;
        let sql =
            format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE tenant_id = $1 AND key_id = $2");
        let row = sqlx::query(&sql)
            .bind(tenant)
            .bind(key_id)
            .fetch_optional(&mut *tx)
            .await?;
        tx.commit().await?;
        row.as_ref().map(key_of).transpose()
    }

    /// Keys created or revoked after `revision` (0: all), and the newest revision seen.
    pub async fn api_key_changes_since(&self, revision: i64) -> Result<(Vec<ApiKeyRecord>, i64)> {
        let sql = format!(
            "SELECT {KEY_COLUMNS}, revision FROM api_keys WHERE revision > $1 ORDER BY revision"
        );
        self.changes_after(&sql, revision, 10, key_of).await
    }

    /// Stores a password-reset token (as a digest) for an account.
    pub async fn create_password_reset(
        &self,
        account_id: &str,
        secret: &str,
        expires_at: i64,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO password_resets (token_hash, account_id, expires_at) VALUES ($1, $2, $3)",
        )
        .bind(digest(secret))
        .bind(account_id)
        .bind(expires_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Uses a reset token: the account it was issued for, once, before it expires.
    pub async fn consume_password_reset(&self, secret: &str) -> Result<Option<String>> {
        let now = now_ms();
        let row = sqlx::query(
            "UPDATE password_resets SET used_at = $1 \
             WHERE token_hash = $2 AND used_at IS NULL AND expires_at > $1 RETURNING account_id",
        )
        .bind(now)
        .bind(digest(secret))
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| r.try_get(0)).transpose()?)
    }

    /// Appends one audit record.
    pub async fn append_audit(&self, record: &AuditRecord) -> Result<()> {
        self.append_audits(std::slice::from_ref(record)).await
    }

    /// Appends audit records in one transaction: all of them or none.
    pub async fn append_audits(&self, records: &[AuditRecord]) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        for record in records {
            Self::insert_audit(&mut tx, record).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn insert_audit(conn: &mut sqlx::AnyConnection, record: &AuditRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO audit_log (event_id, at, tenant_id, actor, actor_kind, action, target, source_ip, request_id, outcome, detail)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(&record.event_id)
        .bind(record.at)
        .bind(&record.tenant_id)
        .bind(&record.actor)
        .bind(&record.actor_kind)
        .bind(&record.action)
        .bind(&record.target)
        .bind(&record.source_ip)
        .bind(&record.request_id)
        .bind(record.outcome)
        .bind(&record.detail)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    /// The tenant's audit records matching `q`, newest first.
    pub async fn audit(&self, tenant: &str, q: &AuditQuery) -> Result<Vec<AuditRecord>> {
        // Every filter is always present and bound; an absent one matches everything.
        let rows = sqlx::query(
            "SELECT event_id, at, tenant_id, actor, actor_kind, action, target, source_ip, request_id, outcome, detail
             FROM audit_log
             WHERE tenant_id = $1 AND at >= $2 AND at < $3
               AND ($4 = '' OR actor = $4)
               AND ($5 = '' OR substr(action, 1, length($5)) = $5)
             ORDER BY at DESC, event_id DESC LIMIT $6",
        )
        .bind(tenant)
        .bind(q.from.unwrap_or(i64::MIN))
        .bind(q.to.unwrap_or(i64::MAX))
        .bind(q.actor.clone().unwrap_or_default())
        .bind(q.action_prefix.clone().unwrap_or_default())
        .bind(q.limit.clamp(1, 10_000))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(AuditRecord {
                    event_id: r.try_get(0)?,
                    at: r.try_get(1)?,
                    tenant_id: r.try_get(2)?,
                    actor: r.try_get(3)?,
                    actor_kind: r.try_get(4)?,
                    action: r.try_get(5)?,
                    target: r.try_get(6)?,
                    source_ip: r.try_get(7)?,
                    request_id: r.try_get(8)?,
                    outcome: r.try_get(9)?,
                    detail: r.try_get(10)?,
                })
            })
            .collect()
    }
}
