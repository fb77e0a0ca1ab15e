//! The options of a training run: command-line flags, TOML config files, and how they
//! resolve into an estimator and an optimizer.

use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use mep::data::{self, DataError, DataLocator, LoadOptions, Normalization};
use mep::device::Precision;
use mep::ep::{EqPropConfig, EqPropInit, SettleConfig};
use mep::estimate::{EpConfig, GradientEstimator, Nudging};
use mep::loss::Loss;
use mep::model::{ModelSpec, Network, Shape};
use mep::optim::{
    CompositeConfig, CompositeOptimizer, Constraint, EstimatorChoice, Feedback, NsIteration,
    Optimizer, Preset, Schedule, UpdateRule,
};
use mep::train::{OptimizerKind, TrainConfig};
use serde::{Deserialize, Serialize};

/// Every setting of a training run. Each is optional: flags override a `--config` TOML file
/// (same keys, snake_case), which overrides the preset, which overrides the defaults.
#[derive(Debug, Clone, Default, PartialEq, Args, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainOptions {
    /// Data set: mnist, fashion-mnist, xor, permuted-mnist[:K] (default mnist).
    #[arg(long)]
    pub dataset: Option<String>,
    /// Model spec (default 784-256-128-10; the grammar is in the README).
    #[arg(long)]
    pub model: Option<String>,
    /// Preset: smep, smep_plus, smep_fast, sdmep, local_ep, natural_ep, muon_backprop, eqprop,
    /// sgd, adam.
    #[arg(long, conflicts_with_all = ["estimator", "optimizer"])]
    pub preset: Option<String>,
    /// Gradient estimator without a preset (default backprop).
    #[arg(long, value_enum)]
    pub estimator: Option<EstimatorArg>,
    /// Optimizer without a preset (default adam).
    #[arg(long, value_enum)]
    pub optimizer: Option<OptimizerArg>,
    /// Loss: mse (1/2 ||o - y||^2), mse-reference, ce, ce:SMOOTHING.
    #[arg(long)]
    pub loss: Option<String>,
    /// Epochs (default 1).
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Batch size (default 64).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Learning rate (default: the preset's, or 0.1 for sgd, 0.001 for adam).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Momentum (default 0.9, or the preset's).
    #[arg(long)]
    pub momentum: Option<f64>,
    /// Decoupled weight decay (default 0, or the preset's).
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Use only the first N training samples.
    #[arg(long, value_name = "N")]
    pub train_samples: Option<usize>,
    /// Use only the first N test samples.
    #[arg(long, value_name = "N")]
    pub test_samples: Option<usize>,
    /// Standardise inputs with this mean and std (after scaling to [0, 1]), e.g. 0.1307,0.3081.
    #[arg(long, value_name = "MEAN,STD", value_parser = parse_mean_std)]
    pub standardize: Option<(f32, f32)>,
    /// Nudge strength (default 0.5 for EP, 1.0 for EqProp).
    #[arg(long)]
    pub beta: Option<f32>,
    /// EP nudging: one-sided, random or centered.
    #[arg(long)]
    pub nudging: Option<String>,
    /// Precision of EP's free phase, settling and contrast: f32 (default), bf16 or f16;
    /// the optimizer's update stays in f32. Meant for GPUs: the CPU backends run the
    /// lower precisions slowly, on the generic settle loop.
    #[arg(long)]
    pub precision: Option<String>,
    /// Most settle steps per phase (default 30).
    #[arg(long)]
    pub settle_steps: Option<usize>,
    /// Settle step size, per sample (default 0.3; presets 0.5).
    #[arg(long)]
    pub settle_lr: Option<f32>,
    /// Stop settling when the largest per-sample state-gradient norm is under TOL * beta.
    #[arg(long)]
    pub settle_tol: Option<f32>,
    /// Heavy-ball momentum of settling, in [0, 1) (default 0.5). Deep residual networks
    /// settle far faster with 0.9 (their state Hessian is ill-conditioned like a chain).
    #[arg(long)]
    pub settle_momentum: Option<f32>,
    /// Check convergence every K settle steps (default 5).
    #[arg(long, value_name = "K")]
    pub settle_check: Option<usize>,
    /// Per-sample adaptive settle step.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub adaptive: Option<bool>,
    /// Per-sample stopping: a sample stops settling once its own state-gradient norm is
    /// under --settle-tol * beta (at a check); the dense fast path then drops it from its
    /// products.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub settle_per_sample: Option<bool>,
    /// Matrix update rule of the preset's composite optimizer: plain, muon, muon-cubic,
    /// dion, lowrank, fisher, adam.
    #[arg(long)]
    pub update: Option<String>,
    /// Spectral bound gamma on every matrix (0 removes the preset's constraint).
    #[arg(long)]
    pub gamma: Option<f64>,
    /// Learning rate of vectors (biases, gains); default the matrix rate.
    #[arg(long)]
    pub vector_lr: Option<f64>,
    /// Nesterov momentum.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub nesterov: Option<bool>,
    /// Clip the global gradient norm.
    #[arg(long)]
    pub clip_norm: Option<f64>,
    /// Learning-rate schedule: constant, cosine (to 0 over the run, after --warmup steps),
    /// or step:EVERY:GAMMA.
    #[arg(long)]
    pub schedule: Option<String>,
    /// Warm-up steps of the cosine schedule.
    #[arg(long)]
    pub warmup: Option<usize>,
    /// Error feedback: carry the compression residual and re-inject it with this decay
    /// (default 0.9 when given without a value). The lowrank update compresses by itself;
    /// in front of a rule that does not (muon, plain, fisher, adam) the gradient is first
    /// compressed to rank fraction --ef-rank. Dion feeds back its own residual.
    #[arg(long, value_name = "BETA", num_args = 0..=1, default_missing_value = "0.9")]
    pub error_feedback: Option<f64>,
    /// Rank fraction of error feedback's compression (default 0.2; see --error-feedback).
    #[arg(long, value_name = "FRAC", requires = "error_feedback")]
    pub ef_rank: Option<f64>,
    /// EqProp: free-phase steps (default 40).
    #[arg(long)]
    pub eqprop_free_steps: Option<usize>,
    /// EqProp: nudged-phase steps (default 4).
    #[arg(long)]
    pub eqprop_nudged_steps: Option<usize>,
    /// EqProp: state step size (default 0.5).
    #[arg(long)]
    pub eqprop_step: Option<f32>,
    /// EqProp: start each training sample's free phase from its previous states.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub persistent: Option<bool>,
}

