//! The feature operators: pure functions from one person's activities in one local day to
//! the feature values of that day and each of its hours, as `docs/features.md` defines them.
//!
//! Building blocks (all interval sets are merged, so overlap counts once):
//! - presence: where an AFK watcher reports (any `afk` event with a status), its not-AFK
//!   intervals (gaps ≤ flood between them filled), every AFK interval absent in full (the
//!   watcher has applied its timeout and backdated the span to the last input already);
//!   without one, presence is inferred from input activity (focus events and editor
//!   heartbeats, each followed by `afk_timeout` while input idle time is under it); in both
//!   cases also attended meetings (≥ 2 people, not declined), calls (not declined), and
//!   focus on always-active applications;
//! - focus: `window_focus` heartbeats with identical app and title merge when the next
//!   starts within `pulsetime` of the previous end; where focus intervals overlap, the one
//!   that started first keeps the overlap;
//! - active = focus ∩ presence, each piece classified by the person's rules (category,
//!   level, chat/email channel).
//!
//! Per day and hour (`F*` as in `docs/features.md`): F1 `active_seconds` (+ by app, category,
//! level), F2 `productivity_pulse`, F3 `coding_seconds` (+ by project, and
//! `coding_present_seconds`), F4 `collaboration_seconds` (+ by type; chat/email from
//! chat/mail-app focus, else estimated from sent messages and flagged
//! `collaboration_estimated`), F5 `meeting_seconds`, F6 `calendar_focus_seconds`,
//! `open_blocks`, `uninterrupted_seconds`, `deep_work_seconds`, F7 `multitasking_seconds`,
//! `messages_during_meetings`, `multitasked_meetings`, F8 `context_switches`, F9
//! `after_hours_*`, `weekend_active_seconds`, `workday_span_seconds`, F10 meeting quality,
//! F12 `one_on_one_seconds`, F13 `productive_seconds`, `utilization`, `over_utilized`,
//! `under_utilized`, and the day flags `active_day` and `implausible_workday`. Rolling and
//! weekly features (F11, F12's weekly figure, F13's week, F14, week flags) are kept by
//! [`crate::state`] from the [`DaySummary`] each computation returns.
//!
//! Being pure and order-independent (inputs are sorted here), the same activities always
//! give the same values, whatever order or batches they arrived in.

use std::collections::{BTreeMap, HashMap};

use digame_schemas::EventKind;
use digame_schemas::profile::Channel;
use serde::{Deserialize, Serialize};

use crate::rules::{COMMUNICATION, Class, PersonParams};

/// Five minutes, the F8 slot.
pub const SLOT_MS: i64 = 300_000;
const HOUR_MS: i64 = 3_600_000;
/// F7: the window in which ≥ 4 distinct applications mean multitasking.
const MULTITASK_WINDOW_MS: i64 = 60_000;
const MULTITASK_APPS: usize = 4;

/// What the operators need of one event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Activity {
    pub start: i64,
    pub end: i64,
    pub kind: EventKind,
    pub app: Option<String>,
    pub title: Option<String>,
    pub url: Option<String>,
    pub project: Option<String>,
    pub status: Option<String>,
    /// Distinct people other than the subject listed as participants (sorted).
    pub participants: Vec<String>,
}

impl Activity {
    /// A calendar meeting with at least one other person, not declined.
    pub fn counts_as_meeting(&self) -> bool {
        self.kind == EventKind::Meeting && !self.participants.is_empty() && !self.declined()
    }

    fn counts_as_call(&self) -> bool {
        self.kind == EventKind::Call && !self.declined()
    }

    fn declined(&self) -> bool {
        self.status.as_deref() == Some("declined")
    }

    /// A message or email the person sent (anything not marked `received`).
    fn is_sent(&self) -> bool {
        matches!(self.kind, EventKind::Message | EventKind::Email)
            && self.status.as_deref() != Some("received")
    }

    /// People in the interaction, the subject included.
    fn people(&self) -> usize {
        self.participants.len() + 1
    }
}

/// Tunables that are not per person.
#[derive(Clone, Copy, Debug)]
pub struct FeatureParams {
    pub pulsetime_ms: i64,
    pub flood_ms: i64,
}

macro_rules! features {
    ($($variant:ident => $name:literal),* $(,)?) => {
        /// Every feature. Variants are declared in the alphabetical order of their names,
        /// so maps keyed by `Feature` sort exactly as maps keyed by name.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum Feature { $($variant),* }

        impl Feature {
            pub const ALL: &'static [Feature] = &[$(Feature::$variant),*];

            /// The name stored in feature rows.
            pub fn name(self) -> &'static str {
                match self { $(Feature::$variant => $name),* }
            }

            /// The feature with this stored name.
            pub fn from_name(name: &str) -> Option<Feature> {
                match name { $($name => Some(Feature::$variant),)* _ => None }
            }
        }

        // Checkpoints hold features by name, so a reordering of variants cannot change
        // what a stored state means.
        impl Serialize for Feature {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.name())
            }
        }

        impl<'de> Deserialize<'de> for Feature {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let name = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                Feature::from_name(&name).ok_or_else(|| {
                    serde::de::Error::custom(format!("unknown feature {name:?} in stored state"))
                })
            }
        }
    };
}

