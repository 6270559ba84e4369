//! The ClickHouse store against a real server (the one `infra/scripts/test` starts): schema
//! migrations, the sink, replays and rows the server refuses. Each test works in a database
//! of its own.

use clickhouse::Row;
use digame_infra::config::ClickHouseConfig;
use digame_infra::store::clickhouse::{
    ClickHouseSettings, ClickHouseStore, live_columns, migrate, spec,
};
use digame_infra::store::{StoreBatch, StoreSink};
use digame_schemas::clickhouse::tables;
use digame_schemas::{ActivityEvent, EventTime, FeatureRow, Granularity};
use digame_testkit::TestClickHouse;
use serde::Deserialize;

fn settings(ch: &TestClickHouse) -> ClickHouseSettings {
    ClickHouseSettings {
        url: ch.url.clone(),
        database: ch.database.clone(),
        config: ClickHouseConfig {
            password: ch.password.clone(),
            ..ClickHouseConfig::default()
        },
    }
}

async fn drop_database(s: &ClickHouseSettings) {
    let _ = s
        .client()
        .query(&format!("DROP DATABASE IF EXISTS `{}`", s.database))
        .execute()
        .await;
}

/// 2026-03-02T09:00:00Z plus `minutes`.
fn t(minutes: i64) -> EventTime {
    EventTime(1_772_442_000_000 + minutes * 60_000)
}

fn feature(user: &str, feature: &str, value: f64, revision: i64) -> FeatureRow {
    FeatureRow {
        tenant_id: "acme".into(),
        user_id: user.into(),
        granularity: Granularity::Hour,
        window_start: t(0),
        window_end: t(60),
        timezone: "UTC".into(),
        feature: feature.to_string().into(),
        dimension: String::new(),
        value,
        feature_version: 1,
        params_version: 0,
        is_final: false,
        revision,
        final_revision: 0,
    }
}

fn event(user: &str, id: u128, minute: i64) -> ActivityEvent {
    let mut e: ActivityEvent = serde_json::from_value(serde_json::json!({
        "user_id": user,
        "source": "test",
        "kind": "window_focus",
        "timestamp": t(minute).0 + 250,
        "duration_ms": 60_000,
        "attributes": {"app": "Code", "participants": ["u2", "u3"]},
        "properties": {"k": 1},
    }))
    .unwrap();
    e.tenant_id = "acme".into();
    e.event_id = Some(uuid::Uuid::from_u128(id));
    e.received_at = Some(t(minute + 1));
    e
}

#[tokio::test]
async fn migrations_apply_from_empty_reapply_as_noop_and_match_schemas() {
    let ch = TestClickHouse::from_env();
    let s = settings(&ch);
    let first = migrate(&s).await.unwrap();
    assert_eq!(first.applied, [1, 2, 3, 4, 5]);
    assert!(first.unchanged.is_empty());
    let again = migrate(&s).await.unwrap();
    assert!(again.applied.is_empty(), "{again:?}");
    assert_eq!(again.unchanged, [1, 2, 3, 4, 5]);

    // The live schema is the one derived from the record types.
    let client = s.client();
    for table in tables() {
        let live = live_columns(&client, &s.database, table.name)
            .await
            .unwrap();
        let derived: Vec<(String, String)> = table
            .columns()
            .into_iter()
            .map(|c| (c.name, c.ch_type))
            .collect();
        assert_eq!(live, derived, "table {}", table.name);
    }
    let rollup = live_columns(&client, &s.database, "events_hourly")
        .await
        .unwrap();
    let names: Vec<&str> = rollup.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["tenant_id", "hour", "kind", "source", "events", "people"]
    );
    drop_database(&s).await;
}

#[tokio::test]
async fn an_edited_migration_is_refused_by_name() {
    let ch = TestClickHouse::from_env();
    let s = settings(&ch);
    let client = s.client();
    s.client()
        .query(&format!("CREATE DATABASE `{}`", s.database))
        .execute()
        .await
        .ok();
    // What a database migrated by a build with a different table definition holds.
    migrate(&s).await.unwrap();
    client
        .query("DROP TABLE digame_migrations")
        .execute()
        .await
        .unwrap();
    client
        .query(
            "CREATE TABLE digame_migrations (version UInt32, name String, checksum String, \
             applied_at DateTime('UTC')) ENGINE = MergeTree() ORDER BY version",
        )
        .execute()
        .await
        .unwrap();
    client
        .query("INSERT INTO digame_migrations VALUES (1, 'tables', 'feedface', now())")
        .execute()
        .await
        .unwrap();
    let err = migrate(&s).await.unwrap_err().to_string();
    assert!(err.contains("migration 1 (tables)"), "{err}");
    assert!(err.contains("feedface"), "{err}");
    assert!(err.contains("add a new migration"), "{err}");
    drop_database(&s).await;
}

