//! The driver both fused host settle loops (`ep::dense`, `ep::conv`) share: blocks of
//! samples stepped in parallel, the residual check over all of them, per-sample stopping,
//! and the states gathered back in batch order. Each loop supplies its block of buffers
//! ([`SampleBlock`]); what a step computes is the block's.

use burn::tensor::TensorData;
use rayon::prelude::*;

use super::convergence::{ResidualCheck, SettleConfig, SettleError, SettleStats, Settled};
use super::energy::{BatchContext, EnergyModel, Evaluation};
use crate::device::Tensor;
use crate::loss::Loss;
use crate::model::{Activation, Network};

/// Swaps rows `a` and `b` (of `w` values each) of a per-sample buffer.
pub(super) fn swap_rows<T>(buf: &mut [T], w: usize, a: usize, b: usize) {
    if a == b || w == 0 || buf.is_empty() {
        return;
    }
    let (lo, hi) = (a.min(b), a.max(b));
    let (head, tail) = buf.split_at_mut(hi * w);
    head[lo * w..(lo + 1) * w].swap_with_slice(&mut tail[..w]);
}

/// The heavy-ball state update of a block's first `active` samples, one pass per state
/// that `moves`: `m <- mu m + g; s <- s - lr m` (states of `widths[i]` values per sample).
#[allow(clippy::too_many_arguments)]
pub(super) fn heavy_ball(
    states: &mut [Vec<f32>],
    momentum: &mut [Vec<f32>],
    grads: &[Vec<f32>],
    widths: &[usize],
    moves: &[bool],
    active: usize,
    mu: f32,
    lr: f32,
) {
    let layers = states.iter_mut().zip(momentum).zip(grads).zip(widths);
    for ((((s, m), g), &w), _) in layers.zip(moves).filter(|(_, m)| **m) {
        momentum_step(&mut s[..active * w], m, g, mu, lr);
    }
}

crate::simd::multiversion! {
    /// `m <- mu m + g; s <- s - lr m` over `s`'s length.
    fn momentum_step(s: &mut [f32], m: &mut [f32], g: &[f32], mu: f32, lr: f32) {
        for ((si, mi), &gi) in s.iter_mut().zip(m.iter_mut()).zip(g) {
            *mi = *mi * mu + gi;
            *si -= lr * *mi;
        }
    }
}

/// Which layers of a block a settle step has to touch.
///
/// A settle that starts at the free phase's forward pass ([`Evaluation::at_rest`]) starts
/// with every error exactly zero; the nudge moves the output first and reaches one more
/// layer per step. Until it arrives, a layer's state gradient is exactly zero, its state
/// does not move, and the products that would compute its prediction or feed its error
/// back only move zeros. The loops skip them: a truncated settle of as many steps as the
/// net has state layers runs each link's prediction and feedback about once instead of
/// once per step. The result is the same iteration; it is not an approximation (the
/// errors the skipped products would give are zero, where a recomputation gives rounding
/// noise instead). A settle from any other point starts with every layer live.
#[derive(Debug, Clone)]
pub(super) struct Front {
    /// `live[i]`: error `e_i` may be nonzero.
    live: Vec<bool>,
    /// `moved[i]`: state `i` has moved (its momentum may be nonzero).
    moved: Vec<bool>,
    /// `changed[i]`: state `i` moved in the step being evaluated.
    changed: Vec<bool>,
    /// Whether the output is nudged (`beta != 0`).
    nudged: bool,
}

impl Front {
    /// The front of a settle of `depth` states: at rest, or live everywhere.
    pub fn new(depth: usize, at_rest: bool, beta: f32) -> Self {
        let all = vec![!at_rest; depth];
        Self {
            live: all.clone(),
            moved: all.clone(),
            changed: all,
            nudged: beta != 0.0,
        }
    }

    /// Whether the feedback into state `i` (the input VJP of the link out of it) may be
    /// nonzero: the error above it is live.
    pub fn feeds_back(&self, i: usize) -> bool {
        self.live.get(i + 1).copied().unwrap_or(false)
    }

    /// Whether the link out of state `i` has to predict afresh: state `i` moved.
    pub fn predicts(&self, i: usize) -> bool {
        self.changed[i]
    }

