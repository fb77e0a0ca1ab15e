//! The layered prediction-error energy and its analytic gradients.
//!
//! For a network whose state-producing layers (linear, conv, attention) have outputs
//! `s_1..s_L`, each state has a prediction `h_i = f_i(s_{i-1})`: the state layer applied
//! to the previous state after the non-state layers in between (activations, pooling,
//! norms, flatten; dropout is the identity), plus a residual skip when the layer ends a
//! residual block. Per sample,
//!
//! `E(s) = sum_i 1/2 ||h_i - s_i||^2 + beta * L(g(s_L), y)`
//!
//! where `g` is the chain of layers after the last state and `L` the [`Loss`]. State
//! dynamics are per sample (nothing is divided by the batch size); weight gradients are
//! averaged over the batch by the estimators. With `beta = 0` the minimiser is the forward
//! pass, where every prediction error is exactly zero: the free phase *is* the forward pass.
//!
//! Batch norm inside the energy uses the statistics of the forward pass of the batch, held
//! constant while settling, so samples stay independent and running statistics are updated
//! once per batch, by the trainer, from [`BatchContext::moments`].

use burn::tensor::TensorData;

use crate::device::{Device, Tensor, autodiff, to_host};
use crate::loss::Loss;
use crate::model::{Aux, BatchMoments, LayerOp, Network, NormStats};

/// Where a residual skip's value comes from: position `position` (0 = the segment's input)
/// of segment `segment`'s layer chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SkipSource {
    segment: usize,
    position: usize,
}

/// One state's prediction: non-state layers `prefix`, then state layer `layer`.
#[derive(Debug, Clone, PartialEq)]
struct Segment {
    prefix: Vec<usize>,
    layer: usize,
    skip: Option<SkipSource>,
    /// Skips read from this segment's chain: `(position, receiving segment)`.
    injections: Vec<(usize, usize)>,
}

impl Segment {
    fn chain(&self) -> impl DoubleEndedIterator<Item = usize> + '_ {
        self.prefix
            .iter()
            .copied()
            .chain(std::iter::once(self.layer))
    }
}

/// The energy of a network: its state structure and the loss of its nudge.
#[derive(Debug, Clone)]
pub struct EnergyModel {
    segments: Vec<Segment>,
    suffix: Vec<usize>,
    loss: Loss,
    names: Vec<String>,
}

/// Inputs and backward records of a chain of layers.
#[derive(Debug, Clone)]
pub(crate) struct Tape {
    inputs: Vec<Tensor<2>>,
    aux: Vec<Aux>,
}

/// Everything the gradients need at one point of state space.
#[derive(Debug, Clone)]
pub struct Evaluation {
    tapes: Vec<Tape>,
    errors: Vec<Tensor<2>>,
    suffix: Tape,
    output: Tensor<2>,
    /// Whether every error is exactly zero by construction (the free phase's forward pass,
    /// where each state is its own prediction).
    at_rest: bool,
}

impl Evaluation {
    /// Whether this is the free phase's forward pass, where every state equals its
    /// prediction and every error is exactly zero (not merely rounded to it). The host
    /// settle loops start from it without a first evaluation and skip the products that
    /// only move zeros ([`crate::ep::Settler::settle`]).
    pub fn at_rest(&self) -> bool {
        self.at_rest
    }

    /// Prediction errors `h_i - s_i`, one per state.
    pub fn errors(&self) -> &[Tensor<2>] {
        &self.errors
    }

    /// The network output `g(s_L)`.
    pub fn output(&self) -> &Tensor<2> {
        &self.output
    }

    /// The same evaluation with `errors` (one per state, as [`Evaluation::errors`]) in
    /// place of its own: a settle loop that holds the errors more exactly than their
    /// recomputation from the rounded states (the fused loops' perturbation form).
    pub(crate) fn with_errors(mut self, errors: Vec<Tensor<2>>) -> Self {
        assert_eq!(errors.len(), self.errors.len(), "one error per state");
        self.errors = errors;
        self.at_rest = false;
        self
    }
}

/// What stays fixed for one batch: inputs, targets, batch-norm statistics, and the first
/// state's prediction (it depends only on the input, so it is computed once).
#[derive(Debug, Clone)]
pub struct BatchContext {
    x: Tensor<2>,
    targets: Tensor<2>,
    norm: Vec<NormStats>,
    first: (Tape, Tensor<2>),
    moments: BatchMoments,
}

