//! Analysis and visualization routes: work styles, a person's hour-of-week pattern
//! (heatmap) and its shift, app transitions (Sankey), and a radar of a person's features
//! against their team's mean.
//!
//! Person-level views are read with the tenant's key like the features endpoint; views
//! that involve a group (styles over the tenant, the team mean in the radar) need an
//! admin key, and the team mean passes the same k-anonymity and laminar release rules as
//! the group views.

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use digame_query::{QueryError, charts, groups, network, styles};
use digame_schemas::{EventTime, Granularity, TimeRange};
use serde::Deserialize;
use serde_json::json;

use crate::{
    ApiError, AppState, GroupParams, Principal, group_clearance, resolve_group, time_range,
};

const DAY_MS: i64 = 86_400_000;
/// Longest range read for event-level views (transitions).
const MAX_EVENT_RANGE_DAYS: i64 = 31;
/// Gap after which two focus events are a break, not a switch.
const SWITCH_GAP_MS: i64 = 5 * 60_000;
/// Most links in a Sankey.
const SANKEY_LINKS: usize = 30;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RangeParams {
    from: Option<String>,
    to: Option<String>,
}

type Params = Result<Query<RangeParams>, axum::extract::rejection::QueryRejection>;

fn range(params: Params, default_days: i64) -> Result<TimeRange, ApiError> {
    let Query(p) = params.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    lookback(p.from.as_deref(), p.to.as_deref(), default_days)
}

/// [`time_range`], but without `from` the range looks back `default_days` from `to`.
fn lookback(
    from: Option<&str>,
    to: Option<&str>,
    default_days: i64,
) -> Result<TimeRange, ApiError> {
    let mut range = time_range(from, to)?;
    if from.is_none() {
        range.from = EventTime(range.to.0 - default_days * DAY_MS);
    }
    Ok(range)
}

/// `range` with its end no later than now: the part of it whose days can have ended.
fn elapsed(range: TimeRange) -> TimeRange {
    TimeRange {
        from: range.from,
        to: range.to.min(EventTime::now()),
    }
}

async fn windows(
    state: &AppState,
    tenant: &str,
    user: &str,
    range: TimeRange,
    g: Granularity,
) -> Result<Vec<digame_query::FeatureWindow>, ApiError> {
    Ok(state
        .query
        .features(tenant, user, range.from, range.to, g)
        .await
        .map_err(ApiError::Query)?
        .windows)
}

/// `GET /v1/styles?from=&to=`: work-style clusters of the tenant's person-weeks (default:
/// the last 8 weeks).
pub(crate) async fn get_styles(
    State(state): State<Arc<AppState>>,
    tenant: Principal,
    params: Params,
) -> Result<Response, ApiError> {
    let TimeRange { from, to } = range(params, 56)?;
    // Everyone's day windows in one read, only the features the weeks are made of.
    let by_user = state
        .query
        .tenant_features(
            &tenant.tenant,
            from,
            to,
            Granularity::Day,
            styles::WEEK_INPUTS,
        )
        .await
        .map_err(ApiError::Query)?;
    let elapsed = elapsed(TimeRange { from, to });
    let weeks: Vec<_> = by_user
        .iter()
        .flat_map(|(user, days)| styles::person_weeks(user, days, elapsed))
        .collect();
    // k-means over k = 2…8 and the silhouettes are CPU work: off the async workers.
    let model = tokio::task::spawn_blocking(move || styles::cluster(&weeks))
        .await
        .map_err(|e| ApiError::Query(QueryError::Internal(format!("clustering stopped: {e}"))))?
        .map_err(ApiError::BadRequest)?;
    Ok(Json(model).into_response())
}

/// `GET /v1/users/{user}/pattern?from=&to=`: the hour-of-week heatmap over the range
/// (default 8 weeks), and the shift between its earlier and recent halves.
pub(crate) async fn get_pattern(
    State(state): State<Arc<AppState>>,
    tenant: Principal,
    Path(user): Path<String>,
    params: Params,
) -> Result<Response, ApiError> {
    tenant.may_read_person(&user)?;
    let range = range(params, 56)?;
    let TimeRange { from, to } = range;
    let hours = windows(&state, &tenant.tenant, &user, range, Granularity::Hour).await?;
    let mid = from.0 + (to.0 - from.0) / 2;
    let weeks = |span: i64| ((span as f64) / (7.0 * DAY_MS as f64)).ceil() as usize;
    let all = charts::heatmap(&hours, weeks(to.0 - from.0));
    let earlier = charts::heatmap(
        hours.iter().filter(|w| w.window_start.0 < mid),
        weeks(mid - from.0),
    );
    let recent = charts::heatmap(
        hours.iter().filter(|w| w.window_start.0 >= mid),
        weeks(to.0 - mid),
    );
    let shift = charts::shift(&earlier, &recent);
    Ok(Json(json!({
        "user_id": user, "from": from, "to": to,
        "heatmap": all, "earlier": earlier, "recent": recent, "shift": shift,
    }))
    .into_response())
}