    /// Whether error `i` is stale: its state or the state below moved.
    pub fn stale(&self, i: usize) -> bool {
        self.changed[i] || (i > 0 && self.changed[i - 1])
    }

    /// Marks the states the next step moves: those with momentum, a live error of their
    /// own or above them, and the nudged output. Returns them, per state.
    pub fn step(&mut self) -> &[bool] {
        let depth = self.live.len();
        for i in 0..depth {
            let top = i + 1 == depth;
            self.changed[i] =
                self.moved[i] || self.live[i] || self.feeds_back(i) || (top && self.nudged);
            self.moved[i] |= self.changed[i];
        }
        &self.changed
    }

    /// After the evaluation of a step: the recomputed errors are live, nothing is stale.
    pub fn evaluated(&mut self) {
        for i in 0..self.live.len() {
            self.live[i] |= self.stale(i);
        }
        self.changed.fill(false);
    }
}

/// The perturbation form of a settle from the forward pass, in both fused loops.
///
/// The errors of a settle near the free states are tiny differences of large values:
/// `e = h - s` with `h` and `s` about 1 and `e` about `beta * eta^k` on the `k`-th layer
/// the nudge reaches. In float32 that difference keeps only `1e-7 / |e|` of its digits (at
/// `vgg5-small`'s first layer, steps of 0.1 and beta 0.02, none: cosine 0.41 to backprop).
/// Here a loop's `states` hold the change `d = s - s0` from the start `s0` instead, and
/// every error is formed from changes alone: `e_{i+1} = W (in(s0 + d) - in(s0)) - d_{i+1}`
/// (the bias cancels exactly; the first prediction does not change). The change of a
/// link's input is exact for piecewise-linear activations ([`activation_change`]: `d`
/// where a ReLU unit stays active, 0 where it stays off) and for a max pooling whose
/// winner stays (the winner's change; a new winner adds the difference of the two start
/// values). The errors keep float32's relative precision at any size; the states
/// themselves (`s0 + d`, for the activations' derivatives, the nudge and the settle's
/// result) are formed by addition. The settle returns these errors with its states, in
/// place of their recomputation from the rounded states ([`Evaluation::with_errors`]).
pub(super) struct Perturbation {
    /// `s0`, the start, per state.
    pub base: Vec<Vec<f32>>,
    /// `s0 + d`, per state (updated when the state moves).
    pub full: Vec<Vec<f32>>,
    /// Per link: its input at the start where a max pooling picks it (empty otherwise).
    pub base_in: Vec<Vec<f32>>,
    /// Per link: the change of its input.
    pub delta_in: Vec<Vec<f32>>,
}

impl Perturbation {
    /// Turns a block's buffers into the form: the start moves out of `states`, which then
    /// hold the changes (zero), and `first`, the first state's prediction, becomes its
    /// change (zero), so that `first - states[0]` is the first error in either form. Links
    /// have inputs of the given lengths, and keep start values of the given lengths (0
    /// where none is kept).
    pub fn start(
        states: &mut [Vec<f32>],
        first: &mut [f32],
        inputs: &[usize],
        kept: &[usize],
    ) -> Self {
        let base: Vec<Vec<f32>> = states
            .iter_mut()
            .map(|s| {
                let start = s.clone();
                s.fill(0.0);
                start
            })
            .collect();
        first.fill(0.0);
        Self {
            full: base.clone(),
            base,
            base_in: kept.iter().map(|&n| vec![0.0; n]).collect(),
            delta_in: inputs.iter().map(|&n| vec![0.0; n]).collect(),
        }
    }

    /// `full = base + d` for the first `rows` samples of every state the last step moved
    /// (`deltas`: the changes, `widths[i]` values per sample).
    pub fn follow(&mut self, front: &Front, deltas: &[Vec<f32>], widths: &[usize], rows: usize) {
        for (i, &w) in widths.iter().enumerate() {
            if front.predicts(i) {
                crate::simd::add(&mut self.full[i][..rows * w], &self.base[i], &deltas[i]);
            }
        }
    }

    /// Swaps rows `a` and `b` of state `i` (`w` values each).
    pub fn swap_state(&mut self, i: usize, w: usize, a: usize, b: usize) {
        swap_rows(&mut self.base[i], w, a, b);
        swap_rows(&mut self.full[i], w, a, b);
    }

