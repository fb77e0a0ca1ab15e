//! Peak memory of one training step: a counting allocator, the process's peak resident set,
//! and the probe that `mep bench memory` runs in a fresh process per measurement.
//!
//! On the CPU backends every tensor is a heap allocation, so the bytes live in the
//! process's heap *are* the bytes of live tensors plus the (small) bookkeeping around them.
//! [`CountingAllocator`] wraps the system allocator and keeps the live total and its peak;
//! the binary installs it as the global allocator. The peak resident set size
//! (`VmHWM` of `/proc/self/status`) is the second figure: it also counts code, stacks,
//! allocator slack and pages freed but not returned, so it bounds the first from above.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::device::Device;
use crate::ep::SettleConfig;
use crate::estimate::{
    BackpropEstimator, CheckpointedBackprop, EpConfig, EpEstimator, GradientEstimator, Nudging,
};
use crate::loss::Loss;
use crate::model::{ModelSpec, Shape};
use crate::optim::{CompositeConfig, CompositeOptimizer};
use crate::train::Trainer;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

/// The system allocator, counting live bytes and their peak. Install it with
/// `#[global_allocator] static A: CountingAllocator = CountingAllocator;`; the cost is two
/// relaxed atomic operations per allocation.
#[derive(Debug, Clone, Copy, Default)]
pub struct CountingAllocator;

fn grow(bytes: usize) {
    let live = LIVE.fetch_add(bytes, Ordering::Relaxed) + bytes;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

fn shrink(bytes: usize) {
    LIVE.fetch_sub(bytes, Ordering::Relaxed);
}

// SAFETY: every call is forwarded to `System` with the same arguments; the counters do not
// touch the memory.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grow(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grow(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged.
        unsafe { System.dealloc(ptr, layout) };
        shrink(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded unchanged.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                grow(new_size - layout.size());
            } else {
                shrink(layout.size() - new_size);
            }
        }
        p
    }
}

/// Bytes currently allocated through [`CountingAllocator`] (0 when it is not installed).
pub fn heap_live_bytes() -> usize {
    LIVE.load(Ordering::Relaxed)
}

/// The most bytes allocated at once through [`CountingAllocator`] since the last
/// [`reset_heap_peak`].
pub fn heap_peak_bytes() -> usize {
    PEAK.load(Ordering::Relaxed)
}

/// Starts a new peak window at the current live total.
pub fn reset_heap_peak() {
    PEAK.store(LIVE.load(Ordering::Relaxed), Ordering::Relaxed);
}

/// Whether [`CountingAllocator`] is the global allocator (it has counted something).
pub fn counting_installed() -> bool {
    // Anything that runs before this has allocated (the runtime's own set-up does).
    let probe = vec![0u8; 64];
    std::hint::black_box(&probe);
    heap_peak_bytes() > 0
}

/// The process's peak resident set size (`VmHWM`), where the platform reports it.
pub fn rss_peak_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The gradient method whose step is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemoryMethod {
    /// EP (one-sided) with lean memory ([`EpEstimator::with_lean_memory`]): free phase,
    /// one nudged phase, contrast.
    Ep,
    /// EP through the fused host settle loop (the default on CPU: faster, with a host copy
    /// of the weights and per-layer buffers).
    EpFused,
    /// burn autodiff through the whole network (every activation kept in its graph).
    Backprop,
    /// Backprop through the layers' VJPs with a checkpoint every `ceil(sqrt(layers))`
    /// layers ([`CheckpointedBackprop`]).
    BackpropCheckpointed,
}

impl MemoryMethod {
    /// Every method, in table order.
    pub const ALL: [Self; 4] = [
        Self::Ep,
        Self::EpFused,
        Self::Backprop,
        Self::BackpropCheckpointed,
    ];

    /// Its name in the table and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ep => "ep",
            Self::EpFused => "ep_fused",
            Self::Backprop => "backprop",
            Self::BackpropCheckpointed => "backprop_checkpointed",
        }
    }
}

impl std::str::FromStr for MemoryMethod {
    type Err = MemoryError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| MemoryError::Invalid(format!("unknown method `{s}`")))
    }
}

