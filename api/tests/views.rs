//! Analysis and visualization routes end to end: the hour-of-week heatmap, the Sankey of
//! app transitions, the radar against team percentiles and the work-style clusters, with
//! values worked out by hand from the events below.

use std::time::Duration;

use chrono::{Datelike, Days, Utc};
use digame_testkit::{Bus, DigameProcess, assert_refused, eventually, utc_ms};
use serde_json::{Value, json};

const INGEST_KEY: &str = "views-ingest-0123456789abcdef";
const ADMIN_KEY: &str = "views-admin-0123456789abcdef";
const MIN: i64 = 60_000;

fn span(user: &str, kind: &str, start: i64, minutes: i64, attributes: Value) -> Value {
    json!({"user_id": user, "source": "aw", "kind": kind, "timestamp": start,
           "duration_ms": minutes * MIN, "attributes": attributes})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heatmap_sankey_radar_and_styles() {
    let data = tempfile::tempdir().unwrap();
    let env = [
        ("DIGAME_INGEST_KEYS", "views-ingest-0123456789abcdef:acme"),
        ("DIGAME_ADMIN_KEYS", "views-admin-0123456789abcdef:acme"),
    ];
    let mut server = DigameProcess::start_backends(
        std::path::Path::new(env!("CARGO_BIN_EXE_digame")),
        data.path(),
        &env,
        &Bus::Embedded,
        None,
    )
    .await
    .unwrap();
    let admin = server.client(ADMIN_KEY);
    let ingest = server.client(INGEST_KEY);
    for i in 0..5 {
        let (status, body) = admin
            .put_json(&format!("/v1/users/p{i}/profile"), &json!({"team": "core"}))
            .await
            .unwrap();
        assert_eq!(status, 200, "{body}");
    }
    // Last week's Monday (UTC, the profiles' zone): the range below is then one complete
    // week, which styles and the radar need, whatever today's weekday.
    let today = Utc::now().date_naive();
    let day = today
        .checked_sub_days(Days::new(
            7 + u64::from(today.weekday().num_days_from_monday()),
        ))
        .unwrap();
    let at = |h: u32, m: u32| utc_ms(day, h, m);
    // p0, 09:00–10:00 present: Code 30 min, Slack 10, Code 20.
    let mut events = vec![
        span("p0", "afk", at(9, 0), 60, json!({"status": "not-afk"})),
        span("p0", "window_focus", at(9, 0), 30, json!({"app": "Code"})),
        span("p0", "window_focus", at(9, 30), 10, json!({"app": "Slack"})),
        span("p0", "window_focus", at(9, 40), 20, json!({"app": "Code"})),
    ];
    // p1–p4: 30 min of Code from 09:00.
    for i in 1..5 {
        let u = format!("p{i}");
        events.push(span(&u, "afk", at(9, 0), 30, json!({"status": "not-afk"})));
        events.push(span(
            &u,
            "window_focus",
            at(9, 0),
            30,
            json!({"app": "Code"}),
        ));
    }
    let (status, body) = ingest.post_events(&events).await.unwrap();
    assert_eq!(status, 200, "{body}");

    // ---- Heatmap: one week from that day; 60 active minutes on its weekday at 09:00. ----
    let to = day.checked_add_days(Days::new(7)).unwrap();
    let range = format!("from={day}T00:00:00Z&to={to}T00:00:00Z");
    let weekday = day.weekday().num_days_from_monday() as usize;
    let pattern = eventually(Duration::from_secs(20), || async {
        let (status, body) = ingest.get(&format!("/v1/users/p0/pattern?{range}")).await?;
        anyhow::ensure!(status == 200, "{body}");
        Ok((body["heatmap"]["z"][weekday][9] == 60.0).then_some(body))
    })
    .await
    .unwrap();
    let heat = &pattern["heatmap"];
    assert_eq!(heat["weeks"], 1);
    assert_eq!(heat["cells"], json!([[9, weekday, 60.0]]));
    assert_eq!(
        heat["y"][weekday],
        ["mon", "tue", "wed", "thu", "fri", "sat", "sun"][weekday]
    );
    // All activity is in the earlier half of the range.
    assert_eq!(pattern["shift"]["distance"], 1.0);

    // ---- Sankey: Code → Slack → Code. ----------------------------------------------------
    let (status, body) = ingest
        .get(&format!("/v1/users/p0/transitions?{range}"))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["sankey"],
        json!({"nodes": [{"name": "Code"}, {"name": "Slack"}],
               "links": [{"source": 0, "target": 1, "value": 1},
                         {"source": 1, "target": 0, "value": 1}]})
    );
    let reply = ingest
        .get("/v1/users/p0/transitions?from=2026-01-01T00:00:00Z&to=2026-03-01T00:00:00Z")
        .await
        .unwrap();
    assert_refused(&reply, 400, "at most 31 days");

    // ---- Radar: development share p0 50/60; the team's others 1.0. ------------------------
    let radar = eventually(Duration::from_secs(20), || async {
        let (status, body) = admin.get(&format!("/v1/users/p0/radar?{range}")).await?;
        anyhow::ensure!(status == 200 || status == 403, "{body}");
        Ok((status == 200 && body["team_people"] == 5).then_some(body))
    })
    .await
    .unwrap();
    let names: Vec<&str> = radar["indicators"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    let dev = names
        .iter()
        .position(|n| *n == "development_share")
        .unwrap();
    let comm = names
        .iter()
        .position(|n| *n == "communication_share")
        .unwrap();
    let close = |v: &Value, want: f64| (v.as_f64().unwrap() - want).abs() < 1e-9;
    assert!(close(&radar["person"][dev], 50.0 / 60.0), "{radar}");
    assert!(close(&radar["person"][comm], 10.0 / 60.0), "{radar}");
    // The team mean: (50/60 + 4 × 1) / 5 and (10/60 + 4 × 0) / 5; no percentiles (each
    // would be one colleague's value).
    assert!(
        close(&radar["team_mean"][dev], (50.0 / 60.0 + 4.0) / 5.0),
        "{radar}"
    );
    assert!(
        close(&radar["team_mean"][comm], 10.0 / 60.0 / 5.0),
        "{radar}"
    );
    assert!(radar.get("team_median").is_none(), "{radar}");
    // The axis' scale hides every colleague: twice the team mean (50/60 + 4 × 1) / 5,
    // above p0's own 50/60; the team maximum (1.0, someone's own value) is not shown.
    assert!(
        close(
            &radar["indicators"][dev]["max"],
            2.0 * (50.0 / 60.0 + 4.0) / 5.0
        ),
        "{radar}"
    );

    // ---- Styles: five person-weeks, k from the silhouette over 2..4. ---------------------
    let (status, styles) = admin.get(&format!("/v1/styles?{range}")).await.unwrap();
    assert_eq!(status, 200, "{styles}");
    assert_eq!(
        styles["assignments"].as_array().unwrap().len(),
        5,
        "{styles}"
    );
    let k = styles["k"].as_u64().unwrap();
    assert!((2..=4).contains(&k), "{styles}");
    assert_eq!(styles["silhouette_by_k"].as_array().unwrap().len(), 3);
    // The odd one out (p0, the only one with chat) is not in the others' cluster.
    let cluster_of = |u: &str| {
        styles["assignments"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["user"] == u)
            .unwrap()["cluster"]
            .clone()
    };
    assert_ne!(cluster_of("p0"), cluster_of("p1"));
    let (status, body) = server
        .key_client(INGEST_KEY)
        .get(&format!("/v1/styles?{range}"))
        .await
        .unwrap();
    assert_eq!(status, 403, "styles are for admins: {body}");

    let exit = server.terminate().await.unwrap();
    assert!(exit.success(), "{exit}");
}
