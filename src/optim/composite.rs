//! The composite optimizer: compression with error feedback, momentum, a geometry-aware
//! update rule, decoupled weight decay and a spectral constraint, with explicit routing of
//! matrices and vectors.
//!
//! Per step, with learning rate `lr_t` from the [`Schedule`]:
//!
//! 1. NaN/Inf guard over every gradient (one host read; a non-finite gradient is a typed
//!    error and the parameters are left untouched), then optional global norm clipping.
//! 2. Matrices (2-D weights; conv kernels as `out x in*k*k`):
//!    * feedback: `c = C(g + beta e)`, `e <- g + beta e - c`, where `C` is the
//!      [`UpdateRule::LowRank`] compression or the rank-`rank_frac` compression that
//!      [`Feedback::ErrorFeedback`] puts in front of a rule that does not compress (error
//!      feedback without any compression is rejected: it would be a silent no-op);
//!    * momentum `m <- mu m + c`, using `m` (heavy-ball) or `c + mu m` (Nesterov);
//!    * the update rule turns that into a direction `d`: as is ([`UpdateRule::Plain`],
//!      [`UpdateRule::LowRank`]), orthogonalised ([`UpdateRule::Muon`]), low-rank
//!      orthogonalised with its own momentum ([`UpdateRule::Dion`]), Fisher-whitened
//!      ([`UpdateRule::Fisher`]) or Adam-normalised ([`UpdateRule::Adam`], which uses its
//!      own first moment instead of `mu`);
//!    * `W <- W (1 - lr_t wd) - lr_t d`, then the [`Constraint`].
//! 3. Vectors (biases, norm gains): momentum SGD or Adam ([`VectorRule`]) with their own
//!    learning rate `vector_lr` (default `lr`) and no weight decay.

use burn::tensor::TensorData;
use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};

use super::elementwise;
use super::linalg::{
    NsIteration, frobenius, newton_schulz, normalize_columns, orthonormalize_columns,
    spectral_norm_host, spectral_norm_on_device,
};
use super::{OptimError, Optimizer, OptimizerState, check_adam, check_arity, check_range};
use crate::device::{Tensor, from_host, host_f32, into_host, to_host};
use crate::model::GradFactors;
use crate::model::{ParamInfo, ParamKind};

/// Learning-rate schedule, as a factor of the base rate at step `t` (0-based).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Schedule {
    /// Factor 1.
    Constant,
    /// `gamma^(t / every)`.
    Step {
        /// Steps between decays.
        every: usize,
        /// Decay factor in (0, 1].
        gamma: f64,
    },
    /// Linear warm-up from `1/warmup` to 1 over `warmup` steps, then a cosine from 1 down to
    /// `floor` at step `total` (and `floor` after it).
    Cosine {
        /// Warm-up steps.
        warmup: usize,
        /// Step at which the cosine reaches `floor`.
        total: usize,
        /// Final factor in [0, 1].
        floor: f64,
    },
}

impl Schedule {
    /// The factor at step `t`.
    pub fn factor(&self, t: usize) -> f64 {
        match *self {
            Self::Constant => 1.0,
            Self::Step { every, gamma } => gamma.powi((t / every) as i32),
            Self::Cosine {
                warmup,
                total,
                floor,
            } => {
                if t < warmup {
                    (t + 1) as f64 / warmup as f64
                } else if t >= total {
                    floor
                } else {
                    let span = (total - warmup).max(1) as f64;
                    let progress = (t - warmup) as f64 / span;
                    floor + (1.0 - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
                }
            }
        }
    }

    fn validate(&self) -> Result<(), OptimError> {
        match *self {
            Self::Constant => Ok(()),
            Self::Step { every, gamma } => {
                check_range(
                    "schedule.every",
                    every as f64,
                    every > 0,
                    "must be positive",
                )?;
                check_range(
                    "schedule.gamma",
                    gamma,
                    gamma > 0.0 && gamma <= 1.0,
                    "must be in (0, 1]",
                )
            }
            Self::Cosine {
                warmup,
                total,
                floor,
            } => {
                check_range(
                    "schedule.total",
                    total as f64,
                    total > warmup,
                    "must exceed the warm-up steps",
                )?;
                check_range(
                    "schedule.floor",
                    floor,
                    (0.0..=1.0).contains(&floor),
                    "must be in [0, 1]",
                )
            }
        }
    }
}

/// How a matrix's (compressed, momentum-averaged) gradient becomes its update direction.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum UpdateRule {
    /// The direction is the momentum buffer itself (SGD).
    Plain,
    /// Muon: Newton–Schulz orthogonalisation, scaled by `max(1, fan_out/fan_in)^0.5`.
    Muon {
        /// Iterations (5 in the paper).
        ns_steps: usize,
        /// Keller Jordan's quintic ([`NsIteration::DEFAULT`]) or the reference's cubic.
        iteration: NsIteration,
    },
    /// Dion: rank-`r` power iteration warm-started from the previous right factor `Q`:
    /// `B = M + G`, `P = orth(B Q)`, `R = B^T P`, `M <- B - (1 - mu) P R^T` (error feedback
    /// into the momentum), `Q <- colnorm(R)`, direction `P Q^T` with Muon's shape scale.
    /// `r = max(1, floor(rank_frac * min(m, n)))`. Matrices with fewer than `threshold`
    /// entries use Muon (quintic) instead.
    Dion {
        /// Rank as a fraction of the smaller side, in (0, 1].
        rank_frac: f64,
        /// Matrices with fewer entries use the Muon fallback.
        threshold: usize,
        /// Newton–Schulz steps of the fallback.
        ns_steps: usize,
    },
    /// Rank-`r` compression `C(A) = P R^T` (warm-started power iteration, as Dion's, without
    /// orthogonalised output): a lossy update in gradient units, for error feedback.
    LowRank {
        /// Rank as a fraction of the smaller side, in (0, 1].
        rank_frac: f64,
    },
    /// Natural gradient with the diagonal empirical Fisher: `F` is an exponential moving
    /// average (weight `ema` on the past) of the mean squared per-sample gradient, computed
    /// exactly from the estimator's per-sample factors (`mean_b (a_b^2)^T (g_b^2)`); the
    /// direction is `G / (F + damping)`, then orthogonalised (quintic Newton–Schulz) if asked. Matrices without
    /// factors (conv kernels) are not whitened.
    Fisher {
        /// Damping added to `F`.
        damping: f64,
        /// EMA weight of the past estimate, in [0, 1).
        ema: f64,
        /// Newton–Schulz-orthogonalise the whitened direction.
        orthogonalize: bool,
        /// Iterations when orthogonalising.
        ns_steps: usize,
    },
    /// Adam on matrices (its first moment replaces the composite momentum, which must be 0).
    Adam {
        /// First-moment decay.
        beta1: f64,
        /// Second-moment decay.
        beta2: f64,
        /// Denominator floor.
        eps: f64,
    },
}

impl UpdateRule {
    /// Every rule's name, as [`UpdateRule::from_str`](std::str::FromStr) reads it.
    pub const NAMES: [&'static str; 7] = [
        "plain",
        "muon",
        "muon-cubic",
        "dion",
        "lowrank",
        "fisher",
        "adam",
    ];

    /// Muon with 5 Newton–Schulz steps of [`NsIteration::DEFAULT`] (the quintic).
    pub const fn muon() -> Self {
        Self::Muon {
            ns_steps: 5,
            iteration: NsIteration::DEFAULT,
        }
    }

