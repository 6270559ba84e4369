//! Query isolation: where a tenant's SQL runs and what one query may cost.
//!
//! What it guarantees, for the embedded store's DataFusion path:
//! - **Its own threads.** Queries run on an executor of their own (`query.threads`, half
//!   the cores by default), never on the threads serving ingest, the pipeline and health
//!   checks: an operator that computes without yielding holds a query thread, not the
//!   server. The threads have large stacks, so planning a deep but allowed query cannot
//!   exhaust them.
//! - **Refused before planning.** SQL longer than `query.max_sql_bytes` or nested deeper
//!   than `query.max_depth` (expressions, set operations, subqueries) is answered 400 with
//!   the limit named; the depth check walks the parsed statement before DataFusion's
//!   recursive planner sees it.
//! - **Bounded while running.** A query's operators share a memory pool of
//!   `query.max_memory_bytes` (past it the query fails with the operator named); the string
//!   functions whose output size an argument chooses (`repeat`, `lpad`, `rpad`) refuse to
//!   build a value over `query.max_value_bytes`; results are streamed batch by batch and
//!   cut at `query.max_rows` rows or `query.max_result_bytes` bytes (`truncated`).
//! - **Stopped at the deadline.** At `query.timeout_secs`, or when the client goes away,
//!   the query's task is aborted; its operators stop at their next yield. Every operator
//!   with inputs yields ([`YieldEverywhere`]): DataFusion alone makes only the scans
//!   yield, and a join that builds millions of rows from one input batch would otherwise
//!   never return to the scheduler, so an abort would never be seen.
//! - **Admission.** At most `query.max_concurrent_per_tenant` queries per tenant and
//!   `query.max_concurrent` in all run at once; more are answered 429 with `Retry-After`
//!   at once rather than queued.
//! - **A failure is the query's.** A panic inside a query becomes that query's error.
//! - **Reads too.** The engine's own store reads (a person's features on a cache miss or
//!   an uncached range, the tenant-wide feature reads of the style views) run on the same
//!   executor through [`Isolation::execute`], bounded by `query.max_store_reads` rather
//!   than by the SQL admission limits.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};

use datafusion::arrow::array::{Array, AsArray, Int64Array};
use datafusion::arrow::datatypes::{DataType, FieldRef};
use datafusion::common::ScalarValue;
use datafusion::error::DataFusionError;
use datafusion::logical_expr::{
    ColumnarValue, ReturnFieldArgs, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature,
};
use datafusion::prelude::SessionContext;
use datafusion::sql::parser::Statement as DfStatement;
use datafusion::sql::sqlparser::ast::{Expr as SqlExpr, Query, SetExpr, Visit, Visitor};
use digame_infra::config::QueryConfig;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::config::ConfigOptions;
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::coop::CooperativeExec;

use crate::{QueryError, Result};

/// Stack of each query thread: planning recurses once per nesting level.
const STACK_BYTES: usize = 64 << 20;

/// The executor queries run on, and who may start one.
pub struct Isolation {
    /// `None` only while dropping.
    runtime: Option<tokio::runtime::Runtime>,
    all: Arc<Semaphore>,
    tenants: Mutex<HashMap<String, Arc<Semaphore>>>,
    config: QueryConfig,
}

