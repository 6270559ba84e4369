//! The infrastructure crate's integration tests against real servers, in one test binary.

mod clickhouse;
mod meta;
