//! The identity routes: sign-in, token refresh, sign-out, password change and reset,
//! accounts, API keys, tenants, the role catalogue and the audit log; and the bootstrap
//! of a fresh installation.
//!
//! Secrets (passwords, tokens, key secrets) appear only in the one response that hands
//! them out; they are never logged, and only their hashes or digests are stored.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use digame_infra::config::{AuthConfig, JwtKeys};
use digame_infra::meta::MetaStore;
use digame_infra::meta::identity::{
    Account, AccountChange, ApiKeyRecord, AuditQuery, AuditRecord, NewAccount, RefreshOutcome,
    digest,
};
use serde::Deserialize;
use serde_json::json;

use super::rbac::{Permission, Role};
use super::tokens::{Claims, random_secret};
use super::{ActorKind, KEY_PREFIX, Principal, client_ip, passwords};
use crate::{ApiError, AppState, json_body};

fn now_ms() -> i64 {
    digame_schemas::EventTime::now().0
}

/// Runs CPU-heavy password work off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("password hashing does not panic")
}

/// The argon2id hash of `password`, computed on the blocking pool.
async fn hash_password(password: &str) -> String {
    let p = password.to_string();
    blocking(move || passwords::hash(&p)).await
}

/// Where password-reset messages go.
pub trait Notifier: Send + Sync {
    /// Delivers `body` to `to`; the body holds a secret, so implementations must not log it.
    fn deliver(&self, to: &str, subject: &str, body: &str) -> std::io::Result<()>;
}

/// One file per message under a directory only the operator can read.
pub struct FileNotifier(pub PathBuf);

impl Notifier for FileNotifier {
    fn deliver(&self, to: &str, subject: &str, body: &str) -> std::io::Result<()> {
        use std::io::Write;
        std::fs::create_dir_all(&self.0)?;
        let path = self.0.join(format!("{}.txt", uuid::Uuid::now_v7()));
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let mut f = opts.open(&path)?;
        writeln!(f, "To: {to}\nSubject: {subject}\n\n{body}")?;
        f.sync_all()
    }
}

/// Logs that a message was sent and to whom — never its body.
pub struct LogNotifier;

impl Notifier for LogNotifier {
    fn deliver(&self, to: &str, subject: &str, _body: &str) -> std::io::Result<()> {
        tracing::info!(to, subject, "notification issued (body withheld from logs)");
        Ok(())
    }
}

/// The notifier `auth.notifier` names.
pub fn notifier(config: &AuthConfig, data_dir: &Path) -> anyhow::Result<Arc<dyn Notifier>> {
    match config.notifier.as_str() {
        "file" => Ok(Arc::new(FileNotifier(data_dir.join("outbox")))),
        "log" => Ok(Arc::new(LogNotifier)),
        other => anyhow::bail!("auth.notifier `{other}` is not known; use file or log"),
    }
}

/// The configured signing keys, or those of `<data_dir>/jwt.keys` (created with one
/// random key on first start).
pub fn signing_keys(config: &AuthConfig, data_dir: &Path) -> anyhow::Result<JwtKeys> {
    if !config.jwt_keys.0.is_empty() {
        return Ok(config.jwt_keys.clone());
    }
    let path = digame_infra::config::jwt_keys_path(data_dir);
    if let Ok(text) = std::fs::read_to_string(&path) {
        return JwtKeys::parse(text.trim()).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()));
    }
    use std::io::Write;
    std::fs::create_dir_all(data_dir)?;
    let line = format!(
        "k{}:{}",
        chrono::Utc::now().format("%Y%m%d%H%M%S"),
        random_secret()
    );
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(&path)?;
    f.write_all(line.as_bytes())?;
    f.sync_all()?;
    JwtKeys::parse(&line).map_err(anyhow::Error::msg)
}

/// What a fresh installation was given: shown once.
#[derive(Debug)]
pub struct Bootstrapped {
    pub email: String,
    /// `None` when taken from `DIGAME_ADMIN_PASSWORD`.
    pub generated_password: Option<String>,
    pub ingest_key: String,
}