macro_rules! merge_fields {
    ($a:ident, $b:ident, $($f:ident),*) => {
        TrainOptions { $($f: $a.$f.or($b.$f)),* }
    };
}

impl TrainOptions {
    /// These options, with `fallback`'s where these are unset.
    pub fn or(self, fallback: TrainOptions) -> TrainOptions {
        let (a, b) = (self, fallback);
        merge_fields!(
            a,
            b,
            dataset,
            model,
            preset,
            estimator,
            optimizer,
            loss,
            epochs,
            batch,
            lr,
            momentum,
            weight_decay,
            train_samples,
            test_samples,
            standardize,
            beta,
            nudging,
            precision,
            settle_steps,
            settle_lr,
            settle_tol,
            settle_momentum,
            settle_check,
            adaptive,
            settle_per_sample,
            update,
            gamma,
            vector_lr,
            nesterov,
            clip_norm,
            schedule,
            warmup,
            error_feedback,
            ef_rank,
            eqprop_free_steps,
            eqprop_nudged_steps,
            eqprop_step,
            persistent
        )
    }

    /// Reads a TOML config file (unknown keys are errors).
    pub fn from_toml(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing config file {}", path.display()))
    }

    /// The data set name.
    pub fn dataset(&self) -> &str {
        self.dataset.as_deref().unwrap_or("mnist")
    }

    /// The model spec.
    pub fn model(&self) -> Result<ModelSpec> {
        Ok(self.model.as_deref().unwrap_or("784-256-128-10").parse()?)
    }

