//! Synthetic activity for demos, load and tests: N people over D days, each following one
//! of five work-style archetypes, generated deterministically from a seed.
//!
//! Archetypes (people are assigned round-robin):
//! - `maker`: long focus blocks in the editor, few meetings, commits;
//! - `manager`: a calendar full of meetings, mail and chat between them;
//! - `communicator`: chat-heavy days with frequent short switches;
//! - `night_owl`: starts around noon and works late into the night;
//! - `multitasker`: switches apps every few minutes, with distractions.
//!
//! Every day has AFK breaks (lunch, short pauses) recorded as `afk` events, and the
//! active spans as `not-afk` events, as ActivityWatch's AFK watcher reports them.

use chrono::{Datelike, Duration as ChronoDuration, TimeZone, Utc, Weekday};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

pub const ARCHETYPES: [&str; 5] = [
    "maker",
    "manager",
    "communicator",
    "night_owl",
    "multitasker",
];

/// What to generate.
#[derive(Clone, Debug)]
pub struct SimulationSpec {
    pub people: usize,
    pub days: u32,
    pub seed: u64,
    /// Events later than this instant (ms) are not generated.
    pub until_ms: i64,
}

/// The archetype of person `i`.
pub fn archetype_of(i: usize) -> &'static str {
    ARCHETYPES[i % ARCHETYPES.len()]
}

pub fn user_id(i: usize) -> String {
    format!("person-{i:04}")
}

struct DayBuilder<'a> {
    user: String,
    events: &'a mut Vec<Value>,
    rng: &'a mut StdRng,
    until: i64,
    counter: &'a mut u64,
    seed: u64,
}

impl DayBuilder<'_> {
    fn push(&mut self, kind: &str, start: i64, duration_ms: i64, attributes: Value) {
        if start + duration_ms > self.until {
            return;
        }
        *self.counter += 1;
        // Deterministic ids make re-running a simulation idempotent.
        let id = uuid::Uuid::from_u64_pair(self.seed ^ 0x6469_6761_6d65, *self.counter);
        self.events.push(json!({
            "event_id": id,
            "user_id": self.user,
            "source": "simulate",
            "kind": kind,
            "timestamp": start,
            "duration_ms": duration_ms,
            "attributes": attributes,
        }));
    }

    /// Focus on `app` for `[start, end)`, as heartbeats of up to 5 minutes, with
    /// not-AFK coverage and kind-specific side events.
    fn block(&mut self, app: &str, title: &str, start: i64, end: i64) {
        let mut t = start;
        while t < end {
            let len = (end - t).min(300_000);
            self.push("window_focus", t, len, json!({"app": app, "title": title}));
            self.push("afk", t, len, json!({"status": "not-afk"}));
            if app == "Code" {
                self.push(
                    "ide_heartbeat",
                    t,
                    0,
                    json!({"project": "digame", "language": "rust", "file": "src/lib.rs"}),
                );
                if self.rng.random_bool(0.15) {
                    self.push(
                        "commit",
                        t + len / 2,
                        0,
                        json!({"project": "digame", "branch": "main"}),
                    );
                }
            }
            if app == "Slack" {
                for _ in 0..self.rng.random_range(0..4) {
                    let at = t + self.rng.random_range(0..len.max(1));
                    self.push(
                        "message",
                        at,
                        0,
                        json!({"app": "Slack", "participants": ["person-0000"]}),
                    );
                }
            }
            t += len;
        }
    }

    fn meeting(&mut self, start: i64, minutes: i64, people: usize) {
        let participants: Vec<String> = (0..people).map(|i| format!("colleague-{i}")).collect();
        let ms = minutes * 60_000;
        self.push(
            "meeting",
            start,
            ms,
            json!({"title": "meeting", "participants": participants, "status": "accepted"}),
        );
        self.block("Zoom", "meeting", start, start + ms);
    }

    fn away(&mut self, start: i64, end: i64) {
        self.push("afk", start, end - start, json!({"status": "afk"}));
    }
}

const MIN: i64 = 60_000;

