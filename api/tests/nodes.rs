//! Two API nodes over one deployment — Kafka (tansu), ClickHouse and PostgreSQL, all real
//! and started by the test script — must agree from the next request on, not when a cache
//! entry or a token expires:
//! - a change computed by either node's pipeline reaches the other node's read cache
//!   through the features stream (with the cache's re-read an hour away, so nothing else
//!   could explain it);
//! - a person's data deleted on one node is gone from the other's reads within
//!   `meta.refresh_ms`;
//! - an analyst demoted on one node has their next SQL request on the other refused.

use std::time::{Duration, Instant};

use chrono::{Days, Utc};
use digame_testkit::{Bus, Client, DigameProcess, TestClickHouse, eventually, utc_ms};
use serde_json::{Value, json};

const INGEST_KEY: &str = "nodes-ingest-0123456789abcdef";
const ADMIN_KEY: &str = "nodes-admin-0123456789abcdef";
const ADMIN_EMAIL: &str = "root@nodes.example";
const ADMIN_PASSWORD: &str = "two nodes, one deployment 7431";
/// Both nodes sign and check tokens with the same key (test-only).
const JWT_KEYS: &str = "k1:nodes-test-signing-key-0123456789abcdef0123456789";
const MIN: i64 = 60_000;
/// How often each node follows the metadata store.
const REFRESH_MS: u64 = 200;

/// `minutes` of focused, present work in Code from `hour` UTC of `day_ms`.
fn work(user: &str, day_ms: i64, hour: i64, minutes: i64) -> Vec<Value> {
    let start = day_ms + hour * 60 * MIN;
    vec![
        json!({"user_id": user, "source": "aw", "kind": "afk", "timestamp": start,
               "duration_ms": minutes * MIN, "attributes": {"status": "not-afk"}}),
        json!({"user_id": user, "source": "aw", "kind": "window_focus", "timestamp": start,
               "duration_ms": minutes * MIN, "attributes": {"app": "Code", "title": "x.rs"}}),
    ]
}