    /// Muon with 5 steps of the reference's cubic iteration (the paper's presets).
    pub const fn muon_cubic() -> Self {
        Self::Muon {
            ns_steps: 5,
            iteration: NsIteration::Cubic,
        }
    }

    /// Dion at rank 0.2 of the smaller side on matrices of at least 100 000 entries (Muon
    /// with 5 steps below).
    pub const fn dion() -> Self {
        Self::Dion {
            rank_frac: 0.2,
            threshold: 100_000,
            ns_steps: 5,
        }
    }

    /// Rank-0.2 compression.
    pub const fn low_rank() -> Self {
        Self::LowRank { rank_frac: 0.2 }
    }

    /// Diagonal empirical Fisher (damping 1e-3, EMA 0.95), then 5 Newton–Schulz steps.
    pub const fn fisher() -> Self {
        Self::Fisher {
            damping: 1e-3,
            ema: 0.95,
            orthogonalize: true,
            ns_steps: 5,
        }
    }

    /// Adam with beta 0.9, 0.999 and eps 1e-8.
    pub const fn adam() -> Self {
        Self::Adam {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }

    /// The rule's name in [`UpdateRule::NAMES`] (a rule with other settings than its
    /// named constructor's has the same name).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Plain => "plain",
            Self::Muon {
                iteration: NsIteration::Cubic,
                ..
            } => "muon-cubic",
            Self::Muon { .. } => "muon",
            Self::Dion { .. } => "dion",
            Self::LowRank { .. } => "lowrank",
            Self::Fisher { .. } => "fisher",
            Self::Adam { .. } => "adam",
        }
    }

    /// Whether the rule compresses by itself (so error feedback needs no compression in
    /// front of it).
    pub fn compresses(&self) -> bool {
        matches!(self, Self::LowRank { .. } | Self::Dion { .. })
    }
}

impl std::str::FromStr for UpdateRule {
    type Err = OptimError;

    /// One of [`UpdateRule::NAMES`], with its named constructor's settings.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.trim() {
            "plain" => Self::Plain,
            "muon" => Self::muon(),
            "muon-cubic" => Self::muon_cubic(),
            "dion" => Self::dion(),
            "lowrank" => Self::low_rank(),
            "fisher" => Self::fisher(),
            "adam" => Self::adam(),
            other => return Err(OptimError::UnknownUpdateRule(other.to_string())),
        })
    }
}

/// The update of vectors (biases and normalisation gains).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VectorRule {
    /// Momentum SGD with the composite momentum.
    Plain,
    /// Adam (beta 0.9, 0.999, eps 1e-8).
    Adam,
}

impl std::str::FromStr for VectorRule {
    type Err = OptimError;

    /// `plain` or `adam`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "plain" => Ok(Self::Plain),
            "adam" => Ok(Self::Adam),
            other => Err(OptimError::UnknownVectorRule(other.to_string())),
        }
    }
}

/// A constraint applied to matrices after their update.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Constraint {
    /// None.
    None,
    /// Spectral bound: every `every` steps, estimate `sigma_max(W)` by power iteration
    /// warm-started from the previous left vector and rescale `W <- W gamma / sigma` when
    /// `sigma > gamma` (conv kernels as flattened matrices: a bound on that matrix, not on
    /// the convolution operator). Power iteration approaches sigma from below, so the
    /// bound holds to the estimate's accuracy: `tol` keeps iterating (up to 10x
    /// `power_iters` rounds, one host read each) while the estimate still grows by more
    /// than `tol` relative.
    Spectral {
        /// The bound, > 0.
        gamma: f64,
        /// Power-iteration rounds per application (at least).
        power_iters: usize,
        /// Apply after every `every`-th step (1: every step).
        every: usize,
        /// Relative growth of the estimate below which iteration stops (0: exactly
        /// `power_iters` rounds, no host reads).
        tol: f64,
    },
}

impl Constraint {
    /// The spectral bound `gamma` with 3 power-iteration rounds every step and tolerance
    /// 1e-4.
    pub const fn spectral(gamma: f64) -> Self {
        Self::Spectral {
            gamma,
            power_iters: 3,
            every: 1,
            tol: 1e-4,
        }
    }
}

/// Error feedback of lossy updates.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Feedback {
    /// None.
    None,
    /// Carry the compression residual `e` and re-inject `beta e` into the next gradient.
    /// The compression is the [`UpdateRule::LowRank`] rule's own, or, for the rules that do
    /// not compress (plain, Muon, Fisher, Adam), a rank-`rank_frac` compression in front of
    /// the rule. Without a compression there is no residual, so that is an invalid option
    /// (as is Dion, which feeds its own residual back into its momentum).
    ErrorFeedback {
        /// Decay of the carried residual, in (0, 1].
        beta: f64,
        /// Rank fraction of the compression in front of a rule that does not compress.
        #[serde(default)]
        rank_frac: Option<f64>,
    },
}

/// All options of a [`CompositeOptimizer`].
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CompositeConfig {
    /// Base learning rate of matrices.
    pub lr: f64,
    /// Learning rate of vectors (`None`: `lr`).
    pub vector_lr: Option<f64>,
    /// Schedule of both rates.
    pub schedule: Schedule,
    /// Momentum in [0, 1).
    pub momentum: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// Decoupled weight decay of matrices (`W <- W (1 - lr_t wd)`).
    pub weight_decay: f64,
    /// Clip the global gradient norm to this value.
    pub clip_norm: Option<f64>,
    /// Matrix update rule.
    pub update: UpdateRule,
    /// Vector update rule.
    pub vector_update: VectorRule,
    /// Constraint on matrices.
    pub constraint: Constraint,
    /// Feedback of lossy updates.
    pub feedback: Feedback,
    /// Seed of random initial factors (Dion, power iteration).
    pub seed: u64,
}

impl Default for CompositeConfig {
    /// Momentum SGD: lr 0.01, momentum 0.9, no decay, no clipping, plain rules.
    fn default() -> Self {
        Self {
            lr: 0.01,
            vector_lr: None,
            schedule: Schedule::Constant,
            momentum: 0.9,
            nesterov: false,
            weight_decay: 0.0,
            clip_norm: None,
            update: UpdateRule::Plain,
            vector_update: VectorRule::Plain,
            constraint: Constraint::None,
            feedback: Feedback::None,
            seed: 0,
        }
    }
}

impl CompositeConfig {
    /// Momentum SGD (heavy-ball or Nesterov) with decoupled weight decay of matrices.
    pub fn sgd(lr: f64, momentum: f64, nesterov: bool, weight_decay: f64) -> Self {
        Self {
            lr,
            momentum,
            nesterov,
            weight_decay,
            ..Self::default()
        }
    }

    /// Adam on matrices and vectors (beta 0.9, 0.999, eps 1e-8) with decoupled weight
    /// decay of matrices (AdamW).
    pub fn adam(lr: f64, weight_decay: f64) -> Self {
        Self {
            lr,
            momentum: 0.0,
            weight_decay,
            update: UpdateRule::adam(),
            vector_update: VectorRule::Adam,
            ..Self::default()
        }
    }

