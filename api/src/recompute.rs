//! Recomputation (backfill): after rules or profiles change, the features of a chosen
//! range are computed again from the stored raw events with the current parameters, as a
//! background job with progress.
//!
//! How a job works, person by person (so memory is bounded by one person's range):
//! 1. read the person's events from `from − 35 days` (the warm-up rolling 28-day and
//!    4-week features need) to `to + 8 days` (so a window that starts before `to` and
//!    ends after it, a local day or week, is computed from all its events, never cut at
//!    `to`), in event-time order;
//! 2. replay them through a fresh feature processor with the current settings and
//!    profiles, using each event's own time as the clock (so windows close as they did
//!    live), and emit once more at the real time;
//! 3. keep the rows whose window starts in `[from, to)`; write zeros for values the store
//!    holds in that range that the new computation no longer produces (the retraction
//!    convention of the live pipeline);
//! 4. write them with revisions newer than anything written before the job started, so
//!    they supersede the old rows in every reader, then publish them on the features
//!    stream like the pipeline's own rows, so every API node's read cache takes them in
//!    (a job whose publish fails is failed: its rows are stored, and running it again
//!    publishes them).
//!
//! Jobs run one at a time per server; their state and progress (people done of people
//! total) are in the metadata store. A job interrupted by a restart is marked failed at
//! the next start, to be submitted again.

use std::collections::BTreeSet;
use std::sync::Arc;

use digame_infra::bus::{EventBus, Topic};
use digame_infra::config::PipelineConfig;
use digame_infra::meta::{JobState, MetaStore};
use digame_infra::store::{StoreBatch, StoreSink};
use digame_pipelines::Processor;
use digame_pipelines::directory::Directory;
use digame_pipelines::runtime::{EventHistory, apply_changes};
use digame_query::QueryEngine;
use digame_schemas::{EventTime, FeatureRow, Granularity};
use serde::{Deserialize, Serialize};

/// Days of events read before `from`.
pub const WARMUP_DAYS: i64 = 35;
/// Days of events read after `to`: the longest window (a local week, an hour more across
/// a daylight-saving change) that starts before `to` ends within them.
pub const TRAILING_DAYS: i64 = 8;
/// Longest range one job recomputes.
pub const MAX_RANGE_DAYS: i64 = 366;
/// Most events of one person one job reads.
pub const MAX_EVENTS_PER_PERSON: usize = 5_000_000;
const DAY_MS: i64 = 86_400_000;
/// Rows per store write.
const WRITE_CHUNK: usize = 50_000;
/// Memory one event takes while a read holds it (its row, decoded and as an event), for
/// sizing the people read at once.
const READ_BYTES_PER_EVENT: u64 = 2048;

/// `items` cut into runs, in order, each of total `size` at most `budget` (an item larger
/// than `budget` is a run alone).
fn cut_runs<T>(items: &[T], size: impl Fn(&T) -> u64, budget: u64) -> Vec<&[T]> {
    let mut runs = Vec::new();
    let (mut start, mut held) = (0, 0u64);
    for (i, item) in items.iter().enumerate() {
        let n = size(item);
        if i > start && held + n > budget {
            runs.push(&items[start..i]);
            (start, held) = (i, 0);
        }
        held += n;
    }
    if start < items.len() {
        runs.push(&items[start..]);
    }
    runs
}

/// The stored raw events, as the live pipeline reads them to reopen days no longer in its
/// memory.
pub struct StoredEvents(pub Arc<QueryEngine>);

/// Most events one reopening read takes (a few days of one person).
const MAX_REOPEN_EVENTS: usize = 5_000_000;

#[async_trait::async_trait]
impl EventHistory for StoredEvents {
    async fn person_events(
        &self,
        tenant: &str,
        user: &str,
        from: i64,
        to: i64,
    ) -> Result<Vec<digame_schemas::ActivityEvent>, String> {
        self.0
            .person_events(
                tenant,
                user,
                EventTime(from),
                EventTime(to),
                MAX_REOPEN_EVENTS,
            )
            .await
            .map_err(|e| e.to_string())
    }

