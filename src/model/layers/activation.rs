//! Element-wise activations as layers (the functions themselves are in
//! [`crate::model::Activation`]).

use super::LayerImpl;
use crate::device::Tensor;
use crate::model::layer::{Aux, Layer, LayerOp, NormStats};
use crate::model::network::LayerInit;
use crate::model::{Activation, Shape};

/// An activation keeps its input's shape.
pub(crate) fn build(init: &mut LayerInit<'_>, input: Shape, a: Activation) -> (LayerOp, Shape) {
    init.name(match a {
        Activation::Relu => "relu",
        Activation::LeakyRelu { .. } => "lrelu",
        Activation::Sigmoid => "sigmoid",
        Activation::Tanh => "tanh",
        Activation::HardSigmoid => "hsig",
        Activation::ClippedRelu { .. } => "crelu",
        Activation::Gelu => "gelu",
        Activation::Silu => "silu",
    });
    (LayerOp::Activation(a), input)
}

/// [`LayerOp::Activation`].
pub(crate) struct ActivationLayer;

fn function(layer: &Layer) -> Activation {
    let LayerOp::Activation(a) = layer.op else {
        unreachable!()
    };
    a
}

impl LayerImpl for ActivationLayer {
    fn apply(&self, layer: &Layer, _: &[Tensor<2>], x: Tensor<2>, _: &NormStats) -> Tensor<2> {
        function(layer).apply(x)
    }

    fn vjp_input(
        &self,
        layer: &Layer,
        _: &[Tensor<2>],
        x: &Tensor<2>,
        _: &Aux,
        g: Tensor<2>,
    ) -> Tensor<2> {
        function(layer).vjp(x, g)
    }
}
