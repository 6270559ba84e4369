//! The feature pipeline alone: bus payloads (canonical events as ingest writes them) from
//! `simulate` data pushed through the operator core — decode, dedup, watermark, window
//! assignment and every feature of `docs/features.md` (F1–F14, day, hour and week windows,
//! rolling 28-day state) — with rows emitted as the runtime does. Also reports the state
//! held per active person (its checkpointed size, measured outside the timed region).
//!
//! It runs on one thread, so events/s is the figure per core. No bus or store I/O is
//! included; those are measured by `bench-ingest` and the store benchmarks.
//!
//! ```text
//! cargo run --release -p digame-benchmarks --bin bench-pipeline -- --people 1000 --days 7
//! ```

use std::collections::HashMap;
use std::time::{Duration, Instant};

use clap::Parser;
use digame_api::simulate::{profile_of, user_id};
use digame_benchmarks::{SIMULATED_UNTIL_MS, simulated_events, thousands};
use digame_infra::config::PipelineConfig;
use digame_pipelines::Processor;
use digame_pipelines::runtime::decode_event;
use digame_schemas::ActivityEvent;

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
    /// `pipeline.hold_touched_secs`: how long a final day events just reached stays in
    /// memory (default: the configuration's).
    #[arg(long)]
    hold_touched_secs: Option<u64>,
    /// Leave out the profiles `simulate` writes: everyone in UTC with default hours (the
    /// workload of earlier figures).
    #[arg(long)]
    no_profiles: bool,
    /// Realistic disorder: percent of events delivered 1–6 hours late.
    #[arg(long, default_value_t = 10.0)]
    late_hours_pct: f64,
    /// Percent of events delivered 1–3 days late (after their days left memory).
    #[arg(long, default_value_t = 1.0)]
    late_days_pct: f64,
}

/// A fresh processor with the profiles `digame simulate` writes (teams, zones, hours), or
/// none when `people` is 0.
fn processor(cfg: &PipelineConfig, people: usize) -> anyhow::Result<Processor> {
    let mut p = Processor::new(cfg, 30)?;
    for i in 0..people {
        let profile = serde_json::from_value(profile_of(i, people))?;
        p.directory
            .set_profile("bench", &user_id(i), profile)
            .map_err(anyhow::Error::msg)?;
    }
    Ok(p)
}

/// A reproducible number in [0, 1) for event `i` (splitmix64).
fn unit(i: u64, salt: u64) -> f64 {
    let mut z = i.wrapping_add(salt).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) as f64 / (u64::MAX as f64 + 1.0)
}

