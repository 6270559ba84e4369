//! Work-style clustering recovers the archetypes planted in `simulate` data: 25 people
//! (5 per archetype) over 28 days, through the feature processor into an embedded store,
//! read back as day windows, turned into person-weeks and clustered. The adjusted Rand
//! index against the planted archetypes is printed and must reach 0.8.

use std::sync::Arc;

use digame_api::simulate::{
    ARCHETYPES, SimulationSpec, archetype_of, generate, profile_of, user_id,
};
use digame_infra::config::{PipelineConfig, QueryConfig};
use digame_infra::store::{ParquetStore, StoreBatch, StoreSink};
use digame_pipelines::Processor;
use digame_query::QueryEngine;
use digame_query::styles::{adjusted_rand_index, cluster, person_weeks};
use digame_schemas::{ActivityEvent, EventTime, Granularity, TimeRange};

const PEOPLE: usize = 25;
const DAYS: u32 = 28;
const ARI_BOUND: f64 = 0.8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clustering_recovers_the_planted_archetypes() {
    // Whatever the weekday and the time of day the data ends at (a night owl's day in
    // progress at noon looks nothing like their finished days; the weeks at the data's
    // edges are cut differently on each weekday), on fixed dates, never the clock's:
    // Monday 2026-11-30 plus 0…6 days, at 03:00, 06:10, 09:20, …, 22:00 UTC.
    const MONDAY: i64 = 1_795_996_800_000;
    assert_eq!(EventTime(MONDAY).to_rfc3339(), "2026-11-30T00:00:00.000Z");
    for day in 0..7 {
        recovers_at(MONDAY + day * 86_400_000 + (3 * 60 + day * 190) * 60_000).await;
    }
}

async fn recovers_at(now: i64) {
    let spec = SimulationSpec {
        people: PEOPLE,
        days: DAYS,
        seed: 42,
        until_ms: now - 60_000,
    };
    let mut p = Processor::new(&PipelineConfig::default(), 30).unwrap();
    p.keep_raw_events = false;
    // As `digame simulate` writes them: teams, managers, zones, working hours.
    for i in 0..PEOPLE {
        let profile = serde_json::from_value(profile_of(i, PEOPLE)).unwrap();
        p.directory
            .set_profile("sim", &user_id(i), profile)
            .unwrap();
    }
    let mut rows = Vec::new();
    for (n, v) in generate(&spec).into_iter().enumerate() {
        let mut ev: ActivityEvent = serde_json::from_value(v).unwrap();
        ev.tenant_id = "sim".into();
        ev.received_at = Some(EventTime(now));
        p.process(0, &serde_json::to_vec(&ev).unwrap(), now);
        // Emit as the runtime does, every so often, so closed days leave the state.
        if n % 20_000 == 19_999 {
            rows.extend(p.emit(now));
        }
    }
    // As a live server sees them at `now`: every past day final, today still in progress.
    rows.extend(p.emit(now));
    assert!(p.pending_dead.is_empty(), "{:?}", &p.pending_dead[..1]);

    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(ParquetStore::open(dir.path()).unwrap());
    store
        .write(&StoreBatch {
            features: rows,
            ..StoreBatch::default()
        })
        .await
        .unwrap();
    let query = QueryEngine::new(dir.path(), QueryConfig::default());
    let mut weeks = Vec::new();
    for i in 0..PEOPLE {
        let user = user_id(i);
        let series = query
            .features(
                "sim",
                &user,
                EventTime(now - 40 * 86_400_000),
                EventTime(now + 86_400_000),
                Granularity::Day,
            )
            .await
            .unwrap();
        let read = TimeRange::new(EventTime(now - 40 * 86_400_000), EventTime(now)).unwrap();
        weeks.extend(person_weeks(&user, &series.windows, read));
    }
    // 28 local days ending with a day in progress hold exactly three complete weeks
    // (Monday to Sunday) whatever the weekday, and everyone works every weekday.
    assert_eq!(weeks.len(), PEOPLE * 3, "person-weeks");

    let model = cluster(&weeks).unwrap();
    let planted: Vec<usize> = model
        .assignments
        .iter()
        .map(|a| {
            let i: usize = a.user.trim_start_matches("person-").parse().unwrap();
            ARCHETYPES
                .iter()
                .position(|x| *x == archetype_of(i))
                .unwrap()
        })
        .collect();
    let found: Vec<usize> = model.assignments.iter().map(|a| a.cluster).collect();
    let ari = adjusted_rand_index(&planted, &found);
    println!(
        "work styles: {} person-weeks, k = {} by silhouette {:?}; adjusted Rand index vs planted archetypes = {ari:.3}; {} DBSCAN outliers (eps {:.2})",
        weeks.len(),
        model.k,
        model.silhouette_by_k,
        model.assignments.iter().filter(|a| a.outlier).count(),
        model.dbscan_eps,
    );
    for c in &model.clusters {
        println!(
            "  cluster {} `{}` ({} weeks): {}",
            c.id, c.name, c.size, c.description
        );
    }
    assert!(
        ari >= ARI_BOUND,
        "adjusted Rand index {ari:.3} is below {ARI_BOUND}"
    );
    assert_eq!(
        model.k,
        ARCHETYPES.len(),
        "the silhouette criterion picks the planted count"
    );
}
