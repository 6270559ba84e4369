//! The embedded Parquet store, behind the store seam (`digame-store`, re-exported here).
//!
//! [`clickhouse::ClickHouseStore`] is the scale implementation. The
//! embedded [`ParquetStore`] writes one Parquet file per (table, tenant, date) partition per
//! flush under `<root>/<table>/tenant_id=<t>/date=<YYYY-MM-DD>/`, hive style, so DataFusion
//! prunes by tenant and date from the path alone.
//!
//! Guarantees: a file is visible only once complete (written to a `.tmp` name, fsynced,
//! renamed, directory fsynced), so `write` returning means the rows are durable. Rows are
//! upserts: readers and compaction keep one row per key (the highest `revision` for
//! features; one copy per person and `event_id` for events), so writing the same rows twice — as a
//! replay after a crash does — changes no result. Compaction merges a partition's small
//! files into one, deduplicated; the files it replaces are hidden from new queries at once
//! and deleted once no query that might have listed them is running ([`snapshots`]).
//!
//! Every file carries the CRC-32 of its bytes in its name and is verified before it is
//! first read ([`integrity`]). A damaged file (checksum mismatch, or a footer or page that
//! does not decode: truncated, overwritten) is moved to
//! `<root>/quarantine/<table>/tenant_id=…/date=…/`, outside every table, where queries
//! never see it; the rest of the store, its tenant included, reads and compacts on. The
//! move is logged with the table, tenant and date it held, counted in
//! `digame_store_quarantined_files_total{table}`, and entered in the ledger of damage
//! that `/readyz` reports until the range is rebuilt (raw events and dead letters from
//! the bus, feature rows by recomputation from the raw events).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use datafusion::arrow::array::{
    ArrayRef, BooleanBuilder, Float64Builder, Int64Builder, ListBuilder, StringBuilder,
    TimestampMillisecondBuilder, UInt16Builder, UInt32Builder, UInt64Builder,
};
use datafusion::arrow::datatypes::{DataType, Schema, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use datafusion::parquet::basic::{Compression, ZstdLevel};
use datafusion::parquet::file::properties::WriterProperties;
use digame_schemas::EventTime;
use digame_schemas::arrow::{Column, Layout};
use serde::Serialize;
use serde_json::Value;

use crate::telemetry::metrics;

pub use digame_store::*;

pub mod clickhouse;
pub mod integrity;
pub mod snapshots;

/// The embedded Parquet store.
pub struct ParquetStore {
    root: PathBuf,
    seq: AtomicU64,
    /// Random per-process id in file names.
    writer: String,
    healthy: AtomicBool,
    last_error: Mutex<String>,
    /// Files replaced by compaction, and the queries that may still read them.
    snapshots: Arc<snapshots::Snapshots>,
}

impl ParquetStore {
    /// Opens the store under `root`, removing temporary files a crash left behind and
    /// quarantining files that fail verification ([`integrity`]).
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        let snapshots = snapshots::Snapshots::new();
        let integrity = snapshots.integrity();
        integrity.load(&root)?;
        for table in Table::ALL {
            let dir = root.join(table.name());
            fs::create_dir_all(&dir).map_err(io_err(&dir))?;
            for file in walk_files(&dir)? {
                if file.extension().is_some_and(|e| e == "tmp") {
                    let _ = fs::remove_file(&file);
                } else if file.extension().is_some_and(|e| e == "parquet") {
                    integrity.check(&file);
                }
            }
        }
        Ok(ParquetStore {
            root,
            seq: AtomicU64::new(0),
            writer: uuid::Uuid::new_v4().simple().to_string()[..8].to_string(),
            healthy: AtomicBool::new(true),
            last_error: Mutex::new(String::new()),
            snapshots,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// What the query engine over this store must share, so that its reads never see a
    /// compaction.
    pub fn snapshots(&self) -> Arc<snapshots::Snapshots> {
        self.snapshots.clone()
    }

    /// The verified files and the ledger of damaged ranges.
    pub fn integrity(&self) -> &integrity::Integrity {
        self.snapshots.integrity()
    }

    pub fn table_dir(&self, table: Table) -> PathBuf {
        self.root.join(table.name())
    }

    /// Writes rows of one table, one file per (tenant, date); returns files written.
    pub fn write_rows<T: Serialize>(&self, table: Table, rows: &[T]) -> Result<usize> {
        if rows.is_empty() {
            return Ok(0);
        }
        let layout = table.layout();
        let mut groups: BTreeMap<(String, String), Vec<Value>> = BTreeMap::new();
        for row in rows {
            let value = serde_json::to_value(row).map_err(|e| StoreError::Encode {
                table: table.name(),
                message: e.to_string(),
            })?;
            let tenant = value["tenant_id"].as_str().unwrap_or_default().to_string();
            digame_schemas::validate::validate_tenant_id(&tenant).map_err(|message| {
                StoreError::Encode {
                    table: table.name(),
                    message,
                }
            })?;
            let date =
                partition_date(value[table.time_column()].as_str().unwrap_or_default()).to_string();
            groups.entry((tenant, date)).or_default().push(value);
        }
        let schema = table.file_schema();
        let mut files = 0;
        for ((tenant, date), values) in groups {
            let batch = batch_from_values(table, layout, &schema, &values)?;
            self.write_file(table, &tenant, &date, &[batch], Compression::LZ4_RAW)?;
            metrics()
                .store_rows_written
                .with_label_values(&[table.name()])
                .inc_by(values.len() as u64);
            files += 1;
        }
        Ok(files)
    }

    fn partition_dir(&self, table: Table, tenant: &str, date: &str) -> PathBuf {
        self.table_dir(table)
            .join(format!("tenant_id={tenant}"))
            .join(format!("date={date}"))
    }

    /// Writes one file of a partition. `compression`: LZ4 for flush files, which
    /// compaction reads back soon (cheap to write and to decode), zstd for merged files,
    /// which stay.
    fn write_file(
        &self,
        table: Table,
        tenant: &str,
        date: &str,
        batches: &[RecordBatch],
        compression: Compression,
    ) -> Result<PathBuf> {
        let dir = self.partition_dir(table, tenant, date);
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        // The writer id keeps names unique when several processes (pipeline workers)
        // share one store directory; the checksum of the bytes completes the name.
        let base = format!(
            "part-{:013}-{}-{:08}",
            EventTime::now().0,
            self.writer,
            self.seq.fetch_add(1, Ordering::Relaxed)
        );
        let tmp = dir.join(format!("{base}.tmp"));
        let file = File::create(&tmp).map_err(io_err(&tmp))?;
        let props = WriterProperties::builder()
            .set_compression(compression)
            .build();
        let encode = |e: datafusion::parquet::errors::ParquetError| StoreError::Encode {
            table: table.name(),
            message: e.to_string(),
        };
        let out = integrity::Checksummed {
            inner: file,
            hasher: crc32fast::Hasher::new(),
        };
        let mut writer =
            ArrowWriter::try_new(out, table.file_schema(), Some(props)).map_err(encode)?;
        for batch in batches {
            writer.write(batch).map_err(encode)?;
        }
        let out = writer.into_inner().map_err(encode)?;
        out.inner.sync_all().map_err(io_err(&tmp))?;
        let path = dir.join(integrity::checksummed_name(&base, out.hasher.finalize()));
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&dir))?;
        self.integrity().mark_verified(path.clone());
        metrics()
            .store_files_written
            .with_label_values(&[table.name()])
            .inc();
        Ok(path)
    }

    /// Live Parquet files of a partition directory (not retired by compaction).
    fn live_files(&self, dir: &Path) -> Result<Vec<PathBuf>> {
        let mut files: Vec<PathBuf> = fs::read_dir(dir)
            .map_err(io_err(dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
            .filter(|p| !self.snapshots.is_retired(p))
            .collect();
        files.sort();
        Ok(files)
    }

    /// Runs one compaction round on the calling thread (blocking: file reads, decoding,
    /// deduplication, encoding, fsyncs), for a blocking thread (`spawn_blocking`), so that
    /// merging never occupies the server's async workers.
    ///
    /// In every partition it merges one tier of files ([`tier`]): the small files, and a
    /// large one only once the small ones add up to half its size. So the file of a day
    /// that keeps receiving events is not rewritten at every round (which made the cost
    /// of a round grow with the day), and each row is rewritten a logarithmic number of
    /// times. Also deletes retired files no query can still read. Returns the number of
    /// partitions compacted.
    pub fn compact_blocking(&self, min_files: usize) -> Result<usize> {
        self.sweep_retired();
        let mut compacted = 0;
        for table in Table::ALL {
            for tenant_dir in subdirs(&self.table_dir(table))? {
                for date_dir in subdirs(&tenant_dir)? {
                    let files = tier(&self.live_files(&date_dir)?, min_files);
                    if files.is_empty() {
                        continue;
                    }
                    if let Err(e) = self.compact_partition(table, &date_dir, &files) {
                        // Other partitions and tenants compact on.
                        tracing::warn!(table = table.name(), partition = %date_dir.display(), error = %e, "compacting a partition failed; it is left as it is");
                        continue;
                    }
                    compacted += 1;
                    metrics()
                        .store_compactions
                        .with_label_values(&[table.name()])
                        .inc();
                }
            }
        }
        Ok(compacted)
    }

    /// [`Self::compact_blocking`] for callers in async code that may block (tests,
    /// tools); a server runs it on a blocking thread instead.
    pub async fn compact(&self, min_files: usize) -> Result<usize> {
        self.compact_blocking(min_files)
    }

    fn compact_partition(&self, table: Table, dir: &Path, files: &[PathBuf]) -> Result<()> {
        let schema = table.file_schema();
        let mut batches = Vec::new();
        let mut merged_files = Vec::with_capacity(files.len());
        for path in files {
            // A damaged input leaves the partition, not the compaction.
            if !self.integrity().check(path) {
                continue;
            }
            match read_file(path) {
                Ok(b) => {
                    batches.extend(b);
                    merged_files.push(path.clone());
                }
                Err(e) => self.integrity().quarantine(path, &e)?,
            }
        }
        if merged_files.is_empty() {
            return Ok(());
        }
        let merged = dedupe(table, &schema, &batches)?;
        let tenant = partition_value(dir.parent().unwrap_or(dir), "tenant_id");
        let date = partition_value(dir, "date");
        self.write_file(
            table,
            &tenant,
            &date,
            &[merged],
            Compression::ZSTD(ZstdLevel::default()),
        )?;
        self.snapshots.retire(&merged_files);
        Ok(())
    }

    fn sweep_retired(&self) {
        for path in self.snapshots.sweep(|path| {
            let _ = fs::remove_file(path);
        }) {
            self.integrity().forget(&path);
        }
    }
}

/// Every batch of one Parquet file, or why it does not decode.
pub fn read_file(path: &Path) -> std::result::Result<Vec<RecordBatch>, String> {
    let file = File::open(path).map_err(|e| e.to_string())?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .and_then(|b| b.build())
        .map_err(|e| e.to_string())?;
    reader
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())
}

pub(crate) fn partition_value(dir: &Path, column: &str) -> String {
    dir.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix(&format!("{column}=")))
        .unwrap_or_default()
        .to_string()
}

/// Keeps one row per upsert key, the one with the highest version column, ordered by time.
/// The files of a partition (in name order, which is write order) that one compaction
/// round merges: taken smallest first while each is at most twice the size of those
/// taken before it together; none unless at least `min_files` (and 2) qualify. Returned
/// in name order, so that among rows of equal version the later file's wins.
fn tier(files: &[PathBuf], min_files: usize) -> Vec<PathBuf> {
    let mut sized: Vec<(u64, &PathBuf)> = files
        .iter()
        .map(|f| (fs::metadata(f).map_or(0, |m| m.len()), f))
        .collect();
    sized.sort();
    let mut taken = 0;
    let mut total = 0u64;
    for (size, _) in &sized {
        if taken > 0 && *size > total.saturating_mul(2) {
            break;
        }
        total += size;
        taken += 1;
    }
    if taken < min_files.max(2) {
        return Vec::new();
    }
    let mut chosen: Vec<PathBuf> = sized[..taken].iter().map(|(_, f)| (*f).clone()).collect();
    chosen.sort();
    chosen
}

/// One row per upsert key (the highest version; on a tie, the row read last), sorted by
/// person and time: hashing the key columns' row encoding, then two `take`s.
fn dedupe(table: Table, schema: &SchemaRef, batches: &[RecordBatch]) -> Result<RecordBatch> {
    use datafusion::arrow::array::{Array, UInt32Array};
    use datafusion::arrow::compute::{
        SortColumn, cast, concat_batches, lexsort_to_indices, take_record_batch,
    };
    use datafusion::arrow::row::{RowConverter, SortField};

    let query = |e: datafusion::arrow::error::ArrowError| StoreError::Query(e.to_string());
    let all = concat_batches(schema, batches).map_err(query)?;
    let column = |name: &str| {
        all.column_by_name(name).cloned().ok_or_else(|| {
            StoreError::Query(format!("table {} has no column {name}", table.name()))
        })
    };
    let kept = match table.upsert_key() {
        Some((key, version)) => {
            let keys = key.iter().map(|c| column(c)).collect::<Result<Vec<_>>>()?;
            let converter = RowConverter::new(
                keys.iter()
                    .map(|k| SortField::new(k.data_type().clone()))
                    .collect(),
            )
            .map_err(query)?;
            let rows = converter.convert_columns(&keys).map_err(query)?;
            let versions = cast(&column(version)?, &DataType::Int64).map_err(query)?;
            let versions = versions
                .as_any()
                .downcast_ref::<datafusion::arrow::array::Int64Array>()
                .expect("cast to Int64");
            let version_at = |i: usize| {
                if versions.is_null(i) {
                    i64::MIN
                } else {
                    versions.value(i)
                }
            };
            let mut best: std::collections::HashMap<datafusion::arrow::row::Row<'_>, u32> =
                std::collections::HashMap::with_capacity(all.num_rows());
            for i in 0..all.num_rows() {
                best.entry(rows.row(i))
                    .and_modify(|at| {
                        if version_at(i) >= version_at(*at as usize) {
                            *at = i as u32;
                        }
                    })
                    .or_insert(i as u32);
            }
            let mut idx: Vec<u32> = best.into_values().collect();
            idx.sort_unstable();
            take_record_batch(&all, &UInt32Array::from(idx)).map_err(query)?
        }
        None => all,
    };
    let order = lexsort_to_indices(
        &[
            SortColumn {
                values: kept.column_by_name("user_id").cloned().ok_or_else(|| {
                    StoreError::Query(format!("table {} has no user_id", table.name()))
                })?,
                options: None,
            },
            SortColumn {
                values: kept
                    .column_by_name(table.time_column())
                    .cloned()
                    .ok_or_else(|| {
                        StoreError::Query(format!("table {} has no time column", table.name()))
                    })?,
                options: None,
            },
        ],
        None,
    )
    .map_err(query)?;
    take_record_batch(&kept, &order).map_err(query)
}

fn subdirs(dir: &Path) -> Result<Vec<PathBuf>> {
    if !dir.exists() {
        return Ok(Vec::new());
    }
    Ok(fs::read_dir(dir)
        .map_err(io_err(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect())
}

/// Every file under `dir`, recursively.
pub(crate) fn walk_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let path = entry.map_err(io_err(dir))?.path();
        if path.is_dir() {
            out.extend(walk_files(&path)?);
        } else {
            out.push(path);
        }
    }
    Ok(out)
}

#[async_trait]
impl StoreSink for ParquetStore {
    async fn write(&self, batch: &StoreBatch) -> Result<()> {
        // Parquet encoding and fsync are blocking work; keep them off the async workers.
        // (Requires the multi-threaded runtime, which the server always uses.)
        let result: Result<()> = tokio::task::block_in_place(|| {
            // Feature rows before the raw events they come from: the pipeline reopens a day
            // from its stored events and takes them as what its rows were computed from.
            self.write_rows(Table::Features, &batch.features)?;
            self.write_rows(Table::Events, &batch.events)?;
            self.write_rows(Table::DeadLetters, &batch.dead_letters)?;
            Ok(())
        });
        match &result {
            Ok(()) => self.healthy.store(true, Ordering::Relaxed),
            Err(e) => {
                self.healthy.store(false, Ordering::Relaxed);
                *self.last_error.lock().expect("error lock") = e.to_string();
            }
        }
        result
    }

    fn status(&self) -> StoreStatus {
        let healthy = self.healthy.load(Ordering::Relaxed);
        StoreStatus {
            healthy,
            detail: if healthy {
                "parquet store ok".into()
            } else {
                self.last_error.lock().expect("error lock").clone()
            },
        }
    }
}

/// Builds a record batch for `schema` from rows in their serde JSON form, reading each
/// column at its layout path.
fn batch_from_values(
    table: Table,
    layout: &Layout,
    schema: &SchemaRef,
    rows: &[Value],
) -> Result<RecordBatch> {
    let mut arrays: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
    for field in schema.fields() {
        let column = layout
            .column(field.name())
            .expect("file schema columns come from the layout");
        arrays.push(column_array(table, column, rows)?);
    }
    RecordBatch::try_new(schema.clone(), arrays).map_err(|e| StoreError::Encode {
        table: table.name(),
        message: e.to_string(),
    })
}

fn lookup<'a>(row: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut v = row;
    for seg in path {
        v = v.get(seg)?;
    }
    if v.is_null() { None } else { Some(v) }
}