    async fn people(&self, from: i64, to: i64) -> Result<Vec<(String, String)>, String> {
        let mut people = Vec::new();
        for tenant in self.0.event_tenants().await.map_err(|e| e.to_string())? {
            let users = self
                .0
                .event_users(&tenant, EventTime(from), EventTime(to))
                .await
                .map_err(|e| e.to_string())?;
            people.extend(users.into_iter().map(|u| (tenant.clone(), u)));
        }
        Ok(people)
    }
}

/// What to recompute.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecomputeSpec {
    pub from: EventTime,
    pub to: EventTime,
    /// Only these people (default: everyone with events in the range).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub users: Option<Vec<String>>,
}

impl RecomputeSpec {
    /// Checks the range; the error says what to send instead.
    pub fn validate(&self) -> Result<(), String> {
        if self.to <= self.from {
            return Err(format!(
                "`to` ({}) must be after `from` ({})",
                self.to, self.from
            ));
        }
        if self.to.0 - self.from.0 > MAX_RANGE_DAYS * DAY_MS {
            return Err(format!(
                "the range spans more than {MAX_RANGE_DAYS} days; split it into several jobs"
            ));
        }
        if let Some(users) = &self.users {
            if users.is_empty() {
                return Err("`users` is empty; leave it out to recompute everyone".into());
            }
            for u in users {
                digame_schemas::validate::validate_user_id(u).map_err(|e| format!("users: {e}"))?;
            }
        }
        Ok(())
    }
}

/// What a finished job did.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RecomputeReport {
    pub people: usize,
    pub events_read: usize,
    pub rows_written: usize,
    /// Zeros written for values no longer produced.
    pub rows_retracted: usize,
}

impl RecomputeReport {
    /// Adds this report's counts to `total`.
    fn add_to(&self, total: &mut RecomputeReport) {
        total.people += self.people;
        total.events_read += self.events_read;
        total.rows_written += self.rows_written;
        total.rows_retracted += self.rows_retracted;
    }
}

/// Everything a job needs.
#[derive(Clone)]
pub struct Recomputer {
    pub query: Arc<QueryEngine>,
    pub store: Arc<dyn StoreSink>,
    /// Where the rows go after the store: the features stream.
    pub bus: Arc<dyn EventBus>,
    pub meta: MetaStore,
    pub pipeline: PipelineConfig,
    /// The longest tenant horizon (days), for the replay's state.
    pub horizon_days: u32,
}

impl Recomputer {
    /// Runs job `job_id` of `tenant` to the end, recording progress and the outcome.
    pub async fn run_job(&self, tenant: &str, job_id: &str, spec: &RecomputeSpec) {
        let result = self.run(tenant, spec, Some(job_id)).await;
        let (state, message) = match &result {
            Ok(r) => (
                JobState::Succeeded,
                serde_json::to_string(r).expect("reports serialize"),
            ),
            Err(e) => (JobState::Failed, e.to_string()),
        };
        let (done, total) = match &result {
            Ok(r) => (r.people as i64, r.people as i64),
            Err(_) => (-1, -1),
        };
        if let Err(e) = self
            .finish(tenant, job_id, state, done, total, &message)
            .await
        {
            tracing::error!(job_id, error = %e, "could not record the end of a recompute job");
        }
        match result {
            Ok(r) => tracing::info!(tenant, job_id, ?r, "recompute finished"),
            Err(e) => tracing::warn!(tenant, job_id, error = %e, "recompute failed"),
        }
    }

    async fn finish(
        &self,
        tenant: &str,
        job_id: &str,
        state: JobState,
        done: i64,
        total: i64,
        message: &str,
    ) -> anyhow::Result<()> {
        // A failed job keeps the progress it had reached.
        let (done, total) = if done < 0 {
            let job = self.meta.job(tenant, job_id).await?;
            job.map_or((0, 0), |j| (j.done, j.total))
        } else {
            (done, total)
        };
        self.meta
            .update_job(job_id, state, done, total, message)
            .await?;
        Ok(())
    }

