//! The `digame` server: wires the bus, pipeline, store and query engine into one process
//! and serves the HTTP API.
//!
//! Every route is declared once, with the permission it needs, in [`routes`]; the
//! [`auth`] middleware authenticates (`Authorization: Bearer <access token or API key>`),
//! authorizes against that table, rate-limits and audits. The caller's tenant scopes
//! everything a request reads or writes. Around it: request ids, security headers, CORS
//! from an allow-list, and body limits.
//!
//! Errors are JSON `{"error": {"code", "message"}}`, mapped to HTTP status in one place
//! ([`ApiError`]). Shutdown drains in-flight requests, then stops the pipeline after a
//! final checkpoint, then closes the bus.

pub mod auth;
mod background;
pub mod recompute;
pub mod repair;
mod seams;
pub mod serve;
pub mod simulate;
mod views;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::Method;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, delete, get, patch, post};
use axum::{Json, Router};
use digame_infra::bus::{EventBus, Topic};
use digame_infra::config::Config;
use digame_infra::config::StoreBackend;
use digame_infra::meta::{MetaError, MetaStore};
use digame_infra::store::clickhouse::{ClickHouseSettings, ClickHouseStore};
use digame_infra::store::{Deletion, DeletionReport, ParquetStore, StoreError, StoreSink};
use digame_infra::telemetry::metrics;
use digame_ingest::{Collector, IngestError, Redactions};
use digame_pipelines::runtime::run_dead_letter_sink;
use digame_pipelines::{FeaturePipeline, PipelineStatus, Processor, RuntimeSettings};
use digame_query::{QueryEngine, QueryError};
use digame_schemas::profile::{PersonProfile, TenantSettings};
use digame_schemas::{EventTime, Granularity, TimeRange};
use recompute::{RecomputeSpec, Recomputer, StoredEvents};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Largest `POST /v1/sql` body.
const MAX_SQL_BODY: usize = 64 << 10;

/// Shared state of the HTTP handlers.
pub struct AppState {
    /// Credentials, limits, tokens.
    pub auth: Arc<auth::Auth>,
    /// Delivers password-reset messages.
    pub notifier: Arc<dyn auth::handlers::Notifier>,
    /// Every route's path pattern (API-key endpoint scopes must name one).
    pub route_paths: Vec<&'static str>,
    /// Days each tenant keeps, for `POST /v1/retention` without a number.
    pub retention_days: std::collections::BTreeMap<String, u32>,
    pub collector: Collector,
    pub query: Arc<QueryEngine>,
    pub bus: Arc<dyn EventBus>,
    pub store: Arc<dyn StoreSink>,
    /// The embedded store, when it is the store: its ledger of damaged ranges.
    pub parquet: Option<Arc<ParquetStore>>,
    pub pipeline: Arc<PipelineStatus>,
    pub max_ready_lag: u64,
    /// A partition whose records wait this long without progress is stalled.
    pub stall_after: Duration,
    /// False on ingest-only nodes.
    pub pipeline_enabled: bool,
    /// Tenant settings, person profiles, jobs.
    pub meta: MetaStore,
    /// Where audit records go (written in batches, off the request path).
    pub audit: auth::audit::AuditLog,
    pub recomputer: Recomputer,
    /// One recompute job runs at a time; the others wait, queued.
    pub job_slots: Arc<tokio::sync::Semaphore>,
}

