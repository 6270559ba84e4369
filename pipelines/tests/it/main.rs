//! The pipeline's integration tests on its operator core, in one test binary.

mod golden;
mod order;
