//! Team-level collaboration and engineering flow, computed from the members' raw events.
//! Both answer for a group only (the caller applies the group-view privacy rules) and
//! never rank individuals: per-member figures leave this module only as statistics.
//!
//! **Collaboration graph.** An interaction is a meeting, call, email, review or pull
//! request (weight 1) or a chat message (weight 1/3, as F11 counts three messages as one
//! meaningful interaction) with 2–8 participants, declined meetings and received
//! messages excluded. A member's collaborators are the internal people (ids not starting
//! with `ext:`) they share interactions of weight ≥ 2 with; **network size** is how many,
//! **cross-team breadth** how many other teams they belong to. The graph's nodes are teams
//! (plus `unassigned` and `external`), its links the interaction weight between the group
//! and each.
//!
//! **Engineering flow (DORA).** Conventions for connector events: a `commit` carries
//! `properties.sha`; a `deploy` carries `properties.commits` (the shas it shipped);
//! incidents are `incident` events with status `opened` and `resolved` sharing
//! `properties.id` (a lone `resolved` event with `duration_ms` stands for both), and
//! either may list the changes that caused it in `properties.commits`. Over the window:
//! deployment frequency = deploys per week; lead time for changes = mean of (first
//! deploy − commit) over deployed commits, non-positive values excluded; change failure
//! rate = deployed changes linked to an incident ÷ deployed changes; time to restore =
//! mean duration of resolved incidents. Means, not DORA's customary medians: a median is
//! one change's or one incident's figure, and so one person's (group views release only
//! sums over the group, see `groups`).
//!
//! The per-member statistics count every member of the group, 0 for a member without
//! collaboration data, so they are sums over the group like every group view's.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use digame_schemas::{ActivityEvent, EventKind, EventTime};
use serde::Serialize;

use crate::groups::{Stats, stats};

/// Interaction weight of one event, with the other participants; `None` when it is not
/// a collaboration.
fn interaction(e: &ActivityEvent) -> Option<f64> {
    let weight = match e.kind {
        EventKind::Meeting | EventKind::Call => {
            if e.attributes.status.as_deref() == Some("declined") {
                return None;
            }
            1.0
        }
        EventKind::Email | EventKind::Review | EventKind::PullRequest => 1.0,
        EventKind::Message => 1.0 / 3.0,
        _ => return None,
    };
    if matches!(e.kind, EventKind::Message | EventKind::Email)
        && e.attributes.status.as_deref() == Some("received")
    {
        return None;
    }
    // 2–8 participants including the person.
    let n = e.attributes.participants.len() + 1;
    (2..=8).contains(&n).then_some(weight)
}

