//! Gradient estimators: one trait, several strategies.
//!
//! * [`BackpropEstimator`]: burn autodiff of the mean loss through the forward pass.
//! * [`CheckpointedBackprop`]: the same gradient through the layers' own VJPs, keeping only
//!   every k-th layer input and recomputing the rest (gradient checkpointing).
//! * [`EpEstimator`]: equilibrium propagation on the layered prediction-error energy, with
//!   one-sided, random-sign or centered nudging ([`Nudging`]); its `local` variant
//!   ([`EpEstimator::local`]) computes each layer's update from that layer's own input and
//!   prediction errors only.
//! * [`EqPropEstimator`]: classic EqProp on a layered Hopfield network.
//!
//! Every estimator returns fresh gradient tensors, averaged over the batch: gradients
//! overwrite, they never accumulate across calls.

mod backprop;
mod checkpointed;
mod ep;
mod eqprop;
mod fidelity;

/// Re-exported: estimators return them, the Fisher update reads them.
pub use crate::model::{Factored, GradFactors};
pub use backprop::BackpropEstimator;
pub use checkpointed::CheckpointedBackprop;
pub use ep::{EpConfig, EpEstimator, Nudging};
pub use eqprop::EqPropEstimator;
pub use fidelity::{GradientComparison, compare};

use burn::tensor::TensorData;

use crate::device::{Device, Tensor, from_host, to_host};
use crate::ep::{EqPropNetworkError, SettleError, SettleStats};
use crate::loss::LossError;
use crate::model::BatchMoments;
use crate::model::{column_means, weight_rows};

/// A batch on the device: inputs `[B, features]`, one-hot targets `[B, classes]`, labels,
/// and (optionally) the samples' indices in their split.
#[derive(Debug, Clone)]
pub struct TensorBatch {
    /// Inputs.
    pub x: Tensor<2>,
    /// One-hot targets.
    pub targets: Tensor<2>,
    /// Class labels.
    pub labels: Vec<u32>,
    /// Indices of the samples in their split (for persistent states), if known.
    pub indices: Option<Vec<usize>>,
}

