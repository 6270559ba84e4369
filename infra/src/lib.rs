//! Shared plumbing: configuration, telemetry, the event-bus seam with its embedded log, and
//! the store seam with its embedded Parquet implementation, and the metadata store.

pub mod backup;
pub mod bus;
pub mod config;
pub mod meta;
pub mod scrub;
pub mod store;
pub mod telemetry;