#[derive(Row, Deserialize, Debug, PartialEq)]
struct FeatureOut {
    user_id: String,
    feature: String,
    value: f64,
    revision: u64,
    window_start: u32,
    window_start_ms: u16,
}

async fn final_features(s: &ClickHouseSettings) -> Vec<FeatureOut> {
    s.client()
        .query(
            "SELECT user_id, feature, value, revision, window_start, window_start_ms \
             FROM features FINAL ORDER BY user_id, feature",
        )
        .fetch_all()
        .await
        .unwrap()
}

#[tokio::test]
async fn the_sink_writes_rows_and_a_replay_keeps_one_per_key() {
    let ch = TestClickHouse::from_env();
    let s = settings(&ch);
    let store = ClickHouseStore::open(s.clone()).await.unwrap();
    let batch = StoreBatch {
        events: vec![event("u1", 1, 0), event("u1", 2, 5), event("u2", 3, 0)],
        features: vec![
            feature("u1", "active_seconds", 600.0, 10),
            feature("u1", "context_switches", 3.0, 10),
            feature("u2", "active_seconds", 60.0, 11),
        ],
        dead_letters: Vec::new(),
    };
    store.write(&batch).await.unwrap();
    // A replay writes the same rows again, and a newer revision of one key arrives.
    store.write(&batch).await.unwrap();
    let newer = StoreBatch {
        features: vec![feature("u1", "active_seconds", 660.0, 12)],
        ..StoreBatch::default()
    };
    store.write(&newer).await.unwrap();

    let secs = (t(0).0 / 1000) as u32;
    let row = |user: &str, f: &str, value: f64, revision: u64| FeatureOut {
        user_id: user.into(),
        feature: f.into(),
        value,
        revision,
        window_start: secs,
        window_start_ms: 0,
    };
    assert_eq!(
        final_features(&s).await,
        [
            row("u1", "active_seconds", 660.0, 12),
            row("u1", "context_switches", 3.0, 10),
            row("u2", "active_seconds", 60.0, 11),
        ]
    );

    #[derive(Row, Deserialize, Debug, PartialEq)]
    struct EventOut {
        event_id: String,
        timestamp: u32,
        timestamp_ms: u16,
        app: Option<String>,
        participants: Vec<String>,
        properties: Option<String>,
    }
    let events: Vec<EventOut> = s
        .client()
        .query(
            "SELECT event_id, timestamp, timestamp_ms, app, participants, properties \
             FROM events FINAL ORDER BY event_id",
        )
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(events.len(), 3, "{events:?}");
    assert_eq!(events[0].event_id, uuid::Uuid::from_u128(1).to_string());
    assert_eq!(events[0].timestamp, secs);
    assert_eq!(events[0].timestamp_ms, 250);
    assert_eq!(events[1].timestamp, secs + 300);
    assert_eq!(events[0].app.as_deref(), Some("Code"));
    assert_eq!(events[0].participants, ["u2", "u3"]);
    assert_eq!(events[0].properties.as_deref(), Some(r#"{"k":1}"#));

    // The rollup counts distinct events, so the replay did not double them.
    let counted: Vec<(String, u64, u64)> = s
        .client()
        .query(
            "SELECT tenant_id, uniqExactMerge(events), uniqExactMerge(people) \
             FROM events_hourly GROUP BY tenant_id",
        )
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(counted, [("acme".to_string(), 3, 2)]);
    drop_database(&s).await;
}

#[tokio::test]
async fn a_row_clickhouse_refuses_becomes_a_dead_letter_and_its_batch_mates_land() {
    let ch = TestClickHouse::from_env();
    let s = settings(&ch);
    let store = ClickHouseStore::open(s.clone()).await.unwrap();
    // Make the server refuse rows of one user: a materialized column that throws.
    store
        .client()
        .query(
            "ALTER TABLE features ADD COLUMN guard UInt8 \
             MATERIALIZED throwIf(user_id = 'poison')",
        )
        .execute()
        .await
        .unwrap();
    let mut features: Vec<FeatureRow> = (0..9)
        .map(|i| feature(&format!("u{i}"), "active_seconds", f64::from(i), 5))
        .collect();
    features.insert(4, feature("poison", "active_seconds", 99.0, 5));
    store
        .write(&StoreBatch {
            features,
            ..StoreBatch::default()
        })
        .await
        .unwrap();

    let landed = final_features(&s).await;
    let users: Vec<&str> = landed.iter().map(|r| r.user_id.as_str()).collect();
    assert_eq!(
        users,
        ["u0", "u1", "u2", "u3", "u4", "u5", "u6", "u7", "u8"]
    );

    #[derive(Row, Deserialize, Debug)]
    struct Dead {
        stage: String,
        reason_code: String,
        reason: String,
        user_id: Option<String>,
        payload: String,
    }
    let dead: Vec<Dead> = s
        .client()
        .query("SELECT stage, reason_code, reason, user_id, payload FROM dead_letters")
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].stage, "store");
    assert_eq!(dead[0].reason_code, "store_rejected");
    assert_eq!(dead[0].user_id.as_deref(), Some("poison"));
    assert!(dead[0].reason.contains("395"), "{}", dead[0].reason);
    let payload: serde_json::Value = serde_json::from_str(&dead[0].payload).unwrap();
    assert_eq!(payload["value"], 99.0);
    drop_database(&s).await;
}

