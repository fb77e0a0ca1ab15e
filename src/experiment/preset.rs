//! Named recipes: estimator plus composite optimizer (the paper's configurations and ours).

use std::fmt;
use std::str::FromStr;

use super::ExperimentError;
use super::recipe::{EstimatorChoice, Recipe};
use crate::ep::{EqPropConfig, SettleConfig};
use crate::estimate::{EpConfig, Nudging};
use crate::loss::{Loss, MseScale};
use crate::optim::{CompositeConfig, Constraint, Schedule, UpdateRule};

/// The Newton–Schulz iteration of [`Preset::smep`]'s Muon update (what the speed suite's
/// cost model and Muon timings assume).
pub fn smep_iteration() -> crate::optim::NsIteration {
    match Preset::smep().optimizer.update {
        UpdateRule::Muon { iteration, .. } => iteration,
        _ => crate::optim::NsIteration::DEFAULT,
    }
}

/// The named presets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Preset {
    /// [`Preset::smep`].
    Smep,
    /// [`Preset::smep_plus`].
    SmepPlus,
    /// [`Preset::smep_fast`].
    SmepFast,
    /// [`Preset::sdmep`].
    Sdmep,
    /// [`Preset::local_ep`].
    LocalEp,
    /// [`Preset::natural_ep`].
    NaturalEp,
    /// [`Preset::muon_backprop`].
    MuonBackprop,
    /// [`Preset::eqprop`].
    Eqprop,
    /// [`Preset::sgd`].
    Sgd,
    /// [`Preset::adam`].
    Adam,
    /// [`Preset::conv_ep`].
    ConvEp,
    /// [`Preset::conv_ep_fast`].
    ConvEpFast,
}

/// The settle step of [`Preset::conv_ep_fast`]. The smaller the step, the closer every
/// layer's truncated-settle gradient to backprop's (the next order in the step bends it by
/// about `step * lambda`, and `lambda` grows with the weights): on `cnn` after ten epochs
/// of Fashion-MNIST, conv2's cosine is 0.53 at 0.1 and 0.994 at 0.01, and on
/// `vgg5-small` trained on CIFAR-10 every layer's is at least 0.9994 at 0.01 (RESULTS.md).
/// The first layer's error is then about `step^depth * beta` of the states, which the
/// fused conv loop's perturbation form keeps exactly.
pub const FAST_SETTLE_LR: f32 = 0.01;

/// The settle step size of the EP presets, chosen by the sweep recorded in RESULTS.md
/// (our settling is per sample, so the reference's 0.15 does not carry over).
pub const SETTLE_LR: f32 = 0.5;

const MSE: Loss = Loss::Mse {
    scale: MseScale::Half,
};
const CE: Loss = Loss::CrossEntropy { smoothing: 0.0 };

fn ep(beta: f32, steps: usize, loss: Loss) -> EpConfig {
    EpConfig {
        beta,
        nudging: Nudging::OneSided,
        loss,
        settle: SettleConfig {
            lr: SETTLE_LR,
            steps,
            ..SettleConfig::default()
        },
        seed: 0,
        ..EpConfig::default()
    }
}

/// The paper's Muon presets' optimizer: the reference's cubic Newton–Schulz iteration
/// (5 steps), which also measured better than the quintic on every MLP preset (mean of
/// seeds 42/1/2, one thread, standardised inputs where the recipe uses them, 2026-11-30):
/// smep on table 1's subset 93.33% against 92.97%, on table 2 96.59% against 96.31%, one
/// full-MNIST epoch (784-256-128-10) 96.94% against 96.68%; local_ep one epoch 95.58%
/// against 94.67%; muon_backprop 96.50% against 96.23%. It leaves a gradient's small
/// singular values small (5 steps grow them at most 1.5^5 = 7.6x) where the quintic
/// lifts every one into [0.7, 1.2].
fn muon(lr: f64) -> CompositeConfig {
    CompositeConfig {
        lr,
        momentum: 0.9,
        weight_decay: 5e-4,
        update: UpdateRule::muon_cubic(),
        constraint: Constraint::spectral(0.95),
        ..CompositeConfig::default()
    }
}

