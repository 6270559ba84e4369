//! The read side: DataFusion over the embedded Parquet store, scoped to one tenant.
//!
//! Tenant isolation is structural. A query runs in a session built for the caller's
//! tenant, whose only tables are views whose logical plans start with
//! `scan → filter(tenant_id = <tenant>)`; the filter is a plan node with a bound literal,
//! never text spliced into SQL, and it is on the partition column so other tenants'
//! directories are not even listed. Views also apply upsert semantics (one row per key,
//! highest revision), so replays and late updates never show twice.
//!
//! On the ClickHouse store the features endpoint runs one query with the tenant, person,
//! granularity and time range bound as typed parameters (the `clickhouse` crate escapes
//! each bound value; ClickHouse 18.16 has no server-side parameters), reading the tables
//! `FINAL` so replaced rows never show.
//!
//! `POST /v1/sql` accepts only queries: DDL, DML and other statements are refused by
//! DataFusion's SQL options before planning completes. Results are capped in rows and time.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use datafusion::arrow::array::{
    Array, BooleanArray, Float64Array, Int64Array, RecordBatch, StringArray,
    TimestampMillisecondArray,
};
use datafusion::arrow::datatypes::DataType;
use datafusion::catalog::TableProvider;
use datafusion::common::ScalarValue;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::datasource::{ViewTable, provider_as_source};
use datafusion::execution::SessionStateBuilder;
use datafusion::execution::context::SQLOptions;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
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
    /// The store is answering as many reads as it may; retry shortly.
    #[error("{0}")]
    Overloaded(String),
    /// Too many queries are running; retry shortly.
    #[error("{0}")]
    Busy(String),
}

pub type Result<T, E = QueryError> = std::result::Result<T, E>;

fn internal(e: impl std::fmt::Display) -> QueryError {
    QueryError::Internal(e.to_string())
}

