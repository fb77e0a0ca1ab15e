//! Optimizers: how a gradient becomes a parameter update.
//!
//! One optimizer, the [`CompositeOptimizer`]: compression with error feedback, momentum,
//! an update rule (plain SGD, Muon, Dion, Fisher, Adam), decoupled weight decay and a
//! spectral constraint, with matrices and vectors routed explicitly. The first-order
//! baselines are its plain and Adam rules ([`CompositeConfig::sgd`],
//! [`CompositeConfig::adam`]), so every rule refuses non-finite gradients and decays
//! matrices only, the same way. Every optimizer's state round-trips through
//! [`OptimizerState`] (saved with the model checkpoint).

mod composite;
mod elementwise;
pub mod linalg;

pub use composite::{
    CompositeConfig, CompositeOptimizer, Constraint, Feedback, Schedule, UpdateRule, VectorRule,
};
pub use linalg::NsIteration;

use crate::device::Tensor;
use crate::model::GradFactors;

/// An optimizer's state as named tensors and scalars (what a checkpoint stores).
#[derive(Debug, Clone, Default)]
pub struct OptimizerState {
    /// Named tensors (`<param>.<role>`).
    pub tensors: Vec<(String, Tensor<2>)>,
    /// Named scalars (step counters).
    pub scalars: Vec<(String, f64)>,
}

impl OptimizerState {
    /// The scalar called `name`.
    pub fn scalar(&self, name: &str) -> Option<f64> {
        self.scalars
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| *v)
    }

    /// The tensor called `name`.
    pub fn tensor(&self, name: &str) -> Option<&Tensor<2>> {
        self.tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }
}

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
    /// A gradient contains NaN or infinity; the parameters were left untouched.
    #[error("refusing a non-finite update: the gradient of {param} contains NaN or infinity")]
    NonFinite {
        /// The first offending parameter.
        param: String,
    },
    /// No preset has this name.
    #[error(
        "unknown update rule `{0}` (expected {names})",
        names = UpdateRule::NAMES.join(", ")
    )]
    UnknownUpdateRule(String),
    /// No vector rule has this name.
    #[error("unknown vector update `{0}` (expected plain or adam)")]
    UnknownVectorRule(String),
    /// Sharing a step's work between the ranks of a data-parallel run failed.
    #[error("sharing the optimizer step between ranks: {0}")]
    Exchange(String),
    /// Saved state does not match the optimizer.
    #[error("optimizer state does not fit: {0}")]
    State(String),
    /// Parameter and gradient lists disagree.
    #[error("optimizer got {params} parameters but {grads} gradients")]
    Arity {
        /// Parameters given.
        params: usize,
        /// Gradients given.
        grads: usize,
    },
}

/// Shares the heaviest work of an optimizer step between the processes of a
/// data-parallel run, which all take the same step: each rank computes its share of the
/// results, then every rank receives every rank's (the training loop's collective).
pub trait WorkSplit: std::fmt::Debug {
    /// This process's rank, `0..size`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn size(&self) -> usize;
    /// Every rank's `local` values (lengths may differ), in rank order.
    fn exchange(&self, local: &[f32]) -> Result<Vec<Vec<f32>>, OptimError>;
    /// [`WorkSplit::exchange`] concatenated in rank order into `out` (its previous values
    /// replaced, its allocation reused); returns each rank's length.
    fn exchange_into(&self, local: &[f32], out: &mut Vec<f32>) -> Result<Vec<usize>, OptimError> {
        let all = self.exchange(local)?;
        out.clear();
        let counts = all.iter().map(Vec::len).collect();
        for part in all {
            out.extend(part);
        }
        Ok(counts)
    }
}

/// The consecutive parts of `flat` of lengths `counts` (a gather's result, in rank order);
/// parts past the end of `flat` come back shortened.
pub fn split_parts<'a, T>(flat: &'a [T], counts: &[usize]) -> Vec<&'a [T]> {
    let mut at = 0;
    counts
        .iter()
        .map(|&c| {
            let part = &flat[at.min(flat.len())..(at + c).min(flat.len())];
            at += c;
            part
        })
        .collect()
}

/// The owner rank of each of `costs`' items: largest first, each to the least-loaded rank
/// (ties to the lower rank), the same on every rank.
pub fn assign_owners(costs: &[f64], size: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..costs.len()).collect();
    order.sort_by(|&a, &b| costs[b].total_cmp(&costs[a]).then(a.cmp(&b)));
    let mut load = vec![0f64; size.max(1)];
    let mut owner = vec![0; costs.len()];
    for i in order {
        let r = (0..load.len())
            .min_by(|&a, &b| load[a].total_cmp(&load[b]).then(a.cmp(&b)))
            .unwrap_or(0);
        load[r] += costs[i];
        owner[i] = r;
    }
    owner
}

