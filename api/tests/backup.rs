//! `digame backup` under load and `digame restore` into a new directory, through the real
//! binary. Concurrent loaders keep sending while the backup is taken; the restored server
//! replays what its copy holds, the loaders' retries (every acknowledged batch sent again,
//! as clients whose answers were lost would) bring the rest, and its results equal the
//! source's: the same events, the same feature values.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use digame_testkit::DigameProcess;
use serde_json::{Value, json};

const KEY: &str = "acme-key-0123456789abcdef";
const BATCH: usize = 25;

fn batch(base: i64, b: usize) -> Vec<Value> {
    (b * BATCH..(b + 1) * BATCH)
        .map(|n| {
            json!({"event_id": format!("0195a6a4-0000-7000-bacc-{n:012x}"),
                   "user_id": format!("u{}", n % 9), "source": "git", "kind": "commit",
                   "timestamp": base + (n as i64) * 7_000,
                   "attributes": {"project": format!("p{}", n % 3)}})
        })
        .collect()
}

/// Waits until `/readyz` says every acknowledged event is counted.
async fn settled(client: &digame_testkit::Client) {
    digame_testkit::eventually(Duration::from_secs(90), || async {
        let (status, ready) = client.get("/readyz").await?;
        Ok((status == 200 && ready["pipeline"]["uncounted"] == 0).then_some(()))
    })
    .await
    .unwrap();
}

/// Runs `digame <command> --data-dir <data> <flag> <dir>`.
fn digame(bin: &Path, command: &str, data: &Path, flag: &str, dir: &Path) -> std::process::Output {
    std::process::Command::new(bin)
        .arg(command)
        .arg("--data-dir")
        .arg(data)
        .arg(flag)
        .arg(dir)
        .output()
        .unwrap()
}

const RESULTS: [&str; 2] = [
    "SELECT user_id, count(*) AS n, count(DISTINCT event_id) AS d FROM events \
     GROUP BY user_id ORDER BY user_id",
    "SELECT user_id, feature, dimension, granularity, window_start, value FROM features \
     ORDER BY user_id, feature, dimension, granularity, window_start",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_under_load_restores_to_the_same_results() {
    let dirs = tempfile::tempdir().unwrap();
    let (source_dir, backup_dir, restored_dir) = (
        dirs.path().join("source"),
        dirs.path().join("backup"),
        dirs.path().join("restored"),
    );
    let bin = Path::new(env!("CARGO_BIN_EXE_digame"));
    let env = [
        ("DIGAME_INGEST_KEYS", "acme-key-0123456789abcdef:acme"),
        ("DIGAME_PIPELINE__CHECKPOINT_INTERVAL_MS", "200"),
        ("DIGAME_PIPELINE__FLUSH_INTERVAL_MS", "100"),
        // Small segments and files: the backup meets rolls, several files, compaction.
        ("DIGAME_BUS__SEGMENT_BYTES", "50000"),
    ];
    let mut source = DigameProcess::start(bin, &source_dir, &env).await.unwrap();
    let base = chrono::Utc::now().timestamp_millis() - 3 * 86_400_000;
    let stop = Arc::new(AtomicBool::new(false));
    let mut loaders = Vec::new();
    for l in 0..2usize {
        let client = source.client(KEY);
        let stop = stop.clone();
        loaders.push(tokio::spawn(async move {
            let mut sent = Vec::new();
            for b in (l..).step_by(2) {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let (status, body) = client.post_events(&batch(base, b)).await.unwrap();
                assert_eq!(status, 200, "{body}");
                sent.push(b);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            sent
        }));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let out = digame(bin, "backup", &source_dir, "--to", &backup_dir);
    assert!(out.status.success(), "{out:?}");
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let mut sent = Vec::new();
    for l in loaders {
        sent.extend(l.await.unwrap());
    }
    let client = source.client(KEY);
    settled(&client).await;
    let mut want = Vec::new();
    for q in RESULTS {
        want.push(client.rows(q).await.unwrap());
    }
    let total: u64 = want[0].iter().map(|r| r["n"].as_u64().unwrap()).sum();
    assert_eq!(total as usize, sent.len() * BATCH);
    source.terminate().await.unwrap();

    // A new directory that holds anything is refused; an empty one is restored.
    let out = digame(bin, "restore", &source_dir, "--from", &backup_dir);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already"),
        "{out:?}"
    );
    let out = digame(bin, "restore", &restored_dir, "--from", &backup_dir);
    assert!(out.status.success(), "{out:?}");
    let restored_report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(restored_report["files"], summary["files"]);

    let mut restored = DigameProcess::start(bin, &restored_dir, &env)
        .await
        .unwrap();
    let client = restored.client(KEY);
    settled(&client).await;
    let held: u64 = client
        .rows("SELECT count(*) AS n FROM events")
        .await
        .unwrap()[0]["n"]
        .as_u64()
        .unwrap();
    assert!(held > 0 && held <= total, "{held} of {total}");
    // The clients send again everything they sent; what the backup held is not counted twice.
    for b in &sent {
        let (status, body) = client.post_events(&batch(base, *b)).await.unwrap();
        assert_eq!(status, 200, "{body}");
    }
    settled(&client).await;
    for (q, want) in RESULTS.iter().zip(&want) {
        assert_eq!(&client.rows(q).await.unwrap(), want, "{q}");
    }
    eprintln!(
        "backup: {} files, {} bytes under load; the restore held {held} of {total} events, replay and retries gave the same results",
        summary["files"], summary["bytes"]
    );
    restored.terminate().await.unwrap();
}
