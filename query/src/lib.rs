//! The read side: DataFusion over the embedded Parquet store, scoped to one tenant.
//!
//! Tenant isolation is structural. A query runs in a session built for the caller's
//! tenant, whose only tables are views whose logical plans start with
//! `scan → filter(tenant_id = <tenant>)`; the filter is a plan node with a bound literal,
//! never text spliced into SQL, and it is on the partition column so other tenants'
//! directories are not even listed. Views also apply upsert semantics (one row per key,
//! highest revision), so replays and late updates never show twice.
//!
//! `POST /v1/sql` accepts only queries: DDL, DML and other statements are refused by
//! DataFusion's SQL options before planning completes. Results are capped in rows and time.

use std::sync::Arc;
use std::time::Duration;

use datafusion::arrow::array::{
    Array, BooleanArray, Float64Array, RecordBatch, StringArray, TimestampMillisecondArray,
};
use datafusion::arrow::datatypes::DataType;
use datafusion::catalog::TableProvider;
use datafusion::common::ScalarValue;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::datasource::{ViewTable, provider_as_source};
use datafusion::execution::context::SQLOptions;
use datafusion::functions_window::expr_fn::row_number;
use datafusion::logical_expr::{Expr, ExprFunctionExt, LogicalPlanBuilder, col, lit};
use datafusion::prelude::{SessionConfig, SessionContext};
use digame_infra::config::QueryConfig;
use digame_infra::store::{PARTITION_COLUMNS, Table};
use digame_infra::telemetry::metrics;
use digame_schemas::{EventTime, Granularity};
use serde::Serialize;
use serde_json::{Map, Value};

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The request itself is wrong (bad SQL, refused statement, bad parameters).
    #[error("{0}")]
    Invalid(String),
    #[error("query exceeded the time limit of {0} s; narrow the time range or add filters")]
    Timeout(u64),
    #[error("query engine error: {0}")]
    Internal(String),
}

pub type Result<T, E = QueryError> = std::result::Result<T, E>;

fn internal(e: impl std::fmt::Display) -> QueryError {
    QueryError::Internal(e.to_string())
}

/// Result of `POST /v1/sql`.
#[derive(Debug, Serialize)]
pub struct SqlResult {
    pub columns: Vec<ColumnInfo>,
    pub rows: Vec<Map<String, Value>>,
    pub row_count: usize,
    /// More rows existed than the limit allowed.
    pub truncated: bool,
}

#[derive(Debug, Serialize)]
pub struct ColumnInfo {
    pub name: String,
    pub data_type: String,
}

/// One window of a person's features.
#[derive(Debug, Serialize, PartialEq)]
pub struct FeatureWindow {
    pub window_start: EventTime,
    pub window_end: EventTime,
    pub timezone: String,
    pub is_final: bool,
    /// Totals: feature → value.
    pub features: Map<String, Value>,
    /// Breakdowns: feature → dimension → value.
    pub breakdowns: Map<String, Value>,
}

/// Result of the features endpoint.
#[derive(Debug, Serialize)]
pub struct FeatureSeries {
    pub user_id: String,
    pub granularity: Granularity,
    pub from: EventTime,
    pub to: EventTime,
    pub windows: Vec<FeatureWindow>,
}

/// Read access to the embedded store.
pub struct QueryEngine {
    root: std::path::PathBuf,
    config: QueryConfig,
}

impl QueryEngine {
    pub fn new(store_root: impl Into<std::path::PathBuf>, config: QueryConfig) -> Self {
        QueryEngine {
            root: store_root.into(),
            config,
        }
    }

    /// A session whose tables are the tenant's views and nothing else.
    pub fn tenant_context(&self, tenant: &str) -> Result<SessionContext> {
        digame_schemas::validate::validate_tenant_id(tenant).map_err(QueryError::Invalid)?;
        let config = SessionConfig::new()
            .with_information_schema(false)
            .with_target_partitions(2);
        let ctx = SessionContext::new_with_config(config);
        for table in Table::ALL {
            let view = self.tenant_view(table, tenant)?;
            ctx.register_table(table.name(), view).map_err(internal)?;
        }
        Ok(ctx)
    }

