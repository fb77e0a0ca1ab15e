//! Fully connected layer `y = x W + b`, `W: [inputs, outputs]` (a state-producing layer).

use super::{LayerImpl, from_host};
use crate::device::{Tensor, host_f32, to_host};
use crate::model::kernels::{self, MatRef};
use crate::model::layer::{Aux, Layer, LayerOp, NormStats};
use crate::model::network::LayerInit;
use crate::model::{Gemm, ModelError, ParamKind, Shape};

/// Checks the input is flat and adds the He-uniform weight (`U(+-sqrt(6/inputs))`) and a
/// zero bias.
pub(crate) fn build(
    init: &mut LayerInit<'_>,
    input: Shape,
    outputs: usize,
) -> Result<(LayerOp, Shape), ModelError> {
    let Shape::Flat(inputs) = input else {
        return Err(init.invalid(&format!(
            " (linear) needs a flat input, got {input}; add a flatten layer first"
        )));
    };
    if outputs == 0 {
        return Err(init.invalid(" (linear) needs at least one output"));
    }
    let name = init.name("fc");
    let bound = (6.0 / inputs as f64).sqrt() as f32;
    let weights = init.uniform(inputs * outputs, bound)?;
    init.param(
        format!("{name}.weight"),
        ParamKind::Matrix {
            fan_in: inputs,
            fan_out: outputs,
            out_major: false,
        },
        weights,
        [inputs, outputs],
    );
    init.vector(format!("{name}.bias"), 0.0, outputs)?;
    Ok((LayerOp::Linear { inputs, outputs }, Shape::Flat(outputs)))
}

/// [`LayerOp::Linear`].
pub(crate) struct Linear;

impl LayerImpl for Linear {
    fn apply(&self, _: &Layer, p: &[Tensor<2>], x: Tensor<2>, _: &NormStats) -> Tensor<2> {
        x.matmul(p[0].clone()) + p[1].clone()
    }

    fn vjp_input(
        &self,
        _: &Layer,
        p: &[Tensor<2>],
        _: &Tensor<2>,
        _: &Aux,
        g: Tensor<2>,
    ) -> Tensor<2> {
        g.matmul(p[0].clone().transpose())
    }

    fn vjp_params(
        &self,
        _: &Layer,
        _: &[Tensor<2>],
        x: &Tensor<2>,
        _: &Aux,
        g: &Tensor<2>,
    ) -> Vec<Tensor<2>> {
        let bias = g.clone().sum_dim(0);
        if host_f32(x) && host_f32(g) {
            // `x^T g` on the host kernel, by row panels on the pool's workers.
            let ([n, inputs], outputs) = (x.dims(), g.dims()[1]);
            let (xs, gs) = (to_host(x), to_host(g));
            let gw = kernels::product_by_panels(
                MatRef::new(&xs, n, inputs).t(),
                MatRef::new(&gs, n, outputs),
            );
            return vec![from_host(gw, inputs, outputs, &x.device()), bias];
        }
        vec![x.clone().transpose().matmul(g.clone()), bias]
    }

    fn gemms(&self, layer: &Layer, batch: usize) -> Vec<Gemm> {
        let LayerOp::Linear { inputs, outputs } = layer.op else {
            unreachable!()
        };
        vec![Gemm {
            m: batch,
            k: inputs,
            n: outputs,
        }]
    }
}
