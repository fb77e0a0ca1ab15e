//! Fully connected ReLU network.

use burn::tensor::TensorData;
use burn::tensor::activation::relu;
use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};

use super::{ModelError, ModelSpec};
use crate::device::{Device, Tensor};

/// A fully connected network `x -> W1 -> ReLU -> ... -> Wk -> logits`.
///
/// Parameters are stored as a flat list, weight then bias per layer: weight `i` has shape
/// `[in, out]` (so a layer is `x W + b`), bias `i` has shape `[1, out]`.
#[derive(Debug, Clone)]
pub struct Mlp {
    spec: ModelSpec,
    params: Vec<Tensor<2>>,
}

impl Mlp {
    /// He-uniform initialisation (`U(-sqrt(6/fan_in), sqrt(6/fan_in))`, the right scale for
    /// ReLU) from a seeded generator, zero biases. The same seed gives the same weights on
    /// every device and backend.
    pub fn new(spec: ModelSpec, seed: u64, device: &Device) -> Self {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
        let mut params = Vec::with_capacity(2 * (spec.sizes().len() - 1));
        for pair in spec.sizes().windows(2) {
            let (fan_in, fan_out) = (pair[0], pair[1]);
            let bound = (6.0 / fan_in as f64).sqrt() as f32;
            let w: Vec<f32> = (0..fan_in * fan_out)
                .map(|_| rng.random_range(-bound..bound))
                .collect();
            params.push(Tensor::from_data(
                TensorData::new(w, [fan_in, fan_out]),
                device,
            ));
            params.push(Tensor::zeros([1, fan_out], device));
        }
        Self { spec, params }
    }

    /// A network with the given parameters (weight, bias per layer, shapes as documented);
    /// a wrong count or shape is an error.
    pub fn from_params(spec: ModelSpec, params: Vec<Tensor<2>>) -> Result<Self, ModelError> {
        let expected: Vec<[usize; 2]> = spec
            .sizes()
            .windows(2)
            .flat_map(|p| [[p[0], p[1]], [1, p[1]]])
            .collect();
        let found: Vec<[usize; 2]> = params.iter().map(|p| p.dims()).collect();
        if found != expected {
            return Err(ModelError::InvalidSpec {
                spec: spec.to_string(),
                reason: format!("parameter shapes {found:?} do not match {expected:?}"),
            });
        }
        Ok(Self { spec, params })
    }

    /// The model's spec.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// Parameters, weight then bias per layer.
    pub fn params(&self) -> &[Tensor<2>] {
        &self.params
    }

    /// Replaces the parameters with updated ones of the same count and shapes (the
    /// optimizers' output).
    pub(crate) fn set_params(&mut self, params: Vec<Tensor<2>>) {
        debug_assert_eq!(params.len(), self.params.len());
        self.params = params;
    }

    /// Logits for a batch `x` of shape `[batch, inputs]`.
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        Self::forward_with(&self.params, x)
    }

    /// The forward pass with an explicit parameter list (for example autodiff-tracked copies).
    pub fn forward_with(params: &[Tensor<2>], x: Tensor<2>) -> Tensor<2> {
        let layers = params.len() / 2;
        let mut h = x;
        for (i, wb) in params.chunks_exact(2).enumerate() {
            h = h.matmul(wb[0].clone()) + wb[1].clone();
            if i + 1 < layers {
                h = relu(h);
            }
        }
        h
    }

    /// Number of scalar parameters.
    pub fn num_params(&self) -> usize {
        self.spec
            .sizes()
            .windows(2)
            .map(|p| p[0] * p[1] + p[1])
            .sum()
    }
}
