//! Reconciliation: does every event the store holds count in the features?
//!
//! Read from the store, so it holds across restarts and nodes: the raw events the pipeline
//! stored (one per `event_id`), what the day `event_count` features add up to, and the dead
//! letters by stage and reason. Events accepted but not yet read by the pipeline are on the
//! bus; the caller adds that from the pipeline's status. Both backends answer the same
//! statements through the tenant-scoped SQL path, so isolation is the SQL path's.
//!
//! On the embedded store the statements run one `date=` partition at a time, and each
//! partition's answer is kept with the names of the files it was read from (names carry
//! the file's checksum, and every write, compaction or repair changes them). A partition
//! whose files are unchanged is answered from memory, so a reconciliation costs the
//! partitions written since the last one, and no statement ever holds more than one day
//! of a tenant's rows: it answers at any size, within the query's memory pool. A row's
//! partition is its own time's date, and an event id or feature key never changes its
//! time, so deduplication within a partition is deduplication in the table.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use digame_infra::store::Table;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::{Backend, QueryEngine, Result};

/// One tenant's (or one person's) tally.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Tally {
    /// Raw events stored (one per person and `event_id`, as the store keeps them).
    pub stored: u64,
    /// Events counted in the day `event_count` features.
    pub counted: u64,
}

/// Dead letters of one stage and reason.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DeadLetterCount {
    pub stage: String,
    pub reason_code: String,
    pub count: u64,
}

/// The reconciliation of one tenant.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Reconciliation {
    #[serde(flatten)]
    pub total: Tally,
    pub dead_letters: Vec<DeadLetterCount>,
    /// Per person, when asked for (sorted by user).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub people: Option<Vec<PersonTally>>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PersonTally {
    pub user_id: String,
    #[serde(flatten)]
    pub tally: Tally,
}

/// One tally statement over a table: what it selects, filters and groups by, and the
/// columns its counts are keyed by (the grouping columns).
struct Statement {
    table: Table,
    select: &'static str,
    filter: &'static str,
    keys: &'static [&'static str],
}

impl Statement {
    /// The statement over the partition of `date` of the rows as stored, deduplicating
    /// only what it counts: events by (person, id), day counts by their key, newest
    /// revision first. Deduplicating whole rows (as the tables of `POST /v1/sql` do)
    /// sorts every column of a day's rows, more than the query pool holds for a large
    /// tenant. `date` is a parsed date, printed as digits and dashes: the only text that
    /// enters a statement, never from a request.
    fn partition_text(&self, date: chrono::NaiveDate) -> String {
        let date = format!("date = '{}'", date.format("%Y-%m-%d"));
        let filter = [date.as_str(), self.filter]
            .into_iter()
            .filter(|f| !f.is_empty())
            .collect::<Vec<_>>()
            .join(" AND ");
        let rows = match self.table {
            Table::Events => {
                format!("SELECT DISTINCT user_id, event_id FROM events WHERE {filter}")
            }
            Table::Features => {
                let (key, version) = Table::Features
                    .upsert_key()
                    .expect("feature rows have a key");
                format!(
                    "SELECT * FROM (SELECT user_id, value, row_number() OVER (PARTITION BY {} ORDER BY {version} DESC) AS newest FROM features WHERE {filter}) WHERE newest = 1",
                    key.join(", ")
                )
            }
            Table::DeadLetters => format!("SELECT * FROM dead_letters WHERE {filter}"),
        };
        let mut text = format!("SELECT {} FROM ({rows})", self.select);
        if !self.keys.is_empty() {
            text.push_str(" GROUP BY ");
            text.push_str(&self.keys.join(", "));
        }
        text
    }

    /// The statement's text over the whole table (or the partition of `date`), as
    /// `POST /v1/sql` sees it: for ClickHouse.
    fn text(&self, date: Option<chrono::NaiveDate>) -> String {
        let date = date.map(|d| format!("date = '{}'", d.format("%Y-%m-%d")));
        let filters: Vec<&str> = [date.as_deref().unwrap_or(""), self.filter]
            .into_iter()
            .filter(|f| !f.is_empty())
            .collect();
        let mut text = format!("SELECT {} FROM {}", self.select, self.table.name());
        if !filters.is_empty() {
            text.push_str(" WHERE ");
            text.push_str(&filters.join(" AND "));
        }
        if !self.keys.is_empty() {
            text.push_str(" GROUP BY ");
            text.push_str(&self.keys.join(", "));
        }
        text
    }
}