/// Every error the API answers with.
#[derive(Debug)]
pub enum ApiError {
    Unauthorized(String),
    /// Authenticated, but not allowed.
    Forbidden(String),
    Ingest(IngestError),
    Query(QueryError),
    BadRequest(String),
    NotFound(String),
    Store(StoreError),
    Meta(MetaError),
    /// A group view that would single people out.
    GroupRefused(digame_query::groups::Refusal),
    /// A body refused before it was read as JSON: too large (413) or not sent as
    /// `application/json` (415).
    BodyRefused(StatusCode, String),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, message) = match &self {
            ApiError::Unauthorized(m) => (StatusCode::UNAUTHORIZED, "unauthorized", m.clone()),
            ApiError::Forbidden(m) => (StatusCode::FORBIDDEN, "forbidden", m.clone()),
            ApiError::Meta(MetaError::Conflict(m)) => (StatusCode::CONFLICT, "conflict", m.clone()),
            ApiError::BadRequest(m) => (StatusCode::BAD_REQUEST, "bad_request", m.clone()),
            ApiError::NotFound(m) => (StatusCode::NOT_FOUND, "not_found", m.clone()),
            ApiError::GroupRefused(r) => (StatusCode::FORBIDDEN, r.code(), r.to_string()),
            ApiError::BodyRefused(status, m) => {
                let code = if *status == StatusCode::PAYLOAD_TOO_LARGE {
                    "body_too_large"
                } else {
                    "unsupported_media_type"
                };
                (*status, code, m.clone())
            }
            ApiError::Meta(MetaError::Invalid(m)) => {
                (StatusCode::BAD_REQUEST, "invalid_parameters", m.clone())
            }
            ApiError::Meta(e) => {
                tracing::error!(error = %e, "metadata store operation failed");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "metadata_unavailable",
                    "the metadata store could not complete the operation; see server logs"
                        .to_string(),
                )
            }
            ApiError::Store(StoreError::Unsupported(m)) => {
                (StatusCode::NOT_IMPLEMENTED, "not_supported", m.clone())
            }
            ApiError::Store(e) => {
                tracing::error!(error = %e, "store operation failed");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    format!("the store could not complete the operation: {e}"),
                )
            }
            ApiError::Ingest(e) => {
                let status = match e {
                    IngestError::BodyTooLarge { .. }
                    | IngestError::DecompressedTooLarge { .. }
                    | IngestError::TooManyEvents { .. } => StatusCode::PAYLOAD_TOO_LARGE,
                    IngestError::UnsupportedEncoding(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    IngestError::BadGzip(_) | IngestError::Malformed(_) | IngestError::Empty => {
                        StatusCode::BAD_REQUEST
                    }
                    IngestError::BusUnavailable(_)
                    | IngestError::IdsUnavailable(_)
                    | IngestError::PartlyAccepted { .. } => StatusCode::SERVICE_UNAVAILABLE,
                };
                (status, e.code(), e.to_string())
            }
            ApiError::Query(e) => match e {
                QueryError::Invalid(m) => (StatusCode::BAD_REQUEST, "invalid_query", m.clone()),
                QueryError::Timeout(_) => {
                    (StatusCode::GATEWAY_TIMEOUT, "query_timeout", e.to_string())
                }
                QueryError::Busy(m) => (StatusCode::TOO_MANY_REQUESTS, "query_busy", m.clone()),
                QueryError::Overloaded(m) => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_overloaded",
                    m.clone(),
                ),
                QueryError::Internal(m) => {
                    tracing::error!(error = %m, "query failed");
                    (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "internal",
                        "the query failed inside the engine; see server logs".to_string(),
                    )
                }
            },
        };
        let mut body = json!({"error": {"code": code, "message": message}});
        if let ApiError::Ingest(IngestError::PartlyAccepted {
            accepted,
            rejected,
            not_acknowledged,
        }) = &self
        {
            body["accepted"] = json!(accepted);
            body["rejected"] = json!(rejected);
            body["not_acknowledged"] = json!(not_acknowledged);
        }
        let mut resp = (status, Json(body)).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::TOO_MANY_REQUESTS {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

pub use auth::Principal;

/// `DELETE /v1/users/{user}/data`: every row of one person of the admin's tenant.
async fn delete_person_data(
    State(state): State<Arc<AppState>>,
    tenant: Principal,
    Path(user): Path<String>,
) -> Result<Json<DeletionReport>, ApiError> {
    let report = state
        .store
        .delete(&tenant.tenant, &Deletion::Person(&user))
        .await
        .map_err(ApiError::Store)?;
    forget_everywhere(&state, &tenant.tenant, Some(&user)).await?;
    tracing::info!(tenant = %tenant.tenant, rows = ?report.rows, "deleted a person's data");
    Ok(Json(report))
}

/// Deleted values leave this node's read cache now and every other node's within
/// `meta.refresh_ms` (they follow the recorded invalidation, see `auth::follow`).
async fn forget_everywhere(
    state: &AppState,
    tenant: &str,
    user: Option<&str>,
) -> Result<(), ApiError> {
    if let Some(cache) = state.query.cache() {
        cache.forget(tenant, user);
    }
    state
        .meta
        .record_invalidation(tenant, user)
        .await
        .map_err(ApiError::Meta)?;
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RetentionRequest {
    /// Days of data kept; older rows are deleted. Default: the tenant's
    /// `store.retention_days`.
    keep_days: Option<u32>,
}

/// `POST /v1/retention`: deletes the admin's tenant's rows older than `keep_days`.
async fn post_retention(
    State(state): State<Arc<AppState>>,
    tenant: Principal,
    body: Result<Json<RetentionRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<DeletionReport>, ApiError> {
    let req = json_body(body, r#"{"keep_days": N}"#)?;
    let days = req
        .keep_days
        .or_else(|| state.retention_days.get(&*tenant.tenant).copied())
        .ok_or_else(|| {
            ApiError::BadRequest(format!(
                "no retention configured for tenant `{}`; send {{\"keep_days\": N}} or set store.retention_days",
                tenant.tenant
            ))
        })?;
    let cutoff = EventTime(EventTime::now().0 - i64::from(days) * 86_400_000);
    let report = state
        .store
        .delete(&tenant.tenant, &Deletion::Before(cutoff))
        .await
        .map_err(ApiError::Store)?;
    forget_everywhere(&state, &tenant.tenant, None).await?;
    tracing::info!(tenant = %tenant.tenant, rows = ?report.rows, "applied retention");
    Ok(Json(report))
}

/// A JSON body, or an error naming what is wrong and what to send: 413 for a body over
/// the limit, 415 for one not sent as `application/json`, 400 for anything else.
pub(crate) fn json_body<T>(
    body: Result<Json<T>, axum::extract::rejection::JsonRejection>,
    what: &str,
) -> Result<T, ApiError> {
    body.map(|Json(v)| v).map_err(|e| {
        let message = format!("{}; send {what}", e.body_text());
        match e.status() {
            s @ (StatusCode::PAYLOAD_TOO_LARGE | StatusCode::UNSUPPORTED_MEDIA_TYPE) => {
                ApiError::BodyRefused(s, message)
            }
            _ => ApiError::BadRequest(message),
        }
    })
}

/// `GET /v1/settings`: the tenant's effective settings (defaults until some are set).
async fn get_settings(
    State(state): State<Arc<AppState>>,
    tenant: Principal,
) -> Result<Response, ApiError> {
    let stored = state
        .meta
        .settings(&tenant.tenant)
        .await
        .map_err(ApiError::Meta)?;
    let body = match stored {
        Some(s) => json!({"settings": s.value, "revision": s.revision, "updated_at": s.updated_at}),
        None => json!({"settings": TenantSettings::default(), "revision": 0, "updated_at": null}),
    };
    Ok(Json(body).into_response())
}

/// `PUT /v1/settings`: replaces the tenant's settings. Redaction takes effect on this
/// node before the answer, on other nodes and in pipelines within `meta.refresh_ms`.
async fn put_settings(
    State(state): State<Arc<AppState>>,
    tenant: Principal,
    body: Result<Json<TenantSettings>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let settings = json_body(body, "the tenant settings object (see GET /v1/settings)")?;
    let stored = state
        .meta
        .put_settings(&tenant.tenant, &settings)
        .await
        .map_err(ApiError::Meta)?;
    state
        .collector
        .redactions
        .set(&tenant.tenant, &settings.redactions)
        .map_err(ApiError::BadRequest)?;
    tracing::info!(tenant = %tenant.tenant, revision = stored.revision, "tenant settings replaced");
    Ok(Json(json!({"settings": stored.value, "revision": stored.revision, "updated_at": stored.updated_at})).into_response())
}

/// `GET /v1/users/{user}/profile`.
async fn get_profile(
    State(state): State<Arc<AppState>>,
    tenant: Principal,
    Path(user): Path<String>,
) -> Result<Response, ApiError> {
    if !tenant.is_self(&user) && !tenant.can(auth::rbac::Permission::ProfilesRead) {
        return Err(ApiError::Forbidden(format!(
            "you may read only your own profile; reading `{user}`'s needs profiles:read"
        )));
    }
    let stored = state
        .meta
        .profile(&tenant.tenant, &user)
        .await
        .map_err(ApiError::Meta)?;
    let body = match stored {
        Some(p) => {
            json!({"user_id": user, "profile": p.value, "revision": p.revision, "updated_at": p.updated_at})
        }
        None => {
            json!({"user_id": user, "profile": PersonProfile::default(), "revision": 0, "updated_at": null})
        }
    };
    Ok(Json(body).into_response())
}

/// `PUT /v1/users/{user}/profile`: replaces a person's profile.
async fn put_profile(
    State(state): State<Arc<AppState>>,
    tenant: Principal,
    Path(user): Path<String>,
    body: Result<Json<PersonProfile>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    digame_schemas::validate::validate_user_id(&user)
        .map_err(|e| ApiError::BadRequest(format!("user id: {e}")))?;
    let profile = json_body(
        body,
        "the profile object (see GET /v1/users/{user}/profile)",
    )?;
    let stored = state
        .meta
        .put_profile(&tenant.tenant, &user, &profile)
        .await
        .map_err(ApiError::Meta)?;
    Ok(Json(json!({"user_id": user, "profile": stored.value, "revision": stored.revision, "updated_at": stored.updated_at})).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct GroupParams {
    team: Option<String>,
    manager: Option<String>,
    /// Comma-separated user ids.
    users: Option<String>,
    from: Option<String>,
    to: Option<String>,
    granularity: Option<String>,
}

/// `GET /v1/groups/features?team=|manager=|users=a,b,c`: aggregates of a group's
/// features per local day or week, under k-anonymity (see `digame_query::groups`).
async fn get_group_features(
    State(state): State<Arc<AppState>>,
    tenant: Principal,
    params: Result<Query<GroupParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let granularity = match params.granularity.as_deref() {
        None | Some("day") => Granularity::Day,
        Some("week") => Granularity::Week,
        Some(g) => {
            return Err(ApiError::BadRequest(format!(
                "granularity `{g}` is not supported for groups; use day or week"
            )));
        }
    };
    let range = time_range(params.from.as_deref(), params.to.as_deref())?;
    let members = resolve_group(&state, &tenant, &params).await?;
    let k = group_clearance(&state, &tenant.tenant, &members, range).await?;
    let mut windows = Vec::with_capacity(members.len());
    for user in &members {
        let series = state
            .query
            .features(&tenant.tenant, user, range.from, range.to, granularity)
            .await
            .map_err(ApiError::Query)?;
        windows.push((user.clone(), series.windows));
    }
    let aggregated = digame_query::groups::aggregate(&windows, k);
    Ok(Json(json!({
        "members": members.len(),
        "k": k,
        "granularity": granularity,
        "from": range.from,
        "to": range.to,
        "windows": aggregated,
    }))
    .into_response())
}

/// The members of the group `params` names (`team=`, `manager=` or `users=a,b,c`), if
/// the caller may see its aggregates: anyone's with `features:read:tenant`; with only
/// `features:read:team`, a group of people the caller manages or of the caller's own team.
pub(crate) async fn resolve_group(
    state: &AppState,
    caller: &Principal,
    params: &GroupParams,
) -> Result<std::collections::BTreeSet<String>, ApiError> {
    let tenant: &str = &caller.tenant;
    let members = group_members(state, tenant, params).await?;
    let most = state.query.limits().max_group_members;
    if members.len() > most {
        return Err(ApiError::BadRequest(format!(
            "the group has {} members; a group view covers at most {most} (query.max_group_members): name a smaller team, manager or users= list",
            members.len()
        )));
    }
    if caller.can(auth::rbac::Permission::FeaturesReadTenant) {
        return Ok(members);
    }
    let refuse = || {
        ApiError::Forbidden(
            "a manager sees aggregates of the people they manage or of their own team only; name manager=<you> or team=<your team>".into(),
        )
    };
    let me = caller.person.as_deref().ok_or_else(refuse)?;
    let mut allowed: std::collections::BTreeSet<String> = state
        .meta
        .members(tenant, me, true)
        .await
        .map_err(ApiError::Meta)?
        .into_iter()
        .collect();
    let own_team = state
        .meta
        .profile(tenant, me)
        .await
        .map_err(ApiError::Meta)?
        .and_then(|p| p.value.team);
    if let Some(team) = own_team {
        allowed.extend(
            state
                .meta
                .members(tenant, &team, false)
                .await
                .map_err(ApiError::Meta)?,
        );
    }
    if members.is_empty() || !members.is_subset(&allowed) {
        return Err(refuse());
    }
    Ok(members)
}

/// The members of the group `params` names.
async fn group_members(
    state: &AppState,
    tenant: &str,
    params: &GroupParams,
) -> Result<std::collections::BTreeSet<String>, ApiError> {
    Ok(match (&params.team, &params.manager, &params.users) {
        (Some(name), None, None) | (None, Some(name), None) => state
            .meta
            .members(tenant, name, params.manager.is_some())
            .await
            .map_err(ApiError::Meta)?
            .into_iter()
            .collect(),
        (None, None, Some(users)) => users
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_string)
            .collect(),
        _ => {
            return Err(ApiError::BadRequest(
                "name the group with exactly one of team=, manager= or users=a,b,c".into(),
            ));
        }
    })
}

/// Decides whether `members` may be shown as a group for the windows of `[from, to)`
/// (k-anonymity, and no disclosure by any combination of releases; see
/// `digame_query::groups`) and records the release; returns k.
pub(crate) async fn group_clearance(
    state: &AppState,
    tenant: &str,
    members: &std::collections::BTreeSet<String>,
    range: TimeRange,
) -> Result<usize, ApiError> {
    let settings = state.meta.settings(tenant).await.map_err(ApiError::Meta)?;
    let k = settings.map_or(TenantSettings::default().min_group_size, |s| {
        s.value.min_group_size
    }) as usize;
    // Decided and recorded in one metadata-store transaction: the rule holds across nodes.
    state
        .meta
        .release_group(tenant, members, (range.from.0, range.to.0), |released| {
            digame_query::groups::release_check(members, released, k)
        })
        .await
        .map_err(ApiError::Meta)?
        .map_err(ApiError::GroupRefused)?;
    Ok(k)
}

/// `from`/`to` query parameters: default the 7 days before tomorrow.
pub(crate) fn time_range(from: Option<&str>, to: Option<&str>) -> Result<TimeRange, ApiError> {
    let now = EventTime::now().0;
    let to_given = to.is_some();
    let to = match to {
        Some(t) => parse_time("to", t)?,
        // The UTC midnight after tomorrow's: past every window started by now, in every
        // zone, and the same all day long, so that default reads share one cached answer.
        None => EventTime((now.div_euclid(EventTime::DAY) + 2) * EventTime::DAY),
    };
    let from = match from {
        Some(t) => parse_time("from", t)?,
        None if to_given => EventTime(to.0 - 7 * EventTime::DAY),
        // The last 7 local days, whole: from 6 UTC midnights ago, less the largest zone
        // offset (UTC+14), so every person's first local day starts inside the range.
        None => EventTime(
            now.div_euclid(EventTime::DAY) * EventTime::DAY - 6 * EventTime::DAY - 14 * 3_600_000,
        ),
    };
    TimeRange::new(from, to)
        .ok_or_else(|| ApiError::BadRequest(format!("`to` ({to}) must be after `from` ({from})")))
}

/// `POST /v1/recompute`: queues a recomputation of the admin's tenant; answers 202 with
/// the job id to follow at `GET /v1/jobs/{id}`.
async fn post_recompute(
    State(state): State<Arc<AppState>>,
    tenant: Principal,
    body: Result<Json<RecomputeSpec>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let spec = json_body(
        body,
        r#"{"from": "2026-11-01T00:00:00Z", "to": "2026-11-08T00:00:00Z", "users": ["optional"]}"#,
    )?;
    spec.validate().map_err(ApiError::BadRequest)?;
    let spec_json = serde_json::to_value(&spec).expect("specs serialize");
    let job_id = state
        .meta
        .create_job(&tenant.tenant, "recompute", &spec_json)
        .await
        .map_err(ApiError::Meta)?;
    let (recomputer, slots, id) = (
        state.recomputer.clone(),
        state.job_slots.clone(),
        job_id.clone(),
    );
    tokio::spawn(async move {
        let Ok(_slot) = slots.acquire_owned().await else {
            return;
        };
        recomputer.run_job(&tenant.tenant, &id, &spec).await;
    });
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"job_id": job_id, "state": "queued", "status_url": format!("/v1/jobs/{job_id}")})),
    )
        .into_response())
}

