//! The stream-processor runtime: consume the bus, keep keyed state, emit features, write
//! the store, checkpoint.
//!
//! Ordering of side effects per checkpoint, which is what makes replays harmless:
//! 1. emit changed feature rows and write them, with the raw events and dead letters of
//!    the same span, to the store (durable on return);
//! 2. write the checkpoint of each owned partition (the state of the people whose events
//!    that partition carries + the partition offset it covers) atomically;
//! 3. commit the offsets to the bus.
//!
//! State is kept per bus partition, so pipeline workers in one consumer group can split
//! the partitions: when a rebalance hands a worker a partition, it restores that
//! partition's checkpoint and replays from there; when it loses one, it drops that state.
//! A partition without a usable checkpoint (damaged, missing) has its state rebuilt from
//! the raw events in the store, which hold everything below the committed offset even
//! when the bus has lost or expired it, and reading resumes at the committed offset.
//! Checkpoints live in a directory every worker of the group can reach
//! (`<data_dir>/pipeline/<group>/p<N>.bin`).
//!
//! Before step 1, late events for days no longer held in memory are resolved: the person's
//! stored events of those days are read through [`EventHistory`] (the raw events of every
//! earlier flush are durable by then) and the days rebuilt, so the emit publishes what the
//! late events changed. Within one poll, events are admitted in event-time order, so the
//! events of one request or one upload never reach a late path at all.
//!
//! A crash between any two steps replays events after the last checkpoint into the state
//! restored from it; the outputs they produce carry the same keys and newer revisions, so
//! the store's upsert semantics make the replay invisible in results. Nothing is
//! acknowledged to the bus before its effects are durable (at-least-once in, idempotent
//! out). Memory is bounded: pending rows are flushed when `max_pending_events` is reached,
//! and polls take at most `poll_batch` records.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use digame_bus::{BusConsumer, EventBus, GroupProgress, Record, Topic};
use digame_config::PipelineConfig;
use digame_schemas::profile::Changes;
use digame_schemas::{ActivityEvent, DeadLetter, EventTime, FeatureRow, write_partition_key};
use digame_store::{StoreBatch, StoreSink};
use digame_telemetry::metrics;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::directory::Directory;
use crate::features::FeatureParams;
use crate::state::{Admission, PersonState, ReopenRange, StateParams};
use crate::{Error, Result};

/// Consumer group of the feature pipeline.
pub const GROUP: &str = "features";
/// Consumer group of the dead-letter sink.
pub const DEAD_LETTER_GROUP: &str = "dead-letter-sink";
const CHECKPOINT_VERSION: u32 = 5;
/// Leads every checkpoint file: `DGCP`, then a CRC-32 of the rest (little endian), then the
/// postcard body. A flipped bit fails the checksum instead of decoding into wrong state.
const CHECKPOINT_MAGIC: &[u8; 4] = b"DGCP";
const DAY_MS: i64 = 86_400_000;

/// Where the runtime reads a person's stored raw events to reopen days no longer in memory.
#[async_trait::async_trait]
pub trait EventHistory: Send + Sync {
    /// The person's stored events starting in `[from, to)` (ms), in any order.
    async fn person_events(
        &self,
        tenant: &str,
        user: &str,
        from: i64,
        to: i64,
    ) -> std::result::Result<Vec<ActivityEvent>, String>;

    /// The people, as (tenant, user), with stored events starting in `[from, to)`.
    async fn people(
        &self,
        from: i64,
        to: i64,
    ) -> std::result::Result<Vec<(String, String)>, String>;
}

/// A person whose late events wait for their stored events.
#[derive(Clone, Debug)]
pub struct ReopenRequest {
    pub tenant: Arc<str>,
    pub user: Arc<str>,
    pub range: ReopenRange,
}

/// Live status, read by `/readyz` and metrics.
#[derive(Debug, Default)]
pub struct PipelineStatus {
    /// Records on the bus not yet read, as of the last poll.
    pub lag: AtomicU64,
    /// Events read but not yet counted in stored features (they are, at the next flush).
    pub unflushed: AtomicU64,
    /// Where the bus can say its partition ends at any moment, with the offsets processed
    /// so far: an exact backlog between polls too.
    backlog: std::sync::Mutex<Backlog>,
    pub processed: AtomicU64,
    pub running: AtomicBool,
    /// Set while the store refuses writes.
    pub store_failing: AtomicBool,
    /// Newest settings/profile revision of the metadata store the features use.
    pub settings_revision: AtomicI64,
    /// What recovery did that an operator should know (a damaged checkpoint moved aside).
    pub notices: std::sync::Mutex<Vec<String>>,
    /// Windows whose stored rows were lost (a damaged store file), as (tenant, from, to):
    /// the next flush emits every value the pipeline holds for them again, with revisions
    /// newer than any row written meanwhile.
    pub reemit: std::sync::Mutex<Vec<(String, i64, i64)>>,
}

/// The operator core without I/O: decode, admit, emit. Used by the runtime and benchmarks.
pub struct Processor {
    people: HashMap<String, PersonState, foldhash::fast::RandomState>,
    params: StateParams,
    /// Tenant settings and person profiles.
    pub directory: Directory,
    last_revision: i64,
    /// Rows of the previous emit: the next one reserves as much, instead of regrowing.
    last_emit_rows: usize,
    /// Accepted raw events awaiting the store.
    pub pending_events: Vec<ActivityEvent>,
    /// Too-late and undecodable events awaiting the store.
    pub pending_dead: Vec<DeadLetter>,
    pub keep_raw_events: bool,
    /// Events by result since the last emit, published to metrics in batches (per-event
    /// label lookups cost more than the counting).
    outcomes: [u64; 4],
    /// Reused buffer for the `tenant:user` state key.
    key: String,
    /// State keys of the people with reopened days waiting for the store.
    reopen_pending: std::collections::BTreeSet<String>,
    /// A poll's decoded events and their admission order, kept between polls so their
    /// memory is reused rather than faulted in afresh each time.
    batch: Vec<Option<(u32, ActivityEvent)>>,
    order: Vec<(i64, u32)>,
    /// Days held in memory only because events touched them lately, after the last emit,
    /// and the most allowed (`pipeline.max_touched_days`).
    touch_held: usize,
    max_touch_held: usize,
}

/// Indexes into `Processor::outcomes`, with their metric labels: counted in order, seen
/// before, counted late (revising windows that may be final), not a canonical event.
const OUTCOMES: [&str; 4] = ["processed", "duplicate", "late", "undecodable"];
const PROCESSED: usize = 0;
const DUPLICATE: usize = 1;
const LATE: usize = 2;
const UNDECODABLE: usize = 3;

/// The records of owned partitions not yet processed, from the bus's end offsets, and
/// since when each partition has had records waiting without progress.
#[derive(Default)]
struct Backlog {
    ends: Option<digame_bus::EndOffsets>,
    /// Where the bus has no instant ends (Kafka): a round trip to the brokers.
    probe: Option<digame_bus::ProgressProbe>,
    processed: BTreeMap<u32, u64>,
    /// Per partition: the last moment it advanced or had nothing waiting.
    settled: BTreeMap<u32, Instant>,
}

impl std::fmt::Debug for Backlog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backlog")
            .field("processed", &self.processed)
            .finish_non_exhaustive()
    }
}

/// One owned partition of the events stream, as `/readyz` and the metrics report it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PartitionProgress {
    pub partition: u32,
    /// Next offset to process.
    pub processed: u64,
    /// Next offset the bus will hand out, where the bus can say at any moment (the
    /// embedded log); records below it were acknowledged.
    pub end: Option<u64>,
    /// `end - processed`, where `end` is known.
    pub behind: Option<u64>,
    /// How long records have waited here without progress: zero while caught up or
    /// advancing.
    #[serde(serialize_with = "millis")]
    pub waiting: Duration,
}

