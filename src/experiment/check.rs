//! Gradient checks: an EP (local EP, EqProp) gradient against a reference on real data —
//! backprop of the same loss, or for EqProp the implicit gradient at the free fixed point.
//! What `mep check-gradient` runs.

use serde::{Deserialize, Serialize};

use super::{EstimatorArg, ExperimentError, Standardize, build_network, load_or_fetch};
use crate::data::download::DownloadProgress;
use crate::data::{DataLocator, LoadOptions};
use crate::device::{Device, Precision};
use crate::ep::{EqPropConfig, EqPropInit, EqPropModel, SettleConfig, SettleStats};
use crate::estimate::{
    BackpropEstimator, EpConfig, EpEstimator, GradientComparison, GradientEstimator, Nudging,
    TensorBatch, compare,
};
use crate::loss::{Loss, MseScale};
use crate::model::ModelSpec;

/// The free phase of EqProp counts as at its fixed point below this residual.
pub const FIXED_POINT_RESIDUAL: f32 = 1e-4;

/// What to check and at which settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GradientCheck {
    /// Model spec (for EqProp a Linear-hsig-Linear chain such as 784-500-hsig-10).
    pub model: String,
    /// Data set whose first training samples form the batch.
    pub dataset: String,
    /// Samples in the batch.
    pub batch: usize,
    /// Nudge strength.
    pub beta: f32,
    /// Nudging.
    pub nudging: Nudging,
    /// Settle steps per phase (EqProp: free and nudged steps).
    pub steps: usize,
    /// Settle step size (EqProp: its state step).
    pub settle_lr: f32,
    /// Settle tolerance, in units of beta.
    pub tol: f32,
    /// Heavy-ball momentum of settling.
    pub settle_momentum: f32,
    /// The curvature-following settle step ([`crate::ep::SettleConfig::curvature`]).
    #[serde(default)]
    pub curvature: bool,
    /// Precision of EP's free phase, settling and contrast; the reference stays in f32.
    pub precision: Precision,
    /// Estimator to check: ep, local-ep or eqprop.
    pub estimator: EstimatorArg,
    /// Loss of both EP's nudge and the backprop reference.
    pub loss: Loss,
    /// Input normalisation, as in training.
    pub standardize: Standardize,
    /// Weights from a training checkpoint (a run directory or its
    /// `checkpoint.safetensors`) instead of the initialisation: how faithful the estimate
    /// is on a trained network. The model spec must be the run's.
    #[serde(default)]
    pub checkpoint: Option<std::path::PathBuf>,
    /// Rescale each layer's EP gradient by its attenuation in a truncated settle
    /// ([`crate::estimate::EpConfig::rescale`]), so that the norm ratios compare sizes too.
    #[serde(default)]
    pub rescale: bool,
}

impl Default for GradientCheck {
    /// EP with centered nudging at beta 0.01, 300 settle steps of 0.3 (momentum 0.5, tol
    /// 1e-5), MSE, on 64 MNIST samples (standardised as training does) and
    /// `784-256-128-10`.
    fn default() -> Self {
        Self {
            model: super::DEFAULT_MODEL.into(),
            dataset: super::DEFAULT_DATASET.into(),
            batch: 64,
            beta: 0.01,
            nudging: Nudging::Centered,
            steps: 300,
            settle_lr: 0.3,
            tol: 1e-5,
            settle_momentum: 0.5,
            curvature: false,
            precision: Precision::F32,
            estimator: EstimatorArg::Ep,
            loss: Loss::Mse {
                scale: MseScale::Half,
            },
            standardize: super::DEFAULT_STANDARDIZE,
            checkpoint: None,
            rescale: false,
        }
    }
}

/// The outcome: per-parameter cosine and norm ratio against the reference.
#[derive(Debug, Clone, Serialize)]
pub struct GradientReport {
    /// Model spec.
    pub model: String,
    /// The estimator checked.
    pub estimator: EstimatorArg,
    /// What it was compared with.
    pub reference: &'static str,
    /// Data set.
    pub dataset: String,
    /// Its normalisation.
    pub standardize: Standardize,
    /// Samples.
    pub batch: usize,
    /// Nudge strength.
    pub beta: f32,
    /// Nudging.
    pub nudging: Nudging,
    /// Precision.
    pub precision: Precision,
    /// Settle steps per phase.
    pub steps: usize,
    /// Loss.
    pub loss: String,
    /// Seed of the initialisation.
    pub seed: u64,
    /// One row per parameter.
    pub params: Vec<GradientComparison>,
    /// Settle statistics per phase (EP).
    pub settle: Vec<SettleStats>,
    /// EqProp: the free phase's fixed-point residual (meaningful below
    /// [`FIXED_POINT_RESIDUAL`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub free_residual: Option<f32>,
}

impl GradientCheck {
    /// The default check on the weights of a training run (its directory or its
    /// `checkpoint.safetensors`): the run's model and data set, read from the checkpoint.
    pub fn on_checkpoint(path: &std::path::Path) -> Result<Self, ExperimentError> {
        let meta = super::run::read_meta(&checkpoint_file(path))?;
        Ok(Self {
            model: (meta.options.model.as_deref())
                .unwrap_or(super::DEFAULT_MODEL)
                .to_string(),
            dataset: meta.options.dataset().to_string(),
            checkpoint: Some(path.to_path_buf()),
            ..Self::default()
        })
    }

