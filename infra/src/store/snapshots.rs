//! Reads that never see compaction: which files of the embedded store a query may list,
//! and when a file compaction replaced may be deleted.
//!
//! Compaction writes the merged file first, then *retires* the files it replaces. From
//! that moment new queries no longer list them (the engine's object store asks the
//! query's [`ReadGuard::hides`]). A query that began before the retirement still lists
//! them: its directory read may predate the merged file, so hiding the inputs from it
//! would leave it neither the old rows nor the new (an empty answer). A retired file is
//! deleted only once every query that began before its retirement has finished
//! ([`Snapshots::sweep`]), however long that takes — not after a fixed grace period,
//! which a query planned near its end outlives. A query that lists both the inputs and
//! the merged file reads each row twice; upsert deduplication makes that invisible in
//! results.
//!
//! The same shared value carries the store's [`super::integrity::Integrity`]: a query's
//! listing leaves out, and quarantines, a file that fails verification.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use datafusion::object_store::path::Path as ObjectPath;

/// The embedded store's file versions and the queries reading them. Shared by the store
/// (which retires and deletes) and the query engine (which lists and reads).
#[derive(Debug, Default)]
pub struct Snapshots {
    inner: Mutex<Inner>,
    /// Which files were verified, and the damaged ones.
    integrity: super::integrity::Integrity,
}

#[derive(Debug, Default)]
struct Inner {
    /// Bumped by every retirement.
    epoch: u64,
    /// Queries running, by the epoch they began in.
    active: BTreeMap<u64, usize>,
    /// Retired files (as the object store names them) and the epoch of their retirement.
    retired: HashMap<ObjectPath, (PathBuf, u64)>,
    /// Deleted files, still hidden from queries that began before the deletion: such a
    /// query may have read the directory before the file went and check it after.
    gone: HashMap<ObjectPath, u64>,
}

/// A query's hold on the files it may have listed; released on drop.
#[derive(Debug)]
pub struct ReadGuard {
    snapshots: Arc<Snapshots>,
    epoch: u64,
}

impl ReadGuard {
    /// Whether this query must leave a listed file out: retired before the query began,
    /// or deleted (a deleted file is never one an older query holds).
    pub fn hides(&self, location: &ObjectPath) -> bool {
        let inner = self.snapshots.lock();
        inner
            .retired
            .get(location)
            .is_some_and(|(_, at)| *at < self.epoch)
            || inner.gone.contains_key(location)
    }

    /// The shared file versions this guard holds.
    pub fn snapshots(&self) -> &Arc<Snapshots> {
        &self.snapshots
    }
}

impl Drop for ReadGuard {
    fn drop(&mut self) {
        let mut inner = self.snapshots.lock();
        if let Some(n) = inner.active.get_mut(&self.epoch) {
            *n -= 1;
            if *n == 0 {
                inner.active.remove(&self.epoch);
            }
        }
    }
}

impl Snapshots {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The verified files and the ledger of damage, which queries consult as they list.
    pub fn integrity(&self) -> &super::integrity::Integrity {
        &self.integrity
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a query starting now; hold the guard until its last read.
    pub fn begin(self: &Arc<Self>) -> ReadGuard {
        let mut inner = self.lock();
        let epoch = inner.epoch;
        *inner.active.entry(epoch).or_default() += 1;
        ReadGuard {
            snapshots: self.clone(),
            epoch,
        }
    }

    /// Whether a file was retired or deleted (the store's own view: compaction merges
    /// it no more; a query asks its [`ReadGuard::hides`]).
    fn hidden(&self, location: &ObjectPath) -> bool {
        let inner = self.lock();
        inner.retired.contains_key(location) || inner.gone.contains_key(location)
    }

    /// Whether a local file is hidden from queries (retired, or deleted recently).
    pub fn is_retired(&self, file: &std::path::Path) -> bool {
        object_path(file).is_some_and(|p| self.hidden(&p))
    }

    /// Hides `files` from queries that begin from now on.
    pub fn retire(&self, files: &[PathBuf]) {
        let mut inner = self.lock();
        let epoch = inner.epoch;
        for f in files {
            if let Some(p) = object_path(f) {
                inner.retired.insert(p, (f.clone(), epoch));
            }
        }
        inner.epoch += 1;
    }

    /// Deletes (with `remove`) the retired files no running query can still read: every
    /// query that began before their retirement has finished. A file stays hidden until it
    /// is gone, so no query lists it between the two. Returns the files removed.
    pub fn sweep(&self, remove: impl Fn(&std::path::Path)) -> Vec<PathBuf> {
        let mut inner = self.lock();
        let oldest = inner.active.keys().next().copied();
        let free = |at: u64| oldest.is_none_or(|o| o > at);
        let epoch = inner.epoch;
        let mut out = Vec::new();
        let mut gone = Vec::new();
        inner.retired.retain(|location, (file, retired_at)| {
            if !free(*retired_at) {
                return true;
            }
            remove(file);
            out.push(file.clone());
            gone.push(location.clone());
            false
        });
        inner.gone.retain(|_, at| !free(*at));
        if !gone.is_empty() {
            inner.gone.extend(gone.into_iter().map(|l| (l, epoch)));
            inner.epoch += 1;
        }
        out
    }
}

/// The object store's name for a local file.
fn object_path(file: &std::path::Path) -> Option<ObjectPath> {
    ObjectPath::from_absolute_path(file).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retired_file_outlives_every_query_that_began_before_it() {
        let s = Snapshots::new();
        let f = PathBuf::from("/tmp/store/features/tenant_id=a/date=d/part-1.parquet");
        let early = s.begin();
        s.retire(std::slice::from_ref(&f));
        assert!(s.is_retired(&f));
        // A query that began after the retirement does not hold it up.
        let late = s.begin();
        let location = object_path(&f).unwrap();
        assert!(
            !early.hides(&location),
            "the early query may have listed the directory before the merged file existed"
        );
        assert!(
            late.hides(&location),
            "the late query reads the merged file"
        );
        let keep = |_: &std::path::Path| {};
        assert!(
            s.sweep(keep).is_empty(),
            "the early query may still read it"
        );
        drop(early);
        let removed = std::cell::RefCell::new(Vec::new());
        let remove = |p: &std::path::Path| removed.borrow_mut().push(p.to_path_buf());
        assert_eq!(s.sweep(remove), vec![f.clone()]);
        assert_eq!(removed.into_inner(), vec![f.clone()]);
        assert!(late.hides(&location));
        assert!(
            s.is_retired(&f),
            "hidden from the late query, which began before the deletion"
        );
        drop(late);
        s.sweep(keep);
        assert!(
            !s.is_retired(&f),
            "forgotten once no query began before the deletion"
        );
        assert!(s.sweep(keep).is_empty());
    }

    #[test]
    fn with_no_query_running_a_retired_file_goes_at_once() {
        let s = Snapshots::new();
        let f = PathBuf::from("/tmp/x.parquet");
        s.retire(std::slice::from_ref(&f));
        assert_eq!(s.sweep(|_| {}), vec![f]);
    }
}
