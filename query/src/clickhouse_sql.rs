//! `POST /v1/sql` on the ClickHouse store: planned by DataFusion, executed by ClickHouse.
//!
//! The query is parsed and planned by DataFusion against the same table schemas as the
//! embedded store (so the same SQL is accepted or refused the same way: only queries,
//! known tables and columns). Every table scan in the plan is then replaced by
//! `SubqueryAlias(table, Filter(tenant_id = <tenant>, Scan(<table>_latest)))`: the tenant
//! filter is a plan node, so no user text can remove it. The plan is unparsed into
//! ClickHouse SQL (a dialect of DataFusion's unparser) and run there, read-only
//! (`readonly=2`) and time-limited. `<table>_latest` are ClickHouse views reading the
//! tables `FINAL`, so replaced rows never show.
//!
//! ClickHouse gives backslashes in literals a meaning standard SQL does not; a query whose
//! generated SQL contains one is refused, so the text ClickHouse runs always parses as the
//! plan that DataFusion built. Results are converted to the JSON the embedded backend
//! gives, guided by the plan's output types. Timestamps in SQL results have second
//! precision on this backend (ClickHouse 18.16 has no `DateTime64`).

use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, Schema};
use datafusion::catalog::TableProvider;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{Column, Result as DfResult, TableReference};
use datafusion::datasource::empty::EmptyTable;
use datafusion::datasource::provider_as_source;
use datafusion::logical_expr::{LogicalPlan, LogicalPlanBuilder, col, lit};
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion::sql::sqlparser::ast;
use datafusion::sql::unparser::Unparser;
use datafusion::sql::unparser::dialect::{
    CharacterLengthStyle, DateFieldExtractStyle, Dialect, IntervalStyle,
};
use digame_infra::store::Table;
use digame_infra::store::clickhouse::latest_view;
use serde_json::{Map, Value};

use crate::{
    ColumnInfo, QueryError, Result, SqlResult, clean_error, internal, invalid, plan_query,
};

/// The logical schema of a table as SQL sees it on either backend: the record's columns
/// plus the `date` partition column.
fn logical_schema(table: Table) -> Arc<Schema> {
    let mut fields: Vec<_> = table.file_schema().fields().iter().cloned().collect();
    fields.extend(Table::partition_fields().into_iter().map(Arc::new));
    Arc::new(Schema::new(fields))
}

/// Plans `sql` for `tenant` and returns the ClickHouse SQL to run and the output schema.
pub async fn plan(
    tenant: &str,
    sql: &str,
    max_rows: usize,
    max_depth: usize,
) -> Result<(String, Arc<Schema>)> {
    let ctx = SessionContext::new_with_config(SessionConfig::new().with_information_schema(false));
    for table in Table::ALL {
        let provider: Arc<dyn TableProvider> = Arc::new(EmptyTable::new(logical_schema(table)));
        ctx.register_table(table.name(), provider)
            .map_err(internal)?;
    }
    let df = plan_query(&ctx, sql, max_depth).await?;
    let df = df.limit(0, Some(max_rows + 1)).map_err(internal)?;
    let plan = df.logical_plan().clone();
    let scoped = plan
        .transform_up(|node| scope_scan(node, tenant))
        .map_err(invalid)?
        .data;
    let schema = Arc::new(scoped.schema().as_arrow().clone());
    let text = Unparser::new(&ClickHouseDialect)
        .plan_to_sql(&scoped)
        .map_err(|e| {
            QueryError::Invalid(format!(
                "this query cannot be run on the ClickHouse store: {}",
                clean_error(&e.to_string())
            ))
        })?
        .to_string();
    if text.contains('\\') {
        return Err(QueryError::Invalid(
            "backslashes in literals or names are not supported on the ClickHouse store".into(),
        ));
    }
    Ok((text, schema))
}