    /// Checks every option.
    pub fn validate(&self) -> Result<(), OptimError> {
        check_range("lr", self.lr, self.lr > 0.0, "must be positive")?;
        if let Some(v) = self.vector_lr {
            check_range("vector_lr", v, v > 0.0, "must be positive")?;
        }
        self.schedule.validate()?;
        check_range(
            "momentum",
            self.momentum,
            (0.0..1.0).contains(&self.momentum),
            "must be in [0, 1)",
        )?;
        check_range(
            "weight_decay",
            self.weight_decay,
            self.weight_decay >= 0.0,
            "must be >= 0",
        )?;
        if let Some(c) = self.clip_norm {
            check_range("clip_norm", c, c > 0.0, "must be positive")?;
        }
        let frac = |name, f: f64| check_range(name, f, f > 0.0 && f <= 1.0, "must be in (0, 1]");
        let steps = |name, n: usize| check_range(name, n as f64, n > 0, "must be at least 1");
        match self.update {
            UpdateRule::Plain => {}
            UpdateRule::Muon { ns_steps, .. } => steps("ns_steps", ns_steps)?,
            UpdateRule::Dion {
                rank_frac,
                ns_steps,
                ..
            } => {
                frac("rank_frac", rank_frac)?;
                steps("ns_steps", ns_steps)?;
            }
            UpdateRule::LowRank { rank_frac } => frac("rank_frac", rank_frac)?,
            UpdateRule::Fisher {
                damping,
                ema,
                ns_steps,
                orthogonalize,
            } => {
                check_range("fisher.damping", damping, damping > 0.0, "must be positive")?;
                check_range(
                    "fisher.ema",
                    ema,
                    (0.0..1.0).contains(&ema),
                    "must be in [0, 1)",
                )?;
                if orthogonalize {
                    steps("ns_steps", ns_steps)?;
                }
            }
            UpdateRule::Adam { beta1, beta2, eps } => {
                check_adam(beta1, beta2, eps)?;
                check_range(
                    "momentum",
                    self.momentum,
                    self.momentum == 0.0,
                    "must be 0 with the adam update (beta1 is its momentum)",
                )?;
            }
        }
        if let Constraint::Spectral {
            gamma,
            power_iters,
            every,
            tol,
        } = self.constraint
        {
            check_range("spectral.tol", tol, tol >= 0.0, "must be >= 0")?;
            check_range("spectral.gamma", gamma, gamma > 0.0, "must be positive")?;
            steps("spectral.power_iters", power_iters)?;
            steps("spectral.every", every)?;
        }
        if let Feedback::ErrorFeedback { beta, rank_frac } = self.feedback {
            frac("error_feedback.beta", beta)?;
            match (self.update, rank_frac) {
                (UpdateRule::LowRank { .. }, None) => {}
                (UpdateRule::LowRank { .. } | UpdateRule::Dion { .. }, Some(f)) => {
                    return Err(OptimError::InvalidOption {
                        name: "error_feedback.rank_frac",
                        value: f,
                        reason: "must be unset with the lowrank and dion updates (they compress themselves)",
                    });
                }
                (UpdateRule::Dion { .. }, None) => {
                    return Err(OptimError::InvalidOption {
                        name: "error_feedback.beta",
                        value: beta,
                        reason: "error feedback does not apply to dion (it feeds its own residual back into its momentum)",
                    });
                }
                (_, Some(f)) => frac("error_feedback.rank_frac", f)?,
                (_, None) => {
                    return Err(OptimError::InvalidOption {
                        name: "error_feedback.beta",
                        value: beta,
                        reason: "error feedback needs a lossy step: set a compression rank_frac or use the lowrank update",
                    });
                }
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Default)]
struct ParamState {
    momentum: Option<Tensor<2>>,
    adam: Option<(Tensor<2>, Tensor<2>)>,
    right: Option<Tensor<2>>,
    error: Option<Tensor<2>>,
    fisher: Option<Tensor<2>>,
    spectral_u: Option<Tensor<2>>,
}

impl ParamState {
    /// The momentum direction of `c` (`c` itself without momentum), updating the buffer.
    fn heavy_ball(&mut self, config: &CompositeConfig, c: Tensor<2>) -> Tensor<2> {
        let mu = config.momentum as f32;
        if mu == 0.0 {
            return c;
        }
        let nesterov = config.nesterov;
        let state = self.momentum.take();
        if host_f32(&c) && state.as_ref().is_none_or(host_f32) {
            let (dims, device) = (c.dims(), c.device());
            let mut c_host = into_host(c);
            // A zero buffer gives the first step's `0 mu + c = c`.
            let mut m = state.map_or_else(|| vec![0.0; c_host.len()], into_host);
            // `c_host` becomes the direction: the buffer's values (heavy ball) or Nesterov's
            // look-ahead, as its own copy (the caller moves it into host buffers again,
            // which a tensor shared with the state would make three copies; see
            // `crate::device::to_host`).
            elementwise::momentum(&mut m, &mut c_host, mu, nesterov);
            self.momentum = Some(from_host(m, dims, &device));
            return from_host(c_host, dims, &device);
        }
        let buf = match state {
            Some(m) => m.mul_scalar(mu) + c.clone(),
            None => c.clone(),
        };
        self.momentum = Some(buf.clone());
        if nesterov {
            c + buf.mul_scalar(mu)
        } else {
            buf
        }
    }

    /// Adam's direction for `g` at step `step` (0-based), updating its moments.
    fn adam_direction(
        &mut self,
        step: usize,
        g: Tensor<2>,
        beta1: f64,
        beta2: f64,
        eps: f64,
    ) -> Tensor<2> {
        let t = (step + 1) as i32;
        let (b1, b2) = (beta1 as f32, beta2 as f32);
        let bc1 = 1.0 - beta1.powi(t);
        let bc2 = 1.0 - beta2.powi(t);
        let state = self.adam.take();
        if host_f32(&g)
            && state
                .as_ref()
                .is_none_or(|(m, v)| host_f32(m) && host_f32(v))
        {
            let (dims, device) = (g.dims(), g.device());
            let mut d = into_host(g);
            // Zero moments give the first step's `g (1 - beta)` exactly.
            let (mut m, mut v) = state.map_or_else(
                || (vec![0.0; d.len()], vec![0.0; d.len()]),
                |(m, v)| (into_host(m), into_host(v)),
            );
            let step = elementwise::AdamStep {
                beta1: b1,
                beta2: b2,
                eps: eps as f32,
                correction1: bc1 as f32,
                correction2: bc2 as f32,
            };
            elementwise::adam(&mut m, &mut v, &mut d, step);
            self.adam = Some((from_host(m, dims, &device), from_host(v, dims, &device)));
            return from_host(d, dims, &device);
        }
        let (m, v) = match state {
            Some((m, v)) => (
                m.mul_scalar(b1) + g.clone().mul_scalar(1.0 - b1),
                v.mul_scalar(b2) + g.clone().square().mul_scalar(1.0 - b2),
            ),
            None => (
                g.clone().mul_scalar(1.0 - b1),
                g.square().mul_scalar(1.0 - b2),
            ),
        };
        let d = (m.clone().div_scalar(bc1 as f32))
            / (v.clone()
                .div_scalar(bc2 as f32)
                .sqrt()
                .add_scalar(eps as f32));
        self.adam = Some((m, v));
        d
    }

    /// The direction of a matrix of kind `kind` from its (compressed) gradient `x` under
    /// every update rule but Dion's data-parallel low-rank one (which draws its starting
    /// factor; [`CompositeOptimizer::matrix_direction`] handles it): heavy-ball momentum,
    /// then Muon's orthogonalisation, the Fisher whitening, or Adam.
    fn rule_direction(
        &mut self,
        config: &CompositeConfig,
        step: usize,
        kind: ParamKind,
        x: Tensor<2>,
        factors: Option<&GradFactors>,
    ) -> Tensor<2> {
        match config.update {
            UpdateRule::Plain | UpdateRule::LowRank { .. } => self.heavy_ball(config, x),
            // Dion's rule on matrices below its size threshold (the optimizer's
            // `matrix_direction` takes the others): Muon with the quintic.
            UpdateRule::Dion { ns_steps, .. } => {
                let x = self.heavy_ball(config, x);
                scaled(
                    newton_schulz(x, ns_steps, NsIteration::Quintic),
                    shape_scale(kind),
                )
            }
            UpdateRule::Muon {
                ns_steps,
                iteration,
            } => {
                let x = self.heavy_ball(config, x);
                scaled(newton_schulz(x, ns_steps, iteration), shape_scale(kind))
            }
            UpdateRule::Fisher {
                damping,
                ema,
                orthogonalize,
                ns_steps,
            } => {
                let x = self.heavy_ball(config, x);
                let whitened = match factors {
                    Some(f) => {
                        let n = f.inputs.dims()[0] as f32;
                        let fresh = f
                            .inputs
                            .clone()
                            .square()
                            .transpose()
                            .matmul(f.output_grads.clone().square())
                            .div_scalar(n);
                        let fresh = match kind {
                            ParamKind::Matrix {
                                out_major: true, ..
                            } => fresh.transpose(),
                            _ => fresh,
                        };
                        let fisher = match self.fisher.take() {
                            Some(old) => {
                                old.mul_scalar(ema as f32) + fresh.mul_scalar((1.0 - ema) as f32)
                            }
                            None => fresh,
                        };
                        self.fisher = Some(fisher.clone());
                        x / fisher.add_scalar(damping as f32)
                    }
                    None => x,
                };
                if orthogonalize {
                    scaled(
                        newton_schulz(whitened, ns_steps, NsIteration::Quintic),
                        shape_scale(kind),
                    )
                } else {
                    whitened
                }
            }
            UpdateRule::Adam { beta1, beta2, eps } => {
                self.adam_direction(step, x, beta1, beta2, eps)
            }
        }
    }

    /// `w` scaled by `gamma / max(sigma, gamma)`, `sigma` its largest singular value by
    /// power iteration warm-started from `u` (`force` rounds, or the constraint's own with
    /// its tolerance); keeps the new vector. Nothing without a spectral constraint.
    fn bound(
        &mut self,
        constraint: &Constraint,
        w: Tensor<2>,
        u: Tensor<2>,
        force: Option<usize>,
    ) -> Tensor<2> {
        let Constraint::Spectral {
            gamma,
            power_iters,
            tol,
            ..
        } = *constraint
        else {
            return w;
        };
        let rounds = force.unwrap_or(power_iters);
        if host_f32(&w) && host_f32(&u) {
            // On the host, on W's own buffer (fresh from the descent, so moved without a
            // copy), with the same factor as on a device; a factor of exactly 1 (the bound
            // not reached) skips the pass over W. A NaN estimate makes W NaN, as on a
            // device, for the trainer's finiteness check.
            let ([m, n], device) = (w.dims(), w.device());
            let mut values = into_host(w);
            let mut u_values = into_host(u);
            let sigma = spectral_norm_host(&values, m, n, &mut u_values, rounds, tol).abs();
            self.spectral_u = Some(from_host(u_values, [1, m], &device));
            let gamma = gamma as f32;
            let factor = if sigma.is_nan() {
                f32::NAN
            } else {
                sigma.max(gamma).recip() * gamma
            };
            if factor != 1.0 {
                elementwise::scale(&mut values, factor);
            }
            return from_host(values, [m, n], &device);
        }
        let (u, sigma) = spectral_norm_on_device(&w, u, rounds, tol);
        self.spectral_u = Some(u);
        // W * gamma / max(sigma, gamma), on the device.
        let factor = sigma
            .abs()
            .clamp_min(gamma as f32)
            .recip()
            .mul_scalar(gamma as f32);
        w * factor
    }

    /// The parameter's step with no ranks and no compression: a matrix's direction
    /// ([`ParamState::rule_direction`]), descent with weight decay, then the spectral bound
    /// when `u` (its warm start) is given; a vector's momentum or Adam direction and
    /// descent at `vector_lr`.
    fn update(
        &mut self,
        config: &CompositeConfig,
        step: usize,
        kind: ParamKind,
        (p, g, u): (Tensor<2>, Tensor<2>, Option<Tensor<2>>),
        factors: Option<&GradFactors>,
        rates: Rates,
    ) -> Tensor<2> {
        match kind {
            ParamKind::Matrix { .. } => {
                let d = self.rule_direction(config, step, kind, g, factors);
                let w = CompositeOptimizer::descend(p, d, rates.decay, rates.lr);
                match u {
                    Some(u) => self.bound(&config.constraint, w, u, None),
                    None => w,
                }
            }
            ParamKind::Vector => {
                let d = match config.vector_update {
                    VectorRule::Plain => self.heavy_ball(config, g),
                    VectorRule::Adam => self.adam_direction(step, g, 0.9, 0.999, 1e-8),
                };
                CompositeOptimizer::descend(p, d, 1.0, rates.vector_lr)
            }
        }
    }
}

/// The step's learning rates: `lr` and `decay = 1 - lr wd` for matrices, `vector_lr` for
/// vectors.
#[derive(Debug, Clone, Copy)]
struct Rates {
    lr: f32,
    vector_lr: f32,
    decay: f32,
}

/// One parameter's share of an independent step: its index, kind and state, value,
/// gradient, the spectral bound's vector when the bound applies, and its gradient factors.
struct ParamJob<'a> {
    k: usize,
    kind: ParamKind,
    state: &'a mut ParamState,
    p: Tensor<2>,
    g: Tensor<2>,
    u: Option<Tensor<2>>,
    factors: Option<&'a GradFactors>,
}

impl ParamJob<'_> {
    /// Its update's cost, to order the jobs: Newton–Schulz's `m n min(m, n)` for a
    /// matrix, the length of a vector.
    fn cost(&self) -> usize {
        let [m, n] = self.p.dims();
        match self.kind {
            ParamKind::Matrix { .. } => m * n * m.min(n),
            ParamKind::Vector => m * n,
        }
    }
}

