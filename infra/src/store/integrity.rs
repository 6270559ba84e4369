//! Whether a store file is what was written: checksums, quarantine, and the ledger of
//! damage that `/readyz` reports and the repair works through.
//!
//! Every file the embedded store writes carries the CRC-32 of its bytes in its name
//! (`…-c<8 hex digits>.parquet`), fixed by the rename that publishes it, so name and bytes
//! can never disagree except by damage. Parquet's page checksums are optional and the
//! encoder used here does not write them: without this, a flipped byte inside a page
//! under a valid footer would decode to wrong values, or fail only when a query reaches
//! it. Files are immutable, so each is verified once per process, before the first query
//! or compaction reads it (the store verifies every file when it opens, and the query
//! engine's file listing verifies any file it has not seen verified). A file without a
//! checksum in its name (written before names carried one) is checked by decoding every
//! page.
//!
//! A file that fails is moved to `<root>/quarantine/<table>/tenant_id=…/date=…/`, outside
//! every table, and entered in the ledger: table, tenant, date, the rows its footer
//! declares where the footer still reads, and why. An entry is *pending* until the range
//! is rebuilt; the repair records its outcome beside the quarantined file
//! (`<file>.repair.json`), so a restart knows what is still to do.

use std::collections::{HashSet, VecDeque};
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use datafusion::parquet::file::reader::{FileReader, SerializedFileReader};
use digame_schemas::EventTime;
use serde::{Deserialize, Serialize};

use super::{Result, Table, io_err, partition_value, read_file};
use crate::telemetry::metrics;

/// Repaired entries kept for `/readyz`, newest last.
const KEEP_REPAIRED: usize = 32;

/// A damaged store file: where it is kept and what range of the store it held.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Damage {
    pub table: &'static str,
    pub tenant: String,
    pub date: String,
    /// The quarantined file.
    pub file: PathBuf,
    /// Rows its footer declares, where the footer still decodes.
    pub rows: Option<u64>,
    pub error: String,
    pub found_at: EventTime,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repair: Option<RepairOutcome>,
}

impl Damage {
    pub fn table(&self) -> Table {
        Table::from_name(self.table).expect("ledger entries name a table")
    }
}

/// What rebuilding a damaged range did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RepairOutcome {
    /// Where the rows came back from.
    pub source: String,
    /// Rows written back into the range.
    pub rows_rebuilt: u64,
    /// Rows of the damaged file found nowhere else; `None` when that cannot be known
    /// (the source no longer reaches back far enough to tell).
    pub lost: Option<u64>,
    /// Ids the damaged file still yields that were never on the source: values the damage
    /// itself changed (a flipped bit in an uncompressed run), not rows that existed.
    #[serde(default)]
    pub altered: u64,
    pub detail: String,
    pub at: EventTime,
}

#[derive(Debug, Default)]
struct Ledger {
    pending: Vec<Damage>,
    repaired: VecDeque<Damage>,
}

/// The verified files and the ledger of damage, shared by the store and the query engine.
#[derive(Debug, Default)]
pub struct Integrity {
    verified: Mutex<HashSet<PathBuf>>,
    ledger: Mutex<Ledger>,
    found: tokio::sync::Notify,
}

/// The name a file published with checksum `crc` gets, from its base name.
pub fn checksummed_name(base: &str, crc: u32) -> String {
    format!("{base}-c{crc:08x}.parquet")
}

/// The checksum a file's name declares, if it declares one.
pub fn declared_crc(path: &Path) -> Option<u32> {
    let stem = path.file_name()?.to_str()?.strip_suffix(".parquet")?;
    let (_, tail) = stem.rsplit_once('-')?;
    let hex = tail.strip_prefix('c')?;
    (hex.len() == 8)
        .then(|| u32::from_str_radix(hex, 16).ok())
        .flatten()
}

/// Checks one file: its bytes against the checksum in its name, or, for a name without
/// one, that every page decodes. The error says what is wrong.
pub fn verify(path: &Path) -> std::result::Result<(), String> {
    match declared_crc(path) {
        Some(expected) => {
            let mut file = File::open(path).map_err(|e| e.to_string())?;
            let mut hasher = crc32fast::Hasher::new();
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let n = file.read(&mut buf).map_err(|e| e.to_string())?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
            }
            let actual = hasher.finalize();
            if actual == expected {
                Ok(())
            } else {
                Err(format!(
                    "checksum mismatch: the name declares {expected:08x}, the bytes hash to {actual:08x} (the file was changed after it was written)"
                ))
            }
        }
        None => read_file(path).map(|_| ()),
    }
}

