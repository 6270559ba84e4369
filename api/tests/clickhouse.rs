//! Digame on ClickHouse, against a server of the test's own started by the project's
//! script: a ClickHouse restart while events flow loses nothing that was acknowledged;
//! deleting a person's data and applying retention over the admin API.

use std::path::Path;
use std::time::Duration;

use chrono::{Days, Utc};
use digame_testkit::{
    Bus, DigameProcess, EVENT_COUNTS_BY_USER, ScriptServer, TestClickHouse, utc_ms,
};
use serde_json::{Value, json};

const KEY: &str = "acme-key-0123456789abcdef";

/// Two free ports in a row (HTTP and native).
fn free_port_pair() -> u16 {
    loop {
        let p = digame_testkit::free_port();
        if p < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            return p;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_restart_while_events_flow_loses_nothing() {
    // Fail (not skip) without the server the test script installs.
    let _ = TestClickHouse::from_env();
    let dir = tempfile::tempdir().unwrap();
    let ch_dir = dir.path().join("clickhouse");
    let port = free_port_pair();
    let server = ScriptServer::start("clickhouse", &ch_dir, port);
    let ch = TestClickHouse {
        url: format!("http://127.0.0.1:{port}"),
        password: std::fs::read_to_string(ch_dir.join("password")).unwrap(),
        database: "restart".into(),
    };
    let mut env: Vec<(&str, &str)> = vec![
        ("DIGAME_INGEST_KEYS", "acme-key-0123456789abcdef:acme"),
        ("DIGAME_STORE__CLICKHOUSE__INSERT_ATTEMPTS", "2"),
    ];
    let store_env = ch.env();
    env.extend(store_env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let data = dir.path().join("digame");
    let digame = DigameProcess::start_on(
        Path::new(env!("CARGO_BIN_EXE_digame")),
        &data,
        &env,
        &Bus::Embedded,
    )
    .await
    .unwrap();
    let client = digame.client(KEY);
    let day = Utc::now()
        .date_naive()
        .checked_sub_days(Days::new(1))
        .unwrap();
    let users = ["u0", "u1", "u2", "u3"];
    let request = |r: usize| -> Vec<Value> {
        (0..48)
            .map(|i| {
                let n = r * 48 + i;
                json!({"event_id": format!("0195a6a4-0000-7000-8000-{n:012x}"),
                       "user_id": users[i % users.len()], "source": "git", "kind": "commit",
                       "timestamp": utc_ms(day, 10, 0) + (n as i64) * 100,
                       "attributes": {"project": "p"}})
            })
            .collect()
    };
    let requests = 12;
    let mut saw_store_down = false;
    for r in 0..requests {
        if r == 4 {
            server.run("stop");
        }
        // The bus is embedded: ingest acknowledges while ClickHouse is down.
        let (status, body) = client.post_events(&request(r)).await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["accepted"], 48, "{body}");
        if (4..8).contains(&r) {
            tokio::time::sleep(Duration::from_millis(700)).await;
            let (status, ready) = client.get("/readyz").await.unwrap();
            saw_store_down |= status == 503 && ready["store"]["ok"] == false;
        }
        if r == 8 {
            server.run("start");
        }
    }
    assert!(saw_store_down, "/readyz never reported the store down");

    let per_user = (requests * 48 / users.len()) as f64;
    let expected: Vec<Value> = users
        .iter()
        .map(|u| json!({"user_id": u, "n": per_user}))
        .collect();
    client
        .await_rows(EVENT_COUNTS_BY_USER, &expected, Duration::from_secs(90))
        .await
        .unwrap();
    // Feature rows are written before the raw events they come from: wait for both.
    client
        .await_rows(
            "SELECT count(*) AS n, count(DISTINCT event_id) AS d FROM events",
            &[json!({"n": requests * 48, "d": requests * 48})],
            Duration::from_secs(20),
        )
        .await
        .unwrap();
    let (status, ready) = client.get("/readyz").await.unwrap();
    assert_eq!(status, 200, "{ready}");
}

/// One focused 10-minute block of `user` at 10:00 yesterday: presence, focus and a commit.
fn block(user: &str, n: u64) -> Vec<Value> {
    let day = Utc::now()
        .date_naive()
        .checked_sub_days(Days::new(1))
        .unwrap();
    let at = utc_ms(day, 10, 0);
    let id = |k: u64| format!("0195a6a4-0000-7000-8000-{:012x}", n * 10 + k);
    vec![
        json!({"event_id": id(1), "user_id": user, "source": "aw", "kind": "afk",
               "timestamp": at, "duration_ms": 600_000, "attributes": {"status": "not-afk"}}),
        json!({"event_id": id(2), "user_id": user, "source": "aw", "kind": "window_focus",
               "timestamp": at, "duration_ms": 600_000, "attributes": {"app": "Code"}}),
        json!({"event_id": id(3), "user_id": user, "source": "git", "kind": "commit",
               "timestamp": at + 60_000, "attributes": {"project": "p"}}),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admins_delete_a_person_and_apply_retention_in_their_tenant_only() {
    let ch = TestClickHouse::from_env();
    let data = tempfile::tempdir().unwrap();
    let mut env: Vec<(&str, &str)> = vec![
        (
            "DIGAME_INGEST_KEYS",
            "acme-key-0123456789abcdef:acme,globex-key-0123456789abcdef:globex",
        ),
        (
            "DIGAME_ADMIN_KEYS",
            "acme-admin-0123456789abcdef:acme,globex-admin-0123456789abcdef:globex",
        ),
        ("DIGAME_STORE__RETENTION_DAYS__GLOBEX", "0"),
    ];
    let store_env = ch.env();
    env.extend(store_env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let digame = DigameProcess::start_on(
        Path::new(env!("CARGO_BIN_EXE_digame")),
        data.path(),
        &env,
        &Bus::Embedded,
    )
    .await
    .unwrap();
    let acme = digame.client(KEY);
    let globex = digame.client("globex-key-0123456789abcdef");
    for (client, user, n) in [
        (&acme, "alice", 1),
        (&acme, "bob", 2),
        (&globex, "alice", 3),
    ] {
        let (status, body) = client.post_events(&block(user, n)).await.unwrap();
        assert_eq!(status, 200, "{body}");
    }
    let count = "SELECT user_id, count(*) AS n FROM events GROUP BY user_id ORDER BY user_id";
    acme.await_rows(
        count,
        &[
            json!({"user_id": "alice", "n": 3}),
            json!({"user_id": "bob", "n": 3}),
        ],
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    let features = "SELECT user_id, count(*) AS n FROM features GROUP BY user_id ORDER BY user_id";
    let before = acme.rows(features).await.unwrap();
    let alice_features = before[0]["n"].as_u64().unwrap();
    assert!(alice_features > 0, "{before:?}");

    // Ingest keys are not admin keys; admins act in their own tenant only.
    let (status, body) = digame
        .key_client(KEY)
        .delete("/v1/users/alice/data")
        .await
        .unwrap();
    assert_eq!(status, 403, "{body}");
    let globex_admin = digame.client("globex-admin-0123456789abcdef");
    let acme_admin = digame.client("acme-admin-0123456789abcdef");
    let (status, report) = acme_admin.delete("/v1/users/alice/data").await.unwrap();
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["rows"]["events"], 3, "{report}");
    assert_eq!(report["rows"]["features"], alice_features, "{report}");
    assert_eq!(report["rows"]["dead_letters"], 0, "{report}");
    assert_eq!(
        acme.rows(count).await.unwrap(),
        [json!({"user_id": "bob", "n": 3})]
    );
    assert_eq!(acme.rows(features).await.unwrap(), [before[1].clone()]);
    // globex's alice is another person.
    assert_eq!(
        globex.rows(count).await.unwrap(),
        [json!({"user_id": "alice", "n": 3})]
    );

    // Retention keeping 0 days removes the rest of acme's data, none of globex's.
    let (status, body) = acme_admin
        .post_json("/v1/retention", &json!({"keep": 1}))
        .await
        .unwrap();
    assert_eq!(status, 400, "{body}");
    // globex configures 0 days (set below in the environment) but acme configures none.
    let (status, body) = acme_admin
        .post_json("/v1/retention", &json!({}))
        .await
        .unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no retention configured")
    );
    let (status, report) = acme_admin
        .post_json("/v1/retention", &json!({"keep_days": 0}))
        .await
        .unwrap();
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["rows"]["events"], 3, "{report}");
    assert_eq!(report["rows"]["features"], before[1]["n"], "{report}");
    assert_eq!(acme.rows(count).await.unwrap(), Vec::<Value>::new());
    assert_eq!(
        globex.rows(count).await.unwrap(),
        [json!({"user_id": "alice", "n": 3})]
    );
    let (status, report) = globex_admin.delete("/v1/users/bob/data").await.unwrap();
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["rows"]["events"], 0, "{report}");
    // globex's configured retention (0 days) applies without a number.
    let (status, report) = globex_admin
        .post_json("/v1/retention", &json!({}))
        .await
        .unwrap();
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["rows"]["events"], 3, "{report}");
}
