//! ClickHouse: the sink's insert rate beside `clickhouse-client` inserting the same rows,
//! and the latency of a dashboard-style aggregate over 10M+ events through `POST /v1/sql`'s
//! path (DataFusion plan, tenant filter, unparsed to ClickHouse SQL).
//!
//! ```text
//! infra/scripts/clickhouse start /tmp/ch 18123
//! CH_PASSWORD=$(cat /tmp/ch/password) cargo run --release -p digame-benchmarks \
//!     --bin bench-clickhouse -- --url http://127.0.0.1:18123 --native-port 18124
//! ```

use std::io::Write;
use std::time::{Duration, Instant};

use clap::Parser;
use digame_benchmarks::{quantile, thousands};
use digame_infra::config::{ClickHouseConfig, QueryConfig};
use digame_infra::store::clickhouse::{ClickHouseSettings, ClickHouseStore};
use digame_infra::store::{StoreBatch, StoreSink};
use digame_query::QueryEngine;
use digame_schemas::{EventTime, FeatureRow, Granularity};

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(about = "ClickHouse sink throughput and dashboard query latency")]
struct Cli {
    /// ClickHouse HTTP URL.
    #[arg(long, default_value = "http://127.0.0.1:18123")]
    url: String,
    /// Native-protocol port, for clickhouse-client.
    #[arg(long, default_value_t = 18124)]
    native_port: u16,
    /// Feature rows written by each side.
    #[arg(long, default_value_t = 1_000_000)]
    rows: usize,
    /// Events in the table the dashboard query reads.
    #[arg(long, default_value_t = 10_000_000)]
    events: u64,
    /// Times the query is run.
    #[arg(long, default_value_t = 20)]
    runs: usize,
}

fn settings(cli: &Cli, database: &str) -> ClickHouseSettings {
    ClickHouseSettings {
        url: cli.url.clone(),
        database: database.into(),
        config: ClickHouseConfig {
            password: std::env::var("CH_PASSWORD").unwrap_or_default(),
            ..ClickHouseConfig::default()
        },
    }
}

/// `rows` feature rows: 1000 people, hourly windows, 10 features.
fn features(rows: usize) -> Vec<FeatureRow> {
    const NAMES: [&str; 10] = [
        "active_seconds",
        "presence_seconds",
        "context_switches",
        "event_count",
        "focus_seconds",
        "meeting_seconds",
        "chat_seconds",
        "afk_seconds",
        "deep_work_blocks",
        "after_hours_seconds",
    ];
    let base = 1_767_225_600_000; // 2026-01-01T00:00:00Z
    (0..rows)
        .map(|i| {
            let person = i % 1000;
            let hour = (i / 10_000) as i64;
            let start = base + hour * 3_600_000;
            FeatureRow {
                tenant_id: "bench".into(),
                user_id: format!("person-{person:04}").into(),
                granularity: Granularity::Hour,
                window_start: EventTime(start),
                window_end: EventTime(start + 3_600_000),
                timezone: "UTC".into(),
                feature: NAMES[(i / 1000) % 10].into(),
                dimension: String::new(),
                value: (i % 3600) as f64,
                feature_version: 1,
                params_version: 0,
                is_final: true,
                revision: 1_767_225_600_000_000 + i as i64,
                final_revision: 1_767_225_600_000_000 + i as i64,
            }
        })
        .collect()
}

/// The rows as clickhouse-client's TSV input, in the table's column order.
fn tsv(rows: &[FeatureRow]) -> Vec<u8> {
    let mut out = Vec::with_capacity(rows.len() * 120);
    for f in rows {
        let (ws, we) = (f.window_start.0 / 1000, f.window_end.0 / 1000);
        writeln!(
            out,
            "{}\t{}\t{}\t{ws}\t0\t{we}\t0\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
            f.tenant_id,
            f.user_id,
            f.granularity.as_str(),
            f.timezone,
            f.feature,
            f.dimension,
            f.value,
            f.feature_version,
            f.params_version,
            u8::from(f.is_final),
            f.revision,
            f.final_revision
        )
        .expect("write to a Vec");
    }
    out
}

