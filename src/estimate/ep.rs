//! Equilibrium propagation on the layered prediction-error energy.

use super::{
    Estimate, EstimateError, GradientEstimator, TensorBatch, check_batch, scalar, scalar_of,
};
use crate::device::{Precision, Tensor};
use crate::ep::lean::LeanChain;
use crate::ep::{BatchContext, EnergyModel, Evaluation, SettleConfig, Settler};
use crate::loss::Loss;
use crate::model::{Factored, GradFactors, LayerOp, Network};

/// How the nudged phases are run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Nudging {
    /// One phase at `+beta`: `dE/dtheta(s^beta) / beta` (bias O(beta)).
    OneSided,
    /// One phase at `+beta` or `-beta`, sign drawn per batch (unbiased on average).
    RandomSign,
    /// Phases at `+beta` and `-beta`: `(dE/dtheta(s^+) - dE/dtheta(s^-)) / 2 beta`
    /// (bias O(beta^2); unstable at large beta because the `-beta` phase is concave in the
    /// output).
    Centered,
}

impl std::str::FromStr for Nudging {
    type Err = EstimateError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "one-sided" | "positive" => Ok(Self::OneSided),
            "random" | "random-sign" => Ok(Self::RandomSign),
            "centered" | "symmetric" => Ok(Self::Centered),
            other => Err(EstimateError::InvalidOption(format!(
                "unknown nudging `{other}` (expected one-sided, random or centered)"
            ))),
        }
    }
}

impl std::fmt::Display for Nudging {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::OneSided => "one-sided",
            Self::RandomSign => "random",
            Self::Centered => "centered",
        })
    }
}

/// EP options.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EpConfig {
    /// Nudge strength (> 0).
    pub beta: f32,
    /// Nudging mode.
    pub nudging: Nudging,
    /// The nudge loss.
    pub loss: Loss,
    /// Settling options.
    pub settle: SettleConfig,
    /// Seed of the random nudge signs.
    pub seed: u64,
    /// Precision of the free phase, settling and contrast; the gradient comes back in f32.
    #[serde(default)]
    pub precision: Precision,
    /// Divide each layer's gradient by its attenuation in a truncated settle, so that the
    /// estimate has backprop's scale ([`EpEstimator::truncation_scales`]). Needs settles
    /// of a fixed number of plain steps (no momentum, no early stop, a fixed step size).
    #[serde(default)]
    pub rescale: bool,
}

impl Default for EpConfig {
    /// The paper's beta 0.5, one-sided, MSE (1/2 convention), default settling.
    fn default() -> Self {
        Self {
            beta: 0.5,
            nudging: Nudging::OneSided,
            loss: Loss::default(),
            settle: SettleConfig::default(),
            seed: 0,
            precision: Precision::F32,
            rescale: false,
        }
    }
}

/// The EP gradient estimator (global contrast, or layer-local with [`EpEstimator::local`]).
#[derive(Debug, Clone)]
pub struct EpEstimator {
    config: EpConfig,
    energy: EnergyModel,
    settler: Settler,
    calls: u64,
    /// The last curvature estimate, kept between estimates when the settle config asks
    /// for one every few ([`crate::ep::SettleConfig::curvature_every`]).
    lambda: Option<f32>,
    local: bool,
    factors: bool,
    /// Factored gradients asked for ([`GradientEstimator::set_factored`]).
    factored: bool,
    lean: bool,
}