/// One pass delivering payloads in arrival order with the wall clock following arrivals,
/// as the runtime would: polls, emits, reopened days resolved from the raw events stored
/// by earlier emits. Keeping and reading that stand-in store is not timed (the store's
/// own cost is measured elsewhere). Returns the timed seconds and the reopening reads.
fn delivered_pass(
    cfg: &PipelineConfig,
    people: usize,
    order: &[(i64, &[u8])],
    emit_every: usize,
) -> anyhow::Result<(f64, usize)> {
    let mut p = processor(cfg, people)?;
    let mut stored: HashMap<String, Vec<ActivityEvent>> = HashMap::new();
    let mut untimed = Duration::ZERO;
    let mut reads = 0;
    let started = Instant::now();
    for chunk in order.chunks(emit_every.max(1)) {
        for poll in chunk.chunks(cfg.poll_batch) {
            let now = poll.last().expect("non-empty").0;
            p.process_batch(poll.iter().map(|(_, b)| (0, *b)), now);
        }
        let now = chunk.last().expect("non-empty").0;
        for req in p.reopen_requests() {
            let t = Instant::now();
            let events: Vec<ActivityEvent> = stored
                .get(&*req.user)
                .map(|v| {
                    v.iter()
                        .filter(|e| (req.range.from..req.range.to).contains(&e.timestamp.0))
                        .cloned()
                        .collect()
                })
                .unwrap_or_default();
            untimed += t.elapsed();
            p.reopen(&req.tenant, &req.user, &events, now);
            reads += 1;
        }
        std::hint::black_box(p.emit(now).len());
        let t = Instant::now();
        for ev in p.pending_events.drain(..) {
            stored.entry(ev.user_id.clone()).or_default().push(ev);
        }
        untimed += t.elapsed();
    }
    Ok(((started.elapsed() - untimed).as_secs_f64(), reads))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The wall clock the processor sees is the fixed end of the simulated range.
    let now = SIMULATED_UNTIL_MS;
    // Payloads exactly as the collector publishes them: tenant and receive time set.
    let payloads: Vec<Vec<u8>> = simulated_events(cli.people, cli.days, now)?
        .iter()
        .map(serde_json::to_vec)
        .collect::<Result<_, _>>()?;
    let bytes: usize = payloads.iter().map(Vec::len).sum();
    let n = payloads.len();

    let mut cfg = PipelineConfig::default();
    if let Some(s) = cli.hold_touched_secs {
        cfg.hold_touched_secs = s;
    }
    let profiled = if cli.no_profiles { 0 } else { cli.people };
    let mut best = f64::MAX;
    let mut rows = 0usize;
    let mut peak_people = 0usize;
    let mut emit_share = 0.0;
    let mut state_per_person = 0.0f64;
    let mut state_people = 0usize;
    for _ in 0..cli.passes {
        let mut p = processor(&cfg, profiled)?;
        let started = Instant::now();
        let mut pass_rows = 0usize;
        let mut emitting = std::time::Duration::ZERO;
        let mut measuring = std::time::Duration::ZERO;
        let chunks = n.div_ceil(cli.emit_every.max(1));
        for (i, chunk) in payloads.chunks(cli.emit_every.max(1)).enumerate() {
            // As the runtime hands over one poll at a time.
            for poll in chunk.chunks(cfg.poll_batch) {
                p.process_batch(poll.iter().map(|b| (0, &b[..])), now);
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
        "  input         {} events ({:.0} B mean) from simulate: {} people x {} days, {}",
        thousands(n as f64),
        bytes as f64 / n as f64,
        cli.people,
        cli.days,
        if cli.no_profiles {
            "no profiles (UTC, default hours)"
        } else {
            "with simulate's profiles (4 time zones)"
        }
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

    // Delivery by arrival time, the wall clock following it: first each event as it ends
    // (the baseline), then with some events hours and some days late.
    const HOUR: i64 = 3_600_000;
    let spans: Vec<(i64, i64)> = payloads
        .iter()
        .map(|b| {
            let ev = decode_event(b).map_err(anyhow::Error::msg)?;
            Ok((ev.timestamp.0, ev.end().0))
        })
        .collect::<anyhow::Result<_>>()?;
    let arrange = |late: bool| -> (Vec<(i64, &[u8])>, usize, usize) {
        let (mut hours, mut days) = (0, 0);
        let mut order: Vec<(i64, &[u8])> = spans
            .iter()
            .zip(&payloads)
            .enumerate()
            .map(|(i, (&(_, end), b))| {
                let u = unit(i as u64, 1) * 100.0;
                let delay = if !late {
                    0
                } else if u < cli.late_days_pct {
                    days += 1;
                    (24 + (unit(i as u64, 2) * 48.0) as i64) * HOUR
                } else if u < cli.late_days_pct + cli.late_hours_pct {
                    hours += 1;
                    (1.0 + unit(i as u64, 3) * 5.0) as i64 * HOUR
                } else {
                    0
                };
                (end + delay, &b[..])
            })
            .collect();
        order.sort_by_key(|(at, _)| *at);
        (order, hours, days)
    };
    let (in_order, _, _) = arrange(false);
    let (late, hours, days) = arrange(true);
    let (mut base, mut disorder, mut reads) = (f64::MAX, f64::MAX, 0);
    for _ in 0..cli.passes {
        base = base.min(delivered_pass(&cfg, profiled, &in_order, cli.emit_every)?.0);
        let (t, r) = delivered_pass(&cfg, profiled, &late, cli.emit_every)?;
        disorder = disorder.min(t);
        reads = r;
    }
    println!(
        "delivery by arrival time (wall clock follows arrivals, best of {}):",
        cli.passes
    );
    println!(
        "  in order      {} events/s per core",
        thousands(n as f64 / base)
    );
    println!(
        "  disordered    {} events/s per core: {} events ({:.1}%) 1-6 h late, {} ({:.1}%) 1-3 days late",
        thousands(n as f64 / disorder),
        thousands(hours as f64),
        100.0 * hours as f64 / n as f64,
        thousands(days as f64),
        100.0 * days as f64 / n as f64
    );
    println!(
        "  reopen cost   {:.1} µs per late event ({} person reads of stored events for days no longer in memory)",
        (disorder - base) * 1e6 / (hours + days).max(1) as f64,
        thousands(reads as f64)
    );
    Ok(())
}