    /// The preset, if any.
    pub fn preset(&self) -> Result<Option<Preset>> {
        self.preset
            .as_deref()
            .map(str::parse::<Preset>)
            .transpose()
            .map_err(Into::into)
    }

    /// Epochs, batch size and seed.
    pub fn train_config(&self, seed: u64) -> Result<TrainConfig> {
        let config = TrainConfig {
            epochs: self.epochs.unwrap_or(1),
            batch_size: self.batch.unwrap_or(64),
            seed,
        };
        if config.epochs == 0 {
            bail!("--epochs must be at least 1");
        }
        if config.batch_size == 0 {
            bail!("--batch must be at least 1");
        }
        Ok(config)
    }

    /// Data loading options.
    pub fn load_options(&self) -> LoadOptions {
        LoadOptions {
            train_samples: self.train_samples,
            test_samples: self.test_samples,
            normalization: match self.standardize {
                Some((mean, std)) => Normalization::MeanStd { mean, std },
                None => Normalization::UnitRange,
            },
        }
    }

    /// Checks everything that can be checked without data: the model spec, preset, loss,
    /// nudging, epochs, batch size and that numbers are finite.
    pub fn validate(&self) -> Result<()> {
        self.model()?;
        self.preset()?;
        self.loss()?;
        self.nudging()?;
        self.precision()?;
        self.train_config(0)?;
        self.finite()
    }

    fn finite(&self) -> Result<()> {
        let values = [
            ("lr", self.lr),
            ("momentum", self.momentum),
            ("weight-decay", self.weight_decay),
            ("beta", self.beta.map(f64::from)),
            ("settle-lr", self.settle_lr.map(f64::from)),
            ("settle-tol", self.settle_tol.map(f64::from)),
            ("settle-momentum", self.settle_momentum.map(f64::from)),
            ("eqprop-step", self.eqprop_step.map(f64::from)),
            ("gamma", self.gamma),
            ("vector-lr", self.vector_lr),
            ("clip-norm", self.clip_norm),
            ("error-feedback", self.error_feedback),
            ("ef-rank", self.ef_rank),
        ];
        for (name, v) in values {
            if let Some(v) = v
                && !v.is_finite()
            {
                bail!("--{name} must be a finite number, got {v}");
            }
        }
        Ok(())
    }

    fn loss(&self) -> Result<Option<Loss>> {
        self.loss
            .as_deref()
            .map(|l| l.parse::<Loss>().map_err(|e| anyhow!(e)))
            .transpose()
    }

    fn nudging(&self) -> Result<Option<Nudging>> {
        self.nudging
            .as_deref()
            .map(|n| n.parse::<Nudging>().map_err(|e| anyhow!(e)))
            .transpose()
    }

    fn precision(&self) -> Result<Option<Precision>> {
        self.precision
            .as_deref()
            .map(|p| p.parse::<Precision>().map_err(|e| anyhow!(e)))
            .transpose()
    }

    /// `--precision` other than f32 is an EP option: an error for other estimators.
    fn precision_needs_ep(&self, is_ep: bool) -> Result<()> {
        match self.precision()? {
            Some(p) if p != Precision::F32 && !is_ep => {
                bail!("--precision {p} applies to the EP estimators (ep, local-ep)")
            }
            _ => Ok(()),
        }
    }

    fn override_settle(&self, base: SettleConfig) -> SettleConfig {
        SettleConfig {
            lr: self.settle_lr.unwrap_or(base.lr),
            steps: self.settle_steps.unwrap_or(base.steps),
            tol: self.settle_tol.unwrap_or(base.tol),
            momentum: self.settle_momentum.unwrap_or(base.momentum),
            check_every: self.settle_check.unwrap_or(base.check_every),
            adaptive: self.adaptive.unwrap_or(base.adaptive),
            per_sample: self.settle_per_sample.unwrap_or(base.per_sample),
        }
    }

