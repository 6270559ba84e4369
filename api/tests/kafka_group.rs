//! Pipeline workers as a Kafka consumer group, against the real broker the test script
//! starts: two workers sharing the partitions produce exactly the feature rows that one
//! worker on the embedded bus produces from the same events.

use std::path::Path;
use std::time::Duration;

use chrono::{Days, Utc};
use digame_testkit::{Bus, DigameProcess, EVENT_COUNTS_BY_USER, eventually, utc_ms};
use serde_json::{Value, json};

const KEY: &str = "acme-key-0123456789abcdef";
const MIN: i64 = 60_000;
const USERS: usize = 24;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_digame"))
}

/// Per user: 8 five-minute Code/Slack focus blocks from 09:00 with not-AFK cover and a
/// commit in each, with fixed ids: 17 events per user.
fn events() -> Vec<Value> {
    let day = Utc::now()
        .date_naive()
        .checked_sub_days(Days::new(1))
        .unwrap();
    let mut out = Vec::new();
    let mut n = 0u64;
    let mut id = || {
        n += 1;
        format!("0195a6a4-0000-7000-8000-{n:012x}")
    };
    for u in 0..USERS {
        let user = format!("user-{u:02}");
        let start = utc_ms(day, 9, 0) + (u as i64) * MIN;
        out.push(
            json!({"event_id": id(), "user_id": user, "source": "aw", "kind": "afk",
            "timestamp": start, "duration_ms": 40 * MIN, "attributes": {"status": "not-afk"}}),
        );
        for b in 0..8 {
            let t = start + b * 5 * MIN;
            let app = if b % 3 == 2 { "Slack" } else { "Code" };
            out.push(json!({"event_id": id(), "user_id": user, "source": "aw",
                "kind": "window_focus", "timestamp": t, "duration_ms": 5 * MIN,
                "attributes": {"app": app, "title": "work"}}));
            out.push(json!({"event_id": id(), "user_id": user, "source": "git",
                "kind": "commit", "timestamp": t + MIN, "attributes": {"project": "p"}}));
        }
    }
    out
}

const ROWS: &str = "SELECT user_id, granularity, window_start, feature, dimension, value \
    FROM features ORDER BY user_id, granularity, window_start, feature, dimension";

const COUNTED: &str = "SELECT sum(value) AS n FROM features \
    WHERE feature = 'event_count' AND granularity = 'day' AND dimension = ''";

async fn settled(server: &DigameProcess, total: usize) -> Vec<Value> {
    let client = server.client(KEY);
    eventually(Duration::from_secs(60), || async {
        let n = client.rows(COUNTED).await?;
        Ok((n == vec![json!({"n": total as f64})]).then_some(()))
    })
    .await
    .unwrap_or_else(|_| panic!("features never covered all {total} events"));
    client.rows(ROWS).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_in_a_group_produce_the_rows_of_one() {
    let events = events();
    let env = [
        ("DIGAME_INGEST_KEYS", "acme-key-0123456789abcdef:acme"),
        ("DIGAME_PIPELINE__ALLOWED_LATENESS_SECS", "3600"),
    ];

    // Reference: one process on the embedded bus.
    let one_dir = tempfile::tempdir().unwrap();
    let one = DigameProcess::start(bin(), one_dir.path(), &env)
        .await
        .unwrap();
    let (status, _) = one.client(KEY).post_events(&events).await.unwrap();
    assert_eq!(status, 200);
    let reference = settled(&one, events.len()).await;
    drop(one);
    assert!(reference.len() > USERS * 10, "{} rows", reference.len());

    // Two workers on Kafka sharing one store: `serve` (ingest + a worker) and a
    // `pipeline` worker; the group splits the 8 partitions between them.
    let bus = Bus::kafka();
    let shared = tempfile::tempdir().unwrap();
    let serve = DigameProcess::start_on(bin(), shared.path(), &env, &bus)
        .await
        .unwrap();
    let worker = DigameProcess::start_command(bin(), "pipeline", shared.path(), &env, &bus)
        .await
        .unwrap();
    // Let the group settle with both members before any event is published.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (status, body) = serve.client(KEY).post_events(&events).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let two = settled(&serve, events.len()).await;

    let processed = r#"digame_pipeline_events_total{result="processed"}"#;
    let by_worker = worker.metric(processed).await.unwrap();
    let by_serve = serve.metric(processed).await.unwrap();
    assert!(
        by_worker > 0.0 && by_serve > 0.0,
        "both members must take part: serve {by_serve}, worker {by_worker}"
    );
    assert_eq!(by_worker + by_serve, events.len() as f64);
    assert_eq!(two, reference);
}

/// The project's broker script, to run a broker of this test's own.
fn kafka_script() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../infra/scripts/kafka")
}