    /// Swaps rows `a` and `b` of link `i`'s input (`w` values each).
    pub fn swap_input(&mut self, i: usize, w: usize, a: usize, b: usize) {
        swap_rows(&mut self.base_in[i], w, a, b);
        swap_rows(&mut self.delta_in[i], w, a, b);
    }
}

/// The values `s` of state `i`: `states[i]`, or in the perturbation form `s0 + d`.
pub(super) fn state_values<'a>(
    rest: &'a Option<Perturbation>,
    states: &'a [Vec<f32>],
    i: usize,
) -> &'a [f32] {
    match rest {
        Some(rest) => &rest.full[i],
        None => &states[i],
    }
}

/// The change `f(b + d) - f(b)` of a link's activation (none: `d`), exact where the
/// activation stays on one linear piece ([`Activation::change`]).
#[inline(always)]
pub(super) fn activation_change(activation: Option<Activation>, b: f32, d: f32) -> f32 {
    match activation {
        None => d,
        Some(a) => a
            .change(b, d)
            .expect("the perturbation form takes piecewise-linear activations only"),
    }
}

crate::simd::multiversion! {
    /// `out = f(base + delta) - f(base)` elementwise ([`activation_change`]), with the
    /// activation matched once outside the loop and ReLU's selects branch-free, so that the
    /// loop vectorises (the dense loop runs it on every moved state of every step).
    pub(super) fn activation_changes(
        activation: Option<Activation>,
        base: &[f32],
        delta: &[f32],
        out: &mut [f32],
    ) {
        let pairs = out.iter_mut().zip(base.iter().zip(delta));
        match activation {
            None => out.copy_from_slice(&delta[..out.len()]),
            Some(Activation::Relu) => {
                for (c, (&b, &d)) in pairs {
                    let y = b + d;
                    let (on, stays) = (b > 0.0, y > 0.0);
                    let crossed = y.max(0.0) - b.max(0.0);
                    *c = if on && stays {
                        d
                    } else if !on && !stays {
                        0.0
                    } else {
                        crossed
                    };
                }
            }
            Some(_) => {
                for (c, (&b, &d)) in pairs {
                    *c = activation_change(activation, b, d);
                }
            }
        }
    }
}

/// Whether every link's activation is piecewise linear, where [`activation_change`] is
/// exact.
pub(super) fn perturbable(activations: impl IntoIterator<Item = Option<Activation>>) -> bool {
    activations
        .into_iter()
        .all(|a| a.is_none_or(|a| a.piecewise_linear()))
}

/// What every block of a settle reads: its links, the state widths and the nudge loss.
pub(super) struct Shared<'a, L> {
    pub links: &'a [L],
    pub widths: &'a [usize],
    pub loss: Loss,
}