impl Preset {
    /// Every preset with its CLI name.
    pub const ALL: [(&'static str, Preset); 12] = [
        ("smep", Preset::Smep),
        ("smep_plus", Preset::SmepPlus),
        ("smep_fast", Preset::SmepFast),
        ("sdmep", Preset::Sdmep),
        ("local_ep", Preset::LocalEp),
        ("natural_ep", Preset::NaturalEp),
        ("muon_backprop", Preset::MuonBackprop),
        ("eqprop", Preset::Eqprop),
        ("sgd", Preset::Sgd),
        ("adam", Preset::Adam),
        ("conv_ep", Preset::ConvEp),
        ("conv_ep_fast", Preset::ConvEpFast),
    ];

    /// Every preset's name, in [`Preset::ALL`]'s order.
    pub fn names() -> Vec<&'static str> {
        Self::ALL.iter().map(|(n, _)| *n).collect()
    }

    /// The preset a run uses when it names neither a preset nor an estimator or
    /// optimizer: the best EP recipe measured for the model. [`Preset::smep_plus`] for
    /// every model so far (MLPs: 97.9% on MNIST in 10 epochs; conv nets with
    /// `--settle-steps 10`: see the README's convolutional table).
    pub fn default_for(_model: &crate::model::ModelSpec) -> Self {
        Self::SmepPlus
    }

    /// The recipe.
    pub fn config(self) -> Recipe {
        match self {
            Self::Smep => Self::smep(),
            Self::SmepPlus => Self::smep_plus(),
            Self::SmepFast => Self::smep_fast(),
            Self::Sdmep => Self::sdmep(),
            Self::LocalEp => Self::local_ep(),
            Self::NaturalEp => Self::natural_ep(),
            Self::MuonBackprop => Self::muon_backprop(),
            Self::Eqprop => Self::eqprop(),
            Self::Sgd => Self::sgd(),
            Self::Adam => Self::adam(),
            Self::ConvEp => Self::conv_ep(),
            Self::ConvEpFast => Self::conv_ep_fast(),
        }
    }

    /// Spectral Muon EP: one-sided beta 0.5, at most 30 settle steps (early stop at tol),
    /// MSE; Muon (cubic Newton–Schulz, 5 steps) with lr 0.01, momentum 0.9, weight decay 5e-4; spectral
    /// bound 0.95 on every matrix; no error feedback (Muon is lossless).
    pub fn smep() -> Recipe {
        Recipe {
            preset: Some(Self::Smep),
            estimator: EstimatorChoice::Ep(ep(0.5, 30, MSE)),
            optimizer: muon(0.01),
        }
    }

    /// Our best EP configuration on MNIST (see RESULTS.md): [`Preset::smep`]'s estimator
    /// with settle step 0.3, Muon at lr 0.02 on a cosine schedule over the whole run
    /// (`total: 0` is set to the run's length by the trainer, see
    /// [`Recipe::for_steps`]), decoupled weight decay 0.3 and no spectral bound: the
    /// bound at 0.95 makes the network underfit, the decay regularises instead.
    ///
    /// Muon keeps the quintic iteration: it is the default for every model, and on conv
    /// nets the cubic learns more slowly at first (`cnn`, 10k MNIST samples: 95.40%
    /// against 95.90% after one epoch, 98.00% for both after four; `cnn-small` on 1,000
    /// Fashion-MNIST samples: 10.2% against 22.4%), although on table 2's MLP it measured
    /// 97.30% against 96.99%.
    pub fn smep_plus() -> Recipe {
        let mut ep = ep(0.5, 30, MSE);
        ep.settle.lr = 0.3;
        Recipe {
            preset: Some(Self::SmepPlus),
            estimator: EstimatorChoice::Ep(ep),
            optimizer: CompositeConfig {
                lr: 0.02,
                weight_decay: 0.3,
                schedule: Schedule::Cosine {
                    warmup: 0,
                    total: 0,
                    floor: 0.0,
                },
                constraint: Constraint::None,
                update: UpdateRule::muon(),
                ..muon(0.02)
            },
        }
    }

    /// [`Preset::smep`] with at most 10 settle steps.
    pub fn smep_fast() -> Recipe {
        Recipe {
            preset: Some(Self::SmepFast),
            estimator: EstimatorChoice::Ep(ep(0.5, 10, MSE)),
            optimizer: muon(0.01),
        }
    }

    /// Spectral Dion EP: one-sided beta 0.5, 30 settle steps, MSE; Dion with rank 0.2 of the
    /// smaller side on matrices of at least 100 000 entries (Muon below), lr 0.01,
    /// momentum 0.9 (Dion's error feedback into its momentum is always on), weight decay
    /// 5e-4; spectral bound 0.95.
    pub fn sdmep() -> Recipe {
        Recipe {
            preset: Some(Self::Sdmep),
            estimator: EstimatorChoice::Ep(ep(0.5, 30, MSE)),
            optimizer: CompositeConfig {
                update: UpdateRule::dion(),
                ..muon(0.01)
            },
        }
    }

