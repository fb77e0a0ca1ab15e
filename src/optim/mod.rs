//! Optimizers: how a gradient becomes a parameter update.
//!
//! For now the first-order baselines ([`Sgd`] with heavy-ball or Nesterov momentum and
//! decoupled weight decay, and [`Adam`]/AdamW); the composite optimizer with its geometry-aware
//! updates, constraints and feedback builds on the same [`Optimizer`] interface.

mod adam;
mod sgd;

pub use adam::Adam;
pub use sgd::Sgd;

use crate::device::Tensor;

/// Errors of optimizer construction and stepping.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum OptimError {
    /// A hyper-parameter is out of range.
    #[error("invalid optimizer option {name} = {value}: {reason}")]
    InvalidOption {
        /// Option name.
        name: &'static str,
        /// Value given.
        value: f64,
        /// Allowed range.
        reason: &'static str,
    },
    /// Parameter and gradient lists disagree.
    #[error("optimizer got {params} parameters but {grads} gradients")]
    Arity {
        /// Parameters given.
        params: usize,
        /// Gradients given.
        grads: usize,
    },
}

/// A stateful rule that turns gradients into new parameters.
pub trait Optimizer {
    /// Returns the updated parameters. `grads[i]` is the gradient of `params[i]` (same shape).
    fn step(
        &mut self,
        params: Vec<Tensor<2>>,
        grads: Vec<Tensor<2>>,
    ) -> Result<Vec<Tensor<2>>, OptimError>;
}

pub(crate) fn check_range(
    name: &'static str,
    value: f64,
    ok: bool,
    reason: &'static str,
) -> Result<(), OptimError> {
    if ok && value.is_finite() {
        Ok(())
    } else {
        Err(OptimError::InvalidOption {
            name,
            value,
            reason,
        })
    }
}

pub(crate) fn check_arity(params: usize, grads: usize) -> Result<(), OptimError> {
    if params == grads {
        Ok(())
    } else {
        Err(OptimError::Arity { params, grads })
    }
}