/// `GET /v1/jobs/{id}`: a job of the admin's tenant with its progress.
async fn get_job(
    State(state): State<Arc<AppState>>,
    tenant: Principal,
    Path(job_id): Path<String>,
) -> Result<Response, ApiError> {
    let job = state
        .meta
        .job(&tenant.tenant, &job_id)
        .await
        .map_err(ApiError::Meta)?
        .ok_or_else(|| ApiError::NotFound(format!("no job `{job_id}` in this tenant")))?;
    Ok(Json(job).into_response())
}

async fn post_events(
    State(state): State<Arc<AppState>>,
    tenant: Principal,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let limit = state.collector.config.max_body_bytes;
    if let Err(refused) = events_content_type(&headers) {
        return refused.into_response();
    }
    let result = match axum::body::to_bytes(body, limit).await {
        Ok(bytes) => {
            let encoding = headers
                .get(header::CONTENT_ENCODING)
                .and_then(|v| v.to_str().ok());
            let sources = tenant.scope.as_ref().map_or(&[][..], |s| &s.sources[..]);
            state
                .collector
                .ingest(&tenant.tenant, sources, encoding, bytes)
                .await
        }
        Err(_) => Err(IngestError::BodyTooLarge { limit }),
    };
    let response = match result {
        Ok(outcome) => {
            let status = if outcome.accepted == 0 {
                StatusCode::UNPROCESSABLE_ENTITY
            } else {
                StatusCode::OK
            };
            (status, Json(outcome)).into_response()
        }
        Err(e) => ApiError::Ingest(e).into_response(),
    };
    metrics()
        .ingest_requests
        .with_label_values(&[response.status().as_str()])
        .inc();
    metrics()
        .ingest_request_seconds
        .observe(started.elapsed().as_secs_f64());
    response
}

