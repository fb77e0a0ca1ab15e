//! 2-D convolution with kernel `[out, in * k * k]` (flattened, out-major) and bias
//! `[1, out]` (a state-producing layer). On a plain CPU device it runs on the host im2col
//! kernels of [`crate::model::kernels`]; autodiff and GPU tensors use burn's ops.

use burn::tensor::module::conv2d;
use burn::tensor::ops::{ConvOptions, ModuleOps};

use super::{LayerImpl, float, from_host, on_host, wrap};
use crate::device::{Backend, Device, Tensor, into_host, to_host};
use crate::model::kernels::ConvGeometry;
use crate::model::layer::{Aux, Layer, LayerOp, NormStats};
use crate::model::network::LayerInit;
use crate::model::{Gemm, ModelError, ParamKind, Shape};

/// Checks the input is an image the kernel fits (with padding) and adds the He-uniform
/// kernel (`U(+-sqrt(6 / (in k k)))`) and a zero bias.
pub(crate) fn build(
    init: &mut LayerInit<'_>,
    input: Shape,
    channels: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
) -> Result<(LayerOp, Shape), ModelError> {
    let Shape::Image { c, h, w } = input else {
        return Err(init.invalid(&format!(" (conv) needs an image input, got {input}")));
    };
    if channels == 0 || kernel == 0 || stride == 0 {
        return Err(init.invalid(" (conv): channels, kernel and stride must be positive"));
    }
    if h + 2 * padding < kernel || w + 2 * padding < kernel {
        return Err(init.invalid(&format!(
            ": kernel {kernel} does not fit a {input} input with padding {padding}"
        )));
    }
    let out = Shape::Image {
        c: channels,
        h: (h + 2 * padding - kernel) / stride + 1,
        w: (w + 2 * padding - kernel) / stride + 1,
    };
    let name = init.name("conv");
    let fan_in = c * kernel * kernel;
    let bound = (6.0 / fan_in as f64).sqrt() as f32;
    let weights = init.uniform(fan_in * channels, bound)?;
    init.param(
        format!("{name}.weight"),
        ParamKind::Matrix {
            fan_in,
            fan_out: channels,
            out_major: true,
        },
        weights,
        [channels, fan_in],
    );
    init.vector(format!("{name}.bias"), 0.0, channels)?;
    let op = LayerOp::Conv2d {
        in_channels: c,
        out_channels: channels,
        kernel,
        stride,
        padding,
    };
    Ok((op, out))
}

/// [`LayerOp::Conv2d`].
pub(crate) struct Conv2d;

fn options(layer: &Layer) -> ConvOptions<2> {
    let LayerOp::Conv2d {
        stride, padding, ..
    } = layer.op
    else {
        unreachable!()
    };
    ConvOptions::new([stride, stride], [padding, padding], [1, 1], 1)
}

pub(super) fn geometry(layer: &Layer) -> ConvGeometry {
    let (
        LayerOp::Conv2d {
            in_channels,
            out_channels,
            kernel,
            stride,
            padding,
        },
        Shape::Image { h, w, .. },
        Shape::Image {
            h: out_h, w: out_w, ..
        },
    ) = (&layer.op, layer.input, layer.output)
    else {
        unreachable!("convolutions map images to images")
    };
    ConvGeometry {
        in_channels: *in_channels,
        in_h: h,
        in_w: w,
        out_channels: *out_channels,
        kernel: *kernel,
        stride: *stride,
        padding: *padding,
        out_h,
        out_w,
    }
}

/// The kernel as `[out, in, k, k]`.
fn weight(layer: &Layer, p: &[Tensor<2>]) -> Tensor<4> {
    let LayerOp::Conv2d {
        in_channels,
        out_channels,
        kernel,
        ..
    } = layer.op
    else {
        unreachable!()
    };
    p[0].clone()
        .reshape([out_channels, in_channels, kernel, kernel])
}

