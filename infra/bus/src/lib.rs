//! The event bus seam: a partitioned, append-only, durable log with consumer groups.
//!
//! Producers call [`EventBus::publish`], which returns only once every record is durable
//! (fsynced for the embedded log, acknowledged by all in-sync replicas for Kafka). Records
//! with the same key land in the same partition, in order. Consumers belong to a group,
//! own a set of partitions ([`BusConsumer::assignment`]), read from a position, and commit
//! the offsets below which everything is processed *and* durable downstream.
//!
//! The shape follows Kafka's so a Kafka implementation fits behind the same traits: the
//! embedded log assigns every partition to its one consumer; a Kafka consumer's assignment
//! changes on rebalance and the caller re-reads it after each poll.
//!
//! This crate holds the seam and the embedded log ([`log`]); the Kafka implementation is
//! the `digame-kafka` crate, so what only publishes or consumes builds without librdkafka.

mod frame;
pub mod log;
mod recovery;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

pub use log::{LogBus, LogConfig};

/// Errors from the bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("bus i/o error on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("bus log is corrupt: {0}")]
    Corrupt(String),
    #[error("bus is unavailable: {0}; retry later")]
    Unavailable(String),
    #[error("bus configuration error: {0}")]
    Config(String),
    /// Some records of a publish were acknowledged and these (input index, reason) were
    /// not; only Kafka reports this, the embedded log commits a publish whole.
    #[error("{} records were not acknowledged by the bus (first: #{} {})", failed.len(), failed[0].0, failed[0].1)]
    PartlyPublished { failed: Vec<(usize, String)> },
}

pub type Result<T, E = BusError> = std::result::Result<T, E>;

/// The streams Digame keeps on the bus.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Topic {
    /// Validated canonical events (JSON, one event per record, key `tenant:user`).
    Events,
    /// Rejected and too-late events with their reasons (JSON [`digame_schemas::DeadLetter`]).
    DeadLetters,
    /// Derived: every emitted feature row (JSON [`digame_schemas::FeatureRow`], key
    /// `tenant:user`); a reader keeps the highest `revision` per row key.
    Features,
    /// Derived: anomalies (filled by the detectors).
    Anomalies,
    /// Derived: predictions (filled by model scoring).
    Predictions,
}

impl Topic {
    pub const ALL: [Topic; 5] = [
        Topic::Events,
        Topic::DeadLetters,
        Topic::Features,
        Topic::Anomalies,
        Topic::Predictions,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Topic::Events => "events",
            Topic::DeadLetters => "dead-letters",
            Topic::Features => "features",
            Topic::Anomalies => "anomalies",
            Topic::Predictions => "predictions",
        }
    }
}

/// One record to append.
#[derive(Clone, Debug)]
pub struct Record {
    /// Partitioning key; equal keys keep their order.
    pub key: Bytes,
    pub payload: Bytes,
    /// Producer timestamp (ms since epoch), used by time-based retention.
    pub timestamp_ms: i64,
}

/// Where a record was stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    pub partition: u32,
    pub offset: u64,
}

/// A record read back by a consumer.
#[derive(Clone, Debug)]
pub struct Delivered {
    pub partition: u32,
    pub offset: u64,
    pub timestamp_ms: i64,
    pub key: Bytes,
    pub payload: Bytes,
}

/// Health of the bus as seen by this process.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BusStatus {
    pub healthy: bool,
    pub detail: String,
    /// Records the embedded log lost to damage found by this process (their offsets are
    /// gaps between the valid records around the damage): `processed` ones were below an
    /// offset a consumer group had committed when the log opened, so their results were
    /// stored before the damage was found; `unprocessed` ones were not.
    pub lost_records: LostRecords,
}

/// See [`BusStatus::lost_records`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct LostRecords {
    pub processed: u64,
    pub unprocessed: u64,
}

#[async_trait]
pub trait EventBus: Send + Sync + 'static {
    /// Appends `records` to `topic`; resolves once all of them are durable, with their
    /// positions in input order. On error none of them may be assumed durable.
    async fn publish(&self, topic: Topic, records: Vec<Record>) -> Result<Vec<Position>>;

    /// Joins consumer group `group` on `topic`, starting from the group's committed offsets
    /// (or the start of the log).
    async fn subscribe(&self, topic: Topic, group: &str) -> Result<Box<dyn BusConsumer>>;

    /// Number of partitions of `topic`.
    fn partitions(&self, topic: Topic) -> u32;

    /// The partition of `topic` a record keyed `key` is published to: which partition's
    /// state a key belongs to, e.g. when state is rebuilt from elsewhere than the bus.
    fn partition_of(&self, topic: Topic, key: &[u8]) -> u32 {
        partition_for(key, self.partitions(topic))
    }

    fn status(&self) -> BusStatus;

    /// Stops background work after making everything appended so far durable.
    async fn close(&self);
}

#[async_trait]
pub trait BusConsumer: Send {
    /// Up to `max` records from the assigned partitions, waiting up to `wait` when none are
    /// available. Records of one partition come in offset order.
    async fn poll(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivered>>;

    /// Partitions this consumer owns now.
    fn assignment(&self) -> Vec<u32>;

    /// Moves the read position of `partition` to `offset` (clamped to the log start).
    async fn seek(&mut self, partition: u32, offset: u64) -> Result<()>;

    /// Records that all offsets below `next_offsets[p]` are processed and durable downstream.
    async fn commit(&mut self, next_offsets: &BTreeMap<u32, u64>) -> Result<()>;

    /// The group's committed next offsets.
    fn committed(&self) -> BTreeMap<u32, u64>;

    /// Records appended but not yet polled, over the assignment.
    fn lag(&self) -> u64;

    /// A probe of each partition's end (the next offset to be appended), callable from
    /// anywhere at any time, where the bus can answer without a round trip (the embedded
    /// log); `None` elsewhere. With the offsets a pipeline has processed it gives an exact
    /// backlog, where [`Self::lag`] is only as fresh as the last poll.
    fn end_offsets(&self) -> Option<EndOffsets> {
        None
    }

    /// Where the bus cannot answer [`Self::end_offsets`] without a round trip (Kafka): a
    /// probe that asks the brokers, at the moment it is called, for every partition's end
    /// and the group's committed offsets. It blocks (run it off the async workers). With it
    /// a reader that must not say "caught up" too early (reconciliation) sees records
    /// acknowledged since the last poll, and those of partitions another member owns.
    fn progress_probe(&self) -> Option<ProgressProbe> {
        None
    }
}

/// See [`BusConsumer::end_offsets`]: (partition, next offset to be appended).
pub type EndOffsets = Arc<dyn Fn() -> Vec<(u32, u64)> + Send + Sync>;

/// See [`BusConsumer::progress_probe`].
pub type ProgressProbe = Arc<dyn Fn() -> Result<GroupProgress> + Send + Sync>;

/// Every partition of a topic as the brokers saw it at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GroupProgress {
    /// Per partition: the next offset to be appended. Records below it are acknowledged.
    pub ends: BTreeMap<u32, u64>,
    /// Per partition: the group's committed next offset, or the oldest retained offset
    /// where the group has committed none (the group starts there).
    pub committed: BTreeMap<u32, u64>,
}

/// The partition of `key` among `partitions`: stable across processes and versions.
pub fn partition_for(key: &[u8], partitions: u32) -> u32 {
    crc32fast::hash(key) % partitions.max(1)
}
