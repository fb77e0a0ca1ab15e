//! The options of a training run and how they resolve into a [`Recipe`].
//!
//! [`TrainOptions`] is the one list of a run's settings: the CLI derives its flags from it
//! (with the `cli` feature), config files and checkpoints store it with serde, and library
//! users fill it in directly.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::recipe::{EstimatorChoice, Recipe};
use super::{ExperimentError, Preset};
use crate::data::{self, Augment, LoadOptions, Normalization};
use crate::device::Precision;
use crate::ep::{EqPropConfig, EqPropInit, SettleConfig};
use crate::estimate::{EpConfig, Nudging};
use crate::loss::Loss;
use crate::model::ModelSpec;
use crate::optim::{CompositeConfig, Constraint, Feedback, Schedule};
use crate::train::TrainConfig;

/// The data set of a run without `dataset`.
pub const DEFAULT_DATASET: &str = "mnist";
/// The model of a run without `model`.
pub const DEFAULT_MODEL: &str = "784-256-128-10";
/// Samples per batch without `batch`.
pub const DEFAULT_BATCH: usize = 64;
/// Epochs without `epochs`.
pub const DEFAULT_EPOCHS: usize = 1;
/// Input normalisation of the recipes that standardise ([`Recipe::standardize`]): each
/// data set's own statistics, as PyTorch's examples and the paper's reference normalise.
pub const DEFAULT_STANDARDIZE: Standardize = Standardize::Dataset;

