//! Task losses on the network output, shared by backprop and by the EP nudge.

use std::fmt;
use std::str::FromStr;

use burn::tensor::activation::{log_softmax, softmax};

use crate::device::Tensor;

/// Scale convention of the squared error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MseScale {
    /// `1/2 ||o - y||^2`, whose gradient is the residual `o - y` (mep's default).
    Half,
    /// `||o - y||^2` without the 1/2, as the reference's nudge term (output stiffness `2 beta`).
    Reference,
}

/// A per-sample loss `L(o, y)` of the output `o` against a one-hot target `y`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Loss {
    /// Squared error to the one-hot target.
    Mse {
        /// 1/2 or reference scale.
        scale: MseScale,
    },
    /// Cross-entropy of `softmax(o)` against the target smoothed by `smoothing`
    /// (`(1 - s) y + s / C`).
    CrossEntropy {
        /// Label smoothing in `[0, 1)`.
        smoothing: f32,
    },
}

impl Default for Loss {
    fn default() -> Self {
        Self::Mse {
            scale: MseScale::Half,
        }
    }
}

/// A loss option that is out of range.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "invalid loss `{0}` (expected mse, mse-reference, ce, or ce:SMOOTHING with 0 <= SMOOTHING < 1)"
)]
pub struct LossError(pub String);

impl Loss {
    /// Checks the options.
    pub fn validate(&self) -> Result<(), LossError> {
        match *self {
            Self::CrossEntropy { smoothing } if !(0.0..1.0).contains(&smoothing) => {
                Err(LossError(self.to_string()))
            }
            _ => Ok(()),
        }
    }

    fn smoothed(targets: Tensor<2>, smoothing: f32) -> Tensor<2> {
        if smoothing == 0.0 {
            return targets;
        }
        let classes = targets.dims()[1] as f32;
        targets
            .mul_scalar(1.0 - smoothing)
            .add_scalar(smoothing / classes)
    }

    /// Per-sample loss values, `[batch, 1]` (differentiable).
    pub fn per_sample(&self, output: Tensor<2>, targets: Tensor<2>) -> Tensor<2> {
        match *self {
            Self::Mse { scale } => {
                let sq = (output - targets).square().sum_dim(1);
                match scale {
                    MseScale::Half => sq.mul_scalar(0.5),
                    MseScale::Reference => sq,
                }
            }
            Self::CrossEntropy { smoothing } => (Self::smoothed(targets, smoothing)
                * log_softmax(output, 1))
            .sum_dim(1)
            .neg(),
        }
    }

    /// Mean loss over the batch (differentiable).
    pub fn mean(&self, output: Tensor<2>, targets: Tensor<2>) -> Tensor<1> {
        let n = output.dims()[0] as f32;
        self.per_sample(output, targets).sum().div_scalar(n)
    }

    /// Per-sample gradient `dL/do` (not divided by the batch size).
    pub fn gradient(&self, output: Tensor<2>, targets: Tensor<2>) -> Tensor<2> {
        match *self {
            Self::Mse { scale } => {
                let r = output - targets;
                match scale {
                    MseScale::Half => r,
                    MseScale::Reference => r.mul_scalar(2.0),
                }
            }
            Self::CrossEntropy { smoothing } => {
                softmax(output, 1) - Self::smoothed(targets, smoothing)
            }
        }
    }
}

impl fmt::Display for Loss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Mse {
                scale: MseScale::Half,
            } => write!(f, "mse"),
            Self::Mse {
                scale: MseScale::Reference,
            } => write!(f, "mse-reference"),
            Self::CrossEntropy { smoothing: 0.0 } => write!(f, "ce"),
            Self::CrossEntropy { smoothing } => write!(f, "ce:{smoothing}"),
        }
    }
}

impl FromStr for Loss {
    type Err = LossError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let loss = match s.trim() {
            "mse" => Self::Mse {
                scale: MseScale::Half,
            },
            "mse-reference" => Self::Mse {
                scale: MseScale::Reference,
            },
            "ce" | "cross-entropy" => Self::CrossEntropy { smoothing: 0.0 },
            other => match other.strip_prefix("ce:").map(str::parse::<f32>) {
                Some(Ok(smoothing)) => Self::CrossEntropy { smoothing },
                _ => return Err(LossError(s.to_string())),
            },
        };
        loss.validate()?;
        Ok(loss)
    }
}
