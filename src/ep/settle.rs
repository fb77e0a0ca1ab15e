//! Settling: heavy-ball descent of the energy in state space.

use burn::tensor::TensorData;

use super::convergence::{
    ADAPTIVE_GROWTH, ADAPTIVE_MAX_FACTOR, ADAPTIVE_SHRINK, CURVATURE_ITERATIONS, ResidualCheck,
    SettleConfig, SettleError, SettleStats, Settled,
};
use super::energy::{BatchContext, EnergyModel, Evaluation};
use crate::device::{Tensor, to_host};
use crate::model::Network;

/// Heavy-ball state descent on an [`EnergyModel`].
#[derive(Debug, Clone)]
pub struct Settler {
    config: SettleConfig,
}

impl Settler {
    /// A settler with validated options.
    pub fn new(config: SettleConfig) -> Result<Self, SettleError> {
        config.validate()?;
        Ok(Self { config })
    }

    /// Its options.
    pub fn config(&self) -> &SettleConfig {
        &self.config
    }

    /// Per-layer largest per-sample squared norm `[1, L]` and the largest per-sample total.
    /// Per-layer largest per-sample norm, the largest per-sample total, and (with
    /// `per_sample`) every sample's total norm.
    fn norms(grads: &[Tensor<2>], per_sample: bool) -> (Vec<f32>, f32, Vec<f32>) {
        let per_layer: Vec<Tensor<2>> = grads
            .iter()
            .map(|g| g.clone().square().sum_dim(1))
            .collect();
        let stacked = Tensor::cat(per_layer, 1);
        let totals = stacked.clone().sum_dim(1);
        let samples = if per_sample {
            to_host(&totals).into_iter().map(f32::sqrt).collect()
        } else {
            Vec::new()
        };
        let total = totals.max_dim(0);
        let layer_max = stacked.max_dim(0);
        let mut values = to_host(&Tensor::cat(vec![layer_max, total], 1));
        let total = values.pop().expect("one total").sqrt();
        (values.into_iter().map(f32::sqrt).collect(), total, samples)
    }

    /// Descends the energy at nudge `beta` from `start` (whose evaluation is `start_eval`).
    /// On a CPU device, networks with the dense structure (linear layers joined by
    /// element-wise activations) in f32 run the fused host loop of `ep::dense`, and
    /// convolutional chains that of `ep::conv`; both compute
    /// the same iteration (with the curvature-following step, at the step estimated here).
    /// Everything else (lower precision, the adaptive step) runs
    /// [`Settler::settle_generic`].
    pub fn settle(
        &self,
        model: &EnergyModel,
        net: &Network,
        ctx: &BatchContext,
        start: &[Tensor<2>],
        start_eval: &Evaluation,
        beta: f32,
    ) -> Result<Settled, SettleError> {
        let host = crate::device::is_host(&ctx.input().device())
            && !self.config.adaptive
            && start.iter().all(|s| s.dtype() == burn::tensor::DType::F32);
        let dense = host.then(|| model.dense_plan(net)).flatten();
        let conv = (host && dense.is_none())
            .then(|| model.conv_plan(net))
            .flatten();
        if dense.is_none() && conv.is_none() {
            return self.settle_generic(model, net, ctx, start, start_eval, beta);
        }
        // The fused loops take a fixed step: the curvature's, fixed here, as the generic
        // loop fixes it at its start.
        let at_rest = start_eval.at_rest();
        let mut config = self.config;
        if config.curvature {
            let lambda = largest_curvature(model, net, ctx, start, start_eval, beta);
            config.lr = config.curvature_step(lambda);
            config.curvature = false;
        }
        match (dense, conv) {
            (Some(plan), _) => {
                super::dense::settle(&plan, &config, model, net, ctx, start, at_rest, beta)
            }
            (_, Some(plan)) => {
                super::conv::settle(&plan, &config, model, net, ctx, start, at_rest, beta)
            }
            _ => unreachable!("one of the plans exists"),
        }
    }