impl BatchContext {
    /// Per-channel batch moments of each batch-norm layer (for the running statistics).
    pub fn moments(&self) -> &BatchMoments {
        &self.moments
    }

    /// The one-hot targets.
    pub fn targets(&self) -> &Tensor<2> {
        &self.targets
    }

    /// The input batch.
    pub fn input(&self) -> &Tensor<2> {
        &self.x
    }

    /// Number of samples.
    pub fn batch_size(&self) -> usize {
        self.x.dims()[0]
    }
}

/// The structure of a dense layered network: every state after the first is a linear layer
/// fed by the previous state through at most one element-wise activation, optionally plus
/// the previous state itself (a residual block around the activation and the linear
/// layer), and nothing follows the last state.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct DensePlan {
    /// State widths `n_0..n_{L-1}`.
    pub widths: Vec<usize>,
    /// For each state `i >= 1`: its linear layer's index and the activation before it.
    pub links: Vec<(usize, Option<crate::model::Activation>)>,
    /// For each state `i >= 1`: whether its prediction adds `s_{i-1}` (a residual link).
    pub residual: Vec<bool>,
}

/// The structure of a convolutional chain: every state after the first is a convolution
/// or a linear layer fed by the previous state through at most an element-wise
/// activation, a max pooling and a flatten (in that order), with no skip links, and
/// nothing follows the last state.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ConvPlan {
    /// State widths `n_0..n_{L-1}` (values per sample).
    pub widths: Vec<usize>,
    /// For each state `i >= 1`: its layer's index, the activation before it and the max
    /// pooling layer before it.
    pub links: Vec<ConvLinkPlan>,
}

/// One link of a [`ConvPlan`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct ConvLinkPlan {
    /// The convolution or linear layer.
    pub layer: usize,
    /// The activation applied to the state below.
    pub activation: Option<crate::model::Activation>,
    /// The max pooling layer after the activation.
    pub pool: Option<usize>,
}

impl BatchContext {
    /// The first state's prediction (cached for the batch).
    pub(crate) fn first_prediction(&self) -> &Tensor<2> {
        &self.first.1
    }
}

impl EnergyModel {
    /// The [`DensePlan`] of `net`, if its energy has the dense structure.
    pub(crate) fn dense_plan(&self, net: &Network) -> Option<DensePlan> {
        if !self.suffix.is_empty() {
            return None;
        }
        let layers = net.layers();
        let mut widths = Vec::with_capacity(self.segments.len());
        let mut links = Vec::new();
        let mut residual = Vec::new();
        for (i, seg) in self.segments.iter().enumerate() {
            let own_input = SkipSource {
                segment: i,
                position: 0,
            };
            let is_residual = match (seg.skip, seg.injections.as_slice()) {
                (None, []) => false,
                (Some(src), [(0, receiver)]) if i > 0 && src == own_input && *receiver == i => true,
                _ => return None,
            };
            widths.push(layers[seg.layer].output.numel());
            if i == 0 {
                continue;
            }
            let LayerOp::Linear { .. } = layers[seg.layer].op else {
                return None;
            };
            let activation = match seg.prefix.as_slice() {
                [] => None,
                [a] => match layers[*a].op {
                    LayerOp::Activation(act) if act.scalar_derivative(0.5).is_some() => Some(act),
                    _ => return None,
                },
                _ => return None,
            };
            links.push((seg.layer, activation));
            residual.push(is_residual);
        }
        Some(DensePlan {
            widths,
            links,
            residual,
        })
    }

