//! Layers: what each computes ([`LayerOp`]) and the dispatch of its forward passes and
//! analytic vector-Jacobian products to its file in [`super::layers`].
//!
//! Every value is a `[batch, features]` matrix read through the layer's input [`Shape`].
//! A layer offers three operations on plain (non-autodiff) tensors — a forward pass that
//! records what its backward needs ([`Aux`]), the vector-Jacobian product with respect to
//! its input, and the one with respect to its parameters (summed over the batch) — plus a
//! forward pass made only of differentiable burn ops ([`Layer::apply`]), used by backprop
//! and by the autodiff reference path of the energy.

use std::sync::Arc;

use burn::tensor::Int;

use super::layers::implementation;
use super::{Activation, Shape};
use crate::device::{Backend, Tensor};

/// What a layer computes, with its sizes resolved.
#[derive(Debug, Clone, PartialEq)]
pub enum LayerOp {
    /// `x W + b` with `W: [inputs, outputs]`, `b: [1, outputs]` (a state-producing layer).
    Linear {
        /// Input width.
        inputs: usize,
        /// Output width.
        outputs: usize,
    },
    /// 2-D convolution with kernel `[out, in * k * k]` (flattened) and bias `[1, out]`
    /// (a state-producing layer).
    Conv2d {
        /// Input channels.
        in_channels: usize,
        /// Output channels.
        out_channels: usize,
        /// Square kernel size.
        kernel: usize,
        /// Stride.
        stride: usize,
        /// Zero padding on every side.
        padding: usize,
    },
    /// An element-wise activation.
    Activation(Activation),
    /// Max pooling over `kernel x kernel` windows.
    MaxPool2d {
        /// Window size.
        kernel: usize,
        /// Stride.
        stride: usize,
    },
    /// Average pooling over `kernel x kernel` windows.
    AvgPool2d {
        /// Window size.
        kernel: usize,
        /// Stride.
        stride: usize,
    },
    /// An image or sequence read as a flat vector (no data movement).
    Flatten,
    /// A flat vector read as `tokens` tokens (no data movement).
    Tokens {
        /// Number of tokens.
        tokens: usize,
    },
    /// Layer normalisation with gain and bias: over all features of a sample, or over each
    /// token's features for a sequence.
    LayerNorm {
        /// Variance floor.
        eps: f32,
    },
    /// Batch normalisation with gain and bias, per feature (flat), per channel (image) or
    /// per token feature (sequence).
    BatchNorm {
        /// Variance floor.
        eps: f32,
        /// Weight of the new batch in the running statistics.
        momentum: f32,
        /// Index of this layer's running statistics in the network.
        slot: usize,
    },
    /// Dropout with drop probability `p` (identity except in backprop training).
    Dropout {
        /// Drop probability.
        p: f32,
    },
    /// Multi-head self-attention `softmax(Q K^T / sqrt(d_h)) V W_o` with `Q = X W_q` etc.,
    /// no biases (a state-producing layer).
    Attention {
        /// Number of heads.
        heads: usize,
    },
}

/// One layer of a network, with its input and output shapes and parameter slots.
#[derive(Debug, Clone, PartialEq)]
pub struct Layer {
    /// What it computes.
    pub op: LayerOp,
    /// Display name, unique in the network (`fc1`, `conv2`, `relu3`, ...).
    pub name: String,
    /// Per-sample input shape.
    pub input: Shape,
    /// Per-sample output shape.
    pub output: Shape,
    /// Index of its first parameter in the network's parameter list.
    pub first_param: usize,
    /// Number of parameter tensors.
    pub num_params: usize,
}

/// How a batch-norm layer normalises.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // one per layer per batch
pub enum NormStats {
    /// With these per-channel statistics, held constant (`mean`, `inv_std`, both `[1, C, 1]`).
    Fixed {
        /// Mean per channel.
        mean: Tensor<3>,
        /// `1 / sqrt(var + eps)` per channel.
        inv_std: Tensor<3>,
    },
    /// With the statistics of the batch itself (differentiable, as in backprop training).
    Batch,
}

