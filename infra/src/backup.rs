//! `digame backup` and `digame restore`: a consistent copy of an embedded data directory,
//! taken while the server runs, and bringing it back into a new one.
//!
//! What a backup holds, and in which order it is taken (the order is what makes it
//! consistent without stopping anything):
//!
//! 1. **Metadata** (`meta.db`): SQLite's `VACUUM INTO`, a transactionally consistent copy.
//! 2. **Pipeline checkpoints** (`pipeline/…`): each is replaced atomically by a rename, so
//!    every copied file is one whole checkpoint. Each names the bus offset its state
//!    covers.
//! 3. **Store** (`store/…`): every complete Parquet file. Compaction writes its merged file
//!    before it deletes the inputs, so a file that vanished during the copy has its rows in
//!    a file that exists by the next listing; the copy repeats the listing until it finds
//!    nothing new, and keeps only files of the last listing.
//! 4. **Bus** (`bus/…`): each topic's committed group offsets first, then its segments; the
//!    newest segment of a partition is cut to its last whole record (a write in progress is
//!    not part of the backup). Copied after the checkpoints and offsets, the log holds every
//!    record they refer to.
//!
//! Taken in this order, the copy is a state a crash could have left: the store is at least
//! as new as the checkpoints (what a checkpoint emitted is stored), the log at least as new
//! as both (whatever was acknowledged before the checkpoint is there to replay). A restore
//! followed by the start-up replay therefore gives the same results as the source had for
//! every event acknowledged before the backup began.
//!
//! `manifest.json` lists every file with its size and CRC-32; `restore` verifies them all
//! before it writes anything, refuses a target that already holds data, and writes with
//! fsyncs. Parts a deployment keeps outside the data directory (Kafka, ClickHouse,
//! PostgreSQL) are named under `skipped`: their own tools back them up.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::bus::log::scan_segment_file;

/// Errors of a backup or restore, each naming the file.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("metadata copy failed: {0}")]
    Meta(String),
    #[error("{0}")]
    Refused(String),
    #[error("backup damaged: {0}; take a new backup or restore an older one")]
    Damaged(String),
}

pub type Result<T, E = BackupError> = std::result::Result<T, E>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BackupError + '_ {
    move |source| BackupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn now_ms() -> i64 {
    digame_schemas::EventTime::now().0
}

/// Where the parts of one deployment's data live; `None` for a part kept elsewhere.
#[derive(Clone, Debug)]
pub struct Layout {
    pub bus: Option<PathBuf>,
    pub store: Option<PathBuf>,
    /// The SQLite metadata file.
    pub meta: Option<PathBuf>,
    /// `<data_dir>/pipeline`: checkpoints by consumer group.
    pub pipeline: PathBuf,
    /// `<data_dir>/jwt.keys`, the generated token-signing keys (sessions survive a restore).
    pub jwt_keys: PathBuf,
    /// Parts not in the data directory, with what backs them up.
    pub skipped: Vec<String>,
}

impl Layout {
    /// The parts of `config` kept in its data directory (or wherever its `file://` and
    /// `sqlite://` URLs point); Kafka, ClickHouse and PostgreSQL are listed as skipped.
    pub fn of(config: &crate::config::Config) -> Result<Layout, String> {
        use crate::config::{BusBackend, StoreBackend};
        let mut skipped = Vec::new();
        let bus = match config.bus_backend()? {
            BusBackend::Embedded(dir) => Some(dir),
            BusBackend::Kafka { .. } => {
                skipped.push(
                    "bus: Kafka keeps its own replicas; back it up with Kafka's tools".into(),
                );
                None
            }
        };
        let store = match config.store_backend()? {
            StoreBackend::Embedded(dir) => Some(dir),
            StoreBackend::ClickHouse { .. } => {
                skipped
                    .push("store: ClickHouse; back it up with BACKUP or clickhouse-backup".into());
                None
            }
        };
        let meta = if config.meta.url.starts_with("sqlite://") {
            Some(
                crate::meta::sqlite_path(&config.meta.url, &config.data_dir)
                    .map_err(|e| e.to_string())?,
            )
        } else {
            skipped.push("metadata: PostgreSQL; back it up with pg_dump".into());
            None
        };
        Ok(Layout {
            bus,
            store,
            meta,
            pipeline: crate::config::pipeline_dir(&config.data_dir),
            jwt_keys: crate::config::jwt_keys_path(&config.data_dir),
            skipped,
        })
    }
}

