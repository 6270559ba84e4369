//! Raw events read back out of the store, for recomputation: which people have events in
//! a range and how many rows each, and people's events in event-time order (one person,
//! or a group of people in one read).
//!
//! Both backends answer through typed, bound parameters (DataFusion literals on the
//! embedded store; the `clickhouse` crate's escaped binds on ClickHouse), scoped to one
//! tenant. Events come back as the canonical [`ActivityEvent`] they were stored from;
//! duplicates a replay may have stored are left in (the pipeline drops them by id).

use datafusion::common::ScalarValue;
use datafusion::logical_expr::{Expr, col, lit};
use std::sync::LazyLock;

use digame_infra::store::Table;
use digame_schemas::arrow::Layout;
use digame_schemas::{ActivityEvent, EventTime};
use serde_json::{Map, Value};

use crate::{Backend, QueryEngine, QueryError, Result, batches_to_json, internal};

/// The flat layout events are stored in, derived from the canonical event's schema.
static EVENT_LAYOUT: LazyLock<Layout> = LazyLock::new(Layout::of::<ActivityEvent>);

fn ts(t: EventTime) -> Expr {
    lit(ScalarValue::TimestampMillisecond(
        Some(t.0),
        Some("UTC".into()),
    ))
}

/// Whole seconds around `[from, to)` for ClickHouse's `DateTime`; exact bounds are
/// applied after reading.
fn seconds(from: EventTime, to: EventTime) -> (u32, u32) {
    let clamp = |s: i64| s.clamp(0, i64::from(u32::MAX)) as u32;
    (
        clamp(from.0.div_euclid(1000)),
        clamp((to.0 + 999).div_euclid(1000)),
    )
}

/// Rebuilds the canonical event from a flat store row: every column of the event layout
/// goes back to its path (attributes as columns, properties as JSON text), and columns
/// outside the layout (partition columns such as `date`) are left out.
fn event_from_flat(mut row: Map<String, Value>) -> Result<ActivityEvent> {
    let mut event = Map::new();
    for column in &EVENT_LAYOUT.columns {
        let value = match row.remove(&column.name) {
            None | Some(Value::Null) => continue,
            Some(Value::String(text)) if column.json_text => serde_json::from_str(&text)
                .map_err(|e| internal(format!("stored {} are not JSON: {e}", column.name)))?,
            Some(v) => v,
        };
        let (leaf, parents) = column.path.split_last().expect("columns have a path");
        let mut at = &mut event;
        for p in parents {
            at = match at
                .entry(p.clone())
                .or_insert_with(|| Value::Object(Map::new()))
            {
                Value::Object(m) => m,
                _ => unreachable!("a layout path runs through objects"),
            };
        }
        at.insert(leaf.clone(), value);
    }
    serde_json::from_value(Value::Object(event))
        .map_err(|e| internal(format!("a stored event cannot be read back: {e}")))
}

/// `from <= timestamp < to`.
fn in_range(from: EventTime, to: EventTime) -> Expr {
    col("timestamp")
        .gt_eq(ts(from))
        .and(col("timestamp").lt(ts(to)))
}

impl QueryEngine {
    /// The tenant's events matching `filter` (embedded store): deduplicated by event id,
    /// or with `dedup` false as stored (a replayed event twice), for reads that need no
    /// more (which people have events): deduplicating sorts every row the filter keeps.
    async fn events_where(
        &self,
        tenant: &str,
        filter: Expr,
        dedup: bool,
    ) -> Result<datafusion::dataframe::DataFrame> {
        let ctx = self.context(tenant, dedup)?;
        ctx.table(Table::Events.name())
            .await
            .map_err(internal)?
            .filter(filter)
            .map_err(internal)
    }

