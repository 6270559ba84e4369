//! End to end through the real binary: HTTP ingest → durable log → pipeline → Parquet →
//! query API, with two tenants, bad input of every kind, late and duplicate events.
//!
//! The expected feature values are worked out by hand in the comments next to the
//! fixture, from the definitions in docs/features.md.

use std::io::Write;
use std::time::Duration;

use chrono::{Days, NaiveDate, Utc};
use digame_testkit::{
    Bus, DigameProcess, EVENT_COUNTS_BY_USER, TestClickHouse, assert_refused, eventually, utc_ms,
};
use serde_json::{Value, json};

const ACME_KEY: &str = "acme-key-0123456789abcdef";
const GLOBEX_KEY: &str = "globex-key-0123456789abcdef";
const MIN: i64 = 60_000;

fn env() -> Vec<(&'static str, &'static str)> {
    vec![
        (
            "DIGAME_INGEST_KEYS",
            "acme-key-0123456789abcdef:acme,globex-key-0123456789abcdef:globex",
        ),
        ("DIGAME_INGEST__MAX_EVENT_BYTES", "4096"),
        ("DIGAME_INGEST__MAX_BODY_BYTES", "262144"),
        ("DIGAME_INGEST__MAX_DECOMPRESSED_BYTES", "1048576"),
        ("DIGAME_INGEST__MAX_EVENTS_PER_REQUEST", "50"),
        ("DIGAME_PIPELINE__ALLOWED_LATENESS_SECS", "3600"),
    ]
}

struct Day(NaiveDate);

impl Day {
    fn at(&self, hh: u32, mm: u32) -> i64 {
        utc_ms(self.0, hh, mm)
    }

    fn iso(&self, hh: u32, mm: u32) -> String {
        format!("{}T{hh:02}:{mm:02}:00Z", self.0)
    }
}

fn focus(user: &str, start: i64, minutes: i64, app: &str, title: &str) -> Value {
    json!({"user_id": user, "source": "aw-watcher-window", "kind": "window_focus",
           "timestamp": start, "duration_ms": minutes * MIN,
           "attributes": {"app": app, "title": title}})
}

fn not_afk(user: &str, start: i64, minutes: i64) -> Value {
    json!({"user_id": user, "source": "aw-watcher-afk", "kind": "afk",
           "timestamp": start, "duration_ms": minutes * MIN,
           "attributes": {"status": "not-afk"}})
}

