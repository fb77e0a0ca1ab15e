//! Backprop with gradient checkpointing, through the layers' own vector-Jacobian products.

use super::{Estimate, EstimateError, GradientEstimator, TensorBatch, check_batch, scalar};
use crate::device::Tensor;
use crate::loss::Loss;
use crate::model::{LayerOp, Network, NormStats};

/// The backprop gradient of the mean [`Loss`] that keeps only every `k`-th layer input in
/// the forward pass and recomputes the rest, one segment of `k` layers at a time, in the
/// backward pass.
///
/// Activation memory is `L / k` checkpoints plus the `k` inputs of the segment being
/// differentiated: with `k = ceil(sqrt(L))` (the default) about `2 sqrt(L)` layer inputs
/// instead of `L`, for one extra forward pass. `k = 1` keeps every input (plain backprop
/// without autodiff's graph). The gradient does not depend on `k`: the recomputation
/// repeats the forward exactly, so every `k` gives the same bits. Sequential networks
/// only: residual skips and batch norm (whose backward goes through the batch's moments)
/// are rejected, and dropout is the identity, as in [`super::BackpropEstimator`] without a
/// seed.
#[derive(Debug, Clone)]
pub struct CheckpointedBackprop {
    loss: Loss,
    every: Option<usize>,
}

impl CheckpointedBackprop {
    /// Checkpointed backprop of `loss`, a checkpoint every `every` layers (`None`:
    /// `ceil(sqrt(layers))`).
    pub fn new(loss: Loss, every: Option<usize>) -> Result<Self, EstimateError> {
        loss.validate()?;
        if every == Some(0) {
            return Err(EstimateError::InvalidOption(
                "the checkpoint interval must be at least 1 layer".into(),
            ));
        }
        Ok(Self { loss, every })
    }

    /// The checkpoint interval used for a network of `layers` layers.
    pub fn interval(&self, layers: usize) -> usize {
        self.every
            .unwrap_or_else(|| (layers as f64).sqrt().ceil() as usize)
            .clamp(1, layers.max(1))
    }

    fn check_network(net: &Network) -> Result<(), EstimateError> {
        if !net.skips().is_empty() {
            return Err(EstimateError::InvalidOption(
                "checkpointed backprop needs a sequential network; this one has residual skips"
                    .into(),
            ));
        }
        if net
            .layers()
            .iter()
            .any(|l| matches!(l.op, LayerOp::BatchNorm { .. }))
        {
            return Err(EstimateError::InvalidOption(
                "checkpointed backprop does not support batch norm (its backward goes through \
                 the batch moments); use the backprop estimator"
                    .into(),
            ));
        }
        Ok(())
    }
}

impl GradientEstimator for CheckpointedBackprop {
    fn name(&self) -> &'static str {
        "checkpointed-backprop"
    }

    fn loss(&self) -> Option<Loss> {
        Some(self.loss)
    }

    fn estimate(&mut self, net: &Network, batch: &TensorBatch) -> Result<Estimate, EstimateError> {
        check_batch(net, batch)?;
        Self::check_network(net)?;
        let layers = net.layers();
        let k = self.interval(layers.len());
        let params = net.params();
        let plain = NormStats::Batch;

        // Forward: keep the input of layers 0, k, 2k, ...
        let mut checkpoints: Vec<Tensor<2>> = Vec::with_capacity(layers.len().div_ceil(k));
        let mut h = batch.x.clone();
        for (i, layer) in layers.iter().enumerate() {
            if i % k == 0 {
                checkpoints.push(h.clone());
            }
            h = layer.forward_taped(layer.params(params), &h, &plain).0;
        }
        let n = batch.len() as f32;
        let loss = scalar(self.loss.mean(h.clone(), batch.targets.clone()));
        let mut g = self
            .loss
            .gradient(h.clone(), batch.targets.clone())
            .div_scalar(n);
        let output = h;

        // Backward, one segment at a time from the last: recompute its layer inputs from
        // its checkpoint, then run the VJPs back through it, freeing each input once used.
        let mut grads: Vec<Option<Tensor<2>>> = vec![None; params.len()];
        let mut segment = checkpoints.len();
        while let Some(start_value) = checkpoints.pop() {
            segment -= 1;
            let start = segment * k;
            let end = (start + k).min(layers.len());
            let mut inputs = Vec::with_capacity(end - start);
            let mut v = start_value;
            for layer in &layers[start..end] {
                let (out, aux) = layer.forward_taped(layer.params(params), &v, &plain);
                inputs.push((v, aux));
                v = out;
            }
            drop(v);
            for i in (start..end).rev() {
                let layer = &layers[i];
                let (x, aux) = inputs.pop().expect("one input per layer of the segment");
                let p = layer.params(params);
                for (j, grad) in layer.vjp_params(p, &x, &aux, &g).into_iter().enumerate() {
                    grads[layer.first_param + j] = Some(grad);
                }
                if i > 0 {
                    g = layer.vjp_input(p, &x, &aux, g);
                }
            }
        }
        let grads = grads
            .into_iter()
            .zip(params)
            .map(|(g, p)| g.unwrap_or_else(|| Tensor::zeros(p.dims(), &p.device())))
            .collect();
        Ok(Estimate {
            grads,
            loss,
            output,
            settle: Vec::new(),
            residual_curves: Vec::new(),
            moments: Default::default(),
            factors: Vec::new(),
            factored: Vec::new(),
        })
    }
}
