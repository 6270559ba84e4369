//! Synthetic activity for demos, load and tests: N people over D days, each following one
//! of five work-style archetypes, generated deterministically from a seed.
//!
//! **Running it again is a retry.** A person's day is a function of the seed, the person
//! and the local date alone (its own random stream), and every event's id names its place
//! in that day: (seed, person, date, n-th event planned), counted whether or not the
//! event is past `until`. So a second run with the same seed, minutes or days later,
//! sends each event it shares with the first under the same id with the same content
//! (counted once), and the events that time has since made possible under ids of their
//! own. A different seed gives different events under different ids.
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
//!
//! People form teams of five (one of each archetype, so every team view clears the
//! k-anonymity threshold), managed by the team's `manager`; each team works in its own
//! time zone ([`TEAM_ZONES`]) and days follow the local clock. Meetings and messages go to
//! real colleagues (teammates first), so the network and collaboration views have links.
//! Makers and night owls commit with a `sha`, deploy their day's commits at its end, and
//! now and then a deploy causes an incident that is resolved hours later, so the
//! engineering-flow (DORA) view has input. [`profile_of`] gives each person's profile.

use chrono::{Datelike, Duration as ChronoDuration, Weekday};
use digame_pipelines::window::{local_date, local_midnight, parse_tz};
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

/// People per team.
pub const TEAM_SIZE: usize = 5;
/// The time zone of team `t` is `TEAM_ZONES[t % 4]`.
pub const TEAM_ZONES: [&str; 4] = ["UTC", "Europe/Berlin", "America/New_York", "Asia/Kolkata"];

/// The team of person `i`.
pub fn team_of(i: usize) -> usize {
    i / TEAM_SIZE
}

/// The time zone of person `i`.
pub fn zone_of(i: usize) -> &'static str {
    TEAM_ZONES[team_of(i) % TEAM_ZONES.len()]
}

/// The profile of person `i` of `people`: team, time zone, manager (the team's `manager`
/// archetype, for everyone else in the team) and, for night owls, later working hours.
pub fn profile_of(i: usize, people: usize) -> Value {
    let team = team_of(i);
    let mut p = json!({"timezone": zone_of(i), "team": format!("team-{team}")});
    let manager = team * TEAM_SIZE + 1;
    if manager != i && manager < people {
        p["manager"] = json!(user_id(manager));
    }
    if archetype_of(i) == "night_owl" {
        p["work_start"] = json!("11:00");
        p["work_end"] = json!("19:00");
    }
    p
}

/// The archetype of person `i`.
pub fn archetype_of(i: usize) -> &'static str {
    ARCHETYPES[i % ARCHETYPES.len()]
}

pub fn user_id(i: usize) -> String {
    format!("person-{i:04}")
}

struct DayBuilder<'a> {
    person: usize,
    people: usize,
    user: String,
    /// The local date, `YYYY-MM-DD`: with the seed, user and `planned` it names each event.
    date: String,
    events: &'a mut Vec<Value>,
    rng: StdRng,
    until: i64,
    /// Events planned so far today, including those past `until`.
    planned: u64,
    seed: u64,
    /// Commit shas of the day, deployed at its end.
    shipped: Vec<String>,
}

