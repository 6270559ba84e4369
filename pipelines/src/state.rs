//! Keyed state of one person: open days, event-time watermark, duplicate filter, and what
//! was last emitted per window.
//!
//! Watermark: `newest event start − allowed lateness`, never moving back. An event starting
//! before the watermark is too late: its hour may already be final. When a person sends
//! nothing for `idle_advance` of wall-clock time, their event time is assumed to follow the
//! wall clock, so their last windows close too. A window is final once the watermark passes
//! its end; a day whose every window is final is emitted a last time and dropped from state.
//!
//! Emission is by difference: after new events, the touched days are recomputed and only
//! values that changed are emitted, each with a fresh revision; final windows are emitted
//! once more with `is_final = true`.
//!
//! Beyond open days the state keeps what rolling and weekly features need, updated
//! incrementally from each computed day's [`DaySummary`] (subtract the day's previous
//! summary, add the new one), never recomputed from raw events:
//! - F11 network and F12's weekly 1:1 minutes over the 28 local days ending at each open
//!   day: one running sum for the window ending at the newest day, corrected by the few
//!   days between an older open day and the newest;
//! - week totals (local Monday to Monday) for F13's week, F14 and the week data-quality
//!   flags, kept for 15 weeks, with week rows emitted like day rows;
//! - day summaries for 35 days (interactions only as long as a window can need them).

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
/// Week totals kept: F14 looks 4 weeks back, the inactive-week flag 12.
const WEEKS_KEPT: i64 = 15;
/// Interaction units of one meaningful interaction (F11: 1 email, meeting or call = 3
/// units, a chat message = 1).
const MEANINGFUL: u32 = 3;

/// Runtime settings the state needs.
#[derive(Clone, Copy, Debug)]
pub struct StateParams {
    pub lateness_ms: i64,
    /// 0 disables idle advance.
    pub idle_advance_ms: i64,
    pub features: FeatureParams,
}