/// `f` of every job, in their order: the caller runs the first while the pool's other
/// workers may take the rest, one at a time (so jobs listed largest first start on
/// different workers).
fn largest_first<J: Send, R: Send>(jobs: Vec<J>, f: &(impl Fn(J) -> R + Sync)) -> Vec<R> {
    let mut jobs = jobs.into_iter();
    let Some(first) = jobs.next() else {
        return Vec::new();
    };
    let rest: Vec<J> = jobs.collect();
    if rest.is_empty() {
        return vec![f(first)];
    }
    let (head, mut tail) = rayon::join(|| f(first), || largest_first(rest, f));
    tail.insert(0, head);
    tail
}

/// The composite optimizer (see the module docs for the order of operations).
#[derive(Debug, Clone)]
pub struct CompositeOptimizer {
    config: CompositeConfig,
    info: Vec<ParamInfo>,
    state: Vec<ParamState>,
    step: usize,
    rng: Xoshiro256PlusPlus,
    split: Option<std::rc::Rc<dyn super::WorkSplit>>,
    /// Whether each rank's Dion momenta are the whole run's (fresh, loaded or
    /// consolidated) rather than this rank's share of them (see
    /// [`CompositeOptimizer::shared_dion`]).
    replicated: bool,
}

fn rank(frac: f64, dims: [usize; 2]) -> usize {
    let small = dims[0].min(dims[1]);
    ((small as f64 * frac).floor() as usize).clamp(1, small)
}

