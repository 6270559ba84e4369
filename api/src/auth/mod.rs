//! Authentication and authorization of every request.
//!
//! What it owns and guarantees:
//! - **Deny by default.** Every route declares its [`Access`] in the route table
//!   (`crate::routes`); the [`authorize`] middleware looks the matched route up and refuses
//!   (403) any route that declares nothing. A test enumerates the table.
//! - **Who is calling.** `Authorization: Bearer` carries an access token (JWT, see
//!   [`tokens`]), an API key (`dgk_<id>_<secret>`, stored as a SHA-256 digest, compared in
//!   constant time), or a key from config (`ingest.keys`, `admin.keys`). The result is a
//!   [`Principal`]: tenant, actor, role, linked person. Its tenant scopes everything the
//!   request reads or writes; no request names its tenant.
//! - **Revocation and changes are immediate.** Revoked sessions and API keys, and
//!   accounts' role, person link and disabled state, are followed from the metadata store
//!   every `meta.refresh_ms` and applied at once on the node that changed them. An access
//!   token names its account; what the account may do is looked up on every request, so
//!   a demotion, relink or disable applies to tokens already issued.
//! - **Limits and audit.** Each authenticated request is charged to its caller's and
//!   tenant's token buckets ([`limits`]); every mutating request and every read of another
//!   person's data is appended to the audit log with who, what, when, from where and the
//!   outcome.

pub mod audit;
pub mod handlers;
pub mod limits;
pub mod passwords;
pub mod rbac;
pub mod tokens;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use axum::extract::{ConnectInfo, FromRequestParts, MatchedPath, RawPathParams, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use digame_infra::config::IngestKeys;
use digame_infra::meta::identity::{Account, ApiKeyRecord, AuditRecord, digest};
use subtle::ConstantTimeEq;

use crate::{ApiError, AppState};
use rbac::{Permission, Role};

/// What a route requires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Anyone, without credentials (health, schema, sign-in).
    Public,
    /// A caller holding this permission (object-level checks follow in the handler).
    Requires(Permission),
}

/// How the caller proved who it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActorKind {
    /// A signed-in account (access token).
    Account,
    /// An API key created through the API.
    ApiKey,
    /// A key from the configuration.
    ConfigKey,
}

impl ActorKind {
    pub fn name(self) -> &'static str {
        match self {
            ActorKind::Account => "account",
            ActorKind::ApiKey => "api_key",
            ActorKind::ConfigKey => "config_key",
        }
    }
}

/// What an API key may do beyond its role: which event sources it may send (empty: any)
/// and which routes it may call (empty: any its role allows).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyScope {
    pub sources: Vec<String>,
    pub endpoints: Vec<String>,
}

/// The authenticated caller of a request.
#[derive(Clone, Debug)]
pub struct Principal {
    pub tenant: Arc<str>,
    /// Account id or key id.
    pub actor: Arc<str>,
    pub kind: ActorKind,
    pub role: Role,
    /// The person (pseudonymous user id) the account is, if linked.
    pub person: Option<Arc<str>>,
    /// The session of an access token.
    pub session: Option<Arc<str>>,
    pub scope: Option<Arc<KeyScope>>,
}

impl Principal {
    pub fn can(&self, p: Permission) -> bool {
        self.role.permissions().contains(p)
    }

    /// Whether `user` is the caller's own person.
    pub fn is_self(&self, user: &str) -> bool {
        self.person.as_deref() == Some(user)
    }

    /// Object-level check for a person's data: the caller's own, or anyone's with
    /// `features:read:tenant`.
    pub fn may_read_person(&self, user: &str) -> Result<(), ApiError> {
        if self.is_self(user) || self.can(Permission::FeaturesReadTenant) {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!(
                "you may read only your own person-level data; reading `{user}` needs {}",
                Permission::FeaturesReadTenant.name()
            )))
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<Principal>().cloned().ok_or_else(|| {
            // Only reachable if a public route's handler asks for a caller.
            tracing::error!(path = %parts.uri.path(), "handler needs a principal on a route declared public");
            ApiError::Unauthorized("this route needs credentials".into())
        })
    }
}

/// A verified key: its digest (for the constant-time comparison) and what it acts as.
struct KeyEntry {
    secret_hash: String,
    principal: Principal,
    revoked: bool,
}