    /// Recomputes `spec` for `tenant`; with a job id, records progress after each person.
    pub async fn run(
        &self,
        tenant: &str,
        spec: &RecomputeSpec,
        job_id: Option<&str>,
    ) -> anyhow::Result<RecomputeReport> {
        spec.validate().map_err(anyhow::Error::msg)?;
        let started = EventTime::now().0;
        let read_from = EventTime(spec.from.0 - WARMUP_DAYS * DAY_MS);
        let read_to = EventTime(spec.to.0 + TRAILING_DAYS * DAY_MS);
        // Everyone with a window that may start in the range: events up to `read_to`
        // (a local day that starts before `to` may hold only events after it).
        let users = match &spec.users {
            Some(u) => u.clone(),
            None => self.query.event_users(tenant, spec.from, read_to).await?,
        };
        let total = users.len() as i64;
        if let Some(id) = job_id {
            let msg = format!("0 of {total} people");
            self.meta
                .update_job(id, JobState::Running, 0, total, &msg)
                .await?;
        }
        // The current parameters, loaded once and copied per person.
        let mut template = Processor::new(&self.pipeline, self.horizon_days)?;
        apply_changes(&mut template.directory, self.meta.changes_since(0).await?);
        let directory = template.directory.clone();

        let mut report = RecomputeReport::default();
        let groups = self.read_groups(tenant, &users, read_from, read_to).await?;
        for group in groups {
            let people = self
                .query
                .people_events(tenant, group, read_from, read_to, MAX_EVENTS_PER_PERSON)
                .await?;
            for (user, events) in people {
                self.recompute_person(tenant, &user, &events, spec, started, &directory)
                    .await?
                    .add_to(&mut report);
                if let Some(id) = job_id {
                    let done = report.people as i64;
                    let msg = format!("{done} of {total} people");
                    self.meta
                        .update_job(id, JobState::Running, done, total, &msg)
                        .await?;
                }
            }
        }
        Ok(report)
    }

    /// Replays one person's events (`events`, in event-time order, from the warm-up to the
    /// trailing days) and writes what the range's windows now hold, with zeros for values
    /// no longer produced.
    async fn recompute_person(
        &self,
        tenant: &str,
        user: &str,
        events: &[digame_schemas::ActivityEvent],
        spec: &RecomputeSpec,
        started: i64,
        directory: &Directory,
    ) -> anyhow::Result<RecomputeReport> {
        let mut p = Processor::new(&self.pipeline, self.horizon_days)?;
        p.directory = directory.clone();
        p.keep_raw_events = false;
        p.revisions_after(started);
        let mut rows = Vec::new();
        let mut last_day = i64::MIN;
        for (i, ev) in events.iter().enumerate() {
            let clock = ev.timestamp.0;
            let payload = serde_json::to_vec(ev)?;
            p.process(0, &payload, clock);
            // Close days as the replay passes them, so memory stays at a few days.
            if clock.div_euclid(DAY_MS) != last_day {
                last_day = clock.div_euclid(DAY_MS);
                // The events replayed so far are what the store held live.
                p.resolve_reopens_from(&events[..=i], clock);
                rows.extend(p.emit(clock));
            }
        }
        p.resolve_reopens_from(events, EventTime::now().0);
        rows.extend(p.emit(EventTime::now().0));
        let mut latest = latest_in_range(rows, spec.from, spec.to);
        let retracted = self.retractions(tenant, user, spec, &latest).await?;
        let rows_retracted = retracted.len();
        // Retractions take revisions after the job's newest row.
        let mut revision = latest
            .iter()
            .map(|r| r.revision)
            .max()
            .unwrap_or(0)
            .max(started * 1000);
        for mut r in retracted {
            revision += 1;
            r.revision = revision;
            latest.push(r);
        }
        for chunk in latest.chunks(WRITE_CHUNK) {
            let batch = StoreBatch {
                features: chunk.to_vec(),
                ..StoreBatch::default()
            };
            self.store.write(&batch).await?;
            self.bus
                .publish(
                    Topic::Features,
                    digame_pipelines::runtime::feature_records(chunk, EventTime::now().0),
                )
                .await?;
            // Every node's cache follows the stream; this node's takes them at once
            // too, so the job's end is visible here on the next read.
            if let Some(cache) = self.query.cache() {
                cache.apply(chunk);
            }
        }
        Ok(RecomputeReport {
            people: 1,
            events_read: events.len(),
            rows_written: latest.len(),
            rows_retracted,
        })
    }

