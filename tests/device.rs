//! The fidelity checks on the device named by `MEP_TEST_DEVICE` (`cuda`, `cuda:N`, or a CPU
//! device): EP against backprop on real MNIST, and Newton–Schulz against exact arithmetic
//! through the SVD. Without the variable each test prints why it skips; the same checks run
//! on the CPU in `fidelity.rs` and `optim.rs`. On a GPU build:
//! `MEP_TEST_DEVICE=cuda cargo test --release --features cuda --test device`.

mod common;

use burn::tensor::TensorData;
use common::{exact_quintic, gaussianish};
use mep::data::{DataLocator, LoadOptions, load};
use mep::device::{Device, DeviceChoice, Tensor, Workload, into_host};
use mep::ep::SettleConfig;
use mep::estimate::{
    BackpropEstimator, EpConfig, EpEstimator, GradientEstimator, Nudging, TensorBatch, compare,
};
use mep::loss::Loss;
use mep::model::{ModelSpec, Shape};
use mep::optim::NsIteration;
use mep::optim::linalg::newton_schulz;

/// The device of `MEP_TEST_DEVICE`, or `None` (with the reason printed) when it is unset. A
/// device that is named but cannot be used fails the test: it was asked for.
fn test_device() -> Option<Device> {
    let Ok(name) = std::env::var("MEP_TEST_DEVICE") else {
        eprintln!(
            "skipped: MEP_TEST_DEVICE is not set (MEP_TEST_DEVICE=cuda runs this on the GPU)"
        );
        return None;
    };
    let choice: DeviceChoice = name
        .parse()
        .unwrap_or_else(|e| panic!("MEP_TEST_DEVICE={name}: {e}"));
    let device = choice
        .resolve(Workload::Settle)
        .unwrap_or_else(|e| panic!("MEP_TEST_DEVICE={name}: {e}"));
    eprintln!("running on {choice}");
    Some(device)
}

/// Centered EP at beta 1e-3 settled to convergence on 64 MNIST images, against backprop on
/// the same device: cosine >= 0.999 and norm ratio within 2% for every tensor (the CPU
/// test's bars).
#[test]
fn ep_matches_backprop_on_the_test_device() {
    let Some(dev) = test_device() else { return };
    let locator = DataLocator::new(Some(common::data_dir()), None, None);
    let options = LoadOptions {
        train_samples: Some(64),
        test_samples: Some(1),
        ..Default::default()
    };
    let data = load("mnist", &locator, &options, 0).unwrap();
    let batch = TensorBatch::new(data.train.inputs(), data.train.labels(), 10, &dev);
    let net = "784-256-128-10"
        .parse::<ModelSpec>()
        .unwrap()
        .builder(Shape::Image { c: 1, h: 28, w: 28 })
        .unwrap()
        .build(7, &dev)
        .unwrap();
    let loss = Loss::default();
    let reference = BackpropEstimator::new(loss)
        .unwrap()
        .estimate(&net, &batch)
        .unwrap();
    let settle = SettleConfig {
        lr: 0.3,
        steps: 800,
        tol: 1e-4,
        check_every: 10,
        ..SettleConfig::default()
    };
    let config = EpConfig {
        beta: 1e-3,
        nudging: Nudging::Centered,
        loss,
        settle,
        seed: 1,
        ..EpConfig::default()
    };
    let estimate = EpEstimator::new(&net, config)
        .unwrap()
        .estimate(&net, &batch)
        .unwrap();
    for r in compare(&net, &estimate.grads, &reference.grads) {
        eprintln!(
            "{:>12}: cosine {:.6} ratio {:.5}",
            r.name, r.cosine, r.norm_ratio
        );
        assert!(r.cosine >= 0.999, "{}: cosine {}", r.name, r.cosine);
        assert!(
            (r.norm_ratio - 1.0).abs() <= 0.02,
            "{}: {}",
            r.name,
            r.norm_ratio
        );
    }
}

/// Five quintic Newton–Schulz steps on the device (the Gram-space form for the wide
/// 256 x 784 matrix, the textbook one for 64 x 32) against the same map in f64 through
/// the SVD: relative error below 1e-5 (the CPU measures 1e-6 to 3e-6).
#[test]
fn newton_schulz_matches_exact_arithmetic_on_the_test_device() {
    let Some(dev) = test_device() else { return };
    for (m, n) in [(256, 784), (64, 32)] {
        let g = gaussianish(m, n, 7);
        let values: Vec<f32> = g.iter().map(|&x| x as f32).collect();
        let x = Tensor::<2>::from_data(TensorData::new(values, [m, n]), &dev);
        let got = into_host(newton_schulz(x, 5, NsIteration::Quintic));
        let exact = exact_quintic(&g, m, n, 5);
        let (diff, norm) = got.iter().zip(&exact).fold((0.0, 0.0), |(d, s), (&a, &b)| {
            (d + (f64::from(a) - b).powi(2), s + b * b)
        });
        let rel = (diff / norm).sqrt();
        eprintln!("{m}x{n}: relative error {rel:.2e}");
        assert!(rel < 1e-5, "{m}x{n}: relative error {rel}");
    }
}
