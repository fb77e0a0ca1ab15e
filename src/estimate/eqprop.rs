//! Classic EqProp as a gradient estimator.

use super::{
    Estimate, EstimateError, GradientEstimator, TensorBatch, check_batch, scalar, scalar_of,
};
use crate::device::Tensor;
use crate::ep::{EqPropConfig, EqPropModel};
use crate::loss::Loss;
use crate::model::Network;

/// EqProp (Scellier & Bengio 2017): free phase, nudged phase warm-started from it, and the
/// contrast of the Hopfield energy's parameter gradients.
#[derive(Debug, Clone)]
pub struct EqPropEstimator {
    model: EqPropModel,
    seed: u64,
    calls: u64,
    samples: usize,
}

impl EqPropEstimator {
    /// EqProp over `net` (a `Linear (hsig Linear)*` chain); `samples` is the training-split
    /// size (for persistent states), `seed` drives the random nudge signs.
    pub fn new(
        net: &Network,
        config: EqPropConfig,
        samples: usize,
        seed: u64,
    ) -> Result<Self, EstimateError> {
        if !(config.beta.is_finite() && config.beta > 0.0) {
            return Err(EstimateError::InvalidOption(format!(
                "beta must be positive, got {}",
                config.beta
            )));
        }
        if !(config.step > 0.0 && config.step <= 1.0) {
            return Err(EstimateError::InvalidOption(format!(
                "eqprop step must be in (0, 1], got {}",
                config.step
            )));
        }
        Ok(Self {
            model: EqPropModel::new(net, config)?,
            seed,
            calls: 0,
            samples,
        })
    }

    /// The Hopfield model.
    pub fn model(&self) -> &EqPropModel {
        &self.model
    }

    /// The free phase of a batch (from its initial states).
    pub fn free_phase(&self, net: &Network, batch: &TensorBatch) -> Vec<Tensor<2>> {
        let c = self.model.config();
        let s0 = self
            .model
            .initial_states(&batch.x, batch.indices.as_deref());
        self.model
            .relax(net, &batch.x, &batch.targets, s0, 0.0, c.free_steps)
    }
}

impl GradientEstimator for EqPropEstimator {
    fn name(&self) -> &'static str {
        "eqprop"
    }

    fn loss(&self) -> Option<Loss> {
        Some(Loss::default())
    }

    fn state(&self) -> Vec<(String, f64)> {
        vec![("calls".into(), self.calls as f64)]
    }

    fn load_state(&mut self, state: &[(String, f64)]) {
        self.calls = scalar_of(state, "calls") as u64;
    }

    fn estimate(&mut self, net: &Network, batch: &TensorBatch) -> Result<Estimate, EstimateError> {
        check_batch(net, batch)?;
        let c = *self.model.config();
        let free = self.free_phase(net, batch);
        if let Some(idx) = &batch.indices {
            self.model.remember(&free, idx, self.samples);
        }
        self.calls += 1;
        let beta = if c.random_sign && crate::data::dataset::mix(self.seed, self.calls) & 1 == 1 {
            -c.beta
        } else {
            c.beta
        };
        let nudged = self.model.relax(
            net,
            &batch.x,
            &batch.targets,
            free.clone(),
            beta,
            c.nudged_steps,
        );
        let grads = EqPropModel::contrast(&batch.x, &free, &nudged, beta);
        let output = free.last().expect("one state").clone();
        let loss = scalar(Loss::default().mean(output.clone(), batch.targets.clone()));
        Ok(Estimate {
            grads,
            loss,
            output,
            settle: Vec::new(),
            residual_curves: Vec::new(),
            moments: Vec::new(),
            factors: Vec::new(),
            factored: Vec::new(),
        })
    }

    fn predict(&self, net: &Network, x: Tensor<2>) -> Tensor<2> {
        self.model.predict(net, &x)
    }
}
