//! Benchmarks that measure the library itself (the CLI's `mep bench` prints them), and the
//! charts and summary statistics of the experiment suites.

mod cost;
pub mod memory;
mod muon;
pub mod plot;
mod settle;

pub use cost::CostModel;
pub use memory::CountingAllocator;
pub use muon::{MuonTiming, muon_update_timings, optimizer_step_ms};
pub use settle::{SettleBench, matmul_gflops, settle_bench};

use std::time::Instant;

/// Median wall time in microseconds of `repeats` calls of `f`, after a short warm-up.
pub fn median_us(repeats: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..repeats.div_ceil(5).max(1) {
        f();
    }
    let mut samples: Vec<f64> = (0..repeats.max(1))
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// Mean and sample standard deviation (0 for fewer than two values).
pub fn mean_std(values: &[f64]) -> (f64, f64) {
    let n = values.len();
    if n == 0 {
        return (f64::NAN, 0.0);
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    let var = if n > 1 {
        values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64
    } else {
        0.0
    };
    (mean, var.sqrt())
}
