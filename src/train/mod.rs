//! Training: the loop over epochs and batches, evaluation and per-epoch metrics.
//!
//! The library reports progress through a [`TrainObserver`] and never prints; the CLI turns
//! the callbacks into progress bars and JSON lines.

pub mod checkpoint;
mod metrics;
mod monitor;
#[cfg(feature = "mpi")]
pub mod mpi;
pub mod parallel;
mod trainer;

pub use metrics::EpochMetrics;
pub use monitor::{Monitor, MonitorRecord, ParamRecord, PhaseRecord};
pub use trainer::{DIVERGENCE_FACTOR, StepOutcome, TrainConfig, Trainer};

use crate::data::DataError;
use crate::device::{DeviceError, Tensor};
use crate::model::ModelError;
use crate::optim::OptimError;

/// Errors of a training run.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A data problem (batching, options).
    #[error(transparent)]
    Data(#[from] DataError),
    /// The model does not fit the data.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// An optimizer option or step failed.
    #[error(transparent)]
    Optim(#[from] OptimError),
    /// Gradient estimation failed (for example settling diverged).
    #[error(transparent)]
    Estimate(#[from] crate::estimate::EstimateError),
    /// Device selection failed.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// The loss became NaN or infinite, or grew past [`trainer::DIVERGENCE_FACTOR`] times
    /// its start.
    #[error(
        "training diverged at epoch {epoch}, batch {batch}: loss is {loss}; try a smaller learning rate"
    )]
    Diverged {
        /// Epoch (1-based).
        epoch: usize,
        /// Batch within the epoch (1-based).
        batch: usize,
        /// The non-finite loss.
        loss: f32,
    },
    /// A parameter became NaN or infinite during an epoch (it is not checkpointed).
    #[error(
        "training diverged at epoch {epoch}: parameter {param} holds a non-finite value; try a smaller learning rate"
    )]
    NonFiniteParameter {
        /// Epoch (1-based).
        epoch: usize,
        /// The parameter.
        param: String,
    },
    /// A training option is out of range.
    #[error("invalid training option: {0}")]
    InvalidOption(String),
    /// A collective operation of a data-parallel run failed, or the ranks disagree.
    #[error(transparent)]
    Parallel(#[from] parallel::ParallelError),
    /// The observer asked to stop ([`TrainObserver::should_stop`]).
    #[error("training interrupted at epoch {epoch}, batch {batch}")]
    Interrupted {
        /// Epoch (1-based).
        epoch: usize,
        /// The last batch taken (1-based).
        batch: usize,
    },
}

/// A differentiable function of the parameters whose gradient the [`Trainer`] adds to every
/// estimated gradient before the optimizer step (for example EWC's quadratic anchor). It
/// works with any gradient estimator, because it only touches the gradient.
pub trait Penalty {
    /// `d penalty / d params[i]` for each parameter (`None`: zero).
    fn gradient(&self, params: &[Tensor<2>]) -> Vec<Option<Tensor<2>>>;

    /// The penalty at `params` (one host read).
    fn value(&self, params: &[Tensor<2>]) -> f64;

    /// Whether the trainer applies it decoupled from the optimizer: instead of adding
    /// [`Penalty::gradient`] to the estimated gradient, it maps the optimizer's new
    /// parameters through [`Penalty::proximal`] with the step's learning rate (as
    /// decoupled weight decay does for an L2 penalty).
    fn decoupled(&self) -> bool {
        false
    }

    /// The proximal map `argmin_x penalty(x) + ||x - params||^2 / (2 step)` (used when
    /// [`Penalty::decoupled`]).
    fn proximal(&self, params: Vec<Tensor<2>>, step: f64) -> Vec<Tensor<2>>;
}

/// Receives progress of a training run.
pub trait TrainObserver {
    /// Epoch `epoch` (1-based) starts and will run `batches` batches.
    fn epoch_start(&mut self, _epoch: usize, _batches: usize) {}
    /// A batch finished with this mean loss and number of correct predictions.
    fn batch_end(&mut self, _loss: f32, _correct: usize, _samples: usize) {}
    /// An epoch finished.
    fn epoch_end(&mut self, _metrics: &EpochMetrics) {}
    /// Asked after every batch: `true` stops the epoch there with
    /// [`TrainError::Interrupted`] (a front-end's Ctrl-C, a caller's early stop). The model
    /// keeps the batches already taken; a run directory keeps its last whole epoch.
    fn should_stop(&mut self) -> bool {
        false
    }
}

/// Observer that ignores everything.
#[derive(Debug, Default, Clone, Copy)]
pub struct Silent;

impl TrainObserver for Silent {}
