//! Layers: forward passes and analytic vector-Jacobian products.
//!
//! Every value is a `[batch, features]` matrix read through the layer's input [`Shape`].
//! A layer offers three operations on plain (non-autodiff) tensors — a forward pass that
//! records what its backward needs ([`Aux`]), the vector-Jacobian product with respect to
//! its input, and the one with respect to its parameters (summed over the batch) — plus a
//! forward pass made only of differentiable burn ops ([`Layer::apply`]), used by backprop
//! and by the autodiff reference path of the energy.

use burn::tensor::module::{avg_pool2d, conv2d, max_pool2d_with_indices};
use burn::tensor::ops::{ConvOptions, FloatTensor, ModuleOps};
use burn::tensor::{Int, TensorData, TensorPrimitive, activation};
use std::sync::Arc;

use super::kernels::{ConvGeometry, PoolGeometry};
use super::{Activation, Shape};
use crate::device::{Backend, Device, Tensor, into_host};

/// What a layer computes, with its sizes resolved.
#[derive(Debug, Clone, PartialEq)]
pub enum LayerOp {
    /// `x W + b` with `W: [inputs, outputs]`, `b: [1, outputs]` (a state-producing layer).
    Linear {
        /// Input width.
        inputs: usize,
        /// Output width.
        outputs: usize,
    },
    /// 2-D convolution with kernel `[out, in * k * k]` (flattened) and bias `[1, out]`
    /// (a state-producing layer).
    Conv2d {
        /// Input channels.
        in_channels: usize,
        /// Output channels.
        out_channels: usize,
        /// Square kernel size.
        kernel: usize,
        /// Stride.
        stride: usize,
        /// Zero padding on every side.
        padding: usize,
    },
    /// An element-wise activation.
    Activation(Activation),
    /// Max pooling over `kernel x kernel` windows.
    MaxPool2d {
        /// Window size.
        kernel: usize,
        /// Stride.
        stride: usize,
    },
    /// Average pooling over `kernel x kernel` windows.
    AvgPool2d {
        /// Window size.
        kernel: usize,
        /// Stride.
        stride: usize,
    },
    /// An image or sequence read as a flat vector (no data movement).
    Flatten,
    /// A flat vector read as `tokens` tokens (no data movement).
    Tokens {
        /// Number of tokens.
        tokens: usize,
    },
    /// Layer normalisation with gain and bias: over all features of a sample, or over each
    /// token's features for a sequence.
    LayerNorm {
        /// Variance floor.
        eps: f32,
    },
    /// Batch normalisation with gain and bias, per feature (flat), per channel (image) or
    /// per token feature (sequence).
    BatchNorm {
        /// Variance floor.
        eps: f32,
        /// Weight of the new batch in the running statistics.
        momentum: f32,
        /// Index of this layer's running statistics in the network.
        slot: usize,
    },
    /// Dropout with drop probability `p` (identity except in backprop training).
    Dropout {
        /// Drop probability.
        p: f32,
    },
    /// Multi-head self-attention `softmax(Q K^T / sqrt(d_h)) V W_o` with `Q = X W_q` etc.,
    /// no biases (a state-producing layer).
    Attention {
        /// Number of heads.
        heads: usize,
    },
}

/// One layer of a network, with its input and output shapes and parameter slots.
#[derive(Debug, Clone, PartialEq)]
pub struct Layer {
    /// What it computes.
    pub op: LayerOp,
    /// Display name, unique in the network (`fc1`, `conv2`, `relu3`, ...).
    pub name: String,
    /// Per-sample input shape.
    pub input: Shape,
    /// Per-sample output shape.
    pub output: Shape,
    /// Index of its first parameter in the network's parameter list.
    pub first_param: usize,
    /// Number of parameter tensors.
    pub num_params: usize,
}