    /// Runs the check on the first `batch` training samples, with the network initialised
    /// from `seed` on `device`.
    pub fn run(
        &self,
        seed: u64,
        device: &Device,
        locator: &DataLocator,
        fetch: bool,
        progress: &mut dyn DownloadProgress,
    ) -> Result<GradientReport, ExperimentError> {
        let invalid = |m: String| Err(ExperimentError::InvalidOption(m));
        if self.batch == 0 {
            return invalid("--batch must be at least 1".into());
        }
        let spec: ModelSpec = self.model.parse()?;
        let options = LoadOptions {
            train_samples: Some(self.batch),
            test_samples: Some(1),
            normalization: self.standardize.normalization(&self.dataset)?,
        };
        let data = load_or_fetch(&self.dataset, locator, &options, seed, fetch, progress)?;
        if data.train.len() < self.batch {
            return invalid(format!(
                "data set {} has only {} training samples, fewer than --batch {}",
                data.name,
                data.train.len(),
                self.batch
            ));
        }
        let mut net = build_network(&spec, &data, seed, device)?;
        if let Some(path) = &self.checkpoint {
            crate::train::checkpoint::load(&checkpoint_file(path), &mut net, None)?;
        }
        let batch = TensorBatch::new(
            data.train.inputs(),
            data.train.labels(),
            data.classes,
            device,
        );
        let settle = SettleConfig {
            lr: self.settle_lr,
            steps: self.steps,
            tol: self.tol,
            momentum: self.settle_momentum,
            check_every: 10,
            curvature: self.curvature,
            ..SettleConfig::default()
        };
        let ep_config = EpConfig {
            beta: self.beta,
            nudging: self.nudging,
            loss: self.loss,
            settle,
            seed,
            precision: self.precision,
            rescale: self.rescale,
        };
        let mut free_residual = None;
        let (estimate, reference, settle_stats, reference_name) = match self.estimator {
            EstimatorArg::Backprop => {
                return invalid("backprop is the reference; pick ep, local-ep or eqprop".into());
            }
            EstimatorArg::Ep | EstimatorArg::LocalEp => {
                let mut est: Box<dyn GradientEstimator> = if self.estimator == EstimatorArg::Ep {
                    Box::new(EpEstimator::new(&net, ep_config)?)
                } else {
                    Box::new(EpEstimator::local(&net, ep_config)?)
                };
                let e = est.estimate(&net, &batch)?;
                let r = BackpropEstimator::new(self.loss)?.estimate(&net, &batch)?;
                (e.grads, r.grads, e.settle, "backprop")
            }
            EstimatorArg::Eqprop => {
                if self.precision != Precision::F32 {
                    return invalid(
                        "--precision applies to the EP estimators (ep, local-ep)".into(),
                    );
                }
                let (g, r, residual) = self.eqprop(&net, &batch, seed)?;
                free_residual = Some(residual);
                (
                    g,
                    r,
                    Vec::new(),
                    "implicit differentiation at the free fixed point",
                )
            }
        };
        Ok(GradientReport {
            model: spec.to_string(),
            estimator: self.estimator,
            reference: reference_name,
            dataset: data.name.clone(),
            standardize: self.standardize,
            batch: self.batch,
            beta: self.beta,
            nudging: self.nudging,
            precision: self.precision,
            steps: self.steps,
            loss: self.loss.to_string(),
            seed,
            params: compare(&net, &estimate, &reference),
            settle: settle_stats,
            free_residual,
        })
    }

    /// EqProp's contrast and its implicit-gradient reference, and the free residual.
    fn eqprop(
        &self,
        net: &crate::model::Network,
        batch: &TensorBatch,
        seed: u64,
    ) -> Result<Grads, ExperimentError> {
        let config = EqPropConfig {
            beta: self.beta,
            random_sign: false,
            step: self.settle_lr,
            free_steps: self.steps,
            nudged_steps: self.steps,
            init: EqPropInit::Zero,
        };
        let model = EqPropModel::new(net, config)
            .map_err(|e| ExperimentError::InvalidOption(e.to_string()))?;
        let (x, y, steps, beta) = (&batch.x, &batch.targets, self.steps, self.beta);
        let free = model.relax(net, x, y, model.zero_states(batch.len(), x), 0.0, steps);
        // A single random-sign draw: the sign is the seed's parity.
        let sign = match self.nudging {
            Nudging::RandomSign if seed % 2 == 1 => -1.0,
            _ => 1.0,
        };
        let g = if self.nudging == Nudging::Centered {
            let plus = model.relax(net, x, y, free.clone(), beta, steps);
            let minus = model.relax(net, x, y, free.clone(), -beta, steps);
            EqPropModel::contrast(x, &minus, &plus, 2.0 * beta)
        } else {
            let b = sign * beta;
            let nudged = model.relax(net, x, y, free.clone(), b, steps);
            EqPropModel::contrast(x, &free, &nudged, b)
        };
        let residual = model.free_residual(net, x, &free);
        let r = model.implicit_gradient(net, x, y, &free, 4 * steps);
        Ok((g, r, residual))
    }
}

/// EqProp's gradient, its reference and the free residual.
type Grads = (
    Vec<crate::device::Tensor<2>>,
    Vec<crate::device::Tensor<2>>,
    f32,
);

/// The checkpoint file of a run directory, or `path` itself.
fn checkpoint_file(path: &std::path::Path) -> std::path::PathBuf {
    if path.is_dir() {
        path.join(super::CHECKPOINT)
    } else {
        path.to_path_buf()
    }
}
