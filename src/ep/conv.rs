//! The fused host settle loop for convolutional chains.
//!
//! The counterpart of [`super::dense`] for nets whose states are convolutions or linear
//! layers joined by an activation, a max pooling and a flatten ([`ConvPlan`]): `cnn`,
//! `vgg5` and their small variants. The generic loop runs each layer on burn tensors and
//! copies every host kernel's result into a new tensor (a third of a `vgg5-small` settle
//! step went to those copies and burn's element-wise ops); here every buffer is allocated
//! once per settle and each step is, per link, the activation, the pooling (argmax kept),
//! one convolution or product for the prediction and one for the feedback (the host
//! kernels of `model::kernels`, which multiply blocks of samples at once), then one fused
//! pass per state for momentum and state. Blocks of samples step in parallel as in the
//! dense loop, and with per-sample stopping a stopped sample is swapped behind the moving
//! ones of its block and leaves every product. The adaptive step stays with the generic
//! loop, which `tests/settle.rs` compares this one with.

use super::blocks::{
    Front, Perturbation, SampleBlock, Shared, activation_change, activation_changes, drive,
    heavy_ball, perturbable, state_values, swap_rows,
};
use super::convergence::{SettleConfig, SettleError, Settled};
use super::dense::{apply, feedback, loss_gradient};
use super::energy::{BatchContext, ConvPlan, EnergyModel};
use crate::device::{Tensor, to_host};
use crate::loss::Loss;
use crate::model::Activation;
use crate::model::Network;
use crate::model::kernels::{self, ConvGeometry, MatRef, PoolGeometry, lane_sum_squares, matmul};

/// The operator of a link's prediction.
enum Op {
    /// `h = x W + b`, `W` `[n_in, n_out]`.
    Linear { n_in: usize, n_out: usize },
    /// `h = conv(x, W) + b`, `W` `[out, in * k * k]`.
    Conv(ConvGeometry),
}

/// One link `h_{i+1} = op(pool(f(s_i)))` of the plan, on the host.
struct Link {
    activation: Option<Activation>,
    pool: Option<PoolGeometry>,
    op: Op,
    weight: Vec<f32>,
    /// A linear link's weights transposed, `[outputs, inputs]` row-major: the feedback
    /// product's right side, contiguous ([`kernels::transpose`]; empty for a
    /// convolution).
    weight_t: Vec<f32>,
    bias: Vec<f32>,
    /// Zeros of the bias's length: the prediction's change has no bias.
    no_bias: Vec<f32>,
    /// Values per sample after the pooling (the operator's input).
    input: usize,
}

impl Link {
    /// `out = op(x)` for `x.len() / self.input` samples (`out` overwritten); with
    /// `bias` false, the operator's linear part alone (what a change of `x` changes).
    fn predict(&self, x: &[f32], out: &mut [f32], bias: bool) {
        let bias = if bias { &self.bias } else { &self.no_bias };
        match &self.op {
            Op::Linear { n_in, n_out } => {
                let rows = x.len() / n_in;
                for row in out.chunks_exact_mut(*n_out) {
                    row.copy_from_slice(bias);
                }
                matmul(
                    out,
                    MatRef::new(x, rows, *n_in),
                    MatRef::new(&self.weight, *n_in, *n_out),
                    true,
                );
            }
            Op::Conv(geo) => geo.forward(x, &self.weight, bias, out),
        }
    }

    /// `gx = op^T(gy)`, the input's vector-Jacobian product (`gx` overwritten).
    fn feedback(&self, gy: &[f32], gx: &mut [f32]) {
        match &self.op {
            Op::Linear { n_in, n_out } => {
                let rows = gy.len() / n_out;
                matmul(
                    gx,
                    MatRef::new(gy, rows, *n_out),
                    MatRef::new(&self.weight_t, *n_out, *n_in),
                    false,
                );
            }
            Op::Conv(geo) => geo.input_vjp(&self.weight, gy, gx),
        }
    }
}

