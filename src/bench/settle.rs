//! Speed of one settle step and one EP gradient, against matrix-product throughput.

use burn::tensor::{Distribution, Tensor as BurnTensor};

use super::median_us;
use crate::device::{Backend, Device, Tensor};
use crate::ep::{EnergyModel, SettleConfig, Settler};
use crate::estimate::{
    BackpropEstimator, EpConfig, EpEstimator, EstimateError, GradientEstimator, Nudging,
    TensorBatch,
};
use crate::loss::Loss;
use crate::model::{Gemm, Network, kernels};
use rayon::prelude::*;

/// Timings of the settle loop for one model and batch size.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SettleBench {
    /// Model spec.
    pub model: String,
    /// Samples per batch.
    pub batch: usize,
    /// Worker threads.
    pub threads: usize,
    /// Vector width of the host's element-wise loops ([`crate::simd::level`]; empty in
    /// results written before it was recorded).
    #[serde(default)]
    pub simd: String,
    /// Settle steps per phase.
    pub steps: usize,
    /// Median microseconds per settle step.
    pub settle_step_us: f64,
    /// Matrix-product MFLOPs of one settle step (cost model).
    pub settle_step_mflop: f64,
    /// Achieved GFLOP/s of the settle loop.
    pub settle_gflops: f64,
    /// GFLOP/s of plain matrix products of the same shapes on this machine.
    pub matmul_gflops: f64,
    /// Median milliseconds of one EP gradient (forward, one nudged phase of `steps` steps,
    /// contrast).
    pub ep_gradient_ms: f64,
    /// Achieved GFLOP/s of the whole EP gradient.
    pub ep_gradient_gflops: f64,
    /// Median milliseconds of one backprop gradient (cross-entropy) of the same batch.
    #[serde(default)]
    pub backprop_ms: f64,
    /// Its achieved GFLOP/s (forward, input and parameter VJPs: 3x the forward's).
    #[serde(default)]
    pub backprop_gflops: f64,
    /// The settle loop that ran: `dense`, `conv` (the fused host loops) or `generic`.
    #[serde(default)]
    pub settle_loop: String,
}

fn force(t: &Tensor<2>) {
    let _ = t.clone().slice([0..1, 0..1]).into_data();
}

/// GFLOP/s of `gemms` run back to back as plain matrix products (random operands): on a
/// CPU device with the host `gemm` kernel the settle loop itself uses (on the worker
/// threads it would use), elsewhere with burn's matmul.
pub fn matmul_gflops(gemms: &[Gemm], device: &Device, repeats: usize) -> f64 {
    if crate::device::is_host(device) {
        return host_gemm_gflops(gemms, repeats);
    }
    let operands: Vec<(Tensor<2>, Tensor<2>)> = gemms
        .iter()
        .map(|g| {
            let a: BurnTensor<Backend, 2> =
                Tensor::random([g.m, g.k], Distribution::Uniform(-1.0, 1.0), device);
            let b: BurnTensor<Backend, 2> =
                Tensor::random([g.k, g.n], Distribution::Uniform(-1.0, 1.0), device);
            (a, b)
        })
        .collect();
    let flops: f64 = gemms.iter().map(Gemm::flops).sum();
    let us = median_us(repeats, || {
        for (a, b) in &operands {
            force(&a.clone().matmul(b.clone()));
        }
    });
    flops / us / 1e3
}

/// GFLOP/s of `gemms` run back to back with the host `gemm` product (deterministic
/// operands), median of `repeats` rounds. With several worker threads each product's rows
/// are split into one block per thread, computed in parallel: how the dense settle loop
/// uses the threads.
fn host_gemm_gflops(gemms: &[Gemm], repeats: usize) -> f64 {
    let threads = crate::device::threads();
    let operands: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = gemms
        .iter()
        .map(|g| {
            let fill = |n: usize| {
                (0..n)
                    .map(|i| ((i * 7919) % 199) as f32 / 99.0 - 1.0)
                    .collect()
            };
            (fill(g.m * g.k), fill(g.k * g.n), vec![0.0; g.m * g.n])
        })
        .collect();
    let mut operands = operands;
    let flops: f64 = gemms.iter().map(Gemm::flops).sum();
    let us = median_us(repeats, || {
        for (g, (a, b, c)) in gemms.iter().zip(operands.iter_mut()) {
            let block = g.m.div_ceil(threads.max(1)).max(1);
            c.par_chunks_mut(block * g.n)
                .zip(a.par_chunks(block * g.k))
                .for_each(|(c, a)| {
                    let rows = a.len() / g.k;
                    kernels::matmul(
                        c,
                        kernels::MatRef::new(a, rows, g.k),
                        kernels::MatRef::new(b, g.k, g.n),
                        false,
                    );
                });
        }
    });
    flops / us / 1e3
}

