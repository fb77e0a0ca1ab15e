//! Local EP against EP, and classic EqProp against implicit differentiation and on XOR.

mod common;

use mep::data::{self, DataLocator, LoadOptions};
use mep::device::{CpuBackend, Device, Tensor, cpu_device};
use mep::ep::{EqPropConfig, EqPropModel, SettleConfig};
use mep::estimate::{
    EpConfig, EpEstimator, EqPropEstimator, Factored, GradientEstimator, Nudging, TensorBatch,
    compare,
};
use mep::model::{Network, Shape};
use mep::optim::{CompositeConfig, CompositeOptimizer};
use mep::train::{Silent, TrainConfig, Trainer};
use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};

fn random_batch(n: usize, features: usize, classes: usize, seed: u64, dev: &Device) -> TensorBatch {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    let x: Vec<f32> = (0..n * features)
        .map(|_| rng.random_range(0.0..1.0))
        .collect();
    let labels: Vec<u32> = (0..n).map(|i| (i % classes) as u32).collect();
    TensorBatch::new(&x, &labels, classes, dev)
}

fn build(spec: &str, input: Shape, dev: &Device) -> Network {
    common::network(spec, input, 5, dev)
}

fn grads(est: &mut dyn GradientEstimator, net: &Network, batch: &TensorBatch) -> Vec<Tensor<2>> {
    est.estimate(net, batch).unwrap().grads
}

#[test]
fn local_ep_equals_ep_on_layered_networks_and_differs_across_residual_prefixes() {
    let dev = cpu_device(CpuBackend::Flex);
    let config = EpConfig {
        beta: 0.2,
        nudging: Nudging::Centered,
        settle: SettleConfig {
            steps: 40,
            ..SettleConfig::default()
        },
        ..EpConfig::default()
    };
    let cases = [
        ("20-16-ln-12-tanh-5", Shape::Flat(20), true),
        (
            "conv4k3-pool2-conv6k3-fc5",
            Shape::Image { c: 1, h: 10, w: 10 },
            true,
        ),
        // ln sits before a two-layer residual block: EP sends it the second block layer's
        // error through the skip, local EP does not.
        ("20-8-ln-res[tanh-8-tanh-8]-5", Shape::Flat(20), false),
    ];
    for (spec, input, layered) in cases {
        let net = build(spec, input, &dev);
        let batch = random_batch(8, input.numel(), 5, 1, &dev);
        let ep = grads(&mut EpEstimator::new(&net, config).unwrap(), &net, &batch);
        let local = grads(&mut EpEstimator::local(&net, config).unwrap(), &net, &batch);
        let rows = compare(&net, &local, &ep);
        for r in &rows {
            let same = r.cosine > 1.0 - 1e-6 && (r.norm_ratio - 1.0).abs() < 1e-4;
            if layered || !r.name.starts_with("ln") {
                assert!(same, "{spec} {}: {r:?}", r.name);
            } else {
                assert!(!same, "{spec} {}: local EP should differ, {r:?}", r.name);
            }
        }
    }
}

