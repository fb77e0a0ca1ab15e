//! Floating-point cost of layers, as matrix products.

use super::{Layer, LayerOp, Shape};

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
        match (&self.op, self.input, self.output) {
            (LayerOp::Linear { inputs, outputs }, _, _) => vec![Gemm {
                m: batch,
                k: *inputs,
                n: *outputs,
            }],
            (
                LayerOp::Conv2d {
                    in_channels,
                    out_channels,
                    kernel,
                    ..
                },
                _,
                Shape::Image { h, w, .. },
            ) => vec![Gemm {
                m: batch * h * w,
                k: in_channels * kernel * kernel,
                n: *out_channels,
            }],
            (LayerOp::Attention { heads }, Shape::Seq { t, d }, _) => {
                let dh = d / heads;
                let proj = Gemm {
                    m: batch * t,
                    k: d,
                    n: d,
                };
                vec![
                    proj,
                    proj,
                    proj,
                    Gemm {
                        m: batch * heads * t,
                        k: dh,
                        n: t,
                    },
                    Gemm {
                        m: batch * heads * t,
                        k: t,
                        n: dh,
                    },
                    proj,
                ]
            }
            _ => Vec::new(),
        }
    }

    /// FLOPs of the forward pass's matrix products on `batch` samples.
    pub fn forward_flops(&self, batch: usize) -> f64 {
        self.gemms(batch).iter().map(Gemm::flops).sum()
    }
}
