//! Backprop: the mean loss's gradient through the training forward pass, by the layers'
//! own vector-Jacobian products on the host kernels where that computes the same thing, by
//! burn autodiff elsewhere.

use super::{
    Estimate, EstimateError, GradientEstimator, TensorBatch, check_batch, scalar, scalar_of,
};
use crate::device::Tensor;
use crate::ep::EnergyModel;
use crate::loss::Loss;
use crate::model::Network;

/// The backprop gradient of the mean [`Loss`] over the batch. Dropout is active when a
/// seed is set ([`BackpropEstimator::with_dropout_seed`]), off otherwise.
#[derive(Debug, Clone)]
pub struct BackpropEstimator {
    loss: Loss,
    dropout_seed: Option<u64>,
    calls: u64,
    factors: bool,
    autodiff: bool,
}

impl BackpropEstimator {
    /// Backprop of `loss`, dropout off.
    pub fn new(loss: Loss) -> Result<Self, EstimateError> {
        loss.validate()?;
        Ok(Self {
            loss,
            dropout_seed: None,
            calls: 0,
            factors: false,
            autodiff: false,
        })
    }

    /// Always differentiate with burn autodiff (the reference the layers' own VJPs are
    /// tested against), never through the layers' VJPs.
    pub fn through_autodiff(mut self) -> Self {
        self.autodiff = true;
        self
    }

    /// Also return per-sample factors of the linear weights' gradients (layer inputs and
    /// `dL/dh`, from a backward pass through the layers' own VJPs; dropout off there).
    pub fn with_factors(mut self, on: bool) -> Self {
        self.factors = on;
        self
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

    fn loss(&self) -> Option<crate::loss::Loss> {
        Some(self.loss)
    }

    fn state(&self) -> Vec<(String, f64)> {
        vec![("calls".into(), self.calls as f64)]
    }

    fn load_state(&mut self, state: &[(String, f64)]) {
        self.calls = scalar_of(state, "calls") as u64;
    }

    fn estimate(&mut self, net: &Network, batch: &TensorBatch) -> Result<Estimate, EstimateError> {
        check_batch(net, batch)?;
        self.calls += 1;
        if !self.autodiff && uses_layer_vjps(net, &batch.x) {
            return Ok(self.through_layer_vjps(net, batch));
        }
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
        let factors = if self.factors {
            let energy = EnergyModel::new(net, self.loss);
            let (ctx, _, free) = energy.free_phase(net, batch.x.clone(), batch.targets.clone());
            let signals = energy.backprop_signals(net, &ctx, &free);
            energy.linear_factors(net, &signals, 1.0)
        } else {
            Vec::new()
        };
        Ok(Estimate {
            factors,
            factored: Vec::new(),
            grads,
            loss: value,
            output: out.inner(),
            settle: Vec::new(),
            residual_curves: Vec::new(),
            moments,
        })
    }
}

/// Whether backprop runs through the layers' own VJPs ([`BackpropEstimator`]'s host path):
/// on a CPU device, for nets without batch norm (whose training forward normalises with the
/// batch's own statistics, which the layers' VJPs hold fixed) and without dropout (whose
/// masks only the autodiff forward draws). Everything else uses burn autodiff.
/// `tests/backprop.rs` checks both give the same gradients.
fn uses_layer_vjps(net: &Network, x: &Tensor<2>) -> bool {
    crate::device::host_f32(x)
        && net.layers().iter().all(|l| {
            !matches!(
                l.op,
                crate::model::LayerOp::BatchNorm { .. } | crate::model::LayerOp::Dropout { .. }
            )
        })
}

impl BackpropEstimator {
    /// Backprop through the layers' VJPs: at the forward pass's states every prediction
    /// error is zero, so the energy's parameter gradient with the errors replaced by the
    /// backpropagated signals `dL/ds_i` is exactly `dL/dtheta` (summed over the batch).
    fn through_layer_vjps(&self, net: &Network, batch: &TensorBatch) -> Estimate {
        let energy = EnergyModel::new(net, self.loss);
        let (ctx, _, free) = energy.free_phase(net, batch.x.clone(), batch.targets.clone());
        let signals = energy.backprop_signals(net, &ctx, &free);
        let n = batch.len() as f32;
        let grads = energy
            .param_gradients(net, &ctx, &signals, 1.0)
            .into_iter()
            .map(|g| g.div_scalar(n))
            .collect();
        let output = free.output().clone();
        let loss = scalar(self.loss.mean(output.clone(), batch.targets.clone()));
        let factors = if self.factors {
            energy.linear_factors(net, &signals, 1.0)
        } else {
            Vec::new()
        };
        Estimate {
            factors,
            factored: Vec::new(),
            grads,
            loss,
            output,
            settle: Vec::new(),
            residual_curves: Vec::new(),
            moments: ctx.moments().clone(),
        }
    }
}