#[test]
fn eqprop_gradient_approaches_the_implicit_gradient_as_beta_shrinks() {
    let dev = cpu_device(CpuBackend::Flex);
    let net = build("12-10-hsig-4", Shape::Flat(12), &dev);
    let batch = random_batch(16, 12, 4, 2, &dev);
    let model = EqPropModel::new(
        &net,
        EqPropConfig {
            free_steps: 2000,
            ..EqPropConfig::default()
        },
    )
    .unwrap();
    let s0 = model.zero_states(16, &batch.x);
    let free = model.relax(&net, &batch.x, &batch.targets, s0, 0.0, 2000);
    // The implicit gradient itself was checked against finite differences of the settled
    // cost (agreement to 4 digits) while writing this test.
    let implicit = model.implicit_gradient(&net, &batch.x, &batch.targets, &free, 2000);
    let mut errors = Vec::new();
    for beta in [0.1f32, 0.01] {
        let nudged = model.relax(&net, &batch.x, &batch.targets, free.clone(), beta, 2000);
        let g = EqPropModel::contrast(&batch.x, &free, &nudged, beta);
        let rows = compare(&net, &g, &implicit);
        for r in &rows {
            eprintln!(
                "beta {beta} {}: cosine {:.5} ratio {:.4}",
                r.name, r.cosine, r.norm_ratio
            );
            // Measured: cosine >= 0.99995 at beta 0.01 (0.79 at beta 0.1, where units leave
            // saturation during the nudged phase).
            assert!(beta > 0.05 || r.cosine > 0.999, "{}: {r:?}", r.name);
        }
        errors.push(
            rows.iter()
                .map(|r| (r.norm_ratio - 1.0).abs())
                .fold(0.0, f64::max),
        );
    }
    assert!(errors[1] < 0.05, "norm error at beta 0.01: {}", errors[1]);
    assert!(errors[1] < errors[0], "{errors:?}");
}

#[test]
fn eqprop_learns_xor() {
    let ds = data::load(
        "xor",
        &DataLocator::new(None, None, None),
        &LoadOptions::default(),
        0,
    )
    .unwrap();
    let dev = cpu_device(CpuBackend::Flex);
    let net = build("2-32-hsig-2", Shape::Flat(2), &dev);
    let estimator = EqPropEstimator::new(
        &net,
        EqPropConfig {
            beta: 1.0,
            free_steps: 40,
            nudged_steps: 20,
            ..EqPropConfig::default()
        },
        4,
        1,
    )
    .unwrap();
    let sgd = CompositeOptimizer::new(CompositeConfig::sgd(0.1, 0.9, false, 0.0), net.param_info());
    let mut trainer = Trainer::new(net, Box::new(estimator), Box::new(sgd.unwrap()), dev);
    let history = trainer
        .fit(
            &ds,
            &TrainConfig {
                epochs: 300,
                batch_size: 4,
                seed: 1,
                augment: Default::default(),
            },
            &mut Silent,
        )
        .unwrap();
    assert_eq!(
        history.last().unwrap().test_accuracy,
        1.0,
        "{:?}",
        history.last()
    );
}

#[test]
fn persistent_eqprop_states_resume_where_each_sample_left_off() {
    let dev = cpu_device(CpuBackend::Flex);
    let net = build("6-8-hsig-3", Shape::Flat(6), &dev);
    let config = EqPropConfig {
        free_steps: 3,
        init: mep::ep::EqPropInit::Persistent,
        ..EqPropConfig::default()
    };
    let mut est = EqPropEstimator::new(&net, config, 10, 0).unwrap();
    let mut batch = random_batch(2, 6, 3, 4, &dev);
    batch.indices = Some(vec![7, 2]);
    let first = est.free_phase(&net, &batch);
    est.estimate(&net, &batch).unwrap();
    // The next visit starts from the states stored by the last one, not from zero.
    let start = est.model().initial_states(&batch.x, Some(&[7, 2]));
    for (s, f) in start.iter().zip(&first) {
        let (a, b): (Vec<f32>, Vec<f32>) =
            (s.to_data().to_vec().unwrap(), f.to_data().to_vec().unwrap());
        assert_eq!(a, b);
        assert!(a.iter().any(|v| *v != 0.0));
    }
    // Samples never seen start from zero.
    let unseen = est.model().initial_states(&batch.x, Some(&[0, 1]));
    for s in unseen {
        let v: Vec<f32> = s.to_data().to_vec().unwrap();
        assert!(v.iter().all(|x| *x == 0.0));
    }
}

