//! The embedded store's files as one query sees them: the local file system, less the
//! files compaction has retired, with the query's hold on what it lists.
//!
//! Each query's session gets its own [`LiveFiles`] object store, which holds a
//! [`ReadGuard`] for as long as the session's runtime lives (the plan and its streams keep
//! it), so compaction deletes no file the query may still open; and its listings leave out
//! retired files, so a query that starts after a compaction reads the merged file only.
//! See `digame_infra::store::snapshots`.
//!
//! A listed Parquet file this process has not verified yet (one written by another
//! process, or since damaged and never read) is verified against the checksum in its name
//! before the query sees it, on a blocking thread; a damaged one is quarantined and left
//! out, so the query answers from the rest and `/readyz` names the range
//! (`digame_infra::store::integrity`).

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use datafusion::object_store::local::LocalFileSystem;
use datafusion::object_store::path::Path;
use datafusion::object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions, Result,
};
use digame_infra::store::snapshots::{ReadGuard, Snapshots};
use futures::stream::{BoxStream, StreamExt, TryStreamExt};

/// The local file system without retired files, for one query.
#[derive(Debug)]
pub(crate) struct LiveFiles {
    inner: Arc<LocalFileSystem>,
    /// What this query may list; its epoch decides which retired files it still sees.
    hold: Arc<ReadGuard>,
}

impl LiveFiles {
    pub(crate) fn new(snapshots: &Arc<Snapshots>) -> Self {
        LiveFiles {
            inner: Arc::new(LocalFileSystem::new()),
            hold: Arc::new(snapshots.begin()),
        }
    }

    fn live(
        &self,
        stream: BoxStream<'static, Result<ObjectMeta>>,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        let (hold, fs) = (self.hold.clone(), self.inner.clone());
        stream
            .try_filter_map(move |m| {
                let (hold, fs) = (hold.clone(), fs.clone());
                async move { Ok(readable(&hold, &fs, &m).await.then_some(m)) }
            })
            .boxed()
    }
}

/// Whether a listed object may be read: not retired before the query began, and for a
/// Parquet file, verified.
async fn readable(hold: &ReadGuard, fs: &LocalFileSystem, m: &ObjectMeta) -> bool {
    if hold.hides(&m.location) {
        return false;
    }
    let snapshots = hold.snapshots();
    if m.location.extension() != Some("parquet") {
        return true;
    }
    let Ok(file) = fs.path_to_filesystem(&m.location) else {
        return true;
    };
    if snapshots.integrity().is_verified(&file) {
        return true;
    }
    let snapshots = snapshots.clone();
    tokio::task::spawn_blocking(move || snapshots.integrity().check(&file))
        .await
        .unwrap_or(false)
}

impl fmt::Display for LiveFiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LiveFiles({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for LiveFiles {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.live(self.inner.list(prefix))
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        self.live(self.inner.list_with_offset(prefix, offset))
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        let mut result = self.inner.list_with_delimiter(prefix).await?;
        let mut objects = Vec::with_capacity(result.objects.len());
        for m in result.objects {
            if readable(&self.hold, &self.inner, &m).await {
                objects.push(m);
            }
        }
        result.objects = objects;
        Ok(result)
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.inner.copy_opts(from, to, options).await
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        self.inner.rename_opts(from, to, options).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use digame_infra::store::integrity::checksummed_name;

    /// Writes `body` under `dir` with its checksum in the name, as the store names files.
    fn stored(dir: &std::path::Path, base: &str, body: &[u8]) -> std::path::PathBuf {
        let path = dir.join(checksummed_name(base, crc32fast::hash(body)));
        std::fs::write(&path, body).unwrap();
        path
    }

    async fn listing(store: &LiveFiles, dir: &std::path::Path) -> Vec<String> {
        let prefix = Path::from_absolute_path(dir).unwrap();
        store
            .list(Some(&prefix))
            .map_ok(|m| m.location.to_string())
            .try_collect()
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn retired_files_are_left_out_of_listings() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("features/tenant_id=a/date=2026-01-01");
        std::fs::create_dir_all(&sub).unwrap();
        let a = stored(&sub, "part-1", b"a");
        stored(&sub, "part-2", b"b");
        let snapshots = Snapshots::new();
        let earlier = LiveFiles::new(&snapshots);
        snapshots.retire(std::slice::from_ref(&a));
        let listed = listing(&LiveFiles::new(&snapshots), dir.path()).await;
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert!(listed[0].contains("/part-2-c"), "{listed:?}");
        // A query that began before the retirement may have read the directory before
        // the merged file was written: it keeps both inputs (results dedupe them).
        assert_eq!(listing(&earlier, dir.path()).await.len(), 2);
    }

    #[tokio::test]
    async fn a_file_that_fails_its_checksum_is_quarantined_at_listing() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("events/tenant_id=acme/date=2026-01-01");
        std::fs::create_dir_all(&sub).unwrap();
        stored(&sub, "part-1", b"intact bytes");
        let damaged = stored(&sub, "part-2", b"bytes to flip");
        let mut bytes = std::fs::read(&damaged).unwrap();
        bytes[3] ^= 0x20;
        std::fs::write(&damaged, bytes).unwrap();
        let snapshots = Snapshots::new();
        let listed = listing(&LiveFiles::new(&snapshots), dir.path()).await;
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert!(listed[0].contains("/part-1-c"), "{listed:?}");
        let moved = dir
            .path()
            .join("quarantine/events/tenant_id=acme/date=2026-01-01")
            .join(damaged.file_name().unwrap());
        assert!(moved.exists() && !damaged.exists());
        let pending = snapshots.integrity().pending();
        assert_eq!(pending.len(), 1);
        assert_eq!(
            (
                pending[0].table,
                &*pending[0].tenant,
                &*pending[0].date,
                &pending[0].file
            ),
            ("events", "acme", "2026-01-01", &moved)
        );
        assert!(
            pending[0].error.starts_with("checksum mismatch"),
            "{:?}",
            pending[0]
        );
        // Verified once: a second listing reads nothing again and lists the same.
        assert_eq!(
            listing(&LiveFiles::new(&snapshots), dir.path()).await,
            listed
        );
    }
}
