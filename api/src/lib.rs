//! The `digame` server: wires the bus, pipeline, store and query engine into one process
//! and serves the HTTP API.
//!
//! Routes (all `/v1` routes need `Authorization: Bearer <ingest key>`; the key's tenant
//! scopes everything the request reads or writes):
//! - `POST /v1/events` — ingest a JSON array or NDJSON batch (gzip optional)
//! - `GET /v1/schema` — JSON Schema of the wire event (no auth)
//! - `GET /v1/users/{user}/features?from=&to=&granularity=hour|day`
//! - `POST /v1/sql` — `{"sql": "SELECT …"}`, read-only, tenant-scoped
//! - `GET /healthz`, `GET /readyz`, `GET /metrics` — operations (no auth)
//!
//! Errors are JSON `{"error": {"code", "message"}}`, mapped to HTTP status in one place
//! ([`ApiError`]). Shutdown drains in-flight requests, then stops the pipeline after a
//! final checkpoint, then closes the bus.

pub mod recompute;
pub mod simulate;
mod views;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use digame_infra::bus::EventBus;
use digame_infra::config::StoreBackend;
use digame_infra::config::{Config, IngestKeys};
use digame_infra::meta::{MetaError, MetaStore};
use digame_infra::store::clickhouse::{ClickHouseSettings, ClickHouseStore};
use digame_infra::store::{Deletion, DeletionReport, ParquetStore, StoreError, StoreSink};
use digame_infra::telemetry::metrics;
use digame_ingest::{Collector, IngestError, Redactions};
use digame_pipelines::runtime::run_dead_letter_sink;
use digame_pipelines::{FeaturePipeline, PipelineStatus, Processor, RuntimeSettings};
use digame_query::{QueryEngine, QueryError};
use digame_schemas::profile::{PersonProfile, TenantSettings};
use digame_schemas::{EventTime, Granularity};
use recompute::{RecomputeSpec, Recomputer};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Largest `POST /v1/sql` body.
const MAX_SQL_BODY: usize = 64 << 10;

/// Shared state of the HTTP handlers.
pub struct AppState {
    pub keys: IngestKeys,
    pub admin_keys: IngestKeys,
    /// Days each tenant keeps, for `POST /v1/retention` without a number.
    pub retention_days: std::collections::BTreeMap<String, u32>,
    pub collector: Collector,
    pub query: Arc<QueryEngine>,
    pub bus: Arc<dyn EventBus>,
    pub store: Arc<dyn StoreSink>,
    pub pipeline: Arc<PipelineStatus>,
    pub max_ready_lag: u64,
    /// False on ingest-only nodes.
    pub pipeline_enabled: bool,
    /// Tenant settings, person profiles, jobs.
    pub meta: MetaStore,
    pub recomputer: Recomputer,
    /// One recompute job runs at a time; the others wait, queued.
    pub job_slots: Arc<tokio::sync::Semaphore>,
    /// Serializes group-view release decisions.
    pub group_gate: tokio::sync::Mutex<()>,
}

