//! Chart-ready shapes of a person's data: the hour-of-week activity profile (heatmap) and
//! how it shifts, and app-to-app transition flows (Sankey). Pure functions over windows
//! and events, so the HTTP layer only fetches and serializes.
//!
//! Shapes follow what common chart libraries take directly: a heatmap as `x` (hours),
//! `y` (weekdays) and `z` (rows of values), plus `cells` as `[hour, weekday, value]`
//! triples; a Sankey as `nodes` (`{"name"}`) and `links` (`{"source", "target", "value"}`
//! with node indices).

use std::collections::BTreeMap;

use chrono::{Datelike, Timelike};
use digame_schemas::{ActivityEvent, EventKind};
use serde::Serialize;

use crate::FeatureWindow;

pub const WEEKDAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// Mean active minutes per local hour of the week.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Heatmap {
    pub x: Vec<u32>,
    pub y: Vec<&'static str>,
    /// `z[weekday][hour]`: mean active minutes in that hour over the weeks covered.
    pub z: Vec<Vec<f64>>,
    /// `[hour, weekday index, value]` for every non-zero cell.
    pub cells: Vec<(u32, usize, f64)>,
    /// Weeks the means are taken over.
    pub weeks: usize,
}

/// Local (weekday, hour) of a window start, in the window's zone.
fn local_slot(w: &FeatureWindow) -> Option<(usize, u32, chrono::NaiveDate)> {
    let tz: chrono_tz::Tz = w.timezone.parse().unwrap_or(chrono_tz::UTC);
    let t = chrono::DateTime::from_timestamp_millis(w.window_start.0)?.with_timezone(&tz);
    Some((
        t.weekday().num_days_from_monday() as usize,
        t.hour(),
        t.date_naive() - chrono::Days::new(u64::from(t.weekday().num_days_from_monday())),
    ))
}

/// The hour-of-week profile of hour windows, averaged over `weeks` weeks (at least 1).
pub fn heatmap<'a>(hours: impl IntoIterator<Item = &'a FeatureWindow>, weeks: usize) -> Heatmap {
    let weeks = weeks.max(1);
    let mut z = vec![vec![0.0; 24]; 7];
    for w in hours {
        let Some((day, hour, _)) = local_slot(w) else {
            continue;
        };
        let active = w
            .features
            .get("active_seconds")
            .and_then(|v| v.as_f64())
            .unwrap_or(0.0);
        // The repeated 02:00 of a DST autumn day lands on the same cell.
        z[day][hour as usize] += active / 60.0 / weeks as f64;
    }
    let cells = z
        .iter()
        .enumerate()
        .flat_map(|(d, row)| {
            row.iter()
                .enumerate()
                .filter(|(_, v)| **v > 0.0)
                .map(move |(h, v)| (h as u32, d, *v))
        })
        .collect();
    Heatmap {
        x: (0..24).collect(),
        y: WEEKDAYS.to_vec(),
        z,
        cells,
        weeks,
    }
}

