//! Work styles: person-weeks clustered over a vector of behavioural shares, with the
//! number of clusters chosen by a stated criterion and outliers flagged.
//!
//! - **Vector.** Each complete person-week (local Monday to Sunday, from final day
//!   windows; see [`person_weeks`] for what makes a week complete) becomes
//!   [`STYLE_FEATURES`]: hours active per active day and the shares of active or present
//!   time spent in meetings, communication, development, deep work, after hours,
//!   distraction and multitasking, plus context switches per active hour. Weeks without
//!   active time are left out. Columns are standardised (z-scores) before clustering, so
//!   no unit dominates.
//! - **k.** k-means (smartcore) for every k in 2…8 (at most n−1), the best of several
//!   seeded runs by inertia; the k with the highest mean **silhouette coefficient** wins.
//! - **Outliers.** DBSCAN (smartcore) with `min_samples` = dimensions + 1 and `eps` the
//!   90th percentile of each point's distance to its `min_samples`-th nearest neighbour;
//!   its noise points are the outliers (a week unlike any dense group of weeks).
//! - **Words.** Each cluster is described by the features whose cluster mean lies at
//!   least half a standard deviation from the overall mean, strongest first, and named
//!   after the strongest one.

use std::collections::BTreeMap;

use serde::Serialize;
use smartcore::cluster::dbscan::{DBSCAN, DBSCANParameters};
use smartcore::cluster::kmeans::{KMeans, KMeansParameters};
use smartcore::linalg::basic::matrix::DenseMatrix;

use digame_schemas::{EventTime, TimeRange};

use crate::FeatureWindow;

/// The vector's components: name, and the words for a high and a low value.
pub const STYLE_FEATURES: [(&str, &str, &str); 9] = [
    ("active_hours_per_day", "long days", "short days"),
    ("meeting_share", "meeting-heavy", "few meetings"),
    (
        "communication_share",
        "chat and mail heavy",
        "little chat and mail",
    ),
    (
        "development_share",
        "development-focused",
        "little development",
    ),
    ("deep_work_share", "deep focus", "little deep work"),
    ("switches_per_hour", "fragmented", "steady"),
    ("after_hours_share", "after-hours", "within hours"),
    ("distraction_share", "distracted", "undistracted"),
    ("multitasking_share", "multitasking", "single-tasking"),
];
const DIM: usize = STYLE_FEATURES.len();
const K_RANGE: std::ops::RangeInclusive<usize> = 2..=8;
const SEEDS: u64 = 5;

/// One person-week's vector.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PersonWeek {
    pub user: String,
    /// Local date of the week's Monday.
    pub week: String,
    pub vector: [f64; DIM],
}

fn value(w: &FeatureWindow, feature: &str) -> f64 {
    w.features
        .get(feature)
        .and_then(|v| v.as_f64())
        .unwrap_or(0.0)
}

fn breakdown(w: &FeatureWindow, feature: &str, pick: impl Fn(&str) -> bool) -> f64 {
    w.breakdowns
        .get(feature)
        .and_then(|d| d.as_object())
        .map(|d| {
            d.iter()
                .filter(|(k, _)| pick(k))
                .filter_map(|(_, v)| v.as_f64())
                .sum()
        })
        .unwrap_or(0.0)
}

/// The day features [`person_weeks`] reads, so a caller can fetch only those.
pub const WEEK_INPUTS: &[&str] = &[
    "active_seconds",
    "presence_seconds",
    "meeting_seconds",
    "active_seconds_by_category",
    "deep_work_seconds",
    "context_switches",
    "after_hours_active_seconds",
    "active_seconds_by_level",
    "multitasking_seconds",
];