features! {
    ActiveDay => "active_day",
    ActiveSeconds => "active_seconds",
    ActiveSecondsByApp => "active_seconds_by_app",
    ActiveSecondsByCategory => "active_seconds_by_category",
    ActiveSecondsByLevel => "active_seconds_by_level",
    AfterHoursActiveSeconds => "after_hours_active_seconds",
    AfterHoursCollaborationSeconds => "after_hours_collaboration_seconds",
    BurnoutRisk => "burnout_risk",
    CalendarFocusSeconds => "calendar_focus_seconds",
    CodingPresentSeconds => "coding_present_seconds",
    CodingSeconds => "coding_seconds",
    CodingSecondsByProject => "coding_seconds_by_project",
    CollaborationEstimated => "collaboration_estimated",
    CollaborationSeconds => "collaboration_seconds",
    CollaborationSecondsByType => "collaboration_seconds_by_type",
    ConflictingMeetingSeconds => "conflicting_meeting_seconds",
    ContextSwitches => "context_switches",
    DeepWorkSeconds => "deep_work_seconds",
    EventCount => "event_count",
    EventCountByKind => "event_count_by_kind",
    ImplausibleWorkday => "implausible_workday",
    InactiveWeek => "inactive_week",
    LargeMeetings => "large_meetings",
    LongAndLargeMeetings => "long_and_large_meetings",
    LongMeetings => "long_meetings",
    ManagerOneOnOneLow => "manager_one_on_one_low",
    ManagerOneOnOneMinutesPerWeek => "manager_one_on_one_minutes_per_week",
    MeetingCost => "meeting_cost",
    MeetingCount => "meeting_count",
    MeetingSeconds => "meeting_seconds",
    MessagesDuringMeetings => "messages_during_meetings",
    MultitaskedMeetings => "multitasked_meetings",
    MultitaskingSeconds => "multitasking_seconds",
    NetworkSize => "network_size",
    NonKnowledgeWorkerWeek => "non_knowledge_worker_week",
    OneOnOneSeconds => "one_on_one_seconds",
    OpenBlocks => "open_blocks",
    OverUtilized => "over_utilized",
    PresenceSeconds => "presence_seconds",
    ProductiveHoursPerActiveDay => "productive_hours_per_active_day",
    ProductiveSeconds => "productive_seconds",
    ProductivityPulse => "productivity_pulse",
    UnderUtilized => "under_utilized",
    UninterruptedSeconds => "uninterrupted_seconds",
    Utilization => "utilization",
    WeekendActiveSeconds => "weekend_active_seconds",
    WorkdaySpanSeconds => "workday_span_seconds",
}

use Feature as F;

/// Feature and breakdown value; the breakdown borrows from the activities (app names,
/// projects), the rules (categories) or is static, so adding costs no allocation.
pub type FeatureKey<'a> = (Feature, Dim<'a>);

/// A breakdown value, ordered exactly as `str` is but compared inline. Dimensions are
/// short, and the ordered windows compare them at every step of a descent, where a call
/// out to the library `memcmp` costs more than the comparison itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Dim<'a>(pub &'a str);

impl Ord for Dim<'_> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        let (a, b) = (self.0.as_bytes(), other.0.as_bytes());
        for (x, y) in a.iter().zip(b) {
            if x != y {
                return x.cmp(y);
            }
        }
        a.len().cmp(&b.len())
    }
}

impl PartialOrd for Dim<'_> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// Values of one window.
pub type WindowValues<'a> = BTreeMap<FeatureKey<'a>, f64>;

/// What the state keeps of a computed day for rolling and weekly features.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DaySummary {
    pub active_ms: i64,
    pub productive_ms: i64,
    pub deep_work_ms: i64,
    pub after_hours_ms: i64,
    pub collaboration_ms: i64,
    pub meeting_ms: i64,
    pub coding_ms: i64,
    pub one_on_one_ms: i64,
    pub active_day: bool,
    /// F11 interaction units per other person (3 = one meaningful interaction).
    pub interactions: Vec<(String, u32)>,
}

/// Values for a day and its hours, keyed by window start, and the day's summary.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DayFeatures<'a> {
    pub day: WindowValues<'a>,
    pub hours: BTreeMap<i64, WindowValues<'a>>,
    pub summary: DaySummary,
}

/// The day being computed, in the person's zone.
#[derive(Clone, Debug)]
pub struct DayContext<'p> {
    pub day: (i64, i64),
    /// The day's hour windows (from [`crate::window::hours_of_day`]).
    pub hours: Vec<(i64, i64)>,
    /// Working-hours intervals inside the day (empty on days off).
    pub work: Vec<(i64, i64)>,
    pub workday: bool,
    pub params: &'p PersonParams,
}

pub const SWITCH_TYPES: [&str; 3] = ["to_distraction", "to_communication", "work_to_work"];
const LEVEL_DIMS: [&str; 5] = ["-2", "-1", "0", "1", "2"];
const COLLAB_TYPES: [&str; 4] = ["call", "chat", "email", "meeting"];

/// Day features present (possibly zero) whenever the day has any event, so a reader can
/// tell "measured zero" from "no data".
const DAY_STANDARD: &[Feature] = &[
    F::ActiveDay,
    F::ActiveSeconds,
    F::AfterHoursActiveSeconds,
    F::AfterHoursCollaborationSeconds,
    F::CalendarFocusSeconds,
    F::CodingPresentSeconds,
    F::CodingSeconds,
    F::CollaborationSeconds,
    F::ConflictingMeetingSeconds,
    F::ContextSwitches,
    F::DeepWorkSeconds,
    F::EventCount,
    F::ImplausibleWorkday,
    F::LargeMeetings,
    F::LongAndLargeMeetings,
    F::LongMeetings,
    F::MeetingCost,
    F::MeetingCount,
    F::MeetingSeconds,
    F::MessagesDuringMeetings,
    F::MultitaskedMeetings,
    F::MultitaskingSeconds,
    F::OneOnOneSeconds,
    F::OverUtilized,
    F::PresenceSeconds,
    F::ProductiveSeconds,
    F::UnderUtilized,
    F::UninterruptedSeconds,
    F::Utilization,
    F::WeekendActiveSeconds,
    F::WorkdaySpanSeconds,
];

