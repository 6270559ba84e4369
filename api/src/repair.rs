//! Rebuilding the ranges of the embedded store whose files were quarantined.
//!
//! The store's ledger ([`digame_infra::store::integrity`]) lists each damaged file with
//! the table, tenant and date it held. The repair works through it, in an order that lets
//! each step use the one before:
//!
//! 1. **Raw events and dead letters from the bus.** One pass over the topic, from the
//!    start of the log, writes back every record of a damaged (tenant, date). Rows already
//!    in the store are upserts of the same keys, so writing them again changes nothing;
//!    events the live pipeline has not reached yet it stores itself.
//! 2. **Feature rows by recomputation** of the damaged date's windows from the raw events
//!    (which step 1 has made whole), for everyone with events in that date's week (a week
//!    window that starts on the date counts events of the following days). The live
//!    pipeline then emits again whatever it still holds of those windows, with newer
//!    revisions: a recomputation may read the stored events a moment before the pipeline
//!    writes its latest ones, and the pipeline's state is the fresher.
//!
//! Each rebuilt range is recorded beside its quarantined file, with what was *lost*: the
//! rows of the damaged file found nowhere else. The bus is *whole* when it still holds
//! every record ever appended (retention has removed nothing, damage has cost no record).
//! Where the damaged file still decodes (a flipped value, a checksum mismatch) its event
//! ids are compared with the bus: on a whole bus an id found on no record never named an
//! event (the damage changed it) and is reported as *altered*, not lost. Where the file
//! does not decode, nothing is lost if the bus is whole. Otherwise the loss is unknown,
//! and said so. Dead letters the pipeline itself wrote (bus records that were not events) are
//! not rebuilt: they are on the bus only as the undecodable records they were.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use digame_infra::bus::{EventBus, Topic};
use digame_infra::store::integrity::{Damage, RepairOutcome, surviving_event_ids};
use digame_infra::store::{ParquetStore, Table, partition_date};
use digame_pipelines::runtime::PipelineStatus;
use digame_schemas::{ActivityEvent, DeadLetter, EventTime};
use tokio::sync::watch;

use crate::recompute::{RecomputeSpec, Recomputer};

/// The consumer group the repair reads the bus with (it never commits).
const GROUP: &str = "store-repair";
/// Rows written back per store file.
const WRITE_CHUNK: usize = 50_000;
/// Records per poll of the bus.
const POLL: usize = 10_000;
const DAY_MS: i64 = 86_400_000;
/// How long after a failed attempt the repair tries again.
const RETRY: Duration = Duration::from_secs(5);

/// Everything the repair needs.
pub struct Repairer {
    pub bus: Arc<dyn EventBus>,
    pub store: Arc<ParquetStore>,
    pub recomputer: Recomputer,
    /// The live pipeline of this process, asked to re-emit what it holds of a rebuilt
    /// range.
    pub pipeline: Arc<PipelineStatus>,
}

/// What a pass over one topic wrote back, per (tenant, date).
#[derive(Default)]
struct Pass {
    written: HashMap<(String, String), u64>,
    /// Ids found on the bus, for the damaged (tenant, date)s whose file still decodes.
    found: HashMap<(String, String), HashSet<String>>,
    /// Whether the bus holds every record ever appended: each partition read from offset 0
    /// (nothing removed by retention) and none of its records lost to damage.
    whole: bool,
}

