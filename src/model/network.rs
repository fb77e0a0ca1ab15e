//! A network: an explicitly declared chain of layers, its parameters and its forward pass.

use burn::tensor::TensorData;
use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};

use super::layer::{Layer, LayerOp, NormStats};
use super::layers::{activation, attention, conv, linear, norm, pool, reshape};
use super::{Activation, ModelError, Shape};
use crate::device::{Device, Tensor, to_host};

/// A layer as declared by a user; sizes are inferred from the layer before it.
#[derive(Debug, Clone, PartialEq)]
pub enum LayerKind {
    /// Fully connected layer to `outputs` features (needs a flat input).
    Linear {
        /// Output width.
        outputs: usize,
    },
    /// 2-D convolution (needs an image input).
    Conv2d {
        /// Output channels.
        channels: usize,
        /// Square kernel size.
        kernel: usize,
        /// Stride.
        stride: usize,
        /// Zero padding on every side.
        padding: usize,
    },
    /// Element-wise activation.
    Activation(Activation),
    /// Max pooling.
    MaxPool2d {
        /// Window.
        kernel: usize,
        /// Stride.
        stride: usize,
    },
    /// Average pooling.
    AvgPool2d {
        /// Window.
        kernel: usize,
        /// Stride.
        stride: usize,
    },
    /// Image or sequence to flat vector.
    Flatten,
    /// Flat vector to `tokens` tokens of equal width.
    Tokens {
        /// Number of tokens.
        tokens: usize,
    },
    /// Layer normalisation (eps 1e-5).
    LayerNorm,
    /// Batch normalisation (eps 1e-5, running-statistics momentum 0.1).
    BatchNorm,
    /// Dropout with drop probability `p` in `[0, 1)`.
    Dropout {
        /// Drop probability.
        p: f32,
    },
    /// Multi-head self-attention with `heads` heads (needs a sequence input whose width
    /// divides by `heads`).
    Attention {
        /// Number of heads.
        heads: usize,
    },
    /// A residual block: its input is added to the output of its last layer, which must be
    /// state-producing (linear, conv, attention) and keep the input's shape. No nesting.
    Residual(Vec<LayerKind>),
}

/// A residual skip: the input of layer `start` is added to the output of layer `end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Skip {
    /// First layer of the block.
    pub start: usize,
    /// Last layer of the block (state-producing).
    pub end: usize,
}

/// What a parameter is, for optimizers that treat matrices and vectors differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    /// A weight matrix: `fan_in` inputs to `fan_out` outputs (conv kernels count
    /// `in * k * k` inputs). `out_major` says whether it is stored `[fan_out, fan_in]`
    /// (conv) or `[fan_in, fan_out]` (linear, attention).
    Matrix {
        /// Inputs.
        fan_in: usize,
        /// Outputs.
        fan_out: usize,
        /// Stored as `[fan_out, fan_in]`.
        out_major: bool,
    },
    /// A bias or normalisation gain, stored `[1, n]`.
    Vector,
}

/// Name and kind of one parameter tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamInfo {
    /// `layer.role`, e.g. `fc1.weight`, `ln2.gain`, `attn1.wq`.
    pub name: String,
    /// Matrix or vector.
    pub kind: ParamKind,
}

/// Running statistics of one batch-norm layer (host copies, per channel).
#[derive(Debug, Clone, PartialEq)]
pub struct RunningStats {
    /// Running mean.
    pub mean: Vec<f32>,
    /// Running (unbiased) variance.
    pub var: Vec<f32>,
}

/// Per-channel batch moments of each batch-norm layer seen in a training forward pass.
pub type BatchMoments = Vec<(Vec<f32>, Vec<f32>)>;

/// Builds a [`Network`] layer by layer; every size is checked when [`NetworkBuilder::build`]
/// runs.
#[derive(Debug, Clone)]
pub struct NetworkBuilder {
    input: Shape,
    layers: Vec<LayerKind>,
}

impl NetworkBuilder {
    /// A builder for inputs of this per-sample shape.
    pub fn new(input: Shape) -> Self {
        Self {
            input,
            layers: Vec::new(),
        }
    }

    /// Appends a layer.
    pub fn layer(mut self, layer: LayerKind) -> Self {
        self.layers.push(layer);
        self
    }