/// Replaces a scan of one of the store's tables by its tenant-scoped, deduplicated view.
fn scope_scan(node: LogicalPlan, tenant: &str) -> DfResult<Transformed<LogicalPlan>> {
    let LogicalPlan::TableScan(scan) = &node else {
        return Ok(Transformed::no(node));
    };
    let name = scan.table_name.table().to_string();
    let Some(table) = Table::ALL.into_iter().find(|t| t.name() == name) else {
        return Err(datafusion::error::DataFusionError::Plan(format!(
            "unknown table {name}"
        )));
    };
    let view = latest_view(table);
    let source = provider_as_source(Arc::new(EmptyTable::new(logical_schema(table))));
    let mut builder = LogicalPlanBuilder::scan(view.as_str(), source, None)?.filter(
        col(Column::new(
            Some(TableReference::bare(view.as_str())),
            "tenant_id",
        ))
        .eq(lit(tenant)),
    )?;
    if let Some(projection) = &scan.projection {
        let schema = logical_schema(table);
        builder = builder.project(projection.iter().map(|i| {
            col(Column::new(
                Some(TableReference::bare(view.as_str())),
                schema.field(*i).name(),
            ))
        }))?;
    }
    let plan = builder.alias(scan.table_name.clone())?.build()?;
    Ok(Transformed::yes(plan))
}

/// DataFusion's unparser, speaking ClickHouse (18.16 and later).
struct ClickHouseDialect;

fn ch_type(name: &str) -> ast::DataType {
    ast::DataType::Custom(
        ast::ObjectName::from(vec![ast::Ident::new(name)]),
        Vec::new(),
    )
}

impl Dialect for ClickHouseDialect {
    fn identifier_quote_style(&self, _identifier: &str) -> Option<char> {
        Some('`')
    }
    fn supports_nulls_first_in_sort(&self) -> bool {
        true
    }
    fn interval_style(&self) -> IntervalStyle {
        IntervalStyle::SQLStandard
    }
    fn float64_ast_dtype(&self) -> ast::DataType {
        ch_type("Float64")
    }
    fn utf8_cast_dtype(&self) -> ast::DataType {
        ch_type("String")
    }
    fn large_utf8_cast_dtype(&self) -> ast::DataType {
        ch_type("String")
    }
    fn date_field_extract_style(&self) -> DateFieldExtractStyle {
        DateFieldExtractStyle::Extract
    }
    fn character_length_style(&self) -> CharacterLengthStyle {
        CharacterLengthStyle::Length
    }
    fn int64_cast_dtype(&self) -> ast::DataType {
        ch_type("Int64")
    }
    fn int32_cast_dtype(&self) -> ast::DataType {
        ch_type("Int32")
    }
    fn int8_cast_dtype(&self) -> ast::DataType {
        ch_type("Int8")
    }
    fn timestamp_cast_dtype(
        &self,
        _time_unit: &datafusion::arrow::datatypes::TimeUnit,
        _tz: &Option<Arc<str>>,
    ) -> ast::DataType {
        ch_type("DateTime")
    }
    fn date32_cast_dtype(&self) -> ast::DataType {
        ch_type("Date")
    }
    fn requires_derived_table_alias(&self) -> bool {
        true
    }
}

/// Runs `sql` for `tenant` on ClickHouse.
/// ClickHouse enforces the time, memory and result-size limits on its side.
pub async fn sql(
    client: &clickhouse::Client,
    tenant: &str,
    sql: &str,
    config: &digame_infra::config::QueryConfig,
) -> Result<SqlResult> {
    let (max_rows, timeout_secs) = (config.max_rows, config.timeout_secs);
    let (text, schema) = plan(tenant, sql, max_rows, config.max_depth).await?;
    tracing::debug!(sql = %text, "running SQL on ClickHouse");
    let body = client
        .query_raw(&text)
        .with_setting("readonly", "2")
        .with_setting("max_execution_time", timeout_secs.to_string())
        .with_setting("max_memory_usage", config.max_memory_bytes.to_string())
        .with_setting("max_result_bytes", config.max_result_bytes.to_string())
        .with_setting("result_overflow_mode", "break")
        .fetch_bytes("JSONCompact")
        .map_err(|e| QueryError::Invalid(format!("ClickHouse: {e}")))?
        .collect()
        .await
        .map_err(|e| QueryError::Invalid(format!("ClickHouse: {e}")))?;
    let parsed: Value = serde_json::from_slice(&body).map_err(internal)?;
    let data = parsed["data"].as_array().cloned().unwrap_or_default();
    let mut rows = Vec::with_capacity(data.len());
    for record in data {
        let cells = record.as_array().cloned().unwrap_or_default();
        let mut row = Map::new();
        for (field, cell) in schema.fields().iter().zip(cells) {
            let v = convert(field.data_type(), cell);
            // As the embedded backend's JSON writer does: nulls are left out.
            if !v.is_null() {
                row.insert(field.name().clone(), v);
            }
        }
        rows.push(row);
    }
    let truncated = rows.len() > max_rows;
    rows.truncate(max_rows);
    Ok(SqlResult {
        columns: schema
            .fields()
            .iter()
            .map(|f| ColumnInfo {
                name: f.name().clone(),
                data_type: f.data_type().to_string(),
            })
            .collect(),
        row_count: rows.len(),
        rows,
        truncated,
    })
}

