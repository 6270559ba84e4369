//! Keyed state of one person: days in memory, event-time watermark, duplicate filter, and
//! what was last emitted per window.
//!
//! Arrival order never changes a result. An event reaches every local day it touches,
//! however late it comes:
//! - a day held in memory (open, or final but recent) takes it at once and is recomputed
//!   at the next emit;
//! - a day computed before but no longer held is *reopened*: the event waits in
//!   [`PersonState::reopen_requests`] until the runtime reads the person's stored events of
//!   that day and hands them to [`PersonState::reopen`], which rebuilds the day (and what
//!   was emitted for it, computed from the stored events without the late ones), so the
//!   next emit publishes exactly the windows the late events changed, as new revisions.
//!
//! Finality is for readers only. The watermark is the later of `newest event start −
//! allowed lateness` and `wall clock − allowed lateness`; a window whose end it has passed
//! is emitted once more with `is_final = true`. A final window can still be revised by a
//! late event; its later rows keep `is_final` and carry a newer revision. Final days stay in
//! memory while they are within `hold` of the person's newest event (or were touched in the
//! last `touch_hold`), so ordinary stragglers never need the store.
//!
//! Emission is by difference: after new events, the touched days are recomputed and only
//! values that changed are emitted, each with a fresh revision; final windows are emitted
//! once more with `is_final = true`.
//!
//! Beyond the days in memory the state keeps what rolling and weekly features need, updated
//! incrementally from each computed day's [`DaySummary`] (subtract the day's previous
//! summary, add the new one), never recomputed from raw events:
//! - F11 network and F12's weekly 1:1 minutes over the 28 local days ending at each day:
//!   one running sum for the window ending at the newest day, corrected by the few days
//!   between an older day and the newest; when a reopened day changes them, the later days
//!   no longer in memory get revised rolling values too;
//! - week totals (local Monday to Monday) for F13's week, F14 and the week data-quality
//!   flags, with week rows emitted like day rows; a changed week re-emits the later weeks
//!   whose F14 and inactive-week flags look back at it;
//! - day summaries for the tenant horizon plus the rolling window, and week totals for the
//!   horizon plus the 12 weeks the inactive-week flag looks back, so any day ingest still
//!   accepts can be reopened with its rolling and weekly context.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use chrono_tz::Tz;

use digame_schemas::{ActivityEvent, EventTime, FEATURE_VERSION, FeatureRow, Granularity};
use serde::{Deserialize, Serialize};

use crate::features::{
    Activity, DayContext, DaySummary, Dim, Feature, FeatureParams, WindowValues, compute_day,
    is_external,
};
use crate::rules::PersonParams;
use crate::window::{day_window, days_from, hours_of_day, week_window, work_intervals};

const DAY_MS: i64 = 86_400_000;
/// A day `d` is in the 28-day window ending at day `n` when `n − d` is under this (local
/// days are 23–25 h long, so the half day absorbs DST).
const ROLLING_WINDOW_MS: i64 = 27 * DAY_MS + DAY_MS / 2;
/// Day summaries kept (beyond the rolling window, for older open days' corrections).
const HISTORY_MS: i64 = 35 * DAY_MS;
/// Week totals kept at least: F14 looks 4 weeks back, the inactive-week flag 12.
const WEEKS_KEPT: i64 = 15;
/// Interaction units of one meaningful interaction (F11: 1 email, meeting or call = 3
/// units, a chat message = 1).
const MEANINGFUL: u32 = 3;

/// Runtime settings the state needs.
#[derive(Clone, Copy, Debug)]
pub struct StateParams {
    /// How long after its end a window stays provisional (by event time or wall clock).
    pub lateness_ms: i64,
    /// Final days within this span of the person's newest event keep their activities in
    /// memory; older ones are reopened from the store.
    pub hold_ms: i64,
    /// A final day touched by an event stays in memory at least this long (wall clock),
    /// so a backfill delivering one old day over several polls reads the store once.
    pub touch_hold_ms: i64,
    /// The longest tenant horizon: how far back ingest accepts events, so how far back a
    /// day may be reopened.
    pub horizon_ms: i64,
    pub features: FeatureParams,
}

impl StateParams {
    /// Day summaries kept: a reopened day at the horizon needs its own summary and the 28
    /// days before it.
    fn history_ms(&self) -> i64 {
        HISTORY_MS.max(self.horizon_ms + ROLLING_WINDOW_MS + DAY_MS)
    }

    /// Week totals kept: a reopened week at the horizon needs the 12 weeks before it.
    fn weeks_ms(&self) -> i64 {
        (WEEKS_KEPT * 7 * DAY_MS).max(self.horizon_ms + 14 * 7 * DAY_MS)
    }

    /// How far back of the newest event the state reaches (day summaries, week totals):
    /// the events a rebuild of the state reads.
    pub fn span_ms(&self) -> i64 {
        self.history_ms().max(self.weeks_ms())
    }
}

/// What happened to one event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Counted, in event-time order.
    Accepted,
    /// Counted, but it starts before the watermark: it revises windows that may already
    /// be final (from memory, or once the store has been read for a reopened day).
    Late,
    /// Seen before; counted once.
    Duplicate,
}

/// Late events for a day no longer held in memory, waiting for the person's stored events.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Reopening {
    end: i64,
    late: Vec<(u128, Activity)>,
}

/// A read of one person's stored events that reopening their days needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReopenRange {
    /// Events starting in `[from, to)` can touch the days being reopened.
    pub from: i64,
    pub to: i64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct DayState {
    end: i64,
    acts: Vec<Activity>,
    dirty: bool,
    /// Wall clock of the last event placed in the day.
    touched: i64,
    /// What was last emitted per window (granularity, window start).
    windows: BTreeMap<(Granularity, i64), EmittedWindow>,
}

/// The values last emitted for one window, sorted by (feature, dimension) as
/// [`crate::features::WindowValues`] is, so the two can be diffed by a merge.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct EmittedWindow {
    end: i64,
    values: Vec<((Feature, String), f64)>,
    is_final: bool,
    /// The revision that first marked the window final (0 while provisional).
    final_revision: i64,
}