/// Exchanges `local` (one matrix per item of `items`, shaped `shape(item)`, packed in
/// order) with every rank and returns each matrix summed over the ranks in rank order.
fn summed_exchange(
    split: &dyn super::WorkSplit,
    local: &[f32],
    items: &[Tensor<2>],
    shape: impl Fn(&Tensor<2>) -> [usize; 2],
) -> Result<Vec<Tensor<2>>, OptimError> {
    let all = split.exchange(local)?;
    let mut at = 0;
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let dims = shape(item);
        let len = dims[0] * dims[1];
        let mut sum = vec![0f32; len];
        for (r, part) in all.iter().enumerate() {
            let part = part.get(at..at + len).ok_or_else(|| {
                OptimError::Exchange(format!("rank {r} sent too few Dion factor values"))
            })?;
            for (s, v) in sum.iter_mut().zip(part) {
                *s += v;
            }
        }
        at += len;
        out.push(from_host(sum, dims, &item.device()));
    }
    Ok(out)
}

/// A step's gradients, as tensors or (on a CPU device) as the host buffers they moved into.
enum GradSet {
    Device(Vec<Tensor<2>>),
    Host(Vec<(Vec<f32>, [usize; 2], crate::device::Device)>),
}

/// The tensors of `params`, each replaced by an empty one: taken out, a parameter that
/// nothing else holds is updated in its own buffer.
fn take_all(params: &mut [Tensor<2>]) -> Vec<Tensor<2>> {
    params
        .iter_mut()
        .map(|p| {
            let empty = Tensor::empty([0, 0], &p.device());
            std::mem::replace(p, empty)
        })
        .collect()
}

/// `t * s`, or `t` itself when `s` is exactly 1 (the same values without a pass over
/// them: Muon's shape scale is 1 on every matrix with fewer outputs than inputs).
fn scaled(t: Tensor<2>, s: f32) -> Tensor<2> {
    if s == 1.0 { t } else { t.mul_scalar(s) }
}

fn shape_scale(kind: ParamKind) -> f32 {
    match kind {
        ParamKind::Matrix {
            fan_in, fan_out, ..
        } => (fan_out as f32 / fan_in as f32).max(1.0).sqrt(),
        ParamKind::Vector => 1.0,
    }
}

impl CompositeOptimizer {
    /// A composite optimizer for parameters described by `info` (a network's
    /// [`crate::model::Network::param_info`]).
    pub fn new(config: CompositeConfig, info: &[ParamInfo]) -> Result<Self, OptimError> {
        config.validate()?;
        Ok(Self {
            config,
            info: info.to_vec(),
            state: vec![ParamState::default(); info.len()],
            step: 0,
            rng: Xoshiro256PlusPlus::seed_from_u64(config.seed),
            split: None,
            replicated: true,
        })
    }

    /// Muon's Newton–Schulz directions for the matrices `xs` (their momenta; `None` for
    /// vectors), shared between the ranks of `split`: a matrix costing more than an even
    /// share of the whole is orthogonalised by every rank together, each multiplying its
    /// share of every product's row panels ([`super::linalg::newton_schulz_shared`], where it runs
    /// on the host); each rank orthogonalises the other matrices it owns
    /// ([`super::assign_owners`] by Newton–Schulz cost), then every rank receives every
    /// owner's results, so all ranks hold all directions, the single process's bits.
    fn shared_newton_schulz(
        &self,
        split: &dyn super::WorkSplit,
        xs: Vec<Option<Tensor<2>>>,
        steps: usize,
        iteration: NsIteration,
    ) -> Result<Vec<Option<Tensor<2>>>, OptimError> {
        let costs: Vec<f64> = xs
            .iter()
            .map(|x| match x {
                Some(x) => {
                    let [m, n] = x.dims();
                    (m * n * m.min(n)) as f64
                }
                None => 0.0,
            })
            .collect();
        // One matrix of 784-256-128-10 holds about 85% of the work: split by whole matrices,
        // one rank would do it alone while the others wait.
        let even = costs.iter().sum::<f64>() / split.size() as f64;
        let mut panels: Vec<Option<Tensor<2>>> = vec![None; xs.len()];
        for (k, x) in xs.iter().enumerate() {
            if let Some(x) = x
                && costs[k] > even
                && super::linalg::runs_on_host(x, steps, iteration)
            {
                let d = super::linalg::newton_schulz_shared(x.clone(), steps, iteration, split)?;
                panels[k] = Some(d.mul_scalar(shape_scale(self.info[k].kind)));
            }
        }
        let whole: Vec<f64> = (0..costs.len())
            .map(|k| if panels[k].is_some() { 0.0 } else { costs[k] })
            .collect();
        let owners = super::assign_owners(&whole, split.size());
        let me = split.rank();
        let mut local = Vec::new();
        for (k, x) in xs.iter().enumerate() {
            if let (Some(x), true, None) = (x, owners[k] == me, &panels[k]) {
                let d = newton_schulz(x.clone(), steps, iteration)
                    .mul_scalar(shape_scale(self.info[k].kind));
                local.extend(to_host(&d));
            }
        }
        let all = split.exchange(&local)?;
        let mut at = vec![0usize; all.len()];
        let mut out = Vec::with_capacity(xs.len());
        for (k, x) in xs.into_iter().enumerate() {
            let Some(x) = x else {
                out.push(None);
                continue;
            };
            if let Some(d) = panels[k].take() {
                out.push(Some(d));
                continue;
            }
            let dims = x.dims();
            let (r, len) = (owners[k], dims[0] * dims[1]);
            let part = all
                .get(r)
                .and_then(|p| p.get(at[r]..at[r] + len))
                .ok_or_else(|| {
                    OptimError::Exchange(format!("rank {r} sent too few Newton–Schulz values"))
                })?;
            at[r] += len;
            out.push(Some(from_host(part.to_vec(), dims, &x.device())));
        }
        Ok(out)
    }

    /// The matrices whose gradients stay with their rank under Dion's data-parallel form
    /// (the Dion update, ranks to share with, no gradient clipping, which needs the whole
    /// gradient's norm): those at or above Dion's size threshold.
    fn dion_local(&self) -> Vec<bool> {
        let threshold = match (&self.split, self.config.update, self.config.clip_norm) {
            (Some(_), UpdateRule::Dion { threshold, .. }, None) => threshold,
            _ => return Vec::new(),
        };
        self.info
            .iter()
            .map(|i| match i.kind {
                ParamKind::Matrix {
                    fan_in, fan_out, ..
                } => fan_in * fan_out >= threshold,
                ParamKind::Vector => false,
            })
            .collect()
    }