/// What happened to one event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    Accepted,
    Duplicate,
    TooLate { watermark: i64 },
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct DayState {
    end: i64,
    acts: Vec<Activity>,
    dirty: bool,
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
    /// Wall clock (ms) of the last accepted event, for idle advance.
    last_arrival: i64,
    /// Event ids seen in open windows, with their start, for duplicate filtering.
    seen: HashMap<u128, i64, foldhash::fast::RandomState>,
    days: BTreeMap<i64, DayState>,
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
            last_arrival: 0,
            seen: HashMap::default(),
            days: BTreeMap::new(),
            history: BTreeMap::new(),
            rolling: HashMap::new(),
            rolling_one_on_one_ms: 0,
            rolling_newest: i64::MIN,
            weeks: BTreeMap::new(),
            params: Some(params),
            generation,
            day_cache: None,
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
        self.days.is_empty() && self.history.is_empty() && self.weeks.is_empty()
    }

    /// Admits one event.
    pub fn admit(&mut self, ev: &ActivityEvent, now_wall: i64, p: &StateParams) -> Admission {
        let id = ev.event_id.map(|u| u.as_u128()).unwrap_or_default();
        let start = ev.timestamp.0;
        if start < self.watermark {
            // A duplicate of an admitted event is a duplicate, however late.
            if self.seen.contains_key(&id) {
                return Admission::Duplicate;
            }
            return Admission::TooLate {
                watermark: self.watermark,
            };
        }
        // One probe on the common path: look up and record together.
        match self.seen.entry(id) {
            std::collections::hash_map::Entry::Occupied(_) => return Admission::Duplicate,
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(start);
            }
        }
        self.last_arrival = now_wall;
        self.newest_start = self.newest_start.max(start);
        self.watermark = self.watermark.max(self.newest_start - p.lateness_ms);

        let end = ev.end().0;
        // Sorted and distinct, without the subject.
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
        let act = Activity {
            start,
            end,
            kind: ev.kind,
            app: a.app.clone(),
            title: a.title.clone(),
            url: a.url.clone(),
            project: a.project.clone(),
            status: a.status.clone(),
            participants,
        };
        let params = self
            .params
            .as_ref()
            .expect("parameters are installed before events are admitted");
        // Editor heartbeats also reach the days within the keystroke timeout, so a coding
        // span across local midnight is credited to both days.
        let reach = if ev.kind == digame_schemas::EventKind::IdeHeartbeat {
            params.keystroke_timeout_ms
        } else {
            0
        };
        let tz = params.tz;
        let from = start - reach;
        let to = end.max(start + 1) + reach;
        let mut days = days_from(tz, self.day_of(tz, from), to).peekable();
        let mut act = Some(act);
        while let Some((day_start, day_end)) = days.next() {
            if day_end <= self.watermark {
                continue;
            }
            let day = self.days.entry(day_start).or_default();
            day.end = day_end;
            // The activity itself goes to its last day; earlier days get copies.
            let a = if days.peek().is_none() {
                act.take()
            } else {
                act.clone()
            };
            day.acts.extend(a);
            day.dirty = true;
        }
        Admission::Accepted
    }

    /// Advances the watermark for idleness; returns the effective watermark.
    fn advance_idle(&mut self, now_wall: i64, p: &StateParams) -> i64 {
        if p.idle_advance_ms > 0 && self.newest_start != i64::MIN {
            let idle = now_wall - self.last_arrival;
            if idle >= p.idle_advance_ms {
                self.watermark = self.watermark.max(self.newest_start + idle - p.lateness_ms);
            }
        }
        self.watermark
    }

    /// Replaces the summary of a computed day, updating the rolling sums and week totals
    /// by difference.
    fn record_day(&mut self, day_start: i64, week: (i64, i64), summary: DaySummary) {
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
        if let Some(old) = self.history.remove(&day_start) {
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

    /// Emits changed and newly final rows; drops closed days. `revision` yields a fresh,
    /// increasing revision per call.
    pub fn emit(
        &mut self,
        now_wall: i64,
        p: &StateParams,
        mut revision: impl FnMut() -> i64,
        out: &mut Vec<FeatureRow>,
    ) {
        let wm = self.advance_idle(now_wall, p);
        let params = self.params();
        let tz = params.tz;
        // A recomputed day changes the rolling values of the open days after it.
        if let Some(first_dirty) = self.days.iter().find(|(_, d)| d.dirty).map(|(k, _)| *k) {
            for (_, d) in self.days.range_mut(first_dirty..) {
                d.dirty = true;
            }
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
            if !day.dirty && !newly_final {
                continue;
            }
            let day_end = day.end;
            let hours = hours_of_day(tz, (day_start, day_end));
            let (work, workday) = work_intervals(
                tz,
                (day_start, day_end),
                &params.work_days,
                params.work_start_min,
                params.work_end_min,
            );
            let ctx = DayContext {
                day: (day_start, day_end),
                hours,
                work,
                workday,
                params: &params,
            };
            let mut day = self.days.remove(&day_start).expect("listed above");
            let mut features = compute_day(&day.acts, &ctx, &p.features);
            let week = week_window(tz, day_start);
            self.record_day(day_start, week, std::mem::take(&mut features.summary));
            self.rolling_values(day_start, &params, &mut features.day);
            let rev = revision();
            let windows = features
                .hours
                .iter()
                .map(|(start, values)| {
                    let end = ctx
                        .hours
                        .iter()
                        .find(|h| h.0 == *start)
                        .map(|h| h.1)
                        .unwrap_or(start + 3_600_000);
                    (Granularity::Hour, *start, end, values)
                })
                .chain([(Granularity::Day, day_start, day_end, &features.day)]);
            for (g, ws, we, values) in windows {
                let is_final = we <= wm;
                let emitted = day.windows.entry((g, ws)).or_default();
                emitted.end = we;
                let first_final = is_final && !emitted.is_final;
                emitted.is_final |= is_final;
                emitted.diff(values, first_final, |feature, dimension, value| {
                    out.push(
                        self.row(g, ws, we, feature, dimension, value, is_final, rev, &params),
                    );
                });
            }
            day.dirty = false;
            if day.end <= wm {
                closed.push(day_start);
            }
            self.days.insert(day_start, day);
        }
        for day_start in closed {
            self.days.remove(&day_start);
        }
        self.emit_weeks(wm, &params, &mut revision, out);
        self.prune(wm);
        if !self.days.is_empty() || !self.seen.is_empty() {
            let oldest_open = self.days.keys().next().copied().unwrap_or(i64::MAX);
            let horizon = oldest_open.min(wm);
            self.seen.retain(|_, start| *start >= horizon);
        }
    }

    fn emit_weeks(
        &mut self,
        wm: i64,
        params: &PersonParams,
        revision: &mut impl FnMut() -> i64,
        out: &mut Vec<FeatureRow>,
    ) {
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
            let is_final = w.end <= wm;
            let first_final = is_final && !w.emitted.is_final;
            w.emitted.is_final |= is_final;
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
                        is_final,
                        rev,
                        params,
                    ));
                });
            w.dirty = false;
            if w.emitted.is_final {
                // Only the totals are needed from here on.
                w.emitted.values.clear();
            }
            self.weeks.insert(start, w);
        }
    }

    /// Ages out day summaries and week totals no feature can need any more.
    fn prune(&mut self, wm: i64) {
        let newest = self.rolling_newest.max(wm);
        let keep_from = newest - HISTORY_MS;
        let old: Vec<i64> = self.history.range(..keep_from).map(|(d, _)| *d).collect();
        for d in old {
            // Out of every window by now (HISTORY_MS > ROLLING_WINDOW_MS).
            self.history.remove(&d);
        }
        let week_horizon = newest - WEEKS_KEPT * 7 * DAY_MS;
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
        is_final: bool,
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
            is_final,
            revision,
        }
    }
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
            idle_advance_ms: 0,
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

    #[test]
    fn duplicates_count_once_and_late_events_are_refused() {
        let p = params();
        let mut s = PersonState::new(
            "t",
            "u",
            Arc::new(PersonParams::defaults("UTC").unwrap()),
            1,
        );
        let mut rev = 0;
        let mut next = || {
            rev += 1;
            rev
        };
        assert_eq!(
            s.admit(&event(1, D + 9 * 60 * MIN, "commit"), 0, &p),
            Admission::Accepted
        );
        assert_eq!(
            s.admit(&event(1, D + 9 * 60 * MIN, "commit"), 0, &p),
            Admission::Duplicate
        );
        let mut rows = Vec::new();
        s.emit(0, &p, &mut next, &mut rows);
        assert_eq!(
            value(&rows, Granularity::Hour, "event_count"),
            Some((1.0, false))
        );

        // Within lateness: 10 min before the newest event.
        assert_eq!(
            s.admit(&event(2, D + 9 * 60 * MIN - 10 * MIN, "commit"), 0, &p),
            Admission::Accepted
        );
        // A later event moves the watermark to 10:45; the 9:00 hour becomes final.
        assert_eq!(
            s.admit(&event(3, D + 11 * 60 * MIN, "commit"), 0, &p),
            Admission::Accepted
        );
        rows.clear();
        s.emit(0, &p, &mut next, &mut rows);
        let nine: Vec<&FeatureRow> = rows
            .iter()
            .filter(|r| {
                r.window_start.0 == D + 9 * 60 * MIN
                    && r.feature == "event_count"
                    && r.dimension.is_empty()
            })
            .collect();
        assert_eq!(nine.len(), 1);
        assert!(nine[0].is_final);
        assert_eq!(nine[0].value, 1.0);
        assert_eq!(
            s.admit(&event(4, D + 10 * 60 * MIN, "commit"), 0, &p),
            Admission::TooLate {
                watermark: D + 11 * 60 * MIN - 15 * MIN
            }
        );
        // Unchanged windows are not emitted again.
        rows.clear();
        s.emit(0, &p, &mut next, &mut rows);
        assert!(rows.is_empty(), "{rows:?}");
    }

    #[test]
    fn idle_advance_closes_the_day_and_frees_state() {
        let p = StateParams {
            idle_advance_ms: 60 * MIN,
            ..params()
        };
        let mut s = PersonState::new(
            "t",
            "u",
            Arc::new(PersonParams::defaults("UTC").unwrap()),
            1,
        );
        s.admit(&event(1, D + 23 * 60 * MIN, "message"), 1_000, &p);
        let mut rows = Vec::new();
        let mut rev = 0;
        s.emit(
            1_000,
            &p,
            || {
                rev += 1;
                rev
            },
            &mut rows,
        );
        assert_eq!(
            value(&rows, Granularity::Day, "event_count"),
            Some((1.0, false))
        );
        rows.clear();
        // Two hours of silence: event time is assumed to reach 01:00 next day.
        s.emit(1_000 + 120 * MIN, &p, || 99, &mut rows);
        assert_eq!(
            value(&rows, Granularity::Day, "event_count"),
            Some((1.0, true))
        );
        assert!(s.days.is_empty());
        // The day's summary stays for rolling features until it ages out.
        assert!(!s.is_idle());
        s.emit(1_000 + 110 * 24 * 60 * MIN, &p, || 100, &mut rows);
        assert!(s.is_idle());
    }
}