    /// Local EP with [`Preset::smep`]'s settling and optimizer at lr 0.02.
    pub fn local_ep() -> Recipe {
        Recipe {
            preset: Some(Self::LocalEp),
            estimator: EstimatorChoice::LocalEp(ep(0.5, 30, MSE)),
            optimizer: muon(0.02),
        }
    }

    /// Natural-gradient EP: EP as [`Preset::smep`] with per-sample factors; diagonal
    /// empirical Fisher (EMA 0.95, damping 1e-3) whitening, then orthogonalisation; lr 0.02,
    /// momentum 0.9, weight decay 5e-4, spectral bound 0.95.
    pub fn natural_ep() -> Recipe {
        Recipe {
            preset: Some(Self::NaturalEp),
            estimator: EstimatorChoice::NaturalEp(ep(0.5, 30, MSE)),
            optimizer: CompositeConfig {
                update: UpdateRule::fisher(),
                ..muon(0.02)
            },
        }
    }

    /// Backprop (cross-entropy) with Muon at lr 0.02, momentum 0.9, weight decay 5e-4 and
    /// no spectral bound: with every layer's norm capped at 0.95 the logits cannot grow
    /// enough for cross-entropy (measured on the 5k/1k MNIST subset, 3 epochs: 85.7% with the bound, 92.9% without).
    pub fn muon_backprop() -> Recipe {
        Recipe {
            preset: Some(Self::MuonBackprop),
            estimator: EstimatorChoice::Backprop { loss: CE },
            optimizer: CompositeConfig {
                constraint: Constraint::None,
                ..muon(0.02)
            },
        }
    }

    /// Classic EqProp (random-sign beta 1, eps 0.5, 40 free and 4 nudged steps) with plain
    /// SGD at lr 0.1 and no momentum, as Scellier & Bengio. Needs a `N-H-hsig-C` model.
    pub fn eqprop() -> Recipe {
        Recipe {
            preset: Some(Self::Eqprop),
            estimator: EstimatorChoice::EqProp(EqPropConfig::default()),
            optimizer: CompositeConfig {
                lr: 0.1,
                momentum: 0.0,
                ..CompositeConfig::default()
            },
        }
    }

    /// Backprop (cross-entropy) with SGD: lr 0.1, momentum 0.9.
    pub fn sgd() -> Recipe {
        Recipe {
            preset: Some(Self::Sgd),
            estimator: EstimatorChoice::Backprop { loss: CE },
            optimizer: CompositeConfig::sgd(0.1, 0.9, false, 0.0),
        }
    }

    /// Convolutional EP: the estimator of the published convolutional recipes (Scellier et
    /// al. 2023, Kerjan, Scellier & Høier 2026; `anchors.md`), centered nudging at a small
    /// beta (0.02) with cross-entropy, and [`Preset::smep_plus`]'s optimizer (Muon at lr
    /// 0.02 on a cosine schedule, decoupled weight decay 0.3, no spectral bound);
    /// standardised inputs, and random crops (4 pixels) with flips on natural images
    /// ([`Recipe::augment`]).
    ///
    /// The optimizer was chosen with backprop on the same model (`vgg5-small`, 10 epochs
    /// of the CIFAR-10 subset with crops and flips, seed 42): Muon reached 63.5 / 68.2 /
    /// 67.2% at lr 0.01 / 0.02 / 0.05, SGD with Nesterov momentum on a cosine schedule
    /// (weight decay 2.5e-3, the literature's coupled 2.5e-4 under momentum 0.9) 51.7 /
    /// 54.0 / 40.7% at 0.01 / 0.03 / 0.05 and diverged at 0.1; on MNIST, SGD at 0.01-0.03
    /// stayed at chance after an epoch of 2,048 samples where Muon reached 86.5% (and Adam
    /// 73.2%). Without normalisation layers a He-initialised VGG needs an update whose
    /// size does not follow the gradient's.
    ///
    /// Settling: at most 50 steps with heavy-ball momentum 0.9 (stopping early at the
    /// tolerance), the step following the energy's curvature
    /// ([`crate::ep::SettleConfig::curvature`], at most 0.5). A VGG-style net's state
    /// Hessian is stiff (its largest eigenvalue is about 10.6 for `vgg5-small` at He
    /// initialisation, so a fixed step of 0.3 at momentum 0.5 diverges) and grows with the
    /// weights (a fixed step of 0.2 at momentum 0.9 diverged within 8 training batches);
    /// it is also ill-conditioned, so momentum 0.5 needs about 120 steps for cosines of
    /// 0.99 to backprop, momentum 0.9 about 40 on `vgg5-small` (0.992-0.99997 on every
    /// layer) and 50 on the full-width `vgg5`, whose first layer reaches 0.985 in 40 and
    /// 0.996 in 50 (`mep check-gradient --model vgg5 --dataset cifar-10-subset --batch 4
    /// --loss ce --nudging centered --beta 0.02 --steps 50 --settle-lr 0.5
    /// --settle-momentum 0.9 --settle-curvature`; RESULTS.md).
    pub fn conv_ep() -> Recipe {
        let mut ep = ep(0.02, 50, CE);
        ep.nudging = Nudging::Centered;
        ep.settle.lr = 0.5;
        ep.settle.momentum = 0.9;
        ep.settle.curvature = true;
        Recipe {
            preset: Some(Self::ConvEp),
            estimator: EstimatorChoice::Ep(ep),
            optimizer: Self::smep_plus().optimizer,
        }
    }

