//! Element-wise activation functions and their derivatives.

use std::fmt;

use burn::tensor::TensorPrimitive;
use burn::tensor::activation;
use burn::tensor::ops::ActivationOps;

use crate::device::{Backend, Tensor};

/// An element-wise activation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    /// `max(x, 0)`.
    Relu,
    /// `x` for `x > 0`, `slope * x` otherwise.
    LeakyRelu {
        /// Slope of the negative side.
        slope: f32,
    },
    /// `1 / (1 + e^-x)`.
    Sigmoid,
    /// `tanh(x)`.
    Tanh,
    /// `clip(x, 0, 1)`, the hard sigmoid of Scellier & Bengio (2017).
    HardSigmoid,
    /// `clip(x, 0, cap)`.
    ClippedRelu {
        /// Upper clip.
        cap: f32,
    },
    /// `x * Phi(x)` with the exact normal CDF.
    Gelu,
    /// `x * sigmoid(x)`.
    Silu,
}

impl Activation {
    /// The spec-grammar names, with what each means.
    pub const NAMES: &'static [(&'static str, &'static str)] = &[
        ("relu", "max(x, 0)"),
        ("lrelu", "leaky ReLU, slope 0.01"),
        ("sigmoid", "logistic sigmoid"),
        ("tanh", "hyperbolic tangent"),
        ("hsig", "hard sigmoid clip(x, 0, 1)"),
        ("crelu", "clipped ReLU clip(x, 0, 1)"),
        ("gelu", "GELU (exact)"),
        ("silu", "SiLU / swish"),
    ];

    /// Parses a grammar name (see [`Activation::NAMES`]).
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "relu" => Self::Relu,
            "lrelu" => Self::LeakyRelu { slope: 0.01 },
            "sigmoid" => Self::Sigmoid,
            "tanh" => Self::Tanh,
            "hsig" | "hardsigmoid" => Self::HardSigmoid,
            "crelu" => Self::ClippedRelu { cap: 1.0 },
            "gelu" => Self::Gelu,
            "silu" => Self::Silu,
            _ => return None,
        })
    }

    /// Applies the activation.
    pub fn apply<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        match *self {
            Self::Relu => activation::relu(x),
            Self::LeakyRelu { slope } => activation::leaky_relu(x, slope as f64),
            Self::Sigmoid => activation::sigmoid(x),
            Self::Tanh => activation::tanh(x),
            Self::HardSigmoid => x.clamp(0.0, 1.0),
            Self::ClippedRelu { cap } => x.clamp(0.0, cap),
            Self::Gelu => activation::gelu(x),
            Self::Silu => activation::silu(x),
        }
    }

    /// `f(x)` on one number, for host kernels (`None` for GELU, whose exact form needs
    /// erf).
    #[inline]
    pub fn scalar(&self, x: f32) -> Option<f32> {
        Some(match *self {
            Self::Relu => x.max(0.0),
            Self::LeakyRelu { slope } => {
                if x > 0.0 {
                    x
                } else {
                    slope * x
                }
            }
            Self::Sigmoid => 1.0 / (1.0 + (-x).exp()),
            Self::Tanh => x.tanh(),
            Self::HardSigmoid => x.clamp(0.0, 1.0),
            Self::ClippedRelu { cap } => x.clamp(0.0, cap),
            Self::Silu => x / (1.0 + (-x).exp()),
            Self::Gelu => return None,
        })
    }

    /// Whether the activation is piecewise linear (ReLU, leaky ReLU, the hard sigmoid, the
    /// clipped ReLU), so that [`Activation::change`] is exact.
    pub fn piecewise_linear(&self) -> bool {
        matches!(
            self,
            Self::Relu | Self::LeakyRelu { .. } | Self::HardSigmoid | Self::ClippedRelu { .. }
        )
    }

    /// `f(b + d) - f(b)` of a piecewise-linear activation, computed from `d` where `b` and
    /// `b + d` lie on one linear piece (`slope * d`: exactly `d` for slope 1), so that a
    /// change of 1e-9 of `b` keeps its digits; where they straddle a kink, the difference
    /// of the two values. `None` for the other activations.
    #[inline]
    pub fn change(&self, b: f32, d: f32) -> Option<f32> {
        let (x, y) = (b, b + d);
        // (kinks, slope of each piece: below the first kink, between, above the last)
        let (lo, hi, slopes) = match *self {
            Self::Relu => (0.0, f32::INFINITY, [0.0, 1.0, 1.0]),
            Self::LeakyRelu { slope } => (0.0, f32::INFINITY, [slope, 1.0, 1.0]),
            Self::HardSigmoid => (0.0, 1.0, [0.0, 1.0, 0.0]),
            Self::ClippedRelu { cap } => (0.0, cap, [0.0, 1.0, 0.0]),
            _ => return None,
        };
        let piece = |v: f32| usize::from(v > lo) + usize::from(v > hi);
        if piece(x) == piece(y) {
            Some(slopes[piece(x)] * d)
        } else {
            Some(self.scalar(y)? - self.scalar(x)?)
        }
    }

    /// `f'(x)` on one number, with the same conventions as [`Activation::vjp`] at kinks
    /// (`None` for GELU).
    pub fn scalar_derivative(&self, x: f32) -> Option<f32> {
        Some(match *self {
            Self::Relu => f32::from(u8::from(x > 0.0)),
            Self::LeakyRelu { slope } => {
                if x > 0.0 {
                    1.0
                } else {
                    slope
                }
            }
            Self::Sigmoid => {
                let s = 1.0 / (1.0 + (-x).exp());
                s * (1.0 - s)
            }
            Self::Tanh => 1.0 - x.tanh().powi(2),
            Self::HardSigmoid => f32::from(u8::from(x > 0.0 && x < 1.0)),
            Self::ClippedRelu { cap } => f32::from(u8::from(x > 0.0 && x < cap)),
            Self::Silu => {
                let s = 1.0 / (1.0 + (-x).exp());
                s * (1.0 + x * (1.0 - s))
            }
            Self::Gelu => return None,
        })
    }

    /// The vector-Jacobian product `grad * f'(x)` at input `x`.
    pub fn vjp<const D: usize>(&self, x: &Tensor<D>, grad: Tensor<D>) -> Tensor<D> {
        match *self {
            // The backend's own backward: one pass on the CPU (a mask, then a fill, were
            // two, and a boolean tensor).
            Self::Relu => {
                Tensor::from_primitive(TensorPrimitive::Float(<Backend as ActivationOps<
                    Backend,
                >>::relu_backward(
                    x.clone().into_primitive().tensor(),
                    grad.into_primitive().tensor(),
                )))
            }
            Self::LeakyRelu { slope } => {
                let scaled = grad.clone().mul_scalar(slope);
                grad.mask_where(x.clone().lower_equal_elem(0.0), scaled)
            }
            Self::Sigmoid => {
                let s = activation::sigmoid(x.clone());
                grad * s.clone() * s.neg().add_scalar(1.0)
            }
            Self::Tanh => {
                let t = activation::tanh(x.clone());
                grad * t.square().neg().add_scalar(1.0)
            }
            Self::HardSigmoid => Self::clip_vjp(x, grad, 1.0),
            Self::ClippedRelu { cap } => Self::clip_vjp(x, grad, cap),
            Self::Gelu => {
                // d/dx x Phi(x) = Phi(x) + x phi(x).
                let cdf = x
                    .clone()
                    .mul_scalar(std::f32::consts::FRAC_1_SQRT_2)
                    .erf()
                    .add_scalar(1.0)
                    .mul_scalar(0.5);
                let pdf = x
                    .clone()
                    .square()
                    .mul_scalar(-0.5)
                    .exp()
                    .mul_scalar(0.398_942_3);
                grad * (cdf + x.clone() * pdf)
            }
            Self::Silu => {
                // d/dx x s(x) = s(x) (1 + x (1 - s(x))).
                let s = activation::sigmoid(x.clone());
                let inner = x.clone() * s.clone().neg().add_scalar(1.0);
                grad * s * inner.add_scalar(1.0)
            }
        }
    }

    fn clip_vjp<const D: usize>(x: &Tensor<D>, grad: Tensor<D>, cap: f32) -> Tensor<D> {
        let outside = x
            .clone()
            .lower_equal_elem(0.0)
            .bool_or(x.clone().greater_equal_elem(cap));
        grad.mask_fill(outside, 0.0)
    }
}

