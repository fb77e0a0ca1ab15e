//! Stochastic gradient descent with momentum and decoupled weight decay.

use super::{OptimError, Optimizer, OptimizerState, check_arity, check_range};
use crate::device::Tensor;

/// SGD: `v <- mu v + g`; `theta <- theta (1 - lr wd) - lr v` (or `- lr (g + mu v)` with
/// Nesterov momentum).
#[derive(Debug, Clone)]
pub struct Sgd {
    lr: f64,
    momentum: f64,
    nesterov: bool,
    weight_decay: f64,
    velocity: Vec<Option<Tensor<2>>>,
}

impl Sgd {
    /// SGD with learning rate `lr`, momentum in [0, 1), optional Nesterov, decoupled weight
    /// decay `weight_decay >= 0`.
    pub fn new(
        lr: f64,
        momentum: f64,
        nesterov: bool,
        weight_decay: f64,
    ) -> Result<Self, OptimError> {
        check_range("lr", lr, lr > 0.0, "must be positive")?;
        check_range(
            "momentum",
            momentum,
            (0.0..1.0).contains(&momentum),
            "must be in [0, 1)",
        )?;
        check_range(
            "weight_decay",
            weight_decay,
            weight_decay >= 0.0,
            "must be >= 0",
        )?;
        Ok(Self {
            lr,
            momentum,
            nesterov,
            weight_decay,
            velocity: Vec::new(),
        })
    }
}

impl Optimizer for Sgd {
    fn learning_rate(&self) -> f64 {
        self.lr
    }

    fn step(
        &mut self,
        params: Vec<Tensor<2>>,
        grads: Vec<Tensor<2>>,
    ) -> Result<Vec<Tensor<2>>, OptimError> {
        check_arity(params.len(), grads.len())?;
        self.velocity.resize(params.len(), None);
        let (lr, mu) = (self.lr as f32, self.momentum as f32);
        let decay = 1.0 - (self.lr * self.weight_decay) as f32;
        let mut out = Vec::with_capacity(params.len());
        for ((p, g), v) in params.into_iter().zip(grads).zip(&mut self.velocity) {
            let direction = if mu > 0.0 {
                let nv = match v.take() {
                    Some(old) => old.mul_scalar(mu) + g.clone(),
                    None => g.clone(),
                };
                *v = Some(nv.clone());
                if self.nesterov {
                    g + nv.mul_scalar(mu)
                } else {
                    nv
                }
            } else {
                g
            };
            let p = if decay != 1.0 { p.mul_scalar(decay) } else { p };
            out.push(p - direction.mul_scalar(lr));
        }
        Ok(out)
    }

    fn state(&self) -> OptimizerState {
        OptimizerState {
            tensors: self
                .velocity
                .iter()
                .enumerate()
                .filter_map(|(i, v)| v.as_ref().map(|v| (format!("{i}.velocity"), v.clone())))
                .collect(),
            scalars: vec![("params".into(), self.velocity.len() as f64)],
        }
    }

    fn load_state(&mut self, state: &OptimizerState) -> Result<(), OptimError> {
        let n = state.scalar("params").unwrap_or(0.0) as usize;
        self.velocity = vec![None; n];
        for (name, t) in &state.tensors {
            let i: usize = name
                .strip_suffix(".velocity")
                .and_then(|i| i.parse().ok())
                .filter(|&i| i < n)
                .ok_or_else(|| OptimError::State(format!("unexpected sgd state {name}")))?;
            self.velocity[i] = Some(t.clone());
        }
        Ok(())
    }
}