/// Times one settle step (a fixed-length settle divided by its steps), one one-sided EP
/// gradient of `net` on `batch` (settle step size `lr`, no early stopping) and one backprop
/// gradient, and the matrix products of the same shapes.
pub fn settle_bench(
    model: &str,
    net: &Network,
    batch: &TensorBatch,
    steps: usize,
    lr: f32,
    repeats: usize,
) -> Result<SettleBench, EstimateError> {
    let n = batch.len();
    let energy = EnergyModel::new(net, Loss::default());
    let settle = SettleConfig {
        lr,
        steps,
        tol: 0.0,
        check_every: steps.max(1),
        ..SettleConfig::default()
    };
    let settler = Settler::new(settle)?;
    let (ctx, free, _) = energy.free_phase(net, batch.x.clone(), batch.targets.clone());
    // The same point evaluated afresh is not flagged as the forward pass, so every timed
    // step runs all of its products (from the forward pass the first steps skip those
    // the nudge has not reached; the EP gradient below does).
    let eval = energy.evaluate(net, &ctx, &free);
    let mut failure = None;
    let total_us = median_us(repeats, || {
        match settler.settle(&energy, net, &ctx, &free, &eval, 0.5) {
            Ok(s) => force(&s.states[0]),
            Err(e) => failure = Some(e),
        }
    });
    if let Some(e) = failure {
        return Err(e.into());
    }
    let step_us = total_us / steps.max(1) as f64;
    let step_flops = energy.settle_step_flops(net, n);

    let mut ep = EpEstimator::new(
        net,
        EpConfig {
            nudging: Nudging::OneSided,
            settle,
            ..EpConfig::default()
        },
    )?;
    let mut failure = None;
    let grad_us = median_us(repeats, || match ep.estimate(net, batch) {
        Ok(e) => force(&e.grads[0]),
        Err(e) => failure = Some(e),
    });
    if let Some(e) = failure {
        return Err(e);
    }
    let grad_flops = energy.gradient_flops(net, n, steps, 1);

    let mut bp = BackpropEstimator::new(Loss::CrossEntropy { smoothing: 0.0 })?;
    let mut failure = None;
    let bp_us = median_us(repeats, || match bp.estimate(net, batch) {
        Ok(e) => force(&e.grads[0]),
        Err(e) => failure = Some(e),
    });
    if let Some(e) = failure {
        return Err(e);
    }
    let bp_flops = 3.0 * net.layers().iter().map(|l| l.forward_flops(n)).sum::<f64>();

    // The settle step's products: each state layer after the first, forward and transposed.
    let mut shapes = Vec::new();
    let states: Vec<_> = net.layers().iter().filter(|l| l.is_state()).collect();
    for layer in states.iter().skip(1) {
        for g in layer.gemms(n) {
            shapes.push(g);
            shapes.push(Gemm {
                m: g.m,
                k: g.n,
                n: g.k,
            });
        }
    }
    let device = batch.x.device();
    let matmul = if shapes.is_empty() {
        0.0
    } else {
        matmul_gflops(&shapes, &device, repeats * 5)
    };
    Ok(SettleBench {
        model: model.to_string(),
        batch: n,
        threads: crate::device::threads(),
        simd: crate::simd::level().name().into(),
        steps,
        settle_step_us: step_us,
        settle_step_mflop: step_flops / 1e6,
        settle_gflops: step_flops / step_us / 1e3,
        matmul_gflops: matmul,
        ep_gradient_ms: grad_us / 1e3,
        ep_gradient_gflops: grad_flops / grad_us / 1e3,
        backprop_ms: bp_us / 1e3,
        backprop_gflops: bp_flops / bp_us / 1e3,
        settle_loop: energy.fused_loop(net).unwrap_or("generic").to_string(),
    })
}
