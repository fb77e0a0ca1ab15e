//! Classic Equilibrium Propagation (Scellier & Bengio, 2017) on a layered Hopfield network.
//!
//! States `s_1..s_L` (the last is the output) live in `[0, 1]`; the input `x` is clamped.
//! With `rho(s) = clip(s, 0, 1)` and the network's linear weights used symmetrically,
//!
//! `F(s) = 1/2 sum_i ||s_i||^2 - sum_i rho(s_{i-1}) W_i . rho(s_i) - sum_i b_i . rho(s_i)
//!        + beta/2 ||s_L - y||^2`.
//!
//! Because states are projected back into `[0, 1]` after every step, `rho(s) = s` and
//! `rho' = 1` on the states, so a step is `s_i <- clip(s_i - eps (s_i - d_i), 0, 1)` with the
//! drive `d_i = s_{i-1} W_i + b_i + s_{i+1} W_{i+1}^T` (plus `beta (y - s_L)` at the output).
//! The free phase starts from zero states or from each training sample's persistent states
//! of its previous visit; the nudged phase starts from the free states. The prediction is
//! `argmax s_L` after a free phase from zero.

use burn::tensor::TensorData;

use crate::device::{Tensor, to_host};
use crate::model::{Activation, LayerOp, Network};

/// Where the free phase starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EqPropInit {
    /// From zero states.
    Zero,
    /// From the states a training sample reached on its previous visit (zero the first
    /// time); needs sample indices.
    Persistent,
}

/// EqProp options.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EqPropConfig {
    /// Nudge strength.
    pub beta: f32,
    /// Draw the nudge's sign at random for each batch.
    pub random_sign: bool,
    /// Step size `eps` of the state dynamics.
    pub step: f32,
    /// Free-phase steps.
    pub free_steps: usize,
    /// Nudged-phase steps.
    pub nudged_steps: usize,
    /// Free-phase starting point.
    pub init: EqPropInit,
}

impl Default for EqPropConfig {
    /// Beta 1 of random sign, eps 0.5, 40 free steps from zero, 4 nudged steps (the paper's
    /// eps and nudged steps; more free steps because they start from zero).
    fn default() -> Self {
        Self {
            beta: 1.0,
            random_sign: true,
            step: 0.5,
            free_steps: 40,
            nudged_steps: 4,
            init: EqPropInit::Zero,
        }
    }
}

/// The layered Hopfield network over a [`Network`]'s linear layers.
#[derive(Debug, Clone)]
pub struct EqPropModel {
    config: EqPropConfig,
    widths: Vec<usize>,
    persistent: Vec<Vec<f32>>,
}

/// Why a network cannot be used by EqProp.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "eqprop needs a fully connected network with hard-sigmoid activations, like 784-500-hsig-10: {0}"
)]
pub struct EqPropNetworkError(pub String);

impl EqPropModel {
    /// Checks that `net` is `Linear (HardSigmoid Linear)*` and sets up the states.
    pub fn new(net: &Network, config: EqPropConfig) -> Result<Self, EqPropNetworkError> {
        let mut widths = Vec::new();
        for (i, layer) in net.layers().iter().enumerate() {
            match (&layer.op, i % 2) {
                (LayerOp::Linear { outputs, .. }, 0) => widths.push(*outputs),
                (LayerOp::Activation(Activation::HardSigmoid), 1) => {}
                _ => {
                    return Err(EqPropNetworkError(format!(
                        "layer {} ({}) is not allowed here",
                        i + 1,
                        layer.name
                    )));
                }
            }
        }
        if net.layers().len().is_multiple_of(2) || !net.skips().is_empty() {
            return Err(EqPropNetworkError(
                "it must end with a linear layer and have no residual blocks".into(),
            ));
        }
        Ok(Self {
            config,
            widths,
            persistent: Vec::new(),
        })
    }

    /// Its options.
    pub fn config(&self) -> &EqPropConfig {
        &self.config
    }

