//! Golden days: hand-built event sequences for three people with every expected feature
//! value worked out by hand below (the arithmetic is in the comments). The pipeline's
//! output must equal them on every backend, whatever order the events arrive in.
//!
//! - `ana` (Europe/Berlin, Tue 2026-11-24, manager `mgr`): two overlapping meetings, a 1:1
//!   with her manager with two chat messages sent during it, an AFK gap inside a coding
//!   focus block, an email that breaks an uninterrupted block.
//! - `ben` (America/New_York, Tue 2026-11-24): late-night editor heartbeats with gaps just
//!   under (899 s) and just over (901 s) the 900 s keystroke timeout, coding across local
//!   midnight, a commit at 23:58.
//! - `cho` (Europe/Berlin, Sun 2026-10-25, the day clocks go back): activity across both
//!   02:00 hours of the 25-hour day, on a weekend.
//!
//! Parameters are the defaults (afk timeout 180 s, keystroke timeout 900 s, pulsetime 2 s,
//! flood 5 s, deep work ≥ 30 min, meeting rate 75/h, goal 6 h productive) and the
//! profiles below.

use serde_json::{Value, json};

pub const TENANT: &str = "golden";

/// One expected value: (user, granularity, window start in UTC ms, feature, dimension,
/// value).
pub type Expected = (
    &'static str,
    &'static str,
    i64,
    &'static str,
    &'static str,
    f64,
);

/// `YYYY-MM-DDTHH:MM:SS±HH:MM` to UTC milliseconds.
pub fn at(text: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(text)
        .unwrap_or_else(|e| panic!("{text}: {e}"))
        .timestamp_millis()
}

/// Profiles of the golden people: (user, profile JSON).
pub fn profiles() -> Vec<(&'static str, Value)> {
    vec![
        (
            "ana",
            json!({"timezone": "Europe/Berlin", "work_start": "09:00", "work_end": "17:00",
                   "manager": "mgr", "team": "core"}),
        ),
        (
            "ben",
            json!({"timezone": "America/New_York", "work_start": "09:00", "work_end": "17:00",
                   "team": "core"}),
        ),
        (
            "cho",
            json!({"timezone": "Europe/Berlin", "work_start": "09:00", "work_end": "17:00",
                   "team": "core"}),
        ),
    ]
}

fn ev(user: &str, n: u32, kind: &str, start: i64, end: i64, attributes: Value) -> Value {
    json!({
        "event_id": format!("00000000-0000-4000-8000-{:012x}", (u64::from(n) << 8) | u64::from(user.as_bytes()[0])),
        "user_id": user,
        "source": "golden",
        "kind": kind,
        "timestamp": start,
        "duration_ms": end - start,
        "attributes": attributes,
    })
}