    fn override_ep(&self, base: EpConfig, loss: Loss, seed: u64) -> Result<EpConfig> {
        Ok(EpConfig {
            beta: self.beta.unwrap_or(base.beta),
            nudging: self.nudging()?.unwrap_or(base.nudging),
            loss,
            settle: self.override_settle(base.settle),
            seed,
            precision: self.precision()?.unwrap_or(base.precision),
        })
    }

    fn eqprop(&self, base: EqPropConfig) -> Result<EqPropConfig> {
        Ok(EqPropConfig {
            beta: self.beta.unwrap_or(base.beta),
            random_sign: self
                .nudging()?
                .map_or(base.random_sign, |n| n == Nudging::RandomSign),
            step: self.eqprop_step.unwrap_or(base.step),
            free_steps: self.eqprop_free_steps.unwrap_or(base.free_steps),
            nudged_steps: self.eqprop_nudged_steps.unwrap_or(base.nudged_steps),
            init: match self.persistent {
                Some(true) => EqPropInit::Persistent,
                Some(false) => EqPropInit::Zero,
                None => base.init,
            },
        })
    }

    /// Builds the estimator and optimizer for `model` (`samples` training samples).
    pub fn setup(&self, model: &Network, samples: usize, seed: u64) -> Result<Setup> {
        self.finite()?;
        if let Some(preset) = self.preset()? {
            let batch = self.batch.unwrap_or(64).max(1);
            let steps = self.epochs.unwrap_or(1) * samples.div_ceil(batch);
            let mut p = preset.config().for_steps(steps);
            self.precision_needs_ep(p.estimator.ep_config_mut().is_some())?;
            match &mut p.estimator {
                EstimatorChoice::Backprop { loss } => *loss = self.loss()?.unwrap_or(*loss),
                EstimatorChoice::EqProp(c) => *c = self.eqprop(*c)?,
                other => {
                    let c = other.ep_config_mut().expect("EP kinds");
                    let loss = self.loss()?.unwrap_or(c.loss);
                    *c = self.override_ep(*c, loss, seed)?;
                }
            }
            self.override_composite(&mut p.optimizer, samples)?;
            p.optimizer.seed = seed;
            let estimator = p.estimator.build(model, samples, seed)?;
            let optimizer = CompositeOptimizer::new(p.optimizer, model.param_info())?;
            let label = format!(
                "preset {preset} ({}, lr {})",
                estimator.name(),
                p.optimizer.lr
            );
            return Ok(Setup {
                config: serde_json::json!({
                    "preset": preset.to_string(),
                    "estimator": estimator.name(),
                    "estimator_config": p.estimator,
                    "optimizer": "composite",
                    "composite": p.optimizer,
                }),
                estimator,
                optimizer: Box::new(optimizer),
                label,
            });
        }
        let composite_only = [
            ("update", self.update.is_some()),
            ("gamma", self.gamma.is_some()),
            ("vector-lr", self.vector_lr.is_some()),
            ("nesterov", self.nesterov.is_some()),
            ("clip-norm", self.clip_norm.is_some()),
            ("schedule", self.schedule.is_some()),
            ("warmup", self.warmup.is_some()),
            ("error-feedback", self.error_feedback.is_some()),
        ];
        if let Some((name, _)) = composite_only.iter().find(|(_, set)| *set) {
            bail!("--{name} configures the composite optimizer: use it with --preset");
        }
        let estimator_kind = self.estimator.unwrap_or(EstimatorArg::Backprop);
        self.precision_needs_ep(matches!(
            estimator_kind,
            EstimatorArg::Ep | EstimatorArg::LocalEp
        ))?;
        let kind: OptimizerKind = self.optimizer.unwrap_or(OptimizerArg::Adam).into();
        let lr = self.lr.unwrap_or(kind.default_lr());
        let momentum = self.momentum.unwrap_or(0.9);
        let weight_decay = self.weight_decay.unwrap_or(0.0);
        let optimizer = kind.build(lr, momentum, weight_decay)?;
        let loss = self.loss()?.unwrap_or(estimator_kind.default_loss());
        let ep = self.override_ep(EpConfig::default(), loss, seed)?;
        let eqprop = self.eqprop(EqPropConfig::default())?;
        let choice = match estimator_kind {
            EstimatorArg::Backprop => EstimatorChoice::Backprop { loss },
            EstimatorArg::Ep => EstimatorChoice::Ep(ep),
            EstimatorArg::LocalEp => EstimatorChoice::LocalEp(ep),
            EstimatorArg::Eqprop => EstimatorChoice::EqProp(eqprop),
        };
        let estimator = choice.build(model, samples, seed)?;
        let label = format!("{}+{kind:?} ({loss} loss), lr {lr}", estimator.name());
        let config = serde_json::json!({
            "estimator": estimator_kind,
            "loss": loss.to_string(),
            "ep": matches!(estimator_kind, EstimatorArg::Ep | EstimatorArg::LocalEp).then_some(ep),
            "eqprop": (estimator_kind == EstimatorArg::Eqprop).then_some(eqprop),
            "optimizer": kind,
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
        });
        Ok(Setup {
            estimator,
            optimizer,
            config,
            label,
        })
    }
}