fn column_array(table: Table, column: &Column, rows: &[Value]) -> Result<ArrayRef> {
    let bad = |row: usize, what: &str| StoreError::Encode {
        table: table.name(),
        message: format!("row {row}: column {} {what}", column.name),
    };
    let values = rows.iter().map(|r| lookup(r, &column.path));
    let array: ArrayRef = match &column.data_type {
        DataType::Utf8 => {
            let mut b = StringBuilder::new();
            for v in values {
                match v {
                    None => b.append_null(),
                    Some(Value::String(s)) => b.append_value(s),
                    Some(other) => b.append_value(other.to_string()),
                }
            }
            Arc::new(b.finish())
        }
        DataType::Timestamp(_, tz) => {
            let mut b = TimestampMillisecondBuilder::new();
            for (i, v) in values.enumerate() {
                match v {
                    None => b.append_null(),
                    Some(v) => {
                        let text = v.as_str().ok_or_else(|| bad(i, "is not a timestamp"))?;
                        let t = EventTime::parse_rfc3339(text).map_err(|e| bad(i, &e))?;
                        b.append_value(t.0);
                    }
                }
            }
            Arc::new(b.finish().with_timezone_opt(tz.clone()))
        }
        DataType::Boolean => {
            let mut b = BooleanBuilder::new();
            for v in values {
                b.append_option(v.and_then(Value::as_bool));
            }
            Arc::new(b.finish())
        }
        DataType::Float64 => {
            let mut b = Float64Builder::new();
            for v in values {
                b.append_option(v.and_then(Value::as_f64));
            }
            Arc::new(b.finish())
        }
        DataType::Int64 => {
            let mut b = Int64Builder::new();
            for v in values {
                b.append_option(v.and_then(Value::as_i64));
            }
            Arc::new(b.finish())
        }
        DataType::UInt64 => {
            let mut b = UInt64Builder::new();
            for v in values {
                b.append_option(v.and_then(Value::as_u64));
            }
            Arc::new(b.finish())
        }
        DataType::UInt32 => {
            let mut b = UInt32Builder::new();
            for v in values {
                b.append_option(
                    v.and_then(Value::as_u64)
                        .and_then(|n| u32::try_from(n).ok()),
                );
            }
            Arc::new(b.finish())
        }
        DataType::UInt16 => {
            let mut b = UInt16Builder::new();
            for v in values {
                b.append_option(
                    v.and_then(Value::as_u64)
                        .and_then(|n| u16::try_from(n).ok()),
                );
            }
            Arc::new(b.finish())
        }
        DataType::List(_) => {
            let mut b = ListBuilder::new(StringBuilder::new());
            for v in values {
                for item in v.and_then(Value::as_array).into_iter().flatten() {
                    b.values().append_option(item.as_str());
                }
                // Lists are never null: an absent list is empty.
                b.append(true);
            }
            Arc::new(b.finish())
        }
        other => {
            return Err(StoreError::Encode {
                table: table.name(),
                message: format!("column {} has unsupported type {other}", column.name),
            });
        }
    };
    if !column.nullable && array.null_count() > 0 {
        return Err(bad(0, "holds nulls but is not nullable"));
    }
    Ok(array)
}

