//! The API crate's integration tests, one module per subject, in one test binary: each
//! binary links the whole stack, so one instead of fourteen saves most of the link time of
//! a test build. Most start the real `digame` binary; the servers they need (Kafka,
//! ClickHouse, PostgreSQL) are those `infra/scripts/test` starts.

mod abuse;
mod backup;
mod clickhouse;
mod delivery;
mod e2e;
mod faults;
mod golden;
mod groups;
mod kafka;
mod nodes;
mod recompute;
mod security;
mod styles;
mod views;