/// The media types `POST /v1/events` reads: a JSON array, or NDJSON under its usual names.
const EVENT_MEDIA_TYPES: [&str; 6] = [
    "application/json",
    "application/x-ndjson",
    "application/ndjson",
    "application/jsonl",
    "application/jsonlines",
    "application/x-jsonlines",
];

/// Refuses an events body not declared as JSON or NDJSON (415), before it is read.
fn events_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let declared = headers.get(header::CONTENT_TYPE);
    let essence = declared
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(str::trim);
    if essence.is_some_and(|e| EVENT_MEDIA_TYPES.iter().any(|t| t.eq_ignore_ascii_case(e))) {
        return Ok(());
    }
    let got = declared.map_or("no Content-Type".to_string(), |v| {
        format!("Content-Type `{}`", String::from_utf8_lossy(v.as_bytes()))
    });
    Err(ApiError::BodyRefused(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        format!(
            "events were sent with {got}; send a JSON array as application/json or NDJSON as application/x-ndjson"
        ),
    ))
}

/// Refuses a body whose declared length is over the limit of its route (413, JSON like
/// every other error) before anything reads it. Bodies without a length are cut at the
/// same limits as they are read.
async fn refuse_oversized_body(
    limits: BodyLimits,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let refusal = declared.and_then(|length| {
        if req.uri().path() == "/v1/events" && length > limits.events as u64 {
            let e = IngestError::BodyTooLarge {
                limit: limits.events,
            };
            return Some((length, ApiError::Ingest(e)));
        }
        (length > limits.any as u64).then(|| {
            let message = format!(
                "request body of {length} bytes exceeds {} bytes, the most any route reads; send a smaller body",
                limits.any
            );
            (
                length,
                ApiError::BodyRefused(StatusCode::PAYLOAD_TOO_LARGE, message),
            )
        })
    });
    if let Some((length, refused)) = refusal {
        // Read what a moderately oversized body sends before answering: closing with
        // unread bytes resets the connection, and the client loses the answer with it.
        // A body past the drain bound is not read; its sender may see the reset.
        if length <= DRAIN_BOUND {
            // Chunk by chunk, kept nowhere: a refused body costs no memory.
            use futures::StreamExt;
            let mut chunks = req.into_body().into_data_stream();
            let mut read = 0u64;
            while let Some(Ok(chunk)) = chunks.next().await {
                read += chunk.len() as u64;
                if read > DRAIN_BOUND {
                    break;
                }
            }
        }
        return refused.into_response();
    }
    next.run(req).await
}

/// The largest refused body still read (and dropped) before the refusal is sent.
const DRAIN_BOUND: u64 = 16 << 20;

/// The body limits [`refuse_oversized_body`] applies.
#[derive(Clone, Copy, Debug)]
struct BodyLimits {
    /// `POST /v1/events`: `ingest.max_body_bytes`.
    events: usize,
    /// Every route: the largest body any route accepts.
    any: usize,
}

async fn get_schema() -> Json<serde_json::Value> {
    Json(digame_schemas::event_json_schema())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FeaturesParams {
    from: Option<String>,
    to: Option<String>,
    granularity: Option<String>,
}

pub(crate) fn parse_time(name: &str, text: &str) -> Result<EventTime, ApiError> {
    let parsed = match text.parse::<i64>() {
        Ok(ms) => EventTime::from_millis(ms),
        Err(_) => EventTime::parse_rfc3339(text),
    };
    parsed.map_err(|e| ApiError::BadRequest(format!("parameter `{name}`: {e}")))
}

async fn get_features(
    State(state): State<Arc<AppState>>,
    tenant: Principal,
    headers: HeaderMap,
    Path(user): Path<String>,
    params: Result<Query<FeaturesParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let granularity = match params.granularity.as_deref() {
        None => Granularity::Hour,
        Some(g) => Granularity::parse(g).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "granularity `{g}` is not supported; use hour, day or week"
            ))
        })?,
    };
    tenant.may_read_person(&user)?;
    let range = time_range(params.from.as_deref(), params.to.as_deref())?;
    let rendered = state
        .query
        .features_json(&tenant.tenant, &user, range.from, range.to, granularity)
        .await
        .map_err(ApiError::Query)?;
    Ok(cached_json(&headers, &rendered))
}

/// A rendered JSON answer with its ETag: 304 when the client holds it already
/// (`If-None-Match`), gzip-compressed when the client accepts it (compressed once per
/// answer, then served from memory).
fn cached_json(headers: &HeaderMap, rendered: &digame_query::cache::Rendered) -> Response {
    let etag = HeaderValue::from_str(&rendered.etag).expect("hex digits and quotes");
    let matches = headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| {
            let t = t.trim();
            t == "*" || t.trim_start_matches("W/") == rendered.etag
        });
    let mut resp = if matches {
        StatusCode::NOT_MODIFIED.into_response()
    } else if accepts_gzip(headers) {
        let gz = rendered.gzip.get_or_init(|| {
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            std::io::Write::write_all(&mut enc, &rendered.json).expect("writing to memory");
            axum::body::Bytes::from(enc.finish().expect("writing to memory"))
        });
        let mut r = Response::new(axum::body::Body::from(gz.clone()));
        r.headers_mut()
            .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        r
    } else {
        Response::new(axum::body::Body::from(rendered.json.clone()))
    };
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::ETAG, etag);
    h.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    // Person data: the client may keep it, shared caches may not.
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, no-cache"),
    );
    resp
}

/// Whether `Accept-Encoding` lists gzip (with a non-zero quality).
fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|coding| {
            let mut parts = coding.split(';');
            let name = parts.next().unwrap_or("").trim();
            let q_zero = parts.any(|p| {
                p.trim()
                    .strip_prefix("q=")
                    .is_some_and(|q| q.trim().parse::<f32>().is_ok_and(|q| q == 0.0))
            });
            (name.eq_ignore_ascii_case("gzip") || name == "*") && !q_zero
        })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReconcileParams {
    /// `user`: one line per person too.
    by: Option<String>,
}

