//! The embedded store's files as one query sees them: the local file system, less the
//! files compaction has retired, with the query's hold on what it lists.
//!
//! Each query's session gets its own [`LiveFiles`] object store, which holds a
//! [`ReadGuard`] for as long as the session's runtime lives (the plan and its streams keep
//! it), so compaction deletes no file the query may still open; and its listings leave out
//! retired files, so a query that starts after a compaction reads the merged file only.
//! See `digame_infra::store::snapshots`.

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
    inner: LocalFileSystem,
    snapshots: Arc<Snapshots>,
    _hold: ReadGuard,
}

impl LiveFiles {
    pub(crate) fn new(snapshots: &Arc<Snapshots>) -> Self {
        LiveFiles {
            inner: LocalFileSystem::new(),
            _hold: snapshots.begin(),
            snapshots: snapshots.clone(),
        }
    }

    fn live(
        &self,
        stream: BoxStream<'static, Result<ObjectMeta>>,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        let snapshots = self.snapshots.clone();
        stream
            .try_filter(move |m| futures::future::ready(!snapshots.hidden(&m.location)))
            .boxed()
    }
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
        result
            .objects
            .retain(|m| !self.snapshots.hidden(&m.location));
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

    #[tokio::test]
    async fn retired_files_are_left_out_of_listings() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("features/tenant_id=a/date=2026-01-01");
        std::fs::create_dir_all(&sub).unwrap();
        let (a, b) = (sub.join("part-1.parquet"), sub.join("part-2.parquet"));
        std::fs::write(&a, b"a").unwrap();
        std::fs::write(&b, b"b").unwrap();
        let snapshots = Snapshots::new();
        snapshots.retire(std::slice::from_ref(&a));
        let store = LiveFiles::new(&snapshots);
        let prefix = Path::from_absolute_path(dir.path()).unwrap();
        let listed: Vec<String> = store
            .list(Some(&prefix))
            .map_ok(|m| m.location.to_string())
            .try_collect()
            .await
            .unwrap();
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert!(listed[0].ends_with("part-2.parquet"), "{listed:?}");
    }
}
