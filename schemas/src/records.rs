//! Derived records: what the pipelines write and the query layer reads besides raw events.
//!
//! Each record has a deterministic key so that sinks can upsert: a replay that writes the
//! same key again replaces, never adds. Readers keep, per key, the row with the highest
//! `revision`.

use std::borrow::Cow;
use std::sync::Arc;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::time::EventTime;

/// Version of the feature definitions written by this build; part of every feature key so
/// that a changed definition never overwrites or mixes with rows of the old one.
pub const FEATURE_VERSION: u32 = 1;

/// Window size of a feature row; a week runs from local Monday 00:00 to the next.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Granularity {
    Hour,
    Day,
    Week,
}

impl Granularity {
    pub fn as_str(self) -> &'static str {
        match self {
            Granularity::Hour => "hour",
            Granularity::Day => "day",
            Granularity::Week => "week",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "hour" => Some(Granularity::Hour),
            "day" => Some(Granularity::Day),
            "week" => Some(Granularity::Week),
            _ => None,
        }
    }
}

/// One feature value of one person in one window, identified by [`FeatureRow::KEY`];
/// of the rows with one key, the highest [`FeatureRow::VERSION`] is the value.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct FeatureRow {
    /// Shared: one person's rows all carry the same tenant, user and zone, so a row
    /// costs no allocation for them.
    pub tenant_id: Arc<str>,
    pub user_id: Arc<str>,
    pub granularity: Granularity,
    /// Start of the window (inclusive), UTC.
    pub window_start: EventTime,
    /// End of the window (exclusive), UTC. Local days can be 23 or 25 hours long.
    pub window_end: EventTime,
    /// IANA time zone the window boundaries were computed in.
    pub timezone: Arc<str>,
    /// Feature name, e.g. `active_seconds`, `context_switches`.
    pub feature: Cow<'static, str>,
    /// Breakdown value (`app`, `category`, switch type, event kind); empty for the total.
    pub dimension: String,
    pub value: f64,
    pub feature_version: u32,
    /// Fingerprint of the tenant settings and person profile the value was computed with
    /// ([`crate::params_version`]); 0 in rows written before parameters existed.
    #[serde(default)]
    pub params_version: u64,
    /// Whether the person's newest event time or the wall clock has passed the window end
    /// plus the allowed lateness. Final windows are not expected to change, but a late
    /// event still revises them (see `final_revision`).
    pub is_final: bool,
    /// Monotonic per key; readers keep the highest. Revisions are the wall clock of the
    /// emit in microseconds (or just after the previous one), so they also say when the
    /// value was written.
    pub revision: i64,
    /// The revision at which the window was first marked final; 0 while provisional. A row
    /// with `revision > final_revision` revises a window that was already final (a late
    /// event reopened it).
    #[serde(default)]
    pub final_revision: i64,
}

impl FeatureRow {
    /// The columns identifying one feature value: ClickHouse's sorting (and replacing)
    /// key, and the embedded store's deduplication key (less `tenant_id`, which is the
    /// directory there). The one definition of the fact.
    pub const KEY: &'static [&'static str] = &[
        "tenant_id",
        "user_id",
        "granularity",
        "window_start",
        "feature",
        "dimension",
        "feature_version",
    ];
    /// The column whose highest value wins among rows with one key.
    pub const VERSION: &'static str = "revision";
}

/// A rejected or too-late event, kept with the reason.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DeadLetter {
    pub tenant_id: String,
    /// When it was rejected.
    pub rejected_at: EventTime,
    /// Which stage rejected it: `ingest` or `pipeline`.
    pub stage: String,
    /// Machine-readable reason class: `invalid`, `too_late`, `undecodable`.
    pub reason_code: String,
    /// What was wrong and how to fix it.
    pub reason: String,
    /// Position of the event in its request (ingest), or -1.
    pub request_index: i64,
    /// Event id, when it could be read.
    pub event_id: Option<String>,
    pub user_id: Option<String>,
    /// The event as received (truncated to 64 KiB).
    pub payload: String,
}

/// A detector's finding about one person's feature in one window. Key: (`tenant_id`,
/// `user_id`, `detector`, `feature`, `window_start`); the highest `revision` wins.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AnomalyRow {
    pub tenant_id: String,
    pub user_id: String,
    /// Detector name and version, e.g. `robust_z@1`.
    pub detector: String,
    pub feature: String,
    pub window_start: EventTime,
    pub window_end: EventTime,
    /// The observed value.
    pub value: f64,
    /// What the detector expected.
    pub expected: f64,
    /// Detector-specific score; higher is more unusual.
    pub score: f64,
    /// Whether the score crossed the detector's threshold.
    pub is_anomaly: bool,
    pub detected_at: EventTime,
    pub revision: i64,
}

/// A model's prediction for one person over a future window. Key: (`tenant_id`,
/// `user_id`, `model`, `target`, `horizon_start`); the highest `revision` wins.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PredictionRow {
    pub tenant_id: String,
    pub user_id: String,
    /// Model name and version.
    pub model: String,
    /// What is predicted, e.g. a feature name.
    pub target: String,
    pub horizon_start: EventTime,
    pub horizon_end: EventTime,
    pub value: f64,
    /// Lower and upper bounds of the prediction interval.
    pub lower: f64,
    pub upper: f64,
    pub predicted_at: EventTime,
    pub revision: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn granularity_parses_its_own_names() {
        for g in [Granularity::Hour, Granularity::Day, Granularity::Week] {
            assert_eq!(Granularity::parse(g.as_str()), Some(g));
        }
        assert_eq!(Granularity::parse("month"), None);
    }
}
