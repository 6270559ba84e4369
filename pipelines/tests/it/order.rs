//! Order-independence, the pipeline's contract: for any interleaving, batching, duplication
//! and delay (inside the horizon, across restarts) of the same events, the final rows equal
//! those of sorted delivery — the same keys with the same values, and no others but
//! retractions (a value emitted on the way and later withdrawn is written as a final 0,
//! which reads as absent).
//!
//! The harness does what the runtime does, without I/O: a poll is admitted with
//! `process_batch`, a flush resolves reopened days from the events "stored" by earlier
//! flushes, emits, then stores the flush's raw events; a checkpoint is
//! `encode_partition`; a crash drops the processor and what it had not flushed, restores the
//! last checkpoint and redelivers every poll after it.

use std::collections::BTreeMap;

use digame_config::PipelineConfig;
use digame_pipelines::Processor;
use digame_schemas::{ActivityEvent, EventTime, FeatureRow, PersonProfile};
use digame_testkit::golden;
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

const MIN: i64 = 60_000;
const HOUR: i64 = 60 * MIN;
const DAY: i64 = 24 * HOUR;
/// Monday 2026-11-16 00:00 UTC: the generated days run from here.
const START: i64 = 1_795_305_600_000;
const HORIZON_DAYS: u32 = 30;

type Key = (String, String, i64, String, String);

fn processor() -> Processor {
    let mut p = Processor::new(&PipelineConfig::default(), HORIZON_DAYS).unwrap();
    for (user, profile) in golden::profiles() {
        let profile: PersonProfile = serde_json::from_value(profile).unwrap();
        p.directory
            .set_profile(golden::TENANT, user, profile)
            .unwrap();
    }
    let dana: PersonProfile = serde_json::from_value(json!({
        "timezone": "Europe/Berlin", "work_start": "08:00", "work_end": "16:00",
        "manager": "mgr", "team": "core"
    }))
    .unwrap();
    p.directory
        .set_profile(golden::TENANT, "dana", dana)
        .unwrap();
    p
}

/// Six working days of a person with an AFK watcher, focus heartbeats, editor heartbeats,
/// meetings, chat and commits, as several watchers on one device would record them.
fn generated(rng: &mut StdRng, user: &str, serial: &mut u64) -> Vec<Value> {
    let mut out = Vec::new();
    let mut ev = |kind: &str, start: i64, dur: i64, attributes: Value| {
        *serial += 1;
        out.push(json!({
            "event_id": format!("00000000-0000-4000-9000-{:012x}", *serial),
            "user_id": user, "source": "prop", "kind": kind, "timestamp": start,
            "duration_ms": dur, "attributes": attributes,
        }));
    };
    let apps = ["Code", "Slack", "Firefox", "Mail", "YouTube"];
    for day in 0..6 {
        let mut t = START + day * DAY + (7 + rng.random_range(0..3)) * HOUR;
        let end = t + rng.random_range(6..10) * HOUR;
        while t < end {
            let len = rng.random_range(5..60) * MIN;
            let afk = rng.random_bool(0.2);
            ev(
                "afk",
                t,
                len,
                json!({"status": if afk { "afk" } else { "not-afk" }}),
            );
            // Focus heartbeats through the span, some crossing into the AFK part.
            let mut f = t;
            while f < t + len {
                let d = rng.random_range(1..15) * MIN;
                let app = apps[rng.random_range(0..apps.len())];
                ev(
                    "window_focus",
                    f,
                    d,
                    json!({"app": app, "title": format!("{app} window")}),
                );
                if app == "Code" {
                    let mut h = f;
                    while h < f + d {
                        ev(
                            "ide_heartbeat",
                            h,
                            0,
                            json!({"app": "Code", "project": "api", "language": "Rust"}),
                        );
                        h += rng.random_range(1..20) * MIN;
                    }
                }
                if app == "Slack" && rng.random_bool(0.5) {
                    ev(
                        "message",
                        f + MIN,
                        0,
                        json!({"participants": [user, "erin"], "app": "Slack"}),
                    );
                }
                f += d;
            }
            if rng.random_bool(0.15) {
                ev(
                    "meeting",
                    t,
                    rng.random_range(1..4) * 15 * MIN,
                    json!({"participants": [user, "mgr", "erin"], "status": "accepted"}),
                );
            }
            if rng.random_bool(0.1) {
                ev("commit", t + len / 2, 0, json!({"project": "api"}));
            }
            t += len;
        }
    }
    out
}