    /// Appends a linear layer.
    pub fn linear(self, outputs: usize) -> Self {
        self.layer(LayerKind::Linear { outputs })
    }

    /// Appends a convolution.
    pub fn conv2d(self, channels: usize, kernel: usize, stride: usize, padding: usize) -> Self {
        self.layer(LayerKind::Conv2d {
            channels,
            kernel,
            stride,
            padding,
        })
    }

    /// Appends an activation.
    pub fn activation(self, a: Activation) -> Self {
        self.layer(LayerKind::Activation(a))
    }

    /// Appends a ReLU.
    pub fn relu(self) -> Self {
        self.activation(Activation::Relu)
    }

    /// The declared layers so far.
    pub fn layers(&self) -> &[LayerKind] {
        &self.layers
    }

    /// The input shape.
    pub fn input(&self) -> Shape {
        self.input
    }

    /// Resolves sizes, checks shapes and initialises parameters from `seed`: He-uniform
    /// for linear and conv weights (`U(-sqrt(6/fan_in), sqrt(6/fan_in))`), Xavier-uniform
    /// for attention projections, zero biases, unit gains; with more than one residual
    /// block, the last weight of every block is scaled by `1/sqrt(blocks)`. The same seed
    /// gives the same weights on every device.
    pub fn build(&self, seed: u64, device: &Device) -> Result<Network, ModelError> {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
        let mut net = Network {
            input: self.input,
            layers: Vec::new(),
            skips: Vec::new(),
            params: Vec::new(),
            info: Vec::new(),
            running: Vec::new(),
        };
        let mut shape = self.input;
        let mut counter = Counter::default();
        for kind in &self.layers {
            match kind {
                LayerKind::Residual(inner) => {
                    let start = net.layers.len();
                    let block_in = shape;
                    if inner.is_empty() {
                        return Err(invalid("a residual block needs at least one layer"));
                    }
                    for k in inner {
                        if matches!(k, LayerKind::Residual(_)) {
                            return Err(invalid("residual blocks cannot be nested"));
                        }
                        shape = net.push(k, shape, &mut counter, &mut rng, device)?;
                    }
                    let end = net.layers.len() - 1;
                    if !net.layers[end].is_state() {
                        return Err(invalid(&format!(
                            "a residual block must end with a state-producing layer (linear, conv, attention), not {}",
                            net.layers[end].name
                        )));
                    }
                    if shape != block_in {
                        return Err(invalid(&format!(
                            "a residual block must keep its input shape: {block_in} in, {shape} out"
                        )));
                    }
                    net.skips.push(Skip { start, end });
                }
                k => shape = net.push(k, shape, &mut counter, &mut rng, device)?,
            }
        }
        if !net.layers.iter().any(Layer::is_state) {
            return Err(invalid(
                "a network needs at least one linear, conv or attention layer",
            ));
        }
        // Each residual block adds its branch's variance to the stream: with B blocks at
        // He scale the activations grow like 2^B. Scaling each block's last weight by
        // 1/sqrt(B) keeps the growth near e (and the state Hessian near that of a
        // shallow net, so settling stays stable at depth).
        let blocks = net.skips.len();
        if blocks > 1 {
            let scale = 1.0 / (blocks as f32).sqrt();
            for skip in &net.skips {
                let slot = net.layers[skip.end].first_param;
                net.params[slot] = net.params[slot].clone().mul_scalar(scale);
            }
        }
        Ok(net)
    }
}

fn invalid(reason: &str) -> ModelError {
    ModelError::InvalidSpec {
        spec: "network".into(),
        reason: reason.into(),
    }
}

#[derive(Default)]
struct Counter {
    counts: std::collections::HashMap<&'static str, usize>,
}

impl Counter {
    fn next(&mut self, prefix: &'static str) -> String {
        let n = self.counts.entry(prefix).or_insert(0);
        *n += 1;
        format!("{prefix}{n}")
    }
}

fn uniform(rng: &mut Xoshiro256PlusPlus, n: usize, bound: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-bound..bound)).collect()
}

