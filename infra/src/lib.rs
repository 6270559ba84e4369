//! The backends behind Digame's seams and their wiring: the bus as configured
//! ([`bus::open`]), the embedded Parquet store and the ClickHouse store, the metadata store,
//! backups and scrubs. The seams themselves and the configuration live in crates of their
//! own beside this one (`digame-bus`, `digame-kafka`, `digame-config`,
//! `digame-telemetry`), so what needs only a seam builds without the backends.

pub mod backup;
pub mod bus;
pub mod meta;
pub mod scrub;
pub mod store;

pub use digame_config as config;
pub use digame_telemetry as telemetry;
