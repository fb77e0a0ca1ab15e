//! Elastic weight consolidation: the diagonal empirical Fisher of a finished task, and the
//! quadratic penalty that anchors the parameters it found important.

use burn::tensor::TensorData;

use super::ContinualError;
use crate::data::Split;
use crate::device::{Device, Tensor, into_host, to_host};
use crate::estimate::{EstimateError, GradientEstimator, TensorBatch};
use crate::model::Network;
use crate::train::Penalty;

/// How the EWC penalty enters training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EwcCoupling {
    /// Its gradient `lambda A (theta - c)` is added to the estimated gradient before the
    /// optimizer step (the original EWC). An explicit step is only stable while
    /// `lr * lambda * A` stays small, and a normalising update rule (Muon, Adam) rescales
    /// the penalty's pull with the task gradient.
    #[default]
    Gradient,
    /// After each optimizer step the parameters go through the penalty's proximal map with
    /// the step's learning rate `eta`: `theta <- (theta + eta lambda A c) / (1 + eta lambda
    /// A)`, which is stable for any lambda and independent of the update rule (as decoupled
    /// weight decay is for an L2 penalty).
    Decoupled,
}

/// EWC options.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EwcConfig {
    /// Strength `lambda` of the penalty (>= 0).
    pub lambda: f64,
    /// Decay `gamma` in (0, 1] of earlier tasks' penalties at each consolidation. 1 (the
    /// default) is the original multi-task EWC, `sum_k F_k (theta - theta_k*)^2` with every
    /// task's own Fisher and anchor; below 1 it is online EWC, where task `k`'s term is
    /// weighted `gamma^(T-1-k)` after `T` tasks.
    pub decay: f64,
    /// Training samples of each finished task used to estimate its Fisher.
    pub fisher_samples: usize,
    /// Gradient (default) or decoupled (proximal) application.
    #[serde(default)]
    pub coupling: EwcCoupling,
}

impl Default for EwcConfig {
    /// lambda 100, decay 1 (multi-task EWC), 1000 Fisher samples, gradient coupling.
    fn default() -> Self {
        Self {
            lambda: 100.0,
            decay: 1.0,
            fisher_samples: 1000,
            coupling: EwcCoupling::Gradient,
        }
    }
}

impl EwcConfig {
    /// Checks the ranges.
    pub fn validate(&self) -> Result<(), ContinualError> {
        if !(self.lambda.is_finite() && self.lambda >= 0.0) {
            return Err(ContinualError::InvalidOption(format!(
                "EWC lambda must be a finite number >= 0, got {}",
                self.lambda
            )));
        }
        if !(self.decay > 0.0 && self.decay <= 1.0) {
            return Err(ContinualError::InvalidOption(format!(
                "EWC decay must be in (0, 1], got {}",
                self.decay
            )));
        }
        if self.fisher_samples == 0 {
            return Err(ContinualError::InvalidOption(
                "EWC needs at least one Fisher sample".into(),
            ));
        }
        Ok(())
    }
}

/// The diagonal empirical Fisher `mean_n g_n^2` of `net`'s parameters, where `g_n` is the
/// gradient that `estimator` gives for sample `n` alone (a batch of one: backprop's
/// per-sample loss gradient, or EP's per-sample contrast), on the samples `indices` of
/// `split`. Uses the true labels (the empirical Fisher).
///
/// The estimator is used as is: give it one that is not training, so that its counters
/// (EP's random nudge signs) and EqProp's persistent states are left alone.
pub fn diagonal_fisher(
    estimator: &mut dyn GradientEstimator,
    net: &Network,
    split: &Split,
    indices: &[usize],
    device: &Device,
) -> Result<Vec<Tensor<2>>, EstimateError> {
    if indices.is_empty() {
        return Err(EstimateError::InvalidOption(
            "the Fisher needs at least one sample".into(),
        ));
    }
    let classes = net.output_shape().numel();
    let mut sum: Option<Vec<Tensor<2>>> = None;
    for &i in indices {
        let batch = TensorBatch::new(split.input(i), &split.labels()[i..=i], classes, device);
        let grads = estimator.estimate(net, &batch)?.grads;
        sum = Some(match sum {
            None => grads.into_iter().map(Tensor::square).collect(),
            Some(acc) => acc
                .into_iter()
                .zip(grads)
                .map(|(a, g)| a + g.square())
                .collect(),
        });
    }
    let n = indices.len() as f32;
    Ok(sum
        .expect("at least one sample")
        .into_iter()
        .map(|s| s.div_scalar(n))
        .collect())
}

/// The EWC penalty `lambda/2 sum_k w_k sum_i F_k,i (theta_i - theta*_k,i)^2` over the
/// consolidated tasks `k` (weights `w_k = gamma^(T-1-k)`, all 1 by default).
///
/// It is stored in the equivalent form `lambda/2 (sum_i A_i (theta_i - c_i)^2 + D)`, with
/// `A = sum_k w_k F_k` the accumulated importance, `c = sum_k w_k F_k theta*_k / A` the
/// importance-weighted anchor, and `D` the constant left over. Memory and time per step do
/// not grow with the number of tasks, and the gradient `lambda A (theta - c)` is computed
/// from a difference of parameters, not of large products, so it keeps full precision.
#[derive(Debug, Clone)]
pub struct Ewc {
    config: EwcConfig,
    importance: Vec<Tensor<2>>,
    anchor: Vec<Tensor<2>>,
    constant: f64,
    tasks: usize,
}

