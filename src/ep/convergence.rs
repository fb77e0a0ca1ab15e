//! What settling is asked to do and what it returns, and the convergence test: shared by
//! the three settle loops (the generic [`super::Settler`], the fused `dense` loop and the
//! `lean` sweep), so none of them depends on another.

use super::energy::{BatchContext, EnergyModel, Evaluation};
use crate::device::{Tensor, to_host};

/// Growth of a sample's step after an accepted adaptive step.
pub const ADAPTIVE_GROWTH: f32 = 1.1;
/// Shrink of a sample's step after a rejected adaptive step.
pub const ADAPTIVE_SHRINK: f32 = 0.5;
/// Largest adaptive step, as a multiple of `lr`.
pub const ADAPTIVE_MAX_FACTOR: f32 = 2.0;
/// Settling counts as diverged when the largest per-sample state-gradient norm grows past
/// this multiple of its value at the start.
pub const BLOWUP_FACTOR: f32 = 1e3;
/// Power-iteration rounds of the curvature estimate ([`SettleConfig::curvature`]).
pub const CURVATURE_ITERATIONS: usize = 6;
/// Fraction of heavy-ball's stability limit `2 (1 + momentum) / lambda_max` that the
/// curvature-following step takes (power iteration approaches `lambda_max` from below).
pub const CURVATURE_SAFETY: f32 = 0.5;

/// Settling options.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SettleConfig {
    /// Step size on the states (`settle_lr`), per sample.
    pub lr: f32,
    /// Most descent steps (`settle_steps`).
    pub steps: usize,
    /// Heavy-ball momentum (`m <- momentum * m + grad; s <- s - lr * m`).
    pub momentum: f32,
    /// Stop when the largest per-sample state-gradient norm is below `tol * |beta|` (the
    /// EP gradient divides by beta, so this is a relative accuracy). 0 never stops early.
    pub tol: f32,
    /// Check convergence (one host read) every this many steps.
    pub check_every: usize,
    /// Per-sample adaptive step: a step that raises a sample's energy is undone for that
    /// sample, its momentum reset and its step multiplied by [`ADAPTIVE_SHRINK`]; an
    /// accepted step grows it by [`ADAPTIVE_GROWTH`] up to [`ADAPTIVE_MAX_FACTOR`]` * lr`.
    /// Costs one extra energy evaluation and one host read per step.
    pub adaptive: bool,
    /// Per-sample stopping: a sample whose own state-gradient norm is below `tol * |beta|`
    /// at a check stops moving (for good), and settling ends when every sample has
    /// stopped. Each sample then settles exactly as it would alone, and the fused dense
    /// loop drops stopped samples from its products, so the saved steps save time.
    #[serde(default)]
    pub per_sample: bool,
    /// A step that follows the energy's curvature: at the start of each settle, the state
    /// Hessian's largest eigenvalue `lambda` is estimated by [`CURVATURE_ITERATIONS`]
    /// rounds of power iteration on finite differences of the state gradient, and the
    /// step is `min(lr, CURVATURE_SAFETY * 2 (1 + momentum) / lambda)`: heavy-ball stays
    /// stable as the weights (and with them `lambda`, about `1 + sigma_max(W)^2`) grow.
    /// Costs about [`CURVATURE_ITERATIONS`] settle steps per settle. The equilibrium, and
    /// so the EP gradient at convergence, is unchanged.
    #[serde(default)]
    pub curvature: bool,
    /// With [`SettleConfig::curvature`], estimate the curvature at every this many
    /// estimates of the EP gradient and keep the step in between (1: at every settle).
    /// The largest eigenvalue follows the weights, which move little in a few optimizer
    /// steps, so the estimate's cost (about [`CURVATURE_ITERATIONS`] settle steps) can be
    /// spread over many settles when each is only a few steps long.
    #[serde(default = "every_settle")]
    pub curvature_every: usize,
}

fn every_settle() -> usize {
    1
}

impl Default for SettleConfig {
    /// 30 steps at lr 0.3, momentum 0.5, tol 1e-3, checked every 5 steps, not adaptive.
    fn default() -> Self {
        Self {
            lr: 0.3,
            steps: 30,
            momentum: 0.5,
            tol: 1e-3,
            check_every: 5,
            adaptive: false,
            per_sample: false,
            curvature: false,
            curvature_every: 1,
        }
    }
}

impl SettleConfig {
    /// The curvature-following step for a largest eigenvalue `lambda`: `min(lr,
    /// CURVATURE_SAFETY * 2 (1 + momentum) / lambda)` ([`SettleConfig::curvature`]).
    pub fn curvature_step(&self, lambda: f32) -> f32 {
        self.lr
            .min(CURVATURE_SAFETY * 2.0 * (1.0 + self.momentum) / lambda)
    }