impl DayBuilder<'_> {
    fn push(&mut self, kind: &str, start: i64, duration_ms: i64, attributes: Value) {
        self.push_with(kind, start, duration_ms, attributes, None);
    }

    /// As [`Self::push`], with connector-style `properties`; false when past `until`.
    fn push_with(
        &mut self,
        kind: &str,
        start: i64,
        duration_ms: i64,
        attributes: Value,
        properties: Option<Value>,
    ) -> bool {
        // Counted before the `until` cut: the n-th event of a day is the same event
        // whenever the day is generated.
        self.planned += 1;
        if start + duration_ms > self.until {
            return false;
        }
        let id = uuid::Uuid::from_bytes(self.name(self.planned));
        let mut ev = json!({
            "event_id": id,
            "user_id": self.user,
            "source": "simulate",
            "kind": kind,
            "timestamp": start,
            "duration_ms": duration_ms,
            "attributes": attributes,
        });
        if let Some(p) = properties {
            ev["properties"] = p;
        }
        self.events.push(ev);
        true
    }

    /// 16 bytes naming the `n`-th planned event of this person's day under this seed.
    fn name(&self, n: u64) -> [u8; 16] {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(self.seed.to_le_bytes());
        h.update(self.user.as_bytes());
        h.update(self.date.as_bytes());
        h.update(n.to_le_bytes());
        let digest = h.finalize();
        let mut out = [0u8; 16];
        out.copy_from_slice(&digest[..16]);
        out
    }

    /// `n` colleagues: teammates first, then people of the next teams.
    fn colleagues(&mut self, n: usize) -> Vec<String> {
        let team = team_of(self.person) * TEAM_SIZE;
        let mut out: Vec<String> = (team..(team + TEAM_SIZE).min(self.people))
            .chain((team + TEAM_SIZE..self.people).chain(0..team))
            .filter(|&j| j != self.person)
            .take(n)
            .map(user_id)
            .collect();
        // Past the last simulated person: people outside the simulation.
        let mut k = 0;
        while out.len() < n {
            out.push(format!("colleague-{k}"));
            k += 1;
        }
        out
    }

    /// Ships the day's commits at `at`; sometimes one of them breaks, and an incident is
    /// opened an hour later and resolved after 1 to 4 hours.
    fn deploy(&mut self, at: i64) {
        if self.shipped.is_empty() {
            return;
        }
        let commits = std::mem::take(&mut self.shipped);
        let attributes = json!({"project": "digame"});
        if !self.push_with(
            "deploy",
            at,
            0,
            attributes.clone(),
            Some(json!({"commits": commits})),
        ) {
            return;
        }
        if self.rng.random_bool(0.15) {
            let opened = at + 3_600_000;
            let restore = self.rng.random_range(1..5) * 3_600_000;
            let id = format!("inc-{}-{}-{}", self.user, self.date, self.planned);
            let props = json!({"id": id, "commits": commits});
            self.push_with(
                "incident",
                opened,
                0,
                json!({"status": "opened"}),
                Some(props.clone()),
            );
            self.push_with(
                "incident",
                opened + restore,
                0,
                json!({"status": "resolved"}),
                Some(props),
            );
        }
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
                    // Named like the commit event it rides on, the next one planned.
                    let sha: String = self
                        .name(self.planned + 1)
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect();
                    if self.push_with(
                        "commit",
                        t + len / 2,
                        0,
                        json!({"project": "digame", "branch": "main"}),
                        Some(json!({"sha": sha})),
                    ) {
                        self.shipped.push(sha);
                    }
                }
            }
            if app == "Slack" {
                for _ in 0..self.rng.random_range(0..4) {
                    let at = t + self.rng.random_range(0..len.max(1));
                    let to = self.colleagues(1);
                    self.push(
                        "message",
                        at,
                        0,
                        json!({"app": "Slack", "participants": to}),
                    );
                }
            }
            t += len;
        }
    }

    fn meeting(&mut self, start: i64, minutes: i64, people: usize) {
        let participants = self.colleagues(people);
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
    b.deploy(end);
}

