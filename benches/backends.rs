//! Which CPU backend is faster for which workload.
//!
//! Times, on each compiled CPU backend, (a) one backprop training step of the paper's MLP
//! (784-256-128-10, batch 64: forward, cross-entropy, autodiff backward, SGD update) and (b)
//! one EP settle step of the engine's `Settler` on the same net (predictions of the upper
//! layers, prediction errors, state gradients through the transposed weights, heavy-ball
//! state update; the first layer's projection is cached).
//! Thread count: `RAYON_NUM_THREADS` (default: one per core). Run with
//! `RAYON_NUM_THREADS=1 cargo bench --bench backends` and again with 2.

use std::time::Instant;

use burn::tensor::TensorData;
use mep::device::{CpuBackend, Device, Tensor, cpu_device, threads};
use mep::ep::{EnergyModel, SettleConfig, Settler};
use mep::estimate::{BackpropEstimator, TensorBatch};
use mep::loss::Loss;
use mep::model::{ModelSpec, Network};
use mep::optim::{CompositeConfig, CompositeOptimizer, Optimizer};
use mep::train::Trainer;

const BATCH: usize = 64;

fn median_us(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
    samples[samples.len() / 2]
}

fn time_us(iters: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..iters / 5 + 2 {
        f();
    }
    let samples = (0..iters)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    median_us(samples)
}

fn inputs(dev: &Device) -> (Vec<f32>, Vec<u32>, Tensor<2>) {
    let x: Vec<f32> = (0..BATCH * 784)
        .map(|i| ((i * 7919) % 256) as f32 / 255.0)
        .collect();
    let labels: Vec<u32> = (0..BATCH as u32).map(|i| i % 10).collect();
    let t = Tensor::from_data(TensorData::new(x.clone(), [BATCH, 784]), dev);
    (x, labels, t)
}

fn network(dev: &Device) -> Network {
    "784-256-128-10"
        .parse::<ModelSpec>()
        .unwrap()
        .standalone()
        .unwrap()
        .build(1, dev)
        .unwrap()
}

fn backprop_step_us(backend: CpuBackend) -> f64 {
    let dev = cpu_device(backend);
    let net = network(&dev);
    let sgd: Box<dyn Optimizer> = Box::new(
        CompositeOptimizer::new(
            CompositeConfig::sgd(0.01, 0.9, false, 0.0),
            net.param_info(),
        )
        .unwrap(),
    );
    let estimator = BackpropEstimator::new(Loss::CrossEntropy { smoothing: 0.0 }).unwrap();
    let mut trainer = Trainer::new(net, Box::new(estimator), sgd, dev.clone());
    let (x, labels, _) = inputs(&dev);
    time_us(200, || {
        trainer.train_step(&x, &labels, None).unwrap();
    })
}

/// One settle step of the engine: 30 steps without early stopping, divided by 30.
fn settle_step_us(backend: CpuBackend) -> f64 {
    let dev = cpu_device(backend);
    let net = network(&dev);
    let (_, labels, x) = inputs(&dev);
    let batch = TensorBatch::new(&x.to_data().to_vec::<f32>().unwrap(), &labels, 10, &dev);
    let energy = EnergyModel::new(&net, Loss::default());
    let (ctx, free, eval) = energy.free_phase(&net, batch.x.clone(), batch.targets.clone());
    let steps = 30;
    let settler = Settler::new(SettleConfig {
        steps,
        tol: 0.0,
        check_every: steps,
        ..SettleConfig::default()
    })
    .unwrap();
    time_us(20, || {
        let s = settler
            .settle(&energy, &net, &ctx, &free, &eval, 0.5)
            .unwrap();
        let _ = s.states[2].clone().slice([0..1, 0..1]).into_data();
    }) / steps as f64
}

fn main() {
    println!("threads: {}", threads());
    println!(
        "{:<10} {:>16} {:>16}",
        "backend", "backprop step", "settle step"
    );
    for (name, backend) in [("flex", CpuBackend::Flex), ("ndarray", CpuBackend::NdArray)] {
        let bp = backprop_step_us(backend);
        let st = settle_step_us(backend);
        println!("{name:<10} {bp:>13.0} us {st:>13.0} us");
    }
}