/// The buffers of a block of consecutive samples, as a fused loop keeps them.
pub(super) trait SampleBlock: Send {
    /// The loop's link type.
    type Link: Sync;
    /// The errors at the current states (of the moving samples).
    fn evaluate(&mut self, shared: &Shared<'_, Self::Link>);
    /// The state gradients; with `norms`, also the per-sample squared norms.
    fn gradients(&mut self, shared: &Shared<'_, Self::Link>, beta: f32, norms: bool);
    /// Stops every moving sample whose gradient norm is at most `threshold`.
    fn stop_converged(&mut self, shared: &Shared<'_, Self::Link>, threshold: f32, step: usize);
    /// One heavy-ball step, then [`SampleBlock::evaluate`].
    fn step(&mut self, shared: &Shared<'_, Self::Link>, momentum: f32, lr: f32);
    /// Per-sample squared gradient norms, `[rows, depth]` (from the last `gradients` with
    /// norms).
    fn sq(&self) -> &[f32];
    /// `order[p]`: the block row whose sample sits at position `p`.
    fn order(&self) -> &[usize];
    /// The step at which each block row stopped.
    fn stopped(&self) -> &[Option<usize>];
    /// State `i` of every sample, in position order.
    fn state(&self, i: usize) -> &[f32];
    /// Error `i` of every sample, in position order, where the loop holds it more exactly
    /// than a recomputation from the states would ([`Perturbation`]).
    fn exact_errors(&self, _i: usize) -> Option<&[f32]> {
        None
    }
}

/// Settles `blocks` (the batch split in order) to the end: the shared loop of the fused
/// settle loops, with [`super::Settler::settle`]'s contract.
#[allow(clippy::too_many_arguments)]
pub(super) fn drive<B: SampleBlock>(
    mut blocks: Vec<B>,
    shared: &Shared<'_, B::Link>,
    config: &SettleConfig,
    model: &EnergyModel,
    net: &Network,
    ctx: &BatchContext,
    beta: f32,
) -> Result<Settled, SettleError> {
    let widths = shared.widths;
    let depth = widths.len();
    let each = |blocks: &mut Vec<B>, f: &(dyn Fn(&mut B) + Sync)| {
        if blocks.len() == 1 {
            f(&mut blocks[0]);
        } else {
            blocks.par_iter_mut().for_each(f);
        }
    };
    each(&mut blocks, &|b| b.evaluate(shared));
    let mut residuals = ResidualCheck::new(config, beta);
    let mut stats = SettleStats {
        step: config.lr,
        ..SettleStats::default()
    };
    let mut curve = Vec::new();
    // The blocks settle on their own between residual checks: each call runs the steps up
    // to the next check (or the end of the budget) on every block, so the workers meet
    // once per check instead of twice per step. A block's operations and their order are
    // those of a step-by-step loop.
    each(&mut blocks, &|b| b.gradients(shared, beta, true));
    loop {
        let check = stats.steps.is_multiple_of(config.check_every);
        if check {
            let rows = || blocks.iter().flat_map(|b| b.sq().chunks_exact(depth));
            let layer_max: Vec<f32> = (0..depth)
                .map(|i| {
                    rows()
                        .map(|r| r[i])
                        .fold(f32::NEG_INFINITY, f32::max)
                        .sqrt()
                })
                .collect();
            let total = rows()
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
            if config.per_sample {
                let (threshold, step) = (residuals.threshold(), stats.steps);
                each(&mut blocks, &|b| b.stop_converged(shared, threshold, step));
            }
        }
        if stats.steps >= config.steps {
            break;
        }
        let every = config.check_every.max(1);
        let next_check = (stats.steps / every + 1) * every;
        let run = next_check.min(config.steps) - stats.steps;
        let norms = (stats.steps + run).is_multiple_of(config.check_every);
        each(&mut blocks, &|b| {
            for k in 1..=run {
                b.step(shared, config.momentum, config.lr);
                b.gradients(shared, beta, norms && k == run);
            }
        });
        stats.steps += run;
    }
    let device = ctx.input().device();
    let batch = ctx.batch_size();
    // Per-sample values (of `w` each) back in batch order.
    let gather = |w: usize, values_of: &dyn Fn(&B) -> &[f32]| {
        let mut values = vec![0.0; batch * w];
        let mut offset = 0;
        for b in &blocks {
            let block = values_of(b);
            for (p, &row) in b.order().iter().enumerate() {
                let dst = (offset + row) * w;
                values[dst..dst + w].copy_from_slice(&block[p * w..(p + 1) * w]);
            }
            offset += b.order().len();
        }
        Tensor::from_data(TensorData::new(values, [batch, w]), &device)
    };
    let states: Vec<Tensor<2>> = (0..depth)
        .map(|i| gather(widths[i], &|b| b.state(i)))
        .collect();
    let exact = blocks.iter().all(|b| b.exact_errors(0).is_some());
    let errors: Option<Vec<Tensor<2>>> = exact.then(|| {
        (0..depth)
            .map(|i| gather(widths[i], &|b| b.exact_errors(i).expect("every block")))
            .collect()
    });
    let stopped: Vec<Option<usize>> = blocks
        .iter()
        .flat_map(|b| b.stopped().iter().copied())
        .collect();
    let mut eval: Evaluation = model.evaluate(net, ctx, &states);
    if let Some(errors) = errors {
        eval = eval.with_errors(errors);
    }
    Ok(Settled::finish(
        model, ctx, states, eval, stats, curve, &stopped, beta,
    ))
}
