//! Which CPU backend is faster for which workload.
//!
//! Times, on each compiled CPU backend, (a) one backprop training step of the paper's MLP
//! (784-256-128-10, batch 64: forward, cross-entropy, autodiff backward, SGD update) and (b)
//! one EP settle step of the layered prediction-error energy on the same net (predictions of
//! the upper layers, prediction errors, state gradients through the transposed weights,
//! heavy-ball state update; the first layer's projection is cached as the EP engine does).
//! Thread count: `RAYON_NUM_THREADS` (default: one per core). Run with
//! `RAYON_NUM_THREADS=1 cargo bench --bench backends` and again with 2.

use std::time::Instant;

use burn::tensor::TensorData;
use burn::tensor::activation::relu;
use mep::device::{CpuBackend, Device, Tensor, cpu_device, threads};
use mep::model::Mlp;
use mep::optim::{Optimizer, Sgd};
use mep::train::BackpropTrainer;

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

fn backprop_step_us(backend: CpuBackend) -> f64 {
    let dev = cpu_device(backend);
    let model = Mlp::new("784-256-128-10".parse().unwrap(), 1, &dev);
    let sgd: Box<dyn Optimizer> = Box::new(Sgd::new(0.01, 0.9, false, 0.0).unwrap());
    let mut trainer = BackpropTrainer::new(model, sgd, dev.clone());
    let (x, labels, _) = inputs(&dev);
    time_us(200, || {
        trainer.train_step(&x, &labels).unwrap();
    })
}

fn settle_step_us(backend: CpuBackend) -> f64 {
    let dev = cpu_device(backend);
    let model = Mlp::new("784-256-128-10".parse().unwrap(), 1, &dev);
    let p = model.params();
    let (_, _, x) = inputs(&dev);
    let y = Tensor::<2>::zeros([BATCH, 10], &dev);
    // Free states = forward pass; the first layer's drive is fixed during settling.
    let drive1 = x.matmul(p[0].clone()) + p[1].clone();
    let mut s1 = drive1.clone();
    let mut s2 = relu(s1.clone()).matmul(p[2].clone()) + p[3].clone();
    let mut s3 = relu(s2.clone()).matmul(p[4].clone()) + p[5].clone();
    let (w2t, w3t) = (p[2].clone().transpose(), p[4].clone().transpose());
    let mut m = [
        Tensor::<2>::zeros([BATCH, 256], &dev),
        Tensor::<2>::zeros([BATCH, 128], &dev),
        Tensor::<2>::zeros([BATCH, 10], &dev),
    ];
    let (beta, lr, mu) = (0.5f32, 0.15f32, 0.5f32);
    time_us(300, || {
        let e1 = s1.clone() - drive1.clone();
        let e2 = s2.clone() - (relu(s1.clone()).matmul(p[2].clone()) + p[3].clone());
        let e3 = s3.clone() - (relu(s2.clone()).matmul(p[4].clone()) + p[5].clone());
        let g1 = e1 - e2.clone().matmul(w2t.clone()) * s1.clone().greater_elem(0.0).float();
        let g2 = e2 - e3.clone().matmul(w3t.clone()) * s2.clone().greater_elem(0.0).float();
        let g3 = e3 + (s3.clone() - y.clone()).mul_scalar(beta);
        m[0] = m[0].clone().mul_scalar(mu) + g1;
        m[1] = m[1].clone().mul_scalar(mu) + g2;
        m[2] = m[2].clone().mul_scalar(mu) + g3;
        s1 = s1.clone() - m[0].clone().mul_scalar(lr);
        s2 = s2.clone() - m[1].clone().mul_scalar(lr);
        s3 = s3.clone() - m[2].clone().mul_scalar(lr);
        // Force the lazy work to finish, as a convergence check would.
        let _ = s3.clone().slice([0..1, 0..1]).into_data();
    })
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