impl TensorBatch {
    /// Uploads host data: `inputs` row-major `[labels.len(), inputs.len() / labels.len()]`.
    pub fn new(inputs: &[f32], labels: &[u32], classes: usize, device: &Device) -> Self {
        let n = labels.len();
        let mut one_hot = Vec::with_capacity(n * classes);
        crate::data::one_hot_into(labels, classes, &mut one_hot);
        Self {
            x: Tensor::from_data(
                TensorData::new(inputs.to_vec(), [n, inputs.len() / n.max(1)]),
                device,
            ),
            targets: Tensor::from_data(TensorData::new(one_hot, [n, classes]), device),
            labels: labels.to_vec(),
            indices: None,
        }
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// One gradient estimate.
#[derive(Debug, Clone)]
pub struct Estimate {
    /// One gradient per parameter, same shapes, averaged over the batch.
    pub grads: Vec<Tensor<2>>,
    /// Mean task loss of the model's prediction on the batch.
    pub loss: f32,
    /// The model's prediction (logits or output states) for the batch.
    pub output: Tensor<2>,
    /// What each settle did (empty for backprop).
    pub settle: Vec<SettleStats>,
    /// Each settle's residual at every convergence check, `(step, residual)`.
    pub residual_curves: Vec<Vec<(usize, f32)>>,
    /// Batch-norm moments of the forward pass, for the running statistics.
    pub moments: BatchMoments,
    /// Per-sample factors of each linear layer's weight gradient (indexed like the
    /// parameters; empty unless asked for with `with_factors`, or factored gradients with
    /// [`GradientEstimator::set_factored`]).
    pub factors: Vec<Option<GradFactors>>,
    /// The parameters whose gradient the estimate leaves to the factors (indexed like the
    /// parameters; empty: none): `grads[k]` is an empty `[0, 0]` tensor, and
    /// [`Estimate::complete`] (or a data-parallel step, over the whole batch) forms it.
    pub factored: Vec<Option<Factored>>,
}

impl Estimate {
    /// Forms the factored gradients ([`Estimate::factored`]) of the parameters for which
    /// `which(k)` holds, as means over `samples`, and unmarks them.
    pub fn complete(&mut self, samples: usize, which: impl Fn(usize) -> bool) {
        let total = samples as f32;
        for k in 0..self.factored.len() {
            let (Some(how), true) = (self.factored[k], which(k)) else {
                continue;
            };
            let source = match how {
                Factored::Weight => k,
                Factored::BiasOf(j) => j,
            };
            let Some(Some(f)) = self.factors.get(source) else {
                continue;
            };
            let (a, g) = (to_host(&f.inputs), to_host(&f.output_grads));
            let [inputs, outputs] = [f.inputs.dims()[1], f.output_grads.dims()[1]];
            let (values, dims) = match how {
                Factored::Weight => {
                    let mut w = Vec::new();
                    weight_rows(&a, &g, inputs, 0..inputs, total, &mut w);
                    (w, [inputs, outputs])
                }
                Factored::BiasOf(_) => (column_means(&g, outputs, total), [1, outputs]),
            };
            self.grads[k] = from_host(values, dims, &f.inputs.device());
            self.factored[k] = None;
        }
    }
}

/// Errors of gradient estimation.
#[derive(Debug, thiserror::Error)]
pub enum EstimateError {
    /// Settling failed.
    #[error(transparent)]
    Settle(#[from] SettleError),
    /// An option is out of range.
    #[error("invalid estimator option: {0}")]
    InvalidOption(String),
    /// The loss option is invalid.
    #[error(transparent)]
    Loss(#[from] LossError),
    /// The network does not suit the estimator.
    #[error(transparent)]
    Network(#[from] EqPropNetworkError),
    /// The batch does not fit the network.
    #[error("batch does not fit the network: {0}")]
    Batch(String),
}

/// A strategy that turns a batch into parameter gradients.
pub trait GradientEstimator {
    /// Short name (`backprop`, `ep`, `local-ep`, `eqprop`).
    fn name(&self) -> &'static str;

    /// Gradients of the network's parameters on `batch`.
    fn estimate(
        &mut self,
        net: &crate::model::Network,
        batch: &TensorBatch,
    ) -> Result<Estimate, EstimateError>;

    /// The loss whose gradient it estimates (`None` if it has none).
    fn loss(&self) -> Option<crate::loss::Loss> {
        None
    }

    /// Counters that make its randomness resumable (saved with checkpoints). EqProp's
    /// persistent per-sample states are not part of it.
    fn state(&self) -> Vec<(String, f64)> {
        Vec::new()
    }

    /// Restores [`GradientEstimator::state`].
    fn load_state(&mut self, state: &[(String, f64)]) {
        let _ = state;
    }

    /// Asks for factored gradients (`on`) or full ones: with them, the estimates leave
    /// every gradient the estimator can as its exact per-sample factors
    /// ([`Estimate::factored`]), which cost a fraction of the gradient to send between
    /// processes and are multiplied out over the whole batch once gathered (the
    /// data-parallel trainer's use). Returns whether the estimates will have any; default:
    /// never.
    fn set_factored(&mut self, on: bool) -> bool {
        let _ = on;
        false
    }

    /// The model's prediction for `x` (a forward pass, except for EqProp).
    fn predict(&self, net: &crate::model::Network, x: Tensor<2>) -> Tensor<2> {
        net.forward(x)
    }
}

pub(crate) fn check_batch(
    net: &crate::model::Network,
    batch: &TensorBatch,
) -> Result<(), EstimateError> {
    let [n, features] = batch.x.dims();
    let [tn, classes] = batch.targets.dims();
    if n == 0 {
        return Err(EstimateError::Batch("the batch is empty".into()));
    }
    if features != net.input_shape().numel() {
        return Err(EstimateError::Batch(format!(
            "{features} input features, the network takes {}",
            net.input_shape().numel()
        )));
    }
    if tn != n || classes != net.output_shape().numel() {
        return Err(EstimateError::Batch(format!(
            "targets are {tn} x {classes}, expected {n} x {}",
            net.output_shape().numel()
        )));
    }
    Ok(())
}

pub(crate) fn scalar_of(state: &[(String, f64)], name: &str) -> f64 {
    state
        .iter()
        .find(|(n, _)| n == name)
        .map_or(0.0, |(_, v)| *v)
}

pub(crate) fn scalar(t: Tensor<1>) -> f32 {
    crate::device::to_host(&t)[0]
}