/// Every setting of a training run. Each is optional: [`TrainOptions::or`] layers them
/// (the CLI: flags over a `--config` TOML file, same keys in snake_case), a preset fills
/// what is still unset, then the defaults.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
#[serde(default, deny_unknown_fields)]
pub struct TrainOptions {
    /// Data set: mnist, fashion-mnist, xor, permuted-mnist or permuted-mnist:K (default mnist).
    #[cfg_attr(feature = "cli", arg(long))]
    pub dataset: Option<String>,
    /// Model spec (default 784-256-128-10; the grammar is in the README).
    #[cfg_attr(feature = "cli", arg(long))]
    pub model: Option<String>,
    /// Preset: smep, smep_plus, smep_fast, sdmep, local_ep, natural_ep, muon_backprop,
    /// eqprop, sgd, adam, conv_ep, conv_ep_fast. Without a preset, --estimator or --optimizer a run uses the
    /// best EP recipe measured for the model (smep_plus); `--estimator backprop` trains
    /// with backprop and Adam.
    #[cfg_attr(feature = "cli", arg(long, conflicts_with_all = ["estimator", "optimizer"]))]
    pub preset: Option<String>,
    /// Gradient estimator without a preset (default backprop once --estimator or
    /// --optimizer is given).
    #[cfg_attr(feature = "cli", arg(long, value_enum))]
    pub estimator: Option<EstimatorArg>,
    /// First-order optimizer without a preset (default adam): the composite optimizer with
    /// the `sgd` or `adam` preset's rules.
    #[cfg_attr(feature = "cli", arg(long, value_enum))]
    pub optimizer: Option<OptimizerArg>,
    /// Loss: mse (1/2 ||o - y||^2), mse-reference, ce, ce:SMOOTHING.
    #[cfg_attr(feature = "cli", arg(long))]
    pub loss: Option<String>,
    /// Epochs (default 1).
    #[cfg_attr(feature = "cli", arg(long))]
    pub epochs: Option<usize>,
    /// Batch size (default 64).
    #[cfg_attr(feature = "cli", arg(long))]
    pub batch: Option<usize>,
    /// Learning rate (default: the preset's, or 0.1 for sgd, 0.001 for adam).
    #[cfg_attr(feature = "cli", arg(long))]
    pub lr: Option<f64>,
    /// Momentum (default 0.9 for sgd, or the preset's).
    #[cfg_attr(feature = "cli", arg(long))]
    pub momentum: Option<f64>,
    /// Decoupled weight decay of matrices (default 0, or the preset's).
    #[cfg_attr(feature = "cli", arg(long))]
    pub weight_decay: Option<f64>,
    /// Use only the first N training samples.
    #[cfg_attr(feature = "cli", arg(long, value_name = "N"))]
    pub train_samples: Option<usize>,
    /// Use only the first N test samples.
    #[cfg_attr(feature = "cli", arg(long, value_name = "N"))]
    pub test_samples: Option<usize>,
    /// Input normalisation after scaling to [0, 1]: `dataset` (the data set's own
    /// training-pixel mean and std: MNIST 0.1307,0.3081, Fashion-MNIST 0.2860,0.3530,
    /// CIFAR-10 per channel), MEAN,STD, or `none` (inputs stay in [0, 1]). Default: the
    /// recipe's: `dataset` for EP with an orthogonalised update under a spectral bound
    /// (smep, smep_fast, sdmep, local_ep, natural_ep), `none` for the rest (the README's
    /// preset table).
    #[cfg_attr(feature = "cli", arg(long, value_name = "MEAN,STD|dataset|none"))]
    pub standardize: Option<Standardize>,
    /// Augmentation of training batches, drawn per sample from the seed, epoch and
    /// sample (reproducible and resumable): `none` (default), `crop:PAD` (random shifts
    /// of up to PAD pixels, reflect-padded), `flip` (left-right mirror, for natural images
    /// such as CIFAR-10, not digits) or both, `crop:4,flip`.
    #[cfg_attr(feature = "cli", arg(long, value_name = "crop:PAD,flip|none"))]
    pub augment: Option<Augment>,
    /// Nudge strength (default 0.5 for EP, 1.0 for EqProp).
    #[cfg_attr(feature = "cli", arg(long))]
    pub beta: Option<f32>,
    /// EP nudging: one-sided, random or centered.
    #[cfg_attr(feature = "cli", arg(long))]
    pub nudging: Option<String>,
    /// Precision of EP's free phase, settling and contrast: f32 (default), bf16 or f16;
    /// the optimizer's update stays in f32. Meant for GPUs: the CPU backends run the
    /// lower precisions slowly, on the generic settle loop.
    #[cfg_attr(feature = "cli", arg(long))]
    pub precision: Option<String>,
    /// Most settle steps per phase (default 30).
    #[cfg_attr(feature = "cli", arg(long))]
    pub settle_steps: Option<usize>,
    /// Settle step size, per sample (default 0.3; presets 0.5).
    #[cfg_attr(feature = "cli", arg(long))]
    pub settle_lr: Option<f32>,
    /// Stop settling when the largest per-sample state-gradient norm is under TOL * beta.
    #[cfg_attr(feature = "cli", arg(long))]
    pub settle_tol: Option<f32>,
    /// Heavy-ball momentum of settling, in [0, 1) (default 0.5). Deep residual networks
    /// settle far faster with 0.9 (their state Hessian is ill-conditioned like a chain).
    #[cfg_attr(feature = "cli", arg(long))]
    pub settle_momentum: Option<f32>,
    /// Check convergence every K settle steps (default 5).
    #[cfg_attr(feature = "cli", arg(long, value_name = "K"))]
    pub settle_check: Option<usize>,
    /// Per-sample adaptive settle step.
    #[cfg_attr(feature = "cli", arg(long, num_args = 0..=1, default_missing_value = "true"))]
    pub adaptive: Option<bool>,
    /// A settle step that follows the energy's curvature: `min(--settle-lr, 0.5 * 2 (1 +
    /// momentum) / lambda_max)`, with the state Hessian's largest eigenvalue estimated by
    /// power iteration at the start of each settle, so settling stays stable as the
    /// weights grow (the conv_ep preset's choice).
    #[cfg_attr(feature = "cli", arg(long, num_args = 0..=1, default_missing_value = "true"))]
    pub settle_curvature: Option<bool>,
    /// With --settle-curvature, estimate the curvature at every N-th gradient estimate and
    /// keep the step in between (default 1: at every settle)
    #[cfg_attr(feature = "cli", arg(long, value_name = "N"))]
    pub settle_curvature_every: Option<usize>,
    /// Per-sample stopping: a sample stops settling once its own state-gradient norm is
    /// under --settle-tol * beta (at a check); the dense fast path then drops it from its
    /// products.
    #[cfg_attr(feature = "cli", arg(long, num_args = 0..=1, default_missing_value = "true"))]
    pub settle_per_sample: Option<bool>,
    /// Divide each layer's EP gradient by its attenuation in a truncated settle from the
    /// forward pass (`C(T, d + 1) eta^(d + 1)` for the state `d` layers below the output,
    /// after `T` plain steps of `eta`), so that it has backprop's scale; needs
    /// --settle-momentum 0 and --settle-tol 0.
    #[cfg_attr(feature = "cli", arg(long, num_args = 0..=1, default_missing_value = "true"))]
    pub rescale: Option<bool>,
    /// Matrix update rule of the composite optimizer: plain, muon (quintic Newton–Schulz),
    /// muon-cubic (the reference's iteration), dion, lowrank, fisher, adam.
    #[cfg_attr(feature = "cli", arg(long))]
    pub update: Option<String>,
    /// Spectral bound gamma on every matrix (0 removes the preset's constraint).
    #[cfg_attr(feature = "cli", arg(long))]
    pub gamma: Option<f64>,
    /// Learning rate of vectors (biases, gains); default the matrix rate.
    #[cfg_attr(feature = "cli", arg(long))]
    pub vector_lr: Option<f64>,
    /// Update rule of vectors (biases, gains): plain (momentum SGD) or adam (scale-free:
    /// a step of about the learning rate whatever the gradient's size).
    #[cfg_attr(feature = "cli", arg(long))]
    pub vector_update: Option<String>,
    /// Nesterov momentum.
    #[cfg_attr(feature = "cli", arg(long, num_args = 0..=1, default_missing_value = "true"))]
    pub nesterov: Option<bool>,
    /// Clip the global gradient norm.
    #[cfg_attr(feature = "cli", arg(long))]
    pub clip_norm: Option<f64>,
    /// Learning-rate schedule: constant, cosine (to 0 over the run, after --warmup steps),
    /// or step:EVERY:GAMMA.
    #[cfg_attr(feature = "cli", arg(long))]
    pub schedule: Option<String>,
    /// Warm-up steps of the cosine schedule.
    #[cfg_attr(feature = "cli", arg(long))]
    pub warmup: Option<usize>,
    /// Error feedback: carry the compression residual and re-inject it with this decay
    /// (default 0.9 when given without a value). The lowrank update compresses by itself;
    /// in front of a rule that does not (muon, plain, fisher, adam) the gradient is first
    /// compressed to rank fraction --ef-rank. Dion feeds back its own residual.
    #[cfg_attr(
        feature = "cli",
        arg(long, value_name = "BETA", num_args = 0..=1, default_missing_value = "0.9")
    )]
    pub error_feedback: Option<f64>,
    /// Rank fraction of error feedback's compression (default 0.2; see --error-feedback).
    #[cfg_attr(
        feature = "cli",
        arg(long, value_name = "FRAC", requires = "error_feedback")
    )]
    pub ef_rank: Option<f64>,
    /// EqProp: free-phase steps (default 40).
    #[cfg_attr(feature = "cli", arg(long))]
    pub eqprop_free_steps: Option<usize>,
    /// EqProp: nudged-phase steps (default 4).
    #[cfg_attr(feature = "cli", arg(long))]
    pub eqprop_nudged_steps: Option<usize>,
    /// EqProp: state step size (default 0.5).
    #[cfg_attr(feature = "cli", arg(long))]
    pub eqprop_step: Option<f32>,
    /// EqProp: start each training sample's free phase from its previous states.
    #[cfg_attr(feature = "cli", arg(long, num_args = 0..=1, default_missing_value = "true"))]
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
            augment,
            beta,
            nudging,
            precision,
            settle_steps,
            settle_lr,
            settle_tol,
            settle_momentum,
            settle_check,
            adaptive,
            settle_curvature,
            settle_curvature_every,
            settle_per_sample,
            rescale,
            update,
            gamma,
            vector_lr,
            vector_update,
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

    /// These options (for example the command line's) over `fallback` (a config file):
    /// options set here win, and choosing the method here (a preset, or an estimator or
    /// optimizer) discards the fallback's choice of method, so `--estimator ep` is not
    /// overridden by a `preset` in the file, nor `--preset` by its `estimator`.
    pub fn over(self, mut fallback: TrainOptions) -> TrainOptions {
        if self.preset.is_some() {
            fallback.estimator = None;
            fallback.optimizer = None;
        }
        if self.estimator.is_some() || self.optimizer.is_some() {
            fallback.preset = None;
        }
        self.or(fallback)
    }

    /// Reads a TOML config file (unknown keys are errors).
    pub fn from_toml(path: &Path) -> Result<Self, ExperimentError> {
        let text = std::fs::read_to_string(path).map_err(|e| ExperimentError::Config {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        toml::from_str(&text).map_err(|e| ExperimentError::Config {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
    }

    /// The data set name.
    pub fn dataset(&self) -> &str {
        self.dataset.as_deref().unwrap_or(DEFAULT_DATASET)
    }

    /// The model spec.
    pub fn model(&self) -> Result<ModelSpec, ExperimentError> {
        Ok(self.model.as_deref().unwrap_or(DEFAULT_MODEL).parse()?)
    }

    /// The preset the run starts from: the named one, or without a preset, estimator or
    /// optimizer, [`Preset::default_for`] the model.
    pub fn preset(&self) -> Result<Option<Preset>, ExperimentError> {
        match self.preset.as_deref() {
            Some(name) => name.parse().map(Some),
            None if self.estimator.is_none() && self.optimizer.is_none() => {
                Ok(Some(Preset::default_for(&self.model()?)))
            }
            None => Ok(None),
        }
    }

    /// Epochs, batch size, seed and augmentation (`augment` if set, else the recipe's on
    /// the data set, [`Recipe::augment`]).
    pub fn train_config(&self, seed: u64) -> Result<TrainConfig, ExperimentError> {
        let augment = match self.augment {
            Some(a) => a,
            None => {
                let dataset = crate::data::find(self.dataset())?;
                self.unscheduled_recipe()?.augment(&dataset)
            }
        };
        let config = TrainConfig {
            epochs: self.epochs.unwrap_or(DEFAULT_EPOCHS),
            batch_size: self.batch.unwrap_or(DEFAULT_BATCH),
            seed,
            augment,
        };
        if config.epochs == 0 {
            return invalid("--epochs must be at least 1");
        }
        if config.batch_size == 0 {
            return invalid("--batch must be at least 1");
        }
        Ok(config)
    }

    /// The run's input normalisation: `standardize` if set, else its recipe's
    /// ([`Recipe::standardize`]).
    pub fn standardization(&self) -> Result<Standardize, ExperimentError> {
        match self.standardize {
            Some(s) => Ok(s),
            None => Ok(self.unscheduled_recipe()?.standardize()),
        }
    }

    /// Data loading options, normalised as [`TrainOptions::standardization`] says.
    pub fn load_options(&self) -> Result<LoadOptions, ExperimentError> {
        let normalization = self.standardization()?.normalization(self.dataset())?;
        Ok(LoadOptions {
            train_samples: self.train_samples,
            test_samples: self.test_samples,
            normalization,
        })
    }

    /// The run directory of a run of these options with `seed` when none is given:
    /// `results/train/<data>-<model>-<method>-seed<N>-<digest>`, where the method is the
    /// preset, the estimator and optimizer, or `default`, and the digest of every option
    /// tells apart runs that differ in anything else (lr, batch, sample counts, ...).
    pub fn default_run_dir(&self, seed: u64) -> std::path::PathBuf {
        let json_name = |v: serde_json::Value| v.as_str().unwrap_or_default().to_string();
        let method = match (&self.preset, self.estimator, self.optimizer) {
            (Some(p), _, _) => p.clone(),
            (None, None, None) => self
                .preset()
                .ok()
                .flatten()
                .map_or_else(|| "default".into(), |p| p.to_string()),
            (None, e, o) => format!(
                "{}-{}",
                json_name(
                    serde_json::to_value(e.unwrap_or(EstimatorArg::Backprop)).unwrap_or_default()
                ),
                json_name(
                    serde_json::to_value(o.unwrap_or(OptimizerArg::Adam)).unwrap_or_default()
                )
            ),
        };
        let digest = {
            use sha2::Digest;
            let text = serde_json::to_string(self).unwrap_or_default();
            let hash = sha2::Sha256::digest(text.as_bytes());
            hash[..4]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        };
        std::path::PathBuf::from("results/train").join(
            format!(
                "{}-{}-{method}-seed{seed}-{digest}",
                self.dataset().replace(':', "_"),
                self.model.as_deref().unwrap_or(DEFAULT_MODEL),
            )
            .to_lowercase(),
        )
    }

    /// Checks everything that can be checked without data: the model spec, preset, loss,
    /// nudging, precision, epochs, batch size and that numbers are finite.
    pub fn validate(&self) -> Result<(), ExperimentError> {
        self.model()?;
        self.preset()?;
        self.loss()?;
        self.nudging()?;
        self.precision()?;
        self.train_config(0)?;
        self.finite()
    }

    fn finite(&self) -> Result<(), ExperimentError> {
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
                return invalid(format!("--{name} must be a finite number, got {v}"));
            }
        }
        Ok(())
    }

    fn loss(&self) -> Result<Option<Loss>, ExperimentError> {
        parse_opt(self.loss.as_deref())
    }

    fn nudging(&self) -> Result<Option<Nudging>, ExperimentError> {
        parse_opt(self.nudging.as_deref())
    }

    fn precision(&self) -> Result<Option<Precision>, ExperimentError> {
        parse_opt(self.precision.as_deref())
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
            curvature: self.settle_curvature.unwrap_or(base.curvature),
            curvature_every: self.settle_curvature_every.unwrap_or(base.curvature_every),
        }
    }

    fn override_ep(&self, base: EpConfig) -> Result<EpConfig, ExperimentError> {
        Ok(EpConfig {
            beta: self.beta.unwrap_or(base.beta),
            nudging: self.nudging()?.unwrap_or(base.nudging),
            loss: self.loss()?.unwrap_or(base.loss),
            settle: self.override_settle(base.settle),
            seed: base.seed,
            precision: self.precision()?.unwrap_or(base.precision),
            rescale: self.rescale.unwrap_or(base.rescale),
        })
    }

    fn override_eqprop(&self, base: EqPropConfig) -> Result<EqPropConfig, ExperimentError> {
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

    /// The recipe of a run over `samples` training samples: the preset (or the estimator
    /// and first-order optimizer flags, each with the matching preset's rules), then every
    /// option that is set.
    pub fn recipe(&self, samples: usize) -> Result<Recipe, ExperimentError> {
        let recipe = self.unscheduled_recipe()?;
        let batch = self.batch.unwrap_or(DEFAULT_BATCH).max(1);
        let steps = self
            .epochs
            .unwrap_or(DEFAULT_EPOCHS)
            .saturating_mul(samples.div_ceil(batch));
        let recipe = recipe.for_steps(steps);
        recipe.optimizer.validate()?;
        Ok(recipe)
    }

    /// The preset (or defaults) with every override, before the run's length fixes its
    /// schedule.
    fn unscheduled_recipe(&self) -> Result<Recipe, ExperimentError> {
        self.finite()?;
        let base = match self.preset()? {
            Some(preset) => preset.config_for(&self.model()?)?,
            None => {
                let kind = self.estimator.unwrap_or(EstimatorArg::Backprop);
                let optimizer = match self.optimizer.unwrap_or(OptimizerArg::Adam) {
                    OptimizerArg::Sgd => Preset::sgd().optimizer,
                    OptimizerArg::Adam => Preset::adam().optimizer,
                };
                Recipe {
                    preset: None,
                    estimator: kind.default_choice(),
                    optimizer,
                }
            }
        };
        let mut recipe = base;
        let is_ep = recipe.estimator.ep_config().is_some();
        if let Some(p) = self.precision()?
            && p != Precision::F32
            && !is_ep
        {
            return invalid(format!(
                "--precision {p} applies to the EP estimators (ep, local-ep)"
            ));
        }
        match &mut recipe.estimator {
            EstimatorChoice::Backprop { loss } => *loss = self.loss()?.unwrap_or(*loss),
            EstimatorChoice::EqProp(c) => *c = self.override_eqprop(*c)?,
            EstimatorChoice::Ep(c)
            | EstimatorChoice::LocalEp(c)
            | EstimatorChoice::NaturalEp(c) => {
                *c = self.override_ep(*c)?;
            }
        }
        self.override_composite(&mut recipe.optimizer)?;
        Ok(recipe)
    }

    fn override_composite(&self, o: &mut CompositeConfig) -> Result<(), ExperimentError> {
        o.lr = self.lr.unwrap_or(o.lr);
        o.momentum = self.momentum.unwrap_or(o.momentum);
        o.weight_decay = self.weight_decay.unwrap_or(o.weight_decay);
        o.vector_lr = self.vector_lr.or(o.vector_lr);
        if let Some(v) = &self.vector_update {
            o.vector_update = v.parse()?;
        }
        o.nesterov = self.nesterov.unwrap_or(o.nesterov);
        o.clip_norm = self.clip_norm.or(o.clip_norm);
        if let Some(u) = &self.update {
            o.update = u.parse()?;
        }
        if let Some(g) = self.gamma {
            o.constraint = if g == 0.0 {
                Constraint::None
            } else {
                Constraint::spectral(g)
            };
        }
        if self.ef_rank.is_some() && self.error_feedback.is_none() {
            return invalid(
                "--ef-rank sets error feedback's compression: use it with --error-feedback",
            );
        }
        if let Some(beta) = self.error_feedback {
            let compresses = o.update.compresses();
            if compresses && self.ef_rank.is_some() {
                return invalid(
                    "--ef-rank applies to update rules that do not compress (not lowrank or dion)",
                );
            }
            o.feedback = Feedback::ErrorFeedback {
                beta,
                rank_frac: (!compresses).then(|| self.ef_rank.unwrap_or(0.2)),
            };
        }
        o.schedule = match self.schedule.as_deref() {
            None => o.schedule,
            Some(text) => parse_schedule(text, self.warmup.unwrap_or(0))?,
        };
        Ok(())
    }
}

/// `constant`, `cosine` (over the whole run: `total` 0 is fixed by
/// [`Recipe::for_steps`]) or `step:EVERY:GAMMA`.
fn parse_schedule(text: &str, warmup: usize) -> Result<Schedule, ExperimentError> {
    match text {
        "constant" => Ok(Schedule::Constant),
        "cosine" => Ok(Schedule::Cosine {
            warmup,
            total: 0,
            floor: 0.0,
        }),
        other => match other.split(':').collect::<Vec<_>>()[..] {
            ["step", every, gamma] => Ok(Schedule::Step {
                every: every.parse().map_err(|_| {
                    ExperimentError::InvalidOption(format!("--schedule {other}: bad step count"))
                })?,
                gamma: gamma.parse().map_err(|_| {
                    ExperimentError::InvalidOption(format!("--schedule {other}: bad decay"))
                })?,
            }),
            _ => invalid(format!(
                "unknown --schedule `{other}` (expected constant, cosine or step:EVERY:GAMMA)"
            )),
        },
    }
}

fn invalid<T>(message: impl Into<String>) -> Result<T, ExperimentError> {
    Err(ExperimentError::InvalidOption(message.into()))
}

fn parse_opt<T>(text: Option<&str>) -> Result<Option<T>, ExperimentError>
where
    T: FromStr,
    T::Err: fmt::Display,
{
    text.map(|t| {
        t.parse::<T>()
            .map_err(|e| ExperimentError::InvalidOption(e.to_string()))
    })
    .transpose()
}

/// Gradient estimators selectable without a preset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum EstimatorArg {
    /// Backpropagation (burn autodiff), cross-entropy.
    Backprop,
    /// Equilibrium propagation on the layered energy.
    Ep,
    /// Layer-local EP.
    LocalEp,
    /// Classic EqProp (Hopfield energy; needs a Linear-hsig-Linear chain).
    Eqprop,
}