/// Generates all events, person by person and day by day.
pub fn generate(spec: &SimulationSpec) -> Vec<Value> {
    let mut events = Vec::new();
    for person in 0..spec.people {
        let archetype = archetype_of(person);
        let tz = parse_tz(zone_of(person)).expect("the team zones are IANA names");
        // Days follow the person's local clock, ending with their today.
        let today = local_date(tz, spec.until_ms);
        for d in (0..spec.days).rev() {
            let date = today - ChronoDuration::days(i64::from(d));
            // The day's own stream: the same day whatever else is generated with it.
            let mut rng = StdRng::seed_from_u64(
                spec.seed ^ (person as u64).rotate_left(32) ^ date.num_days_from_ce() as u64,
            );
            let weekend = matches!(date.weekday(), Weekday::Sat | Weekday::Sun);
            if weekend && !rng.random_bool(0.1) {
                continue;
            }
            let mut b = DayBuilder {
                person,
                people: spec.people,
                user: user_id(person),
                date: date.to_string(),
                events: &mut events,
                rng,
                until: spec.until_ms,
                planned: 0,
                seed: spec.seed,
                shipped: Vec::new(),
            };
            plan_day(&mut b, archetype, local_midnight(tz, date));
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
        // Deploys ship commits that exist; meetings and messages reach teammates.
        let shas: std::collections::BTreeSet<&str> = a
            .iter()
            .filter(|v| v["kind"] == "commit")
            .filter_map(|v| v["properties"]["sha"].as_str())
            .collect();
        let deploys: Vec<&Value> = a.iter().filter(|v| v["kind"] == "deploy").collect();
        assert!(!deploys.is_empty());
        for d in &deploys {
            for sha in d["properties"]["commits"].as_array().unwrap() {
                assert!(shas.contains(sha.as_str().unwrap()), "{d}");
            }
        }
        let meeting = a.iter().find(|v| v["kind"] == "meeting").unwrap();
        let with = meeting["attributes"]["participants"].as_array().unwrap();
        assert!(
            with.iter().all(|p| users.contains(p.as_str().unwrap())),
            "{meeting}"
        );
    }

    /// A second run is a retry of the first: every id the two share names the same event,
    /// minutes later, the next day or a week on, and no id names two events of one run.
    #[test]
    fn a_second_run_resends_the_same_events_under_the_same_ids() {
        let run = |seed: u64, days: u32, until_ms: i64| {
            let spec = SimulationSpec {
                people: 10,
                days,
                seed,
                until_ms,
            };
            let mut by_id = std::collections::BTreeMap::new();
            for ev in generate(&spec) {
                let id = ev["event_id"].as_str().unwrap().to_string();
                assert!(by_id.insert(id, ev).is_none(), "an id named two events");
            }
            by_id
        };
        // Friday 2026-12-04 12:30 UTC; again 6 minutes, 13 hours (the next local day but
        // in New York), a day and a week later.
        const FRIDAY: i64 = 1_796_387_400_000;
        let first = run(42, 7, FRIDAY);
        for (days, later) in [
            (7, 6 * 60_000),
            (7, 13 * 3_600_000),
            (10, 86_400_000 + 60_000),
            (7, 7 * 86_400_000),
        ] {
            let second = run(42, days, FRIDAY + later);
            let shared: Vec<_> = first.keys().filter(|id| second.contains_key(*id)).collect();
            assert!(!shared.is_empty() || later >= 7 * 86_400_000);
            for id in shared {
                assert_eq!(first[id], second[id], "{later} ms later");
            }
            // What the first run sent of the days both cover, the second sends again.
            if later < 3_600_000 {
                assert!(first.keys().all(|id| second.contains_key(id)), "{later}");
                assert!(second.len() > first.len(), "{later}: time made more events");
            }
        }
        // Another seed, other events under other ids.
        let other = run(7, 7, FRIDAY);
        assert!(first.keys().all(|id| !other.contains_key(id)));
    }

    #[test]
    fn profiles_make_teams_of_five_with_their_manager() {
        assert_eq!(
            profile_of(0, 12),
            json!({"timezone": "UTC", "team": "team-0", "manager": "person-0001"})
        );
        // The manager has none; night owls start late; the next team is in Berlin.
        assert_eq!(
            profile_of(1, 12),
            json!({"timezone": "UTC", "team": "team-0"})
        );
        assert_eq!(
            profile_of(8, 12),
            json!({"timezone": "Europe/Berlin", "team": "team-1", "manager": "person-0006",
                   "work_start": "11:00", "work_end": "19:00"})
        );
        // A team whose manager is past the last person has none.
        assert_eq!(
            profile_of(10, 11),
            json!({"timezone": "America/New_York", "team": "team-2"})
        );
        // Every profile is one the API accepts.
        for i in 0..12 {
            let p: digame_schemas::PersonProfile =
                serde_json::from_value(profile_of(i, 12)).unwrap();
            p.validate().unwrap();
        }
    }
}