    /// The tenants with stored events, sorted: what a rebuild of state from the store
    /// walks (it is the only read here that is not scoped to one tenant, and it returns
    /// tenant ids only).
    pub async fn event_tenants(&self) -> Result<Vec<String>> {
        if let Backend::ClickHouse(client) = &self.backend {
            return client
                .query("SELECT DISTINCT tenant_id FROM events ORDER BY tenant_id")
                .fetch_all::<String>()
                .await
                .map_err(|e| internal(format!("clickhouse: {e}")));
        }
        let dir = self.root()?.join(Table::Events.name());
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(internal(format!("{}: {e}", dir.display()))),
        };
        let mut tenants = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| internal(format!("{}: {e}", dir.display())))?;
            let name = entry.file_name();
            // Only directory names that are valid tenant ids: anything else is not ours.
            if let Some(tenant) = name.to_str().and_then(|n| n.strip_prefix("tenant_id="))
                && digame_schemas::validate::validate_tenant_id(tenant).is_ok()
            {
                tenants.push(tenant.to_string());
            }
        }
        tenants.sort();
        Ok(tenants)
    }

    /// The people with events in `[from, to)`, sorted.
    pub async fn event_users(
        &self,
        tenant: &str,
        from: EventTime,
        to: EventTime,
    ) -> Result<Vec<String>> {
        Ok(self
            .event_rows_by_user(tenant, from, to)
            .await?
            .into_iter()
            .map(|(user, _)| user)
            .collect())
    }

    /// Per person with events in `[from, to)`, the rows the store holds for them there (a
    /// replayed event counts once per copy: what reading their events costs), sorted by
    /// person. Memory is one entry per person, whatever the range holds: the rows are
    /// counted as stored, hashed by person, never sorted.
    pub async fn event_rows_by_user(
        &self,
        tenant: &str,
        from: EventTime,
        to: EventTime,
    ) -> Result<Vec<(String, u64)>> {
        digame_schemas::validate::validate_tenant_id(tenant).map_err(QueryError::Invalid)?;
        if let Backend::ClickHouse(client) = &self.backend {
            let (from_s, to_s) = seconds(from, to);
            return client
                .query(
                    "SELECT user_id, count() FROM events WHERE tenant_id = ? \
                     AND timestamp >= toDateTime(?, 'UTC') AND timestamp <= toDateTime(?, 'UTC') \
                     GROUP BY user_id ORDER BY user_id",
                )
                .bind(tenant)
                .bind(from_s)
                .bind(to_s)
                .fetch_all::<(String, u64)>()
                .await
                .map_err(|e| internal(format!("clickhouse: {e}")));
        }
        let df = self
            .events_where(tenant, in_range(from, to), false)
            .await?
            .aggregate(
                vec![col("user_id")],
                vec![datafusion::functions_aggregate::count::count(lit(1)).alias("n")],
            )
            .map_err(internal)?;
        let rows = batches_to_json(&df.collect().await.map_err(internal)?)?;
        let mut out: Vec<(String, u64)> = rows
            .into_iter()
            .filter_map(|mut r| match (r.remove("user_id"), r.remove("n")) {
                (Some(Value::String(u)), Some(n)) => Some((u, n.as_u64().unwrap_or(0))),
                _ => None,
            })
            .collect();
        out.sort_unstable();
        Ok(out)
    }

    /// The events of each of `users` with `from <= timestamp < to`, per person in
    /// event-time order (ties by event id), in one read of the store: a caller bounds its
    /// memory by the people it asks for at once (see [`Self::event_rows_by_user`]). At
    /// most `limit` per person (an error beyond, naming the limit, rather than a silent
    /// cut).
    pub async fn people_events(
        &self,
        tenant: &str,
        users: &[String],
        from: EventTime,
        to: EventTime,
        limit: usize,
    ) -> Result<Vec<(String, Vec<ActivityEvent>)>> {
        digame_schemas::validate::validate_tenant_id(tenant).map_err(QueryError::Invalid)?;
        if let Backend::ClickHouse(_) = &self.backend {
            // Its table is ordered by person: one person's read is a range of the index.
            let mut out = Vec::with_capacity(users.len());
            for user in users {
                let events = self.person_events(tenant, user, from, to, limit).await?;
                out.push((user.clone(), events));
            }
            return Ok(out);
        }
        let people = users.iter().map(|u| lit(u.as_str())).collect();
        let df = self
            .events_where(
                tenant,
                col("user_id")
                    .in_list(people, false)
                    .and(in_range(from, to)),
                true,
            )
            .await?;
        let rows = batches_to_json(&df.collect().await.map_err(internal)?)?;
        let mut by_user: std::collections::HashMap<String, Vec<Map<String, Value>>> =
            users.iter().map(|u| (u.clone(), Vec::new())).collect();
        for row in rows {
            if let Some(Value::String(u)) = row.get("user_id")
                && let Some(list) = by_user.get_mut(u.as_str())
            {
                list.push(row);
            }
        }
        let mut out = Vec::with_capacity(users.len());
        for user in users {
            let rows = by_user.remove(user).unwrap_or_default();
            let mut events = to_events(user, rows, from, to, limit)?;
            events.sort_by(|a, b| (a.timestamp, &a.event_id).cmp(&(b.timestamp, &b.event_id)));
            out.push((user.clone(), events));
        }
        Ok(out)
    }

    /// One person's events with `from <= timestamp < to`, in event-time order; at most
    /// `limit` (an error beyond, naming the limit, rather than a silent cut).
    pub async fn person_events(
        &self,
        tenant: &str,
        user: &str,
        from: EventTime,
        to: EventTime,
        limit: usize,
    ) -> Result<Vec<ActivityEvent>> {
        digame_schemas::validate::validate_tenant_id(tenant).map_err(QueryError::Invalid)?;
        let rows = if let Backend::ClickHouse(client) = &self.backend {
            clickhouse_events(client, tenant, user, from, to, limit).await?
        } else {
            let df = self
                .events_where(
                    tenant,
                    col("user_id").eq(lit(user)).and(in_range(from, to)),
                    true,
                )
                .await?
                .sort(vec![col("timestamp").sort(true, false)])
                .map_err(internal)?
                .limit(0, Some(limit + 1))
                .map_err(internal)?;
            batches_to_json(&df.collect().await.map_err(internal)?)?
        };
        to_events(user, rows, from, to, limit)
    }
}

