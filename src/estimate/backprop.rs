//! Backprop: burn autodiff of the mean loss through the training forward pass.

use super::{Estimate, EstimateError, GradientEstimator, TensorBatch, check_batch, scalar};
use crate::device::Tensor;
use crate::loss::Loss;
use crate::model::Network;

/// The backprop gradient of the mean [`Loss`] over the batch. Dropout is active when a
/// seed is set ([`BackpropEstimator::with_dropout_seed`]), off otherwise.
#[derive(Debug, Clone)]
pub struct BackpropEstimator {
    loss: Loss,
    dropout_seed: Option<u64>,
    calls: u64,
}

impl BackpropEstimator {
    /// Backprop of `loss`, dropout off.
    pub fn new(loss: Loss) -> Result<Self, EstimateError> {
        loss.validate()?;
        Ok(Self {
            loss,
            dropout_seed: None,
            calls: 0,
        })
    }

    /// Turns dropout on, with masks drawn from `seed` and the call count.
    pub fn with_dropout_seed(mut self, seed: u64) -> Self {
        self.dropout_seed = Some(seed);
        self
    }
}

impl GradientEstimator for BackpropEstimator {
    fn name(&self) -> &'static str {
        "backprop"
    }

    fn estimate(&mut self, net: &Network, batch: &TensorBatch) -> Result<Estimate, EstimateError> {
        check_batch(net, batch)?;
        self.calls += 1;
        let device = batch.x.device();
        let lift = |t: &Tensor<2>| Tensor::<2>::from_inner(t.clone());
        let params: Vec<Tensor<2>> = net
            .params()
            .iter()
            .map(|p| lift(p).require_grad())
            .collect();
        let seed = self
            .dropout_seed
            .map(|s| crate::data::dataset::mix(s, self.calls));
        let (out, moments) = net.forward_train(&params, lift(&batch.x), seed);
        let loss = self.loss.mean(out.clone(), lift(&batch.targets));
        let value = scalar(loss.clone());
        let grads = loss.backward();
        let grads = params
            .iter()
            .map(|p| {
                p.grad(&grads)
                    .unwrap_or_else(|| Tensor::zeros(p.dims(), &device))
            })
            .collect();
        Ok(Estimate {
            grads,
            loss: value,
            output: out.inner(),
            settle: Vec::new(),
            moments,
        })
    }
}