    /// Which fused host settle loop `net` settles in on a CPU device in f32 (`"dense"` or
    /// `"conv"`; neither with the adaptive step), if any; `None` means the generic loop.
    pub fn fused_loop(&self, net: &Network) -> Option<&'static str> {
        if self.dense_plan(net).is_some() {
            Some("dense")
        } else if self.conv_plan(net).is_some() {
            Some("conv")
        } else {
            None
        }
    }

    /// The [`ConvPlan`] of `net`, if its energy has the structure of a convolutional chain
    /// (with at least one convolution or pooling: dense chains have [`DensePlan`]).
    pub(crate) fn conv_plan(&self, net: &Network) -> Option<ConvPlan> {
        if !self.suffix.is_empty() {
            return None;
        }
        let layers = net.layers();
        let mut widths = Vec::with_capacity(self.segments.len());
        let mut links = Vec::new();
        let mut spatial = false;
        for (i, seg) in self.segments.iter().enumerate() {
            if seg.skip.is_some() || !seg.injections.is_empty() {
                return None;
            }
            widths.push(layers[seg.layer].output.numel());
            if i == 0 {
                continue;
            }
            match layers[seg.layer].op {
                LayerOp::Linear { .. } => {}
                LayerOp::Conv2d { .. } => spatial = true,
                _ => return None,
            }
            let mut activation = None;
            let mut pool = None;
            let mut flattened = false;
            for &l in &seg.prefix {
                match layers[l].op {
                    LayerOp::Activation(act)
                        if activation.is_none()
                            && pool.is_none()
                            && !flattened
                            && act.scalar_derivative(0.5).is_some() =>
                    {
                        activation = Some(act);
                    }
                    LayerOp::MaxPool2d { .. } if pool.is_none() && !flattened => {
                        pool = Some(l);
                        spatial = true;
                    }
                    LayerOp::Flatten if !flattened => flattened = true,
                    _ => return None,
                }
            }
            links.push(ConvLinkPlan {
                layer: seg.layer,
                activation,
                pool,
            });
        }
        spatial.then_some(ConvPlan { widths, links })
    }

    /// For each parameter of `net`, the state whose prediction error its energy gradient
    /// carries (the state its layer predicts), or `None` for layers after the last state
    /// (which the nudge drives directly). `None` overall when skip connections mix the
    /// errors of several states into one parameter's gradient.
    pub(crate) fn param_states(&self, net: &Network) -> Option<Vec<Option<usize>>> {
        if self
            .segments
            .iter()
            .any(|s| s.skip.is_some() || !s.injections.is_empty())
        {
            return None;
        }
        let mut states = vec![None; net.params().len()];
        for (j, seg) in self.segments.iter().enumerate() {
            for l in seg.chain() {
                let layer = &net.layers()[l];
                states[layer.first_param..layer.first_param + layer.num_params].fill(Some(j));
            }
        }
        Some(states)
    }

    /// The layers of the first state's segment, in order (its state layer last).
    pub(crate) fn first_chain(&self) -> impl DoubleEndedIterator<Item = usize> + '_ {
        self.segments[0].chain()
    }

    /// The energy of `net` with nudge loss `loss`.
    pub fn new(net: &Network, loss: Loss) -> Self {
        let layers = net.layers();
        let mut segments: Vec<Segment> = Vec::new();
        let mut pending = Vec::new();
        for (i, layer) in layers.iter().enumerate() {
            if layer.is_state() {
                segments.push(Segment {
                    prefix: std::mem::take(&mut pending),
                    layer: i,
                    skip: None,
                    injections: Vec::new(),
                });
            } else {
                pending.push(i);
            }
        }
        for skip in net.skips() {
            // The first segment whose chain reaches the block's start holds the skip value.
            let (src, seg) = segments
                .iter()
                .enumerate()
                .find(|(_, s)| s.layer >= skip.start)
                .expect("a block ends with a state layer");
            let position = seg.prefix.iter().filter(|&&p| p < skip.start).count();
            let receiver = segments
                .iter()
                .position(|s| s.layer == skip.end)
                .expect("a block ends with a state layer");
            segments[receiver].skip = Some(SkipSource {
                segment: src,
                position,
            });
            segments[src].injections.push((position, receiver));
        }
        Self {
            names: segments
                .iter()
                .map(|s| layers[s.layer].name.clone())
                .collect(),
            segments,
            suffix: pending,
            loss,
        }
    }

    /// Number of states.
    pub fn num_states(&self) -> usize {
        self.segments.len()
    }

    /// The state-producing layer's name for each state.
    pub fn state_names(&self) -> &[String] {
        &self.names
    }

    /// The nudge loss.
    pub fn loss(&self) -> Loss {
        self.loss
    }

    /// Runs `layers` on `input`, recording a tape. Batch-norm statistics missing from
    /// `norm` are taken from the values seen (the free phase).
    fn run_chain(
        net: &Network,
        layers: impl Iterator<Item = usize>,
        input: Tensor<2>,
        norm: &mut [Option<NormStats>],
        moments: &mut BatchMoments,
    ) -> (Tape, Tensor<2>) {
        let mut tape = Tape {
            inputs: Vec::new(),
            aux: Vec::new(),
        };
        let mut v = input;
        for index in layers {
            let layer = &net.layers()[index];
            if let LayerOp::BatchNorm { eps, .. } = layer.op
                && norm[index].is_none()
            {
                let (mean, var) = layer.batch_moments(&v);
                moments.push((to_host(&mean), to_host(&var)));
                norm[index] = Some(NormStats::Fixed {
                    mean,
                    inv_std: var.add_scalar(eps).sqrt().recip(),
                });
            }
            let stats = norm[index].clone().unwrap_or(NormStats::Batch);
            let (out, aux) = layer.forward_taped(layer.params(net.params()), &v, &stats);
            tape.inputs.push(v);
            tape.aux.push(aux);
            v = out;
        }
        (tape, v)
    }

    fn skip_value(&self, i: usize, tapes: &[Tape], own: &[Tensor<2>]) -> Option<Tensor<2>> {
        self.segments[i].skip.map(|src| {
            if src.segment == i {
                own[src.position].clone()
            } else {
                tapes[src.segment].inputs[src.position].clone()
            }
        })
    }

    /// The free phase: the forward pass of `x`, whose states are the energy's minimiser at
    /// `beta = 0`. Returns the batch context and the free states.
    pub fn free_phase(
        &self,
        net: &Network,
        x: Tensor<2>,
        targets: Tensor<2>,
    ) -> (BatchContext, Vec<Tensor<2>>, Evaluation) {
        let mut norm: Vec<Option<NormStats>> = vec![None; net.layers().len()];
        let mut moments = BatchMoments::new();
        let mut tapes: Vec<Tape> = Vec::with_capacity(self.segments.len());
        let mut states: Vec<Tensor<2>> = Vec::with_capacity(self.segments.len());
        for (i, seg) in self.segments.iter().enumerate() {
            let input = if i == 0 {
                x.clone()
            } else {
                states[i - 1].clone()
            };
            let (tape, h) =
                self.segment_forward(net, i, seg, input, &tapes, &mut norm, &mut moments);
            tapes.push(tape);
            states.push(h);
        }
        let (suffix, output) = Self::run_chain(
            net,
            self.suffix.iter().copied(),
            states.last().expect("at least one state").clone(),
            &mut norm,
            &mut moments,
        );
        let zeros = states.iter().map(Tensor::zeros_like).collect();
        let norm: Vec<NormStats> = norm
            .into_iter()
            .map(|n| n.unwrap_or(NormStats::Batch))
            .collect();
        let ctx = BatchContext {
            x,
            targets,
            norm,
            first: (tapes[0].clone(), states[0].clone()),
            moments,
        };
        let eval = Evaluation {
            tapes,
            errors: zeros,
            suffix,
            output,
            at_rest: true,
        };
        (ctx, states, eval)
    }

    #[allow(clippy::too_many_arguments)]
    fn segment_forward(
        &self,
        net: &Network,
        i: usize,
        seg: &Segment,
        input: Tensor<2>,
        tapes: &[Tape],
        norm: &mut [Option<NormStats>],
        moments: &mut BatchMoments,
    ) -> (Tape, Tensor<2>) {
        let (tape, out) = Self::run_chain(net, seg.chain(), input, norm, moments);
        let h = match self.skip_value(i, tapes, &tape.inputs) {
            Some(skip) => out + skip,
            None => out,
        };
        (tape, h)
    }

    /// Predictions, errors and tapes at `states`.
    pub fn evaluate(&self, net: &Network, ctx: &BatchContext, states: &[Tensor<2>]) -> Evaluation {
        let mut norm: Vec<Option<NormStats>> = ctx.norm.iter().cloned().map(Some).collect();
        let mut moments = BatchMoments::new();
        let mut tapes: Vec<Tape> = Vec::with_capacity(self.segments.len());
        let mut errors = Vec::with_capacity(self.segments.len());
        for (i, seg) in self.segments.iter().enumerate() {
            let (tape, h) = if i == 0 {
                ctx.first.clone()
            } else {
                self.segment_forward(
                    net,
                    i,
                    seg,
                    states[i - 1].clone(),
                    &tapes,
                    &mut norm,
                    &mut moments,
                )
            };
            tapes.push(tape);
            errors.push(h - states[i].clone());
        }
        let (suffix, output) = Self::run_chain(
            net,
            self.suffix.iter().copied(),
            states.last().expect("at least one state").clone(),
            &mut norm,
            &mut moments,
        );
        Evaluation {
            tapes,
            errors,
            suffix,
            output,
            at_rest: false,
        }
    }

    /// Backward through segment `j`'s chain from its prediction error. Returns the
    /// gradient with respect to the segment's input when `want_input`, and adds parameter
    /// gradients (summed over the batch) into `params` when given.
    fn segment_backward(
        &self,
        net: &Network,
        j: usize,
        eval: &Evaluation,
        want_input: bool,
        mut params: Option<(&mut [Option<Tensor<2>>], &[bool])>,
        injections: bool,
    ) -> Option<Tensor<2>> {
        let seg = &self.segments[j];
        let tape = &eval.tapes[j];
        let chain: Vec<usize> = seg.chain().collect();
        let mut g = eval.errors[j].clone();
        let inject = |g: Tensor<2>, position: usize| {
            seg.injections
                .iter()
                .filter(|(p, _)| injections && *p == position)
                .fold(g, |g, (_, m)| g + eval.errors[*m].clone())
        };
        for (pos, &index) in chain.iter().enumerate().rev() {
            let layer = &net.layers()[index];
            let p = layer.params(net.params());
            if let Some((out, skip)) = params.as_mut() {
                let first = layer.first_param;
                let skip = skip.get(first..first + layer.num_params).unwrap_or(&[]);
                for (k, grad) in layer
                    .vjp_params_except(p, &tape.inputs[pos], &tape.aux[pos], &g, skip)
                    .into_iter()
                    .enumerate()
                {
                    if let Some(grad) = grad {
                        accumulate(&mut out[first + k], grad);
                    }
                }
            }
            let params_below = chain[..pos].iter().any(|&i| net.layers()[i].num_params > 0);
            if !want_input && !params_below {
                break;
            }
            g = layer.vjp_input(p, &tape.inputs[pos], &tape.aux[pos], g);
            g = inject(g, pos);
        }
        want_input.then_some(g)
    }

    /// Gradient of the energy with respect to each state at `eval`, per sample.
    pub fn state_gradients(
        &self,
        net: &Network,
        ctx: &BatchContext,
        eval: &Evaluation,
        beta: f32,
    ) -> Vec<Tensor<2>> {
        let n = self.segments.len();
        let mut grads = Vec::with_capacity(n);
        for i in 0..n {
            let own = eval.errors[i].clone().neg();
            let g = if i + 1 < n {
                own + self
                    .segment_backward(net, i + 1, eval, true, None, true)
                    .expect("input gradient asked for")
            } else if beta != 0.0 {
                own + self.nudge_backward(net, ctx, eval, beta, None)
            } else {
                own
            };
            grads.push(g);
        }
        grads
    }

    /// `beta * dL/ds_L` through the layers after the last state; adds the parameter
    /// gradient `beta * dL/dtheta` (summed over the batch) into `params` when given.
    fn nudge_backward(
        &self,
        net: &Network,
        ctx: &BatchContext,
        eval: &Evaluation,
        beta: f32,
        mut params: Option<&mut [Option<Tensor<2>>]>,
    ) -> Tensor<2> {
        let mut g = self
            .loss
            .gradient(eval.output.clone(), ctx.targets.clone())
            .mul_scalar(beta);
        for (pos, &index) in self.suffix.iter().enumerate().rev() {
            let layer = &net.layers()[index];
            let p = layer.params(net.params());
            if let Some(out) = params.as_deref_mut() {
                for (k, grad) in layer
                    .vjp_params(p, &eval.suffix.inputs[pos], &eval.suffix.aux[pos], &g)
                    .into_iter()
                    .enumerate()
                {
                    accumulate(&mut out[layer.first_param + k], grad);
                }
            }
            g = layer.vjp_input(p, &eval.suffix.inputs[pos], &eval.suffix.aux[pos], g);
        }
        g
    }

    /// Gradient of the total energy (summed over the batch) with respect to every
    /// parameter, states held fixed.
    pub fn param_gradients(
        &self,
        net: &Network,
        ctx: &BatchContext,
        eval: &Evaluation,
        beta: f32,
    ) -> Vec<Tensor<2>> {
        self.parameter_terms(net, ctx, eval, beta, true, &[])
    }

    /// [`EnergyModel::param_gradients`] without the parameters marked in `skip` (indexed
    /// like the parameters), which come back as empty `[0, 0]` tensors: a linear state
    /// layer's weight is then not multiplied out at all (its gradient left to its
    /// [`EnergyModel::linear_factors`]).
    pub fn param_gradients_except(
        &self,
        net: &Network,
        ctx: &BatchContext,
        eval: &Evaluation,
        beta: f32,
        skip: &[bool],
    ) -> Vec<Tensor<2>> {
        self.parameter_terms(net, ctx, eval, beta, true, skip)
    }

    /// Parameter gradients of every segment's term (with or without the errors that skips
    /// carry into a segment's chain) and of the nudge, zeros where nothing contributes.
    fn parameter_terms(
        &self,
        net: &Network,
        ctx: &BatchContext,
        eval: &Evaluation,
        beta: f32,
        injections: bool,
        skip: &[bool],
    ) -> Vec<Tensor<2>> {
        let mut out: Vec<Option<Tensor<2>>> = vec![None; net.params().len()];
        for j in 0..self.segments.len() {
            self.segment_backward(net, j, eval, false, Some((&mut out, skip)), injections);
        }
        if beta != 0.0 && self.suffix.iter().any(|&i| net.layers()[i].num_params > 0) {
            self.nudge_backward(net, ctx, eval, beta, Some(&mut out));
        }
        out.into_iter()
            .zip(net.params())
            .enumerate()
            .map(|(k, (g, p))| match g {
                Some(g) => g,
                None if skip.get(k).copied().unwrap_or(false) => Tensor::empty([0, 0], &p.device()),
                None => Tensor::zeros(p.dims(), &p.device()),
            })
            .collect()
    }

    /// Local EP's parameter term at `states` (summed over the batch): every segment's
    /// prediction is recomputed from its own input, and its parameters receive the
    /// gradient of its own term `1/2 ||h_i - s_i||^2` only (no other layer's error); the
    /// layers after the last state receive `beta * dL/dtheta`.
    pub fn local_param_gradients(
        &self,
        net: &Network,
        ctx: &BatchContext,
        states: &[Tensor<2>],
        beta: f32,
    ) -> Vec<Tensor<2>> {
        let eval = self.evaluate(net, ctx, states);
        self.parameter_terms(net, ctx, &eval, beta, false, &[])
    }

    /// Per-sample factors of each linear state layer's parameter term at `eval`: the layer's
    /// input and its prediction error times `scale` (indexed like the parameters; `None`
    /// for everything but linear weights).
    pub fn linear_factors(
        &self,
        net: &Network,
        eval: &Evaluation,
        scale: f32,
    ) -> Vec<Option<crate::model::GradFactors>> {
        let mut out = vec![None; net.params().len()];
        for (j, seg) in self.segments.iter().enumerate() {
            let layer = &net.layers()[seg.layer];
            if let LayerOp::Linear { .. } = layer.op {
                out[layer.first_param] = Some(crate::model::GradFactors {
                    inputs: eval.tapes[j].inputs[seg.prefix.len()].clone(),
                    output_grads: eval.errors[j].clone().mul_scalar(scale),
                });
            }
        }
        out
    }

    /// Backpropagation through the energy's own layer chain at the free phase: replaces
    /// the errors of `eval` by the backprop signals `dL/dh_i` of the loss (per sample) and
    /// returns it, so that [`EnergyModel::param_gradients`] at `beta = 1` and
    /// [`EnergyModel::linear_factors`] give backprop's gradient and factors.
    pub fn backprop_signals(
        &self,
        net: &Network,
        ctx: &BatchContext,
        eval: &Evaluation,
    ) -> Evaluation {
        let mut e = eval.clone();
        e.at_rest = false;
        let n = self.segments.len();
        e.errors[n - 1] = self.nudge_backward(net, ctx, eval, 1.0, None);
        for i in (0..n - 1).rev() {
            e.errors[i] = self
                .segment_backward(net, i + 1, &e, true, None, true)
                .expect("input gradient asked for");
        }
        e
    }

    /// FLOPs of the matrix products of one settle step on `batch` samples: each state
    /// layer after the first runs its forward (prediction) and its input VJP (feedback),
    /// which cost the same; the first layer's prediction is cached. Element-wise work is
    /// not counted.
    pub fn settle_step_flops(&self, net: &Network, batch: usize) -> f64 {
        self.segments[1..]
            .iter()
            .map(|s| 2.0 * net.layers()[s.layer].forward_flops(batch))
            .sum()
    }

    /// FLOPs of one EP gradient with `steps` settle steps per phase and `phases` nudged
    /// phases: the forward pass, the settle steps, and one parameter VJP per state layer
    /// per phase (as costly as its forward).
    pub fn gradient_flops(&self, net: &Network, batch: usize, steps: usize, phases: usize) -> f64 {
        let forward: f64 = net.layers().iter().map(|l| l.forward_flops(batch)).sum();
        forward + phases as f64 * (steps as f64 * self.settle_step_flops(net, batch) + forward)
    }

    /// Per-sample energy `[batch, 1]` at `eval`.
    pub fn per_sample_energy(&self, ctx: &BatchContext, eval: &Evaluation, beta: f32) -> Tensor<2> {
        let mut e = eval
            .errors
            .iter()
            .map(|err| err.clone().square().sum_dim(1))
            .reduce(|a, b| a + b)
            .expect("at least one state")
            .mul_scalar(0.5);
        if beta != 0.0 {
            e = e + self
                .loss
                .per_sample(eval.output.clone(), ctx.targets.clone())
                .mul_scalar(beta);
        }
        e
    }

    /// The energy and its gradients with respect to states and parameters computed by
    /// burn's autodiff from the energy's definition (the independent reference path):
    /// `(total energy over the batch, state gradients, parameter gradients)`.
    pub fn autodiff_reference(
        &self,
        net: &Network,
        ctx: &BatchContext,
        states: &[Tensor<2>],
        beta: f32,
    ) -> (f32, Vec<Tensor<2>>, Vec<Tensor<2>>) {
        let device: Device = ctx.x.device();
        let ad = autodiff(&device);
        let lift = |t: &Tensor<2>| Tensor::<2>::from_data(t.to_data(), &ad);
        let lift3 = |t: &Tensor<3>| Tensor::<3>::from_data(t.to_data(), &ad);
        let params: Vec<Tensor<2>> = net
            .params()
            .iter()
            .map(|p| lift(p).require_grad())
            .collect();
        let s: Vec<Tensor<2>> = states.iter().map(|t| lift(t).require_grad()).collect();
        let norm: Vec<NormStats> = ctx
            .norm
            .iter()
            .map(|n| match n {
                NormStats::Fixed { mean, inv_std } => NormStats::Fixed {
                    mean: lift3(mean),
                    inv_std: lift3(inv_std),
                },
                NormStats::Batch => NormStats::Batch,
            })
            .collect();
        let run = |chain: &[usize], input: Tensor<2>| -> Vec<Tensor<2>> {
            let mut values = vec![input];
            for &i in chain {
                let layer = &net.layers()[i];
                let v = values.last().expect("non-empty").clone();
                values.push(layer.apply(layer.params(&params), v, &norm[i]));
            }
            values
        };
        let x = lift(&ctx.x);
        let mut chains: Vec<Vec<Tensor<2>>> = Vec::new();
        let mut total: Option<Tensor<1>> = None;
        for (i, seg) in self.segments.iter().enumerate() {
            let input = if i == 0 { x.clone() } else { s[i - 1].clone() };
            let chain: Vec<usize> = seg.chain().collect();
            let values = run(&chain, input);
            let mut h = values.last().expect("non-empty").clone();
            if let Some(src) = seg.skip {
                let skip = if src.segment == i {
                    values[src.position].clone()
                } else {
                    chains[src.segment][src.position].clone()
                };
                h = h + skip;
            }
            let term = (h - s[i].clone()).square().sum().mul_scalar(0.5);
            total = Some(match total {
                Some(t) => t + term,
                None => term,
            });
            chains.push(values);
        }
        let mut total = total.expect("at least one state");
        if beta != 0.0 {
            let out = run(&self.suffix, s.last().expect("non-empty").clone())
                .pop()
                .expect("non-empty");
            let targets = lift(&ctx.targets);
            total = total + self.loss.per_sample(out, targets).sum().mul_scalar(beta);
        }
        let value: f32 = total.clone().into_scalar();
        let grads = total.backward();
        let back = |t: &Tensor<2>| {
            let g = t.grad(&grads).map(|g| g.to_data());
            Tensor::<2>::from_data(
                g.unwrap_or_else(|| TensorData::zeros::<f32, _>(t.dims())),
                &device,
            )
        };
        (
            value,
            s.iter().map(back).collect(),
            params.iter().map(back).collect(),
        )
    }
}

fn accumulate(slot: &mut Option<Tensor<2>>, grad: Tensor<2>) {
    *slot = Some(match slot.take() {
        Some(g) => g + grad,
        None => grad,
    });
}