/// A ClickHouse JSON cell as the embedded backend would show a value of type `t`.
fn convert(t: &DataType, v: Value) -> Value {
    if v.is_null() {
        return v;
    }
    let number = |v: &Value| match v {
        Value::String(s) => s.parse::<f64>().ok(),
        other => other.as_f64(),
    };
    match t {
        DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::Int64 => match &v {
            Value::String(s) => s.parse::<i64>().map(Value::from).unwrap_or(v),
            _ => v,
        },
        DataType::UInt8 | DataType::UInt16 | DataType::UInt32 | DataType::UInt64 => match &v {
            Value::String(s) => s.parse::<u64>().map(Value::from).unwrap_or(v),
            _ => v,
        },
        DataType::Float32 | DataType::Float64 => number(&v).map(Value::from).unwrap_or(Value::Null),
        DataType::Boolean => Value::Bool(number(&v).is_some_and(|n| n != 0.0)),
        DataType::Timestamp(_, tz) => match v.as_str() {
            // "2026-03-02 09:00:00" (UTC) → "2026-03-02T09:00:00Z" as Arrow writes it.
            Some(s) if s.len() == 19 => {
                let iso = s.replacen(' ', "T", 1);
                Value::String(if tz.is_some() { format!("{iso}Z") } else { iso })
            }
            _ => v,
        },
        DataType::List(item) => match v {
            Value::Array(items) => Value::Array(
                items
                    .into_iter()
                    .map(|i| convert(item.data_type(), i))
                    .collect(),
            ),
            other => other,
        },
        _ => v,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_scan_is_scoped_to_the_tenant_and_reads_the_latest_view() {
        let (text, schema) = plan(
            "acme",
            "SELECT f.user_id, count(*) AS n FROM features f WHERE f.value > 1 GROUP BY f.user_id",
            10,
            256,
        )
        .await
        .unwrap();
        assert!(text.contains("`features_latest`"), "{text}");
        assert!(text.contains("`tenant_id` = 'acme'"), "{text}");
        assert!(!text.contains("FROM `features` "), "{text}");
        assert_eq!(schema.field(1).name(), "n");
        // A join scopes both sides.
        let (text, _) = plan(
            "acme",
            "SELECT e.user_id FROM events e JOIN dead_letters d ON e.tenant_id = d.tenant_id",
            10,
            256,
        )
        .await
        .unwrap();
        assert_eq!(text.matches("'acme'").count(), 2, "{text}");
    }

    #[tokio::test]
    async fn only_queries_and_no_backslashes() {
        for bad in [
            "DROP TABLE features",
            "INSERT INTO features SELECT * FROM features",
        ] {
            let r = plan("acme", bad, 10, 256).await;
            assert!(matches!(r, Err(QueryError::Invalid(_))), "{bad}");
        }
        let err = plan("acme", r"SELECT 'a\' AS x FROM events", 10, 256)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("backslash"), "{err}");
    }

    #[test]
    fn cells_convert_to_the_embedded_json() {
        use datafusion::arrow::datatypes::TimeUnit;
        assert_eq!(convert(&DataType::Int64, Value::from("9")), Value::from(9));
        assert_eq!(
            convert(&DataType::Boolean, Value::from(1)),
            Value::Bool(true)
        );
        assert_eq!(
            convert(
                &DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
                Value::from("2026-03-02 09:00:00")
            ),
            Value::from("2026-03-02T09:00:00Z")
        );
        assert_eq!(
            convert(&DataType::Float64, Value::from(1.5)),
            Value::from(1.5)
        );
    }
}
