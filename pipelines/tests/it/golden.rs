//! The golden days (`digame_testkit::golden`) through the operator core: every hand-computed
//! value is reproduced, and late, reversed and shuffled delivery give the same final rows.

use std::collections::BTreeMap;

use digame_config::PipelineConfig;
use digame_pipelines::Processor;
use digame_schemas::{ActivityEvent, EventTime, FeatureRow, PersonProfile};
use digame_testkit::golden;
use rand::SeedableRng;
use rand::seq::SliceRandom;

/// Wall clock of the run: after every golden day.
const NOW: i64 = 1_800_000_000_000;

type Key = (String, String, i64, String, String);

fn processor() -> Processor {
    let cfg = PipelineConfig {
        // Reversed delivery reaches 4.5 h back (ana's day runs 09:00–13:30).
        allowed_lateness_secs: 6 * 3600,
        ..Default::default()
    };
    let mut p = Processor::new(&cfg, 30).unwrap();
    for (user, profile) in golden::profiles() {
        let profile: PersonProfile = serde_json::from_value(profile).unwrap();
        p.directory
            .set_profile(golden::TENANT, user, profile)
            .unwrap();
    }
    p
}

fn payloads(order: &[serde_json::Value]) -> Vec<Vec<u8>> {
    order
        .iter()
        .map(|v| {
            let mut ev: ActivityEvent = serde_json::from_value(v.clone()).unwrap();
            ev.tenant_id = golden::TENANT.into();
            ev.received_at = Some(EventTime(NOW));
            serde_json::to_vec(&ev).unwrap()
        })
        .collect()
}

/// Feeds events in the given order, emitting every `emit_every` events, then lets the
/// wall clock run until every window is final. Returns the latest row per key.
fn run(order: &[serde_json::Value], emit_every: usize) -> BTreeMap<Key, FeatureRow> {
    let mut p = processor();
    let mut rows = Vec::new();
    for chunk in payloads(order).chunks(emit_every) {
        for payload in chunk {
            p.process(0, payload, NOW);
        }
        rows.extend(p.emit(NOW));
    }
    assert!(p.pending_dead.is_empty(), "{:?}", p.pending_dead);
    rows.extend(p.emit(NOW + 30 * 86_400_000));
    let mut latest: BTreeMap<Key, FeatureRow> = BTreeMap::new();
    for r in rows {
        let key = (
            r.user_id.to_string(),
            r.granularity.as_str().to_string(),
            r.window_start.0,
            r.feature.to_string(),
            r.dimension.clone(),
        );
        if latest.get(&key).is_none_or(|old| old.revision < r.revision) {
            latest.insert(key, r);
        }
    }
    latest
}

fn values(rows: &BTreeMap<Key, FeatureRow>) -> BTreeMap<Key, (f64, bool)> {
    rows.iter()
        .map(|(k, r)| (k.clone(), (r.value, r.is_final)))
        .collect()
}

#[test]
fn golden_days_match_the_hand_computed_values() {
    let rows = run(&golden::events(), 4);
    let mut wrong = Vec::new();
    for (user, g, start, feature, dim, want) in golden::expected() {
        let key = (user.into(), g.into(), start, feature.into(), dim.into());
        match rows.get(&key) {
            Some(r) if (r.value - want).abs() < 1e-9 && r.is_final => {}
            Some(r) => wrong.push(format!(
                "{user} {g} {} {feature}[{dim}]: got {} (final {}), want {want}",
                EventTime(start),
                r.value,
                r.is_final
            )),
            None => wrong.push(format!(
                "{user} {g} {} {feature}[{dim}]: missing, want {want}",
                EventTime(start)
            )),
        }
    }
    assert!(
        wrong.is_empty(),
        "{} wrong:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    // Every row of the golden people carries their parameter version, and the 25-hour day
    // has the day window the zone says.
    assert!(rows.values().all(|r| r.params_version != 0 && r.is_final));
    let (s, e) = golden::cho_day_window();
    let cho_day = &rows[&(
        "cho".into(),
        "day".into(),
        s,
        "active_seconds".into(),
        String::new(),
    )];
    assert_eq!(cho_day.window_end.0, e);
    assert_eq!(e - s, 25 * 3_600_000);
}

/// Compares two runs, naming only the keys that differ. A value an earlier computation
/// emitted and a later one no longer has is retracted as 0, so an absent key equals a final
/// zero.
fn assert_same(got: &BTreeMap<Key, (f64, bool)>, want: &BTreeMap<Key, (f64, bool)>, what: &str) {
    let retracted = (0.0, true);
    let mut diffs = Vec::new();
    for k in want.keys().chain(got.keys()) {
        let (g, w) = (
            got.get(k).unwrap_or(&retracted),
            want.get(k).unwrap_or(&retracted),
        );
        if g != w {
            diffs.push(format!("{k:?}: got {g:?}, want {w:?}"));
        }
    }
    assert!(
        diffs.is_empty(),
        "{what}: {} differ:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
}

#[test]
fn late_and_out_of_order_delivery_gives_the_same_final_values() {
    let in_order = values(&run(&golden::events(), 4));
    let mut reversed = golden::events();
    reversed.reverse();
    assert_same(&values(&run(&reversed, 3)), &in_order, "reversed");
    // Late: each person's meetings and messages arrive after everything else of theirs.
    let (mut late, mut rest): (Vec<_>, Vec<_>) = golden::events()
        .into_iter()
        .partition(|e| matches!(e["kind"].as_str(), Some("meeting" | "message")));
    rest.append(&mut late);
    assert_same(&values(&run(&rest, 2)), &in_order, "late");
    for seed in 0..5 {
        let mut shuffled = golden::events();
        shuffled.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
        assert_same(
            &values(&run(&shuffled, 5)),
            &in_order,
            &format!("seed {seed}"),
        );
        // And all at once.
        assert_same(
            &values(&run(&shuffled, 1000)),
            &in_order,
            &format!("seed {seed}, one batch"),
        );
    }
}
