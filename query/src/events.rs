//! Raw events read back out of the store, for recomputation: which people have events in
//! a range, and one person's events in event-time order.
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
    /// The tenant's events matching `filter` (embedded store).
    async fn events_where(
        &self,
        tenant: &str,
        filter: Expr,
    ) -> Result<datafusion::dataframe::DataFrame> {
        let ctx = self.tenant_context(tenant)?;
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

    /// The people of `tenant` with events in `[from, to)`, sorted.
    pub async fn event_users(
        &self,
        tenant: &str,
        from: EventTime,
        to: EventTime,
    ) -> Result<Vec<String>> {
        digame_schemas::validate::validate_tenant_id(tenant).map_err(QueryError::Invalid)?;
        if let Backend::ClickHouse(client) = &self.backend {
            let (from_s, to_s) = seconds(from, to);
            return client
                .query(
                    "SELECT DISTINCT user_id FROM events WHERE tenant_id = ? \
                     AND timestamp >= toDateTime(?, 'UTC') AND timestamp <= toDateTime(?, 'UTC') \
                     ORDER BY user_id",
                )
                .bind(tenant)
                .bind(from_s)
                .bind(to_s)
                .fetch_all::<String>()
                .await
                .map_err(|e| internal(format!("clickhouse: {e}")));
        }
        let df = self
            .events_where(tenant, in_range(from, to))
            .await?
            .select_columns(&["user_id"])
            .map_err(internal)?
            .distinct()
            .map_err(internal)?
            .sort(vec![col("user_id").sort(true, false)])
            .map_err(internal)?;
        let rows = batches_to_json(&df.collect().await.map_err(internal)?)?;
        Ok(rows
            .into_iter()
            .filter_map(|mut r| match r.remove("user_id") {
                Some(Value::String(u)) => Some(u),
                _ => None,
            })
            .collect())
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
                .events_where(tenant, col("user_id").eq(lit(user)).and(in_range(from, to)))
                .await?
                .sort(vec![col("timestamp").sort(true, false)])
                .map_err(internal)?
                .limit(0, Some(limit + 1))
                .map_err(internal)?;
            batches_to_json(&df.collect().await.map_err(internal)?)?
        };
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
