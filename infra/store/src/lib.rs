//! The store seam: what pipelines write through ([`StoreSink`]) and what every backend
//! stores ([`Table`]: its layout, partitioning and upsert key; [`StoreBatch`]).
//!
//! `write` returning `Ok` means every row is durable. Rows are upserts: readers keep one
//! row per key (the highest `revision` for features; one copy per person and `event_id`
//! for events), so writing the same rows twice, as a replay after a crash does, changes no
//! result. The backends are the embedded Parquet store and ClickHouse (in `digame-infra`);
//! this crate has neither, so what only writes builds without DataFusion or the ClickHouse
//! client.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, LazyLock};

use arrow_schema::{DataType, Field, SchemaRef};
use async_trait::async_trait;
use digame_schemas::arrow::Layout;
use digame_schemas::{ActivityEvent, DeadLetter, EventTime, FeatureRow};
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store i/o error on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("store encoding error in table {table}: {message}")]
    Encode {
        table: &'static str,
        message: String,
    },
    #[error("store query error: {0}")]
    Query(String),
    #[error("{0}")]
    Unsupported(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The error of an I/O operation on `path`, for backends: `.map_err(io_err(path))`.
pub fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The tables of the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    Events,
    Features,
    DeadLetters,
}

/// Columns taken from the directory path instead of the file.
pub const PARTITION_COLUMNS: [&str; 2] = ["tenant_id", "date"];

static EVENT_LAYOUT: LazyLock<Layout> = LazyLock::new(Layout::of::<ActivityEvent>);
static FEATURE_LAYOUT: LazyLock<Layout> = LazyLock::new(Layout::of::<FeatureRow>);
static DEAD_LETTER_LAYOUT: LazyLock<Layout> = LazyLock::new(Layout::of::<DeadLetter>);

impl Table {
    pub const ALL: [Table; 3] = [Table::Events, Table::Features, Table::DeadLetters];

    /// The table named `name`.
    pub fn from_name(name: &str) -> Option<Table> {
        Table::ALL.into_iter().find(|t| t.name() == name)
    }

    pub fn name(self) -> &'static str {
        match self {
            Table::Events => "events",
            Table::Features => "features",
            Table::DeadLetters => "dead_letters",
        }
    }

    /// The record layout, derived from the record type in `schemas`.
    pub fn layout(self) -> &'static Layout {
        match self {
            Table::Events => &EVENT_LAYOUT,
            Table::Features => &FEATURE_LAYOUT,
            Table::DeadLetters => &DEAD_LETTER_LAYOUT,
        }
    }

    /// The timestamp column whose UTC date names the partition.
    pub fn time_column(self) -> &'static str {
        match self {
            Table::Events => "timestamp",
            Table::Features => "window_start",
            Table::DeadLetters => "rejected_at",
        }
    }

    /// Columns identifying one logical row, and the column whose highest value wins.
    pub fn upsert_key(self) -> Option<(&'static [&'static str], &'static str)> {
        match self {
            // Per person, as ClickHouse's sorting key has it: an id another person's event
            // reuses never erases that event.
            Table::Events => Some((&["user_id", "event_id"], "received_at")),
            // The record's key less `tenant_id`, which is the partition directory.
            Table::Features => Some((&FeatureRow::KEY[1..], FeatureRow::VERSION)),
            Table::DeadLetters => None,
        }
    }

    /// Schema of the Parquet files (the layout without the path columns).
    pub fn file_schema(self) -> SchemaRef {
        Arc::new(self.layout().arrow_schema_without(&PARTITION_COLUMNS))
    }

    /// The partition columns as DataFusion's listing table declares them.
    pub fn partition_fields() -> Vec<Field> {
        PARTITION_COLUMNS
            .iter()
            .map(|c| Field::new(*c, DataType::Utf8, false))
            .collect()
    }
}

/// Rows produced by one pipeline flush.
#[derive(Debug, Default)]
pub struct StoreBatch {
    pub events: Vec<ActivityEvent>,
    pub features: Vec<FeatureRow>,
    pub dead_letters: Vec<DeadLetter>,
}

impl StoreBatch {
    pub fn is_empty(&self) -> bool {
        self.events.is_empty() && self.features.is_empty() && self.dead_letters.is_empty()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreStatus {
    pub healthy: bool,
    pub detail: String,
}

/// Rows removed per table by a deletion.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct DeletionReport {
    /// Logical rows (one per key) removed, by table.
    pub rows: BTreeMap<String, u64>,
    /// Months (`YYYYMM`) of rollups recomputed without the deleted rows.
    pub rollup_months_rebuilt: Vec<u32>,
}

/// What to delete of one tenant.
#[derive(Clone, Debug)]
pub enum Deletion<'a> {
    /// Every row of one person (a privacy request).
    Person(&'a str),
    /// Every row whose time is before this instant (retention).
    Before(EventTime),
}

/// Where pipelines write. Returning `Ok` means every row is durable.
#[async_trait]
pub trait StoreSink: Send + Sync + 'static {
    /// Writes a batch durably. Feature rows are written before the raw events of the same
    /// batch (the pipeline reopens a day from its stored events), so a
    /// crash between the two leaves rows ahead of events, never behind.
    async fn write(&self, batch: &StoreBatch) -> Result<()>;
    fn status(&self) -> StoreStatus;
    /// Deletes rows of `tenant` from every table and reports how many went.
    async fn delete(&self, tenant: &str, what: &Deletion<'_>) -> Result<DeletionReport> {
        let _ = (tenant, what);
        Err(StoreError::Unsupported(
            "deleting data is available on the ClickHouse store in this build".into(),
        ))
    }
}

/// The `date=` partition of a row whose time column holds `time` (RFC 3339, UTC).
pub fn partition_date(time: &str) -> &str {
    time.get(..10).unwrap_or("1970-01-01")
}