/// `GET /v1/reconciliation`: does every stored event count in the features? The tenant's
/// stored raw events against the sum of its day `event_count` features, dead letters by
/// stage and reason, and what the pipeline has not read or counted yet.
async fn get_reconciliation(
    State(state): State<Arc<AppState>>,
    tenant: Principal,
    params: Result<Query<ReconcileParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let people = match params.by.as_deref() {
        None => false,
        Some("user") => true,
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "by `{other}` is not supported; use by=user for one line per person"
            )));
        }
    };
    // The pipeline's progress first, the store's figures after: what the pipeline had
    // processed and flushed by then is in the figures read later.
    let p = &state.pipeline;
    let lag = p.backlog_now().await;
    let unflushed = p.unflushed.load(Ordering::Relaxed);
    let r = state
        .query
        .reconcile(&tenant.tenant, people)
        .await
        .map_err(ApiError::Query)?;
    let mut body = serde_json::to_value(&r).expect("reconciliations serialize");
    // Both ways: features are written before the raw events they come from, so the
    // stored events can trail the counted ones as well as the other way round.
    let (stored, counted) = (r.total.stored, r.total.counted);
    body["uncounted"] = json!(stored.saturating_sub(counted));
    body["unstored"] = json!(counted.saturating_sub(stored));
    // The bus and the pipeline's memory hold every tenant's events: drained is not per
    // tenant, and only a node running the pipeline can say it. Caught up needs both that
    // and this tenant's stored and counted events to agree.
    // An unknown backlog (the bus did not answer) is not an empty one.
    let running = p.running.load(Ordering::Relaxed);
    let caught_up = running && lag == Ok(0) && unflushed == 0 && stored == counted;
    body["pipeline"] = json!({"running": running, "lag_records": lag.as_ref().ok(),
                              "unflushed_events": unflushed, "caught_up": caught_up});
    if let Err(e) = lag {
        body["pipeline"]["detail"] = json!(format!("the backlog is unknown now: {e}"));
    }
    Ok(Json(body).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SqlRequest {
    sql: String,
}

async fn post_sql(
    State(state): State<Arc<AppState>>,
    tenant: Principal,
    body: Body,
) -> Result<Response, ApiError> {
    let bytes = axum::body::to_bytes(body, MAX_SQL_BODY)
        .await
        .map_err(|_| {
            ApiError::BodyRefused(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("body exceeds {MAX_SQL_BODY} bytes; send a shorter query"),
            )
        })?;
    let req: SqlRequest = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::BadRequest(format!("body must be {{\"sql\": \"SELECT …\"}}: {e}"))
    })?;
    let result = state
        .query
        .sql(&tenant.tenant, &req.sql)
        .await
        .map_err(ApiError::Query)?;
    Ok(Json(result).into_response())
}