impl EstimatorArg {
    /// The estimator with its default options.
    pub fn default_choice(self) -> EstimatorChoice {
        match self {
            Self::Backprop => EstimatorChoice::Backprop {
                loss: Loss::CrossEntropy { smoothing: 0.0 },
            },
            Self::Ep => EstimatorChoice::Ep(EpConfig::default()),
            Self::LocalEp => EstimatorChoice::LocalEp(EpConfig::default()),
            Self::Eqprop => EstimatorChoice::EqProp(EqPropConfig::default()),
        }
    }
}

/// First-order optimizers selectable without a preset: the composite optimizer with the
/// rules of the `sgd` and `adam` presets, so `--optimizer adam` and `--preset adam` run one
/// rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum OptimizerArg {
    /// SGD with momentum (lr 0.1, momentum 0.9).
    Sgd,
    /// Adam (lr 0.001).
    Adam,
}

/// How inputs are normalised after scaling to [0, 1].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "StandardizeRepr", into = "StandardizeRepr")]
pub enum Standardize {
    /// Inputs stay in [0, 1].
    None,
    /// The data set's own statistics ([`crate::data::DatasetSpec::normalization`]).
    Dataset,
    /// `(x - mean) / std`.
    MeanStd {
        /// Mean subtracted.
        mean: f32,
        /// Standard deviation divided by (positive).
        std: f32,
    },
}

