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

/// `x^T g` (`[inputs, outputs]`): a linear weight's gradient summed over the rows of its
/// input `x` (`[n, inputs]`) and output signal `g` (`[n, outputs]`), on the host kernel by
/// row panels on the pool's workers when both live on the host in f32.
pub(crate) fn outer_sum(x: &Tensor<2>, g: &Tensor<2>) -> Tensor<2> {
    if host_f32(x) && host_f32(g) {
        let ([n, inputs], outputs) = (x.dims(), g.dims()[1]);
        let (xs, gs) = (to_host(x), to_host(g));
        let gw = kernels::product_by_panels(
            MatRef::new(&xs, n, inputs).t(),
            MatRef::new(&gs, n, outputs),
        );
        return from_host(gw, inputs, outputs, &x.device());
    }
    x.clone().transpose().matmul(g.clone())
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
        layer: &Layer,
        p: &[Tensor<2>],
        x: &Tensor<2>,
        aux: &Aux,
        g: &Tensor<2>,
    ) -> Vec<Tensor<2>> {
        self.vjp_params_except(layer, p, x, aux, g, &[false, false])
            .into_iter()
            .map(|t| t.expect("nothing skipped"))
            .collect()
    }

    fn vjp_params_except(
        &self,
        _: &Layer,
        _: &[Tensor<2>],
        x: &Tensor<2>,
        _: &Aux,
        g: &Tensor<2>,
        skip: &[bool],
    ) -> Vec<Option<Tensor<2>>> {
        let wanted = |k: usize| !skip.get(k).copied().unwrap_or(false);
        vec![
            wanted(0).then(|| outer_sum(x, g)),
            wanted(1).then(|| g.clone().sum_dim(0)),
        ]
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