/// The buffers of a block of consecutive samples.
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
    /// `acts[i]`: `f(s_i)` for the link out of state `i`.
    acts: Vec<Vec<f32>>,
    /// `pooled[i]`, `argmax[i]`: its pooling and the window maxima (empty without one).
    pooled: Vec<Vec<f32>>,
    argmax: Vec<Vec<u32>>,
    /// `back[i]`: the feedback into the link's input (before the pooling's adjoint).
    back: Vec<Vec<f32>>,
    /// `preds[i]`: link `i`'s prediction of state `i + 1`, kept while state `i` rests (in
    /// the perturbation form, its change since the start).
    preds: Vec<Vec<f32>>,
    nudge: Vec<f32>,
    /// Per-sample squared gradient norm of each state, `[rows, depth]`.
    sq: Vec<f32>,
    /// The layers a step has to touch.
    front: Front,
    /// The perturbation form (see [`Perturbation`]), for settles from the forward pass.
    rest: Option<Perturbation>,
}

/// A pooled link's input change: the winner's change `f(b + d) - f(b)`
/// ([`activation_change`]), plus the difference of the start values where the winner is
/// another unit than at the start (`start`: the pooled inputs and the states at the start;
/// `planes`: the values per channel before and after pooling). Inlined into each call, so
/// that a constant `activation` is matched at compile time rather than per value.
#[inline(always)]
fn pooled_changes(
    activation: Option<Activation>,
    change: &mut [f32],
    winners: &[u32],
    (base_in, base): (&[f32], &[f32]),
    delta: &[f32],
    (in_plane, out_plane): (usize, usize),
) {
    for (p, ((c, &at), &start)) in change.iter_mut().zip(winners).zip(base_in).enumerate() {
        let j = p / out_plane * in_plane + at as usize;
        let (b, d) = (base[j], delta[j]);
        let rest_value = match activation {
            Some(a) => a.scalar(b).expect("a piecewise-linear activation"),
            None => b,
        };
        *c = (rest_value - start) + activation_change(activation, b, d);
    }
}

