//! `mep bench`: benchmark suites.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use mep::bench::{
    SettleBench, matmul_gflops, muon_update_timings, optimizer_step_ms, settle_bench,
};
use mep::device::Workload;
use mep::estimate::TensorBatch;
use mep::experiment::Preset;
use mep::model::{Gemm, ModelSpec, Shape};
use mep::optim::{NsIteration, UpdateRule};

use super::Globals;
use super::suites::{self, SuiteArgs};
use mep::experiment::suites::Suite;
use mep::experiment::write_atomic;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Time one settle step and one EP gradient (784-256-128-10 and cnn-small on MNIST-shaped
    /// inputs) against the machine's matrix-product throughput for the same shapes.
    Settle(SettleArgs),
    /// Paper table 1: MNIST mlp-small, 3 epochs, smep / smep_plus / sgd / adam / eqprop, on
    /// the 5k/1k subset and the full set.
    Table1(SuiteArgs),
    /// Paper table 2: 784-256-128-10, 10 epochs on 10k samples, smep / smep_plus / adam / sgd.
    Table2(SuiteArgs),
    /// Paper table 3: XOR in 100 steps, smep and sgd, five seeds.
    Xor(SuiteArgs),
    /// Seconds per epoch of every preset relative to sgd (784-256-128-10, full MNIST).
    Speed(SuiteArgs),
    /// Beyond the paper: EP (smep_plus) and backprop+Adam, MLP and CNN, MNIST and
    /// Fashion-MNIST.
    Sota(SuiteArgs),
    /// Residual MLPs with 50 and 100 linear layers (width 128): EP and backprop+Adam, one
    /// epoch on 10k MNIST samples; accuracy, time, settle steps and per-layer gradient norms.
    Deep(SuiteArgs),
    /// Convolutional EP (conv_ep) against backprop with the same optimizer, augmentation,
    /// model (vgg5-small), epochs and seed, on MNIST, Fashion-MNIST and CIFAR-10 (the full
    /// set when present, else the shared subset).
    Conv(SuiteArgs),
    /// Continual learning on permuted MNIST (10 tasks, 784-256-128-10, one epoch per task):
    /// EP, EP+error feedback, EP+EWC (momentum SGD at lr 0.05), backprop and backprop+EWC
    /// (the sgd preset), with the same seeds.
    Continual(super::continual::BenchContinualArgs),
    /// Peak memory of one training step against depth (64 -> 128 x (depth - 1) -> 10,
    /// batch 32) for EP, backprop and checkpointed backprop, each in a fresh process.
    Memory(super::memory::MemoryArgs),
    /// GFLOP/s of the host matrix product (`gemm`, the kernel of the settle loops, the host
    /// convolutions and Newton–Schulz) on given shapes, one thread per worker.
    Gemm(GemmArgs),
    /// Milliseconds of one Muon update (Newton–Schulz, 5 steps) of every weight matrix of a
    /// model, per matrix, with its FLOPs and GFLOP/s.
    Muon(MuonArgs),
    /// One memory measurement in this process (what `bench memory` runs per row).
    #[command(hide = true)]
    MemoryProbe(super::memory::ProbeArgs),
}