    /// Dion's data-parallel form (as microsoft/dion's): rank `i` keeps a share `M_i` of
    /// each momentum (the shares sum to the single-process momentum) and receives only its
    /// share `G_i` of the gradient. With `B_i = M_i + G_i`, the ranks exchange the rank-`r`
    /// products `B_i Q` and sum them to `P = B Q`, orthonormalise `P`, exchange `R_i =
    /// B_i^T P` and sum them to `R = B^T P`; each keeps `M_i <- B_i - (1 - mu) P R_i^T`,
    /// so the shares still sum to the single-process `B - (1 - mu) P R^T`. Traffic per
    /// matrix: `r (m + n)` values instead of `m n`. Returns the directions of the `local`
    /// matrices (`None` elsewhere); equal to the single process's up to the sums'
    /// reassociation.
    fn shared_dion(
        &mut self,
        split: &dyn super::WorkSplit,
        grads: &[Tensor<2>],
        local: &[bool],
        rank_frac: f64,
    ) -> Result<Vec<Option<Tensor<2>>>, OptimError> {
        let ks: Vec<usize> = (0..grads.len()).filter(|&k| local[k]).collect();
        if self.replicated {
            // Rank 0 keeps the whole momentum, the others start their shares at zero.
            if split.rank() != 0 {
                for &k in &ks {
                    self.state[k].momentum = None;
                }
            }
            self.replicated = false;
        }
        let mut bs = Vec::with_capacity(ks.len());
        let mut packed = Vec::new();
        for &k in &ks {
            let g = grads[k].clone();
            let b = match self.state[k].momentum.take() {
                Some(m) => m + g,
                None => g,
            };
            let dims = b.dims();
            let q = match self.state[k].right.take() {
                Some(q) => q,
                None => normalize_columns(self.random([dims[1], rank(rank_frac, dims)], &b)),
            };
            packed.extend(to_host(&b.clone().matmul(q)));
            bs.push(b);
        }
        let ps = summed_exchange(split, &packed, &bs, |b| {
            [b.dims()[0], rank(rank_frac, b.dims())]
        })?;
        let ps: Vec<Tensor<2>> = ps.into_iter().map(orthonormalize_columns).collect();
        let mut packed = Vec::new();
        let mut rs_local = Vec::with_capacity(ks.len());
        for (b, p) in bs.iter().zip(&ps) {
            let r = b.clone().transpose().matmul(p.clone());
            packed.extend(to_host(&r));
            rs_local.push(r);
        }
        let rs = summed_exchange(split, &packed, &bs, |b| {
            [b.dims()[1], rank(rank_frac, b.dims())]
        })?;
        let keep = (1.0 - self.config.momentum) as f32;
        let mut out = vec![None; grads.len()];
        for ((((&k, b), p), r_local), r) in ks.iter().zip(bs).zip(ps).zip(rs_local).zip(rs) {
            self.state[k].momentum =
                Some(b - p.clone().matmul(r_local.transpose()).mul_scalar(keep));
            let q = normalize_columns(r);
            self.state[k].right = Some(q.clone());
            out[k] = Some(
                p.matmul(q.transpose())
                    .mul_scalar(shape_scale(self.info[k].kind)),
            );
        }
        Ok(out)
    }

    /// Its options.
    pub fn config(&self) -> &CompositeConfig {
        &self.config
    }

    /// Steps taken.
    pub fn steps_taken(&self) -> usize {
        self.step
    }

    fn random(&mut self, shape: [usize; 2], like: &Tensor<2>) -> Tensor<2> {
        let v: Vec<f32> = (0..shape[0] * shape[1])
            .map(|_| self.rng.random_range(-1.0f32..1.0))
            .collect();
        Tensor::from_data(TensorData::new(v, shape), &like.device())
    }

    /// One rank-r power-iteration round on `a` warm-started from the stored right factor:
    /// `(P, R)` with `P` orthonormal and `R = a^T P`.
    fn low_rank(&mut self, k: usize, a: &Tensor<2>, frac: f64) -> (Tensor<2>, Tensor<2>) {
        let dims = a.dims();
        let r = rank(frac, dims);
        let q = match self.state[k].right.take() {
            Some(q) => q,
            None => normalize_columns(self.random([dims[1], r], a)),
        };
        let p = orthonormalize_columns(a.clone().matmul(q));
        let rt = a.clone().transpose().matmul(p.clone());
        self.state[k].right = Some(normalize_columns(rt.clone()));
        (p, rt)
    }

    /// The descent `p (1 - lr wd) - lr d` (`decay = 1 - lr wd`).
    fn descend(p: Tensor<2>, d: Tensor<2>, decay: f32, lr: f32) -> Tensor<2> {
        if host_f32(&p) && host_f32(&d) {
            let (dims, device) = (p.dims(), p.device());
            // The step is written over the direction's own buffer. `p` is read in place when
            // nothing else holds it (the training loop's step, [`Optimizer::step_in_place`]),
            // through one copy otherwise (burn's element-wise product would allocate and
            // fill one on this thread at a third of the speed).
            let mut d = into_host(d);
            let p = into_host(p);
            elementwise::decay_descend(&mut d, &p, decay, lr);
            return from_host(d, dims, &device);
        }
        let p = if decay != 1.0 { p.mul_scalar(decay) } else { p };
        p - d.mul_scalar(lr)
    }

    /// The direction of matrix `k` from its gradient.
    fn matrix_direction(
        &mut self,
        k: usize,
        g: Tensor<2>,
        factors: Option<&GradFactors>,
    ) -> Tensor<2> {
        let kind = self.info[k].kind;
        // Compression (the LowRank rule's, or error feedback's own) with error feedback.
        let fed = match (self.config.feedback, self.state[k].error.take()) {
            (Feedback::ErrorFeedback { beta, .. }, Some(e)) => g + e.mul_scalar(beta as f32),
            _ => g,
        };
        let compression = match (self.config.update, self.config.feedback) {
            (UpdateRule::LowRank { rank_frac }, _)
            | (
                _,
                Feedback::ErrorFeedback {
                    rank_frac: Some(rank_frac),
                    ..
                },
            ) => Some(rank_frac),
            _ => None,
        };
        let compressed = match compression {
            Some(rank_frac) => {
                let (p, rt) = self.low_rank(k, &fed, rank_frac);
                let c = p.matmul(rt.transpose());
                if matches!(self.config.feedback, Feedback::ErrorFeedback { .. }) {
                    self.state[k].error = Some(fed - c.clone());
                }
                c
            }
            _ => fed,
        };
        match self.config.update {
            UpdateRule::Dion {
                rank_frac,
                threshold,
                ..
            } if compressed.dims()[0] * compressed.dims()[1] >= threshold => {
                let b = match self.state[k].momentum.take() {
                    Some(m) => m + compressed,
                    None => compressed,
                };
                let (p, rt) = self.low_rank(k, &b, rank_frac);
                let keep = (1.0 - self.config.momentum) as f32;
                self.state[k].momentum =
                    Some(b - p.clone().matmul(rt.transpose()).mul_scalar(keep));
                let q = self.state[k].right.clone().expect("set by low_rank");
                scaled(p.matmul(q.transpose()), shape_scale(kind))
            }
            _ => {
                let config = &self.config;
                self.state[k].rule_direction(config, self.step, kind, compressed, factors)
            }
        }
    }