/// How a batch-norm layer normalises.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // one per layer per batch
pub enum NormStats {
    /// With these per-channel statistics, held constant (`mean`, `inv_std`, both `[1, C, 1]`).
    Fixed {
        /// Mean per channel.
        mean: Tensor<3>,
        /// `1 / sqrt(var + eps)` per channel.
        inv_std: Tensor<3>,
    },
    /// With the statistics of the batch itself (differentiable, as in backprop training).
    Batch,
}

/// What a layer's backward needs from its forward, beyond its input.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // one per layer and settle step; boxing would allocate
pub enum Aux {
    /// Nothing more.
    None,
    /// Max-pooling argmax indices.
    MaxIndices(burn::tensor::Tensor<Backend, 4, Int>),
    /// Max-pooling argmax indices of the host kernel (in-plane index per output value).
    HostMaxIndices(Arc<[u32]>),
    /// Normalised input and `1/std` (layer norm: per row of the norm view; batch norm:
    /// per channel).
    Norm {
        /// Normalised input in the layer's norm view.
        xhat: Tensor<3>,
        /// Inverse standard deviation.
        inv_std: Tensor<3>,
    },
    /// Attention intermediates: heads `[B, H, T, d_h]` of Q, K, V, the attention
    /// weights `[B, H, T, T]` and the merged head outputs `[B*T, D]`.
    Attention {
        /// Queries.
        q: Tensor<4>,
        /// Keys.
        k: Tensor<4>,
        /// Values.
        v: Tensor<4>,
        /// Attention weights.
        a: Tensor<4>,
        /// Merged outputs before `W_o`.
        o: Tensor<2>,
    },
}

fn float(t: Tensor<4>) -> FloatTensor<Backend> {
    t.into_primitive().tensor()
}

fn wrap(t: FloatTensor<Backend>) -> Tensor<4> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// Whether `t` lives on a plain CPU device, where convolution and pooling run on the
/// host kernels of [`super::kernels`] (autodiff and GPU tensors use burn's ops).
fn on_host(t: &Tensor<2>) -> bool {
    crate::device::is_host(&t.device())
}

/// A `[rows, cols]` tensor on `device` from host values.
fn from_host(values: Vec<f32>, rows: usize, cols: usize, device: &Device) -> Tensor<2> {
    Tensor::from_data(TensorData::new(values, [rows, cols]), device)
}

impl Layer {
    /// Whether the layer's output is an EP state (linear, convolution, attention).
    pub fn is_state(&self) -> bool {
        matches!(
            self.op,
            LayerOp::Linear { .. } | LayerOp::Conv2d { .. } | LayerOp::Attention { .. }
        )
    }