/// `GET /v1/users/{user}/transitions?from=&to=`: app-to-app focus transitions as a
/// Sankey (default: the last 7 days; at most 31).
pub(crate) async fn get_transitions(
    State(state): State<Arc<AppState>>,
    tenant: Principal,
    Path(user): Path<String>,
    params: Params,
) -> Result<Response, ApiError> {
    tenant.may_read_person(&user)?;
    let range = range(params, 7)?;
    let TimeRange { from, to } = range;
    if range.len_ms() > MAX_EVENT_RANGE_DAYS * DAY_MS {
        return Err(ApiError::BadRequest(format!(
            "transitions cover at most {MAX_EVENT_RANGE_DAYS} days; narrow from/to"
        )));
    }
    let events = state
        .query
        .person_events(&tenant.tenant, &user, from, to, 2_000_000)
        .await
        .map_err(ApiError::Query)?;
    let sankey = charts::transitions(&events, SWITCH_GAP_MS, SANKEY_LINKS);
    Ok(Json(json!({"user_id": user, "from": from, "to": to, "sankey": sankey})).into_response())
}

/// `GET /v1/users/{user}/radar?from=&to=`: the person's style features (the work-style
/// vector over the range) against their team's mean (never a percentile or extreme: each
/// of those is one colleague's value).
pub(crate) async fn get_radar(
    State(state): State<Arc<AppState>>,
    tenant: Principal,
    Path(user): Path<String>,
    params: Params,
) -> Result<Response, ApiError> {
    tenant.may_read_person(&user)?;
    let range = range(params, 28)?;
    let profile = state
        .meta
        .profile(&tenant.tenant, &user)
        .await
        .map_err(ApiError::Meta)?;
    let team = profile.and_then(|p| p.value.team).ok_or_else(|| {
        ApiError::BadRequest(format!(
            "{user} has no team in their profile; set one with PUT /v1/users/{user}/profile"
        ))
    })?;
    let members: BTreeSet<String> = state
        .meta
        .members(&tenant.tenant, &team, false)
        .await
        .map_err(ApiError::Meta)?
        .into_iter()
        .collect();
    let k = group_clearance(&state, &tenant.tenant, &members, range).await?;
    // Each person's vector is the mean of their weeks in the range.
    let mut vectors: Vec<(String, Vec<f64>)> = Vec::new();
    for m in &members {
        let days = windows(&state, &tenant.tenant, m, range, Granularity::Day).await?;
        let weeks = styles::person_weeks(m, &days, elapsed(range));
        if weeks.is_empty() {
            continue;
        }
        let n = weeks.len() as f64;
        let mut v = vec![0.0; styles::STYLE_FEATURES.len()];
        for w in &weeks {
            for (acc, x) in v.iter_mut().zip(&w.vector) {
                *acc += x / n;
            }
        }
        vectors.push((m.clone(), v));
    }
    if vectors.len() < k {
        return Err(ApiError::GroupRefused(groups::Refusal::TooSmall {
            size: vectors.len(),
            k,
        }));
    }
    let person = vectors
        .iter()
        .find(|(u, _)| *u == user)
        .map(|(_, v)| v.clone());
    let mut mean = Vec::new();
    let mut max = Vec::new();
    for d in 0..styles::STYLE_FEATURES.len() {
        let values: Vec<f64> = vectors.iter().map(|(_, v)| v[d]).collect();
        let s = groups::stats(&values, values.len());
        mean.push(s.mean);
        // The axis' scale: the person's own value or twice the team mean, whichever is
        // larger — never a colleague's own value (the team maximum would be one).
        let mine = person.as_ref().map_or(0.0, |v| v[d]);
        let top = mine.max(2.0 * s.mean);
        max.push(if top > 0.0 { top } else { 1.0 });
    }
    let indicators: Vec<_> = styles::STYLE_FEATURES
        .iter()
        .zip(&max)
        .map(|((name, _, _), max)| json!({"name": name, "max": max}))
        .collect();
    Ok(Json(json!({
        "user_id": user, "team": team, "from": range.from, "to": range.to,
        "team_people": vectors.len(),
        "indicators": indicators,
        "person": person,
        "team_mean": mean,
    }))
    .into_response())
}

