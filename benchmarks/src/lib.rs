//! Shared parts of Digame's benchmarks: realistic payloads, CPU accounting of a process,
//! and the figures they print.
//!
//! Benchmarks are binaries (`cargo run --release -p digame-benchmarks --bin …`), not timed
//! tests: they print throughput and the CPU it cost, so a figure per core can be compared
//! across machines with different core counts.

use std::time::Duration;

use serde_json::{Value, json};

/// `simulate`'s events for `people` over the `days` ending at `until_ms`, as the collector
/// publishes them: tenant `bench`, received at `until_ms`. The seed is fixed, so every run
/// of a benchmark reads the same events.
pub fn simulated_events(
    people: usize,
    days: u32,
    until_ms: i64,
) -> anyhow::Result<Vec<digame_schemas::ActivityEvent>> {
    let spec = digame_api::simulate::SimulationSpec {
        people,
        days,
        seed: 42,
        until_ms,
    };
    digame_api::simulate::generate(&spec)
        .into_iter()
        .map(|v| {
            let mut ev: digame_schemas::ActivityEvent = serde_json::from_value(v)?;
            ev.tenant_id = "bench".into();
            ev.received_at = Some(digame_schemas::EventTime(until_ms));
            Ok(ev)
        })
        .collect()
}

/// The prefix of every benchmark's scratch directory, which `infra/scripts/clean` looks
/// for in `$TMPDIR`.
pub const SCRATCH_PREFIX: &str = "digame-bench.";

/// A scratch directory for one benchmark run, `$TMPDIR/digame-bench.PID.XXXXXX` (the pid
/// tells `infra/scripts/clean` whether its run is still going). It is removed when the
/// guard drops (the run ends or fails), and on Ctrl-C or SIGTERM, which would otherwise end
/// the process without running destructors: a watcher thread removes it and exits with
/// 130. Only a SIGKILL leaves it behind (`infra/scripts/clean` finds it). One per process:
/// the first watcher to see the signal ends the process.
pub fn scratch_dir() -> anyhow::Result<tempfile::TempDir> {
    let dir = tempfile::Builder::new()
        .prefix(&format!("{SCRATCH_PREFIX}{}.", std::process::id()))
        .tempdir()?;
    let path = dir.path().to_path_buf();
    // The watcher runs a runtime of its own on its own thread: the benchmark may run none,
    // or be inside its own (where starting another would panic). It reports once its
    // handlers are in place, so no signal falls between the directory and the handlers.
    let (ready, armed) = std::sync::mpsc::channel::<std::io::Result<()>>();
    std::thread::Builder::new()
        .name("scratch-cleanup".into())
        .spawn(move || {
            use tokio::signal::unix::{SignalKind, signal};
            let handlers = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()
                .and_then(|rt| {
                    let (term, int) = rt.block_on(async {
                        Ok::<_, std::io::Error>((
                            signal(SignalKind::terminate())?,
                            signal(SignalKind::interrupt())?,
                        ))
                    })?;
                    Ok((rt, term, int))
                });
            let (rt, mut term, mut int) = match handlers {
                Ok(handlers) => handlers,
                Err(e) => {
                    let _ = ready.send(Err(e));
                    return;
                }
            };
            let _ = ready.send(Ok(()));
            rt.block_on(async {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            });
            let _ = std::fs::remove_dir_all(&path);
            eprintln!("interrupted; removed {}", path.display());
            std::process::exit(130);
        })?;
    armed.recv()??;
    Ok(dir)
}

/// The end of the simulated range of the benchmarks that process `simulate` data, fixed so
/// every run processes the same events: 2026-11-23T00:00:00Z.
pub const SIMULATED_UNTIL_MS: i64 = 1_795_392_000_000;

/// [`simulated_events`] ending at [`SIMULATED_UNTIL_MS`], in event-time order (as a live
/// stream delivers them), each encoded as the collector publishes it.
pub fn simulated_payloads_in_time_order(people: usize, days: u32) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut events = simulated_events(people, days, SIMULATED_UNTIL_MS)?;
    events.sort_by_key(|e| e.timestamp);
    Ok(events
        .iter()
        .map(serde_json::to_vec)
        .collect::<Result<_, _>>()?)
}

/// One window-focus event of about 300 bytes, as a desktop watcher sends it.
pub fn focus_event(n: u64, users: u64, base_ms: i64) -> Value {
    const APPS: [(&str, &str); 4] = [
        (
            "Code",
            "pipelines/src/runtime.rs - digame - Visual Studio Code",
        ),
        ("Slack", "#eng-platform | Digame Workspace - Slack"),
        ("Firefox", "Pull request review: event bus partitioning"),
        ("Zoom", "Weekly planning - Zoom Meeting"),
    ];
    let (app, title) = APPS[(n % 4) as usize];
    json!({
        "event_id": uuid::Uuid::from_u64_pair(0x6469_6761_6d65_0000, n),
        "user_id": format!("person-{:05}", n % users),
        "source": "aw-watcher-window",
        "kind": "window_focus",
        "timestamp": base_ms + (n / users) as i64 * 5_000,
        "duration_ms": 5_000,
        "attributes": {"app": app, "title": title, "project": "digame", "branch": "main", "language": "rust"},
    })
}