impl EpEstimator {
    /// EP for `net` (whose structure it compiles once) with validated options.
    pub fn new(net: &Network, config: EpConfig) -> Result<Self, EstimateError> {
        if !(config.beta.is_finite() && config.beta > 0.0) {
            return Err(EstimateError::InvalidOption(format!(
                "beta must be positive, got {}",
                config.beta
            )));
        }
        config.loss.validate()?;
        let energy = EnergyModel::new(net, config.loss);
        if config.rescale {
            let s = &config.settle;
            if s.momentum != 0.0 || s.tol != 0.0 || s.adaptive || s.curvature || s.per_sample {
                return Err(EstimateError::InvalidOption(
                    "rescaling a truncated settle needs plain settle steps: momentum 0, tolerance 0 (a fixed number of steps), no adaptive or curvature-following step, no per-sample stopping".into(),
                ));
            }
            if energy.param_states(net).is_none() {
                return Err(EstimateError::InvalidOption(
                    "rescaling a truncated settle needs a layered network (no skip connections)"
                        .into(),
                ));
            }
        }
        Ok(Self {
            energy,
            settler: Settler::new(config.settle)?,
            calls: 0,
            lambda: None,
            config,
            local: false,
            factors: false,
            factored: false,
            lean: false,
        })
    }

    /// Also return per-sample factors of the linear weights' gradients (for the Fisher
    /// update): the nudged phase's layer inputs and prediction errors over beta (the `+beta`
    /// phase when centered).
    pub fn with_factors(mut self, on: bool) -> Self {
        self.factors = on;
        self
    }

    /// Lean memory: on a dense layered network (linear layers joined by element-wise
    /// activations, optionally residual) settle and contrast with the layer sweeps of
    /// `ep::lean`, which keep only the parameters, the free states, the states and their
    /// momentum buffers (one-sided nudging drops the free states once settling starts),
    /// plus O(1) layers of temporaries: no copy of the weights and no per-layer tapes. It
    /// is slower than the fused host loop on wide networks. Other networks, local EP,
    /// factors, the adaptive step and per-sample stopping use the usual path.
    pub fn with_lean_memory(mut self, on: bool) -> Self {
        self.lean = on;
        self
    }

    /// Local EP: the same settling, then each state layer's parameters are updated from
    /// their own input activity and their own nudged and free prediction errors only,
    /// layer by layer (no global energy gradient): a parameter inside a residual block's
    /// prefix does not see the errors of the layers the skip feeds. On layered networks
    /// this equals EP.
    pub fn local(net: &Network, config: EpConfig) -> Result<Self, EstimateError> {
        let mut e = Self::new(net, config)?;
        e.local = true;
        Ok(e)
    }

    /// Its options.
    pub fn config(&self) -> &EpConfig {
        &self.config
    }

    /// The factor by which a settle from the forward pass scales each parameter's
    /// gradient, to leading order in the step size: with `T` plain steps of `eta` (no
    /// momentum), the nudge moves the output in the first step and one more state per
    /// step, and the prediction error of the state `d` layers below the output is
    /// `C(T, d + 1) eta^(d + 1)` times backprop's error there (`C` the binomial
    /// coefficient; `tests/experiment.rs` checks the ratios). Parameters after the last
    /// state are nudged directly (factor 1); those of states the settle does not reach get
    /// no gradient (factor 0). `None` for a network with skip connections.
    pub fn truncation_scales(&self, net: &Network) -> Option<Vec<f64>> {
        let states = self.energy.param_states(net)?;
        let depth = self.energy.num_states();
        let (steps, eta) = (self.config.settle.steps, f64::from(self.config.settle.lr));
        Some(
            states
                .into_iter()
                .map(|state| match state {
                    None => 1.0,
                    Some(j) => {
                        let k = depth - j; // d + 1
                        if k > steps {
                            0.0
                        } else {
                            binomial(steps, k) * eta.powi(k as i32)
                        }
                    }
                })
                .collect(),
        )
    }

    /// The energy it settles.
    pub fn energy(&self) -> &EnergyModel {
        &self.energy
    }

    /// Whether the estimates leave the linear state layers' weight gradients as factors:
    /// asked for, and exact, i.e. one nudged phase (one-sided or random-sign nudging) from
    /// the forward pass, whose errors are zero, so the contrast is that phase's term alone;
    /// global EP in f32 on the usual path (not the lean one).
    fn factoring(&self) -> bool {
        self.factored
            && !self.local
            && self.config.nudging != Nudging::Centered
            && self.config.precision == Precision::F32
            && !self.lean
    }

