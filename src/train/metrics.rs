//! Per-epoch metrics, written as one JSON object per line.

use serde::{Deserialize, Serialize};

/// What one epoch achieved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    /// Epoch number, 1-based.
    pub epoch: usize,
    /// Mean training loss over the epoch's batches (weighted by batch size).
    pub train_loss: f64,
    /// Training accuracy over the epoch, in [0, 1], measured on the batches as they were
    /// trained (before each batch's update).
    pub train_accuracy: f64,
    /// Test accuracy after the epoch, in [0, 1].
    pub test_accuracy: f64,
    /// Wall-clock seconds of the training part of the epoch (evaluation excluded).
    pub seconds: f64,
    /// Training samples per second.
    pub samples_per_second: f64,
    /// Mean settle steps per phase (EP estimators only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settle_steps_mean: Option<f64>,
    /// Mean final settle residual (largest per-sample state-gradient norm) per phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settle_residual_mean: Option<f64>,
    /// Phases that used their whole step budget without reaching the tolerance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settle_unconverged: Option<usize>,
}
