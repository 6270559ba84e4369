//! Acknowledged = counted, through the real binary: what `digame simulate` sends (the
//! README's own command, at its default concurrency and at 16 requests in flight) ends with
//! every accepted event in the day `event_count` features and nothing dead-lettered; a day
//! posted newest first in one request gives the features of the same day posted in order;
//! `simulate` run again is a retry; a recompute of UTC days reproduces what the pipeline
//! wrote. Embedded bus and store, and Kafka with ClickHouse.

use std::time::Duration;

use chrono::{Days, Utc};
use digame_testkit::{
    Bus, Client, DigameProcess, TestClickHouse, eventually, job_succeeded, reader_key,
};
use serde_json::{Value, json};

const KEY: &str = "acme-key-0123456789abcdef";

/// Where `simulate`'s data ends: a fixed instant (a Sunday evening), so the data is the
/// same whatever today is.
const UNTIL: &str = "2026-11-29T21:00:00Z";

fn env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("DIGAME_INGEST_KEYS", "acme-key-0123456789abcdef:acme"),
        // `simulate`'s days end at UNTIL: ten years of horizon keep them acceptable.
        ("DIGAME_INGEST__HORIZON_DAYS", "3650"),
    ]
}

async fn start(bus: &Bus, store: Option<&TestClickHouse>) -> (tempfile::TempDir, DigameProcess) {
    start_with(bus, store, &[]).await
}

/// As [`start`], with more environment.
async fn start_with(
    bus: &Bus,
    store: Option<&TestClickHouse>,
    extra: &[(&'static str, &'static str)],
) -> (tempfile::TempDir, DigameProcess) {
    let data = tempfile::tempdir().unwrap();
    let mut env = env();
    env.extend_from_slice(extra);
    let server = DigameProcess::start_backends(
        std::path::Path::new(env!("CARGO_BIN_EXE_digame")),
        data.path(),
        &env,
        bus,
        store,
    )
    .await
    .unwrap();
    (data, server)
}

/// Runs `digame simulate` with `key` against the server; returns the accepted count it
/// printed and whether it wrote the people's profiles.
async fn simulate(
    server: &DigameProcess,
    key: &str,
    (seed, days): (u64, u32),
    concurrency: usize,
    batch: usize,
) -> (u64, bool) {
    let people = 20;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_digame"))
        .args(["simulate", "--url", &server.url(), "--key", key])
        .args(["--seed", &seed.to_string(), "--until", UNTIL])
        .args(["--people", &people.to_string(), "--days", &days.to_string()])
        .args(["--concurrency", &concurrency.to_string()])
        .args(["--batch", &batch.to_string()])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // "sent N events for P people over D days: A accepted, R rejected"
    let tail = stdout.rsplit(": ").next().unwrap();
    let mut words = tail.split_whitespace();
    let accepted: u64 = words.next().unwrap().parse().unwrap();
    assert_eq!(words.next(), Some("accepted,"), "{stdout}");
    assert_eq!(tail.trim_end(), format!("{accepted} accepted, 0 rejected"));
    (accepted, stdout.contains("wrote 20 profiles"))
}

/// The sum of the day `event_count` of every person, once it stops changing at `want`.
async fn counted(client: &Client, want: u64) -> u64 {
    let sql = "SELECT SUM(value) AS n FROM features \
               WHERE feature = 'event_count' AND dimension = '' AND granularity = 'day'";
    let read = || async {
        let rows = client.rows(sql).await?;
        anyhow::Ok(rows[0]["n"].as_f64().unwrap_or(0.0) as u64)
    };
    match eventually(Duration::from_secs(180), || async {
        let n = read().await?;
        Ok((n >= want).then_some(n))
    })
    .await
    {
        // Settled: nothing more arrives after a while.
        Ok(n) => {
            tokio::time::sleep(Duration::from_secs(2)).await;
            assert_eq!(read().await.unwrap(), n, "the count kept moving");
            n
        }
        Err(_) => read().await.unwrap(),
    }
}

