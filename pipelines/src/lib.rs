//! The stream processor: event-time windows in each person's time zone, watermarks with
//! allowed lateness, keyed per-person state, checkpoints, and the feature operators.

pub mod directory;
pub mod features;
pub mod rules;
pub mod runtime;
pub mod state;
pub mod window;

pub use runtime::{FeaturePipeline, PipelineStatus, Processor, RuntimeSettings};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("pipeline configuration error: {0}")]
    Config(String),
    #[error("pipeline bus error: {0}")]
    Bus(String),
    #[error("pipeline store error: {0}")]
    Store(String),
    #[error("pipeline checkpoint error: {0}")]
    Checkpoint(String),
    #[error("pipeline i/o error: {0}")]
    Io(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
