//! Group views end to end: a team of 5 gets aggregates (hand-computed below), a team of 4
//! gets none, a day with data from only 2 members is suppressed, and groups that differ
//! from an already shown group by fewer than 5 people are refused, as are statistics over
//! fewer than 5 people with data. Then an attacker asks for every group of an 11-person
//! org and feeds every answer to a solver, which must recover nobody.

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{Days, Utc};
use digame_testkit::reconstruct::recover;
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
    people.push(("x1".into(), json!({"team": "infra"})));
    people.push(("y1".into(), json!({"team": "sales"})));
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
    // Collaboration: p0 meets p1 and x1 (infra) twice; p1 sends y1 (sales) six messages.
    let at = |h: i64, m: i64| y + h * 60 * MIN + m * MIN;
    for m in [0, 30] {
        events.push(json!({"user_id": "p0", "source": "cal", "kind": "meeting",
            "timestamp": at(11, m), "duration_ms": 20 * MIN,
            "attributes": {"participants": ["p1", "x1"]}}));
    }
    for i in 0..6 {
        events.push(
            json!({"user_id": "p1", "source": "slack", "kind": "message",
            "timestamp": at(14, i), "attributes": {"participants": ["y1"]}}),
        );
    }
    // Flow: p2 commits c1 at 12:00 and c2 at 13:00, p3 deploys both at 16:00, p4's
    // incident inc-1 (caused by c2) opens at 17:00 and is resolved at 19:00.
    let ev = |user: &str, kind: &str, h: i64, attributes: Value, properties: Value| {
        json!({"user_id": user, "source": "connector", "kind": kind, "timestamp": at(h, 0),
               "attributes": attributes, "properties": properties})
    };
    let repo = json!({"project": "digame"});
    events.push(ev("p2", "commit", 12, repo.clone(), json!({"sha": "c1"})));
    events.push(ev("p2", "commit", 13, repo.clone(), json!({"sha": "c2"})));
    events.push(ev(
        "p3",
        "deploy",
        16,
        repo,
        json!({"commits": ["c1", "c2"]}),
    ));
    events.push(ev(
        "p4",
        "incident",
        17,
        json!({"status": "opened"}),
        json!({"id": "inc-1", "commits": ["c2"]}),
    ));
    events.push(ev(
        "p4",
        "incident",
        19,
        json!({"status": "resolved"}),
        json!({"id": "inc-1"}),
    ));
    let (status, body) = ingest.post_events(&events).await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["rejected"], json!([]), "{body}");

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
    assert_eq!(day["suppressed"], false);
    // 600 + 1200 + 1800 + 2400 + 3000 over 5 people; no per-window count of people with
    // data and no order statistics.
    assert_eq!(
        day["features"]["active_seconds"],
        json!({"n": 5, "sum": 9000.0, "mean": 1800.0})
    );
    assert!(day.get("contributors").is_none(), "{day}");
    let earlier = body["windows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["date"] == d2.to_string())
        .cloned()
        .expect("the two-person day is listed");
    assert_eq!(earlier["suppressed"], true, "{earlier}");
    assert_eq!(
        earlier["reason"],
        "fewer than 5 of the group's people have data here; values need at least 5"
    );
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

    // ---- Collaboration graph and engineering flow of core, over the two days. -------------
    let (status, body) = admin
        .get(&format!("/v1/groups/network?team=core&{range}"))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    // Only p0 and p1 have collaboration data (p0: p1 and x1, 2 meetings each; p1: y1, 6
    // messages): statistics over 2 people would describe them, so they are suppressed.
    // (`query/src/network.rs` checks the statistics themselves, by hand.)
    assert_eq!(body["network"], Value::Null, "{body}");
    assert_eq!(body["suppressed"], true);
    assert_eq!(
        body["reason"],
        "fewer than 5 of the group's people have collaboration data here; statistics need at least 5"
    );
    let (status, body) = admin
        .get(&format!("/v1/groups/flow?team=core&{range}"))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    // Lead times 4 h and 3 h; one deploy in two days = 3.5 a week; c2 of 2 changes failed.
    assert_eq!(
        body["flow"],
        json!({"deploys": 1, "deployments_per_week": 3.5, "rate_days": 2.0,
               "deployed_changes": 2,
               "lead_time_hours": 3.5, "change_failure_rate": 0.5,
               "resolved_incidents": 1, "time_to_restore_hours": 2.0})
    );
    let reply = admin.get("/v1/groups/flow?team=small").await.unwrap();
    assert_refused(&reply, 403, "the group has 4 people");

    let exit = server.terminate().await.unwrap();
    assert!(exit.success(), "{exit}");
}