    /// The spectral bound's warm-start vector for matrix `k` (`w`) when the bound applies at
    /// this step (`force`: a number of rounds that applies it whatever the step): the
    /// stored one, or a random unit vector drawn now. `None` when it does not apply.
    fn bound_vector(&mut self, k: usize, w: &Tensor<2>, force: Option<usize>) -> Option<Tensor<2>> {
        let Constraint::Spectral { every, .. } = self.config.constraint else {
            return None;
        };
        if force.is_none() && !(self.step + 1).is_multiple_of(every) {
            return None;
        }
        Some(match self.state[k].spectral_u.take() {
            Some(u) => u,
            None => {
                let u = self.random([1, w.dims()[0]], w);
                u.clone() / frobenius(&u)
            }
        })
    }

    /// Matrix `k` under the spectral bound, when it applies at this step.
    fn constrain(&mut self, k: usize, w: Tensor<2>, force: Option<usize>) -> Tensor<2> {
        match self.bound_vector(k, &w, force) {
            Some(u) => self.state[k].bound(&self.config.constraint, w, u, force),
            None => w,
        }
    }

    /// A step in which every parameter's update reads only its own state and draws
    /// nothing (no ranks, no compression): the spectral bound's missing vectors are drawn
    /// first, in parameter order (where the sequential order draws them too), then the
    /// parameters are updated independently: in parallel on the pool's workers when it has
    /// several and the tensors are on the host, the largest first (one worker takes the
    /// first matrix's Newton–Schulz while the others take the smaller matrices, then help
    /// with its row panels). Each update is the same computation on any number of threads.
    fn independent_step(
        &mut self,
        params: Vec<Tensor<2>>,
        grads: Vec<Tensor<2>>,
        factors: &[Option<GradFactors>],
        rates: Rates,
    ) -> Vec<Tensor<2>> {
        let vectors: Vec<Option<Tensor<2>>> = (0..params.len())
            .map(|k| match self.info[k].kind {
                ParamKind::Matrix { .. } => self.bound_vector(k, &params[k], None),
                ParamKind::Vector => None,
            })
            .collect();
        let parallel = crate::device::threads() > 1 && params.iter().chain(&grads).all(host_f32);
        let (config, step) = (&self.config, self.step);
        let mut jobs: Vec<ParamJob<'_>> = params
            .into_iter()
            .zip(grads)
            .zip(vectors)
            .zip(self.state.iter_mut().zip(&self.info))
            .enumerate()
            .map(|(k, (((p, g), u), (state, info)))| ParamJob {
                k,
                kind: info.kind,
                state,
                p,
                g,
                u,
                factors: factors.get(k).and_then(Option::as_ref),
            })
            .collect();
        let update = |job: ParamJob<'_>| {
            let ParamJob {
                k,
                kind,
                state,
                p,
                g,
                u,
                factors,
            } = job;
            (
                k,
                state.update(config, step, kind, (p, g, u), factors, rates),
            )
        };
        let mut out = if parallel {
            jobs.sort_by_key(|j| std::cmp::Reverse(j.cost()));
            crate::device::on_workers(|| largest_first(jobs, &update))
        } else {
            jobs.into_iter().map(update).collect()
        };
        out.sort_by_key(|(k, _)| *k);
        out.into_iter().map(|(_, p)| p).collect()
    }

    fn guard_and_clip(&self, grads: Vec<Tensor<2>>) -> Result<Vec<Tensor<2>>, OptimError> {
        let host = grads.iter().all(host_f32);
        let (grads, values) = if host {
            let mut values = Vec::with_capacity(grads.len());
            let mut buffers = Vec::with_capacity(grads.len());
            for g in grads {
                let (dims, device) = (g.dims(), g.device());
                let buf = into_host(g);
                values.push(crate::model::kernels::lane_sum_squares(&buf));
                buffers.push((buf, dims, device));
            }
            (GradSet::Host(buffers), values)
        } else {
            let norms: Vec<Tensor<2>> = grads
                .iter()
                .map(|g| g.clone().square().sum().reshape([1, 1]))
                .collect();
            let values = to_host(&Tensor::cat(norms, 1));
            (GradSet::Device(grads), values)
        };
        if let Some(bad) = values.iter().position(|v| !v.is_finite()) {
            return Err(OptimError::NonFinite {
                param: self
                    .info
                    .get(bad)
                    .map_or_else(|| format!("#{bad}"), |i| i.name.clone()),
            });
        }
        let total = values.iter().map(|&v| v as f64).sum::<f64>().sqrt();
        let clip = match self.config.clip_norm {
            Some(max) if total > max => Some((max / total) as f32),
            _ => None,
        };
        Ok(match grads {
            GradSet::Device(grads) => match clip {
                Some(s) => grads.into_iter().map(|g| g.mul_scalar(s)).collect(),
                None => grads,
            },
            GradSet::Host(buffers) => buffers
                .into_iter()
                .map(|(mut buf, dims, device)| {
                    if let Some(s) = clip {
                        elementwise::scale(&mut buf, s);
                    }
                    from_host(buf, dims, &device)
                })
                .collect(),
        })
    }
}

impl Optimizer for CompositeOptimizer {
    fn learning_rate(&self) -> f64 {
        self.config.lr * self.config.schedule.factor(self.step)
    }

    fn step(
        &mut self,
        params: Vec<Tensor<2>>,
        grads: Vec<Tensor<2>>,
    ) -> Result<Vec<Tensor<2>>, OptimError> {
        self.step_with_factors(params, grads, &[])
    }

    fn needs_factors(&self) -> bool {
        matches!(self.config.update, UpdateRule::Fisher { .. })
    }

    fn step_with_factors(
        &mut self,
        mut params: Vec<Tensor<2>>,
        grads: Vec<Tensor<2>>,
        factors: &[Option<GradFactors>],
    ) -> Result<Vec<Tensor<2>>, OptimError> {
        self.step_in_place(&mut params, grads, factors)?;
        Ok(params)
    }

    /// Every check, the gradient guard and the exchanges with other ranks run before the
    /// first parameter is taken out of `params`; the updates that follow cannot fail.
    fn step_in_place(
        &mut self,
        params: &mut [Tensor<2>],
        grads: Vec<Tensor<2>>,
        factors: &[Option<GradFactors>],
    ) -> Result<(), OptimError> {
        check_arity(params.len(), grads.len())?;
        check_arity(params.len(), self.info.len())?;
        let grads = self.guard_and_clip(grads)?;
        let factor = self.config.schedule.factor(self.step);
        let lr = (self.config.lr * factor) as f32;
        let vector_lr = (self.config.vector_lr.unwrap_or(self.config.lr) * factor) as f32;
        let decay = 1.0 - lr * self.config.weight_decay as f32;
        let rates = Rates {
            lr,
            vector_lr,
            decay,
        };
        if self.split.is_none()
            && !self.config.update.compresses()
            && self.config.feedback == Feedback::None
        {
            let out = self.independent_step(take_all(params), grads, factors, rates);
            super::put_back(params, out);
            self.step += 1;
            return Ok(());
        }
        // With ranks to share it, Muon's Newton–Schulz (most of a Muon step) is split
        // between them. Only without error feedback: its compression draws from the
        // random stream, whose order across parameters must not change.
        let shared = match (&self.split, self.config.update, self.config.feedback) {
            (
                Some(split),
                UpdateRule::Muon {
                    ns_steps,
                    iteration,
                },
                Feedback::None,
            ) => Some((split.clone(), ns_steps, iteration)),
            _ => None,
        };
        let dion_local = self.dion_local();
        let directions: Vec<Option<Tensor<2>>> = match (&shared, &self.split, self.config.update) {
            (_, Some(split), UpdateRule::Dion { rank_frac, .. }) if !dion_local.is_empty() => {
                let split = split.clone();
                self.shared_dion(split.as_ref(), &grads, &dion_local, rank_frac)?
            }
            (Some((split, steps, iteration)), _, _) => {
                let momenta = grads
                    .iter()
                    .enumerate()
                    .map(|(k, g)| match self.info[k].kind {
                        ParamKind::Matrix { .. } => {
                            Some(self.state[k].heavy_ball(&self.config, g.clone()))
                        }
                        ParamKind::Vector => None,
                    })
                    .collect();
                self.shared_newton_schulz(split.as_ref(), momenta, *steps, *iteration)?
            }
            _ => vec![None; grads.len()],
        };
        let mut out = Vec::with_capacity(params.len());
        let taken = take_all(params);
        for (k, ((p, g), shared_d)) in taken.into_iter().zip(grads).zip(directions).enumerate() {
            let updated = match self.info[k].kind {
                ParamKind::Matrix { .. } => {
                    let d = match shared_d {
                        Some(d) => d,
                        None => {
                            let f = factors.get(k).and_then(Option::as_ref);
                            self.matrix_direction(k, g, f)
                        }
                    };
                    let w = Self::descend(p, d, decay, lr);
                    self.constrain(k, w, None)
                }
                kind @ ParamKind::Vector => {
                    let config = &self.config;
                    self.state[k].update(config, self.step, kind, (p, g, None), None, rates)
                }
            };
            out.push(updated);
        }
        super::put_back(params, out);
        self.step += 1;
        Ok(())
    }