/// A person's complete weeks from their final day windows, `span` being the range the
/// windows were read for with its end no later than the present.
///
/// A week is a local Monday-to-Sunday in the person's time zone, and it is clustered only
/// when it is complete: all seven of its days have ended by `span.to`, and none lies
/// before `span.from` or before the person's first day with data. A week the range or the
/// data cuts is left out, because what is left of it is not the person's week: a lone
/// weekend day reads as pure after-hours work, a Monday alone as a short week. A day still
/// in progress is never read either (a night owl's day cut at noon is not yet theirs).
pub fn person_weeks(user: &str, days: &[FeatureWindow], span: TimeRange) -> Vec<PersonWeek> {
    use chrono::Datelike;
    let local = |w: &FeatureWindow| {
        let tz: chrono_tz::Tz = w.timezone.parse().unwrap_or(chrono_tz::UTC);
        let date = chrono::DateTime::from_timestamp_millis(w.window_start.0)
            .map(|t| t.with_timezone(&tz).date_naive())?;
        Some((tz, date))
    };
    let finals: Vec<_> = days
        .iter()
        .filter(|w| w.is_final)
        .filter_map(|w| Some((w, local(w)?)))
        .collect();
    // The complete weeks' Mondays lie in [first_monday, end_monday).
    let Some(&(_, (tz, first_day))) = finals.iter().min_by_key(|(_, (_, d))| *d) else {
        return Vec::new();
    };
    let date_at = |t: EventTime| {
        chrono::DateTime::from_timestamp_millis(t.0).map(|t| t.with_timezone(&tz).date_naive())
    };
    let (Some(from_date), Some(to_date)) = (date_at(span.from), date_at(span.to)) else {
        return Vec::new();
    };
    // The first whole day of the span: `from`'s own day unless `from` is its midnight.
    let from_day = if date_at(EventTime(span.from.0 - 1)) == Some(from_date) {
        from_date.succ_opt().unwrap_or(from_date)
    } else {
        from_date
    };
    let monday_of =
        |d: chrono::NaiveDate| d - chrono::Days::new(u64::from(d.weekday().num_days_from_monday()));
    let start = from_day.max(first_day);
    let first_monday = if start.weekday() == chrono::Weekday::Mon {
        start
    } else {
        monday_of(start) + chrono::Days::new(7)
    };
    // `to`'s own day has not ended (unless `to` is its midnight, when it has not begun).
    let end_monday = monday_of(to_date);
    let mut weeks: BTreeMap<chrono::NaiveDate, [f64; 12]> = BTreeMap::new();
    for (w, (_, date)) in finals {
        let monday = monday_of(date);
        if monday < first_monday || monday >= end_monday {
            continue;
        }
        let s = weeks.entry(monday).or_default();
        let active = value(w, "active_seconds");
        s[0] += active;
        s[1] += f64::from(u8::from(active > 0.0));
        s[2] += value(w, "presence_seconds");
        s[3] += value(w, "meeting_seconds");
        s[4] += breakdown(w, "active_seconds_by_category", |c| c == "communication");
        s[5] += breakdown(w, "active_seconds_by_category", |c| c == "development");
        s[6] += value(w, "deep_work_seconds");
        s[7] += value(w, "context_switches");
        s[8] += value(w, "after_hours_active_seconds");
        s[9] += breakdown(w, "active_seconds_by_level", |l| l.starts_with('-'));
        s[10] += value(w, "multitasking_seconds");
    }
    weeks
        .into_iter()
        .filter(|(_, s)| s[0] > 0.0)
        .map(|(week, s)| {
            let active = s[0];
            let present = s[2].max(active);
            PersonWeek {
                user: user.into(),
                week: week.to_string(),
                vector: [
                    active / s[1] / 3600.0,
                    s[3] / present,
                    s[4] / active,
                    s[5] / active,
                    s[6] / active,
                    s[7] / (active / 3600.0),
                    s[8] / active,
                    s[9] / active,
                    s[10] / active,
                ],
            }
        })
        .collect()
}

/// One cluster, described.
#[derive(Clone, Debug, Serialize)]
pub struct Cluster {
    pub id: usize,
    pub name: String,
    pub description: String,
    pub size: usize,
    /// Mean z-score of each feature in the cluster.
    pub profile: BTreeMap<&'static str, f64>,
}

/// Where one person-week landed.
#[derive(Clone, Debug, Serialize)]
pub struct Assignment {
    pub user: String,
    pub week: String,
    pub cluster: usize,
    pub outlier: bool,
}

/// The clustering of a set of person-weeks.
#[derive(Clone, Debug, Serialize)]
pub struct StyleModel {
    pub k: usize,
    pub criterion: &'static str,
    /// Mean silhouette of the best k-means run per k tried.
    pub silhouette_by_k: Vec<(usize, f64)>,
    pub clusters: Vec<Cluster>,
    pub assignments: Vec<Assignment>,
    pub dbscan_eps: f64,
}

fn distance(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y) * (x - y))
        .sum::<f64>()
        .sqrt()
}

/// Mean silhouette coefficient of `labels` over `x` (0 when every point is alone).
pub fn silhouette(x: &[Vec<f64>], labels: &[usize]) -> f64 {
    let n = x.len();
    let k = labels.iter().max().map_or(0, |m| m + 1);
    let mut total = 0.0;
    for i in 0..n {
        let mut sums = vec![0.0; k];
        let mut counts = vec![0usize; k];
        for j in 0..n {
            if i != j {
                sums[labels[j]] += distance(&x[i], &x[j]);
                counts[labels[j]] += 1;
            }
        }
        let own = labels[i];
        if counts[own] == 0 {
            continue; // a singleton scores 0
        }
        let a = sums[own] / counts[own] as f64;
        let b = (0..k)
            .filter(|&c| c != own && counts[c] > 0)
            .map(|c| sums[c] / counts[c] as f64)
            .fold(f64::INFINITY, f64::min);
        if b.is_finite() {
            total += (b - a) / a.max(b);
        }
    }
    total / n as f64
}