impl Ewc {
    /// An EWC penalty with no task consolidated yet (it is zero).
    pub fn new(config: EwcConfig) -> Result<Self, ContinualError> {
        config.validate()?;
        Ok(Self {
            config,
            importance: Vec::new(),
            anchor: Vec::new(),
            constant: 0.0,
            tasks: 0,
        })
    }

    /// Its options.
    pub fn config(&self) -> &EwcConfig {
        &self.config
    }

    /// Tasks consolidated so far.
    pub fn tasks(&self) -> usize {
        self.tasks
    }

    /// The accumulated importance `A` (empty before the first task).
    pub fn importance(&self) -> &[Tensor<2>] {
        &self.importance
    }

    /// Adds a finished task: its diagonal Fisher and the parameters it ended with (the
    /// anchor). Earlier tasks are first weighted by the decay.
    pub fn consolidate(
        &mut self,
        fisher: &[Tensor<2>],
        params: &[Tensor<2>],
    ) -> Result<(), ContinualError> {
        if fisher.len() != params.len()
            || (!self.importance.is_empty() && self.importance.len() != params.len())
        {
            return Err(ContinualError::InvalidOption(format!(
                "EWC got {} Fisher tensors for {} parameters ({} consolidated)",
                fisher.len(),
                params.len(),
                self.importance.len()
            )));
        }
        let gamma = self.config.decay;
        let mut importance = Vec::with_capacity(params.len());
        let mut anchor = Vec::with_capacity(params.len());
        let mut constant = gamma * self.constant;
        for (k, (f, p)) in fisher.iter().zip(params).enumerate() {
            if f.dims() != p.dims() {
                return Err(ContinualError::InvalidOption(format!(
                    "Fisher of parameter {k} is {:?}, the parameter {:?}",
                    f.dims(),
                    p.dims()
                )));
            }
            let (f_host, p_host) = (to_host(f), to_host(p));
            let (a_old, c_old) = match (self.importance.get(k), self.anchor.get(k)) {
                (Some(a), Some(c)) => (to_host(a), to_host(c)),
                _ => (vec![0.0; f_host.len()], vec![0.0; f_host.len()]),
            };
            let mut a_new = Vec::with_capacity(f_host.len());
            let mut c_new = Vec::with_capacity(f_host.len());
            for i in 0..f_host.len() {
                let (fi, ti) = (f_host[i] as f64, p_host[i] as f64);
                let (ai, ci) = (gamma * a_old[i] as f64, c_old[i] as f64);
                if !(fi.is_finite() && fi >= 0.0) {
                    return Err(ContinualError::InvalidOption(format!(
                        "Fisher of parameter {k} has the entry {fi} (must be finite, >= 0)"
                    )));
                }
                let a = ai + fi;
                // The weighted mean of the two anchors, and what the merge leaves constant:
                // ai (x - ci)^2 + fi (x - ti)^2 = a (x - c)^2 + ai (ci - c)^2 + fi (ti - c)^2.
                let c = if a > 0.0 { (ai * ci + fi * ti) / a } else { ti };
                constant += ai * (ci - c).powi(2) + fi * (ti - c).powi(2);
                a_new.push(a as f32);
                c_new.push(c as f32);
            }
            let device = p.device();
            let dims = p.dims();
            importance.push(Tensor::from_data(TensorData::new(a_new, dims), &device));
            anchor.push(Tensor::from_data(TensorData::new(c_new, dims), &device));
        }
        self.importance = importance;
        self.anchor = anchor;
        self.constant = constant;
        self.tasks += 1;
        Ok(())
    }
}

impl Penalty for Ewc {
    fn gradient(&self, params: &[Tensor<2>]) -> Vec<Option<Tensor<2>>> {
        let lambda = self.config.lambda as f32;
        params
            .iter()
            .enumerate()
            .map(|(k, p)| {
                let (a, c) = (self.importance.get(k)?, self.anchor.get(k)?);
                Some((p.clone() - c.clone()).mul(a.clone()).mul_scalar(lambda))
            })
            .collect()
    }

    fn decoupled(&self) -> bool {
        self.config.coupling == EwcCoupling::Decoupled
    }

    fn proximal(&self, params: Vec<Tensor<2>>, step: f64) -> Vec<Tensor<2>> {
        let scale = (step * self.config.lambda) as f32;
        params
            .into_iter()
            .enumerate()
            .map(
                |(k, p)| match (self.importance.get(k), self.anchor.get(k)) {
                    (Some(a), Some(c)) => {
                        let s = a.clone().mul_scalar(scale);
                        (p + s.clone().mul(c.clone())).div(s.add_scalar(1.0))
                    }
                    _ => p,
                },
            )
            .collect()
    }

    fn value(&self, params: &[Tensor<2>]) -> f64 {
        let mut sum = self.constant;
        for ((p, a), c) in params.iter().zip(&self.importance).zip(&self.anchor) {
            let d = into_host((p.clone() - c.clone()).square().mul(a.clone()));
            sum += d.iter().map(|&x| x as f64).sum::<f64>();
        }
        0.5 * self.config.lambda * sum
    }
}