/// Every error the API answers with.
#[derive(Debug)]
pub enum ApiError {
    Unauthorized(String),
    Ingest(IngestError),
    Query(QueryError),
    BadRequest(String),
    NotFound(String),
    Store(StoreError),
    Meta(MetaError),
    /// A group view that would single people out.
    GroupRefused(digame_query::groups::Refusal),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, message) = match &self {
            ApiError::Unauthorized(m) => (StatusCode::UNAUTHORIZED, "unauthorized", m.clone()),
            ApiError::BadRequest(m) => (StatusCode::BAD_REQUEST, "bad_request", m.clone()),
            ApiError::NotFound(m) => (StatusCode::NOT_FOUND, "not_found", m.clone()),
            ApiError::GroupRefused(r) => (StatusCode::FORBIDDEN, r.code(), r.to_string()),
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
                    IngestError::BusUnavailable(_) | IngestError::PartlyAccepted { .. } => {
                        StatusCode::SERVICE_UNAVAILABLE
                    }
                };
                (status, e.code(), e.to_string())
            }
            ApiError::Query(e) => match e {
                QueryError::Invalid(m) => (StatusCode::BAD_REQUEST, "invalid_query", m.clone()),
                QueryError::Timeout(_) => {
                    (StatusCode::GATEWAY_TIMEOUT, "query_timeout", e.to_string())
                }
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
        if status == StatusCode::SERVICE_UNAVAILABLE {
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

/// The caller's tenant, from `Authorization: Bearer <key>`.
pub struct Tenant(pub String);

/// The tenant of the `Authorization: Bearer <key>` header among `keys`.
fn bearer_tenant(parts: &Parts, keys: &IngestKeys, kind: &str) -> Result<String, ApiError> {
    let header = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .ok_or_else(|| {
            ApiError::Unauthorized(format!(
                "missing Authorization header; send `Authorization: Bearer <{kind} key>`"
            ))
        })?;
    let key = header
        .strip_prefix("Bearer ")
        .map(str::trim)
        .ok_or_else(|| ApiError::Unauthorized("Authorization must use the Bearer scheme".into()))?;
    keys.tenant_of(key)
        .map(str::to_string)
        .ok_or_else(|| ApiError::Unauthorized(format!("unknown or revoked {kind} key")))
}

impl FromRequestParts<Arc<AppState>> for Tenant {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        bearer_tenant(parts, &state.keys, "ingest").map(Tenant)
    }
}

/// The tenant an admin key (`admin.keys`) administers.
pub struct AdminTenant(pub String);

impl FromRequestParts<Arc<AppState>> for AdminTenant {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        bearer_tenant(parts, &state.admin_keys, "admin").map(AdminTenant)
    }
}