/// One measurement: a ReLU MLP `input -> width x (depth - 1) -> classes` (`depth` linear
/// layers), one SGD step on a random batch.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MemoryProbe {
    /// Gradient method.
    pub method: MemoryMethod,
    /// Linear layers.
    pub depth: usize,
    /// Hidden width.
    pub width: usize,
    /// Input features.
    pub input: usize,
    /// Output classes.
    pub classes: usize,
    /// Samples in the batch.
    pub batch: usize,
    /// EP settle steps (always run in full: no early stopping).
    pub settle_steps: usize,
    /// Seed of the weights and the data.
    pub seed: u64,
}

impl MemoryProbe {
    /// The paper script's network (64 -> 128 ... -> 10, batch 32) at `depth`, with EP's 30
    /// settle steps.
    pub fn paper(method: MemoryMethod, depth: usize) -> Self {
        Self {
            method,
            depth,
            width: 128,
            input: 64,
            classes: 10,
            batch: 32,
            settle_steps: 30,
            seed: 42,
        }
    }

    /// Layer sizes of the MLP.
    pub fn sizes(&self) -> Vec<usize> {
        let mut sizes = vec![self.input];
        sizes.extend(std::iter::repeat_n(self.width, self.depth - 1));
        sizes.push(self.classes);
        sizes
    }

    /// Bytes of the parameters (`f32`).
    pub fn param_bytes(&self) -> u64 {
        4 * self
            .sizes()
            .windows(2)
            .map(|w| (w[0] * w[1] + w[1]) as u64)
            .sum::<u64>()
    }

    /// Bytes of one state-shaped value for every linear layer (`batch x sum of widths`).
    pub fn state_bytes(&self) -> u64 {
        4 * (self.batch * self.sizes()[1..].iter().sum::<usize>()) as u64
    }

    /// What EP's step needs at least: parameters, their gradients, and three state-shaped
    /// values per layer (the states, their momentum buffers, the free states), with the
    /// batch's inputs and targets. O(1)-layer temporaries are not counted.
    pub fn ep_theory_bytes(&self) -> u64 {
        2 * self.param_bytes() + 3 * self.state_bytes() + self.data_bytes()
    }

    fn data_bytes(&self) -> u64 {
        4 * (self.batch * (self.input + self.classes)) as u64
    }
}

/// What one probe measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryRow {
    /// Gradient method.
    pub method: MemoryMethod,
    /// Linear layers.
    pub depth: usize,
    /// EP settle steps (`null` for backprop).
    pub settle_steps: Option<usize>,
    /// Checkpoint interval in layers (checkpointed backprop only).
    pub checkpoint_every: Option<usize>,
    /// Peak bytes allocated at once during the step (model, data and everything the step
    /// allocated), from [`CountingAllocator`].
    pub peak_bytes: u64,
    /// Bytes allocated before the step: the model, the optimizer and the batch on the host.
    pub model_bytes: u64,
    /// Bytes of the parameters alone.
    pub param_bytes: u64,
    /// EP's theoretical need ([`MemoryProbe::ep_theory_bytes`]), for EP rows.
    pub theory_bytes: Option<u64>,
    /// The process's peak resident set size, if the platform reports it.
    pub rss_peak_bytes: Option<u64>,
    /// Wall time of the step.
    pub seconds: f64,
}

