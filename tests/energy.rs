//! The energy against independent math: the forward pass, finite differences and burn's
//! autodiff of the energy's definition, for every layer type.

use burn::tensor::TensorData;
use mep::device::{CpuBackend, Device, Tensor, cpu_device};
use mep::ep::EnergyModel;
use mep::loss::{Loss, MseScale};
use mep::model::{Activation, LayerKind, Network, NetworkBuilder, Shape};
use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};

fn to_vec(t: &Tensor<2>) -> Vec<f32> {
    t.to_data().convert::<f32>().to_vec::<f32>().unwrap()
}

fn random(shape: [usize; 2], seed: u64, scale: f32, dev: &Device) -> Tensor<2> {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    let v: Vec<f32> = (0..shape[0] * shape[1])
        .map(|_| rng.random_range(-scale..scale))
        .collect();
    Tensor::from_data(TensorData::new(v, shape), dev)
}

fn one_hot(batch: usize, classes: usize, dev: &Device) -> Tensor<2> {
    let mut v = vec![0.0; batch * classes];
    for b in 0..batch {
        v[b * classes + (b * 7 + 3) % classes] = 1.0;
    }
    Tensor::from_data(TensorData::new(v, [batch, classes]), dev)
}

/// Small networks that together use every layer type.
fn zoo(dev: &Device) -> Vec<(&'static str, Network)> {
    use LayerKind as K;
    let act = |a| K::Activation(a);
    let mlp = NetworkBuilder::new(Shape::Flat(6))
        .linear(5)
        .activation(Activation::Tanh)
        .linear(5)
        .activation(Activation::Gelu)
        .linear(5)
        .activation(Activation::Silu)
        .linear(4)
        .activation(Activation::Sigmoid)
        .linear(4)
        .activation(Activation::LeakyRelu { slope: 0.1 })
        .linear(4)
        .activation(Activation::Relu)
        .layer(K::Dropout { p: 0.3 })
        .linear(3);
    let clipped = NetworkBuilder::new(Shape::Flat(6))
        .linear(6)
        .activation(Activation::HardSigmoid)
        .linear(5)
        .activation(Activation::ClippedRelu { cap: 1.0 })
        .linear(3);
    let cnn = NetworkBuilder::new(Shape::Image { c: 2, h: 8, w: 8 })
        .conv2d(3, 3, 1, 1)
        .layer(K::BatchNorm)
        .activation(Activation::Tanh)
        .layer(K::MaxPool2d {
            kernel: 2,
            stride: 2,
        })
        .conv2d(4, 3, 2, 1)
        .activation(Activation::Gelu)
        .layer(K::AvgPool2d {
            kernel: 2,
            stride: 1,
        })
        .layer(K::Flatten)
        .layer(K::LayerNorm)
        .linear(3);
    let attention = NetworkBuilder::new(Shape::Flat(12))
        .layer(K::Tokens { tokens: 3 })
        .layer(K::Attention { heads: 2 })
        .layer(K::LayerNorm)
        .activation(Activation::Tanh)
        .layer(K::Attention { heads: 1 })
        .layer(K::Flatten)
        .linear(3)
        .layer(K::LayerNorm);
    let residual = NetworkBuilder::new(Shape::Flat(6))
        .linear(8)
        .layer(K::Residual(vec![
            act(Activation::Tanh),
            K::Linear { outputs: 8 },
        ]))
        .layer(K::LayerNorm)
        .layer(K::Residual(vec![
            act(Activation::Silu),
            K::Linear { outputs: 5 },
            act(Activation::Tanh),
            K::Linear { outputs: 8 },
        ]))
        .activation(Activation::Tanh)
        .linear(3);
    vec![
        ("mlp", mlp),
        ("clipped", clipped),
        ("cnn", cnn),
        ("attention", attention),
        ("residual", residual),
    ]
    .into_iter()
    .enumerate()
    .map(|(i, (n, b))| (n, b.build(10 + i as u64, dev).unwrap()))
    .collect()
}

const LOSSES: [Loss; 3] = [
    Loss::Mse {
        scale: MseScale::Half,
    },
    Loss::Mse {
        scale: MseScale::Reference,
    },
    Loss::CrossEntropy { smoothing: 0.1 },
];

#[test]
fn free_energy_at_the_forward_states_is_zero_for_every_layer_type() {
    let dev = cpu_device(CpuBackend::Flex);
    for (name, net) in zoo(&dev) {
        let batch = 5;
        let x = random([batch, net.input_shape().numel()], 1, 1.0, &dev);
        let y = one_hot(batch, 3, &dev);
        let energy = EnergyModel::new(&net, Loss::default());
        let (ctx, free, free_eval) = energy.free_phase(&net, x.clone(), y);
        // The output of the free phase is the plain forward pass (batch statistics).
        let (forward, _) = net.forward_train(net.params(), x, None);
        let (a, b) = (to_vec(free_eval.output()), to_vec(&forward));
        for (p, q) in a.iter().zip(&b) {
            assert!(
                (p - q).abs() < 1e-5,
                "{name}: free output {p} vs forward {q}"
            );
        }
        // Re-evaluating the energy at those states from scratch gives zero errors.
        let eval = energy.evaluate(&net, &ctx, &free);
        let e = to_vec(&energy.per_sample_energy(&ctx, &eval, 0.0));
        assert!(
            e.iter().all(|v| v.abs() < 1e-10),
            "{name}: free energy {e:?}"
        );
        let g = energy.state_gradients(&net, &ctx, &eval, 0.0);
        for s in &g {
            assert!(
                to_vec(s).iter().all(|v| v.abs() < 1e-5),
                "{name}: free gradient"
            );
        }
    }
}

