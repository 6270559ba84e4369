//! Digame on Kafka, against the real broker (tansu) the test script starts: pipeline
//! workers as a consumer group, a broker restart, and an independent client (Python
//! kafka-python) publishing raw events and reading derived topics. Expected values come
//! from the same events run through the embedded bus.

use std::path::Path;
use std::time::Duration;

use chrono::{Days, Utc};
use digame_testkit::{Bus, DigameProcess, EVENT_COUNTS_BY_USER, ScriptServer, eventually, utc_ms};
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

const ENV: [(&str, &str); 2] = [
    ("DIGAME_INGEST_KEYS", "acme-key-0123456789abcdef:acme"),
    ("DIGAME_PIPELINE__ALLOWED_LATENESS_SECS", "3600"),
];

/// The feature rows one process on the embedded bus computes from `events`.
async fn reference_rows(events: &[Value]) -> Vec<Value> {
    let dir = tempfile::tempdir().unwrap();
    let one = DigameProcess::start(bin(), dir.path(), &ENV).await.unwrap();
    let (status, _) = one.client(KEY).post_events(events).await.unwrap();
    assert_eq!(status, 200);
    let rows = settled(&one, events.len()).await;
    assert!(rows.len() > USERS * 10, "{} rows", rows.len());
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_in_a_group_produce_the_rows_of_one() {
    let events = events();
    let env = ENV;
    let reference = reference_rows(&events).await;

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
    let broker = ScriptServer::start("kafka", &broker_dir, port);
    let bus = Bus::Kafka {
        bootstrap: format!("127.0.0.1:{port}"),
        prefix,
    };
    // tansu 0.6.0 panics in its idempotent-producer check ("more or less than one row",
    // tansu-storage lite.rs) when an idempotent producer resumes after the broker
    // restarted, and then refuses every request. What this test checks — 503s while the
    // broker is down, nothing acknowledged lost, recovery — does not depend on producer
    // idempotence (duplicates from retries are removed by event id), so its own broker
    // gets a producer without it. Every other Kafka test runs the idempotent default.
    let config = dir.path().join("digame.toml");
    std::fs::write(&config, "[bus.kafka]\n\"enable.idempotence\" = \"false\"\n").unwrap();
    let env = [
        ("DIGAME_INGEST_KEYS", "acme-key-0123456789abcdef:acme"),
        ("DIGAME_BUS__DELIVERY_TIMEOUT_MS", "60000"),
        ("DIGAME_CONFIG", config.to_str().unwrap()),
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
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    for r in 0..requests {
        if r == 5 {
            broker.run("stop");
        }
        loop {
            assert!(
                std::time::Instant::now() < deadline,
                "ingest still refused request {r} 3 minutes on ({unavailable} 503s); see the broker log in {}",
                broker_dir.display()
            );
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
                broker.run("start");
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
    // Feature rows are written before the raw events they come from: wait for both.
    client
        .await_rows(
            "SELECT count(DISTINCT event_id) AS d FROM events",
            &[json!({"d": total})],
            Duration::from_secs(20),
        )
        .await
        .unwrap();
}

/// The Python interpreter of the virtualenv with kafka-python that the test script makes.
fn python() -> String {
    std::env::var("TEST_PYTHON").unwrap_or_else(|_| {
        panic!(
            "TEST_PYTHON is not set: this test runs kafka-python as an independent client. \
             Run the tests with infra/scripts/test, which creates the virtualenv."
        )
    })
}

/// Runs `tests/interop/kafka_client.py` with `args`, feeding `stdin`; its stdout.
fn kafka_client(args: &[&str], stdin: &[u8]) -> String {
    use std::io::Write;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/kafka_client.py");
    let mut child = std::process::Command::new(python())
        .arg(script)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start kafka_client.py");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "kafka_client.py {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Events published straight to the raw topic by kafka-python in the documented wire
/// format give the features HTTP ingest gives, and kafka-python reads them back from the
/// derived features topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_independent_client_publishes_raw_events_and_reads_features() {
    let events = events();
    let reference = reference_rows(&events).await;

    let bus = Bus::kafka();
    let Bus::Kafka { bootstrap, prefix } = &bus else {
        unreachable!()
    };
    let dir = tempfile::tempdir().unwrap();
    let serve = DigameProcess::start_on(bin(), dir.path(), &ENV, &bus)
        .await
        .unwrap();

    // The wire format of the README: key tenant:user, value the canonical event with
    // tenant_id and event_id.
    let mut input = Vec::new();
    for e in &events {
        let mut value = e.clone();
        value["tenant_id"] = json!("acme");
        let key = format!("acme:{}", e["user_id"].as_str().unwrap());
        input.extend_from_slice(json!({"key": key, "value": value}).to_string().as_bytes());
        input.push(b'\n');
    }
    let raw_topic = format!("{prefix}events");
    let sent = kafka_client(&["publish", bootstrap, &raw_topic], &input);
    assert_eq!(sent.trim(), events.len().to_string());

    let rows = settled(&serve, events.len()).await;
    assert_eq!(rows, reference);

    // Read the derived topic back; keep each row key's highest revision.
    let features_topic = format!("{prefix}features");
    let text = kafka_client(&["consume", bootstrap, &features_topic, "3"], b"");
    let mut latest: std::collections::BTreeMap<String, (i64, Value)> = Default::default();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let row: Value = serde_json::from_str(line).unwrap();
        let key = format!(
            "{}|{}|{}|{}|{}|{}",
            row["user_id"],
            row["granularity"],
            row["window_start"],
            row["feature"],
            row["dimension"],
            row["feature_version"]
        );
        let revision = row["revision"].as_i64().unwrap();
        if latest.get(&key).is_none_or(|(r, _)| revision > *r) {
            latest.insert(key, (revision, row));
        }
    }
    // Same shape and order as the SQL rows; timestamps compared to the second.
    let second = |v: &Value| {
        v.as_str()
            .unwrap_or_default()
            .chars()
            .take(19)
            .collect::<String>()
    };
    let mut from_topic: Vec<Value> = latest
        .into_values()
        .map(|(_, r)| {
            json!({"user_id": r["user_id"], "granularity": r["granularity"],
                   "window_start": second(&r["window_start"]), "feature": r["feature"],
                   "dimension": r["dimension"], "value": r["value"]})
        })
        .collect();
    let key = |v: &Value| {
        (
            v["user_id"].to_string(),
            v["granularity"].to_string(),
            v["window_start"].to_string(),
            v["feature"].to_string(),
            v["dimension"].to_string(),
        )
    };
    from_topic.sort_by_key(key);
    let mut from_sql: Vec<Value> = rows
        .iter()
        .map(|r| {
            let mut r = r.clone();
            r["window_start"] = json!(second(&r["window_start"]));
            r
        })
        .collect();
    from_sql.sort_by_key(key);
    assert_eq!(from_topic.len(), from_sql.len());
    assert_eq!(from_topic, from_sql);
}

/// SIGKILL one of two workers mid-stream and restart it: its partitions move to the other
/// worker and back, restored from their checkpoints, and the final rows equal those of
/// one process on the embedded bus: nothing lost, nothing counted twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_stream_loses_and_duplicates_nothing() {
    let events = events();
    let reference = reference_rows(&events).await;

    let bus = Bus::kafka();
    let shared = tempfile::tempdir().unwrap();
    let serve = DigameProcess::start_on(bin(), shared.path(), &ENV, &bus)
        .await
        .unwrap();
    let mut worker = DigameProcess::start_command(bin(), "pipeline", shared.path(), &ENV, &bus)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let client = serve.client(KEY);
    let processed = r#"digame_pipeline_events_total{result="processed"}"#;
    // 17 events per user; send three users per request.
    let requests: Vec<&[Value]> = events.chunks(17 * 3).collect();
    for (i, chunk) in requests.iter().enumerate() {
        if i == requests.len() / 2 {
            // Kill only once the worker has taken part.
            eventually(Duration::from_secs(20), || async {
                Ok((worker.metric(processed).await? > 0.0).then_some(()))
            })
            .await
            .expect("the worker never processed an event");
            worker.kill9().await.unwrap();
        }
        let (status, body) = client.post_events(chunk).await.unwrap();
        assert_eq!(status, 200, "{body}");
    }
    worker.restart().await.unwrap();
    let rows = settled(&serve, events.len()).await;
    assert_eq!(rows, reference);
}

/// A worker whose checkpoints are gone rebuilds its partitions' state from the stored raw
/// events: on Kafka the group resumes at its committed offset, so a rebuild from the bus
/// would see only what comes after it. Events that arrive after the restart, for the same
/// people and day, count on top of everything before. The partition a person's state is
/// rebuilt into is the one Kafka clients put their key in (checked against kafka-python's
/// view of the records digame published).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_checkpoints_are_rebuilt_from_the_store() {
    let first = events();
    // A further commit per person, on the same day, after the restart.
    let later: Vec<Value> = (0..USERS)
        .map(|u| {
            let mut e = first[u * 17 + 2].clone();
            e["event_id"] = json!(format!("0195a6a4-0000-7000-8001-{u:012x}"));
            e["timestamp"] = json!(e["timestamp"].as_i64().unwrap() + 30_000);
            e
        })
        .collect();
    let all: Vec<Value> = first.iter().chain(&later).cloned().collect();
    let reference = reference_rows(&all).await;

    let bus = Bus::kafka();
    let Bus::Kafka { bootstrap, prefix } = &bus else {
        unreachable!()
    };
    let dir = tempfile::tempdir().unwrap();
    let mut serve = DigameProcess::start_on(bin(), dir.path(), &ENV, &bus)
        .await
        .unwrap();
    let (status, body) = serve.client(KEY).post_events(&first).await.unwrap();
    assert_eq!(status, 200, "{body}");
    settled(&serve, first.len()).await;
    let exit = serve.terminate().await.unwrap();
    assert!(exit.success(), "{exit}");
    let checkpoints = dir.path().join("pipeline").join("features");
    let mut removed = 0;
    for entry in std::fs::read_dir(&checkpoints).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|x| x == "bin") {
            std::fs::remove_file(path).unwrap();
            removed += 1;
        }
    }
    assert!(removed > 0, "no checkpoint written");

    serve.restart().await.unwrap();
    let client = serve.client(KEY);
    // The restarted worker says what it rebuilt (before it takes new records).
    client
        .pipeline_notices(Duration::from_secs(60))
        .await
        .unwrap();
    let (status, body) = client.post_events(&later).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let rows = settled(&serve, all.len()).await;
    assert_eq!(rows, reference);
    let notices = client
        .pipeline_notices(Duration::from_secs(1))
        .await
        .unwrap();
    let rebuilt: usize = notices
        .iter()
        .map(|n| {
            assert!(n.contains(": no usable checkpoint; state of "), "{n}");
            n.split("state of ")
                .nth(1)
                .unwrap()
                .split(' ')
                .next()
                .unwrap()
                .parse::<usize>()
                .unwrap()
        })
        .sum();
    assert_eq!(rebuilt, USERS, "{notices:?}");

    // Where Kafka put each person's records is where their state was rebuilt.
    let placement = kafka_client(
        &["placement", bootstrap, &format!("{prefix}events"), "3"],
        b"",
    );
    let mut seen = 0;
    for line in placement.lines().filter(|l| !l.trim().is_empty()) {
        let r: Value = serde_json::from_str(line).unwrap();
        let key = r["key"].as_str().unwrap();
        assert_eq!(
            r["partition"].as_u64().unwrap() as u32,
            digame_infra::bus::kafka::murmur2_partition(key.as_bytes(), 8),
            "{key}"
        );
        seen += 1;
    }
    assert_eq!(seen, all.len());
    let exit = serve.terminate().await.unwrap();
    assert!(exit.success(), "{exit}");
}