    /// The generic settle loop on burn tensors (any network, any device).
    pub fn settle_generic(
        &self,
        model: &EnergyModel,
        net: &Network,
        ctx: &BatchContext,
        start: &[Tensor<2>],
        start_eval: &Evaluation,
        beta: f32,
    ) -> Result<Settled, SettleError> {
        let c = &self.config;
        let mut states = start.to_vec();
        let mut eval = start_eval.clone();
        let mut momentum: Vec<Tensor<2>> = states.iter().map(Tensor::zeros_like).collect();
        let mut residuals = ResidualCheck::new(c, beta);
        let base_lr = if c.curvature {
            c.curvature_step(largest_curvature(model, net, ctx, &states, &eval, beta))
        } else {
            c.lr
        };
        let mut stats = SettleStats {
            step: base_lr,
            ..SettleStats::default()
        };
        let mut curve = Vec::new();
        let batch = ctx.batch_size();
        let device = ctx.input().device();
        let mut step_size = c
            .adaptive
            .then(|| Tensor::<2>::full([batch, 1], base_lr, &device));
        let mut energy = c
            .adaptive
            .then(|| model.per_sample_energy(ctx, &eval, beta));
        // Per-sample stopping: the step at which each sample stopped, and the mask of the
        // samples still moving.
        let mut stopped: Vec<Option<usize>> = vec![None; batch];
        let mut mask: Option<Tensor<2>> = None;
        loop {
            let grads = model.state_gradients(net, ctx, &eval, beta);
            if stats.steps.is_multiple_of(c.check_every) {
                let (layers, total, samples) = Self::norms(&grads, c.per_sample);
                if residuals.check(&layers, total, model.state_names(), &mut stats, &mut curve)? {
                    stats.converged = true;
                    break;
                }
                if c.per_sample {
                    let threshold = residuals.threshold();
                    for (stop, &norm) in stopped.iter_mut().zip(&samples) {
                        if stop.is_none() && norm <= threshold {
                            *stop = Some(stats.steps);
                        }
                    }
                    let moving: Vec<f32> = stopped
                        .iter()
                        .map(|s| f32::from(u8::from(s.is_none())))
                        .collect();
                    mask = Some(Tensor::from_data(
                        TensorData::new(moving, [batch, 1]),
                        &device,
                    ));
                }
            }
            if stats.steps >= c.steps {
                break;
            }
            for (m, g) in momentum.iter_mut().zip(grads) {
                *m = m.clone().mul_scalar(c.momentum) + g;
            }
            match (&mut step_size, &mut energy) {
                (Some(lr), Some(e_prev)) => {
                    let rate = match &mask {
                        Some(mask) => lr.clone() * mask.clone(),
                        None => lr.clone(),
                    };
                    let proposal: Vec<Tensor<2>> = states
                        .iter()
                        .zip(&momentum)
                        .map(|(s, m)| s.clone() - m.clone() * rate.clone())
                        .collect();
                    let new_eval = model.evaluate(net, ctx, &proposal);
                    let e_new = model.per_sample_energy(ctx, &new_eval, beta);
                    let accept = e_new.clone().lower_equal(e_prev.clone()).float();
                    let rejected = batch - to_host(&accept.clone().sum_dim(0))[0].round() as usize;
                    let grown = lr
                        .clone()
                        .mul_scalar(ADAPTIVE_GROWTH)
                        .clamp_max(base_lr * ADAPTIVE_MAX_FACTOR);
                    let shrunk = lr.clone().mul_scalar(ADAPTIVE_SHRINK);
                    let reject = accept.clone().neg().add_scalar(1.0);
                    *lr = grown * accept.clone() + shrunk * reject.clone();
                    if rejected == 0 {
                        states = proposal;
                        eval = new_eval;
                        *e_prev = e_new;
                    } else {
                        stats.rejected += rejected;
                        for ((s, p), m) in states.iter_mut().zip(proposal).zip(momentum.iter_mut())
                        {
                            *s = s.clone() + (p - s.clone()) * accept.clone();
                            *m = m.clone() * accept.clone();
                        }
                        *e_prev = e_new * accept + e_prev.clone() * reject;
                        eval = model.evaluate(net, ctx, &states);
                    }
                }
                _ => {
                    for (s, m) in states.iter_mut().zip(&momentum) {
                        let step = m.clone().mul_scalar(base_lr);
                        *s = s.clone()
                            - match &mask {
                                Some(mask) => step * mask.clone(),
                                None => step,
                            };
                    }
                    eval = model.evaluate(net, ctx, &states);
                }
            }
            stats.steps += 1;
        }
        Ok(Settled::finish(
            model, ctx, states, eval, stats, curve, &stopped, beta,
        ))
    }
}

/// The state Hessian's largest eigenvalue at `states` (whose evaluation is `eval`), over
/// the whole batch (the Hessian is block-diagonal across samples, so this is the largest
/// over samples): [`CURVATURE_ITERATIONS`] rounds of power iteration, each product `H v`
/// a finite difference of the state gradient over a displacement of rms `1e-3` times the
/// states' rms (exact where no ReLU or max-pool switches: the layered energy is piecewise
/// quadratic in the states). Starts from a fixed pattern, so runs are reproducible.
pub fn largest_curvature(
    model: &EnergyModel,
    net: &Network,
    ctx: &BatchContext,
    states: &[Tensor<2>],
    eval: &Evaluation,
    beta: f32,
) -> f32 {
    let sum_sq = |ts: &[Tensor<2>]| -> f32 {
        let total = ts
            .iter()
            .map(|t| t.clone().square().sum())
            .reduce(|a, b| a + b)
            .expect("at least one state");
        to_host(&total.reshape([1, 1]))[0]
    };
    let count: usize = states
        .iter()
        .map(|s| s.dims().iter().product::<usize>())
        .sum();
    let rms = (sum_sq(states) / count as f32).sqrt();
    let scale = 1e-3 * rms.max(1e-3);
    let device = ctx.input().device();
    // A fixed pseudo-random pattern in [-0.5, 0.5).
    let mut k = 0u64;
    let mut v: Vec<Tensor<2>> = states
        .iter()
        .map(|s| {
            let dims = s.dims();
            let data: Vec<f32> = (0..dims[0] * dims[1])
                .map(|_| {
                    k += 1;
                    let h = k.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
                    h as f32 / (1u64 << 24) as f32 - 0.5
                })
                .collect();
            Tensor::from_data(TensorData::new(data, dims), &device)
        })
        .collect();
    let base = model.state_gradients(net, ctx, eval, beta);
    let mut lambda = 0.0;
    for _ in 0..CURVATURE_ITERATIONS {
        let norm = sum_sq(&v).sqrt();
        if !(norm.is_finite() && norm > 0.0) {
            break;
        }
        // The displacement: v rescaled to rms `scale`.
        let factor = scale * (count as f32).sqrt() / norm;
        let moved: Vec<Tensor<2>> = states
            .iter()
            .zip(&v)
            .map(|(s, d)| s.clone() + d.clone().mul_scalar(factor))
            .collect();
        let moved_eval = model.evaluate(net, ctx, &moved);
        let grads = model.state_gradients(net, ctx, &moved_eval, beta);
        v = grads
            .into_iter()
            .zip(&base)
            .map(|(g, b)| g - b.clone())
            .collect();
        // |H d| / |d| with |d| = scale * sqrt(count).
        lambda = sum_sq(&v).sqrt() / (scale * (count as f32).sqrt());
    }
    lambda.max(1.0)
}
