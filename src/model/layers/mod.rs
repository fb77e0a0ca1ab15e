//! One file per kind of layer: how it is built from its declaration (shape check,
//! parameters and their initialisation), its differentiable forward pass, its taped
//! forward pass, both vector-Jacobian products and its matrix products. [`Layer`]'s
//! methods dispatch to them through one match ([`implementation`]); adding a layer is one
//! file here, one [`LayerOp`] variant, one arm there and one in the builder.

pub(crate) mod activation;
pub(crate) mod attention;
pub(crate) mod conv;
pub(crate) mod linear;
pub(crate) mod norm;
pub(crate) mod pool;
pub(crate) mod reshape;

use burn::tensor::ops::FloatTensor;
use burn::tensor::{TensorData, TensorPrimitive};

use super::layer::{Aux, Layer, LayerOp, NormStats};
use super::{Gemm, Shape};
use crate::device::{Backend, Device, Tensor};

/// What every layer does, on `[batch, features]` tensors read through the layer's shapes.
pub(crate) trait LayerImpl: Sync {
    /// The forward pass from differentiable burn ops only (works on autodiff tensors).
    fn apply(&self, layer: &Layer, p: &[Tensor<2>], x: Tensor<2>, stats: &NormStats) -> Tensor<2>;

    /// The forward pass on plain tensors with what the backward needs (default: nothing).
    fn forward_taped(
        &self,
        layer: &Layer,
        p: &[Tensor<2>],
        x: &Tensor<2>,
        stats: &NormStats,
    ) -> (Tensor<2>, Aux) {
        (self.apply(layer, p, x.clone(), stats), Aux::None)
    }

    /// `g^T dy/dx` per sample.
    fn vjp_input(
        &self,
        layer: &Layer,
        p: &[Tensor<2>],
        x: &Tensor<2>,
        aux: &Aux,
        g: Tensor<2>,
    ) -> Tensor<2>;

    /// `g^T dy/dtheta` summed over the batch, one tensor per parameter (default: none).
    fn vjp_params(
        &self,
        _layer: &Layer,
        _p: &[Tensor<2>],
        _x: &Tensor<2>,
        _aux: &Aux,
        _g: &Tensor<2>,
    ) -> Vec<Tensor<2>> {
        Vec::new()
    }

    /// [`LayerImpl::vjp_params`] without the parameters marked in `skip` (indexed like
    /// the layer's parameters; missing entries: not skipped), which come back `None` and,
    /// where the layer can, are not computed at all (default: all computed, then dropped).
    fn vjp_params_except(
        &self,
        layer: &Layer,
        p: &[Tensor<2>],
        x: &Tensor<2>,
        aux: &Aux,
        g: &Tensor<2>,
        skip: &[bool],
    ) -> Vec<Option<Tensor<2>>> {
        self.vjp_params(layer, p, x, aux, g)
            .into_iter()
            .enumerate()
            .map(|(k, t)| (!skip.get(k).copied().unwrap_or(false)).then_some(t))
            .collect()
    }

    /// The forward pass's matrix products on `batch` samples (default: none).
    fn gemms(&self, _layer: &Layer, _batch: usize) -> Vec<Gemm> {
        Vec::new()
    }
}

/// The implementation of `op`.
pub(crate) fn implementation(op: &LayerOp) -> &'static dyn LayerImpl {
    match op {
        LayerOp::Linear { .. } => &linear::Linear,
        LayerOp::Conv2d { .. } => &conv::Conv2d,
        LayerOp::Activation(_) => &activation::ActivationLayer,
        LayerOp::MaxPool2d { .. } => &pool::MaxPool2d,
        LayerOp::AvgPool2d { .. } => &pool::AvgPool2d,
        LayerOp::Flatten | LayerOp::Tokens { .. } | LayerOp::Dropout { .. } => &reshape::Reshape,
        LayerOp::LayerNorm { .. } | LayerOp::BatchNorm { .. } => &norm::Norm,
        LayerOp::Attention { .. } => &attention::Attention,
    }
}

pub(super) fn float(t: Tensor<4>) -> FloatTensor<Backend> {
    t.into_primitive().tensor()
}

pub(super) fn wrap(t: FloatTensor<Backend>) -> Tensor<4> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// Whether `t` lives on a plain CPU device, where convolution and pooling run on the
/// host kernels of [`super::kernels`] (autodiff and GPU tensors use burn's ops).
pub(super) fn on_host(t: &Tensor<2>) -> bool {
    crate::device::is_host(&t.device())
}

/// A `[rows, cols]` tensor on `device` from host values.
pub(super) fn from_host(values: Vec<f32>, rows: usize, cols: usize, device: &Device) -> Tensor<2> {
    Tensor::from_data(TensorData::new(values, [rows, cols]), device)
}

impl Layer {
    /// A convolution's sizes on its input (`None` for other layers).
    pub(crate) fn conv_geometry(&self) -> Option<crate::model::kernels::ConvGeometry> {
        matches!(self.op, crate::model::layer::LayerOp::Conv2d { .. }).then(|| conv::geometry(self))
    }

    /// A max pooling's sizes on its input (`None` for other layers).
    pub(crate) fn max_pool_geometry(&self) -> Option<crate::model::kernels::PoolGeometry> {
        matches!(self.op, crate::model::layer::LayerOp::MaxPool2d { .. })
            .then(|| pool::geometry(self))
    }

    /// The input as `[batch, c, h, w]`.
    pub(super) fn image(&self, x: Tensor<2>) -> Tensor<4> {
        let Shape::Image { c, h, w } = self.input else {
            unreachable!("image layers are only built on image inputs")
        };
        let b = x.dims()[0];
        x.reshape([b, c, h, w])
    }

    /// An output image as `[batch, features]`.
    pub(super) fn flat_out(&self, y: Tensor<4>) -> Tensor<2> {
        let b = y.dims()[0];
        y.reshape([b, self.output.numel()])
    }

    /// The output gradient as `[batch, c, h, w]`.
    pub(super) fn out_image(&self, g: Tensor<2>) -> Tensor<4> {
        let Shape::Image { c, h, w } = self.output else {
            unreachable!("image layers map images to images")
        };
        let b = g.dims()[0];
        g.reshape([b, c, h, w])
    }
}