    fn tenant_view(&self, table: Table, tenant: &str) -> Result<Arc<dyn TableProvider>> {
        let dir = self.root.join(table.name());
        std::fs::create_dir_all(&dir).map_err(internal)?;
        let url = ListingTableUrl::parse(format!("{}/", dir.display())).map_err(internal)?;
        let partition_cols = PARTITION_COLUMNS
            .iter()
            .map(|c| (c.to_string(), DataType::Utf8))
            .collect();
        let options = ListingOptions::new(Arc::new(ParquetFormat::default()))
            .with_file_extension(".parquet")
            .with_table_partition_cols(partition_cols);
        let listing = ListingTableConfig::new(url)
            .with_listing_options(options)
            .with_schema(table.file_schema());
        let provider = Arc::new(ListingTable::try_new(listing).map_err(internal)?);
        let mut plan = LogicalPlanBuilder::scan(table.name(), provider_as_source(provider), None)
            .map_err(internal)?
            .filter(col("tenant_id").eq(lit(tenant)))
            .map_err(internal)?;
        if let Some((key, version)) = table.upsert_key() {
            let columns: Vec<Expr> = plan
                .schema()
                .columns()
                .into_iter()
                .map(Expr::Column)
                .collect();
            let rank = row_number()
                .partition_by(key.iter().map(|c| col(*c)).collect())
                .order_by(vec![col(version).sort(false, false)])
                .build()
                .map_err(internal)?
                .alias("__version_rank");
            plan = plan
                .window(vec![rank])
                .map_err(internal)?
                .filter(col("__version_rank").eq(lit(1u64)))
                .map_err(internal)?
                .project(columns)
                .map_err(internal)?;
        }
        let plan = plan.build().map_err(internal)?;
        Ok(Arc::new(ViewTable::new(plan, None)))
    }

    async fn run<T>(
        &self,
        endpoint: &str,
        work: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let timer = metrics()
            .query_seconds
            .with_label_values(&[endpoint])
            .start_timer();
        let limit = self.config.timeout_secs;
        let result = match tokio::time::timeout(Duration::from_secs(limit), work).await {
            Ok(r) => r,
            Err(_) => Err(QueryError::Timeout(limit)),
        };
        timer.observe_duration();
        let outcome = match &result {
            Ok(_) => "ok",
            Err(QueryError::Invalid(_)) => "invalid",
            Err(QueryError::Timeout(_)) => "timeout",
            Err(QueryError::Internal(_)) => "error",
        };
        metrics()
            .query_requests
            .with_label_values(&[endpoint, outcome])
            .inc();
        result
    }

    /// Runs read-only SQL over the tenant's views.
    pub async fn sql(&self, tenant: &str, sql: &str) -> Result<SqlResult> {
        self.run("sql", async {
            let ctx = self.tenant_context(tenant)?;
            let options = SQLOptions::new()
                .with_allow_ddl(false)
                .with_allow_dml(false)
                .with_allow_statements(false);
            let df = ctx
                .sql_with_options(sql, options)
                .await
                .map_err(|e| QueryError::Invalid(clean_error(&e.to_string())))?;
            let max = self.config.max_rows;
            let batches = df
                .limit(0, Some(max + 1))
                .map_err(internal)?
                .collect()
                .await
                .map_err(|e| QueryError::Invalid(clean_error(&e.to_string())))?;
            let schema = batches.first().map(|b| b.schema());
            let mut rows = batches_to_json(&batches)?;
            let truncated = rows.len() > max;
            rows.truncate(max);
            let columns = schema
                .map(|s| {
                    s.fields()
                        .iter()
                        .map(|f| ColumnInfo {
                            name: f.name().clone(),
                            data_type: f.data_type().to_string(),
                        })
                        .collect()
                })
                .unwrap_or_default();
            Ok(SqlResult {
                columns,
                row_count: rows.len(),
                rows,
                truncated,
            })
        })
        .await
    }