/// The group's collaboration, aggregated.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Network {
    /// For the caller's suppression rule; not released (see `groups`).
    #[serde(skip)]
    pub members_with_data: usize,
    pub network_size: Stats,
    pub cross_team_breadth: Stats,
    /// Teams the group works with: `{"name"}`; index 0 is the group itself.
    pub nodes: Vec<NodeName>,
    /// `{"source": 0, "target": i, "value": weight}`.
    pub links: Vec<WeightedLink>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NodeName {
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WeightedLink {
    pub source: usize,
    pub target: usize,
    pub value: f64,
}

/// The collaboration of `members` (each with their events), labelled `group`, with
/// `team_of` mapping every profiled person to their team.
pub fn network(
    group: &str,
    members: &[(String, Vec<ActivityEvent>)],
    team_of: &HashMap<String, String>,
) -> Network {
    let mut sizes = Vec::new();
    let mut breadths = Vec::new();
    let mut by_team: BTreeMap<String, f64> = BTreeMap::new();
    let member_set: BTreeSet<&str> = members.iter().map(|(u, _)| u.as_str()).collect();
    for (user, events) in members {
        let mut with: HashMap<&str, f64> = HashMap::new();
        for e in events {
            let Some(w) = interaction(e) else { continue };
            for p in &e.attributes.participants {
                if p != user {
                    *with.entry(p.as_str()).or_default() += w;
                }
            }
        }
        if with.is_empty() {
            continue;
        }
        let own_team = team_of.get(user.as_str());
        let mut collaborators = 0usize;
        let mut teams: BTreeSet<&str> = BTreeSet::new();
        for (other, w) in &with {
            let team = if other.starts_with("ext:") {
                "external"
            } else if member_set.contains(other) {
                group
            } else {
                team_of.get(*other).map_or("unassigned", String::as_str)
            };
            if team != group {
                *by_team.entry(team.to_string()).or_default() += w;
            }
            if other.starts_with("ext:") || *w < 2.0 - 1e-9 {
                continue;
            }
            collaborators += 1;
            let theirs = team_of.get(*other);
            if theirs.is_some() && theirs != own_team && !member_set.contains(other) {
                teams.insert(theirs.map_or("", String::as_str));
            }
        }
        sizes.push(collaborators as f64);
        breadths.push(teams.len() as f64);
    }
    let mut nodes = vec![NodeName { name: group.into() }];
    let mut links = Vec::new();
    for (team, weight) in by_team {
        nodes.push(NodeName { name: team });
        links.push(WeightedLink {
            source: 0,
            target: nodes.len() - 1,
            value: weight,
        });
    }
    Network {
        members_with_data: sizes.len(),
        network_size: stats(&sizes, members.len()),
        cross_team_breadth: stats(&breadths, members.len()),
        nodes,
        links,
    }
}

/// DORA figures of a group over a window.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Flow {
    pub deploys: usize,
    /// Deploys per week of `rate_days`.
    pub deployments_per_week: f64,
    /// The days the rate is over: the window from the UTC day of the group's first event
    /// in it (not before the window's start) to its end or the present, whichever is
    /// earlier. A window longer than the data would otherwise dilute the rate.
    pub rate_days: f64,
    pub deployed_changes: usize,
    /// Mean hours from commit to its first deploy (`None` without deployed commits).
    pub lead_time_hours: Option<f64>,
    pub change_failure_rate: Option<f64>,
    pub resolved_incidents: usize,
    /// Mean hours from an incident opening to its resolution.
    pub time_to_restore_hours: Option<f64>,
}