#[test]
fn per_sample_factors_reconstruct_the_linear_weight_gradients() {
    use mep::estimate::BackpropEstimator;
    use mep::loss::Loss;
    let dev = cpu_device(CpuBackend::Flex);
    let net = build("12-10-tanh-8-5", Shape::Flat(12), &dev);
    let batch = random_batch(6, 12, 5, 3, &dev);
    let n = batch.len() as f32;
    let check = |est: &mut dyn GradientEstimator, what: &str| {
        let e = est.estimate(&net, &batch).unwrap();
        let mut seen = 0;
        for (k, f) in e.factors.iter().enumerate() {
            let Some(f) = f else { continue };
            seen += 1;
            let rebuilt = f
                .inputs
                .clone()
                .transpose()
                .matmul(f.output_grads.clone())
                .div_scalar(n);
            let rows = compare(&net, &[rebuilt], &e.grads[k..k + 1]);
            assert!(
                rows[0].cosine > 1.0 - 1e-6 && (rows[0].norm_ratio - 1.0).abs() < 1e-5,
                "{what} {k}: {:?}",
                rows[0]
            );
        }
        assert_eq!(seen, 3, "{what}: one factor pair per linear weight");
    };
    check(
        &mut BackpropEstimator::new(Loss::default())
            .unwrap()
            .with_factors(true),
        "backprop",
    );
    let config = EpConfig {
        beta: 0.1,
        ..EpConfig::default()
    };
    check(
        &mut EpEstimator::new(&net, config).unwrap().with_factors(true),
        "ep",
    );
}

#[test]
fn factored_estimates_leave_exactly_the_linear_weights_to_their_factors() {
    let dev = cpu_device(CpuBackend::Flex);
    for spec in ["12-10-tanh-8-5", "12-10-8-5"] {
        let net = build(spec, Shape::Flat(12), &dev);
        let batch = random_batch(6, 12, 5, 4, &dev);
        for nudging in [Nudging::OneSided, Nudging::RandomSign] {
            let config = EpConfig {
                beta: 0.1,
                nudging,
                ..EpConfig::default()
            };
            let mut full = EpEstimator::new(&net, config).unwrap();
            let mut factored = EpEstimator::new(&net, config).unwrap();
            assert!(factored.set_factored(true), "{spec} {nudging:?}");
            // Two calls: random-sign nudging draws its sign per call.
            for call in 0..2 {
                let want = full.estimate(&net, &batch).unwrap();
                let mut got = factored.estimate(&net, &batch).unwrap();
                let what = format!("{spec} {nudging:?} call {call}");
                // Weights (even indices) and their layers' biases are left to the factors.
                let marks: Vec<Option<Factored>> = (0..6)
                    .map(|k| {
                        Some(if k % 2 == 0 {
                            Factored::Weight
                        } else {
                            Factored::BiasOf(k - 1)
                        })
                    })
                    .collect();
                assert_eq!(got.factored, marks, "{what}");
                for (k, g) in got.grads.iter().enumerate() {
                    assert_eq!(g.dims(), [0, 0], "{what}: parameter {k} multiplied out");
                }
                got.complete(batch.len(), |_| true);
                assert!(got.factored.iter().all(Option::is_none), "{what}");
                for (g, w) in got.grads.iter().zip(&want.grads) {
                    assert_eq!(g.dims(), w.dims(), "{what}");
                }
                // The same sums, grouped differently: (x^T e) / (beta n) against
                // x^T (e / beta) / n. Measured: 1.3e-7 to 2.1e-7 relative.
                let diff = max_rel_diff(&got.grads, &want.grads);
                assert!(diff < 1e-5, "{what}: {diff}");
            }
        }
        // Where the phase's factors are not the whole contrast, nothing is factored.
        let centered = EpConfig {
            beta: 0.1,
            nudging: Nudging::Centered,
            ..EpConfig::default()
        };
        let mut est = EpEstimator::new(&net, centered).unwrap();
        assert!(!est.set_factored(true));
        assert!(est.estimate(&net, &batch).unwrap().factored.is_empty());
        let mut local = EpEstimator::local(&net, EpConfig::default()).unwrap();
        assert!(!local.set_factored(true));
        assert!(local.estimate(&net, &batch).unwrap().factored.is_empty());
    }
}

