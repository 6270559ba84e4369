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

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono_tz::Tz;
use digame_schemas::{ActivityEvent, EventTime, FEATURE_VERSION, FeatureRow, Granularity};
use serde::{Deserialize, Serialize};

use crate::features::{Activity, FeatureParams, WindowValues, compute_day};
use crate::window::{days_overlapping, hours_of_day, parse_tz};

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
    values: BTreeMap<(String, String), f64>,
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
        mut changed: impl FnMut(&str, &str, f64),
    ) {
        use std::cmp::Ordering;
        let mut updates: Vec<(&'static str, &str, f64)> = Vec::new();
        let mut vanished: Vec<(String, String)> = Vec::new();
        let mut prev = self.values.iter().peekable();
        for ((feature, dim), &value) in current {
            let mut same = false;
            while let Some(&((pf, pd), &pv)) = prev.peek() {
                match (pf.as_str(), pd.as_str()).cmp(&(feature.name(), *dim)) {
                    Ordering::Less => {
                        if pv != 0.0 || all {
                            vanished.push((pf.clone(), pd.clone()));
                        }
                        prev.next();
                    }
                    Ordering::Equal => {
                        same = pv == value;
                        prev.next();
                        break;
                    }
                    Ordering::Greater => break,
                }
            }
            if !same || all {
                changed(feature.name(), dim, value);
                if !same {
                    updates.push((feature.name(), dim, value));
                }
            }
        }
        for ((pf, pd), &pv) in prev {
            if pv != 0.0 || all {
                vanished.push((pf.clone(), pd.clone()));
            }
        }
        for (f, d, v) in updates {
            self.values.insert((f.to_string(), d.to_string()), v);
        }
        for key in vanished {
            changed(&key.0, &key.1, 0.0);
            self.values.insert(key, 0.0);
        }
    }
}

/// State of one person.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PersonState {
    pub tenant: String,
    pub user: String,
    pub timezone: String,
    /// The bus partition carrying this person's events; state is checkpointed and moved
    /// between workers per partition.
    pub partition: u32,
    newest_start: i64,
    watermark: i64,
    /// Wall clock (ms) of the last accepted event, for idle advance.
    last_arrival: i64,
    /// Event ids seen in open windows, with their start, for duplicate filtering.
    seen: HashMap<u128, i64>,
    days: BTreeMap<i64, DayState>,
}

impl PersonState {
    pub fn new(tenant: &str, user: &str, timezone: &str) -> Self {
        PersonState {
            tenant: tenant.into(),
            user: user.into(),
            timezone: timezone.into(),
            partition: 0,
            newest_start: i64::MIN,
            watermark: i64::MIN,
            last_arrival: 0,
            seen: HashMap::new(),
            days: BTreeMap::new(),
        }
    }

    fn tz(&self) -> Tz {
        parse_tz(&self.timezone).unwrap_or(chrono_tz::UTC)
    }

    pub fn watermark(&self) -> i64 {
        self.watermark
    }

    /// Whether nothing is held (every day closed).
    pub fn is_idle(&self) -> bool {
        self.days.is_empty()
    }

    /// Admits one event.
    pub fn admit(&mut self, ev: &ActivityEvent, now_wall: i64, p: &StateParams) -> Admission {
        let id = ev.event_id.map(|u| u.as_u128()).unwrap_or_default();
        if self.seen.contains_key(&id) {
            return Admission::Duplicate;
        }
        let start = ev.timestamp.0;
        if start < self.watermark {
            return Admission::TooLate {
                watermark: self.watermark,
            };
        }
        self.seen.insert(id, start);
        self.last_arrival = now_wall;
        self.newest_start = self.newest_start.max(start);
        self.watermark = self.watermark.max(self.newest_start - p.lateness_ms);

        let end = ev.end().0;
        let others = ev
            .attributes
            .participants
            .iter()
            .filter(|p| **p != ev.user_id)
            .collect::<BTreeSet<_>>()
            .len() as u32;
        let act = Activity {
            start,
            end,
            kind: ev.kind,
            app: ev.attributes.app.clone(),
            title: ev.attributes.title.clone(),
            status: ev.attributes.status.clone(),
            others,
        };
        let tz = self.tz();
        for (day_start, day_end) in days_overlapping(tz, start, end.max(start + 1)) {
            let day = self.days.entry(day_start).or_default();
            day.end = day_end;
            day.acts.push(act.clone());
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
        let tz = self.tz();
        let mut closed = Vec::new();
        for (&day_start, day) in self.days.iter_mut() {
            let newly_final = day.windows.values().any(|w| !w.is_final && w.end <= wm)
                || (day.end <= wm
                    && !day
                        .windows
                        .get(&(Granularity::Day, day_start))
                        .is_some_and(|w| w.is_final));
            if !day.dirty && !newly_final {
                continue;
            }
            let hours = hours_of_day(tz, (day_start, day.end));
            let features = compute_day(&day.acts, (day_start, day.end), &hours, &p.features);
            let rev = revision();
            let windows = features
                .hours
                .iter()
                .map(|(start, values)| {
                    let end = hours
                        .iter()
                        .find(|h| h.0 == *start)
                        .map(|h| h.1)
                        .unwrap_or(start + 3_600_000);
                    (Granularity::Hour, *start, end, values)
                })
                .chain([(Granularity::Day, day_start, day.end, &features.day)]);
            for (g, ws, we, values) in windows {
                let is_final = we <= wm;
                let emitted = day.windows.entry((g, ws)).or_default();
                emitted.end = we;
                let first_final = is_final && !emitted.is_final;
                emitted.is_final |= is_final;
                emitted.diff(values, first_final, |feature, dimension, value| {
                    out.push(FeatureRow {
                        tenant_id: self.tenant.clone(),
                        user_id: self.user.clone(),
                        granularity: g,
                        window_start: EventTime(ws),
                        window_end: EventTime(we),
                        timezone: self.timezone.clone(),
                        feature: feature.to_string(),
                        dimension: dimension.to_string(),
                        value,
                        feature_version: FEATURE_VERSION,
                        is_final,
                        revision: rev,
                    });
                });
            }
            day.dirty = false;
            if day.end <= wm {
                closed.push(day_start);
            }
        }
        for day_start in closed {
            self.days.remove(&day_start);
        }
        if !self.days.is_empty() || !self.seen.is_empty() {
            let oldest_open = self.days.keys().next().copied().unwrap_or(i64::MAX);
            let horizon = oldest_open.min(wm);
            self.seen.retain(|_, start| *start >= horizon);
        }
    }
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
        let mut s = PersonState::new("t", "u", "UTC");
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
        let mut s = PersonState::new("t", "u", "UTC");
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
        assert!(s.is_idle());
    }
}