impl TrainOptions {
    fn override_composite(&self, o: &mut CompositeConfig, samples: usize) -> Result<()> {
        o.lr = self.lr.unwrap_or(o.lr);
        o.momentum = self.momentum.unwrap_or(o.momentum);
        o.weight_decay = self.weight_decay.unwrap_or(o.weight_decay);
        o.vector_lr = self.vector_lr.or(o.vector_lr);
        o.nesterov = self.nesterov.unwrap_or(o.nesterov);
        o.clip_norm = self.clip_norm.or(o.clip_norm);
        if let Some(u) = &self.update {
            o.update = match u.as_str() {
                "plain" => UpdateRule::Plain,
                "muon" | "muon-cubic" => UpdateRule::Muon {
                    ns_steps: 5,
                    iteration: if u == "muon" {
                        NsIteration::Quintic
                    } else {
                        NsIteration::Cubic
                    },
                },
                "dion" => UpdateRule::Dion {
                    rank_frac: 0.2,
                    threshold: 100_000,
                    ns_steps: 5,
                },
                "lowrank" => UpdateRule::LowRank { rank_frac: 0.2 },
                "fisher" => UpdateRule::Fisher {
                    damping: 1e-3,
                    ema: 0.95,
                    orthogonalize: true,
                    ns_steps: 5,
                },
                "adam" => UpdateRule::Adam {
                    beta1: 0.9,
                    beta2: 0.999,
                    eps: 1e-8,
                },
                other => bail!(
                    "unknown --update `{other}` (expected plain, muon, muon-cubic, dion, lowrank, fisher or adam)"
                ),
            };
        }
        if let Some(g) = self.gamma {
            o.constraint = if g == 0.0 {
                Constraint::None
            } else {
                Constraint::Spectral {
                    gamma: g,
                    power_iters: 3,
                    every: 1,
                    tol: 1e-4,
                }
            };
        }
        if self.ef_rank.is_some() && self.error_feedback.is_none() {
            bail!("--ef-rank sets error feedback's compression: use it with --error-feedback");
        }
        if let Some(beta) = self.error_feedback {
            let compresses = matches!(
                o.update,
                UpdateRule::LowRank { .. } | UpdateRule::Dion { .. }
            );
            if compresses && self.ef_rank.is_some() {
                bail!(
                    "--ef-rank applies to update rules that do not compress (not lowrank or dion)"
                );
            }
            o.feedback = Feedback::ErrorFeedback {
                beta,
                rank_frac: (!compresses).then(|| self.ef_rank.unwrap_or(0.2)),
            };
        }
        let batch = self.batch.unwrap_or(64).max(1);
        let total = self.epochs.unwrap_or(1) * samples.div_ceil(batch);
        o.schedule = match self.schedule.as_deref() {
            None => o.schedule,
            Some("constant") => Schedule::Constant,
            Some("cosine") => {
                let warmup = self.warmup.unwrap_or(0);
                Schedule::Cosine {
                    warmup,
                    total: total.max(warmup + 1),
                    floor: 0.0,
                }
            }
            Some(other) => {
                let parts: Vec<&str> = other.split(':').collect();
                match parts[..] {
                    ["step", every, gamma] => Schedule::Step {
                        every: every
                            .parse()
                            .with_context(|| format!("--schedule {other}: bad step count"))?,
                        gamma: gamma
                            .parse()
                            .with_context(|| format!("--schedule {other}: bad decay"))?,
                    },
                    _ => bail!(
                        "unknown --schedule `{other}` (expected constant, cosine or step:EVERY:GAMMA)"
                    ),
                }
            }
        };
        Ok(())
    }
}