impl Chunk {
    /// The block of samples `rows`; `at_rest`: `states` are the forward pass (each state
    /// its own prediction), so no first evaluation is needed (see [`Front`]), and
    /// `perturbed` (only from rest) settles in the perturbation form ([`Perturbation`]).
    #[allow(clippy::too_many_arguments)]
    fn new(
        rows: std::ops::Range<usize>,
        widths: &[usize],
        links: &[Link],
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
        let pooled_len = |l: &Link| if l.pool.is_some() { n * l.input } else { 0 };
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
            pooled: links.iter().map(|l| vec![0.0; pooled_len(l)]).collect(),
            argmax: links.iter().map(|l| vec![0; pooled_len(l)]).collect(),
            back: links.iter().map(|l| vec![0.0; n * l.input]).collect(),
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
            let inputs: Vec<usize> = links.iter().map(|l| n * l.input).collect();
            let kept: Vec<usize> = links.iter().map(pooled_len).collect();
            let (states, first) = (&mut chunk.states, &mut chunk.first);
            chunk.rest = Some(Perturbation::start(states, first, &inputs, &kept));
        }
        if at_rest {
            // The feedback through a pooling needs its window maxima before the link's
            // first prediction.
            for (i, link) in links.iter().enumerate() {
                chunk.inputs(link, i, widths[i]);
                if let Some(rest) = &mut chunk.rest {
                    // The start's pooled values, which `inputs` measured the change from
                    // before they were recorded.
                    if link.pool.is_some() {
                        rest.base_in[i].copy_from_slice(&chunk.pooled[i][..n * link.input]);
                    }
                    rest.delta_in[i].fill(0.0);
                }
            }
        }
        chunk
    }

    /// `acts[i]` and, with a pooling, `pooled[i]` and `argmax[i]` for the moving samples:
    /// the input of link `i` (`width` values per sample of state `i`).
    fn inputs(&mut self, link: &Link, i: usize, width: usize) {
        let r = self.active;
        if self.rest.is_none() || link.pool.is_some() {
            // The activations feed the prediction, or the pooling's choice of winners (the
            // perturbation form predicts from the change alone).
            let state = &state_values(&self.rest, &self.states, i)[..r * width];
            apply(link.activation, state, &mut self.acts[i][..r * width]);
        }
        if let Some(pool) = &link.pool {
            pool.max_forward(
                &self.acts[i][..r * width],
                &mut self.pooled[i][..r * link.input],
                &mut self.argmax[i][..r * link.input],
            );
        }
        let Some(rest) = &mut self.rest else {
            return;
        };
        let (base, delta) = (&rest.base[i], &self.states[i]);
        let change = &mut rest.delta_in[i][..r * link.input];
        match &link.pool {
            None => activation_changes(link.activation, base, delta, change),
            Some(pool) => {
                let planes = (pool.in_h * pool.in_w, pool.out_h * pool.out_w);
                let winners = &self.argmax[i][..r * link.input];
                let start = (&rest.base_in[i][..], &base[..]);
                match link.activation {
                    // The common case, with the activation a constant of its own loop.
                    Some(Activation::Relu) => pooled_changes(
                        Some(Activation::Relu),
                        change,
                        winners,
                        start,
                        delta,
                        planes,
                    ),
                    other => pooled_changes(other, change, winners, start, delta, planes),
                }
            }
        }
    }

    /// The prediction errors `e_i = h_i - s_i` of the moving samples at the current states,
    /// recomputing only what the last step changed (the link inputs and predictions out of
    /// moved states, the errors of moved states and of those above them).
    fn evaluate(&mut self, links: &[Link], widths: &[usize]) {
        let r = self.active;
        if let Some(rest) = &mut self.rest {
            rest.follow(&self.front, &self.states, widths, r);
        }
        if self.front.stale(0) {
            let w0 = widths[0];
            crate::simd::sub(&mut self.errors[0][..r * w0], &self.first, &self.states[0]);
        }
        for (i, link) in links.iter().enumerate() {
            let (w, w_next) = (widths[i], widths[i + 1]);
            if self.front.predicts(i) {
                self.inputs(link, i, w);
                let (input, bias): (&[f32], bool) = match (&self.rest, &link.pool) {
                    (Some(rest), _) => (&rest.delta_in[i][..r * link.input], false),
                    (None, Some(_)) => (&self.pooled[i][..r * link.input], true),
                    (None, None) => (&self.acts[i][..r * w], true),
                };
                link.predict(input, &mut self.preds[i][..r * w_next], bias);
            }
            if self.front.stale(i + 1) {
                let e = &mut self.errors[i + 1][..r * w_next];
                crate::simd::sub(e, &self.preds[i], &self.states[i + 1]);
            }
        }
        self.front.evaluated();
    }

    /// `g_i = -e_i + f'(s_i) pool^T(op^T(e_{i+1}))` and `g_L = -e_L + beta dL/ds_L` for the
    /// moving samples; with `norms`, also their squared norms.
    fn gradients(&mut self, links: &[Link], widths: &[usize], loss: Loss, beta: f32, norms: bool) {
        let depth = widths.len();
        let r = self.active;
        for (i, &width) in widths.iter().enumerate() {
            let g = &mut self.grads[i][..r * width];
            if let Some(link) = links.get(i) {
                if self.front.feeds_back(i) {
                    let back = &mut self.back[i][..r * link.input];
                    link.feedback(&self.errors[i + 1][..r * widths[i + 1]], back);
                    match &link.pool {
                        Some(pool) => pool.max_backward(&self.argmax[i][..r * link.input], back, g),
                        None => g.copy_from_slice(back),
                    }
                } else {
                    // Nothing above it moved yet: the feedback is exactly zero.
                    g.fill(0.0);
                }
                let state = state_values(&self.rest, &self.states, i);
                feedback(link.activation, g, state, &self.errors[i]);
            } else {
                let nudge = &mut self.nudge[..r * width];
                let output = &state_values(&self.rest, &self.states, i)[..r * width];
                loss_gradient(loss, output, &self.targets, width, nudge);
                for ((gi, &ni), &ei) in g.iter_mut().zip(nudge.iter()).zip(&self.errors[i]) {
                    *gi = beta * ni - ei;
                }
            }
            if norms {
                for (b, row) in g.chunks_exact(width).enumerate() {
                    self.sq[b * depth + i] = lane_sum_squares(row);
                }
            }
        }
    }

    /// Swaps the samples at positions `a` and `b` in every per-sample buffer.
    fn swap(&mut self, a: usize, b: usize, widths: &[usize], links: &[Link]) {
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
            if let Some(rest) = &mut self.rest {
                rest.swap_state(i, w, a, b);
            }
        }
        for (i, link) in links.iter().enumerate() {
            swap_rows(&mut self.acts[i], widths[i], a, b);
            swap_rows(&mut self.back[i], link.input, a, b);
            swap_rows(&mut self.preds[i], widths[i + 1], a, b);
            if let Some(rest) = &mut self.rest {
                let kept = if link.pool.is_some() { link.input } else { 0 };
                swap_rows(&mut rest.base_in[i], kept, a, b);
                swap_rows(&mut rest.delta_in[i], link.input, a, b);
            }
            if link.pool.is_some() {
                swap_rows(&mut self.pooled[i], link.input, a, b);
                swap_rows(&mut self.argmax[i], link.input, a, b);
            }
        }
        self.order.swap(a, b);
    }

    /// Stops every moving sample whose total gradient norm (from the last
    /// [`Chunk::gradients`] with norms) is at most `threshold`.
    fn stop_converged(&mut self, threshold: f32, step: usize, widths: &[usize], links: &[Link]) {
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
                self.swap(p, self.active, widths, links);
            } else {
                p += 1;
            }
        }
    }

    /// `m <- mu m + g; s <- s - lr m` in one pass per state for the moving samples (of
    /// the states that can move), then the new errors.
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
        Chunk::stop_converged(self, threshold, step, shared.widths, shared.links);
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

