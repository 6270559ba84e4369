//! Group views: aggregates of person features over a team or any group, released only
//! when they cannot single anyone out.
//!
//! Guarantees:
//! - **k people per value.** A group smaller than `k` (the tenant's `min_group_size`,
//!   default 5) gets no aggregate at all; inside a group, a window where fewer than `k`
//!   members have data is suppressed (no values, only the reason, never the count).
//! - **Only sums over the whole group.** Every value released is a sum over all the
//!   group's members, or such a sum divided by the group's size: a member without data in
//!   a window counts as 0, so which members contribute never depends on the data, and no
//!   per-window count of members with data is shown (with it, two nested groups' counts
//!   would tell that a difference of sums is one person's value). Order statistics
//!   (percentiles, minima, maxima) are never released: each of them is one member's value.
//! - **No disclosure by any combination of releases.** The groups released for the same
//!   windows form a laminar family: any two are disjoint or nested (teams, managers' org
//!   trees, saved groups that respect them). Each group's *atom* — its members not in a
//!   smaller released group inside it — has none or at least k people. Every sum over a
//!   group is the sum of its atoms' sums, so every linear combination of released sums
//!   (and so of means, with the counts) is a sum over whole atoms: no combination of
//!   releases isolates fewer than k people. [`release_check`] refuses a group that
//!   overlaps a released one without nesting, or that would leave an atom of 1 to k−1
//!   people; the caller decides and records each release in one metadata-store
//!   transaction, so the rule holds across API nodes.
//! - Windows are matched across members by their **local** date (day and week windows
//!   start at each person's own midnight), so a team spread over time zones aggregates
//!   the same calendar day.
//!
//! Statistics per feature total: the members counted `n` (the group's size), `sum` and
//! `mean` (per member). Plus F13's team workload state from the members'
//! over/under-utilisation.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::FeatureWindow;

/// Summary statistics of one feature over a group's members: linear in the members'
/// values, so any combination of releases stays a sum over whole atoms (module docs).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Stats {
    /// Members counted: all of the group's, with or without data.
    pub n: usize,
    pub sum: f64,
    /// `sum / n`.
    pub mean: f64,
}

/// One window of a group.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GroupWindow {
    /// Local date (`YYYY-MM-DD`) the members' windows start on.
    pub date: String,
    pub suppressed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub features: BTreeMap<String, Stats>,
    /// F13 team state: `high`, `optimal`, `low` or `varied` (members with an active day).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workload: Option<&'static str>,
}

/// The `q` quantile (0–1) of `sorted` values, interpolating linearly. For statistics over
/// one person's own data (and the style clustering's radius); never released over a group.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    match sorted.len() {
        0 => f64::NAN,
        1 => sorted[0],
        n => {
            let pos = q * (n - 1) as f64;
            let lo = pos.floor() as usize;
            let hi = pos.ceil() as usize;
            sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
        }
    }
}

/// Statistics of the `members` values given (`values.len() <= members`); the members not
/// in `values` count as 0.
pub fn stats(values: &[f64], members: usize) -> Stats {
    let sum: f64 = values.iter().sum();
    let n = members.max(values.len());
    Stats {
        n,
        sum,
        mean: if n == 0 { 0.0 } else { sum / n as f64 },
    }
}

/// The local date a window starts on, in its own time zone.
fn local_date(w: &FeatureWindow) -> String {
    let tz: chrono_tz::Tz = w.timezone.parse().unwrap_or(chrono_tz::UTC);
    chrono::DateTime::from_timestamp_millis(w.window_start.0)
        .map(|t| t.with_timezone(&tz).date_naive().to_string())
        .unwrap_or_default()
}

/// F13's team state from the members' flags: High when more than half are
/// over-utilised, Optimal when more than 70 % are neither, Low when more than half are
/// under-utilised, else Varied.
pub fn workload_state(over: usize, under: usize, members: usize) -> Option<&'static str> {
    if members == 0 {
        return None;
    }
    let share = |n: usize| n as f64 / members as f64;
    let healthy = members - over - under;
    Some(if share(over) > 0.5 {
        "high"
    } else if share(healthy) > 0.7 {
        "optimal"
    } else if share(under) > 0.5 {
        "low"
    } else {
        "varied"
    })
}

