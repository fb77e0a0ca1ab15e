//! The fused host settle loop for dense networks.
//!
//! When every state after the first is a linear layer fed by the previous state through at
//! most one element-wise activation ([`DensePlan`]) and the tensors live on a CPU device,
//! [`super::Settler`] runs this loop instead of the generic one. It computes exactly the
//! same iteration on plain `f32` buffers allocated once per settle: per step, one `gemm`
//! product per layer for the feedback `e_{i+1} W_{i+1}^T` and one for the prediction
//! `f(s_i) W_{i+1} + b`, and two fused passes per state (gradient, then momentum, state
//! and activation together) instead of about ten separate tensor operations, each with its
//! own allocation. `tests/settle.rs` checks it against the generic loop.

use burn::tensor::TensorData;

use super::energy::{BatchContext, DensePlan, EnergyModel, Evaluation};
use super::settle::{ResidualCheck, SettleConfig, SettleError, SettleStats, Settled};
use crate::device::{Tensor, to_host};
use crate::loss::{Loss, MseScale};
use crate::model::Activation;
use crate::model::Network;
use crate::model::kernels::{MatRef, matmul_with};

/// One linear link `h_{i} = f(s_{i-1}) W + b` of the plan, on the host.
struct Link {
    activation: Option<Activation>,
    /// `[inputs, outputs]`, row-major.
    weight: Vec<f32>,
    bias: Vec<f32>,
}

/// `dst = f(src)` (a copy without an activation). The match is outside the loops, so each
/// loop is a plain, vectorisable map.
fn apply(activation: Option<Activation>, src: &[f32], dst: &mut [f32]) {
    let map = |dst: &mut [f32], f: &dyn Fn(f32) -> f32| {
        for (d, &x) in dst.iter_mut().zip(src) {
            *d = f(x);
        }
    };
    match activation {
        None => dst.copy_from_slice(src),
        Some(Activation::Relu) => {
            for (d, &x) in dst.iter_mut().zip(src) {
                *d = x.max(0.0);
            }
        }
        Some(Activation::HardSigmoid) => {
            for (d, &x) in dst.iter_mut().zip(src) {
                *d = x.clamp(0.0, 1.0);
            }
        }
        Some(a) => map(dst, &|x| {
            a.scalar(x).expect("planned activations have a host form")
        }),
    }
}

/// `g = f'(s) g - e`: the feedback already in `g` through the activation, minus the
/// state's own error.
fn feedback(activation: Option<Activation>, g: &mut [f32], s: &[f32], e: &[f32]) {
    match activation {
        None => {
            for (gi, &ei) in g.iter_mut().zip(e) {
                *gi -= ei;
            }
        }
        Some(Activation::Relu) => {
            for ((gi, &si), &ei) in g.iter_mut().zip(s).zip(e) {
                *gi = if si > 0.0 { *gi - ei } else { -ei };
            }
        }
        Some(a) => {
            for ((gi, &si), &ei) in g.iter_mut().zip(s).zip(e) {
                let d = a
                    .scalar_derivative(si)
                    .expect("planned activations have a host form");
                *gi = *gi * d - ei;
            }
        }
    }
}

/// The per-sample nudge gradient `dL/ds_L` into `out` (rows of `classes`).
fn loss_gradient(loss: Loss, output: &[f32], targets: &[f32], classes: usize, out: &mut [f32]) {
    match loss {
        Loss::Mse { scale } => {
            let k = match scale {
                MseScale::Half => 1.0,
                MseScale::Reference => 2.0,
            };
            for ((o, &s), &y) in out.iter_mut().zip(output).zip(targets) {
                *o = k * (s - y);
            }
        }
        Loss::CrossEntropy { smoothing } => {
            let floor = smoothing / classes as f32;
            for ((o, s), y) in out
                .chunks_exact_mut(classes)
                .zip(output.chunks_exact(classes))
                .zip(targets.chunks_exact(classes))
            {
                let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0.0;
                for (oi, &si) in o.iter_mut().zip(s) {
                    *oi = (si - max).exp();
                    sum += *oi;
                }
                for (oi, &yi) in o.iter_mut().zip(y) {
                    *oi = *oi / sum - ((1.0 - smoothing) * yi + floor);
                }
            }
        }
    }
}