/// What a layer's backward needs from its forward, beyond its input.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // one per layer and settle step; boxing would allocate
pub enum Aux {
    /// Nothing more.
    None,
    /// Max-pooling argmax indices.
    MaxIndices(burn::tensor::Tensor<Backend, 4, Int>),
    /// Max-pooling argmax indices of the host kernel (in-plane index per output value).
    HostMaxIndices(Arc<[u32]>),
    /// Normalised input and `1/std` (layer norm: per row of the norm view; batch norm:
    /// per channel).
    Norm {
        /// Normalised input in the layer's norm view.
        xhat: Tensor<3>,
        /// Inverse standard deviation.
        inv_std: Tensor<3>,
    },
    /// Attention intermediates: heads `[B, H, T, d_h]` of Q, K, V, the attention
    /// weights `[B, H, T, T]` and the merged head outputs `[B*T, D]`.
    Attention {
        /// Queries.
        q: Tensor<4>,
        /// Keys.
        k: Tensor<4>,
        /// Values.
        v: Tensor<4>,
        /// Attention weights.
        a: Tensor<4>,
        /// Merged outputs before `W_o`.
        o: Tensor<2>,
    },
}

impl Layer {
    /// Whether the layer's output is an EP state (linear, convolution, attention).
    pub fn is_state(&self) -> bool {
        matches!(
            self.op,
            LayerOp::Linear { .. } | LayerOp::Conv2d { .. } | LayerOp::Attention { .. }
        )
    }

    /// The parameters of this layer in the network's list.
    pub fn params<'a>(&self, all: &'a [Tensor<2>]) -> &'a [Tensor<2>] {
        &all[self.first_param..self.first_param + self.num_params]
    }

    /// The forward pass built only from differentiable burn ops (works on autodiff
    /// tensors). Dropout is the identity here: the network applies its mask.
    pub fn apply(&self, p: &[Tensor<2>], x: Tensor<2>, stats: &NormStats) -> Tensor<2> {
        implementation(&self.op).apply(self, p, x, stats)
    }

    /// The forward pass on plain tensors, returning what the backward needs. Batch norm
    /// uses `stats`, which must be [`NormStats::Fixed`] here.
    pub(crate) fn forward_taped(
        &self,
        p: &[Tensor<2>],
        x: &Tensor<2>,
        stats: &NormStats,
    ) -> (Tensor<2>, Aux) {
        implementation(&self.op).forward_taped(self, p, x, stats)
    }

    /// The vector-Jacobian product with respect to the input: `g^T dy/dx` per sample.
    pub(crate) fn vjp_input(
        &self,
        p: &[Tensor<2>],
        x: &Tensor<2>,
        aux: &Aux,
        g: Tensor<2>,
    ) -> Tensor<2> {
        implementation(&self.op).vjp_input(self, p, x, aux, g)
    }

    /// The vector-Jacobian product with respect to the parameters, summed over the batch;
    /// one tensor per parameter, shaped like it. Empty for layers without parameters.
    pub(crate) fn vjp_params(
        &self,
        p: &[Tensor<2>],
        x: &Tensor<2>,
        aux: &Aux,
        g: &Tensor<2>,
    ) -> Vec<Tensor<2>> {
        implementation(&self.op).vjp_params(self, p, x, aux, g)
    }

    /// [`Layer::vjp_params`] without the parameters marked in `skip` (indexed like the
    /// layer's parameters), which come back `None`; a linear layer skips its weight's
    /// product altogether.
    pub(crate) fn vjp_params_except(
        &self,
        p: &[Tensor<2>],
        x: &Tensor<2>,
        aux: &Aux,
        g: &Tensor<2>,
        skip: &[bool],
    ) -> Vec<Option<Tensor<2>>> {
        implementation(&self.op).vjp_params_except(self, p, x, aux, g, skip)
    }
}