/// `GET /v1/sql/tables`: the tables of `POST /v1/sql` with their columns.
async fn get_sql_tables(
    State(state): State<Arc<AppState>>,
    tenant: Principal,
) -> Result<Response, ApiError> {
    let tables = state
        .query
        .tables(&tenant.tenant)
        .await
        .map_err(ApiError::Query)?;
    Ok(Json(json!({"tables": tables})).into_response())
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let bus = state.bus.status();
    let store = state.store.status();
    // Every reason this node is not ready, in words an operator can act on.
    let mut reasons = Vec::new();
    let lag = state.pipeline.backlog_now().await.unwrap_or_else(|e| {
        reasons.push(format!("bus: the pipeline's backlog is unknown now: {e}"));
        state.pipeline.backlog()
    });
    let unflushed = state.pipeline.unflushed.load(Ordering::Relaxed);
    let partitions = partition_gauges(&state);
    // An ingest-only node has no pipeline to wait for.
    let running = !state.pipeline_enabled || state.pipeline.running.load(Ordering::Relaxed);
    let lag_ok = lag <= state.max_ready_lag;
    let store_failing = state.pipeline.store_failing.load(Ordering::Relaxed);
    if !bus.healthy {
        reasons.push(format!("bus: {}", bus.detail));
    }
    if !store.healthy {
        reasons.push(format!("store: {}", store.detail));
    }
    if store_failing {
        reasons.push("store refuses the pipeline's writes (retrying)".to_string());
    }
    if !running {
        reasons.push("pipeline not running".to_string());
    }
    if !lag_ok {
        reasons.push(format!(
            "pipeline behind: {lag} records wait (more than pipeline.max_ready_lag = {})",
            state.max_ready_lag
        ));
    }
    let mut stalled = Vec::new();
    for p in &partitions {
        if p.waiting >= state.stall_after {
            stalled.push(p.partition);
            let behind = p
                .behind
                .map_or("records".into(), |b| format!("{b} records"));
            reasons.push(format!(
                "events/{} stalled: {behind} waited {} s without progress (at offset {})",
                p.partition,
                p.waiting.as_secs(),
                p.processed
            ));
        }
    }
    // Damaged store ranges: not ready until each is rebuilt (its reads are incomplete).
    let (damaged, repaired) = state
        .parquet
        .as_ref()
        .map_or((Vec::new(), Vec::new()), |p| {
            (p.integrity().pending(), p.integrity().repaired())
        });
    for d in &damaged {
        reasons.push(format!(
            "store: {} of tenant {} on {} damaged ({}); rebuilding from the bus",
            d.table, d.tenant, d.date, d.error
        ));
    }
    let ready = reasons.is_empty();
    let body = json!({
        "ready": ready,
        "reasons": reasons,
        "bus": {"ok": bus.healthy, "detail": bus.detail, "lost_records": bus.lost_records},
        "store": {"ok": store.healthy && !store_failing && damaged.is_empty(), "detail": store.detail,
                  "damaged": damaged, "repaired": repaired},
        // Until every accepted event is counted in stored features: records on the bus not
        // yet read, and events read but not yet flushed.
        "pipeline": {"ok": running && lag_ok && stalled.is_empty(), "running": running, "lag_records": lag,
                     "unflushed_events": unflushed, "uncounted": lag + unflushed,
                     "max_lag_records": state.max_ready_lag,
                     "stall_after_secs": state.stall_after.as_secs(),
                     "stalled_partitions": stalled,
                     "partitions": partitions,
                     "notices": state.pipeline.notices.lock().expect("notices lock").clone(),
                     "settings_revision": state.pipeline.settings_revision.load(Ordering::Relaxed)},
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

/// Each events partition's progress, also set as its gauges (so `/metrics` and `/readyz`
/// agree on which partition is how far behind).
fn partition_gauges(state: &AppState) -> Vec<digame_pipelines::runtime::PartitionProgress> {
    let partitions = state.pipeline.partitions();
    let m = metrics();
    for p in &partitions {
        let label = p.partition.to_string();
        if let Some(behind) = p.behind {
            m.pipeline_partition_behind
                .with_label_values(&[&label])
                .set(behind as i64);
        }
        m.pipeline_partition_waiting
            .with_label_values(&[&label])
            .set(p.waiting.as_secs() as i64);
    }
    partitions
}

async fn metrics_text(State(state): State<Arc<AppState>>) -> Response {
    partition_gauges(&state);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        metrics().render(),
    )
        .into_response()
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such route; see the README for the API".into())
}

type Handler = MethodRouter<Arc<AppState>>;

/// Every route: method, path pattern, what it requires, handler. The one place a route
/// is declared; the router and the authorization table are both built from it.
fn routes() -> Vec<(Method, &'static str, auth::Access, Handler)> {
    use auth::Access::{Public, Requires};
    use auth::handlers as h;
    use auth::rbac::Permission as P;
    vec![
        (Method::GET, "/healthz", Public, get(healthz)),
        (Method::GET, "/readyz", Public, get(readyz)),
        (Method::GET, "/metrics", Public, get(metrics_text)),
        (Method::GET, "/v1/schema", Public, get(get_schema)),
        (Method::POST, "/v1/auth/login", Public, post(h::login)),
        (Method::POST, "/v1/auth/refresh", Public, post(h::refresh)),
        (
            Method::POST,
            "/v1/auth/password-reset",
            Public,
            post(h::request_reset),
        ),
        (
            Method::POST,
            "/v1/auth/password-reset/confirm",
            Public,
            post(h::confirm_reset),
        ),
        (
            Method::POST,
            "/v1/auth/logout",
            Requires(P::AccountSelf),
            post(h::logout),
        ),
        (
            Method::GET,
            "/v1/auth/me",
            Requires(P::AccountSelf),
            get(h::me),
        ),
        (
            Method::POST,
            "/v1/auth/password",
            Requires(P::AccountSelf),
            post(h::change_password),
        ),
        (
            Method::GET,
            "/v1/roles",
            Requires(P::UsersRead),
            get(h::roles),
        ),
        (
            Method::GET,
            "/v1/accounts",
            Requires(P::UsersRead),
            get(h::list_accounts),
        ),
        (
            Method::POST,
            "/v1/accounts",
            Requires(P::UsersWrite),
            post(h::create_account),
        ),
        (
            Method::GET,
            "/v1/accounts/{account_id}",
            Requires(P::UsersRead),
            get(h::get_account),
        ),
        (
            Method::PATCH,
            "/v1/accounts/{account_id}",
            Requires(P::UsersWrite),
            patch(h::patch_account),
        ),
        (
            Method::GET,
            "/v1/keys",
            Requires(P::KeysRead),
            get(h::list_keys),
        ),
        (
            Method::POST,
            "/v1/keys",
            Requires(P::KeysWrite),
            post(h::create_key),
        ),
        (
            Method::DELETE,
            "/v1/keys/{key_id}",
            Requires(P::KeysWrite),
            delete(h::revoke_key),
        ),
        (
            Method::GET,
            "/v1/audit",
            Requires(P::AuditRead),
            get(h::get_audit),
        ),
        (
            Method::GET,
            "/v1/tenants",
            Requires(P::TenantsRead),
            get(h::list_tenants),
        ),
        (
            Method::POST,
            "/v1/tenants",
            Requires(P::TenantsWrite),
            post(h::create_tenant),
        ),
        (
            Method::POST,
            "/v1/events",
            Requires(P::EventsWrite),
            post(post_events),
        ),
        (
            Method::GET,
            "/v1/users/{user}/features",
            Requires(P::FeaturesReadSelf),
            get(get_features),
        ),
        (
            Method::GET,
            "/v1/users/{user}/pattern",
            Requires(P::FeaturesReadSelf),
            get(views::get_pattern),
        ),
        (
            Method::GET,
            "/v1/users/{user}/transitions",
            Requires(P::FeaturesReadSelf),
            get(views::get_transitions),
        ),
        (
            Method::GET,
            "/v1/users/{user}/radar",
            Requires(P::FeaturesReadSelf),
            get(views::get_radar),
        ),
        (
            Method::GET,
            "/v1/users/{user}/profile",
            Requires(P::FeaturesReadSelf),
            get(get_profile),
        ),
        (
            Method::PUT,
            "/v1/users/{user}/profile",
            Requires(P::ProfilesWrite),
            axum::routing::put(put_profile),
        ),
        (
            Method::DELETE,
            "/v1/users/{user}/data",
            Requires(P::DataDelete),
            delete(delete_person_data),
        ),
        (
            Method::POST,
            "/v1/retention",
            Requires(P::DataDelete),
            post(post_retention),
        ),
        (
            Method::POST,
            "/v1/sql",
            Requires(P::SqlQuery),
            post(post_sql),
        ),
        (
            Method::GET,
            "/v1/sql/tables",
            Requires(P::SqlQuery),
            get(get_sql_tables),
        ),
        (
            Method::GET,
            "/v1/settings",
            Requires(P::SettingsRead),
            get(get_settings),
        ),
        (
            Method::PUT,
            "/v1/settings",
            Requires(P::SettingsWrite),
            axum::routing::put(put_settings),
        ),
        (
            Method::GET,
            "/v1/reconciliation",
            Requires(P::FeaturesReadTenant),
            get(get_reconciliation),
        ),
        (
            Method::POST,
            "/v1/recompute",
            Requires(P::JobsRun),
            post(post_recompute),
        ),
        (
            Method::GET,
            "/v1/jobs/{job_id}",
            Requires(P::JobsRead),
            get(get_job),
        ),
        (
            Method::GET,
            "/v1/groups/features",
            Requires(P::FeaturesReadTeam),
            get(get_group_features),
        ),
        (
            Method::GET,
            "/v1/groups/network",
            Requires(P::FeaturesReadTeam),
            get(views::get_network),
        ),
        (
            Method::GET,
            "/v1/groups/flow",
            Requires(P::FeaturesReadTeam),
            get(views::get_flow),
        ),
        (
            Method::GET,
            "/v1/styles",
            Requires(P::FeaturesReadTenant),
            get(views::get_styles),
        ),
    ]
}

/// Every route with what it requires, for documentation and tests.
pub fn route_table() -> Vec<(Method, &'static str, auth::Access)> {
    routes().into_iter().map(|(m, p, a, _)| (m, p, a)).collect()
}

/// The HTTP routes behind the security layers: request ids, security headers, CORS,
/// body limit, and authorization from the route table.
pub fn router(state: Arc<AppState>, config: &Config) -> Router {
    let mut table = auth::AccessTable::new();
    let mut app = Router::new();
    for (method, path, access, handler) in routes() {
        table
            .entry(path.to_string())
            .or_default()
            .push((method, access));
        app = app.route(path, handler);
    }
    let gate = auth::Gate {
        auth: state.auth.clone(),
        audit: state.audit.clone(),
        table: Arc::new(table),
    };
    let app = app
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(gate, auth::authorize));
    security_layers(app, config).with_state(state)
}

/// Wraps `app` in the layers every response passes: request id (`x-request-id`, kept
/// when the client sent one), tracing, CORS from `http.cors_origins`, security headers,
/// and the largest body any route accepts.
pub fn security_layers<S: Clone + Send + Sync + 'static>(
    app: Router<S>,
    config: &Config,
) -> Router<S> {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
    use tower_http::set_header::SetResponseHeaderLayer;
    let origins: Vec<HeaderValue> = config
        .http
        .cors_origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    let cors = CorsLayer::new()
        .allow_origin(AllowOrigin::list(origins))
        .allow_methods([
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
        ])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::CONTENT_ENCODING,
            header::HeaderName::from_static("x-request-id"),
        ])
        .expose_headers([
            header::RETRY_AFTER,
            header::HeaderName::from_static("x-request-id"),
        ])
        .max_age(Duration::from_secs(600));
    let fixed = |name: &'static str, value: &'static str| {
        SetResponseHeaderLayer::if_not_present(
            header::HeaderName::from_static(name),
            HeaderValue::from_static(value),
        )
    };
    let body_limit = config.ingest.max_body_bytes.max(1 << 20);
    let request_id = header::HeaderName::from_static("x-request-id");
    let limits = BodyLimits {
        events: config.ingest.max_body_bytes,
        any: body_limit,
    };
    app.layer(tower_http::limit::RequestBodyLimitLayer::new(body_limit))
        // Outside the limit layer, whose own refusal is plain text.
        .layer(axum::middleware::from_fn(move |req, next| {
            refuse_oversized_body(limits, req, next)
        }))
        .layer(fixed(
            "strict-transport-security",
            "max-age=63072000; includeSubDomains",
        ))
        .layer(fixed("x-content-type-options", "nosniff"))
        .layer(fixed("x-frame-options", "DENY"))
        .layer(fixed("referrer-policy", "no-referrer"))
        // The API serves data, not pages: nothing may load from it or frame it. Pages
        // served later set their own policy.
        .layer(fixed(
            "content-security-policy",
            "default-src 'none'; frame-ancestors 'none'",
        ))
        // Personal data: no shared or browser caching.
        .layer(fixed("cache-control", "no-store"))
        .layer(cors)
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .layer(PropagateRequestIdLayer::new(request_id.clone()))
        .layer(SetRequestIdLayer::new(request_id, MakeRequestUuid))
}

