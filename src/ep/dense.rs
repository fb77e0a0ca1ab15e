//! The fused host settle loop for dense networks.
//!
//! When every state after the first is a linear layer fed by the previous state through at
//! most one element-wise activation ([`DensePlan`]) and the tensors live on a CPU device,
//! [`super::Settler`] runs this loop instead of the generic one. It computes exactly the
//! same iteration on plain `f32` buffers allocated once per settle: per step, one `gemm`
//! product per layer for the feedback `e_{i+1} W_{i+1}^T` and one for the prediction
//! `f(s_i) W_{i+1} + b`, and two fused passes per state (gradient, then momentum, state
//! and activation together) instead of about ten separate tensor operations, each with its
//! own allocation. Samples settle independently, so the batch is split into one block per
//! worker thread ([`Chunk`]) and the blocks step in parallel; with per-sample stopping a
//! stopped sample is swapped behind the moving ones of its block and leaves every product.
//! `tests/settle.rs` checks it against the generic loop.

use super::blocks::{
    Front, Perturbation, SampleBlock, Shared, activation_changes, drive, heavy_ball, perturbable,
    state_values, swap_rows,
};
use super::convergence::{SettleConfig, SettleError, Settled};
use super::energy::{BatchContext, DensePlan, EnergyModel};
use crate::device::{Tensor, to_host};
use crate::loss::{Loss, MseScale};
use crate::model::Activation;
use crate::model::Network;
use crate::model::kernels::{self, MatRef, lane_sum_squares, matmul};

/// One linear link `h_{i} = f(s_{i-1}) W + b` of the plan, on the host.
struct Link {
    activation: Option<Activation>,
    /// Whether the prediction adds the state below (a residual link).
    residual: bool,
    /// `[inputs, outputs]`, row-major.
    weight: Vec<f32>,
    /// The same weights transposed, `[outputs, inputs]` row-major: the feedback product's
    /// right side, contiguous ([`kernels::transpose`]).
    weight_t: Vec<f32>,
    bias: Vec<f32>,
}

