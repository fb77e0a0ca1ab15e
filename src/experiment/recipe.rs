//! A resolved recipe: which gradient estimator with which options, and the composite
//! optimizer's configuration.

use crate::data::{Augment, DatasetSpec};
use crate::ep::EqPropConfig;
use crate::estimate::{EpConfig, EstimateError, GradientEstimator};
use crate::loss::Loss;
use crate::model::Network;
use crate::optim::{
    CompositeConfig, CompositeOptimizer, Constraint, Optimizer, Schedule, UpdateRule,
};

use super::preset::Preset;
use super::{ExperimentError, Standardize};

/// Which gradient estimator a recipe uses, with its options.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum EstimatorChoice {
    /// Backprop of a loss.
    Backprop {
        /// The loss.
        loss: Loss,
    },
    /// EP (global contrast).
    Ep(EpConfig),
    /// Local EP.
    LocalEp(EpConfig),
    /// EP whose estimate carries per-sample factors for the Fisher update.
    NaturalEp(EpConfig),
    /// Classic EqProp.
    EqProp(EqPropConfig),
}

impl EstimatorChoice {
    /// Builds the estimator for `net`; `samples` is the training-split size (EqProp's
    /// persistent states), `seed` seeds its randomness.
    pub fn build(
        &self,
        net: &crate::model::Network,
        samples: usize,
        seed: u64,
    ) -> Result<Box<dyn GradientEstimator>, EstimateError> {
        use crate::estimate::{BackpropEstimator, EpEstimator, EqPropEstimator};
        let seeded = |c: &EpConfig| EpConfig { seed, ..*c };
        Ok(match self {
            Self::Backprop { loss } => {
                Box::new(BackpropEstimator::new(*loss)?.with_dropout_seed(seed))
            }
            Self::Ep(c) => Box::new(EpEstimator::new(net, seeded(c))?),
            Self::LocalEp(c) => Box::new(EpEstimator::local(net, seeded(c))?),
            Self::NaturalEp(c) => Box::new(EpEstimator::new(net, seeded(c))?.with_factors(true)),
            Self::EqProp(c) => Box::new(EqPropEstimator::new(net, *c, samples, seed)?),
        })
    }

    /// The EP options, for the EP kinds.
    pub fn ep_config(&self) -> Option<&EpConfig> {
        match self {
            Self::Ep(c) | Self::LocalEp(c) | Self::NaturalEp(c) => Some(c),
            _ => None,
        }
    }

    /// The EP options, mutable, for the EP kinds.
    pub fn ep_config_mut(&mut self) -> Option<&mut EpConfig> {
        match self {
            Self::Ep(c) | Self::LocalEp(c) | Self::NaturalEp(c) => Some(c),
            _ => None,
        }
    }
}

/// A recipe's estimator and optimizer, built for one network.
pub type Built = (Box<dyn GradientEstimator>, Box<dyn Optimizer>);

/// An estimator and a composite optimizer: what a preset names and what a run resolves
/// its options to. Serialised into a run's `config.json` as `preset`,
/// `estimator_config` and `composite`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Recipe {
    /// The preset it started from, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<Preset>,
    /// The gradient strategy.
    #[serde(rename = "estimator_config")]
    pub estimator: EstimatorChoice,
    /// The optimizer.
    #[serde(rename = "composite")]
    pub optimizer: CompositeConfig,
}