/// Authentication state shared by the handlers.
pub struct Auth {
    pub tokens: tokens::TokenKeys,
    pub limiter: limits::Limiter,
    pub config: digame_infra::config::AuthConfig,
    /// API keys by key id.
    keys: RwLock<HashMap<String, KeyEntry>>,
    /// Config keys by the digest of the whole key.
    config_keys: HashMap<String, Principal>,
    /// Revoked sessions → when they were revoked (ms).
    revoked: RwLock<HashMap<String, i64>>,
    /// Accounts' current standing by account id, followed from the metadata store: what an
    /// access token's bearer may do now, whatever the token said when it was issued.
    standing: RwLock<HashMap<String, Standing>>,
}

/// What an account may do now: its role and person link, and whether it is disabled.
struct Standing {
    role: Role,
    person: Option<Arc<str>>,
    disabled: bool,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("tokens", &self.tokens)
            .finish_non_exhaustive()
    }
}

/// The `dgk_` form of an API key.
pub const KEY_PREFIX: &str = "dgk_";

/// Splits `dgk_<id>_<secret>`.
fn split_key(token: &str) -> Option<(&str, &str)> {
    token.strip_prefix(KEY_PREFIX)?.split_once('_')
}

impl Auth {
    /// `ingest` keys act as `ingestion_agent`, `admin` keys as `tenant_admin`, of their
    /// tenants.
    pub fn new(
        tokens: tokens::TokenKeys,
        config: digame_infra::config::AuthConfig,
        limits: &digame_infra::config::LimitsConfig,
        ingest: &IngestKeys,
        admin: &IngestKeys,
    ) -> Auth {
        let mut config_keys = HashMap::new();
        for (keys, role) in [(ingest, Role::IngestionAgent), (admin, Role::TenantAdmin)] {
            for (key, tenant) in &keys.0 {
                let d = digest(key);
                config_keys.insert(
                    d.clone(),
                    Principal {
                        tenant: tenant.as_str().into(),
                        // The digest's head names the key in logs and audit, never the key.
                        actor: format!("config:{}", &d[..12]).into(),
                        kind: ActorKind::ConfigKey,
                        role,
                        person: None,
                        session: None,
                        scope: None,
                    },
                );
            }
        }
        Auth {
            tokens,
            limiter: limits::Limiter::new(limits),
            config,
            keys: RwLock::new(HashMap::new()),
            config_keys,
            revoked: RwLock::new(HashMap::new()),
            standing: RwLock::new(HashMap::new()),
        }
    }

    /// Takes in created or changed accounts: from the next request on, a token of theirs
    /// acts with the account's current role and person link, and a disabled account's
    /// tokens are refused.
    pub fn apply_accounts(&self, changed: &[Account]) {
        let mut standing = self.standing.write().expect("account standing lock");
        for a in changed {
            let role = Role::parse(&a.role);
            if role.is_none() {
                tracing::warn!(account = %a.account_id, role = %a.role, "stored account has an unknown role; its tokens are refused");
            }
            standing.insert(
                a.account_id.clone(),
                Standing {
                    role: role.unwrap_or(Role::Member),
                    person: a.person_id.as_deref().map(Into::into),
                    disabled: a.disabled || role.is_none(),
                },
            );
        }
    }

    /// Takes in created or revoked API keys.
    pub fn apply_keys(&self, changed: &[ApiKeyRecord]) {
        let mut keys = self.keys.write().expect("key map lock");
        for k in changed {
            let Some(role) = Role::parse(&k.role) else {
                tracing::warn!(key = %k.key_id, role = %k.role, "stored API key has an unknown role; ignored");
                continue;
            };
            // A revocation is final: a change list read before it committed (the follower
            // racing the revoking request) must not bring the key back.
            let revoked = k.revoked_at.is_some() || keys.get(&k.key_id).is_some_and(|e| e.revoked);
            keys.insert(
                k.key_id.clone(),
                KeyEntry {
                    secret_hash: k.secret_hash.clone(),
                    revoked,
                    principal: Principal {
                        tenant: k.tenant_id.as_str().into(),
                        actor: k.key_id.as_str().into(),
                        kind: ActorKind::ApiKey,
                        role,
                        person: None,
                        session: None,
                        scope: Some(Arc::new(KeyScope {
                            sources: k.sources.clone(),
                            endpoints: k.endpoints.clone(),
                        })),
                    },
                },
            );
        }
    }

    /// Takes in revoked sessions; forgets those older than an access token's lifetime
    /// (their tokens have expired anyway).
    pub fn apply_revoked(&self, sessions: &[String]) {
        let now = digame_schemas::EventTime::now().0;
        let horizon = now - (self.tokens.access_ttl_secs + 60) * 1000;
        let mut revoked = self.revoked.write().expect("revocation lock");
        revoked.retain(|_, at| *at > horizon);
        for s in sessions {
            revoked.insert(s.clone(), now);
        }
    }