fn plan_day(b: &mut DayBuilder<'_>, archetype: &str, day_start: i64) {
    let (begin_h, end_h) = match archetype {
        "night_owl" => (12, 24),
        "manager" => (8, 18),
        _ => (9, 17),
    };
    let jitter = b.rng.random_range(0..30) * MIN;
    let mut t = day_start + begin_h * 60 * MIN + jitter;
    let end = day_start + end_h * 60 * MIN - MIN;
    let lunch = day_start + (begin_h + 4) * 60 * MIN;
    let mut had_lunch = false;
    while t < end {
        if !had_lunch && t >= lunch {
            let len = b.rng.random_range(30..60) * MIN;
            b.away(t, t + len);
            t += len;
            had_lunch = true;
            continue;
        }
        let roll: f64 = b.rng.random();
        let len = match archetype {
            "maker" if roll < 0.75 => {
                let len = b.rng.random_range(60..150) * MIN;
                b.block("Code", "editor", t, (t + len).min(end));
                len
            }
            "manager" if roll < 0.6 => {
                let len = [30, 30, 45, 60][b.rng.random_range(0..4)];
                let people = b.rng.random_range(2..9);
                b.meeting(t, len, people);
                len * MIN
            }
            "communicator" if roll < 0.6 => {
                let len = b.rng.random_range(5..20) * MIN;
                b.block("Slack", "chat", t, (t + len).min(end));
                len
            }
            "night_owl" if roll < 0.7 => {
                let len = b.rng.random_range(45..120) * MIN;
                b.block("Code", "editor", t, (t + len).min(end));
                len
            }
            "multitasker" => {
                let apps = ["Code", "Slack", "Firefox", "YouTube", "Outlook"];
                let len = b.rng.random_range(1..5) * MIN;
                let app = apps[b.rng.random_range(0..apps.len())];
                b.block(app, "task", t, (t + len).min(end));
                len
            }
            _ => {
                if roll < 0.85 {
                    let len = b.rng.random_range(10..40) * MIN;
                    let app = ["Outlook", "Slack", "Firefox", "Notion"][b.rng.random_range(0..4)];
                    b.block(app, "work", t, (t + len).min(end));
                    len
                } else {
                    let len = b.rng.random_range(5..20) * MIN;
                    b.away(t, t + len);
                    len
                }
            }
        };
        t += len;
    }
}

/// Generates all events, person by person and day by day.
pub fn generate(spec: &SimulationSpec) -> Vec<Value> {
    let mut events = Vec::new();
    let today = Utc
        .timestamp_millis_opt(spec.until_ms)
        .single()
        .unwrap_or_else(Utc::now)
        .date_naive();
    let mut counter = 0u64;
    for person in 0..spec.people {
        let mut rng = StdRng::seed_from_u64(spec.seed.wrapping_add(person as u64));
        let archetype = archetype_of(person);
        for d in (0..spec.days).rev() {
            let date = today - ChronoDuration::days(i64::from(d));
            let weekend = matches!(date.weekday(), Weekday::Sat | Weekday::Sun);
            if weekend && !rng.random_bool(0.1) {
                continue;
            }
            let day_start = Utc
                .from_utc_datetime(&date.and_hms_opt(0, 0, 0).expect("midnight"))
                .timestamp_millis();
            let mut b = DayBuilder {
                user: user_id(person),
                events: &mut events,
                rng: &mut rng,
                until: spec.until_ms,
                counter: &mut counter,
                seed: spec.seed,
            };
            plan_day(&mut b, archetype, day_start);
        }
    }
    events
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_is_deterministic_and_valid() {
        let spec = SimulationSpec {
            people: 5,
            days: 3,
            seed: 7,
            until_ms: 1_795_512_600_000,
        };
        let a = generate(&spec);
        let b = generate(&spec);
        assert_eq!(a, b);
        assert!(a.len() > 500, "{} events", a.len());
        let policy =
            digame_schemas::validate::TimePolicy::new(digame_schemas::EventTime(spec.until_ms), 30);
        for v in &a {
            let ev: digame_schemas::ActivityEvent = serde_json::from_value(v.clone()).unwrap();
            digame_schemas::validate::validate_event(&ev, &policy).unwrap();
            assert!(ev.end().0 <= spec.until_ms);
        }
        // Each archetype shows up.
        let users: std::collections::BTreeSet<&str> =
            a.iter().filter_map(|v| v["user_id"].as_str()).collect();
        assert_eq!(users.len(), 5);
    }
}
