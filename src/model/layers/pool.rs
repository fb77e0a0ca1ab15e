//! Max and average pooling over `kernel x kernel` windows (no padding). Max pooling on a
//! plain CPU device runs on the host kernel (argmax recorded, an unrolled 2x2 path).

use std::sync::Arc;

use burn::tensor::module::{avg_pool2d, max_pool2d_with_indices};
use burn::tensor::ops::ModuleOps;

use super::{LayerImpl, float, from_host, on_host, wrap};
use crate::device::{Tensor, into_host, to_host};
use crate::model::kernels::PoolGeometry;
use crate::model::layer::{Aux, Layer, LayerOp, NormStats};
use crate::model::network::LayerInit;
use crate::model::{ModelError, Shape};

/// Checks the window fits the image; `max` picks max pooling, else average.
pub(crate) fn build(
    init: &mut LayerInit<'_>,
    input: Shape,
    kernel: usize,
    stride: usize,
    max: bool,
) -> Result<(LayerOp, Shape), ModelError> {
    let Shape::Image { c, h, w } = input else {
        return Err(init.invalid(&format!(" (pool) needs an image input, got {input}")));
    };
    if kernel == 0 || stride == 0 || kernel > h || kernel > w {
        return Err(init.invalid(&format!(
            ": pooling window {kernel} (stride {stride}) does not fit a {input} input"
        )));
    }
    let out = Shape::Image {
        c,
        h: (h - kernel) / stride + 1,
        w: (w - kernel) / stride + 1,
    };
    Ok(if max {
        init.name("maxpool");
        (LayerOp::MaxPool2d { kernel, stride }, out)
    } else {
        init.name("avgpool");
        (LayerOp::AvgPool2d { kernel, stride }, out)
    })
}

fn window(layer: &Layer) -> (usize, usize) {
    match layer.op {
        LayerOp::MaxPool2d { kernel, stride } | LayerOp::AvgPool2d { kernel, stride } => {
            (kernel, stride)
        }
        _ => unreachable!(),
    }
}

pub(super) fn geometry(layer: &Layer) -> PoolGeometry {
    let (kernel, stride) = window(layer);
    let (
        Shape::Image { c, h, w },
        Shape::Image {
            h: out_h, w: out_w, ..
        },
    ) = (layer.input, layer.output)
    else {
        unreachable!("pooling maps images to images")
    };
    PoolGeometry {
        channels: c,
        in_h: h,
        in_w: w,
        kernel,
        stride,
        out_h,
        out_w,
    }
}

/// Max pooling on the host kernel, with its argmax.
fn host_max(layer: &Layer, x: &Tensor<2>) -> (Tensor<2>, Arc<[u32]>) {
    let (b, device) = (x.dims()[0], x.device());
    let n = layer.output.numel();
    let (mut y, mut idx) = (vec![0.0; b * n], vec![0; b * n]);
    geometry(layer).max_forward(&to_host(x), &mut y, &mut idx);
    (from_host(y, b, n, &device), idx.into())
}

/// [`LayerOp::MaxPool2d`].
pub(crate) struct MaxPool2d;

impl LayerImpl for MaxPool2d {
    fn apply(&self, layer: &Layer, p: &[Tensor<2>], x: Tensor<2>, s: &NormStats) -> Tensor<2> {
        self.forward_taped(layer, p, &x, s).0
    }

    fn forward_taped(
        &self,
        layer: &Layer,
        _: &[Tensor<2>],
        x: &Tensor<2>,
        _: &NormStats,
    ) -> (Tensor<2>, Aux) {
        if on_host(x) {
            let (y, idx) = host_max(layer, x);
            return (y, Aux::HostMaxIndices(idx));
        }
        let (kernel, stride) = window(layer);
        let (y, idx) = max_pool2d_with_indices(
            layer.image(x.clone()),
            [kernel, kernel],
            [stride, stride],
            [0, 0],
            [1, 1],
            false,
        );
        (layer.flat_out(y), Aux::MaxIndices(idx))
    }

    fn vjp_input(
        &self,
        layer: &Layer,
        _: &[Tensor<2>],
        x: &Tensor<2>,
        aux: &Aux,
        g: Tensor<2>,
    ) -> Tensor<2> {
        let b = g.dims()[0];
        match aux {
            Aux::HostMaxIndices(idx) => {
                let device = g.device();
                let mut gx = vec![0.0; b * layer.input.numel()];
                geometry(layer).max_backward(idx, &into_host(g), &mut gx);
                from_host(gx, b, layer.input.numel(), &device)
            }
            Aux::MaxIndices(idx) => {
                let (kernel, stride) = window(layer);
                let gx = crate::device::Backend::max_pool2d_with_indices_backward(
                    float(layer.image(x.clone())),
                    [kernel, kernel],
                    [stride, stride],
                    [0, 0],
                    [1, 1],
                    false,
                    float(layer.out_image(g)),
                    idx.clone().into_primitive(),
                );
                wrap(gx.x_grad).reshape([b, layer.input.numel()])
            }
            _ => unreachable!("max pooling's backward needs its argmax"),
        }
    }
}

/// [`LayerOp::AvgPool2d`].
pub(crate) struct AvgPool2d;

impl LayerImpl for AvgPool2d {
    fn apply(&self, layer: &Layer, _: &[Tensor<2>], x: Tensor<2>, _: &NormStats) -> Tensor<2> {
        let (kernel, stride) = window(layer);
        let y = avg_pool2d(
            layer.image(x),
            [kernel, kernel],
            [stride, stride],
            [0, 0],
            true,
            false,
        );
        layer.flat_out(y)
    }

    fn vjp_input(
        &self,
        layer: &Layer,
        _: &[Tensor<2>],
        x: &Tensor<2>,
        _: &Aux,
        g: Tensor<2>,
    ) -> Tensor<2> {
        let b = g.dims()[0];
        let (kernel, stride) = window(layer);
        let gx = crate::device::Backend::avg_pool2d_backward(
            float(layer.image(x.clone())),
            float(layer.out_image(g)),
            [kernel, kernel],
            [stride, stride],
            [0, 0],
            true,
            false,
        );
        wrap(gx).reshape([b, layer.input.numel()])
    }
}