/// Aggregates the members' windows (`(user, windows)`) by local date; windows with fewer
/// than `k` members have data are suppressed. Every member of the group counts in every
/// released statistic (0 without data), so pass all of them, with or without windows.
pub fn aggregate(members: &[(String, Vec<FeatureWindow>)], k: usize) -> Vec<GroupWindow> {
    let mut by_date: BTreeMap<String, Vec<&FeatureWindow>> = BTreeMap::new();
    for (_, windows) in members {
        for w in windows {
            by_date.entry(local_date(w)).or_default().push(w);
        }
    }
    by_date
        .into_iter()
        .map(|(date, windows)| {
            if windows.len() < k {
                return GroupWindow {
                    date,
                    suppressed: true,
                    reason: Some(format!(
                        "fewer than {k} of the group's people have data here; values need at least {k}"
                    )),
                    features: BTreeMap::new(),
                    workload: None,
                };
            }
            // A feature a member's window lacks counts as 0 (absent means nothing
            // happened, or a retracted value), as does a member without a window.
            let names: BTreeSet<&String> = windows.iter().flat_map(|w| w.features.keys()).collect();
            let features = names
                .into_iter()
                .map(|name| {
                    let values: Vec<f64> = windows
                        .iter()
                        .map(|w| w.features.get(name).and_then(|v| v.as_f64()).unwrap_or(0.0))
                        .collect();
                    (name.clone(), stats(&values, members.len()))
                })
                .collect();
            let flag = |w: &&&FeatureWindow, f: &str| {
                w.features.get(f).and_then(|v| v.as_f64()).unwrap_or(0.0) > 0.0
            };
            let active: Vec<&&FeatureWindow> =
                windows.iter().filter(|w| flag(w, "active_day")).collect();
            let over = active.iter().filter(|w| flag(w, "over_utilized")).count();
            let under = active.iter().filter(|w| flag(w, "under_utilized")).count();
            GroupWindow {
                date,
                suppressed: false,
                reason: None,
                features,
                workload: workload_state(over, under, active.len()),
            }
        })
        .collect()
}

/// Why a group view is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the group has {size} people; group views need at least {k}")]
    TooSmall { size: usize, k: usize },
    #[error(
        "this group differs from a group already shown by {distance} {}; answering would expose fewer than {k} people by difference",
        if *distance == 1 { "person" } else { "people" }
    )]
    Difference { distance: usize, k: usize },
    #[error(
        "this group shares {shared} people with a group already shown for these windows and has {outside} others; groups shown for the same windows must be disjoint or nested (teams, org trees), or combining them would expose individuals"
    )]
    Overlap {
        shared: usize,
        outside: usize,
        k: usize,
    },
}

impl Refusal {
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::TooSmall { .. } => "group_too_small",
            Refusal::Difference { .. } => "difference_disclosure",
            Refusal::Overlap { .. } => "overlapping_group",
        }
    }
}

