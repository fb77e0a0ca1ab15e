//! Floating-point cost of layers, as matrix products.

use super::Layer;

/// A matrix product of an `m x k` by a `k x n` matrix (`2 m k n` FLOPs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Gemm {
    /// Rows of the left factor.
    pub m: usize,
    /// Shared dimension.
    pub k: usize,
    /// Columns of the right factor.
    pub n: usize,
}

impl Gemm {
    /// Multiply-adds counted as two FLOPs.
    pub fn flops(&self) -> f64 {
        2.0 * self.m as f64 * self.k as f64 * self.n as f64
    }
}

impl Layer {
    /// The matrix products of this layer's forward pass on `batch` samples (convolutions as
    /// their im2col product, attention as its projections and per-head products). Element-wise
    /// layers cost no matrix products and return nothing.
    pub fn gemms(&self, batch: usize) -> Vec<Gemm> {
        super::layers::implementation(&self.op).gemms(self, batch)
    }

    /// FLOPs of the forward pass's matrix products on `batch` samples.
    pub fn forward_flops(&self, batch: usize) -> f64 {
        self.gemms(batch).iter().map(Gemm::flops).sum()
    }
}