/// The day `event_count` totals: what the features count.
const DAY_COUNTS: &str = "feature = 'event_count' AND dimension = '' AND granularity = 'day'";

const STORED: Statement = Statement {
    table: Table::Events,
    select: "COUNT(*) AS n",
    filter: "",
    keys: &[],
};
const COUNTED: Statement = Statement {
    table: Table::Features,
    select: "SUM(value) AS n",
    filter: DAY_COUNTS,
    keys: &[],
};
const STORED_BY_USER: Statement = Statement {
    table: Table::Events,
    select: "user_id, COUNT(*) AS n",
    filter: "",
    keys: &["user_id"],
};
const COUNTED_BY_USER: Statement = Statement {
    table: Table::Features,
    select: "user_id, SUM(value) AS n",
    filter: DAY_COUNTS,
    keys: &["user_id"],
};
const DEAD: Statement = Statement {
    table: Table::DeadLetters,
    select: "stage, reason_code, COUNT(*) AS n",
    filter: "",
    keys: &["stage", "reason_code"],
};

/// Counts keyed by a statement's key columns (one empty key for a total).
type Counts = BTreeMap<Vec<String>, u64>;

/// (tenant, table, selection, date) of a partition's answer.
type PartitionKey = (String, &'static str, &'static str, chrono::NaiveDate);
/// A partition's answer: the sorted names of the files it was read from, and its counts.
type PartitionAnswer = (Vec<String>, Counts);

/// Partition answers of the embedded store, each with the file names it was read from.
#[derive(Debug, Default)]
pub(crate) struct PartitionMemo {
    answers: Mutex<HashMap<PartitionKey, PartitionAnswer>>,
    /// Partitions read from the files rather than answered from memory.
    reads: AtomicU64,
}

impl PartitionMemo {
    /// Partition statements run so far (the rest were answered from memory).
    #[cfg(test)]
    pub(crate) fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }
}

/// The `date=` partitions of `tenant` in `table` under `root`, each with its sorted file
/// names. The dates are parsed, so what goes into a statement is a date and nothing else.
fn partitions(
    root: &std::path::Path,
    table: Table,
    tenant: &str,
) -> std::io::Result<Vec<(chrono::NaiveDate, Vec<String>)>> {
    let dir = root.join(table.name()).join(format!("tenant_id={tenant}"));
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let Some(date) = name
            .to_str()
            .and_then(|n| n.strip_prefix("date="))
            .and_then(|d| chrono::NaiveDate::parse_from_str(d, "%Y-%m-%d").ok())
        else {
            continue;
        };
        let mut files: Vec<String> = std::fs::read_dir(entry.path())?
            .filter_map(|f| f.ok())
            .map(|f| f.file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        out.push((date, files));
    }
    Ok(out)
}

/// Adds the counts of `rows` (column `n`, keyed by `keys`) into `into`.
fn add_rows(into: &mut Counts, rows: &[Map<String, Value>], keys: &[&str]) {
    for row in rows {
        let key = keys.iter().map(|k| text(row, k)).collect();
        *into.entry(key).or_default() += number(row, "n");
    }
}

/// A count in an answer row; absent (a `SUM` over no rows is null, and nulls are left out
/// of rows) is 0.
fn number(row: &Map<String, Value>, name: &str) -> u64 {
    match row.get(name) {
        Some(Value::Number(n)) => n.as_f64().unwrap_or(0.0).round() as u64,
        // Some engines answer large integers as text.
        Some(Value::String(s)) => s.parse::<f64>().unwrap_or(0.0).round() as u64,
        _ => 0,
    }
}