    /// Drives `d_i = s_{i-1} W_i + b_i + s_{i+1} W_{i+1}^T` for every state.
    fn drives(net: &Network, x: &Tensor<2>, s: &[Tensor<2>], with_bias: bool) -> Vec<Tensor<2>> {
        let p = net.params();
        let n = s.len();
        (0..n)
            .map(|i| {
                let below = if i == 0 { x.clone() } else { s[i - 1].clone() };
                let mut d = below.matmul(p[2 * i].clone());
                if with_bias {
                    d = d + p[2 * i + 1].clone();
                }
                if i + 1 < n {
                    d = d + s[i + 1].clone().matmul(p[2 * (i + 1)].clone().transpose());
                }
                d
            })
            .collect()
    }

    /// Runs `steps` steps of the dynamics at nudge `beta` toward `targets`.
    pub fn relax(
        &self,
        net: &Network,
        x: &Tensor<2>,
        targets: &Tensor<2>,
        mut s: Vec<Tensor<2>>,
        beta: f32,
        steps: usize,
    ) -> Vec<Tensor<2>> {
        let eps = self.config.step;
        let last = s.len() - 1;
        for _ in 0..steps {
            let mut d = Self::drives(net, x, &s, true);
            if beta != 0.0 {
                d[last] = d[last].clone() + (targets.clone() - s[last].clone()).mul_scalar(beta);
            }
            s = s
                .into_iter()
                .zip(d)
                .map(|(si, di)| (si.clone() - (si - di).mul_scalar(eps)).clamp(0.0, 1.0))
                .collect();
        }
        s
    }

    /// Zero states for a batch of `batch` samples.
    pub fn zero_states(&self, batch: usize, x: &Tensor<2>) -> Vec<Tensor<2>> {
        self.widths
            .iter()
            .map(|&w| Tensor::zeros([batch, w], &x.device()))
            .collect()
    }

    /// The free phase's starting states: zero, or the persistent states of `indices`.
    pub fn initial_states(&self, x: &Tensor<2>, indices: Option<&[usize]>) -> Vec<Tensor<2>> {
        let batch = x.dims()[0];
        match (self.config.init, indices) {
            (EqPropInit::Persistent, Some(idx)) if !self.persistent.is_empty() => self
                .widths
                .iter()
                .zip(&self.persistent)
                .map(|(&w, store)| {
                    let mut v = Vec::with_capacity(batch * w);
                    for &i in idx {
                        v.extend_from_slice(&store[i * w..(i + 1) * w]);
                    }
                    Tensor::from_data(TensorData::new(v, [batch, w]), &x.device())
                })
                .collect(),
            _ => self.zero_states(batch, x),
        }
    }

    /// Stores free states for `indices` (persistent init only); `samples` sizes the store.
    pub fn remember(&mut self, states: &[Tensor<2>], indices: &[usize], samples: usize) {
        if self.config.init != EqPropInit::Persistent {
            return;
        }
        if self.persistent.is_empty() {
            self.persistent = self
                .widths
                .iter()
                .map(|&w| vec![0.0; samples * w])
                .collect();
        }
        for ((&w, store), s) in self.widths.iter().zip(&mut self.persistent).zip(states) {
            let values = to_host(s);
            for (row, &i) in indices.iter().enumerate() {
                if (i + 1) * w <= store.len() {
                    store[i * w..(i + 1) * w].copy_from_slice(&values[row * w..(row + 1) * w]);
                }
            }
        }
    }

    /// `dF/dtheta` summed over the batch at states `s`, nudge term excluded (it does not
    /// depend on the parameters).
    fn energy_param_grads(x: &Tensor<2>, s: &[Tensor<2>]) -> Vec<Tensor<2>> {
        let mut out = Vec::with_capacity(2 * s.len());
        for i in 0..s.len() {
            let below = if i == 0 { x.clone() } else { s[i - 1].clone() };
            out.push(below.transpose().matmul(s[i].clone()).neg());
            out.push(s[i].clone().sum_dim(0).neg());
        }
        out
    }

