//! The golden days (`digame_testkit::golden`) end to end through the real binary, on the
//! embedded backends and on Kafka + ClickHouse: profiles are set through the API, the
//! events arrive shuffled in several requests, and every hand-computed feature value is
//! read back through `GET /v1/users/{user}/features`. The same run checks title/URL
//! redaction at ingest and the settings/profile API's refusals.

use std::collections::BTreeMap;
use std::time::Duration;

use digame_testkit::{
    Bus, DigameProcess, TestClickHouse, assert_refused, eventually, golden, job_succeeded,
};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde_json::{Value, json};

const INGEST_KEY: &str = "golden-ingest-0123456789abcdef";
const ADMIN_KEY: &str = "golden-admin-0123456789abcdef";

type Key = (String, String, i64, String, String);

fn env() -> Vec<(&'static str, &'static str)> {
    vec![
        (
            "DIGAME_INGEST_KEYS",
            "golden-ingest-0123456789abcdef:golden",
        ),
        ("DIGAME_ADMIN_KEYS", "golden-admin-0123456789abcdef:golden"),
        // The golden days are fixed dates: a horizon of ten years keeps them acceptable
        // whatever today is.
        ("DIGAME_INGEST__HORIZON_DAYS", "3650"),
        // Shuffled delivery reaches a few hours back inside one person's day.
        ("DIGAME_PIPELINE__ALLOWED_LATENESS_SECS", "21600"),
        ("DIGAME_META__REFRESH_MS", "100"),
    ]
}

fn ms(text: &Value) -> i64 {
    chrono::DateTime::parse_from_rfc3339(text.as_str().expect("time is a string"))
        .expect("RFC 3339 time")
        .timestamp_millis()
}