fn text(row: &Map<String, Value>, name: &str) -> String {
    row.get(name)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

impl QueryEngine {
    /// The reconciliation of `tenant`; per person too when `people`.
    pub async fn reconcile(&self, tenant: &str, people: bool) -> Result<Reconciliation> {
        let total = |c: &Counts| c.values().sum::<u64>();
        let tally = Tally {
            stored: total(&self.tally(tenant, &STORED).await?),
            counted: total(&self.tally(tenant, &COUNTED).await?),
        };
        let mut by_user: BTreeMap<String, Tally> = BTreeMap::new();
        if people {
            for (key, n) in self.tally(tenant, &STORED_BY_USER).await? {
                by_user.entry(key.concat()).or_default().stored = n;
            }
            for (key, n) in self.tally(tenant, &COUNTED_BY_USER).await? {
                by_user.entry(key.concat()).or_default().counted = n;
            }
        }
        let dead_letters = self
            .tally(tenant, &DEAD)
            .await?
            .into_iter()
            .map(|(key, count)| DeadLetterCount {
                stage: key[0].clone(),
                reason_code: key[1].clone(),
                count,
            })
            .collect();
        Ok(Reconciliation {
            total: tally,
            dead_letters,
            people: people.then(|| {
                by_user
                    .into_iter()
                    .map(|(user_id, tally)| PersonTally { user_id, tally })
                    .collect()
            }),
        })
    }

    /// The counts of one statement over the whole tenant: partition by partition on the
    /// embedded store (from memory where a partition's files are unchanged), in one
    /// statement on ClickHouse.
    async fn tally(&self, tenant: &str, statement: &Statement) -> Result<Counts> {
        let mut counts = Counts::new();
        let root = match &self.backend {
            Backend::Embedded(root) => root.clone(),
            Backend::ClickHouse(_) => {
                let rows = self.sql_all(tenant, &statement.text(None)).await?;
                add_rows(&mut counts, &rows, statement.keys);
                return Ok(counts);
            }
        };
        let (table, owner) = (statement.table, tenant.to_string());
        let listed = tokio::task::spawn_blocking(move || partitions(&root, table, &owner))
            .await
            .map_err(crate::internal)?
            .map_err(crate::internal)?;
        let memo = &self.reconcile_memo;
        let (table_name, select) = (statement.table.name(), statement.select);
        let key = |date: chrono::NaiveDate| (tenant.to_string(), table_name, select, date);
        // Partitions gone (retention, deletion) leave the memory too.
        {
            let dates: std::collections::HashSet<chrono::NaiveDate> =
                listed.iter().map(|(d, _)| *d).collect();
            memo.answers
                .lock()
                .expect("memo lock")
                .retain(|(t, tb, s, d), _| {
                    !(t == tenant && *tb == table_name && *s == select) || dates.contains(d)
                });
        }
        for (date, files) in listed {
            let known = memo
                .answers
                .lock()
                .expect("memo lock")
                .get(&key(date))
                .filter(|(seen, _)| *seen == files)
                .map(|(_, c)| c.clone());
            let part = match known {
                Some(c) => c,
                None => {
                    let rows = all_rows(
                        self.sql_stored_rows(tenant, &statement.partition_text(date))
                            .await?,
                    )?;
                    memo.reads.fetch_add(1, Ordering::Relaxed);
                    let mut c = Counts::new();
                    add_rows(&mut c, &rows, statement.keys);
                    memo.answers
                        .lock()
                        .expect("memo lock")
                        .insert(key(date), (files, c.clone()));
                    c
                }
            };
            for (k, n) in part {
                *counts.entry(k).or_default() += n;
            }
        }
        Ok(counts)
    }

    /// Every row of a fixed statement.
    async fn sql_all(&self, tenant: &str, sql: &str) -> Result<Vec<Map<String, Value>>> {
        all_rows(self.sql(tenant, sql).await?)
    }
}

/// The rows of an answer; one cut by the row limit is an error rather than a silently
/// short tally.
fn all_rows(result: crate::SqlResult) -> Result<Vec<Map<String, Value>>> {
    if result.truncated {
        return Err(crate::QueryError::Invalid(format!(
            "more than {} people to reconcile one by one; ask for the tenant's totals only",
            result.row_count
        )));
    }
    Ok(result.rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use digame_infra::config::QueryConfig;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_empty_tenant_reconciles_to_zeros() {
        // A tenant with no rows yet: the sums are null, which must read as 0, not fail.
        let dir = tempfile::tempdir().unwrap();
        let engine = QueryEngine::new(dir.path(), QueryConfig::default());
        let r = engine.reconcile("acme", true).await.unwrap();
        assert_eq!(r.total, Tally::default());
        assert!(r.dead_letters.is_empty());
        assert_eq!(r.people, Some(Vec::new()));
    }

    /// Without a partition, no filter but the statement's own (ClickHouse 18.16 reads a
    /// bare `TRUE` as a column name).
    #[test]
    fn statements_name_their_partition_and_nothing_else() {
        assert_eq!(STORED.text(None), "SELECT COUNT(*) AS n FROM events");
        let date = chrono::NaiveDate::from_ymd_opt(2026, 11, 24);
        assert_eq!(
            STORED.text(date),
            "SELECT COUNT(*) AS n FROM events WHERE date = '2026-11-24'"
        );
        assert_eq!(
            COUNTED_BY_USER.text(date),
            format!(
                "SELECT user_id, SUM(value) AS n FROM features WHERE date = '2026-11-24' AND {DAY_COUNTS} GROUP BY user_id"
            )
        );
    }

    const DAY: i64 = 86_400_000;
    /// 2026-11-24T00:00Z.
    const D0: i64 = 1_795_478_400_000;

    fn event(user: &str, n: u128, at: i64) -> digame_schemas::ActivityEvent {
        let mut e: digame_schemas::ActivityEvent = serde_json::from_value(serde_json::json!({
            "event_id": format!("00000000-0000-4000-8000-{n:012x}"), "user_id": user, "source": "git",
            "kind": "commit", "timestamp": at, "attributes": {"project": "p"}}))
        .unwrap();
        e.tenant_id = "acme".into();
        e
    }

    fn day_count(user: &str, day: i64, value: f64, revision: i64) -> digame_schemas::FeatureRow {
        digame_schemas::FeatureRow {
            tenant_id: "acme".into(),
            user_id: user.into(),
            granularity: digame_schemas::Granularity::Day,
            window_start: digame_schemas::EventTime(D0 + day * DAY),
            window_end: digame_schemas::EventTime(D0 + (day + 1) * DAY),
            timezone: "UTC".into(),
            feature: "event_count".to_string().into(),
            dimension: String::new(),
            value,
            feature_version: 1,
            params_version: 0,
            is_final: true,
            revision,
            final_revision: revision,
        }
    }

    /// Partition by partition, against counts made by hand, and only the partitions
    /// written since are read again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn partitions_are_read_again_only_when_their_files_change() {
        let dir = tempfile::tempdir().unwrap();
        let store = digame_infra::store::ParquetStore::open(dir.path()).unwrap();
        // Three days; u0 has 3 events a day, u1 2. Event 1 is stored twice (a replay).
        let mut events = Vec::new();
        let mut n = 0;
        for day in 0..3 {
            for (user, count) in [("u0", 3), ("u1", 2)] {
                for _ in 0..count {
                    n += 1;
                    events.push(event(user, n, D0 + day * DAY + 3_600_000 + n as i64));
                }
            }
        }
        store.write_rows(Table::Events, &events).unwrap();
        store.write_rows(Table::Events, &events[..1]).unwrap();
        // The day counts, u0's first day once with an older, wrong revision.
        let mut rows = vec![day_count("u0", 0, 7.0, 1)];
        for day in 0..3 {
            rows.push(day_count("u0", day, 3.0, 2));
            rows.push(day_count("u1", day, 2.0, 2));
        }
        store.write_rows(Table::Features, &rows).unwrap();
        let engine = QueryEngine::new(dir.path(), QueryConfig::default());
        let person = |user: &str, stored, counted| PersonTally {
            user_id: user.into(),
            tally: Tally { stored, counted },
        };

        let r = engine.reconcile("acme", true).await.unwrap();
        assert_eq!(
            r.total,
            Tally {
                stored: 15,
                counted: 15
            }
        );
        assert_eq!(r.people, Some(vec![person("u0", 9, 9), person("u1", 6, 6)]));
        // Three partitions of each table, for the totals and per person.
        assert_eq!(engine.reconcile_memo.reads(), 12);
        let again = engine.reconcile("acme", true).await.unwrap();
        assert_eq!(again, r);
        assert_eq!(
            engine.reconcile_memo.reads(),
            12,
            "nothing changed, nothing read"
        );

        // One more event on the second day: that partition of events only.
        store
            .write_rows(Table::Events, &[event("u1", 100, D0 + DAY + 7_200_000)])
            .unwrap();
        let r = engine.reconcile("acme", false).await.unwrap();
        assert_eq!(
            r.total,
            Tally {
                stored: 16,
                counted: 15
            }
        );
        assert_eq!(engine.reconcile_memo.reads(), 13);
        // Its count: that partition of features only.
        store
            .write_rows(Table::Features, &[day_count("u1", 1, 3.0, 3)])
            .unwrap();
        let r = engine.reconcile("acme", false).await.unwrap();
        assert_eq!(
            r.total,
            Tally {
                stored: 16,
                counted: 16
            }
        );
        assert_eq!(engine.reconcile_memo.reads(), 14);
        // Another tenant sees none of it.
        let other = engine.reconcile("globex", false).await.unwrap();
        assert_eq!(other.total, Tally::default());
    }
}