/// Refuses `group` unless releasing it keeps every individual hidden whatever the caller
/// combines: see the module docs. `released` are the groups already released for windows
/// this release shares.
pub fn release_check(
    group: &BTreeSet<String>,
    released: &[BTreeSet<String>],
    k: usize,
) -> Result<(), Refusal> {
    if group.len() < k {
        return Err(Refusal::TooSmall {
            size: group.len(),
            k,
        });
    }
    if released.contains(group) {
        return Ok(());
    }
    // Laminar: every released group is disjoint from this one or nested with it.
    for r in released {
        let shared = group.intersection(r).count();
        if shared > 0 && shared < group.len() && shared < r.len() {
            return Err(Refusal::Overlap {
                shared,
                outside: group.len() - shared,
                k,
            });
        }
    }
    // Atoms: this group less the released groups inside it, and each released group
    // holding this one less what it now has inside. Only these change.
    let atom = |of: &BTreeSet<String>, with: Option<&BTreeSet<String>>| -> usize {
        of.iter()
            .filter(|m| {
                !released
                    .iter()
                    .chain(with)
                    .any(|r| r.len() < of.len() && r.is_subset(of) && r.contains(*m))
            })
            .count()
    };
    let own = atom(group, None);
    if own > 0 && own < k {
        return Err(Refusal::Difference { distance: own, k });
    }
    for r in released.iter().filter(|r| group.is_subset(r)) {
        let (before, after) = (atom(r, None), atom(r, Some(group)));
        if after != before && after > 0 && after < k {
            return Err(Refusal::Difference { distance: after, k });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use digame_schemas::EventTime;
    use serde_json::{Map, Value};

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn window(start: i64, tz: &str, features: &[(&str, f64)]) -> FeatureWindow {
        FeatureWindow {
            window_start: EventTime(start),
            window_end: EventTime(start + 86_400_000),
            timezone: tz.into(),
            is_final: true,
            finality: Default::default(),
            features: features
                .iter()
                .map(|(k, v)| (k.to_string(), Value::from(*v)))
                .collect::<Map<_, _>>(),
            breakdowns: Map::new(),
        }
    }

    #[test]
    fn percentiles_interpolate_between_order_statistics() {
        // 1 2 3 4: p25 at position 0.75 → 1.75; median at 1.5 → 2.5; p75 at 2.25 → 3.25.
        let sorted = [1.0, 2.0, 3.0, 4.0];
        let q: Vec<f64> = [0.25, 0.5, 0.75].map(|q| percentile(&sorted, q)).into();
        assert_eq!(q, [1.75, 2.5, 3.25]);
        assert_eq!(percentile(&[7.0], 0.9), 7.0);
    }

    #[test]
    fn members_without_values_count_as_zero() {
        // 4 values of a group of 5: the fifth member counts as 0, so the mean is 10 / 5.
        let s = stats(&[4.0, 1.0, 3.0, 2.0], 5);
        assert_eq!(
            s,
            Stats {
                n: 5,
                sum: 10.0,
                mean: 2.0
            }
        );
        assert_eq!(stats(&[], 0).mean, 0.0);
    }

    #[test]
    fn windows_align_by_local_date_and_small_windows_are_suppressed() {
        // 2026-11-24 00:00 in Berlin (23:00Z the day before) and in New York (05:00Z).
        let berlin = 1_795_474_800_000;
        let ny = berlin + 6 * 3_600_000;
        let mut members = Vec::new();
        for (i, (start, tz)) in [
            (berlin, "Europe/Berlin"),
            (berlin, "Europe/Berlin"),
            (ny, "America/New_York"),
            (ny, "America/New_York"),
            (ny, "America/New_York"),
        ]
        .into_iter()
        .enumerate()
        {
            let active = i as f64 * 3600.0;
            let mut windows = vec![window(
                start,
                tz,
                &[
                    ("active_seconds", active),
                    ("active_day", 1.0),
                    ("over_utilized", f64::from(u8::from(i == 4))),
                ],
            )];
            // Only two people have data the next day.
            if i < 2 {
                windows.push(window(start + 86_400_000, tz, &[("active_seconds", 60.0)]));
            }
            members.push((format!("u{i}"), windows));
        }
        // A sixth member has no data at all: counted as 0 in every window.
        members.push(("u5".into(), Vec::new()));
        let out = aggregate(&members, 5);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].date, "2026-11-24");
        assert!(!out[0].suppressed);
        // 0, 1, 2, 3, 4 hours and the sixth member's 0: 10 h over 6 people.
        let a = &out[0].features["active_seconds"];
        assert_eq!((a.n, a.sum, a.mean), (6, 36000.0, 6000.0));
        // 1 of 5 active over, 4 healthy (80 % > 70 %).
        assert_eq!(out[0].workload, Some("optimal"));
        assert!(out[1].suppressed);
        assert!(out[1].features.is_empty());
        assert_eq!(
            out[1].reason.as_deref(),
            Some("fewer than 5 of the group's people have data here; values need at least 5")
        );
    }

    #[test]
    fn team_states_follow_the_thresholds() {
        assert_eq!(workload_state(3, 0, 5), Some("high"));
        assert_eq!(workload_state(0, 3, 5), Some("low"));
        assert_eq!(workload_state(1, 0, 5), Some("optimal"));
        // 2 over, 1 under, 2 healthy: nothing dominates.
        assert_eq!(workload_state(2, 1, 5), Some("varied"));
        assert_eq!(workload_state(0, 0, 0), None);
    }

    #[test]
    fn nested_groups_closer_than_k_are_refused() {
        let team: BTreeSet<String> = (0..9).map(|i| format!("p{i}")).collect();
        let five: BTreeSet<String> = (0..5).map(|i| format!("p{i}")).collect();
        let k = 5;
        assert!(release_check(&team, &[], k).is_ok());
        // 9 − 5 = 4 people by difference.
        let err = release_check(&five, std::slice::from_ref(&team), k)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("differs from a group already shown by 4 people"),
            "{err}"
        );
        // The same group again, or a disjoint one, is fine.
        assert!(release_check(&team, std::slice::from_ref(&team), k).is_ok());
        let other: BTreeSet<String> = (10..15).map(|i| format!("p{i}")).collect();
        assert!(release_check(&other, std::slice::from_ref(&team), k).is_ok());
        // A team of 4 is too small on its own.
        let err = release_check(&set(&["a", "b", "c", "d"]), &[], k).unwrap_err();
        assert_eq!(err.code(), "group_too_small");
        assert_eq!(
            err.to_string(),
            "the group has 4 people; group views need at least 5"
        );
        // Growing a shown group by one person would expose that person.
        let six: BTreeSet<String> = (0..6).map(|i| format!("p{i}")).collect();
        let err = release_check(&six, std::slice::from_ref(&five), k).unwrap_err();
        assert_eq!(err.code(), "difference_disclosure");
        assert!(err.to_string().contains("by 1 person;"), "{err}");
    }

    /// Who a solver recovers from the sums of `released` groups, each person holding a
    /// distinct value (checked against what the solver says they hold).
    fn recoverable(people: &[String], released: &[BTreeSet<String>]) -> Vec<String> {
        let value = |p: &String| 100.0 + people.iter().position(|q| q == p).unwrap() as f64;
        let releases: Vec<(BTreeSet<String>, f64)> = released
            .iter()
            .map(|g| (g.clone(), g.iter().map(value).sum()))
            .collect();
        let found = digame_testkit::reconstruct::recover(people, &releases);
        for (p, v) in &found {
            assert!((v - value(p)).abs() < 1e-6, "{p}: solved {v}");
        }
        found.into_keys().collect()
    }

    #[test]
    fn the_solver_recovers_what_pairwise_checks_let_through() {
        // Six 5-person subsets of a 6-person team: each differs from each other by one in
        // and one out, so a check of nested pairs releases them all, and they solve for
        // every individual (the attack this rule replaces).
        let team: Vec<String> = (0..6).map(|i| format!("p{i}")).collect();
        let subsets: Vec<BTreeSet<String>> = (0..6)
            .map(|out| team.iter().filter(|p| **p != team[out]).cloned().collect())
            .collect();
        assert_eq!(recoverable(&team, &subsets), team);
        // The team and two disjoint halves of 3: the halves' atoms are 3 < 5, refused; a
        // single person from the team and its complement: solved.
        let all: BTreeSet<String> = team.iter().cloned().collect();
        let rest: BTreeSet<String> = team[1..].iter().cloned().collect();
        assert_eq!(recoverable(&team, &[all, rest]), vec!["p0".to_string()]);
    }

    /// Every group a manager of 11 people (in two teams of 5 and 6 and as a whole) may ask
    /// for — the whole org, each team, every subset of 5 or more of the org — asked in
    /// several orders: whatever gets released, no individual's value can be solved for.
    #[test]
    fn no_sequence_of_requests_lets_a_solver_recover_anyone() {
        let k = 5;
        let org: Vec<String> = (0..11).map(|i| format!("p{i:02}")).collect();
        let team_a: BTreeSet<String> = org[..5].iter().cloned().collect();
        let team_b: BTreeSet<String> = org[5..].iter().cloned().collect();
        let whole: BTreeSet<String> = org.iter().cloned().collect();
        let mut candidates = vec![whole.clone(), team_a.clone(), team_b.clone()];
        // Every subset of size >= 5 (of 11: 1,486 of them).
        for mask in 0u32..(1 << org.len()) {
            if mask.count_ones() >= 5 {
                candidates.push(
                    (0..org.len())
                        .filter(|i| mask & (1 << i) != 0)
                        .map(|i| org[i].clone())
                        .collect(),
                );
            }
        }
        let mut rng_state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            rng_state ^= rng_state << 13;
            rng_state ^= rng_state >> 7;
            rng_state ^= rng_state << 17;
            rng_state
        };
        for order in 0..6 {
            let mut asked = candidates.clone();
            if order > 0 {
                // Fisher–Yates with a fixed xorshift: reproducible orders.
                for i in (1..asked.len()).rev() {
                    asked.swap(i, (next() % (i as u64 + 1)) as usize);
                }
            }
            let mut released: Vec<BTreeSet<String>> = Vec::new();
            for g in asked {
                if release_check(&g, &released, k).is_ok() && !released.contains(&g) {
                    released.push(g);
                }
            }
            // The first group asked for is always released (all candidates have >= k).
            assert!(!released.is_empty(), "order {order}");
            assert_eq!(
                recoverable(&org, &released),
                Vec::<String>::new(),
                "order {order}: {released:?}"
            );
            // And each released group's atom is empty or at least k.
            for g in &released {
                let inner: BTreeSet<&String> = released
                    .iter()
                    .filter(|r| r.len() < g.len() && r.is_subset(g))
                    .flatten()
                    .collect();
                let atom = g.iter().filter(|m| !inner.contains(m)).count();
                assert!(
                    atom == 0 || atom >= k,
                    "order {order}: atom {atom} of {g:?}"
                );
            }
        }
        // In the natural order (org, then its teams), the org view and both team views
        // are all released.
        let mut released = Vec::new();
        for g in [&whole, &team_a, &team_b] {
            release_check(g, &released, k).unwrap();
            released.push(g.clone());
        }
        // A 5-of-6 subset of team b now overlaps nothing but nests in b with an atom of 1.
        let err = release_check(&org[5..10].iter().cloned().collect(), &released, k).unwrap_err();
        assert_eq!(err.code(), "difference_disclosure");
        // A group straddling the teams overlaps both without nesting.
        let straddle: BTreeSet<String> = org[3..8].iter().cloned().collect();
        let err = release_check(&straddle, &released, k).unwrap_err();
        assert_eq!(err.code(), "overlapping_group");
    }
}