impl Isolation {
    /// Starts the query executor.
    pub fn new(config: &QueryConfig) -> Result<Self> {
        let threads = match config.threads {
            0 => std::thread::available_parallelism()
                .map(|n| (n.get() / 2).max(1))
                .unwrap_or(1),
            n => n,
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("query")
            .thread_stack_size(STACK_BYTES)
            .enable_all()
            .build()
            .map_err(|e| QueryError::Internal(format!("cannot start the query executor: {e}")))?;
        Ok(Isolation {
            runtime: Some(runtime),
            all: Arc::new(Semaphore::new(config.max_concurrent.max(1))),
            tenants: Mutex::new(HashMap::new()),
            config: config.clone(),
        })
    }

    /// Runs `work` for `tenant` on the query executor under the admission limits. The
    /// returned future owns the query: dropping it (the caller's deadline, a client that
    /// went away) aborts the query's task.
    pub async fn run<T, F>(&self, tenant: &str, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: std::future::Future<Output = Result<T>> + Send + 'static,
    {
        let _permits = self.admit(tenant)?;
        self.execute(tenant, work).await
    }

    /// Runs `work` on the query executor without the admission limits: for the engine's
    /// own reads (person and tenant feature reads), which have their own bounds. As with
    /// [`Self::run`], dropping the future aborts the task and a panic is `work`'s error.
    pub async fn execute<T, F>(&self, tenant: &str, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: std::future::Future<Output = Result<T>> + Send + 'static,
    {
        let runtime = self
            .runtime
            .as_ref()
            .ok_or_else(|| QueryError::Internal("the query executor has stopped".into()))?;
        let task = AbortOnDrop(runtime.spawn(work));
        match task.await {
            Ok(result) => result,
            Err(e) if e.is_panic() => {
                tracing::error!(tenant, error = %e, "a query panicked");
                Err(QueryError::Internal(
                    "the query failed inside the engine; it was stopped, the server is unaffected"
                        .into(),
                ))
            }
            Err(e) => Err(QueryError::Internal(format!(
                "the query was cancelled: {e}"
            ))),
        }
    }

    fn admit(&self, tenant: &str) -> Result<(OwnedSemaphorePermit, OwnedSemaphorePermit)> {
        let mine = {
            let mut tenants = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
            tenants
                .entry(tenant.to_string())
                .or_insert_with(|| {
                    Arc::new(Semaphore::new(self.config.max_concurrent_per_tenant.max(1)))
                })
                .clone()
        };
        let tenant_permit = mine.try_acquire_owned().map_err(|_| {
            QueryError::Busy(format!(
                "this tenant already runs {} queries (query.max_concurrent_per_tenant); retry when one has finished",
                self.config.max_concurrent_per_tenant.max(1)
            ))
        })?;
        let all_permit = self.all.clone().try_acquire_owned().map_err(|_| {
            QueryError::Busy(format!(
                "the server already runs {} queries (query.max_concurrent); retry shortly",
                self.config.max_concurrent.max(1)
            ))
        })?;
        Ok((tenant_permit, all_permit))
    }
}

/// A task handle that aborts the task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> std::future::Future for AbortOnDrop<T> {
    type Output = std::result::Result<T, tokio::task::JoinError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0).poll(cx)
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Drop for Isolation {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which is not allowed inside another runtime; running
        // queries are abandoned.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Refuses SQL over the size limit before it is parsed.
pub fn check_size(sql: &str, config: &QueryConfig) -> Result<()> {
    if sql.len() > config.max_sql_bytes {
        return Err(QueryError::Invalid(format!(
            "the query is {} bytes; the limit is {} (query.max_sql_bytes)",
            sql.len(),
            config.max_sql_bytes
        )));
    }
    Ok(())
}

/// Refuses a statement nested deeper than `limit`: expressions inside expressions, set
/// operations (`UNION`, `INTERSECT`, `EXCEPT`) and queries inside queries all count.
pub fn check_depth(statement: &DfStatement, limit: usize) -> Result<()> {
    let DfStatement::Statement(statement) = statement else {
        return Ok(());
    };
    let mut depth = Depth {
        now: 0,
        deepest: 0,
        limit,
    };
    if statement.visit(&mut depth).is_break() {
        return Err(QueryError::Invalid(format!(
            "the query is nested more than {limit} levels deep (expressions, set operations or subqueries; query.max_depth); write long chains as IN lists, joins or CTEs"
        )));
    }
    Ok(())
}

struct Depth {
    now: usize,
    deepest: usize,
    limit: usize,
}

impl Depth {
    fn enter(&mut self, levels: usize) -> ControlFlow<()> {
        self.now += levels;
        self.deepest = self.deepest.max(self.now);
        if self.now > self.limit {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    }
}

impl Visitor for Depth {
    type Break = ();

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        // The set operations of a query body have no hook of their own: measured here,
        // without recursion, before the visitor descends into them.
        self.enter(1 + set_depth(&query.body))
    }

    fn post_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        self.now -= 1 + set_depth(&query.body);
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, _: &SqlExpr) -> ControlFlow<()> {
        self.enter(1)
    }

    fn post_visit_expr(&mut self, _: &SqlExpr) -> ControlFlow<()> {
        self.now -= 1;
        ControlFlow::Continue(())
    }
}

/// How deeply set operations nest in a query body (0 for a plain `SELECT`).
fn set_depth(body: &SetExpr) -> usize {
    let mut deepest = 0;
    let mut stack = vec![(body, 0usize)];
    while let Some((node, depth)) = stack.pop() {
        deepest = deepest.max(depth);
        if let SetExpr::SetOperation { left, right, .. } = node {
            stack.push((left, depth + 1));
            stack.push((right, depth + 1));
        }
    }
    deepest
}

/// The last physical optimizer rule: every operator with inputs passes its batches through
/// a [`CooperativeExec`], which spends the task's scheduling budget on each one, so any
/// long-running operator returns to the scheduler regularly (and sees an abort).
#[derive(Debug)]
pub struct YieldEverywhere;

impl PhysicalOptimizerRule for YieldEverywhere {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        _config: &ConfigOptions,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        plan.transform_up(|node| {
            if node.children().is_empty() || node.is::<CooperativeExec>() {
                return Ok(Transformed::no(node));
            }
            let wrapped: Arc<dyn ExecutionPlan> = Arc::new(CooperativeExec::new(node));
            Ok(Transformed::yes(wrapped))
        })
        .map(|t| t.data)
    }

    fn name(&self) -> &str {
        "YieldEverywhere"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

/// A string function whose output size one of its arguments chooses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Amplifier {
    /// `repeat(text, n)`: `n` copies.
    Repeat,
    /// `lpad`/`rpad(text, n [, fill])`: `n` characters.
    Pad,
}

/// A built-in function, refusing to build values over a size limit before it runs.
#[derive(Debug, PartialEq, Eq, Hash)]
struct Capped {
    inner: Arc<ScalarUDF>,
    kind: Amplifier,
    max_value_bytes: usize,
}

/// Registers the capped versions of the functions whose output an argument sizes, under
/// their own names (replacing the built-ins in `ctx`).
pub fn cap_functions(ctx: &SessionContext, max_value_bytes: usize) {
    use datafusion::functions::{string, unicode};
    let capped = [
        (string::repeat(), Amplifier::Repeat),
        (unicode::lpad(), Amplifier::Pad),
        (unicode::rpad(), Amplifier::Pad),
    ];
    for (inner, kind) in capped {
        ctx.register_udf(ScalarUDF::new_from_impl(Capped {
            inner,
            kind,
            max_value_bytes,
        }));
    }
}

impl Capped {
    /// The largest value this call could build, in bytes (characters for padding).
    fn largest(&self, args: &[ColumnarValue]) -> usize {
        let count = args.get(1).map_or(0, max_int).max(0) as usize;
        match self.kind {
            Amplifier::Repeat => count.saturating_mul(args.first().map_or(0, max_len)),
            Amplifier::Pad => count,
        }
    }
}

impl ScalarUDFImpl for Capped {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn aliases(&self) -> &[String] {
        self.inner.aliases()
    }

    fn signature(&self) -> &Signature {
        self.inner.signature()
    }

    fn return_type(&self, arg_types: &[DataType]) -> datafusion::error::Result<DataType> {
        self.inner.return_type(arg_types)
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs) -> datafusion::error::Result<FieldRef> {
        self.inner.return_field_from_args(args)
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> datafusion::error::Result<Vec<DataType>> {
        self.inner.coerce_types(arg_types)
    }

    fn invoke_with_args(
        &self,
        args: ScalarFunctionArgs,
    ) -> datafusion::error::Result<ColumnarValue> {
        let largest = self.largest(&args.args);
        if largest > self.max_value_bytes {
            return Err(DataFusionError::Execution(format!(
                "{}() would build a value of {largest} {}; the limit is {} (query.max_value_bytes)",
                self.inner.name(),
                match self.kind {
                    Amplifier::Repeat => "bytes",
                    Amplifier::Pad => "characters",
                },
                self.max_value_bytes
            )));
        }
        self.inner.invoke_with_args(args)
    }
}

/// The largest integer of an argument (0 when it is not an integer).
fn max_int(value: &ColumnarValue) -> i64 {
    match value {
        ColumnarValue::Scalar(ScalarValue::Int64(Some(n))) => *n,
        ColumnarValue::Scalar(_) => 0,
        ColumnarValue::Array(a) => a
            .as_any()
            .downcast_ref::<Int64Array>()
            .and_then(|a| a.iter().flatten().max())
            .unwrap_or(0),
    }
}

/// The longest text of an argument, in bytes (0 when it is not text).
fn max_len(value: &ColumnarValue) -> usize {
    match value {
        ColumnarValue::Scalar(
            ScalarValue::Utf8(Some(s))
            | ScalarValue::LargeUtf8(Some(s))
            | ScalarValue::Utf8View(Some(s)),
        ) => s.len(),
        ColumnarValue::Scalar(_) => 0,
        ColumnarValue::Array(a) => match a.data_type() {
            DataType::Utf8 => a.as_string::<i32>().iter().flatten().map(str::len).max(),
            DataType::LargeUtf8 => a.as_string::<i64>().iter().flatten().map(str::len).max(),
            DataType::Utf8View => a.as_string_view().iter().flatten().map(str::len).max(),
            _ => None,
        }
        .unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn engine_reads_run_on_the_query_threads_outside_sql_admission() {
        let config = QueryConfig {
            threads: 1,
            max_concurrent: 1,
            max_concurrent_per_tenant: 1,
            ..QueryConfig::default()
        };
        let iso = Isolation::new(&config).unwrap();
        // One SQL query holds the only admission permit…
        let (release, held) = tokio::sync::oneshot::channel::<()>();
        let sql = iso.run("acme", async move {
            let _ = held.await;
            Ok(())
        });
        tokio::pin!(sql);
        assert!(futures::poll!(&mut sql).is_pending());
        assert!(matches!(
            iso.run("acme", async { Ok(()) }).await,
            Err(QueryError::Busy(_))
        ));
        // …and a read still runs, on a query thread, not this test's.
        let here = std::thread::current().id();
        let (name, id) = iso
            .execute("acme", async {
                let t = std::thread::current();
                Ok((t.name().map(str::to_string), t.id()))
            })
            .await
            .unwrap();
        assert_eq!(name.as_deref(), Some("query"));
        assert_ne!(id, here);
        // A panic is the read's error.
        let err = iso
            .execute("acme", async { panic!("boom") as Result<()> })
            .await
            .unwrap_err();
        assert!(matches!(err, QueryError::Internal(_)), "{err}");
        release.send(()).unwrap();
        sql.await.unwrap();
    }

    fn depth_of(sql: &str, limit: usize) -> Result<()> {
        let ctx = SessionContext::new();
        let state = ctx.state();
        let dialect = state.config().options().sql_parser.dialect;
        let statement = state.sql_to_statement(sql, &dialect).unwrap();
        check_depth(&statement, limit)
    }

    #[test]
    fn nesting_is_measured_across_expressions_set_operations_and_subqueries() {
        // `1+1+1` is two additions deep, plus the literal at the bottom: 3 expression
        // levels inside 1 query level.
        assert!(depth_of("SELECT 1+1+1", 4).is_ok());
        assert!(depth_of("SELECT 1+1+1", 3).is_err());
        // Three UNION ALLs: two set-operation levels below the top one, 3 levels plus the
        // query itself.
        let unions = "SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3 UNION ALL SELECT 4";
        assert!(depth_of(unions, 5).is_ok());
        assert!(depth_of(unions, 3).is_err());
        // A long chain is refused however it is written, before anything recurses on it.
        let chain = format!("SELECT {}", vec!["1"; 1000].join(" + "));
        let err = depth_of(&chain, 256).unwrap_err().to_string();
        assert!(err.contains("more than 256 levels"), "{err}");
        let ors = format!("SELECT * FROM t WHERE {}", vec!["a = 1"; 1000].join(" OR "));
        assert!(depth_of(&ors, 256).is_err());
        let unions = vec!["SELECT 1"; 3000].join(" UNION ALL ");
        assert!(depth_of(&unions, 256).is_err());
        // Long lists are flat: a 5,000-value IN list is three levels (the query, the IN,
        // its values).
        let list = format!(
            "SELECT * FROM t WHERE a IN ({})",
            (0..5000)
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        assert!(depth_of(&list, 4).is_ok());
    }
}