/// Rows a Parquet file's footer declares, if the footer decodes.
fn footer_rows(path: &Path) -> Option<u64> {
    let file = File::open(path).ok()?;
    let reader = SerializedFileReader::new(file).ok()?;
    u64::try_from(reader.metadata().file_metadata().num_rows()).ok()
}

/// A file's place in the store: (root, table, tenant, date), from
/// `<root>/<table>/tenant_id=<t>/date=<d>/<file>`.
fn place(file: &Path) -> Option<(PathBuf, Table, String, String)> {
    let date_dir = file.parent()?;
    let tenant_dir = date_dir.parent()?;
    let table_dir = tenant_dir.parent()?;
    let table = Table::from_name(table_dir.file_name()?.to_str()?)?;
    Some((
        table_dir.parent()?.to_path_buf(),
        table,
        partition_value(tenant_dir, "tenant_id"),
        partition_value(date_dir, "date"),
    ))
}

/// A `Write` that hashes what passes through it.
pub(crate) struct Checksummed<W> {
    pub inner: W,
    pub hasher: crc32fast::Hasher,
}

impl<W: Write> Write for Checksummed<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl Integrity {
    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn verified(&self) -> std::sync::MutexGuard<'_, HashSet<PathBuf>> {
        self.verified.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `file` was verified by this process (or written by it).
    pub fn is_verified(&self, file: &Path) -> bool {
        self.verified().contains(file)
    }

    /// Records a file this process wrote and checksummed itself.
    pub(crate) fn mark_verified(&self, file: PathBuf) {
        self.verified().insert(file);
    }

    /// Forgets files that are gone (retired by compaction, deleted).
    pub(crate) fn forget(&self, file: &Path) {
        self.verified().remove(file);
    }

    /// Verifies `file` unless already verified; a damaged file is quarantined and
    /// entered in the ledger. Whether it may be read. Blocking: reads the whole file.
    pub fn check(&self, file: &Path) -> bool {
        if self.is_verified(file) {
            return true;
        }
        match verify(file) {
            Ok(()) => {
                self.mark_verified(file.to_path_buf());
                true
            }
            // Gone since it was listed (compaction retired it): nothing to read.
            Err(_) if !file.exists() => false,
            Err(e) => {
                if let Err(q) = self.quarantine(file, &e) {
                    tracing::error!(file = %file.display(), error = %q, "could not quarantine a damaged store file; it is left out of reads");
                }
                false
            }
        }
    }

    /// Moves a damaged file out of the store's tables into
    /// `<root>/quarantine/<table>/<its partition path>`, where no query lists it, and
    /// enters it in the ledger.
    pub fn quarantine(&self, file: &Path, why: &str) -> Result<()> {
        let Some((root, table, tenant, date)) = place(file) else {
            return Err(super::StoreError::Unsupported(format!(
                "{} is not a file of a store table",
                file.display()
            )));
        };
        let rows = footer_rows(file);
        let relative = file.strip_prefix(root.join(table.name())).unwrap_or(file);
        let to = root.join("quarantine").join(table.name()).join(relative);
        let dir = to.parent().unwrap_or(&root);
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        fs::rename(file, &to).map_err(io_err(file))?;
        if let Some(from) = file.parent() {
            let _ = File::open(from).and_then(|d| d.sync_all());
        }
        self.forget(file);
        tracing::warn!(
            table = table.name(),
            tenant,
            date,
            rows,
            kept = %to.display(),
            error = why,
            "a damaged store file was quarantined; the rest of the store reads on, and the range is rebuilt from the bus"
        );
        metrics()
            .store_quarantined_files
            .with_label_values(&[table.name()])
            .inc();
        self.ledger().pending.push(Damage {
            table: table.name(),
            tenant,
            date,
            file: to,
            rows,
            error: why.to_string(),
            found_at: EventTime::now(),
            repair: None,
        });
        self.found.notify_one();
        Ok(())
    }