fn max_rel_diff(a: &[Tensor<2>], b: &[Tensor<2>]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            let (x, y) = (mep::device::to_host(x), mep::device::to_host(y));
            let scale = y.iter().map(|v| v.abs()).fold(0.0f32, f32::max).max(1e-12);
            x.iter()
                .zip(&y)
                .map(|(p, q)| (p - q).abs())
                .fold(0.0f32, f32::max)
                / scale
        })
        .fold(0.0, f32::max)
}

#[test]
fn checkpointed_backprop_equals_autodiff_at_every_interval() {
    use mep::estimate::{BackpropEstimator, CheckpointedBackprop};
    use mep::loss::Loss;
    let dev = cpu_device(CpuBackend::Flex);
    let net = build(
        "20-16-tanh-16-12-sigmoid-12-10-lrelu-8-5",
        Shape::Flat(20),
        &dev,
    );
    let batch = random_batch(9, 20, 5, 3, &dev);
    for loss in [Loss::default(), Loss::CrossEntropy { smoothing: 0.1 }] {
        let reference = grads(&mut BackpropEstimator::new(loss).unwrap(), &net, &batch);
        let mut first: Option<Vec<Vec<f32>>> = None;
        // 11 layers: every interval from one layer per segment to a single segment.
        for every in [Some(1), Some(2), Some(3), Some(4), None, Some(11), Some(50)] {
            let mut est = CheckpointedBackprop::new(loss, every).unwrap();
            let estimate = est.estimate(&net, &batch).unwrap();
            let diff = max_rel_diff(&estimate.grads, &reference);
            assert!(diff < 1e-5, "interval {every:?}: {diff}");
            // The recomputation repeats the forward exactly: the same bits at any interval.
            let bits: Vec<Vec<f32>> = estimate.grads.iter().map(mep::device::to_host).collect();
            match &first {
                Some(f) => assert_eq!(f, &bits, "interval {every:?}"),
                None => first = Some(bits),
            }
        }
    }
    assert_eq!(
        CheckpointedBackprop::new(Loss::default(), None)
            .unwrap()
            .interval(11),
        4
    );
}

#[test]
fn checkpointed_backprop_rejects_what_it_cannot_differentiate() {
    use mep::estimate::{CheckpointedBackprop, EstimateError};
    use mep::loss::Loss;
    let dev = cpu_device(CpuBackend::Flex);
    assert!(matches!(
        CheckpointedBackprop::new(Loss::default(), Some(0)),
        Err(EstimateError::InvalidOption(_))
    ));
    let batch = random_batch(4, 20, 5, 3, &dev);
    for spec in ["20-8-res[8]-5", "20-8-bn-8-5"] {
        let net = build(spec, Shape::Flat(20), &dev);
        let mut est = CheckpointedBackprop::new(Loss::default(), None).unwrap();
        let err = est.estimate(&net, &batch).unwrap_err();
        assert!(
            matches!(err, EstimateError::InvalidOption(_)),
            "{spec}: {err}"
        );
    }
}