/// The reconstruction attack through the real binary. An org of 11 (team `a` of 5, team
/// `b` of 6, all reporting to `m`) each with a distinct active time yesterday. The admin
/// key (which may ask for any group, more than a manager may) asks first for the six
/// 5-person subsets of `b` that a pairwise difference check let through, then for both
/// teams, the org, and every other subset of 5 or more: 1,486 requests. Every answer's
/// day sum goes to the solver, which must recover nobody's value; the sums themselves
/// are checked against the hand-made data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_group_of_an_org_asked_for_gives_a_solver_nobody() {
    let data = tempfile::tempdir().unwrap();
    let mut env = env();
    env.push(("DIGAME_LIMITS__PER_KEY__PER_PERIOD", "100000"));
    env.push(("DIGAME_LIMITS__PER_KEY__BURST", "100000"));
    let mut server = DigameProcess::start(
        std::path::Path::new(env!("CARGO_BIN_EXE_digame")),
        data.path(),
        &env,
    )
    .await
    .unwrap();
    let admin = server.client(ADMIN_KEY);
    let ingest = server.client(INGEST_KEY);

    let org: Vec<String> = (0..5)
        .map(|i| format!("a{i}"))
        .chain((0..6).map(|i| format!("b{i}")))
        .collect();
    let minutes = |i: usize| 10 * (i as i64 + 1);
    let today = Utc::now().date_naive();
    let d1 = today.checked_sub_days(Days::new(1)).unwrap();
    let y = utc_ms(d1, 0, 0);
    let mut events = Vec::new();
    for (i, user) in org.iter().enumerate() {
        let team = if user.starts_with('a') { "a" } else { "b" };
        let (status, body) = admin
            .put_json(
                &format!("/v1/users/{user}/profile"),
                &json!({"team": team, "manager": "m"}),
            )
            .await
            .unwrap();
        assert_eq!(status, 200, "{body}");
        events.extend(work(user, y, minutes(i)));
    }
    let (status, body) = ingest.post_events(&events).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let seconds =
        |user: &String| 60.0 * minutes(org.iter().position(|u| u == user).unwrap()) as f64;

    let range = format!("from={d1}T00:00:00Z&to={today}T00:00:00Z");
    // Wait until everyone's day is in, reading the org through a query that releases it
    // (the org is nested with everything asked below, so asking it first changes nothing).
    let all_in = format!("/v1/groups/features?manager=m&granularity=day&{range}");
    let want: f64 = org.iter().map(seconds).sum();
    eventually(Duration::from_secs(30), || async {
        let (status, body) = admin.get(&all_in).await?;
        anyhow::ensure!(status == 200, "{body}");
        Ok((body["windows"][0]["features"]["active_seconds"]["sum"] == want).then_some(()))
    })
    .await
    .unwrap();

    let b: Vec<&String> = org[5..].iter().collect();
    let mut asked: Vec<BTreeSet<String>> = (0..6)
        .map(|out| {
            b.iter()
                .enumerate()
                .filter(|(i, _)| *i != out)
                .map(|(_, u)| (*u).clone())
                .collect()
        })
        .collect();
    asked.push(org[..5].iter().cloned().collect());
    asked.push(org[5..].iter().cloned().collect());
    asked.push(org.iter().cloned().collect());
    for mask in 0u32..(1 << org.len()) {
        if mask.count_ones() >= 5 {
            let g: BTreeSet<String> = (0..org.len())
                .filter(|i| mask & (1 << i) != 0)
                .map(|i| org[i].clone())
                .collect();
            if !asked.contains(&g) {
                asked.push(g);
            }
        }
    }
    let mut releases: Vec<(BTreeSet<String>, f64)> = Vec::new();
    let mut refused = 0;
    for g in &asked {
        let users = g.iter().cloned().collect::<Vec<_>>().join(",");
        let (status, body) = admin
            .get(&format!(
                "/v1/groups/features?users={users}&granularity=day&{range}"
            ))
            .await
            .unwrap();
        match status {
            200 => {
                let sum = body["windows"][0]["features"]["active_seconds"]["sum"]
                    .as_f64()
                    .unwrap_or_else(|| panic!("{body}"));
                assert_eq!(sum, g.iter().map(seconds).sum::<f64>(), "{users}");
                releases.push((g.clone(), sum));
            }
            403 => refused += 1,
            _ => panic!("{users}: {status} {body}"),
        }
    }
    println!(
        "asked {} groups: {} released, {refused} refused",
        asked.len(),
        releases.len()
    );
    // The org (asked while waiting) was shown first, and the first subset of b fits inside
    // it (atoms of 5 and 6): both are released, so the solver has work to do.
    assert!(releases.len() >= 2, "{releases:?}");
    let found = recover(&org, &releases);
    assert!(found.is_empty(), "recovered {found:?} from {releases:?}");
    // The same solver over what was asked (had it all been answered) recovers everyone.
    let all_answers: Vec<(BTreeSet<String>, f64)> = asked
        .iter()
        .map(|g| (g.clone(), g.iter().map(seconds).sum()))
        .collect();
    assert_eq!(recover(&org, &all_answers).len(), org.len());

    let exit = server.terminate().await.unwrap();
    assert!(exit.success(), "{exit}");
}

/// A group larger than `query.max_group_members` is refused before anything is read,
/// whichever way it is named; one of exactly that size is not refused for its size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_larger_than_the_configured_cap_are_refused() {
    let data = tempfile::tempdir().unwrap();
    let mut env = env();
    env.push(("DIGAME_QUERY__MAX_GROUP_MEMBERS", "6"));
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_digame"));
    let mut server = DigameProcess::start(bin, data.path(), &env).await.unwrap();
    let admin = server.client(ADMIN_KEY);
    let seven = "users=a1,a2,a3,a4,a5,a6,a7";
    for path in [
        format!("/v1/groups/features?{seven}"),
        format!("/v1/groups/network?{seven}"),
    ] {
        let reply = admin.get(&path).await.unwrap();
        assert_refused(
            &reply,
            400,
            "the group has 7 members; a group view covers at most 6",
        );
    }
    let (status, body) = admin
        .get("/v1/groups/features?users=a1,a2,a3,a4,a5,a6")
        .await
        .unwrap();
    assert_eq!(status, 200, "six members are within the cap: {body}");
    assert_eq!(body["members"], 6);
    let exit = server.terminate().await.unwrap();
    assert!(exit.success(), "{exit:?}");
}