/// Adjusted Rand index of two labelings of the same items (1 = identical partitions,
/// about 0 = chance).
pub fn adjusted_rand_index(a: &[usize], b: &[usize]) -> f64 {
    let pairs = |n: f64| n * (n - 1.0) / 2.0;
    let mut table: BTreeMap<(usize, usize), f64> = BTreeMap::new();
    let mut rows: BTreeMap<usize, f64> = BTreeMap::new();
    let mut cols: BTreeMap<usize, f64> = BTreeMap::new();
    for (&x, &y) in a.iter().zip(b) {
        *table.entry((x, y)).or_default() += 1.0;
        *rows.entry(x).or_default() += 1.0;
        *cols.entry(y).or_default() += 1.0;
    }
    let index: f64 = table.values().map(|&n| pairs(n)).sum();
    let sum_rows: f64 = rows.values().map(|&n| pairs(n)).sum();
    let sum_cols: f64 = cols.values().map(|&n| pairs(n)).sum();
    let expected = sum_rows * sum_cols / pairs(a.len() as f64);
    let max = (sum_rows + sum_cols) / 2.0;
    if max == expected {
        return 1.0;
    }
    (index - expected) / (max - expected)
}

/// Standardises columns to z-scores (a constant column becomes 0).
fn standardise(weeks: &[PersonWeek]) -> Vec<Vec<f64>> {
    let n = weeks.len() as f64;
    let mut mean = [0.0; DIM];
    let mut sd = [0.0; DIM];
    for w in weeks {
        for (m, v) in mean.iter_mut().zip(&w.vector) {
            *m += v / n;
        }
    }
    for w in weeks {
        for ((s, v), m) in sd.iter_mut().zip(&w.vector).zip(&mean) {
            *s += (v - m).powi(2) / n;
        }
    }
    weeks
        .iter()
        .map(|w| {
            (0..DIM)
                .map(|d| {
                    let s = sd[d].sqrt();
                    if s > 1e-12 {
                        (w.vector[d] - mean[d]) / s
                    } else {
                        0.0
                    }
                })
                .collect()
        })
        .collect()
}

fn matrix(x: &[Vec<f64>]) -> Result<DenseMatrix<f64>, String> {
    DenseMatrix::from_2d_vec(&x.to_vec()).map_err(|e| format!("building the matrix: {e}"))
}

/// The best of several seeded k-means runs (lowest inertia).
fn kmeans(x: &[Vec<f64>], m: &DenseMatrix<f64>, k: usize) -> Result<Vec<usize>, String> {
    let mut best: Option<(f64, Vec<usize>)> = None;
    for seed in 0..SEEDS {
        let mut params = KMeansParameters::default().with_k(k).with_max_iter(200);
        params.seed = Some(seed);
        let model: KMeans<f64, usize, DenseMatrix<f64>, Vec<usize>> =
            KMeans::fit(m, params).map_err(|e| format!("k-means: {e}"))?;
        let labels = model.predict(m).map_err(|e| format!("k-means: {e}"))?;
        let mut centroids = vec![vec![0.0; DIM]; k];
        let mut counts = vec![0.0; k];
        for (row, &l) in x.iter().zip(&labels) {
            counts[l] += 1.0;
            for d in 0..DIM {
                centroids[l][d] += row[d];
            }
        }
        for (c, n) in centroids.iter_mut().zip(&counts) {
            c.iter_mut().for_each(|v| *v /= f64::max(*n, 1.0));
        }
        let inertia: f64 = x
            .iter()
            .zip(&labels)
            .map(|(row, &l)| distance(row, &centroids[l]).powi(2))
            .sum();
        if best.as_ref().is_none_or(|(i, _)| inertia < *i) {
            best = Some((inertia, labels));
        }
    }
    Ok(best.expect("at least one seed").1)
}