/// The probe behind an exact backlog on Kafka: it sees records acknowledged that no
/// member has polled (the last poll's lag cannot), partitions no member owns, and the
/// group's commits once made. Counts by hand: 7 records over 3 partitions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_progress_probe_sees_records_no_poll_has_read() {
    use digame_infra::bus::kafka::{KafkaBus, KafkaSettings};
    use digame_infra::bus::{EventBus, Record, Topic};
    let Bus::Kafka { bootstrap, prefix } = Bus::kafka() else {
        unreachable!()
    };
    let bus = KafkaBus::connect(KafkaSettings {
        brokers: bootstrap,
        prefix,
        partitions: 3,
        replication: 1,
        delivery_timeout: Duration::from_secs(10),
        extra: Default::default(),
    })
    .await
    .unwrap();
    let mut consumer = bus.subscribe(Topic::Events, "probe").await.unwrap();
    let probe = consumer
        .progress_probe()
        .expect("Kafka answers by round trip");
    let ask = || {
        let probe = probe.clone();
        tokio::task::spawn_blocking(move || probe())
    };
    let before = ask().await.unwrap().unwrap();
    assert_eq!(before.ends.len(), 3, "{before:?}");
    assert_eq!(before.ends.values().sum::<u64>(), 0);

    let records = (0..7)
        .map(|i| Record {
            key: format!("t:user-{i}").into_bytes().into(),
            payload: format!("{{\"n\":{i}}}").into_bytes().into(),
            timestamp_ms: 1_795_000_000_000,
        })
        .collect();
    let positions = bus.publish(Topic::Events, records).await.unwrap();
    let mut ends = std::collections::BTreeMap::from([(0u32, 0u64), (1, 0), (2, 0)]);
    for p in &positions {
        let end = ends.get_mut(&p.partition).unwrap();
        *end = (*end).max(p.offset + 1);
    }
    let unpolled = ask().await.unwrap().unwrap();
    assert_eq!(unpolled.ends, ends, "acknowledged, none polled yet");
    assert!(
        unpolled.committed.values().all(|&c| c == 0),
        "nothing committed: {unpolled:?}"
    );

    // Read everything, commit it: the group's commits reach the ends.
    let mut read = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while read < 7 && std::time::Instant::now() < deadline {
        read += consumer
            .poll(100, Duration::from_millis(500))
            .await
            .unwrap()
            .len();
    }
    assert_eq!(read, 7);
    consumer.commit(&ends).await.unwrap();
    let done = ask().await.unwrap().unwrap();
    assert_eq!((done.ends.clone(), done.committed), (ends.clone(), ends));
    bus.close().await;
}