/// A DataFusion error caused by the query itself, cleaned for the caller.
fn invalid(e: impl std::fmt::Display) -> QueryError {
    QueryError::Invalid(clean_error(&e.to_string()))
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

/// A table `POST /v1/sql` reads, with its columns as SQL sees them.
#[derive(Debug, Serialize)]
pub struct TableInfo {
    pub name: &'static str,
    pub columns: Vec<ColumnInfo>,
}

/// One window of a person's features.
#[derive(Debug, Serialize, PartialEq)]
pub struct FeatureWindow {
    pub window_start: EventTime,
    pub window_end: EventTime,
    pub timezone: String,
    pub is_final: bool,
    /// When and how the window was last written.
    #[serde(flatten)]
    pub finality: Finality,
    /// Totals: feature → value.
    pub features: Map<String, Value>,
    /// Breakdowns: feature → dimension → value.
    pub breakdowns: Map<String, Value>,
}

/// When a window became final and when it was last revised.
#[derive(Debug, Default, Serialize, PartialEq)]
pub struct Finality {
    /// When the window was first marked final; absent while provisional.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub final_at: Option<EventTime>,
    /// When its newest value was written.
    pub revised_at: EventTime,
    /// Whether a value was revised after the window was final (a late event reopened it).
    pub revised: bool,
}

impl Finality {
    /// Folds in one value's revision and final revision (µs; 0 while provisional).
    fn add(&mut self, revision: i64, final_revision: i64) {
        let ms = |us: i64| EventTime(us.div_euclid(1000));
        self.revised_at = self.revised_at.max(ms(revision));
        if final_revision > 0 {
            let at = ms(final_revision);
            self.final_at = Some(self.final_at.map_or(at, |f| f.min(at)));
            self.revised |= revision > final_revision;
        }
    }
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

pub mod cache;
pub mod charts;
pub mod clickhouse_sql;
pub mod events;
mod files;
pub mod groups;
pub mod isolation;
pub mod network;
pub mod reconcile;
pub mod styles;

/// Where the engine reads.
enum Backend {
    /// Parquet files under this directory, through DataFusion.
    Embedded(std::path::PathBuf),
    /// ClickHouse (client bound to the database).
    ClickHouse(Box<clickhouse::Client>),
}

/// Read access to the store.
pub struct QueryEngine {
    backend: Backend,
    config: QueryConfig,
    /// Where tenants' SQL runs, and who may start a query.
    isolation: isolation::Isolation,
    /// Person reads served from memory (`None` with `query.cache_cells = 0`).
    cache: Option<cache::FeatureCache>,
    /// Person reads that may wait for the store at once.
    store_reads: tokio::sync::Semaphore,
    /// The embedded store's retired files and the queries reading (shared with the store
    /// that compacts, see [`QueryEngine::with_snapshots`]).
    snapshots: Arc<digame_infra::store::snapshots::Snapshots>,
    /// Reconciliation answers per partition of the embedded store.
    reconcile_memo: reconcile::PartitionMemo,
}

/// A person's values of one range, through the cache.
enum PersonRead {
    /// The answer as cached, ready to send.
    Rendered(Arc<cache::Rendered>),
    /// Values sorted by window, feature and breakdown; with the cache version they are of.
    Cells(Vec<FeatureCell>, Option<u64>),
}

/// Far enough ahead to cover every window a person will have.
const END_OF_TIME: EventTime = EventTime(i64::MAX / 4);

impl QueryEngine {
    /// The limits this engine was configured with.
    pub fn limits(&self) -> &QueryConfig {
        &self.config
    }

    /// Over the embedded store under `store_root`.
    pub fn new(store_root: impl Into<std::path::PathBuf>, config: QueryConfig) -> Self {
        Self::over(Backend::Embedded(store_root.into()), config)
    }

    /// Over ClickHouse; `client` is bound to Digame's database.
    pub fn clickhouse(client: clickhouse::Client, config: QueryConfig) -> Self {
        Self::over(Backend::ClickHouse(Box::new(client)), config)
    }

    fn over(backend: Backend, config: QueryConfig) -> Self {
        QueryEngine {
            backend,
            isolation: isolation::Isolation::new(&config)
                .expect("the query executor's threads start"),
            cache: (config.cache_cells > 0).then(|| {
                cache::FeatureCache::new(
                    config.cache_cells,
                    config.cache_days,
                    Duration::from_secs(config.cache_ttl_secs.max(1)),
                )
            }),
            store_reads: tokio::sync::Semaphore::new(config.max_store_reads.max(1)),
            snapshots: digame_infra::store::snapshots::Snapshots::new(),
            reconcile_memo: reconcile::PartitionMemo::default(),
            config,
        }
    }

    /// Reads through the file versions of the store that compacts these files
    /// ([`digame_infra::store::ParquetStore::snapshots`]): no query then sees a file
    /// disappear under it, and none started after a compaction reads the files it replaced.
    pub fn with_snapshots(
        mut self,
        snapshots: Arc<digame_infra::store::snapshots::Snapshots>,
    ) -> Self {
        self.snapshots = snapshots;
        self
    }

    /// The person-read cache, to feed from the features stream and to clear on deletions.
    pub fn cache(&self) -> Option<&cache::FeatureCache> {
        self.cache.as_ref()
    }

    fn root(&self) -> Result<&std::path::Path> {
        match &self.backend {
            Backend::Embedded(root) => Ok(root),
            Backend::ClickHouse(_) => Err(QueryError::Internal(
                "the ClickHouse backend has no Parquet directory".into(),
            )),
        }
    }

    /// A session whose tables are the tenant's views and nothing else.
    pub fn tenant_context(&self, tenant: &str) -> Result<SessionContext> {
        self.context(tenant, true)
    }

    /// As [`Self::tenant_context`]; with `dedup` false the tables are the tenant's rows as
    /// stored, every version of a key included, for statements that deduplicate only what
    /// they need (see `reconcile`).
    fn context(&self, tenant: &str, dedup: bool) -> Result<SessionContext> {
        digame_schemas::validate::validate_tenant_id(tenant).map_err(QueryError::Invalid)?;
        let config = SessionConfig::new()
            .with_information_schema(false)
            .with_target_partitions(2)
            // Small batches: a result is cut at its byte limit one batch at a time.
            .with_batch_size(1024);
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_limit(self.config.max_memory_bytes, 1.0)
            .build_arc()
            .map_err(internal)?;
        let state = SessionStateBuilder::new()
            .with_config(config)
            .with_runtime_env(runtime)
            .with_default_features()
            .with_physical_optimizer_rule(Arc::new(isolation::YieldEverywhere))
            .build();
        let ctx = SessionContext::new_with_state(state);
        // This session's own view of the files: what compaction retired is left out, and
        // what it lists is not deleted while the session's plans live.
        ctx.register_object_store(
            datafusion::execution::object_store::ObjectStoreUrl::local_filesystem().as_ref(),
            Arc::new(files::LiveFiles::new(&self.snapshots)),
        );
        isolation::cap_functions(&ctx, self.config.max_value_bytes);
        for table in Table::ALL {
            let view = self.tenant_view(table, tenant, dedup)?;
            ctx.register_table(table.name(), view).map_err(internal)?;
        }
        Ok(ctx)
    }

    /// Runs one of the engine's own statements over the tenant's rows as stored (embedded
    /// store only), with the limits of any query.
    pub(crate) async fn sql_stored_rows(&self, tenant: &str, sql: &str) -> Result<SqlResult> {
        let ctx = self.context(tenant, false)?;
        let (sql, config) = (sql.to_string(), self.config.clone());
        let work = self
            .isolation
            .run(tenant, async move { run_sql(ctx, &sql, &config).await });
        self.run("sql", work).await
    }

    fn tenant_view(
        &self,
        table: Table,
        tenant: &str,
        dedup: bool,
    ) -> Result<Arc<dyn TableProvider>> {
        let dir = self.root()?.join(table.name());
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
        if let Some((key, version)) = table.upsert_key().filter(|_| dedup) {
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
            Err(QueryError::Busy(_)) => "busy",
            Err(QueryError::Overloaded(_)) => "overloaded",
        };
        metrics()
            .query_requests
            .with_label_values(&[endpoint, outcome])
            .inc();
        result
    }

    /// Runs read-only SQL over the tenant's views.
    pub async fn sql(&self, tenant: &str, sql: &str) -> Result<SqlResult> {
        if let Backend::ClickHouse(client) = &self.backend {
            digame_schemas::validate::validate_tenant_id(tenant).map_err(QueryError::Invalid)?;
            isolation::check_size(sql, &self.config)?;
            return self
                .run(
                    "sql",
                    clickhouse_sql::sql(client, tenant, sql, &self.config),
                )
                .await;
        }
        isolation::check_size(sql, &self.config)?;
        let ctx = self.tenant_context(tenant)?;
        let (sql, config) = (sql.to_string(), self.config.clone());
        let work = self
            .isolation
            .run(tenant, async move { run_sql(ctx, &sql, &config).await });
        self.run("sql", work).await
    }

    /// The tables of `POST /v1/sql` and their columns, as the engine itself plans them
    /// for the tenant (so the list is what a query sees, on either backend).
    pub async fn tables(&self, tenant: &str) -> Result<Vec<TableInfo>> {
        let mut out = Vec::new();
        for table in Table::ALL {
            let result = self
                .sql(tenant, &format!("SELECT * FROM {} LIMIT 0", table.name()))
                .await?;
            out.push(TableInfo {
                name: table.name(),
                columns: result.columns,
            });
        }
        Ok(out)
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
        let cells = match self
            .person_read(tenant, user, granularity, (from, to), false)
            .await?
        {
            PersonRead::Cells(cells, _) => cells,
            PersonRead::Rendered(_) => unreachable!("asked for values"),
        };
        Ok(series(user, granularity, (from, to), cells))
    }

    /// As [`Self::features`], serialized as the features endpoint answers: from the cache's
    /// rendered answers when the range is cached and unchanged.
    pub async fn features_json(
        &self,
        tenant: &str,
        user: &str,
        from: EventTime,
        to: EventTime,
        granularity: Granularity,
    ) -> Result<Arc<cache::Rendered>> {
        let (cells, version) = match self
            .person_read(tenant, user, granularity, (from, to), true)
            .await?
        {
            PersonRead::Rendered(r) => return Ok(r),
            PersonRead::Cells(cells, version) => (cells, version),
        };
        let series = series(user, granularity, (from, to), cells);
        let rendered = Arc::new(cache::Rendered::new(
            serde_json::to_vec(&series).map_err(internal)?,
        ));
        if let (Some(cache), Some(v)) = (&self.cache, version) {
            cache.keep(tenant, user, granularity, (from, to), v, rendered.clone());
        }
        Ok(rendered)
    }

    /// A person's values of `[from, to)`: from the cache when it covers the range (reading
    /// the person into it on a miss, one read per person at a time), else from the store.
    async fn person_read(
        &self,
        tenant: &str,
        user: &str,
        granularity: Granularity,
        (from, to): (EventTime, EventTime),
        rendered_ok: bool,
    ) -> Result<PersonRead> {
        if to <= from {
            return Err(QueryError::Invalid(format!(
                "`to` ({to}) must be after `from` ({from})"
            )));
        }
        let outcome = |o: &str| metrics().read_cache.with_label_values(&[o]).inc();
        let now = EventTime::now();
        let Some(cache) = self.cache.as_ref().filter(|c| from >= c.horizon(now)) else {
            outcome("store");
            let cells = self
                .person_store_read(tenant, user, granularity, (from, to))
                .await?;
            return Ok(PersonRead::Cells(cells, None));
        };
        digame_schemas::validate::validate_tenant_id(tenant).map_err(QueryError::Invalid)?;
        loop {
            match cache.lookup(tenant, user, granularity, (from, to), now, rendered_ok) {
                cache::Lookup::Hit(r) => {
                    outcome("hit");
                    return Ok(PersonRead::Rendered(r));
                }
                cache::Lookup::Cells(cells, version) => {
                    outcome("render");
                    return Ok(PersonRead::Cells(cells, Some(version)));
                }
                cache::Lookup::Wait(mut done) => {
                    let wait = Duration::from_secs(self.config.timeout_secs);
                    if tokio::time::timeout(wait, done.wait_for(|d| *d))
                        .await
                        .is_err()
                    {
                        return Err(QueryError::Timeout(self.config.timeout_secs));
                    }
                }
                cache::Lookup::Fill(fill) => {
                    outcome("fill");
                    let cells = self
                        .person_store_read(tenant, user, granularity, (fill.from, END_OF_TIME))
                        .await?;
                    fill.finish(cells);
                }
            }
        }
    }

    /// A person's values of `[from, to)` from the store, with at most
    /// `query.max_store_reads` such reads waiting at once (503 beyond, at once: a queue of
    /// seconds helps nobody).
    async fn person_store_read(
        &self,
        tenant: &str,
        user: &str,
        granularity: Granularity,
        (from, to): (EventTime, EventTime),
    ) -> Result<Vec<FeatureCell>> {
        let _permit = self.store_reads.try_acquire().map_err(|_| {
            QueryError::Overloaded(format!(
                "{} person reads are waiting for the store; retry in a second",
                self.config.max_store_reads
            ))
        })?;
        let scope = CellScope {
            user: Some(user),
            granularity,
            from,
            to,
            features: &[],
        };
        let cells = self.run("features", self.raw_cells(tenant, &scope)).await?;
        Ok(cells.into_iter().map(|(_, c)| c).collect())
    }

    /// Every person's windows with `from <= window_start < to`, only `features` (their
    /// totals and breakdowns), in one read of the store: user → windows. For views over
    /// the whole tenant, which would otherwise plan and scan once per person.
    pub async fn tenant_features(
        &self,
        tenant: &str,
        from: EventTime,
        to: EventTime,
        granularity: Granularity,
        features: &[&str],
    ) -> Result<BTreeMap<String, Vec<FeatureWindow>>> {
        let scope = CellScope {
            user: None,
            granularity,
            from,
            to,
            features,
        };
        self.run("tenant_features", self.cells(tenant, &scope))
            .await
    }

    /// The feature values in `scope`, shaped into windows per user.
    async fn cells(
        &self,
        tenant: &str,
        scope: &CellScope<'_>,
    ) -> Result<BTreeMap<String, Vec<FeatureWindow>>> {
        let cells = self.raw_cells(tenant, scope).await?;
        let mut by_user: BTreeMap<String, Vec<FeatureCell>> = BTreeMap::new();
        for (user, cell) in cells {
            by_user.entry(user).or_default().push(cell);
        }
        Ok(by_user
            .into_iter()
            .map(|(user, cells)| (user, shape_cells(cells)))
            .collect())
    }

    /// The feature values in `scope`, latest revision per key, sorted by user, window,
    /// feature and breakdown.
    async fn raw_cells(
        &self,
        tenant: &str,
        scope: &CellScope<'_>,
    ) -> Result<Vec<(String, FeatureCell)>> {
        let (from, to) = (scope.from, scope.to);
        if to <= from {
            return Err(QueryError::Invalid(format!(
                "`to` ({to}) must be after `from` ({from})"
            )));
        }
        if let Backend::ClickHouse(client) = &self.backend {
            // ClickHouse does the work; this side only decodes rows.
            return clickhouse_features(client, tenant, scope).await;
        }
        let ctx = self.tenant_context(tenant)?;
        let ts = |t: EventTime| {
            lit(ScalarValue::TimestampMillisecond(
                Some(t.0),
                Some("UTC".into()),
            ))
        };
        let mut filter = col("granularity")
            .eq(lit(scope.granularity.as_str()))
            .and(col("window_start").gt_eq(ts(from)))
            .and(col("window_start").lt(ts(to)));
        if let Some(user) = scope.user {
            filter = col("user_id").eq(lit(user)).and(filter);
        }
        if !scope.features.is_empty() {
            let names = scope.features.iter().map(|f| lit(*f)).collect();
            filter = filter.and(col("feature").in_list(names, false));
        }
        // Planning, the Parquet scan and decoding run on the query executor, like SQL: a
        // burst of cache misses holds query threads, never the ones serving requests.
        self.isolation
            .execute(tenant, async move {
                let df = ctx
                    .table(Table::Features.name())
                    .await
                    .map_err(internal)?
                    .filter(filter)
                    .map_err(internal)?
                    .select_columns(&[
                        "user_id",
                        "window_start",
                        "window_end",
                        "timezone",
                        "feature",
                        "dimension",
                        "value",
                        "is_final",
                        "revision",
                        "final_revision",
                    ])
                    .map_err(internal)?
                    .sort(vec![
                        col("user_id").sort(true, false),
                        col("window_start").sort(true, false),
                        col("feature").sort(true, false),
                        col("dimension").sort(true, false),
                    ])
                    .map_err(internal)?;
                read_cells(&df.collect().await.map_err(internal)?)
            })
            .await
    }
}

/// Which feature values a read takes.
struct CellScope<'a> {
    /// One person, or everyone.
    user: Option<&'a str>,
    granularity: Granularity,
    from: EventTime,
    to: EventTime,
    /// Only these features; all when empty.
    features: &'a [&'a str],
}