/// How two profiles differ: 1 − cosine similarity (0 = same shape, 1 = no overlap) and
/// the busiest cell of each.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Shift {
    pub distance: f64,
    pub earlier_peak: Option<(&'static str, u32)>,
    pub recent_peak: Option<(&'static str, u32)>,
}

fn peak(h: &Heatmap) -> Option<(&'static str, u32)> {
    let mut best: Option<(usize, u32, f64)> = None;
    for (d, row) in h.z.iter().enumerate() {
        for (hour, v) in row.iter().enumerate() {
            if *v > 0.0 && best.is_none_or(|(_, _, b)| *v > b) {
                best = Some((d, hour as u32, *v));
            }
        }
    }
    best.map(|(d, hour, _)| (WEEKDAYS[d], hour))
}

pub fn shift(earlier: &Heatmap, recent: &Heatmap) -> Shift {
    let a: Vec<f64> = earlier.z.iter().flatten().copied().collect();
    let b: Vec<f64> = recent.z.iter().flatten().copied().collect();
    let dot: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let (na, nb) = (norm(&a), norm(&b));
    let distance = if na == 0.0 && nb == 0.0 {
        0.0
    } else if na == 0.0 || nb == 0.0 {
        1.0
    } else {
        1.0 - dot / (na * nb)
    };
    Shift {
        distance,
        earlier_peak: peak(earlier),
        recent_peak: peak(recent),
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Node {
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Link {
    pub source: usize,
    pub target: usize,
    /// Times focus moved from `source` to `target`.
    pub value: u64,
}

/// App-to-app transitions as a Sankey diagram.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Sankey {
    pub nodes: Vec<Node>,
    pub links: Vec<Link>,
}

/// Transitions between consecutive window-focus events (in time order) whose apps differ
/// and whose gap is at most `max_gap_ms` (a longer gap is a break, not a switch). Only
/// the `top` busiest links are kept, so the diagram stays readable.
pub fn transitions(events: &[ActivityEvent], max_gap_ms: i64, top: usize) -> Sankey {
    let mut focus: Vec<&ActivityEvent> = events
        .iter()
        .filter(|e| e.kind == EventKind::WindowFocus && e.attributes.app.is_some())
        .collect();
    focus.sort_by_key(|e| e.timestamp);
    let mut counts: BTreeMap<(&str, &str), u64> = BTreeMap::new();
    for pair in focus.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        let (from, to) = (
            a.attributes.app.as_deref().unwrap_or(""),
            b.attributes.app.as_deref().unwrap_or(""),
        );
        if from != to && b.timestamp.0 - a.end().0 <= max_gap_ms {
            *counts.entry((from, to)).or_default() += 1;
        }
    }
    let mut ranked: Vec<((&str, &str), u64)> = counts.into_iter().collect();
    ranked.sort_by(|x, y| y.1.cmp(&x.1).then(x.0.cmp(&y.0)));
    ranked.truncate(top);
    let mut nodes: Vec<Node> = Vec::new();
    let index = |name: &str, nodes: &mut Vec<Node>| {
        nodes
            .iter()
            .position(|n| n.name == name)
            .unwrap_or_else(|| {
                nodes.push(Node { name: name.into() });
                nodes.len() - 1
            })
    };
    let links = ranked
        .into_iter()
        .map(|((from, to), value)| Link {
            source: index(from, &mut nodes),
            target: index(to, &mut nodes),
            value,
        })
        .collect();
    Sankey { nodes, links }
}

#[cfg(test)]
mod tests {
    use super::*;
    use digame_schemas::EventTime;
    use serde_json::{Map, Value, json};

    fn hour(start: i64, tz: &str, active: f64) -> FeatureWindow {
        FeatureWindow {
            window_start: EventTime(start),
            window_end: EventTime(start + 3_600_000),
            timezone: tz.into(),
            is_final: true,
            finality: Default::default(),
            features: [("active_seconds".to_string(), Value::from(active))]
                .into_iter()
                .collect::<Map<_, _>>(),
            breakdowns: Map::new(),
        }
    }

    // Tue 2026-11-24 09:00 in Berlin is 08:00Z.
    const TUE_9_BERLIN: i64 = 1_795_474_800_000 + 9 * 3_600_000;
    const WEEK: i64 = 7 * 86_400_000;

    #[test]
    fn the_heatmap_averages_local_hours_over_weeks() {
        let windows = [
            hour(TUE_9_BERLIN, "Europe/Berlin", 1800.0),
            hour(TUE_9_BERLIN - WEEK, "Europe/Berlin", 600.0),
            hour(TUE_9_BERLIN + 3_600_000, "Europe/Berlin", 3600.0),
        ];
        let h = heatmap(&windows, 2);
        // Tuesday 09:00: (30 + 10) min / 2 weeks; 10:00: 60 / 2.
        assert_eq!(h.z[1][9], 20.0);
        assert_eq!(h.z[1][10], 30.0);
        assert_eq!(h.cells, vec![(9, 1, 20.0), (10, 1, 30.0)]);
        assert_eq!(h.z.iter().flatten().filter(|v| **v > 0.0).count(), 2);
        let moved = heatmap(
            [&hour(TUE_9_BERLIN + 12 * 3_600_000, "Europe/Berlin", 600.0)],
            1,
        );
        let s = shift(&h, &moved);
        assert_eq!(s.distance, 1.0, "no hour in common");
        assert_eq!(s.earlier_peak, Some(("tue", 10)));
        assert_eq!(s.recent_peak, Some(("tue", 21)));
        assert!(shift(&h, &h).distance.abs() < 1e-12);
    }

    fn focus(app: &str, start_min: i64, minutes: i64) -> ActivityEvent {
        serde_json::from_value(json!({
            "user_id": "u", "source": "aw", "kind": "window_focus",
            "timestamp": TUE_9_BERLIN + start_min * 60_000, "duration_ms": minutes * 60_000,
            "attributes": {"app": app}
        }))
        .unwrap()
    }

    #[test]
    fn transitions_count_switches_within_the_gap() {
        let events = [
            focus("Code", 0, 10),
            focus("Slack", 10, 2),
            focus("Code", 12, 10),
            focus("Code", 22, 5), // same app: no switch
            focus("Slack", 27, 1),
            focus("Firefox", 60, 5), // 32 min after Slack ends: a break
        ];
        let s = transitions(&events, 5 * 60_000, 10);
        assert_eq!(
            s.nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(),
            ["Code", "Slack"]
        );
        assert_eq!(
            s.links,
            vec![
                Link {
                    source: 0,
                    target: 1,
                    value: 2
                },
                Link {
                    source: 1,
                    target: 0,
                    value: 1
                },
            ]
        );
    }
}
