//! The host's element-wise loops are compiled for each vector width (`mep::simd`) and the
//! widest the CPU has runs: every width must give the same bits, for the settle loops and
//! for the optimizer's fused steps.

mod common;

use mep::device::{Tensor, to_host};
use mep::ep::SettleConfig;
use mep::estimate::{EpConfig, EpEstimator, GradientEstimator, Nudging};
use mep::loss::Loss;
use mep::model::Shape;
use mep::optim::{CompositeConfig, CompositeOptimizer, Optimizer};
use mep::simd::{Level, set_level, supported};

fn bits(t: &Tensor<2>) -> Vec<u32> {
    to_host(t).into_iter().map(f32::to_bits).collect()
}

/// Gradients, settle statistics and two optimizer steps' parameters of a few EP estimates
/// at `level`.
fn outcome(level: Level) -> Vec<Vec<u32>> {
    assert_eq!(set_level(level), level);
    let dev = common::dev();
    let batch = common::mnist_batch(40, &dev);
    let cases = [
        // ReLU settles from rest in the perturbation form (activation changes, state
        // sums); per-sample stopping sums squared norms.
        ("784-48-32-10", Loss::default(), true, Nudging::OneSided),
        // Residual links, smooth activations, a CE nudge, centered nudging.
        (
            "784-32-res[32]-res[tanh-32]-10",
            Loss::CrossEntropy { smoothing: 0.1 },
            false,
            Nudging::Centered,
        ),
        // Hard sigmoid.
        ("784-24-hsig-10", Loss::default(), false, Nudging::OneSided),
    ];
    let mut out = Vec::new();
    for (spec, loss, per_sample, nudging) in cases {
        let net = common::network(spec, Shape::Flat(784), 5, &dev);
        let settle = SettleConfig {
            steps: 24,
            check_every: 2,
            tol: if per_sample { 0.05 } else { 0.0 },
            per_sample,
            momentum: 0.5,
            ..SettleConfig::default()
        };
        let config = EpConfig {
            loss,
            nudging,
            settle,
            ..EpConfig::default()
        };
        let mut ep = EpEstimator::new(&net, config).unwrap();
        let e = ep.estimate(&net, &batch).unwrap();
        out.extend(e.grads.iter().map(bits));
        out.push(
            e.settle
                .iter()
                .flat_map(|s| [s.sample_steps.to_bits(), s.residual.to_bits()])
                .collect(),
        );
        // Adam, then momentum SGD with clipping and weight decay.
        let configs = [
            CompositeConfig::adam(1e-3, 0.01),
            CompositeConfig {
                clip_norm: Some(1e-3),
                ..CompositeConfig::sgd(0.05, 0.9, true, 0.01)
            },
        ];
        for config in configs {
            let mut opt = CompositeOptimizer::new(config, net.param_info()).unwrap();
            let mut params = net.params().to_vec();
            for _ in 0..2 {
                params = opt.step(params, e.grads.clone()).unwrap();
            }
            out.extend(params.iter().map(bits));
        }
    }
    out
}

#[test]
fn every_vector_width_gives_the_same_bits() {
    let widest = supported();
    let reference = outcome(Level::Baseline);
    for level in Level::ALL
        .into_iter()
        .filter(|&l| l > Level::Baseline && l <= widest)
    {
        let other = outcome(level);
        assert_eq!(other.len(), reference.len());
        for (k, (a, b)) in reference.iter().zip(&other).enumerate() {
            assert!(a == b, "{level} differs from the baseline in output {k}");
        }
    }
    set_level(widest);
}