/// Every value of every window of `series`, keyed like the expectations.
fn flatten(user: &str, granularity: &str, series: &Value, into: &mut BTreeMap<Key, f64>) {
    for w in series["windows"].as_array().expect("windows") {
        let start = ms(&w["window_start"]);
        let mut put = |feature: &str, dim: &str, v: &Value| {
            into.insert(
                (
                    user.into(),
                    granularity.into(),
                    start,
                    feature.into(),
                    dim.into(),
                ),
                v.as_f64().expect("numeric value"),
            );
        };
        for (f, v) in w["features"].as_object().expect("features") {
            put(f, "", v);
        }
        for (f, dims) in w["breakdowns"].as_object().expect("breakdowns") {
            for (d, v) in dims.as_object().expect("dimensions") {
                put(f, d, v);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn golden_days_through_the_api_on_embedded_backends() {
    golden_days(Bus::Embedded, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn golden_days_through_the_api_on_kafka_and_clickhouse() {
    golden_days(Bus::kafka(), Some(TestClickHouse::from_env())).await;
}

async fn golden_days(bus: Bus, store: Option<TestClickHouse>) {
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
    let admin = server.client(ADMIN_KEY);
    let ingest = server.client(INGEST_KEY);

    // ---- Settings and profiles through the API. --------------------------------------
    let (status, body) = admin.get("/v1/settings").await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["revision"], 0, "defaults before anything is set");
    assert_eq!(body["settings"]["keystroke_timeout_secs"], 900);
    let mut settings = body["settings"].clone();
    settings["redactions"] = json!([
        {"field": "title", "pattern": "secret", "replacement": "[redacted]"},
        {"field": "url", "pattern": "\\?.*$", "replacement": ""}
    ]);
    let (status, body) = admin.put_json("/v1/settings", &settings).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let mut revision = body["revision"].as_i64().unwrap();

    // Refusals name the field and leave the stored settings alone.
    let mut bad = settings.clone();
    bad["keystroke_timeout_secs"] = json!(30);
    let reply = admin.put_json("/v1/settings", &bad).await.unwrap();
    assert_refused(&reply, 400, "keystroke_timeout_secs is 30");
    assert_eq!(reply.1["error"]["code"], "invalid_parameters");
    let reply = admin
        .put_json("/v1/settings", &json!({"afk_timeout": 10}))
        .await
        .unwrap();
    assert_refused(&reply, 400, "unknown field `afk_timeout`");
    let reply = admin
        .put_json(
            "/v1/users/ana/profile",
            &json!({"timezone": "Europe/Nowhere"}),
        )
        .await
        .unwrap();
    assert_refused(&reply, 400, "Europe/Nowhere");
    // Ingest keys do not administer.
    let (status, body) = server
        .key_client(INGEST_KEY)
        .put_json("/v1/settings", &settings)
        .await
        .unwrap();
    assert_eq!(status, 403, "{body}");

    for (user, profile) in golden::profiles() {
        let path = format!("/v1/users/{user}/profile");
        let (status, body) = admin.put_json(&path, &profile).await.unwrap();
        assert_eq!(status, 200, "{body}");
        revision = revision.max(body["revision"].as_i64().unwrap());
        let (_, read) = admin.get(&path).await.unwrap();
        assert_eq!(read["profile"]["timezone"], profile["timezone"]);
    }
    // The pipeline uses the new profiles before the first event.
    eventually(Duration::from_secs(10), || async {
        let (_, ready) = server.client("").get("/readyz").await?;
        Ok((ready["pipeline"]["settings_revision"].as_i64() >= Some(revision)).then_some(()))
    })
    .await
    .expect("the pipeline takes up the stored profiles");

    // ---- The golden events, shuffled, in several requests. ----------------------------
    let mut events = golden::events();
    events.shuffle(&mut rand::rngs::StdRng::seed_from_u64(7));
    for chunk in events.chunks(7) {
        let (status, body) = ingest.post_events(chunk).await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["rejected"], json!([]), "{body}");
    }
    // Redaction: one more person in the tenant, with a secret in a title and a query in a URL.
    let (status, body) = ingest
        .post_events(&[json!({
            "user_id": "zed", "source": "golden", "kind": "window_focus",
            "timestamp": golden::at("2026-11-24T09:00:00Z"), "duration_ms": 60_000,
            "attributes": {"app": "Chrome", "title": "The SECRET plan",
                           "url": "https://example.com/plan?token=abc"}
        })])
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    ingest
        .await_rows(
            "SELECT title, url FROM events WHERE user_id = 'zed'",
            &[json!({"title": "The [redacted] plan", "url": "https://example.com/plan"})],
            Duration::from_secs(20),
        )
        .await
        .unwrap();

    // ---- Every hand-computed value, read back through the features API. ----------------
    assert_golden(&ingest, "live").await;

    // ---- Recompute after a settings change, as a job with progress. ---------------------
    let mut changed = settings.clone();
    changed["min_group_size"] = json!(6);
    let (status, body) = admin.put_json("/v1/settings", &changed).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let reply = admin
        .post_json(
            "/v1/recompute",
            &json!({"from": "2026-11-01T00:00:00Z", "to": "2026-10-01T00:00:00Z"}),
        )
        .await
        .unwrap();
    assert_refused(&reply, 400, "must be after `from`");
    let (status, body) = admin
        .post_json(
            "/v1/recompute",
            &json!({"from": "2026-10-01T00:00:00Z", "to": "2026-12-01T00:00:00Z"}),
        )
        .await
        .unwrap();
    assert_eq!(status, 202, "{body}");
    let job_path = body["status_url"].as_str().unwrap().to_string();
    let job = job_succeeded(&admin, &job_path, Duration::from_secs(30))
        .await
        .unwrap();
    // ana, ben, cho and zed; every stored event read back from the store.
    assert_eq!(
        (job["done"].as_i64(), job["total"].as_i64()),
        (Some(4), Some(4)),
        "{job}"
    );
    let report: Value = serde_json::from_str(job["message"].as_str().unwrap()).unwrap();
    assert_eq!(report["events_read"], golden::events().len() + 1, "{job}");
    assert_golden(&ingest, "recomputed").await;
    let (status, body) = server.key_client(INGEST_KEY).get(&job_path).await.unwrap();
    assert_eq!(status, 403, "jobs are for admins: {body}");
    let (status, _) = admin
        .get("/v1/jobs/00000000-0000-0000-0000-000000000000")
        .await
        .unwrap();
    assert_eq!(status, 404);

    let exit = server.terminate().await.unwrap();
    assert!(exit.success(), "{exit}");
}

/// Waits until every golden value reads back through the features API; on timeout names
/// every value still wrong.
async fn assert_golden(client: &digame_testkit::Client, what: &str) {
    let expected = golden::expected();
    let from = golden::at("2026-10-01T00:00:00Z");
    let to = golden::at("2026-12-01T00:00:00Z");
    let last_wrong = std::sync::Mutex::new(Vec::new());
    let matched = eventually(Duration::from_secs(30), || async {
        let mut got = BTreeMap::new();
        for user in ["ana", "ben", "cho"] {
            for g in ["hour", "day", "week"] {
                let path = format!("/v1/users/{user}/features?granularity={g}&from={from}&to={to}");
                let (status, series) = client.get(&path).await?;
                anyhow::ensure!(status == 200, "{path}: {status} {series}");
                flatten(user, g, &series, &mut got);
            }
        }
        let wrong: Vec<String> = expected
            .iter()
            .filter_map(|(user, g, start, feature, dim, want)| {
                let key = (
                    user.to_string(),
                    g.to_string(),
                    *start,
                    feature.to_string(),
                    dim.to_string(),
                );
                match got.get(&key) {
                    Some(v) if (v - want).abs() < 1e-9 => None,
                    other => Some(format!(
                        "{user} {g} {start} {feature}[{dim}]: got {other:?}, want {want}"
                    )),
                }
            })
            .collect();
        let done = wrong.is_empty();
        *last_wrong.lock().unwrap() = wrong;
        Ok(done.then_some(()))
    })
    .await;
    if matched.is_err() {
        let wrong = last_wrong.lock().unwrap();
        panic!(
            "{what}: {} golden values never matched through the API:\n{}",
            wrong.len(),
            wrong.join("\n")
        );
    }
}