/// The person's active seconds of `date` as `node` answers (None: no such window).
async fn active(node: &Client, user: &str, date: chrono::NaiveDate) -> anyhow::Result<Option<f64>> {
    let (status, body) = node
        .get(&format!(
            "/v1/users/{user}/features?granularity=day&from={date}T00:00:00Z&to={}T00:00:00Z",
            date.checked_add_days(Days::new(1)).unwrap()
        ))
        .await?;
    anyhow::ensure!(status == 200, "{status} {body}");
    Ok(body["windows"]
        .as_array()
        .and_then(|w| w.first())
        .and_then(|w| w["features"]["active_seconds"].as_f64()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_see_each_others_changes_on_the_next_request() {
    let bus = Bus::kafka();
    let store = TestClickHouse::from_env();
    let meta_url = digame_testkit::postgres_database().await;
    let (password, jwt) = (ADMIN_PASSWORD, JWT_KEYS);
    let refresh = REFRESH_MS.to_string();
    let env = [
        (
            "DIGAME_INGEST_KEYS",
            "nodes-ingest-0123456789abcdef:default",
        ),
        ("DIGAME_ADMIN_KEYS", "nodes-admin-0123456789abcdef:default"),
        ("DIGAME_PIPELINE__ALLOWED_LATENESS_SECS", "7200"),
        ("DIGAME_META__URL", meta_url.as_str()),
        ("DIGAME_META__REFRESH_MS", refresh.as_str()),
        ("DIGAME_AUTH__JWT_KEYS", jwt),
        ("DIGAME_AUTH__BOOTSTRAP_EMAIL", ADMIN_EMAIL),
        ("DIGAME_ADMIN_PASSWORD", password),
        // An hour: a value that changes on the other node within the test did not come
        // from the cache re-reading the store.
        ("DIGAME_QUERY__CACHE_TTL_SECS", "3600"),
    ];
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_digame"));
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = DigameProcess::start_backends(bin, dir_a.path(), &env, &bus, Some(&store))
        .await
        .unwrap();
    let mut b = DigameProcess::start_backends(bin, dir_b.path(), &env, &bus, Some(&store))
        .await
        .unwrap();
    let (ingest, admin_a, admin_b) = (
        a.client(INGEST_KEY),
        a.client(ADMIN_KEY),
        b.client(ADMIN_KEY),
    );

    // ---- A change reaches the other node's cache through the stream. --------------------
    let yesterday = Utc::now()
        .date_naive()
        .checked_sub_days(Days::new(1))
        .unwrap();
    let day = utc_ms(yesterday, 0, 0);
    let (status, body) = ingest.post_events(&work("p1", day, 9, 30)).await.unwrap();
    assert_eq!(status, 200, "{body}");
    // B reads p1 (filling its cache) until the first half hour is there.
    eventually(Duration::from_secs(60), || async {
        Ok((active(&admin_b, "p1", yesterday).await? == Some(1800.0)).then_some(()))
    })
    .await
    .expect("node B sees p1's first half hour");
    let (status, body) = ingest.post_events(&work("p1", day, 11, 30)).await.unwrap();
    assert_eq!(status, 200, "{body}");
    eventually(Duration::from_secs(60), || async {
        Ok((active(&admin_b, "p1", yesterday).await? == Some(3600.0)).then_some(()))
    })
    .await
    .expect("node B's cached p1 takes in the second half hour from the stream");

    // ---- A deletion on A empties B's reads within the refresh interval. ------------------
    let (status, body) = admin_a.delete("/v1/users/p1/data").await.unwrap();
    assert_eq!(status, 200, "{body}");
    let deleted = Instant::now();
    eventually(Duration::from_secs(5), || async {
        Ok(active(&admin_b, "p1", yesterday)
            .await?
            .is_none()
            .then_some(()))
    })
    .await
    .expect("node B stops serving p1's deleted values");
    let took = deleted.elapsed();
    println!("deletion on A reached B's reads after {took:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");

    // ---- A demotion on A refuses the analyst's next SQL request on B. --------------------
    let signed_in = |node: &DigameProcess, email: &str, pw: &str| {
        let anon = node.client("anonymous");
        let body = json!({"email": email, "password": pw});
        async move {
            let (status, body) = anon.post_json("/v1/auth/login", &body).await.unwrap();
            assert_eq!(status, 200, "{body}");
            body["access_token"].as_str().unwrap().to_string()
        }
    };
    let root = a.client(&signed_in(&a, ADMIN_EMAIL, password).await);
    let (status, made) = root
        .post_json(
            "/v1/accounts",
            &json!({"email": "carol@nodes.example", "role": "analyst"}),
        )
        .await
        .unwrap();
    assert_eq!(status, 201, "{made}");
    let carol_pw = made["initial_password"].as_str().unwrap();
    let carol_id = made["account"]["account_id"].as_str().unwrap();
    let carol_on_b = b.client(&signed_in(&b, "carol@nodes.example", carol_pw).await);
    assert_eq!(carol_on_b.sql("SELECT 1 AS one").await.unwrap().0, 200);
    let (status, body) = root
        .send_json(
            reqwest::Method::PATCH,
            &format!("/v1/accounts/{carol_id}"),
            &json!({"role": "member"}),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let demoted = Instant::now();
    eventually(Duration::from_secs(5), || async {
        Ok((carol_on_b.sql("SELECT 1 AS one").await?.0 == 403).then_some(()))
    })
    .await
    .expect("node B refuses the demoted analyst's SQL");
    let took = demoted.elapsed();
    println!("demotion on A reached B after {took:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");

    for node in [&mut a, &mut b] {
        let exit = node.terminate().await.unwrap();
        assert!(exit.success(), "{exit}");
    }
}