/// Hour features present whenever an event touches the hour.
const HOUR_STANDARD: &[Feature] = &[
    F::ActiveSeconds,
    F::AfterHoursActiveSeconds,
    F::AfterHoursCollaborationSeconds,
    F::CodingPresentSeconds,
    F::CodingSeconds,
    F::CollaborationSeconds,
    F::ContextSwitches,
    F::DeepWorkSeconds,
    F::EventCount,
    F::MeetingSeconds,
    F::MultitaskingSeconds,
    F::PresenceSeconds,
    F::ProductiveSeconds,
];

type Span = (i64, i64);

/// What classification depends on: app, title, URL, project.
type ClassKey<'a> = (&'a str, Option<&'a str>, Option<&'a str>, Option<&'a str>);

/// Merges intervals, filling gaps of at most `gap` between neighbours.
pub fn union(mut spans: Vec<Span>, gap: i64) -> Vec<Span> {
    spans.retain(|(s, e)| e > s);
    spans.sort_unstable();
    let mut out: Vec<Span> = Vec::with_capacity(spans.len());
    for (s, e) in spans {
        match out.last_mut() {
            Some(last) if s <= last.1 + gap => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// `a ∩ b` for sorted, disjoint sets.
pub fn intersect(a: &[Span], b: &[Span]) -> Vec<Span> {
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::new();
    while i < a.len() && j < b.len() {
        let s = a[i].0.max(b[j].0);
        let e = a[i].1.min(b[j].1);
        if e > s {
            out.push((s, e));
        }
        if a[i].1 < b[j].1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

/// `a − b` for sorted, disjoint sets.
pub fn subtract(a: &[Span], b: &[Span]) -> Vec<Span> {
    let mut out = Vec::new();
    let mut j = 0;
    for &(s, e) in a {
        let mut cur = s;
        while j < b.len() && b[j].1 <= cur {
            j += 1;
        }
        let mut k = j;
        while k < b.len() && b[k].0 < e {
            if b[k].0 > cur {
                out.push((cur, b[k].0));
            }
            cur = cur.max(b[k].1);
            k += 1;
        }
        if cur < e {
            out.push((cur, e));
        }
    }
    out
}

/// Total duration in ms.
pub fn total(spans: &[Span]) -> i64 {
    spans.iter().map(|(s, e)| e - s).sum()
}

fn clip(spans: Vec<Span>, day: Span) -> Vec<Span> {
    spans
        .into_iter()
        .map(|(s, e)| (s.max(day.0), e.min(day.1)))
        .filter(|(s, e)| e > s)
        .collect()
}

/// Presence intervals of the given activities, unclipped.
pub fn presence(acts: &[Activity], params: &PersonParams, fp: &FeatureParams) -> Vec<Span> {
    let watcher = acts
        .iter()
        .any(|a| a.kind == EventKind::Afk && a.status.is_some());
    let mut spans = if watcher {
        // `afk` spans are simply not presence: the timeout is never applied twice.
        let not_afk: Vec<Span> = acts
            .iter()
            .filter(|a| a.kind == EventKind::Afk && a.status.as_deref() == Some("not-afk"))
            .map(|a| (a.start, a.end))
            .collect();
        union(not_afk, fp.flood_ms)
    } else {
        // Only input activity is known: present while idle time is under the timeout.
        acts.iter()
            .filter(|a| matches!(a.kind, EventKind::WindowFocus | EventKind::IdeHeartbeat))
            .map(|a| (a.start, a.end.max(a.start) + params.afk_timeout_ms))
            .collect()
    };
    for a in acts {
        let span = match a.kind {
            EventKind::Meeting if a.counts_as_meeting() => (a.start, a.end),
            EventKind::Call if a.counts_as_call() => (a.start, a.end),
            EventKind::WindowFocus
                if a.app
                    .as_deref()
                    .is_some_and(|app| params.rules.is_always_active(app)) =>
            {
                (a.start, a.end)
            }
            _ => continue,
        };
        spans.push(span);
    }
    union(spans, 0)
}

/// Focus intervals after heartbeat merging and overlap resolution.
pub fn focus<'a>(acts: &'a [Activity], fp: &FeatureParams) -> Vec<(i64, i64, &'a Activity)> {
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
            if same && b.start <= last.1 + fp.pulsetime_ms {
                last.1 = last.1.max(b.end);
                continue;
            }
        }
        merged.push((b.start, b.end, b));
    }
    resolve_overlaps(merged)
}

/// Drops the parts of later-starting intervals that earlier ones already cover.
fn resolve_overlaps<T>(sorted: Vec<(i64, i64, T)>) -> Vec<(i64, i64, T)> {
    let mut out = Vec::with_capacity(sorted.len());
    let mut covered_until = i64::MIN;
    for (s, e, x) in sorted {
        let s = s.max(covered_until);
        if e > s {
            out.push((s, e, x));
            covered_until = e;
        }
    }
    out
}

/// F3: editor heartbeats joined across gaps of at most the keystroke timeout; each piece
/// runs from a heartbeat to the next one (when near enough) and carries its project.
pub fn coding(acts: &[Activity], timeout_ms: i64) -> Vec<(i64, i64, &Activity)> {
    let mut beats: Vec<&Activity> = acts
        .iter()
        .filter(|a| a.kind == EventKind::IdeHeartbeat)
        .collect();
    beats.sort_by(|a, b| (a.start, a.end, &a.project).cmp(&(b.start, b.end, &b.project)));
    let mut pieces = Vec::with_capacity(beats.len());
    for (i, b) in beats.iter().enumerate() {
        let mut end = b.end;
        if let Some(next) = beats.get(i + 1)
            && next.start - b.end <= timeout_ms
        {
            end = end.max(next.start);
        }
        pieces.push((b.start, end, *b));
    }
    resolve_overlaps(pieces)
}

/// Instants where ≥ 4 distinct applications had active focus within the trailing 60 s.
fn multitasking(active: &[(i64, i64, &str)]) -> Vec<Span> {
    // Each piece makes its app "recent" over [start, end + window).
    let mut edges: Vec<(i64, i32, &str)> = Vec::with_capacity(active.len() * 2);
    for &(s, e, app) in active {
        edges.push((s, 1, app));
        edges.push((e + MULTITASK_WINDOW_MS, -1, app));
    }
    // Removals before additions at the same instant: half-open spans.
    edges.sort_unstable_by_key(|e| (e.0, e.1));
    let mut recent: HashMap<&str, i32> = HashMap::new();
    let mut out = Vec::new();
    let mut since: Option<i64> = None;
    for (t, delta, app) in edges {
        let n = recent.entry(app).or_insert(0);
        *n += delta;
        if *n == 0 {
            recent.remove(app);
        }
        let busy = recent.len() >= MULTITASK_APPS;
        match (since, busy) {
            (None, true) => since = Some(t),
            (Some(s), false) => {
                out.push((s, t));
                since = None;
            }
            _ => {}
        }
    }
    union(out, 0)
}

/// Splits spans at the given instants (sorted).
fn cut_at(spans: &[Span], points: &[i64]) -> Vec<Span> {
    let mut out = Vec::new();
    for &(s, e) in spans {
        let mut cur = s;
        let first = points.partition_point(|&p| p <= s);
        for &p in points[first..].iter().take_while(|&&p| p < e) {
            if p > cur {
                out.push((cur, p));
            }
            cur = p;
        }
        out.push((cur, e));
    }
    out
}

fn blocks_at_least(spans: &[Span], min: i64) -> Vec<Span> {
    spans
        .iter()
        .copied()
        .filter(|(s, e)| e - s >= min)
        .collect()
}

/// Adds values to the day and the hours they fall in.
struct Acc<'a, 'h> {
    out: DayFeatures<'a>,
    hours: &'h [(i64, i64)],
    /// Values per hour, by index into `hours` (a direct index rather than a map lookup
    /// on the hot path); `None` for hours no activity touches. Moved into `out.hours` at
    /// the end.
    hour_values: Vec<Option<WindowValues<'a>>>,
}

impl<'a> Acc<'a, '_> {
    fn day(&mut self, f: Feature, dim: &'a str, v: f64) {
        *self.out.day.entry((f, Dim(dim))).or_insert(0.0) += v;
    }

    fn set_day(&mut self, f: Feature, dim: &'a str, v: f64) {
        self.out.day.insert((f, Dim(dim)), v);
    }

    /// Counts `v` in the day and in the hour containing `t`.
    fn at(&mut self, f: Feature, dim: &'a str, t: i64, v: f64) {
        self.day(f, dim, v);
        let i = self.hours.partition_point(|&(_, he)| he <= t);
        if let Some(&(hs, he)) = self.hours.get(i)
            && hs <= t
            && t < he
        {
            *self.hour_values[i]
                .get_or_insert_default()
                .entry((f, Dim(dim)))
                .or_insert(0.0) += v;
        }
    }

    /// Adds the seconds of `[s, e)` to the day and every hour it overlaps.
    fn span(&mut self, f: Feature, dim: &'a str, s: i64, e: i64) {
        if e <= s {
            return;
        }
        self.day(f, dim, (e - s) as f64 / 1000.0);
        let first = self.hours.partition_point(|&(_, he)| he <= s);
        for (i, &(hs, he)) in self.hours.iter().enumerate().skip(first) {
            if hs >= e {
                break;
            }
            let ms = e.min(he) - s.max(hs);
            if ms > 0 {
                *self.hour_values[i]
                    .get_or_insert_default()
                    .entry((f, Dim(dim)))
                    .or_insert(0.0) += ms as f64 / 1000.0;
            }
        }
    }

    fn spans(&mut self, f: Feature, dim: &'a str, spans: &[Span]) {
        for &(s, e) in spans {
            self.span(f, dim, s, e);
        }
    }
}

/// F2 on one window's level breakdown.
fn pulse(values: &WindowValues) -> Option<f64> {
    let mut weighted = 0.0;
    let mut sum = 0.0;
    for (l, dim) in LEVEL_DIMS.iter().enumerate() {
        let t = values
            .get(&(F::ActiveSecondsByLevel, Dim(dim)))
            .copied()
            .unwrap_or(0.0);
        weighted += t * l as f64;
        sum += t;
    }
    (sum > 0.0).then(|| weighted / (4.0 * sum) * 100.0)
}

/// Whether a participant id is outside the tenant (`ext:` prefix, see the README).
pub fn is_external(id: &str) -> bool {
    id.starts_with("ext:")
}

/// Computes the features of one local day.
pub fn compute_day<'a>(
    acts: &'a [Activity],
    ctx: &'a DayContext<'a>,
    fp: &FeatureParams,
) -> DayFeatures<'a> {
    let p = ctx.params;
    let rules = &*p.rules;
    let day = ctx.day;
    let in_day = |t: i64| day.0 <= t && t < day.1;
    let mut acc = Acc {
        out: DayFeatures::default(),
        hours: &ctx.hours,
        hour_values: vec![None; ctx.hours.len()],
    };

    for &f in DAY_STANDARD {
        acc.out.day.insert((f, Dim("")), 0.0);
    }
    for t in SWITCH_TYPES {
        acc.out.day.insert((F::ContextSwitches, Dim(t)), 0.0);
    }
    for dim in ["1h", "2h"] {
        acc.out.day.insert((F::OpenBlocks, Dim(dim)), 0.0);
    }
    for dim in COLLAB_TYPES {
        acc.out
            .day
            .insert((F::CollaborationSecondsByType, Dim(dim)), 0.0);
    }
    let mut touched = vec![false; ctx.hours.len()];
    for a in acts {
        let first = ctx.hours.partition_point(|&(_, he)| he <= a.start);
        let end = a.end.max(a.start + 1);
        for (i, &(hs, _)) in ctx.hours.iter().enumerate().skip(first) {
            if hs >= end {
                break;
            }
            touched[i] = true;
        }
    }
    for (i, _) in touched.iter().enumerate().filter(|(_, t)| **t) {
        let v = acc.hour_values[i].get_or_insert_default();
        for &f in HOUR_STANDARD {
            v.insert((f, Dim("")), 0.0);
        }
        for t in SWITCH_TYPES {
            v.insert((F::ContextSwitches, Dim(t)), 0.0);
        }
    }

    // Presence and active time (F1, F2).
    let present = clip(presence(acts, p, fp), day);
    acc.spans(F::PresenceSeconds, "", &present);
    let focused: Vec<(i64, i64, &Activity)> = focus(acts, fp)
        .into_iter()
        .map(|(s, e, a)| (s.max(day.0), e.min(day.1), a))
        .filter(|(s, e, _)| e > s)
        .collect();
    let only_app = !rules.uses_other_fields();
    let mut known: HashMap<ClassKey, Class> = HashMap::new();
    let classes: Vec<Class> = focused
        .iter()
        .map(|&(_, _, a)| {
            let app = a.app.as_deref().unwrap_or_default();
            let key = if only_app {
                (app, None, None, None)
            } else {
                (
                    app,
                    a.title.as_deref(),
                    a.url.as_deref(),
                    a.project.as_deref(),
                )
            };
            *known
                .entry(key)
                .or_insert_with(|| rules.classify(Some(app), key.1, key.2, key.3))
        })
        .collect();
    let focus_spans: Vec<Span> = focused.iter().map(|&(s, e, _)| (s, e)).collect();
    let active: Vec<(i64, i64, usize)> = active_pieces(&focus_spans, &present);
    let active_union = union(active.iter().map(|&(s, e, _)| (s, e)).collect(), 0);

    let mut slots: BTreeMap<i64, BTreeMap<&str, i64>> = BTreeMap::new();
    let mut chat_focus = Vec::new();
    let mut email_focus = Vec::new();
    let mut focus_category = Vec::new();
    let mut productive = Vec::new();
    let mut by_app: Vec<(i64, i64, &str)> = Vec::with_capacity(active.len());
    for &(s, e, i) in &active {
        let app = focused[i].2.app.as_deref().unwrap_or_default();
        let class = classes[i];
        let cat = rules.category_name(class.category);
        acc.span(F::ActiveSeconds, "", s, e);
        acc.span(F::ActiveSecondsByApp, app, s, e);
        acc.span(F::ActiveSecondsByCategory, cat, s, e);
        acc.span(
            F::ActiveSecondsByLevel,
            LEVEL_DIMS[(class.level.clamp(-2, 2) + 2) as usize],
            s,
            e,
        );
        if class.level > 0 {
            productive.push((s, e));
        }
        match class.channel {
            Some(Channel::Chat) => chat_focus.push((s, e)),
            Some(Channel::Email) => email_focus.push((s, e)),
            None => {}
        }
        if rules.is_focus_category(class.category) {
            focus_category.push((s, e));
        }
        by_app.push((s, e, app));
        let mut t = s;
        while t < e {
            let slot = day.0 + (t - day.0).div_euclid(SLOT_MS) * SLOT_MS;
            let slot_end = (slot + SLOT_MS).min(e);
            *slots.entry(slot).or_default().entry(cat).or_insert(0) += slot_end - t;
            t = slot_end;
        }
    }
    let productive = union(productive, 0);
    acc.spans(F::ProductiveSeconds, "", &productive);
    let day_pulse = pulse(&acc.out.day);
    if let Some(v) = day_pulse {
        acc.set_day(F::ProductivityPulse, "", v);
    }
    for values in acc.hour_values.iter_mut().flatten() {
        if let Some(v) = pulse(values) {
            values.insert((F::ProductivityPulse, Dim("")), v);
        }
    }

    // F8: majority category per 5-minute slot; a switch is a change of label.
    let mut previous: Option<&str> = None;
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
            let level = rules.category_level(rules.category_index(label));
            let kind = if level < 0 {
                SWITCH_TYPES[0]
            } else if label == COMMUNICATION {
                SWITCH_TYPES[1]
            } else {
                SWITCH_TYPES[2]
            };
            acc.at(F::ContextSwitches, "", *slot, 1.0);
            acc.at(F::ContextSwitches, kind, *slot, 1.0);
        }
        previous = Some(label);
    }

    // F3: coding time.
    let coding_pieces: Vec<(i64, i64, &Activity)> = coding(acts, p.keystroke_timeout_ms)
        .into_iter()
        .map(|(s, e, a)| (s.max(day.0), e.min(day.1), a))
        .filter(|(s, e, _)| e > s)
        .collect();
    for &(s, e, a) in &coding_pieces {
        acc.span(F::CodingSeconds, "", s, e);
        if let Some(project) = a.project.as_deref() {
            acc.span(F::CodingSecondsByProject, project, s, e);
        }
    }
    let coding_spans = union(coding_pieces.iter().map(|&(s, e, _)| (s, e)).collect(), 0);
    acc.spans(
        F::CodingPresentSeconds,
        "",
        &intersect(&coding_spans, &present),
    );

    // F4, F5: collaboration and meetings.
    let meetings: Vec<&Activity> = acts.iter().filter(|a| a.counts_as_meeting()).collect();
    let meeting_spans = clip(
        union(meetings.iter().map(|a| (a.start, a.end)).collect(), 0),
        day,
    );
    let call_spans = clip(
        union(
            acts.iter()
                .filter(|a| a.counts_as_call())
                .map(|a| (a.start, a.end))
                .collect(),
            0,
        ),
        day,
    );
    let mut sent: Vec<&Activity> = acts
        .iter()
        .filter(|a| a.is_sent() && in_day(a.start))
        .collect();
    sent.sort_by_key(|a| a.start);
    let has_focus = acts.iter().any(|a| a.kind == EventKind::WindowFocus);
    let (chat, email) = if has_focus {
        (union(chat_focus, 0), union(email_focus, 0))
    } else {
        let estimate = |kind: EventKind, ms: i64| {
            clip(
                union(
                    sent.iter()
                        .filter(|a| a.kind == kind)
                        .map(|a| (a.start, a.start + ms))
                        .collect(),
                    0,
                ),
                day,
            )
        };
        let chat = estimate(EventKind::Message, p.chat_ms_per_message);
        let email = estimate(EventKind::Email, p.email_ms_per_email);
        if !chat.is_empty() || !email.is_empty() {
            acc.set_day(F::CollaborationEstimated, "", 1.0);
        }
        (chat, email)
    };
    let collab = union(
        [&meeting_spans, &call_spans, &chat, &email]
            .into_iter()
            .flatten()
            .copied()
            .collect(),
        0,
    );
    acc.spans(F::CollaborationSeconds, "", &collab);
    for (dim, spans) in COLLAB_TYPES
        .iter()
        .zip([&call_spans, &chat, &email, &meeting_spans])
    {
        acc.spans(F::CollaborationSecondsByType, dim, spans);
    }
    acc.spans(F::MeetingSeconds, "", &meeting_spans);

    // F6: focus time.
    let free = subtract(&ctx.work, &meeting_spans);
    let calendar_focus = blocks_at_least(&free, 2 * HOUR_MS);
    // Schedule-based (F6) values are per day only: hours without events get no rows.
    acc.day(
        F::CalendarFocusSeconds,
        "",
        total(&calendar_focus) as f64 / 1000.0,
    );
    acc.set_day(
        F::OpenBlocks,
        "1h",
        blocks_at_least(&free, HOUR_MS).len() as f64,
    );
    acc.set_day(F::OpenBlocks, "2h", calendar_focus.len() as f64);
    let busy = union([&meeting_spans[..], &call_spans[..]].concat(), 0);
    let sent_at: Vec<i64> = sent.iter().map(|a| a.start).collect();
    let quiet = cut_at(&subtract(&ctx.work, &busy), &sent_at);
    acc.day(
        F::UninterruptedSeconds,
        "",
        total(&blocks_at_least(&quiet, HOUR_MS)) as f64 / 1000.0,
    );

    // F7: multitasking, and deep work = focus-category activity without it.
    let multi = intersect(&multitasking(&by_app), &active_union);
    acc.spans(F::MultitaskingSeconds, "", &multi);
    let deep = subtract(&union(focus_category, 0), &multi);
    let deep = blocks_at_least(&deep, p.deep_work_min_ms.max(1));
    acc.spans(F::DeepWorkSeconds, "", &deep);

    // F10 (and F7's meeting side), F12: per meeting.
    let mut one_on_one = Vec::new();
    for (i, m) in meetings.iter().enumerate() {
        let (s, e) = (m.start.max(day.0), m.end.min(day.1));
        if e > s {
            let conflicting = meetings
                .iter()
                .enumerate()
                .any(|(j, o)| j != i && o.start < m.end && m.start < o.end);
            if conflicting {
                acc.day(F::ConflictingMeetingSeconds, "", (e - s) as f64 / 1000.0);
            }
            let hours = (e - s) as f64 / HOUR_MS as f64;
            acc.day(
                F::MeetingCost,
                "",
                m.people() as f64 * hours * p.meeting_cost_per_hour,
            );
        }
        if let Some(manager) = p.manager.as_deref()
            && m.participants.len() == 1
            && m.participants[0] == manager
        {
            one_on_one.push((m.start, m.end));
        }
        if !in_day(m.start) {
            continue;
        }
        let duration = m.end - m.start;
        let people = m.people();
        let long = duration > HOUR_MS;
        let large = people > 8;
        acc.at(F::MeetingCount, "", m.start, 1.0);
        if long && (2..=8).contains(&people) {
            acc.at(F::LongMeetings, "", m.start, 1.0);
        }
        if large && !long {
            acc.at(F::LargeMeetings, "", m.start, 1.0);
        }
        if large && long {
            acc.at(F::LongAndLargeMeetings, "", m.start, 1.0);
        }
        let during = sent
            .iter()
            .filter(|a| m.start <= a.start && a.start < m.end)
            .count();
        if during > 0 {
            acc.at(F::MessagesDuringMeetings, "", m.start, during as f64);
            if duration > 0 && during as f64 / (duration as f64 / HOUR_MS as f64) >= 2.0 {
                acc.at(F::MultitaskedMeetings, "", m.start, 1.0);
            }
        }
    }
    let one_on_one = clip(union(one_on_one, 0), day);
    acc.spans(F::OneOnOneSeconds, "", &one_on_one);

    // F9: after hours, weekend, workday span.
    acc.spans(
        F::AfterHoursActiveSeconds,
        "",
        &subtract(&active_union, &ctx.work),
    );
    acc.spans(
        F::AfterHoursCollaborationSeconds,
        "",
        &subtract(&collab, &ctx.work),
    );
    if !ctx.workday {
        acc.spans(F::WeekendActiveSeconds, "", &active_union);
    }
    let activity = union(
        [&active_union[..], &collab[..], &coding_spans[..]].concat(),
        0,
    );
    if let (Some(first), Some(last)) = (activity.first(), activity.last()) {
        acc.set_day(
            F::WorkdaySpanSeconds,
            "",
            (last.1 - first.0) as f64 / 1000.0,
        );
    }

    // F13 and the day flags.
    let productive_ms = total(&productive);
    let active_day = productive_ms >= p.active_day_productive_ms;
    acc.set_day(F::ActiveDay, "", f64::from(u8::from(active_day)));
    if p.productive_goal_ms > 0 {
        let utilization = productive_ms as f64 / p.productive_goal_ms as f64;
        acc.set_day(F::Utilization, "", utilization);
        if active_day {
            acc.set_day(F::OverUtilized, "", f64::from(u8::from(utilization > 1.3)));
            acc.set_day(F::UnderUtilized, "", f64::from(u8::from(utilization < 0.7)));
        }
    }
    acc.set_day(
        F::ImplausibleWorkday,
        "",
        f64::from(u8::from(p.implausible_workday)),
    );

    // Event counts, tallied per hour and kind first: one map update per cell rather than
    // four per event.
    let mut counts = vec![[0u32; EventKind::ALL.len()]; acc.hours.len()];
    for a in acts.iter().filter(|a| in_day(a.start)) {
        let h = acc.hours.partition_point(|&(_, he)| he <= a.start);
        if let Some(cell) = counts.get_mut(h) {
            cell[a.kind as usize] += 1;
        }
    }
    for (h, cell) in counts.iter().enumerate() {
        let t = acc.hours[h].0;
        for (k, &n) in cell.iter().enumerate() {
            if n > 0 {
                acc.at(F::EventCount, "", t, f64::from(n));
                acc.at(
                    F::EventCountByKind,
                    EventKind::ALL[k].as_str(),
                    t,
                    f64::from(n),
                );
            }
        }
    }

    // F11 interactions: 3 units per email, meeting or call, 1 per chat message, each with
    // 2–8 people.
    let mut interactions: BTreeMap<&str, u32> = BTreeMap::new();
    for a in acts.iter().filter(|a| in_day(a.start)) {
        let units = match a.kind {
            EventKind::Email => 3,
            EventKind::Meeting if a.counts_as_meeting() => 3,
            EventKind::Call if a.counts_as_call() => 3,
            EventKind::Message => 1,
            _ => continue,
        };
        if (2..=8).contains(&a.people()) {
            for other in &a.participants {
                *interactions.entry(other).or_insert(0) += units;
            }
        }
    }

    acc.out.summary = DaySummary {
        active_ms: total(&active_union),
        productive_ms,
        deep_work_ms: total(&deep),
        after_hours_ms: total(&subtract(&active_union, &ctx.work)),
        collaboration_ms: total(&collab),
        meeting_ms: total(&meeting_spans),
        coding_ms: total(&coding_spans),
        one_on_one_ms: total(&one_on_one),
        active_day,
        interactions: interactions
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    };
    acc.out.hours = ctx
        .hours
        .iter()
        .zip(acc.hour_values)
        .filter_map(|(&(hs, _), v)| Some((hs, v?)))
        .collect();
    acc.out
}