    /// Checks every option's range.
    pub fn validate(&self) -> Result<(), SettleError> {
        let bad = |what: String| Err(SettleError::InvalidOption(what));
        if self.curvature_every == 0 {
            return bad("the curvature must be estimated every 1 or more settles, got 0".into());
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(format!("settle_lr must be positive, got {}", self.lr));
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return bad(format!(
                "settle momentum must be in [0, 1), got {}",
                self.momentum
            ));
        }
        if !(self.tol.is_finite() && self.tol >= 0.0) {
            return bad(format!("settle tol must be >= 0, got {}", self.tol));
        }
        if self.check_every == 0 {
            return bad("settle check interval must be at least 1".into());
        }
        Ok(())
    }
}

/// Errors of settling.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum SettleError {
    /// The states ran away (non-finite, or the gradient blew up).
    #[error(
        "settling diverged at step {step}: the state gradient of layer {layer} reached {norm:e}; try a smaller settle_lr (now {lr}) or beta (now {beta})"
    )]
    Diverged {
        /// The layer whose state ran away the most.
        layer: String,
        /// Step at which it was detected.
        step: usize,
        /// Its largest per-sample gradient norm.
        norm: f32,
        /// The step size used.
        lr: f32,
        /// The nudge used.
        beta: f32,
    },
    /// An option is out of range.
    #[error("invalid settling option: {0}")]
    InvalidOption(String),
}

/// What a settle did.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct SettleStats {
    /// Descent steps taken.
    pub steps: usize,
    /// Largest per-sample state-gradient norm at the last check.
    pub residual: f32,
    /// Whether it stopped because the residual fell under the tolerance.
    pub converged: bool,
    /// Adaptive steps rejected (summed over samples).
    pub rejected: usize,
    /// Mean per-sample energy at the settled states.
    pub energy: f32,
    /// Mean over samples of the steps each sample moved (equals `steps` unless samples
    /// stop on their own, see [`SettleConfig::per_sample`]).
    #[serde(default)]
    pub sample_steps: f32,
    /// The step size used (`lr`, or the curvature-following step, see
    /// [`SettleConfig::curvature`]).
    #[serde(default)]
    pub step: f32,
}

/// Settled states with their evaluation.
#[derive(Debug, Clone)]
pub struct Settled {
    /// The states.
    pub states: Vec<Tensor<2>>,
    /// Predictions and errors at them.
    pub eval: Evaluation,
    /// What the settle did.
    pub stats: SettleStats,
    /// `(step, largest per-sample state-gradient norm)` at every convergence check.
    pub residual_curve: Vec<(usize, f32)>,
}

/// The convergence and divergence test both settle loops run at every check: it records
/// the residual (the largest per-sample state-gradient norm) and its curve, fails when the
/// residual is not finite or grew [`BLOWUP_FACTOR`] times past its first value, and says
/// whether it fell under `tol * |beta|`.
pub(crate) struct ResidualCheck {
    threshold: f32,
    initial: Option<f32>,
    lr: f32,
    beta: f32,
}

impl ResidualCheck {
    /// The per-sample convergence threshold `tol * |beta|`.
    pub(crate) fn threshold(&self) -> f32 {
        self.threshold
    }

    pub(crate) fn new(config: &SettleConfig, beta: f32) -> Self {
        Self {
            threshold: config.tol * beta.abs(),
            initial: None,
            lr: config.lr,
            beta,
        }
    }

    /// `layer_max`: each state's largest per-sample gradient norm; `total`: the largest
    /// per-sample norm over all states. Returns whether settling has converged.
    pub(crate) fn check(
        &mut self,
        layer_max: &[f32],
        total: f32,
        names: &[String],
        stats: &mut SettleStats,
        curve: &mut Vec<(usize, f32)>,
    ) -> Result<bool, SettleError> {
        stats.residual = total;
        curve.push((stats.steps, total));
        let reference = *self.initial.get_or_insert(total);
        if !total.is_finite() || total > BLOWUP_FACTOR * reference.max(1e-6) {
            let worst = layer_max
                .iter()
                .enumerate()
                .max_by(|a, b| {
                    let key = |v: f32| if v.is_finite() { v } else { f32::INFINITY };
                    key(*a.1).total_cmp(&key(*b.1))
                })
                .map_or(0, |(i, _)| i);
            return Err(SettleError::Diverged {
                layer: names[worst].clone(),
                step: stats.steps,
                norm: layer_max.get(worst).copied().unwrap_or(total),
                lr: self.lr,
                beta: self.beta,
            });
        }
        Ok(total <= self.threshold)
    }
}

impl Settled {
    /// The outcome of either settle loop: the mean steps per sample (`stopped[b]`: the step
    /// at which sample `b` stopped, if it did) and the mean energy at the final states.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn finish(
        model: &EnergyModel,
        ctx: &BatchContext,
        states: Vec<Tensor<2>>,
        eval: Evaluation,
        mut stats: SettleStats,
        residual_curve: Vec<(usize, f32)>,
        stopped: &[Option<usize>],
        beta: f32,
    ) -> Self {
        stats.sample_steps = stopped
            .iter()
            .map(|s| s.unwrap_or(stats.steps) as f32)
            .sum::<f32>()
            / stopped.len().max(1) as f32;
        let energy = model.per_sample_energy(ctx, &eval, beta).mean();
        stats.energy = to_host(&energy)[0];
        Self {
            states,
            eval,
            stats,
            residual_curve,
        }
    }
}
