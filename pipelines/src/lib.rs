//! The stream processor: event-time windows in each person's time zone, keyed per-person
//! state, checkpoints, and the feature operators. Results never depend on arrival order:
//! each poll is admitted in event-time order, late events reopen their days (from memory,
//! or from the stored raw events through [`runtime::EventHistory`]), and watermarks only
//! mark windows final for readers ([`state`] says how).

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
    /// The checkpoint's bytes fail their checksum or do not decode: damaged on disk.
    #[error("pipeline checkpoint damaged: {0}")]
    CheckpointDamaged(String),
    #[error("pipeline i/o error: {0}")]
    Io(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