    /// The caller of a bearer credential.
    pub fn authenticate(&self, bearer: &str) -> Result<Principal, ApiError> {
        if let Some((key_id, secret)) = split_key(bearer) {
            let keys = self.keys.read().expect("key map lock");
            let entry = keys.get(key_id);
            let presented = digest(secret);
            // Compare against something even for an unknown id, so timing does not tell
            // which ids exist.
            let stored = entry.map_or(presented.as_str(), |e| e.secret_hash.as_str());
            let equal: bool = presented.as_bytes().ct_eq(stored.as_bytes()).into();
            return match entry {
                Some(e) if equal && !e.revoked => Ok(e.principal.clone()),
                _ => Err(ApiError::Unauthorized("unknown or revoked API key".into())),
            };
        }
        if bearer.matches('.').count() == 2 {
            let claims = self
                .tokens
                .verify(bearer)
                .map_err(|e| ApiError::Unauthorized(e.to_string()))?;
            if self
                .revoked
                .read()
                .expect("revocation lock")
                .contains_key(&claims.sid)
            {
                return Err(ApiError::Unauthorized(
                    "the session of this token was ended (signed out, password changed or refresh token reused); sign in again".into(),
                ));
            }
            // The account's standing now, not as the token recorded it at issue. An
            // account not (yet) followed here was created after the last follow, so the
            // token's claims are its standing.
            let (role, person) = match self
                .standing
                .read()
                .expect("account standing lock")
                .get(&claims.sub)
            {
                Some(s) if s.disabled => {
                    return Err(ApiError::Unauthorized(
                        "this account is disabled; ask your tenant admin".into(),
                    ));
                }
                Some(s) => (s.role, s.person.clone()),
                None => (
                    Role::parse(&claims.role).expect("verify checked the role"),
                    claims.person.map(Into::into),
                ),
            };
            return Ok(Principal {
                tenant: claims.tid.into(),
                actor: claims.sub.into(),
                kind: ActorKind::Account,
                role,
                person,
                session: Some(claims.sid.into()),
                scope: None,
            });
        }
        self.config_keys
            .get(&digest(bearer))
            .cloned()
            .ok_or_else(|| ApiError::Unauthorized("unknown or revoked key".into()))
    }
}

/// The metadata revisions the credential follower has applied.
#[derive(Clone, Copy, Debug, Default)]
pub struct Followed {
    keys: i64,
    sessions: i64,
    accounts: i64,
    forgets: i64,
}

/// Applies what other nodes changed since `seen` (accounts, keys, revoked sessions, and
/// deletions the read cache must forget); returns the revisions now applied. A read that
/// fails keeps its revision, so the next run reads it again.
pub async fn follow(state: Arc<AppState>, mut seen: Followed) -> Followed {
    let meta = &state.meta;
    match meta.invalidations_since(seen.forgets).await {
        Ok((forgotten, rev)) => {
            if let Some(cache) = state.query.cache() {
                for (tenant, user) in &forgotten {
                    cache.forget(tenant, user.as_deref());
                }
            }
            seen.forgets = rev;
        }
        Err(e) => {
            tracing::warn!(error = %e, "reading read-cache invalidations failed; retrying")
        }
    }
    match meta.account_changes_since(seen.accounts).await {
        Ok((changed, rev)) => {
            state.auth.apply_accounts(&changed);
            seen.accounts = rev;
        }
        Err(e) => tracing::warn!(error = %e, "reading account changes failed; retrying"),
    }
    match meta.api_key_changes_since(seen.keys).await {
        Ok((changed, rev)) => {
            state.auth.apply_keys(&changed);
            seen.keys = rev;
        }
        Err(e) => tracing::warn!(error = %e, "reading API key changes failed; retrying"),
    }
    let since =
        digame_schemas::EventTime::now().0 - (state.auth.tokens.access_ttl_secs + 60) * 1000;
    match meta.revoked_sessions_since(seen.sessions, since).await {
        Ok((revoked, rev)) => {
            state.auth.apply_revoked(&revoked);
            seen.sessions = rev;
        }
        Err(e) => tracing::warn!(error = %e, "reading revoked sessions failed; retrying"),
    }
    state.auth.limiter.shrink();
    seen
}

/// The bearer credential of a request.
fn bearer(parts: &Parts) -> Result<&str, ApiError> {
    let value = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .ok_or_else(|| {
            ApiError::Unauthorized(
                "missing Authorization header; send `Authorization: Bearer <access token or API key>`".into(),
            )
        })?;
    value
        .strip_prefix("Bearer ")
        .map(str::trim)
        .ok_or_else(|| ApiError::Unauthorized("Authorization must use the Bearer scheme".into()))
}