crate::simd::multiversion! {
    /// `dst = f(src)` (a copy without an activation). The match is outside the loops, so each
    /// loop is a plain, vectorisable map.
    pub(super) fn apply(activation: Option<Activation>, src: &[f32], dst: &mut [f32]) {
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
}

crate::simd::multiversion! {
    /// `g = f'(s) g - e`: the feedback already in `g` through the activation, minus the
    /// state's own error.
    pub(super) fn feedback(activation: Option<Activation>, g: &mut [f32], s: &[f32], e: &[f32]) {
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
}

/// The per-sample nudge gradient `dL/ds_L` into `out` (rows of `classes`).
pub(super) fn loss_gradient(
    loss: Loss,
    output: &[f32],
    targets: &[f32],
    classes: usize,
    out: &mut [f32],
) {
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

/// The buffers of a block of consecutive samples. Samples settle independently, so blocks
/// step in parallel and only the residual check looks at all of them.
struct Chunk {
    /// Rows still moving: they are kept first, stopped ones are swapped behind them.
    active: usize,
    /// `order[p]`: the chunk row whose sample sits at position `p`.
    order: Vec<usize>,
    /// The step at which each chunk row stopped (per-sample stopping).
    stopped: Vec<Option<usize>>,
    first: Vec<f32>,
    targets: Vec<f32>,
    states: Vec<Vec<f32>>,
    momentum: Vec<Vec<f32>>,
    errors: Vec<Vec<f32>>,
    grads: Vec<Vec<f32>>,
    /// `acts[i]` is f(s_i) for the link into state i + 1 (the state itself without one).
    acts: Vec<Vec<f32>>,
    /// `preds[i]`: the prediction of state `i + 1` (with its skip on a residual link),
    /// kept while state `i` rests.
    preds: Vec<Vec<f32>>,
    nudge: Vec<f32>,
    /// Per-sample squared gradient norm of each state, `[rows, depth]`.
    sq: Vec<f32>,
    /// The layers a step has to touch.
    front: Front,
    /// The perturbation form ([`Perturbation`]), for settles from the forward pass:
    /// `states` then hold each state's change `d` from the start `s0`, and each error is
    /// formed from changes alone, `(f(s0 + d) - f(s0)) W (+ d below) - d`.
    rest: Option<Perturbation>,
}

impl Chunk {
    /// The block of samples `rows`; `at_rest`: `states` are the forward pass (each state
    /// its own prediction), so no first evaluation is needed (see [`Front`]), and
    /// `perturbed` (only from rest) settles in the perturbation form.
    #[allow(clippy::too_many_arguments)]
    fn new(
        rows: std::ops::Range<usize>,
        widths: &[usize],
        first: &[f32],
        targets: &[f32],
        states: &[Vec<f32>],
        at_rest: bool,
        perturbed: bool,
        beta: f32,
    ) -> Self {
        let n = rows.len();
        let slice = |v: &[f32], w: usize| v[rows.start * w..rows.end * w].to_vec();
        let zeros = || widths.iter().map(|w| vec![0.0; n * w]).collect::<Vec<_>>();
        let depth = widths.len();
        let mut chunk = Self {
            active: n,
            order: (0..n).collect(),
            stopped: vec![None; n],
            first: slice(first, widths[0]),
            targets: slice(targets, widths[depth - 1]),
            states: states
                .iter()
                .zip(widths)
                .map(|(s, &w)| slice(s, w))
                .collect(),
            momentum: zeros(),
            errors: zeros(),
            grads: zeros(),
            acts: widths[..depth - 1]
                .iter()
                .map(|w| vec![0.0; n * w])
                .collect(),
            preds: if at_rest && !perturbed {
                states[1..]
                    .iter()
                    .zip(&widths[1..])
                    .map(|(s, &w)| slice(s, w))
                    .collect()
            } else {
                widths[1..].iter().map(|w| vec![0.0; n * w]).collect()
            },
            nudge: vec![0.0; n * widths[depth - 1]],
            sq: vec![0.0; n * depth],
            front: Front::new(depth, at_rest, beta),
            rest: None,
        };
        if perturbed {
            let inputs: Vec<usize> = widths[..depth - 1].iter().map(|w| n * w).collect();
            let (states, first) = (&mut chunk.states, &mut chunk.first);
            let kept = vec![0; depth - 1];
            chunk.rest = Some(Perturbation::start(states, first, &inputs, &kept));
        }
        chunk
    }

    /// The prediction errors `e_i = h_i - s_i` at the current states, recomputing only
    /// what the last step changed (the activations and predictions out of moved states,
    /// the errors of moved states and of those above them). In the perturbation form the
    /// same from the changes alone: activations' changes, predictions' changes (no bias),
    /// and `e_i` their difference with the state's change.
    fn evaluate(&mut self, links: &[Link], widths: &[usize]) {
        let r = self.active;
        if let Some(rest) = &mut self.rest {
            rest.follow(&self.front, &self.states, widths, r);
        }
        if self.front.stale(0) {
            let w0 = widths[0];
            crate::simd::sub(&mut self.errors[0][..r * w0], &self.first, &self.states[0]);
        }
        for i in 1..widths.len() {
            let (n_in, n_out) = (widths[i - 1], widths[i]);
            let link = &links[i - 1];
            if self.front.predicts(i - 1) {
                let perturbed = self.rest.is_some();
                let below = &self.states[i - 1][..r * n_in];
                let input: &[f32] = match &mut self.rest {
                    Some(rest) => {
                        let change = &mut rest.delta_in[i - 1][..r * n_in];
                        activation_changes(link.activation, &rest.base[i - 1], below, change);
                        change
                    }
                    None => {
                        let act = &mut self.acts[i - 1][..r * n_in];
                        apply(link.activation, below, act);
                        act
                    }
                };
                let h = &mut self.preds[i - 1][..r * n_out];
                if perturbed {
                    h.fill(0.0);
                } else {
                    for row in h.chunks_exact_mut(n_out) {
                        row.copy_from_slice(&link.bias);
                    }
                }
                matmul(
                    h,
                    MatRef::new(input, r, n_in),
                    MatRef::new(&link.weight, n_in, n_out),
                    true,
                );
                if link.residual {
                    crate::simd::add_assign(h, below);
                }
            }
            if self.front.stale(i) {
                let e = &mut self.errors[i][..r * n_out];
                crate::simd::sub(e, &self.preds[i - 1], &self.states[i]);
            }
        }
        self.front.evaluated();
    }

    /// Swaps the samples at positions `a` and `b` in every per-sample buffer.
    fn swap(&mut self, a: usize, b: usize, widths: &[usize]) {
        if a == b {
            return;
        }
        let depth = widths.len();
        swap_rows(&mut self.first, widths[0], a, b);
        swap_rows(&mut self.targets, widths[depth - 1], a, b);
        swap_rows(&mut self.nudge, widths[depth - 1], a, b);
        swap_rows(&mut self.sq, depth, a, b);
        for (i, &w) in widths.iter().enumerate() {
            swap_rows(&mut self.states[i], w, a, b);
            swap_rows(&mut self.momentum[i], w, a, b);
            swap_rows(&mut self.errors[i], w, a, b);
            swap_rows(&mut self.grads[i], w, a, b);
            if i + 1 < depth {
                swap_rows(&mut self.acts[i], w, a, b);
                swap_rows(&mut self.preds[i], widths[i + 1], a, b);
            }
            if let Some(rest) = &mut self.rest {
                rest.swap_state(i, w, a, b);
                if i + 1 < depth {
                    rest.swap_input(i, w, a, b);
                }
            }
        }
        self.order.swap(a, b);
    }

    /// Stops every moving sample whose total gradient norm (from the last
    /// [`Chunk::gradients`] with norms) is at most `threshold`.
    fn stop_converged(&mut self, threshold: f32, step: usize, widths: &[usize]) {
        let depth = widths.len();
        let mut p = 0;
        while p < self.active {
            let norm = self.sq[p * depth..(p + 1) * depth]
                .iter()
                .sum::<f32>()
                .sqrt();
            if norm <= threshold {
                self.stopped[self.order[p]] = Some(step);
                self.active -= 1;
                self.swap(p, self.active, widths);
            } else {
                p += 1;
            }
        }
    }

    /// `g_i = -e_i + f'(s_i) (e_{i+1} W_{i+1}^T)` (`+ e_{i+1}` through a residual link)
    /// and `g_L = -e_L + beta dL/ds_L`; with `norms`, also the per-sample squared norms.
    fn gradients(&mut self, links: &[Link], widths: &[usize], loss: Loss, beta: f32, norms: bool) {
        let depth = widths.len();
        let r = self.active;
        for i in 0..depth {
            let g = &mut self.grads[i][..r * widths[i]];
            if i + 1 < depth {
                let (n, n_next) = (widths[i], widths[i + 1]);
                if self.front.feeds_back(i) {
                    matmul(
                        g,
                        MatRef::new(&self.errors[i + 1][..r * n_next], r, n_next),
                        MatRef::new(&links[i].weight_t, n_next, n),
                        false,
                    );
                } else {
                    // Nothing above it moved yet: the feedback is exactly zero.
                    g.fill(0.0);
                }
                let state = state_values(&self.rest, &self.states, i);
                feedback(links[i].activation, g, state, &self.errors[i]);
                if links[i].residual && self.front.feeds_back(i) {
                    crate::simd::add_assign(g, &self.errors[i + 1][..r * n_next]);
                }
            } else {
                let nudge = &mut self.nudge[..r * widths[i]];
                let output = &state_values(&self.rest, &self.states, i)[..r * widths[i]];
                loss_gradient(loss, output, &self.targets, widths[i], nudge);
                for ((gi, &ni), &ei) in g.iter_mut().zip(nudge.iter()).zip(&self.errors[i]) {
                    *gi = beta * ni - ei;
                }
            }
            if norms {
                for (b, row) in g.chunks_exact(widths[i]).enumerate() {
                    self.sq[b * depth + i] = lane_sum_squares(row);
                }
            }
        }
    }

    /// `m <- mu m + g; s <- s - lr m` in one pass per state that can move, then the new
    /// errors.
    fn step(&mut self, links: &[Link], widths: &[usize], momentum: f32, lr: f32) {
        heavy_ball(
            &mut self.states,
            &mut self.momentum,
            &self.grads,
            widths,
            self.front.step(),
            self.active,
            momentum,
            lr,
        );
        self.evaluate(links, widths);
    }
}

impl SampleBlock for Chunk {
    type Link = Link;

    fn evaluate(&mut self, shared: &Shared<'_, Link>) {
        Chunk::evaluate(self, shared.links, shared.widths);
    }

    fn gradients(&mut self, shared: &Shared<'_, Link>, beta: f32, norms: bool) {
        Chunk::gradients(self, shared.links, shared.widths, shared.loss, beta, norms);
    }

    fn stop_converged(&mut self, shared: &Shared<'_, Link>, threshold: f32, step: usize) {
        Chunk::stop_converged(self, threshold, step, shared.widths);
    }

    fn step(&mut self, shared: &Shared<'_, Link>, momentum: f32, lr: f32) {
        Chunk::step(self, shared.links, shared.widths, momentum, lr);
    }

    fn sq(&self) -> &[f32] {
        &self.sq
    }

    fn order(&self) -> &[usize] {
        &self.order
    }

    fn stopped(&self) -> &[Option<usize>] {
        &self.stopped
    }

    fn state(&self, i: usize) -> &[f32] {
        state_values(&self.rest, &self.states, i)
    }

    fn exact_errors(&self, i: usize) -> Option<&[f32]> {
        self.rest.as_ref().map(|_| self.errors[i].as_slice())
    }
}

/// Settles on the host; see the module docs. Same contract as [`super::Settler::settle`].
/// The batch is split into one block of samples per worker thread (at least 16 samples
/// each); the blocks step in parallel between residual checks.
#[allow(clippy::too_many_arguments)]
pub(crate) fn settle(
    plan: &DensePlan,
    config: &SettleConfig,
    model: &EnergyModel,
    net: &Network,
    ctx: &BatchContext,
    start: &[Tensor<2>],
    at_rest: bool,
    beta: f32,
) -> Result<Settled, SettleError> {
    let batch = ctx.batch_size();
    let widths = &plan.widths;
    let links: Vec<Link> = plan
        .links
        .iter()
        .zip(&plan.residual)
        .map(|(&(layer, activation), &residual)| {
            let p = net.layers()[layer].params(net.params());
            let [inputs, outputs] = p[0].dims();
            let weight = to_host(&p[0]);
            let weight_t = kernels::transpose(&weight, inputs, outputs);
            Link {
                activation,
                residual,
                weight,
                weight_t,
                bias: to_host(&p[1]),
            }
        })
        .collect();
    let first = to_host(ctx.first_prediction());
    let targets = to_host(ctx.targets());
    let states: Vec<Vec<f32>> = start.iter().map(to_host).collect();
    let perturbed = at_rest && perturbable(links.iter().map(|l| l.activation));
    let blocks = crate::device::threads().min(batch / 16).max(1);
    let chunks: Vec<Chunk> = (0..blocks)
        .map(|b| {
            let rows = batch * b / blocks..batch * (b + 1) / blocks;
            Chunk::new(
                rows, widths, &first, &targets, &states, at_rest, perturbed, beta,
            )
        })
        .collect();
    let shared = Shared {
        links: &links,
        widths,
        loss: model.loss(),
    };
    crate::device::on_workers(|| drive(chunks, &shared, config, model, net, ctx, beta))
}