/// Longest window of the collaboration graph and the flow metrics.
const MAX_GROUP_EVENT_DAYS: i64 = 90;
/// Commits this long before the window still count toward lead time.
const COMMIT_LOOKBACK_DAYS: i64 = 30;
/// Most events read per member for group event views.
const MAX_MEMBER_EVENTS: usize = 2_000_000;

type GroupQuery = Result<Query<GroupParams>, axum::extract::rejection::QueryRejection>;

/// A group's events as [`group_events`] reads them: the window, every member's events,
/// and the tenant's k.
struct GroupEvents {
    from: EventTime,
    to: EventTime,
    members: Vec<(String, Vec<digame_schemas::ActivityEvent>)>,
    k: usize,
}

/// The group, its time window (default the 90 days before `to`) and every member's
/// events from `lookback_days` before the window; the group is cleared for release.
async fn group_events(
    state: &AppState,
    caller: &Principal,
    params: GroupQuery,
    lookback_days: i64,
) -> Result<GroupEvents, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let range = lookback(
        params.from.as_deref(),
        params.to.as_deref(),
        MAX_GROUP_EVENT_DAYS,
    )?;
    let TimeRange { from, to } = range;
    if range.len_ms() > MAX_GROUP_EVENT_DAYS * DAY_MS {
        return Err(ApiError::BadRequest(format!(
            "group event views cover at most {MAX_GROUP_EVENT_DAYS} days; narrow from/to"
        )));
    }
    let tenant: &str = &caller.tenant;
    let members = resolve_group(state, caller, &params).await?;
    let k = group_clearance(state, tenant, &members, range).await?;
    let read_from = EventTime(from.0 - lookback_days * DAY_MS);
    let mut out = Vec::with_capacity(members.len());
    for m in &members {
        let events = state
            .query
            .person_events(tenant, m, read_from, to, MAX_MEMBER_EVENTS)
            .await
            .map_err(ApiError::Query)?;
        out.push((m.clone(), events));
    }
    Ok(GroupEvents {
        from,
        to,
        members: out,
        k,
    })
}

/// `GET /v1/groups/network?team=|manager=|users=&from=&to=`: the group's collaboration,
/// aggregated (network size, cross-team breadth, team-to-team links).
pub(crate) async fn get_network(
    State(state): State<Arc<AppState>>,
    tenant: Principal,
    params: GroupQuery,
) -> Result<Response, ApiError> {
    let GroupEvents {
        from,
        to,
        members,
        k,
    } = group_events(&state, &tenant, params, 0).await?;
    let team_of: std::collections::HashMap<String, String> = state
        .meta
        .profiles(&tenant.tenant)
        .await
        .map_err(ApiError::Meta)?
        .into_iter()
        .filter_map(|(u, p)| p.team.map(|t| (u, t)))
        .collect();
    let label = "group";
    let net = network::network(label, &members, &team_of);
    // Statistics over fewer than k people with data would describe too few to hide in.
    if net.members_with_data < k {
        return Ok(Json(json!({
            "from": from, "to": to, "members": members.len(), "network": null,
            "suppressed": true,
            "reason": format!(
                "fewer than {k} of the group's people have collaboration data here; statistics need at least {k}"
            ),
        }))
        .into_response());
    }
    Ok(Json(
        json!({"from": from, "to": to, "members": members.len(), "suppressed": false, "network": net}),
    )
    .into_response())
}

/// `GET /v1/groups/flow?team=|manager=|users=&from=&to=`: DORA flow metrics of the group
/// over the window (default the 90 days before `to`).
pub(crate) async fn get_flow(
    State(state): State<Arc<AppState>>,
    tenant: Principal,
    params: GroupQuery,
) -> Result<Response, ApiError> {
    let GroupEvents {
        from, to, members, ..
    } = group_events(&state, &tenant, params, COMMIT_LOOKBACK_DAYS).await?;
    let events: Vec<&digame_schemas::ActivityEvent> =
        members.iter().flat_map(|(_, e)| e.iter()).collect();
    let flow = network::flow(&events, from, to, EventTime::now());
    Ok(
        Json(json!({"from": from, "to": to, "members": members.len(), "flow": flow}))
            .into_response(),
    )
}
