//! The native HTTP collector: `POST /v1/events`.
//!
//! A request body is a JSON array of events or NDJSON (one event per line), optionally
//! gzip-compressed. Every limit is checked before the work it protects: body size while
//! reading, decompressed size while inflating (gzip bombs stop at the limit), event count,
//! and each event's size before it is parsed. Each event is then decoded and validated on
//! its own; valid ones are published to the events topic, rejected ones with their reason
//! to the dead-letter topic. The answer is sent only after the accepted events are durable
//! on the bus; if the bus cannot take them, nothing is acknowledged (503, retry).
//!
//! The tenant comes from the credential, never from the body.

pub mod redact;

use std::io::Read;

use bytes::Bytes;
use digame_bus::{BusError, EventBus, Record, Topic};
use digame_config::IngestConfig;
use digame_schemas::validate::{TimePolicy, validate_event};
use digame_schemas::{ActivityEvent, DeadLetter, EventTime, partition_key};
use digame_telemetry::metrics;
use serde::Serialize;
use serde_json::value::RawValue;

pub use crate::redact::Redactions;

/// Why a whole request was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum IngestError {
    #[error("request body exceeds {limit} bytes; send smaller batches")]
    BodyTooLarge { limit: usize },
    #[error("decompressed body exceeds {limit} bytes; send smaller batches")]
    DecompressedTooLarge { limit: usize },
    #[error("request holds {count} events; the limit is {limit} per request")]
    TooManyEvents { count: usize, limit: usize },
    #[error("content encoding `{0}` is not supported; send identity or gzip")]
    UnsupportedEncoding(String),
    #[error("body is not valid gzip: {0}")]
    BadGzip(String),
    #[error("body is neither a JSON array nor NDJSON: {0}")]
    Malformed(String),
    #[error("body holds no events")]
    Empty,
    #[error("the event bus is unavailable ({0}); nothing was accepted, retry later")]
    BusUnavailable(String),
    #[error("the idempotency index is unavailable ({0}); nothing was accepted, retry later")]
    IdsUnavailable(String),
    #[error(
        "{} of this request's events were not acknowledged by the event bus; the others are durable. Retry the ones listed in `not_acknowledged` (resending with the same event_id is safe)",
        not_acknowledged.len()
    )]
    PartlyAccepted {
        /// Durable events.
        accepted: usize,
        /// Events rejected by validation.
        rejected: Vec<Rejection>,
        /// Valid events the bus did not acknowledge.
        not_acknowledged: Vec<Rejection>,
    },
}

impl IngestError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            IngestError::BodyTooLarge { .. } => "body_too_large",
            IngestError::DecompressedTooLarge { .. } => "decompressed_too_large",
            IngestError::TooManyEvents { .. } => "too_many_events",
            IngestError::UnsupportedEncoding(_) => "unsupported_encoding",
            IngestError::BadGzip(_) => "bad_gzip",
            IngestError::Malformed(_) => "malformed_body",
            IngestError::Empty => "empty_body",
            IngestError::BusUnavailable(_) => "bus_unavailable",
            IngestError::IdsUnavailable(_) => "ids_unavailable",
            IngestError::PartlyAccepted { .. } => "partly_accepted",
        }
    }
}

/// One rejected event.
#[derive(Debug, Serialize, PartialEq, Clone)]
pub struct Rejection {
    /// Position in the request: array index, or 0-based line number for NDJSON.
    pub index: usize,
    pub reason: String,
}

/// The answer to an ingest request.
#[derive(Debug, Serialize, PartialEq)]
pub struct IngestOutcome {
    pub accepted: usize,
    pub rejected: Vec<Rejection>,
}

/// Everything the collector needs.
pub struct Collector {
    pub bus: std::sync::Arc<dyn EventBus>,
    pub config: IngestConfig,
    /// Each tenant's title/URL redaction, applied before events reach the bus.
    pub redactions: std::sync::Arc<Redactions>,
    /// The idempotency index: client event ids are claimed here before the answer, so an
    /// id already naming another event is refused. `None` checks within a request only.
    pub ids: Option<std::sync::Arc<dyn EventIds>>,
}