impl EmittedWindow {
    /// Marks the window final at `revision` unless it already is; returns whether it just
    /// became final (then every value is emitted once more).
    fn finalize(&mut self, is_final: bool, revision: i64) -> bool {
        let first = is_final && !self.is_final;
        if first {
            self.is_final = true;
            self.final_revision = revision;
        }
        first
    }

    /// The final revision rows of this window carry: 0 while provisional.
    fn final_revision(&self) -> i64 {
        if self.is_final {
            self.final_revision
        } else {
            0
        }
    }
}

impl EmittedWindow {
    /// Calls `changed(feature, dimension, value)` for every value that differs from the
    /// last emitted one (or every value when `all`); keys emitted before but absent now
    /// fell to zero. Records what was reported.
    fn diff(
        &mut self,
        current: &WindowValues,
        all: bool,
        mut changed: impl FnMut(&'static str, &str, f64),
    ) {
        use std::cmp::Ordering;
        // A merge of two sorted lists into the next record; dimension strings of keys seen
        // before are moved over, so a window that keeps its keys allocates nothing.
        let mut next = Vec::with_capacity(current.len().max(self.values.len()));
        let mut prev = std::mem::take(&mut self.values).into_iter().peekable();
        for (&(feature, Dim(dim)), &value) in current {
            let mut same = false;
            let mut kept = None;
            while let Some(((pf, pd), _)) = prev.peek() {
                match (*pf, Dim(pd)).cmp(&(feature, Dim(dim))) {
                    Ordering::Less => {
                        let ((pf, pd), pv) = prev.next().expect("peeked");
                        if pv != 0.0 || all {
                            changed(pf.name(), &pd, 0.0);
                        }
                        next.push(((pf, pd), 0.0));
                    }
                    Ordering::Equal => {
                        let ((_, pd), pv) = prev.next().expect("peeked");
                        same = pv == value;
                        kept = Some(pd);
                        break;
                    }
                    Ordering::Greater => break,
                }
            }
            if !same || all {
                changed(feature.name(), dim, value);
            }
            next.push(((feature, kept.unwrap_or_else(|| dim.to_string())), value));
        }
        for ((pf, pd), pv) in prev {
            if pv != 0.0 || all {
                changed(pf.name(), &pd, 0.0);
            }
            next.push(((pf, pd), 0.0));
        }
        self.values = next;
    }
}

/// Running week totals, from day summaries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
struct WeekTotals {
    active_ms: i64,
    productive_ms: i64,
    after_hours_ms: i64,
    collaboration_ms: i64,
    meeting_ms: i64,
    deep_work_ms: i64,
    coding_ms: i64,
    active_days: i64,
}

impl WeekTotals {
    fn add(&mut self, s: &DaySummary, sign: i64) {
        self.active_ms += sign * s.active_ms;
        self.productive_ms += sign * s.productive_ms;
        self.after_hours_ms += sign * s.after_hours_ms;
        self.collaboration_ms += sign * s.collaboration_ms;
        self.meeting_ms += sign * s.meeting_ms;
        self.deep_work_ms += sign * s.deep_work_ms;
        self.coding_ms += sign * s.coding_ms;
        self.active_days += sign * i64::from(u8::from(s.active_day));
    }

    /// Average productive time per active day against the goal (F13), when there was an
    /// active day.
    fn utilization(&self, goal_ms: i64) -> Option<f64> {
        (self.active_days > 0 && goal_ms > 0)
            .then(|| self.productive_ms as f64 / self.active_days as f64 / goal_ms as f64)
    }