/// Keeps the stored role catalogue in step and, when no account exists yet, creates the
/// tenant `default`, a platform admin (password from `admin_password`, else generated),
/// and an ingestion key for `default`.
pub async fn bootstrap(
    meta: &MetaStore,
    config: &AuthConfig,
    admin_password: Option<String>,
) -> anyhow::Result<Option<Bootstrapped>> {
    let (roles, permissions) = super::rbac::catalogue();
    meta.sync_catalogue(&roles, &permissions).await?;
    if meta.account_count().await? > 0 {
        return Ok(None);
    }
    if !meta
        .tenants()
        .await?
        .iter()
        .any(|t| t.tenant_id == "default")
    {
        meta.create_tenant("default", "Default tenant").await?;
    }
    let email = config.bootstrap_email.clone();
    let (password, generated) = match admin_password {
        Some(p) => {
            passwords::check_policy(&p, &[&email])
                .map_err(|e| anyhow::anyhow!("DIGAME_ADMIN_PASSWORD: {e}"))?;
            (p, false)
        }
        None => (passwords::generate(), true),
    };
    let hash = hash_password(&password).await;
    let admin = meta
        .create_account(
            &NewAccount {
                tenant_id: "default",
                email: &email,
                role: Role::PlatformAdmin.name(),
                person_id: None,
                display_name: "Administrator",
            },
            &hash,
        )
        .await?;
    let (key, _) = new_key(
        "default",
        "first collector key",
        Role::IngestionAgent,
        Vec::new(),
        vec!["/v1/events".into()],
        &admin.account_id,
    );
    meta.create_api_key(&key.1).await?;
    Ok(Some(Bootstrapped {
        email,
        generated_password: generated.then_some(password),
        ingest_key: key.0,
    }))
}

/// Replaces the password of the account with `email` (any tenant) from the command line,
/// for an owner locked out: `password` when given (it must pass the policy), else a
/// generated one, which is returned to be shown once. The account's sessions are revoked.
pub async fn reset_password(
    meta: &MetaStore,
    email: &str,
    password: Option<String>,
) -> anyhow::Result<Option<String>> {
    let Some((account, _)) = meta.account_for_login(email).await? else {
        anyhow::bail!(
            "no account has the email `{email}` in this metadata store; check --email and --data-dir (or meta.url)"
        );
    };
    let (password, generated) = match password {
        Some(p) => {
            passwords::check_policy(&p, &[&account.email])
                .map_err(|e| anyhow::anyhow!("DIGAME_ADMIN_PASSWORD: {e}"))?;
            (p, false)
        }
        None => (passwords::generate(), true),
    };
    let hash = hash_password(&password).await;
    meta.set_password(&account.account_id, &hash).await?;
    Ok(generated.then_some(password))
}

/// A new key: `((full key, record), key_id)`.
fn new_key(
    tenant: &str,
    name: &str,
    role: Role,
    sources: Vec<String>,
    endpoints: Vec<String>,
    created_by: &str,
) -> ((String, ApiKeyRecord), String) {
    let key_id = random_secret()[..16].to_string();
    let secret = random_secret();
    let full = format!("{KEY_PREFIX}{key_id}_{secret}");
    let record = ApiKeyRecord {
        key_id: key_id.clone(),
        tenant_id: tenant.into(),
        name: name.into(),
        secret_hash: digest(&secret),
        role: role.name().into(),
        sources,
        endpoints,
        created_by: created_by.into(),
        created_at: now_ms(),
        revoked_at: None,
    };
    ((full, record), key_id)
}

/// Issues an access token and starts a session with its first refresh token.
async fn issue_tokens(state: &AppState, account: &Account) -> Result<Response, ApiError> {
    let refresh = random_secret();
    let expires = now_ms() + state.auth.config.refresh_ttl_secs as i64 * 1000;
    let session = state
        .meta
        .start_session(account, &refresh, expires)
        .await
        .map_err(ApiError::Meta)?;
    Ok(token_response(state, account, &session, &refresh))
}

fn token_response(state: &AppState, account: &Account, session: &str, refresh: &str) -> Response {
    let access = state.auth.tokens.issue(
        Claims::new(
            &account.account_id,
            &account.tenant_id,
            &account.role,
            account.person_id.as_deref(),
            session,
        ),
        now_ms() / 1000,
    );
    Json(json!({
        "access_token": access,
        "token_type": "Bearer",
        "expires_in": state.auth.tokens.access_ttl_secs,
        "refresh_token": refresh,
        "refresh_expires_in": state.auth.config.refresh_ttl_secs,
        "account": account,
    }))
    .into_response()
}

