//! Digame on ClickHouse, against a server of the test's own started by the project's
//! script: a ClickHouse restart while events flow loses nothing that was acknowledged.

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
    assert_eq!(
        client
            .rows("SELECT count(*) AS n, count(DISTINCT event_id) AS d FROM events")
            .await
            .unwrap(),
        vec![json!({"n": requests * 48, "d": requests * 48})]
    );
    let (status, ready) = client.get("/readyz").await.unwrap();
    assert_eq!(status, 200, "{ready}");
}