    /// A person's feature windows with `from <= window_start < to`.
    pub async fn features(
        &self,
        tenant: &str,
        user: &str,
        from: EventTime,
        to: EventTime,
        granularity: Granularity,
    ) -> Result<FeatureSeries> {
        if to <= from {
            return Err(QueryError::Invalid(format!(
                "`to` ({to}) must be after `from` ({from})"
            )));
        }
        self.run("features", async {
            let ctx = self.tenant_context(tenant)?;
            let ts = |t: EventTime| {
                lit(ScalarValue::TimestampMillisecond(
                    Some(t.0),
                    Some("UTC".into()),
                ))
            };
            let df = ctx
                .table(Table::Features.name())
                .await
                .map_err(internal)?
                .filter(
                    col("user_id")
                        .eq(lit(user))
                        .and(col("granularity").eq(lit(granularity.as_str())))
                        .and(col("window_start").gt_eq(ts(from)))
                        .and(col("window_start").lt(ts(to))),
                )
                .map_err(internal)?
                .select_columns(&[
                    "window_start",
                    "window_end",
                    "timezone",
                    "feature",
                    "dimension",
                    "value",
                    "is_final",
                ])
                .map_err(internal)?
                .sort(vec![
                    col("window_start").sort(true, false),
                    col("feature").sort(true, false),
                    col("dimension").sort(true, false),
                ])
                .map_err(internal)?;
            let batches = df.collect().await.map_err(internal)?;
            Ok(FeatureSeries {
                user_id: user.to_string(),
                granularity,
                from,
                to,
                windows: shape_windows(&batches)?,
            })
        })
        .await
    }
}

/// DataFusion errors carry a prefix naming the engine phase; users need the message.
fn clean_error(text: &str) -> String {
    let text = text
        .trim_start_matches("Error during planning: ")
        .trim_start_matches("SQL error: ");
    if text.contains("not supported")
        || text.contains("Statement")
        || text.contains("DDL")
        || text.contains("DML")
    {
        format!(
            "{text}; only read-only queries (SELECT, WITH, EXPLAIN) over events, features and dead_letters are allowed"
        )
    } else {
        text.to_string()
    }
}

fn column<'a, T: 'static>(batch: &'a RecordBatch, name: &str) -> Result<&'a T> {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<T>())
        .ok_or_else(|| internal(format!("column {name} missing or of unexpected type")))
}

fn shape_windows(batches: &[RecordBatch]) -> Result<Vec<FeatureWindow>> {
    let mut out: Vec<FeatureWindow> = Vec::new();
    for b in batches {
        let start = column::<TimestampMillisecondArray>(b, "window_start")?;
        let end = column::<TimestampMillisecondArray>(b, "window_end")?;
        let tz = column::<StringArray>(b, "timezone")?;
        let feature = column::<StringArray>(b, "feature")?;
        let dim = column::<StringArray>(b, "dimension")?;
        let value = column::<Float64Array>(b, "value")?;
        let fin = column::<BooleanArray>(b, "is_final")?;
        for i in 0..b.num_rows() {
            let ws = EventTime(start.value(i));
            if out.last().is_none_or(|w| w.window_start != ws) {
                out.push(FeatureWindow {
                    window_start: ws,
                    window_end: EventTime(end.value(i)),
                    timezone: tz.value(i).to_string(),
                    is_final: true,
                    features: Map::new(),
                    breakdowns: Map::new(),
                });
            }
            let w = out.last_mut().expect("just pushed");
            w.is_final &= fin.value(i);
            let v = Value::from(value.value(i));
            if dim.value(i).is_empty() {
                w.features.insert(feature.value(i).to_string(), v);
            } else {
                w.breakdowns
                    .entry(feature.value(i).to_string())
                    .or_insert_with(|| Value::Object(Map::new()))
                    .as_object_mut()
                    .expect("breakdowns are objects")
                    .insert(dim.value(i).to_string(), v);
            }
        }
    }
    Ok(out)
}