    /// The plan of the lean path, when it applies to `net` (see
    /// [`EpEstimator::with_lean_memory`]).
    fn lean_plan(&self, net: &Network) -> Option<crate::ep::DensePlan> {
        let settle = &self.config.settle;
        if self.local
            || self.factors
            || settle.adaptive
            || settle.per_sample
            || (settle.curvature && settle.curvature_every > 1)
            || self.config.precision != Precision::F32
        {
            return None;
        }
        let plan = self.energy.dense_plan(net)?;
        (self.lean && LeanChain::supports(net, &self.energy)).then_some(plan)
    }

    /// The estimate through `ep::lean`.
    fn estimate_lean(
        &mut self,
        net: &Network,
        batch: &TensorBatch,
        plan: &crate::ep::DensePlan,
    ) -> Result<Estimate, EstimateError> {
        let sign = self.next_sign();
        let chain = LeanChain::new(net, plan, &self.energy, &batch.x);
        let first = chain.first_prediction();
        let free = chain.free_states(&first);
        let output = free.last().expect("at least one state").clone();
        let loss = scalar(self.config.loss.mean(output.clone(), batch.targets.clone()));
        let n = batch.len() as f32;
        let (nudging, beta) = (self.config.nudging, self.config.beta);
        let settle = &self.config.settle;
        let mut phases = Vec::new();
        // The free states move into the last phase (the lean path keeps one copy alive).
        let mut free = Some(free);
        let grads = contrast(nudging, sign, beta, n, |s| {
            let last = nudging != Nudging::Centered || s < 0.0;
            let states = if last { free.take() } else { free.clone() };
            let states = states.expect("no phase after the last");
            let mut p = chain.phase(settle, &first, &batch.targets, states, s * beta)?;
            let terms = std::mem::take(&mut p.terms);
            phases.push(p);
            Ok(terms)
        })?;
        Ok(Estimate {
            grads,
            loss,
            output,
            settle: phases.iter().map(|p| p.stats).collect(),
            residual_curves: phases.into_iter().map(|p| p.curve).collect(),
            moments: Default::default(),
            factors: Vec::new(),
            factored: Vec::new(),
        })
    }

    /// Counts a call and draws its nudge sign: -1 or +1 with random-sign nudging (the sign
    /// of call k depends only on (seed, k), so a resumed run draws the same), else +1.
    fn next_sign(&mut self) -> f32 {
        self.calls += 1;
        if self.config.nudging == Nudging::RandomSign
            && crate::data::dataset::mix(self.config.seed, self.calls) & 1 == 1
        {
            -1.0
        } else {
            1.0
        }
    }

    /// `sum_batch dE/dtheta` at a settled evaluation (global or local; global EP leaves
    /// the parameters marked in `skip` empty).
    fn contrast_term(
        &self,
        net: &Network,
        ctx: &BatchContext,
        states: &[Tensor<2>],
        eval: &Evaluation,
        beta: f32,
        skip: &[bool],
    ) -> Vec<Tensor<2>> {
        if self.local {
            self.energy.local_param_gradients(net, ctx, states, beta)
        } else {
            self.energy
                .param_gradients_except(net, ctx, eval, beta, skip)
        }
    }
}