#[derive(Debug, Args)]
pub struct SettleArgs {
    /// Samples per batch.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Settle steps per phase.
    #[arg(long, default_value_t = 30)]
    steps: usize,
    /// Settle step size (timing does not depend on it; it only has to be stable).
    #[arg(long, default_value_t = 0.2)]
    settle_lr: f32,
    /// Timed repetitions (the median is reported).
    #[arg(long, default_value_t = 10)]
    repeats: usize,
    /// Models to time.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "784-256-128-10,cnn-small,cnn,vgg5-small"
    )]
    models: Vec<ModelSpec>,
    /// Directory for results.json.
    #[arg(long, default_value = "results/settle")]
    out: PathBuf,
    /// Print the results as one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct GemmArgs {
    /// Shapes `MxKxN` (an `M x K` by `K x N` product), comma-separated; default: the settle
    /// products of 784-256-128-10 at batch 64, Newton–Schulz's 256 x 784 Gram products and a
    /// 1024^3 product.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "64x784x256,64x256x128,64x128x256,256x784x256,256x256x256,256x256x784,1024x1024x1024"
    )]
    shapes: Vec<String>,
    /// Timed repetitions (the median is reported).
    #[arg(long, default_value_t = 20)]
    repeats: usize,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct MuonArgs {
    /// Model whose weight matrices are orthogonalised.
    #[arg(long, default_value = "784-256-128-10")]
    model: ModelSpec,
    /// Timed repetitions (the median is reported).
    #[arg(long, default_value_t = 20)]
    repeats: usize,
    /// Newton–Schulz iteration: cubic (the paper's presets) or quintic (`--update muon`).
    #[arg(long, default_value = "cubic")]
    iteration: NsIteration,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

fn muon(args: MuonArgs, globals: &Globals) -> Result<()> {
    let device = globals.device.resolve(Workload::Settle)?;
    let net = args
        .model
        .build(Shape::Image { c: 1, h: 28, w: 28 }, globals.seed, &device)?;
    let rows = muon_update_timings(&net, &device, args.repeats, args.iteration);
    let total_ms: f64 = rows.iter().map(|r| r.ms).sum();
    // smep's optimizer with the chosen iteration: the whole step the trainer takes.
    let mut config = Preset::smep().optimizer;
    config.update = UpdateRule::Muon {
        ns_steps: 5,
        iteration: args.iteration,
    };
    let step_ms = optimizer_step_ms(&net, &device, args.repeats, config)
        .context("timing the optimizer step")?;
    if args.json {
        let json = serde_json::json!({
            "model": args.model.to_string(),
            "iteration": args.iteration.name(),
            "threads": mep::device::threads(),
            "simd": mep::simd::level().name(),
            "update_ms": total_ms,
            "optimizer_step_ms": step_ms,
            "rows": rows,
        });
        outln!("{json}")?;
        return Ok(());
    }
    for r in &rows {
        outln!(
            "{:>16} {:>5} x {:<5} {:8.3} ms {:8.3} GFLOP {:7.1} GFLOP/s",
            r.param,
            r.rows,
            r.cols,
            r.ms,
            r.gflop,
            r.gflop / r.ms * 1e3
        )?;
    }
    outln!("one Muon update of {}: {total_ms:.3} ms", args.model)?;
    outln!(
        "one step of smep's optimizer (momentum, Newton–Schulz, descent, spectral bound) on all its parameters: {step_ms:.3} ms"
    )?;
    Ok(())
}

fn gemm(args: GemmArgs, globals: &Globals) -> Result<()> {
    let device = globals.device.resolve(Workload::Settle)?;
    let mut rows = Vec::new();
    for shape in &args.shapes {
        let dims: Vec<usize> = shape
            .split('x')
            .map(str::parse)
            .collect::<Result<_, _>>()
            .with_context(|| format!("--shapes: `{shape}` is not MxKxN"))?;
        let [m, k, n] = dims[..] else {
            anyhow::bail!("--shapes: `{shape}` is not MxKxN");
        };
        anyhow::ensure!(m * k * n > 0, "--shapes: `{shape}` has a zero dimension");
        let gflops = matmul_gflops(&[Gemm { m, k, n }], &device, args.repeats);
        rows.push(serde_json::json!({ "shape": shape, "gflops": gflops }));
        if !args.json {
            outln!("{shape:>18} {gflops:8.1} GFLOP/s")?;
        }
    }
    if args.json {
        let json = serde_json::json!({
            "device": globals.device.to_string(),
            "threads": mep::device::threads(),
            "rows": rows,
        });
        outln!("{json}")?;
    }
    Ok(())
}

pub fn run(cmd: BenchCommand, globals: &Globals) -> Result<()> {
    match cmd {
        BenchCommand::Gemm(args) => gemm(args, globals),
        BenchCommand::Muon(args) => muon(args, globals),
        BenchCommand::Settle(args) => settle(args, globals),
        BenchCommand::Table1(args) => suites::run(Suite::Table1, args, globals),
        BenchCommand::Table2(args) => suites::run(Suite::Table2, args, globals),
        BenchCommand::Xor(args) => suites::run(Suite::Xor, args, globals),
        BenchCommand::Speed(args) => suites::run(Suite::Speed, args, globals),
        BenchCommand::Sota(args) => suites::run(Suite::Sota, args, globals),
        BenchCommand::Deep(args) => suites::run(Suite::Deep, args, globals),
        BenchCommand::Conv(args) => suites::run(Suite::Conv, args, globals),
        BenchCommand::Continual(args) => super::continual::bench(args, globals),
        BenchCommand::Memory(args) => super::memory::run(args, globals),
        BenchCommand::MemoryProbe(args) => super::memory::probe(args, globals),
    }
}

fn settle(args: SettleArgs, globals: &Globals) -> Result<()> {
    anyhow::ensure!(
        args.batch > 0 && args.steps > 0,
        "--batch and --steps must be positive"
    );
    let device = globals.device.resolve(Workload::Settle)?;
    // MNIST-shaped inputs in [0, 1]: timing does not depend on the pixel values.
    let input = Shape::Image { c: 1, h: 28, w: 28 };
    let x: Vec<f32> = (0..args.batch * input.numel())
        .map(|i| ((i * 7919) % 256) as f32 / 255.0)
        .collect();
    let labels: Vec<u32> = (0..args.batch as u32).map(|i| i % 10).collect();
    let mut rows: Vec<SettleBench> = Vec::new();
    for spec in &args.models {
        let net = spec.build(input, globals.seed, &device)?;
        let classes = net.output_shape().numel();
        let labels: Vec<u32> = labels.iter().map(|l| l % classes as u32).collect();
        let batch = TensorBatch::new(&x, &labels, classes, &device);
        errln!("timing {spec} ...");
        rows.push(settle_bench(
            &spec.to_string(),
            &net,
            &batch,
            args.steps,
            args.settle_lr,
            args.repeats,
        )?);
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let json = serde_json::json!({ "device": globals.device.to_string(), "rows": rows });
    write_atomic(
        &args.out.join("results.json"),
        serde_json::to_string_pretty(&json)?.as_bytes(),
    )?;
    if args.json {
        outln!("{}", serde_json::to_string(&json)?)?;
        return Ok(());
    }
    outln!(
        "{:<12} {:>5} {:>7} {:>8} {:>12} {:>10} {:>10} {:>11} {:>12} {:>10} {:>12} {:>10}",
        "model",
        "batch",
        "threads",
        "loop",
        "settle step",
        "MFLOP",
        "GFLOP/s",
        "matmul GF/s",
        "EP gradient",
        "GFLOP/s",
        "backprop",
        "GFLOP/s"
    )?;
    for r in &rows {
        // Named models by their name: a VGG's spec is too long for a column.
        let model = mep::model::NAMED_MODELS
            .iter()
            .find(|(_, spec)| *spec == r.model)
            .map_or(r.model.as_str(), |(name, _)| name);
        outln!(
            "{:<12} {:>5} {:>7} {:>8} {:>9.1} us {:>10.2} {:>10.2} {:>11.2} {:>9.2} ms {:>10.2} {:>9.2} ms {:>10.2}",
            model,
            r.batch,
            r.threads,
            r.settle_loop,
            r.settle_step_us,
            r.settle_step_mflop,
            r.settle_gflops,
            r.matmul_gflops,
            r.ep_gradient_ms,
            r.ep_gradient_gflops,
            r.backprop_ms,
            r.backprop_gflops
        )?;
    }
    errln!("results in {}", args.out.join("results.json").display());
    Ok(())
}