/// Plans `sql` in `ctx`, refusing anything but a query (DDL, DML, `SET`, …) and
/// statements nested deeper than `max_depth`.
async fn plan_query(
    ctx: &SessionContext,
    sql: &str,
    max_depth: usize,
) -> Result<datafusion::dataframe::DataFrame> {
    let state = ctx.state();
    let dialect = state.config().options().sql_parser.dialect;
    let statement = state.sql_to_statement(sql, &dialect).map_err(invalid)?;
    isolation::check_depth(&statement, max_depth)?;
    let plan = state.statement_to_plan(statement).await.map_err(invalid)?;
    // DESCRIBE would answer on the embedded store only (ClickHouse has no plan for it):
    // one answer for both, the route that lists the tables.
    if matches!(
        plan,
        datafusion::logical_expr::LogicalPlan::DescribeTable(_)
    ) {
        return Err(QueryError::Invalid(CATALOG_HINT.into()));
    }
    SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false)
        .verify_plan(&plan)
        .map_err(invalid)?;
    Ok(datafusion::dataframe::DataFrame::new(state, plan))
}

/// Plans and runs one read-only query, streaming its result and cutting it at the row and
/// byte limits. Runs on the query executor.
async fn run_sql(ctx: SessionContext, sql: &str, config: &QueryConfig) -> Result<SqlResult> {
    use futures::StreamExt;
    let df = plan_query(&ctx, sql, config.max_depth).await?;
    // From the plan, so an empty answer still names its columns.
    let columns: Vec<ColumnInfo> = df
        .schema()
        .fields()
        .iter()
        .map(|f| ColumnInfo {
            name: f.name().clone(),
            data_type: f.data_type().to_string(),
        })
        .collect();
    let max = config.max_rows;
    // EXPLAIN must stay the root of its plan; its answer is a few rows anyway.
    let explain = matches!(
        df.logical_plan(),
        datafusion::logical_expr::LogicalPlan::Explain(_)
            | datafusion::logical_expr::LogicalPlan::Analyze(_)
    );
    let df = if explain {
        df
    } else {
        df.limit(0, Some(max + 1)).map_err(internal)?
    };
    let mut stream = df.execute_stream().await.map_err(invalid)?;
    let (mut rows, mut bytes, mut truncated) = (Vec::new(), 0usize, false);
    while let Some(batch) = stream.next().await {
        let mut batch = batch.map_err(invalid)?;
        let size = batch.get_array_memory_size();
        if bytes + size > config.max_result_bytes {
            // Keep the rows that fit, by the batch's mean row size.
            let per_row = (size / batch.num_rows().max(1)).max(1);
            let fit = (config.max_result_bytes - bytes) / per_row;
            batch = batch.slice(0, fit.min(batch.num_rows()));
            truncated = true;
        }
        bytes += size;
        rows.extend(batches_to_json(std::slice::from_ref(&batch))?);
        if rows.len() > max {
            truncated = true;
        }
        if truncated {
            break;
        }
    }
    rows.truncate(max);
    Ok(SqlResult {
        columns,
        row_count: rows.len(),
        rows,
        truncated,
    })
}