fn millis<S: serde::Serializer>(d: &Duration, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_millis() as u64)
}

impl PipelineStatus {
    /// Records accepted on the bus that the pipeline has not processed yet: exact where the
    /// bus can tell its ends at any moment (the embedded log), else the lag of the last
    /// poll.
    pub fn backlog(&self) -> u64 {
        self.backlog_of(&self.backlog.lock().expect("backlog lock"))
    }

    fn backlog_of(&self, b: &Backlog) -> u64 {
        match &b.ends {
            Some(ends) => ends()
                .into_iter()
                .filter_map(|(p, end)| b.processed.get(&p).map(|done| end.saturating_sub(*done)))
                .sum(),
            None => self.lag.load(Ordering::Relaxed),
        }
    }

    /// Records accepted on the bus that no pipeline has processed yet, exact at the moment
    /// of the call: [`Self::backlog`] where the bus can tell its ends at once; else the
    /// brokers are asked (off the async workers) for every partition's end, and partitions
    /// this node does not own count from the group's committed offsets. An error means the
    /// backlog is unknown now: never take it for zero.
    pub async fn backlog_now(&self) -> std::result::Result<u64, String> {
        let (probe, processed) = {
            let b = self.backlog.lock().expect("backlog lock");
            match (&b.ends, &b.probe) {
                (None, Some(probe)) => (probe.clone(), b.processed.clone()),
                _ => return Ok(self.backlog_of(&b)),
            }
        };
        let progress = tokio::task::spawn_blocking(move || probe())
            .await
            .map_err(|e| format!("the bus probe failed: {e}"))?
            .map_err(|e| e.to_string())?;
        Ok(unprocessed(&progress, &processed))
    }

    /// Records and events not yet counted in stored features: the backlog and what was
    /// processed but not flushed. 0 means every accepted event is counted.
    pub fn uncounted(&self) -> u64 {
        self.backlog() + self.unflushed.load(Ordering::Relaxed)
    }

    /// Every owned partition's progress, in partition order. Where the bus cannot tell a
    /// partition's end (Kafka), records wait as long as the last poll saw a lag and no
    /// partition advanced.
    pub fn partitions(&self) -> Vec<PartitionProgress> {
        let b = self.backlog.lock().expect("backlog lock");
        let ends: BTreeMap<u32, u64> = b
            .ends
            .as_ref()
            .map(|e| e().into_iter().collect())
            .unwrap_or_default();
        let now = Instant::now();
        b.processed
            .iter()
            .map(|(&partition, &processed)| {
                let end = ends.get(&partition).copied();
                let behind = end.map(|e| e.saturating_sub(processed));
                let waiting = match behind {
                    Some(0) => Duration::ZERO,
                    _ if behind.is_none() && self.lag.load(Ordering::Relaxed) == 0 => {
                        Duration::ZERO
                    }
                    _ => b
                        .settled
                        .get(&partition)
                        .map_or(Duration::ZERO, |t| now - *t),
                };
                PartitionProgress {
                    partition,
                    processed,
                    end,
                    behind,
                    waiting,
                }
            })
            .collect()
    }

    fn set_probe(&self, probe: Option<digame_bus::ProgressProbe>) {
        self.backlog.lock().expect("backlog lock").probe = probe;
    }

    /// Called by the pipeline after every poll (at least every flush interval): a
    /// partition that advanced, or has nothing waiting, is settled now.
    fn track(&self, ends: Option<digame_bus::EndOffsets>, processed: &BTreeMap<u32, u64>) {
        let mut b = self.backlog.lock().expect("backlog lock");
        if ends.is_some() {
            b.ends = ends;
        }
        let now = Instant::now();
        let end_now: BTreeMap<u32, u64> = b
            .ends
            .as_ref()
            .map(|e| e().into_iter().collect())
            .unwrap_or_default();
        let lag = self.lag.load(Ordering::Relaxed);
        for (&p, &done) in processed {
            let advanced = b.processed.get(&p) != Some(&done);
            let idle = match end_now.get(&p) {
                Some(&end) => end <= done,
                None => lag == 0,
            };
            if advanced || idle || !b.settled.contains_key(&p) {
                b.settled.insert(p, now);
            }
        }
        b.settled.retain(|p, _| processed.contains_key(p));
        b.processed.clone_from(processed);
    }
}

/// Records below each partition's end not yet processed: from this node's processed
/// offsets where it owns the partition, else from the group's commits (another member's
/// unflushed work is not committed yet, so it counts as waiting).
fn unprocessed(progress: &GroupProgress, processed: &BTreeMap<u32, u64>) -> u64 {
    progress
        .ends
        .iter()
        .map(|(p, end)| {
            let done = processed
                .get(p)
                .or(progress.committed.get(p))
                .copied()
                .unwrap_or(0);
            end.saturating_sub(done)
        })
        .sum()
}

impl Processor {
    /// `horizon_days` is the longest tenant horizon of ingest: how far back events may be
    /// accepted, so how far back days must stay reopenable.
    pub fn new(cfg: &PipelineConfig, horizon_days: u32) -> Result<Self> {
        let directory = Directory::new(&cfg.default_timezone).map_err(Error::Config)?;
        Ok(Processor {
            people: HashMap::default(),
            params: StateParams {
                lateness_ms: (cfg.allowed_lateness_secs * 1000) as i64,
                hold_ms: i64::from(cfg.hold_days) * DAY_MS,
                touch_hold_ms: (cfg.hold_touched_secs * 1000) as i64,
                horizon_ms: i64::from(horizon_days) * DAY_MS,
                features: FeatureParams {
                    pulsetime_ms: cfg.pulsetime_ms as i64,
                    flood_ms: cfg.presence_flood_ms as i64,
                },
            },
            directory,
            last_revision: 0,
            last_emit_rows: 0,
            pending_events: Vec::new(),
            pending_dead: Vec::new(),
            keep_raw_events: true,
            outcomes: [0; 4],
            key: String::new(),
            reopen_pending: Default::default(),
            batch: Vec::new(),
            order: Vec::new(),
            touch_held: 0,
            max_touch_held: cfg.max_touched_days,
        })
    }

    /// Processes the payloads of one poll: each person's events are admitted in event-time
    /// order (stable for equal times), so one request or one upload, in whatever order it
    /// was written, is read as if sorted.
    pub fn process_batch<'a>(
        &mut self,
        records: impl IntoIterator<Item = (u32, &'a [u8])>,
        now_wall: i64,
    ) {
        let (mut batch, mut order) = (
            std::mem::take(&mut self.batch),
            std::mem::take(&mut self.order),
        );
        for (partition, payload) in records {
            if let Some(ev) = self.decode(payload, now_wall) {
                order.push((ev.timestamp.0, batch.len() as u32));
                batch.push(Some((partition, ev)));
            }
        }
        // Sorting all by time sorts each person's events. The sort moves (time, arrival
        // index) pairs, not the events: ties keep arrival order, and already sorted runs
        // (the usual case) cost one pass.
        order.sort_unstable();
        for &(_, i) in &order {
            let (partition, ev) = batch[i as usize].take().expect("each index once");
            self.admit(partition, ev, now_wall);
        }
        batch.clear();
        order.clear();
        (self.batch, self.order) = (batch, order);
    }

    /// The people whose late events wait for their stored events, and what to read.
    pub fn reopen_requests(&self) -> Vec<ReopenRequest> {
        self.reopen_pending
            .iter()
            .filter_map(|key| {
                let person = self.people.get(key.as_str())?;
                Some(ReopenRequest {
                    tenant: person.tenant.clone(),
                    user: person.user.clone(),
                    range: person.reopen_range()?,
                })
            })
            .collect()
    }

