//! The event bus on Kafka (any Kafka-protocol cluster), through librdkafka (`rdkafka`,
//! built from its bundled sources).
//!
//! Producer: idempotent, `acks=all`, lz4, keyed by `tenant:user` with the murmur2
//! partitioner (the one Java and Python clients use, so a record published by any client
//! with the same key lands in the same partition). [`EventBus::publish`] resolves only when
//! the broker acknowledged every record; when some were not, the error names exactly which
//! ([`BusError::PartlyPublished`]). The producer queue is bounded: when it is full, publish
//! fails at once with [`BusError::Unavailable`] instead of buffering without bound.
//!
//! Consumer: a member of a consumer group (cooperative-sticky assignment), auto-commit off;
//! the caller commits offsets once what they cover is durable downstream. The assignment
//! is tracked from rebalance callbacks and re-read by the caller after each poll.
//!
//! Broker outages: when librdkafka reports every broker down, publish fails at once (the
//! API answers 503 with `Retry-After`) until a metadata probe, run every second while
//! down, reaches a broker again. Records already handed to the producer are retried by
//! it (idempotently) until their delivery timeout, so a short outage loses nothing.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures::FutureExt;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{ClientContext, Offset, Statistics, TopicPartitionList};

use digame_bus::{
    BusConsumer, BusError, BusStatus, Delivered, EventBus, Position, Record, Result, Topic,
};

/// How long the group coordinator waits for a consumer's heartbeat before it takes the
/// consumer's partitions away: a worker that dies without leaving the group holds its
/// partitions this long.
pub const SESSION_TIMEOUT: Duration = Duration::from_secs(10);

/// Settings of the Kafka bus.
#[derive(Clone, Debug)]
pub struct KafkaSettings {
    /// `host:port[,host:port…]`.
    pub brokers: String,
    /// Prepended to every topic and consumer-group name.
    pub prefix: String,
    /// Partitions of topics this process creates.
    pub partitions: u32,
    /// Replication factor of topics this process creates.
    pub replication: i32,
    /// How long a record may wait for acknowledgement before it is reported failed.
    pub delivery_timeout: Duration,
    /// Extra librdkafka properties (security, tuning), applied last.
    pub extra: BTreeMap<String, String>,
}

impl KafkaSettings {
    pub fn topic_name(&self, topic: Topic) -> String {
        format!("{}{}", self.prefix, topic.name())
    }

    fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        c.set("client.id", "digame");
        c.set("broker.address.family", "v4");
        for (k, v) in &self.extra {
            c.set(k, v);
        }
        c
    }
}

fn unavailable(e: KafkaError) -> BusError {
    BusError::Unavailable(format!("kafka: {e}"))
}

/// Broker reachability, from librdkafka's error callback.
#[derive(Default)]
struct Health {
    all_brokers_down: AtomicBool,
    /// Ends the probe task.
    closed: AtomicBool,
}

/// Client context of the producer: notices when no broker is reachable.
struct HealthContext(Arc<Health>);

impl ClientContext for HealthContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            if !self.0.all_brokers_down.swap(true, Ordering::Relaxed) {
                tracing::warn!(%reason, "no Kafka broker reachable; ingest answers 503 until one is");
            }
        } else {
            tracing::warn!(error = %error, %reason, "kafka client error");
        }
    }
}

/// What `digame topics describe` shows of one topic.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TopicInfo {
    pub name: String,
    pub partitions: u32,
    /// Records retained (high minus low watermark, summed over partitions).
    pub records: u64,
}

/// The Kafka bus.
pub struct KafkaBus {
    settings: KafkaSettings,
    producer: FutureProducer<HealthContext>,
    health: Arc<Health>,
    partitions: Mutex<HashMap<Topic, u32>>,
    /// Set when the last publish failed for a reason other than bad input; cleared by
    /// the next success.
    failing: Arc<Mutex<Option<String>>>,
    closed: AtomicBool,
}