#[test]
fn lean_memory_ep_equals_the_fused_loop() {
    use mep::loss::Loss;
    let dev = cpu_device(CpuBackend::Flex);
    let batch = random_batch(24, 20, 5, 7, &dev);
    for spec in [
        "20-16-tanh-12-12-5",
        "20-16-res[16]-res[tanh-16]-res[id-16]-5",
    ] {
        let net = build(spec, Shape::Flat(20), &dev);
        for (nudging, loss) in [
            (Nudging::OneSided, Loss::default()),
            (Nudging::Centered, Loss::CrossEntropy { smoothing: 0.0 }),
            (Nudging::RandomSign, Loss::default()),
        ] {
            let config = EpConfig {
                beta: 0.1,
                nudging,
                loss,
                settle: SettleConfig {
                    steps: 40,
                    tol: 0.0,
                    momentum: 0.8,
                    ..SettleConfig::default()
                },
                seed: 11,
                ..EpConfig::default()
            };
            let mut fused = EpEstimator::new(&net, config).unwrap();
            let mut lean = EpEstimator::new(&net, config)
                .unwrap()
                .with_lean_memory(true);
            for call in 0..2 {
                let a = fused.estimate(&net, &batch).unwrap();
                let b = lean.estimate(&net, &batch).unwrap();
                let diff = max_rel_diff(&b.grads, &a.grads);
                assert!(diff < 1e-4, "{spec} {nudging} call {call}: {diff}");
                assert_eq!(a.settle.len(), b.settle.len());
                for (x, y) in a.settle.iter().zip(&b.settle) {
                    assert_eq!(x.steps, y.steps);
                    assert!((x.residual - y.residual).abs() <= 1e-4 * x.residual.max(1e-3));
                    assert!((x.energy - y.energy).abs() <= 1e-4 * x.energy.abs().max(1e-3));
                }
                assert!((a.loss - b.loss).abs() < 1e-6);
            }
        }
    }
}

#[test]
fn a_curvature_estimated_every_few_calls_is_kept_between_and_across_a_resume() {
    let dev = cpu_device(CpuBackend::Flex);
    let net = build(
        "1x8x8-conv4k3p1-pool2-fc5",
        Shape::Image { c: 1, h: 8, w: 8 },
        &dev,
    );
    let batches: Vec<TensorBatch> = (0..4)
        .map(|s| random_batch(6, 64, 5, 30 + s, &dev))
        .collect();
    let config = |every: usize| EpConfig {
        beta: 0.05,
        settle: SettleConfig {
            steps: 4,
            lr: 0.5,
            momentum: 0.0,
            tol: 0.0,
            curvature: true,
            curvature_every: every,
            ..SettleConfig::default()
        },
        ..EpConfig::default()
    };
    // Every 3 calls: calls 1 and 4 estimate, calls 2 and 3 keep call 1's step.
    let mut spread = EpEstimator::new(&net, config(3)).unwrap();
    let mut each = EpEstimator::new(&net, config(1)).unwrap();
    let mut steps = Vec::new();
    for (call, batch) in batches.iter().enumerate() {
        let a = spread.estimate(&net, batch).unwrap();
        let b = each.estimate(&net, batch).unwrap();
        let (sa, sb) = (a.settle[0].step, b.settle[0].step);
        assert!(sa > 0.0 && sa < 0.5, "the curvature limits the step: {sa}");
        if call == 0 || call == 3 {
            // Estimated afresh: the same step and gradient as estimating at every settle.
            assert_eq!(sa, sb, "call {}", call + 1);
            assert!(max_rel_diff(&a.grads, &b.grads) < 1e-6);
        } else {
            assert_eq!(sa, steps[0], "call {} keeps call 1's step", call + 1);
            // Another batch has another largest eigenvalue, so the steps differ.
            assert_ne!(sa, sb, "call {}", call + 1);
        }
        steps.push(sa);
    }
    // A resumed estimator keeps the estimate: after call 1, one restored from its state
    // takes call 2 exactly as the uninterrupted one does.
    let mut first = EpEstimator::new(&net, config(3)).unwrap();
    let _ = first.estimate(&net, &batches[0]).unwrap();
    let mut resumed = EpEstimator::new(&net, config(3)).unwrap();
    resumed.load_state(&first.state());
    let a = first.estimate(&net, &batches[1]).unwrap();
    let b = resumed.estimate(&net, &batches[1]).unwrap();
    assert_eq!(a.settle[0].step, b.settle[0].step);
    assert_eq!(max_rel_diff(&a.grads, &b.grads), 0.0);
}