    /// Hands a person's stored events (of their [`ReopenRequest`]) to their reopened days.
    pub fn reopen(&mut self, tenant: &str, user: &str, stored: &[ActivityEvent], now_wall: i64) {
        let key = digame_schemas::partition_key(tenant, user);
        self.reopen_pending.remove(&key);
        if let Some(person) = self.people.get_mut(key.as_str()) {
            refresh_params(&mut self.directory, person);
            person.reopen(stored, now_wall, &self.params);
        }
    }

    /// Resolves every waiting reopening from `events`, a stand-in for the store holding
    /// them (a replay of stored events, tests).
    pub fn resolve_reopens_from(&mut self, events: &[ActivityEvent], now_wall: i64) {
        for req in self.reopen_requests() {
            let stored: Vec<ActivityEvent> = events
                .iter()
                .filter(|e| {
                    *e.tenant_id == *req.tenant
                        && *e.user_id == *req.user
                        && (req.range.from..req.range.to).contains(&e.timestamp.0)
                })
                .cloned()
                .collect();
            self.reopen(&req.tenant, &req.user, &stored, now_wall);
        }
    }

    /// Processes one bus payload read from `partition`.
    pub fn process(&mut self, partition: u32, payload: &[u8], now_wall: i64) {
        if let Some(ev) = self.decode(payload, now_wall) {
            self.admit(partition, ev, now_wall);
        }
    }

    /// Decodes a payload; what cannot be read is dead-lettered with the reason.
    fn decode(&mut self, payload: &[u8], now_wall: i64) -> Option<ActivityEvent> {
        match decode_event(payload) {
            Ok(ev) if ev.event_id.is_some() && !ev.tenant_id.is_empty() => Some(ev),
            Ok(_) => {
                self.dead(
                    payload,
                    "events on the bus need event_id and tenant_id".into(),
                    now_wall,
                );
                None
            }
            Err(reason) => {
                self.dead(payload, reason, now_wall);
                None
            }
        }
    }

    /// Admits a person's stored events (read back from the store, in any order) into the
    /// state of `partition`, as when state is rebuilt without a checkpoint. They were
    /// counted and stored when first processed: they enter the state only, not the
    /// pending raw events nor the counts of processed events.
    pub fn restore_events(
        &mut self,
        partition: u32,
        mut stored: Vec<ActivityEvent>,
        now_wall: i64,
    ) {
        stored.sort_by_key(|e| e.timestamp.0);
        for ev in stored {
            self.place(partition, &ev, now_wall);
        }
    }

    /// The span of event time `[from, to)` whose events make up the state at `now_wall`:
    /// what a rebuild without a checkpoint reads.
    pub fn state_span(&self, now_wall: i64) -> (i64, i64) {
        // Ingest admits events starting at most an hour ahead of its clock; a day either
        // side covers clock differences between nodes.
        (now_wall - self.params.span_ms() - DAY_MS, now_wall + DAY_MS)
    }

    fn admit(&mut self, partition: u32, ev: ActivityEvent, now_wall: i64) {
        let outcome = self.place(partition, &ev, now_wall);
        let person = self
            .people
            .get_mut(self.key.as_str())
            .expect("placed just now");
        if outcome == DUPLICATE {
            person.tally.1 += 1;
        } else {
            person.tally.0 += 1;
        }
        self.outcomes[outcome] += 1;
        if outcome != DUPLICATE && self.keep_raw_events {
            self.pending_events.push(ev);
        }
    }

    /// Places `ev` in its person's state (created on their first event) and returns the
    /// outcome; leaves `self.key` holding the person's state key.
    fn place(&mut self, partition: u32, ev: &ActivityEvent, now_wall: i64) -> usize {
        write_partition_key(&mut self.key, &ev.tenant_id, &ev.user_id);
        let directory = &mut self.directory;
        let person = match self.people.get_mut(self.key.as_str()) {
            Some(p) => p,
            None => self.people.entry(self.key.clone()).or_insert_with(|| {
                let params = directory.params(&ev.tenant_id, &ev.user_id);
                let mut p =
                    PersonState::new(&ev.tenant_id, &ev.user_id, params, directory.generation());
                p.partition = partition;
                p
            }),
        };
        refresh_params(directory, person);
        let outcome = match person.admit(ev, now_wall, &self.params) {
            Admission::Accepted => PROCESSED,
            Admission::Late => LATE,
            Admission::Duplicate => DUPLICATE,
        };
        if person.has_reopenings() && !self.reopen_pending.contains(&self.key) {
            self.reopen_pending.insert(self.key.clone());
        }
        outcome
    }

    /// Records a payload that is not a canonical event (the only reason the pipeline
    /// turns an event away: lateness never is one).
    fn dead(&mut self, payload: &[u8], reason: String, now_wall: i64) {
        self.outcomes[UNDECODABLE] += 1;
        let record = |tenant: &str| {
            metrics()
                .tenant_events
                .with_label_values(&[tenant, "undecodable"])
                .inc()
        };
        let text = String::from_utf8_lossy(&payload[..payload.len().min(64 << 10)]).into_owned();
        let value = serde_json::from_slice::<serde_json::Value>(payload).ok();
        let field = |name: &str| {
            value
                .as_ref()
                .and_then(|v| v[name].as_str().map(str::to_string))
        };
        self.pending_dead.push(DeadLetter {
            tenant_id: field("tenant_id")
                .filter(|t| digame_schemas::validate::validate_tenant_id(t).is_ok())
                .unwrap_or_else(|| "_unknown".into()),
            rejected_at: EventTime(now_wall),
            stage: "pipeline".into(),
            reason_code: "undecodable".into(),
            reason,
            request_index: -1,
            event_id: field("event_id"),
            user_id: field("user_id"),
            payload: text,
        });
        record(&self.pending_dead.last().expect("just pushed").tenant_id);
    }

    /// Emits every changed or newly final feature row and drops closed state.
    pub fn emit(&mut self, now_wall: i64) -> Vec<FeatureRow> {
        let mut rows = Vec::with_capacity(self.last_emit_rows.min(1 << 18));
        let now_micros = now_wall.saturating_mul(1000);
        let last = &mut self.last_revision;
        let mut next = || {
            *last = (*last + 1).max(now_micros);
            *last
        };
        let mut by_tenant: HashMap<Arc<str>, (u64, u64)> = HashMap::new();
        // Past the budget of days held only because events touched them lately (a burst
        // backfill), this emit lets them all go; late events for them read the store.
        let params = if self.touch_held > self.max_touch_held {
            StateParams {
                touch_hold_ms: 0,
                ..self.params
            }
        } else {
            self.params
        };
        let mut touch_held = 0;
        for person in self.people.values_mut() {
            refresh_params(&mut self.directory, person);
            touch_held += person.emit(now_wall, &params, &mut next, &mut rows);
            if person.tally != (0, 0) {
                let t = by_tenant.entry(person.tenant.clone()).or_default();
                t.0 += person.tally.0;
                t.1 += person.tally.1;
                person.tally = (0, 0);
            }
        }
        self.touch_held = touch_held;
        self.people.retain(|_, p| !p.is_idle());
        let m = metrics();
        for (tenant, (counted, duplicate)) in by_tenant {
            for (outcome, n) in [("counted", counted), ("duplicate", duplicate)] {
                if n > 0 {
                    m.tenant_events
                        .with_label_values(&[&tenant, outcome])
                        .inc_by(n);
                }
            }
        }
        for (label, n) in OUTCOMES.iter().zip(&mut self.outcomes) {
            if *n > 0 {
                m.pipeline_events
                    .with_label_values(&[label])
                    .inc_by(std::mem::take(n));
            }
        }
        metrics().pipeline_open_users.set(self.people.len() as i64);
        metrics().pipeline_rows_emitted.inc_by(rows.len() as u64);
        self.last_emit_rows = rows.len();
        rows
    }

    pub fn people(&self) -> usize {
        self.people.len()
    }

