//! Disk damage on a stopped server's data directory, then a restart, through the real
//! binary. Events are acknowledged by an ingest-only start (the pipeline off, so the damage
//! hits events not yet counted); seeded faults then flip bytes inside some records of the
//! bus and zero a block across others; a full start must count every acknowledged event
//! except those whose bytes were damaged — exactly once, nothing stalled — keep the
//! damaged bytes in quarantine, say so on `/readyz`, and go on counting new events. Then a
//! store file cut short: quarantined at the next start, the tenant's reads go on, and its
//! events are rebuilt from the bus.
//!
//! Checkpoints: a server under a steady load of concurrent batches is killed (SIGKILL)
//! again and again; before each restart a seeded fault flips a byte in, or cuts short,
//! one partition's checkpoint. Each restart moves the damaged checkpoint aside, says so
//! on `/readyz`, and rebuilds that partition's state from the stored raw events; once
//! `/readyz` says nothing is uncounted, every acknowledged event is counted exactly once.
//! Bus and checkpoint damage together: a processed record lost from the log and its
//! partition's checkpoint cut short; the state rebuilt from the store still counts it.
//!
//! Store files: the same killed-and-restarted load, with a seeded byte flip or cut in one
//! Parquet file (raw events or features) before each restart. The restart quarantines it,
//! `/readyz` is not ready while the range is damaged, the range is rebuilt (raw events
//! from the bus, features recomputed) with nothing lost, and every acknowledged event is
//! stored and counted exactly once.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use digame_testkit::DigameProcess;
use serde_json::{Value, json};

const KEY: &str = "acme-key-0123456789abcdef";

/// A commit event of person `u{n % people}` at `at`, its id `0195a6a4-0000-7000-{tag}-{n}`:
/// each test tags its own ids.
fn commit(tag: &str, n: usize, people: usize, at: i64) -> Value {
    json!({"event_id": format!("0195a6a4-0000-7000-{tag}-{n:012x}"),
           "user_id": format!("u{}", n % people), "source": "git", "kind": "commit",
           "timestamp": at, "attributes": {"project": "digame"}})
}

/// `digame serve` on `data` checkpointing and flushing often, so every kill or fault finds
/// a recent checkpoint.
async fn start_checkpointing_often(data: &Path) -> DigameProcess {
    let env = [
        ("DIGAME_INGEST_KEYS", "acme-key-0123456789abcdef:acme"),
        ("DIGAME_PIPELINE__CHECKPOINT_INTERVAL_MS", "200"),
        ("DIGAME_PIPELINE__FLUSH_INTERVAL_MS", "100"),
    ];
    DigameProcess::start(Path::new(env!("CARGO_BIN_EXE_digame")), data, &env)
        .await
        .unwrap()
}
const REQUESTS: usize = 40;
const PER_REQUEST: usize = 50;

fn event(n: usize) -> Value {
    json!({"event_id": format!("0195a6a4-0000-7000-fa17-{n:012x}"),
           "user_id": format!("u{}", n % 7), "source": "git", "kind": "commit",
           "timestamp": 1_795_000_000_000i64 + (n as i64) * 60_000,
           "attributes": {"project": "digame"}})
}

/// A seeded xorshift: the `n`-bounded draws of one test run, reproducible.
fn seeded(mut state: u64) -> impl FnMut(usize) -> usize {
    move |n: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % n as u64) as usize
    }
}