/// Where client event ids are claimed across requests: in Digame's binary, the metadata
/// store's idempotency index (one writer committing every waiting request's claims in one
/// transaction, in arrival order).
#[async_trait::async_trait]
pub trait EventIds: Send + Sync + 'static {
    /// Claims `claims` ((event id, content digest), ids distinct) for `tenant`: per claim,
    /// the digest the id already names when that differs (refuse the event), `None` when
    /// the id is new or names the same event. Durable when it answers; the error says why
    /// the index could not answer.
    async fn claim(
        &self,
        tenant: &str,
        claims: Vec<(String, i64)>,
        now_ms: i64,
    ) -> Result<Vec<Option<i64>>, String>;
}

/// Inflates gzip up to `limit` bytes.
fn gunzip(body: &[u8], limit: usize) -> Result<Vec<u8>, IngestError> {
    let mut out = Vec::with_capacity(body.len().saturating_mul(4).min(limit));
    flate2::read::MultiGzDecoder::new(body)
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| IngestError::BadGzip(e.to_string()))?;
    if out.len() > limit {
        return Err(IngestError::DecompressedTooLarge { limit });
    }
    Ok(out)
}

/// Splits a body into raw event texts with their indexes.
fn split_events(body: &[u8]) -> Result<Vec<(usize, &str)>, IngestError> {
    let text = std::str::from_utf8(body)
        .map_err(|e| IngestError::Malformed(format!("body is not UTF-8 ({e})")))?;
    let trimmed = text.trim_start();
    if trimmed.starts_with('[') {
        let items: Vec<&RawValue> = serde_json::from_str(trimmed)
            .map_err(|e| IngestError::Malformed(format!("invalid JSON array: {e}")))?;
        return Ok(items.into_iter().map(RawValue::get).enumerate().collect());
    }
    let lines: Vec<(usize, &str)> = text
        .split('\n')
        .enumerate()
        .map(|(i, line)| (i, line.trim()))
        .filter(|(_, line)| !line.is_empty())
        .collect();
    // A line that is not an event is that event's problem, but a body in which no line
    // even starts like a JSON object is not NDJSON at all: the whole body is refused.
    if !lines.is_empty() && !lines.iter().any(|(_, line)| line.starts_with('{')) {
        let start: String = trimmed.chars().take(40).collect();
        return Err(IngestError::Malformed(format!(
            "no line is a JSON object (the body starts `{start}`); send a JSON array of events or NDJSON, one event object per line"
        )));
    }
    Ok(lines)
}