fn batches_to_json(batches: &[RecordBatch]) -> Result<Vec<Map<String, Value>>> {
    use datafusion::arrow::json::ArrayWriter;
    let mut buf = Vec::new();
    {
        let mut writer = ArrayWriter::new(&mut buf);
        for b in batches {
            writer.write(b).map_err(internal)?;
        }
        writer.finish().map_err(internal)?;
    }
    if buf.is_empty() {
        return Ok(Vec::new());
    }
    serde_json::from_slice(&buf).map_err(internal)
}

#[cfg(test)]
mod tests {
    use super::*;
    use digame_infra::store::ParquetStore;
    use digame_schemas::FeatureRow;

    fn row(
        tenant: &str,
        user: &str,
        feature: &str,
        dim: &str,
        value: f64,
        revision: i64,
    ) -> FeatureRow {
        FeatureRow {
            tenant_id: tenant.into(),
            user_id: user.into(),
            granularity: Granularity::Hour,
            window_start: EventTime(1_795_510_800_000),
            window_end: EventTime(1_795_514_400_000),
            timezone: "UTC".into(),
            feature: feature.into(),
            dimension: dim.into(),
            value,
            feature_version: 1,
            is_final: revision > 1,
            revision,
        }
    }

    fn engine() -> (tempfile::TempDir, QueryEngine) {
        let dir = tempfile::tempdir().unwrap();
        let store = ParquetStore::open(dir.path()).unwrap();
        store
            .write_rows(
                Table::Features,
                &[
                    row("acme", "u1", "active_seconds", "", 100.0, 1),
                    row("acme", "u1", "active_seconds", "", 300.0, 2),
                    row("acme", "u1", "active_seconds_by_app", "Code", 300.0, 2),
                    row("globex", "u9", "active_seconds", "", 999.0, 1),
                ],
            )
            .unwrap();
        let engine = QueryEngine::new(dir.path(), QueryConfig::default());
        (dir, engine)
    }

    #[tokio::test]
    async fn views_keep_the_latest_revision_of_the_tenant_only() {
        let (_dir, engine) = engine();
        let r = engine
            .sql(
                "acme",
                "SELECT user_id, feature, value FROM features ORDER BY feature",
            )
            .await
            .unwrap();
        assert_eq!(r.row_count, 2);
        assert_eq!(r.rows[0]["value"], 300.0);
        let other = engine
            .sql("globex", "SELECT count(*) AS n FROM features")
            .await
            .unwrap();
        assert_eq!(other.rows[0]["n"], 1);
        // Even an explicit predicate for another tenant finds nothing.
        let probe = engine
            .sql(
                "acme",
                "SELECT count(*) AS n FROM features WHERE tenant_id = 'globex'",
            )
            .await
            .unwrap();
        assert_eq!(probe.rows[0]["n"], 0);
    }

    #[tokio::test]
    async fn only_queries_are_allowed() {
        let (_dir, engine) = engine();
        for stmt in [
            "CREATE TABLE x AS SELECT 1",
            "DROP TABLE features",
            "INSERT INTO features SELECT * FROM features",
            "SET datafusion.execution.batch_size = 1",
            "CREATE EXTERNAL TABLE y STORED AS PARQUET LOCATION '/tmp'",
        ] {
            let err = engine.sql("acme", stmt).await.unwrap_err();
            assert!(matches!(err, QueryError::Invalid(_)), "{stmt}: {err}");
        }
        let err = engine.sql("acme", "SELECT * FROM nope").await.unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }

    #[tokio::test]
    async fn features_are_shaped_per_window() {
        let (_dir, engine) = engine();
        let series = engine
            .features(
                "acme",
                "u1",
                EventTime(1_795_478_400_000),
                EventTime(1_795_564_800_000),
                Granularity::Hour,
            )
            .await
            .unwrap();
        assert_eq!(series.windows.len(), 1);
        let w = &series.windows[0];
        assert_eq!(w.features["active_seconds"], 300.0);
        assert_eq!(w.breakdowns["active_seconds_by_app"]["Code"], 300.0);
        assert!(w.is_final);
    }
}