/// Files under `dir` (recursively) ending in `.ext`, sorted.
fn files_under(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let path = e.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|x| x == ext) {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// Every segment file of the events topic under `dir`.
fn event_segments(dir: &Path) -> Vec<PathBuf> {
    files_under(&dir.join("bus").join("events"), "log")
}

/// A frame of the log, read with the layout the log documents: `[len u32][crc u32]
/// [offset u64][timestamp i64][key_len u32][key][payload]`, little endian.
struct Frame {
    start: usize,
    end: usize,
    payload: std::ops::Range<usize>,
}

fn frames(data: &[u8]) -> Vec<Frame> {
    let u32_at = |p: usize| u32::from_le_bytes(data[p..p + 4].try_into().unwrap()) as usize;
    let mut out = Vec::new();
    let mut pos = 0;
    while pos + 8 <= data.len() {
        let len = u32_at(pos);
        let key_len = u32_at(pos + 8 + 16);
        let payload = pos + 8 + 20 + key_len..pos + 8 + len;
        out.push(Frame {
            start: pos,
            end: pos + 8 + len,
            payload,
        });
        pos += 8 + len;
    }
    out
}

fn event_id(payload: &[u8]) -> String {
    let v: Value = serde_json::from_slice(payload).unwrap();
    v["event_id"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_bus_records_cost_only_themselves() {
    let data = tempfile::tempdir().unwrap();
    let bin = Path::new(env!("CARGO_BIN_EXE_digame"));
    let keys = ("DIGAME_INGEST_KEYS", "acme-key-0123456789abcdef:acme");
    // Small segments, so that faults land in sealed segments as well as active ones.
    let small = ("DIGAME_BUS__SEGMENT_BYTES", "20000");
    // The events are on fixed dates (their bytes are searched for below): a horizon of ten
    // years keeps them acceptable whatever today is.
    let horizon = ("DIGAME_INGEST__HORIZON_DAYS", "3650");
    let mut ingest_only = DigameProcess::start(
        bin,
        data.path(),
        &[keys, small, horizon, ("DIGAME_PIPELINE__ENABLED", "false")],
    )
    .await
    .unwrap();
    let client = ingest_only.client(KEY);
    for r in 0..REQUESTS {
        let batch: Vec<Value> = (0..PER_REQUEST)
            .map(|i| event(r * PER_REQUEST + i))
            .collect();
        let (status, body) = client.post_events(&batch).await.unwrap();
        assert_eq!(status, 200, "{body}");
    }
    let exit = ingest_only.terminate().await.unwrap();
    assert!(exit.success(), "{exit}");

    // ---- Faults, seeded: in three segments, a flipped byte in one record's payload; in a
    // fourth, a zeroed block from inside one record to inside the next but one.
    let mut segments = event_segments(data.path());
    assert!(segments.len() >= 16, "{segments:?}");
    let mut next = seeded(0x2545_f491_4f6c_dd1d);
    // Segments with room for a fault (a segment just rolled may be empty).
    segments.retain(|s| frames(&std::fs::read(s).unwrap()).len() >= 4);
    for i in (1..segments.len()).rev() {
        segments.swap(i, next(i + 1));
    }
    let mut lost: BTreeSet<String> = BTreeSet::new();
    let mut faults = 0;
    for (i, seg) in segments.iter().take(4).enumerate() {
        let mut bytes = std::fs::read(seg).unwrap();
        let fr = frames(&bytes);
        assert!(fr.len() >= 4, "{}: {} frames", seg.display(), fr.len());
        let at = next(fr.len() - 3);
        if i < 3 {
            let f = &fr[at];
            lost.insert(event_id(&bytes[f.payload.clone()]));
            let byte = f.payload.start + next(f.payload.len());
            bytes[byte] ^= 1 << next(8);
        } else {
            for f in &fr[at..at + 3] {
                lost.insert(event_id(&bytes[f.payload.clone()]));
            }
            let (from, to) = (fr[at].start + 5, fr[at + 2].end - 5);
            bytes[from..to].fill(0);
        }
        std::fs::write(seg, bytes).unwrap();
        faults += 1;
    }
    assert_eq!(lost.len(), 6);

    // `digame scrub` finds each fault, read-only, and exits 2.
    let scrub = std::process::Command::new(bin)
        .args(["scrub", "--data-dir"])
        .arg(data.path())
        .output()
        .unwrap();
    assert_eq!(scrub.status.code(), Some(2), "{scrub:?}");
    let report: Value = serde_json::from_slice(&scrub.stdout).unwrap();
    let damaged: BTreeSet<String> = report["damaged_ranges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            assert_eq!(r["kind"], "middle", "{r}");
            r["segment"].as_str().unwrap().to_string()
        })
        .collect();
    let hit: BTreeSet<String> = segments[..4]
        .iter()
        .map(|s| s.display().to_string())
        .collect();
    assert_eq!(damaged, hit, "{report}");
    // Every event record but the lost ones (the other topics are empty: no pipeline ran).
    assert_eq!(
        report["records"],
        json!(REQUESTS * PER_REQUEST - lost.len()),
        "{report}"
    );

    let mut server = DigameProcess::start(bin, data.path(), &[keys, small, horizon])
        .await
        .unwrap();
    let client = server.client(KEY);
    let acknowledged = REQUESTS * PER_REQUEST;
    let kept = acknowledged - lost.len();
    client
        .await_rows(
            "SELECT count(*) AS n, count(DISTINCT event_id) AS d FROM events",
            &[json!({"n": kept, "d": kept})],
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    // Exactly the undamaged ones.
    let stored: BTreeSet<String> = client
        .rows("SELECT event_id FROM events")
        .await
        .unwrap()
        .iter()
        .map(|r| r["event_id"].as_str().unwrap().to_string())
        .collect();
    let expected: BTreeSet<String> = (0..acknowledged)
        .map(|n| event(n)["event_id"].as_str().unwrap().to_string())
        .filter(|id| !lost.contains(id))
        .collect();
    assert_eq!(stored, expected);
    // Counted in the features, once each.
    client
        .await_rows(
            "SELECT sum(value) AS n FROM features WHERE feature = 'event_count' \
             AND granularity = 'day' AND dimension = ''",
            &[json!({"n": kept as f64})],
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    // Ready, caught up, and saying what was set aside.
    let (status, ready) = client.get("/readyz").await.unwrap();
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["pipeline"]["lag_records"], 0, "{ready}");
    let detail = ready["bus"]["detail"].as_str().unwrap();
    assert!(detail.contains("damaged bytes quarantined"), "{detail}");
    // The bus counts the records it lost as the damage's own accounting does: none had
    // been processed (the pipeline was off when they were acknowledged).
    assert_eq!(
        ready["bus"]["lost_records"],
        json!({"processed": 0, "unprocessed": lost.len()}),
        "{ready}"
    );
    let partitions: BTreeSet<PathBuf> = event_segments(data.path())
        .iter()
        .map(|s| s.parent().unwrap().to_path_buf())
        .collect();
    let quarantine_files = partitions
        .iter()
        .filter_map(|p| std::fs::read_dir(p.join("quarantine")).ok())
        .map(|d| d.count())
        .sum::<usize>();
    // One copy per damaged range (the bytes read twice, by recovery and a reader, once).
    assert_eq!(quarantine_files, faults);

    // New events flow and count, on offsets of their own.
    let more: Vec<Value> = (acknowledged..acknowledged + PER_REQUEST)
        .map(event)
        .collect();
    let (status, body) = client.post_events(&more).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let total = kept + PER_REQUEST;
    client
        .await_rows(
            "SELECT count(*) AS n FROM events",
            &[json!({"n": total})],
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    // ---- A store file cut short by 10 bytes: quarantined at the next start; the tenant's
    // reads go on over the other files (before, every read of the tenant failed), and its
    // events are rebuilt from the bus.
    let exit = server.terminate().await.unwrap();
    assert!(exit.success(), "{exit}");
    let parquet = files_under(&data.path().join("store").join("events"), "parquet");
    assert!(!parquet.is_empty(), "{parquet:?}");
    let victim = &parquet[next(parquet.len())];
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(victim)
        .unwrap();
    f.set_len(f.metadata().unwrap().len() - 10).unwrap();
    drop(f);
    server.restart().await.unwrap();
    let client = server.client(KEY);
    let rows = client
        .rows("SELECT count(*) AS n FROM events")
        .await
        .unwrap();
    assert!(rows[0]["n"].as_u64().unwrap() as usize <= total, "{rows:?}");
    assert!(!victim.exists());
    let name = victim.file_name().unwrap().to_str().unwrap().to_string();
    let repaired = digame_testkit::eventually(Duration::from_secs(60), || async {
        let (_, ready) = client.get("/readyz").await?;
        Ok(ready["store"]["repaired"].as_array().and_then(|r| {
            r.iter()
                .find(|d| d["file"].as_str().is_some_and(|f| f.ends_with(&name)))
                .cloned()
        }))
    })
    .await
    .unwrap();
    client
        .await_rows(
            "SELECT count(*) AS n FROM events",
            &[json!({"n": total})],
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    eprintln!(
        "faults: a store file cut short, quarantined and rebuilt: {} rows from the bus, lost {}; all {total} events read again",
        repaired["repair"]["rows_rebuilt"], repaired["repair"]["lost"]
    );
    eprintln!(
        "faults: {faults} injected, {acknowledged} acknowledged, {kept} counted, {} lost (all in damaged bytes), {quarantine_files} quarantined ranges",
        lost.len()
    );
    let exit = server.terminate().await.unwrap();
    assert!(exit.success(), "{exit}");
}

/// Concurrent loaders, each sending its own batches and retrying one until it is
/// acknowledged (across kills and restarts), as an offline queue does.
struct Load {
    acknowledged: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    loaders: Vec<tokio::task::JoinHandle<usize>>,
    batch: usize,
}

impl Load {
    fn start(
        server: &DigameProcess,
        loaders: usize,
        batch: usize,
        ev: impl Fn(usize) -> Value + Copy + Send + 'static,
    ) -> Load {
        let acknowledged = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let handles = (0..loaders)
            .map(|l| {
                let client = server.client(KEY);
                let (acknowledged, stop) = (acknowledged.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut sent = 0;
                    for b in (l..).step_by(loaders) {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let events: Vec<Value> = (b * batch..(b + 1) * batch).map(ev).collect();
                        loop {
                            match client.post_events(&events).await {
                                Ok((200, _)) => break,
                                _ => tokio::time::sleep(Duration::from_millis(50)).await,
                            }
                        }
                        sent += 1;
                        acknowledged.fetch_add(batch, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(15)).await;
                    }
                    sent
                })
            })
            .collect();
        Load {
            acknowledged,
            stop,
            loaders: handles,
            batch,
        }
    }

    /// Stops the loaders after their batch in flight; the events acknowledged.
    async fn finish(self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        let mut batches = 0;
        for l in self.loaders {
            batches += l.await.unwrap();
        }
        let acknowledged = self.acknowledged.load(Ordering::Relaxed);
        assert_eq!(acknowledged, batches * self.batch);
        acknowledged
    }
}

/// Once `/readyz` says nothing is uncounted, everything acknowledged is stored and
/// counted, once (within a few flushes: windows a repair asked the pipeline to emit
/// again are written at its next flush).
async fn assert_counted_once(server: &DigameProcess, acknowledged: usize) {
    let client = server.client(KEY);
    digame_testkit::eventually(Duration::from_secs(90), || async {
        let (status, ready) = client.get("/readyz").await?;
        Ok((status == 200 && ready["pipeline"]["uncounted"] == 0).then_some(()))
    })
    .await
    .unwrap();
    let expected =
        vec![json!({"n": acknowledged, "d": acknowledged, "counted": acknowledged as f64})];
    let counts = || async {
        client
            .rows(
                "SELECT count(*) AS n, count(DISTINCT event_id) AS d, \
                 (SELECT sum(value) FROM features WHERE feature = 'event_count' \
                  AND granularity = 'day' AND dimension = '') AS counted FROM events",
            )
            .await
            .unwrap()
    };
    let settled = digame_testkit::eventually(Duration::from_secs(10), || async {
        Ok((counts().await == expected).then_some(()))
    })
    .await;
    if settled.is_err() {
        assert_eq!(counts().await, expected);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_checkpoints_are_rebuilt_from_the_store_under_load() {
    const ROUNDS: usize = 4;
    const BATCH: usize = 20;
    const LOADERS: usize = 3;
    let data = tempfile::tempdir().unwrap();
    // Checkpoints often, so every kill finds one to damage.
    let mut server = start_checkpointing_often(data.path()).await;
    let base = chrono::Utc::now().timestamp_millis() - 2 * 86_400_000;
    let ev = move |n: usize| commit("cb00", n, 11, base + (n as i64) * 1_000);
    let load = Load::start(&server, LOADERS, BATCH, ev);
    let checkpoints = data.path().join("pipeline").join("features");
    let mut next = seeded(0x9e37_79b9_7f4a_7c15);
    let mut damaged = Vec::new();
    for round in 0..ROUNDS {
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        server.kill9().await.unwrap();
        let files = files_under(&checkpoints, "bin")
            .into_iter()
            .filter(|f| !f.starts_with(checkpoints.join("quarantine")))
            .collect::<Vec<_>>();
        assert!(!files.is_empty(), "no checkpoint after round {round}");
        let victim = files[next(files.len())].clone();
        let mut bytes = std::fs::read(&victim).unwrap();
        if round % 2 == 0 {
            let at = next(bytes.len());
            bytes[at] ^= 1 << next(8);
        } else {
            bytes.truncate(next(bytes.len()));
        }
        std::fs::write(&victim, bytes).unwrap();
        let partition = victim.file_stem().unwrap().to_str().unwrap()[1..].to_string();
        damaged.push(partition.clone());
        server.restart().await.unwrap();
        // The restart says which checkpoint it set aside.
        let client = server.client(KEY);
        let notices = client
            .pipeline_notices(Duration::from_secs(30))
            .await
            .unwrap();
        let notice = &notices[0];
        assert!(
            notice.starts_with(&format!("events/{partition}: checkpoint unusable")),
            "{notice}"
        );
    }
    let acknowledged = load.finish().await;
    let quarantined = files_under(&checkpoints.join("quarantine"), "bin").len();
    assert_eq!(
        quarantined, ROUNDS,
        "one damaged checkpoint moved aside per round"
    );

    assert_counted_once(&server, acknowledged).await;
    eprintln!(
        "faults: {ROUNDS} kills under load, each with a damaged checkpoint (partitions {damaged:?}); \
         {acknowledged} acknowledged, {acknowledged} counted once, {quarantined} checkpoints quarantined, 0 lost"
    );
    let exit = server.terminate().await.unwrap();
    assert!(exit.success(), "{exit}");
}

/// The `(table, tenant_id=…, date=…)` directories a store file sits in.
fn store_place(file: &Path) -> (String, String, String) {
    let name = |p: &Path| p.file_name().unwrap().to_str().unwrap().to_string();
    let date_dir = file.parent().unwrap();
    let tenant_dir = date_dir.parent().unwrap();
    (
        name(tenant_dir.parent().unwrap()),
        name(tenant_dir)
            .trim_start_matches("tenant_id=")
            .to_string(),
        name(date_dir).trim_start_matches("date=").to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_store_files_are_rebuilt_from_the_bus_under_load() {
    const ROUNDS: usize = 4;
    const BATCH: usize = 20;
    const LOADERS: usize = 3;
    let data = tempfile::tempdir().unwrap();
    let bin = Path::new(env!("CARGO_BIN_EXE_digame"));
    let env = [
        ("DIGAME_INGEST_KEYS", "acme-key-0123456789abcdef:acme"),
        ("DIGAME_PIPELINE__FLUSH_INTERVAL_MS", "100"),
        // Compaction all along, so damage also meets files it merges and retires.
        ("DIGAME_STORE__COMPACTION_INTERVAL_SECS", "1"),
        ("DIGAME_STORE__COMPACTION_MIN_FILES", "3"),
    ];
    let mut server = DigameProcess::start(bin, data.path(), &env).await.unwrap();
    // Events over three days (one every 30 s of event time, wrapping round), so files of
    // several dates are there to damage.
    let base = chrono::Utc::now().timestamp_millis() - 3 * 86_400_000;
    let ev = move |n: usize| {
        let at = base + (n as i64 * 30_000) % (3 * 86_400_000 - 3_600_000);
        commit("5707", n, 11, at)
    };
    let load = Load::start(&server, LOADERS, BATCH, ev);
    let store = data.path().join("store");
    let mut next = seeded(0x2545_f491_4f6c_dd1d);
    let mut damaged = Vec::new();
    let seen_unready = Arc::new(AtomicUsize::new(0));
    for round in 0..ROUNDS {
        tokio::time::sleep(Duration::from_millis(2_000)).await;
        server.kill9().await.unwrap();
        let mut files = files_under(&store.join("events"), "parquet");
        files.extend(files_under(&store.join("features"), "parquet"));
        assert!(!files.is_empty(), "no store file after round {round}");
        let victim = files[next(files.len())].clone();
        let mut bytes = std::fs::read(&victim).unwrap();
        if round % 2 == 0 {
            let at = next(bytes.len());
            bytes[at] ^= 1 << next(8);
        } else {
            bytes.truncate(next(bytes.len()));
        }
        std::fs::write(&victim, bytes).unwrap();
        let (table, tenant, date) = store_place(&victim);
        let name = victim.file_name().unwrap().to_str().unwrap().to_string();
        damaged.push(format!("{table}/{date}"));
        server.restart().await.unwrap();
        // `/readyz` tells the truth throughout: not ready while the range is damaged,
        // and once rebuilt it names the file, the range, and that nothing was lost.
        let client = server.client(KEY);
        let repaired = digame_testkit::eventually(Duration::from_secs(60), || async {
            let seen_unready = &seen_unready;
            let Ok((status, ready)) = client.get("/readyz").await else {
                return Ok(None);
            };
            let pending = ready["store"]["damaged"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if !pending.is_empty() {
                assert_eq!(status, 503, "damage pending yet ready: {ready}");
                assert!(
                    ready["reasons"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|r| r.as_str().unwrap().starts_with("store: ")),
                    "{ready}"
                );
                seen_unready.fetch_add(1, Ordering::Relaxed);
            }
            Ok(ready["store"]["repaired"]
                .as_array()
                .and_then(|r| {
                    r.iter()
                        .find(|d| d["file"].as_str().is_some_and(|f| f.ends_with(&name)))
                })
                .cloned())
        })
        .await
        .unwrap();
        assert_eq!(
            (&repaired["table"], &repaired["tenant"], &repaired["date"]),
            (&json!(table), &json!(tenant), &json!(date)),
            "{repaired}"
        );
        assert_eq!(repaired["repair"]["lost"], 0, "{repaired}");
        assert!(
            repaired["file"]
                .as_str()
                .unwrap()
                .contains(&format!("/quarantine/{table}/")),
            "{repaired}"
        );
    }
    let acknowledged = load.finish().await;
    let quarantined = files_under(&store.join("quarantine"), "parquet").len();
    assert_eq!(
        quarantined, ROUNDS,
        "one damaged file quarantined per round"
    );

    assert_counted_once(&server, acknowledged).await;
    eprintln!(
        "faults: {ROUNDS} kills under load, each with a damaged store file ({damaged:?}); \
         {acknowledged} acknowledged, {acknowledged} counted once, {quarantined} files quarantined \
         and rebuilt, 0 lost; /readyz answered 503 with the range {} times meanwhile",
        seen_unready.load(Ordering::Relaxed)
    );
    let exit = server.terminate().await.unwrap();
    assert!(exit.success(), "{exit}");
}

/// Bus damage and checkpoint damage at once, the case a replay of the bus cannot rebuild:
/// records processed and stored before a byte of them flipped are gone from the log, and
/// the checkpoint that held their effect on the state is unusable. The state comes back
/// from the stored raw events, so nothing acknowledged goes uncounted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_bus_and_checkpoint_together_are_rebuilt_from_the_store() {
    let data = tempfile::tempdir().unwrap();
    let mut server = start_checkpointing_often(data.path()).await;
    let client = server.client(KEY);
    // Two days of event time up to an hour ago, seven people.
    let base = chrono::Utc::now().timestamp_millis() - 2 * 86_400_000;
    let ev = move |n: usize| commit("b0c0", n, 7, base + (n as i64) * 60_000);
    for r in 0..REQUESTS {
        let batch: Vec<Value> = (r * PER_REQUEST..(r + 1) * PER_REQUEST).map(ev).collect();
        let (status, body) = client.post_events(&batch).await.unwrap();
        assert_eq!(status, 200, "{body}");
    }
    let acknowledged = REQUESTS * PER_REQUEST;
    assert_counted_once(&server, acknowledged).await;
    let exit = server.terminate().await.unwrap();
    assert!(exit.success(), "{exit}");

    // ---- Faults, seeded: in the active segment of one partition (which recovery scans
    // at start), a flipped byte in one processed record's payload; and that partition's
    // checkpoint cut short.
    let mut next = seeded(0x5851_f42d_4c95_7f2d);
    let segments = event_segments(data.path());
    // Each partition's active segment (the last), where it holds a few records.
    let mut active: Vec<PathBuf> = segments
        .iter()
        .map(|s| s.parent().unwrap().to_path_buf())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .filter_map(|p| segments.iter().rfind(|s| s.starts_with(&p)).cloned())
        .filter(|s| frames(&std::fs::read(s).unwrap()).len() >= 3)
        .collect();
    assert!(!active.is_empty(), "{segments:?}");
    let segment = active.swap_remove(next(active.len()));
    let partition: u32 = segment
        .parent()
        .unwrap()
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let mut bytes = std::fs::read(&segment).unwrap();
    let fr = frames(&bytes);
    let f = &fr[1 + next(fr.len() - 2)];
    let lost_id = event_id(&bytes[f.payload.clone()]);
    let byte = f.payload.start + next(f.payload.len());
    bytes[byte] ^= 1 << next(8);
    std::fs::write(&segment, bytes).unwrap();
    let checkpoint = data
        .path()
        .join("pipeline")
        .join("features")
        .join(format!("p{partition}.bin"));
    let mut bytes = std::fs::read(&checkpoint).unwrap();
    bytes.truncate(bytes.len() / 2);
    std::fs::write(&checkpoint, bytes).unwrap();

    server.restart().await.unwrap();
    let client = server.client(KEY);
    // Everything acknowledged is still stored and counted once: the lost record's event
    // among them (it was stored before its bytes flipped).
    assert_counted_once(&server, acknowledged).await;
    let rows = client
        .rows(&format!(
            "SELECT count(*) AS n FROM events WHERE event_id = '{lost_id}'"
        ))
        .await
        .unwrap();
    assert_eq!(rows, vec![json!({"n": 1})]);
    let (status, ready) = client.get("/readyz").await.unwrap();
    assert_eq!(status, 200, "{ready}");
    assert_eq!(
        ready["bus"]["lost_records"],
        json!({"processed": 1, "unprocessed": 0}),
        "{ready}"
    );
    let notices: Vec<String> = ready["pipeline"]["notices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap().to_string())
        .collect();
    assert_eq!(notices.len(), 2, "{notices:?}");
    assert!(
        notices[0].starts_with(&format!("events/{partition}: checkpoint unusable")),
        "{notices:?}"
    );
    assert!(
        notices[1].starts_with(&format!(
            "events/{partition}: no usable checkpoint; state of "
        )),
        "{notices:?}"
    );

    // New events for the same people and days count on top of the rebuilt state.
    let more: Vec<Value> = (acknowledged..acknowledged + PER_REQUEST)
        .map(|n| ev(n - acknowledged / 2))
        .map(|mut e| {
            let n = e["event_id"].as_str().unwrap().to_string();
            e["event_id"] = json!(n.replace("-b0c0-", "-b0c1-"));
            e
        })
        .collect();
    let (status, body) = client.post_events(&more).await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_counted_once(&server, acknowledged + PER_REQUEST).await;
    eprintln!(
        "faults: a processed record of partition {partition} lost from the bus and its checkpoint cut; \
         {} acknowledged, all counted once; {}",
        acknowledged + PER_REQUEST,
        notices[1]
    );
    let exit = server.terminate().await.unwrap();
    assert!(exit.success(), "{exit}");
}
