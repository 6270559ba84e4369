//! Shared plumbing: configuration, telemetry, the event-bus seam with its embedded log, and
//! the store seam with its embedded Parquet implementation.

pub mod bus;
pub mod config;
pub mod store;
pub mod telemetry;