/// Bytes of physical memory (`u64::MAX` where it cannot be read).
fn physical_memory() -> u64 {
    #[cfg(unix)]
    {
        // SAFETY: sysconf has no preconditions; a negative result means "unknown".
        let (pages, size) = unsafe {
            (
                libc::sysconf(libc::_SC_PHYS_PAGES),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        if pages > 0 && size > 0 {
            return (pages as u64).saturating_mul(size as u64);
        }
    }
    u64::MAX
}

/// What a layer's `build` (in [`super::layers`]) adds to the network under construction:
/// its name, its parameters with their initial values, batch-norm running statistics.
pub(crate) struct LayerInit<'a> {
    position: usize,
    name: String,
    net: &'a mut Network,
    counter: &'a mut Counter,
    rng: &'a mut Xoshiro256PlusPlus,
    device: &'a Device,
}

impl LayerInit<'_> {
    /// Names the layer `<prefix><n>` (n counts layers of that prefix) and returns the name.
    pub(crate) fn name(&mut self, prefix: &'static str) -> String {
        self.name = self.counter.next(prefix);
        self.name.clone()
    }

    /// `n` values drawn uniformly from `(-bound, bound)` with the network's seed, once
    /// [`LayerInit::reserve`] allows them.
    pub(crate) fn uniform(&mut self, n: usize, bound: f32) -> Result<Vec<f32>, ModelError> {
        self.reserve(n)?;
        Ok(uniform(self.rng, n, bound))
    }

    /// Refuses `n` more parameters when the network's parameters would not fit in this
    /// machine's memory (checked before anything is allocated: a spec such as
    /// `784-100000000-10` is an error, not an abort).
    fn reserve(&self, n: usize) -> Result<(), ModelError> {
        let have: usize = self
            .net
            .params
            .iter()
            .map(|p| p.shape().num_elements())
            .sum();
        let total = have.saturating_add(n);
        let bytes = total.saturating_mul(std::mem::size_of::<f32>()) as u64;
        let memory = physical_memory();
        if bytes > memory {
            return Err(invalid(&format!(
                "layer {}: the model needs {total} parameters ({:.1} GB), more than this machine's {:.1} GB of memory",
                self.position,
                bytes as f64 / 1e9,
                memory as f64 / 1e9
            )));
        }
        Ok(())
    }

    /// Adds a parameter.
    pub(crate) fn param(
        &mut self,
        name: String,
        kind: ParamKind,
        values: Vec<f32>,
        shape: [usize; 2],
    ) {
        self.net.add_param(name, kind, values, shape, self.device);
    }

    /// Adds a `[1, n]` vector parameter filled with `value`.
    pub(crate) fn vector(&mut self, name: String, value: f32, n: usize) -> Result<(), ModelError> {
        self.reserve(n)?;
        self.net.add_vector(name, value, n, self.device);
        Ok(())
    }

    /// Adds batch-norm running statistics for `channels` (mean 0, variance 1); returns
    /// their slot.
    pub(crate) fn running_stats(&mut self, channels: usize) -> usize {
        self.net.running.push(RunningStats {
            mean: vec![0.0; channels],
            var: vec![1.0; channels],
        });
        self.net.running.len() - 1
    }

    /// The error for this layer: `what` follows "layer N" (start it with " (kind)" or
    /// ": ").
    pub(crate) fn invalid(&self, what: &str) -> ModelError {
        invalid(&format!("layer {}{what}", self.position))
    }
}

/// A network: layers in forward order, residual skips, parameters and batch-norm running
/// statistics.
#[derive(Debug, Clone)]
pub struct Network {
    input: Shape,
    layers: Vec<Layer>,
    skips: Vec<Skip>,
    params: Vec<Tensor<2>>,
    info: Vec<ParamInfo>,
    running: Vec<RunningStats>,
}

