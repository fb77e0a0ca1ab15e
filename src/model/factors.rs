//! Per-sample gradient factors of a weight matrix.

use crate::device::Tensor;

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

impl GradFactors {
    /// `inputs^T output_grads`: the gradient summed over the rows (divide by their count
    /// for the mean), on the host kernel when the factors live on the host.
    pub fn gradient(&self) -> Tensor<2> {
        super::layers::linear::outer_sum(&self.inputs, &self.output_grads)
    }
}