    /// F14's weekly condition: over-utilised, or more than an hour after hours.
    fn strained(&self, goal_ms: i64) -> bool {
        self.utilization(goal_ms).is_some_and(|u| u > 1.3) || self.after_hours_ms > 3_600_000
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct WeekState {
    end: i64,
    totals: WeekTotals,
    dirty: bool,
    emitted: EmittedWindow,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct DayRecord {
    week: i64,
    /// End of the day window.
    end: i64,
    /// The revision that first marked the day window final (0 while provisional); a day
    /// reopened from the store reports it for all its windows.
    final_revision: i64,
    summary: DaySummary,
}

/// State of one person.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PersonState {
    /// Shared with every row emitted for the person (no allocation per row).
    pub tenant: Arc<str>,
    pub user: Arc<str>,
    pub timezone: Arc<str>,
    /// The bus partition carrying this person's events; state is checkpointed and moved
    /// between workers per partition.
    pub partition: u32,
    newest_start: i64,
    watermark: i64,
    /// Event ids of the events in the days held in memory, with the last instant each
    /// reaches, for duplicate filtering (the store filters those of reopened days).
    seen: HashMap<u128, i64, foldhash::fast::RandomState>,
    days: BTreeMap<i64, DayState>,
    /// Days no longer in memory that late events reopen, by day start.
    reopening: BTreeMap<i64, Reopening>,
    /// Summaries of computed days, by day start.
    history: BTreeMap<i64, DayRecord>,
    /// F11 interaction units per person over the 28 days ending at `rolling_newest`.
    rolling: HashMap<String, u32>,
    /// F12 one-on-one time over the same days.
    rolling_one_on_one_ms: i64,
    rolling_newest: i64,
    weeks: BTreeMap<i64, WeekState>,
    /// Compiled parameters; restored from the directory after a checkpoint load.
    #[serde(skip)]
    params: Option<Arc<PersonParams>>,
    #[serde(skip)]
    generation: u64,
    /// The local day last looked up, so events inside it skip the time-zone arithmetic
    /// (nearly every event falls in the day of the one before it).
    #[serde(skip)]
    day_cache: Option<(Tz, (i64, i64))>,
    /// Events counted and duplicates seen since the last emit, for the per-tenant metrics.
    #[serde(skip)]
    pub tally: (u64, u64),
}

impl PersonState {
    pub fn new(tenant: &str, user: &str, params: Arc<PersonParams>, generation: u64) -> Self {
        PersonState {
            tenant: tenant.into(),
            user: user.into(),
            timezone: params.timezone.as_str().into(),
            partition: 0,
            newest_start: i64::MIN,
            watermark: i64::MIN,
            seen: HashMap::default(),
            days: BTreeMap::new(),
            reopening: BTreeMap::new(),
            history: BTreeMap::new(),
            rolling: HashMap::new(),
            rolling_one_on_one_ms: 0,
            rolling_newest: i64::MIN,
            weeks: BTreeMap::new(),
            params: Some(params),
            generation,
            day_cache: None,
            tally: (0, 0),
        }
    }

    /// The local day of `tz` containing `t`.
    fn day_of(&mut self, tz: Tz, t: i64) -> (i64, i64) {
        if let Some((ctz, (s, e))) = self.day_cache
            && ctz == tz
            && s <= t
            && t < e
        {
            return (s, e);
        }
        let day = day_window(tz, t);
        self.day_cache = Some((tz, day));
        day
    }

    /// The directory generation the parameters were taken at (0 after a restore).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Installs (changed) parameters. Open days are recomputed with them at the next emit;
    /// a changed time zone applies to days opened from now on.
    pub fn set_params(&mut self, params: Arc<PersonParams>, generation: u64) {
        let changed = self
            .params
            .as_ref()
            .is_none_or(|p| p.version != params.version);
        if changed {
            if self.days.is_empty() {
                self.timezone = params.timezone.as_str().into();
            }
            for day in self.days.values_mut() {
                day.dirty = true;
            }
        }
        self.params = Some(params);
        self.generation = generation;
    }

    fn params(&self) -> Arc<PersonParams> {
        self.params
            .clone()
            .expect("parameters are installed before events are admitted")
    }

    pub fn watermark(&self) -> i64 {
        self.watermark
    }

    /// Whether nothing is held: every day closed and the history aged out.
    pub fn is_idle(&self) -> bool {
        self.days.is_empty()
            && self.reopening.is_empty()
            && self.history.is_empty()
            && self.weeks.is_empty()
    }

    /// The span of local days an activity reaches: editor heartbeats also reach the days
    /// within the keystroke timeout, so a coding span across local midnight is credited to
    /// both days.
    fn reach(params: &PersonParams, act: &Activity) -> (i64, i64) {
        let reach = if act.kind == digame_schemas::EventKind::IdeHeartbeat {
            params.keystroke_timeout_ms
        } else {
            0
        };
        (act.start - reach, act.end.max(act.start + 1) + reach)
    }

    /// Admits one event: it is placed in every day it touches, whatever the watermark.
    pub fn admit(&mut self, ev: &ActivityEvent, now_wall: i64, p: &StateParams) -> Admission {
        let id = ev.event_id.map(|u| u.as_u128()).unwrap_or_default();
        let start = ev.timestamp.0;
        // One probe on the common path: look up and record together (the reach is filled
        // in below).
        let slot = match self.seen.entry(id) {
            std::collections::hash_map::Entry::Occupied(_) => return Admission::Duplicate,
            std::collections::hash_map::Entry::Vacant(v) => v.insert(0),
        };
        let late = start < self.watermark;
        let act = activity(ev);
        let params = self
            .params
            .as_ref()
            .expect("parameters are installed before events are admitted");
        let tz = params.tz;
        let (from, to) = Self::reach(params, &act);
        *slot = to;
        self.newest_start = self.newest_start.max(start);
        self.watermark = self.watermark.max(self.newest_start - p.lateness_ms);
        let first = self.day_of(tz, from);
        let mut days = days_from(tz, first, to).peekable();
        let mut act = Some(act);
        while let Some((day_start, day_end)) = days.next() {
            // The activity itself goes to its last day; earlier days get copies.
            let a = if days.peek().is_none() {
                act.take().expect("taken once")
            } else {
                act.clone().expect("not taken yet")
            };
            self.place(day_start, day_end, id, a, now_wall);
        }
        if late {
            Admission::Late
        } else {
            Admission::Accepted
        }
    }

    /// Puts an activity into its day: the day in memory, a reopening waiting for the store,
    /// or a new day.
    fn place(&mut self, day_start: i64, day_end: i64, id: u128, act: Activity, now_wall: i64) {
        if let Some(day) = self.days.get_mut(&day_start) {
            day.acts.push(act);
            day.dirty = true;
            day.touched = now_wall;
        } else if let Some(r) = self.reopening.get_mut(&day_start) {
            r.late.push((id, act));
        } else if self.history.contains_key(&day_start) {
            // Computed before and no longer held: its other events are in the store.
            self.reopening.insert(
                day_start,
                Reopening {
                    end: day_end,
                    late: vec![(id, act)],
                },
            );
        } else {
            self.days.insert(
                day_start,
                DayState {
                    end: day_end,
                    acts: vec![act],
                    dirty: true,
                    touched: now_wall,
                    windows: BTreeMap::new(),
                },
            );
        }
    }

    /// Whether late events wait for the store.
    pub fn has_reopenings(&self) -> bool {
        !self.reopening.is_empty()
    }

    /// The stored events the waiting reopenings need, if any.
    pub fn reopen_range(&self) -> Option<ReopenRange> {
        let first = self.reopening.keys().next()?;
        let last = self.reopening.values().map(|r| r.end).max()?;
        let reach = self.params.as_ref().map_or(0, |p| p.keystroke_timeout_ms);
        // An event touches a day when it starts up to its longest duration (plus the
        // editor reach) before the day, or up to the reach before the day's end.
        let longest = digame_schemas::validate::MAX_DURATION_MS as i64;
        Some(ReopenRange {
            from: first - longest - reach,
            to: last + reach,
        })
    }

    /// Rebuilds the waiting reopened days from the person's stored events (those of
    /// [`Self::reopen_range`]; any others are ignored, duplicates count once). What was
    /// emitted for each day is recomputed from the stored events, so the next emit
    /// publishes exactly what the late events changed; a late event already stored (a
    /// client's retry, a replay after a crash) counts once and changes nothing.
    ///
    /// This relies on the store writing a flush's feature rows before its raw events: the
    /// rows of a day then never lag behind its stored events, so the stored events say
    /// what was emitted (rows ahead of them, after a crash between the two writes, are
    /// those of the replayed events and are emitted again anyway).
    pub fn reopen(&mut self, stored: &[ActivityEvent], now_wall: i64, p: &StateParams) {
        let pending = std::mem::take(&mut self.reopening);
        if pending.is_empty() {
            return;
        }
        let params = self.params();
        let tz = params.tz;
        let mut before: BTreeMap<i64, Vec<Activity>> =
            pending.keys().map(|d| (*d, Vec::new())).collect();
        let mut ids = std::collections::HashSet::with_capacity(stored.len());
        for ev in stored {
            let id = ev.event_id.map(|u| u.as_u128()).unwrap_or_default();
            if !ids.insert(id) {
                continue;
            }
            let act = activity(ev);
            let (from, to) = Self::reach(&params, &act);
            let mut held = false;
            for (day_start, _) in days_from(tz, day_window(tz, from), to) {
                if let Some(acts) = before.get_mut(&day_start) {
                    acts.push(act.clone());
                    held = true;
                }
            }
            // Back in memory: a later duplicate is filtered here again.
            if held {
                self.seen.insert(id, to);
            }
        }
        for (day_start, r) in pending {
            let mut acts = before.remove(&day_start).unwrap_or_default();
            let windows = self.emitted_from(day_start, r.end, &acts, &params, p);
            acts.extend(
                r.late
                    .into_iter()
                    .filter(|(id, _)| !ids.contains(id))
                    .map(|(_, a)| a),
            );
            self.days.insert(
                day_start,
                DayState {
                    end: r.end,
                    acts,
                    dirty: true,
                    touched: now_wall,
                    windows,
                },
            );
        }
    }

    /// What the emits of a day computed from `acts` reported, every window final (a day is
    /// only dropped from memory once final).
    fn emitted_from(
        &self,
        day_start: i64,
        day_end: i64,
        acts: &[Activity],
        params: &PersonParams,
        p: &StateParams,
    ) -> BTreeMap<(Granularity, i64), EmittedWindow> {
        let ctx = day_context(params, (day_start, day_end));
        let mut features = compute_day(acts, &ctx, &p.features);
        self.rolling_values(day_start, params, &mut features.day);
        let final_revision = self.history.get(&day_start).map_or(0, |r| r.final_revision);
        let mut windows = BTreeMap::new();
        for (g, ws, we, values) in day_windows(&ctx, &features) {
            windows.insert(
                (g, ws),
                EmittedWindow {
                    end: we,
                    values: owned_values(values),
                    is_final: true,
                    final_revision,
                },
            );
        }
        windows
    }

    /// Replaces the summary of a computed day, updating the rolling sums and week totals
    /// by difference.
    fn record_day(&mut self, day: (i64, i64), week: (i64, i64), summary: DaySummary) {
        let day_start = day.0;
        if day_start > self.rolling_newest {
            // The window moves forward: days falling out of it leave the sums.
            let old = self.rolling_newest;
            let leaving: Vec<i64> = self
                .history
                .range(..=old)
                .map(|(d, _)| *d)
                .filter(|d| old - d < ROLLING_WINDOW_MS && day_start - d >= ROLLING_WINDOW_MS)
                .collect();
            for d in leaving {
                let rec = &self.history[&d];
                add_interactions(&mut self.rolling, &rec.summary.interactions, -1);
                self.rolling_one_on_one_ms -= rec.summary.one_on_one_ms;
            }
            self.rolling_newest = day_start;
        }
        let in_window = self.rolling_newest - day_start < ROLLING_WINDOW_MS;
        let mut final_revision = 0;
        if let Some(old) = self.history.remove(&day_start) {
            final_revision = old.final_revision;
            if in_window {
                add_interactions(&mut self.rolling, &old.summary.interactions, -1);
                self.rolling_one_on_one_ms -= old.summary.one_on_one_ms;
            }
            if let Some(w) = self.weeks.get_mut(&old.week) {
                w.totals.add(&old.summary, -1);
                w.dirty = true;
            }
        }
        if in_window {
            add_interactions(&mut self.rolling, &summary.interactions, 1);
            self.rolling_one_on_one_ms += summary.one_on_one_ms;
        }
        let w = self.weeks.entry(week.0).or_default();
        w.end = week.1;
        w.totals.add(&summary, 1);
        w.dirty = true;
        self.history.insert(
            day_start,
            DayRecord {
                week: week.0,
                end: day.1,
                final_revision,
                summary,
            },
        );
    }

    /// F11 and F12 over the 28 days ending at `day_start` (an open, recorded day).
    fn rolling_at(&self, day_start: i64) -> (HashMap<&str, i64>, i64) {
        let mut units: HashMap<&str, i64> = self
            .rolling
            .iter()
            .map(|(k, v)| (k.as_str(), i64::from(*v)))
            .collect();
        let mut one_on_one = self.rolling_one_on_one_ms;
        // Days after `day_start` are in the newest window but not in this one; days that
        // left the newest window may still be in this one.
        for (&d, rec) in self.history.iter() {
            let in_newest = d <= self.rolling_newest && self.rolling_newest - d < ROLLING_WINDOW_MS;
            let in_this = d <= day_start && day_start - d < ROLLING_WINDOW_MS;
            let sign = match (in_newest, in_this) {
                (true, false) => -1,
                (false, true) => 1,
                _ => continue,
            };
            for (k, v) in &rec.summary.interactions {
                *units.entry(k.as_str()).or_insert(0) += sign * i64::from(*v);
            }
            one_on_one += sign * rec.summary.one_on_one_ms;
        }
        (units, one_on_one)
    }

    /// Adds the rolling features of an open day to its values.
    fn rolling_values(&self, day_start: i64, params: &PersonParams, values: &mut WindowValues) {
        let (internal, external, one_on_one) = if day_start == self.rolling_newest {
            let (i, e) = count_network(
                self.rolling
                    .iter()
                    .map(|(k, v)| (k.as_str(), i64::from(*v))),
            );
            (i, e, self.rolling_one_on_one_ms)
        } else {
            let (units, one_on_one) = self.rolling_at(day_start);
            let (i, e) = count_network(units.into_iter());
            (i, e, one_on_one)
        };
        values.insert(
            (Feature::NetworkSize, Dim("")),
            (internal + external) as f64,
        );
        values.insert((Feature::NetworkSize, Dim("internal")), internal as f64);
        values.insert((Feature::NetworkSize, Dim("external")), external as f64);
        if params.manager.is_some() {
            // Monthly (28-day) total ÷ 4 weeks.
            let per_week = one_on_one as f64 / 60_000.0 / 4.0;
            values.insert((Feature::ManagerOneOnOneMinutesPerWeek, Dim("")), per_week);
            values.insert(
                (Feature::ManagerOneOnOneLow, Dim("")),
                f64::from(u8::from(per_week < 15.0)),
            );
        }
    }

    /// The week features of the week starting at `start`.
    fn week_values(&self, start: i64, params: &PersonParams) -> WindowValues<'static> {
        let w = &self.weeks[&start].totals;
        let secs = |ms: i64| ms as f64 / 1000.0;
        let flag = |b: bool| f64::from(u8::from(b));
        let mut v: WindowValues<'static> = BTreeMap::new();
        v.insert((Feature::ActiveDay, Dim("")), w.active_days as f64);
        v.insert((Feature::ActiveSeconds, Dim("")), secs(w.active_ms));
        v.insert(
            (Feature::AfterHoursActiveSeconds, Dim("")),
            secs(w.after_hours_ms),
        );
        v.insert((Feature::CodingSeconds, Dim("")), secs(w.coding_ms));
        v.insert(
            (Feature::CollaborationSeconds, Dim("")),
            secs(w.collaboration_ms),
        );
        v.insert((Feature::DeepWorkSeconds, Dim("")), secs(w.deep_work_ms));
        v.insert((Feature::MeetingSeconds, Dim("")), secs(w.meeting_ms));
        v.insert((Feature::ProductiveSeconds, Dim("")), secs(w.productive_ms));
        v.insert(
            (Feature::NonKnowledgeWorkerWeek, Dim("")),
            flag(w.collaboration_ms < 5 * 3_600_000),
        );
        if let Some(u) = w.utilization(params.productive_goal_ms) {
            v.insert(
                (Feature::ProductiveHoursPerActiveDay, Dim("")),
                w.productive_ms as f64 / w.active_days as f64 / 3_600_000.0,
            );
            v.insert((Feature::OverUtilized, Dim("")), flag(u > 1.3));
            v.insert((Feature::UnderUtilized, Dim("")), flag(u < 0.7));
        }
        // F14: strained in at least 3 of the last 4 weeks (this one included).
        let strained = self
            .weeks
            .range(start - 3 * 7 * DAY_MS - DAY_MS..=start)
            .filter(|(_, w)| w.totals.strained(params.productive_goal_ms))
            .count();
        v.insert((Feature::BurnoutRisk, Dim("")), flag(strained >= 3));
        // Inactive week: active time more than 2 SD below the mean of up to 12 earlier
        // weeks (at least 4 needed).
        let earlier: Vec<f64> = self
            .weeks
            .range(..start)
            .rev()
            .take(12)
            .map(|(_, w)| w.totals.active_ms as f64)
            .collect();
        let inactive = if earlier.len() >= 4 {
            let n = earlier.len() as f64;
            let mean = earlier.iter().sum::<f64>() / n;
            let var = earlier.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
            (w.active_ms as f64) < mean - 2.0 * var.sqrt()
        } else {
            false
        };
        v.insert((Feature::InactiveWeek, Dim("")), flag(inactive));
        v
    }

    /// Emits changed and newly final rows; drops final days no longer held. `revision`
    /// yields a fresh, increasing revision per call. Returns how many days stay in memory
    /// only because events touched them lately (the processor bounds their total).
    /// Forgets what was emitted for the windows starting in `[from, to)` this state still
    /// holds, so the next emit sends each of their values again with a fresh revision
    /// (used when the stored rows of those windows were lost). Whether any was held.
    pub fn forget_emitted(&mut self, from: i64, to: i64) -> bool {
        let mut any = false;
        for day in self.days.values_mut() {
            let mut held = false;
            for ((_, start), w) in day.windows.iter_mut() {
                if (from..to).contains(start) {
                    w.values.clear();
                    held = true;
                }
            }
            day.dirty |= held;
            any |= held;
        }
        for (start, w) in self.weeks.iter_mut() {
            if (from..to).contains(start) {
                w.emitted.values.clear();
                w.dirty = true;
                any = true;
            }
        }
        any
    }

    pub fn emit(
        &mut self,
        now_wall: i64,
        p: &StateParams,
        mut revision: impl FnMut() -> i64,
        out: &mut Vec<FeatureRow>,
    ) -> usize {
        let mut touch_held = 0;
        let wm = self.watermark.max(now_wall.saturating_sub(p.lateness_ms));
        let hold_floor = self.newest_start.max(wm) - p.hold_ms;
        let params = self.params();
        // A recomputed day changes the rolling values of the days after it: those in memory
        // are recomputed, those only in the history get their rolling values revised.
        let first_dirty = self.days.iter().find(|(_, d)| d.dirty).map(|(k, _)| *k);
        let mut later: Vec<(i64, WindowValues<'static>)> = Vec::new();
        if let Some(first) = first_dirty {
            for (_, d) in self.days.range_mut(first..) {
                d.dirty = true;
            }
            later = self
                .history
                .range(first + 1..first + ROLLING_WINDOW_MS)
                .map(|(d, _)| *d)
                .filter(|d| !self.days.contains_key(d))
                .map(|d| {
                    let mut v = BTreeMap::new();
                    self.rolling_values(d, &params, &mut v);
                    (d, v)
                })
                .collect();
        }
        let mut closed = Vec::new();
        let starts: Vec<i64> = self.days.keys().copied().collect();
        for day_start in starts {
            let day = &self.days[&day_start];
            let newly_final = day.windows.values().any(|w| !w.is_final && w.end <= wm)
                || (day.end <= wm
                    && !day
                        .windows
                        .get(&(Granularity::Day, day_start))
                        .is_some_and(|w| w.is_final));
            if day.dirty || newly_final {
                self.emit_day(day_start, wm, &params, p, &mut revision, out);
            }
            let day = &self.days[&day_start];
            if day.end <= wm && day.end <= hold_floor {
                if now_wall - day.touched >= p.touch_hold_ms {
                    closed.push(day_start);
                } else {
                    touch_held += 1;
                }
            }
        }
        for day_start in closed {
            self.days.remove(&day_start);
        }
        if !later.is_empty() {
            let rev = revision();
            for (d, before) in later {
                let mut after = BTreeMap::new();
                self.rolling_values(d, &params, &mut after);
                let rec = &self.history[&d];
                let end = rec.end;
                let mut emitted = EmittedWindow {
                    end,
                    values: owned_values(&before),
                    is_final: end <= wm,
                    final_revision: rec.final_revision,
                };
                let final_revision = emitted.final_revision();
                emitted.diff(&after, false, |feature, dimension, value| {
                    out.push(self.row(
                        Granularity::Day,
                        d,
                        end,
                        feature,
                        dimension,
                        value,
                        final_revision,
                        rev,
                        &params,
                    ));
                });
            }
        }
        self.emit_weeks(wm, &params, &mut revision, out);
        self.prune(wm, p);
        // Duplicates are filtered here for the days in memory; the store filters those of
        // reopened days.
        let oldest = self.days.keys().chain(self.reopening.keys()).min().copied();
        match oldest {
            Some(oldest) => self.seen.retain(|_, reach_end| *reach_end > oldest),
            None => self.seen.clear(),
        }
        touch_held
    }

    /// Recomputes one day in memory and emits what changed (all of it once final).
    fn emit_day(
        &mut self,
        day_start: i64,
        wm: i64,
        params: &PersonParams,
        p: &StateParams,
        revision: &mut impl FnMut() -> i64,
        out: &mut Vec<FeatureRow>,
    ) {
        let mut day = self.days.remove(&day_start).expect("a day in memory");
        let ctx = day_context(params, (day_start, day.end));
        let mut features = compute_day(&day.acts, &ctx, &p.features);
        let week = week_window(params.tz, day_start);
        self.record_day(ctx.day, week, std::mem::take(&mut features.summary));
        self.rolling_values(day_start, params, &mut features.day);
        let rev = revision();
        let no_values = WindowValues::new();
        let current: BTreeMap<(Granularity, i64), (i64, &WindowValues)> =
            day_windows(&ctx, &features)
                .map(|(g, ws, we, values)| ((g, ws), (we, values)))
                .collect();
        // Windows emitted before that the day no longer produces are diffed against no
        // values, so what they held is retracted: an hour whose only presence came from
        // input before the day's AFK watcher reported has nothing left, and must read so.
        let mut emit = |emitted: &mut EmittedWindow, (g, ws): (Granularity, i64), values| {
            let we = emitted.end;
            let first_final = emitted.finalize(we <= wm, rev);
            let final_revision = emitted.final_revision();
            emitted.diff(values, first_final, |feature, dimension, value| {
                out.push(self.row(
                    g,
                    ws,
                    we,
                    feature,
                    dimension,
                    value,
                    final_revision,
                    rev,
                    params,
                ));
            });
        };
        for (&window, emitted) in day.windows.iter_mut() {
            if !current.contains_key(&window) {
                emit(emitted, window, &no_values);
            }
        }
        for (&window, &(we, values)) in &current {
            let emitted = day.windows.entry(window).or_default();
            emitted.end = we;
            emit(emitted, window, values);
        }
        if let (Some(w), Some(rec)) = (
            day.windows.get(&(Granularity::Day, day_start)),
            self.history.get_mut(&day_start),
        ) {
            rec.final_revision = w.final_revision();
        }
        day.dirty = false;
        self.days.insert(day_start, day);
    }

    fn emit_weeks(
        &mut self,
        wm: i64,
        params: &PersonParams,
        revision: &mut impl FnMut() -> i64,
        out: &mut Vec<FeatureRow>,
    ) {
        // F14 and the inactive-week flag of later weeks look back at a changed week.
        if let Some(first) = self.weeks.iter().find(|(_, w)| w.dirty).map(|(s, _)| *s) {
            for (_, w) in self.weeks.range_mut(first..) {
                w.dirty = true;
            }
        }
        let due: Vec<i64> = self
            .weeks
            .iter()
            .filter(|(_, w)| w.dirty || (w.end <= wm && !w.emitted.is_final))
            .map(|(s, _)| *s)
            .collect();
        for start in due {
            let values = self.week_values(start, params);
            let rev = revision();
            let mut w = self.weeks.remove(&start).expect("listed above");
            let first_final = w.emitted.finalize(w.end <= wm, rev);
            let final_revision = w.emitted.final_revision();
            w.emitted.end = w.end;
            let end = w.end;
            w.emitted
                .diff(&values, first_final, |feature, dimension, value| {
                    out.push(self.row(
                        Granularity::Week,
                        start,
                        end,
                        feature,
                        dimension,
                        value,
                        final_revision,
                        rev,
                        params,
                    ));
                });
            w.dirty = false;
            self.weeks.insert(start, w);
        }
    }

    /// Ages out day summaries and week totals no feature can need any more.
    fn prune(&mut self, wm: i64, p: &StateParams) {
        let newest = self.rolling_newest.max(wm);
        // A day in memory (or waiting for the store) is recomputed later: its own summary
        // and the context before it must outlive it, whatever the clock says (replays run
        // on event time, tests on any clock).
        let oldest_held = self
            .days
            .keys()
            .chain(self.reopening.keys())
            .min()
            .copied()
            .unwrap_or(i64::MAX);
        let keep_from = (newest - p.history_ms()).min(oldest_held - ROLLING_WINDOW_MS - DAY_MS);
        let old: Vec<i64> = self.history.range(..keep_from).map(|(d, _)| *d).collect();
        for d in old {
            // Out of every window by now (history_ms > ROLLING_WINDOW_MS), and before the
            // horizon, so never reopened.
            self.history.remove(&d);
        }
        let week_horizon = (newest - p.weeks_ms()).min(oldest_held - 14 * 7 * DAY_MS);
        self.weeks
            .retain(|s, w| *s >= week_horizon || !w.emitted.is_final || w.dirty);
    }

    #[allow(clippy::too_many_arguments)]
    fn row(
        &self,
        g: Granularity,
        ws: i64,
        we: i64,
        feature: &'static str,
        dimension: &str,
        value: f64,
        final_revision: i64,
        revision: i64,
        params: &PersonParams,
    ) -> FeatureRow {
        FeatureRow {
            tenant_id: Arc::clone(&self.tenant),
            user_id: Arc::clone(&self.user),
            granularity: g,
            window_start: EventTime(ws),
            window_end: EventTime(we),
            timezone: Arc::clone(&self.timezone),
            feature: std::borrow::Cow::Borrowed(feature),
            dimension: dimension.to_string(),
            value,
            feature_version: FEATURE_VERSION,
            params_version: params.version,
            is_final: final_revision != 0,
            revision,
            final_revision,
        }
    }
}

/// What the operators need of one event: its span and attributes, participants sorted and
/// distinct, without the subject.
fn activity(ev: &ActivityEvent) -> Activity {
    let mut participants: Vec<String> = ev
        .attributes
        .participants
        .iter()
        .filter(|p| **p != ev.user_id)
        .cloned()
        .collect();
    participants.sort_unstable();
    participants.dedup();
    let a = &ev.attributes;
    Activity {
        start: ev.timestamp.0,
        end: ev.end().0,
        kind: ev.kind,
        app: a.app.clone(),
        title: a.title.clone(),
        url: a.url.clone(),
        project: a.project.clone(),
        status: a.status.clone(),
        participants,
    }
}

/// The local day `day` with its hours and working intervals, in the person's zone.
fn day_context(params: &PersonParams, day: (i64, i64)) -> DayContext<'_> {
    let tz = params.tz;
    let (work, workday) = work_intervals(
        tz,
        day,
        &params.work_days,
        params.work_start_min,
        params.work_end_min,
    );
    DayContext {
        day,
        hours: hours_of_day(tz, day),
        work,
        workday,
        params,
    }
}

/// The windows of a computed day, hours first, then the day: (granularity, start, end,
/// values).
fn day_windows<'a>(
    ctx: &'a DayContext<'_>,
    features: &'a crate::features::DayFeatures<'_>,
) -> impl Iterator<Item = (Granularity, i64, i64, &'a WindowValues<'a>)> {
    let hours = features
        .hours
        .iter()
        .map(|(start, values)| (Granularity::Hour, *start, hour_end(ctx, *start), values));
    hours.chain([(Granularity::Day, ctx.day.0, ctx.day.1, &features.day)])
}

/// End of the hour window starting at `start` in the day of `ctx`.
fn hour_end(ctx: &DayContext<'_>, start: i64) -> i64 {
    ctx.hours
        .iter()
        .find(|h| h.0 == start)
        .map(|h| h.1)
        .unwrap_or(start + 3_600_000)
}

/// Window values as [`EmittedWindow`] records them.
fn owned_values(values: &WindowValues<'_>) -> Vec<((Feature, String), f64)> {
    values
        .iter()
        .map(|(&(f, Dim(d)), &v)| ((f, d.to_string()), v))
        .collect()
}

fn add_interactions(into: &mut HashMap<String, u32>, from: &[(String, u32)], sign: i64) {
    for (k, v) in from {
        if sign > 0 {
            *into.entry(k.clone()).or_insert(0) += v;
        } else if let Some(x) = into.get_mut(k) {
            *x = x.saturating_sub(*v);
            if *x == 0 {
                into.remove(k);
            }
        }
    }
}

/// Internal and external people with at least two meaningful interactions.
fn count_network<'a>(units: impl Iterator<Item = (&'a str, i64)>) -> (usize, usize) {
    let (mut internal, mut external) = (0, 0);
    for (k, v) in units {
        if v >= i64::from(2 * MEANINGFUL) {
            if is_external(k) {
                external += 1;
            } else {
                internal += 1;
            }
        }
    }
    (internal, external)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-11-24T00:00:00Z
    const D: i64 = 1_795_478_400_000;
    const MIN: i64 = 60_000;

    fn params() -> StateParams {
        StateParams {
            lateness_ms: 15 * MIN,
            hold_ms: 2 * DAY_MS,
            touch_hold_ms: 5 * MIN,
            horizon_ms: 30 * DAY_MS,
            features: FeatureParams {
                pulsetime_ms: 2000,
                flood_ms: 5000,
            },
        }
    }

    fn event(id: u128, start: i64, kind: &str) -> ActivityEvent {
        serde_json::from_value(serde_json::json!({
            "event_id": uuid::Uuid::from_u128(id),
            "tenant_id": "t", "user_id": "u", "source": "test", "kind": kind,
            "timestamp": start, "duration_ms": 0,
        }))
        .unwrap()
    }

    fn value(rows: &[FeatureRow], g: Granularity, feature: &str) -> Option<(f64, bool)> {
        rows.iter()
            .rev()
            .find(|r| r.granularity == g && r.feature == feature && r.dimension.is_empty())
            .map(|r| (r.value, r.is_final))
    }

    fn state() -> PersonState {
        PersonState::new(
            "t",
            "u",
            Arc::new(PersonParams::defaults("UTC").unwrap()),
            1,
        )
    }

    #[test]
    fn duplicates_count_once_and_late_events_revise_final_windows() {
        let p = params();
        let mut s = state();
        let mut rev = 0;
        let mut next = || {
            rev += 1;
            rev
        };
        // Wall clock: the day is still going on.
        let now = D + 12 * 60 * MIN;
        assert_eq!(
            s.admit(&event(1, D + 9 * 60 * MIN, "commit"), now, &p),
            Admission::Accepted
        );
        assert_eq!(
            s.admit(&event(1, D + 9 * 60 * MIN, "commit"), now, &p),
            Admission::Duplicate
        );
        let mut rows = Vec::new();
        s.emit(D + 9 * 60 * MIN, &p, &mut next, &mut rows);
        assert_eq!(
            value(&rows, Granularity::Hour, "event_count"),
            Some((1.0, false))
        );

        // Within lateness: 10 min before the newest event.
        assert_eq!(
            s.admit(&event(2, D + 9 * 60 * MIN - 10 * MIN, "commit"), now, &p),
            Admission::Accepted
        );
        // A later event moves the watermark to 10:45; the 9:00 hour becomes final.
        assert_eq!(
            s.admit(&event(3, D + 11 * 60 * MIN, "commit"), now, &p),
            Admission::Accepted
        );
        rows.clear();
        s.emit(D + 11 * 60 * MIN, &p, &mut next, &mut rows);
        let nine = |rows: &[FeatureRow]| -> Vec<(f64, bool, i64)> {
            rows.iter()
                .filter(|r| {
                    r.window_start.0 == D + 9 * 60 * MIN
                        && r.granularity == Granularity::Hour
                        && r.feature == "event_count"
                        && r.dimension.is_empty()
                })
                .map(|r| (r.value, r.is_final, r.revision))
                .collect()
        };
        let first_final = nine(&rows);
        assert_eq!(first_final.len(), 1);
        assert_eq!((first_final[0].0, first_final[0].1), (1.0, true));
        // 10:00 is before the watermark: the final 9:00 hour is untouched, the 10:00 hour
        // (still open) counts it.
        assert_eq!(
            s.admit(&event(4, D + 10 * 60 * MIN, "commit"), now, &p),
            Admission::Late
        );
        // 09:30 is late too, and revises the final 9:00 hour: 2 events, still final, newer.
        assert_eq!(
            s.admit(&event(5, D + 9 * 60 * MIN + 30 * MIN, "commit"), now, &p),
            Admission::Late
        );
        rows.clear();
        s.emit(D + 11 * 60 * MIN, &p, &mut next, &mut rows);
        let revised = nine(&rows);
        assert_eq!(revised.len(), 1, "{rows:?}");
        assert_eq!((revised[0].0, revised[0].1), (2.0, true));
        assert!(revised[0].2 > first_final[0].2);
        // 08:50, 09:00, 09:30, 10:00, 11:00.
        assert_eq!(
            value(&rows, Granularity::Day, "event_count"),
            Some((5.0, false))
        );
        // Unchanged windows are not emitted again.
        rows.clear();
        s.emit(D + 11 * 60 * MIN, &p, &mut next, &mut rows);
        assert!(rows.is_empty(), "{rows:?}");
    }

    #[test]
    fn a_past_day_is_final_at_once_and_reopens_from_stored_events() {
        let p = params();
        let mut s = state();
        let mut rev = 0;
        let mut next = || {
            rev += 1;
            rev
        };
        // Posted five days later: final at the first emit, without waiting.
        let now = D + 5 * DAY_MS;
        let stored: Vec<ActivityEvent> = (0..3)
            .map(|i| event(10 + i, D + (9 + i as i64) * 60 * MIN, "message"))
            .collect();
        for ev in &stored {
            assert_eq!(s.admit(ev, now, &p), Admission::Accepted);
        }
        let mut rows = Vec::new();
        s.emit(now, &p, &mut next, &mut rows);
        assert_eq!(
            value(&rows, Granularity::Day, "event_count"),
            Some((3.0, true))
        );
        // Touched just now, the day stays in memory for a while, then leaves it.
        assert!(s.days.contains_key(&D));
        rows.clear();
        s.emit(now + p.touch_hold_ms, &p, &mut next, &mut rows);
        assert!(rows.is_empty(), "{rows:?}");
        assert!(s.days.is_empty());
        assert!(!s.is_idle(), "its summary stays for rolling features");

        // A late event and a duplicate of a stored one: the day waits for the store.
        let later = now + p.touch_hold_ms + MIN;
        assert_eq!(
            s.admit(
                &event(20, D + 10 * 60 * MIN + 30 * MIN, "message"),
                later,
                &p
            ),
            Admission::Late
        );
        assert_eq!(
            s.admit(&stored[1], later, &p),
            Admission::Late,
            "not in memory any more: the store decides"
        );
        let range = s.reopen_range().expect("a reopening");
        assert!(range.from <= D - DAY_MS && range.to >= D + DAY_MS);
        s.reopen(&stored, later, &p);
        rows.clear();
        s.emit(later, &p, &mut next, &mut rows);
        // 3 stored + 1 new; the duplicate counts once. Only the changed windows: the day,
        // the 10:00 hour (and the week), not the untouched hours.
        assert_eq!(
            value(&rows, Granularity::Day, "event_count"),
            Some((4.0, true))
        );
        let hours: Vec<i64> = rows
            .iter()
            .filter(|r| r.granularity == Granularity::Hour)
            .map(|r| r.window_start.0)
            .collect();
        assert!(
            hours.iter().all(|h| *h == D + 10 * 60 * MIN) && !hours.is_empty(),
            "{hours:?}"
        );
        assert_eq!(value(&rows, Granularity::Week, "active_day"), None);
    }

    #[test]
    fn state_ages_out_after_the_horizon() {
        let p = params();
        let mut s = state();
        s.admit(&event(1, D + 23 * 60 * MIN, "message"), D, &p);
        let mut rows = Vec::new();
        s.emit(D + DAY_MS + 15 * MIN, &p, || 1, &mut rows);
        assert_eq!(
            value(&rows, Granularity::Day, "event_count"),
            Some((1.0, true))
        );
        s.emit(D + 40 * DAY_MS, &p, || 2, &mut rows);
        assert!(s.days.is_empty());
        assert!(
            !s.is_idle(),
            "reopenable until the horizon plus the rolling window"
        );
        s.emit(D + 200 * DAY_MS, &p, || 3, &mut rows);
        assert!(s.is_idle());
    }
}