/// One file of a backup.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Entry {
    /// Path inside the backup: `meta.db`, `jwt.keys`, `pipeline/…`, `store/…` or `bus/…`.
    pub path: String,
    pub bytes: u64,
    pub crc32: u32,
}

/// `manifest.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    /// When the backup began (ms since the epoch).
    pub started_ms: i64,
    pub finished_ms: i64,
    pub files: Vec<Entry>,
    pub skipped: Vec<String>,
    /// Store files that vanished while being copied (compaction); their rows are in files
    /// the backup holds.
    pub store_files_replaced: usize,
}

const FORMAT: u32 = 1;
const MANIFEST: &str = "manifest.json";
/// Listings of the store before giving up on a quiet moment.
const STORE_PASSES: usize = 20;

/// Takes a backup of `layout` into `to` (created; it must not hold anything yet).
pub async fn backup(layout: &Layout, to: &Path) -> Result<Manifest> {
    if to.exists() && fs::read_dir(to).map_err(io(to))?.next().is_some() {
        return Err(BackupError::Refused(format!(
            "{} is not empty; back up into a new directory",
            to.display()
        )));
    }
    fs::create_dir_all(to).map_err(io(to))?;
    let started_ms = now_ms();
    let mut files = Vec::new();
    if let Some(meta) = &layout.meta {
        let copy = to.join("meta.db");
        vacuum_into(meta, &copy).await?;
        files.push(entry(to, &copy)?);
    }
    let (copy_layout, to_owned) = (layout.clone(), to.to_path_buf());
    let (mut rest, replaced) =
        tokio::task::spawn_blocking(move || copy_files(&copy_layout, &to_owned))
            .await
            .map_err(|e| BackupError::Meta(format!("backup task failed: {e}")))??;
    files.append(&mut rest);
    let manifest = Manifest {
        format: FORMAT,
        started_ms,
        finished_ms: now_ms(),
        files,
        skipped: layout.skipped.clone(),
        store_files_replaced: replaced,
    };
    write_manifest(to, &manifest)?;
    Ok(manifest)
}

/// The blocking part of [`backup`]: checkpoints, store, bus, keys, then the manifest.
fn copy_files(layout: &Layout, to: &Path) -> Result<(Vec<Entry>, usize)> {
    let mut files = Vec::new();
    // 2. Checkpoints (quarantined ones and writes in progress are not state).
    for src in walk(&layout.pipeline)? {
        let rel = rel(&layout.pipeline, &src);
        if rel.contains("quarantine") || rel.ends_with(".tmp") {
            continue;
        }
        if let Some(e) = copy_one(&src, to, &format!("pipeline/{rel}"))? {
            files.push(e);
        }
    }
    // 3. Store.
    let mut replaced = 0;
    if let Some(store) = &layout.store {
        let (mut store_files, r) = copy_store(store, to)?;
        files.append(&mut store_files);
        replaced = r;
    }
    // 4. Bus: per topic, the group offsets, then the segments.
    if let Some(bus) = &layout.bus {
        let topics = match fs::read_dir(bus) {
            Ok(d) => d
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .collect::<Vec<_>>(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io(bus)(e)),
        };
        for topic in topics.iter().filter(|t| t.is_dir()) {
            for src in walk(&topic.join("groups"))? {
                let rel = rel(bus, &src);
                if let Some(e) = copy_one(&src, to, &format!("bus/{rel}"))? {
                    files.push(e);
                }
            }
            let mut segments: Vec<PathBuf> = walk(topic)?
                .into_iter()
                .filter(|p| p.extension().is_some_and(|x| x == "log"))
                .filter(|p| !rel(topic, p).contains("quarantine"))
                .collect();
            segments.sort();
            for (i, src) in segments.iter().enumerate() {
                let newest = segments
                    .get(i + 1)
                    .is_none_or(|next| next.parent() != src.parent());
                let rel = format!("bus/{}", rel(bus, src));
                let Some(mut e) = copy_one(src, to, &rel)? else {
                    continue; // retention removed it meanwhile
                };
                if newest {
                    let dest = to.join(&rel);
                    let scan = scan_segment_file(&dest).map_err(io(&dest))?;
                    if (scan.valid_end as u64) < e.bytes {
                        let f = fs::OpenOptions::new()
                            .write(true)
                            .open(&dest)
                            .map_err(io(&dest))?;
                        f.set_len(scan.valid_end as u64).map_err(io(&dest))?;
                        f.sync_all().map_err(io(&dest))?;
                        e = entry(to, &dest)?;
                    }
                }
                files.push(e);
            }
        }
    }
    if let Some(e) = copy_one(&layout.jwt_keys, to, "jwt.keys")? {
        files.push(e);
    }
    Ok((files, replaced))
}