/// Intersects sorted, disjoint `focus` with sorted, disjoint `presence`; pieces carry
/// the index of their focus interval.
fn active_pieces(focus: &[Span], presence: &[Span]) -> Vec<(i64, i64, usize)> {
    let mut out = Vec::new();
    let mut j = 0;
    for (i, &(fs, fe)) in focus.iter().enumerate() {
        while j < presence.len() && presence[j].1 <= fs {
            j += 1;
        }
        let mut k = j;
        while k < presence.len() && presence[k].0 < fe {
            let s = fs.max(presence[k].0);
            let e = fe.min(presence[k].1);
            if e > s {
                out.push((s, e, i));
            }
            k += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::PersonParams;
    use proptest::prelude::*;

    proptest! {
        /// Windows diffed against stored records rely on `Dim` sorting exactly as `str`.
        #[test]
        fn dimensions_sort_as_strings(a in "[a-c\\-é]{0,6}", b in "[a-c\\-é]{0,6}") {
            prop_assert_eq!(Dim(&a).cmp(&Dim(&b)), a.as_str().cmp(b.as_str()));
        }
    }

    #[test]
    fn features_sort_as_their_names() {
        let mut by_name = Feature::ALL.to_vec();
        by_name.sort_by_key(|f| f.name());
        assert_eq!(by_name, Feature::ALL);
        let mut by_variant = Feature::ALL.to_vec();
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
            url: None,
            project: None,
            status: None,
            participants: Vec::new(),
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
        meeting.participants = vec!["b".into()];
        let mut declined = with_status(
            act(EventKind::Meeting, t(12, 0, 0), t(13, 0, 0)),
            "declined",
        );
        declined.participants = vec!["b".into(), "c".into(), "d".into()];
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

    fn utc() -> PersonParams {
        PersonParams::defaults("UTC").unwrap()
    }

    /// A context for the UTC day `D` with 09:00–17:00 working hours.
    fn ctx(p: &PersonParams) -> DayContext<'_> {
        DayContext {
            day: (D, t(24, 0, 0)),
            hours: hours(),
            work: vec![(t(9, 0, 0), t(17, 0, 0))],
            workday: true,
            params: p,
        }
    }

    fn hours() -> Vec<(i64, i64)> {
        (0..24).map(|h| (t(h, 0, 0), t(h + 1, 0, 0))).collect()
    }

    fn get(v: &WindowValues, f: Feature, dim: &str) -> f64 {
        v.get(&(f, Dim(dim))).copied().unwrap_or(f64::NAN)
    }

    #[test]
    fn hand_computed_day() {
        let acts = day_of_work();
        let p = utc();
        let c = ctx(&p);
        let f = compute_day(&acts, &c, &params());
        // Presence: 09:00–10:30 (flooded) and the meeting 11:00–11:30; the AFK span from
        // 10:30 is absent in full, the declined meeting adds nothing.
        assert_eq!(get(&f.day, F::PresenceSeconds, ""), 5400.0 + 1800.0);
        // Active: Code 1200 + Slack 720 + Firefox 480 + Spotify 300 + Code 2700 (09:45 to
        // 10:30) + Zoom 1800.
        assert_eq!(get(&f.day, F::ActiveSeconds, ""), 7200.0);
        assert_eq!(get(&f.day, F::ActiveSecondsByApp, "Code"), 3900.0);
        assert_eq!(get(&f.day, F::ActiveSecondsByApp, "Slack"), 720.0);
        assert_eq!(get(&f.day, F::ActiveSecondsByApp, "Firefox"), 480.0);
        assert_eq!(
            get(&f.day, F::ActiveSecondsByCategory, "communication"),
            2520.0
        );
        assert_eq!(
            get(&f.day, F::ActiveSecondsByCategory, "development"),
            3900.0
        );
        assert_eq!(
            get(&f.day, F::ActiveSecondsByCategory, "entertainment"),
            300.0
        );
        // Switches: dev→comm 09:20, comm→browsing 09:30, →entertainment 09:40,
        // →dev 09:45, dev→comm 11:00.
        assert_eq!(get(&f.day, F::ContextSwitches, ""), 5.0);
        assert_eq!(get(&f.day, F::ContextSwitches, "to_communication"), 2.0);
        assert_eq!(get(&f.day, F::ContextSwitches, "work_to_work"), 2.0);
        assert_eq!(get(&f.day, F::ContextSwitches, "to_distraction"), 1.0);
        assert_eq!(get(&f.day, F::EventCount, ""), 14.0);
        assert_eq!(get(&f.day, F::EventCountByKind, "window_focus"), 7.0);
        assert_eq!(get(&f.day, F::EventCountByKind, "meeting"), 2.0);

        let h9 = &f.hours[&t(9, 0, 0)];
        assert_eq!(get(h9, F::PresenceSeconds, ""), 3600.0);
        assert_eq!(get(h9, F::ActiveSeconds, ""), 3600.0);
        assert_eq!(get(h9, F::ActiveSecondsByCategory, "development"), 2100.0);
        assert_eq!(get(h9, F::ContextSwitches, ""), 4.0);
        assert_eq!(get(h9, F::EventCount, ""), 8.0);
        let h10 = &f.hours[&t(10, 0, 0)];
        // Code 10:00–10:30; absent from 10:30.
        assert_eq!(get(h10, F::ActiveSeconds, ""), 1800.0);
        assert_eq!(get(h10, F::ContextSwitches, ""), 0.0);
        assert_eq!(get(h10, F::EventCount, ""), 2.0);
        let h11 = &f.hours[&t(11, 0, 0)];
        assert_eq!(get(h11, F::ContextSwitches, "to_communication"), 1.0);
        assert_eq!(get(h11, F::EventCount, ""), 3.0);
        let h12 = &f.hours[&t(12, 0, 0)];
        assert_eq!(get(h12, F::PresenceSeconds, ""), 0.0);
        assert_eq!(get(h12, F::EventCount, ""), 1.0);
        assert!(!f.hours.contains_key(&t(8, 0, 0)));
        assert_eq!(f.hours.len(), 4);

        // Arrival order does not matter.
        let mut reversed = acts.clone();
        reversed.reverse();
        let again = compute_day(&reversed, &c, &params());
        assert_eq!(again, f);
    }

    #[test]
    fn without_an_afk_watcher_presence_follows_input_activity() {
        let p = utc();
        let c = ctx(&p);
        // Code 09:00–09:10 and 09:20–09:30, no AFK watcher: present while idle time is
        // under the 180 s timeout, 09:00–09:13 and 09:20–09:33.
        let acts = [
            focus_on("Code", t(9, 0, 0), t(9, 10, 0)),
            focus_on("Code", t(9, 20, 0), t(9, 30, 0)),
        ];
        let f = compute_day(&acts, &c, &params());
        assert_eq!(get(&f.day, F::PresenceSeconds, ""), 2.0 * 780.0);
        assert_eq!(get(&f.day, F::ActiveSeconds, ""), 1200.0);
        // With a watcher reporting, its spans decide: not-afk 09:00–09:05 only.
        let mut watched = acts.to_vec();
        watched.push(with_status(
            act(EventKind::Afk, t(9, 0, 0), t(9, 5, 0)),
            "not-afk",
        ));
        let f = compute_day(&watched, &c, &params());
        assert_eq!(get(&f.day, F::PresenceSeconds, ""), 300.0);
        assert_eq!(get(&f.day, F::ActiveSeconds, ""), 300.0);
    }

    #[test]
    fn pulsetime_bounds_heartbeat_merging() {
        let p = params();
        let near = [focus_on("Code", 0, 1000), focus_on("Code", 3000, 4000)];
        let merged: Vec<(i64, i64)> = focus(&near, &p).iter().map(|f| (f.0, f.1)).collect();
        assert_eq!(merged, vec![(0, 4000)]);
        let far = [focus_on("Code", 0, 1000), focus_on("Code", 3001, 4000)];
        assert_eq!(focus(&far, &p).len(), 2);
    }
}