/// An independent client (`clickhouse-client`, native protocol) reads what the sink wrote.
#[tokio::test]
async fn clickhouse_client_reads_the_rows_the_sink_wrote() {
    let ch = TestClickHouse::from_env();
    let port = std::env::var("TEST_CLICKHOUSE_NATIVE_PORT")
        .expect("TEST_CLICKHOUSE_NATIVE_PORT is not set (infra/scripts/test sets it)");
    let s = settings(&ch);
    let store = ClickHouseStore::open(s.clone()).await.unwrap();
    let batch = StoreBatch {
        features: vec![
            feature("u2", "active_seconds", 60.0, 3),
            feature("u1", "active_seconds", 600.5, 3),
            feature("u1", "active_seconds", 601.5, 4),
        ],
        ..StoreBatch::default()
    };
    store.write(&batch).await.unwrap();
    let out = std::process::Command::new("clickhouse-client")
        .args([
            "--host",
            "127.0.0.1",
            "--port",
            &port,
            "--database",
            &s.database,
        ])
        .args(["--password", &ch.password])
        .args([
            "-q",
            "SELECT user_id, feature, value, window_start FROM features FINAL \
             ORDER BY user_id FORMAT TSV",
        ])
        .output()
        .expect("run clickhouse-client");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "u1\tactive_seconds\t601.5\t2026-03-02 09:00:00\n\
         u2\tactive_seconds\t60\t2026-03-02 09:00:00\n"
    );
    drop_database(&s).await;
}

#[tokio::test]
async fn deleting_a_person_and_applying_retention_report_what_went() {
    use digame_infra::store::Deletion;
    use digame_infra::store::clickhouse::delete;
    let ch = TestClickHouse::from_env();
    let s = settings(&ch);
    let store = ClickHouseStore::open(s.clone()).await.unwrap();
    let mut late = feature("u1", "active_seconds", 5.0, 3);
    late.window_start = t(24 * 60);
    late.window_end = t(25 * 60);
    let mut other_tenant = feature("u1", "active_seconds", 7.0, 3);
    other_tenant.tenant_id = "globex".into();
    let batch = StoreBatch {
        // u1: 2 events, 3 feature keys (one written twice, replaced); u2: 1 and 1.
        events: vec![event("u1", 1, 0), event("u1", 2, 5), event("u2", 3, 0)],
        features: vec![
            feature("u1", "active_seconds", 600.0, 1),
            feature("u1", "active_seconds", 660.0, 2),
            feature("u1", "context_switches", 3.0, 1),
            late,
            feature("u2", "active_seconds", 60.0, 1),
            other_tenant,
        ],
        dead_letters: Vec::new(),
    };
    store.write(&batch).await.unwrap();
    let client = s.client();
    let wait = std::time::Duration::from_secs(60);

    let report = delete(&client, "acme", &Deletion::Person("u1"), wait)
        .await
        .unwrap();
    let want = |e: u64, f: u64| {
        [
            ("anomalies", 0),
            ("dead_letters", 0),
            ("events", e),
            ("features", f),
            ("predictions", 0),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect::<std::collections::BTreeMap<_, _>>()
    };
    assert_eq!(report.rows, want(2, 3));
    assert_eq!(report.rollup_months_rebuilt, [202603]);
    // The rollup no longer counts u1: one event, one person.
    let counted: Vec<(u64, u64)> = client
        .query(
            "SELECT uniqExactMerge(events), uniqExactMerge(people) FROM events_hourly \
             WHERE tenant_id = 'acme'",
        )
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(counted, [(1, 1)]);
    let left: Vec<(String, String)> = client
        .query("SELECT tenant_id, user_id FROM features FINAL ORDER BY tenant_id, user_id")
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(
        left,
        [
            ("acme".to_string(), "u2".to_string()),
            ("globex".into(), "u1".into())
        ]
    );
    let events: u64 = client
        .query("SELECT count() FROM events WHERE user_id = 'u1'")
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(events, 0);

    // Retention: acme's rows before 09:30 go (u2's event at 09:00 and feature window at
    // 09:00); globex keeps its row.
    let report = delete(&client, "acme", &Deletion::Before(t(30)), wait)
        .await
        .unwrap();
    assert_eq!(report.rows, want(1, 1));
    let left: u64 = client
        .query("SELECT count() FROM features FINAL")
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(left, 1);
    drop_database(&s).await;
}

#[test]
fn every_table_has_a_spec() {
    for name in [
        "events",
        "features",
        "anomalies",
        "predictions",
        "dead_letters",
    ] {
        assert!(spec(name).is_some(), "{name}");
    }
}
