//! The feature operators: pure functions from one person's activities in one local day to
//! the feature values of that day and each of its hours (`METRICS.md`).
//!
//! Computed here:
//! - `presence_seconds`: |∪(not-AFK intervals with gaps ≤ flood filled, attended meetings
//!   (≥ 2 people, not declined), calls (not declined))|.
//! - `active_seconds` (F1): |window_focus ∩ presence|, total and `_by_app` / `_by_category`.
//!   Focus heartbeats with identical app and title merge when the next starts within
//!   `pulsetime` of the previous end; where focus intervals overlap, the one that started
//!   first keeps the overlap, so no second is counted twice.
//! - `context_switches` (F8): each 5-minute slot (aligned to local midnight) is labelled by
//!   the category with the most active time in it (ties: alphabetical); a switch is a label
//!   different from the previous labelled slot of the same day, typed by the new label:
//!   `to_distraction` (level < 0), `to_communication`, else `work_to_work`; counted in the
//!   hour where the new label's slot starts.
//! - `event_count`: events starting in the window, total and `_by_kind`.
//!
//! Being pure and order-independent (inputs are sorted here), the same activities always
//! give the same values, whatever order or batches they arrived in.

use std::collections::BTreeMap;

use digame_schemas::EventKind;
use serde::{Deserialize, Serialize};

use crate::categories::{self, Category};

/// Five minutes, the F8 slot.
pub const SLOT_MS: i64 = 300_000;

/// What the operators need of one event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Activity {
    pub start: i64,
    pub end: i64,
    pub kind: EventKind,
    /// Application for `window_focus`.
    pub app: Option<String>,
    pub title: Option<String>,
    pub status: Option<String>,
    /// Distinct people other than the subject listed as participants.
    pub others: u32,
}

impl Activity {
    fn counts_as_meeting(&self) -> bool {
        self.kind == EventKind::Meeting && self.others >= 1 && !self.declined()
    }

    fn declined(&self) -> bool {
        self.status.as_deref() == Some("declined")
    }
}

/// Tunables of the operators.
#[derive(Clone, Copy, Debug)]
pub struct FeatureParams {
    pub pulsetime_ms: i64,
    pub flood_ms: i64,
}

/// The features this operator computes. Variants are declared in the alphabetical order
/// of their names, so maps keyed by `Feature` sort exactly as maps keyed by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Feature {
    ActiveSeconds,
    ActiveSecondsByApp,
    ActiveSecondsByCategory,
    ContextSwitches,
    EventCount,
    EventCountByKind,
    PresenceSeconds,
}

impl Feature {
    pub const ALL: [Feature; 7] = [
        Feature::ActiveSeconds,
        Feature::ActiveSecondsByApp,
        Feature::ActiveSecondsByCategory,
        Feature::ContextSwitches,
        Feature::EventCount,
        Feature::EventCountByKind,
        Feature::PresenceSeconds,
    ];

    /// The name stored in feature rows.
    pub fn name(self) -> &'static str {
        match self {
            Feature::ActiveSeconds => "active_seconds",
            Feature::ActiveSecondsByApp => "active_seconds_by_app",
            Feature::ActiveSecondsByCategory => "active_seconds_by_category",
            Feature::ContextSwitches => "context_switches",
            Feature::EventCount => "event_count",
            Feature::EventCountByKind => "event_count_by_kind",
            Feature::PresenceSeconds => "presence_seconds",
        }
    }
}

/// Feature and breakdown value; the breakdown borrows from the activities (app names) or
/// is static (categories, kinds, switch types), so adding costs no allocation.
pub type FeatureKey<'a> = (Feature, &'a str);

/// Values of one window.
pub type WindowValues<'a> = BTreeMap<FeatureKey<'a>, f64>;

/// Values for a day and its hours, keyed by window start.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DayFeatures<'a> {
    pub day: WindowValues<'a>,
    pub hours: BTreeMap<i64, WindowValues<'a>>,
}

pub const PRESENCE: Feature = Feature::PresenceSeconds;
pub const ACTIVE: Feature = Feature::ActiveSeconds;
pub const ACTIVE_BY_APP: Feature = Feature::ActiveSecondsByApp;
pub const ACTIVE_BY_CATEGORY: Feature = Feature::ActiveSecondsByCategory;
pub const SWITCHES: Feature = Feature::ContextSwitches;
pub const EVENTS: Feature = Feature::EventCount;
pub const EVENTS_BY_KIND: Feature = Feature::EventCountByKind;
pub const SWITCH_TYPES: [&str; 3] = ["to_distraction", "to_communication", "work_to_work"];