impl KafkaBus {
    /// Connects, creating the topics when they do not exist.
    pub async fn connect(settings: KafkaSettings) -> Result<Self> {
        let bus = Self::new(settings)?;
        bus.ensure_topics().await?;
        Ok(bus)
    }

    /// A client that creates nothing (for describing).
    pub fn new(settings: KafkaSettings) -> Result<Self> {
        let mut pc = settings.client_config();
        // Throughput: batches of up to 1 MiB per partition, sent after at most 5 ms;
        // durability: every in-sync replica acknowledges; ordering and no duplicates on
        // retry: the idempotent producer.
        pc.set("enable.idempotence", "true")
            .set("acks", "all")
            .set("compression.type", "lz4")
            .set("linger.ms", "5")
            .set("batch.size", "1048576")
            .set("queue.buffering.max.messages", "500000")
            .set("queue.buffering.max.kbytes", "262144")
            .set("partitioner", "murmur2_random")
            .set(
                "message.timeout.ms",
                settings.delivery_timeout.as_millis().to_string(),
            );
        for (k, v) in &settings.extra {
            pc.set(k, v);
        }
        let health = Arc::new(Health::default());
        let producer: FutureProducer<HealthContext> = pc
            .create_with_context(HealthContext(health.clone()))
            .map_err(|e| BusError::Config(format!("kafka producer: {e}")))?;
        tokio::spawn(probe_while_down(producer.clone(), health.clone()));
        let bus = KafkaBus {
            settings,
            producer,
            health,
            partitions: Mutex::new(HashMap::new()),
            failing: Arc::new(Mutex::new(None)),
            closed: AtomicBool::new(false),
        };
        Ok(bus)
    }

    pub fn settings(&self) -> &KafkaSettings {
        &self.settings
    }

    /// Creates missing topics; reads the partition count of every topic.
    pub async fn ensure_topics(&self) -> Result<()> {
        let admin: AdminClient<DefaultClientContext> = self
            .settings
            .client_config()
            .create()
            .map_err(|e| BusError::Config(format!("kafka admin: {e}")))?;
        let names: Vec<String> = Topic::ALL
            .iter()
            .map(|t| self.settings.topic_name(*t))
            .collect();
        // Raw events are replayable for a week; the rest is kept a month.
        let retention = |t: Topic| match t {
            Topic::Events => "604800000",
            _ => "2592000000",
        };
        let new: Vec<NewTopic<'_>> = Topic::ALL
            .iter()
            .zip(&names)
            .map(|(t, name)| {
                NewTopic::new(
                    name,
                    self.settings.partitions as i32,
                    TopicReplication::Fixed(self.settings.replication),
                )
                .set("retention.ms", retention(*t))
            })
            .collect();
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        let results = admin
            .create_topics(new.iter(), &opts)
            .await
            .map_err(unavailable)?;
        for r in results {
            if let Err((name, code)) = r
                && code != RDKafkaErrorCode::TopicAlreadyExists
            {
                return Err(BusError::Unavailable(format!(
                    "kafka: cannot create topic {name}: {code}"
                )));
            }
        }
        for t in Topic::ALL {
            let n = self.fetch_partitions(t).await?;
            self.partitions
                .lock()
                .expect("partitions lock")
                .insert(t, n);
        }
        Ok(())
    }