/// The events, in time order.
pub fn events() -> Vec<Value> {
    let a = |t: &str| at(&format!("2026-11-24T{t}+01:00"));
    let b = |d: u32, t: &str| at(&format!("2026-11-{d}T{t}-05:00"));
    let z = |t: &str| at(&format!("2026-10-25T{t}Z"));
    let focus = |app: &str, title: &str| json!({"app": app, "title": title});
    let status = |s: &str| json!({"status": s});
    let with = |people: &[&str], s: &str| json!({"participants": people, "status": s});
    let beat = json!({"app": "Code", "project": "api", "language": "Rust"});
    let mut out = vec![
        ev(
            "ana",
            1,
            "afk",
            a("09:00:00"),
            a("10:20:00"),
            status("not-afk"),
        ),
        ev("ana", 2, "afk", a("10:20:00"), a("10:40:00"), status("afk")),
        ev(
            "ana",
            3,
            "afk",
            a("10:40:00"),
            a("12:30:00"),
            status("not-afk"),
        ),
        ev(
            "ana",
            4,
            "window_focus",
            a("09:00:00"),
            a("09:30:00"),
            focus("Code", "main.rs"),
        ),
        // 1 s after the previous heartbeat ends, same data: merged (pulsetime 2 s).
        ev(
            "ana",
            5,
            "window_focus",
            a("09:30:01"),
            a("11:00:00"),
            focus("Code", "main.rs"),
        ),
        ev(
            "ana",
            6,
            "window_focus",
            a("11:00:00"),
            a("11:30:00"),
            focus("Slack", "general"),
        ),
        ev(
            "ana",
            7,
            "window_focus",
            a("11:30:00"),
            a("12:30:00"),
            focus("Zoom", "sync"),
        ),
        ev(
            "ana",
            8,
            "meeting",
            a("11:15:00"),
            a("12:15:00"),
            with(&["mgr"], "accepted"),
        ),
        ev(
            "ana",
            9,
            "meeting",
            a("12:00:00"),
            a("13:00:00"),
            with(&["b", "c"], "accepted"),
        ),
        ev(
            "ana",
            10,
            "message",
            a("11:20:00"),
            a("11:20:00"),
            with(&["mgr"], "sent"),
        ),
        ev(
            "ana",
            11,
            "message",
            a("11:25:00"),
            a("11:25:00"),
            with(&["mgr"], "sent"),
        ),
        ev(
            "ana",
            12,
            "email",
            a("13:30:00"),
            a("13:30:00"),
            with(&["b"], "sent"),
        ),
        ev(
            "ben",
            1,
            "afk",
            b(24, "22:00:00"),
            b(24, "22:45:00"),
            status("not-afk"),
        ),
        ev(
            "ben",
            2,
            "window_focus",
            b(24, "22:00:00"),
            b(24, "22:45:00"),
            focus("Code", "lib.rs"),
        ),
        ev(
            "ben",
            9,
            "commit",
            b(24, "23:58:00"),
            b(24, "23:58:00"),
            json!({"project": "api"}),
        ),
        ev(
            "cho",
            1,
            "afk",
            z("00:30:00"),
            z("02:30:00"),
            status("not-afk"),
        ),
        ev(
            "cho",
            2,
            "window_focus",
            z("00:30:00"),
            z("01:30:00"),
            focus("Firefox", "news"),
        ),
        ev(
            "cho",
            3,
            "window_focus",
            z("01:30:00"),
            z("02:30:00"),
            focus("YouTube", "video"),
        ),
    ];
    for (n, (d, t)) in [
        (24, "22:00:00"),
        (24, "22:14:59"),
        (24, "22:30:00"),
        (24, "22:40:00"),
        (24, "22:50:00"),
        (24, "23:55:00"),
        (25, "00:05:00"),
        (25, "00:10:00"),
    ]
    .into_iter()
    .enumerate()
    {
        let t = b(d, t);
        out.push(ev(
            "ben",
            20 + n as u32,
            "ide_heartbeat",
            t,
            t,
            beat.clone(),
        ));
    }
    out.sort_by_key(|e| e["timestamp"].as_i64());
    out
}

