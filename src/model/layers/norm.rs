//! Layer normalisation (over all features of a sample, or each token's features) and
//! batch normalisation (per feature, per channel or per token feature), each with a gain
//! and a bias. Batch norm's statistics are the batch's own in backprop training and fixed
//! ([`NormStats::Fixed`]) inside the EP energy.

use super::LayerImpl;
use crate::device::Tensor;
use crate::model::layer::{Aux, Layer, LayerOp, NormStats};
use crate::model::network::LayerInit;
use crate::model::{ModelError, Shape};

/// Variance floor of both norms.
const EPS: f32 = 1e-5;
/// Weight of a new batch in batch norm's running statistics.
const MOMENTUM: f32 = 0.1;

/// A norm keeps its input's shape and adds a unit gain and a zero bias per normalised
/// feature (per channel for batch norm on images); batch norm also gets running
/// statistics.
pub(crate) fn build(
    init: &mut LayerInit<'_>,
    input: Shape,
    batch: bool,
) -> Result<(LayerOp, Shape), ModelError> {
    let channels = match (batch, input) {
        (true, Shape::Image { c, .. }) => c,
        (_, Shape::Seq { d, .. }) => d,
        (_, s) => s.numel(),
    };
    let (op, name) = if batch {
        let slot = init.running_stats(channels);
        let op = LayerOp::BatchNorm {
            eps: EPS,
            momentum: MOMENTUM,
            slot,
        };
        (op, init.name("bn"))
    } else {
        (LayerOp::LayerNorm { eps: EPS }, init.name("ln"))
    };
    init.vector(format!("{name}.gain"), 1.0, channels)?;
    init.vector(format!("{name}.bias"), 0.0, channels)?;
    Ok((op, input))
}

impl Layer {
    /// The view a normalisation layer works in: `[rows, channels, spread]`.
    fn norm_view(&self, x: Tensor<2>) -> Tensor<3> {
        let b = x.dims()[0];
        match (&self.op, self.input) {
            (LayerOp::BatchNorm { .. }, Shape::Image { c, h, w }) => x.reshape([b, c, h * w]),
            (LayerOp::BatchNorm { .. }, Shape::Seq { t, d }) => x.reshape([b * t, d, 1]),
            (LayerOp::BatchNorm { .. }, Shape::Flat(n)) => x.reshape([b, n, 1]),
            (_, Shape::Seq { t, d }) => x.reshape([b * t, 1, d]),
            (_, s) => x.reshape([b, 1, s.numel()]),
        }
    }

    /// Gain or bias of a normalisation layer in its view's broadcast shape.
    fn norm_param(&self, p: &Tensor<2>) -> Tensor<3> {
        let n = p.dims()[1];
        match self.op {
            LayerOp::BatchNorm { .. } => p.clone().reshape([1, n, 1]),
            _ => p.clone().reshape([1, 1, n]),
        }
    }

    fn unview(&self, x: Tensor<3>, batch: usize) -> Tensor<2> {
        x.reshape([batch, self.input.numel()])
    }

    /// Batch statistics (`mean`, biased `var`) of a batch-norm input, each `[1, C, 1]`.
    pub fn batch_moments(&self, x: &Tensor<2>) -> (Tensor<3>, Tensor<3>) {
        let v = self.norm_view(x.clone());
        let mean = v.clone().mean_dim(2).mean_dim(0);
        let var = (v - mean.clone()).square().mean_dim(2).mean_dim(0);
        (mean, var)
    }
}

/// [`LayerOp::LayerNorm`] and [`LayerOp::BatchNorm`].
pub(crate) struct Norm;

impl LayerImpl for Norm {
    fn apply(&self, l: &Layer, p: &[Tensor<2>], x: Tensor<2>, stats: &NormStats) -> Tensor<2> {
        let b = x.dims()[0];
        let v = l.norm_view(x);
        let xhat = match (&l.op, stats) {
            (LayerOp::BatchNorm { .. }, NormStats::Fixed { mean, inv_std }) => {
                (v - mean.clone()) * inv_std.clone()
            }
            (LayerOp::BatchNorm { eps, .. }, NormStats::Batch) => {
                let mean = v.clone().mean_dim(2).mean_dim(0);
                let centered = v - mean;
                let var = centered.clone().square().mean_dim(2).mean_dim(0);
                centered / var.add_scalar(*eps).sqrt()
            }
            (LayerOp::LayerNorm { eps }, _) => {
                let mean = v.clone().mean_dim(2);
                let centered = v - mean;
                let var = centered.clone().square().mean_dim(2);
                centered / var.add_scalar(*eps).sqrt()
            }
            _ => unreachable!(),
        };
        let y = xhat * l.norm_param(&p[0]) + l.norm_param(&p[1]);
        l.unview(y, b)
    }

    fn forward_taped(
        &self,
        l: &Layer,
        p: &[Tensor<2>],
        x: &Tensor<2>,
        stats: &NormStats,
    ) -> (Tensor<2>, Aux) {
        let b = x.dims()[0];
        let v = l.norm_view(x.clone());
        let (xhat, inv_std) = match (&l.op, stats) {
            (LayerOp::LayerNorm { eps }, _) => {
                let centered = v.clone() - v.mean_dim(2);
                let inv_std = centered
                    .clone()
                    .square()
                    .mean_dim(2)
                    .add_scalar(*eps)
                    .sqrt()
                    .recip();
                (centered * inv_std.clone(), inv_std)
            }
            (LayerOp::BatchNorm { .. }, NormStats::Fixed { mean, inv_std }) => {
                ((v - mean.clone()) * inv_std.clone(), inv_std.clone())
            }
            _ => unreachable!("the energy always fixes batch-norm statistics"),
        };
        let y = xhat.clone() * l.norm_param(&p[0]) + l.norm_param(&p[1]);
        (l.unview(y, b), Aux::Norm { xhat, inv_std })
    }

    fn vjp_input(
        &self,
        l: &Layer,
        p: &[Tensor<2>],
        _: &Tensor<2>,
        aux: &Aux,
        g: Tensor<2>,
    ) -> Tensor<2> {
        let b = g.dims()[0];
        let Aux::Norm { xhat, inv_std } = aux else {
            unreachable!()
        };
        let gx = match l.op {
            // Fixed statistics: the normalisation is affine in x.
            LayerOp::BatchNorm { .. } => l.norm_view(g) * (l.norm_param(&p[0]) * inv_std.clone()),
            _ => {
                let dxhat = l.norm_view(g) * l.norm_param(&p[0]);
                let mean_d = dxhat.clone().mean_dim(2);
                let mean_dx = (dxhat.clone() * xhat.clone()).mean_dim(2);
                (dxhat - mean_d - xhat.clone() * mean_dx) * inv_std.clone()
            }
        };
        l.unview(gx, b)
    }

    fn vjp_params(
        &self,
        l: &Layer,
        p: &[Tensor<2>],
        _: &Tensor<2>,
        aux: &Aux,
        g: &Tensor<2>,
    ) -> Vec<Tensor<2>> {
        let Aux::Norm { xhat, .. } = aux else {
            unreachable!()
        };
        let gv = l.norm_view(g.clone());
        let n = p[0].dims()[1];
        let (gain, bias) = match l.op {
            LayerOp::BatchNorm { .. } => (
                (gv.clone() * xhat.clone()).sum_dim(2).sum_dim(0),
                gv.sum_dim(2).sum_dim(0),
            ),
            _ => ((gv.clone() * xhat.clone()).sum_dim(0), gv.sum_dim(0)),
        };
        vec![gain.reshape([1, n]), bias.reshape([1, n])]
    }
}