/// Merges intervals, filling gaps of at most `gap` between neighbours.
fn union(mut spans: Vec<(i64, i64)>, gap: i64) -> Vec<(i64, i64)> {
    spans.retain(|(s, e)| e > s);
    spans.sort_unstable();
    let mut out: Vec<(i64, i64)> = Vec::with_capacity(spans.len());
    for (s, e) in spans {
        match out.last_mut() {
            Some(last) if s <= last.1 + gap => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// Presence intervals of the given activities, unclipped.
pub fn presence(acts: &[Activity], params: &FeatureParams) -> Vec<(i64, i64)> {
    let not_afk: Vec<(i64, i64)> = acts
        .iter()
        .filter(|a| a.kind == EventKind::Afk && a.status.as_deref() == Some("not-afk"))
        .map(|a| (a.start, a.end))
        .collect();
    let mut spans = union(not_afk, params.flood_ms);
    spans.extend(
        acts.iter()
            .filter(|a| a.counts_as_meeting() || (a.kind == EventKind::Call && !a.declined()))
            .map(|a| (a.start, a.end)),
    );
    union(spans, 0)
}

/// Focus intervals after heartbeat merging and overlap resolution: `(start, end, app)`.
pub fn focus<'a>(acts: &'a [Activity], params: &FeatureParams) -> Vec<(i64, i64, &'a str)> {
    let mut beats: Vec<&Activity> = acts
        .iter()
        .filter(|a| a.kind == EventKind::WindowFocus && a.app.is_some())
        .collect();
    beats.sort_by(|a, b| {
        (a.start, a.end, &a.app, &a.title).cmp(&(b.start, b.end, &b.app, &b.title))
    });
    let mut merged: Vec<(i64, i64, &Activity)> = Vec::with_capacity(beats.len());
    for b in beats {
        if let Some(last) = merged.last_mut() {
            let same = last.2.app == b.app && last.2.title == b.title;
            if same && b.start <= last.1 + params.pulsetime_ms {
                last.1 = last.1.max(b.end);
                continue;
            }
        }
        merged.push((b.start, b.end, b));
    }
    let mut out: Vec<(i64, i64, &'a str)> = Vec::with_capacity(merged.len());
    let mut covered_until = i64::MIN;
    for (s, e, a) in merged {
        let s = s.max(covered_until);
        if e > s {
            out.push((s, e, a.app.as_deref().unwrap_or_default()));
            covered_until = e;
        }
    }
    out
}

/// Intersects sorted, disjoint `focus` with sorted, disjoint `presence`.
fn active_pieces(focus: &[(i64, i64, &str)], presence: &[(i64, i64)]) -> Vec<(i64, i64, usize)> {
    let mut out = Vec::new();
    let mut j = 0;
    for (i, (fs, fe, _)) in focus.iter().enumerate() {
        while j < presence.len() && presence[j].1 <= *fs {
            j += 1;
        }
        let mut k = j;
        while k < presence.len() && presence[k].0 < *fe {
            let s = (*fs).max(presence[k].0);
            let e = (*fe).min(presence[k].1);
            if e > s {
                out.push((s, e, i));
            }
            k += 1;
        }
    }
    out
}

fn add<'a>(values: &mut WindowValues<'a>, feature: Feature, dim: &'a str, amount: f64) {
    *values.entry((feature, dim)).or_insert(0.0) += amount;
}

/// The hour (of sorted, contiguous `hours`) containing `t`.
fn hour_of(hours: &[(i64, i64)], t: i64) -> Option<(i64, i64)> {
    let i = hours.partition_point(|&(_, he)| he <= t);
    hours.get(i).copied().filter(|&(hs, _)| hs <= t)
}

/// Adds `ms` of the span `[s, e)` to every hour it overlaps.
fn spread<F: FnMut(i64, i64)>(hours: &[(i64, i64)], s: i64, e: i64, mut f: F) {
    let first = hours.partition_point(|&(_, he)| he <= s);
    for &(hs, he) in &hours[first..] {
        if hs >= e {
            break;
        }
        let a = s.max(hs);
        let b = e.min(he);
        if b > a {
            f(hs, b - a);
        }
    }
}

/// Computes the features of one local day `[day_start, day_end)` with the given hour
/// windows (from [`crate::window::hours_of_day`]).
pub fn compute_day<'a>(
    acts: &'a [Activity],
    day: (i64, i64),
    hours: &[(i64, i64)],
    params: &FeatureParams,
) -> DayFeatures<'a> {
    let clip = |spans: Vec<(i64, i64)>| -> Vec<(i64, i64)> {
        spans
            .into_iter()
            .map(|(s, e)| (s.max(day.0), e.min(day.1)))
            .filter(|(s, e)| e > s)
            .collect()
    };
    let present = clip(presence(acts, params));
    let focused: Vec<(i64, i64, &str)> = focus(acts, params)
        .into_iter()
        .map(|(s, e, app)| (s.max(day.0), e.min(day.1), app))
        .filter(|(s, e, _)| e > s)
        .collect();
    // Few distinct apps per day: categorize each once.
    let mut known: Vec<(&str, Category)> = Vec::new();
    let categories: Vec<Category> = focused
        .iter()
        .map(|&(_, _, app)| match known.iter().find(|(a, _)| *a == app) {
            Some(&(_, c)) => c,
            None => {
                let c = categories::categorize(app);
                known.push((app, c));
                c
            }
        })
        .collect();
    let active = active_pieces(&focused, &present);

    let mut out = DayFeatures::default();
    // Windows with any event get the standard features even when they are zero, so a
    // reader can tell "measured zero" from "no data".
    let standard = |values: &mut WindowValues| {
        for f in [PRESENCE, ACTIVE, SWITCHES, EVENTS] {
            values.entry((f, "")).or_insert(0.0);
        }
        for t in SWITCH_TYPES {
            values.entry((SWITCHES, t)).or_insert(0.0);
        }
    };
    standard(&mut out.day);
    let mut touched = vec![false; hours.len()];
    for a in acts {
        let first = hours.partition_point(|&(_, he)| he <= a.start);
        let end = a.end.max(a.start + 1);
        for (i, &(hs, _)) in hours.iter().enumerate().skip(first) {
            if hs >= end {
                break;
            }
            touched[i] = true;
        }
    }
    for (&(hs, _), _) in hours.iter().zip(&touched).filter(|(_, t)| **t) {
        standard(out.hours.entry(hs).or_default());
    }

    for &(s, e) in &present {
        add(&mut out.day, PRESENCE, "", (e - s) as f64 / 1000.0);
        spread(hours, s, e, |h, ms| {
            add(
                out.hours.entry(h).or_default(),
                PRESENCE,
                "",
                ms as f64 / 1000.0,
            )
        });
    }

    // Per-slot active time by category, for F8.
    let mut slots: BTreeMap<i64, BTreeMap<&'static str, i64>> = BTreeMap::new();
    for &(s, e, i) in &active {
        let app = focused[i].2;
        let cat = categories[i].name;
        let secs = (e - s) as f64 / 1000.0;
        add(&mut out.day, ACTIVE, "", secs);
        add(&mut out.day, ACTIVE_BY_APP, app, secs);
        add(&mut out.day, ACTIVE_BY_CATEGORY, cat, secs);
        spread(hours, s, e, |h, ms| {
            let v = out.hours.entry(h).or_default();
            let secs = ms as f64 / 1000.0;
            add(v, ACTIVE, "", secs);
            add(v, ACTIVE_BY_APP, app, secs);
            add(v, ACTIVE_BY_CATEGORY, cat, secs);
        });
        let mut t = s;
        while t < e {
            let slot = day.0 + (t - day.0).div_euclid(SLOT_MS) * SLOT_MS;
            let slot_end = (slot + SLOT_MS).min(e);
            *slots.entry(slot).or_default().entry(cat).or_insert(0) += slot_end - t;
            t = slot_end;
        }
    }
    let mut previous: Option<&'static str> = None;
    for (slot, by_cat) in &slots {
        // Highest time wins; on a tie the alphabetically first name.
        let label = by_cat
            .iter()
            .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
            .map(|(c, _)| *c)
            .expect("a slot exists only with active time");
        if let Some(prev) = previous
            && prev != label
        {
            let cat = categories::by_name(label);
            let kind = if cat.is_distraction() {
                SWITCH_TYPES[0]
            } else if cat.is_communication() {
                SWITCH_TYPES[1]
            } else {
                SWITCH_TYPES[2]
            };
            add(&mut out.day, SWITCHES, "", 1.0);
            add(&mut out.day, SWITCHES, kind, 1.0);
            if let Some((h, _)) = hour_of(hours, *slot) {
                let v = out.hours.entry(h).or_default();
                add(v, SWITCHES, "", 1.0);
                add(v, SWITCHES, kind, 1.0);
            }
        }
        previous = Some(label);
    }

    for a in acts {
        if a.start < day.0 || a.start >= day.1 {
            continue;
        }
        let kind = a.kind.as_str();
        add(&mut out.day, EVENTS, "", 1.0);
        add(&mut out.day, EVENTS_BY_KIND, kind, 1.0);
        if let Some((h, _)) = hour_of(hours, a.start) {
            let v = out.hours.entry(h).or_default();
            add(v, EVENTS, "", 1.0);
            add(v, EVENTS_BY_KIND, kind, 1.0);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_sort_as_their_names() {
        let mut by_name = Feature::ALL;
        by_name.sort_by_key(|f| f.name());
        assert_eq!(by_name, Feature::ALL);
        let mut by_variant = Feature::ALL;
        by_variant.sort();
        assert_eq!(by_variant, Feature::ALL);
    }

    /// 2026-11-24T00:00:00Z
    const D: i64 = 1_795_478_400_000;

    fn t(h: i64, m: i64, s: i64) -> i64 {
        D + h * 3_600_000 + m * 60_000 + s * 1000
    }

    fn act(kind: EventKind, start: i64, end: i64) -> Activity {
        Activity {
            start,
            end,
            kind,
            app: None,
            title: None,
            status: None,
            others: 0,
        }
    }

    fn focus_on(app: &str, start: i64, end: i64) -> Activity {
        Activity {
            app: Some(app.into()),
            title: Some("t".into()),
            ..act(EventKind::WindowFocus, start, end)
        }
    }

    fn with_status(mut a: Activity, status: &str) -> Activity {
        a.status = Some(status.into());
        a
    }

    fn day_of_work() -> Vec<Activity> {
        let mut meeting = with_status(
            act(EventKind::Meeting, t(11, 0, 0), t(11, 30, 0)),
            "accepted",
        );
        meeting.others = 1;
        let mut declined = with_status(
            act(EventKind::Meeting, t(12, 0, 0), t(13, 0, 0)),
            "declined",
        );
        declined.others = 3;
        vec![
            with_status(act(EventKind::Afk, t(9, 0, 0), t(9, 50, 0)), "not-afk"),
            // A 3 s gap, filled by the 5 s flood.
            with_status(act(EventKind::Afk, t(9, 50, 3), t(10, 30, 0)), "not-afk"),
            with_status(act(EventKind::Afk, t(10, 30, 0), t(11, 0, 0)), "afk"),
            focus_on("Code", t(9, 0, 0), t(9, 10, 0)),
            // Same data 1 s later: merged (pulsetime 2 s).
            focus_on("Code", t(9, 10, 1), t(9, 20, 0)),
            focus_on("Slack", t(9, 20, 0), t(9, 32, 0)),
            // Overlaps Slack by 2 min: Slack keeps the overlap.
            focus_on("Firefox", t(9, 30, 0), t(9, 40, 0)),
            focus_on("Spotify", t(9, 40, 0), t(9, 45, 0)),
            // Runs past the end of presence at 10:30.
            focus_on("Code", t(9, 45, 0), t(10, 45, 0)),
            meeting,
            focus_on("Zoom", t(11, 0, 0), t(11, 30, 0)),
            act(EventKind::Message, t(11, 10, 0), t(11, 10, 0)),
            act(EventKind::Commit, t(10, 10, 0), t(10, 10, 0)),
            declined,
        ]
    }

    fn params() -> FeatureParams {
        FeatureParams {
            pulsetime_ms: 2_000,
            flood_ms: 5_000,
        }
    }

    fn hours() -> Vec<(i64, i64)> {
        (0..24).map(|h| (t(h, 0, 0), t(h + 1, 0, 0))).collect()
    }

    fn get(v: &WindowValues, f: Feature, dim: &str) -> f64 {
        v.get(&(f, dim)).copied().unwrap_or(f64::NAN)
    }

    #[test]
    fn hand_computed_day() {
        let acts = day_of_work();
        let f = compute_day(&acts, (D, t(24, 0, 0)), &hours(), &params());
        // Presence: 09:00–10:30 (flooded) + meeting 11:00–11:30; the declined meeting adds
        // nothing.
        assert_eq!(get(&f.day, PRESENCE, ""), 5400.0 + 1800.0);
        // Active: Code 1200 + Slack 720 + Firefox 480 + Spotify 300 + Code 2700 + Zoom 1800.
        assert_eq!(get(&f.day, ACTIVE, ""), 7200.0);
        assert_eq!(get(&f.day, ACTIVE_BY_APP, "Code"), 3900.0);
        assert_eq!(get(&f.day, ACTIVE_BY_APP, "Slack"), 720.0);
        assert_eq!(get(&f.day, ACTIVE_BY_APP, "Firefox"), 480.0);
        assert_eq!(get(&f.day, ACTIVE_BY_CATEGORY, "communication"), 2520.0);
        assert_eq!(get(&f.day, ACTIVE_BY_CATEGORY, "development"), 3900.0);
        assert_eq!(get(&f.day, ACTIVE_BY_CATEGORY, "entertainment"), 300.0);
        // Switches: dev→comm 09:20, comm→browsing 09:30, →entertainment 09:40,
        // →dev 09:45, dev→comm 11:00.
        assert_eq!(get(&f.day, SWITCHES, ""), 5.0);
        assert_eq!(get(&f.day, SWITCHES, "to_communication"), 2.0);
        assert_eq!(get(&f.day, SWITCHES, "work_to_work"), 2.0);
        assert_eq!(get(&f.day, SWITCHES, "to_distraction"), 1.0);
        assert_eq!(get(&f.day, EVENTS, ""), 14.0);
        assert_eq!(get(&f.day, EVENTS_BY_KIND, "window_focus"), 7.0);
        assert_eq!(get(&f.day, EVENTS_BY_KIND, "meeting"), 2.0);

        let h9 = &f.hours[&t(9, 0, 0)];
        assert_eq!(get(h9, PRESENCE, ""), 3600.0);
        assert_eq!(get(h9, ACTIVE, ""), 3600.0);
        assert_eq!(get(h9, ACTIVE_BY_CATEGORY, "development"), 2100.0);
        assert_eq!(get(h9, SWITCHES, ""), 4.0);
        assert_eq!(get(h9, EVENTS, ""), 8.0);
        let h10 = &f.hours[&t(10, 0, 0)];
        assert_eq!(get(h10, ACTIVE, ""), 1800.0);
        assert_eq!(get(h10, SWITCHES, ""), 0.0);
        assert_eq!(get(h10, EVENTS, ""), 2.0);
        let h11 = &f.hours[&t(11, 0, 0)];
        assert_eq!(get(h11, SWITCHES, "to_communication"), 1.0);
        assert_eq!(get(h11, EVENTS, ""), 3.0);
        let h12 = &f.hours[&t(12, 0, 0)];
        assert_eq!(get(h12, PRESENCE, ""), 0.0);
        assert_eq!(get(h12, EVENTS, ""), 1.0);
        assert!(!f.hours.contains_key(&t(8, 0, 0)));
        assert_eq!(f.hours.len(), 4);

        // Arrival order does not matter.
        let mut reversed = acts.clone();
        reversed.reverse();
        let again = compute_day(&reversed, (D, t(24, 0, 0)), &hours(), &params());
        assert_eq!(again, f);
    }

    #[test]
    fn pulsetime_bounds_heartbeat_merging() {
        let p = params();
        let near = [focus_on("Code", 0, 1000), focus_on("Code", 3000, 4000)];
        assert_eq!(focus(&near, &p), vec![(0, 4000, "Code")]);
        let far = [focus_on("Code", 0, 1000), focus_on("Code", 3001, 4000)];
        assert_eq!(focus(&far, &p).len(), 2);
    }
}