/// Copies the store's Parquet files until a listing finds nothing new; returns the
/// entries of the last listing's files and how many vanished under the copy.
fn copy_store(store: &Path, to: &Path) -> Result<(Vec<Entry>, usize)> {
    let mut copied: std::collections::BTreeMap<String, Entry> = Default::default();
    let mut replaced = 0;
    for _ in 0..STORE_PASSES {
        let listing: Vec<String> = walk(store)?
            .into_iter()
            .filter(|p| p.extension().is_some_and(|x| x == "parquet"))
            .map(|p| rel(store, &p))
            .filter(|r| !r.split('/').any(|c| c == "quarantine"))
            .collect();
        let mut changed = false;
        for r in &listing {
            if copied.contains_key(r) {
                continue;
            }
            changed = true;
            let backup_path = format!("store/{r}");
            match copy_one(&store.join(r), to, &backup_path)? {
                Some(e) => {
                    copied.insert(r.clone(), e);
                }
                None => replaced += 1,
            }
        }
        // Files compaction retired since they were copied: their rows are in the merged
        // file of this listing.
        let live: std::collections::BTreeSet<&String> = listing.iter().collect();
        let gone: Vec<String> = copied
            .keys()
            .filter(|r| !live.contains(r))
            .cloned()
            .collect();
        for r in gone {
            changed = true;
            replaced += 1;
            copied.remove(&r);
            let p = to.join("store").join(&r);
            fs::remove_file(&p).map_err(io(&p))?;
        }
        if !changed {
            return Ok((copied.into_values().collect(), replaced));
        }
    }
    Err(BackupError::Refused(format!(
        "the store under {} kept changing through {STORE_PASSES} listings; retry the backup",
        store.display()
    )))
}

/// Copies `src` to `<to>/<rel>` with an fsync; `None` when `src` no longer exists.
fn copy_one(src: &Path, to: &Path, rel: &str) -> Result<Option<Entry>> {
    let dest = to.join(rel);
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent).map_err(io(parent))?;
    }
    match fs::copy(src, &dest) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(src)(e)),
    }
    File::open(&dest)
        .and_then(|f| f.sync_all())
        .map_err(io(&dest))?;
    entry(to, &dest).map(Some)
}

fn entry(root: &Path, path: &Path) -> Result<Entry> {
    let data = fs::read(path).map_err(io(path))?;
    Ok(Entry {
        path: rel(root, path),
        bytes: data.len() as u64,
        crc32: crc32fast::hash(&data),
    })
}