/// Where a query for the catalog (SHOW, DESCRIBE, information_schema) is sent instead.
const CATALOG_HINT: &str = "SHOW, DESCRIBE and information_schema are not available over SQL; GET /v1/sql/tables lists the tables (events, features, dead_letters) with their columns and types";

/// DataFusion errors carry a prefix naming the engine phase; users need the message.
fn clean_error(text: &str) -> String {
    let text = text
        .trim_start_matches("Error during planning: ")
        .trim_start_matches("SQL error: ");
    // SHOW … and information_schema.* fail for want of the catalog, which is off.
    if text.contains("information_schema") {
        return CATALOG_HINT.into();
    }
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

/// One feature value of one window, whichever backend read it.
#[derive(Clone, Debug, PartialEq)]
pub struct FeatureCell {
    window_start: EventTime,
    window_end: EventTime,
    timezone: String,
    feature: String,
    dimension: String,
    value: f64,
    is_final: bool,
    revision: i64,
    final_revision: i64,
}

/// The (user, value) cells of feature batches, in batch order.
fn read_cells(batches: &[RecordBatch]) -> Result<Vec<(String, FeatureCell)>> {
    let mut cells = Vec::new();
    for b in batches {
        let user = column::<StringArray>(b, "user_id")?;
        let start = column::<TimestampMillisecondArray>(b, "window_start")?;
        let end = column::<TimestampMillisecondArray>(b, "window_end")?;
        let tz = column::<StringArray>(b, "timezone")?;
        let feature = column::<StringArray>(b, "feature")?;
        let dim = column::<StringArray>(b, "dimension")?;
        let value = column::<Float64Array>(b, "value")?;
        let fin = column::<BooleanArray>(b, "is_final")?;
        let revision = column::<Int64Array>(b, "revision")?;
        // Absent (null) in files written before windows recorded it.
        let final_revision = column::<Int64Array>(b, "final_revision")?;
        for i in 0..b.num_rows() {
            let cell = FeatureCell {
                window_start: EventTime(start.value(i)),
                window_end: EventTime(end.value(i)),
                timezone: tz.value(i).to_string(),
                feature: feature.value(i).to_string(),
                dimension: dim.value(i).to_string(),
                value: value.value(i),
                is_final: fin.value(i),
                revision: revision.value(i),
                final_revision: if final_revision.is_null(i) {
                    0
                } else {
                    final_revision.value(i)
                },
            };
            cells.push((user.value(i).to_string(), cell));
        }
    }
    Ok(cells)
}

/// A person's series of `[from, to)` from their cells (sorted by window start).
fn series(
    user: &str,
    granularity: Granularity,
    (from, to): (EventTime, EventTime),
    cells: Vec<FeatureCell>,
) -> FeatureSeries {
    FeatureSeries {
        user_id: user.to_string(),
        granularity,
        from,
        to,
        windows: shape_cells(cells),
    }
}

/// Groups cells, sorted by window start, into windows of totals and breakdowns.
fn shape_cells(cells: Vec<FeatureCell>) -> Vec<FeatureWindow> {
    let mut out: Vec<FeatureWindow> = Vec::new();
    for c in cells {
        if out.last().is_none_or(|w| w.window_start != c.window_start) {
            out.push(FeatureWindow {
                window_start: c.window_start,
                window_end: c.window_end,
                timezone: c.timezone,
                is_final: true,
                finality: Finality::default(),
                features: Map::new(),
                breakdowns: Map::new(),
            });
        }
        let w = out.last_mut().expect("just pushed");
        w.is_final &= c.is_final;
        w.finality.add(c.revision, c.final_revision);
        let v = Value::from(c.value);
        if c.dimension.is_empty() {
            w.features.insert(c.feature, v);
        } else {
            w.breakdowns
                .entry(c.feature)
                .or_insert_with(|| Value::Object(Map::new()))
                .as_object_mut()
                .expect("breakdowns are objects")
                .insert(c.dimension, v);
        }
    }
    out
}

/// A person's feature cells from ClickHouse, latest revision per key, sorted like the
/// embedded backend sorts them.
async fn clickhouse_features(
    client: &clickhouse::Client,
    tenant: &str,
    scope: &CellScope<'_>,
) -> Result<Vec<(String, FeatureCell)>> {
    #[derive(clickhouse::Row, serde::Deserialize)]
    struct Cell {
        user_id: String,
        window_start: u32,
        window_start_ms: u16,
        window_end: u32,
        window_end_ms: u16,
        timezone: String,
        feature: String,
        dimension: String,
        value: f64,
        is_final: u8,
        revision: u64,
        final_revision: i64,
    }
    let (from, to) = (scope.from, scope.to);
    let ms = |s: u32, m: u16| EventTime(i64::from(s) * 1000 + i64::from(m));
    // Whole seconds around [from, to); the exact bounds are applied below.
    let from_s = from.0.div_euclid(1000).clamp(0, i64::from(u32::MAX));
    let to_s = (to.0 + 999).div_euclid(1000).clamp(0, i64::from(u32::MAX));
    // Placeholders only: every value below is bound.
    let mut sql = String::from(
        "SELECT user_id, window_start, window_start_ms, window_end, window_end_ms, timezone, \
         feature, dimension, value, is_final, revision, final_revision FROM features FINAL \
         WHERE tenant_id = ? AND granularity = ? \
         AND window_start >= toDateTime(?, 'UTC') AND window_start <= toDateTime(?, 'UTC')",
    );
    if scope.user.is_some() {
        sql.push_str(" AND user_id = ?");
    }
    if !scope.features.is_empty() {
        let marks = vec!["?"; scope.features.len()].join(", ");
        sql.push_str(&format!(" AND feature IN ({marks})"));
    }
    sql.push_str(" ORDER BY user_id, window_start, window_start_ms, feature, dimension");
    let mut query = client
        .query(&sql)
        .bind(tenant)
        .bind(scope.granularity.as_str())
        .bind(from_s as u32)
        .bind(to_s as u32);
    if let Some(user) = scope.user {
        query = query.bind(user);
    }
    for f in scope.features {
        query = query.bind(*f);
    }
    let rows: Vec<Cell> = query
        .fetch_all()
        .await
        .map_err(|e| internal(format!("clickhouse: {e}")))?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let cell = FeatureCell {
                window_start: ms(r.window_start, r.window_start_ms),
                window_end: ms(r.window_end, r.window_end_ms),
                timezone: r.timezone,
                feature: r.feature,
                dimension: r.dimension,
                value: r.value,
                is_final: r.is_final != 0,
                revision: r.revision as i64,
                final_revision: r.final_revision,
            };
            (r.user_id, cell)
        })
        .filter(|(_, c)| c.window_start >= from && c.window_start < to)
        .collect())
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
            feature: feature.to_string().into(),
            dimension: dim.into(),
            value,
            feature_version: 1,
            params_version: 0,
            is_final: revision > 1,
            revision,
            final_revision: if revision > 1 { 2 } else { 0 },
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

    /// Queries in a loop while the same rows are written again and again and compacted
    /// after each write (every compaction retires the files a running query may be
    /// reading): every answer equals the answer before, and none fails.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_never_see_compaction() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(ParquetStore::open(dir.path()).unwrap());
        let rows: Vec<FeatureRow> = (0..200)
            .map(|i| {
                row(
                    "acme",
                    &format!("u{i:03}"),
                    "active_seconds",
                    "",
                    i as f64,
                    1,
                )
            })
            .collect();
        for _ in 0..4 {
            store.write_rows(Table::Features, &rows).unwrap();
        }
        let engine = Arc::new(
            QueryEngine::new(dir.path(), QueryConfig::default()).with_snapshots(store.snapshots()),
        );
        let sql = "SELECT count(*) AS n, sum(value) AS s FROM features";
        let want = engine.sql("acme", sql).await.unwrap().rows;
        assert_eq!(want[0]["n"], 200, "{want:?}");
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (engine, stop) = (engine.clone(), stop.clone());
            tokio::spawn(async move {
                let mut answers = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let got = engine.sql("acme", sql).await.map(|r| r.rows);
                    assert_eq!(got.as_ref().ok(), Some(&want), "answer {answers}: {got:?}");
                    answers += 1;
                }
                answers
            })
        };
        let part = dir.path().join("features");
        let mut compactions = 0;
        for _ in 0..30 {
            store.write_rows(Table::Features, &rows).unwrap();
            compactions += store.compact(2).await.unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let answers = reader.await.unwrap();
        assert!(compactions >= 30, "{compactions}");
        assert!(
            answers > 10,
            "{answers} answers during {compactions} compactions"
        );
        // Nothing retired is left behind once no query runs.
        store.compact(usize::MAX).await.unwrap();
        let files: Vec<_> = walk(&part);
        assert_eq!(files.len(), 1, "{files:?}");
    }

    fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
        out
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
        // Catalog queries are pointed at the route that answers them.
        for stmt in [
            "SHOW TABLES",
            "SHOW COLUMNS FROM events",
            "SELECT * FROM information_schema.tables",
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'events'",
            "DESCRIBE events",
        ] {
            let err = engine.sql("acme", stmt).await.unwrap_err();
            assert!(
                matches!(&err, QueryError::Invalid(m) if m.contains("GET /v1/sql/tables")),
                "{stmt}: {err}"
            );
        }
    }

    /// What one query may cost: refused before planning when too long or too deep, cut
    /// when its result passes the row or byte limit, refused when a function would build
    /// a value over the limit, stopped at the deadline; EXPLAIN answers.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queries_run_within_their_limits() {
        let dir = tempfile::tempdir().unwrap();
        let config = QueryConfig {
            max_rows: 50,
            max_result_bytes: 1 << 20,
            max_sql_bytes: 4096,
            max_depth: 64,
            max_value_bytes: 10_000,
            timeout_secs: 2,
            ..QueryConfig::default()
        };
        let engine = QueryEngine::new(dir.path(), config);
        let err = engine.sql("acme", &"x".repeat(5000)).await.unwrap_err();
        assert!(
            err.to_string().contains("4096 (query.max_sql_bytes)"),
            "{err}"
        );
        let deep = format!("SELECT {}", vec!["1"; 100].join(" + "));
        let err = engine.sql("acme", &deep).await.unwrap_err();
        assert!(err.to_string().contains("more than 64 levels"), "{err}");
        // Just inside the limit: 60 terms are 59 additions plus the literal, in one query.
        let fine = format!("SELECT {} AS n", vec!["1"; 60].join(" + "));
        let got = engine.sql("acme", &fine).await.unwrap();
        assert_eq!(got.rows[0]["n"], 60);
        // 10 bytes x 1,000 is allowed, x 1,001 is not.
        let got = engine
            .sql("acme", "SELECT length(repeat('0123456789', 1000)) AS n")
            .await
            .unwrap();
        assert_eq!(got.rows[0]["n"], 10_000);
        let err = engine
            .sql("acme", "SELECT repeat('0123456789', 1001) AS s")
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("10010 bytes; the limit is 10000"),
            "{err}"
        );
        let err = engine
            .sql("acme", "SELECT lpad('x', 20000) AS s")
            .await
            .unwrap_err();
        assert!(err.to_string().contains("20000 characters"), "{err}");
        // Rows past the limit are cut.
        let got = engine
            .sql("acme", "SELECT * FROM range(1000)")
            .await
            .unwrap();
        assert_eq!((got.row_count, got.truncated), (50, true));
        // So are bytes: 1,000 values of 10,000 bytes are 10 MB, over the 1 MB limit, which
        // holds at most 104 of them.
        let got = engine
            .sql(
                "acme",
                "SELECT repeat('0123456789', 1000) AS s FROM range(1000)",
            )
            .await
            .unwrap();
        assert!(got.truncated);
        assert!((50..=104).contains(&got.row_count), "{}", got.row_count);
        // A query that outlives its deadline is stopped, and the next one runs at once.
        let started = std::time::Instant::now();
        let err = engine
            .sql(
                "acme",
                "SELECT count(*) FROM range(100000) a, range(100000) b, range(1000) c",
            )
            .await
            .unwrap_err();
        assert!(matches!(err, QueryError::Timeout(2)), "{err}");
        assert!(started.elapsed() < std::time::Duration::from_secs(4));
        let started = std::time::Instant::now();
        let got = engine.sql("acme", "SELECT 1 AS one").await.unwrap();
        assert_eq!(got.rows[0]["one"], 1);
        assert!(
            started.elapsed() < std::time::Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        // EXPLAIN is the root of its own plan.
        let got = engine
            .sql("acme", "EXPLAIN SELECT count(*) FROM features")
            .await
            .unwrap();
        assert!(got.row_count >= 2, "{got:?}");
        assert!(
            serde_json::to_string(&got.rows)
                .unwrap()
                .contains("tenant_id")
        );
    }

    /// Admission: a tenant's queries past its limit are refused at once as busy; another
    /// tenant's still run.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tenant_at_its_query_limit_is_told_to_retry() {
        let dir = tempfile::tempdir().unwrap();
        let config = QueryConfig {
            max_concurrent_per_tenant: 1,
            timeout_secs: 3,
            ..QueryConfig::default()
        };
        let engine = Arc::new(QueryEngine::new(dir.path(), config));
        let slow = {
            let engine = engine.clone();
            tokio::spawn(async move {
                engine
                    .sql(
                        "acme",
                        "SELECT count(*) FROM range(100000) a, range(100000) b",
                    )
                    .await
            })
        };
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let err = engine.sql("acme", "SELECT 1").await.unwrap_err();
        assert!(matches!(err, QueryError::Busy(_)), "{err}");
        assert!(
            err.to_string().contains("query.max_concurrent_per_tenant"),
            "{err}"
        );
        let got = engine.sql("globex", "SELECT 1 AS one").await.unwrap();
        assert_eq!(got.rows[0]["one"], 1);
        assert!(matches!(slow.await.unwrap(), Err(QueryError::Timeout(3))));
        // Its permit is back.
        assert!(engine.sql("acme", "SELECT 1").await.is_ok());
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