/// An audit record of an identity action by `actor` of `tenant`.
fn audit_entry(
    parts: &Parts,
    tenant: &str,
    actor: &str,
    kind: &str,
    action: &str,
    outcome: StatusCode,
    detail: String,
) -> AuditRecord {
    AuditRecord {
        event_id: uuid::Uuid::now_v7().to_string(),
        at: now_ms(),
        tenant_id: tenant.into(),
        actor: actor.into(),
        actor_kind: kind.into(),
        action: action.into(),
        target: parts.uri.path().into(),
        source_ip: client_ip(parts),
        request_id: parts
            .headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .into(),
        outcome: i32::from(outcome.as_u16()),
        detail,
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    email: String,
    password: String,
}

/// `POST /v1/auth/login`: email + password → access and refresh tokens. Attempts are
/// limited per address and per client; a wrong password and an unknown address answer
/// the same, in the same time.
pub async fn login(
    State(state): State<Arc<AppState>>,
    parts: Parts,
    body: Result<Json<LoginRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let req = json_body(body, r#"{"email": "…", "password": "…"}"#)?;
    let email = req.email.trim().to_lowercase();
    if let Err(limited) = state.auth.limiter.charge_login(&email, &client_ip(&parts)) {
        return Ok(super::rate_limited(limited));
    }
    let found = state
        .meta
        .account_for_login(&email)
        .await
        .map_err(ApiError::Meta)?;
    let stored = found
        .as_ref()
        .map_or_else(|| passwords::decoy_hash().to_string(), |(_, h)| h.clone());
    let password = req.password;
    let ok = blocking(move || passwords::verify(&password, &stored)).await;
    match found {
        Some((account, _)) if ok && !account.disabled => {
            let entry = audit_entry(
                &parts,
                &account.tenant_id,
                &account.account_id,
                "account",
                "POST /v1/auth/login",
                StatusCode::OK,
                String::new(),
            );
            state.audit.record(entry).await;
            issue_tokens(&state, &account).await
        }
        other => {
            if let Some((account, _)) = other {
                let entry = audit_entry(
                    &parts,
                    &account.tenant_id,
                    &account.account_id,
                    "account",
                    "POST /v1/auth/login",
                    StatusCode::UNAUTHORIZED,
                    if account.disabled {
                        "account disabled"
                    } else {
                        "wrong password"
                    }
                    .into(),
                );
                state.audit.record(entry).await;
            }
            Err(ApiError::Unauthorized(
                "wrong email or password (or the account is disabled)".into(),
            ))
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefreshRequest {
    refresh_token: String,
}

/// `POST /v1/auth/refresh`: spends a refresh token for a new pair. A token presented a
/// second time revokes its whole session.
pub async fn refresh(
    State(state): State<Arc<AppState>>,
    parts: Parts,
    body: Result<Json<RefreshRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let req = json_body(body, r#"{"refresh_token": "…"}"#)?;
    let next = random_secret();
    let expires = now_ms() + state.auth.config.refresh_ttl_secs as i64 * 1000;
    match state
        .meta
        .rotate_refresh(&req.refresh_token, &next, expires)
        .await
        .map_err(ApiError::Meta)?
    {
        RefreshOutcome::Spent {
            family_id,
            account_id,
            tenant_id,
        } => {
            let account = state
                .meta
                .account(&tenant_id, &account_id)
                .await
                .map_err(ApiError::Meta)?
                .filter(|a| !a.disabled)
                .ok_or_else(|| ApiError::Unauthorized("the account is disabled".into()))?;
            Ok(token_response(&state, &account, &family_id, &next))
        }
        RefreshOutcome::Reused { family_id } => {
            state.auth.apply_revoked(std::slice::from_ref(&family_id));
            tracing::warn!(session = %family_id, ip = %client_ip(&parts), "a spent refresh token was presented again; session revoked");
            Err(ApiError::Unauthorized(
                "this refresh token was already used, so the session has been revoked (if that was not you, change your password); sign in again".into(),
            ))
        }
        RefreshOutcome::Invalid => Err(ApiError::Unauthorized(
            "unknown, expired or revoked refresh token; sign in again".into(),
        )),
    }
}

/// `POST /v1/auth/logout`: ends the caller's session (its access and refresh tokens).
pub async fn logout(
    State(state): State<Arc<AppState>>,
    me: Principal,
) -> Result<StatusCode, ApiError> {
    let session = me.session.as_deref().ok_or_else(|| {
        ApiError::BadRequest(
            "only signed-in accounts have a session to end; revoke keys at DELETE /v1/keys/{id}"
                .into(),
        )
    })?;
    state
        .meta
        .revoke_session(session, "signed out")
        .await
        .map_err(ApiError::Meta)?;
    state.auth.apply_revoked(&[session.to_string()]);
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /v1/auth/me`: who the caller is and what it may do.
pub async fn me(me: Principal) -> Json<serde_json::Value> {
    Json(json!({
        "tenant_id": &*me.tenant,
        "actor": &*me.actor,
        "kind": me.kind.name(),
        "role": me.role,
        "person_id": me.person.as_deref(),
        "permissions": me.role.permissions().iter().map(Permission::name).collect::<Vec<_>>(),
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PasswordChange {
    current_password: String,
    new_password: String,
}

/// `POST /v1/auth/password`: changes the caller's password; every session ends.
pub async fn change_password(
    State(state): State<Arc<AppState>>,
    me: Principal,
    body: Result<Json<PasswordChange>, JsonRejection>,
) -> Result<StatusCode, ApiError> {
    let req = json_body(body, r#"{"current_password": "…", "new_password": "…"}"#)?;
    if me.kind != ActorKind::Account {
        return Err(ApiError::BadRequest("keys have no password".into()));
    }
    let (account, stored) = state
        .meta
        .account_with_hash(&me.tenant, &me.actor)
        .await
        .map_err(ApiError::Meta)?
        .ok_or_else(|| ApiError::Unauthorized("the account no longer exists".into()))?;
    let current = req.current_password;
    if !blocking(move || passwords::verify(&current, &stored)).await {
        return Err(ApiError::Forbidden("the current password is wrong".into()));
    }
    set_password(&state, &account, req.new_password).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Checks, hashes and stores a new password; ends the account's sessions.
async fn set_password(
    state: &AppState,
    account: &Account,
    password: String,
) -> Result<(), ApiError> {
    passwords::check_policy(&password, &[&account.email, &account.display_name])
        .map_err(ApiError::BadRequest)?;
    let hash = hash_password(&password).await;
    state
        .meta
        .set_password(&account.account_id, &hash)
        .await
        .map_err(ApiError::Meta)?;
    sync_revocations(state).await
}

/// Applies on this node, now, the sessions just revoked in the store (other nodes follow
/// within `meta.refresh_ms`).
async fn sync_revocations(state: &AppState) -> Result<(), ApiError> {
    let since = now_ms() - (state.auth.tokens.access_ttl_secs + 60) * 1000;
    let (revoked, _) = state
        .meta
        .revoked_sessions_since(0, since)
        .await
        .map_err(ApiError::Meta)?;
    state.auth.apply_revoked(&revoked);
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResetRequest {
    email: String,
}

/// `POST /v1/auth/password-reset`: sends a single-use reset token to the address, if it
/// has an account. Answers 202 either way, so it cannot be used to find accounts.
pub async fn request_reset(
    State(state): State<Arc<AppState>>,
    parts: Parts,
    body: Result<Json<ResetRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let req = json_body(body, r#"{"email": "…"}"#)?;
    let email = req.email.trim().to_lowercase();
    if let Err(limited) = state.auth.limiter.charge_login(&email, &client_ip(&parts)) {
        return Ok(super::rate_limited(limited));
    }
    if let Some((account, _)) = state
        .meta
        .account_for_login(&email)
        .await
        .map_err(ApiError::Meta)?
        .filter(|(a, _)| !a.disabled)
    {
        let token = random_secret();
        let ttl = state.auth.config.reset_ttl_secs;
        state
            .meta
            .create_password_reset(&account.account_id, &token, now_ms() + ttl as i64 * 1000)
            .await
            .map_err(ApiError::Meta)?;
        let body = format!(
            "A password reset was requested for your Digame account.\n\nReset token (valid {} minutes, once):\n{token}\n\nSend it with a new password to POST /v1/auth/password-reset/confirm.\nIf you did not ask for this, ignore this message.",
            ttl / 60
        );
        if let Err(e) = state
            .notifier
            .deliver(&account.email, "Digame password reset", &body)
        {
            tracing::error!(error = %e, "could not deliver a password-reset message");
        }
        let entry = audit_entry(
            &parts,
            &account.tenant_id,
            &account.account_id,
            "account",
            "POST /v1/auth/password-reset",
            StatusCode::ACCEPTED,
            String::new(),
        );
        state.audit.record(entry).await;
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"message": "if the address has an account, a reset token is on its way"})),
    )
        .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResetConfirm {
    token: String,
    new_password: String,
}

/// `POST /v1/auth/password-reset/confirm`: sets a new password with a reset token.
pub async fn confirm_reset(
    State(state): State<Arc<AppState>>,
    parts: Parts,
    body: Result<Json<ResetConfirm>, JsonRejection>,
) -> Result<StatusCode, ApiError> {
    let req = json_body(body, r#"{"token": "…", "new_password": "…"}"#)?;
    // The policy is checked before the token is spent, so a weak choice can be retried.
    passwords::check_policy(&req.new_password, &[]).map_err(ApiError::BadRequest)?;
    let account_id = state
        .meta
        .consume_password_reset(&req.token)
        .await
        .map_err(ApiError::Meta)?
        .ok_or_else(|| {
            ApiError::Unauthorized("unknown, used or expired reset token; request a new one".into())
        })?;
    let account = state
        .meta
        .account_by_id(&account_id)
        .await
        .map_err(ApiError::Meta)?
        .ok_or_else(|| ApiError::Unauthorized("the account no longer exists".into()))?;
    set_password(&state, &account, req.new_password).await?;
    let entry = audit_entry(
        &parts,
        &account.tenant_id,
        &account.account_id,
        "account",
        "POST /v1/auth/password-reset/confirm",
        StatusCode::NO_CONTENT,
        String::new(),
    );
    state.audit.record(entry).await;
    Ok(StatusCode::NO_CONTENT)
}

/// A role name from a request, which the caller must be allowed to grant.
fn grantable(me: &Principal, name: &str) -> Result<Role, ApiError> {
    let role = Role::parse(name).ok_or_else(|| {
        ApiError::BadRequest(format!(
            "unknown role `{name}`; use one of {}",
            Role::ALL.map(Role::name).join(", ")
        ))
    })?;
    if !me.role.may_grant(role) {
        return Err(ApiError::Forbidden(format!(
            "a {} cannot grant the role {}",
            me.role.name(),
            role.name()
        )));
    }
    Ok(role)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewAccountRequest {
    email: String,
    role: String,
    person_id: Option<String>,
    display_name: Option<String>,
    /// Omitted: one is generated and returned once.
    password: Option<String>,
}

/// `POST /v1/accounts`: creates an account in the caller's tenant.
pub async fn create_account(
    State(state): State<Arc<AppState>>,
    me: Principal,
    body: Result<Json<NewAccountRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let req = json_body(
        body,
        r#"{"email": "…", "role": "member", "person_id": "optional", "display_name": "optional", "password": "optional"}"#,
    )?;
    let role = grantable(&me, &req.role)?;
    if !req.email.contains('@') || req.email.len() > 254 {
        return Err(ApiError::BadRequest(format!(
            "`{}` is not an email address",
            req.email
        )));
    }
    if let Some(p) = &req.person_id {
        digame_schemas::validate::validate_user_id(p)
            .map_err(|e| ApiError::BadRequest(format!("person_id: {e}")))?;
    }
    let name = req.display_name.clone().unwrap_or_default();
    let (password, generated) = match req.password {
        Some(p) => {
            passwords::check_policy(&p, &[&req.email, &name]).map_err(ApiError::BadRequest)?;
            (p, false)
        }
        None => (passwords::generate(), true),
    };
    let hash = hash_password(&password).await;
    let account = state
        .meta
        .create_account(
            &NewAccount {
                tenant_id: &me.tenant,
                email: &req.email,
                role: role.name(),
                person_id: req.person_id.as_deref(),
                display_name: &name,
            },
            &hash,
        )
        .await
        .map_err(ApiError::Meta)?;
    let mut body = json!({"account": account});
    if generated {
        body["initial_password"] = json!(password);
    }
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// `GET /v1/accounts`.
pub async fn list_accounts(
    State(state): State<Arc<AppState>>,
    me: Principal,
) -> Result<Json<serde_json::Value>, ApiError> {
    let accounts = state
        .meta
        .accounts(&me.tenant)
        .await
        .map_err(ApiError::Meta)?;
    Ok(Json(json!({"accounts": accounts})))
}

fn no_such(what: &str, id: &str) -> ApiError {
    ApiError::NotFound(format!("no {what} `{id}` in this tenant"))
}

/// `GET /v1/accounts/{account_id}`.
pub async fn get_account(
    State(state): State<Arc<AppState>>,
    me: Principal,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<Account>, ApiError> {
    state
        .meta
        .account(&me.tenant, &id)
        .await
        .map_err(ApiError::Meta)?
        .map(Json)
        .ok_or_else(|| no_such("account", &id))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountPatch {
    role: Option<String>,
    #[serde(default, with = "double_option")]
    person_id: Option<Option<String>>,
    display_name: Option<String>,
    disabled: Option<bool>,
}

/// `null` and absent told apart: `Some(None)` clears.
mod double_option {
    use serde::{Deserialize, Deserializer};
    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Option<String>>, D::Error> {
        Option::<String>::deserialize(d).map(Some)
    }
}

/// `PATCH /v1/accounts/{account_id}`: role, person link, name, disabled.
pub async fn patch_account(
    State(state): State<Arc<AppState>>,
    me: Principal,
    UrlPath(id): UrlPath<String>,
    body: Result<Json<AccountPatch>, JsonRejection>,
) -> Result<Json<Account>, ApiError> {
    let req = json_body(
        body,
        r#"{"role": "analyst", "person_id": "u-1" | null, "display_name": "…", "disabled": true}"#,
    )?;
    let target = state
        .meta
        .account(&me.tenant, &id)
        .await
        .map_err(ApiError::Meta)?
        .ok_or_else(|| no_such("account", &id))?;
    // Nobody changes an account above their own standing, nor raises anyone above it.
    if let Some(current) = Role::parse(&target.role) {
        grantable(&me, current.name())?;
    }
    if let Some(r) = &req.role {
        grantable(&me, r)?;
    }
    if let Some(Some(p)) = &req.person_id {
        digame_schemas::validate::validate_user_id(p)
            .map_err(|e| ApiError::BadRequest(format!("person_id: {e}")))?;
    }
    let change = AccountChange {
        role: req.role,
        person_id: req.person_id,
        display_name: req.display_name,
        disabled: req.disabled,
    };
    let updated = state
        .meta
        .update_account(&me.tenant, &id, &change)
        .await
        .map_err(ApiError::Meta)?
        .ok_or_else(|| no_such("account", &id))?;
    // In force on this node from the next request; on others within `meta.refresh_ms`.
    state.auth.apply_accounts(std::slice::from_ref(&updated));
    if change.disabled == Some(true) {
        sync_revocations(&state).await?;
    }
    Ok(Json(updated))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewKeyRequest {
    name: String,
    /// Default `ingestion_agent`.
    role: Option<String>,
    /// Event sources the key may send (empty or omitted: any).
    #[serde(default)]
    sources: Vec<String>,
    /// Routes the key may call, as path patterns; `[]` means every route its role allows.
    /// Default: `/v1/events` for an ingestion agent, every route for any other role.
    endpoints: Option<Vec<String>>,
}

/// `POST /v1/keys`: creates an API key; the key is in this response only.
pub async fn create_key(
    State(state): State<Arc<AppState>>,
    me: Principal,
    body: Result<Json<NewKeyRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let req = json_body(
        body,
        r#"{"name": "laptop watcher", "role": "ingestion_agent", "sources": ["activitywatch"], "endpoints": ["/v1/events"]}"#,
    )?;
    if req.name.trim().is_empty() || req.name.len() > 200 {
        return Err(ApiError::BadRequest(
            "name must be 1 to 200 characters".into(),
        ));
    }
    let role = grantable(&me, req.role.as_deref().unwrap_or("ingestion_agent"))?;
    // Omitted endpoints follow the role: a collector sends events, an admin or analyst
    // key is for automation over the routes its permissions allow.
    let endpoints = req.endpoints.unwrap_or_else(|| match role {
        Role::IngestionAgent => vec!["/v1/events".into()],
        _ => Vec::new(),
    });
    for e in &endpoints {
        if !state.route_paths.iter().any(|p| p == e) {
            return Err(ApiError::BadRequest(format!(
                "endpoint `{e}` is not a route of this API (write path patterns like /v1/events)"
            )));
        }
    }
    let ((full, record), key_id) = new_key(
        &me.tenant,
        req.name.trim(),
        role,
        req.sources,
        endpoints,
        &me.actor,
    );
    state
        .meta
        .create_api_key(&record)
        .await
        .map_err(ApiError::Meta)?;
    state.auth.apply_keys(std::slice::from_ref(&record));
    Ok((
        StatusCode::CREATED,
        Json(json!({"key": full, "key_id": key_id, "details": record,
            "note": "store the key now: it is shown only in this response"})),
    )
        .into_response())
}

/// `GET /v1/keys`: the tenant's keys, without secrets.
pub async fn list_keys(
    State(state): State<Arc<AppState>>,
    me: Principal,
) -> Result<Json<serde_json::Value>, ApiError> {
    let keys = state
        .meta
        .api_keys(&me.tenant)
        .await
        .map_err(ApiError::Meta)?;
    Ok(Json(json!({"keys": keys})))
}

/// `DELETE /v1/keys/{key_id}`: revokes a key at once on this node, within
/// `meta.refresh_ms` on others.
pub async fn revoke_key(
    State(state): State<Arc<AppState>>,
    me: Principal,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<ApiKeyRecord>, ApiError> {
    let key = state
        .meta
        .revoke_api_key(&me.tenant, &id)
        .await
        .map_err(ApiError::Meta)?
        .ok_or_else(|| no_such("API key", &id))?;
    state.auth.apply_keys(std::slice::from_ref(&key));
    Ok(Json(key))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditParams {
    from: Option<String>,
    to: Option<String>,
    actor: Option<String>,
    action: Option<String>,
    limit: Option<i64>,
}

/// `GET /v1/audit?from=&to=&actor=&action=&limit=`: the tenant's audit records, newest
/// first (at most 10,000; default 100).
pub async fn get_audit(
    State(state): State<Arc<AppState>>,
    me: Principal,
    params: Result<Query<AuditParams>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(p) = params.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let time = |name: &str, v: Option<&str>| -> Result<Option<i64>, ApiError> {
        v.map(|t| crate::parse_time(name, t).map(|t| t.0))
            .transpose()
    };
    let q = AuditQuery {
        from: time("from", p.from.as_deref())?,
        to: time("to", p.to.as_deref())?,
        actor: p.actor,
        action_prefix: p.action,
        limit: p.limit.unwrap_or(100),
    };
    // Every record of a request that completed before this one is written first.
    state.audit.flush().await;
    let records = state
        .meta
        .audit(&me.tenant, &q)
        .await
        .map_err(ApiError::Meta)?;
    Ok(Json(json!({"records": records})))
}

/// `GET /v1/roles`: the catalogue.
pub async fn roles() -> Json<serde_json::Value> {
    let roles: Vec<_> = Role::ALL
        .iter()
        .map(|r| {
            json!({"role": r, "description": r.description(),
                "permissions": r.permissions().iter().map(Permission::name).collect::<Vec<_>>()})
        })
        .collect();
    let permissions: Vec<_> = Permission::ALL
        .iter()
        .map(|p| json!({"permission": p.name(), "description": p.description()}))
        .collect();
    Json(json!({"roles": roles, "permissions": permissions}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewTenantRequest {
    tenant_id: String,
    name: String,
    admin_email: String,
}

/// `POST /v1/tenants`: creates a tenant and its first tenant admin (password returned
/// once).
pub async fn create_tenant(
    State(state): State<Arc<AppState>>,
    body: Result<Json<NewTenantRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let req = json_body(
        body,
        r#"{"tenant_id": "acme", "name": "Acme Corp", "admin_email": "it@acme.example"}"#,
    )?;
    let password = passwords::generate();
    let hash = hash_password(&password).await;
    // One transaction: an admin address that is taken or invalid leaves no tenant behind.
    let (tenant, admin) = state
        .meta
        .create_tenant_with_admin(
            &req.tenant_id,
            &req.name,
            &NewAccount {
                tenant_id: &req.tenant_id,
                email: &req.admin_email,
                role: Role::TenantAdmin.name(),
                person_id: None,
                display_name: "Tenant administrator",
            },
            &hash,
        )
        .await
        .map_err(ApiError::Meta)?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"tenant": tenant, "admin": admin, "initial_password": password})),
    )
        .into_response())
}

/// `GET /v1/tenants`.
pub async fn list_tenants(
    State(state): State<Arc<AppState>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let tenants = state.meta.tenants().await.map_err(ApiError::Meta)?;
    Ok(Json(json!({"tenants": tenants})))
}
