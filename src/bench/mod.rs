//! Benchmarks that measure the library itself (the CLI's `mep bench` prints them).

mod settle;

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
