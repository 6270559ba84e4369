//! Group views end to end: a team of 5 gets aggregates (hand-computed below), a team of 4
//! gets none, a day with data from only 2 members is suppressed, and groups that differ
//! from an already shown group by fewer than 5 people are refused.

use std::time::Duration;

use chrono::{Days, Utc};
use digame_testkit::{Bus, DigameProcess, TestClickHouse, assert_refused, eventually, utc_ms};
use serde_json::{Value, json};

const INGEST_KEY: &str = "groups-ingest-0123456789abcdef";
const ADMIN_KEY: &str = "groups-admin-0123456789abcdef";
const MIN: i64 = 60_000;

fn env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("DIGAME_INGEST_KEYS", "groups-ingest-0123456789abcdef:acme"),
        ("DIGAME_ADMIN_KEYS", "groups-admin-0123456789abcdef:acme"),
        ("DIGAME_PIPELINE__ALLOWED_LATENESS_SECS", "3600"),
    ]
}

/// `minutes` of focused, present work in Code from 09:00 UTC of `day_ms`.
fn work(user: &str, day_ms: i64, minutes: i64) -> Vec<Value> {
    let start = day_ms + 9 * 60 * MIN;
    vec![
        json!({"user_id": user, "source": "aw", "kind": "afk", "timestamp": start,
               "duration_ms": minutes * MIN, "attributes": {"status": "not-afk"}}),
        json!({"user_id": user, "source": "aw", "kind": "window_focus", "timestamp": start,
               "duration_ms": minutes * MIN, "attributes": {"app": "Code", "title": "x.rs"}}),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_views_keep_k_anonymity_on_embedded_backends() {
    group_views(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_views_keep_k_anonymity_on_clickhouse() {
    group_views(Some(TestClickHouse::from_env())).await;
}

async fn group_views(store: Option<TestClickHouse>) {
    let data = tempfile::tempdir().unwrap();
    let mut server = DigameProcess::start_backends(
        std::path::Path::new(env!("CARGO_BIN_EXE_digame")),
        data.path(),
        &env(),
        &Bus::Embedded,
        store.as_ref(),
    )
    .await
    .unwrap();
    let admin = server.client(ADMIN_KEY);
    let ingest = server.client(INGEST_KEY);

    // core: p0–p4 (5); small: s0–s3 (4); big: b0–b8 (9), of whom b0–b4 report to m1.
    let mut people: Vec<(String, Value)> = Vec::new();
    for i in 0..5 {
        people.push((format!("p{i}"), json!({"team": "core"})));
    }
    for i in 0..4 {
        people.push((format!("s{i}"), json!({"team": "small"})));
    }
    for i in 0..9 {
        let manager = if i < 5 { json!("m1") } else { json!(null) };
        people.push((format!("b{i}"), json!({"team": "big", "manager": manager})));
    }
    for (user, profile) in &people {
        let (status, body) = admin
            .put_json(&format!("/v1/users/{user}/profile"), profile)
            .await
            .unwrap();
        assert_eq!(status, 200, "{body}");
    }

    // Yesterday p_i works (i+1)×10 min: 600, 1200, 1800, 2400, 3000 s of active time.
    // The day before, only p0 and p1 work.
    let today = Utc::now().date_naive();
    let d1 = today.checked_sub_days(Days::new(1)).unwrap();
    let d2 = today.checked_sub_days(Days::new(2)).unwrap();
    let (y, yy) = (utc_ms(d1, 0, 0), utc_ms(d2, 0, 0));
    // Each person's days in order (a day back is beyond the allowed lateness).
    let mut events = work("p0", yy, 30);
    events.extend(work("p1", yy, 30));
    for i in 0..5 {
        events.extend(work(&format!("p{i}"), y, (i + 1) * 10));
    }
    events.extend(work("s0", y, 60));
    let (status, body) = ingest.post_events(&events).await.unwrap();
    assert_eq!(status, 200, "{body}");

    let range = format!("from={d2}T00:00:00Z&to={today}T00:00:00Z");
    let core = format!("/v1/groups/features?team=core&granularity=day&{range}");
    let reply = eventually(Duration::from_secs(20), || async {
        let (status, body) = admin.get(&core).await?;
        anyhow::ensure!(status == 200, "{body}");
        let day = body["windows"]
            .as_array()
            .and_then(|w| w.iter().find(|w| w["date"] == d1.to_string()).cloned());
        Ok(day
            .filter(|d| d["features"]["active_seconds"]["n"] == 5)
            .map(|d| (body, d)))
    })
    .await
    .unwrap();
    let (body, day) = reply;
    assert_eq!(body["members"], 5);
    assert_eq!(body["k"], 5);
    assert_eq!(day["contributors"], 5);
    assert_eq!(day["suppressed"], false);
    // Sorted 600 1200 1800 2400 3000: quartile positions 1, 2, 3 fall on order statistics.
    assert_eq!(
        day["features"]["active_seconds"],
        json!({"n": 5, "sum": 9000.0, "mean": 1800.0, "p25": 1200.0, "median": 1800.0, "p75": 2400.0})
    );
    let earlier = body["windows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["date"] == d2.to_string())
        .cloned()
        .expect("the two-person day is listed");
    assert_eq!(earlier["suppressed"], true, "{earlier}");
    assert_eq!(earlier["contributors"], 2);
    assert_eq!(earlier["features"], json!({}));

    // A team of 4 gets nothing.
    let reply = admin
        .get(&format!("/v1/groups/features?team=small&{range}"))
        .await
        .unwrap();
    assert_refused(
        &reply,
        403,
        "the group has 4 people; group views need at least 5",
    );
    assert_eq!(reply.1["error"]["code"], "group_too_small");

    // big (9) is shown; m1's five reports are then big minus 4 people: refused.
    let (status, body) = admin
        .get(&format!("/v1/groups/features?team=big&{range}"))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["members"], 9);
    let reply = admin
        .get(&format!("/v1/groups/features?manager=m1&{range}"))
        .await
        .unwrap();
    assert_refused(
        &reply,
        403,
        "differs from a group already shown by 4 people",
    );
    assert_eq!(reply.1["error"]["code"], "difference_disclosure");
    // core plus one person would expose that person.
    let reply = admin
        .get(&format!(
            "/v1/groups/features?users=p0,p1,p2,p3,p4,s0&{range}"
        ))
        .await
        .unwrap();
    assert_refused(&reply, 403, "by 1 person;");
    // The same group again is fine; naming no group or two is a 400.
    let (status, _) = admin.get(&core).await.unwrap();
    assert_eq!(status, 200);
    let reply = admin
        .get(&format!("/v1/groups/features?team=core&manager=m1&{range}"))
        .await
        .unwrap();
    assert_refused(&reply, 400, "exactly one of team=, manager= or users=");

    let exit = server.terminate().await.unwrap();
    assert!(exit.success(), "{exit}");
}