    fn set_work_split(&mut self, split: Option<std::rc::Rc<dyn super::WorkSplit>>) {
        self.split = split.filter(|s| s.size() > 1);
    }

    fn reduces_across_ranks(&self) -> Vec<bool> {
        self.dion_local()
    }

    /// Sums the ranks' shares of each Dion momentum (rank order), so that every rank holds
    /// the whole run's: what a checkpoint saves and a resumed run, with any number of
    /// ranks, starts from.
    fn consolidate(&mut self) -> Result<(), OptimError> {
        let local = self.dion_local();
        let Some(split) = self.split.clone() else {
            return Ok(());
        };
        if local.is_empty() || self.replicated {
            return Ok(());
        }
        let ks: Vec<usize> = (0..local.len()).filter(|&k| local[k]).collect();
        let mut packed = Vec::new();
        let mut momenta = Vec::with_capacity(ks.len());
        for &k in &ks {
            // Every share was set by the step that made the momenta shares.
            let m = self.state[k].momentum.take().ok_or_else(|| {
                OptimError::State(format!(
                    "{}: no momentum share to consolidate",
                    self.info[k].name
                ))
            })?;
            packed.extend(to_host(&m));
            momenta.push(m);
        }
        let sums = summed_exchange(split.as_ref(), &packed, &momenta, |m| m.dims())?;
        for (&k, m) in ks.iter().zip(sums) {
            self.state[k].momentum = Some(m);
        }
        self.replicated = true;
        Ok(())
    }

    /// Applies the constraint to the initial matrices (30 power-iteration rounds), so it
    /// holds from the first step.
    fn prepare(&mut self, params: Vec<Tensor<2>>) -> Vec<Tensor<2>> {
        params
            .into_iter()
            .enumerate()
            .map(|(k, p)| match self.info.get(k).map(|i| i.kind) {
                Some(ParamKind::Matrix { .. }) => self.constrain(k, p, Some(30)),
                _ => p,
            })
            .collect()
    }

    fn state(&self) -> OptimizerState {
        let mut s = OptimizerState::default();
        s.scalars.push(("step".into(), self.step as f64));
        for (info, st) in self.info.iter().zip(&self.state) {
            let mut put = |role: &str, t: &Option<Tensor<2>>| {
                if let Some(t) = t {
                    s.tensors.push((format!("{}.{role}", info.name), t.clone()));
                }
            };
            put("momentum", &st.momentum);
            put("right", &st.right);
            put("error", &st.error);
            put("fisher", &st.fisher);
            put("spectral_u", &st.spectral_u);
            if let Some((m, v)) = &st.adam {
                s.tensors.push((format!("{}.adam_m", info.name), m.clone()));
                s.tensors.push((format!("{}.adam_v", info.name), v.clone()));
            }
        }
        s
    }

    fn check_state(&self, state: &OptimizerState, params: &[Tensor<2>]) -> Result<(), OptimError> {
        for (name, t) in &state.tensors {
            let bad = |why: String| OptimError::State(format!("{name}: {why}"));
            let (param, role) = name
                .rsplit_once('.')
                .ok_or_else(|| bad("not <parameter>.<role>".into()))?;
            let k = self
                .info
                .iter()
                .position(|i| i.name == param)
                .ok_or_else(|| bad(format!("no parameter {param}")))?;
            let [rows, cols] = params[k].dims();
            let [r, c] = t.dims();
            let fits = match role {
                // Shaped like the parameter.
                "momentum" | "error" | "fisher" | "adam_m" | "adam_v" => [r, c] == [rows, cols],
                // Dion's right factor `cols x rank`.
                "right" => r == cols && (1..=rows.min(cols)).contains(&c),
                // The spectral bound's left singular vector.
                "spectral_u" => [r, c] == [1, rows],
                other => return Err(bad(format!("unknown role {other}"))),
            };
            if !fits {
                return Err(bad(format!(
                    "shape [{r}, {c}] does not fit parameter {param} of shape [{rows}, {cols}]"
                )));
            }
        }
        if let Some(step) = state.scalar("step")
            && !(step.is_finite() && step >= 0.0)
        {
            return Err(OptimError::State(format!("step counter {step}")));
        }
        Ok(())
    }

    fn load_state(&mut self, state: &OptimizerState) -> Result<(), OptimError> {
        self.step = state.scalar("step").unwrap_or(0.0) as usize;
        let mut fresh = vec![ParamState::default(); self.info.len()];
        for (name, t) in &state.tensors {
            let (param, role) = name
                .rsplit_once('.')
                .ok_or_else(|| OptimError::State(name.clone()))?;
            let k = self
                .info
                .iter()
                .position(|i| i.name == param)
                .ok_or_else(|| OptimError::State(format!("{name}: no parameter {param}")))?;
            let st = &mut fresh[k];
            match role {
                "momentum" => st.momentum = Some(t.clone()),
                "right" => st.right = Some(t.clone()),
                "error" => st.error = Some(t.clone()),
                "fisher" => st.fisher = Some(t.clone()),
                "spectral_u" => st.spectral_u = Some(t.clone()),
                "adam_m" => {
                    let v = st.adam.take().map(|(_, v)| v).unwrap_or_else(|| t.clone());
                    st.adam = Some((t.clone(), v));
                }
                "adam_v" => {
                    let m = st.adam.take().map(|(m, _)| m).unwrap_or_else(|| t.clone());
                    st.adam = Some((m, t.clone()));
                }
                other => return Err(OptimError::State(format!("{name}: unknown role {other}"))),
            }
        }
        self.state = fresh;
        self.replicated = true;
        // Reseed so that random initialisations after a resume do not repeat earlier ones.
        self.rng = Xoshiro256PlusPlus::seed_from_u64(
            self.config.seed ^ (self.step as u64).wrapping_mul(0x9E37_79B9),
        );
        Ok(())
    }
}
