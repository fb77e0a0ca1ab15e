//! Per-sample gradient factors of a weight matrix.

use crate::device::Tensor;
use crate::model::kernels::MatRef;

/// Per-sample factors of a weight matrix's gradient: `grad = inputs^T output_grads / N`
/// (`inputs` `[N, fan_in]`, `output_grads` `[N, fan_out]`), from which curvature
/// estimates such as the empirical Fisher are computed.
#[derive(Debug, Clone)]
pub struct GradFactors {
    /// The layer's input activity, one row per sample.
    pub inputs: Tensor<2>,
    /// The signal at the layer's output, one row per sample (backprop: `dL/dh`; EP: the
    /// nudged prediction error over beta).
    pub output_grads: Tensor<2>,
}

/// How an estimate leaves a parameter's gradient to the per-sample factors of a linear
/// layer ([`crate::estimate::Estimate::factored`]); the mean over the batch's samples is
/// formed on the host by the same arithmetic whether one process or many multiply it out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Factored {
    /// A linear weight: `inputs^T output_grads / N` of its own factors.
    Weight,
    /// A linear bias: the column means of `output_grads` of the weight at this index.
    BiasOf(usize),
}

/// Rows `rows` of `a^T g / total` (`a`: `[n, inputs]`, `g`: `[n, outputs]`, row-major),
/// appended to `out`: each value one product over the `n` samples in order, by panels on
/// the pool's workers, written in place.
pub(crate) fn weight_rows(
    a: &[f32],
    g: &[f32],
    inputs: usize,
    rows: std::ops::Range<usize>,
    total: f32,
    out: &mut Vec<f32>,
) {
    let n = a.len() / inputs.max(1);
    let outputs = g.len() / n.max(1);
    let start = out.len();
    crate::model::kernels::append_product(
        MatRef::new(a, n, inputs)
            .t()
            .sub_rows(rows.start, rows.len()),
        MatRef::new(g, n, outputs),
        out,
    );
    for v in &mut out[start..] {
        *v /= total;
    }
}

/// The column sums of `g` (`[n, outputs]`, row-major), summed over the samples in order,
/// over `total`.
pub(crate) fn column_means(g: &[f32], outputs: usize, total: f32) -> Vec<f32> {
    let mut sum = vec![0f32; outputs];
    for row in g.chunks_exact(outputs.max(1)) {
        crate::simd::add_assign(&mut sum, row);
    }
    sum.iter().map(|v| v / total).collect()
}