    /// The parameters of this layer in the network's list.
    pub fn params<'a>(&self, all: &'a [Tensor<2>]) -> &'a [Tensor<2>] {
        &all[self.first_param..self.first_param + self.num_params]
    }

    fn image(&self, x: Tensor<2>) -> Tensor<4> {
        let Shape::Image { c, h, w } = self.input else {
            unreachable!("image layers are only built on image inputs")
        };
        let b = x.dims()[0];
        x.reshape([b, c, h, w])
    }

    fn flat_out(&self, y: Tensor<4>) -> Tensor<2> {
        let b = y.dims()[0];
        y.reshape([b, self.output.numel()])
    }

    fn conv_options(&self) -> ConvOptions<2> {
        let LayerOp::Conv2d {
            stride, padding, ..
        } = self.op
        else {
            unreachable!()
        };
        ConvOptions::new([stride, stride], [padding, padding], [1, 1], 1)
    }

    fn conv_geometry(&self) -> ConvGeometry {
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
        ) = (&self.op, self.input, self.output)
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

    fn pool_geometry(&self) -> PoolGeometry {
        let (
            LayerOp::MaxPool2d { kernel, stride },
            Shape::Image { c, h, w },
            Shape::Image {
                h: out_h, w: out_w, ..
            },
        ) = (&self.op, self.input, self.output)
        else {
            unreachable!("max pooling maps images to images")
        };
        PoolGeometry {
            channels: c,
            in_h: h,
            in_w: w,
            kernel: *kernel,
            stride: *stride,
            out_h,
            out_w,
        }
    }

    /// Convolution on the host kernel.
    fn host_conv(&self, p: &[Tensor<2>], x: Tensor<2>) -> Tensor<2> {
        let (b, device) = (x.dims()[0], x.device());
        let geo = self.conv_geometry();
        let mut y = vec![0.0; b * geo.out_len()];
        geo.forward(
            &into_host(x),
            &into_host(p[0].clone()),
            &into_host(p[1].clone()),
            &mut y,
        );
        from_host(y, b, geo.out_len(), &device)
    }

    /// Max pooling on the host kernel, with its argmax.
    fn host_max_pool(&self, x: Tensor<2>) -> (Tensor<2>, Arc<[u32]>) {
        let (b, device) = (x.dims()[0], x.device());
        let n = self.output.numel();
        let (mut y, mut idx) = (vec![0.0; b * n], vec![0; b * n]);
        self.pool_geometry()
            .max_forward(&into_host(x), &mut y, &mut idx);
        (from_host(y, b, n, &device), idx.into())
    }

    fn conv_weight(&self, p: &[Tensor<2>]) -> Tensor<4> {
        let LayerOp::Conv2d {
            in_channels,
            out_channels,
            kernel,
            ..
        } = self.op
        else {
            unreachable!()
        };
        p[0].clone()
            .reshape([out_channels, in_channels, kernel, kernel])
    }

    /// The view a normalisation layer works in: `[rows, channels, spread]`.
    fn norm_view(&self, x: Tensor<2>) -> Tensor<3> {
        let b = x.dims()[0];
        match (&self.op, self.input) {
            (LayerOp::BatchNorm { .. }, Shape::Image { c, h, w }) => x.reshape([b, c, h * w]),
            (LayerOp::BatchNorm { .. }, Shape::Seq { t, d }) => x.reshape([b * t, d, 1]),
            (LayerOp::BatchNorm { .. }, Shape::Flat(n)) => x.reshape([b, n, 1]),
            (_, Shape::Seq { t, d }) => x.reshape([b * t, 1, d]),
            (_, s) => x.reshape([b, 1, s.numel()]),
        }
    }

    /// Gain or bias of a normalisation layer in its view's broadcast shape.
    fn norm_param(&self, p: &Tensor<2>) -> Tensor<3> {
        let n = p.dims()[1];
        match self.op {
            LayerOp::BatchNorm { .. } => p.clone().reshape([1, n, 1]),
            _ => p.clone().reshape([1, 1, n]),
        }
    }

    fn unview(&self, x: Tensor<3>, batch: usize) -> Tensor<2> {
        x.reshape([batch, self.input.numel()])
    }

    /// Batch statistics (`mean`, biased `var`) of a batch-norm input, each `[1, C, 1]`.
    pub fn batch_moments(&self, x: &Tensor<2>) -> (Tensor<3>, Tensor<3>) {
        let v = self.norm_view(x.clone());
        let mean = v.clone().mean_dim(2).mean_dim(0);
        let var = (v - mean.clone()).square().mean_dim(2).mean_dim(0);
        (mean, var)
    }

    fn attention_heads(&self, t: Tensor<2>, batch: usize) -> Tensor<4> {
        let (LayerOp::Attention { heads }, Shape::Seq { t: tokens, d }) = (&self.op, self.input)
        else {
            unreachable!()
        };
        t.reshape([batch, tokens, *heads, d / heads])
            .swap_dims(1, 2)
    }

    fn merge_heads(&self, t: Tensor<4>) -> Tensor<2> {
        let [b, h, tokens, dh] = t.dims();
        t.swap_dims(1, 2).reshape([b * tokens, h * dh])
    }

    fn attention_scale(&self) -> f32 {
        let (LayerOp::Attention { heads }, Shape::Seq { d, .. }) = (&self.op, self.input) else {
            unreachable!()
        };
        1.0 / ((d / heads) as f32).sqrt()
    }

    /// The forward pass built only from differentiable burn ops (works on autodiff
    /// tensors). Dropout is the identity here: the network applies its mask.
    pub fn apply(&self, p: &[Tensor<2>], x: Tensor<2>, stats: &NormStats) -> Tensor<2> {
        let b = x.dims()[0];
        match &self.op {
            LayerOp::Linear { .. } => x.matmul(p[0].clone()) + p[1].clone(),
            LayerOp::Conv2d { .. } if on_host(&x) => self.host_conv(p, x),
            LayerOp::Conv2d { out_channels, .. } => {
                let bias = p[1].clone().reshape([*out_channels]);
                let y = conv2d(
                    self.image(x),
                    self.conv_weight(p),
                    Some(bias),
                    self.conv_options(),
                );
                self.flat_out(y)
            }
            LayerOp::Activation(a) => a.apply(x),
            LayerOp::MaxPool2d { .. } if on_host(&x) => self.host_max_pool(x).0,
            LayerOp::MaxPool2d { kernel, stride } => {
                let (y, _) = max_pool2d_with_indices(
                    self.image(x),
                    [*kernel, *kernel],
                    [*stride, *stride],
                    [0, 0],
                    [1, 1],
                    false,
                );
                self.flat_out(y)
            }
            LayerOp::AvgPool2d { kernel, stride } => {
                let y = avg_pool2d(
                    self.image(x),
                    [*kernel, *kernel],
                    [*stride, *stride],
                    [0, 0],
                    true,
                    false,
                );
                self.flat_out(y)
            }
            LayerOp::Flatten | LayerOp::Tokens { .. } | LayerOp::Dropout { .. } => x,
            LayerOp::LayerNorm { eps } => {
                let v = self.norm_view(x);
                let mean = v.clone().mean_dim(2);
                let centered = v - mean;
                let var = centered.clone().square().mean_dim(2);
                let xhat = centered / var.add_scalar(*eps).sqrt();
                let y = xhat * self.norm_param(&p[0]) + self.norm_param(&p[1]);
                self.unview(y, b)
            }
            LayerOp::BatchNorm { eps, .. } => {
                let v = self.norm_view(x.clone());
                let xhat = match stats {
                    NormStats::Fixed { mean, inv_std } => (v - mean.clone()) * inv_std.clone(),
                    NormStats::Batch => {
                        let mean = v.clone().mean_dim(2).mean_dim(0);
                        let centered = v - mean;
                        let var = centered.clone().square().mean_dim(2).mean_dim(0);
                        centered / var.add_scalar(*eps).sqrt()
                    }
                };
                let y = xhat * self.norm_param(&p[0]) + self.norm_param(&p[1]);
                self.unview(y, b)
            }
            LayerOp::Attention { .. } => {
                let Shape::Seq { d, .. } = self.input else {
                    unreachable!()
                };
                let rows = x.reshape([b * self.input.numel() / d, d]);
                let q = self.attention_heads(rows.clone().matmul(p[0].clone()), b);
                let k = self.attention_heads(rows.clone().matmul(p[1].clone()), b);
                let v = self.attention_heads(rows.matmul(p[2].clone()), b);
                let scores = q
                    .matmul(k.swap_dims(2, 3))
                    .mul_scalar(self.attention_scale());
                let a = activation::softmax(scores, 3);
                let o = self.merge_heads(a.matmul(v));
                o.matmul(p[3].clone()).reshape([b, self.output.numel()])
            }
        }
    }

    /// The forward pass on plain tensors, returning what the backward needs. Batch norm
    /// uses `stats`, which must be [`NormStats::Fixed`] here.
    pub(crate) fn forward_taped(
        &self,
        p: &[Tensor<2>],
        x: &Tensor<2>,
        stats: &NormStats,
    ) -> (Tensor<2>, Aux) {
        let b = x.dims()[0];
        match &self.op {
            LayerOp::MaxPool2d { .. } if on_host(x) => {
                let (y, idx) = self.host_max_pool(x.clone());
                (y, Aux::HostMaxIndices(idx))
            }
            LayerOp::MaxPool2d { kernel, stride } => {
                let (y, idx) = max_pool2d_with_indices(
                    self.image(x.clone()),
                    [*kernel, *kernel],
                    [*stride, *stride],
                    [0, 0],
                    [1, 1],
                    false,
                );
                (self.flat_out(y), Aux::MaxIndices(idx))
            }
            LayerOp::LayerNorm { eps } => {
                let v = self.norm_view(x.clone());
                let mean = v.clone().mean_dim(2);
                let centered = v - mean;
                let inv_std = centered
                    .clone()
                    .square()
                    .mean_dim(2)
                    .add_scalar(*eps)
                    .sqrt()
                    .recip();
                let xhat = centered * inv_std.clone();
                let y = xhat.clone() * self.norm_param(&p[0]) + self.norm_param(&p[1]);
                (self.unview(y, b), Aux::Norm { xhat, inv_std })
            }
            LayerOp::BatchNorm { .. } => {
                let NormStats::Fixed { mean, inv_std } = stats else {
                    unreachable!("the energy always fixes batch-norm statistics")
                };
                let xhat = (self.norm_view(x.clone()) - mean.clone()) * inv_std.clone();
                let y = xhat.clone() * self.norm_param(&p[0]) + self.norm_param(&p[1]);
                (
                    self.unview(y, b),
                    Aux::Norm {
                        xhat,
                        inv_std: inv_std.clone(),
                    },
                )
            }
            LayerOp::Attention { .. } => {
                let Shape::Seq { d, .. } = self.input else {
                    unreachable!()
                };
                let rows = x.clone().reshape([b * self.input.numel() / d, d]);
                let q = self.attention_heads(rows.clone().matmul(p[0].clone()), b);
                let k = self.attention_heads(rows.clone().matmul(p[1].clone()), b);
                let v = self.attention_heads(rows.matmul(p[2].clone()), b);
                let scores = q
                    .clone()
                    .matmul(k.clone().swap_dims(2, 3))
                    .mul_scalar(self.attention_scale());
                let a = activation::softmax(scores, 3);
                let o = self.merge_heads(a.clone().matmul(v.clone()));
                let y = o
                    .clone()
                    .matmul(p[3].clone())
                    .reshape([b, self.output.numel()]);
                (y, Aux::Attention { q, k, v, a, o })
            }
            _ => (self.apply(p, x.clone(), stats), Aux::None),
        }
    }

    /// Attention: gradients with respect to the projected queries, keys and values (merged
    /// to `[B*T, D]`) and the merged head outputs, given the output gradient.
    fn attention_backward(
        &self,
        p: &[Tensor<2>],
        aux: &Aux,
        g: &Tensor<2>,
    ) -> (Tensor<2>, Tensor<2>, Tensor<2>, Tensor<2>) {
        let Aux::Attention { q, k, v, a, o } = aux else {
            unreachable!()
        };
        let Shape::Seq { d, .. } = self.output else {
            unreachable!()
        };
        let b = g.dims()[0];
        let g_rows = g.clone().reshape([b * self.output.numel() / d, d]);
        let d_o = g_rows.clone().matmul(p[3].clone().transpose());
        let d_o4 = self.attention_heads(d_o, b);
        let d_a = d_o4.clone().matmul(v.clone().swap_dims(2, 3));
        let d_v = a.clone().swap_dims(2, 3).matmul(d_o4);
        let row_dot = (d_a.clone() * a.clone()).sum_dim(3);
        let d_s = (a.clone() * (d_a - row_dot)).mul_scalar(self.attention_scale());
        let d_q = d_s.clone().matmul(k.clone());
        let d_k = d_s.swap_dims(2, 3).matmul(q.clone());
        (
            self.merge_heads(d_q),
            self.merge_heads(d_k),
            self.merge_heads(d_v),
            o.clone(),
        )
    }

    /// The vector-Jacobian product with respect to the input: `g^T dy/dx` per sample.
    pub(crate) fn vjp_input(
        &self,
        p: &[Tensor<2>],
        x: &Tensor<2>,
        aux: &Aux,
        g: Tensor<2>,
    ) -> Tensor<2> {
        let b = g.dims()[0];
        match &self.op {
            LayerOp::Linear { .. } => g.matmul(p[0].clone().transpose()),
            LayerOp::Conv2d { .. } if on_host(&g) => {
                let device = g.device();
                let geo = self.conv_geometry();
                let mut gx = vec![0.0; b * geo.in_len()];
                geo.input_vjp(&into_host(p[0].clone()), &into_host(g), &mut gx);
                from_host(gx, b, geo.in_len(), &device)
            }
            LayerOp::Conv2d { .. } => {
                let Shape::Image { c, h, w } = self.output else {
                    unreachable!()
                };
                let gx = Backend::conv2d_x_backward(
                    float(self.image(x.clone())),
                    float(self.conv_weight(p)),
                    float(g.reshape([b, c, h, w])),
                    self.conv_options(),
                );
                let y = wrap(gx);
                y.reshape([b, self.input.numel()])
            }
            LayerOp::Activation(a) => a.vjp(x, g),
            LayerOp::MaxPool2d { .. } if matches!(aux, Aux::HostMaxIndices(_)) => {
                let Aux::HostMaxIndices(idx) = aux else {
                    unreachable!()
                };
                let device = g.device();
                let mut gx = vec![0.0; b * self.input.numel()];
                self.pool_geometry()
                    .max_backward(idx, &into_host(g), &mut gx);
                from_host(gx, b, self.input.numel(), &device)
            }
            LayerOp::MaxPool2d { kernel, stride } => {
                let Aux::MaxIndices(idx) = aux else {
                    unreachable!()
                };
                let Shape::Image { c, h, w } = self.output else {
                    unreachable!()
                };
                let gx = Backend::max_pool2d_with_indices_backward(
                    float(self.image(x.clone())),
                    [*kernel, *kernel],
                    [*stride, *stride],
                    [0, 0],
                    [1, 1],
                    false,
                    float(g.reshape([b, c, h, w])),
                    idx.clone().into_primitive(),
                );
                wrap(gx.x_grad).reshape([b, self.input.numel()])
            }
            LayerOp::AvgPool2d { kernel, stride } => {
                let Shape::Image { c, h, w } = self.output else {
                    unreachable!()
                };
                let gx = Backend::avg_pool2d_backward(
                    float(self.image(x.clone())),
                    float(g.reshape([b, c, h, w])),
                    [*kernel, *kernel],
                    [*stride, *stride],
                    [0, 0],
                    true,
                    false,
                );
                wrap(gx).reshape([b, self.input.numel()])
            }
            LayerOp::Flatten | LayerOp::Tokens { .. } | LayerOp::Dropout { .. } => g,
            LayerOp::LayerNorm { .. } => {
                let Aux::Norm { xhat, inv_std } = aux else {
                    unreachable!()
                };
                let dxhat = self.norm_view(g) * self.norm_param(&p[0]);
                let mean_d = dxhat.clone().mean_dim(2);
                let mean_dx = (dxhat.clone() * xhat.clone()).mean_dim(2);
                let gx = (dxhat - mean_d - xhat.clone() * mean_dx) * inv_std.clone();
                self.unview(gx, b)
            }
            LayerOp::BatchNorm { .. } => {
                let Aux::Norm { inv_std, .. } = aux else {
                    unreachable!()
                };
                let gx = self.norm_view(g) * (self.norm_param(&p[0]) * inv_std.clone());
                self.unview(gx, b)
            }
            LayerOp::Attention { .. } => {
                let Shape::Seq { d, .. } = self.input else {
                    unreachable!()
                };
                let (dq, dk, dv, _) = self.attention_backward(p, aux, &g);
                let gx = dq.matmul(p[0].clone().transpose())
                    + dk.matmul(p[1].clone().transpose())
                    + dv.matmul(p[2].clone().transpose());
                let _ = d;
                gx.reshape([b, self.input.numel()])
            }
        }
    }

    /// The vector-Jacobian product with respect to the parameters, summed over the batch;
    /// one tensor per parameter, shaped like it. Empty for layers without parameters.
    pub(crate) fn vjp_params(
        &self,
        p: &[Tensor<2>],
        x: &Tensor<2>,
        aux: &Aux,
        g: &Tensor<2>,
    ) -> Vec<Tensor<2>> {
        let b = g.dims()[0];
        match &self.op {
            LayerOp::Linear { .. } => vec![
                x.clone().transpose().matmul(g.clone()),
                g.clone().sum_dim(0),
            ],
            LayerOp::Conv2d { out_channels, .. } if on_host(g) => {
                let device = g.device();
                let geo = self.conv_geometry();
                let mut gw = vec![0.0; geo.out_channels * geo.patch_len()];
                let mut gb = vec![0.0; *out_channels];
                geo.param_vjp(
                    &into_host(x.clone()),
                    &into_host(g.clone()),
                    &mut gw,
                    &mut gb,
                );
                vec![
                    from_host(gw, geo.out_channels, geo.patch_len(), &device),
                    from_host(gb, 1, *out_channels, &device),
                ]
            }
            LayerOp::Conv2d { out_channels, .. } => {
                let Shape::Image { c, h, w } = self.output else {
                    unreachable!()
                };
                let g4 = g.clone().reshape([b, c, h, w]);
                let gw = Backend::conv2d_weight_backward(
                    float(self.image(x.clone())),
                    float(self.conv_weight(p)),
                    float(g4),
                    self.conv_options(),
                );
                let gw = wrap(gw).reshape(p[0].dims());
                let gb = g
                    .clone()
                    .reshape([b, c, h * w])
                    .sum_dim(2)
                    .sum_dim(0)
                    .reshape([1, *out_channels]);
                vec![gw, gb]
            }
            LayerOp::LayerNorm { .. } | LayerOp::BatchNorm { .. } => {
                let Aux::Norm { xhat, .. } = aux else {
                    unreachable!()
                };
                let gv = self.norm_view(g.clone());
                let n = p[0].dims()[1];
                let (gain, bias) = match self.op {
                    LayerOp::BatchNorm { .. } => (
                        (gv.clone() * xhat.clone()).sum_dim(2).sum_dim(0),
                        gv.sum_dim(2).sum_dim(0),
                    ),
                    _ => ((gv.clone() * xhat.clone()).sum_dim(0), gv.sum_dim(0)),
                };
                vec![gain.reshape([1, n]), bias.reshape([1, n])]
            }
            LayerOp::Attention { .. } => {
                let Shape::Seq { d, .. } = self.input else {
                    unreachable!()
                };
                let (dq, dk, dv, o) = self.attention_backward(p, aux, g);
                let rows_t = x
                    .clone()
                    .reshape([b * self.input.numel() / d, d])
                    .transpose();
                let g_rows = g.clone().reshape([b * self.output.numel() / d, d]);
                vec![
                    rows_t.clone().matmul(dq),
                    rows_t.clone().matmul(dk),
                    rows_t.matmul(dv),
                    o.transpose().matmul(g_rows),
                ]
            }
            _ => Vec::new(),
        }
    }
}
