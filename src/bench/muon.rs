//! Time of one Muon update: Newton–Schulz (5 steps) on each weight matrix.

use burn::tensor::Distribution;

use super::median_us;
use crate::device::{Device, Tensor};
use crate::model::{Network, ParamKind};
use crate::optim::linalg::{newton_schulz, newton_schulz_host_flops};
use crate::optim::{CompositeConfig, CompositeOptimizer, NsIteration, OptimError, Optimizer};

/// One weight matrix's Newton–Schulz timing.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct MuonTiming {
    /// Parameter name.
    pub param: String,
    /// Rows of the stored matrix.
    pub rows: usize,
    /// Columns of the stored matrix.
    pub cols: usize,
    /// Median milliseconds of 5 steps of Muon's iteration on a Gaussian matrix of this shape.
    pub ms: f64,
    /// FLOPs of the host iteration, in GFLOP.
    pub gflop: f64,
}

/// Median time of the orthogonalisation of every weight matrix of `net` (the Muon update's
/// cost) with `iteration`, on `device`, over `repeats` rounds each.
pub fn muon_update_timings(
    net: &Network,
    device: &Device,
    repeats: usize,
    iteration: NsIteration,
) -> Vec<MuonTiming> {
    net.param_info()
        .iter()
        .zip(net.params())
        .filter(|(info, _)| matches!(info.kind, ParamKind::Matrix { .. }))
        .map(|(info, p)| {
            let [rows, cols] = p.dims();
            let g: Tensor<2> = Tensor::random([rows, cols], Distribution::Normal(0.0, 1.0), device);
            let us = median_us(repeats, || {
                let out = newton_schulz(g.clone(), 5, iteration);
                let _ = out.slice([0..1, 0..1]).into_data();
            });
            MuonTiming {
                param: info.name.clone(),
                rows,
                cols,
                ms: us / 1e3,
                gflop: newton_schulz_host_flops(rows, cols, 5, iteration) / 1e9,
            }
        })
        .collect()
}

/// Median milliseconds of one whole step of the composite optimizer `config` on every
/// parameter of `net` (for Muon: momentum, Newton–Schulz, descent and spectral bound, the
/// matrices in parallel when the pool has several workers), with Gaussian gradients, over
/// `repeats` steps.
pub fn optimizer_step_ms(
    net: &Network,
    device: &Device,
    repeats: usize,
    config: CompositeConfig,
) -> Result<f64, OptimError> {
    let mut opt = CompositeOptimizer::new(config, net.param_info())?;
    let mut params = opt.prepare(net.params().to_vec());
    let grads: Vec<Tensor<2>> = params
        .iter()
        .map(|p| Tensor::random(p.dims(), Distribution::Normal(0.0, 1e-2), device))
        .collect();
    let mut failure = None;
    let us = median_us(repeats, || {
        match opt.step(params.clone(), grads.clone()) {
            Ok(next) => params = next,
            Err(e) => failure = Some(e),
        }
        let _ = params[0].clone().slice([0..1, 0..1]).into_data();
    });
    match failure {
        Some(e) => Err(e),
        None => Ok(us / 1e3),
    }
}