/// `path` relative to `root`, with `/` separators.
fn rel(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .iter()
        .map(|c| c.to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

/// Files under `dir`, recursively; none when it does not exist.
fn walk(dir: &Path) -> Result<Vec<PathBuf>> {
    if !dir.exists() {
        return Ok(Vec::new());
    }
    crate::store::walk_files(dir).map_err(|e| BackupError::Io {
        path: dir.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    })
}

async fn vacuum_into(meta: &Path, copy: &Path) -> Result<()> {
    use sqlx::ConnectOptions;
    let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(meta)
        .read_only(true)
        .connect()
        .await
        .map_err(|e| BackupError::Meta(format!("{}: {e}", meta.display())))?;
    sqlx::query("VACUUM INTO ?")
        .bind(copy.to_string_lossy().into_owned())
        .execute(&mut conn)
        .await
        .map_err(|e| BackupError::Meta(format!("{}: {e}", meta.display())))?;
    Ok(())
}

/// Writes the manifest into `to`, last: a backup without one is incomplete and `restore`
/// refuses it.
fn write_manifest(to: &Path, manifest: &Manifest) -> Result<()> {
    let path = to.join(MANIFEST);
    let text = serde_json::to_vec_pretty(manifest).expect("manifest serialises");
    let mut f = File::create(&path).map_err(io(&path))?;
    f.write_all(&text).map_err(io(&path))?;
    f.sync_all().map_err(io(&path))?;
    File::open(to).and_then(|d| d.sync_all()).map_err(io(to))?;
    Ok(())
}

/// Reads and verifies the backup in `from`: every file of the manifest present with its
/// size and CRC-32.
pub fn verify(from: &Path) -> Result<Manifest> {
    let path = from.join(MANIFEST);
    let text = fs::read(&path).map_err(|e| {
        BackupError::Damaged(format!(
            "{}: {e} (a backup without a manifest did not finish)",
            path.display()
        ))
    })?;
    let manifest: Manifest = serde_json::from_slice(&text)
        .map_err(|e| BackupError::Damaged(format!("{}: {e}", path.display())))?;
    if manifest.format != FORMAT {
        return Err(BackupError::Refused(format!(
            "{} has backup format {}, this build reads {FORMAT}",
            path.display(),
            manifest.format
        )));
    }
    for e in &manifest.files {
        if e.path.split('/').any(|c| c == ".." || c.is_empty()) {
            return Err(BackupError::Damaged(format!(
                "bad path {:?} in the manifest",
                e.path
            )));
        }
        let got = entry(from, &from.join(&e.path))
            .map_err(|err| BackupError::Damaged(err.to_string()))?;
        if got != *e {
            return Err(BackupError::Damaged(format!(
                "{} has {} bytes with CRC-32 {:08x}, the manifest says {} bytes with {:08x}",
                e.path, got.bytes, got.crc32, e.bytes, e.crc32
            )));
        }
    }
    Ok(manifest)
}

/// Brings the backup in `from` back into `layout`, whose parts must hold no data yet.
pub fn restore(from: &Path, layout: &Layout) -> Result<Manifest> {
    let manifest = verify(from)?;
    let target = |path: &str| -> Option<PathBuf> {
        let (root, rest) = path.split_once('/').unwrap_or((path, ""));
        match root {
            "meta.db" => layout.meta.clone(),
            "jwt.keys" => Some(layout.jwt_keys.clone()),
            "pipeline" => Some(layout.pipeline.join(rest)),
            "store" => layout.store.as_ref().map(|d| d.join(rest)),
            "bus" => layout.bus.as_ref().map(|d| d.join(rest)),
            _ => None,
        }
    };
    // Refuse before writing anything.
    for dir in [&layout.bus, &layout.store, &Some(layout.pipeline.clone())]
        .into_iter()
        .flatten()
    {
        if !walk(dir)?.is_empty() {
            return Err(BackupError::Refused(format!(
                "{} already holds data; restore into a new data directory",
                dir.display()
            )));
        }
    }
    for file in [&layout.meta, &Some(layout.jwt_keys.clone())]
        .into_iter()
        .flatten()
    {
        if file.exists() {
            return Err(BackupError::Refused(format!(
                "{} already exists; restore into a new data directory",
                file.display()
            )));
        }
    }
    let mut dirs = std::collections::BTreeSet::new();
    for e in &manifest.files {
        let Some(dest) = target(&e.path) else {
            return Err(BackupError::Refused(format!(
                "the backup holds {} but this configuration keeps that part elsewhere",
                e.path
            )));
        };
        let parent = dest.parent().expect("a file has a parent").to_path_buf();
        fs::create_dir_all(&parent).map_err(io(&parent))?;
        let src = from.join(&e.path);
        fs::copy(&src, &dest).map_err(io(&src))?;
        if e.path == "meta.db" || e.path == "jwt.keys" {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&dest, fs::Permissions::from_mode(0o600)).map_err(io(&dest))?;
        }
        File::open(&dest)
            .and_then(|f| f.sync_all())
            .map_err(io(&dest))?;
        dirs.insert(parent);
    }
    for d in dirs {
        File::open(&d).and_then(|f| f.sync_all()).map_err(io(&d))?;
    }
    Ok(manifest)
}