    async fn fetch_partitions(&self, topic: Topic) -> Result<u32> {
        let producer = self.producer.clone();
        let name = self.settings.topic_name(topic);
        // Metadata may lag topic creation by a moment.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (p, name2) = (producer.clone(), name.clone());
            let n = tokio::task::spawn_blocking(move || {
                p.client()
                    .fetch_metadata(Some(&name2), Duration::from_secs(5))
                    .map(|m| {
                        m.topics()
                            .first()
                            .map(|t| t.partitions().len() as u32)
                            .unwrap_or(0)
                    })
            })
            .await
            .map_err(|e| BusError::Unavailable(e.to_string()))?
            .map_err(unavailable)?;
            if n > 0 {
                return Ok(n);
            }
            if Instant::now() > deadline {
                return Err(BusError::Unavailable(format!(
                    "kafka: topic {name} has no partitions"
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Each Digame topic with its partition count and the records it holds.
    pub async fn describe(&self) -> Result<Vec<TopicInfo>> {
        let mut out = Vec::new();
        for t in Topic::ALL {
            let name = self.settings.topic_name(t);
            let partitions = self.fetch_partitions(t).await?;
            let (p, n) = (self.producer.clone(), name.clone());
            let records = tokio::task::spawn_blocking(move || {
                (0..partitions as i32)
                    .map(|i| {
                        p.client()
                            .fetch_watermarks(&n, i, Duration::from_secs(5))
                            .map(|(low, high)| (high - low).max(0) as u64)
                    })
                    .sum::<std::result::Result<u64, KafkaError>>()
            })
            .await
            .map_err(|e| BusError::Unavailable(e.to_string()))?
            .map_err(unavailable)?;
            out.push(TopicInfo {
                name,
                partitions,
                records,
            });
        }
        Ok(out)
    }

    fn set_failing(&self, why: Option<String>) {
        *self.failing.lock().expect("failing lock") = why;
    }
}

#[async_trait]
impl EventBus for KafkaBus {
    async fn publish(&self, topic: Topic, records: Vec<Record>) -> Result<Vec<Position>> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        if self.closed.load(Ordering::Relaxed) {
            return Err(BusError::Unavailable("bus is closed".into()));
        }
        if self.health.all_brokers_down.load(Ordering::Relaxed) {
            return Err(BusError::Unavailable(format!(
                "no Kafka broker reachable at {}",
                self.settings.brokers
            )));
        }
        let name = self.settings.topic_name(topic);
        let mut pending = Vec::with_capacity(records.len());
        let mut failed: Vec<(usize, String)> = Vec::new();
        for (i, r) in records.iter().enumerate() {
            let rec = FutureRecord::to(&name)
                .key(r.key.as_ref())
                .payload(r.payload.as_ref())
                .timestamp(r.timestamp_ms);
            match self.producer.send_result(rec) {
                Ok(fut) => pending.push((i, fut)),
                Err((e, _)) => failed.push((i, e.to_string())),
            }
        }
        let mut positions = vec![
            Position {
                partition: 0,
                offset: 0
            };
            records.len()
        ];
        let results =
            futures::future::join_all(pending.into_iter().map(|(i, fut)| fut.map(move |r| (i, r))))
                .await;
        for (i, r) in results {
            match r {
                Ok(Ok(delivery)) => {
                    positions[i] = Position {
                        partition: delivery.partition as u32,
                        offset: delivery.offset as u64,
                    }
                }
                Ok(Err((e, _))) => failed.push((i, e.to_string())),
                Err(_) => failed.push((i, "the producer was dropped".into())),
            }
        }
        if failed.is_empty() {
            self.set_failing(None);
            return Ok(positions);
        }
        failed.sort_by_key(|(i, _)| *i);
        let why = failed[0].1.clone();
        self.set_failing(Some(why.clone()));
        if failed.len() == records.len() {
            return Err(BusError::Unavailable(format!("kafka: {why}")));
        }
        Err(BusError::PartlyPublished { failed })
    }

    async fn subscribe(&self, topic: Topic, group: &str) -> Result<Box<dyn BusConsumer>> {
        let name = self.settings.topic_name(topic);
        let assignment = Arc::new(Mutex::new(BTreeSet::new()));
        let high = Arc::new(Mutex::new(HashMap::new()));
        let context = GroupContext {
            topic: name.clone(),
            assignment: assignment.clone(),
            high: high.clone(),
        };
        let mut cc = self.settings.client_config();
        cc.set("group.id", format!("{}{group}", self.settings.prefix))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set(
                "session.timeout.ms",
                SESSION_TIMEOUT.as_millis().to_string(),
            )
            .set("heartbeat.interval.ms", "1000")
            // High watermarks for the lag gauge, from fetch responses. Asking the broker
            // (ListOffsets) instead would queue behind a long-polling fetch on the same
            // connection, and a timed-out request makes librdkafka drop the connection,
            // fetch included: consumption stalls.
            .set("statistics.interval.ms", "1000");
        for (k, v) in &self.settings.extra {
            cc.set(k, v);
        }
        let consumer: StreamConsumer<GroupContext> = cc
            .create_with_context(context)
            .map_err(|e| BusError::Config(format!("kafka consumer: {e}")))?;
        consumer.subscribe(&[&name]).map_err(unavailable)?;
        // The probe's own client joins no group: its requests never queue behind the
        // member's long-polling fetches, and it can read the group's commits.
        let probe: BaseConsumer = cc
            .create()
            .map_err(|e| BusError::Config(format!("kafka consumer: {e}")))?;
        Ok(Box::new(KafkaConsumer {
            consumer: Arc::new(consumer),
            probe: Arc::new(probe),
            topic: name,
            assignment,
            skip_below: HashMap::new(),
            positions: HashMap::new(),
            high,
            committed: BTreeMap::new(),
        }))
    }

    fn partitions(&self, topic: Topic) -> u32 {
        self.partitions
            .lock()
            .expect("partitions lock")
            .get(&topic)
            .copied()
            .unwrap_or(self.settings.partitions)
    }

    fn partition_of(&self, topic: Topic, key: &[u8]) -> u32 {
        murmur2_partition(key, self.partitions(topic))
    }

    fn status(&self) -> BusStatus {
        if self.health.all_brokers_down.load(Ordering::Relaxed) {
            return BusStatus {
                healthy: false,
                detail: format!("kafka {}: no broker reachable", self.settings.brokers),
                ..BusStatus::default()
            };
        }
        match &*self.failing.lock().expect("failing lock") {
            None => BusStatus {
                healthy: true,
                detail: format!("kafka {}", self.settings.brokers),
                ..BusStatus::default()
            },
            Some(why) => BusStatus {
                healthy: false,
                detail: format!("kafka {}: {why}", self.settings.brokers),
                ..BusStatus::default()
            },
        }
    }

    async fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        self.health.closed.store(true, Ordering::Relaxed);
        let p = self.producer.clone();
        let _ = tokio::task::spawn_blocking(move || p.flush(Duration::from_secs(10))).await;
    }
}

/// While every broker is down, probes for one each second; clears the flag when one
/// answers. Ends with the bus.
async fn probe_while_down(producer: FutureProducer<HealthContext>, h: Arc<Health>) {
    while !h.closed.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if !h.all_brokers_down.load(Ordering::Relaxed) {
            continue;
        }
        let p = producer.clone();
        let reached = tokio::task::spawn_blocking(move || {
            p.client()
                .fetch_metadata(None, Duration::from_secs(1))
                .map(|m| !m.brokers().is_empty())
                .unwrap_or(false)
        })
        .await
        .unwrap_or(false);
        if reached {
            h.all_brokers_down.store(false, Ordering::Relaxed);
            tracing::info!("a Kafka broker is reachable again");
        }
    }
}

/// Tracks the partitions this member owns from rebalance callbacks, and their high
/// watermarks from statistics.
struct GroupContext {
    topic: String,
    assignment: Arc<Mutex<BTreeSet<u32>>>,
    high: Arc<Mutex<HashMap<u32, u64>>>,
}

impl ClientContext for GroupContext {
    fn stats(&self, statistics: Statistics) {
        let Some(topic) = statistics.topics.get(&self.topic) else {
            return;
        };
        let mut high = self.high.lock().expect("high watermarks lock");
        for p in topic.partitions.values() {
            // Unknown until the first fetch response (-1001); the internal partition -1.
            if p.partition >= 0 && p.hi_offset >= 0 {
                high.insert(p.partition as u32, p.hi_offset as u64);
            }
        }
    }
}

impl ConsumerContext for GroupContext {
    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let mut owned = self.assignment.lock().expect("assignment lock");
        match rebalance {
            Rebalance::Assign(tpl) => {
                for e in tpl.elements_for_topic(&self.topic) {
                    owned.insert(e.partition() as u32);
                }
                tracing::info!(topic = %self.topic, partitions = ?*owned, "partitions assigned");
            }
            Rebalance::Revoke(tpl) => {
                for e in tpl.elements_for_topic(&self.topic) {
                    owned.remove(&(e.partition() as u32));
                }
                tracing::info!(topic = %self.topic, partitions = ?*owned, "partitions revoked");
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "consumer group rebalance failed"),
        }
    }
}

struct KafkaConsumer {
    consumer: Arc<StreamConsumer<GroupContext>>,
    /// A client of the same group that never subscribes, for [`BusConsumer::progress_probe`].
    probe: Arc<BaseConsumer>,
    topic: String,
    assignment: Arc<Mutex<BTreeSet<u32>>>,
    /// Records below these offsets are skipped (set by `seek`).
    skip_below: HashMap<u32, u64>,
    /// Next offset to read per partition, from what was polled.
    positions: HashMap<u32, u64>,
    /// High watermarks from librdkafka's statistics, for `lag`.
    high: Arc<Mutex<HashMap<u32, u64>>>,
    committed: BTreeMap<u32, u64>,
}

#[async_trait]
impl BusConsumer for KafkaConsumer {
    async fn poll(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivered>> {
        let mut out = Vec::new();
        // Nothing within `wait` is an empty poll, not an error.
        let mut next = tokio::time::timeout(wait, self.consumer.recv()).await.ok();
        while let Some(r) = next.take() {
            match r {
                Ok(m) => {
                    let partition = m.partition() as u32;
                    let offset = m.offset() as u64;
                    self.positions.insert(partition, offset + 1);
                    if self.skip_below.get(&partition).is_none_or(|&s| offset >= s) {
                        out.push(Delivered {
                            partition,
                            offset,
                            timestamp_ms: m.timestamp().to_millis().unwrap_or(0),
                            key: Bytes::copy_from_slice(m.key().unwrap_or_default()),
                            payload: Bytes::copy_from_slice(m.payload().unwrap_or_default()),
                        });
                    }
                }
                Err(e) => {
                    if out.is_empty() {
                        return Err(unavailable(e));
                    }
                    tracing::warn!(error = %e, "kafka consumer error");
                    break;
                }
            }
            if out.len() >= max {
                break;
            }
            // Take whatever is already fetched, without waiting for more.
            next = self.consumer.recv().now_or_never();
        }
        Ok(out)
    }

    fn assignment(&self) -> Vec<u32> {
        self.assignment
            .lock()
            .expect("assignment lock")
            .iter()
            .copied()
            .collect()
    }

    async fn seek(&mut self, partition: u32, offset: u64) -> Result<()> {
        // The group decides where reading starts (the committed offset, which never runs
        // ahead of the caller's checkpoint); records before `offset` are skipped here.
        self.skip_below.insert(partition, offset);
        Ok(())
    }

    async fn commit(&mut self, next_offsets: &BTreeMap<u32, u64>) -> Result<()> {
        let owned = self.assignment();
        let mut tpl = TopicPartitionList::new();
        for p in owned {
            if let Some(&o) = next_offsets.get(&p) {
                tpl.add_partition_offset(&self.topic, p as i32, Offset::Offset(o as i64))
                    .map_err(unavailable)?;
            }
        }
        if tpl.count() == 0 {
            return Ok(());
        }
        let c = self.consumer.clone();
        let result = tokio::task::spawn_blocking(move || c.commit(&tpl, CommitMode::Sync))
            .await
            .map_err(|e| BusError::Unavailable(e.to_string()))?;
        match result {
            Ok(()) => {
                for (p, o) in next_offsets {
                    self.committed.insert(*p, *o);
                }
                Ok(())
            }
            // A rebalance moved partitions away: their new owner replays from the last
            // successful commit, which is safe because outputs are idempotent.
            Err(KafkaError::ConsumerCommit(
                RDKafkaErrorCode::RebalanceInProgress
                | RDKafkaErrorCode::IllegalGeneration
                | RDKafkaErrorCode::UnknownMemberId,
            )) => {
                tracing::warn!("offset commit skipped during a rebalance");
                Ok(())
            }
            Err(e) => Err(unavailable(e)),
        }
    }

    fn committed(&self) -> BTreeMap<u32, u64> {
        self.committed.clone()
    }

    fn progress_probe(&self) -> Option<digame_bus::ProgressProbe> {
        let (probe, topic) = (self.probe.clone(), self.topic.clone());
        Some(Arc::new(move || group_progress(&probe, &topic)))
    }

    fn lag(&self) -> u64 {
        let owned = self.assignment();
        let high = self.high.lock().expect("high watermarks lock");
        owned
            .iter()
            .filter_map(|p| {
                let read = self.positions.get(p).or(self.committed.get(p));
                Some(high.get(p)?.saturating_sub(read.copied().unwrap_or(0)))
            })
            .sum()
    }
}

/// Every partition's end and the group's committed offset, asked of the brokers now
/// (blocking: a metadata request, then one offsets request per partition and one for the
/// group's commits).
fn group_progress(probe: &BaseConsumer, topic: &str) -> Result<digame_bus::GroupProgress> {
    const TIMEOUT: Duration = Duration::from_secs(2);
    // The client is never polled otherwise: drain what it queued (errors of brokers it
    // could not reach) so the queue stays bounded.
    for _ in 0..64 {
        if probe.poll(Duration::ZERO).is_none() {
            break;
        }
    }
    let metadata = probe
        .fetch_metadata(Some(topic), TIMEOUT)
        .map_err(unavailable)?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let mut out = digame_bus::GroupProgress::default();
    let mut starts = BTreeMap::new();
    let mut tpl = TopicPartitionList::new();
    for &p in &partitions {
        let (low, high) = probe
            .fetch_watermarks(topic, p, TIMEOUT)
            .map_err(unavailable)?;
        out.ends.insert(p as u32, high.max(0) as u64);
        starts.insert(p as u32, low.max(0) as u64);
        tpl.add_partition(topic, p);
    }
    let committed = probe.committed_offsets(tpl, TIMEOUT).map_err(unavailable)?;
    for e in committed.elements_for_topic(topic) {
        let p = e.partition() as u32;
        let start = starts.get(&p).copied().unwrap_or(0);
        let next = match e.offset() {
            Offset::Offset(o) if o >= 0 => (o as u64).max(start),
            _ => start,
        };
        out.committed.insert(p, next);
    }
    Ok(out)
}

/// The partition the `murmur2_random` partitioner (the producer's) sends a keyed record
/// to: the positive part of the key's MurmurHash2 (seed `0x9747b28c`, the hash Kafka's
/// Java client uses) modulo the partition count.
pub fn murmur2_partition(key: &[u8], partitions: u32) -> u32 {
    (murmur2(key) & 0x7fff_ffff) % partitions.max(1)
}

/// MurmurHash2, 32-bit, as Kafka clients compute it (little-endian words).
fn murmur2(data: &[u8]) -> u32 {
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h: u32 = 0x9747_b28c ^ data.len() as u32;
    let mut words = data.chunks_exact(4);
    for w in &mut words {
        let mut k = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M) ^ k;
    }
    let tail = words.remainder();
    if !tail.is_empty() {
        for (i, b) in tail.iter().enumerate() {
            h ^= u32::from(*b) << (8 * i);
        }
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^ (h >> 15)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_the_java_client() {
        // Kafka's own test vectors for `Utils.murmur2` (signed 32-bit).
        for (key, hash) in [
            ("21", -973_932_308i32),
            ("foobar", -790_332_482),
            ("a-little-bit-long-string", -985_981_536),
            ("a-little-bit-longer-string", -1_486_304_829),
            (
                "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            ("abc", 479_470_107),
        ] {
            assert_eq!(murmur2(key.as_bytes()) as i32, hash, "{key}");
            assert_eq!(
                murmur2_partition(key.as_bytes(), 8),
                (hash & 0x7fff_ffff) as u32 % 8,
                "{key}"
            );
        }
    }
}