impl Collector {
    /// Handles one request body for `tenant`.
    /// Validates and publishes a batch for `tenant`. `sources`, when not empty, are the
    /// only event sources the credential may send; events of other sources are rejected
    /// (the rest of the batch is kept).
    pub async fn ingest(
        &self,
        tenant: &str,
        sources: &[String],
        content_encoding: Option<&str>,
        body: Bytes,
    ) -> Result<IngestOutcome, IngestError> {
        metrics().ingest_body_bytes.inc_by(body.len() as u64);
        let cfg = &self.config;
        if body.len() > cfg.max_body_bytes {
            return Err(IngestError::BodyTooLarge {
                limit: cfg.max_body_bytes,
            });
        }
        let inflated;
        let raw: &[u8] = match content_encoding.map(str::trim) {
            None | Some("") | Some("identity") => &body,
            Some(enc) if enc.eq_ignore_ascii_case("gzip") => {
                inflated = gunzip(&body, cfg.max_decompressed_bytes)?;
                &inflated
            }
            Some(other) => return Err(IngestError::UnsupportedEncoding(other.to_string())),
        };
        let items = split_events(raw)?;
        if items.is_empty() {
            return Err(IngestError::Empty);
        }
        if items.len() > cfg.max_events_per_request {
            return Err(IngestError::TooManyEvents {
                count: items.len(),
                limit: cfg.max_events_per_request,
            });
        }

        let now = EventTime::now();
        let policy = TimePolicy::new(now, cfg.horizon_days_for(tenant));
        let mut records = Vec::with_capacity(items.len());
        // Request index of each record, to name the ones the bus did not acknowledge.
        let mut record_index = Vec::with_capacity(items.len());
        let mut rejected = Vec::new();
        let mut dead = Vec::new();
        let redactor = self.redactions.get(tenant);
        // Client ids seen in this request, with the event they named: the same id for a
        // different event is refused (a retry of the same event is a duplicate).
        let mut ids: std::collections::HashMap<uuid::Uuid, (usize, Bytes)> =
            std::collections::HashMap::new();
        // The client ids to claim across requests, (event id, digest), and each one's
        // record position and id.
        let mut claims: Vec<(String, i64)> = Vec::new();
        let received = received_member(now);
        let mut claimed_at: Vec<(usize, uuid::Uuid)> = Vec::new();
        for (index, text) in items {
            match self.admit(tenant, text, now, &policy, sources) {
                Ok((mut ev, client_id)) => {
                    if let Some(r) = &redactor {
                        r.apply(&mut ev);
                    }
                    let key = partition_key(tenant, &ev.user_id);
                    let payload = Bytes::from(serde_json::to_vec(&ev).expect("events serialize"));
                    if client_id && let Some(id) = ev.event_id {
                        match ids.get(&id) {
                            Some((first, seen)) if *seen != payload => {
                                let reason = format!(
                                    "event_id {id} is also the id of the different event at index {first} of this request; give each event its own id (the same id is for retrying the same event)"
                                );
                                dead.push(dead_letter(tenant, index, text, &reason, now));
                                rejected.push(Rejection { index, reason });
                                continue;
                            }
                            Some(_) => {}
                            None => {
                                ids.insert(id, (index, payload.clone()));
                                // The digest costs a copy and a hash per event: only for
                                // the index.
                                if self.ids.is_some() {
                                    claims.push((id.to_string(), digest(&payload, &received)));
                                    claimed_at.push((records.len(), id));
                                }
                            }
                        }
                    }
                    records.push(Record {
                        key: Bytes::from(key),
                        payload,
                        timestamp_ms: now.0,
                    });
                    record_index.push(index);
                }
                Err(reason) => {
                    dead.push(dead_letter(tenant, index, text, &reason, now));
                    rejected.push(Rejection { index, reason });
                }
            }
        }
        self.claim_ids(
            tenant,
            &mut records,
            &mut record_index,
            claims,
            &claimed_at,
            &mut rejected,
            &mut dead,
            now,
        )
        .await?;
        let accepted = records.len();
        let (published, dead_published) = tokio::join!(
            self.bus.publish(Topic::Events, records),
            self.bus.publish(Topic::DeadLetters, dead),
        );
        match published {
            Ok(_) => {}
            Err(BusError::PartlyPublished { failed }) => {
                let not_acknowledged: Vec<Rejection> = failed
                    .into_iter()
                    .map(|(i, reason)| Rejection {
                        index: record_index[i],
                        reason: format!("not acknowledged by the event bus: {reason}"),
                    })
                    .collect();
                metrics()
                    .ingest_events
                    .with_label_values(&["not_acknowledged"])
                    .inc_by(not_acknowledged.len() as u64);
                metrics()
                    .tenant_events
                    .with_label_values(&[tenant, "accepted"])
                    .inc_by((accepted - not_acknowledged.len()) as u64);
                return Err(IngestError::PartlyAccepted {
                    accepted: accepted - not_acknowledged.len(),
                    rejected,
                    not_acknowledged,
                });
            }
            Err(e) => return Err(IngestError::BusUnavailable(e.to_string())),
        }
        if let Err(e) = dead_published {
            tracing::error!(tenant, error = %e, rejected = rejected.len(), "could not record rejected events in the dead-letter stream");
        }
        let m = metrics();
        m.ingest_events
            .with_label_values(&["accepted"])
            .inc_by(accepted as u64);
        m.ingest_events
            .with_label_values(&["rejected"])
            .inc_by(rejected.len() as u64);
        m.tenant_events
            .with_label_values(&[tenant, "accepted"])
            .inc_by(accepted as u64);
        if !rejected.is_empty() {
            m.tenant_events
                .with_label_values(&[tenant, "rejected"])
                .inc_by(rejected.len() as u64);
        }
        Ok(IngestOutcome { accepted, rejected })
    }