impl Repairer {
    /// Repairs what the ledger holds, and whatever is quarantined later, until shutdown.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        loop {
            let pending = self.store.integrity().pending();
            if !pending.is_empty() {
                match self.repair(pending).await {
                    // More may have been found meanwhile: look again at once.
                    Ok(()) => continue,
                    Err(e) => {
                        tracing::warn!(error = %e, "rebuilding a damaged store range failed; retrying");
                        tokio::select! {
                            _ = tokio::time::sleep(RETRY) => continue,
                            _ = shutdown.changed() => return,
                        }
                    }
                }
            }
            tokio::select! {
                _ = self.store.integrity().damage_found() => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// One round over `pending`: raw rows first, then features.
    pub async fn repair(&self, pending: Vec<Damage>) -> anyhow::Result<()> {
        let of = |t: Table| pending.iter().filter(move |d| d.table() == t);
        for (table, topic) in [
            (Table::Events, Topic::Events),
            (Table::DeadLetters, Topic::DeadLetters),
        ] {
            let damaged: Vec<&Damage> = of(table).collect();
            if damaged.is_empty() {
                continue;
            }
            let ids = damaged_ids(&damaged);
            let pass = self.rebuild_from_bus(table, topic, &damaged, &ids).await?;
            for d in damaged {
                let key = (d.tenant.clone(), d.date.clone());
                let (lost, altered, detail) =
                    account(ids.get(&key), pass.found.get(&key), pass.whole);
                self.resolve(
                    d,
                    RepairOutcome {
                        source: format!("bus topic {}", topic.name()),
                        rows_rebuilt: pass.written.get(&key).copied().unwrap_or(0),
                        lost,
                        altered,
                        detail,
                        at: EventTime::now(),
                    },
                )?;
            }
        }
        for d in of(Table::Features) {
            let rows = self.recompute_date(&d.tenant, &d.date).await?;
            self.resolve(
                d,
                RepairOutcome {
                    source: "recomputed from the stored raw events".into(),
                    rows_rebuilt: rows,
                    lost: Some(0),
                    altered: 0,
                    detail: "feature rows derive from the raw events".into(),
                    at: EventTime::now(),
                },
            )?;
        }
        Ok(())
    }

    fn resolve(&self, d: &Damage, outcome: RepairOutcome) -> anyhow::Result<()> {
        tracing::info!(table = d.table, tenant = d.tenant, date = d.date, rebuilt = outcome.rows_rebuilt, lost = ?outcome.lost, source = outcome.source, "rebuilt a damaged store range");
        self.store.integrity().resolve(&d.file, outcome)?;
        Ok(())
    }

    /// Reads `topic` from the start of the log to its end as of now, writing back the
    /// rows of the damaged (tenant, date)s.
    async fn rebuild_from_bus(
        &self,
        table: Table,
        topic: Topic,
        damaged: &[&Damage],
        ids: &HashMap<(String, String), HashSet<String>>,
    ) -> anyhow::Result<Pass> {
        let wanted: HashSet<(String, String)> = damaged
            .iter()
            .map(|d| (d.tenant.clone(), d.date.clone()))
            .collect();
        let mut consumer = self.bus.subscribe(topic, GROUP).await?;
        for p in consumer.assignment() {
            consumer.seek(p, 0).await?;
        }
        let ends: BTreeMap<u32, u64> = consumer
            .end_offsets()
            .map(|f| f().into_iter().collect())
            .unwrap_or_default();
        let mut first: BTreeMap<u32, u64> = BTreeMap::new();
        let mut reached: HashSet<u32> = ends
            .iter()
            .filter(|(_, end)| **end == 0)
            .map(|(p, _)| *p)
            .collect();
        let mut pass = Pass::default();
        let mut buffers: HashMap<(String, String), Vec<Row>> = HashMap::new();
        loop {
            let batch = consumer.poll(POLL, Duration::from_millis(200)).await?;
            if batch.is_empty() {
                break;
            }
            for rec in &batch {
                first.entry(rec.partition).or_insert(rec.offset);
                if ends
                    .get(&rec.partition)
                    .is_some_and(|e| rec.offset + 1 >= *e)
                {
                    reached.insert(rec.partition);
                }
                let Some((key, id, row)) = decode(table, &rec.payload) else {
                    continue;
                };
                if !wanted.contains(&key) {
                    continue;
                }
                if ids.contains_key(&key) {
                    pass.found.entry(key.clone()).or_default().insert(id);
                }
                let buffer = buffers.entry(key.clone()).or_default();
                buffer.push(row);
                if buffer.len() >= WRITE_CHUNK {
                    let rows = std::mem::take(buffer);
                    *pass.written.entry(key).or_default() += self.write(table, rows)?;
                }
            }
            if !ends.is_empty() && ends.keys().all(|p| reached.contains(p)) {
                break;
            }
        }
        for (key, rows) in buffers {
            *pass.written.entry(key).or_default() += self.write(table, rows)?;
        }
        // Whole: nothing removed by retention, and no record lost to damage in the log.
        let lost = self.bus.status().lost_records;
        pass.whole = lost.processed + lost.unprocessed == 0
            && ends
                .iter()
                .all(|(p, end)| *end == 0 || first.get(p) == Some(&0));
        Ok(pass)
    }

    fn write(&self, table: Table, rows: Vec<Row>) -> anyhow::Result<u64> {
        let n = rows.len() as u64;
        // Parquet encoding and fsync are blocking work.
        tokio::task::block_in_place(|| match table {
            Table::DeadLetters => {
                let rows: Vec<DeadLetter> = rows
                    .into_iter()
                    .filter_map(|r| match r {
                        Row::Dead(d) => Some(d),
                        Row::Event(_) => None,
                    })
                    .collect();
                self.store.write_rows(table, &rows)
            }
            _ => {
                let rows: Vec<ActivityEvent> = rows
                    .into_iter()
                    .filter_map(|r| match r {
                        Row::Event(e) => Some(*e),
                        Row::Dead(_) => None,
                    })
                    .collect();
                self.store.write_rows(table, &rows)
            }
        })?;
        Ok(n)
    }

    /// Recomputes the feature windows starting on `date` (UTC) for `tenant`; the rows
    /// written.
    async fn recompute_date(&self, tenant: &str, date: &str) -> anyhow::Result<u64> {
        let from = chrono::NaiveDate::parse_from_str(date, "%Y-%m-%d")?
            .and_hms_opt(0, 0, 0)
            .expect("midnight exists")
            .and_utc()
            .timestamp_millis();
        let users = self
            .recomputer
            .query
            .event_users(tenant, EventTime(from), EventTime(from + 8 * DAY_MS))
            .await?;
        if users.is_empty() {
            return Ok(0);
        }
        let spec = RecomputeSpec {
            from: EventTime(from),
            to: EventTime(from + DAY_MS),
            users: Some(users),
        };
        let report = self.recomputer.run(tenant, &spec, None).await?;
        // The recomputation read the stored events while the live pipeline may have been
        // writing more of them; what the pipeline still holds of these windows it emits
        // again, newer than the recomputed rows, so the freshest state has the last word.
        self.pipeline.reemit.lock().expect("reemit lock").push((
            tenant.to_string(),
            from,
            from + DAY_MS,
        ));
        Ok(report.rows_written as u64)
    }
}

/// A row read back from the bus.
enum Row {
    Event(Box<ActivityEvent>),
    Dead(DeadLetter),
}

/// A bus record as a row of `table`: its (tenant, date), its id, the row.
fn decode(table: Table, payload: &[u8]) -> Option<((String, String), String, Row)> {
    match table {
        Table::DeadLetters => {
            let d: DeadLetter = serde_json::from_slice(payload).ok()?;
            let date = partition_date(&d.rejected_at.to_rfc3339()).to_string();
            let id = d.event_id.clone().unwrap_or_default();
            Some(((d.tenant_id.clone(), date), id, Row::Dead(d)))
        }
        _ => {
            let ev = digame_pipelines::runtime::decode_event(payload).ok()?;
            let id = format!("{}/{}", ev.user_id, ev.event_id?);
            let date = partition_date(&ev.timestamp.to_rfc3339()).to_string();
            Some(((ev.tenant_id.clone(), date), id, Row::Event(Box::new(ev))))
        }
    }
}

/// What a damaged range lost, given the ids its file still yields (`held`, `None` when it
/// does not decode), the ids of that range found on the bus, and whether the bus is whole
/// (read from its very first record, none lost to damage): (lost, altered, detail).
///
/// Every acknowledged event is on the bus before it is stored, so when the bus still
/// holds everything since its start, an id of the file that is not on it never named an
/// event: the damage changed it (a flipped bit in an unchecked, uncompressed run decodes
/// as another value). Nothing is lost then, and those ids are reported as *altered*. When
/// retention has removed the start or damage has cost the log records, a missing id may
/// be either, and the loss is unknown.
fn account(
    held: Option<&HashSet<String>>,
    found: Option<&HashSet<String>>,
    whole: bool,
) -> (Option<u64>, u64, String) {
    let Some(held) = held else {
        return if whole {
            (
                Some(0),
                0,
                "the damaged file does not decode; the bus holds every record since its start"
                    .into(),
            )
        } else {
            (
                None,
                0,
                "the damaged file does not decode and the bus is not whole (retention removed its start, or damage cost it records): rows it no longer holds are unknown".into(),
            )
        };
    };
    let missing = held
        .iter()
        .filter(|id| found.is_none_or(|f| !f.contains(*id)))
        .count() as u64;
    match (missing, whole) {
        (0, _) => (
            Some(0),
            0,
            "the damaged file still decodes; each of its ids was found on the bus".into(),
        ),
        (n, true) => (
            Some(0),
            n,
            format!(
                "the damaged file still decodes; {n} of its ids are on no record of the bus, which holds every record since its start: values the damage changed"
            ),
        ),
        (n, false) => (
            None,
            0,
            format!(
                "the damaged file still decodes; {n} of its ids are not on the bus, which is not whole (retention removed its start, or damage cost it records): each was either lost or changed by the damage"
            ),
        ),
    }
}

/// The ids each damaged events file still yields, for the files that decode despite
/// their damage.
fn damaged_ids(damaged: &[&Damage]) -> HashMap<(String, String), HashSet<String>> {
    let mut out: HashMap<(String, String), HashSet<String>> = HashMap::new();
    for d in damaged.iter().filter(|d| d.table() == Table::Events) {
        if let Some(ids) = surviving_event_ids(&d.file) {
            out.entry((d.tenant.clone(), d.date.clone()))
                .or_default()
                .extend(ids);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(list: &[&str]) -> HashSet<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn an_id_on_no_record_of_a_whole_bus_was_changed_by_the_damage_not_lost() {
        let held = ids(&["u/1", "u/2", "u/x"]);
        let found = ids(&["u/1", "u/2", "u/3"]);
        let (lost, altered, detail) = account(Some(&held), Some(&found), true);
        assert_eq!((lost, altered), (Some(0), 1), "{detail}");
        // Without the start of the bus the same id may have been a row: unknown.
        let (lost, altered, _) = account(Some(&held), Some(&found), false);
        assert_eq!((lost, altered), (None, 0));
        // Every id found: nothing lost either way.
        let (lost, altered, _) = account(Some(&ids(&["u/1"])), Some(&found), false);
        assert_eq!((lost, altered), (Some(0), 0));
        // A range none of whose ids reached this pass.
        let (lost, altered, _) = account(Some(&held), None, true);
        assert_eq!((lost, altered), (Some(0), 3));
    }

    #[test]
    fn a_file_that_does_not_decode_lost_nothing_only_if_the_bus_is_whole() {
        assert_eq!(account(None, None, true).0, Some(0));
        assert_eq!(account(None, None, false).0, None);
    }
}