    /// `users` cut into runs of consecutive people whose stored rows in `[from, to)` fit
    /// one read's share of the query memory (a quarter of `query.max_memory_bytes`, at
    /// [`READ_BYTES_PER_EVENT`] each); a person larger than that is a run alone. One read
    /// per run instead of one per person: each read scans the range's files once.
    async fn read_groups<'a>(
        &self,
        tenant: &str,
        users: &'a [String],
        from: EventTime,
        to: EventTime,
    ) -> anyhow::Result<Vec<&'a [String]>> {
        let sizes: std::collections::HashMap<String, u64> = self
            .query
            .event_rows_by_user(tenant, from, to)
            .await?
            .into_iter()
            .collect();
        let budget =
            (self.query.limits().max_memory_bytes as u64 / 4 / READ_BYTES_PER_EVENT).max(1);
        Ok(cut_runs(
            users,
            |u| sizes.get(u).copied().unwrap_or(0),
            budget,
        ))
    }

    /// Zero rows for the values the store holds for `user` in the range that the new
    /// computation (`fresh`) does not produce.
    async fn retractions(
        &self,
        tenant: &str,
        user: &str,
        spec: &RecomputeSpec,
        fresh: &[FeatureRow],
    ) -> anyhow::Result<Vec<FeatureRow>> {
        let have: BTreeSet<(Granularity, i64, &str, &str)> = fresh
            .iter()
            .map(|r| {
                (
                    r.granularity,
                    r.window_start.0,
                    &*r.feature,
                    r.dimension.as_str(),
                )
            })
            .collect();
        let params_version = fresh.first().map_or(0, |r| r.params_version);
        let mut out = Vec::new();
        for g in [Granularity::Hour, Granularity::Day, Granularity::Week] {
            let series = self
                .query
                .features(tenant, user, spec.from, spec.to, g)
                .await?;
            for w in series.windows {
                let mut stale = |feature: &str, dimension: &str, value: f64| {
                    if value != 0.0 && !have.contains(&(g, w.window_start.0, feature, dimension)) {
                        out.push(FeatureRow {
                            tenant_id: tenant.into(),
                            user_id: user.into(),
                            granularity: g,
                            window_start: w.window_start,
                            window_end: w.window_end,
                            timezone: w.timezone.as_str().into(),
                            feature: feature.to_string().into(),
                            dimension: dimension.into(),
                            value: 0.0,
                            feature_version: digame_schemas::FEATURE_VERSION,
                            params_version,
                            is_final: w.is_final,
                            revision: 0,
                            final_revision: 0,
                        });
                    }
                };
                for (f, v) in &w.features {
                    stale(f, "", v.as_f64().unwrap_or(0.0));
                }
                for (f, dims) in &w.breakdowns {
                    for (d, v) in dims.as_object().into_iter().flatten() {
                        stale(f, d, v.as_f64().unwrap_or(0.0));
                    }
                }
            }
        }
        Ok(out)
    }
}

/// The newest row per key among `rows`, for windows starting in `[from, to)`.
fn latest_in_range(rows: Vec<FeatureRow>, from: EventTime, to: EventTime) -> Vec<FeatureRow> {
    let mut latest: std::collections::HashMap<(Granularity, i64, String, String), FeatureRow> =
        std::collections::HashMap::new();
    for r in rows {
        if r.window_start < from || r.window_start >= to {
            continue;
        }
        let key = (
            r.granularity,
            r.window_start.0,
            r.feature.to_string(),
            r.dimension.clone(),
        );
        if latest.get(&key).is_none_or(|old| old.revision < r.revision) {
            latest.insert(key, r);
        }
    }
    let mut out: Vec<FeatureRow> = latest.into_values().collect();
    out.sort_by_key(|r| r.revision);
    out
}

#[cfg(test)]
mod tests {
    use super::cut_runs;

    #[test]
    fn runs_hold_at_most_the_budget_and_keep_order() {
        let sizes = [3u64, 4, 2, 9, 1, 1, 0, 5];
        let runs = cut_runs(&sizes, |n| *n, 6);
        // By hand: 3 (3+4 > 6), 4+2, 9 alone (over the budget), 1+1+0, 5.
        let want: Vec<&[u64]> = vec![&[3], &[4, 2], &[9], &[1, 1, 0], &[5]];
        assert_eq!(runs, want);
        assert!(cut_runs(&[] as &[u64], |n| *n, 6).is_empty());
        assert_eq!(cut_runs(&sizes, |n| *n, 100), vec![&sizes[..]]);
    }
}