    /// Claims this request's client ids in the idempotency index, refusing (and dropping
    /// from `records`) the events whose id already names a different event.
    #[allow(clippy::too_many_arguments)]
    async fn claim_ids(
        &self,
        tenant: &str,
        records: &mut Vec<Record>,
        record_index: &mut Vec<usize>,
        claims: Vec<(String, i64)>,
        claimed_at: &[(usize, uuid::Uuid)],
        rejected: &mut Vec<Rejection>,
        dead: &mut Vec<Record>,
        now: EventTime,
    ) -> Result<(), IngestError> {
        let Some(index) = &self.ids else {
            return Ok(());
        };
        if claims.is_empty() {
            return Ok(());
        }
        let answers = index
            .claim(tenant, claims, now.0)
            .await
            .map_err(IngestError::IdsUnavailable)?;
        let mut keep = vec![true; records.len()];
        for ((position, id), answer) in claimed_at.iter().zip(answers) {
            if answer.is_some() {
                let index = record_index[*position];
                let reason = format!(
                    "event_id {id} already names a different event of this tenant; give this event its own id (the same id is for retrying the same event)"
                );
                let text = String::from_utf8_lossy(&records[*position].payload).into_owned();
                dead.push(dead_letter(tenant, index, &text, &reason, now));
                rejected.push(Rejection { index, reason });
                keep[*position] = false;
            }
        }
        if keep.contains(&false) {
            let mut kept = keep.iter();
            records.retain(|_| *kept.next().expect("one flag per record"));
            let mut kept = keep.iter();
            record_index.retain(|_| *kept.next().expect("one flag per record"));
            rejected.sort_by_key(|r| r.index);
        }
        Ok(())
    }

    /// Decodes and validates one event, and whether the client gave its id; the error is
    /// the reason given to the client.
    fn admit(
        &self,
        tenant: &str,
        text: &str,
        now: EventTime,
        policy: &TimePolicy,
        sources: &[String],
    ) -> Result<(ActivityEvent, bool), String> {
        if text.len() > self.config.max_event_bytes {
            return Err(format!(
                "event is {} bytes; the limit is {} bytes",
                text.len(),
                self.config.max_event_bytes
            ));
        }
        let mut ev: ActivityEvent =
            serde_json::from_str(text).map_err(|e| format!("invalid event: {e}"))?;
        if !ev.tenant_id.is_empty() && ev.tenant_id != tenant {
            return Err(format!(
                "tenant_id `{}` does not match the credential's tenant; omit tenant_id, it is taken from the key",
                ev.tenant_id
            ));
        }
        if !sources.is_empty() && !sources.contains(&ev.source) {
            return Err(format!(
                "source `{}` is not allowed for this API key (it may send {}); use a key scoped to that source",
                ev.source,
                sources.join(", ")
            ));
        }
        ev.tenant_id = tenant.to_string();
        ev.received_at = Some(now);
        validate_event(&ev, policy).map_err(|e| e.to_string())?;
        let client_id = ev.event_id.is_some();
        if !client_id {
            ev.event_id = Some(uuid::Uuid::now_v7());
        }
        Ok((ev, client_id))
    }
}

/// The exact member `"received_at":"…"` that every event payload of a request received at
/// `now` holds.
fn received_member(now: EventTime) -> Vec<u8> {
    let mut member = b"\"received_at\":".to_vec();
    serde_json::to_writer(&mut member, &now).expect("times serialize");
    member
}

/// What an event id names: the event's content without when it was received (a retry
/// arrives later), as the first eight bytes of the SHA-256 of its payload without the
/// `received_at` member. The member is the first occurrence of `received`: the fields
/// serialized before it are numbers and escaped strings (in which an unescaped quote
/// cannot occur), and the keys a client chooses (attributes, properties) come after it.
/// A different event under the same id goes unnoticed only if the two collide in 64 bits.
fn digest(payload: &[u8], received: &[u8]) -> i64 {
    use sha2::Digest;
    let mut hash = sha2::Sha256::new();
    match payload.windows(received.len()).position(|w| w == received) {
        Some(at) => {
            hash.update(&payload[..at]);
            hash.update(&payload[at + received.len()..]);
        }
        None => {
            debug_assert!(false, "an event payload without its received_at member");
            hash.update(payload);
        }
    }
    let sum = hash.finalize();
    i64::from_be_bytes(sum[..8].try_into().expect("a SHA-256 has 32 bytes"))
}

