//! Watching a run: per-layer gradient norms, agreement with backprop, energies and settling.

use serde::{Deserialize, Serialize};

use crate::estimate::{
    BackpropEstimator, Estimate, EstimateError, GradientEstimator, TensorBatch, compare,
};
use crate::loss::Loss;
use crate::model::Network;

/// One parameter tensor at a monitored step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParamRecord {
    /// Parameter name.
    pub name: String,
    /// Norm of the estimator's gradient.
    pub grad_norm: f64,
    /// Norm of the backprop gradient of the same loss on the same batch.
    pub backprop_norm: f64,
    /// Cosine between the two.
    pub cosine: f64,
}

/// One nudged phase at a monitored step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhaseRecord {
    /// Mean per-sample energy at the settled states.
    pub energy: f32,
    /// Settle steps used.
    pub steps: usize,
    /// `(step, largest per-sample state-gradient norm)` at each check.
    pub residual_curve: Vec<(usize, f32)>,
}

/// What the monitor saw at one step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MonitorRecord {
    /// Optimizer step (1-based, over the whole run).
    pub step: usize,
    /// Epoch of the step.
    pub epoch: usize,
    /// Batch loss.
    pub loss: f32,
    /// Per parameter tensor.
    pub params: Vec<ParamRecord>,
    /// Per nudged phase (empty for backprop).
    pub phases: Vec<PhaseRecord>,
}

/// Records a [`MonitorRecord`] every `every` steps.
#[derive(Debug, Clone)]
pub struct Monitor {
    every: usize,
    reference: BackpropEstimator,
    records: Vec<MonitorRecord>,
}

impl Monitor {
    /// A monitor comparing with backprop of `loss`, every `every` (>= 1) steps.
    pub fn new(every: usize, loss: Loss) -> Result<Self, EstimateError> {
        if every == 0 {
            return Err(EstimateError::InvalidOption(
                "the monitor interval must be at least 1 step".into(),
            ));
        }
        Ok(Self {
            every,
            reference: BackpropEstimator::new(loss)?,
            records: Vec::new(),
        })
    }

    /// Whether step `step` (1-based) is monitored.
    pub fn due(&self, step: usize) -> bool {
        step == 1 || step.is_multiple_of(self.every)
    }

    /// Records a step from the estimate and a backprop reference on the same batch (before
    /// the update).
    pub fn record(
        &mut self,
        step: usize,
        epoch: usize,
        net: &Network,
        batch: &TensorBatch,
        estimate: &Estimate,
    ) -> Result<(), EstimateError> {
        let reference = self.reference.estimate(net, batch)?;
        let params = compare(net, &estimate.grads, &reference.grads)
            .into_iter()
            .map(|c| ParamRecord {
                name: c.name,
                grad_norm: c.norm,
                backprop_norm: c.reference_norm,
                cosine: c.cosine,
            })
            .collect();
        let phases = estimate
            .settle
            .iter()
            .zip(
                estimate
                    .residual_curves
                    .iter()
                    .map(Some)
                    .chain(std::iter::repeat(None)),
            )
            .map(|(s, curve)| PhaseRecord {
                energy: s.energy,
                steps: s.steps,
                residual_curve: curve.cloned().unwrap_or_default(),
            })
            .collect();
        self.records.push(MonitorRecord {
            step,
            epoch,
            loss: estimate.loss,
            params,
            phases,
        });
        Ok(())
    }

    /// The records so far, removed from the monitor.
    pub fn drain(&mut self) -> Vec<MonitorRecord> {
        std::mem::take(&mut self.records)
    }
}
