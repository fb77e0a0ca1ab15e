//! Layers that only re-read their input: flatten (image or sequence to a flat vector),
//! tokens (a flat vector to equal tokens) and dropout (the identity here; the network
//! applies its mask in backprop training).

use super::LayerImpl;
use crate::device::Tensor;
use crate::model::layer::{Aux, Layer, LayerOp, NormStats};
use crate::model::network::LayerInit;
use crate::model::{ModelError, Shape};

/// Flatten: any input to `Flat(numel)`.
pub(crate) fn build_flatten(init: &mut LayerInit<'_>, input: Shape) -> (LayerOp, Shape) {
    init.name("flatten");
    (LayerOp::Flatten, Shape::Flat(input.numel()))
}

/// Tokens: a flat input of `n` features to `tokens` tokens of `n / tokens` features.
pub(crate) fn build_tokens(
    init: &mut LayerInit<'_>,
    input: Shape,
    tokens: usize,
) -> Result<(LayerOp, Shape), ModelError> {
    let Shape::Flat(n) = input else {
        return Err(init.invalid(&format!(" (tokens) needs a flat input, got {input}")));
    };
    if tokens == 0 || n % tokens != 0 {
        return Err(init.invalid(&format!(
            ": {n} features do not split into {tokens} equal tokens"
        )));
    }
    init.name("tokens");
    Ok((
        LayerOp::Tokens { tokens },
        Shape::Seq {
            t: tokens,
            d: n / tokens,
        },
    ))
}

/// Dropout with drop probability `p` in `[0, 1)`.
pub(crate) fn build_dropout(
    init: &mut LayerInit<'_>,
    input: Shape,
    p: f32,
) -> Result<(LayerOp, Shape), ModelError> {
    if !(0.0..1.0).contains(&p) {
        return Err(init.invalid(&format!(
            " (dropout) probability must be in [0, 1), got {p}"
        )));
    }
    init.name("dropout");
    Ok((LayerOp::Dropout { p }, input))
}

/// [`LayerOp::Flatten`], [`LayerOp::Tokens`] and [`LayerOp::Dropout`]: the identity on
/// `[batch, features]`.
pub(crate) struct Reshape;

impl LayerImpl for Reshape {
    fn apply(&self, _: &Layer, _: &[Tensor<2>], x: Tensor<2>, _: &NormStats) -> Tensor<2> {
        x
    }

    fn vjp_input(
        &self,
        _: &Layer,
        _: &[Tensor<2>],
        _: &Tensor<2>,
        _: &Aux,
        g: Tensor<2>,
    ) -> Tensor<2> {
        g
    }
}