fn dead_letter(tenant: &str, index: usize, text: &str, reason: &str, now: EventTime) -> Record {
    let probe: Option<serde_json::Value> = serde_json::from_str(text).ok();
    let field = |name: &str| {
        probe
            .as_ref()
            .and_then(|v| v.get(name))
            .and_then(|v| v.as_str())
            .map(|s| s.chars().take(128).collect::<String>())
    };
    let letter = DeadLetter {
        tenant_id: tenant.to_string(),
        rejected_at: now,
        stage: "ingest".into(),
        reason_code: "invalid".into(),
        reason: reason.to_string(),
        request_index: index as i64,
        event_id: field("event_id"),
        user_id: field("user_id"),
        payload: text.chars().take(64 << 10).collect(),
    };
    Record {
        key: Bytes::from(tenant.to_string()),
        payload: Bytes::from(serde_json::to_vec(&letter).expect("dead letters serialize")),
        timestamp_ms: now.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn splits_arrays_and_ndjson() {
        let arr = split_events(br#" [ {"a":1}, {"b":[2]} ] "#).unwrap();
        assert_eq!(arr, vec![(0, r#"{"a":1}"#), (1, r#"{"b":[2]}"#)]);
        let nd = split_events(b"{\"a\":1}\n\n{\"b\":2}\r\n").unwrap();
        assert_eq!(nd, vec![(0, r#"{"a":1}"#), (2, r#"{"b":2}"#)]);
        assert!(matches!(
            split_events(b"[{\"a\":1},"),
            Err(IngestError::Malformed(_))
        ));
        // Not NDJSON at all: the whole body is refused, saying how it starts.
        match split_events(b"this is not json\n42\n") {
            Err(IngestError::Malformed(m)) => assert!(m.contains("`this is not json"), "{m}"),
            other => panic!("{other:?}"),
        }
        // One object line among bad ones: the bad lines are that event's problem.
        let mixed = split_events(b"not an event\n{\"a\":1}\n").unwrap();
        assert_eq!(mixed, vec![(0, "not an event"), (1, r#"{"a":1}"#)]);
    }

    #[test]
    fn gzip_bombs_stop_at_the_limit() {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        enc.write_all(&vec![b' '; 10 << 20]).unwrap();
        let bomb = enc.finish().unwrap();
        assert!(bomb.len() < 64 << 10);
        assert_eq!(
            gunzip(&bomb, 1 << 20),
            Err(IngestError::DecompressedTooLarge { limit: 1 << 20 })
        );
        assert!(matches!(
            gunzip(b"not gzip", 10),
            Err(IngestError::BadGzip(_))
        ));
    }

    /// The digest is the SHA-256 of the event's serialization without `received_at`,
    /// whenever it was received, even when a property is itself named `received_at`.
    #[test]
    fn digests_ignore_when_the_event_was_received() {
        use sha2::Digest;
        let text = r#"{"event_id":"0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b","user_id":"ana","source":"aw","kind":"window_focus","timestamp":1000,"attributes":{"app":"Code"},"properties":{"received_at":"1970-01-01T00:00:00.005Z"}}"#;
        let event: ActivityEvent = serde_json::from_str(text).unwrap();
        let at = |ms: i64| {
            let mut ev = event.clone();
            ev.received_at = Some(EventTime(ms));
            let payload = serde_json::to_vec(&ev).unwrap();
            digest(&payload, &received_member(EventTime(ms)))
        };
        // Independently: the payload with the member's text cut out (a `,,` is left).
        let without = serde_json::to_string(&{
            let mut ev = event.clone();
            ev.received_at = Some(EventTime(5));
            ev
        })
        .unwrap()
        .replacen(r#""received_at":"1970-01-01T00:00:00.005Z""#, "", 1);
        assert!(without.contains(r#"{"received_at":"1970-01-01T00:00:00.005Z"}"#));
        let sum = sha2::Sha256::digest(without.as_bytes());
        let want = i64::from_be_bytes(sum[..8].try_into().unwrap());
        assert_eq!(at(5), want);
        assert_eq!(at(5), at(86_400_000));
        let mut other = event.clone();
        other.duration_ms = 1;
        other.received_at = Some(EventTime(5));
        let payload = serde_json::to_vec(&other).unwrap();
        assert_ne!(digest(&payload, &received_member(EventTime(5))), at(5));
    }
}