/// Perturbs the free states so that every error term is non-zero.
fn perturbed(free: &[Tensor<2>], dev: &Device) -> Vec<Tensor<2>> {
    free.iter()
        .enumerate()
        .map(|(i, s)| s.clone() + random(s.dims(), 100 + i as u64, 0.3, dev))
        .collect()
}

#[test]
fn analytic_gradients_match_autodiff_of_the_energy_for_every_layer_type() {
    let dev = cpu_device(CpuBackend::Flex);
    for (name, net) in zoo(&dev) {
        for loss in LOSSES {
            let batch = 4;
            let x = random([batch, net.input_shape().numel()], 2, 1.0, &dev);
            let energy = EnergyModel::new(&net, loss);
            let (ctx, free, _) = energy.free_phase(&net, x, one_hot(batch, 3, &dev));
            let states = perturbed(&free, &dev);
            let beta = 0.7;
            let eval = energy.evaluate(&net, &ctx, &states);
            let (total, ref_states, ref_params) =
                energy.autodiff_reference(&net, &ctx, &states, beta);
            let analytic_total: f32 = to_vec(&energy.per_sample_energy(&ctx, &eval, beta))
                .iter()
                .sum();
            assert!(
                (total - analytic_total).abs() < 1e-4 * total.abs().max(1.0),
                "{name}/{loss}: energy {analytic_total} vs autodiff {total}"
            );
            let check = |what: &str, a: &[Tensor<2>], r: &[Tensor<2>]| {
                assert_eq!(a.len(), r.len());
                for (k, (a, r)) in a.iter().zip(r).enumerate() {
                    assert_eq!(a.dims(), r.dims(), "{name}/{loss}: {what} {k} shape");
                    for (p, q) in to_vec(a).iter().zip(to_vec(r)) {
                        assert!(
                            (p - q).abs() < 2e-4 + 2e-3 * q.abs(),
                            "{name}/{loss}: {what} {k}: analytic {p} vs autodiff {q}"
                        );
                    }
                }
            };
            check(
                "state gradient",
                &energy.state_gradients(&net, &ctx, &eval, beta),
                &ref_states,
            );
            check(
                "parameter gradient",
                &energy.param_gradients(&net, &ctx, &eval, beta),
                &ref_params,
            );
        }
    }
}

fn total_energy(
    net: &Network,
    energy: &EnergyModel,
    x: &Tensor<2>,
    y: &Tensor<2>,
    states: &[Tensor<2>],
    beta: f32,
) -> f64 {
    // Batch statistics are those of the (unperturbed) forward pass of `net`.
    let (ctx, _, _) = energy.free_phase(net, x.clone(), y.clone());
    let eval = energy.evaluate(net, &ctx, states);
    to_vec(&energy.per_sample_energy(&ctx, &eval, beta))
        .iter()
        .map(|&v| v as f64)
        .sum()
}

#[test]
fn energy_gradients_match_central_finite_differences() {
    let dev = cpu_device(CpuBackend::Flex);
    let h = 1e-2f32;
    for (name, net) in zoo(&dev) {
        if name == "cnn" {
            // Its batch norm's statistics move with the parameters in a finite difference
            // but are constants of the energy; it is covered by the autodiff comparison.
            continue;
        }
        let batch = 3;
        let x = random([batch, net.input_shape().numel()], 3, 1.0, &dev);
        let y = one_hot(batch, 3, &dev);
        let loss = Loss::CrossEntropy { smoothing: 0.0 };
        let energy = EnergyModel::new(&net, loss);
        let (ctx, free, _) = energy.free_phase(&net, x.clone(), y.clone());
        let states = perturbed(&free, &dev);
        let beta = 0.5;
        let eval = energy.evaluate(&net, &ctx, &states);
        let grads = energy.state_gradients(&net, &ctx, &eval, beta);
        // States: a spread of coordinates of every state.
        for (i, s) in states.iter().enumerate() {
            let values = to_vec(s);
            let g = to_vec(&grads[i]);
            for idx in (0..values.len()).step_by(values.len().div_ceil(7)) {
                let shifted = |d: f32| {
                    let mut v = values.clone();
                    v[idx] += d;
                    let mut st = states.clone();
                    st[i] = Tensor::from_data(TensorData::new(v, s.dims()), &dev);
                    total_energy(&net, &energy, &x, &y, &st, beta)
                };
                let numeric = (shifted(h) - shifted(-h)) / (2.0 * h as f64);
                let a = g[idx] as f64;
                assert!(
                    (a - numeric).abs() < 2e-3 + 2e-2 * numeric.abs(),
                    "{name}: dE/ds{i}[{idx}] analytic {a} vs finite difference {numeric}"
                );
            }
        }
        // Parameters: a spread of entries of every tensor.
        let pgrads = energy.param_gradients(&net, &ctx, &eval, beta);
        for (k, p) in net.params().iter().enumerate() {
            let values = to_vec(p);
            let g = to_vec(&pgrads[k]);
            for idx in (0..values.len()).step_by(values.len().div_ceil(5)) {
                let shifted = |d: f32| {
                    let mut v = values.clone();
                    v[idx] += d;
                    let mut params = net.params().to_vec();
                    params[k] = Tensor::from_data(TensorData::new(v, p.dims()), &dev);
                    let mut moved = net.clone();
                    moved.set_params(params).unwrap();
                    total_energy(&moved, &energy, &x, &y, &states, beta)
                };
                let numeric = (shifted(h) - shifted(-h)) / (2.0 * h as f64);
                let a = g[idx] as f64;
                assert!(
                    (a - numeric).abs() < 2e-3 + 2e-2 * numeric.abs(),
                    "{name}: dE/d{}[{idx}] analytic {a} vs finite difference {numeric}",
                    net.param_info()[k].name
                );
            }
        }
    }
}