/// Settles on the host; see the module docs. Same contract as [`super::Settler::settle`].
pub(crate) fn settle(
    plan: &DensePlan,
    config: &SettleConfig,
    model: &EnergyModel,
    net: &Network,
    ctx: &BatchContext,
    start: &[Tensor<2>],
    beta: f32,
) -> Result<Settled, SettleError> {
    let batch = ctx.batch_size();
    let widths = &plan.widths;
    let depth = widths.len();
    let threads = crate::device::threads();
    let links: Vec<Link> = plan
        .links
        .iter()
        .map(|&(layer, activation)| {
            let p = net.layers()[layer].params(net.params());
            Link {
                activation,
                weight: to_host(&p[0]),
                bias: to_host(&p[1]),
            }
        })
        .collect();
    let first = to_host(ctx.first_prediction());
    let targets = to_host(ctx.targets());
    let mut states: Vec<Vec<f32>> = start.iter().map(to_host).collect();
    let mut momentum: Vec<Vec<f32>> = widths.iter().map(|n| vec![0.0; batch * n]).collect();
    let mut errors = momentum.clone();
    let mut grads = momentum.clone();
    // `acts[i]` is f(s_i) for the link into state i + 1 (the state itself without one).
    let mut acts: Vec<Vec<f32>> = widths[..depth - 1]
        .iter()
        .map(|n| vec![0.0; batch * n])
        .collect();
    let mut nudge = vec![0.0; batch * widths[depth - 1]];
    let mut sq = vec![0.0f32; batch * depth];

    let activate = |links: &[Link], states: &[Vec<f32>], acts: &mut [Vec<f32>]| {
        for (i, a) in acts.iter_mut().enumerate() {
            apply(links[i].activation, &states[i], a);
        }
    };
    // Prediction errors e_i = h_i - s_i at the current states.
    let evaluate = |states: &[Vec<f32>], acts: &[Vec<f32>], errors: &mut [Vec<f32>]| {
        for ((e, &h), &s) in errors[0].iter_mut().zip(&first).zip(&states[0]) {
            *e = h - s;
        }
        for i in 1..depth {
            let (n_in, n_out) = (widths[i - 1], widths[i]);
            let e = &mut errors[i];
            for row in e.chunks_exact_mut(n_out) {
                row.copy_from_slice(&links[i - 1].bias);
            }
            matmul_with(
                e,
                MatRef::new(&acts[i - 1], batch, n_in),
                MatRef::new(&links[i - 1].weight, n_in, n_out),
                true,
                threads,
            );
            for (ei, &si) in e.iter_mut().zip(&states[i]) {
                *ei -= si;
            }
        }
    };
    activate(&links, &states, &mut acts);
    evaluate(&states, &acts, &mut errors);

    let mut residuals = ResidualCheck::new(config, beta);
    let mut stats = SettleStats::default();
    let mut curve = Vec::new();
    loop {
        // g_i = -e_i + f'(s_i) (e_{i+1} W_{i+1}^T), and g_L = -e_L + beta dL/ds_L.
        for i in 0..depth {
            let g = &mut grads[i];
            if i + 1 < depth {
                let (n, n_next) = (widths[i], widths[i + 1]);
                matmul_with(
                    g,
                    MatRef::new(&errors[i + 1], batch, n_next),
                    MatRef::new(&links[i].weight, n, n_next).t(),
                    false,
                    threads,
                );
                feedback(links[i].activation, g, &states[i], &errors[i]);
            } else {
                loss_gradient(model.loss(), &states[i], &targets, widths[i], &mut nudge);
                for ((gi, &ni), &ei) in g.iter_mut().zip(&nudge).zip(&errors[i]) {
                    *gi = beta * ni - ei;
                }
            }
        }
        if stats.steps.is_multiple_of(config.check_every) {
            for (i, g) in grads.iter().enumerate() {
                for (b, row) in g.chunks_exact(widths[i]).enumerate() {
                    sq[b * depth + i] = row.iter().map(|v| v * v).sum();
                }
            }
            let layer_max: Vec<f32> = (0..depth)
                .map(|i| {
                    (0..batch)
                        .map(|b| sq[b * depth + i])
                        .fold(f32::NEG_INFINITY, f32::max)
                        .sqrt()
                })
                .collect();
            let total = sq
                .chunks_exact(depth)
                .map(|r| r.iter().sum::<f32>())
                .fold(f32::NEG_INFINITY, f32::max)
                .sqrt();
            if residuals.check(
                &layer_max,
                total,
                model.state_names(),
                &mut stats,
                &mut curve,
            )? {
                stats.converged = true;
                break;
            }
        }
        if stats.steps >= config.steps {
            break;
        }
        // m <- mu m + g; s <- s - lr m, in one pass per state.
        for ((s, m), g) in states.iter_mut().zip(&mut momentum).zip(&grads) {
            let (mu, lr) = (config.momentum, config.lr);
            for ((si, mi), &gi) in s.iter_mut().zip(m.iter_mut()).zip(g) {
                *mi = *mi * mu + gi;
                *si -= lr * *mi;
            }
        }
        activate(&links, &states, &mut acts);
        evaluate(&states, &acts, &mut errors);
        stats.steps += 1;
    }
    let device = ctx.input().device();
    let states: Vec<Tensor<2>> = states
        .into_iter()
        .zip(widths)
        .map(|(s, &n)| Tensor::from_data(TensorData::new(s, [batch, n]), &device))
        .collect();
    let eval: Evaluation = model.evaluate(net, ctx, &states);
    let energy = model.per_sample_energy(ctx, &eval, beta).mean();
    stats.energy = to_host(&energy)[0];
    Ok(Settled {
        states,
        eval,
        stats,
        residual_curve: curve,
    })
}