fn canonical(v: &Value) -> ActivityEvent {
    let mut ev: ActivityEvent = serde_json::from_value(v.clone()).unwrap();
    ev.tenant_id = golden::TENANT.into();
    ev
}

/// One delivery: when it arrives (wall clock) and what.
#[derive(Clone)]
struct Delivery {
    at: i64,
    payload: Vec<u8>,
}

/// How a run delivers: polls of these sizes, a flush after every `flush_every` polls, and
/// a crash (restore the last checkpoint, redeliver after it) at these flushes.
#[derive(Clone, Debug)]
struct Plan {
    poll: usize,
    flush_every: usize,
    checkpoint_every: usize,
    crashes: Vec<usize>,
}

struct Run {
    p: Processor,
    stored: Vec<ActivityEvent>,
    rows: Vec<FeatureRow>,
}

impl Run {
    fn flush(&mut self, now: i64) {
        self.p.resolve_reopens_from(&self.stored, now);
        let rows = self.p.emit(now);
        self.rows.extend(rows);
        self.stored.append(&mut self.p.pending_events);
    }
}

/// Feeds `deliveries` (in arrival order) and returns the latest row per key once every
/// window is final.
fn run(deliveries: &[Delivery], plan: &Plan) -> BTreeMap<Key, FeatureRow> {
    let mut r = Run {
        p: processor(),
        stored: Vec::new(),
        rows: Vec::new(),
    };
    let polls: Vec<&[Delivery]> = deliveries.chunks(plan.poll.max(1)).collect();
    let mut checkpoint = (r.p.encode_partition(0, 0).unwrap(), 0usize);
    let mut crashes = plan.crashes.clone();
    let (mut i, mut flushes) = (0, 0);
    while i < polls.len() {
        let now = polls[i].last().unwrap().at;
        r.p.process_batch(polls[i].iter().map(|d| (0, &d.payload[..])), now);
        i += 1;
        if i % plan.flush_every.max(1) == 0 || i == polls.len() {
            r.flush(now);
            flushes += 1;
            if crashes.first() == Some(&flushes) {
                crashes.remove(0);
                // Rows and raw events written so far stay in the store; state goes back to
                // the checkpoint and the bus redelivers everything after it.
                r.p = processor();
                let offset = r.p.restore_partition(0, &checkpoint.0, "test").unwrap();
                assert_eq!(offset as usize, checkpoint.1);
                i = checkpoint.1;
                continue;
            }
            if flushes % plan.checkpoint_every.max(1) == 0 {
                checkpoint = (r.p.encode_partition(0, i as u64).unwrap(), i);
            }
        }
    }
    let end = deliveries.iter().map(|d| d.at).max().unwrap_or(0) + 60 * DAY;
    r.flush(end);
    assert!(r.p.pending_dead.is_empty(), "{:?}", r.p.pending_dead);
    assert!(r.p.reopen_requests().is_empty());
    latest(r.rows)
}

/// The row with the highest revision per key, as every reader keeps.
fn latest(rows: Vec<FeatureRow>) -> BTreeMap<Key, FeatureRow> {
    let mut latest: BTreeMap<Key, FeatureRow> = BTreeMap::new();
    for row in rows {
        // Finality is stamped consistently: final rows name the revision that made the
        // window final, never a later one.
        assert_eq!(row.is_final, row.final_revision != 0, "{row:?}");
        assert!(row.final_revision <= row.revision, "{row:?}");
        let key = (
            row.user_id.to_string(),
            row.granularity.as_str().to_string(),
            row.window_start.0,
            row.feature.to_string(),
            row.dimension.clone(),
        );
        if latest
            .get(&key)
            .is_none_or(|old| old.revision < row.revision)
        {
            latest.insert(key, row);
        }
    }
    latest
}

