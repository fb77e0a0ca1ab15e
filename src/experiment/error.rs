//! Errors of setting up and running an experiment.

use std::path::PathBuf;

use crate::data::DataError;
use crate::device::DeviceError;
use crate::estimate::EstimateError;
use crate::model::ModelError;
use crate::optim::OptimError;
use crate::train::TrainError;

/// Errors of option resolution, setup, resume checks and result files.
#[derive(Debug, thiserror::Error)]
pub enum ExperimentError {
    /// An option is malformed, out of range or does not go with another.
    #[error("{0}")]
    InvalidOption(String),
    /// No preset has this name.
    #[error(
        "unknown preset `{0}` (expected one of: {names})",
        names = super::Preset::names().join(", ")
    )]
    UnknownPreset(String),
    /// A config file cannot be read or parsed.
    #[error("reading config file {path}: {reason}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A checkpoint holds no usable run metadata.
    #[error("{path} is not a mep checkpoint: {reason}")]
    Checkpoint {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A resumed run's options differ from the stored run's.
    #[error(
        "--resume continues the stored run: options other than epochs must match the checkpoint's ({stored})"
    )]
    ResumeMismatch {
        /// The stored options, as JSON.
        stored: String,
    },
    /// Reading or writing a file failed.
    #[error("{action} {path}")]
    Io {
        /// What was being done ("writing", "creating").
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Loading or fetching data failed.
    #[error(transparent)]
    Data(#[from] DataError),
    /// The model spec is invalid or does not fit the data.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// An optimizer option is invalid.
    #[error(transparent)]
    Optim(#[from] OptimError),
    /// An estimator option is invalid.
    #[error(transparent)]
    Estimate(#[from] EstimateError),
    /// The device cannot be used.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// Training failed.
    #[error(transparent)]
    Train(#[from] TrainError),
    /// A continual-learning run failed.
    #[error("continual run {method}{hint}")]
    Continual {
        /// The method's label.
        method: String,
        /// What to try.
        hint: &'static str,
        /// The cause (boxed: it is large, and rare).
        source: Box<crate::continual::ContinualError>,
    },
    /// A checkpoint could not be written or read.
    #[error(transparent)]
    CheckpointFile(#[from] crate::train::checkpoint::CheckpointError),
    /// A chart could not be drawn.
    #[error(transparent)]
    Plot(#[from] crate::bench::plot::PlotError),
}

impl ExperimentError {
    pub(crate) fn io(action: &'static str, path: &std::path::Path, source: std::io::Error) -> Self {
        Self::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    }
}