/// `DELETE /v1/users/{user}/data`: every row of one person of the admin's tenant.
async fn delete_person_data(
    State(state): State<Arc<AppState>>,
    tenant: AdminTenant,
    Path(user): Path<String>,
) -> Result<Json<DeletionReport>, ApiError> {
    let report = state
        .store
        .delete(&tenant.0, &Deletion::Person(&user))
        .await
        .map_err(ApiError::Store)?;
    tracing::info!(tenant = %tenant.0, rows = ?report.rows, "deleted a person's data");
    Ok(Json(report))
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
    tenant: AdminTenant,
    body: Result<Json<RetentionRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<DeletionReport>, ApiError> {
    let Json(req) = body.map_err(|e| {
        ApiError::BadRequest(format!("{}; send {{\"keep_days\": N}}", e.body_text()))
    })?;
    let days = req
        .keep_days
        .or_else(|| state.retention_days.get(&tenant.0).copied())
        .ok_or_else(|| {
            ApiError::BadRequest(format!(
                "no retention configured for tenant `{}`; send {{\"keep_days\": N}} or set store.retention_days",
                tenant.0
            ))
        })?;
    let cutoff = EventTime(EventTime::now().0 - i64::from(days) * 86_400_000);
    let report = state
        .store
        .delete(&tenant.0, &Deletion::Before(cutoff))
        .await
        .map_err(ApiError::Store)?;
    tracing::info!(tenant = %tenant.0, rows = ?report.rows, "applied retention");
    Ok(Json(report))
}

/// A JSON body, or a 400 naming what is wrong and what to send.
fn json_body<T>(
    body: Result<Json<T>, axum::extract::rejection::JsonRejection>,
    what: &str,
) -> Result<T, ApiError> {
    body.map(|Json(v)| v)
        .map_err(|e| ApiError::BadRequest(format!("{}; send {what}", e.body_text())))
}

/// `GET /v1/settings`: the tenant's effective settings (defaults until some are set).
async fn get_settings(
    State(state): State<Arc<AppState>>,
    tenant: AdminTenant,
) -> Result<Response, ApiError> {
    let stored = state
        .meta
        .settings(&tenant.0)
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
    tenant: AdminTenant,
    body: Result<Json<TenantSettings>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let settings = json_body(body, "the tenant settings object (see GET /v1/settings)")?;
    let stored = state
        .meta
        .put_settings(&tenant.0, &settings)
        .await
        .map_err(ApiError::Meta)?;
    state
        .collector
        .redactions
        .set(&tenant.0, &settings.redactions)
        .map_err(ApiError::BadRequest)?;
    tracing::info!(tenant = %tenant.0, revision = stored.revision, "tenant settings replaced");
    Ok(Json(json!({"settings": stored.value, "revision": stored.revision, "updated_at": stored.updated_at})).into_response())
}

/// `GET /v1/users/{user}/profile`.
async fn get_profile(
    State(state): State<Arc<AppState>>,
    tenant: AdminTenant,
    Path(user): Path<String>,
) -> Result<Response, ApiError> {
    let stored = state
        .meta
        .profile(&tenant.0, &user)
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
    tenant: AdminTenant,
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
        .put_profile(&tenant.0, &user, &profile)
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
    tenant: AdminTenant,
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
    let (to, from) = time_range(params.from.as_deref(), params.to.as_deref())?;
    let members = resolve_group(&state, &tenant.0, &params).await?;
    let (k, _gate) = group_clearance(&state, &tenant.0, &members).await?;
    let mut windows = Vec::with_capacity(members.len());
    for user in &members {
        let series = state
            .query
            .features(&tenant.0, user, from, to, granularity)
            .await
            .map_err(ApiError::Query)?;
        windows.push((user.clone(), series.windows));
    }
    let aggregated = digame_query::groups::aggregate(&windows, k);
    state
        .meta
        .record_released_group(&tenant.0, &members)
        .await
        .map_err(ApiError::Meta)?;
    Ok(Json(json!({
        "members": members.len(),
        "k": k,
        "granularity": granularity,
        "from": from,
        "to": to,
        "windows": aggregated,
    }))
    .into_response())
}

/// The members of the group `params` names (`team=`, `manager=` or `users=a,b,c`).
pub(crate) async fn resolve_group(
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

/// Checks that `members` may be shown as a group (k-anonymity and no disclosure by
/// difference); returns k and the gate to hold until the release is recorded, so two
/// requests cannot both pass against the same released set.
pub(crate) async fn group_clearance<'a>(
    state: &'a AppState,
    tenant: &str,
    members: &std::collections::BTreeSet<String>,
) -> Result<(usize, tokio::sync::MutexGuard<'a, ()>), ApiError> {
    let settings = state.meta.settings(tenant).await.map_err(ApiError::Meta)?;
    let k = settings.map_or(TenantSettings::default().min_group_size, |s| {
        s.value.min_group_size
    }) as usize;
    let gate = state.group_gate.lock().await;
    let released = state
        .meta
        .released_groups(tenant)
        .await
        .map_err(ApiError::Meta)?;
    digame_query::groups::difference_check(members, &released, k)
        .map_err(ApiError::GroupRefused)?;
    Ok((k, gate))
}

/// `from`/`to` query parameters: default the 7 days before tomorrow.
pub(crate) fn time_range(
    from: Option<&str>,
    to: Option<&str>,
) -> Result<(EventTime, EventTime), ApiError> {
    let to = match to {
        Some(t) => parse_time("to", t)?,
        None => EventTime(EventTime::now().0 + EventTime::DAY),
    };
    let from = match from {
        Some(t) => parse_time("from", t)?,
        None => EventTime(to.0 - 7 * EventTime::DAY),
    };
    if to <= from {
        return Err(ApiError::BadRequest(format!(
            "`to` ({to}) must be after `from` ({from})"
        )));
    }
    Ok((to, from))
}

/// `POST /v1/recompute`: queues a recomputation of the admin's tenant; answers 202 with
/// the job id to follow at `GET /v1/jobs/{id}`.
async fn post_recompute(
    State(state): State<Arc<AppState>>,
    tenant: AdminTenant,
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
        .create_job(&tenant.0, "recompute", &spec_json)
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
        recomputer.run_job(&tenant.0, &id, &spec).await;
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
    tenant: AdminTenant,
    Path(job_id): Path<String>,
) -> Result<Response, ApiError> {
    let job = state
        .meta
        .job(&tenant.0, &job_id)
        .await
        .map_err(ApiError::Meta)?
        .ok_or_else(|| ApiError::NotFound(format!("no job `{job_id}` in this tenant")))?;
    Ok(Json(job).into_response())
}

async fn post_events(
    State(state): State<Arc<AppState>>,
    tenant: Tenant,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let limit = state.collector.config.max_body_bytes;
    let result = match axum::body::to_bytes(body, limit).await {
        Ok(bytes) => {
            let encoding = headers
                .get(header::CONTENT_ENCODING)
                .and_then(|v| v.to_str().ok());
            state.collector.ingest(&tenant.0, encoding, bytes).await
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

fn parse_time(name: &str, text: &str) -> Result<EventTime, ApiError> {
    let parsed = match text.parse::<i64>() {
        Ok(ms) => EventTime::from_millis(ms),
        Err(_) => EventTime::parse_rfc3339(text),
    };
    parsed.map_err(|e| ApiError::BadRequest(format!("parameter `{name}`: {e}")))
}

async fn get_features(
    State(state): State<Arc<AppState>>,
    tenant: Tenant,
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
    let (to, from) = time_range(params.from.as_deref(), params.to.as_deref())?;
    let series = state
        .query
        .features(&tenant.0, &user, from, to, granularity)
        .await
        .map_err(ApiError::Query)?;
    Ok(Json(series).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SqlRequest {
    sql: String,
}

async fn post_sql(
    State(state): State<Arc<AppState>>,
    tenant: Tenant,
    body: Body,
) -> Result<Response, ApiError> {
    let bytes = axum::body::to_bytes(body, MAX_SQL_BODY)
        .await
        .map_err(|_| ApiError::BadRequest(format!("body exceeds {MAX_SQL_BODY} bytes")))?;
    let req: SqlRequest = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::BadRequest(format!("body must be {{\"sql\": \"SELECT …\"}}: {e}"))
    })?;
    let result = state
        .query
        .sql(&tenant.0, &req.sql)
        .await
        .map_err(ApiError::Query)?;
    Ok(Json(result).into_response())
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let bus = state.bus.status();
    let store = state.store.status();
    let lag = state.pipeline.lag.load(Ordering::Relaxed);
    // An ingest-only node has no pipeline to wait for.
    let running = !state.pipeline_enabled || state.pipeline.running.load(Ordering::Relaxed);
    let lag_ok = lag <= state.max_ready_lag;
    let ready = bus.healthy && store.healthy && running && lag_ok;
    let body = json!({
        "ready": ready,
        "bus": {"ok": bus.healthy, "detail": bus.detail},
        "store": {"ok": store.healthy && !state.pipeline.store_failing.load(Ordering::Relaxed), "detail": store.detail},
        "pipeline": {"ok": running && lag_ok, "running": running, "lag_records": lag, "max_lag_records": state.max_ready_lag,
                     "settings_revision": state.pipeline.settings_revision.load(Ordering::Relaxed)},
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

async fn metrics_text() -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        metrics().render(),
    )
        .into_response()
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such route; see the README for the API".into())
}

/// The HTTP routes.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/events", post(post_events))
        .route("/v1/schema", get(get_schema))
        .route("/v1/users/{user}/features", get(get_features))
        .route("/v1/sql", post(post_sql))
        .route("/v1/users/{user}/data", delete(delete_person_data))
        .route("/v1/retention", post(post_retention))
        .route("/v1/settings", get(get_settings).put(put_settings))
        .route("/v1/recompute", post(post_recompute))
        .route("/v1/groups/features", get(get_group_features))
        .route("/v1/styles", get(views::get_styles))
        .route("/v1/groups/network", get(views::get_network))
        .route("/v1/groups/flow", get(views::get_flow))
        .route("/v1/users/{user}/pattern", get(views::get_pattern))
        .route("/v1/users/{user}/transitions", get(views::get_transitions))
        .route("/v1/users/{user}/radar", get(views::get_radar))
        .route("/v1/jobs/{job_id}", get(get_job))
        .route(
            "/v1/users/{user}/profile",
            get(get_profile).put(put_profile),
        )
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .fallback(not_found)
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
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

/// A running server.
pub struct Server {
    pub addr: SocketAddr,
    pub state: Arc<AppState>,
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
                query: QueryEngine::new(&dir, config.query.clone()),
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
        } else if config.ingest.keys.0.is_empty() {
            anyhow::bail!(
                "no ingest keys configured; set DIGAME_INGEST_KEYS=key:tenant (keys of at least 16 characters)"
            );
        }
        let bus = digame_infra::bus::open(&config).await?;
        let opened = open_store(&config).await?;
        let meta = MetaStore::open(&config.meta.url, &config.data_dir).await?;
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
            processor: Processor::new(&config.pipeline)?,
            settings: RuntimeSettings {
                meta_refresh: Duration::from_millis(config.meta.refresh_ms.max(10)),
                ..RuntimeSettings::from_config(&config.pipeline, &config.data_dir)
            },
            status: pipeline_status.clone(),
            meta: Some(meta.clone()),
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
            let (meta, redactions, mut rx) =
                (meta.clone(), redactions.clone(), shutdown_rx.clone());
            let every = Duration::from_millis(config.meta.refresh_ms.max(10));
            tasks.push((
                "redaction-follower",
                tokio::spawn(async move {
                    let mut seen = meta_seen;
                    loop {
                        tokio::select! {
                            _ = tokio::time::sleep(every) => {}
                            _ = rx.changed() => return,
                        }
                        match install_redactions(&meta, &redactions, seen).await {
                            Ok(r) => seen = r,
                            Err(e) => tracing::warn!(error = %e, "reading redaction rules failed; retrying"),
                        }
                    }
                }),
            ));
        }
        // ClickHouse merges by itself; the embedded store is compacted here.
        if let Some(parquet) = opened.parquet.clone() {
            let mut rx = shutdown_rx.clone();
            let min_files = config.store.compaction_min_files;
            let every = Duration::from_secs(config.store.compaction_interval_secs.max(1));
            tasks.push((
                "compaction",
                tokio::spawn(async move {
                    loop {
                        tokio::select! {
                            _ = tokio::time::sleep(every) => {}
                            _ = rx.changed() => return,
                        }
                        match parquet.compact(min_files).await {
                            Ok(0) => {}
                            Ok(n) => tracing::info!(partitions = n, "compacted store partitions"),
                            Err(e) => tracing::warn!(error = %e, "compaction failed"),
                        }
                    }
                }),
            ));
        }

        let state = Arc::new(AppState {
            keys: config.ingest.keys.clone(),
            admin_keys: config.admin.keys.clone(),
            retention_days: config.store.retention_days.clone(),
            collector: Collector {
                bus: bus.clone(),
                config: config.ingest.clone(),
                redactions,
            },
            query: query.clone(),
            bus,
            store: store.clone(),
            pipeline: pipeline_status,
            max_ready_lag: config.pipeline.max_ready_lag,
            pipeline_enabled: config.pipeline.enabled,
            recomputer: Recomputer {
                query,
                store,
                meta: meta.clone(),
                pipeline: config.pipeline.clone(),
            },
            meta,
            job_slots: Arc::new(tokio::sync::Semaphore::new(1)),
            group_gate: tokio::sync::Mutex::new(()),
        });
        let listener = tokio::net::TcpListener::bind(config.listen).await?;
        let addr = listener.local_addr()?;
        let app = match role {
            Role::All => router(state.clone()),
            Role::Pipeline => ops_router(state.clone()),
        };
        let mut rx = shutdown_rx.clone();
        let http = tokio::spawn(async move {
            let graceful = async move {
                let _ = rx.wait_for(|stop| *stop).await;
            };
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(graceful)
                .await
            {
                tracing::error!(error = %e, "http server failed");
            }
        });
        tracing::info!(%addr, data_dir = %config.data_dir.display(), "digame serving");
        Ok(Server {
            addr,
            state,
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

/// Loads ingest keys from `<data_dir>/ingest.key`, creating one for tenant `default` on
/// first start. Returns the keys and, when just created, the new key (to show once).
pub fn ensure_ingest_key(
    data_dir: &std::path::Path,
) -> anyhow::Result<(IngestKeys, Option<String>)> {
    use std::io::Write;
    let path = data_dir.join("ingest.key");
    if let Ok(text) = std::fs::read_to_string(&path) {
        let keys = IngestKeys::parse(text.trim()).map_err(anyhow::Error::msg)?;
        return Ok((keys, None));
    }
    std::fs::create_dir_all(data_dir)?;
    let key: String = {
        use rand::Rng;
        let mut rng = rand::rng();
        (0..32)
            .map(|_| char::from_digit(rng.random_range(0..16), 16).expect("hex digit"))
            .collect()
    };
    let line = format!("{key}:default");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(&path)?;
    f.write_all(line.as_bytes())?;
    f.sync_all()?;
    let keys = IngestKeys::parse(&line).map_err(anyhow::Error::msg)?;
    Ok((keys, Some(key)))
}
