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

/// An embedded store under `dir` holding `batch`, and a recomputer over it whose rows go
/// to an embedded bus there too.
async fn recomputer_over(
    dir: &std::path::Path,
    batch: StoreBatch,
    meta: &MetaStore,
    horizon_days: u32,
) -> (Recomputer, Arc<dyn EventBus>) {
    recomputer_with(dir, batch, meta, horizon_days, QueryConfig::default()).await
}

/// As [`recomputer_over`], with the query engine's settings given.
async fn recomputer_with(
    dir: &std::path::Path,
    batch: StoreBatch,
    meta: &MetaStore,
    horizon_days: u32,
    config: QueryConfig,
) -> (Recomputer, Arc<dyn EventBus>) {
    let store = Arc::new(ParquetStore::open(dir.join("store")).unwrap());
    store.write(&batch).await.unwrap();
    let bus: Arc<dyn EventBus> = Arc::new(LogBus::open(LogConfig::new(dir.join("bus"))).unwrap());
    let recomputer = Recomputer {
        query: Arc::new(QueryEngine::new(dir.join("store"), config)),
        store,
        bus: bus.clone(),
        meta: meta.clone(),
        pipeline: PipelineConfig::default(),
        horizon_days,
    };
    (recomputer, bus)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recompute_from_stored_events_reproduces_the_golden_days() {
    let dir = tempfile::tempdir().unwrap();
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
    let batch = StoreBatch {
        events,
        features: vec![stale, outside],
        ..StoreBatch::default()
    };
    let (recomputer, bus) = recomputer_over(dir.path(), batch, &meta, 120).await;
    let query = recomputer.query.clone();
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

/// `spec`'s simulated events, as tenant `t` stored them on arrival, and its people.
fn tenant_events(spec: &digame_api::simulate::SimulationSpec) -> (Vec<ActivityEvent>, Vec<String>) {
    let users = (0..spec.people)
        .map(digame_api::simulate::user_id)
        .collect();
    let events = digame_api::simulate::generate(spec)
        .into_iter()
        .map(|v| {
            let mut e: ActivityEvent = serde_json::from_value(v).unwrap();
            e.tenant_id = "t".into();
            e.received_at = Some(e.timestamp);
            e
        })
        .collect();
    (events, users)
}

/// The rows `live` produces from `events` delivered in time order, read at a moment when
/// every window is long closed.
fn sorted_delivery(
    live: &mut digame_pipelines::Processor,
    events: &[ActivityEvent],
) -> Vec<FeatureRow> {
    let mut sorted = events.to_vec();
    sorted.sort_by_key(|e| e.timestamp.0);
    let now = EventTime::now().0;
    for e in &sorted {
        live.process(0, &serde_json::to_vec(e).unwrap(), now);
    }
    live.emit(now)
}

/// The newest non-zero value per (user, granularity, window, feature, dimension).
type Values = std::collections::BTreeMap<(String, Granularity, i64, String, String), f64>;

fn newest_non_zero(rows: &[FeatureRow]) -> Values {
    let mut newest: std::collections::BTreeMap<_, (i64, f64)> = Default::default();
    for r in rows {
        let key = (
            r.user_id.to_string(),
            r.granularity,
            r.window_start.0,
            r.feature.to_string(),
            r.dimension.clone(),
        );
        let slot = newest.entry(key).or_insert((i64::MIN, 0.0));
        if r.revision > slot.0 {
            *slot = (r.revision, r.value);
        }
    }
    newest
        .into_iter()
        .filter(|(_, (_, v))| *v != 0.0)
        .map(|(k, (_, v))| (k, v))
        .collect()
}

/// Everything the store answers for `users`, as [`newest_non_zero`] keys it.
async fn stored_values(query: &QueryEngine, users: &[String], span: (i64, i64)) -> Values {
    let mut out = Values::new();
    for user in users {
        for g in [Granularity::Hour, Granularity::Day, Granularity::Week] {
            let series = query
                .features("t", user, EventTime(span.0), EventTime(span.1), g)
                .await
                .unwrap();
            for w in series.windows {
                let mut put = |feature: &str, dimension: &str, v: &serde_json::Value| {
                    let v = v.as_f64().unwrap();
                    if v != 0.0 {
                        let key = (
                            user.clone(),
                            g,
                            w.window_start.0,
                            feature.into(),
                            dimension.into(),
                        );
                        out.insert(key, v);
                    }
                };
                for (f, v) in &w.features {
                    put(f, "", v);
                }
                for (f, dims) in &w.breakdowns {
                    for (d, v) in dims.as_object().unwrap() {
                        put(f, d, v);
                    }
                }
            }
        }
    }
    out
}

/// A recompute is a replay: for ranges with edges at any hour (UTC midnights among them),
/// over people in zones from UTC−10 to UTC+14, every value after it equals what one sorted
/// delivery of the stored events gives, none lost and none extra, and every stored event
/// is still counted once. Fixed dates, a horizon that keeps them valid for ten years.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recompute_of_any_range_equals_a_sorted_delivery() {
    use digame_api::simulate::SimulationSpec;
    use rand::{Rng, SeedableRng};
    const HOUR: i64 = 3_600_000;
    const DAY: i64 = 24 * HOUR;
    const HORIZON_DAYS: u32 = 3650;
    let zones = [
        "Pacific/Honolulu",
        "America/New_York",
        "UTC",
        "Europe/Berlin",
        "Asia/Kolkata",
        "Pacific/Kiritimati",
    ];
    // Twelve days of six people, ending Friday 2026-11-20 15:00 UTC.
    let until = 1_795_186_800_000;
    let spec = SimulationSpec {
        people: zones.len(),
        days: 12,
        seed: 11,
        until_ms: until,
    };
    let (events, users) = tenant_events(&spec);

    let dir = tempfile::tempdir().unwrap();
    let meta = MetaStore::open("sqlite://", dir.path()).await.unwrap();
    // The sorted delivery: every event in time order through one processor, read at a
    // moment when every window is long closed.
    let mut live =
        digame_pipelines::Processor::new(&PipelineConfig::default(), HORIZON_DAYS).unwrap();
    for (user, zone) in users.iter().zip(zones) {
        let profile: PersonProfile =
            serde_json::from_value(serde_json::json!({"timezone": zone})).unwrap();
        meta.put_profile("t", user, &profile).await.unwrap();
        live.directory.set_profile("t", user, profile).unwrap();
    }
    let rows = sorted_delivery(&mut live, &events);
    assert!(live.pending_dead.is_empty());
    let expected = newest_non_zero(&rows);
    let batch = StoreBatch {
        events: events.clone(),
        features: rows,
        ..StoreBatch::default()
    };
    let (recomputer, _) = recomputer_over(dir.path(), batch, &meta, HORIZON_DAYS).await;
    let query = recomputer.query.clone();
    let span = (until - 30 * DAY, until + 10 * DAY);
    assert_eq!(
        stored_values(&query, &users, span).await,
        expected,
        "as delivered"
    );

    // The data's first UTC midnight and the hours around the data.
    let first_midnight = (until - 12 * DAY).div_euclid(DAY) * DAY + DAY;
    let mut ranges = vec![
        // UTC midnights, as a first try takes them: cuts the days of every zone but UTC.
        (first_midnight + 4 * DAY, first_midnight + 7 * DAY),
        (first_midnight, first_midnight + DAY),
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(35);
    for _ in 0..8 {
        let from = until - 14 * DAY + rng.random_range(0..15 * 24) * HOUR;
        let to = from + rng.random_range(1..6 * 24) * HOUR;
        ranges.push((from, to));
    }
    for (from, to) in ranges {
        let range = RecomputeSpec {
            from: EventTime(from),
            to: EventTime(to),
            users: None,
        };
        let report = recomputer.run("t", &range, None).await.unwrap();
        let got = stored_values(&query, &users, span).await;
        let missing: Vec<_> = expected
            .iter()
            .filter(|(k, v)| got.get(*k) != Some(v))
            .take(5)
            .collect();
        let extra: Vec<_> = got
            .iter()
            .filter(|(k, _)| !expected.contains_key(*k))
            .take(5)
            .collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "recompute of [{}, {}) ({report:?}): wrong or lost {missing:?}, extra {extra:?}",
            EventTime(from),
            EventTime(to)
        );
        assert_eq!(report.rows_retracted, 0, "{report:?}");
        // Every stored event counted once: the day event counts add up to them.
        let counted: f64 = got
            .iter()
            .filter(|((_, g, _, f, d), _)| {
                *g == Granularity::Day && f == "event_count" && d.is_empty()
            })
            .map(|(_, v)| v)
            .sum();
        assert_eq!(counted as usize, events.len());
    }
}

/// A recompute's memory is the events of the few people it reads at once, not the tenant's:
/// under a query memory pool far smaller than the tenant's events need sorted (24 MiB; a
/// listing that sorted them runs out), a recompute of every person succeeds and changes
/// nothing. (At 1,000 people × 14 days, 3M events, the 512 MiB pool ran out so.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recompute_reads_people_in_runs_that_fit_its_memory() {
    use digame_api::simulate::SimulationSpec;
    const DAY: i64 = 86_400_000;
    const HORIZON_DAYS: u32 = 3650;
    let until = 1_795_186_800_000;
    let spec = SimulationSpec {
        people: 30,
        days: 12,
        seed: 3,
        until_ms: until,
    };
    let (events, users) = tenant_events(&spec);
    let dir = tempfile::tempdir().unwrap();
    let meta = MetaStore::open("sqlite://", dir.path()).await.unwrap();
    let mut live =
        digame_pipelines::Processor::new(&PipelineConfig::default(), HORIZON_DAYS).unwrap();
    let rows = sorted_delivery(&mut live, &events);
    let expected = newest_non_zero(&rows);
    let batch = StoreBatch {
        events: events.clone(),
        features: rows,
        ..StoreBatch::default()
    };
    let config = QueryConfig {
        max_memory_bytes: 24 << 20,
        ..QueryConfig::default()
    };
    let (recomputer, _) = recomputer_with(dir.path(), batch, &meta, HORIZON_DAYS, config).await;
    let range = RecomputeSpec {
        from: EventTime(until - 11 * DAY),
        to: EventTime(until),
        users: None,
    };
    let report = recomputer.run("t", &range, None).await.unwrap();
    assert_eq!(report.people, spec.people, "{report:?}");
    assert_eq!(report.rows_retracted, 0, "{report:?}");
    let span = (until - 30 * DAY, until + 10 * DAY);
    assert_eq!(
        stored_values(&recomputer.query, &users, span).await,
        expected
    );
}
