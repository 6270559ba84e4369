//! Recomputation from stored events alone: the golden days' raw events are written to an
//! embedded store with no pipeline running, a recompute job derives the features, and every
//! hand-computed golden value is read back; a stale value in the range is retracted to 0
//! and a row outside the range is left alone. Every row written is also on the features
//! stream, where other nodes' read caches take it in.

use std::sync::Arc;

use digame_api::recompute::{RecomputeReport, RecomputeSpec, Recomputer};
use digame_infra::bus::{EventBus, LogBus, LogConfig, Topic};
use digame_infra::config::{PipelineConfig, QueryConfig};
use digame_infra::meta::MetaStore;
use digame_infra::store::{ParquetStore, StoreBatch, StoreSink};
use digame_query::QueryEngine;
use digame_schemas::{ActivityEvent, EventTime, FeatureRow, Granularity, PersonProfile};
use digame_testkit::golden;

fn row(user: &str, start: &str, feature: &str, dimension: &str, value: f64) -> FeatureRow {
    let start = EventTime(golden::at(start));
    FeatureRow {
        tenant_id: golden::TENANT.into(),
        user_id: user.into(),
        granularity: Granularity::Day,
        window_start: start,
        window_end: EventTime(start.0 + 86_400_000),
        timezone: "Europe/Berlin".into(),
        feature: feature.to_string().into(),
        dimension: dimension.into(),
        value,
        feature_version: digame_schemas::FEATURE_VERSION,
        params_version: 1,
        is_final: true,
        revision: 1,
        final_revision: 1,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recompute_from_stored_events_reproduces_the_golden_days() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(ParquetStore::open(dir.path().join("store")).unwrap());
    let meta = MetaStore::open("sqlite://", dir.path()).await.unwrap();
    for (user, profile) in golden::profiles() {
        let profile: PersonProfile = serde_json::from_value(profile).unwrap();
        meta.put_profile(golden::TENANT, user, &profile)
            .await
            .unwrap();
    }
    let events: Vec<ActivityEvent> = golden::events()
        .into_iter()
        .map(|v| {
            let mut e: ActivityEvent = serde_json::from_value(v).unwrap();
            e.tenant_id = golden::TENANT.into();
            e.received_at = Some(e.timestamp);
            e
        })
        .collect();
    let n_events = events.len();
    // A value an older computation left in the range (a category that no longer exists),
    // and one outside the range.
    let stale = row(
        "ana",
        "2026-11-24T00:00:00+01:00",
        "active_seconds_by_category",
        "old-category",
        99.0,
    );
    let outside = row(
        "ana",
        "2026-09-01T00:00:00+02:00",
        "active_seconds",
        "",
        42.0,
    );
    store
        .write(&StoreBatch {
            events,
            features: vec![stale, outside],
            ..StoreBatch::default()
        })
        .await
        .unwrap();

    let query = Arc::new(QueryEngine::new(
        dir.path().join("store"),
        QueryConfig::default(),
    ));
    let bus: Arc<dyn EventBus> =
        Arc::new(LogBus::open(LogConfig::new(dir.path().join("bus"))).unwrap());
    let recomputer = Recomputer {
        query: query.clone(),
        store: store.clone(),
        bus: bus.clone(),
        meta: meta.clone(),
        pipeline: PipelineConfig::default(),
        horizon_days: 120,
    };
    let spec = RecomputeSpec {
        from: EventTime(golden::at("2026-10-01T00:00:00Z")),
        to: EventTime(golden::at("2026-12-01T00:00:00Z")),
        users: None,
    };
    let report = recomputer.run(golden::TENANT, &spec, None).await.unwrap();
    assert_eq!(report.people, 3, "{report:?}");
    assert_eq!(report.events_read, n_events);
    assert_eq!(report.rows_retracted, 1, "{report:?}");
    assert!(report.rows_written > 100, "{report:?}");
    // The stream holds exactly the rows written, the retraction among them.
    let mut consumer = bus.subscribe(Topic::Features, "test").await.unwrap();
    let mut published: Vec<FeatureRow> = Vec::new();
    loop {
        let batch = consumer
            .poll(10_000, std::time::Duration::from_millis(200))
            .await
            .unwrap();
        if batch.is_empty() {
            break;
        }
        published.extend(
            batch
                .iter()
                .map(|d| serde_json::from_slice::<FeatureRow>(&d.payload).unwrap()),
        );
    }
    assert_eq!(published.len(), report.rows_written, "{report:?}");
    assert!(
        published
            .iter()
            .any(|r| r.dimension == "old-category" && r.value == 0.0),
        "the retraction is published"
    );

    let mut wrong = Vec::new();
    for (user, g, start, feature, dim, want) in golden::expected() {
        let g = Granularity::parse(g).unwrap();
        let series = query
            .features(
                golden::TENANT,
                user,
                EventTime(start),
                EventTime(start + 1),
                g,
            )
            .await
            .unwrap();
        let w = series.windows.first();
        let got = w.and_then(|w| {
            if dim.is_empty() {
                w.features.get(feature).and_then(|v| v.as_f64())
            } else {
                w.breakdowns
                    .get(feature)
                    .and_then(|d| d.get(dim))
                    .and_then(|v| v.as_f64())
            }
        });
        match (got, w) {
            // Windows that end within the allowed lateness of now (this week) are still open.
            (Some(v), Some(w))
                if (v - want).abs() < 1e-9
                    && (w.is_final || w.window_end.0 + 900_000 > EventTime::now().0) => {}
            _ => wrong.push(format!(
                "{user} {g:?} {start} {feature}[{dim}]: got {got:?}, want {want}"
            )),
        }
    }
    assert!(
        wrong.is_empty(),
        "{} wrong:\n{}",
        wrong.len(),
        wrong.join("\n")
    );

    let day = |start: &str| {
        let q = query.clone();
        let start = EventTime(golden::at(start));
        async move {
            q.features(
                golden::TENANT,
                "ana",
                start,
                EventTime(start.0 + 1),
                Granularity::Day,
            )
            .await
            .unwrap()
            .windows
        }
    };
    let ana = day("2026-11-24T00:00:00+01:00").await;
    assert_eq!(
        ana[0].breakdowns["active_seconds_by_category"]["old-category"], 0.0,
        "the stale value is retracted"
    );
    let before = day("2026-09-01T00:00:00+02:00").await;
    assert_eq!(
        before[0].features["active_seconds"], 42.0,
        "outside the range"
    );

    // Running it again writes the same rows, with nothing left to retract.
    let again = recomputer.run(golden::TENANT, &spec, None).await.unwrap();
    assert_eq!(
        again,
        RecomputeReport {
            rows_retracted: 0,
            rows_written: report.rows_written - 1,
            ..report
        }
    );
}