/// The estimator and optimizer of a run, how its config records them, and labels.
pub struct Setup {
    /// The gradient estimator.
    pub estimator: Box<dyn GradientEstimator>,
    /// The optimizer.
    pub optimizer: Box<dyn Optimizer>,
    /// Their resolved configuration (for config.json).
    pub config: serde_json::Value,
    /// Human-readable description.
    pub label: String,
}

/// Gradient estimators selectable on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EstimatorArg {
    /// Backpropagation (burn autodiff).
    Backprop,
    /// Equilibrium propagation on the layered energy.
    Ep,
    /// Layer-local EP.
    LocalEp,
    /// Classic EqProp (Hopfield energy; needs a Linear-hsig-Linear chain).
    Eqprop,
}

impl EstimatorArg {
    /// The default loss of this estimator.
    pub fn default_loss(self) -> Loss {
        match self {
            Self::Backprop => Loss::CrossEntropy { smoothing: 0.0 },
            _ => Loss::default(),
        }
    }
}

/// First-order optimizers selectable without a preset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerArg {
    /// SGD with momentum.
    Sgd,
    /// Adam.
    Adam,
}

impl From<OptimizerArg> for OptimizerKind {
    fn from(o: OptimizerArg) -> Self {
        match o {
            OptimizerArg::Sgd => OptimizerKind::Sgd,
            OptimizerArg::Adam => OptimizerKind::Adam,
        }
    }
}

/// Parses `--nudging`.
pub fn parse_nudging(s: &str) -> Result<Nudging, String> {
    s.parse()
        .map_err(|e: mep::estimate::EstimateError| e.to_string())
}

fn parse_mean_std(s: &str) -> Result<(f32, f32), String> {
    let (m, sd) = s.split_once(',').ok_or("expected MEAN,STD")?;
    let m: f32 = m.trim().parse().map_err(|_| format!("bad mean `{m}`"))?;
    let sd: f32 = sd.trim().parse().map_err(|_| format!("bad std `{sd}`"))?;
    Ok((m, sd))
}

/// Loads a data set; if its files are missing and it can be downloaded, fetches it into the
/// user cache first (unless `fetch` is false).
pub fn load_or_fetch(
    name: &str,
    locator: &DataLocator,
    options: &LoadOptions,
    seed: u64,
    fetch: bool,
) -> Result<data::Dataset> {
    match data::load(name, locator, options, seed) {
        Err(DataError::Missing { dataset, .. }) if fetch => {
            let spec = data::find(&dataset)?;
            eprintln!("data set `{dataset}` not found locally; downloading it");
            super::data::fetch(&spec, None, &locator.download_dir()?)?;
            data::load(name, locator, options, seed)
                .with_context(|| format!("loading data set `{name}` after download"))
        }
        other => other.with_context(|| format!("loading data set `{name}`")),
    }
}

/// The network for `spec` on `dataset`, checked against its input and classes.
pub fn build_network(
    spec: &ModelSpec,
    dataset: &data::Dataset,
    seed: u64,
    device: &mep::device::Device,
) -> Result<Network> {
    let net = spec.build(Shape::from_chw(dataset.input_shape), seed, device)?;
    if net.output_shape().numel() != dataset.classes {
        bail!(
            "model {spec} has {} outputs but data set {} has {} classes",
            net.output_shape().numel(),
            dataset.name,
            dataset.classes
        );
    }
    Ok(net)
}