fn property_strings(e: &ActivityEvent, key: &str) -> Vec<String> {
    let Some(raw) = &e.properties else {
        return Vec::new();
    };
    let v: serde_json::Value = serde_json::from_str(raw.get()).unwrap_or_default();
    match &v[key] {
        serde_json::Value::String(s) => vec![s.clone()],
        serde_json::Value::Array(a) => a
            .iter()
            .filter_map(|x| x.as_str().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    }
}

fn mean(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// DORA over `[from, to)` from the group's events (commits may predate `from`).
pub fn flow(events: &[&ActivityEvent], from: EventTime, to: EventTime, now: EventTime) -> Flow {
    let in_window = |t: EventTime| t >= from && t < to;
    let first = events
        .iter()
        .map(|e| e.timestamp)
        .filter(|t| in_window(*t))
        .min();
    let rate_ms = first.map_or(0, |t| {
        let start = EventTime(t.0.div_euclid(86_400_000) * 86_400_000).max(from);
        (to.min(now).0 - start.0).max(0)
    });
    let mut commit_time: HashMap<String, i64> = HashMap::new();
    for e in events.iter().filter(|e| e.kind == EventKind::Commit) {
        for sha in property_strings(e, "sha") {
            let t = commit_time.entry(sha).or_insert(e.timestamp.0);
            *t = (*t).min(e.timestamp.0);
        }
    }
    // First deploy of each change, among deploys in the window.
    let mut deploys = 0usize;
    let mut first_deploy: HashMap<String, i64> = HashMap::new();
    for e in events
        .iter()
        .filter(|e| e.kind == EventKind::Deploy && in_window(e.timestamp))
    {
        deploys += 1;
        for sha in property_strings(e, "commits") {
            let t = first_deploy.entry(sha).or_insert(e.timestamp.0);
            *t = (*t).min(e.timestamp.0);
        }
    }
    let lead: Vec<f64> = first_deploy
        .iter()
        .filter_map(|(sha, d)| commit_time.get(sha).map(|c| d - c))
        .filter(|l| *l > 0)
        .map(|l| l as f64 / 3_600_000.0)
        .collect();
    let incidents: Vec<&&ActivityEvent> = events
        .iter()
        .filter(|e| e.kind == EventKind::Incident)
        .collect();
    let id = |e: &ActivityEvent| {
        property_strings(e, "id")
            .pop()
            .or_else(|| e.event_id.map(|u| u.to_string()))
            .unwrap_or_default()
    };
    let mut opened: HashMap<String, i64> = HashMap::new();
    let mut resolved: HashMap<String, (i64, u64)> = HashMap::new();
    for e in &incidents {
        match e.attributes.status.as_deref() {
            Some("opened") => {
                let t = opened.entry(id(e)).or_insert(e.timestamp.0);
                *t = (*t).min(e.timestamp.0);
            }
            Some("resolved") => {
                resolved.insert(id(e), (e.timestamp.0, e.duration_ms));
            }
            _ => {}
        }
    }
    let restore: Vec<f64> = resolved
        .iter()
        .filter_map(|(id, &(at, duration))| {
            let start = opened
                .get(id)
                .copied()
                .or_else(|| (duration > 0).then(|| at - duration as i64))?;
            (in_window(EventTime(start)) && at > start).then(|| (at - start) as f64 / 3_600_000.0)
        })
        .collect();
    let failed: BTreeSet<String> = incidents
        .iter()
        .filter(|e| in_window(e.timestamp))
        .flat_map(|e| property_strings(e, "commits"))
        .filter(|sha| first_deploy.contains_key(sha))
        .collect();
    let weeks = rate_ms as f64 / (7.0 * 86_400_000.0);
    Flow {
        deploys,
        deployments_per_week: if weeks > 0.0 {
            deploys as f64 / weeks
        } else {
            0.0
        },
        rate_days: rate_ms as f64 / 86_400_000.0,
        deployed_changes: first_deploy.len(),
        lead_time_hours: mean(&lead),
        change_failure_rate: (!first_deploy.is_empty())
            .then(|| failed.len() as f64 / first_deploy.len() as f64),
        resolved_incidents: restore.len(),
        time_to_restore_hours: mean(&restore),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const H: i64 = 3_600_000;
    const T0: i64 = 1_795_000_000_000;

    fn ev(user: &str, kind: &str, hour: i64, extra: serde_json::Value) -> ActivityEvent {
        let mut v = json!({"user_id": user, "source": "t", "kind": kind,
                           "timestamp": T0 + hour * H});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        serde_json::from_value(v).unwrap()
    }

    /// A window longer than the data: the rate is over the days the data covers, from
    /// the first event's UTC day to the present.
    #[test]
    fn deployment_rate_is_over_the_days_the_data_covers() {
        // 2026-11-24T00:00Z; a deploy on each of two days, read with a 90-day window
        // ending tomorrow, on the second day at 18:00.
        let day0 = 1_795_478_400_000;
        let deploy = |at: i64| -> ActivityEvent {
            serde_json::from_value(json!({"user_id": "a", "source": "t", "kind": "deploy",
                "timestamp": at, "properties": {"commits": []}}))
            .unwrap()
        };
        let events = [deploy(day0 + 9 * H), deploy(day0 + 24 * H + 15 * H)];
        let refs: Vec<&ActivityEvent> = events.iter().collect();
        let to = EventTime(day0 + 48 * H);
        let from = EventTime(to.0 - 90 * 24 * H);
        let f = flow(&refs, from, to, EventTime(day0 + 42 * H));
        // 42 hours = 1.75 days: 2 deploys / 0.25 weeks.
        assert_eq!(
            (f.deploys, f.rate_days, f.deployments_per_week),
            (2, 1.75, 8.0)
        );
        // Nothing in the window: no rate.
        let f = flow(&[], from, to, EventTime(day0 + 42 * H));
        assert_eq!((f.rate_days, f.deployments_per_week), (0.0, 0.0));
    }

    #[test]
    fn dora_figures_follow_the_conventions() {
        let events = [
            ev("a", "commit", 0, json!({"properties": {"sha": "c1"}})),
            ev("a", "commit", 2, json!({"properties": {"sha": "c2"}})),
            ev("b", "commit", 10, json!({"properties": {"sha": "c3"}})),
            // c1 after 10 h, c2 after 8 h; c3 (committed at 10 h) after 14 h: mean 32/3.
            ev(
                "b",
                "deploy",
                10,
                json!({"properties": {"commits": ["c1", "c2"]}}),
            ),
            ev(
                "b",
                "deploy",
                24,
                json!({"properties": {"commits": ["c3", "c1"]}}),
            ),
            // c3 caused i1, resolved after 3 h; i2 is reported resolved with its 1 h
            // duration; i3 is still open.
            ev(
                "a",
                "incident",
                30,
                json!({"attributes": {"status": "opened"},
                "properties": {"id": "i1", "commits": ["c3"]}}),
            ),
            ev(
                "a",
                "incident",
                33,
                json!({"attributes": {"status": "resolved"},
                "properties": {"id": "i1"}}),
            ),
            ev(
                "a",
                "incident",
                41,
                json!({"duration_ms": H,
                "attributes": {"status": "resolved"}, "properties": {"id": "i2"}}),
            ),
            ev(
                "a",
                "incident",
                50,
                json!({"attributes": {"status": "opened"},
                "properties": {"id": "i3"}}),
            ),
        ];
        let refs: Vec<&ActivityEvent> = events.iter().collect();
        let f = flow(
            &refs,
            EventTime(T0),
            EventTime(T0 + 14 * 24 * H),
            EventTime(T0 + 30 * 24 * H),
        );
        assert_eq!(
            f,
            Flow {
                deploys: 2,
                deployments_per_week: 1.0,
                rate_days: 14.0,
                deployed_changes: 3,
                lead_time_hours: Some(32.0 / 3.0),
                change_failure_rate: Some(1.0 / 3.0),
                resolved_incidents: 2,
                time_to_restore_hours: Some(2.0),
            }
        );
    }

    #[test]
    fn the_network_counts_meaningful_collaborators_and_other_teams() {
        let meeting = |with: &[&str]| {
            ev(
                "m1",
                "meeting",
                1,
                json!({"attributes": {"participants": with}}),
            )
        };
        let chat = |to: &str| {
            ev(
                "m1",
                "message",
                1,
                json!({"attributes": {"participants": [to]}}),
            )
        };
        let events = vec![
            meeting(&["x1", "m2"]),
            meeting(&["x1", "ext:9"]),
            chat("y1"),
            chat("y1"),
            chat("y1"),
            chat("y1"),
            chat("y1"),
            chat("y1"),
            // Two chats with z1: 2/3, not enough.
            chat("z1"),
            chat("z1"),
        ];
        let team_of: HashMap<String, String> = [
            ("m1", "core"),
            ("m2", "core"),
            ("x1", "infra"),
            ("y1", "sales"),
            ("z1", "infra"),
        ]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        let members = vec![("m1".to_string(), events), ("m2".to_string(), vec![])];
        let n = network("core", &members, &team_of);
        // m1: x1 (2 meetings), y1 (6 chats = 2) → 2 collaborators in 2 other teams; m2 has
        // no interactions of their own.
        assert_eq!(n.members_with_data, 1);
        // Both members count: m2's 0 halves the mean.
        assert_eq!(
            n.network_size,
            Stats {
                n: 2,
                sum: 2.0,
                mean: 1.0
            }
        );
        assert_eq!(n.cross_team_breadth.sum, 2.0);
        let names: Vec<&str> = n.nodes.iter().map(|x| x.name.as_str()).collect();
        assert_eq!(names, ["core", "external", "infra", "sales"]);
        let weights: Vec<f64> = n.links.iter().map(|l| l.value).collect();
        // external 1; infra 2 + 2/3; sales 2.
        assert_eq!(weights[0], 1.0);
        assert!((weights[1] - 8.0 / 3.0).abs() < 1e-9);
        assert!((weights[2] - 2.0).abs() < 1e-9);
    }
}