/// The plan's links with their parameters on the host.
fn links(plan: &ConvPlan, net: &Network) -> Vec<Link> {
    plan.links
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let layer = &net.layers()[l.layer];
            let p = layer.params(net.params());
            let pool = l.pool.and_then(|k| net.layers()[k].max_pool_geometry());
            let input = match &pool {
                Some(g) => g.channels * g.out_h * g.out_w,
                None => plan.widths[i],
            };
            let op = match layer.conv_geometry() {
                Some(geo) => Op::Conv(geo),
                None => Op::Linear {
                    n_in: input,
                    n_out: plan.widths[i + 1],
                },
            };
            let weight = to_host(&p[0]);
            let weight_t = match op {
                Op::Linear { n_in, n_out } => kernels::transpose(&weight, n_in, n_out),
                Op::Conv(_) => Vec::new(),
            };
            Link {
                activation: l.activation,
                pool,
                op,
                weight,
                weight_t,
                no_bias: vec![0.0; p[1].dims()[1]],
                bias: to_host(&p[1]),
                input,
            }
        })
        .collect()
}

/// Settles on the host; see the module docs. Same contract as [`super::Settler::settle`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn settle(
    plan: &ConvPlan,
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
    let links = links(plan, net);
    let first = to_host(ctx.first_prediction());
    let targets = to_host(ctx.targets());
    let states: Vec<Vec<f32>> = start.iter().map(to_host).collect();
    let perturbed = at_rest && perturbable(links.iter().map(|l| l.activation));
    let blocks = crate::device::threads().min(batch / 16).max(1);
    let chunks: Vec<Chunk> = (0..blocks)
        .map(|b| {
            let rows = batch * b / blocks..batch * (b + 1) / blocks;
            Chunk::new(
                rows, widths, &links, &first, &targets, &states, at_rest, perturbed, beta,
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