    /// Enters the quarantined files under `root` in the ledger: pending without a repair
    /// record, repaired with one. Called when the store opens.
    pub(crate) fn load(&self, root: &Path) -> Result<()> {
        let quarantine = root.join("quarantine");
        let mut ledger = self.ledger();
        for table in Table::ALL {
            let dir = quarantine.join(table.name());
            if !dir.exists() {
                continue;
            }
            for file in super::walk_files(&dir)? {
                if file.extension().is_none_or(|e| e != "parquet") {
                    continue;
                }
                let partition = file.parent().unwrap_or(&dir);
                let mut damage = Damage {
                    table: table.name(),
                    tenant: partition_value(partition.parent().unwrap_or(partition), "tenant_id"),
                    date: partition_value(partition, "date"),
                    rows: footer_rows(&file),
                    error: "quarantined before this start".into(),
                    found_at: EventTime::now(),
                    repair: None,
                    file,
                };
                let record = repair_record(&damage.file);
                match fs::read(&record)
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok())
                {
                    Some(outcome) => {
                        damage.repair = Some(outcome);
                        ledger.repaired.push_back(damage);
                    }
                    None => ledger.pending.push(damage),
                }
            }
        }
        while ledger.repaired.len() > KEEP_REPAIRED {
            ledger.repaired.pop_front();
        }
        Ok(())
    }

    /// Damaged ranges not rebuilt yet.
    pub fn pending(&self) -> Vec<Damage> {
        self.ledger().pending.clone()
    }

    /// The most recent rebuilt ranges, oldest first.
    pub fn repaired(&self) -> Vec<Damage> {
        self.ledger().repaired.iter().cloned().collect()
    }

    /// Resolves until a file is quarantined (at once if one was since the last call).
    pub async fn damage_found(&self) {
        self.found.notified().await
    }

    /// Records that the range of the quarantined `file` was rebuilt: durably beside the
    /// file, then in the ledger.
    pub fn resolve(&self, file: &Path, outcome: RepairOutcome) -> Result<()> {
        let record = repair_record(file);
        let tmp = record.with_extension("json.tmp");
        let body = serde_json::to_vec_pretty(&outcome).expect("outcomes serialize");
        fs::write(&tmp, body).map_err(io_err(&tmp))?;
        File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(io_err(&tmp))?;
        fs::rename(&tmp, &record).map_err(io_err(&record))?;
        let mut ledger = self.ledger();
        if let Some(i) = ledger.pending.iter().position(|d| d.file == file) {
            let mut damage = ledger.pending.remove(i);
            damage.repair = Some(outcome);
            ledger.repaired.push_back(damage);
            while ledger.repaired.len() > KEEP_REPAIRED {
                ledger.repaired.pop_front();
            }
        }
        Ok(())
    }
}

/// The `<user_id>/<event_id>` of every row of an events file that still decodes (a
/// damaged file may: a flipped value fails only its checksum); `None` if it does not.
pub fn surviving_event_ids(file: &Path) -> Option<HashSet<String>> {
    use datafusion::arrow::array::{Array, AsArray};
    let mut ids = HashSet::new();
    for b in read_file(file).ok()? {
        let users = b.column_by_name("user_id")?.as_string_opt::<i32>()?;
        let events = b.column_by_name("event_id")?.as_string_opt::<i32>()?;
        for i in 0..b.num_rows() {
            if !events.is_null(i) {
                ids.insert(format!("{}/{}", users.value(i), events.value(i)));
            }
        }
    }
    Some(ids)
}

/// Where the repair of a quarantined file is recorded.
fn repair_record(file: &Path) -> PathBuf {
    let mut name = file.file_name().unwrap_or_default().to_os_string();
    name.push(".repair.json");
    file.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_declare_checksums_and_only_well_formed_ones() {
        let name = checksummed_name("part-0000000000001-abcd1234-00000007", 0x00c0_ffee);
        assert_eq!(
            name,
            "part-0000000000001-abcd1234-00000007-c00c0ffee.parquet"
        );
        assert_eq!(declared_crc(Path::new(&name)), Some(0x00c0_ffee));
        // Names from before checksums: the last field is the sequence number.
        assert_eq!(
            declared_crc(Path::new("part-0000000000001-abcd1234-00000007.parquet")),
            None
        );
        assert_eq!(declared_crc(Path::new("x-cnothex0.parquet")), None);
    }

    #[test]
    fn a_flipped_byte_fails_the_checksum_and_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let bytes: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let path = dir
            .path()
            .join(checksummed_name("part-1", crc32fast::hash(&bytes)));
        fs::write(&path, &bytes).unwrap();
        assert_eq!(verify(&path), Ok(()));
        let mut flipped = bytes.clone();
        flipped[4_321] ^= 0x04;
        fs::write(&path, &flipped).unwrap();
        let err = verify(&path).unwrap_err();
        assert!(err.starts_with("checksum mismatch"), "{err}");
    }
}
