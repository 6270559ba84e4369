//! The canonical activity event: the one definition every other representation derives
//! from.
//!
//! The same Rust type is the wire format collectors post (fields the server owns are
//! optional on input and filled in by ingest), the record written to the event bus, and —
//! through [`crate::arrow`] — the columnar row in the store. Its JSON Schema (published at
//! `GET /v1/schema`) is generated from it with `schemars`, and the Arrow schema is generated
//! from that JSON Schema, so the three cannot drift apart.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::time::EventTime;

/// Version of the wire format described by [`ActivityEvent`].
pub const SCHEMA_VERSION: u16 = 1;

fn schema_version_default() -> u16 {
    SCHEMA_VERSION
}

/// What happened. The set is closed so that features can rely on it; anything else is
/// `custom` with its details in `properties`.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    WindowFocus,
    Afk,
    Meeting,
    Call,
    Message,
    Email,
    Commit,
    PullRequest,
    Review,
    Deploy,
    Incident,
    Ticket,
    IdeHeartbeat,
    BrowserVisit,
    Custom,
}

impl EventKind {
    pub const ALL: [EventKind; 15] = [
        EventKind::WindowFocus,
        EventKind::Afk,
        EventKind::Meeting,
        EventKind::Call,
        EventKind::Message,
        EventKind::Email,
        EventKind::Commit,
        EventKind::PullRequest,
        EventKind::Review,
        EventKind::Deploy,
        EventKind::Incident,
        EventKind::Ticket,
        EventKind::IdeHeartbeat,
        EventKind::BrowserVisit,
        EventKind::Custom,
    ];

    /// The wire name (`window_focus`, `afk`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::WindowFocus => "window_focus",
            EventKind::Afk => "afk",
            EventKind::Meeting => "meeting",
            EventKind::Call => "call",
            EventKind::Message => "message",
            EventKind::Email => "email",
            EventKind::Commit => "commit",
            EventKind::PullRequest => "pull_request",
            EventKind::Review => "review",
            EventKind::Deploy => "deploy",
            EventKind::Incident => "incident",
            EventKind::Ticket => "ticket",
            EventKind::IdeHeartbeat => "ide_heartbeat",
            EventKind::BrowserVisit => "browser_visit",
            EventKind::Custom => "custom",
        }
    }
}

/// Typed attributes shared by many kinds. Every field is optional on the wire; which ones
/// a kind requires is checked by [`crate::validate`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Attributes {
    /// Application name as the OS reports it (`window_focus`, `ide_heartbeat`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<String>,
    /// Window, meeting, ticket or pull-request title.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// URL for `browser_visit` and links to tickets, pull requests, deploys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Project or repository name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    /// Programming or natural language.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
    /// Version-control branch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    /// File being edited (`ide_heartbeat`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// Pseudonymous ids of the other people involved (meeting attendees, message
    /// recipients, reviewers). The subject `user_id` may or may not be listed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub participants: Vec<String>,
    /// Kind-specific state: `afk` → `afk` | `not-afk`; `meeting`/`call` → `accepted` |
    /// `tentative` | `declined`; `incident` → `opened` | `resolved`; tickets and pull
    /// requests → their workflow state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
}

/// One activity event.
///
/// On input, `event_id` is optional (a UUIDv7 is generated when absent; when present it is
/// the idempotency key), `tenant_id` is taken from the credential (a body value that
/// differs is rejected) and `received_at` is always set by the server.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ActivityEvent {
    /// Wire-format version; `1` when omitted.
    #[serde(default = "schema_version_default")]
    pub schema_version: u16,
    /// Idempotency key: a client-supplied UUID, else a server-generated UUIDv7.
    #[serde(default)]
    pub event_id: Option<Uuid>,
    /// Owning tenant; set from the credential by the server.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tenant_id: String,
    /// Pseudonymous person id, unique inside the tenant.
    pub user_id: String,
    /// The collector or connector that produced the event (`activitywatch`, `github`, …).
    pub source: String,
    pub kind: EventKind,
    /// When the activity started (event time).
    pub timestamp: EventTime,
    /// When the server received the event; set by the server, ignored on input.
    #[serde(default)]
    pub received_at: Option<EventTime>,
    /// How long the activity lasted, in milliseconds (0 for instantaneous events).
    #[serde(default)]
    pub duration_ms: u64,
    #[serde(default)]
    pub attributes: Attributes,
    /// Free-form JSON object with anything else the source knows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<serde_json::Map<String, serde_json::Value>>")]
    pub properties: Option<Box<RawValue>>,
}

impl PartialEq for ActivityEvent {
    fn eq(&self, other: &Self) -> bool {
        // `RawValue` has no equality; compare its text.
        self.schema_version == other.schema_version
            && self.event_id == other.event_id
            && self.tenant_id == other.tenant_id
            && self.user_id == other.user_id
            && self.source == other.source
            && self.kind == other.kind
            && self.timestamp == other.timestamp
            && self.received_at == other.received_at
            && self.duration_ms == other.duration_ms
            && self.attributes == other.attributes
            && self.properties.as_ref().map(|p| p.get())
                == other.properties.as_ref().map(|p| p.get())
    }
}

impl ActivityEvent {
    /// End of the activity (`timestamp + duration_ms`), saturating.
    pub fn end(&self) -> EventTime {
        let dur = i64::try_from(self.duration_ms).unwrap_or(i64::MAX);
        EventTime(self.timestamp.0.saturating_add(dur))
    }

    /// The bus partition key: one person's events share it, so they stay ordered.
    pub fn partition_key(&self) -> String {
        partition_key(&self.tenant_id, &self.user_id)
    }
}

/// `tenant:user`, the key that keeps one person's events in one partition.
pub fn partition_key(tenant: &str, user: &str) -> String {
    let mut key = String::with_capacity(tenant.len() + user.len() + 1);
    write_partition_key(&mut key, tenant, user);
    key
}

/// [`partition_key`] written into `key` (cleared first), for hot loops that reuse one
/// buffer.
pub fn write_partition_key(key: &mut String, tenant: &str, user: &str) {
    key.clear();
    key.reserve(tenant.len() + user.len() + 1);
    key.push_str(tenant);
    key.push(':');
    key.push_str(user);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_event_round_trips() {
        let json = r#"{"user_id":"u1","source":"aw","kind":"window_focus","timestamp":"2026-11-24T09:00:00Z","duration_ms":60000,"attributes":{"app":"Code"}}"#;
        let ev: ActivityEvent = serde_json::from_str(json).unwrap();
        assert_eq!(ev.schema_version, 1);
        assert_eq!(ev.kind, EventKind::WindowFocus);
        assert_eq!(ev.end().0 - ev.timestamp.0, 60_000);
        let back = serde_json::to_string(&ev).unwrap();
        let again: ActivityEvent = serde_json::from_str(&back).unwrap();
        assert_eq!(ev, again);
    }

    #[test]
    fn unknown_fields_are_named_in_the_error() {
        let json = r#"{"user_id":"u1","source":"aw","kind":"afk","timestamp":0,"colour":"red"}"#;
        let err = serde_json::from_str::<ActivityEvent>(json)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `colour`"), "{err}");
    }

    #[test]
    fn kind_names_match_serde() {
        for kind in EventKind::ALL {
            let json = serde_json::to_string(&kind).unwrap();
            assert_eq!(json, format!("\"{}\"", kind.as_str()));
        }
    }
}