/// Rewrites the first eight hex digits of every `event_id` in an NDJSON body of
/// [`focus_event`]s to `round`, so the same body sent again carries ids never sent before
/// (as a real client's next batch does). `offsets` are where each id's text starts, from
/// [`event_id_offsets`].
pub fn stamp_event_ids(body: &mut [u8], offsets: &[usize], round: u32) {
    let hex = format!("{round:08x}");
    for &at in offsets {
        body[at..at + 8].copy_from_slice(hex.as_bytes());
    }
}

/// Where the text of each `event_id` value starts in an NDJSON body.
pub fn event_id_offsets(body: &[u8]) -> Vec<usize> {
    const KEY: &[u8] = b"\"event_id\":\"";
    body.windows(KEY.len())
        .enumerate()
        .filter(|(_, w)| *w == KEY)
        .map(|(i, _)| i + KEY.len())
        .collect()
}

/// NDJSON bodies of `per_body` events each, `bodies` of them, with distinct event ids.
/// Returns the bodies and the mean encoded event size in bytes.
pub fn ndjson_bodies(
    bodies: usize,
    per_body: usize,
    users: u64,
    base_ms: i64,
) -> (Vec<Vec<u8>>, f64) {
    let mut out = Vec::with_capacity(bodies);
    let mut bytes = 0usize;
    for b in 0..bodies {
        let mut body = Vec::with_capacity(per_body * 320);
        for i in 0..per_body {
            let n = (b * per_body + i) as u64;
            serde_json::to_writer(&mut body, &focus_event(n, users, base_ms))
                .expect("events serialize");
            body.push(b'\n');
        }
        bytes += body.len();
        out.push(body);
    }
    (out, bytes as f64 / (bodies * per_body) as f64)
}

/// User plus system CPU time consumed so far by process `pid` (all its threads, including
/// finished ones), from `/proc/<pid>/stat`.
pub fn process_cpu(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name is parenthesized and may contain spaces; fields follow the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow::anyhow!("unexpected /proc/{pid}/stat format"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3 of the file, so utime (14) and stime (15) are at
    // offsets 11 and 12 here.
    let ticks: u64 = fields
        .get(11..13)
        .ok_or_else(|| anyhow::anyhow!("short /proc/{pid}/stat"))?
        .iter()
        .map(|f| f.parse::<u64>())
        .sum::<Result<u64, _>>()?;
    Ok(Duration::from_secs_f64(ticks as f64 / clock_ticks() as f64))
}

/// Kernel clock ticks per second (`getconf CLK_TCK`), 100 when it cannot be read.
fn clock_ticks() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

/// The `q`-quantile of unsorted samples.
pub fn quantile(samples: &mut [Duration], q: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    samples.sort_unstable();
    let idx = ((samples.len() - 1) as f64 * q).round() as usize;
    samples[idx]
}

/// `1234567.8` → `1,234,568`.
pub fn thousands(v: f64) -> String {
    let digits = format!("{:.0}", v.max(0.0));
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_about_300_bytes_and_valid() {
        let (bodies, mean) = ndjson_bodies(2, 100, 10, 1_795_512_600_000);
        assert!((250.0..350.0).contains(&mean), "mean event size {mean}");
        let policy = digame_schemas::validate::TimePolicy::new(
            digame_schemas::EventTime(1_795_512_600_000 + 3_600_000),
            30,
        );
        for line in bodies[1].split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let ev: digame_schemas::ActivityEvent = serde_json::from_slice(line).unwrap();
            digame_schemas::validate::validate_event(&ev, &policy).unwrap();
        }
    }

    #[test]
    fn own_cpu_time_is_readable() {
        let before = process_cpu(std::process::id()).unwrap();
        let mut x = 0u64;
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_millis(200) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        let spent = process_cpu(std::process::id()).unwrap() - before;
        assert!(spent >= Duration::from_millis(100), "{spent:?}");
    }

    #[test]
    fn formatting() {
        assert_eq!(thousands(1_234_567.8), "1,234,568");
        assert_eq!(thousands(999.0), "999");
        let mut s = vec![
            Duration::from_millis(3),
            Duration::from_millis(1),
            Duration::from_millis(2),
        ];
        assert_eq!(quantile(&mut s, 0.5), Duration::from_millis(2));
        assert_eq!(quantile(&mut s, 1.0), Duration::from_millis(3));
    }
}
