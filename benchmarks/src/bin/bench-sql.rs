//! SQL over the embedded store, as `POST /v1/sql` runs it: what planning costs and what a
//! whole answer costs, per statement.
//!
//! `simulate` events go through the feature pipeline's operator core into a fresh
//! Parquet store (one write, then compacted, as a store looks once `serve` has caught
//! up), and each statement below runs `--runs` times through the query engine with
//! the default limits (its own threads, the tenant's views, deduplication of the stored
//! rows). Planning (parse, logical plan, optimizer, physical plan of the tenant-scoped
//! statement, nothing executed) is timed apart, on the same session the engine builds.
//! The store lives in a temporary directory, removed at exit.
//!
//! The statements are those analysts and dashboards send: the README's per-person hours,
//! a dashboard aggregate by app and day, a filtered top-N of titles, a trailing average
//! by window function, a join of events to features, and one person's latest events
//! (the first person with events).
//!
//! ```text
//! cargo run --release -p digame-benchmarks --bin bench-sql -- --people 200 --days 14
//! ```

use std::time::{Duration, Instant};

use clap::Parser;
use digame_benchmarks::{
    SIMULATED_UNTIL_MS, quantile, simulated_payloads_in_time_order, thousands,
};
use digame_infra::config::{PipelineConfig, QueryConfig};
use digame_infra::store::{ParquetStore, StoreBatch, StoreSink};
use digame_pipelines::Processor;
use digame_query::QueryEngine;

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(about = "SQL over the embedded store: planning and answer latency per statement")]
struct Cli {
    /// People simulated.
    #[arg(long, default_value_t = 200)]
    people: usize,
    /// Days simulated.
    #[arg(long, default_value_t = 14)]
    days: u32,
    /// Times each statement is planned, and answered.
    #[arg(long, default_value_t = 10)]
    runs: usize,
}

/// What is measured: a name for the table of figures, and the statement.
const STATEMENTS: [(&str, &str); 6] = [
    (
        "hours per person",
        "SELECT user_id, SUM(value)/3600 AS active_hours FROM features \
         WHERE feature = 'active_seconds' AND dimension = '' AND granularity = 'day' \
         GROUP BY user_id ORDER BY user_id",
    ),
    (
        "events by app, day",
        "SELECT app, date_trunc('day', timestamp) AS day, COUNT(*) AS events, \
         SUM(duration_ms) / 1000 AS seconds FROM events GROUP BY app, day ORDER BY day, app",
    ),
    (
        "top titles, filtered",
        "SELECT title, COUNT(*) AS n FROM events \
         WHERE title LIKE '%review%' OR lower(app) = 'code' \
         GROUP BY title ORDER BY n DESC, title LIMIT 10",
    ),
    (
        "7-day trailing mean",
        "SELECT user_id, window_start, value, AVG(value) OVER (PARTITION BY user_id \
         ORDER BY window_start ROWS BETWEEN 6 PRECEDING AND CURRENT ROW) AS trailing \
         FROM features WHERE feature = 'deep_work_seconds' AND dimension = '' \
         AND granularity = 'day' ORDER BY user_id, window_start",
    ),
    (
        "events joined to features",
        "WITH busy AS (SELECT user_id, COUNT(*) AS events FROM events GROUP BY user_id) \
         SELECT b.user_id, b.events, SUM(f.value) AS meeting_seconds FROM busy b \
         JOIN features f ON f.user_id = b.user_id WHERE f.feature = 'meeting_seconds' \
         AND f.dimension = '' AND f.granularity = 'day' GROUP BY b.user_id, b.events \
         ORDER BY meeting_seconds DESC LIMIT 20",
    ),
    (
        "one person's latest",
        "SELECT timestamp, source, kind, app, title FROM events \
         WHERE user_id = '{person}' ORDER BY timestamp DESC LIMIT 20",
    ),
];

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let now = SIMULATED_UNTIL_MS;
    let payloads = simulated_payloads_in_time_order(cli.people, cli.days)?;

    let dir = digame_benchmarks::scratch_dir()?;
    let store = std::sync::Arc::new(ParquetStore::open(dir.path())?);
    let mut p = Processor::new(&PipelineConfig::default(), 30)?;
    p.process_batch(payloads.iter().map(|b| (0, &b[..])), now);
    let batch = StoreBatch {
        features: p.emit(now),
        events: std::mem::take(&mut p.pending_events),
        dead_letters: std::mem::take(&mut p.pending_dead),
    };
    store.write(&batch).await?;
    let compacting = store.clone();
    tokio::task::spawn_blocking(move || compacting.compact_blocking(1)).await??;

    let engine = QueryEngine::new(dir.path(), QueryConfig::default());
    println!(
        "sql: embedded Parquet store, {} events and {} feature rows of simulate ({} people x {} days), {} runs each",
        thousands(batch.events.len() as f64),
        thousands(batch.features.len() as f64),
        cli.people,
        cli.days,
        cli.runs
    );
    println!(
        "  {:<26} {:>6} {:>10} {:>10} {:>10} {:>10}",
        "statement", "rows", "plan p50", "plan p99", "answer p50", "answer p99"
    );
    // A person who has events (with few people and days, not everyone does).
    let first = engine
        .sql("bench", "SELECT min(user_id) AS u FROM events")
        .await?;
    let person = first
        .rows
        .first()
        .and_then(|row| row.get("u"))
        .and_then(|u| u.as_str())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "simulate made no events for {} people x {} days (the range ends on a \
                 weekend, when few people work): choose more people or days",
                cli.people,
                cli.days
            )
        })?
        .to_string();
    for (name, sql) in STATEMENTS {
        let sql = &sql.replace("{person}", &person);
        let mut plans = Vec::with_capacity(cli.runs);
        let mut answers = Vec::with_capacity(cli.runs);
        let mut rows = 0;
        for _ in 0..cli.runs {
            let ctx = engine.tenant_context("bench")?;
            let t = Instant::now();
            let plan = ctx.sql(sql).await?.create_physical_plan().await?;
            plans.push(t.elapsed());
            drop(plan);
            let t = Instant::now();
            let answer = engine.sql("bench", sql).await?;
            answers.push(t.elapsed());
            rows = answer.row_count;
        }
        anyhow::ensure!(
            rows > 0,
            "`{name}` answered no rows: the store was not filled"
        );
        println!(
            "  {name:<26} {rows:>6} {:>8.2}ms {:>8.2}ms {:>8.2}ms {:>8.2}ms",
            ms(quantile(&mut plans, 0.5)),
            ms(quantile(&mut plans, 0.99)),
            ms(quantile(&mut answers, 0.5)),
            ms(quantile(&mut answers, 0.99)),
        );
    }
    Ok(())
}