    /// The EqProp gradient `(dF/dtheta(s^beta) - dF/dtheta(s^0)) / (beta * batch)`.
    pub fn contrast(
        x: &Tensor<2>,
        free: &[Tensor<2>],
        nudged: &[Tensor<2>],
        beta: f32,
    ) -> Vec<Tensor<2>> {
        let batch = x.dims()[0] as f32;
        Self::energy_param_grads(x, nudged)
            .into_iter()
            .zip(Self::energy_param_grads(x, free))
            .map(|(n, f)| (n - f).div_scalar(beta * batch))
            .collect()
    }

    /// The gradient of the cost `1/2 ||s_L - y||^2` at the free fixed point `free` with
    /// respect to the parameters, by implicit differentiation (recurrent backprop): the
    /// adjoint `lambda = M (dC/ds + J lambda)` on units strictly inside `(0, 1)` (mask `M`,
    /// `J` the drive's Jacobian) is solved by damped iteration, then
    /// `dC/dW_i = s_{i-1}^T lambda_i + lambda_{i-1}^T s_i`. Averaged over the batch. This is
    /// the quantity EqProp's gradient approaches as beta goes to 0.
    pub fn implicit_gradient(
        &self,
        net: &Network,
        x: &Tensor<2>,
        targets: &Tensor<2>,
        free: &[Tensor<2>],
        iterations: usize,
    ) -> Vec<Tensor<2>> {
        let n = free.len();
        let masks: Vec<Tensor<2>> = free
            .iter()
            .map(|s| {
                s.clone()
                    .greater_elem(0.0)
                    .bool_and(s.clone().lower_elem(1.0))
                    .float()
            })
            .collect();
        let mut dc: Vec<Tensor<2>> = free.iter().map(Tensor::zeros_like).collect();
        dc[n - 1] = free[n - 1].clone() - targets.clone();
        let zero_x = Tensor::zeros_like(x);
        let mut lambda: Vec<Tensor<2>> = free.iter().map(Tensor::zeros_like).collect();
        let eps = self.config.step;
        for _ in 0..iterations {
            let j = Self::drives(net, &zero_x, &lambda, false);
            lambda = lambda
                .into_iter()
                .zip(j)
                .zip(&dc)
                .zip(&masks)
                .map(|(((l, jl), c), m)| {
                    let target = (c.clone().neg() + jl) * m.clone();
                    l.clone() - (l - target).mul_scalar(eps)
                })
                .collect();
        }
        // lambda solves lambda = M(-dC/ds + J lambda), i.e. it is the state response
        // direction; the cost gradient is minus the parameter-drive contraction.
        let batch = x.dims()[0] as f32;
        let mut out = Vec::with_capacity(2 * n);
        for i in 0..n {
            let below = if i == 0 {
                x.clone()
            } else {
                free[i - 1].clone()
            };
            let mut gw = below.transpose().matmul(lambda[i].clone());
            if i > 0 {
                gw = gw + lambda[i - 1].clone().transpose().matmul(free[i].clone());
            }
            out.push(gw.neg().div_scalar(batch));
            out.push(lambda[i].clone().sum_dim(0).neg().div_scalar(batch));
        }
        out
    }

    /// Largest fixed-point residual `|clip(d_i, 0, 1) - s_i|` of the free dynamics at `s`
    /// (0 at a fixed point).
    pub fn free_residual(&self, net: &Network, x: &Tensor<2>, s: &[Tensor<2>]) -> f32 {
        Self::drives(net, x, s, true)
            .into_iter()
            .zip(s)
            .map(|(d, si)| {
                to_host(&(d.clamp(0.0, 1.0) - si.clone()).abs().max_dim(1).max_dim(0))[0]
            })
            .fold(0.0, f32::max)
    }

    /// The output states after a free phase from zero: the EqProp prediction.
    pub fn predict(&self, net: &Network, x: &Tensor<2>) -> Tensor<2> {
        let batch = x.dims()[0];
        let s = self.zero_states(batch, x);
        let dummy = Tensor::zeros(
            [batch, *self.widths.last().expect("one layer")],
            &x.device(),
        );
        self.relax(net, x, &dummy, s, 0.0, self.config.free_steps)
            .pop()
            .expect("one state")
    }
}