/// `user`'s stored rows as events with `from <= timestamp < to` (the store's bounds may be
/// wider: ClickHouse's are whole seconds), in the rows' order; more than `limit` rows is an
/// error naming the limit.
fn to_events(
    user: &str,
    rows: Vec<Map<String, Value>>,
    from: EventTime,
    to: EventTime,
    limit: usize,
) -> Result<Vec<ActivityEvent>> {
    if rows.len() > limit {
        return Err(QueryError::Invalid(format!(
            "{user} has more than {limit} events in the range; recompute a shorter range"
        )));
    }
    let mut events = rows
        .into_iter()
        .map(event_from_flat)
        .collect::<Result<Vec<_>>>()?;
    events.retain(|e| e.timestamp >= from && e.timestamp < to);
    Ok(events)
}

async fn clickhouse_events(
    client: &clickhouse::Client,
    tenant: &str,
    user: &str,
    from: EventTime,
    to: EventTime,
    limit: usize,
) -> Result<Vec<Map<String, Value>>> {
    #[derive(clickhouse::Row, serde::Deserialize)]
    struct Stored {
        schema_version: u16,
        event_id: String,
        source: String,
        kind: String,
        timestamp: u32,
        timestamp_ms: u16,
        received_at: Option<u32>,
        received_at_ms: Option<u16>,
        duration_ms: u64,
        app: Option<String>,
        title: Option<String>,
        url: Option<String>,
        project: Option<String>,
        language: Option<String>,
        branch: Option<String>,
        file: Option<String>,
        participants: Vec<String>,
        status: Option<String>,
        properties: Option<String>,
    }
    let (from_s, to_s) = seconds(from, to);
    let rows: Vec<Stored> = client
        .query(
            "SELECT schema_version, event_id, source, kind, timestamp, timestamp_ms, \
             received_at, received_at_ms, duration_ms, app, title, url, project, language, \
             branch, file, participants, status, properties FROM events FINAL \
             WHERE tenant_id = ? AND user_id = ? \
             AND timestamp >= toDateTime(?, 'UTC') AND timestamp <= toDateTime(?, 'UTC') \
             ORDER BY timestamp, timestamp_ms LIMIT ?",
        )
        .bind(tenant)
        .bind(user)
        .bind(from_s)
        .bind(to_s)
        .bind(limit as u64 + 1)
        .fetch_all()
        .await
        .map_err(|e| internal(format!("clickhouse: {e}")))?;
    let ms = |s: u32, m: u16| i64::from(s) * 1000 + i64::from(m);
    Ok(rows
        .into_iter()
        .map(|r| {
            let received = match (r.received_at, r.received_at_ms) {
                (Some(s), m) => Value::from(ms(s, m.unwrap_or(0))),
                _ => Value::Null,
            };
            let participants = if r.participants.is_empty() {
                Value::Null
            } else {
                Value::from(r.participants)
            };
            let json = serde_json::json!({
                "schema_version": r.schema_version, "event_id": r.event_id,
                "tenant_id": tenant, "user_id": user, "source": r.source, "kind": r.kind,
                "timestamp": ms(r.timestamp, r.timestamp_ms), "received_at": received,
                "duration_ms": r.duration_ms, "app": r.app, "title": r.title, "url": r.url,
                "project": r.project, "language": r.language, "branch": r.branch,
                "file": r.file, "participants": participants, "status": r.status,
                "properties": r.properties,
            });
            match json {
                Value::Object(m) => m,
                _ => unreachable!("built as an object"),
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_rows_become_canonical_events() {
        let row = serde_json::json!({
            "schema_version": 1, "event_id": "00000000-0000-4000-8000-000000000001",
            "tenant_id": "acme", "date": "2026-11-24", "user_id": "ana", "source": "aw",
            "kind": "meeting", "timestamp": "2026-11-24T09:00:00Z", "received_at": null,
            "duration_ms": 60000, "app": null, "title": "Sync", "url": null,
            "project": null, "language": null, "branch": null, "file": null,
            "participants": ["bob", "ext:1"], "status": "accepted",
            "properties": "{\"k\":1}"
        });
        let Value::Object(row) = row else { panic!() };
        let ev = event_from_flat(row).unwrap();
        assert_eq!(ev.tenant_id, "acme");
        assert_eq!(ev.timestamp.0, 1_795_510_800_000);
        assert_eq!(ev.attributes.title.as_deref(), Some("Sync"));
        assert_eq!(ev.attributes.participants, ["bob", "ext:1"]);
        assert_eq!(ev.attributes.status.as_deref(), Some("accepted"));
        assert_eq!(ev.properties.unwrap().get(), "{\"k\":1}");
    }
}