impl GradientEstimator for EpEstimator {
    fn name(&self) -> &'static str {
        if self.local { "local-ep" } else { "ep" }
    }

    fn loss(&self) -> Option<crate::loss::Loss> {
        Some(self.config.loss)
    }

    fn state(&self) -> Vec<(String, f64)> {
        let mut state = vec![("calls".into(), self.calls as f64)];
        if let Some(lambda) = self.lambda {
            state.push(("curvature".into(), f64::from(lambda)));
        }
        state
    }

    fn set_factored(&mut self, on: bool) -> bool {
        self.factored = on;
        self.factoring()
    }

    fn load_state(&mut self, state: &[(String, f64)]) {
        self.calls = scalar_of(state, "calls") as u64;
        self.lambda = state
            .iter()
            .find(|(k, _)| k == "curvature")
            .map(|(_, v)| *v as f32)
            .filter(|v| v.is_finite() && *v > 0.0);
    }

    fn estimate(&mut self, net: &Network, batch: &TensorBatch) -> Result<Estimate, EstimateError> {
        check_batch(net, batch)?;
        let precision = self.config.precision;
        let mut e = if precision != Precision::F32 {
            // The whole estimate on a low-precision copy of the network and batch; the
            // tensors it returns are brought back to f32 for the optimizer.
            let low = TensorBatch {
                x: precision.cast(batch.x.clone()),
                targets: precision.cast(batch.targets.clone()),
                labels: batch.labels.clone(),
                indices: batch.indices.clone(),
            };
            let mut e = self.estimate_at(&net.cast(precision), &low)?;
            let f32 = |t: Tensor<2>| Precision::F32.cast(t);
            e.grads = e.grads.into_iter().map(f32).collect();
            e.output = f32(e.output);
            for f in e.factors.iter_mut().flatten() {
                f.inputs = f32(f.inputs.clone());
                f.output_grads = f32(f.output_grads.clone());
            }
            e
        } else {
            self.estimate_at(net, batch)?
        };
        if self.config.rescale {
            let scales = self
                .truncation_scales(net)
                .expect("checked when the estimator was made");
            for (k, scale) in scales.into_iter().enumerate() {
                if scale > 0.0 {
                    e.grads[k] = e.grads[k].clone().div_scalar(scale as f32);
                    // The per-sample factors of the same gradient (the Fisher update's).
                    if let Some(Some(f)) = e.factors.get_mut(k) {
                        f.output_grads = f.output_grads.clone().div_scalar(scale as f32);
                    }
                }
            }
        }
        Ok(e)
    }
}

/// Which gradients the factors of each linear weight carry: the weight's own, and its
/// layer's bias (the column sums of the same output signal).
fn factored_marks(net: &Network, factors: &[Option<GradFactors>]) -> Vec<Option<Factored>> {
    let mut marks = vec![None; factors.len()];
    for layer in net.layers() {
        let k = layer.first_param;
        if let (LayerOp::Linear { .. }, Some(Some(_))) = (&layer.op, factors.get(k)) {
            marks[k] = Some(Factored::Weight);
            marks[k + 1] = Some(Factored::BiasOf(k));
        }
    }
    marks
}

/// `n choose k` as a float.
fn binomial(n: usize, k: usize) -> f64 {
    (0..k).fold(1.0, |acc, i| acc * (n - i) as f64 / (i + 1) as f64)
}

impl EpEstimator {
    /// With a curvature-following step estimated every few calls
    /// ([`crate::ep::SettleConfig::curvature_every`] > 1), a settler at the kept step
    /// (re-estimated at the free states on the calls due); `None` settles with the
    /// configured settler.
    fn spread_curvature(
        &mut self,
        net: &Network,
        ctx: &crate::ep::BatchContext,
        free: &[Tensor<2>],
        free_eval: &crate::ep::Evaluation,
        beta: f32,
    ) -> Result<Option<Settler>, EstimateError> {
        let settle = self.config.settle;
        if !settle.curvature || settle.curvature_every <= 1 {
            return Ok(None);
        }
        // `calls` counts this call already: calls 1, 1 + every, ... estimate afresh.
        let due = (self.calls - 1).is_multiple_of(settle.curvature_every as u64);
        let lambda = match self.lambda {
            Some(lambda) if !due => lambda,
            _ => {
                let lambda =
                    crate::ep::largest_curvature(&self.energy, net, ctx, free, free_eval, beta);
                self.lambda = Some(lambda);
                lambda
            }
        };
        let fixed = crate::ep::SettleConfig {
            lr: settle.curvature_step(lambda),
            curvature: false,
            ..settle
        };
        Ok(Some(Settler::new(fixed)?))
    }