impl Recipe {
    /// The input normalisation the recipe trains on when none is asked for: the data
    /// set's own statistics ([`super::DEFAULT_STANDARDIZE`]) for EP with an orthogonalised
    /// update (Muon, Dion, orthogonalised Fisher) under a spectral bound, inputs in [0, 1]
    /// for every other recipe. Measured (RESULTS.md, "Input standardisation"): under the
    /// bound, [0, 1] inputs underfit and standardising recovers it (one MNIST epoch of
    /// 784-256-128-10: smep 96.43% against 95.52%, sdmep 96.58% against 95.48%; smep
    /// without the bound 96.60% against 96.40%). Elsewhere it costs accuracy: smep_plus
    /// 52.1% against 73.5% after 32 steps and 92.80% against 93.50% on table 1's subset,
    /// EP's MSE gradient with plain SGD falls to chance (the He-initialised readout
    /// starts 3x larger), EP with Adam 94.96% against 96.37%, muon_backprop about 0.9
    /// points, EqProp 0.7, backprop with SGD 1.6 on table 1's subset.
    pub fn standardize(&self) -> Standardize {
        let orthogonalised = match self.optimizer.update {
            UpdateRule::Muon { .. } | UpdateRule::Dion { .. } => true,
            UpdateRule::Fisher { orthogonalize, .. } => orthogonalize,
            _ => false,
        };
        let bounded = !matches!(self.optimizer.constraint, Constraint::None);
        let ep = matches!(
            self.estimator,
            EstimatorChoice::Ep(_) | EstimatorChoice::LocalEp(_) | EstimatorChoice::NaturalEp(_)
        );
        // The convolutional recipe standardises as every published one does.
        if (ep && orthogonalised && bounded) || self.convolutional() {
            super::DEFAULT_STANDARDIZE
        } else {
            Standardize::None
        }
    }

    /// The training-batch augmentation the recipe uses on `dataset` when none is asked
    /// for: random crops of 4 pixels and left-right flips for the convolutional recipes on
    /// natural (three-channel) images such as CIFAR-10, as the published convolutional EP
    /// recipes train; nothing otherwise (digits and clothes, and every other recipe).
    pub fn augment(&self, dataset: &DatasetSpec) -> Augment {
        if self.convolutional() && dataset.input_shape[0] == 3 {
            Augment {
                crop_pad: 4,
                flip: true,
            }
        } else {
            Augment::NONE
        }
    }

    /// Whether this is one of the convolutional EP recipes ([`Preset::conv_ep`],
    /// [`Preset::conv_ep_fast`]).
    fn convolutional(&self) -> bool {
        matches!(self.preset, Some(Preset::ConvEp | Preset::ConvEpFast))
    }

    /// Fixes a run-length schedule (a cosine with `total: 0`) to a run of `steps` optimizer
    /// steps.
    pub fn for_steps(mut self, steps: usize) -> Self {
        if let Schedule::Cosine {
            warmup,
            total: 0,
            floor,
        } = self.optimizer.schedule
        {
            self.optimizer.schedule = Schedule::Cosine {
                warmup,
                total: steps.max(warmup + 1),
                floor,
            };
        }
        self
    }

    /// The estimator and optimizer for `net` (`samples`: the training-split size, `seed`:
    /// their randomness).
    pub fn build(
        &self,
        net: &Network,
        samples: usize,
        seed: u64,
    ) -> Result<Built, ExperimentError> {
        let estimator = self.estimator.build(net, samples, seed)?;
        let optimizer = CompositeOptimizer::new(
            CompositeConfig {
                seed,
                ..self.optimizer
            },
            net.param_info(),
        )?;
        Ok((estimator, Box::new(optimizer)))
    }

    /// One line for people: the preset or estimator, and the learning rate.
    pub fn label(&self) -> String {
        let estimator = match self.estimator {
            EstimatorChoice::Backprop { loss } => format!("backprop ({loss} loss)"),
            EstimatorChoice::Ep(c) => format!("ep ({} loss, beta {})", c.loss, c.beta),
            EstimatorChoice::LocalEp(c) => format!("local ep ({} loss, beta {})", c.loss, c.beta),
            EstimatorChoice::NaturalEp(c) => {
                format!("natural ep ({} loss, beta {})", c.loss, c.beta)
            }
            EstimatorChoice::EqProp(c) => format!("eqprop (beta {})", c.beta),
        };
        match self.preset {
            Some(p) => format!("preset {p}: {estimator}, lr {}", self.optimizer.lr),
            None => format!("{estimator}, lr {}", self.optimizer.lr),
        }
    }
}