/// Only the operational routes, for pipeline workers.
pub fn ops_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .fallback(not_found)
        .with_state(state)
}

/// Feeds the person-read cache with the feature values the pipeline publishes (after
/// they are durable in the store), skipping, undecoded, those of people not cached. On
/// Kafka, whose consumer cannot seek to the end before it is assigned, it starts at the
/// stream's beginning; old values lose to the cached ones by revision.
async fn follow_features(
    mut consumer: Box<dyn digame_infra::bus::BusConsumer>,
    query: Arc<QueryEngine>,
    stop: watch::Receiver<bool>,
) {
    let Some(cache) = query.cache() else { return };
    // Not raced against `stop` inside a select: a poll cut short could skip records.
    while !*stop.borrow() {
        match consumer.poll(2000, Duration::from_millis(300)).await {
            Ok(records) => {
                let wanted = cache.wanted(records.iter().map(|r| &r.key[..]));
                let rows: Vec<digame_schemas::FeatureRow> = records
                    .iter()
                    .zip(wanted)
                    .filter_map(|(r, wanted)| wanted.then_some(r))
                    .filter_map(|r| match serde_json::from_slice(&r.payload) {
                        Ok(row) => Some(row),
                        Err(e) => {
                            tracing::warn!(error = %e, partition = r.partition, offset = r.offset, "undecodable record on the features stream; skipped");
                            None
                        }
                    })
                    .collect();
                if !rows.is_empty() {
                    cache.apply(&rows);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading the features stream for the read cache failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// A running server.
pub struct Server {
    pub addr: SocketAddr,
    pub state: Arc<AppState>,
    /// What a first start created (admin, ingestion key): to show once.
    pub bootstrapped: Option<auth::handlers::Bootstrapped>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<(&'static str, JoinHandle<()>)>,
    http: JoinHandle<()>,
}

/// What a process runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Ingest, pipeline (unless `pipeline.enabled` is false), query: `digame serve`.
    All,
    /// A pipeline worker of the consumer group, serving only `/healthz`, `/readyz` and
    /// `/metrics`: `digame pipeline`.
    Pipeline,
}

/// The store a configuration selects: the sink pipelines write to, the engine queries
/// read through, and the Parquet store when it is the embedded one (for compaction).
pub struct OpenedStore {
    pub sink: Arc<dyn StoreSink>,
    pub query: QueryEngine,
    pub parquet: Option<Arc<ParquetStore>>,
}

/// Opens the store of `config` (applying ClickHouse migrations when configured to).
pub async fn open_store(config: &Config) -> anyhow::Result<OpenedStore> {
    match config.store_backend().map_err(anyhow::Error::msg)? {
        StoreBackend::Embedded(dir) => {
            let parquet = Arc::new(ParquetStore::open(&dir)?);
            Ok(OpenedStore {
                sink: parquet.clone(),
                query: QueryEngine::new(&dir, config.query.clone())
                    .with_snapshots(parquet.snapshots()),
                parquet: Some(parquet),
            })
        }
        StoreBackend::ClickHouse { url, database } => {
            let settings = ClickHouseSettings {
                url,
                database,
                config: config.store.clickhouse.clone(),
            };
            let store = ClickHouseStore::open(settings).await?;
            let query = QueryEngine::clickhouse(store.client().clone(), config.query.clone());
            Ok(OpenedStore {
                sink: Arc::new(store),
                query,
                parquet: None,
            })
        }
    }
}

impl Server {
    /// Opens the bus and store, starts the pipeline, dead-letter sink, compaction, and the
    /// HTTP listener.
    pub async fn start(config: Config) -> anyhow::Result<Server> {
        Self::start_role(config, Role::All).await
    }

    /// As [`Server::start`], for `role`.
    pub async fn start_role(mut config: Config, role: Role) -> anyhow::Result<Server> {
        if role == Role::Pipeline {
            if matches!(
                config.bus_backend().map_err(anyhow::Error::msg)?,
                digame_infra::config::BusBackend::Embedded(_)
            ) {
                anyhow::bail!(
                    "`digame pipeline` runs workers on a shared bus; set --bus kafka://host:port (the embedded log belongs to its `digame serve` process)"
                );
            }
            config.pipeline.enabled = true;
        }
        // The address first: a start that cannot listen must fail before it writes
        // anything, above all the first admin, whose password only this start prints.
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot listen on {}: {e}; stop what uses the address or choose another with --listen",
                    config.listen
                )
            })?;
        let bus = digame_infra::bus::open(&config).await?;
        let opened = open_store(&config).await?;
        let meta = MetaStore::open(&config.meta.url, &config.data_dir).await?;
        // Roles in step; on a fresh installation, the first admin and ingestion key.
        let bootstrapped = auth::handlers::bootstrap(
            &meta,
            &config.auth,
            std::env::var("DIGAME_ADMIN_PASSWORD").ok(),
        )
        .await?;
        let signing = auth::handlers::signing_keys(&config.auth, &config.data_dir)?;
        let tokens = auth::tokens::TokenKeys::new(&signing.0, config.auth.access_ttl_secs as i64)
            .map_err(anyhow::Error::msg)?;
        let notifier = auth::handlers::notifier(&config.auth, &config.data_dir)?;
        let interrupted = meta.fail_unfinished_jobs().await?;
        if interrupted > 0 {
            tracing::warn!(
                jobs = interrupted,
                "marked jobs interrupted by the last stop as failed"
            );
        }
        let query = Arc::new(opened.query);
        // Redaction rules are in force before the first request is accepted.
        let redactions = Arc::new(Redactions::default());
        let meta_seen = install_redactions(&meta, &redactions, 0).await?;
        let store = opened.sink.clone();
        let pipeline_status = Arc::new(PipelineStatus::default());
        let (shutdown, shutdown_rx) = watch::channel(false);

        let pipeline = FeaturePipeline {
            bus: bus.clone(),
            store: store.clone(),
            processor: Processor::new(&config.pipeline, config.ingest.longest_horizon_days())?,
            settings: RuntimeSettings {
                meta_refresh: Duration::from_millis(config.meta.refresh_ms.max(10)),
                ..RuntimeSettings::from_config(&config.pipeline, &config.data_dir)
            },
            status: pipeline_status.clone(),
            meta: Some(Arc::new(seams::StoredSettings(meta.clone()))),
            history: Arc::new(StoredEvents(query.clone())),
        };
        let mut tasks = Vec::new();
        if config.pipeline.enabled {
            let rx = shutdown_rx.clone();
            tasks.push((
                "pipeline",
                tokio::spawn(async move {
                    if let Err(e) = pipeline.run(rx).await {
                        tracing::error!(error = %e, "feature pipeline stopped with an error");
                    }
                }),
            ));
        }
        let (b, s, rx) = (bus.clone(), store.clone(), shutdown_rx.clone());
        tasks.push((
            "dead-letter-sink",
            tokio::spawn(async move {
                if let Err(e) = run_dead_letter_sink(b, s, rx).await {
                    tracing::error!(error = %e, "dead-letter sink stopped with an error");
                }
            }),
        ));
        {
            let (meta, redactions) = (meta.clone(), redactions.clone());
            tasks.push(background::periodic(
                "redaction-follower",
                Duration::from_millis(config.meta.refresh_ms.max(10)),
                background::Start::AfterPeriod,
                shutdown_rx.clone(),
                meta_seen,
                move |seen| {
                    let (meta, redactions) = (meta.clone(), redactions.clone());
                    async move {
                        match install_redactions(&meta, &redactions, seen).await {
                            Ok(now) => now,
                            Err(e) => {
                                tracing::warn!(error = %e, "reading redaction rules failed; retrying");
                                seen
                            }
                        }
                    }
                },
            ));
        }
        {
            // The idempotency index forgets ids older than any tenant's horizon (their
            // events would be refused anyway), hourly.
            let meta = meta.clone();
            let keep_ms = (i64::from(config.ingest.longest_horizon_days()) + 2) * 86_400_000;
            tasks.push(background::periodic(
                "event-id-pruner",
                Duration::from_secs(3600),
                background::Start::Now,
                shutdown_rx.clone(),
                (),
                move |()| {
                    let meta = meta.clone();
                    async move {
                        let cutoff = EventTime::now().0 - keep_ms;
                        match meta.prune_event_ids(cutoff).await {
                            Ok(n) if n > 0 => tracing::info!(ids = n, "forgot event ids past the horizon"),
                            Ok(_) => {}
                            Err(e) => tracing::warn!(error = %e, "pruning event ids failed; retrying later"),
                        }
                    }
                },
            ));
        }
        // ClickHouse merges by itself; the embedded store is compacted here, a round at a
        // time on a blocking thread.
        if let Some(parquet) = opened.parquet.clone() {
            let min_files = config.store.compaction_min_files;
            tasks.push(background::periodic(
                "compaction",
                Duration::from_secs(config.store.compaction_interval_secs.max(1)),
                background::Start::AfterPeriod,
                shutdown_rx.clone(),
                (),
                move |()| {
                    let store = parquet.clone();
                    async move {
                        let round =
                            tokio::task::spawn_blocking(move || store.compact_blocking(min_files))
                                .await;
                        match round {
                            Ok(Ok(0)) => {}
                            Ok(Ok(n)) => tracing::info!(partitions = n, "compacted store partitions"),
                            Ok(Err(e)) => tracing::warn!(error = %e, "compaction failed"),
                            Err(e) => tracing::error!(error = %e, "compaction panicked; it runs again next interval"),
                        }
                    }
                },
            ));
        }

        let ids: Option<Arc<dyn digame_ingest::EventIds>> = if config.ingest.idempotency_index {
            let index =
                digame_infra::meta::IdIndex::open(&config.meta.url, &config.data_dir).await?;
            Some(Arc::new(seams::StoredEventIds(index)))
        } else {
            None
        };
        // The writer runs as long as the state holds its queue; shutdown flushes it.
        let (audit, _detached) = auth::audit::AuditLog::start(meta.clone());
        let state = Arc::new(AppState {
            audit,
            auth: Arc::new(auth::Auth::new(
                tokens,
                config.auth.clone(),
                &config.limits,
                &config.ingest.keys,
                &config.admin.keys,
            )),
            notifier,
            route_paths: routes().into_iter().map(|(_, p, _, _)| p).collect(),
            retention_days: config.store.retention_days.clone(),
            collector: Collector {
                bus: bus.clone(),
                config: config.ingest.clone(),
                redactions,
                ids,
            },
            query: query.clone(),
            bus: bus.clone(),
            store: store.clone(),
            parquet: opened.parquet.clone(),
            pipeline: pipeline_status,
            max_ready_lag: config.pipeline.max_ready_lag,
            stall_after: Duration::from_secs(config.pipeline.stall_after_secs),
            pipeline_enabled: config.pipeline.enabled,
            recomputer: Recomputer {
                query,
                store,
                bus,
                meta: meta.clone(),
                pipeline: config.pipeline.clone(),
                horizon_days: config.ingest.longest_horizon_days(),
            },
            meta,
            job_slots: Arc::new(tokio::sync::Semaphore::new(1)),
        });
        // The read cache follows the features stream from where it ends now, before the
        // first read is served: every value published later reaches the cache, every
        // value published earlier is in the store a cache miss reads.
        if role == Role::All && state.query.cache().is_some() {
            let group = format!("read-cache-{}", uuid::Uuid::new_v4().simple());
            let mut consumer = state.bus.subscribe(Topic::Features, &group).await?;
            if let Some(ends) = consumer.end_offsets() {
                for (p, end) in ends() {
                    consumer.seek(p, end).await?;
                }
            }
            tasks.push((
                "read-cache-follower",
                tokio::spawn(follow_features(
                    consumer,
                    state.query.clone(),
                    shutdown_rx.clone(),
                )),
            ));
        }
        // Ranges of the embedded store found damaged (now or at any later read) are
        // rebuilt from the bus and the raw events.
        if let (Some(parquet), Role::All) = (opened.parquet.clone(), role) {
            let repairer = repair::Repairer {
                bus: state.bus.clone(),
                store: parquet,
                recomputer: state.recomputer.clone(),
                pipeline: state.pipeline.clone(),
            };
            tasks.push((
                "store-repair",
                tokio::spawn(repairer.run(shutdown_rx.clone())),
            ));
        }
        {
            let state = state.clone();
            tasks.push(background::periodic(
                "credential-follower",
                Duration::from_millis(config.meta.refresh_ms.max(10)),
                background::Start::Now,
                shutdown_rx.clone(),
                auth::Followed::default(),
                move |seen| auth::follow(state.clone(), seen),
            ));
        }
        let addr = listener.local_addr()?;
        let app = match role {
            Role::All => router(state.clone(), &config),
            Role::Pipeline => ops_router(state.clone()),
        };
        let mut rx = shutdown_rx.clone();
        let http_config = config.http.clone();
        let http = tokio::spawn(async move {
            let stop = async move {
                let _ = rx.wait_for(|stop| *stop).await;
            };
            serve::serve(listener, app, &http_config, stop).await;
        });
        tracing::info!(%addr, data_dir = %config.data_dir.display(), "digame serving");
        Ok(Server {
            addr,
            state,
            bootstrapped,
            shutdown,
            tasks,
            http,
        })
    }

    /// Drains HTTP, stops the pipeline after a final checkpoint, closes the bus.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.http.await;
        for (name, task) in self.tasks {
            if task.await.is_err() {
                tracing::error!(task = name, "background task panicked");
            }
        }
        self.state.audit.flush().await;
        self.state.bus.close().await;
        tracing::info!("digame stopped");
    }
}

/// Installs the redaction rules of tenants whose settings changed after revision `seen`;
/// returns the revision now seen.
async fn install_redactions(
    meta: &MetaStore,
    redactions: &Redactions,
    seen: i64,
) -> anyhow::Result<i64> {
    let changes = meta.changes_since(seen).await?;
    for (tenant, settings) in &changes.settings {
        if let Err(e) = redactions.set(tenant, &settings.redactions) {
            tracing::warn!(tenant, error = %e, "stored redaction rules do not compile; keeping the previous ones");
        }
    }
    Ok(changes.revision)
}