impl fmt::Display for Activation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Relu => write!(f, "relu"),
            Self::LeakyRelu { slope } => write!(f, "lrelu({slope})"),
            Self::Sigmoid => write!(f, "sigmoid"),
            Self::Tanh => write!(f, "tanh"),
            Self::HardSigmoid => write!(f, "hsig"),
            Self::ClippedRelu { cap } => write!(f, "crelu({cap})"),
            Self::Gelu => write!(f, "gelu"),
            Self::Silu => write!(f, "silu"),
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::TensorData;

    use super::*;
    use crate::device::{CpuBackend, cpu_device, to_host};

    #[test]
    fn host_forms_match_the_tensor_forms() {
        let dev = cpu_device(CpuBackend::Flex);
        // A grid that avoids the kinks (0 and the clip caps), where conventions differ.
        let xs: Vec<f32> = (0..81).map(|i| -4.03 + 0.1 * i as f32).collect();
        let x = Tensor::<2>::from_data(TensorData::new(xs.clone(), [1, xs.len()]), &dev);
        let ones = Tensor::<2>::ones([1, xs.len()], &dev);
        let all = [
            Activation::Relu,
            Activation::LeakyRelu { slope: 0.01 },
            Activation::Sigmoid,
            Activation::Tanh,
            Activation::HardSigmoid,
            Activation::ClippedRelu { cap: 1.5 },
            Activation::Silu,
        ];
        for a in all {
            let f = to_host(&a.apply(x.clone()));
            let d = to_host(&a.vjp(&x, ones.clone()));
            for (k, &xk) in xs.iter().enumerate() {
                let (fs, ds) = (a.scalar(xk).unwrap(), a.scalar_derivative(xk).unwrap());
                assert!((fs - f[k]).abs() < 1e-5, "{a} f({xk}): {fs} vs {}", f[k]);
                assert!((ds - d[k]).abs() < 1e-5, "{a} f'({xk}): {ds} vs {}", d[k]);
            }
        }
        assert_eq!(Activation::Gelu.scalar(0.3), None);
    }
}