/// Every day feature of the golden days, the hours that matter, and the weeks.
pub fn expected() -> Vec<Expected> {
    let ana_day = at("2026-11-24T00:00:00+01:00");
    let ana_week = at("2026-11-23T00:00:00+01:00");
    let ana_h = |h: u32| ana_day + i64::from(h) * 3_600_000;
    let ben_day = at("2026-11-24T00:00:00-05:00");
    let ben_next = at("2026-11-25T00:00:00-05:00");
    let ben_week = at("2026-11-23T00:00:00-05:00");
    let cho_day = at("2026-10-25T00:00:00+02:00");
    let cho_week = at("2026-10-19T00:00:00+02:00");
    // Active time by level: development (2) 6000 s, communication (0) 5400 s.
    let ana_pulse = (6000.0 * 4.0 + 5400.0 * 2.0) / (4.0 * 11400.0) * 100.0;
    let mut v: Vec<Expected> = vec![
        // Presence: 09:00–10:20 not-afk, the AFK span 10:20–10:40 absent in full (the
        // watcher already backdated it to the last input), 10:40–12:30 not-afk, meetings
        // to 13:00 → 09:00–10:20 (80 min) + 10:40–13:00 (140 min) = 220 min.
        ("ana", "day", ana_day, "presence_seconds", "", 220.0 * 60.0),
        // Code 09:00–11:00 ∩ presence = 80 + 20 min = 6000 s; Slack 30 min; Zoom 60 min:
        // 6000 + 1800 + 3600.
        ("ana", "day", ana_day, "active_seconds", "", 11400.0),
        (
            "ana",
            "day",
            ana_day,
            "active_seconds_by_app",
            "Code",
            6000.0,
        ),
        (
            "ana",
            "day",
            ana_day,
            "active_seconds_by_app",
            "Slack",
            1800.0,
        ),
        (
            "ana",
            "day",
            ana_day,
            "active_seconds_by_app",
            "Zoom",
            3600.0,
        ),
        (
            "ana",
            "day",
            ana_day,
            "active_seconds_by_category",
            "development",
            6000.0,
        ),
        (
            "ana",
            "day",
            ana_day,
            "active_seconds_by_category",
            "communication",
            5400.0,
        ),
        (
            "ana",
            "day",
            ana_day,
            "active_seconds_by_level",
            "2",
            6000.0,
        ),
        (
            "ana",
            "day",
            ana_day,
            "active_seconds_by_level",
            "0",
            5400.0,
        ),
        ("ana", "day", ana_day, "productivity_pulse", "", ana_pulse),
        ("ana", "day", ana_day, "productive_seconds", "", 6000.0),
        // One slot-label change: development → communication at 11:00.
        ("ana", "day", ana_day, "context_switches", "", 1.0),
        (
            "ana",
            "day",
            ana_day,
            "context_switches",
            "to_communication",
            1.0,
        ),
        (
            "ana",
            "day",
            ana_day,
            "context_switches",
            "to_distraction",
            0.0,
        ),
        (
            "ana",
            "day",
            ana_day,
            "context_switches",
            "work_to_work",
            0.0,
        ),
        ("ana", "day", ana_day, "coding_seconds", "", 0.0),
        ("ana", "day", ana_day, "coding_present_seconds", "", 0.0),
        // Meetings 11:15–12:15 ∪ 12:00–13:00 = 105 min; chat = Slack focus 11:00–11:30;
        // together 11:00–13:00.
        ("ana", "day", ana_day, "meeting_seconds", "", 6300.0),
        ("ana", "day", ana_day, "meeting_count", "", 2.0),
        ("ana", "day", ana_day, "collaboration_seconds", "", 7200.0),
        (
            "ana",
            "day",
            ana_day,
            "collaboration_seconds_by_type",
            "meeting",
            6300.0,
        ),
        (
            "ana",
            "day",
            ana_day,
            "collaboration_seconds_by_type",
            "chat",
            1800.0,
        ),
        (
            "ana",
            "day",
            ana_day,
            "collaboration_seconds_by_type",
            "email",
            0.0,
        ),
        (
            "ana",
            "day",
            ana_day,
            "collaboration_seconds_by_type",
            "call",
            0.0,
        ),
        // Work 09:00–17:00 minus meetings: 09:00–11:15 (135 min), 13:00–17:00 (240 min).
        (
            "ana",
            "day",
            ana_day,
            "calendar_focus_seconds",
            "",
            375.0 * 60.0,
        ),
        ("ana", "day", ana_day, "open_blocks", "1h", 2.0),
        ("ana", "day", ana_day, "open_blocks", "2h", 2.0),
        // The 13:30 email cuts 13:00–17:00 into 30 + 210 min: 135 + 210.
        (
            "ana",
            "day",
            ana_day,
            "uninterrupted_seconds",
            "",
            345.0 * 60.0,
        ),
        // Development active 09:00–10:20 (80 min ≥ 30) counts; 10:40–11:00 (20 min) not.
        ("ana", "day", ana_day, "deep_work_seconds", "", 80.0 * 60.0),
        ("ana", "day", ana_day, "multitasking_seconds", "", 0.0),
        // Two messages during the 1 h 1:1: 2 per meeting hour → multitasked.
        ("ana", "day", ana_day, "messages_during_meetings", "", 2.0),
        ("ana", "day", ana_day, "multitasked_meetings", "", 1.0),
        ("ana", "day", ana_day, "after_hours_active_seconds", "", 0.0),
        (
            "ana",
            "day",
            ana_day,
            "after_hours_collaboration_seconds",
            "",
            0.0,
        ),
        ("ana", "day", ana_day, "weekend_active_seconds", "", 0.0),
        // First activity 09:00, last 13:00 (end of the second meeting).
        (
            "ana",
            "day",
            ana_day,
            "workday_span_seconds",
            "",
            4.0 * 3600.0,
        ),
        // Both meetings overlap: their full durations.
        (
            "ana",
            "day",
            ana_day,
            "conflicting_meeting_seconds",
            "",
            7200.0,
        ),
        ("ana", "day", ana_day, "long_meetings", "", 0.0),
        ("ana", "day", ana_day, "large_meetings", "", 0.0),
        ("ana", "day", ana_day, "long_and_large_meetings", "", 0.0),
        // 2 people × 1 h × 75 + 3 people × 1 h × 75.
        ("ana", "day", ana_day, "meeting_cost", "", 375.0),
        ("ana", "day", ana_day, "one_on_one_seconds", "", 3600.0),
        // 28-day 1:1 total 60 min ÷ 4 weeks = 15 min/week: not below 15.
        (
            "ana",
            "day",
            ana_day,
            "manager_one_on_one_minutes_per_week",
            "",
            15.0,
        ),
        ("ana", "day", ana_day, "manager_one_on_one_low", "", 0.0),
        // Interaction units: mgr 3 (1:1) + 1 + 1 (chat) = 5 < 6; b 3 (meeting) + 3 (email)
        // = 6; c 3 → a network of one.
        ("ana", "day", ana_day, "network_size", "", 1.0),
        ("ana", "day", ana_day, "network_size", "internal", 1.0),
        ("ana", "day", ana_day, "network_size", "external", 0.0),
        ("ana", "day", ana_day, "active_day", "", 1.0),
        ("ana", "day", ana_day, "utilization", "", 6000.0 / 21600.0),
        ("ana", "day", ana_day, "over_utilized", "", 0.0),
        ("ana", "day", ana_day, "under_utilized", "", 1.0),
        ("ana", "day", ana_day, "implausible_workday", "", 0.0),
        ("ana", "day", ana_day, "event_count", "", 12.0),
        ("ana", "day", ana_day, "event_count_by_kind", "afk", 3.0),
        (
            "ana",
            "day",
            ana_day,
            "event_count_by_kind",
            "window_focus",
            4.0,
        ),
        ("ana", "day", ana_day, "event_count_by_kind", "meeting", 2.0),
        ("ana", "day", ana_day, "event_count_by_kind", "message", 2.0),
        ("ana", "day", ana_day, "event_count_by_kind", "email", 1.0),
        // Hours (local).
        ("ana", "hour", ana_h(9), "active_seconds", "", 3600.0),
        ("ana", "hour", ana_h(9), "deep_work_seconds", "", 3600.0),
        (
            "ana",
            "hour",
            ana_h(10),
            "presence_seconds",
            "",
            40.0 * 60.0,
        ),
        // 10:00–10:20 and 10:40–11:00.
        ("ana", "hour", ana_h(10), "active_seconds", "", 40.0 * 60.0),
        (
            "ana",
            "hour",
            ana_h(10),
            "deep_work_seconds",
            "",
            20.0 * 60.0,
        ),
        (
            "ana",
            "hour",
            ana_h(11),
            "context_switches",
            "to_communication",
            1.0,
        ),
        ("ana", "hour", ana_h(11), "meeting_seconds", "", 45.0 * 60.0),
        (
            "ana",
            "hour",
            ana_h(11),
            "collaboration_seconds",
            "",
            3600.0,
        ),
        (
            "ana",
            "hour",
            ana_h(11),
            "messages_during_meetings",
            "",
            2.0,
        ),
        ("ana", "hour", ana_h(12), "meeting_seconds", "", 3600.0),
        ("ana", "hour", ana_h(12), "productivity_pulse", "", 50.0),
        // The week (Monday 2026-11-23).
        ("ana", "week", ana_week, "active_seconds", "", 11400.0),
        ("ana", "week", ana_week, "productive_seconds", "", 6000.0),
        ("ana", "week", ana_week, "collaboration_seconds", "", 7200.0),
        ("ana", "week", ana_week, "meeting_seconds", "", 6300.0),
        ("ana", "week", ana_week, "deep_work_seconds", "", 4800.0),
        ("ana", "week", ana_week, "active_day", "", 1.0),
        (
            "ana",
            "week",
            ana_week,
            "productive_hours_per_active_day",
            "",
            6000.0 / 3600.0,
        ),
        ("ana", "week", ana_week, "under_utilized", "", 1.0),
        ("ana", "week", ana_week, "over_utilized", "", 0.0),
        ("ana", "week", ana_week, "burnout_risk", "", 0.0),
        ("ana", "week", ana_week, "inactive_week", "", 0.0),
        // 2 h of collaboration < 5 h.
        (
            "ana",
            "week",
            ana_week,
            "non_knowledge_worker_week",
            "",
            1.0,
        ),
        // ben, Tuesday (New York). Focus Code 22:00–22:45, present throughout.
        ("ben", "day", ben_day, "presence_seconds", "", 2700.0),
        ("ben", "day", ben_day, "active_seconds", "", 2700.0),
        ("ben", "day", ben_day, "productive_seconds", "", 2700.0),
        ("ben", "day", ben_day, "productivity_pulse", "", 100.0),
        ("ben", "day", ben_day, "deep_work_seconds", "", 2700.0),
        (
            "ben",
            "day",
            ben_day,
            "after_hours_active_seconds",
            "",
            2700.0,
        ),
        // Heartbeats 22:00, 22:14:59 (gap 899 s, credited), 22:30 (gap 901 s, not),
        // 22:40, 22:50 (gaps 600 s), 23:55 (gap 65 min, not), 00:05 next day (gap 10 min,
        // split at midnight: 5 min here). 899 + 1200 + 300.
        ("ben", "day", ben_day, "coding_seconds", "", 2399.0),
        (
            "ben",
            "day",
            ben_day,
            "coding_seconds_by_project",
            "api",
            2399.0,
        ),
        // Coding ∩ presence (to 22:45): 899 + 900.
        ("ben", "day", ben_day, "coding_present_seconds", "", 1799.0),
        // Activity from 22:00 to midnight (the last coding piece).
        ("ben", "day", ben_day, "workday_span_seconds", "", 7200.0),
        (
            "ben",
            "day",
            ben_day,
            "calendar_focus_seconds",
            "",
            8.0 * 3600.0,
        ),
        (
            "ben",
            "day",
            ben_day,
            "uninterrupted_seconds",
            "",
            8.0 * 3600.0,
        ),
        ("ben", "day", ben_day, "open_blocks", "1h", 1.0),
        ("ben", "day", ben_day, "open_blocks", "2h", 1.0),
        // 45 productive minutes: not an active day (60), so no utilization flags.
        ("ben", "day", ben_day, "active_day", "", 0.0),
        ("ben", "day", ben_day, "utilization", "", 2700.0 / 21600.0),
        ("ben", "day", ben_day, "over_utilized", "", 0.0),
        ("ben", "day", ben_day, "under_utilized", "", 0.0),
        ("ben", "day", ben_day, "event_count", "", 9.0),
        (
            "ben",
            "day",
            ben_day,
            "event_count_by_kind",
            "ide_heartbeat",
            6.0,
        ),
        ("ben", "day", ben_day, "event_count_by_kind", "commit", 1.0),
        (
            "ben",
            "hour",
            ben_day + 23 * 3_600_000,
            "coding_seconds",
            "",
            300.0,
        ),
        (
            "ben",
            "hour",
            ben_day + 23 * 3_600_000,
            "event_count_by_kind",
            "commit",
            1.0,
        ),
        (
            "ben",
            "hour",
            ben_day + 22 * 3_600_000,
            "coding_seconds",
            "",
            2099.0,
        ),
        // Wednesday: 00:00–00:05 (rest of the gap from 23:55) and 00:05–00:10.
        ("ben", "day", ben_next, "coding_seconds", "", 600.0),
        ("ben", "day", ben_next, "active_seconds", "", 0.0),
        ("ben", "day", ben_next, "workday_span_seconds", "", 600.0),
        ("ben", "day", ben_next, "event_count", "", 2.0),
        ("ben", "week", ben_week, "coding_seconds", "", 2999.0),
        (
            "ben",
            "week",
            ben_week,
            "after_hours_active_seconds",
            "",
            2700.0,
        ),
        ("ben", "week", ben_week, "active_day", "", 0.0),
        // cho, the 25-hour Sunday. Firefox (browsing, 0) 00:30Z–01:30Z, YouTube
        // (entertainment, −2) 01:30Z–02:30Z, all present.
        ("cho", "day", cho_day, "presence_seconds", "", 7200.0),
        ("cho", "day", cho_day, "active_seconds", "", 7200.0),
        (
            "cho",
            "day",
            cho_day,
            "active_seconds_by_category",
            "browsing",
            3600.0,
        ),
        (
            "cho",
            "day",
            cho_day,
            "active_seconds_by_category",
            "entertainment",
            3600.0,
        ),
        ("cho", "day", cho_day, "productivity_pulse", "", 25.0),
        ("cho", "day", cho_day, "productive_seconds", "", 0.0),
        (
            "cho",
            "day",
            cho_day,
            "context_switches",
            "to_distraction",
            1.0,
        ),
        ("cho", "day", cho_day, "weekend_active_seconds", "", 7200.0),
        (
            "cho",
            "day",
            cho_day,
            "after_hours_active_seconds",
            "",
            7200.0,
        ),
        ("cho", "day", cho_day, "calendar_focus_seconds", "", 0.0),
        ("cho", "day", cho_day, "workday_span_seconds", "", 7200.0),
        // The two 02:00 hours are distinct windows: 02:00 CEST = 00:00Z, 02:00 CET = 01:00Z.
        ("cho", "hour", z0(0), "active_seconds", "", 1800.0),
        ("cho", "hour", z0(1), "active_seconds", "", 3600.0),
        (
            "cho",
            "hour",
            z0(1),
            "context_switches",
            "to_distraction",
            1.0,
        ),
        ("cho", "hour", z0(2), "active_seconds", "", 1800.0),
        ("cho", "week", cho_week, "active_seconds", "", 7200.0),
        (
            "cho",
            "week",
            cho_week,
            "after_hours_active_seconds",
            "",
            7200.0,
        ),
    ];
    v.sort_by(|a, b| {
        (a.0, a.1, a.2, a.3, a.4)
            .partial_cmp(&(b.0, b.1, b.2, b.3, b.4))
            .expect("no NaN keys")
    });
    v
}

/// 2026-10-25 `h`:00 UTC.
fn z0(h: i64) -> i64 {
    at("2026-10-25T00:00:00Z") + h * 3_600_000
}

/// The end of each golden day window (for the 25-hour check).
pub fn cho_day_window() -> (i64, i64) {
    (
        at("2026-10-25T00:00:00+02:00"),
        at("2026-10-26T00:00:00+01:00"),
    )
}