/// A stateful rule that turns gradients into new parameters.
pub trait Optimizer {
    /// Shares the step's heaviest work with the other ranks of a data-parallel run (by
    /// default none is shared: every rank computes the whole step, with the same result).
    fn set_work_split(&mut self, split: Option<std::rc::Rc<dyn WorkSplit>>) {
        let _ = split;
    }

    /// Which parameters' gradients this optimizer combines across the ranks of its work
    /// split by itself, in a compressed form (Dion's low-rank factors): for those the
    /// training loop passes each rank's own share of the batch gradient (summing to the
    /// batch's over the ranks) instead of the batch gradient. Empty (the default): none.
    fn reduces_across_ranks(&self) -> Vec<bool> {
        Vec::new()
    }

    /// Makes every rank's optimizer state the whole run's, where ranks keep shares of it
    /// (see [`Optimizer::reduces_across_ranks`]); every rank calls it at the same point
    /// (an epoch's end, before a checkpoint is written). A no-op by default.
    fn consolidate(&mut self) -> Result<(), OptimError> {
        Ok(())
    }

    /// Returns the updated parameters. `grads[i]` is the gradient of `params[i]` (same shape).
    fn step(
        &mut self,
        params: Vec<Tensor<2>>,
        grads: Vec<Tensor<2>>,
    ) -> Result<Vec<Tensor<2>>, OptimError>;

    /// The learning rate the next step will use (after any schedule; the matrices' rate
    /// for the composite optimizer). Decoupled penalties take their proximal step with it.
    fn learning_rate(&self) -> f64;

    /// Whether [`Optimizer::step_with_factors`] uses per-sample gradient factors (so the
    /// estimator should produce them).
    fn needs_factors(&self) -> bool {
        false
    }

    /// A step that may use per-sample gradient factors (`factors[i]` for `params[i]`, or
    /// empty); by default the factors are ignored.
    fn step_with_factors(
        &mut self,
        params: Vec<Tensor<2>>,
        grads: Vec<Tensor<2>>,
        factors: &[Option<GradFactors>],
    ) -> Result<Vec<Tensor<2>>, OptimError> {
        let _ = factors;
        self.step(params, grads)
    }

    /// [`Optimizer::step_with_factors`] written over `params`, so that parameters nothing
    /// else holds (the training loop's: it lends the model's own) are updated in their own
    /// buffers. On error `params` is left as it was. By default the by-value step on
    /// clones of `params`.
    fn step_in_place(
        &mut self,
        params: &mut [Tensor<2>],
        grads: Vec<Tensor<2>>,
        factors: &[Option<GradFactors>],
    ) -> Result<(), OptimError> {
        let updated = self.step_with_factors(params.to_vec(), grads, factors)?;
        check_arity(params.len(), updated.len())?;
        put_back(params, updated);
        Ok(())
    }

    /// Called once before training with the initial parameters; returns them made
    /// feasible for the optimizer's constraint (by default unchanged).
    fn prepare(&mut self, params: Vec<Tensor<2>>) -> Vec<Tensor<2>> {
        params
    }

    /// The state to checkpoint.
    fn state(&self) -> OptimizerState;

    /// Restores a checkpointed state.
    fn load_state(&mut self, state: &OptimizerState) -> Result<(), OptimError>;

    /// Checks a checkpointed state against the parameters it belongs to (each tensor's
    /// shape for its role) before [`Optimizer::load_state`]; a mismatch would otherwise
    /// surface as a panic inside the tensor library at the next step.
    fn check_state(
        &self,
        _state: &OptimizerState,
        _params: &[Tensor<2>],
    ) -> Result<(), OptimError> {
        Ok(())
    }
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

/// Checks Adam's moment decays (in [0, 1)) and epsilon (> 0).
pub(crate) fn check_adam(beta1: f64, beta2: f64, eps: f64) -> Result<(), OptimError> {
    for (name, b) in [("beta1", beta1), ("beta2", beta2)] {
        check_range(name, b, (0.0..1.0).contains(&b), "must be in [0, 1)")?;
    }
    check_range("eps", eps, eps > 0.0, "must be positive")
}

/// Writes `updated` over `params`, in order (the end of an in-place step; the composite
/// optimizer takes its parameters out with `take_all`).
fn put_back(params: &mut [Tensor<2>], updated: Vec<Tensor<2>>) {
    for (p, u) in params.iter_mut().zip(updated) {
        *p = u;
    }
}

pub(crate) fn check_arity(params: usize, grads: usize) -> Result<(), OptimError> {
    if params == grads {
        Ok(())
    } else {
        Err(OptimError::Arity { params, grads })
    }
}