/// Schema as written to a file, exposed for readers that need the exact field order.
pub fn file_schema(table: Table) -> Schema {
    table.file_schema().as_ref().clone()
}

#[cfg(test)]
mod tests {
    use super::*;
    use digame_schemas::{ActivityEvent, FeatureRow, Granularity};

    /// Both stores keep one row per key with the same key: the embedded store's
    /// deduplication key, with the tenant its directories carry, is ClickHouse's
    /// replacing key of the same table, and the same column wins. Raw events sort by time
    /// in ClickHouse, so their key there has the time between the person and the id.
    #[test]
    fn both_stores_deduplicate_by_the_same_key() {
        let clickhouse = digame_schemas::clickhouse::tables();
        let spec = |name: &str| clickhouse.iter().find(|t| t.name == name).unwrap();
        let (key, version) = Table::Features.upsert_key().unwrap();
        let with_tenant: Vec<&str> = std::iter::once("tenant_id")
            .chain(key.iter().copied())
            .collect();
        assert_eq!(with_tenant, spec("features").order_by);
        assert_eq!(
            spec("features").engine,
            digame_schemas::clickhouse::Engine::Replacing {
                version: Some(version)
            }
        );
        let (key, _) = Table::Events.upsert_key().unwrap();
        let order = &spec("events").order_by;
        assert!(key.iter().all(|c| order.contains(c)), "{key:?} ⊄ {order:?}");
    }