    /// Forgets what was emitted for `tenant`'s windows starting in `[from, to)` that are
    /// still in memory, so the next [`Self::emit`] sends all their values again (their
    /// stored rows were lost). Returns the people affected.
    pub fn forget_emitted(&mut self, tenant: &str, from: i64, to: i64) -> usize {
        self.people
            .values_mut()
            .filter(|p| &*p.tenant == tenant)
            .map(|p| p.forget_emitted(from, to))
            .filter(|affected| *affected)
            .count()
    }

    /// Makes every revision emitted from now on newer than wall-clock time `wall_ms`,
    /// whatever wall clock `emit` is later given (a recomputation replays history with
    /// event times as its clock, yet its rows must supersede the live ones).
    pub fn revisions_after(&mut self, wall_ms: i64) {
        self.last_revision = self.last_revision.max(wall_ms.saturating_mul(1000));
    }

    /// The checkpoint of one partition: the state of the people whose events it carries
    /// and `offset`, the next offset to read.
    pub fn encode_partition(&self, partition: u32, offset: u64) -> Result<Vec<u8>> {
        let cp = Checkpoint {
            version: CHECKPOINT_VERSION,
            partition,
            offset,
            last_revision: self.last_revision,
            people: self
                .people
                .values()
                .filter(|p| p.partition == partition)
                .collect(),
        };
        let body = postcard::to_allocvec(&cp).map_err(|e| Error::Checkpoint(e.to_string()))?;
        let mut framed = Vec::with_capacity(CHECKPOINT_MAGIC.len() + 4 + body.len());
        framed.extend_from_slice(CHECKPOINT_MAGIC);
        framed.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        framed.extend_from_slice(&body);
        Ok(framed)
    }

    /// Restores a partition's state from [`Self::encode_partition`]'s bytes; returns the
    /// offset it covers. `what` names the source in errors.
    pub fn restore_partition(&mut self, partition: u32, bytes: &[u8], what: &str) -> Result<u64> {
        // Checkpoints written before the checksum have no magic and are read as they are.
        let body = match bytes.strip_prefix(CHECKPOINT_MAGIC) {
            Some(rest) if rest.len() >= 4 => {
                let (crc, body) = rest.split_at(4);
                let want = u32::from_le_bytes(crc.try_into().expect("4 bytes"));
                if crc32fast::hash(body) != want {
                    return Err(Error::CheckpointDamaged(format!(
                        "{what} fails its checksum ({} bytes)",
                        bytes.len()
                    )));
                }
                body
            }
            Some(_) => {
                return Err(Error::CheckpointDamaged(format!(
                    "{what} is cut short ({} bytes)",
                    bytes.len()
                )));
            }
            None => bytes,
        };
        let cp: Checkpoint<PersonState> = postcard::from_bytes(body)
            .map_err(|e| Error::CheckpointDamaged(format!("{what} cannot be decoded ({e})")))?;
        if cp.version != CHECKPOINT_VERSION || cp.partition != partition {
            return Err(Error::Checkpoint(format!(
                "{what} holds version {} of partition {}, this build reads version {CHECKPOINT_VERSION}",
                cp.version, cp.partition
            )));
        }
        self.last_revision = self.last_revision.max(cp.last_revision);
        self.people.retain(|_, p| p.partition != partition);
        for person in cp.people {
            let key = digame_schemas::partition_key(&person.tenant, &person.user);
            if person.has_reopenings() {
                self.reopen_pending.insert(key.clone());
            }
            self.people.insert(key, person);
        }
        Ok(cp.offset)
    }

    /// Bytes of all people's state as checkpointed (open days with their activities,
    /// summaries, rolling sums, week totals, emitted values).
    pub fn state_bytes(&self) -> usize {
        self.people
            .values()
            .map(|p| postcard::to_allocvec(p).map(|b| b.len()).unwrap_or(0))
            .sum()
    }
}

/// Decodes a bus payload into a canonical event. UTF-8 is checked once over the whole
/// payload (vectorised) and the JSON parsed as text, which is markedly faster than
/// parsing bytes, where every string is checked on its own.
pub fn decode_event(payload: &[u8]) -> std::result::Result<ActivityEvent, String> {
    let text = std::str::from_utf8(payload).map_err(|e| {
        format!(
            "not a canonical event: invalid UTF-8 at byte {}; events on the bus are UTF-8 JSON",
            e.valid_up_to()
        )
    })?;
    serde_json::from_str(text).map_err(|e| format!("not a canonical event: {e}"))
}

/// Installs a person's current parameters when the directory changed since they were
/// taken (or the person was restored from a checkpoint, which holds none).
fn refresh_params(directory: &mut Directory, person: &mut PersonState) {
    if person.generation() != directory.generation() {
        let params = directory.params(&person.tenant, &person.user);
        person.set_params(params, directory.generation());
    }
}

/// The checkpoint of one partition.
#[derive(Serialize, Deserialize)]
struct Checkpoint<P> {
    /// Bumped whenever the layout of the state changes (postcard is not self-describing).
    version: u32,
    partition: u32,
    /// Next offset to read.
    offset: u64,
    last_revision: i64,
    people: Vec<P>,
}

/// Where and how often the runtime persists.
#[derive(Clone, Debug)]
pub struct RuntimeSettings {
    /// Directory of the per-partition checkpoints.
    pub checkpoint_dir: PathBuf,
    pub flush_interval: Duration,
    pub checkpoint_interval: Duration,
    pub poll_batch: usize,
    /// Flush early when this many raw events are pending.
    pub max_pending_events: usize,
    /// How often the metadata store is asked for changed settings and profiles.
    pub meta_refresh: Duration,
}

impl RuntimeSettings {
    pub fn from_config(cfg: &PipelineConfig, data_dir: &std::path::Path) -> Self {
        RuntimeSettings {
            checkpoint_dir: digame_config::pipeline_dir(data_dir).join(GROUP),
            flush_interval: Duration::from_millis(cfg.flush_interval_ms.max(10)),
            checkpoint_interval: Duration::from_millis(cfg.checkpoint_interval_ms.max(10)),
            poll_batch: cfg.poll_batch.max(1),
            max_pending_events: 100_000,
            meta_refresh: Duration::from_millis(1000),
        }
    }
}

/// The feature pipeline: bus → state → store.
pub struct FeaturePipeline {
    pub bus: Arc<dyn EventBus>,
    pub store: Arc<dyn StoreSink>,
    pub processor: Processor,
    pub settings: RuntimeSettings,
    pub status: Arc<PipelineStatus>,
    /// Where tenant settings and person profiles come from; `None` keeps whatever the
    /// processor's directory was given (tests, benchmarks).
    pub meta: Option<Arc<dyn SettingsSource>>,
    /// The stored raw events, read to reopen days no longer in memory.
    pub history: Arc<dyn EventHistory>,
}

/// Where a pipeline reads tenant settings and person profiles as they change: in
/// Digame's binary, the metadata store.
#[async_trait::async_trait]
pub trait SettingsSource: Send + Sync + 'static {
    /// Everything written after `revision`, in revision order, with the newest revision
    /// included; the error says why the source could not answer.
    async fn changes_since(&self, revision: i64) -> std::result::Result<Changes, String>;
}

/// Applies settings and profile changes to `directory`. Content was validated when it was
/// stored; should a row still not compile (written by another build), it is skipped with
/// a warning and the previous parameters stay.
pub fn apply_changes(directory: &mut Directory, changes: Changes) {
    for (tenant, settings) in changes.settings {
        if let Err(e) = directory.set_settings(&tenant, settings) {
            tracing::warn!(tenant, error = %e, "skipping tenant settings that do not compile");
        }
    }
    for (tenant, user, profile) in changes.profiles {
        if let Err(e) = directory.set_profile(&tenant, &user, profile) {
            tracing::warn!(tenant, user, error = %e, "skipping a profile that does not compile");
        }
    }
}