/// The convolution of host values `x` (`b` samples) on the host kernel.
fn host_forward(layer: &Layer, p: &[Tensor<2>], x: &[f32], b: usize, device: &Device) -> Tensor<2> {
    let geo = geometry(layer);
    let mut y = vec![0.0; b * geo.out_len()];
    geo.forward(x, &to_host(&p[0]), &to_host(&p[1]), &mut y);
    from_host(y, b, geo.out_len(), device)
}

impl LayerImpl for Conv2d {
    fn apply(&self, layer: &Layer, p: &[Tensor<2>], x: Tensor<2>, _: &NormStats) -> Tensor<2> {
        let (b, device) = (x.dims()[0], x.device());
        if on_host(&x) {
            return host_forward(layer, p, &into_host(x), b, &device);
        }
        let bias = p[1].clone().reshape([p[1].dims()[1]]);
        let y = conv2d(layer.image(x), weight(layer, p), Some(bias), options(layer));
        layer.flat_out(y)
    }

    fn forward_taped(
        &self,
        layer: &Layer,
        p: &[Tensor<2>],
        x: &Tensor<2>,
        stats: &NormStats,
    ) -> (Tensor<2>, Aux) {
        // The tape keeps `x`, so it is read with one copy (moving a shared tensor's values
        // out copies them three times; see `crate::device::to_host`).
        if on_host(x) {
            let (b, device) = (x.dims()[0], x.device());
            return (host_forward(layer, p, &to_host(x), b, &device), Aux::None);
        }
        (self.apply(layer, p, x.clone(), stats), Aux::None)
    }

    fn vjp_input(
        &self,
        layer: &Layer,
        p: &[Tensor<2>],
        x: &Tensor<2>,
        _: &Aux,
        g: Tensor<2>,
    ) -> Tensor<2> {
        let b = g.dims()[0];
        if on_host(&g) {
            let device = g.device();
            let geo = geometry(layer);
            let mut gx = vec![0.0; b * geo.in_len()];
            geo.input_vjp(&to_host(&p[0]), &into_host(g), &mut gx);
            return from_host(gx, b, geo.in_len(), &device);
        }
        let gx = Backend::conv2d_x_backward(
            float(layer.image(x.clone())),
            float(weight(layer, p)),
            float(layer.out_image(g)),
            options(layer),
        );
        wrap(gx).reshape([b, layer.input.numel()])
    }

    fn vjp_params(
        &self,
        layer: &Layer,
        p: &[Tensor<2>],
        x: &Tensor<2>,
        _: &Aux,
        g: &Tensor<2>,
    ) -> Vec<Tensor<2>> {
        let b = g.dims()[0];
        let out = p[1].dims()[1];
        if on_host(g) {
            let device = g.device();
            let geo = geometry(layer);
            let mut gw = vec![0.0; geo.out_channels * geo.patch_len()];
            let mut gb = vec![0.0; out];
            geo.param_vjp(&to_host(x), &to_host(g), &mut gw, &mut gb);
            return vec![
                from_host(gw, geo.out_channels, geo.patch_len(), &device),
                from_host(gb, 1, out, &device),
            ];
        }
        let gw = Backend::conv2d_weight_backward(
            float(layer.image(x.clone())),
            float(weight(layer, p)),
            float(layer.out_image(g.clone())),
            options(layer),
        );
        let gw = wrap(gw).reshape(p[0].dims());
        let gb = g
            .clone()
            .reshape([b, out, layer.output.numel() / out])
            .sum_dim(2)
            .sum_dim(0)
            .reshape([1, out]);
        vec![gw, gb]
    }

    /// The im2col product: `batch * out_h * out_w` rows of `in * k * k` by `out`.
    fn gemms(&self, layer: &Layer, batch: usize) -> Vec<Gemm> {
        let geo = geometry(layer);
        vec![Gemm {
            m: batch * geo.out_h * geo.out_w,
            k: geo.patch_len(),
            n: geo.out_channels,
        }]
    }
}