impl Network {
    fn push(
        &mut self,
        kind: &LayerKind,
        input: Shape,
        counter: &mut Counter,
        rng: &mut Xoshiro256PlusPlus,
        device: &Device,
    ) -> Result<Shape, ModelError> {
        let first_param = self.params.len();
        let mut init = LayerInit {
            position: self.layers.len() + 1,
            name: String::new(),
            net: self,
            counter,
            rng,
            device,
        };
        let (op, output) = match *kind {
            LayerKind::Linear { outputs } => linear::build(&mut init, input, outputs)?,
            LayerKind::Conv2d {
                channels,
                kernel,
                stride,
                padding,
            } => conv::build(&mut init, input, channels, kernel, stride, padding)?,
            LayerKind::Activation(a) => activation::build(&mut init, input, a),
            LayerKind::MaxPool2d { kernel, stride } => {
                pool::build(&mut init, input, kernel, stride, true)?
            }
            LayerKind::AvgPool2d { kernel, stride } => {
                pool::build(&mut init, input, kernel, stride, false)?
            }
            LayerKind::Flatten => reshape::build_flatten(&mut init, input),
            LayerKind::Tokens { tokens } => reshape::build_tokens(&mut init, input, tokens)?,
            LayerKind::LayerNorm => norm::build(&mut init, input, false)?,
            LayerKind::BatchNorm => norm::build(&mut init, input, true)?,
            LayerKind::Dropout { p } => reshape::build_dropout(&mut init, input, p)?,
            LayerKind::Attention { heads } => attention::build(&mut init, input, heads)?,
            LayerKind::Residual(_) => unreachable!("handled by the builder"),
        };
        let name = init.name;
        self.layers.push(Layer {
            op,
            name,
            input,
            output,
            first_param,
            num_params: self.params.len() - first_param,
        });
        Ok(output)
    }

    /// A `[1, n]` parameter filled with `value` (biases, gains).
    fn add_vector(&mut self, name: String, value: f32, n: usize, device: &Device) {
        self.add_param(name, ParamKind::Vector, vec![value; n], [1, n], device);
    }

    fn add_param(
        &mut self,
        name: String,
        kind: ParamKind,
        values: Vec<f32>,
        shape: [usize; 2],
        device: &Device,
    ) {
        self.params
            .push(Tensor::from_data(TensorData::new(values, shape), device));
        self.info.push(ParamInfo { name, kind });
    }

    /// Per-sample input shape.
    pub fn input_shape(&self) -> Shape {
        self.input
    }

    /// Per-sample output shape.
    pub fn output_shape(&self) -> Shape {
        self.layers.last().map_or(self.input, |l| l.output)
    }

    /// Layers in forward order.
    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    /// Residual skips.
    pub fn skips(&self) -> &[Skip] {
        &self.skips
    }

    /// Parameter tensors, in layer order.
    pub fn params(&self) -> &[Tensor<2>] {
        &self.params
    }

    /// Name and kind of each parameter.
    pub fn param_info(&self) -> &[ParamInfo] {
        &self.info
    }

    /// Number of scalar parameters.
    pub fn num_params(&self) -> usize {
        self.params.iter().map(|p| p.dims()[0] * p.dims()[1]).sum()
    }

    /// Batch-norm running statistics, one entry per batch-norm layer.
    pub fn running_stats(&self) -> &[RunningStats] {
        &self.running
    }

    /// The parameters, to be replaced in place by tensors of the same shapes (the training
    /// loop's optimizer step, [`crate::optim::Optimizer::step_in_place`]).
    pub(crate) fn params_mut(&mut self) -> &mut [Tensor<2>] {
        &mut self.params
    }

    /// Replaces the parameters with tensors of the same count and shapes.
    pub fn set_params(&mut self, params: Vec<Tensor<2>>) -> Result<(), ModelError> {
        let expected: Vec<[usize; 2]> = self.params.iter().map(|p| p.dims()).collect();
        let found: Vec<[usize; 2]> = params.iter().map(|p| p.dims()).collect();
        if expected != found {
            return Err(invalid(&format!(
                "parameter shapes {found:?} do not match {expected:?}"
            )));
        }
        self.params = params;
        Ok(())
    }

    /// A copy whose parameters are in `precision` (the same network in lower precision,
    /// for EP's settling; see [`crate::device::Precision`]).
    pub fn cast(&self, precision: crate::device::Precision) -> Network {
        let mut low = self.clone();
        low.params = self
            .params
            .iter()
            .map(|p| precision.cast(p.clone()))
            .collect();
        low
    }

    /// Replaces the running statistics (from a checkpoint); sizes were checked by the
    /// caller.
    pub fn set_running_stats(&mut self, running: Vec<RunningStats>) {
        debug_assert_eq!(running.len(), self.running.len());
        self.running = running;
    }

