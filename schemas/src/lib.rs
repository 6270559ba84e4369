//! Digame's data definitions: the canonical activity event, the derived records, the rules
//! that validate input, and the Arrow layouts and JSON Schemas derived from the types.
//!
//! This crate does no I/O. Every other crate depends on it, so a definition here is the one
//! definition.

pub mod arrow;
pub mod clickhouse;
pub mod event;
pub mod profile;
pub mod records;
pub mod time;
pub mod validate;

pub use event::{
    ActivityEvent, Attributes, EventKind, SCHEMA_VERSION, partition_key, write_partition_key,
};
pub use profile::{PersonProfile, TenantSettings, params_version};
pub use records::{
    AnomalyRow, DeadLetter, FEATURE_VERSION, FeatureRow, Granularity, PredictionRow,
};
pub use time::{EventTime, TimeRange};

/// The published JSON Schema of the wire event (served at `GET /v1/schema`).
pub fn event_json_schema() -> serde_json::Value {
    let mut schema = schemars::schema_for!(ActivityEvent).to_value();
    if let Some(obj) = schema.as_object_mut() {
        obj.insert(
            "$id".into(),
            serde_json::Value::String(format!("urn:digame:activity-event:v{SCHEMA_VERSION}")),
        );
    }
    schema
}