    /// Convolutional EP with truncated settling, at about twice backprop's cost:
    /// random-sign nudging at beta 0.02 with cross-entropy, and as many settle steps of
    /// [`FAST_SETTLE_LR`] as the net has state layers (set per model by
    /// [`Preset::config_for`]; no momentum, no tolerance stop), so the nudge just reaches
    /// the first layer. Each layer's error is then, to leading order in the step,
    /// `C(T, d + 1) step^(d + 1)` times backprop's error at that layer (`d` layers below
    /// the output, `T` steps), and the estimator divides that factor out
    /// ([`crate::estimate::EpConfig::rescale`]): the gradient has backprop's direction and
    /// size on every layer (`check-gradient --rescale`: cosines of 0.994-1.000 and norm
    /// ratios of 0.92-1.00 on `cnn` and `vgg5-small`, including trained weights). The
    /// optimizer is [`Preset::conv_ep`]'s with weight decay 0.05 (backprop on
    /// `vgg5-small`, Fashion-MNIST, 10 epochs: 92.67% against 91.38% at 0.3). RESULTS.md
    /// has the training runs.
    pub fn conv_ep_fast() -> Recipe {
        let mut ep = ep(0.02, 3, CE);
        ep.nudging = Nudging::RandomSign;
        ep.settle.lr = FAST_SETTLE_LR;
        ep.settle.momentum = 0.0;
        ep.settle.tol = 0.0;
        ep.rescale = true;
        let mut optimizer = Self::conv_ep().optimizer;
        optimizer.weight_decay = 0.05;
        Recipe {
            preset: Some(Self::ConvEpFast),
            estimator: EstimatorChoice::Ep(ep),
            optimizer,
        }
    }

    /// The recipe for `model`: [`Preset::config`], with [`Preset::conv_ep_fast`]'s settle
    /// steps set to the model's state layers ([`crate::model::ModelSpec::state_layers`]).
    pub fn config_for(self, model: &crate::model::ModelSpec) -> Result<Recipe, ExperimentError> {
        let mut recipe = self.config();
        if self == Self::ConvEpFast
            && let EstimatorChoice::Ep(ep) = &mut recipe.estimator
        {
            ep.settle.steps = model.state_layers()?.max(1);
        }
        Ok(recipe)
    }

    /// Backprop (cross-entropy) with Adam: lr 0.001 for matrices and vectors.
    pub fn adam() -> Recipe {
        Recipe {
            preset: Some(Self::Adam),
            estimator: EstimatorChoice::Backprop { loss: CE },
            optimizer: CompositeConfig::adam(1e-3, 0.0),
        }
    }
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = Self::ALL
            .iter()
            .find(|(_, p)| p == self)
            .map_or("?", |(n, _)| n);
        f.write_str(name)
    }
}

impl FromStr for Preset {
    type Err = ExperimentError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let key = s.trim().replace('-', "_");
        Self::ALL
            .iter()
            .find(|(n, _)| *n == key)
            .map(|(_, p)| *p)
            .ok_or_else(|| ExperimentError::UnknownPreset(s.to_string()))
    }
}