/// Runs `attempt` until it succeeds, backing off from 100 ms to 10 s; gives up only when
/// shutdown is requested, returning the last error.
async fn retrying<T, F, Fut>(
    what: &str,
    shutdown: &watch::Receiver<bool>,
    mut attempt: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut backoff = Duration::from_millis(100);
    loop {
        match attempt().await {
            Ok(v) => return Ok(v),
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "{what} failed; retrying");
                if *shutdown.borrow() {
                    return Err(e);
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// A failed poll (broker unreachable, say) is waited out, not fatal: the consumer
/// reconnects by itself.
async fn bus_trouble(e: &digame_bus::BusError) {
    tracing::warn!(error = %e, "reading the bus failed; retrying in 1 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// The features stream's records of `rows` (keyed like events, by tenant and person),
/// stamped `now_ms`: one encoding for the pipeline and for recomputations, whose rows the
/// read caches of every API node follow.
pub fn feature_records(rows: &[FeatureRow], now_ms: i64) -> Vec<Record> {
    rows.iter()
        .map(|row| Record {
            key: Bytes::from(digame_schemas::partition_key(&row.tenant_id, &row.user_id)),
            payload: Bytes::from(serde_json::to_vec(row).expect("rows serialize")),
            timestamp_ms: now_ms,
        })
        .collect()
}

fn now_ms() -> i64 {
    EventTime::now().0
}

impl FeaturePipeline {
    fn checkpoint_path(&self, partition: u32) -> PathBuf {
        self.settings
            .checkpoint_dir
            .join(format!("p{partition}.bin"))
    }

    /// Restores the state of `partition`; returns the offset it covers, or `None` when
    /// there is no usable checkpoint (then the state is rebuilt from the store, see
    /// [`Self::rebuild_from_store`]). A damaged checkpoint is moved to
    /// `<checkpoint_dir>/quarantine/`.
    fn load_checkpoint(&mut self, partition: u32) -> Result<Option<u64>> {
        let path = self.checkpoint_path(partition);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::Io(format!("{}: {e}", path.display()))),
        };
        let restored =
            self.processor
                .restore_partition(partition, &bytes, &path.display().to_string());
        let offset = match restored {
            Ok(offset) => offset,
            // Damaged, or of another build's version: either way it cannot be used, and
            // the bus holds what rebuilds it.
            Err(Error::CheckpointDamaged(why) | Error::Checkpoint(why)) => {
                let moved = self.quarantine_checkpoint(partition, &path)?;
                tracing::error!(
                    partition,
                    reason = %why,
                    quarantined = %moved.display(),
                    "checkpoint unusable: moved aside; rebuilding the partition's state from the store"
                );
                metrics()
                    .pipeline_checkpoints_quarantined
                    .with_label_values(&[&partition.to_string()])
                    .inc();
                self.status.notices.lock().expect("notices lock").push(format!(
                    "events/{partition}: checkpoint unusable ({why}), moved to {}; state rebuilt from the stored events",
                    moved.display()
                ));
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let people = self
            .processor
            .people
            .values()
            .filter(|p| p.partition == partition)
            .count();
        tracing::info!(partition, people, offset, "restored partition state");
        Ok(Some(offset))
    }

    /// Moves a damaged checkpoint to `<checkpoint_dir>/quarantine/p<N>-<ms>.bin`.
    fn quarantine_checkpoint(&self, partition: u32, path: &std::path::Path) -> Result<PathBuf> {
        let dir = self.settings.checkpoint_dir.join("quarantine");
        let io = |e: std::io::Error| Error::Io(format!("{}: {e}", dir.display()));
        std::fs::create_dir_all(&dir).map_err(io)?;
        let to = dir.join(format!("p{partition}-{}.bin", now_ms()));
        std::fs::rename(path, &to).map_err(io)?;
        Ok(to)
    }

    /// Writes the checkpoint of every partition in `offsets`, then syncs the directory.
    fn save_checkpoints(&self, offsets: &BTreeMap<u32, u64>) -> Result<()> {
        let dir = &self.settings.checkpoint_dir;
        let io = |e: std::io::Error| Error::Io(format!("{}: {e}", dir.display()));
        std::fs::create_dir_all(dir).map_err(io)?;
        for (&partition, &offset) in offsets {
            let bytes = self.processor.encode_partition(partition, offset)?;
            let path = self.checkpoint_path(partition);
            let tmp = path.with_extension("tmp");
            {
                use std::io::Write;
                let mut f = std::fs::File::create(&tmp).map_err(io)?;
                f.write_all(&bytes).map_err(io)?;
                f.sync_all().map_err(io)?;
            }
            std::fs::rename(&tmp, &path).map_err(io)?;
        }
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
        Ok(())
    }

    /// Rebuilds the state of `partitions`, which have no usable checkpoint, from the raw
    /// events in the store; returns the people and events read per partition rebuilt.
    ///
    /// The store, not the bus, is the copy to rebuild from: every record below the
    /// group's committed offset had its events stored before the offset was committed,
    /// including records the bus has since lost to damage or expired by retention (a
    /// replay of the bus alone would count them nowhere, and its rows, newer than the
    /// stored ones, would undercount). Reading the bus then resumes at the committed
    /// offset; records after it whose events the store also holds (a crash between the
    /// store write and the commit) count once, by event id. The windows of the rebuilt
    /// people are emitted again with newer revisions and the same values.
    async fn rebuild_from_store(
        &mut self,
        partitions: &std::collections::BTreeSet<u32>,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<BTreeMap<u32, (usize, usize)>> {
        let started = Instant::now();
        let now = now_ms();
        let (from, to) = self.processor.state_span(now);
        let history = self.history.clone();
        let people = retrying(
            "listing the stored people for a state rebuild",
            shutdown,
            || {
                let history = history.clone();
                async move { history.people(from, to).await.map_err(Error::Store) }
            },
        )
        .await?;
        let mut rebuilt: BTreeMap<u32, (usize, usize)> = BTreeMap::new();
        let mut unflushed = 0;
        for (tenant, user) in people {
            let key = digame_schemas::partition_key(&tenant, &user);
            let partition = self.bus.partition_of(Topic::Events, key.as_bytes());
            if !partitions.contains(&partition) {
                continue;
            }
            let stored = retrying("stored-event read for a state rebuild", shutdown, || {
                let (history, tenant, user) = (history.clone(), tenant.clone(), user.clone());
                async move {
                    history
                        .person_events(&tenant, &user, from, to)
                        .await
                        .map_err(Error::Store)
                }
            })
            .await?;
            let counts = rebuilt.entry(partition).or_default();
            counts.0 += 1;
            counts.1 += stored.len();
            unflushed += stored.len();
            self.processor.restore_events(partition, stored, now);
            // Whole people between flushes: an emit may drop final days from memory, and
            // a person's later events must not find their day gone.
            if unflushed >= self.settings.max_pending_events {
                self.flush(shutdown).await?;
                unflushed = 0;
            }
        }
        self.flush(shutdown).await?;
        tracing::info!(
            partitions = ?partitions,
            people = rebuilt.values().map(|c| c.0).sum::<usize>(),
            events = rebuilt.values().map(|c| c.1).sum::<usize>(),
            seconds = started.elapsed().as_secs_f64(),
            "rebuilt partition state from the stored events"
        );
        Ok(rebuilt)
    }

    /// Follows the consumer's assignment: restores partitions gained (from their
    /// checkpoint, or else from the store), drops the state of partitions lost (their new
    /// owner restores it).
    async fn follow_assignment(
        &mut self,
        consumer: &mut Box<dyn BusConsumer>,
        offsets: &mut BTreeMap<u32, u64>,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<()> {
        let now: std::collections::BTreeSet<u32> = consumer.assignment().into_iter().collect();
        let lost: Vec<u32> = offsets
            .keys()
            .filter(|p| !now.contains(p))
            .copied()
            .collect();
        for p in &lost {
            offsets.remove(p);
        }
        if !lost.is_empty() {
            let p = &mut self.processor;
            p.people
                .retain(|_, person| !lost.contains(&person.partition));
            p.reopen_pending
                .retain(|key| p.people.contains_key(key.as_str()));
            tracing::info!(partitions = ?lost, "dropped state of partitions no longer owned");
        }
        let mut rebuild = std::collections::BTreeSet::new();
        for p in now {
            if offsets.contains_key(&p) {
                continue;
            }
            let offset = match self.load_checkpoint(p)? {
                Some(offset) => offset,
                None => {
                    rebuild.insert(p);
                    // Where the group left off (or the log's start): what is below it
                    // comes from the store.
                    consumer.committed().get(&p).copied().unwrap_or(0)
                }
            };
            consumer
                .seek(p, offset)
                .await
                .map_err(|e| Error::Bus(e.to_string()))?;
            offsets.insert(p, offset);
        }
        if !rebuild.is_empty() {
            // Partitions nobody's events reach yet have nothing to rebuild or tell.
            for (p, (people, events)) in self.rebuild_from_store(&rebuild, shutdown).await? {
                self.status.notices.lock().expect("notices lock").push(format!(
                    "events/{p}: no usable checkpoint; state of {people} people rebuilt from {events} stored events"
                ));
            }
        }
        Ok(())
    }

    /// Emits and writes everything pending; retries the store until it accepts or
    /// shutdown is requested.
    async fn flush(&mut self, shutdown: &watch::Receiver<bool>) -> Result<()> {
        self.resolve_reopens(shutdown).await?;
        let requests = std::mem::take(&mut *self.status.reemit.lock().expect("reemit lock"));
        for (tenant, from, to) in requests {
            self.processor.forget_emitted(&tenant, from, to);
        }
        let features = self.processor.emit(now_ms());
        let batch = StoreBatch {
            events: std::mem::take(&mut self.processor.pending_events),
            features,
            dead_letters: std::mem::take(&mut self.processor.pending_dead),
        };
        if batch.is_empty() {
            return Ok(());
        }
        let status = self.status.clone();
        let store = self.store.clone();
        retrying("store write", shutdown, || async {
            let r = store.write(&batch).await;
            status.store_failing.store(r.is_err(), Ordering::Relaxed);
            r.map_err(|e| Error::Store(e.to_string()))
        })
        .await?;
        self.status.unflushed.store(0, Ordering::Relaxed);
        // The derived stream, for consumers outside Digame; after the store so that a
        // row on the topic is always also queryable.
        if !batch.features.is_empty() {
            let records = feature_records(&batch.features, now_ms());
            let bus = self.bus.clone();
            retrying("feature topic publish", shutdown, || async {
                bus.publish(Topic::Features, records.clone())
                    .await
                    .map(|_| ())
                    .map_err(|e| Error::Bus(e.to_string()))
            })
            .await?;
        }
        Ok(())
    }

    /// Reads the stored events of every person with reopened days and rebuilds those days;
    /// a store that does not answer is asked again (the late events wait, nothing is
    /// dropped).
    async fn resolve_reopens(&mut self, shutdown: &watch::Receiver<bool>) -> Result<()> {
        let requests = self.processor.reopen_requests();
        for req in requests {
            let started = Instant::now();
            let history = self.history.clone();
            let stored = retrying("stored-event read for a reopened day", shutdown, || {
                let (history, req) = (history.clone(), req.clone());
                async move {
                    history
                        .person_events(&req.tenant, &req.user, req.range.from, req.range.to)
                        .await
                        .map_err(Error::Store)
                }
            })
            .await?;
            self.processor
                .reopen(&req.tenant, &req.user, &stored, now_ms());
            metrics()
                .pipeline_reopen_seconds
                .observe(started.elapsed().as_secs_f64());
        }
        Ok(())
    }

    async fn checkpoint(
        &mut self,
        consumer: &mut Box<dyn BusConsumer>,
        offsets: &BTreeMap<u32, u64>,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<()> {
        let started = Instant::now();
        self.flush(shutdown).await?;
        self.save_checkpoints(offsets)?;
        // The checkpoint is durable; a failed commit only means a longer replay later.
        if let Err(e) = consumer.commit(offsets).await {
            tracing::warn!(error = %e, "offset commit failed; will replay from the previous commit if restarted");
        }
        metrics()
            .pipeline_checkpoint_seconds
            .observe(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// Takes the settings and profiles changed since the last look. A metadata store that
    /// does not answer is logged and asked again later; features keep the parameters they
    /// have meanwhile.
    async fn refresh_directory(&mut self, seen: &mut i64) {
        let Some(meta) = &self.meta else { return };
        match meta.changes_since(*seen).await {
            Ok(changes) => {
                let revision = changes.revision;
                if revision > *seen {
                    tracing::info!(
                        settings = changes.settings.len(),
                        profiles = changes.profiles.len(),
                        revision,
                        "applying changed settings and profiles"
                    );
                    apply_changes(&mut self.processor.directory, changes);
                    *seen = revision;
                    self.status
                        .settings_revision
                        .store(revision, Ordering::Relaxed);
                }
            }
            Err(e) => tracing::warn!(error = %e, "reading settings and profiles failed; retrying"),
        }
    }

    /// Runs until `shutdown` turns true, then flushes and checkpoints once more.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> Result<()> {
        let mut meta_seen = 0;
        self.refresh_directory(&mut meta_seen).await;
        let mut last_meta = Instant::now();
        let mut offsets = BTreeMap::new();
        let mut consumer = self
            .bus
            .subscribe(Topic::Events, GROUP)
            .await
            .map_err(|e| Error::Bus(e.to_string()))?;
        self.follow_assignment(&mut consumer, &mut offsets, &shutdown)
            .await?;
        self.status.track(consumer.end_offsets(), &offsets);
        self.status.set_probe(consumer.progress_probe());
        self.status.running.store(true, Ordering::Relaxed);
        let mut last_flush = Instant::now();
        let mut last_checkpoint = Instant::now();
        let mut dirty_since_checkpoint = false;
        loop {
            if *shutdown.borrow() {
                break;
            }
            let wait = self
                .settings
                .flush_interval
                .saturating_sub(last_flush.elapsed());
            let batch = tokio::select! {
                r = consumer.poll(self.settings.poll_batch, wait) => match r {
                    Ok(batch) => batch,
                    Err(e) => {
                        bus_trouble(&e).await;
                        Vec::new()
                    }
                },
                _ = shutdown.changed() => Vec::new(),
            };
            // A rebalance during the poll changes what this worker owns; restore gained
            // partitions before processing their records.
            self.follow_assignment(&mut consumer, &mut offsets, &shutdown)
                .await?;
            let now = now_ms();
            let mut fresh = Vec::with_capacity(batch.len());
            for rec in &batch {
                // Already in the restored state (a bus may redeliver from an older
                // committed offset than the checkpoint's).
                // Records of partitions no longer owned are left to their new owner.
                if offsets.get(&rec.partition).is_none_or(|&o| rec.offset < o) {
                    continue;
                }
                fresh.push((rec.partition, &rec.payload[..]));
                offsets.insert(rec.partition, rec.offset + 1);
            }
            self.processor.process_batch(fresh, now);
            if !batch.is_empty() {
                dirty_since_checkpoint = true;
                self.status
                    .processed
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
            }
            let lag = consumer.lag();
            self.status.lag.store(lag, Ordering::Relaxed);
            // Unflushed first, then the processed offsets: a reader never sees the batch
            // in neither.
            self.status.unflushed.store(
                self.processor.pending_events.len() as u64,
                Ordering::Relaxed,
            );
            self.status.track(None, &offsets);
            metrics()
                .pipeline_lag_records
                .with_label_values(&[Topic::Events.name()])
                .set(lag as i64);
            if last_meta.elapsed() >= self.settings.meta_refresh {
                self.refresh_directory(&mut meta_seen).await;
                last_meta = Instant::now();
            }
            let pending_full =
                self.processor.pending_events.len() >= self.settings.max_pending_events;
            if last_flush.elapsed() >= self.settings.flush_interval || pending_full {
                if dirty_since_checkpoint
                    && last_checkpoint.elapsed() >= self.settings.checkpoint_interval
                {
                    self.checkpoint(&mut consumer, &offsets, &shutdown).await?;
                    last_checkpoint = Instant::now();
                    dirty_since_checkpoint = false;
                } else {
                    self.flush(&shutdown).await?;
                }
                last_flush = Instant::now();
            }
        }
        self.checkpoint(&mut consumer, &offsets, &shutdown).await?;
        self.status.running.store(false, Ordering::Relaxed);
        tracing::info!("feature pipeline stopped after a final checkpoint");
        Ok(())
    }
}

/// Moves dead letters from the bus into the store, committing offsets only after the
/// store write.
pub async fn run_dead_letter_sink(
    bus: Arc<dyn EventBus>,
    store: Arc<dyn StoreSink>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let mut consumer = bus
        .subscribe(Topic::DeadLetters, DEAD_LETTER_GROUP)
        .await
        .map_err(|e| Error::Bus(e.to_string()))?;
    let mut offsets = BTreeMap::new();
    loop {
        let batch = tokio::select! {
            r = consumer.poll(10_000, Duration::from_millis(500)) => match r {
                Ok(batch) => batch,
                Err(e) => {
                    bus_trouble(&e).await;
                    Vec::new()
                }
            },
            _ = shutdown.changed() => Vec::new(),
        };
        if batch.is_empty() {
            if *shutdown.borrow() {
                return Ok(());
            }
            continue;
        }
        let mut rows = Vec::with_capacity(batch.len());
        for rec in &batch {
            offsets.insert(rec.partition, rec.offset + 1);
            match serde_json::from_slice::<DeadLetter>(&rec.payload) {
                Ok(d) => rows.push(d),
                Err(e) => {
                    tracing::warn!(partition = rec.partition, offset = rec.offset, error = %e, "skipping malformed dead letter")
                }
            }
        }
        let batch = StoreBatch {
            dead_letters: rows,
            ..Default::default()
        };
        retrying("dead-letter store write", &shutdown, || async {
            store
                .write(&batch)
                .await
                .map_err(|e| Error::Store(e.to_string()))
        })
        .await?;
        if let Err(e) = consumer.commit(&offsets).await {
            tracing::warn!(error = %e, "dead-letter offset commit failed; they may be stored again (idempotently)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Processor, decode_event};
    use digame_config::PipelineConfig;

    fn commit(id: u128, at: i64) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "event_id": uuid::Uuid::from_u128(id), "tenant_id": "t", "user_id": "u",
            "source": "git", "kind": "commit", "timestamp": at,
            "attributes": {"project": "p"},
        }))
        .unwrap()
    }

    #[test]
    fn forgotten_windows_are_emitted_again_with_the_same_values_and_newer_revisions() {
        const DAY: i64 = 86_400_000;
        // 2026-11-24T00:00Z (a Tuesday): two commits that day, one the next.
        let d = 1_795_478_400_000;
        let now = d + DAY + 7_200_000;
        let mut p = Processor::new(&PipelineConfig::default(), 30).unwrap();
        p.process_batch(
            [
                (0, &commit(1, d + 3_600_000)[..]),
                (0, &commit(2, d + 3_700_000)[..]),
                (0, &commit(3, d + DAY + 3_600_000)[..]),
            ],
            now,
        );
        let first = p.emit(now);
        assert!(p.emit(now).is_empty(), "nothing changed, nothing emitted");
        // Another tenant's windows are not this tenant's to re-emit.
        assert_eq!(p.forget_emitted("other", d, d + DAY), 0);
        assert!(p.emit(now).is_empty());
        assert_eq!(p.forget_emitted("t", d, d + DAY), 1);
        let again = p.emit(now);
        let key = |r: &digame_schemas::FeatureRow| {
            (
                r.granularity,
                r.window_start.0,
                r.feature.to_string(),
                r.dimension.clone(),
                r.value.to_bits(),
            )
        };
        // Every value of a window starting on the day comes again, as it was.
        let mut expected: Vec<_> = first
            .iter()
            .filter(|r| (d..d + DAY).contains(&r.window_start.0))
            .map(key)
            .collect();
        let mut got: Vec<_> = again
            .iter()
            .filter(|r| (d..d + DAY).contains(&r.window_start.0))
            .map(key)
            .collect();
        expected.sort();
        got.sort();
        assert!(
            expected
                .iter()
                .any(|k| k.2 == "event_count" && k.4 == 2f64.to_bits())
        );
        assert_eq!(got, expected);
        let newest_first = first.iter().map(|r| r.revision).max().unwrap();
        assert!(again.iter().all(|r| r.revision > newest_first));
    }

    /// The latest value per (user, window, feature, dimension) of `rows` over earlier
    /// ones, zeros left out: what a reader of the store sees.
    fn latest(
        rows: &[digame_schemas::FeatureRow],
    ) -> std::collections::BTreeMap<(String, String, i64, String, String), u64> {
        let mut by_key = std::collections::BTreeMap::new();
        for r in rows {
            let key = (
                r.user_id.to_string(),
                format!("{:?}", r.granularity),
                r.window_start.0,
                r.feature.to_string(),
                r.dimension.clone(),
            );
            let slot = by_key.entry(key).or_insert((i64::MIN, 0.0));
            if r.revision > slot.0 {
                *slot = (r.revision, r.value);
            }
        }
        by_key
            .into_iter()
            .filter(|(_, (_, v))| *v != 0.0)
            .map(|(k, (_, v))| (k, v.to_bits()))
            .collect()
    }

    #[test]
    fn state_rebuilt_from_stored_events_emits_what_the_live_state_did() {
        const DAY: i64 = 86_400_000;
        // 2026-11-24T00:00Z; events over nine days, two people, processed live over three
        // polls with an emit after each, the wall clock a day past the last.
        let d = 1_795_478_400_000;
        let now = d + 10 * DAY;
        let ev = |n: u128| {
            let at = d + (n as i64 % 9) * DAY + 3_600_000 + (n as i64) * 60_000;
            serde_json::to_vec(&serde_json::json!({
                "event_id": uuid::Uuid::from_u128(n), "tenant_id": "t",
                "user_id": format!("u{}", n % 2), "source": "git", "kind": "commit",
                "timestamp": at, "attributes": {"project": "p"},
            }))
            .unwrap()
        };
        let payloads: Vec<Vec<u8>> = (1..=60).map(ev).collect();
        let mut live = Processor::new(&PipelineConfig::default(), 30).unwrap();
        let mut live_rows = Vec::new();
        for poll in payloads.chunks(20) {
            live.process_batch(poll.iter().map(|p| (3, &p[..])), now);
            live_rows.extend(live.emit(now));
        }
        let stored = std::mem::take(&mut live.pending_events);
        assert_eq!(stored.len(), 60);

        // The same events as the store gives them back (any order), into a fresh state.
        let mut rebuilt = Processor::new(&PipelineConfig::default(), 30).unwrap();
        let mut shuffled = stored.clone();
        shuffled.reverse();
        rebuilt.restore_events(3, shuffled, now);
        assert!(rebuilt.pending_events.is_empty(), "stored already");
        let rows = rebuilt.emit(now);
        assert_eq!(latest(&rows), latest(&live_rows));
        // 60 events counted in the day rows, 30 per person.
        let counted: f64 = rows
            .iter()
            .filter(|r| {
                r.feature == "event_count"
                    && r.dimension.is_empty()
                    && r.granularity == digame_schemas::Granularity::Day
            })
            .map(|r| r.value)
            .sum();
        assert_eq!(counted, 60.0);

        // A replayed record whose event is stored counts once; a new one counts.
        // (Days no longer held read the store: `stored` stands in for it.)
        rebuilt.process(3, &payloads[7], now);
        rebuilt.resolve_reopens_from(&stored, now);
        assert!(rebuilt.emit(now).is_empty(), "a duplicate changes nothing");
        rebuilt.process(3, &ev(61), now);
        rebuilt.resolve_reopens_from(&stored, now);
        live.process(3, &ev(61), now);
        live.resolve_reopens_from(&stored, now);
        live_rows.extend(live.emit(now));
        let mut all = rows;
        all.extend(rebuilt.emit(now));
        assert_eq!(latest(&all), latest(&live_rows));
    }

    #[test]
    fn days_held_by_touch_are_bounded() {
        const DAY: i64 = 86_400_000;
        // 2026-11-24T00:00Z, and a wall clock ten days later.
        let d = 1_795_478_400_000;
        let now = d + 10 * DAY;
        let cfg = PipelineConfig {
            max_touched_days: 1,
            ..PipelineConfig::default()
        };
        let mut p = Processor::new(&cfg, 30).unwrap();
        // Two past days posted at once: final at once, held because just touched.
        p.process_batch(
            [
                (0, &commit(1, d + 3_600_000)[..]),
                (0, &commit(2, d + DAY)[..]),
            ],
            now,
        );
        p.emit(now);
        p.process(0, &commit(3, d + 7_200_000), now);
        assert!(p.reopen_requests().is_empty(), "still held: no store read");
        // Two held days are over the budget of one: the next emit lets them go, and a
        // later event for one of them reads the store.
        p.emit(now);
        p.emit(now);
        p.process(0, &commit(4, d + 10_800_000), now);
        assert_eq!(p.reopen_requests().len(), 1);
    }

    #[test]
    fn decode_names_what_is_wrong_with_a_payload() {
        let good = br#"{"event_id":"0190f5c8-0000-7000-8000-000000000001","tenant_id":"t","user_id":"u","source":"s","kind":"afk","timestamp":"2026-11-24T09:30:00Z","duration_ms":60000,"attributes":{"status":"not-afk"}}"#;
        let ev = decode_event(good).expect("a canonical event");
        assert_eq!((ev.user_id.as_str(), ev.duration_ms), ("u", 60_000));
        assert_eq!(ev.timestamp.0, 1_795_512_600_000);

        let mut bad = good.to_vec();
        bad[60] = 0xff;
        let reason = decode_event(&bad).expect_err("invalid UTF-8");
        assert!(reason.contains("invalid UTF-8 at byte 60"), "{reason}");

        let reason = decode_event(br#"{"user_id":"u","extra":1}"#).expect_err("unknown field");
        assert!(
            reason.starts_with("not a canonical event: unknown field `extra`"),
            "{reason}"
        );
    }

    /// A partition is waiting only while it has records and makes no progress; catching
    /// up or advancing settles it. Ends and offsets by hand.
    #[test]
    fn partitions_wait_only_while_records_stand_still() {
        use std::collections::BTreeMap;
        use std::sync::{Arc, Mutex};
        use std::time::Duration;
        let status = super::PipelineStatus::default();
        let ends = Arc::new(Mutex::new(vec![(0u32, 10u64), (1, 5)]));
        let probe = ends.clone();
        let processed = |a: u64, b: u64| BTreeMap::from([(0u32, a), (1u32, b)]);
        status.track(
            Some(Arc::new(move || probe.lock().unwrap().clone())),
            &processed(10, 2),
        );
        std::thread::sleep(Duration::from_millis(60));
        status.track(None, &processed(10, 2));
        let p = status.partitions();
        assert_eq!((p[0].behind, p[0].waiting), (Some(0), Duration::ZERO));
        assert_eq!(p[1].behind, Some(3));
        assert!(p[1].waiting >= Duration::from_millis(60), "{p:?}");
        assert_eq!(status.backlog(), 3);
        // Partition 1 advances: settled again. Partition 0 gets records, and waits from
        // when it last had none.
        *ends.lock().unwrap() = vec![(0, 12), (1, 5)];
        status.track(None, &processed(10, 4));
        let p = status.partitions();
        assert!(p[1].waiting < Duration::from_millis(60), "{p:?}");
        std::thread::sleep(Duration::from_millis(30));
        let p = status.partitions();
        assert_eq!(p[0].behind, Some(2));
        assert!(p[0].waiting >= Duration::from_millis(30), "{p:?}");
        assert!(
            p[0].waiting < Duration::from_millis(60),
            "waits from its last settle, not from the start: {p:?}"
        );
    }

    /// Where the bus answers only by round trip (Kafka), the backlog asked for now counts
    /// records acknowledged since the last poll, which the last poll's lag (0 here) misses,
    /// and the partitions another member owns from the group's commits. A probe that fails
    /// leaves the backlog unknown, not zero. Offsets by hand.
    #[tokio::test]
    async fn the_backlog_asked_now_sees_what_the_last_poll_did_not() {
        use digame_bus::{BusError, GroupProgress};
        use std::collections::BTreeMap;
        use std::sync::{Arc, Mutex};
        let status = super::PipelineStatus::default();
        // This node owns partitions 0 and 1 and processed to 10 and 4; partition 2 is
        // another member's, committed to 7.
        status.track(None, &BTreeMap::from([(0u32, 10u64), (1, 4)]));
        let answer = Arc::new(Mutex::new(Some(GroupProgress {
            ends: BTreeMap::from([(0, 12), (1, 4), (2, 9)]),
            committed: BTreeMap::from([(0, 8), (1, 4), (2, 7)]),
        })));
        let probe = answer.clone();
        status.set_probe(Some(Arc::new(move || {
            probe
                .lock()
                .unwrap()
                .clone()
                .ok_or_else(|| BusError::Unavailable("kafka: broker down".into()))
        })));
        assert_eq!(status.backlog(), 0, "the last poll's lag");
        // Partition 0: 12 - 10; 1: none; 2 (not owned): 9 - 7.
        assert_eq!(status.backlog_now().await, Ok(2 + 2));
        *answer.lock().unwrap() = None;
        let e = status.backlog_now().await.unwrap_err();
        assert!(e.contains("broker down"), "{e}");
    }

    /// A checkpoint with a flipped bit or cut short is refused as damaged, never decoded
    /// into wrong state.
    #[test]
    fn damaged_checkpoints_are_refused() {
        let mut p = Processor::new(&PipelineConfig::default(), 30).unwrap();
        p.process_batch(
            vec![(0, &commit(1, 1_795_000_000_000)[..])],
            1_795_000_000_000,
        );
        let good = p.encode_partition(0, 7).unwrap();
        assert_eq!(p.restore_partition(0, &good, "t").unwrap(), 7);
        for at in [0, 5, good.len() / 2, good.len() - 1] {
            let mut bad = good.clone();
            bad[at] ^= 0x10;
            let e = p.restore_partition(0, &bad, "t").unwrap_err();
            assert!(
                matches!(
                    e,
                    crate::Error::CheckpointDamaged(_) | crate::Error::Checkpoint(_)
                ),
                "{at}: {e}"
            );
        }
        for len in [0, 3, 6, good.len() - 1] {
            let e = p.restore_partition(0, &good[..len], "t").unwrap_err();
            assert!(
                matches!(e, crate::Error::CheckpointDamaged(_)),
                "{len}: {e}"
            );
        }
    }
}
