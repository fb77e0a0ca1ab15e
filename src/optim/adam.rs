//! Adam and AdamW.

use super::{OptimError, Optimizer, OptimizerState, check_adam, check_arity, check_range};
use crate::device::Tensor;

/// Adam with bias correction; `weight_decay` is decoupled (AdamW): `theta <- theta (1 - lr wd)`
/// before the Adam step.
#[derive(Debug, Clone)]
pub struct Adam {
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    step: i32,
    moments: Vec<Option<(Tensor<2>, Tensor<2>)>>,
}

impl Adam {
    /// Adam with the usual `beta1 = 0.9`, `beta2 = 0.999`, `eps = 1e-8`.
    pub fn new(lr: f64, weight_decay: f64) -> Result<Self, OptimError> {
        Self::with_betas(lr, 0.9, 0.999, 1e-8, weight_decay)
    }

    /// Adam with explicit moment decays and epsilon.
    pub fn with_betas(
        lr: f64,
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
    ) -> Result<Self, OptimError> {
        check_range("lr", lr, lr > 0.0, "must be positive")?;
        check_adam(beta1, beta2, eps)?;
        check_range(
            "weight_decay",
            weight_decay,
            weight_decay >= 0.0,
            "must be >= 0",
        )?;
        Ok(Self {
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
            step: 0,
            moments: Vec::new(),
        })
    }
}

impl Optimizer for Adam {
    fn learning_rate(&self) -> f64 {
        self.lr
    }

    fn step(
        &mut self,
        params: Vec<Tensor<2>>,
        grads: Vec<Tensor<2>>,
    ) -> Result<Vec<Tensor<2>>, OptimError> {
        check_arity(params.len(), grads.len())?;
        self.moments.resize(params.len(), None);
        self.step += 1;
        let (b1, b2) = (self.beta1 as f32, self.beta2 as f32);
        let bc1 = 1.0 - self.beta1.powi(self.step);
        let bc2 = 1.0 - self.beta2.powi(self.step);
        // lr_t = lr * sqrt(bc2) / bc1, eps scaled accordingly (the standard formulation).
        let step_size = (self.lr * bc2.sqrt() / bc1) as f32;
        let eps = (self.eps * bc2.sqrt()) as f32;
        let decay = 1.0 - (self.lr * self.weight_decay) as f32;
        let mut out = Vec::with_capacity(params.len());
        for ((p, g), state) in params.into_iter().zip(grads).zip(&mut self.moments) {
            let (m, v) = match state.take() {
                Some((m, v)) => (
                    m.mul_scalar(b1) + g.clone().mul_scalar(1.0 - b1),
                    v.mul_scalar(b2) + g.clone().powi_scalar(2).mul_scalar(1.0 - b2),
                ),
                None => (
                    g.clone().mul_scalar(1.0 - b1),
                    g.powi_scalar(2).mul_scalar(1.0 - b2),
                ),
            };
            let update = m.clone().div(v.clone().sqrt().add_scalar(eps));
            *state = Some((m, v));
            let p = if decay != 1.0 { p.mul_scalar(decay) } else { p };
            out.push(p - update.mul_scalar(step_size));
        }
        Ok(out)
    }

    fn state(&self) -> OptimizerState {
        let mut tensors = Vec::new();
        for (i, m) in self.moments.iter().enumerate() {
            if let Some((m, v)) = m {
                tensors.push((format!("{i}.m"), m.clone()));
                tensors.push((format!("{i}.v"), v.clone()));
            }
        }
        OptimizerState {
            tensors,
            scalars: vec![
                ("step".into(), self.step as f64),
                ("params".into(), self.moments.len() as f64),
            ],
        }
    }

    fn load_state(&mut self, state: &OptimizerState) -> Result<(), OptimError> {
        let n = state.scalar("params").unwrap_or(0.0) as usize;
        self.step = state.scalar("step").unwrap_or(0.0) as i32;
        self.moments = vec![None; n];
        for i in 0..n {
            match (
                state.tensor(&format!("{i}.m")),
                state.tensor(&format!("{i}.v")),
            ) {
                (Some(m), Some(v)) => self.moments[i] = Some((m.clone(), v.clone())),
                (None, None) => {}
                _ => return Err(OptimError::State(format!("adam moments of {i} incomplete"))),
            }
        }
        Ok(())
    }
}
