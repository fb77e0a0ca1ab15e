//! Multi-head self-attention `softmax(Q K^T / sqrt(d_h)) V W_o` with `Q = X W_q`, `K = X
//! W_k`, `V = X W_v`, no biases (a state-producing layer on token sequences).

use burn::tensor::activation;

use super::LayerImpl;
use crate::device::Tensor;
use crate::model::layer::{Aux, Layer, LayerOp, NormStats};
use crate::model::network::LayerInit;
use crate::model::{Gemm, ModelError, ParamKind, Shape};

/// Checks the input is a sequence whose width divides by `heads` and adds four
/// Xavier-uniform `d x d` projections (`U(+-sqrt(6 / 2d))`).
pub(crate) fn build(
    init: &mut LayerInit<'_>,
    input: Shape,
    heads: usize,
) -> Result<(LayerOp, Shape), ModelError> {
    let Shape::Seq { d, .. } = input else {
        return Err(init.invalid(&format!(
            " (attention) needs a token sequence, got {input}; add a tokens layer first"
        )));
    };
    if heads == 0 || d % heads != 0 {
        return Err(init.invalid(&format!(
            ": token width {d} does not split into {heads} heads"
        )));
    }
    let name = init.name("attn");
    let bound = (6.0 / (2 * d) as f64).sqrt() as f32;
    for role in ["wq", "wk", "wv", "wo"] {
        let weights = init.uniform(d * d, bound)?;
        init.param(
            format!("{name}.{role}"),
            ParamKind::Matrix {
                fan_in: d,
                fan_out: d,
                out_major: false,
            },
            weights,
            [d, d],
        );
    }
    Ok((LayerOp::Attention { heads }, input))
}

/// [`LayerOp::Attention`].
pub(crate) struct Attention;

/// Heads, tokens and token width.
fn dims(layer: &Layer) -> (usize, usize, usize) {
    let (LayerOp::Attention { heads }, Shape::Seq { t, d }) = (&layer.op, layer.input) else {
        unreachable!()
    };
    (*heads, t, d)
}

/// `[B*T, D]` to `[B, H, T, d_h]`.
fn split_heads(layer: &Layer, t: Tensor<2>, batch: usize) -> Tensor<4> {
    let (heads, tokens, d) = dims(layer);
    t.reshape([batch, tokens, heads, d / heads]).swap_dims(1, 2)
}

/// `[B, H, T, d_h]` to `[B*T, D]`.
fn merge_heads(t: Tensor<4>) -> Tensor<2> {
    let [b, h, tokens, dh] = t.dims();
    t.swap_dims(1, 2).reshape([b * tokens, h * dh])
}

fn scale(layer: &Layer) -> f32 {
    let (heads, _, d) = dims(layer);
    1.0 / ((d / heads) as f32).sqrt()
}

/// The input as `[B*T, D]` rows.
fn rows(layer: &Layer, x: Tensor<2>) -> Tensor<2> {
    let (_, tokens, d) = dims(layer);
    let b = x.dims()[0];
    x.reshape([b * tokens, d])
}

/// Queries, keys, values, attention weights and merged head outputs.
fn forward(
    layer: &Layer,
    p: &[Tensor<2>],
    x: Tensor<2>,
) -> (Tensor<4>, Tensor<4>, Tensor<4>, Tensor<4>, Tensor<2>) {
    let b = x.dims()[0];
    let rows = rows(layer, x);
    let q = split_heads(layer, rows.clone().matmul(p[0].clone()), b);
    let k = split_heads(layer, rows.clone().matmul(p[1].clone()), b);
    let v = split_heads(layer, rows.matmul(p[2].clone()), b);
    let scores = q
        .clone()
        .matmul(k.clone().swap_dims(2, 3))
        .mul_scalar(scale(layer));
    let a = activation::softmax(scores, 3);
    let o = merge_heads(a.clone().matmul(v.clone()));
    (q, k, v, a, o)
}

/// Gradients with respect to the projected queries, keys and values (merged to
/// `[B*T, D]`) and the merged head outputs, given the output gradient.
fn backward(
    layer: &Layer,
    p: &[Tensor<2>],
    aux: &Aux,
    g: &Tensor<2>,
) -> (Tensor<2>, Tensor<2>, Tensor<2>, Tensor<2>) {
    let Aux::Attention { q, k, v, a, o } = aux else {
        unreachable!()
    };
    let b = g.dims()[0];
    let d_o = rows(layer, g.clone()).matmul(p[3].clone().transpose());
    let d_o4 = split_heads(layer, d_o, b);
    let d_a = d_o4.clone().matmul(v.clone().swap_dims(2, 3));
    let d_v = a.clone().swap_dims(2, 3).matmul(d_o4);
    let row_dot = (d_a.clone() * a.clone()).sum_dim(3);
    let d_s = (a.clone() * (d_a - row_dot)).mul_scalar(scale(layer));
    let d_q = d_s.clone().matmul(k.clone());
    let d_k = d_s.swap_dims(2, 3).matmul(q.clone());
    (
        merge_heads(d_q),
        merge_heads(d_k),
        merge_heads(d_v),
        o.clone(),
    )
}

impl LayerImpl for Attention {
    fn apply(&self, layer: &Layer, p: &[Tensor<2>], x: Tensor<2>, _: &NormStats) -> Tensor<2> {
        let b = x.dims()[0];
        let (.., o) = forward(layer, p, x);
        o.matmul(p[3].clone()).reshape([b, layer.output.numel()])
    }

    fn forward_taped(
        &self,
        layer: &Layer,
        p: &[Tensor<2>],
        x: &Tensor<2>,
        _: &NormStats,
    ) -> (Tensor<2>, Aux) {
        let b = x.dims()[0];
        let (q, k, v, a, o) = forward(layer, p, x.clone());
        let y = o
            .clone()
            .matmul(p[3].clone())
            .reshape([b, layer.output.numel()]);
        (y, Aux::Attention { q, k, v, a, o })
    }

    fn vjp_input(
        &self,
        layer: &Layer,
        p: &[Tensor<2>],
        _: &Tensor<2>,
        aux: &Aux,
        g: Tensor<2>,
    ) -> Tensor<2> {
        let b = g.dims()[0];
        let (dq, dk, dv, _) = backward(layer, p, aux, &g);
        let gx = dq.matmul(p[0].clone().transpose())
            + dk.matmul(p[1].clone().transpose())
            + dv.matmul(p[2].clone().transpose());
        gx.reshape([b, layer.input.numel()])
    }

    fn vjp_params(
        &self,
        layer: &Layer,
        p: &[Tensor<2>],
        x: &Tensor<2>,
        aux: &Aux,
        g: &Tensor<2>,
    ) -> Vec<Tensor<2>> {
        let (dq, dk, dv, o) = backward(layer, p, aux, g);
        let rows_t = rows(layer, x.clone()).transpose();
        vec![
            rows_t.clone().matmul(dq),
            rows_t.clone().matmul(dk),
            rows_t.matmul(dv),
            o.transpose().matmul(rows(layer, g.clone())),
        ]
    }

    /// Three projections, the per-head scores and weighted values, the output projection.
    fn gemms(&self, layer: &Layer, batch: usize) -> Vec<Gemm> {
        let (heads, t, d) = dims(layer);
        let dh = d / heads;
        let proj = Gemm {
            m: batch * t,
            k: d,
            n: d,
        };
        let per_head = |k, n| Gemm {
            m: batch * heads * t,
            k,
            n,
        };
        vec![proj, proj, proj, per_head(dh, t), per_head(t, dh), proj]
    }
}
