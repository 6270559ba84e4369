//! `digame scrub`: a read-only check of an embedded data directory.
//!
//! Every segment of the embedded log is scanned frame by frame (the CRC of each record,
//! its offset order), the same way recovery does, and every Parquet file of the embedded
//! store is checked against the checksum in its name and decoded in full (footer,
//! metadata, every page). Nothing is changed:
//! the report says what is damaged and where, for an operator to decide (a restart
//! quarantines log damage itself). Meant for a stopped server or a backup; on a running
//! server the active segments may end in a write in progress, reported as a tail.

use std::fs::File;
use std::path::{Path, PathBuf};

use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde::Serialize;

use crate::bus::log::scan_segment_file;

/// What a scrub found.
#[derive(Debug, Default, Serialize)]
pub struct ScrubReport {
    pub segments: usize,
    pub records: u64,
    pub parquet_files: usize,
    pub parquet_rows: u64,
    /// Byte ranges of log segments where no valid record starts.
    pub damaged_ranges: Vec<DamagedRange>,
    /// Parquet files that do not decode, with the error.
    pub damaged_files: Vec<DamagedFile>,
}

impl ScrubReport {
    /// Nothing damaged.
    pub fn clean(&self) -> bool {
        self.damaged_ranges.is_empty() && self.damaged_files.is_empty()
    }
}

#[derive(Debug, Serialize)]
pub struct DamagedRange {
    pub segment: PathBuf,
    pub from: u64,
    pub to: u64,
    /// `middle` (valid records follow) or `tail` (nothing valid after it).
    pub kind: &'static str,
}

#[derive(Debug, Serialize)]
pub struct DamagedFile {
    pub file: PathBuf,
    pub error: String,
}

/// Scrubs the log under `bus_dir` and the Parquet files under `store_dir` (either may be
/// missing: a deployment on Kafka or ClickHouse has no such directory).
pub fn scrub(bus_dir: &Path, store_dir: &Path) -> std::io::Result<ScrubReport> {
    let mut report = ScrubReport::default();
    for path in files_with(bus_dir, "log")? {
        let scan = scan_segment_file(&path)?;
        report.segments += 1;
        report.records += scan.records;
        for r in scan.damaged {
            report.damaged_ranges.push(DamagedRange {
                segment: path.clone(),
                from: r.start as u64,
                to: r.end as u64,
                kind: "middle",
            });
        }
        if scan.valid_end < scan.len {
            report.damaged_ranges.push(DamagedRange {
                segment: path.clone(),
                from: scan.valid_end as u64,
                to: scan.len as u64,
                kind: "tail",
            });
        }
    }
    for path in files_with(store_dir, "parquet")? {
        report.parquet_files += 1;
        match parquet_rows(&path) {
            Ok(rows) => report.parquet_rows += rows,
            Err(error) => report.damaged_files.push(DamagedFile { file: path, error }),
        }
    }
    Ok(report)
}

/// Verifies a Parquet file against the checksum in its name, then decodes every row.
fn parquet_rows(path: &Path) -> Result<u64, String> {
    crate::store::integrity::verify(path)?;
    let file = File::open(path).map_err(|e| e.to_string())?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| e.to_string())?
        .build()
        .map_err(|e| e.to_string())?;
    let mut rows = 0;
    for batch in reader {
        rows += batch.map_err(|e| e.to_string())?.num_rows() as u64;
    }
    Ok(rows)
}

/// Files under `dir` (recursively, quarantine directories excepted) ending in `.ext`,
/// sorted.
fn files_with(dir: &Path, ext: &str) -> std::io::Result<Vec<PathBuf>> {
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut out: Vec<PathBuf> = crate::store::walk_files(dir)
        .map_err(|e| std::io::Error::other(e.to_string()))?
        .into_iter()
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .filter(|p| {
            !p.strip_prefix(dir)
                .is_ok_and(|r| r.iter().any(|c| c == "quarantine"))
        })
        .collect();
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::{EventBus, LogBus, LogConfig, Record, Topic};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_clean_log_is_clean_and_a_flipped_byte_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let bus_dir = dir.path().join("bus");
        let bus = LogBus::open(LogConfig {
            partitions: 1,
            ..LogConfig::new(&bus_dir)
        })
        .unwrap();
        let records: Vec<Record> = (0..20)
            .map(|i| Record {
                key: bytes::Bytes::from_static(b"t:a"),
                payload: bytes::Bytes::from(format!("payload {i:04}")),
                timestamp_ms: 1,
            })
            .collect();
        bus.publish(Topic::Events, records).await.unwrap();
        bus.close().await;
        let store = dir.path().join("store");
        let report = scrub(&bus_dir, &store).unwrap();
        assert!(report.clean(), "{report:?}");
        assert_eq!(report.records, 20);
        assert_eq!(report.segments, Topic::ALL.len());

        let seg = bus_dir
            .join("events")
            .join("0")
            .join("00000000000000000000.log");
        let mut data = std::fs::read(&seg).unwrap();
        let frame = data.len() / 20;
        data[frame * 7 + 30] ^= 0x10;
        std::fs::write(&seg, &data).unwrap();
        // A Parquet file cut short.
        std::fs::create_dir_all(&store).unwrap();
        std::fs::write(store.join("part-0.parquet"), b"PAR1 not really").unwrap();
        let report = scrub(&bus_dir, &store).unwrap();
        assert_eq!(report.damaged_ranges.len(), 1, "{report:?}");
        let r = &report.damaged_ranges[0];
        assert_eq!(
            (r.from, r.to, r.kind),
            (frame as u64 * 7, frame as u64 * 8, "middle")
        );
        assert_eq!(report.records, 19);
        assert_eq!(report.damaged_files.len(), 1, "{report:?}");
        // Read-only: the damage is still there.
        assert_eq!(std::fs::read(&seg).unwrap(), data);
    }
}