/// DBSCAN noise points, with the `eps` used.
fn outliers(x: &[Vec<f64>], m: &DenseMatrix<f64>) -> Result<(Vec<bool>, f64), String> {
    let min_samples = (DIM + 1).min(x.len().saturating_sub(1)).max(2);
    let mut kth: Vec<f64> = x
        .iter()
        .map(|a| {
            let mut d: Vec<f64> = x.iter().map(|b| distance(a, b)).collect();
            d.sort_by(f64::total_cmp);
            d[min_samples.min(d.len() - 1)]
        })
        .collect();
    kth.sort_by(f64::total_cmp);
    let eps = crate::groups::percentile(&kth, 0.9).max(1e-9);
    let model: DBSCAN<f64, i32, DenseMatrix<f64>, Vec<i32>, _> = DBSCAN::fit(
        m,
        DBSCANParameters::default()
            .with_eps(eps)
            .with_min_samples(min_samples),
    )
    .map_err(|e| format!("DBSCAN: {e}"))?;
    let labels = model.predict(m).map_err(|e| format!("DBSCAN: {e}"))?;
    // smartcore labels a point by the majority of its eps-neighbourhood: 0 is noise.
    Ok((labels.iter().map(|&l| l == 0).collect(), eps))
}

/// Clusters `weeks`; needs at least 3 of them.
pub fn cluster(weeks: &[PersonWeek]) -> Result<StyleModel, String> {
    if weeks.len() < 3 {
        return Err(format!(
            "{} complete person-weeks with activity in the range; clustering needs at least 3 (a week counts once its local Monday to Sunday has ended, after the person's first day with data): widen from/to or wait for more data",
            weeks.len()
        ));
    }
    let x = standardise(weeks);
    let m = matrix(&x)?;
    let mut silhouette_by_k = Vec::new();
    let mut best: Option<(f64, usize, Vec<usize>)> = None;
    for k in K_RANGE.filter(|&k| k < weeks.len()) {
        let labels = kmeans(&x, &m, k)?;
        let s = silhouette(&x, &labels);
        silhouette_by_k.push((k, s));
        if best.as_ref().is_none_or(|(bs, _, _)| s > *bs) {
            best = Some((s, k, labels));
        }
    }
    let (_, k, labels) = best.expect("k = 2 always tried");
    let (outlier, dbscan_eps) = outliers(&x, &m)?;
    let clusters = (0..k)
        .map(|c| {
            let members: Vec<&Vec<f64>> = x
                .iter()
                .zip(&labels)
                .filter(|(_, l)| **l == c)
                .map(|(r, _)| r)
                .collect();
            let n = members.len().max(1) as f64;
            let mut profile = BTreeMap::new();
            let mut ranked: Vec<(usize, f64)> = (0..DIM)
                .map(|d| (d, members.iter().map(|r| r[d]).sum::<f64>() / n))
                .collect();
            for &(d, z) in &ranked {
                profile.insert(STYLE_FEATURES[d].0, z);
            }
            ranked.sort_by(|a, b| b.1.abs().total_cmp(&a.1.abs()));
            let words: Vec<String> = ranked
                .iter()
                .filter(|(_, z)| z.abs() >= 0.5)
                .take(3)
                .map(|&(d, z)| {
                    let (_, high, low) = STYLE_FEATURES[d];
                    format!("{} ({z:+.1} SD)", if z > 0.0 { high } else { low })
                })
                .collect();
            let name = ranked
                .first()
                .filter(|(_, z)| z.abs() >= 0.5)
                .map(|&(d, z)| {
                    let (_, high, low) = STYLE_FEATURES[d];
                    if z > 0.0 { high } else { low }.to_string()
                })
                .unwrap_or_else(|| "typical".into());
            Cluster {
                id: c,
                name,
                description: if words.is_empty() {
                    "close to the overall average on every feature".into()
                } else {
                    words.join(", ")
                },
                size: members.len(),
                profile,
            }
        })
        .collect();
    let assignments = weeks
        .iter()
        .zip(&labels)
        .zip(&outlier)
        .map(|((w, &c), &o)| Assignment {
            user: w.user.clone(),
            week: w.week.clone(),
            cluster: c,
            outlier: o,
        })
        .collect();
    Ok(StyleModel {
        k,
        criterion: "highest mean silhouette coefficient over k = 2..8 (k-means, best of 5 seeds by inertia)",
        silhouette_by_k,
        clusters,
        assignments,
        dbscan_eps,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adjusted_rand_index_matches_hand_computed_values() {
        assert_eq!(adjusted_rand_index(&[0, 0, 1, 1], &[5, 5, 7, 7]), 1.0);
        // Contingency [[1,1],[1,1]]: index 0, expected 2·2/6 = 2/3, max 2 → −0.5.
        let ari = adjusted_rand_index(&[0, 0, 1, 1], &[0, 1, 0, 1]);
        assert!((ari + 0.5).abs() < 1e-12, "{ari}");
    }

    /// A final day window of `zone` for the local date `ymd`, with an hour of activity.
    fn day(zone: &str, ymd: (i32, u32, u32)) -> FeatureWindow {
        use chrono::TimeZone;
        let tz: chrono_tz::Tz = zone.parse().unwrap();
        let date = chrono::NaiveDate::from_ymd_opt(ymd.0, ymd.1, ymd.2).unwrap();
        let start = tz
            .from_local_datetime(&date.and_hms_opt(0, 0, 0).unwrap())
            .unwrap()
            .timestamp_millis();
        let mut features = serde_json::Map::new();
        features.insert("active_seconds".into(), 3600.0.into());
        FeatureWindow {
            window_start: EventTime(start),
            window_end: EventTime(start + 86_400_000),
            timezone: zone.into(),
            is_final: true,
            finality: crate::Finality::default(),
            features,
            breakdowns: serde_json::Map::new(),
        }
    }

    fn at(rfc3339: &str) -> EventTime {
        EventTime(
            chrono::DateTime::parse_from_rfc3339(rfc3339)
                .unwrap()
                .timestamp_millis(),
        )
    }

    fn weeks_of(days: &[FeatureWindow], from: &str, to: &str) -> Vec<String> {
        let span = TimeRange::new(at(from), at(to)).unwrap();
        person_weeks("u", days, span)
            .into_iter()
            .map(|w| w.week)
            .collect()
    }

    #[test]
    fn only_complete_weeks_are_clustered() {
        // Kolkata (UTC+05:30). 2026-11-07 is a Saturday; data every day to Friday 12-04.
        use chrono::Datelike;
        let zone = "Asia/Kolkata";
        let dates: Vec<chrono::NaiveDate> = chrono::NaiveDate::from_ymd_opt(2026, 11, 7)
            .unwrap()
            .iter_days()
            .take(28)
            .collect();
        let windows = |keep: &dyn Fn(usize) -> bool| -> Vec<FeatureWindow> {
            (dates.iter().enumerate())
                .filter(|(i, _)| keep(*i))
                .map(|(_, d)| day(zone, (d.year(), d.month(), d.day())))
                .collect()
        };
        let days = windows(&|_| true);
        // Read up to Saturday 12-05 10:00 local: the weeks of 11-09, 11-16 and 11-23 are
        // whole; 11-07..08 (the data's start) and 11-30..12-04 (Sunday 12-06 has not
        // ended) are cut.
        let weeks = weeks_of(&days, "2026-10-01T00:00:00Z", "2026-12-05T04:30:00Z");
        assert_eq!(weeks, ["2026-11-09", "2026-11-16", "2026-11-23"]);
        // Once Sunday 12-06 has ended in Kolkata (18:30Z), the week of 11-30 is complete.
        let weeks = weeks_of(&days, "2026-10-01T00:00:00Z", "2026-12-06T18:30:00Z");
        assert_eq!(weeks.last().map(String::as_str), Some("2026-11-30"));
        let weeks = weeks_of(&days, "2026-10-01T00:00:00Z", "2026-12-06T18:29:59Z");
        assert_eq!(weeks.last().map(String::as_str), Some("2026-11-23"));
        // A range starting at Monday 11-16's local midnight keeps that week; a moment later
        // cuts it.
        let to = "2026-12-05T04:30:00Z";
        assert_eq!(
            weeks_of(&days, "2026-11-15T18:30:00Z", to),
            ["2026-11-16", "2026-11-23"]
        );
        assert_eq!(weeks_of(&days, "2026-11-15T18:30:01Z", to), ["2026-11-23"]);
        // The data's first day decides too: from a lone Sunday 11-08, its week is cut.
        let weeks = weeks_of(&days[1..], "2026-10-01T00:00:00Z", to);
        assert_eq!(weeks.first().map(String::as_str), Some("2026-11-09"));
        // A week in the middle with one day of data is still a complete week.
        let sparse = windows(&|i| !(10..16).contains(&i));
        assert_eq!(weeks_of(&sparse, "2026-10-01T00:00:00Z", to).len(), 3);
    }

    #[test]
    fn silhouette_of_two_tight_far_groups_is_near_one() {
        let x = vec![
            vec![0.0, 0.0],
            vec![0.0, 1.0],
            vec![10.0, 0.0],
            vec![10.0, 1.0],
        ];
        // a = 1, b = mean(10, √101) ≈ 10.0249 → s = 1 − 1/10.0249 for every point.
        let b = (10.0 + 101f64.sqrt()) / 2.0;
        let want = 1.0 - 1.0 / b;
        assert!((silhouette(&x, &[0, 0, 1, 1]) - want).abs() < 1e-12);
    }
}