fn ndjson(events: &[Value]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in events {
        out.extend_from_slice(e.to_string().as_bytes());
        out.push(b'\n');
    }
    out
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

/// The window of `series` starting at `start`.
fn window(series: &Value, start: &str) -> Value {
    series["windows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["window_start"] == start)
        .cloned()
        .unwrap_or(Value::Null)
}

/// The features and breakdowns of window `w` that `expected` names: this test checks the
/// spine features by hand; `pipelines/tests/it/golden.rs` and the golden end-to-end test
/// check the whole set.
/// Asserts that window `w` has the values `expected` names.
fn assert_like(w: &Value, expected: Value) {
    assert_eq!(
        values_like(w, &expected),
        expected,
        "window {}",
        w["window_start"]
    );
}

fn values_like(w: &Value, expected: &Value) -> Value {
    let pick = |part: &str| {
        let have = &w[part];
        let picked: serde_json::Map<String, Value> = expected[part]
            .as_object()
            .map(|o| {
                o.keys()
                    .map(|k| (k.clone(), have.get(k).cloned().unwrap_or(Value::Null)))
                    .collect()
            })
            .unwrap_or_default();
        Value::Object(picked)
    };
    json!({"features": pick("features"), "breakdowns": pick("breakdowns")})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_day_for_two_tenants_end_to_end() {
    a_day_for_two_tenants(Bus::Embedded, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_day_for_two_tenants_end_to_end_on_kafka() {
    a_day_for_two_tenants(Bus::kafka(), None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_day_for_two_tenants_end_to_end_on_clickhouse() {
    a_day_for_two_tenants(Bus::Embedded, Some(TestClickHouse::from_env())).await;
}

/// The same day, the same assertions, per bus and per store (`None`: embedded Parquet).
async fn a_day_for_two_tenants(bus: Bus, store: Option<TestClickHouse>) {
    let data = tempfile::tempdir().unwrap();
    let mut server = DigameProcess::start_backends(
        std::path::Path::new(env!("CARGO_BIN_EXE_digame")),
        data.path(),
        &env(),
        &bus,
        store.as_ref(),
    )
    .await
    .unwrap();
    let acme = server.client(ACME_KEY);
    let globex = server.client(GLOBEX_KEY);
    let d = Day(Utc::now()
        .date_naive()
        .checked_sub_days(Days::new(1))
        .unwrap());

    // ---- Alice (tenant acme), request 1: a JSON array with three bad events ----------
    // Presence: not-afk 09:00–11:00 ∪ the 11:00–11:30 meeting (Bob attends) = 09:00–11:30.
    // Focus: Code 09:00–09:30, Slack 09:30–09:40, Code 09:40–10:00, YouTube 10:00–10:15,
    //        Code 11:00–11:20 (inside the meeting, so present).
    let commit_id = "0195a6a4-0000-7000-8000-00000000c0de";
    let mut oversize = focus("alice", d.at(9, 5), 1, "Code", &"x".repeat(5000));
    oversize["attributes"]["project"] = json!("digame");
    let oversize_len = oversize.to_string().len();
    let batch1 = vec![
        not_afk("alice", d.at(9, 0), 120),
        focus("alice", d.at(9, 0), 30, "Code", "main.rs"),
        focus("alice", d.at(9, 30), 10, "Slack", "#general"),
        focus("alice", d.at(9, 40), 20, "Code", "main.rs"),
        focus("alice", d.at(10, 0), 15, "YouTube", "talk"),
        json!({"user_id": "alice", "source": "calendar", "kind": "meeting",
               "timestamp": d.iso(11, 0), "duration_ms": 30 * MIN,
               "attributes": {"participants": ["alice", "bob"], "status": "accepted"}}),
        focus("alice", d.at(11, 0), 20, "Code", "lib.rs"),
        json!({"event_id": commit_id, "user_id": "alice", "source": "git", "kind": "commit",
               "timestamp": d.at(10, 20), "attributes": {"project": "digame"}}),
        // 8: a focus event without its application.
        json!({"user_id": "alice", "source": "aw", "kind": "window_focus",
               "timestamp": d.at(9, 10)}),
        // 9: claims another tenant.
        json!({"tenant_id": "globex", "user_id": "alice", "source": "aw", "kind": "commit",
               "timestamp": d.at(9, 10), "attributes": {"project": "x"}}),
        // 10: larger than the 4096-byte event limit.
        oversize,
    ];
    let (status, body) = acme.post_events(&batch1).await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({"accepted": 8, "rejected": [
            {"index": 8, "reason": "attributes.app: is required for kind `window_focus`"},
            {"index": 9, "reason": "tenant_id `globex` does not match the credential's tenant; omit tenant_id, it is taken from the key"},
            {"index": 10, "reason": format!("event is {oversize_len} bytes; the limit is 4096 bytes")},
        ]})
    );

    // ---- Request 2, NDJSON and gzip: a retry, a broken line, two late events.
    // Alice's newest event starts at 11:00, so with 1 h lateness her watermark is 10:00:
    // a focus event at 10:30 is inside it, one at 09:50 is behind it, and both count
    // (lateness inside the horizon is never a reason to drop an event). Firefox at 09:50
    // lies inside Code 09:40–10:00, which started first and keeps the overlap, so it adds
    // an event but no active time.
    let late_ok = focus("alice", d.at(10, 30), 10, "Code", "main.rs");
    let behind = focus("alice", d.at(9, 50), 5, "Firefox", "docs");
    let mut body2 = ndjson(&[batch1[7].clone()]);
    body2.extend_from_slice(b"{\"user_id\": \"alice\", \"kind\":\n");
    body2.extend_from_slice(&ndjson(&[late_ok, behind]));
    let (status, body) = acme
        .post_events_raw(gzip(&body2), Some("gzip"))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["accepted"], 3);
    assert_eq!(body["rejected"][0]["index"], 1);
    let reason = body["rejected"][0]["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("invalid event: EOF while parsing"),
        "{reason}"
    );
    assert_eq!(body["rejected"].as_array().unwrap().len(), 1);

    // ---- Carol (tenant globex): one focused hour. ----------------------------------
    let (status, body) = globex
        .post_events(&[
            not_afk("carol", d.at(14, 0), 60),
            focus("carol", d.at(14, 0), 60, "Code", "app.py"),
        ])
        .await
        .unwrap();
    assert_eq!(
        (status, body),
        (200, json!({"accepted": 2, "rejected": []}))
    );

    // ---- Whole-request refusals. ---------------------------------------------------
    let (status, body) = acme
        .post_events_raw(vec![b' '; 300_000], None)
        .await
        .unwrap();
    assert_eq!(
        (status, body),
        (
            413,
            json!({"error": {"code": "body_too_large",
            "message": "request body exceeds 262144 bytes; send smaller batches"}})
        )
    );
    let bomb = gzip(&vec![b' '; 2_000_000]);
    assert!(bomb.len() < 262_144);
    let (status, body) = acme.post_events_raw(bomb, Some("gzip")).await.unwrap();
    assert_eq!(
        (status, body),
        (
            413,
            json!({"error": {"code": "decompressed_too_large",
            "message": "decompressed body exceeds 1048576 bytes; send smaller batches"}})
        )
    );
    let many: Vec<Value> = (0..51)
        .map(|i| focus("alice", d.at(12, 0) + i, 1, "Code", "x"))
        .collect();
    let (status, body) = acme.post_events(&many).await.unwrap();
    assert_eq!(
        (status, body),
        (
            413,
            json!({"error": {"code": "too_many_events",
            "message": "request holds 51 events; the limit is 50 per request"}})
        )
    );
    // Past the largest body any route reads (1 MiB here), as JSON like every error.
    for path in ["/v1/events", "/v1/sql"] {
        let reply = acme
            .post_raw(path, Some("application/json"), vec![b' '; 1_100_000], None)
            .await
            .unwrap();
        assert_eq!(
            reply.1["error"]["code"], "body_too_large",
            "{path}: {reply:?}"
        );
        assert_eq!(reply.0, 413, "{path}");
    }
    // Not JSON at all is a malformed body, not an event rejected.
    let (status, body) = acme
        .post_events_raw(b"this is not json".to_vec(), None)
        .await
        .unwrap();
    assert_eq!(
        (status, &body["error"]["code"]),
        (400, &json!("malformed_body"))
    );
    // Neither JSON nor NDJSON declared: 415, whatever the body holds.
    for content_type in [Some("text/plain"), None] {
        let reply = acme
            .post_raw("/v1/events", content_type, ndjson(&batch1[..1]), None)
            .await
            .unwrap();
        assert_refused(&reply, 415, "send a JSON array as application/json");
        assert_eq!(reply.1["error"]["code"], "unsupported_media_type");
    }
    let (status, body) = acme
        .post_events_raw(b"[{\"nope\": 1}]".to_vec(), None)
        .await
        .unwrap();
    assert_eq!(status, 422, "every event rejected: {body}");
    assert_eq!(body["accepted"], 0);
    let stranger = server.client("not-a-key-0123456789");
    let (status, body) = stranger.post_events(&batch1[..1]).await.unwrap();
    assert_eq!(status, 401);
    assert_eq!(body["error"]["code"], "unauthorized");

    // ---- Alice's features, by hand. -------------------------------------------------
    // Active = focus ∩ presence: Code 30+20+10+20 = 80 min, Slack 10, YouTube 15.
    // 5-minute slot labels: dev ×6 (09:00–09:30), communication ×2, dev ×4,
    // entertainment ×3 (10:00–10:15), dev ×2 (10:30), dev ×4 (11:00) → switches at
    // 09:30 (to_communication), 09:40 (work_to_work), 10:00 (to_distraction),
    // 10:30 (work_to_work).
    // Events: afk, 7 focus (incl. the two late ones), meeting, commit (its retry counts
    // once).
    let expected_day = json!({
        "features": {"active_seconds": 6300.0, "context_switches": 4.0,
                     "event_count": 10.0, "presence_seconds": 9000.0},
        "breakdowns": {
            "active_seconds_by_app": {"Code": 4800.0, "Slack": 600.0, "YouTube": 900.0},
            "active_seconds_by_category": {"communication": 600.0, "development": 4800.0,
                                           "entertainment": 900.0},
            "context_switches": {"to_communication": 1.0, "to_distraction": 1.0,
                                 "work_to_work": 2.0},
            "event_count_by_kind": {"afk": 1.0, "commit": 1.0, "meeting": 1.0,
                                    "window_focus": 7.0}}
    });
    let day_start = format!("{}T00:00:00.000Z", d.0);
    let from = d.iso(0, 0);
    let to = format!("{}T00:00:00Z", d.0.checked_add_days(Days::new(1)).unwrap());
    let day_path = format!("/v1/users/alice/features?granularity=day&from={from}&to={to}");
    let series = eventually(Duration::from_secs(15), || async {
        let (status, series) = acme.get(&day_path).await?;
        assert_eq!(status, 200, "{series}");
        let w = window(&series, &day_start);
        Ok((values_like(&w, &expected_day) == expected_day).then_some(series))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: day features never matched the hand-computed values"));
    assert_eq!(series["windows"].as_array().unwrap().len(), 1);
    let day = window(&series, &day_start);
    assert_eq!(day["timezone"], "UTC");
    // Yesterday is in the past: final as soon as the wall clock is an hour (the lateness)
    // past its end, without waiting for more events (near midnight it may still be open).
    let day_end = Utc::now()
        .date_naive()
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_utc();
    if Utc::now() > day_end + chrono::Duration::minutes(70) {
        assert_eq!(day["is_final"], true, "a past day is final promptly");
    }

    let hour_path = format!("/v1/users/alice/features?granularity=hour&from={from}&to={to}");
    let (_, hours) = acme.get(&hour_path).await.unwrap();
    let hour = |h: u32| window(&hours, &format!("{}T{h:02}:00:00.000Z", d.0));
    assert_eq!(hours["windows"].as_array().unwrap().len(), 3, "{hours}");
    assert_like(
        &hour(9),
        json!({"features": {"active_seconds": 3600.0, "context_switches": 2.0,
                            "event_count": 5.0, "presence_seconds": 3600.0},
               "breakdowns": {
                   "active_seconds_by_app": {"Code": 3000.0, "Slack": 600.0},
                   "active_seconds_by_category": {"communication": 600.0, "development": 3000.0},
                   "context_switches": {"to_communication": 1.0, "to_distraction": 0.0,
                                        "work_to_work": 1.0},
                   "event_count_by_kind": {"afk": 1.0, "window_focus": 4.0}}}),
    );
    assert_like(
        &hour(10),
        json!({"features": {"active_seconds": 1500.0, "context_switches": 2.0,
                            "event_count": 3.0, "presence_seconds": 3600.0},
               "breakdowns": {
                   "active_seconds_by_app": {"Code": 600.0, "YouTube": 900.0},
                   "active_seconds_by_category": {"development": 600.0, "entertainment": 900.0},
                   "context_switches": {"to_communication": 0.0, "to_distraction": 1.0,
                                        "work_to_work": 1.0},
                   "event_count_by_kind": {"commit": 1.0, "window_focus": 2.0}}}),
    );
    assert_like(
        &hour(11),
        json!({"features": {"active_seconds": 1200.0, "context_switches": 0.0,
                            "event_count": 2.0, "presence_seconds": 1800.0},
               "breakdowns": {
                   "active_seconds_by_app": {"Code": 1200.0},
                   "active_seconds_by_category": {"development": 1200.0},
                   "context_switches": {"to_communication": 0.0, "to_distraction": 0.0,
                                        "work_to_work": 0.0},
                   "event_count_by_kind": {"meeting": 1.0, "window_focus": 1.0}}}),
    );
    // The wall clock has passed every hour of yesterday by more than the lateness.
    for h in [9, 10, 11] {
        assert_eq!(hour(h)["is_final"], true, "{h}:00");
    }

    // ---- Raw events and dead letters. -----------------------------------------------
    // Feature rows are written before the raw events they come from: wait for both.
    acme.await_rows(
        "SELECT count(*) AS n, count(DISTINCT event_id) AS d FROM events",
        &[json!({"n": 10, "d": 10})],
        Duration::from_secs(20),
    )
    .await
    .unwrap();
    let dead = eventually(Duration::from_secs(10), || async {
        let rows = acme
            .rows("SELECT stage, reason_code, request_index FROM dead_letters ORDER BY stage, request_index")
            .await?;
        Ok((rows.len() >= 5).then_some(rows))
    })
    .await
    .unwrap();
    assert_eq!(
        dead,
        vec![
            json!({"stage": "ingest", "reason_code": "invalid", "request_index": 0}),
            json!({"stage": "ingest", "reason_code": "invalid", "request_index": 1}),
            json!({"stage": "ingest", "reason_code": "invalid", "request_index": 8}),
            json!({"stage": "ingest", "reason_code": "invalid", "request_index": 9}),
            json!({"stage": "ingest", "reason_code": "invalid", "request_index": 10}),
        ]
    );
    // ---- Tenant isolation. --------------------------------------------------------------
    assert_eq!(
        globex
            .rows("SELECT DISTINCT tenant_id, user_id FROM features ORDER BY user_id")
            .await
            .unwrap(),
        vec![json!({"tenant_id": "globex", "user_id": "carol"})]
    );
    for sql in [
        "SELECT count(*) AS n FROM features WHERE tenant_id = 'acme'",
        "SELECT count(*) AS n FROM events WHERE user_id = 'alice'",
        "SELECT count(*) AS n FROM dead_letters",
    ] {
        assert_eq!(
            globex.rows(sql).await.unwrap(),
            vec![json!({"n": 0})],
            "{sql}"
        );
    }
    let (status, carol_as_acme) = acme
        .get("/v1/users/carol/features?granularity=day")
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(carol_as_acme["windows"], json!([]));
    let carol = eventually(Duration::from_secs(10), || async {
        let (_, s) = globex
            .get("/v1/users/carol/features?granularity=day")
            .await?;
        Ok((!s["windows"].as_array().unwrap().is_empty()).then_some(s))
    })
    .await
    .unwrap();
    assert_eq!(carol["windows"][0]["features"]["active_seconds"], 3600.0);

    // ---- Only queries. ----------------------------------------------------------------
    for sql in [
        "DROP TABLE features",
        "CREATE TABLE t AS SELECT 1",
        "INSERT INTO features SELECT * FROM features",
        "SET datafusion.execution.batch_size = 1",
    ] {
        let (status, body) = globex.sql(sql).await.unwrap();
        assert_eq!(status, 400, "{sql}: {body}");
        assert_eq!(body["error"]["code"], "invalid_query", "{sql}");
    }

    let (status, body) = globex.get("/v1/nope").await.unwrap();
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "not_found");

    // ---- Graceful shutdown. -------------------------------------------------------------
    let exit = server.terminate().await.unwrap();
    assert!(exit.success(), "{exit}");
}

/// The people of the crash tests.
const CRASH_USERS: [&str; 5] = ["u0", "u1", "u2", "u3", "u4"];

/// Request `r` of a crash test: `per_request` commits spread round-robin over
/// [`CRASH_USERS`], `step_ms` apart from `start`, each with its own id (`series` keeps the
/// ids of different tests apart).
fn commits(series: u16, r: usize, per_request: usize, start: i64, step_ms: i64) -> Vec<Value> {
    (0..per_request)
        .map(|i| {
            let n = r * per_request + i;
            json!({"event_id": format!("0195a6a4-0000-7000-{series:04x}-{n:012x}"),
                   "user_id": CRASH_USERS[i % CRASH_USERS.len()], "source": "git",
                   "kind": "commit", "timestamp": start + (n as i64) * step_ms,
                   "attributes": {"project": "digame"}})
        })
        .collect()
}

/// SIGKILL right after a 2xx loses nothing and counts nothing twice, including a client
/// retry of the last acknowledged request after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_after_ack_loses_nothing_and_counts_once() {
    kill_9_after_ack(Bus::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_after_ack_loses_nothing_and_counts_once_on_kafka() {
    kill_9_after_ack(Bus::kafka()).await;
}

async fn kill_9_after_ack(bus: Bus) {
    let data = tempfile::tempdir().unwrap();
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_digame"));
    let env = [("DIGAME_INGEST_KEYS", "acme-key-0123456789abcdef:acme")];
    let mut server = DigameProcess::start_on(bin, data.path(), &env, &bus)
        .await
        .unwrap();
    let d = Day(Utc::now()
        .date_naive()
        .checked_sub_days(Days::new(1))
        .unwrap());
    let users = CRASH_USERS;
    // Request r holds 200 commits, 40 per user, each with its own client event id, all
    // within 10:00–10:10 so a retry is well inside the allowed lateness.
    let request = |r: usize| commits(0x8000, r, 200, d.at(10, 0), 100);
    let mut acked = 0usize;
    let client = server.client(ACME_KEY);
    for r in 0..10 {
        let (status, body) = client.post_events(&request(r)).await.unwrap();
        assert_eq!((status, &body["accepted"]), (200, &json!(200)));
        acked += 200;
    }
    server.kill9().await.unwrap();
    if matches!(bus, Bus::Kafka { .. }) {
        // The development broker's coordinator (tansu 0.6.0) can leave a member that joins
        // while its dead predecessor still holds the partitions with nothing once the
        // predecessor expires (README, Running on Kafka). What this test is about is that
        // nothing acknowledged is lost across kill -9, so the restart waits out the dead
        // member's session, as an operator's supervisor with a restart delay would.
        tokio::time::sleep(digame_infra::bus::kafka::SESSION_TIMEOUT + Duration::from_secs(2))
            .await;
    }
    server.restart().await.unwrap();
    let client = server.client(ACME_KEY);
    // A client that never saw the last answer retries it: same event ids.
    let (status, _) = client.post_events(&request(9)).await.unwrap();
    assert_eq!(status, 200);
    for r in 10..15 {
        let (status, _) = client.post_events(&request(r)).await.unwrap();
        assert_eq!(status, 200);
        acked += 200;
    }
    // Each user got 1/5 of every request.
    let per_user = acked / users.len();
    let expected: Vec<Value> = users
        .iter()
        .map(|u| json!({"user_id": u, "n": per_user as f64}))
        .collect();
    client
        .await_rows(EVENT_COUNTS_BY_USER, &expected, Duration::from_secs(40))
        .await
        .unwrap();
    // Feature rows are written before the raw events they come from: wait for both.
    client
        .await_rows(
            "SELECT count(*) AS n, count(DISTINCT event_id) AS d FROM events",
            &[json!({"n": acked, "d": acked})],
            Duration::from_secs(20),
        )
        .await
        .unwrap();
    drop(server);
}

/// A bounded kill -9 loop under load: two senders post requests of 100 events back to
/// back while the server is killed at a random moment, 20 times; after each restart every
/// request left without an answer is sent again with the same ids, as a client's offline
/// queue would. In the end every acknowledged event is stored once and counted once in the
/// features, and nothing else is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loop_under_load_counts_every_acknowledged_event_once() {
    use rand::{Rng, SeedableRng};
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    const KILLS: usize = 20;
    const PER_REQUEST: usize = 100;
    let data = tempfile::tempdir().unwrap();
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_digame"));
    let env = [("DIGAME_INGEST_KEYS", "acme-key-0123456789abcdef:acme")];
    let mut server = DigameProcess::start(bin, data.path(), &env).await.unwrap();
    let d = Day(Utc::now()
        .date_naive()
        .checked_sub_days(Days::new(1))
        .unwrap());
    let request = |r: usize| commits(0x9000, r, PER_REQUEST, d.at(8, 0), 10);
    let mut rng = rand::rngs::StdRng::seed_from_u64(17);
    let next = AtomicUsize::new(0);
    let (mut acked, mut resent) = (0usize, 0usize);
    let mut unanswered: Vec<usize> = Vec::new();
    for _ in 0..KILLS {
        let client = server.client(ACME_KEY);
        // What the last restart left unanswered goes first, until acknowledged.
        for r in std::mem::take(&mut unanswered) {
            let (status, body) = client.post_events(&request(r)).await.unwrap();
            assert_eq!(status, 200, "{body}");
            acked += 1;
            resent += 1;
        }
        let stop = AtomicBool::new(false);
        let lost = Mutex::new(Vec::new());
        let ok = AtomicUsize::new(0);
        let sender = || async {
            while !stop.load(Ordering::SeqCst) {
                let r = next.fetch_add(1, Ordering::SeqCst);
                match client.post_events(&request(r)).await {
                    Ok((200, _)) => {
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                    // Killed mid-request (or refused while going down): not acknowledged.
                    _ => lost.lock().unwrap().push(r),
                }
            }
        };
        let wait = Duration::from_millis(rng.random_range(100..600));
        let killer = async {
            tokio::time::sleep(wait).await;
            server.kill9().await.unwrap();
            stop.store(true, Ordering::SeqCst);
        };
        tokio::join!(sender(), sender(), killer);
        acked += ok.load(Ordering::SeqCst);
        unanswered = lost.into_inner().unwrap();
        server.restart().await.unwrap();
    }
    let client = server.client(ACME_KEY);
    for r in std::mem::take(&mut unanswered) {
        let (status, _) = client.post_events(&request(r)).await.unwrap();
        assert_eq!(status, 200);
        acked += 1;
        resent += 1;
    }
    let events = acked * PER_REQUEST;
    assert!(acked > KILLS, "load ran between kills: {acked} requests");
    eprintln!(
        "kill loop: {KILLS} kills, {acked} requests ({events} events) acknowledged, {resent} requests resent after a kill"
    );
    // Every request number below `next` was acknowledged exactly once in total (sent,
    // or resent after its first try went unanswered).
    assert_eq!(acked, next.load(Ordering::SeqCst));
    client
        .await_rows(
            "SELECT count(*) AS n, count(DISTINCT event_id) AS d FROM events",
            &[json!({"n": events, "d": events})],
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    let per_user = (events / CRASH_USERS.len()) as f64;
    let expected: Vec<Value> = CRASH_USERS
        .iter()
        .map(|u| json!({"user_id": u, "n": per_user}))
        .collect();
    client
        .await_rows(EVENT_COUNTS_BY_USER, &expected, Duration::from_secs(60))
        .await
        .unwrap();
    eprintln!("kill loop: {events} events stored and counted once each: 0 lost, 0 duplicated");
}

/// SIGKILL while late events reopen days from the store: the days are final and out of
/// memory (nothing is held), each request of late events makes the pipeline read the
/// people's stored events back, and a kill at any point of that loses and duplicates
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_reopens_loses_nothing_and_counts_once() {
    let data = tempfile::tempdir().unwrap();
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_digame"));
    let env = [
        ("DIGAME_INGEST_KEYS", "acme-key-0123456789abcdef:acme"),
        ("DIGAME_PIPELINE__HOLD_DAYS", "0"),
        ("DIGAME_PIPELINE__HOLD_TOUCHED_SECS", "0"),
        ("DIGAME_PIPELINE__FLUSH_INTERVAL_MS", "100"),
        ("DIGAME_PIPELINE__CHECKPOINT_INTERVAL_MS", "100"),
    ];
    let mut server = DigameProcess::start(bin, data.path(), &env).await.unwrap();
    let d = Day(Utc::now()
        .date_naive()
        .checked_sub_days(Days::new(3))
        .unwrap());
    let users = CRASH_USERS;
    // Request r: 100 commits, 20 per user, spread over the day three days ago, each with
    // its own id.
    let request = |r: usize| commits(0x9000, r, 100, d.at(8, 0), 20_000);
    let client = server.client(ACME_KEY);
    let (status, _) = client.post_events(&request(0)).await.unwrap();
    assert_eq!(status, 200);
    let per_user = |n: usize| -> Vec<Value> {
        users
            .iter()
            .map(|u| json!({"user_id": u, "n": (n / users.len()) as f64}))
            .collect()
    };
    client
        .await_rows(
            EVENT_COUNTS_BY_USER,
            &per_user(100),
            Duration::from_secs(20),
        )
        .await
        .unwrap();
    let mut acked = 100;
    let reopens = "digame_pipeline_reopen_duration_seconds_count";
    let mut reads = 0.0;
    for round in 0..4 {
        // The days are counted, checkpointed and out of memory before the late ones come.
        tokio::time::sleep(Duration::from_millis(400)).await;
        let client = server.client(ACME_KEY);
        for r in 1..4 {
            let r = round * 3 + r;
            let (status, body) = client.post_events(&request(r)).await.unwrap();
            assert_eq!((status, &body["accepted"]), (200, &json!(100)));
            acked += 100;
        }
        // Kill at a different moment of the reopen each round.
        tokio::time::sleep(Duration::from_millis(60 * round as u64)).await;
        reads += server.metric(reopens).await.unwrap();
        server.kill9().await.unwrap();
        server.restart().await.unwrap();
        server
            .client(ACME_KEY)
            .await_rows(
                EVENT_COUNTS_BY_USER,
                &per_user(acked),
                Duration::from_secs(40),
            )
            .await
            .unwrap();
    }
    let client = server.client(ACME_KEY);
    // The late requests were counted by reopening the days from the store, and the day
    // says it was revised after it was final.
    reads += server.metric(reopens).await.unwrap();
    assert!(reads > 0.0, "no day was reopened from the store");
    let (_, series) = client
        .get(&format!(
            "/v1/users/u0/features?granularity=day&from={}&to={}",
            d.iso(0, 0),
            d.iso(23, 59)
        ))
        .await
        .unwrap();
    let day = &series["windows"][0];
    assert_eq!(day["features"]["event_count"], (acked / users.len()) as f64);
    assert_eq!(
        (&day["is_final"], &day["revised"]),
        (&json!(true), &json!(true)),
        "{day}"
    );
    assert!(
        day["final_at"].as_str() < day["revised_at"].as_str(),
        "{day}"
    );
    // Feature rows are written before the raw events they come from: wait for both.
    client
        .await_rows(
            "SELECT count(*) AS n, count(DISTINCT event_id) AS d FROM events",
            &[json!({"n": acked, "d": acked})],
            Duration::from_secs(20),
        )
        .await
        .unwrap();
    let dead = client
        .rows("SELECT count(*) AS n FROM dead_letters")
        .await
        .unwrap();
    assert_eq!(dead, vec![json!({"n": 0})]);
}

/// Keeps the date arithmetic above honest around midnight.
/// A read after a window changes sees the new value: the person's values are read from
/// the store once, into the read cache, and the change reaches the cache through the
/// features stream (not by reading the store again). Answers carry an ETag that a
/// conditional request turns into 304, and come gzip-compressed on request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_after_a_window_changes_sees_the_new_value() {
    let data = tempfile::tempdir().unwrap();
    let server = DigameProcess::start(
        std::path::Path::new(env!("CARGO_BIN_EXE_digame")),
        data.path(),
        &env(),
    )
    .await
    .unwrap();
    let acme = server.client(ACME_KEY);
    let d = Day(Utc::now()
        .date_naive()
        .checked_sub_days(Days::new(1))
        .unwrap());
    let day_start = format!("{}T00:00:00.000Z", d.0);
    // The default range (the last 7 days), which the cache covers.
    let path = "/v1/users/carol/features?granularity=day";
    let presence = |want: f64| {
        let (acme, day_start) = (&acme, &day_start);
        async move {
            let (status, series) = acme.get(path).await?;
            assert_eq!(status, 200, "{series}");
            let got = window(&series, day_start)["features"]["presence_seconds"].as_f64();
            Ok((got == Some(want)).then_some(()))
        }
    };
    // 09:00–09:30 present: 1,800 s.
    let (status, body) = acme
        .post_events(&[not_afk("carol", d.at(9, 0), 30)])
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    eventually(Duration::from_secs(15), || presence(1800.0))
        .await
        .unwrap();
    let fill = r#"digame_read_cache_total{outcome="fill"}"#;
    let fills = server.metric(fill).await.unwrap();
    assert!(fills >= 1.0, "the first reads fill the cache");
    // 10:00–10:15 too: 2,700 s, seen through the cache.
    let (status, body) = acme
        .post_events(&[not_afk("carol", d.at(10, 0), 15)])
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    eventually(Duration::from_secs(15), || presence(2700.0))
        .await
        .unwrap();
    assert_eq!(
        server.metric(fill).await.unwrap(),
        fills,
        "the change came through the stream, not a second store read"
    );

    let (status, headers, plain) = acme.get_raw(path, &[]).await.unwrap();
    assert_eq!(status, 200);
    assert!(
        server
            .metric(r#"digame_read_cache_total{outcome="hit"}"#)
            .await
            .unwrap()
            >= 1.0
    );
    let etag = headers["etag"].to_str().unwrap().to_string();
    let (status, _, empty) = acme
        .get_raw(path, &[("if-none-match", &etag)])
        .await
        .unwrap();
    assert_eq!((status, empty.len()), (304, 0));
    let (status, headers, gz) = acme
        .get_raw(path, &[("accept-encoding", "br, gzip;q=0.8")])
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(headers["content-encoding"], "gzip");
    let mut unzipped = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut unzipped).unwrap();
    assert_eq!(unzipped, plain);
    // A client that refuses gzip gets the plain body.
    let (_, headers, same) = acme
        .get_raw(path, &[("accept-encoding", "gzip;q=0")])
        .await
        .unwrap();
    assert!(headers.get("content-encoding").is_none());
    assert_eq!(same, plain);
    // Another change: a new ETag, and the old one no longer matches.
    let (status, _) = acme
        .post_events(&[not_afk("carol", d.at(11, 0), 10)])
        .await
        .unwrap();
    assert_eq!(status, 200);
    eventually(Duration::from_secs(15), || presence(3300.0))
        .await
        .unwrap();
    let (status, _, _) = acme
        .get_raw(path, &[("if-none-match", &etag)])
        .await
        .unwrap();
    assert_eq!(status, 200);
}

#[test]
fn day_helper_formats_utc() {
    let d = Day(NaiveDate::from_ymd_opt(2026, 11, 23).unwrap());
    assert_eq!(d.at(9, 30), 1_795_426_200_000);
    assert_eq!(d.iso(9, 30), "2026-11-23T09:30:00Z");
}