    fn feature(value: f64, revision: i64) -> FeatureRow {
        FeatureRow {
            tenant_id: "acme".into(),
            user_id: "u1".into(),
            granularity: Granularity::Hour,
            window_start: EventTime(1_795_510_800_000),
            window_end: EventTime(1_795_514_400_000),
            timezone: "UTC".into(),
            feature: "active_seconds".into(),
            dimension: String::new(),
            value,
            feature_version: 1,
            params_version: 0,
            is_final: false,
            revision,
            final_revision: 0,
        }
    }

    fn read_all(dir: &Path) -> Vec<RecordBatch> {
        let mut out = Vec::new();
        for f in walk_files(dir).unwrap() {
            if f.extension().is_some_and(|e| e == "parquet") {
                let r = ParquetRecordBatchReaderBuilder::try_new(File::open(&f).unwrap())
                    .unwrap()
                    .build()
                    .unwrap();
                out.extend(r.map(|b| b.unwrap()));
            }
        }
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_partitioned_files_and_compaction_keeps_latest_revision() {
        let dir = tempfile::tempdir().unwrap();
        let store = ParquetStore::open(dir.path()).unwrap();
        for rev in 1..=3 {
            store
                .write(&StoreBatch {
                    features: vec![feature(rev as f64 * 10.0, rev)],
                    ..Default::default()
                })
                .await
                .unwrap();
        }
        let part = dir.path().join("features/tenant_id=acme/date=2026-11-24");
        assert_eq!(store.live_files(&part).unwrap().len(), 3);
        assert_eq!(store.compact(3).await.unwrap(), 1);
        store.sweep_retired();
        let files = store.live_files(&part).unwrap();
        assert_eq!(files.len(), 1);
        let batches = read_all(&part);
        let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
        assert_eq!(rows, 1);
        let values = batches[0]
            .column_by_name("value")
            .unwrap()
            .as_any()
            .downcast_ref::<datafusion::arrow::array::Float64Array>()
            .unwrap()
            .value(0);
        assert_eq!(values, 30.0);
        assert!(batches[0].column_by_name("tenant_id").is_none());
    }

    /// Cuts the last `n` bytes off a file (its footer, as a bad block or a short write
    /// would).
    fn truncate(file: &Path, n: u64) {
        let f = fs::OpenOptions::new().write(true).open(file).unwrap();
        let len = f.metadata().unwrap().len();
        f.set_len(len - n).unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_damaged_file_is_quarantined_and_the_rest_compacts() {
        let dir = tempfile::tempdir().unwrap();
        let store = ParquetStore::open(dir.path()).unwrap();
        // Two partitions (two days) of three files each.
        let day = 86_400_000;
        for rev in 1..=3 {
            let mut other = feature(rev as f64, rev);
            other.window_start = EventTime(other.window_start.0 + day);
            other.window_end = EventTime(other.window_end.0 + day);
            store
                .write(&StoreBatch {
                    features: vec![feature(rev as f64 * 10.0, rev), other],
                    ..Default::default()
                })
                .await
                .unwrap();
        }
        let part = dir.path().join("features/tenant_id=acme/date=2026-11-24");
        let next = dir.path().join("features/tenant_id=acme/date=2026-11-25");
        let victim = store.live_files(&part).unwrap()[2].clone();
        truncate(&victim, 10);
        // Both partitions compact: the damaged file leaves its partition first.
        assert_eq!(store.compact(3).await.unwrap(), 2);
        store.sweep_retired();
        let moved = dir
            .path()
            .join("quarantine/features/tenant_id=acme/date=2026-11-24")
            .join(victim.file_name().unwrap());
        assert!(moved.exists(), "{}", moved.display());
        assert!(!victim.exists());
        // What is left of the day: revisions 1 and 2, the latest kept.
        let value = |dir: &Path| {
            let batches = read_all(dir);
            assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 1);
            batches[0]
                .column_by_name("value")
                .unwrap()
                .as_any()
                .downcast_ref::<datafusion::arrow::array::Float64Array>()
                .unwrap()
                .value(0)
        };
        assert_eq!(value(&part), 20.0);
        assert_eq!(value(&next), 3.0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_file_with_a_broken_footer_is_quarantined_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = ParquetStore::open(dir.path()).unwrap();
        for rev in 1..=2 {
            store
                .write(&StoreBatch {
                    features: vec![feature(rev as f64, rev)],
                    ..Default::default()
                })
                .await
                .unwrap();
        }
        let part = dir.path().join("features/tenant_id=acme/date=2026-11-24");
        let files = store.live_files(&part).unwrap();
        truncate(&files[0], 10);
        drop(store);
        let store = ParquetStore::open(dir.path()).unwrap();
        assert_eq!(store.live_files(&part).unwrap(), vec![files[1].clone()]);
        assert_eq!(read_all(&part).len(), 1);
        assert!(
            dir.path()
                .join("quarantine/features/tenant_id=acme/date=2026-11-24")
                .join(files[0].file_name().unwrap())
                .exists()
        );
    }

    #[test]
    fn a_round_merges_the_small_files_and_a_large_one_only_once_they_add_up() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, size: usize| {
            let path = dir.path().join(name);
            std::fs::write(&path, vec![0u8; size]).unwrap();
            path
        };
        // An earlier merge (100 bytes) and three flushes of 10.
        let big = file("part-1.parquet", 100);
        let small: Vec<PathBuf> = (2..5)
            .map(|i| file(&format!("part-{i}.parquet"), 10))
            .collect();
        let all: Vec<PathBuf> = std::iter::once(big.clone()).chain(small.clone()).collect();
        assert_eq!(tier(&all, 3), small, "100 > 2 x 30: the large file waits");
        assert_eq!(tier(&all, 4), Vec::<PathBuf>::new(), "only three qualify");
        // Once the small files add up to half of it, it is merged with them.
        let more: Vec<PathBuf> = (5..7)
            .map(|i| file(&format!("part-{i}.parquet"), 10))
            .collect();
        let all: Vec<PathBuf> = all.into_iter().chain(more).collect();
        assert_eq!(tier(&all, 3), all, "100 <= 2 x 50");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flipped_page_byte_under_a_valid_footer_is_found_and_its_repair_remembered() {
        let dir = tempfile::tempdir().unwrap();
        let store = ParquetStore::open(dir.path()).unwrap();
        let rows: Vec<FeatureRow> = (1..=3).map(|r| feature(r as f64, r)).collect();
        store
            .write(&StoreBatch {
                features: rows,
                ..Default::default()
            })
            .await
            .unwrap();
        let part = dir.path().join("features/tenant_id=acme/date=2026-11-24");
        let file = store.live_files(&part).unwrap().remove(0);
        drop(store);
        // A byte of the first page (the footer sits at the end and stays valid).
        let mut bytes = std::fs::read(&file).unwrap();
        bytes[8] ^= 0x01;
        std::fs::write(&file, &bytes).unwrap();
        let store = ParquetStore::open(dir.path()).unwrap();
        assert!(store.live_files(&part).unwrap().is_empty());
        let pending = store.integrity().pending();
        assert_eq!(pending.len(), 1, "{pending:?}");
        let d = &pending[0];
        assert_eq!(
            (d.table, &*d.tenant, &*d.date),
            ("features", "acme", "2026-11-24")
        );
        assert_eq!(
            d.rows,
            Some(3),
            "the footer still says how many rows it held"
        );
        assert!(d.error.starts_with("checksum mismatch"), "{}", d.error);
        let outcome = integrity::RepairOutcome {
            source: "test".into(),
            rows_rebuilt: 3,
            lost: Some(0),
            altered: 0,
            detail: String::new(),
            at: EventTime(1),
        };
        store.integrity().resolve(&d.file, outcome.clone()).unwrap();
        assert!(store.integrity().pending().is_empty());
        drop(store);
        // A restart remembers the range as rebuilt, not pending.
        let store = ParquetStore::open(dir.path()).unwrap();
        assert!(store.integrity().pending().is_empty());
        let repaired = store.integrity().repaired();
        assert_eq!(repaired.len(), 1);
        assert_eq!(repaired[0].repair, Some(outcome));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_id_reused_by_another_person_erases_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = ParquetStore::open(dir.path()).unwrap();
        let event = |user: &str| -> ActivityEvent {
            serde_json::from_value(serde_json::json!({
                "event_id": "0190a000-0000-7000-8000-000000000007", "tenant_id": "acme",
                "user_id": user, "source": "git", "kind": "commit",
                "timestamp": "2026-11-24T09:00:00Z", "received_at": "2026-11-24T09:00:01Z",
                "attributes": {"project": "p"},
            }))
            .unwrap()
        };
        // Ana's event, a retry of it, and Ben's event under the same id, in three flushes.
        for ev in [event("ana"), event("ana"), event("ben")] {
            store
                .write(&StoreBatch {
                    events: vec![ev],
                    ..Default::default()
                })
                .await
                .unwrap();
        }
        assert_eq!(store.compact(3).await.unwrap(), 1);
        store.sweep_retired();
        let batches = read_all(&dir.path().join("events"));
        let users: Vec<String> = batches
            .iter()
            .flat_map(|b| {
                let col = b
                    .column_by_name("user_id")
                    .unwrap()
                    .as_any()
                    .downcast_ref::<datafusion::arrow::array::StringArray>()
                    .unwrap()
                    .clone();
                (0..datafusion::arrow::array::Array::len(&col))
                    .map(move |i| col.value(i).to_string())
            })
            .collect();
        let mut users = users;
        users.sort();
        assert_eq!(
            users,
            ["ana", "ben"],
            "one copy each: the retry folded, Ben's kept"
        );
    }

    #[test]
    fn event_rows_encode_every_column() {
        let dir = tempfile::tempdir().unwrap();
        let store = ParquetStore::open(dir.path()).unwrap();
        let ev: ActivityEvent = serde_json::from_str(
            r#"{"event_id":"0190a000-0000-7000-8000-000000000001","tenant_id":"acme","user_id":"u","source":"aw","kind":"meeting","timestamp":"2026-11-24T09:00:00Z","received_at":"2026-11-24T09:00:01Z","duration_ms":1800000,"attributes":{"title":"standup","participants":["a","b"]},"properties":{"x":1}}"#,
        )
        .unwrap();
        assert_eq!(store.write_rows(Table::Events, &[ev]).unwrap(), 1);
        let batches = read_all(&dir.path().join("events"));
        let b = &batches[0];
        assert_eq!(b.num_rows(), 1);
        assert_eq!(b.schema(), Table::Events.file_schema());
        let props = b
            .column_by_name("properties")
            .unwrap()
            .as_any()
            .downcast_ref::<datafusion::arrow::array::StringArray>()
            .unwrap()
            .value(0)
            .to_string();
        assert_eq!(props, r#"{"x":1}"#);
    }
}