    /// Folds one training batch's moments into the running statistics (once per batch).
    pub fn update_running_stats(&mut self, moments: &BatchMoments, batch: usize) {
        for (layer, stats) in self
            .layers
            .iter()
            .filter_map(|l| match l.op {
                LayerOp::BatchNorm { momentum, slot, .. } => Some((momentum, slot)),
                _ => None,
            })
            .zip(moments)
        {
            let (momentum, slot) = layer;
            let (mean, var) = stats;
            let unbias = if batch > 1 {
                batch as f32 / (batch as f32 - 1.0)
            } else {
                1.0
            };
            let r = &mut self.running[slot];
            for (rm, m) in r.mean.iter_mut().zip(mean) {
                *rm = (1.0 - momentum) * *rm + momentum * m;
            }
            for (rv, v) in r.var.iter_mut().zip(var) {
                *rv = (1.0 - momentum) * *rv + momentum * v * unbias;
            }
        }
    }

    /// Statistics of batch-norm layer `layer` for inference: its running mean and variance
    /// as fixed statistics.
    pub(crate) fn running_norm(&self, layer: &Layer, device: &Device) -> NormStats {
        let LayerOp::BatchNorm { eps, slot, .. } = layer.op else {
            return NormStats::Batch;
        };
        let r = &self.running[slot];
        let c = r.mean.len();
        let inv: Vec<f32> = r.var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
        NormStats::Fixed {
            mean: Tensor::from_data(TensorData::new(r.mean.clone(), [1, c, 1]), device),
            inv_std: Tensor::from_data(TensorData::new(inv, [1, c, 1]), device),
        }
    }

    /// Inference: batch norm with running statistics, dropout off.
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let device = x.device();
        let stats: Vec<NormStats> = self
            .layers
            .iter()
            .map(|l| self.running_norm(l, &device))
            .collect();
        self.run(&self.params, x, |i, _| stats[i].clone(), &mut |_, x| x)
    }

    /// The training forward pass with explicit parameters (e.g. autodiff-tracked copies):
    /// batch norm with batch statistics, dropout drawn from `dropout_seed` when given (off
    /// otherwise). Returns the output and each batch-norm layer's batch moments.
    pub fn forward_train(
        &self,
        params: &[Tensor<2>],
        x: Tensor<2>,
        dropout_seed: Option<u64>,
    ) -> (Tensor<2>, BatchMoments) {
        let mut moments = BatchMoments::new();
        let mut rng = dropout_seed.map(Xoshiro256PlusPlus::seed_from_u64);
        let out = self.run(
            params,
            x,
            |i, x: &Tensor<2>| {
                if let LayerOp::BatchNorm { .. } = self.layers[i].op {
                    let (mean, var) = self.layers[i].batch_moments(x);
                    moments.push((to_host(&mean), to_host(&var)));
                }
                NormStats::Batch
            },
            &mut |i, x: Tensor<2>| match (self.layers[i].op.clone(), rng.as_mut()) {
                (LayerOp::Dropout { p }, Some(rng)) if p > 0.0 => {
                    let [b, n] = x.dims();
                    let keep = 1.0 / (1.0 - p);
                    let mask: Vec<f32> = (0..b * n)
                        .map(|_| if rng.random::<f32>() < p { 0.0 } else { keep })
                        .collect();
                    let mask = Tensor::<2>::from_data(TensorData::new(mask, [b, n]), &x.device());
                    x * mask
                }
                _ => x,
            },
        );
        (out, moments)
    }

    fn run(
        &self,
        params: &[Tensor<2>],
        x: Tensor<2>,
        mut stats: impl FnMut(usize, &Tensor<2>) -> NormStats,
        dropout: &mut dyn FnMut(usize, Tensor<2>) -> Tensor<2>,
    ) -> Tensor<2> {
        let mut h = x;
        let mut saved: Option<Tensor<2>> = None;
        for (i, layer) in self.layers.iter().enumerate() {
            if self.skips.iter().any(|s| s.start == i) {
                saved = Some(h.clone());
            }
            let st = stats(i, &h);
            h = layer.apply(layer.params(params), h, &st);
            h = dropout(i, h);
            if self.skips.iter().any(|s| s.end == i) {
                h = h + saved.take().expect("a skip ends after it starts");
            }
        }
        h
    }
}