fn broker(action: &str, dir: &Path, port: u16) {
    let out = std::process::Command::new(kafka_script())
        .arg(action)
        .arg(dir)
        .arg(port.to_string())
        .output()
        .expect("run infra/scripts/kafka");
    assert!(
        out.status.success(),
        "kafka {action}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Stops the broker of this test even when an assertion fails.
struct BrokerGuard<'a>(&'a Path);

impl Drop for BrokerGuard<'_> {
    fn drop(&mut self) {
        let _ = std::process::Command::new(kafka_script())
            .arg("stop")
            .arg(self.0)
            .status();
    }
}

/// A broker restart while events flow: ingest answers 503 with Retry-After while no
/// broker is reachable, a client retrying those requests gets every event in, nothing
/// acknowledged is lost or counted twice, and processing resumes by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_loses_nothing_acknowledged() {
    // Fail (not skip) without the broker the test script installs.
    let Bus::Kafka { prefix, .. } = Bus::kafka() else {
        unreachable!()
    };
    let dir = tempfile::tempdir().unwrap();
    let broker_dir = dir.path().join("kafka");
    let port = digame_testkit::free_port();
    broker("start", &broker_dir, port);
    let _guard = BrokerGuard(&broker_dir);
    let bus = Bus::Kafka {
        bootstrap: format!("127.0.0.1:{port}"),
        prefix,
    };
    let env = [
        ("DIGAME_INGEST_KEYS", "acme-key-0123456789abcdef:acme"),
        ("DIGAME_BUS__DELIVERY_TIMEOUT_MS", "60000"),
    ];
    let data = dir.path().join("digame");
    let server = DigameProcess::start_on(bin(), &data, &env, &bus)
        .await
        .unwrap();
    let client = server.client(KEY);
    let day = Utc::now()
        .date_naive()
        .checked_sub_days(Days::new(1))
        .unwrap();
    let users = ["u0", "u1", "u2", "u3"];
    let request = |r: usize| -> Vec<Value> {
        (0..100)
            .map(|i| {
                let n = r * 100 + i;
                json!({"event_id": format!("0195a6a4-0000-7000-8000-{n:012x}"),
                       "user_id": users[i % users.len()], "source": "git", "kind": "commit",
                       "timestamp": utc_ms(day, 10, 0) + (n as i64) * 100,
                       "attributes": {"project": "p"}})
            })
            .collect()
    };
    let requests = 16;
    let mut unavailable = 0;
    let mut saw_not_ready = false;
    for r in 0..requests {
        if r == 5 {
            broker("stop", &broker_dir, port);
        }
        loop {
            let (status, body) = client.post_events(&request(r)).await.unwrap();
            if status == 200 {
                assert_eq!(body["accepted"], 100, "{body}");
                break;
            }
            assert_eq!(status, 503, "{body}");
            assert_eq!(body["error"]["code"], "bus_unavailable", "{body}");
            unavailable += 1;
            if !saw_not_ready {
                let (status, ready) = client.get("/readyz").await.unwrap();
                saw_not_ready = status == 503 && ready["bus"]["ok"] == false;
            }
            if unavailable == 5 {
                broker("start", &broker_dir, port);
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    assert!(
        unavailable >= 5,
        "ingest never refused while the broker was down"
    );
    assert!(saw_not_ready, "/readyz never reported the bus down");

    let total = requests * 100;
    let per_user = (total / users.len()) as f64;
    let expected: Vec<Value> = users
        .iter()
        .map(|u| json!({"user_id": u, "n": per_user}))
        .collect();
    client
        .await_rows(EVENT_COUNTS_BY_USER, &expected, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(
        client
            .rows("SELECT count(DISTINCT event_id) AS d FROM events")
            .await
            .unwrap(),
        vec![json!({"d": total})]
    );
}
