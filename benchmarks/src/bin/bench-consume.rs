//! Kafka → pipeline: `simulate` events, pre-loaded into a fresh raw topic exactly as
//! ingest publishes them, consumed by the feature pipeline (a one-member consumer group)
//! and written with their feature rows to a Parquet store, with checkpoints and offset
//! commits as in production. Prints events/s and events per CPU-second of this process
//! (the broker runs in its own).
//!
//! ```text
//! infra/scripts/kafka start /tmp/kafka 19092
//! cargo run --release -p digame-benchmarks --bin bench-consume -- --kafka 127.0.0.1:19092
//! ```

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use digame_api::recompute::StoredEvents;
use digame_benchmarks::{process_cpu, simulated_events, thousands};
use digame_infra::bus::{Record, Topic};
use digame_infra::config::{Config, PipelineConfig};
use digame_infra::store::{ParquetStore, StoreSink};
use digame_pipelines::{FeaturePipeline, PipelineStatus, Processor, RuntimeSettings};
use digame_query::QueryEngine;
use digame_schemas::EventTime;

/// The allocator, as in the `digame` binary.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(about = "Kafka -> feature pipeline -> Parquet throughput")]
struct Cli {
    /// Kafka bootstrap address.
    #[arg(long)]
    kafka: String,
    /// People simulated.
    #[arg(long, default_value_t = 300)]
    people: usize,
    /// Days simulated, ending now.
    #[arg(long, default_value_t = 7)]
    days: u32,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    digame_infra::telemetry::init_logging(digame_infra::telemetry::LogFormat::Text, "warn");
    let now = EventTime::now();
    let records: Vec<Record> = simulated_events(cli.people, cli.days, now.0)?
        .into_iter()
        .map(|ev| {
            Ok(Record {
                key: Bytes::from(ev.partition_key()),
                payload: Bytes::from(serde_json::to_vec(&ev)?),
                timestamp_ms: now.0,
            })
        })
        .collect::<anyhow::Result<_>>()?;
    let n = records.len() as u64;

    let mut config = Config::default();
    config.bus.url = format!("kafka://{}", cli.kafka);
    config.bus.topic_prefix = format!("bench-consume{}.", std::process::id());
    // Extra librdkafka properties to try, e.g. BENCH_KAFKA_PROPS=fetch.wait.max.ms=5.
    let props = std::env::var("BENCH_KAFKA_PROPS").unwrap_or_default();
    for (k, v) in props.split(',').filter_map(|kv| kv.split_once('=')) {
        config.bus.kafka.0.insert(k.into(), v.into());
    }
    let bus = digame_infra::bus::open(&config).await?;
    let loading = Instant::now();
    for chunk in records.chunks(10_000) {
        bus.publish(Topic::Events, chunk.to_vec()).await?;
    }
    let load_secs = loading.elapsed().as_secs_f64();

    let dir = digame_benchmarks::scratch_dir()?;
    let status = Arc::new(PipelineStatus::default());
    let pipeline_cfg = PipelineConfig::default();
    let store_root = dir.path().join("store");
    let pipeline = FeaturePipeline {
        bus: bus.clone(),
        store: Arc::new(ParquetStore::open(&store_root)?) as Arc<dyn StoreSink>,
        processor: Processor::new(&pipeline_cfg, config.ingest.longest_horizon_days())?,
        settings: RuntimeSettings::from_config(&pipeline_cfg, dir.path()),
        status: status.clone(),
        meta: None,
        history: Arc::new(StoredEvents(Arc::new(QueryEngine::new(
            store_root,
            Default::default(),
        )))),
    };
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let cpu0 = process_cpu(std::process::id())?;
    let started = Instant::now();
    let task = tokio::spawn(pipeline.run(stop_rx));
    let mut reported = Instant::now();
    while status.processed.load(Ordering::Relaxed) < n {
        if reported.elapsed() > Duration::from_secs(10) {
            reported = Instant::now();
            eprintln!(
                "  … {} of {n} events consumed, lag {}",
                status.processed.load(Ordering::Relaxed),
                status.lag.load(Ordering::Relaxed)
            );
        }
        if started.elapsed() > Duration::from_secs(600) {
            anyhow::bail!(
                "the pipeline consumed {} of {n} events within 10 minutes",
                status.processed.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu = (process_cpu(std::process::id())? - cpu0).as_secs_f64();
    let _ = stop.send(true);
    task.await??;
    bus.close().await;

    println!(
        "consume: Kafka at {} -> feature pipeline -> Parquet store",
        cli.kafka
    );
    println!(
        "  input         {} events of simulate ({} people x {} days), pre-loaded at {} events/s",
        thousands(n as f64),
        cli.people,
        cli.days,
        thousands(n as f64 / load_secs)
    );
    println!(
        "  throughput    {} events/s ({secs:.2} s, includes the group join)",
        thousands(n as f64 / secs)
    );
    println!(
        "  CPU           {:.2} cores -> {} events per CPU-second",
        cpu / secs,
        thousands(n as f64 / cpu.max(1e-9))
    );
    Ok(())
}