impl FromStr for Standardize {
    type Err = String;

    /// `none`, `dataset` or `MEAN,STD` (a finite mean, a finite std of at least 1e-6).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "none" => return Ok(Self::None),
            "dataset" => return Ok(Self::Dataset),
            _ => {}
        }
        let (m, sd) = s
            .split_once(',')
            .ok_or("expected MEAN,STD, dataset or none")?;
        let mean: f32 = m.trim().parse().map_err(|_| format!("bad mean `{m}`"))?;
        let std: f32 = sd.trim().parse().map_err(|_| format!("bad std `{sd}`"))?;
        Self::mean_std(mean, std)
    }
}

impl Standardize {
    /// The normalisation it means for `dataset`.
    pub fn normalization(self, dataset: &str) -> Result<Normalization, ExperimentError> {
        Ok(match self {
            Self::None => Normalization::UnitRange,
            Self::MeanStd { mean, std } => Normalization::MeanStd { mean, std },
            Self::Dataset => data::find(dataset)?.normalization,
        })
    }

    fn mean_std(mean: f32, std: f32) -> Result<Self, String> {
        if !mean.is_finite() {
            return Err(format!("standardize mean must be finite, got {mean}"));
        }
        if !(std.is_finite() && std >= 1e-6) {
            return Err(format!(
                "standardize std must be finite and at least 1e-6, got {std}"
            ));
        }
        Ok(Self::MeanStd { mean, std })
    }
}

impl fmt::Display for Standardize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => f.write_str("none"),
            Self::Dataset => f.write_str("dataset"),
            Self::MeanStd { mean, std } => write!(f, "{mean},{std}"),
        }
    }
}

/// Serde form: `"none"`, `"dataset"`, `"MEAN,STD"` or `[MEAN, STD]` (what earlier
/// checkpoints stored).
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum StandardizeRepr {
    Text(String),
    Pair(f32, f32),
}

impl TryFrom<StandardizeRepr> for Standardize {
    type Error = String;

    fn try_from(r: StandardizeRepr) -> Result<Self, Self::Error> {
        match r {
            StandardizeRepr::Text(t) => t.parse(),
            StandardizeRepr::Pair(mean, std) => Self::mean_std(mean, std),
        }
    }
}

impl From<Standardize> for StandardizeRepr {
    fn from(s: Standardize) -> Self {
        match s {
            Standardize::None | Standardize::Dataset => Self::Text(s.to_string()),
            Standardize::MeanStd { mean, std } => Self::Pair(mean, std),
        }
    }
}