/// Where a request came from (the TCP peer; proxies' headers are not trusted).
pub fn client_ip(parts: &Parts) -> String {
    parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map_or_else(|| "unknown".into(), |c| c.0.ip().to_string())
}

fn request_id(parts: &Parts) -> String {
    parts
        .headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

/// The route table: path pattern → what each method of it requires.
pub type AccessTable = HashMap<String, Vec<(Method, Access)>>;

/// What the [`authorize`] middleware works with.
#[derive(Clone)]
pub struct Gate {
    pub auth: Arc<Auth>,
    /// Where audit records go.
    pub audit: audit::AuditLog,
    pub table: Arc<AccessTable>,
}

/// Authorizes a request against the route table, charges the limits, runs it, and
/// audits it when it changes something or reads another person's data.
pub async fn authorize(State(gate): State<Gate>, request: Request, next: Next) -> Response {
    let Gate { auth, audit, table } = &gate;
    let (mut parts, body) = request.into_parts();
    let Some(path) = parts
        .extensions
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
    else {
        // No route matched: the fallback answers 404.
        return next.run(Request::from_parts(parts, body)).await;
    };
    // HEAD is served by GET routes; OPTIONS by the CORS layer before this.
    let method = if parts.method == Method::HEAD {
        Method::GET
    } else {
        parts.method.clone()
    };
    let access = table
        .get(path.as_str())
        .and_then(|methods| methods.iter().find(|(m, _)| *m == method))
        .map(|(_, a)| *a);
    let permission = match access {
        Some(Access::Public) => return next.run(Request::from_parts(parts, body)).await,
        Some(Access::Requires(p)) => p,
        None => {
            tracing::error!(%method, path, "route has no declared permission; refused");
            return ApiError::Forbidden(format!(
                "{method} {path} declares no permission, so nobody may call it"
            ))
            .into_response();
        }
    };
    let principal = match bearer(&parts).and_then(|b| auth.authenticate(b)) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    if !principal.can(permission) {
        return ApiError::Forbidden(format!(
            "{} {path} needs the permission {}, which the role {} does not have",
            parts.method,
            permission.name(),
            principal.role.name()
        ))
        .into_response();
    }
    if let Some(scope) = &principal.scope
        && !scope.endpoints.is_empty()
        && !scope.endpoints.iter().any(|e| e == &path)
    {
        return ApiError::Forbidden(format!(
            "this API key may call only {}; create a key scoped to {path}",
            scope.endpoints.join(", ")
        ))
        .into_response();
    }
    let is_key = principal.kind != ActorKind::Account;
    if let Err(limited) = auth
        .limiter
        .charge(&principal.actor, is_key, &principal.tenant)
    {
        return rate_limited(limited);
    }
    // What to audit, decided before the handler consumes the request.
    let mutating = !matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS);
    let other_person = match RawPathParams::from_request_parts(&mut parts, &()).await {
        Ok(params) => params
            .iter()
            .find(|(k, _)| *k == "user")
            .map(|(_, v)| v.to_string())
            .filter(|u| !principal.is_self(u)),
        Err(_) => None,
    };
    let audited = (mutating && path != "/v1/events") || other_person.is_some();
    // The record's request fields, taken only for requests that are audited (most reads
    // are not).
    let pending = audited.then(|| AuditRecord {
        event_id: uuid::Uuid::now_v7().to_string(),
        at: 0,
        tenant_id: principal.tenant.to_string(),
        actor: principal.actor.to_string(),
        actor_kind: principal.kind.name().into(),
        action: format!("{} {path}", parts.method),
        target: parts.uri.path().to_string(),
        source_ip: client_ip(&parts),
        request_id: request_id(&parts),
        outcome: 0,
        detail: match &other_person {
            Some(u) if !mutating => format!("read person-level data of {u}"),
            _ => String::new(),
        },
    });
    parts.extensions.insert(principal);
    let response = next.run(Request::from_parts(parts, body)).await;
    if let Some(mut entry) = pending {
        entry.at = digame_schemas::EventTime::now().0;
        entry.outcome = i32::from(response.status().as_u16());
        audit.record(entry).await;
    }
    response
}

/// A 429 naming the bucket, with `Retry-After`.
pub fn rate_limited(limited: limits::Limited) -> Response {
    let secs = limited.retry_after_secs();
    let body = serde_json::json!({"error": {"code": "rate_limited", "message": format!(
        "too many requests for this {}; retry in {secs} s", limited.bucket.name())}});
    let mut resp = (StatusCode::TOO_MANY_REQUESTS, axum::Json(body)).into_response();
    resp.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from_str(&secs.to_string()).expect("digits"),
    );
    resp
}