/// Errors of a memory probe.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The counting allocator is not the global allocator, so heap bytes cannot be read.
    #[error(
        "peak heap bytes need mep::bench::CountingAllocator as the global allocator (the mep binary installs it)"
    )]
    NotCounting,
    /// An option is out of range.
    #[error("invalid memory probe: {0}")]
    Invalid(String),
    /// The model could not be built.
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    /// The estimator could not be built.
    #[error(transparent)]
    Estimate(#[from] crate::estimate::EstimateError),
    /// The optimizer could not be built.
    #[error(transparent)]
    Optim(#[from] crate::optim::OptimError),
    /// The training step failed.
    #[error(transparent)]
    Train(#[from] crate::train::TrainError),
}

/// Runs one probe in this process and reports its peak memory. Run each probe in a fresh
/// process: the resident-set peak covers the whole process's life.
pub fn run_probe(probe: &MemoryProbe, device: &Device) -> Result<MemoryRow, MemoryError> {
    if !counting_installed() {
        return Err(MemoryError::NotCounting);
    }
    if probe.depth < 1 || probe.width < 1 || probe.batch < 1 || probe.classes < 2 {
        return Err(MemoryError::Invalid(
            "depth, width and batch must be at least 1, classes at least 2".into(),
        ));
    }
    let is_ep = matches!(probe.method, MemoryMethod::Ep | MemoryMethod::EpFused);
    if is_ep && probe.settle_steps < 1 {
        return Err(MemoryError::Invalid(
            "EP needs at least one settle step".into(),
        ));
    }
    let net = ModelSpec::from_sizes(&probe.sizes())?.build(
        Shape::Flat(probe.input),
        probe.seed,
        device,
    )?;
    let layers = net.layers().len();
    let loss = Loss::default();
    let (estimator, checkpoint_every): (Box<dyn GradientEstimator>, _) = match probe.method {
        MemoryMethod::Ep | MemoryMethod::EpFused => {
            let config = EpConfig {
                beta: 0.5,
                nudging: Nudging::OneSided,
                loss,
                settle: SettleConfig {
                    // Stable for He-initialised ReLU MLPs (ARCHITECTURE: settle step size).
                    lr: 0.2,
                    steps: probe.settle_steps,
                    tol: 0.0,
                    ..SettleConfig::default()
                },
                seed: probe.seed,
                ..EpConfig::default()
            };
            let lean = probe.method == MemoryMethod::Ep;
            let estimator = EpEstimator::new(&net, config)?.with_lean_memory(lean);
            (Box::new(estimator), None)
        }
        MemoryMethod::Backprop => (Box::new(BackpropEstimator::new(loss)?), None),
        MemoryMethod::BackpropCheckpointed => {
            let est = CheckpointedBackprop::new(loss, None)?;
            let every = est.interval(layers);
            (Box::new(est), Some(every))
        }
    };
    let optimizer = CompositeOptimizer::new(
        CompositeConfig::sgd(0.01, 0.0, false, 0.0),
        net.param_info(),
    )?;
    let mut rng = crate::data::dataset::mix(probe.seed, 0x6d656d);
    let mut uniform = move || {
        rng = crate::data::dataset::mix(rng, 1);
        (rng >> 40) as f32 / (1u64 << 24) as f32
    };
    let x: Vec<f32> = (0..probe.batch * probe.input).map(|_| uniform()).collect();
    let labels: Vec<u32> = (0..probe.batch)
        .map(|_| (uniform() * probe.classes as f32) as u32 % probe.classes as u32)
        .collect();
    let mut trainer = Trainer::new(net, estimator, Box::new(optimizer), device.clone());
    let model_bytes = heap_live_bytes() as u64;
    reset_heap_peak();
    let start = Instant::now();
    trainer.train_step(&x, &labels, None)?;
    let seconds = start.elapsed().as_secs_f64();
    let peak_bytes = heap_peak_bytes() as u64;
    Ok(MemoryRow {
        method: probe.method,
        depth: probe.depth,
        settle_steps: is_ep.then_some(probe.settle_steps),
        checkpoint_every,
        peak_bytes,
        model_bytes,
        param_bytes: probe.param_bytes(),
        theory_bytes: is_ep.then(|| probe.ep_theory_bytes()),
        rss_peak_bytes: rss_peak_bytes(),
        seconds,
    })
}

/// Least-squares slope of `bytes` against `depth`: bytes per added layer.
pub fn bytes_per_layer(points: &[(usize, u64)]) -> Option<f64> {
    let n = points.len() as f64;
    if points.len() < 2 {
        return None;
    }
    let mx = points.iter().map(|p| p.0 as f64).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1 as f64).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 as f64 - mx).powi(2)).sum();
    let sxy: f64 = points
        .iter()
        .map(|p| (p.0 as f64 - mx) * (p.1 as f64 - my))
        .sum();
    (sxx > 0.0).then(|| sxy / sxx)
}