async fn every_accepted_event_is_counted(bus: Bus, store: Option<TestClickHouse>) {
    let (_data, server) = start(&bus, store.as_ref()).await;
    let client = server.client(KEY);
    // The README's example with an admin key (profiles, then 20 people × 7 days, 4
    // requests of 5000 events in flight), then two other weeks of the same people (seed 7)
    // with the ingestion key (no profiles) in requests of 1000 with 16 in flight: several
    // batches of one person in flight at once, landing in any order.
    let (first, profiles) = simulate(&server, &reader_key(KEY), (42, 7), 4, 5000).await;
    assert!(profiles, "an admin key writes the profiles");
    assert!(first > 20_000, "{first}");
    // "Caught up" is never said while an accepted event is still uncounted: the embedded
    // bus knows its ends at any moment, Kafka's are asked of the brokers.
    let caught = eventually(Duration::from_secs(60), || async {
        let (_, r) = client.get("/v1/reconciliation").await?;
        if r["pipeline"]["caught_up"] == true {
            assert_eq!(r["counted"], json!(first), "caught up too early: {r}");
            assert_eq!(r["stored"], json!(first), "caught up too early: {r}");
            return Ok(Some(()));
        }
        Ok(None)
    })
    .await;
    assert!(caught.is_ok(), "never caught up");
    assert_eq!(counted(&client, first).await, first, "default concurrency");
    let (second, profiles) = simulate(&server, KEY, (7, 14), 16, 1000).await;
    assert!(!profiles, "an ingestion key may not write profiles");
    assert_eq!(
        counted(&client, first + second).await,
        first + second,
        "16 requests in flight"
    );
    // The README's example run again, as the README invites: with the same seed and end,
    // the same events under the same ids, all accepted again as retries and counted once.
    let (third, _) = simulate(&server, &reader_key(KEY), (42, 7), 4, 5000).await;
    assert_eq!(third, first, "a rerun sends what the first run sent");
    let n = first + second;
    // Once caught up, the figures are the known total, never short of it.
    let last = std::sync::Mutex::new(Value::Null);
    eventually(Duration::from_secs(120), || async {
        let (_, r) = client.get("/v1/reconciliation").await?;
        let caught_up = r["pipeline"]["caught_up"] == true;
        if caught_up {
            assert_eq!((&r["stored"], &r["counted"]), (&json!(n), &json!(n)), "{r}");
        }
        *last.lock().unwrap() = r;
        Ok(caught_up.then_some(()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {}", last.lock().unwrap()));
    assert_eq!(counted(&client, n).await, n, "the rerun");
    let dead = client
        .rows("SELECT count(*) AS n FROM dead_letters")
        .await
        .unwrap();
    assert_eq!(dead, vec![json!({"n": 0})], "nothing dead-lettered");
    // The reconciliation says the same, per tenant and per person.
    // Feature rows are written before the raw events they come from: wait for both.
    let r = eventually(Duration::from_secs(20), || async {
        let (status, r) = client.get("/v1/reconciliation?by=user").await?;
        assert_eq!(status, 200, "{r}");
        Ok((r["stored"] == json!(n)).then_some(r))
    })
    .await
    .unwrap();
    assert_eq!(
        (
            &r["stored"],
            &r["counted"],
            &r["uncounted"],
            &r["unstored"],
            &r["dead_letters"]
        ),
        (&json!(n), &json!(n), &json!(0), &json!(0), &json!([])),
        "{r}"
    );
    let people = r["people"].as_array().unwrap();
    assert_eq!(people.len(), 20, "{r}");
    assert!(people.iter().all(|p| p["stored"] == p["counted"]), "{r}");
    assert_eq!(r["pipeline"]["caught_up"], true, "{r}");
    // A recompute of the last three UTC days with unchanged settings, as a tenant admin
    // tries it: the local days of Berlin, New York and Kolkata straddle its edges. It
    // reproduces what the pipeline wrote (nothing to retract) and every event still counts.
    let today = chrono::DateTime::parse_from_rfc3339(UNTIL)
        .unwrap()
        .date_naive();
    let from = today.checked_sub_days(Days::new(3)).unwrap();
    let admin = server.client(&reader_key(KEY));
    let (status, body) = admin
        .post_json(
            "/v1/recompute",
            &json!({"from": format!("{from}T00:00:00Z"), "to": format!("{today}T00:00:00Z")}),
        )
        .await
        .unwrap();
    assert_eq!(status, 202, "{body}");
    let job_path = body["status_url"].as_str().unwrap().to_string();
    let job = job_succeeded(&admin, &job_path, Duration::from_secs(120))
        .await
        .unwrap();
    let report: Value = serde_json::from_str(job["message"].as_str().unwrap()).unwrap();
    assert_eq!(report["rows_retracted"], 0, "{job}");
    let (_, r) = client.get("/v1/reconciliation").await.unwrap();
    assert_eq!(
        (&r["stored"], &r["counted"], &r["pipeline"]["caught_up"]),
        (&json!(n), &json!(n), &json!(true)),
        "after the recompute: {r}"
    );
    // The SQL tables are listable, with what SQL sees of them.
    let (status, t) = client.get("/v1/sql/tables").await.unwrap();
    assert_eq!(status, 200, "{t}");
    let names: Vec<&str> = t["tables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["events", "features", "dead_letters"], "{t}");
    let features: Vec<&str> = t["tables"][1]["columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    for column in [
        "user_id",
        "window_start",
        "feature",
        "value",
        "is_final",
        "final_revision",
    ] {
        assert!(features.contains(&column), "{column}: {t}");
    }
    // The demo's teams light up the group views: team-0 (5 people, UTC) has days with
    // all five, a collaboration network and engineering flow, over the data's 14 days.
    let range = format!(
        "from={}T00:00:00Z&to={}T00:00:00Z",
        today.checked_sub_days(Days::new(14)).unwrap(),
        today.checked_add_days(Days::new(1)).unwrap()
    );
    let (status, g) = client
        .get(&format!(
            "/v1/groups/features?team=team-0&granularity=day&{range}"
        ))
        .await
        .unwrap();
    assert_eq!(status, 200, "{g}");
    assert_eq!(g["members"], 5, "{g}");
    let shown = g["windows"].as_array().unwrap();
    assert!(shown.iter().any(|w| w["suppressed"] == false), "{g}");
    let (status, net) = client
        .get(&format!("/v1/groups/network?team=team-0&{range}"))
        .await
        .unwrap();
    assert_eq!(status, 200, "{net}");
    assert!(
        !net["network"]["links"].as_array().unwrap().is_empty(),
        "{net}"
    );
    let (status, flow) = client
        .get(&format!("/v1/groups/flow?team=team-0&{range}"))
        .await
        .unwrap();
    assert_eq!(status, 200, "{flow}");
    let flow = &flow["flow"];
    assert!(flow["deploys"].as_u64().unwrap() > 0, "{flow}");
    assert!(flow["deployed_changes"].as_u64().unwrap() > 0, "{flow}");
    // Work styles read every person's days in one pass, on either store.
    let (status, styles) = client.get(&format!("/v1/styles?{range}")).await.unwrap();
    assert_eq!(status, 200, "{styles}");
    let k = styles["k"].as_u64().unwrap();
    assert!((2..=8).contains(&k), "{styles}");
    let weeks = styles["assignments"].as_array().unwrap();
    // 20 people, each with at least one complete week (14 days of seed 7).
    assert!(weeks.len() >= 20, "{} person-weeks", weeks.len());
    let (status, ready) = client.get("/readyz").await.unwrap();
    assert_eq!(
        (status, &ready["pipeline"]["uncounted"]),
        (200, &json!(0)),
        "{ready}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulate_counts_every_accepted_event() {
    every_accepted_event_is_counted(Bus::Embedded, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulate_counts_every_accepted_event_on_kafka_and_clickhouse() {
    every_accepted_event_is_counted(Bus::kafka(), Some(TestClickHouse::from_env())).await;
}

/// One person's ordinary day as two watchers and a calendar upload it: window focus, then
/// the AFK spans, then the meetings, all in one request.
fn day_of(user: &str, day: chrono::NaiveDate) -> Vec<Value> {
    let at = |h: u32, m: u32| {
        day.and_hms_opt(h, m, 0)
            .unwrap()
            .and_utc()
            .timestamp_millis()
    };
    let mut focus = Vec::new();
    let mut afk = Vec::new();
    let mut meetings = Vec::new();
    let apps = ["Code", "Slack", "Firefox", "Code", "Mail"];
    for (i, h) in (8..18).enumerate() {
        for q in 0..4 {
            let app = apps[(i + q) % apps.len()];
            focus.push(json!({"user_id": user, "source": "aw-watcher-window",
                "kind": "window_focus", "timestamp": at(h, q as u32 * 15),
                "duration_ms": 14 * 60_000, "attributes": {"app": app, "title": app}}));
        }
        // Away for the last 10 minutes of every other hour.
        let away = i % 2 == 1;
        afk.push(
            json!({"user_id": user, "source": "aw-watcher-afk", "kind": "afk",
            "timestamp": at(h, 0), "duration_ms": if away { 50 } else { 60 } * 60_000,
            "attributes": {"status": "not-afk"}}),
        );
        if away {
            afk.push(
                json!({"user_id": user, "source": "aw-watcher-afk", "kind": "afk",
                "timestamp": at(h, 50), "duration_ms": 10 * 60_000,
                "attributes": {"status": "afk"}}),
            );
        }
    }
    for h in [10, 14] {
        meetings.push(
            json!({"user_id": user, "source": "calendar", "kind": "meeting",
            "timestamp": at(h, 0), "duration_ms": 30 * 60_000,
            "attributes": {"participants": [user, "bob"], "status": "accepted"}}),
        );
    }
    focus.into_iter().chain(afk).chain(meetings).collect()
}

/// The day windows of `user` on `day`: feature → value.
async fn day_features(client: &Client, user: &str, day: chrono::NaiveDate) -> Value {
    let from = format!("{day}T00:00:00Z");
    let to = format!("{}T00:00:00Z", day.checked_add_days(Days::new(1)).unwrap());
    let (status, body) = client
        .get(&format!(
            "/v1/users/{user}/features?granularity=day&from={from}&to={to}"
        ))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    body["windows"][0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_day_in_one_request_counts_in_full_in_any_order() {
    a_day_in_one_request(Bus::Embedded, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_day_in_one_request_counts_in_full_in_any_order_on_kafka_and_clickhouse() {
    a_day_in_one_request(Bus::kafka(), Some(TestClickHouse::from_env())).await;
}

async fn a_day_in_one_request(bus: Bus, store: Option<TestClickHouse>) {
    let (_data, server) = start(&bus, store.as_ref()).await;
    let client = server.client(KEY);
    let day = Utc::now()
        .date_naive()
        .checked_sub_days(Days::new(2))
        .unwrap();
    let sorted = {
        let mut d = day_of("sorted", day);
        d.sort_by_key(|e| e["timestamp"].as_i64());
        d
    };
    let by_watcher = day_of("watchers", day);
    let mut newest_first = day_of("newest", day);
    newest_first.sort_by_key(|e| std::cmp::Reverse(e["timestamp"].as_i64()));
    for events in [&sorted, &by_watcher, &newest_first] {
        let (status, body) = client.post_events(events).await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["accepted"].as_u64(), Some(events.len() as u64));
    }
    // By hand: 10 hours of focus, 14 of every 15 minutes (14 min × 4 × 10 = 560 min). The
    // AFK watcher is away h:50–h+1:00 in 5 of the hours, absent in full: the focus
    // h:45–h:59 loses 9 minutes there, 5 × 9 = 45 min. Meetings (10:00, 14:00) fall in
    // present time and add no focus.
    let want_active = (560.0 - 45.0) * 60.0;
    let want = eventually(Duration::from_secs(30), || async {
        let w = day_features(&client, "sorted", day).await;
        let active = w["features"]["active_seconds"].as_f64().unwrap_or(0.0);
        Ok((active == want_active && w["is_final"] == true).then_some(w))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: the sorted day never reached {want_active} s active"));
    assert_eq!(want["features"]["event_count"], 40.0 + 15.0 + 2.0);
    // Posted after the fact: final at once, never revised.
    assert!(want["final_at"].is_string(), "{want}");
    assert_eq!(want["revised"], false, "{want}");
    for user in ["watchers", "newest"] {
        let got = eventually(Duration::from_secs(30), || async {
            let w = day_features(&client, user, day).await;
            Ok(
                (w["features"] == want["features"] && w["breakdowns"] == want["breakdowns"])
                    .then_some(w),
            )
        })
        .await;
        assert!(
            got.is_ok(),
            "{user}: {} vs sorted {}",
            day_features(&client, user, day).await,
            want
        );
    }
    let dead = client
        .rows("SELECT count(*) AS n FROM dead_letters")
        .await
        .unwrap();
    assert_eq!(dead, vec![json!({"n": 0})]);
}

/// A device's day uploaded three days late, after the person's later days are final and out
/// of memory: the upload revises that day's affected hour, the day, its week and the rolling
/// values of the later days, and nothing else — no other hour, no other person.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_day_uploaded_days_late_revises_only_its_windows() {
    // Days leave memory as soon as they are final, as they would hours after a burst.
    let (_data, server) = start_with(
        &Bus::Embedded,
        None,
        &[
            ("DIGAME_PIPELINE__HOLD_DAYS", "0"),
            ("DIGAME_PIPELINE__HOLD_TOUCHED_SECS", "0"),
        ],
    )
    .await;
    let client = server.client(KEY);
    let today = Utc::now().date_naive();
    let days: Vec<chrono::NaiveDate> = (1..=4)
        .rev()
        .map(|n| today.checked_sub_days(Days::new(n)).unwrap())
        .collect();
    let at =
        |d: chrono::NaiveDate, h: u32| d.and_hms_opt(h, 0, 0).unwrap().and_utc().timestamp_millis();
    // Four ordinary days for "ana" and "ben": present 09:00-17:00, focused on Code.
    let mut events = Vec::new();
    for user in ["ana", "ben"] {
        for &d in &days {
            events.push(
                json!({"user_id": user, "source": "aw-watcher-afk", "kind": "afk",
                "timestamp": at(d, 9), "duration_ms": 8 * 3_600_000,
                "attributes": {"status": "not-afk"}}),
            );
            for h in [9, 10, 11] {
                events.push(json!({"user_id": user, "source": "aw-watcher-window",
                    "kind": "window_focus", "timestamp": at(d, h), "duration_ms": 3_600_000,
                    "attributes": {"app": "Code", "title": "main.rs"}}));
            }
        }
    }
    let (status, body) = client.post_events(&events).await.unwrap();
    assert_eq!(status, 200, "{body}");
    counted(&client, events.len() as u64).await;
    // Every day final, out of memory; what has been written so far.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let max = |rows: Vec<Value>| rows[0]["r"].as_i64().unwrap_or(0);
    let before = max(client
        .rows("SELECT MAX(revision) AS r FROM features")
        .await
        .unwrap());

    // Ana's laptop was offline: its browser focus of 14:00-15:00 on the first day arrives
    // now, three days after that day ended.
    let late = json!({"user_id": "ana", "source": "aw-watcher-window", "kind": "window_focus",
        "timestamp": at(days[0], 14), "duration_ms": 3_600_000,
        "attributes": {"app": "Firefox", "title": "docs"}});
    let (status, body) = client.post_events(&[late]).await.unwrap();
    assert_eq!(status, 200, "{body}");
    counted(&client, events.len() as u64 + 1).await;
    let revised = client
        .rows(&format!(
            "SELECT user_id, granularity, window_start, feature FROM features \
             WHERE revision > {before} ORDER BY granularity, window_start, feature"
        ))
        .await
        .unwrap();
    assert!(!revised.is_empty());
    let first_day = format!("{}", days[0]);
    let hour_14 = format!("{}T14:00:00", days[0]);
    let rolling = [
        "network_size",
        "manager_one_on_one_minutes_per_week",
        "manager_one_on_one_low",
    ];
    for r in &revised {
        let start = r["window_start"].as_str().unwrap();
        let fits = r["user_id"] == "ana"
            && match r["granularity"].as_str().unwrap() {
                "hour" => start.starts_with(&hour_14),
                "day" => {
                    start.starts_with(&first_day)
                        || rolling.contains(&r["feature"].as_str().unwrap())
                }
                _ => true,
            };
        assert!(fits, "an unaffected window was revised: {r}");
    }
    // The first day says it was revised after it was final, and counts the browser hour.
    let (_, series) = client
        .get(&format!(
            "/v1/users/ana/features?granularity=day&from={first_day}T00:00:00Z&to={}T00:00:00Z",
            days[1]
        ))
        .await
        .unwrap();
    let day = &series["windows"][0];
    assert_eq!(
        (&day["is_final"], &day["revised"]),
        (&json!(true), &json!(true)),
        "{day}"
    );
    assert_eq!(day["features"]["active_seconds"], 4.0 * 3600.0, "{day}");
}

/// One id, one event: the same id again for the same event is a retry (counted once), for a
/// different event it is refused with the reason — within a request (naming the first
/// event's index) and across requests (another person's event included); nothing the id
/// named first is erased.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_id_names_one_event() {
    // The idempotency index is on by default.
    let (_data, server) = start_with(&Bus::Embedded, None, &[]).await;
    let client = server.client(KEY);
    let t = Utc::now().timestamp_millis() - 3_600_000;
    let commit = |user: &str, project: &str| {
        json!({"event_id": "0195a6a4-0000-7000-a000-000000000001", "user_id": user,
               "source": "git", "kind": "commit", "timestamp": t,
               "attributes": {"project": project}})
    };
    let (status, body) = client
        .post_events(&[commit("ana", "p"), commit("ana", "p"), commit("ana", "q")])
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["accepted"], 2, "{body}");
    assert_eq!(body["rejected"][0]["index"], 2, "{body}");
    let reason = body["rejected"][0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("also the id of the different event at index 0"),
        "{reason}"
    );
    // Later requests: a retry of Ana's event is accepted (and counted once); Ben's event and
    // a changed Ana event under the same id are refused, whatever request they come in.
    let (status, body) = client.post_events(&[commit("ana", "p")]).await.unwrap();
    assert_eq!((status, &body["accepted"]), (200, &json!(1)), "{body}");
    for other in [commit("ben", "p"), commit("ana", "q")] {
        let (status, body) = client.post_events(&[other]).await.unwrap();
        assert_eq!(status, 422, "{body}");
        let reason = body["rejected"][0]["reason"].as_str().unwrap();
        assert!(
            reason.contains("already names a different event"),
            "{reason}"
        );
    }
    client
        .await_rows(
            "SELECT user_id, project, count(*) AS n FROM events GROUP BY user_id, project",
            &[json!({"user_id": "ana", "project": "p", "n": 1})],
            Duration::from_secs(20),
        )
        .await
        .unwrap();
    assert_eq!(counted(&client, 1).await, 1, "Ana's event, once");
}