    /// The estimate in the precision of `net`'s parameters and `batch`'s tensors.
    fn estimate_at(
        &mut self,
        net: &Network,
        batch: &TensorBatch,
    ) -> Result<Estimate, EstimateError> {
        if let Some(plan) = self.lean_plan(net) {
            return self.estimate_lean(net, batch, &plan);
        }
        let (ctx, free, free_eval) =
            self.energy
                .free_phase(net, batch.x.clone(), batch.targets.clone());
        let loss = scalar(
            self.config
                .loss
                .mean(free_eval.output().clone(), batch.targets.clone()),
        );
        let n = batch.len() as f32;
        let beta = self.config.beta;
        let mut settle = Vec::new();
        let mut curves = Vec::new();
        let mut factors = Vec::new();
        let mut factored = Vec::new();
        let sign = self.next_sign();
        let settler = self.spread_curvature(net, &ctx, &free, &free_eval, sign * beta)?;
        let this = &*self;
        let settler = settler.as_ref().unwrap_or(&this.settler);
        // Local EP's free-phase term (exactly zero at the forward states, computed as the
        // definition says); it cancels in the centered difference, so it is skipped there.
        let free_term = (this.local && this.config.nudging != Nudging::Centered)
            .then(|| this.energy.local_param_gradients(net, &ctx, &free, 0.0));
        let phase = |sign: f32| -> Result<Vec<Tensor<2>>, EstimateError> {
            let b = sign * beta;
            let settled = settler.settle(&this.energy, net, &ctx, &free, &free_eval, b)?;
            settle.push(settled.stats);
            curves.push(settled.residual_curve.clone());
            if (this.factors || this.factoring()) && factors.is_empty() {
                factors = this.energy.linear_factors(net, &settled.eval, 1.0 / b);
                if this.factoring() {
                    // The only phase: its factors are the contrast itself.
                    factored = factored_marks(net, &factors);
                }
            }
            let skip: Vec<bool> = factored.iter().map(Option::is_some).collect();
            let mut g = this.contrast_term(net, &ctx, &settled.states, &settled.eval, b, &skip);
            if let Some(free_term) = &free_term {
                g = g
                    .into_iter()
                    .zip(free_term)
                    .map(|(a, f)| a - f.clone())
                    .collect();
            }
            Ok(g)
        };
        let grads = contrast(this.config.nudging, sign, beta, n, phase)?;
        Ok(Estimate {
            grads,
            loss,
            output: free_eval.output().clone(),
            settle,
            residual_curves: curves,
            moments: ctx.moments().clone(),
            factors,
            factored,
        })
    }
}

/// The nudging contrast, the one place it is written: `phase(s)` settles at nudge
/// `s * beta` and returns `sum_batch dE/dtheta` there (minus the free phase's where the
/// estimator needs it); the batch-averaged gradient is `phase(1) / (beta n)` (one-sided),
/// `phase(sign) / (sign beta n)` (random sign) or `(phase(1) - phase(-1)) / (2 beta n)`
/// (centered, the plus phase first).
fn contrast(
    nudging: Nudging,
    sign: f32,
    beta: f32,
    n: f32,
    mut phase: impl FnMut(f32) -> Result<Vec<Tensor<2>>, EstimateError>,
) -> Result<Vec<Tensor<2>>, EstimateError> {
    Ok(match nudging {
        Nudging::OneSided | Nudging::RandomSign => {
            let s = if nudging == Nudging::OneSided {
                1.0
            } else {
                sign
            };
            phase(s)?
                .into_iter()
                .map(|g| g.div_scalar(s * beta * n))
                .collect()
        }
        Nudging::Centered => {
            let plus = phase(1.0)?;
            let minus = phase(-1.0)?;
            plus.into_iter()
                .zip(minus)
                .map(|(p, m)| (p - m).div_scalar(2.0 * beta * n))
                .collect()
        }
    })
}