async fn exec(s: &ClickHouseSettings, sql: &str) -> anyhow::Result<()> {
    s.client().query(sql).execute().await?;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let tag = std::process::id();

    // ---- Sink vs clickhouse-client -------------------------------------------------
    let rows = features(cli.rows);
    let sink_db = format!("bench_sink_{tag}");
    let client_db = format!("bench_client_{tag}");
    let store = ClickHouseStore::open(settings(&cli, &sink_db)).await?;
    let _client_store = ClickHouseStore::open(settings(&cli, &client_db)).await?;
    let batch = StoreBatch {
        features: rows,
        ..StoreBatch::default()
    };
    let started = Instant::now();
    store.write(&batch).await?;
    let sink_secs = started.elapsed().as_secs_f64();

    let input = tsv(&batch.features);
    let scratch = digame_benchmarks::scratch_dir()?;
    let file = scratch.path().join("features.tsv");
    std::fs::write(&file, &input)?;
    let started = Instant::now();
    let status = std::process::Command::new("clickhouse-client")
        .args([
            "--host",
            "127.0.0.1",
            "--port",
            &cli.native_port.to_string(),
        ])
        .args([
            "--password",
            &std::env::var("CH_PASSWORD").unwrap_or_default(),
        ])
        .args([
            "--query",
            &format!("INSERT INTO {client_db}.features FORMAT TSV"),
        ])
        .stdin(std::fs::File::open(&file)?)
        .status()?;
    anyhow::ensure!(status.success(), "clickhouse-client failed");
    let client_secs = started.elapsed().as_secs_f64();
    let n = cli.rows as f64;
    println!(
        "clickhouse sink: {} feature rows into one table",
        thousands(n)
    );
    println!(
        "  digame sink (RowBinary)  {:>12} rows/s",
        thousands(n / sink_secs)
    );
    println!(
        "  clickhouse-client (TSV)  {:>12} rows/s",
        thousands(n / client_secs)
    );
    println!(
        "  ratio                    {:>12.2}",
        client_secs / sink_secs
    );

    // ---- Dashboard query over 10M+ events -------------------------------------------
    let q = settings(&cli, &client_db);
    let started = Instant::now();
    exec(
        &q,
        &format!(
            "INSERT INTO events (schema_version, event_id, tenant_id, user_id, source, kind, \
         timestamp, timestamp_ms, duration_ms, participants) \
         SELECT 1, toString(number), 'bench', concat('person-', toString(number % 1000)), \
         'aw', ['window_focus', 'afk', 'commit', 'message'][(number % 4) + 1], \
         toDateTime(1767225600 + intDiv(number, 40)), toUInt16(number % 1000), 5000, [] \
         FROM numbers({})",
            cli.events
        ),
    )
    .await?;
    println!(
        "dashboard query: {} events loaded server-side in {:.1} s",
        thousands(cli.events as f64),
        started.elapsed().as_secs_f64()
    );
    let engine = QueryEngine::clickhouse(q.client(), QueryConfig::default());
    let sql = "SELECT kind, count(*) AS events, count(DISTINCT user_id) AS people \
               FROM events GROUP BY kind ORDER BY events DESC";
    let mut samples = Vec::with_capacity(cli.runs);
    let mut result = None;
    for _ in 0..cli.runs {
        let t = Instant::now();
        result = Some(engine.sql("bench", sql).await?);
        samples.push(t.elapsed());
    }
    let r = result.expect("at least one run");
    println!("  {sql}");
    println!(
        "  -> {} rows, first {}",
        r.row_count,
        serde_json::Value::Object(r.rows[0].clone())
    );
    println!(
        "  latency over {} runs: p50 {:?}  p95 {:?}",
        cli.runs,
        quantile(&mut samples, 0.5),
        quantile(&mut samples, 0.95)
    );
    let rollup = "SELECT kind, uniqExactMerge(events) AS events FROM events_hourly \
                  WHERE tenant_id = 'bench' GROUP BY kind ORDER BY events DESC";
    let mut samples: Vec<Duration> = Vec::with_capacity(cli.runs);
    for _ in 0..cli.runs {
        let t = Instant::now();
        q.client()
            .query(rollup)
            .fetch_bytes("JSONCompact")?
            .collect()
            .await?;
        samples.push(t.elapsed());
    }
    println!(
        "  the same counts from the events_hourly rollup: p50 {:?}  p95 {:?}",
        quantile(&mut samples, 0.5),
        quantile(&mut samples, 0.95)
    );
    for db in [&sink_db, &client_db] {
        exec(&q, &format!("DROP DATABASE IF EXISTS {db}")).await?;
    }
    Ok(())
}
