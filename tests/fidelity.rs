//! EP against backprop on real MNIST: the gradients must agree.

mod common;

use mep::data::{DataLocator, LoadOptions, load};
use mep::device::{CpuBackend, Tensor, cpu_device};
use mep::ep::SettleConfig;
use mep::estimate::{
    BackpropEstimator, EpConfig, EpEstimator, GradientComparison, GradientEstimator, Nudging,
    TensorBatch, compare,
};
use mep::loss::Loss;
use mep::model::{ModelSpec, Network, Shape};

fn mnist_batch(n: usize, dev: &mep::device::Device) -> TensorBatch {
    let locator = DataLocator::new(Some(common::data_dir()), None, None);
    let data = load(
        "mnist",
        &locator,
        &LoadOptions {
            train_samples: Some(n),
            test_samples: Some(1),
            ..Default::default()
        },
        0,
    )
    .unwrap();
    TensorBatch::new(data.train.inputs(), data.train.labels(), 10, dev)
}

fn net(spec: &str, dev: &mep::device::Device) -> Network {
    spec.parse::<ModelSpec>()
        .unwrap()
        .builder(Shape::Image { c: 1, h: 28, w: 28 })
        .unwrap()
        .build(7, dev)
        .unwrap()
}

fn converged(lr: f32) -> SettleConfig {
    SettleConfig {
        lr,
        steps: 800,
        tol: 1e-4,
        check_every: 10,
        ..SettleConfig::default()
    }
}

fn ep_vs_backprop(
    net: &Network,
    batch: &TensorBatch,
    nudging: Nudging,
    beta: f32,
    settle: SettleConfig,
) -> Vec<GradientComparison> {
    let loss = Loss::default();
    let mut bp = BackpropEstimator::new(loss).unwrap();
    let reference = bp.estimate(net, batch).unwrap();
    let mut ep = EpEstimator::new(
        net,
        EpConfig {
            beta,
            nudging,
            loss,
            settle,
            seed: 1,
        },
    )
    .unwrap();
    let estimate = ep.estimate(net, batch).unwrap();
    for s in &estimate.settle {
        eprintln!("settle: {s:?}");
    }
    compare(net, &estimate.grads, &reference.grads)
}

fn report(label: &str, rows: &[GradientComparison]) {
    for r in rows {
        eprintln!(
            "{label} {:>14}: cosine {:.6} norm ratio {:.5}",
            r.name, r.cosine, r.norm_ratio
        );
    }
}

/// Centered EP at beta 1e-3, settled to convergence at step `lr`, against backprop on 64
/// real MNIST images: cosine >= 0.999 and norm ratio within 2% for every tensor.
fn assert_centered_ep_matches_backprop(spec: &str, lr: f32) {
    let dev = cpu_device(CpuBackend::Flex);
    let batch = mnist_batch(64, &dev);
    let net = net(spec, &dev);
    let rows = ep_vs_backprop(&net, &batch, Nudging::Centered, 1e-3, converged(lr));
    report(spec, &rows);
    for r in &rows {
        assert!(r.cosine >= 0.999, "{spec} {}: cosine {}", r.name, r.cosine);
        assert!(
            (r.norm_ratio - 1.0).abs() <= 0.02,
            "{spec} {}: ratio {}",
            r.name,
            r.norm_ratio
        );
    }
}

#[test]
fn centered_ep_matches_backprop_on_an_mlp_at_batch_64() {
    assert_centered_ep_matches_backprop("784-256-128-10", 0.3);
}

#[test]
fn centered_ep_matches_backprop_on_a_cnn_at_batch_64() {
    assert_centered_ep_matches_backprop("cnn-small", 0.2);
}

#[test]
fn one_sided_nudging_shows_its_first_order_bias() {
    let dev = cpu_device(CpuBackend::Flex);
    let batch = mnist_batch(64, &dev);
    let net = net("784-256-128-10", &dev);
    let beta = 0.05;
    let one = ep_vs_backprop(&net, &batch, Nudging::OneSided, beta, converged(0.3));
    let centered = ep_vs_backprop(&net, &batch, Nudging::Centered, beta, converged(0.3));
    report("one-sided", &one);
    report("centered", &centered);
    for (o, c) in one.iter().zip(&centered) {
        assert!(
            (c.norm_ratio - 1.0).abs() < (o.norm_ratio - 1.0).abs(),
            "{}: centered ratio {} should beat one-sided {}",
            o.name,
            c.norm_ratio,
            o.norm_ratio
        );
    }
}

#[test]
fn gradients_overwrite_and_never_accumulate() {
    let dev = cpu_device(CpuBackend::Flex);
    let batch = mnist_batch(16, &dev);
    let net = net("784-32-10", &dev);
    let mut ep = EpEstimator::new(&net, EpConfig::default()).unwrap();
    let first = ep.estimate(&net, &batch).unwrap().grads;
    let second = ep.estimate(&net, &batch).unwrap().grads;
    let rows = compare(&net, &second, &first);
    for r in rows {
        assert!(
            (r.norm_ratio - 1.0).abs() < 1e-6,
            "{}: {}",
            r.name,
            r.norm_ratio
        );
        assert!(r.cosine > 1.0 - 1e-6);
    }
    let _: &[Tensor<2>] = &first;
}
