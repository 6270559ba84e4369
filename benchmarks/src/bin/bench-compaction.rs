//! The embedded store's compaction: what it costs per event, and whether it keeps up with
//! ingest.
//!
//! `simulate` events, in arrival (time) order, go through the feature pipeline's
//! operator core, and each flush's raw events and feature rows are written to a fresh
//! Parquet store as the runtime writes them: one file per (table, tenant, date) per flush.
//! Every `--compact-every` flushes a compaction round runs, as `serve` runs one every
//! `store.compaction_interval_secs` (on a blocking thread, as `serve` does), with the
//! default `store.compaction_min_files`; the
//! day still receiving events is merged again and again, so the figure includes that
//! rewriting. Flush writes and compaction are timed apart, wall clock and process CPU.
//!
//! The verdict: compaction keeps up while its CPU per event, times the ingest rate, stays
//! under the CPU it may take. It prints the share of a core compaction needs at
//! `--ingest-rate` events/s (default: the embedded HTTP ingest figure of `bench-ingest`
//! on the development machine).
//!
//! ```text
//! cargo run --release -p digame-benchmarks --bin bench-compaction -- --people 300 --days 7
//! ```

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use digame_benchmarks::{process_cpu, simulated_payloads_in_time_order, thousands};
use digame_infra::config::{PipelineConfig, StoreConfig};
use digame_infra::store::{ParquetStore, StoreBatch, StoreSink, Table};
use digame_pipelines::Processor;
use digame_schemas::ActivityEvent;

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(about = "Embedded store compaction: cost per event and headroom over ingest")]
struct Cli {
    /// People simulated.
    #[arg(long, default_value_t = 300)]
    people: usize,
    /// Days simulated.
    #[arg(long, default_value_t = 7)]
    days: u32,
    /// Events per flush (the runtime flushes what arrived in one flush interval).
    #[arg(long, default_value_t = 2_000)]
    flush_events: usize,
    /// Flushes between compaction rounds.
    #[arg(long, default_value_t = 20)]
    compact_every: usize,
    /// The ingest rate to judge against, events/s.
    #[arg(long, default_value_t = 324_000.0)]
    ingest_rate: f64,
}

fn cpu() -> Duration {
    process_cpu(std::process::id()).unwrap_or_default()
}

/// Parquet files under `dir`, and the bytes of every file there.
fn store_files(dir: &Path) -> (usize, u64) {
    let (mut files, mut bytes) = (0, 0);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            bytes += e.metadata().map(|m| m.len()).unwrap_or(0);
            files += usize::from(p.extension().is_some_and(|x| x == "parquet"));
        }
    }
    (files, bytes)
}

/// A compaction round as `serve` runs it: on a blocking thread.
async fn compact(store: &Arc<ParquetStore>, min_files: usize) -> anyhow::Result<usize> {
    let store = store.clone();
    Ok(tokio::task::spawn_blocking(move || store.compact_blocking(min_files)).await??)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let payloads = simulated_payloads_in_time_order(cli.people, cli.days)?;
    let n = payloads.len();

    let dir = digame_benchmarks::scratch_dir()?;
    let store = Arc::new(ParquetStore::open(dir.path())?);
    let min_files = StoreConfig::default().compaction_min_files;
    let mut p = Processor::new(&PipelineConfig::default(), 30)?;
    let (mut write_wall, mut write_cpu) = (Duration::ZERO, Duration::ZERO);
    let (mut compact_wall, mut compact_cpu) = (Duration::ZERO, Duration::ZERO);
    let (mut rounds, mut merged, mut feature_rows) = (0usize, 0usize, 0usize);
    let mut files_written = 0usize;
    let mut peak_files = 0usize;
    for (i, chunk) in payloads.chunks(cli.flush_events.max(1)).enumerate() {
        // Wall clock following event time, as a live stream has it.
        let clock = serde_json::from_slice::<ActivityEvent>(chunk.last().expect("non-empty"))?
            .timestamp
            .0;
        p.process_batch(chunk.iter().map(|b| (0, &b[..])), clock);
        let batch = StoreBatch {
            features: p.emit(clock),
            events: std::mem::take(&mut p.pending_events),
            dead_letters: std::mem::take(&mut p.pending_dead),
        };
        feature_rows += batch.features.len();
        let (t, c) = (Instant::now(), cpu());
        store.write(&batch).await?;
        write_wall += t.elapsed();
        write_cpu += cpu().saturating_sub(c);
        files_written +=
            usize::from(!batch.features.is_empty()) + usize::from(!batch.events.is_empty());
        if (i + 1) % cli.compact_every.max(1) == 0 {
            peak_files = peak_files.max(store_files(dir.path()).0);
            let (t, c) = (Instant::now(), cpu());
            merged += compact(&store, min_files).await?;
            compact_wall += t.elapsed();
            compact_cpu += cpu().saturating_sub(c);
            rounds += 1;
        }
    }
    // The last round, as the next interval would run it.
    let (t, c) = (Instant::now(), cpu());
    merged += compact(&store, min_files).await?;
    compact_wall += t.elapsed();
    compact_cpu += cpu().saturating_sub(c);
    rounds += 1;
    // Deleting retired files happens at the start of the next round.
    compact(&store, usize::MAX).await?;
    let (left, bytes) = store_files(dir.path());

    let per_event = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
    let compact_rate = n as f64 / compact_cpu.as_secs_f64().max(1e-9);
    println!(
        "compaction: embedded Parquet store, {} events of simulate ({} people x {} days) in arrival order",
        thousands(n as f64),
        cli.people,
        cli.days
    );
    println!(
        "  flushes       {} of {} events: {} files written ({} feature rows), {:.2} s wall, {:.2} us CPU per event",
        thousands(n.div_ceil(cli.flush_events) as f64),
        thousands(cli.flush_events as f64),
        thousands(files_written as f64),
        thousands(feature_rows as f64),
        write_wall.as_secs_f64(),
        per_event(write_cpu)
    );
    println!(
        "  compaction    {rounds} rounds (every {} flushes, min {min_files} files): {} partitions merged, {:.2} s wall, {:.2} us CPU per event",
        cli.compact_every,
        thousands(merged as f64),
        compact_wall.as_secs_f64(),
        per_event(compact_cpu)
    );
    println!(
        "  files         {} at most before a round, {} after the last ({} tables), {} bytes",
        thousands(peak_files as f64),
        thousands(left as f64),
        Table::ALL.len(),
        thousands(bytes as f64)
    );
    println!(
        "  keeps up      {} events/s per core of compaction; at {} events/s of ingest it needs {:.1}% of a core",
        thousands(compact_rate),
        thousands(cli.ingest_rate),
        100.0 * cli.ingest_rate / compact_rate
    );
    Ok(())
}