/// The sorted-delivery rows equal `got`'s, but for retractions.
fn assert_same(got: &BTreeMap<Key, FeatureRow>, want: &BTreeMap<Key, FeatureRow>, what: &str) {
    let mut diffs = Vec::new();
    for (k, w) in want {
        match got.get(k) {
            Some(g) if g.value == w.value && g.is_final => {}
            Some(g) => diffs.push(format!(
                "{k:?}: got {} (final {}), want {}",
                g.value, g.is_final, w.value
            )),
            None if w.value == 0.0 => {}
            None => diffs.push(format!("{k:?}: missing, want {}", w.value)),
        }
    }
    for (k, g) in got {
        if !want.contains_key(k) && (g.value != 0.0 || !g.is_final) {
            diffs.push(format!(
                "{k:?}: extra row {} (final {})",
                g.value, g.is_final
            ));
        }
    }
    assert!(
        diffs.is_empty(),
        "{what}: {} differ:\n{}",
        diffs.len(),
        diffs
            .iter()
            .take(40)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Every event of the golden days and two generated people.
fn corpus(seed: u64) -> Vec<ActivityEvent> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut serial = 0;
    let mut all: Vec<Value> = golden::events();
    all.extend(generated(&mut rng, "dana", &mut serial));
    all.extend(generated(&mut rng, "eli", &mut serial));
    all.iter().map(canonical).collect()
}

fn payload(ev: &ActivityEvent, at: i64) -> Delivery {
    let mut ev = ev.clone();
    ev.received_at = Some(EventTime(at));
    Delivery {
        at,
        payload: serde_json::to_vec(&ev).unwrap(),
    }
}

/// Sorted delivery: each event arrives as it ends.
fn sorted(events: &[ActivityEvent]) -> Vec<Delivery> {
    let mut d: Vec<(i64, i64, &ActivityEvent)> = events
        .iter()
        .map(|e| (e.timestamp.0, e.end().0, e))
        .collect();
    d.sort_by_key(|(t, _, _)| *t);
    // Arrival times never go back: an event arrives once it (and everything before) ended.
    let mut clock = i64::MIN;
    d.iter()
        .map(|(_, end, e)| {
            clock = clock.max(*end);
            payload(e, clock)
        })
        .collect()
}

/// Real-world delivery: most events arrive as they end, some minutes, hours or days later
/// (offline queues, a watcher's upload cadence, backfills), some twice (retries).
fn disordered(events: &[ActivityEvent], rng: &mut StdRng) -> Vec<Delivery> {
    let mut d = Vec::new();
    for e in events {
        let delay = match rng.random_range(0..100) {
            0..60 => 0,
            60..85 => rng.random_range(1..60) * MIN,
            85..95 => rng.random_range(1..12) * HOUR,
            _ => rng.random_range(1..8) * DAY,
        };
        let at = e.end().0 + delay;
        d.push(payload(e, at));
        if rng.random_bool(0.08) {
            d.push(payload(e, at + rng.random_range(0..3 * DAY)));
        }
    }
    d.sort_by_key(|x| x.at);
    d
}

fn in_order_plan() -> Plan {
    Plan {
        poll: 50,
        flush_every: 1,
        checkpoint_every: 1,
        crashes: Vec::new(),
    }
}

/// Disordered delivery of the corpus of `seed` by `plan` gives the sorted rows.
fn check(seed: u64, plan: Plan) {
    let events = corpus(seed);
    let want = run(&sorted(&events), &in_order_plan());
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    let got = run(&disordered(&events, &mut rng), &plan);
    assert_same(&got, &want, &format!("seed {seed}, {plan:?}"));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn any_delivery_gives_the_sorted_rows(
        seed in any::<u64>(),
        poll in 1usize..200,
        flush_every in 1usize..6,
        checkpoint_every in 1usize..4,
        crashes in proptest::collection::vec(1usize..40, 0..3),
    ) {
        let mut crashes = crashes;
        crashes.sort_unstable();
        crashes.dedup();
        check(seed, Plan { poll, flush_every, checkpoint_every, crashes });
    }
}

/// Cases the property found once, kept: a retry of a stored AFK span and a new focus
/// event reopening the same day (the day's emitted values must be those of every stored
/// event, the retried one included).
#[test]
fn found_cases_stay_fixed() {
    check(
        17_350_390_924_243_409_796,
        Plan {
            poll: 78,
            flush_every: 4,
            checkpoint_every: 1,
            crashes: Vec::new(),
        },
    );
}

#[test]
fn a_day_in_one_request_newest_first_counts_in_full() {
    let events = corpus(7);
    let want = run(&sorted(&events), &in_order_plan());
    // The sorted run itself holds the hand-computed golden values.
    for (user, g, start, feature, dim, value) in golden::expected() {
        let key = (user.into(), g.into(), start, feature.into(), dim.into());
        let got = want.get(&key).map_or(0.0, |r| r.value);
        assert!(
            (got - value).abs() < 1e-9,
            "{key:?}: got {got}, want {value}"
        );
    }
    // Everything at once, newest first, a day after the last event: one poll.
    let at = events.iter().map(|e| e.end().0).max().unwrap() + DAY;
    let mut newest_first: Vec<Delivery> = events.iter().map(|e| payload(e, at)).collect();
    newest_first.reverse();
    let plan = Plan {
        poll: newest_first.len(),
        ..in_order_plan()
    };
    assert_same(&run(&newest_first, &plan), &want, "newest first, one poll");
    // And one watcher after another, each in its own poll: all window focus, then the AFK
    // spans, then the meetings and the rest.
    let rank = |e: &ActivityEvent| match e.kind.as_str() {
        "window_focus" => 0,
        "afk" => 1,
        _ => 2,
    };
    let mut by_watcher: Vec<&ActivityEvent> = events.iter().collect();
    by_watcher.sort_by_key(|e| (rank(e), e.timestamp.0));
    let deliveries: Vec<Delivery> = by_watcher.iter().map(|e| payload(e, at)).collect();
    let plan = Plan {
        poll: 500,
        ..in_order_plan()
    };
    assert_same(&run(&deliveries, &plan), &want, "watcher by watcher");
}

#[test]
fn a_device_uploaded_three_days_late_revises_only_its_windows() {
    let events = corpus(11);
    let want = run(&sorted(&events), &in_order_plan());
    // Dana's laptop (its window-focus and editor events of Tuesday) reaches Digame on
    // Friday evening, after her later days are final and out of memory. Her Tuesday is
    // the Berlin day, 23:00 UTC on Monday to 23:00 UTC on Tuesday.
    let tuesday = START + DAY - HOUR;
    let friday_evening = START + 4 * DAY + 20 * HOUR;
    let late = |e: &ActivityEvent| {
        e.user_id == "dana"
            && matches!(e.kind.as_str(), "window_focus" | "ide_heartbeat")
            && (tuesday..tuesday + DAY).contains(&e.timestamp.0)
    };
    let rest: Vec<ActivityEvent> = events.iter().filter(|e| !late(e)).cloned().collect();
    let on_time = sorted(&rest);
    let upload: Vec<Delivery> = events
        .iter()
        .filter(|e| late(e))
        .map(|e| payload(e, friday_evening))
        .collect();
    assert!(upload.len() > 20, "{}", upload.len());
    let mut r = Run {
        p: processor(),
        stored: Vec::new(),
        rows: Vec::new(),
    };
    let (before, after): (Vec<&Delivery>, Vec<&Delivery>) =
        on_time.iter().partition(|d| d.at < friday_evening);
    for poll in before.chunks(50) {
        let now = poll.last().unwrap().at;
        r.p.process_batch(poll.iter().map(|d| (0, &d.payload[..])), now);
        r.flush(now);
    }
    // What the clock alone finalises by Friday evening, before the upload arrives.
    r.flush(friday_evening);
    let emitted_before = r.rows.len();
    r.p.process_batch(upload.iter().map(|d| (0, &d.payload[..])), friday_evening);
    assert_eq!(
        r.p.reopen_requests().len(),
        1,
        "Tuesday is read back from the store"
    );
    r.flush(friday_evening);
    // The upload's flush revises Dana's Tuesday (its hours and day), the week, and the
    // rolling features of her later days; nothing of anyone else, no other hour.
    let rolling = [
        "network_size",
        "manager_one_on_one_minutes_per_week",
        "manager_one_on_one_low",
    ];
    let revised = &r.rows[emitted_before..];
    assert!(!revised.is_empty());
    for row in revised {
        let start = row.window_start.0;
        let fits = &*row.user_id == "dana"
            && match row.granularity.as_str() {
                "hour" => (tuesday..tuesday + DAY).contains(&start),
                "day" => {
                    (tuesday..tuesday + DAY).contains(&start)
                        || (start > tuesday && rolling.contains(&&*row.feature))
                }
                _ => true,
            };
        assert!(fits, "an unaffected window was revised: {row:?}");
        assert!(
            row.is_final || row.window_end.0 > friday_evening - 15 * MIN,
            "{row:?}"
        );
    }
    for poll in after.chunks(50) {
        let now = poll.last().unwrap().at;
        r.p.process_batch(poll.iter().map(|d| (0, &d.payload[..])), now);
        r.flush(now);
    }
    r.flush(friday_evening + 60 * DAY);
    assert_same(&latest(r.rows), &want, "three days late");
}

/// An hour window whose every value falls away is retracted like a single value that
/// does. Eli (UTC, no AFK watcher on Monday) leaves an editor heartbeat at 23:58: without
/// an AFK watcher, input counts as present for `afk_timeout_secs` (180 s) after it, so
/// Tuesday's first hour holds 60 s of presence while Tuesday has no events of its own.
/// Tuesday's AFK watcher then reports: presence is its spans alone, the 00:00 hour has
/// nothing, and a delivery that emitted the 60 s on the way must withdraw them. (Two
/// simulated runs of one person gave a stored `presence_seconds` 60 that a recompute
/// retracted.)
#[test]
fn an_hour_that_loses_every_value_is_retracted() {
    let mut serial = 0;
    let mut ev = |kind: &str, start: i64, dur: i64, attributes: Value| {
        serial += 1;
        canonical(&json!({
            "event_id": format!("00000000-0000-4000-9000-{serial:012x}"),
            "user_id": "eli", "source": "prop", "kind": kind, "timestamp": start,
            "duration_ms": dur, "attributes": attributes,
        }))
    };
    let focus = json!({"app": "Code", "title": "editor"});
    let code = json!({"app": "Code", "project": "api", "language": "Rust"});
    let tuesday = START + DAY;
    let events = vec![
        ev("window_focus", tuesday - 30 * MIN, 28 * MIN, focus.clone()),
        ev("ide_heartbeat", tuesday - 2 * MIN, 0, code.clone()),
        ev(
            "afk",
            tuesday + 10 * HOUR,
            30 * MIN,
            json!({"status": "not-afk"}),
        ),
        ev("window_focus", tuesday + 10 * HOUR, 30 * MIN, focus),
        ev("ide_heartbeat", tuesday + 10 * HOUR, 0, code),
    ];
    let deliveries = sorted(&events);
    // Everything in one poll: Tuesday is first computed with its AFK watcher.
    let want = run(
        &deliveries,
        &Plan {
            poll: deliveries.len(),
            ..in_order_plan()
        },
    );
    let first_hour = ("eli".to_string(), "hour".to_string(), tuesday);
    let presence = |rows: &BTreeMap<Key, FeatureRow>| {
        let key = (
            first_hour.0.clone(),
            first_hour.1.clone(),
            first_hour.2,
            "presence_seconds".to_string(),
            String::new(),
        );
        rows.get(&key).map(|r| r.value)
    };
    assert_eq!(presence(&want), None, "{want:#?}");
    // One event per poll, flushed each time: the 60 s are emitted, then withdrawn.
    let got = run(
        &deliveries,
        &Plan {
            poll: 1,
            ..in_order_plan()
        },
    );
    assert_eq!(presence(&got), Some(0.0));
    assert_same(&got, &want, "one event per poll");
}
