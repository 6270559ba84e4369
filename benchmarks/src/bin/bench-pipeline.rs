//! The feature pipeline alone: bus payloads (canonical events as ingest writes them) from
//! `simulate` data pushed through the operator core — decode, dedup, watermark, window
//! assignment and every feature of `METRICS.md` (F1–F14, day, hour and week windows,
//! rolling 28-day state) — with rows emitted as the runtime does. Also reports the state
//! held per active person (its checkpointed size, measured outside the timed region).
//!
//! It runs on one thread, so events/s is the figure per core. No bus or store I/O is
//! included; those are measured by `bench-ingest` and the store benchmarks.
//!
//! ```text
//! cargo run --release -p digame-benchmarks --bin bench-pipeline -- --people 1000 --days 7
//! ```

use std::time::Instant;

use clap::Parser;
use digame_api::simulate::{SimulationSpec, generate};
use digame_benchmarks::thousands;
use digame_infra::config::PipelineConfig;
use digame_pipelines::Processor;
use digame_pipelines::runtime::decode_event;
use digame_schemas::{ActivityEvent, EventTime};

/// The allocator: the pipeline and ingest allocate many small, short-lived strings, which
/// glibc's malloc serves markedly slower.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(about = "Feature pipeline throughput on simulate data")]
struct Cli {
    /// People simulated.
    #[arg(long, default_value_t = 1000)]
    people: usize,
    /// Days simulated, ending at a fixed instant (2026-11-23T00:00:00Z).
    #[arg(long, default_value_t = 7)]
    days: u32,
    /// Passes over the data (each with fresh state), best one reported.
    #[arg(long, default_value_t = 3)]
    passes: usize,
    /// Events between emits (the runtime emits every flush interval).
    #[arg(long, default_value_t = 100_000)]
    emit_every: usize,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // A fixed end instant, so every run processes the same events (2026-11-23T00:00:00Z;
    // the wall clock the processor sees is the same instant).
    let now = 1_795_392_000_000;
    let spec = SimulationSpec {
        people: cli.people,
        days: cli.days,
        seed: 42,
        until_ms: now,
    };
    let received = EventTime(now);
    // Payloads exactly as the collector publishes them: tenant and receive time set.
    let payloads: Vec<Vec<u8>> = generate(&spec)
        .into_iter()
        .map(|v| {
            let mut ev: ActivityEvent = serde_json::from_value(v)?;
            ev.tenant_id = "bench".into();
            ev.received_at = Some(received);
            Ok(serde_json::to_vec(&ev)?)
        })
        .collect::<anyhow::Result<_>>()?;
    let bytes: usize = payloads.iter().map(Vec::len).sum();
    let n = payloads.len();

    let cfg = PipelineConfig::default();
    let mut best = f64::MAX;
    let mut rows = 0usize;
    let mut peak_people = 0usize;
    let mut emit_share = 0.0;
    let mut state_per_person = 0.0f64;
    let mut state_people = 0usize;
    for _ in 0..cli.passes {
        let mut p = Processor::new(&cfg)?;
        let started = Instant::now();
        let mut pass_rows = 0usize;
        let mut emitting = std::time::Duration::ZERO;
        let mut measuring = std::time::Duration::ZERO;
        let chunks = n.div_ceil(cli.emit_every.max(1));
        for (i, chunk) in payloads.chunks(cli.emit_every.max(1)).enumerate() {
            for payload in chunk {
                p.process(0, payload, now);
            }
            // The runtime hands raw events to the store and rows to the sink here.
            p.pending_events.clear();
            peak_people = peak_people.max(p.people());
            let t = Instant::now();
            pass_rows += p.emit(now).len();
            emitting += t.elapsed();
            if i == chunks / 2 {
                // Mid-run, when days are open: state size, not timed.
                let t = Instant::now();
                let bytes = p.state_bytes();
                state_people = p.people();
                state_per_person = bytes as f64 / state_people.max(1) as f64;
                measuring += t.elapsed();
            }
        }
        let took = (started.elapsed() - measuring).as_secs_f64();
        if took < best {
            best = took;
            emit_share = emitting.as_secs_f64() / took;
        }
        rows = pass_rows;
    }

    // Decoding alone, for where the time goes.
    let started = Instant::now();
    for payload in &payloads {
        std::hint::black_box(decode_event(payload).map_err(anyhow::Error::msg)?);
    }
    let decode = started.elapsed().as_secs_f64();

    println!("pipeline: bus payloads -> all features F1-F14, hour/day/week windows (1 thread)");
    println!(
        "  input         {} events ({:.0} B mean) from simulate: {} people x {} days",
        thousands(n as f64),
        bytes as f64 / n as f64,
        cli.people,
        cli.days
    );
    println!(
        "  throughput    {} events/s per core (best of {}: {best:.3} s)",
        thousands(n as f64 / best),
        cli.passes
    );
    println!(
        "  of which      JSON decode alone {} events/s ({:.0}% of the time)",
        thousands(n as f64 / decode),
        100.0 * decode / best
    );
    println!(
        "  and           emitting rows (recompute changed windows, diff) {:.0}% of the time",
        100.0 * emit_share
    );
    println!(
        "  output        {} feature rows (hour, day and week windows), {} people open at peak",
        thousands(rows as f64),
        thousands(peak_people as f64)
    );
    println!(
        "  state         {} bytes per active person (checkpointed size, {} people mid-run)",
        thousands(state_per_person),
        thousands(state_people as f64)
    );
    Ok(())
}
