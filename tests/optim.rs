//! The composite optimizer against independent math: SVDs, closed forms, hand computation.

mod common;

use burn::tensor::TensorData;
use common::{exact_newton_schulz, gaussianish, on_threads, random_orthonormal, svd};
use mep::device::Tensor;
use mep::estimate::GradFactors;
use mep::experiment::{ExperimentError, Preset};
use mep::model::{ParamInfo, ParamKind};
use mep::optim::linalg::{
    GRAM_SPACE_MAX_STEPS, newton_schulz, newton_schulz_direct, newton_schulz_flops,
    newton_schulz_host_flops, newton_schulz_on_device, spectral_norm, spectral_norm_on_device,
};
use mep::optim::{
    CompositeConfig, CompositeOptimizer, Constraint, Feedback, NsIteration, OptimError, Optimizer,
    Schedule, UpdateRule, VectorRule,
};

use common::dev;

fn t(values: &[f64], shape: [usize; 2]) -> Tensor<2> {
    let v: Vec<f32> = values.iter().map(|&x| x as f32).collect();
    Tensor::from_data(TensorData::new(v, shape), &dev())
}

fn h(t: &Tensor<2>) -> Vec<f64> {
    t.to_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect()
}

/// `U diag(s) V^T` with random orthonormal factors.
fn with_spectrum(m: usize, n: usize, s: &[f64], seed: u64) -> Vec<f64> {
    let k = s.len();
    let u = random_orthonormal(m, k, seed);
    let v = random_orthonormal(n, k, seed + 1);
    let mut a = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            a[i * n + j] = (0..k).map(|c| u[i * k + c] * s[c] * v[j * k + c]).sum();
        }
    }
    a
}

fn matrix(fan_in: usize, fan_out: usize) -> ParamInfo {
    ParamInfo {
        name: format!("w{fan_in}x{fan_out}"),
        kind: ParamKind::Matrix {
            fan_in,
            fan_out,
            out_major: false,
        },
    }
}

fn vector(name: &str) -> ParamInfo {
    ParamInfo {
        name: name.into(),
        kind: ParamKind::Vector,
    }
}

fn frob_diff(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).powi(2))
        .sum::<f64>()
        .sqrt()
}

fn polar(a: &[f64], m: usize, n: usize) -> Vec<f64> {
    let (u, _, v) = svd(a, m, n);
    let k = m.min(n);
    let mut p = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            p[i * n + j] = (0..k).map(|c| u[i * k + c] * v[j * k + c]).sum();
        }
    }
    p
}

#[test]
fn newton_schulz_approaches_the_polar_factor_of_the_svd() {
    for (m, n) in [(64, 32), (32, 64), (128, 784)] {
        let g = gaussianish(m, n, 3);
        let x = h(&newton_schulz(t(&g, [m, n]), 5, NsIteration::Quintic));
        let (_, s, _) = svd(&x, m, n);
        // The quintic's known band: 5 steps put every singular value in about [0.68, 1.2].
        assert!(
            s.iter().all(|&v| (0.6..1.25).contains(&v)),
            "{m}x{n} quintic singular values {:?}..{:?}",
            s.last(),
            s.first()
        );
        // Same singular vectors as the input: X is close to U V^T.
        let p = polar(&g, m, n);
        let rel = frob_diff(&x, &p) / frob_diff(&p, &vec![0.0; p.len()]);
        assert!(rel < 0.35, "{m}x{n}: |X - UV^T| / |UV^T| = {rel}");
        // The cubic iteration converges to exactly U V^T, slowly: after 5 steps a
        // full-rank input is far from it (the reference's defect), after 40 it is there.
        let cubic5 = h(&newton_schulz(t(&g, [m, n]), 5, NsIteration::Cubic));
        let (_, s5, _) = svd(&cubic5, m, n);
        assert!(
            *s5.last().unwrap() < 0.6,
            "cubic after 5 steps: {:?}",
            s5.last()
        );
        let cubic = h(&newton_schulz(t(&g, [m, n]), 40, NsIteration::Cubic));
        let rel = frob_diff(&cubic, &p) / frob_diff(&p, &vec![0.0; p.len()]);
        assert!(rel < 1e-3, "{m}x{n} cubic x40: {rel}");
    }
}

#[test]
fn gram_space_newton_schulz_equals_the_textbook_iteration() {
    // Wide and tall shapes that take the Gram-space path (c >= 2r) and one that does not
    // (50 x 70).
    // An ill-conditioned input too (singular values from 1 down to 1e-4), where the
    // Gram-space iterate grows most on the small directions.
    let spread: Vec<f64> = (0..40)
        .map(|i| 10f64.powf(-4.0 * i as f64 / 39.0))
        .collect();
    let cases = [
        ((40, 120), gaussianish(40, 120, 7)),
        ((784, 256), gaussianish(784, 256, 7)),
        ((64, 32), gaussianish(64, 32, 7)),
        ((50, 70), gaussianish(50, 70, 7)),
        ((200, 40), with_spectrum(200, 40, &spread, 5)),
    ];
    for ((m, n), g) in cases {
        for (iteration, steps) in [
            (NsIteration::Quintic, 5),
            (NsIteration::Cubic, 5),
            (NsIteration::Cubic, 12),
        ] {
            let fast = h(&newton_schulz(t(&g, [m, n]), steps, iteration));
            let slow = h(&newton_schulz_direct(t(&g, [m, n]), steps, iteration));
            let rel = frob_diff(&fast, &slow) / frob_diff(&slow, &vec![0.0; slow.len()]);
            if steps > GRAM_SPACE_MAX_STEPS || (m, n) == (50, 70) {
                assert_eq!(rel, 0.0, "{m}x{n}, {steps} steps: the textbook form runs");
                continue;
            }
            // Against exact arithmetic, the Gram-space form is as accurate as the textbook
            // one.
            let (a, b, c) = iteration.coefficients();
            let exact = exact_newton_schulz(&g, m, n, steps, (a.into(), b.into(), c.into()));
            let scale = frob_diff(&exact, &vec![0.0; exact.len()]);
            let (e_fast, e_slow) = (
                frob_diff(&fast, &exact) / scale,
                frob_diff(&slow, &exact) / scale,
            );
            // Measured, quintic: 1.8e-6 to 2.8e-6 (textbook 1.0e-6 to 2.2e-6) on Gaussian
            // inputs; 4.0e-4 (textbook 4.8e-6) with singular values down to 1e-4, far below
            // the quintic's own distance to U V^T (about 0.3). The cubic's Q grows 1.5^k
            // instead of 3.44^k, so it loses less.
            let bar = if (m, n) == (200, 40) { 1e-3 } else { 1e-5 };
            assert!(
                e_fast < bar && e_slow < 1e-5,
                "{m}x{n} {iteration:?}: Gram-space error {e_fast}, textbook {e_slow}"
            );
        }
    }
    // The cost model: 784 x 256, 5 quintic steps. Textbook: per step X X^T (2 r^2 c),
    // A^2 (2 r^3) and B X (2 r^2 c).
    let (r, c) = (256.0, 784.0);
    let textbook = 5.0 * (4.0 * r * r * c + 2.0 * r * r * r);
    let gram = newton_schulz_flops(784, 256, 5, NsIteration::Quintic);
    assert!(gram < 0.7 * textbook, "{gram} vs {textbook}");
    // On the host only the blocks on and above the diagonal of each symmetric product are
    // multiplied: for r = 256, 36 of 64 blocks of 32; 17 r x r products, G, and the full
    // final Q X.
    let sym = |k: f64| 36.0 * 2.0 * 32.0 * 32.0 * k;
    let host = newton_schulz_host_flops(784, 256, 5, NsIteration::Quintic);
    assert_eq!(host, sym(c) + 17.0 * sym(r) + 2.0 * r * r * c);
    assert!(host < 0.65 * gram, "{host} vs {gram}");
    // The cubic needs no A^2: 12 r x r products.
    assert_eq!(
        newton_schulz_host_flops(784, 256, 5, NsIteration::Cubic),
        sym(c) + 12.0 * sym(r) + 2.0 * r * r * c
    );
    // Below the crossover the textbook form is used and counted.
    assert_eq!(
        newton_schulz_flops(50, 70, 5, NsIteration::Quintic),
        5.0 * (4.0 * 50.0 * 50.0 * 70.0 + 2.0 * 50.0f64.powi(3))
    );
}

/// The Gram-space iteration on host buffers with symmetric block products (what
/// `newton_schulz` runs on the CPU) and with burn's ops (what it runs on other devices),
/// wide and tall, against exact arithmetic through the SVD: both within 1e-5 on Gaussian
/// inputs (measured 2e-6 to 3e-6) and 1e-3 with singular values down to 1e-4 or a rank-64
/// 784 x 256 input (measured 2.8e-4 to 3.6e-4; 3e-3 when the host products were not
/// exactly symmetric), and within 1e-5 of each other on Gaussian inputs.
#[test]
fn host_and_device_gram_space_newton_schulz_agree_with_exact_arithmetic() {
    let spread: Vec<f64> = (0..40)
        .map(|i| 10f64.powf(-4.0 * i as f64 / 39.0))
        .collect();
    let rank64: Vec<f64> = (0..64)
        .map(|i| 10f64.powf(-4.0 * i as f64 / 63.0))
        .collect();
    // (shape, input, ill-conditioned)
    let cases = [
        ((256, 784), gaussianish(256, 784, 3), false),
        ((784, 256), gaussianish(784, 256, 4), false),
        ((130, 300), gaussianish(130, 300, 5), false),
        ((40, 200), with_spectrum(40, 200, &spread, 6), true),
        ((784, 256), with_spectrum(784, 256, &rank64, 8), true),
    ];
    for ((m, n), g, ill) in cases {
        for iteration in [NsIteration::Quintic, NsIteration::Cubic] {
            let (a, b, c) = iteration.coefficients();
            let exact = exact_newton_schulz(&g, m, n, 5, (a.into(), b.into(), c.into()));
            let scale = frob_diff(&exact, &vec![0.0; exact.len()]);
            let host = h(&newton_schulz(t(&g, [m, n]), 5, iteration));
            let device = h(&newton_schulz_on_device(t(&g, [m, n]), 5, iteration));
            let (e_host, e_device) = (
                frob_diff(&host, &exact) / scale,
                frob_diff(&device, &exact) / scale,
            );
            let bar = if ill { 1e-3 } else { 1e-5 };
            assert!(
                e_host < bar && e_device < bar,
                "{m}x{n} {iteration:?}: host {e_host}, device {e_device}"
            );
            if !ill {
                let apart = frob_diff(&host, &device) / scale;
                assert!(
                    apart < 1e-5,
                    "{m}x{n} {iteration:?}: host and device {apart} apart"
                );
            }
        }
    }
}

/// The host Newton–Schulz shares its row panels and the mirroring of its symmetric
/// products among the pool's workers; each panel is the same product on any number of
/// threads, so the result is the same to the bit. Shapes with a last panel shorter than
/// the others (`r = 130`), tall and wide.
#[test]
fn host_newton_schulz_gives_the_same_bits_on_any_number_of_threads() {
    let cases = [((784, 256), 21), ((130, 300), 22), ((300, 130), 23)];
    for ((m, n), seed) in cases {
        let g = gaussianish(m, n, seed);
        let run = |threads: usize| {
            on_threads(threads, || {
                h(&newton_schulz(t(&g, [m, n]), 5, NsIteration::Quintic))
            })
        };
        let one = run(1);
        for threads in [2, 3] {
            assert!(
                run(threads) == one,
                "{m}x{n}: {threads} threads changed the result"
            );
        }
    }
}

/// The spectral bound's power iteration on host buffers and with burn's ops: the same
/// rounds, so the same estimate and vector up to rounding, and both reach the largest
/// singular value of matrices with a known spectrum, with a fixed number of rounds and
/// with the tolerance's extra rounds. (Measured: estimates within 2e-7 of each other,
/// vectors within 1.2e-7; converged estimates within 7e-6 of s_1 = 3.)
#[test]
fn host_and_device_spectral_norms_agree_with_the_svd() {
    let spectrum = [3.0, 2.0, 1.0, 0.5, 0.25];
    for ((m, n), seed) in [((256, 784), 31), ((10, 128), 32), ((300, 130), 33)] {
        let w = t(&with_spectrum(m, n, &spectrum, seed), [m, n]);
        let start = t(&gaussianish(1, m, seed + 100), [1, m]);
        // (rounds, tolerance, whether the rounds converge: the error falls like
        // (2/3)^(2 rounds) from a start whose component along the top vector is unknown)
        for (rounds, tol, converged) in [(2, 0.0, false), (30, 0.0, true), (4, 1e-5, true)] {
            let (u_host, s_host) = spectral_norm(&w, start.clone(), rounds, tol);
            let (u_dev, s_dev) = spectral_norm_on_device(&w, start.clone(), rounds, tol);
            let (s_host, s_dev) = (h(&s_host)[0], h(&s_dev)[0]);
            assert!(
                (s_host - s_dev).abs() < 1e-5 * s_dev,
                "{m}x{n}, {rounds} rounds, tol {tol}: host {s_host}, device {s_dev}"
            );
            assert!(
                frob_diff(&h(&u_host), &h(&u_dev)) < 1e-5,
                "{m}x{n}, {rounds} rounds, tol {tol}: the vectors differ by {}",
                frob_diff(&h(&u_host), &h(&u_dev))
            );
            assert!(
                s_host <= 3.0 * (1.0 + 1e-5) && (!converged || 3.0 - s_host < 3e-5),
                "{m}x{n}, {rounds} rounds, tol {tol}: {s_host} against 3"
            );
        }
    }
}

#[test]
fn dion_recovers_the_rank_r_polar_factor_and_keeps_the_residual_in_momentum() {
    let (m, n, r) = (40, 30, 6);
    // A rank-6 gradient: one power-iteration round spans its range exactly.
    let s: Vec<f64> = (0..r).map(|i| 5.0 - 0.5 * i as f64).collect();
    let g = with_spectrum(m, n, &s, 11);
    let config = CompositeConfig {
        lr: 1.0,
        momentum: 0.5,
        update: UpdateRule::Dion {
            rank_frac: r as f64 / n as f64,
            threshold: 0,
            ns_steps: 5,
        },
        ..CompositeConfig::default()
    };
    let info = [ParamInfo {
        name: "w".into(),
        kind: ParamKind::Matrix {
            fan_in: n,
            fan_out: m,
            out_major: true,
        },
    }];
    let mut opt = CompositeOptimizer::new(config, &info).unwrap();
    // Every momentum matrix B_t = mu B_{t-1} + G is a multiple of G (an exact rank-r fit
    // leaves M = mu B), so the warm-started power iteration converges to G's factors.
    let mut out = Vec::new();
    for _ in 0..40 {
        out = opt
            .step(vec![t(&vec![0.0; m * n], [m, n])], vec![t(&g, [m, n])])
            .unwrap();
    }
    // Direction = U_r V_r^T times Muon's shape scale sqrt(m/n).
    let p = polar(&g, m, n);
    let (u, _, v) = svd(&g, m, n);
    let k = n;
    let mut polar_r = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            polar_r[i * n + j] = (0..r).map(|c| u[i * k + c] * v[j * k + c]).sum();
        }
    }
    let _ = p;
    let scale = (m as f64 / n as f64).sqrt();
    let got: Vec<f64> = h(&out[0]).iter().map(|x| -x / scale).collect();
    let err = frob_diff(&got, &polar_r) / (r as f64).sqrt();
    assert!(err < 1e-3, "Dion direction vs truncated SVD: {err}");
    // Error feedback into the momentum: M = B - (1 - mu) P R^T = mu B for an exact fit,
    // and B converges to G / (1 - mu), so M to mu G / (1 - mu) = G.
    let state = opt.state();
    let momentum = h(state.tensor("w.momentum").unwrap());
    let expected: Vec<f64> = g.clone();
    assert!(frob_diff(&momentum, &expected) < 1e-3 * frob_diff(&g, &vec![0.0; g.len()]));
}

#[test]
fn low_rank_compression_converges_to_the_truncated_svd_by_warm_started_power_iteration() {
    let (m, n) = (30, 20);
    let s: Vec<f64> = (0..n).map(|i| 10.0 * 0.7f64.powi(i as i32)).collect();
    let g = with_spectrum(m, n, &s, 5);
    let r = 3;
    let config = CompositeConfig {
        lr: 1.0,
        momentum: 0.0,
        update: UpdateRule::LowRank {
            rank_frac: r as f64 / n as f64,
        },
        ..CompositeConfig::default()
    };
    let mut opt = CompositeOptimizer::new(config, &[matrix(n, m)]).unwrap();
    let mut approx = Vec::new();
    for _ in 0..30 {
        let out = opt
            .step(vec![t(&vec![0.0; m * n], [m, n])], vec![t(&g, [m, n])])
            .unwrap();
        approx = h(&out[0]).iter().map(|x| -x).collect();
    }
    // Best rank-3 approximation (Eckart-Young): its error is the tail of the spectrum.
    let truncated = with_spectrum(m, n, &s[..r], 5);
    let err = frob_diff(&approx, &truncated) / s[0];
    assert!(err < 1e-3, "rank-3 compression vs truncated SVD: {err}");
}

#[test]
fn the_spectral_bound_holds_by_svd_after_many_steps_and_timing_is_respected() {
    let (m, n) = (24, 16);
    for every in [1usize, 4] {
        let config = CompositeConfig {
            lr: 0.002,
            momentum: 0.9,
            constraint: Constraint::Spectral {
                gamma: 0.95,
                power_iters: 3,
                every,
                tol: 1e-5,
            },
            seed: 3,
            ..CompositeConfig::default()
        };
        let mut opt = CompositeOptimizer::new(config, &[matrix(n, m)]).unwrap();
        let mut w = opt.prepare(vec![t(&gaussianish(m, n, 9), [m, n])]);
        let (_, s, _) = svd(&h(&w[0]), m, n);
        assert!(s[0] <= 0.95 * (1.0 + 1e-3), "after prepare: {}", s[0]);
        // Gradients with a persistent component keep pushing the spectrum up.
        let drift = gaussianish(m, n, 99);
        let mut off_step_violations = 0;
        for step in 1..=300usize {
            let g: Vec<f64> = gaussianish(m, n, 100 + step as u64)
                .iter()
                .zip(&drift)
                .map(|(a, b)| a + b)
                .collect();
            w = opt.step(w, vec![t(&g, [m, n])]).unwrap();
            let (_, s, _) = svd(&h(&w[0]), m, n);
            if step % every == 0 && step > 50 {
                assert!(
                    s[0] <= 0.95 * (1.0 + 1e-3),
                    "every {every}, step {step}: {}",
                    s[0]
                );
            }
            if step % every != 0 && s[0] > 0.95 * (1.0 + 1e-3) {
                off_step_violations += 1;
            }
        }
        // Between applications the bound is not enforced (the timing option works).
        assert_eq!(off_step_violations > 0, every > 1, "every {every}");
    }
}

#[test]
fn error_feedback_makes_applied_updates_track_the_gradients() {
    let (m, n) = (8, 6);
    let lowrank = UpdateRule::LowRank {
        rank_frac: 1.0 / 6.0,
    };
    let run = |update, feedback| {
        let config = CompositeConfig {
            lr: 1.0,
            momentum: 0.0,
            update,
            feedback,
            ..CompositeConfig::default()
        };
        let mut opt = CompositeOptimizer::new(config, &[matrix(n, m)]).unwrap();
        let mut w = vec![t(&vec![0.0; m * n], [m, n])];
        let mut total = vec![0.0; m * n];
        let drift = gaussianish(m, n, 499);
        for step in 0..200 {
            // A consistent full-rank direction plus noise: the sum of gradients grows
            // linearly, and so does what a rank-1 compression without feedback loses.
            let g: Vec<f64> = gaussianish(m, n, 500 + step)
                .iter()
                .zip(&drift)
                .map(|(a, b)| 0.5 * a + b)
                .collect();
            for (a, b) in total.iter_mut().zip(&g) {
                *a += b;
            }
            w = opt.step(w, vec![t(&g, [m, n])]).unwrap();
        }
        // Sum of applied updates is -W; its distance to the sum of gradients:
        let applied: Vec<f64> = h(&w[0]).iter().map(|x| -x).collect();
        (
            frob_diff(&applied, &total),
            frob_diff(&total, &vec![0.0; total.len()]),
            applied,
        )
    };
    let ef = |rank_frac| Feedback::ErrorFeedback {
        beta: 1.0,
        rank_frac,
    };
    let (gap_ef, scale, applied_ef) = run(lowrank, ef(None));
    let (gap_plain, _, _) = run(lowrank, Feedback::None);
    // Error feedback's own compression in front of the plain rule is the same algorithm.
    let (_, _, applied_plain_ef) = run(UpdateRule::Plain, ef(Some(1.0 / 6.0)));
    assert_eq!(applied_ef, applied_plain_ef);
    // With feedback the gap is the last residual (bounded); without it grows with steps.
    assert!(
        gap_ef < 0.05 * scale,
        "with EF: gap {gap_ef}, |sum g| {scale}"
    );
    assert!(
        gap_plain > 0.3 * scale,
        "without EF: gap {gap_plain}, |sum g| {scale}"
    );
}

#[test]
fn fisher_whitening_divides_by_the_empirical_fisher_diagonal() {
    // Two samples with known per-sample gradients a_b^T g_b of a 2 -> 3 linear layer.
    let a = [1.0, 2.0, -1.0, 0.5];
    let gs = [0.5, -1.0, 2.0, 1.0, 0.0, -0.5];
    let factors = GradFactors {
        inputs: t(&a, [2, 2]),
        output_grads: t(&gs, [2, 3]),
    };
    // Fisher diagonal by hand: mean_b (a_bi g_bj)^2; gradient: mean_b a_bi g_bj.
    let mut fisher = [0.0; 6];
    let mut grad = [0.0; 6];
    for b in 0..2 {
        for i in 0..2 {
            for j in 0..3 {
                let v = a[b * 2 + i] * gs[b * 3 + j];
                fisher[i * 3 + j] += v * v / 2.0;
                grad[i * 3 + j] += v / 2.0;
            }
        }
    }
    let damping = 0.1;
    let config = CompositeConfig {
        lr: 1.0,
        momentum: 0.0,
        update: UpdateRule::Fisher {
            damping,
            ema: 0.95,
            orthogonalize: false,
            ns_steps: 5,
        },
        ..CompositeConfig::default()
    };
    let mut opt = CompositeOptimizer::new(config, &[matrix(2, 3)]).unwrap();
    assert!(opt.needs_factors());
    let out = opt
        .step_with_factors(
            vec![t(&[0.0; 6], [2, 3])],
            vec![t(&grad, [2, 3])],
            &[Some(factors)],
        )
        .unwrap();
    let got = h(&out[0]);
    for k in 0..6 {
        let expected = -grad[k] / (fisher[k] + damping);
        assert!(
            (got[k] - expected).abs() < 1e-5,
            "[{k}] {} vs {expected}",
            got[k]
        );
    }
}

#[test]
fn momentum_nesterov_decay_and_vector_routing_follow_hand_computed_steps() {
    let info = [matrix(1, 2), vector("b")];
    for nesterov in [false, true] {
        let config = CompositeConfig {
            lr: 0.1,
            vector_lr: Some(0.5),
            momentum: 0.9,
            nesterov,
            weight_decay: 0.01,
            ..CompositeConfig::default()
        };
        let mut opt = CompositeOptimizer::new(config, &info).unwrap();
        let mut params = vec![t(&[1.0, -2.0], [1, 2]), t(&[3.0], [1, 1])];
        let (gw, gb) = ([0.5, 1.0], 2.0);
        let (mut w, mut b) = ([1.0f64, -2.0], 3.0f64);
        let (mut mw, mut mb) = ([0.0f64; 2], 0.0f64);
        for _ in 0..3 {
            for i in 0..2 {
                mw[i] = 0.9 * mw[i] + gw[i];
                let d = if nesterov { gw[i] + 0.9 * mw[i] } else { mw[i] };
                w[i] = w[i] * (1.0 - 0.1 * 0.01) - 0.1 * d;
            }
            mb = 0.9 * mb + gb;
            let d = if nesterov { gb + 0.9 * mb } else { mb };
            b -= 0.5 * d; // vectors: own lr, no weight decay
            params = opt
                .step(params, vec![t(&gw, [1, 2]), t(&[gb], [1, 1])])
                .unwrap();
        }
        let (pw, pb) = (h(&params[0]), h(&params[1]));
        for i in 0..2 {
            assert!(
                (pw[i] - w[i]).abs() < 1e-5,
                "nesterov {nesterov}: {pw:?} vs {w:?}"
            );
        }
        assert!(
            (pb[0] - b).abs() < 1e-5,
            "nesterov {nesterov}: {pb:?} vs {b}"
        );
    }
}

#[test]
fn adam_follows_hand_computed_steps_for_matrices_and_vectors() {
    // Adam on the matrix (with decoupled decay) and on the vector (`--vector-update adam`,
    // its fixed 0.9 / 0.999 / 1e-8), against the textbook recursion in f64.
    let info = [matrix(1, 2), vector("b")];
    let (b1, b2, eps) = (0.8, 0.95, 1e-3);
    let config = CompositeConfig {
        lr: 0.1,
        vector_lr: Some(0.05),
        weight_decay: 0.1,
        update: UpdateRule::Adam {
            beta1: b1,
            beta2: b2,
            eps,
        },
        vector_update: VectorRule::Adam,
        momentum: 0.0,
        ..CompositeConfig::default()
    };
    let mut opt = CompositeOptimizer::new(config, &info).unwrap();
    let mut params = vec![t(&[1.0, -2.0], [1, 2]), t(&[3.0], [1, 1])];
    let mut p = [1.0f64, -2.0, 3.0];
    let mut m = [0.0f64; 3];
    let mut v = [0.0f64; 3];
    let grads = [[0.5, -1.0, 2.0], [0.1, 0.3, -0.5], [-0.7, 0.2, 0.4]];
    for (step, g) in grads.iter().enumerate() {
        let t_ = step as i32 + 1;
        for i in 0..3 {
            let (beta1, beta2, e, lr, wd) = if i < 2 {
                (b1, b2, eps, 0.1, 0.1)
            } else {
                (0.9, 0.999, 1e-8, 0.05, 0.0)
            };
            m[i] = beta1 * m[i] + (1.0 - beta1) * g[i];
            v[i] = beta2 * v[i] + (1.0 - beta2) * g[i] * g[i];
            let d = (m[i] / (1.0 - beta1.powi(t_))) / ((v[i] / (1.0 - beta2.powi(t_))).sqrt() + e);
            p[i] = p[i] * (1.0 - lr * wd) - lr * d;
        }
        params = opt
            .step(params, vec![t(&g[..2], [1, 2]), t(&g[2..], [1, 1])])
            .unwrap();
    }
    let got = [h(&params[0]), h(&params[1])].concat();
    for i in 0..3 {
        assert!((got[i] - p[i]).abs() < 1e-5, "{got:?} vs {p:?}");
    }
}

#[test]
fn fused_host_steps_give_the_op_chains_bits() {
    // On a CPU device the element-wise rules (momentum, Nesterov, Adam, decay, clipping)
    // run as fused loops over host buffers; on any other device as burn op chains. An
    // autodiff device takes the op chains on the same CPU backend: both must give the same
    // parameters and state, bit for bit, over several steps. Clipping's global norm is
    // summed in another order by each (so there they agree to rounding only).
    type Outcome = (Vec<Vec<f64>>, Vec<(String, Vec<f64>)>);
    let (m, n) = (7, 5);
    let info = [matrix(n, m), vector("b")];
    let adam = UpdateRule::Adam {
        beta1: 0.9,
        beta2: 0.99,
        eps: 1e-6,
    };
    let configs = [
        (UpdateRule::Plain, 0.9, false, VectorRule::Plain, None),
        (UpdateRule::Plain, 0.9, true, VectorRule::Plain, Some(0.5)),
        (UpdateRule::Plain, 0.0, false, VectorRule::Adam, None),
        (adam, 0.0, false, VectorRule::Adam, Some(0.5)),
        (UpdateRule::muon(), 0.95, true, VectorRule::Plain, None),
    ];
    for (update, momentum, nesterov, vector_update, clip_norm) in configs {
        let config = CompositeConfig {
            lr: 0.05,
            momentum,
            nesterov,
            weight_decay: 0.01,
            update,
            vector_update,
            clip_norm,
            ..CompositeConfig::default()
        };
        let run = |device: &mep::device::Device| -> Outcome {
            let on = |v: &[f64], shape: [usize; 2]| {
                let v: Vec<f32> = v.iter().map(|&x| x as f32).collect();
                Tensor::from_data(TensorData::new(v, shape), device)
            };
            let mut opt = CompositeOptimizer::new(config, &info).unwrap();
            let mut params = vec![
                on(&gaussianish(m, n, 3), [m, n]),
                on(&[0.1, -0.2, 0.3], [1, 3]),
            ];
            for s in 0..4 {
                let grads = vec![
                    on(&gaussianish(m, n, 10 + s), [m, n]),
                    on(&[0.3, -0.2 * s as f64, 0.1], [1, 3]),
                ];
                params = opt.step(params, grads).unwrap();
            }
            let state: Vec<(String, Vec<f64>)> = opt
                .state()
                .tensors
                .iter()
                .map(|(name, t)| (name.clone(), h(t)))
                .collect();
            (params.iter().map(h).collect::<Vec<_>>(), state)
        };
        let fused = run(&dev());
        let chain = run(&mep::device::autodiff(&dev()));
        let what =
            format!("{update:?}, momentum {momentum}, nesterov {nesterov}, clip {clip_norm:?}");
        assert!(!fused.1.is_empty(), "{what}: no state to compare");
        if clip_norm.is_none() {
            assert_eq!(fused, chain, "{what}");
            continue;
        }
        let flat = |(params, state): &Outcome| -> Vec<f64> {
            let state = state.iter().flat_map(|(_, v)| v.iter().copied());
            params.iter().flatten().copied().chain(state).collect()
        };
        for (a, b) in flat(&fused).iter().zip(flat(&chain)) {
            assert!(
                (a - b).abs() <= 1e-6 * (1.0 + b.abs()),
                "{what}: {a} vs {b}"
            );
        }
    }
}

#[test]
fn schedules_clipping_and_the_nan_guard() {
    let cosine = Schedule::Cosine {
        warmup: 10,
        total: 110,
        floor: 0.1,
    };
    assert!((cosine.factor(0) - 0.1).abs() < 1e-12);
    assert!((cosine.factor(9) - 1.0).abs() < 1e-12);
    assert!((cosine.factor(60) - 0.55).abs() < 1e-12);
    assert!((cosine.factor(500) - 0.1).abs() < 1e-12);
    let step = Schedule::Step {
        every: 10,
        gamma: 0.5,
    };
    assert_eq!(
        (step.factor(9), step.factor(10), step.factor(25)),
        (1.0, 0.5, 0.25)
    );

    // Clipping: the global norm (5 here) is scaled down to 1.
    let config = CompositeConfig {
        lr: 1.0,
        momentum: 0.0,
        clip_norm: Some(1.0),
        ..CompositeConfig::default()
    };
    let info = [matrix(1, 1), vector("b")];
    let mut opt = CompositeOptimizer::new(config, &info).unwrap();
    let out = opt
        .step(
            vec![t(&[0.0], [1, 1]), t(&[0.0], [1, 1])],
            vec![t(&[3.0], [1, 1]), t(&[4.0], [1, 1])],
        )
        .unwrap();
    assert!((h(&out[0])[0] + 0.6).abs() < 1e-6 && (h(&out[1])[0] + 0.8).abs() < 1e-6);

    // A NaN gradient is refused, naming the parameter; no step is counted.
    let before = opt.steps_taken();
    let err = opt
        .step(
            vec![t(&[0.0], [1, 1]), t(&[0.0], [1, 1])],
            vec![t(&[1.0], [1, 1]), t(&[f64::NAN], [1, 1])],
        )
        .unwrap_err();
    assert_eq!(err, OptimError::NonFinite { param: "b".into() });
    assert_eq!(opt.steps_taken(), before);
}

#[test]
fn optimizer_state_round_trips_and_the_next_step_is_identical() {
    let (m, n) = (30, 20);
    let info = [matrix(n, m), vector("b")];
    for preset in [Preset::Smep, Preset::Sdmep, Preset::NaturalEp, Preset::Adam] {
        let mut config = preset.config().optimizer;
        if let UpdateRule::Dion { threshold, .. } = &mut config.update {
            *threshold = 0;
        }
        let mut a = CompositeOptimizer::new(config, &info).unwrap();
        let mut params = a.prepare(vec![t(&gaussianish(m, n, 1), [m, n]), t(&[0.1; 3], [1, 3])]);
        let grads = |s: u64| {
            vec![
                t(&gaussianish(m, n, s), [m, n]),
                t(&[0.3, -0.2, 0.1], [1, 3]),
            ]
        };
        for s in 0..3 {
            params = a.step(params, grads(s)).unwrap();
        }
        let mut b = CompositeOptimizer::new(config, &info).unwrap();
        b.load_state(&a.state()).unwrap();
        let pa = a.step(params.clone(), grads(9)).unwrap();
        let pb = b.step(params, grads(9)).unwrap();
        for (x, y) in pa.iter().zip(&pb) {
            assert_eq!(h(x), h(y), "{preset}: resumed step differs");
        }
    }
}

#[test]
fn every_invalid_option_is_rejected() {
    let ok = CompositeConfig::default();
    let info = [matrix(2, 2)];
    let bad = [
        CompositeConfig { lr: 0.0, ..ok },
        CompositeConfig { lr: f64::NAN, ..ok },
        CompositeConfig {
            vector_lr: Some(-1.0),
            ..ok
        },
        CompositeConfig {
            momentum: 1.0,
            ..ok
        },
        CompositeConfig {
            weight_decay: -0.1,
            ..ok
        },
        CompositeConfig {
            clip_norm: Some(0.0),
            ..ok
        },
        CompositeConfig {
            schedule: Schedule::Step {
                every: 0,
                gamma: 0.5,
            },
            ..ok
        },
        CompositeConfig {
            schedule: Schedule::Cosine {
                warmup: 10,
                total: 5,
                floor: 0.0,
            },
            ..ok
        },
        CompositeConfig {
            update: UpdateRule::Muon {
                ns_steps: 0,
                iteration: NsIteration::Quintic,
            },
            ..ok
        },
        CompositeConfig {
            update: UpdateRule::Dion {
                rank_frac: 0.0,
                threshold: 0,
                ns_steps: 5,
            },
            ..ok
        },
        CompositeConfig {
            update: UpdateRule::LowRank { rank_frac: 1.5 },
            ..ok
        },
        CompositeConfig {
            update: UpdateRule::Fisher {
                damping: 0.0,
                ema: 0.9,
                orthogonalize: false,
                ns_steps: 5,
            },
            ..ok
        },
        CompositeConfig {
            update: UpdateRule::Adam {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
            },
            momentum: 0.9,
            ..ok
        },
        CompositeConfig {
            constraint: Constraint::Spectral {
                gamma: 0.0,
                power_iters: 3,
                every: 1,
                tol: 0.0,
            },
            ..ok
        },
        CompositeConfig {
            constraint: Constraint::Spectral {
                gamma: 0.9,
                power_iters: 3,
                every: 0,
                tol: 0.0,
            },
            ..ok
        },
        CompositeConfig {
            feedback: Feedback::ErrorFeedback {
                beta: 0.0,
                rank_frac: Some(0.5),
            },
            ..ok
        },
        // No compression: error feedback would do nothing.
        CompositeConfig {
            feedback: Feedback::ErrorFeedback {
                beta: 0.9,
                rank_frac: None,
            },
            ..ok
        },
        CompositeConfig {
            feedback: Feedback::ErrorFeedback {
                beta: 0.9,
                rank_frac: Some(1.5),
            },
            ..ok
        },
    ];
    for (i, c) in bad.iter().enumerate() {
        assert!(
            matches!(
                CompositeOptimizer::new(*c, &info),
                Err(OptimError::InvalidOption { .. })
            ),
            "config {i} should be rejected: {c:?}"
        );
    }
    assert!(matches!(
        "smep-turbo".parse::<Preset>(),
        Err(ExperimentError::UnknownPreset(_))
    ));
    for (name, p) in Preset::ALL {
        assert_eq!(name.parse::<Preset>().unwrap(), p);
        p.config().for_steps(100).optimizer.validate().unwrap();
    }
    // Arity: a gradient list that does not match is an error.
    let mut opt = CompositeOptimizer::new(ok, &info).unwrap();
    assert!(matches!(
        opt.step(vec![t(&[0.0; 4], [2, 2])], vec![]),
        Err(OptimError::Arity { .. })
    ));
    let _ = VectorRule::Plain;
}

#[test]
fn checkpoints_restore_model_statistics_and_optimizer_state_exactly() {
    use mep::estimate::BackpropEstimator;
    use mep::loss::Loss;
    use mep::model::{LayerKind, NetworkBuilder, Shape};
    use mep::train::Trainer;
    let dir = common::scratch_dir("optim-checkpoint");
    let path = dir.join("run.safetensors");
    let build = || {
        let net = NetworkBuilder::new(Shape::Flat(6))
            .linear(8)
            .layer(LayerKind::BatchNorm)
            .relu()
            .linear(3)
            .build(4, &dev())
            .unwrap();
        let mut config = Preset::Sdmep.config().optimizer;
        if let UpdateRule::Dion { threshold, .. } = &mut config.update {
            *threshold = 0;
        }
        let opt = CompositeOptimizer::new(config, net.param_info()).unwrap();
        let est = BackpropEstimator::new(Loss::CrossEntropy { smoothing: 0.0 }).unwrap();
        Trainer::new(net, Box::new(est), Box::new(opt), dev())
    };
    let x: Vec<f32> = (0..4 * 6).map(|i| ((i * 37) % 11) as f32 / 11.0).collect();
    let labels = [0u32, 1, 2, 1];
    let mut a = build();
    for _ in 0..3 {
        a.train_step(&x, &labels, None).unwrap();
    }
    a.save_checkpoint(&path, &serde_json::json!({"epoch": 3}))
        .unwrap();
    let mut b = build();
    assert_eq!(b.load_checkpoint(&path).unwrap()["epoch"], 3);
    assert_eq!(a.model().running_stats(), b.model().running_stats());
    a.train_step(&x, &labels, None).unwrap();
    b.train_step(&x, &labels, None).unwrap();
    for (p, q) in a.model().params().iter().zip(b.model().params()) {
        assert_eq!(h(p), h(q));
    }
    // A checkpoint of another model is refused with a clear error.
    let other = NetworkBuilder::new(Shape::Flat(6))
        .linear(3)
        .build(0, &dev())
        .unwrap();
    let opt = CompositeOptimizer::new(CompositeConfig::default(), other.param_info()).unwrap();
    let est = BackpropEstimator::new(Loss::default()).unwrap();
    let mut c = Trainer::new(other, Box::new(est), Box::new(opt), dev());
    let err = c.load_checkpoint(&path).unwrap_err().to_string();
    assert!(err.contains("fc1.weight") && err.contains("shape"), "{err}");
    std::fs::write(dir.join("junk.safetensors"), b"not a checkpoint").unwrap();
    let err = c
        .load_checkpoint(&dir.join("junk.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a checkpoint"), "{err}");
    // Damaged contents are refused by name, before anything trains on them: a NaN weight,
    // an optimizer state of the wrong shape, a negative step counter.
    let original = std::fs::read(&path).unwrap();
    type Edit<'a> = &'a dyn Fn(&str, Vec<usize>, Vec<u8>) -> (Vec<usize>, Vec<u8>);
    let rewrite = |edit: Edit<'_>, scalars: Option<&str>| {
        let file = safetensors::SafeTensors::deserialize(&original).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&original).unwrap();
        let mut info = meta.metadata().clone().unwrap_or_default();
        if let Some(s) = scalars {
            info.insert("optim_scalars".into(), s.into());
        }
        let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = file
            .tensors()
            .into_iter()
            .map(|(n, v)| {
                let (shape, data) = edit(&n, v.shape().to_vec(), v.data().to_vec());
                (n, shape, data)
            })
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
            .iter()
            .map(|(n, shape, data)| {
                let view = safetensors::tensor::TensorView::new(
                    safetensors::Dtype::F32,
                    shape.clone(),
                    data,
                )
                .unwrap();
                (n.clone(), view)
            })
            .collect();
        let bytes = safetensors::serialize(views, Some(info)).unwrap();
        let damaged = dir.join("damaged.safetensors");
        std::fs::write(&damaged, bytes).unwrap();
        build().load_checkpoint(&damaged).unwrap_err().to_string()
    };
    let nan_weight = rewrite(
        &|n, shape, mut data| {
            if n == "param/fc1.weight" {
                data[..4].copy_from_slice(&f32::NAN.to_le_bytes());
            }
            (shape, data)
        },
        None,
    );
    assert!(
        nan_weight.contains("parameter fc1.weight holds a non-finite value"),
        "{nan_weight}"
    );
    let wrong_shape = rewrite(
        &|n, shape, data| {
            if n.starts_with("optim/") && n.ends_with(".momentum") {
                (vec![1, 1], data[..4].to_vec())
            } else {
                (shape, data)
            }
        },
        None,
    );
    assert!(
        wrong_shape.contains("does not fit parameter"),
        "{wrong_shape}"
    );
    let bad_step = rewrite(&|_, shape, data| (shape, data), Some(r#"{"step": -5.0}"#));
    assert!(bad_step.contains("step counter -5"), "{bad_step}");
}

#[test]
fn orthonormalisation_of_a_non_finite_matrix_returns_nan_at_once() {
    // Found by fuzzing checkpoint loading: an infinite Gram matrix made the Cholesky
    // jitter loop endless.
    let p = t(&[1.0, f64::INFINITY, 0.5, 2.0, 1.0, 3.0], [3, 2]);
    let q = mep::optim::linalg::orthonormalize_columns(p);
    assert!(h(&q).iter().all(|v| v.is_nan()));
    // A finite rank-deficient input still gets orthonormal columns (jitter).
    let p = t(&[1.0, 1.0, 2.0, 2.0, 3.0, 3.0], [3, 2]);
    let q = h(&mep::optim::linalg::orthonormalize_columns(p));
    assert!(q.iter().all(|v| v.is_finite()));
}

/// Without ranks or compression the parameters are updated independently, in parallel
/// when the pool has several workers: every parameter's update is the same computation
/// on any number of threads, so the steps are the same to the bit. smep's optimizer
/// (Muon, cubic, in the Gram space for the first matrix, spectral bound drawn at the first
/// step) and Adam, on matrices of unequal cost and vectors, three steps.
#[test]
fn independent_parameter_updates_give_the_same_bits_on_any_number_of_threads() {
    let info = [
        matrix(100, 40),
        vector("b1"),
        matrix(40, 24),
        vector("b2"),
        matrix(24, 6),
    ];
    let shapes = [[40, 100], [1, 40], [24, 40], [1, 24], [6, 24]];
    let tensors = |seed: u64| -> Vec<Tensor<2>> {
        shapes
            .iter()
            .enumerate()
            .map(|(i, &[m, n])| t(&gaussianish(m, n, seed + i as u64), [m, n]))
            .collect()
    };
    for config in [Preset::smep().optimizer, CompositeConfig::adam(0.01, 0.1)] {
        let run = |threads: usize| {
            on_threads(threads, || {
                let mut opt = CompositeOptimizer::new(config, &info).unwrap();
                let mut params = tensors(1);
                (0..3)
                    .map(|step| {
                        params = opt.step(params.clone(), tensors(10 + step)).unwrap();
                        params.iter().map(h).collect::<Vec<_>>()
                    })
                    .collect::<Vec<_>>()
            })
        };
        let one = run(1);
        for threads in [2, 3] {
            assert!(
                run(threads) == one,
                "{}: {threads} threads changed the steps",
                config.update.name()
            );
        }
    }
}

/// Gaussian-like tensors of `shapes` (one seed per tensor from `seed`).
fn seeded_tensors(shapes: &[[usize; 2]], seed: u64) -> Vec<Tensor<2>> {
    shapes
        .iter()
        .enumerate()
        .map(|(i, &[m, n])| {
            let v: Vec<f32> = gaussianish(m, n, seed + i as u64)
                .iter()
                .map(|&x| x as f32)
                .collect();
            Tensor::from_data(TensorData::new(v, [m, n]), &dev())
        })
        .collect()
}

/// Parameters (as `f64`) after each step, per step.
type Steps = Vec<Vec<Vec<f64>>>;

/// The parameters after each of two steps of `config` on `info` (parameters from seed 1,
/// gradients from seeds 10 and 11), in one process.
fn two_steps_alone(config: CompositeConfig, info: &[ParamInfo], shapes: &[[usize; 2]]) -> Steps {
    let mut opt = CompositeOptimizer::new(config, info).unwrap();
    let mut params = seeded_tensors(shapes, 1);
    (0..2)
        .map(|step| {
            params = opt
                .step(params.clone(), seeded_tensors(shapes, 10 + step))
                .unwrap();
            params.iter().map(h).collect()
        })
        .collect()
}

/// The same two steps on `size` ranks in threads, each with the whole gradient (Muon's
/// split shares only the Newton–Schulz work): per rank, its parameters after each step,
/// the values it sent and its exchanges.
fn two_steps_on_ranks(
    config: CompositeConfig,
    info: &[ParamInfo],
    shapes: &[[usize; 2]],
    size: usize,
) -> Vec<(Steps, usize, usize)> {
    let table = std::sync::Arc::new((
        std::sync::Mutex::new(vec![Vec::new(); size]),
        std::sync::Barrier::new(size),
    ));
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..size)
            .map(|rank| {
                let table = table.clone();
                scope.spawn(move || {
                    let split = std::rc::Rc::new(ThreadRanks {
                        rank,
                        size,
                        table,
                        sent: Default::default(),
                        calls: Default::default(),
                    });
                    let mut opt = CompositeOptimizer::new(config, info).unwrap();
                    opt.set_work_split(Some(split.clone()));
                    let mut params = seeded_tensors(shapes, 1);
                    let steps = (0..2)
                        .map(|step| {
                            params = opt
                                .step(params.clone(), seeded_tensors(shapes, 10 + step))
                                .unwrap();
                            params.iter().map(h).collect()
                        })
                        .collect();
                    (steps, split.sent.get(), split.calls.get())
                })
            })
            .collect();
        handles.into_iter().map(|t| t.join().unwrap()).collect()
    })
}

#[test]
fn muon_shared_between_two_ranks_takes_exactly_the_single_optimizers_step() {
    // smep's optimizer (Muon with the cubic iteration, spectral bound) on three matrices
    // of unequal cost and a vector; two steps so that momentum carries over.
    // Fan-out above fan-in, so that Muon's shape scale is not 1.
    let info = [matrix(24, 40), vector("b"), matrix(12, 24), matrix(6, 12)];
    let config = Preset::smep().optimizer;
    let shapes = [[24, 40], [1, 40], [12, 24], [6, 12]];
    let expected = two_steps_alone(config, &info, &shapes);
    for (rank, (steps, sent, _)) in two_steps_on_ranks(config, &info, &shapes, 2)
        .iter()
        .enumerate()
    {
        assert!(*sent > 0, "rank {rank} owns work");
        assert_eq!(steps, &expected, "rank {rank}");
    }
    // The largest matrix went to one rank, the two smaller ones to the other.
    assert_eq!(
        mep::optim::assign_owners(&[5.0, 0.0, 3.0, 1.0], 2),
        vec![0, 1, 1, 1]
    );
    assert_eq!(
        mep::optim::assign_owners(&[1.0, 1.0, 1.0], 3),
        vec![0, 1, 2]
    );
}

#[test]
fn muon_splits_a_dominant_matrix_by_panels_across_ranks_to_the_bit() {
    // A matrix holding most of the Newton–Schulz work (320 x 96: the Gram-space iteration
    // on the host, three row panels of every 96 x 96 product) is orthogonalised by all
    // ranks together, the small ones whole by their owners: two and three ranks take the
    // single optimizer's steps to the bit.
    let info = [matrix(320, 96), vector("b"), matrix(40, 24), matrix(12, 6)];
    let config = Preset::smep().optimizer;
    let shapes = [[320, 96], [1, 96], [40, 24], [12, 6]];
    let expected = two_steps_alone(config, &info, &shapes);
    for size in [2, 3] {
        for (rank, (steps, _, calls)) in two_steps_on_ranks(config, &info, &shapes, size)
            .iter()
            .enumerate()
        {
            assert_eq!(steps, &expected, "rank {rank} of {size}");
            // One exchange per product of the large matrix's iteration (the Gram matrix,
            // three per cubic step but the first and last, the final product), then the
            // small matrices' directions: 15 per step, where a split by whole matrices
            // makes one.
            assert_eq!(*calls, 2 * 15, "rank {rank} of {size}");
        }
    }
}

/// Rank `rank` of `size` ranks that run in threads of one process: each exchange puts
/// every rank's values in a shared table between two barriers.
#[derive(Debug)]
struct ThreadRanks {
    rank: usize,
    size: usize,
    table: std::sync::Arc<(std::sync::Mutex<Vec<Vec<f32>>>, std::sync::Barrier)>,
    sent: std::cell::Cell<usize>,
    calls: std::cell::Cell<usize>,
}

impl mep::optim::WorkSplit for ThreadRanks {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn exchange(&self, local: &[f32]) -> Result<Vec<Vec<f32>>, OptimError> {
        let (table, barrier) = &*self.table;
        table.lock().unwrap()[self.rank] = local.to_vec();
        barrier.wait();
        let all = table.lock().unwrap().clone();
        // Nobody writes the next exchange before everyone has read this one.
        barrier.wait();
        self.sent.set(self.sent.get() + local.len());
        self.calls.set(self.calls.get() + 1);
        Ok(all)
    }
}

#[test]
fn dion_across_ranks_exchanges_low_rank_factors_and_takes_the_single_optimizers_step() {
    // Dion (rank 0.25) on a 40x64 and a 30x48 matrix; a 12x24 one falls back to Muon (below
    // the threshold) and a vector to momentum SGD: those gradients are summed before the
    // step, the Dion ones stay with their rank. Three ranks, each with a third of each
    // gradient (unequal parts), against one optimizer given the sum.
    let info = [matrix(40, 64), vector("b"), matrix(30, 48), matrix(12, 24)];
    let shapes = [[40, 64], [1, 64], [30, 48], [12, 24]];
    let config = CompositeConfig {
        lr: 0.02,
        momentum: 0.9,
        weight_decay: 0.01,
        update: UpdateRule::Dion {
            rank_frac: 0.25,
            threshold: 1000,
            ns_steps: 5,
        },
        seed: 7,
        ..CompositeConfig::default()
    };
    let ranks = 3;
    let steps = 4;
    let part = |step: usize, rank: usize| -> Vec<Vec<f32>> {
        // Gradients that change from step to step, split unevenly between ranks.
        shapes
            .iter()
            .enumerate()
            .map(|(i, &[m, n])| {
                gaussianish(m, n, 100 * step as u64 + 10 * rank as u64 + i as u64)
                    .iter()
                    .map(|&x| x as f32 * (rank + 1) as f32)
                    .collect()
            })
            .collect()
    };
    let to_tensors = |vs: &[Vec<f32>]| -> Vec<Tensor<2>> {
        vs.iter()
            .zip(&shapes)
            .map(|(v, &s)| Tensor::from_data(TensorData::new(v.clone(), s), &dev()))
            .collect()
    };
    let start: Vec<Vec<f32>> = shapes
        .iter()
        .enumerate()
        .map(|(i, &[m, n])| {
            gaussianish(m, n, 900 + i as u64)
                .iter()
                .map(|&x| x as f32)
                .collect()
        })
        .collect();
    // One process: the summed gradient.
    let mut single = CompositeOptimizer::new(config, &info).unwrap();
    let mut params = to_tensors(&start);
    for step in 0..steps {
        let mut sum = part(step, 0);
        for r in 1..ranks {
            for (s, p) in sum.iter_mut().zip(part(step, r)) {
                s.iter_mut().zip(p).for_each(|(a, b)| *a += b);
            }
        }
        params = single.step(params, to_tensors(&sum)).unwrap();
    }
    let single_state = single.state();
    let expected: Vec<Vec<f64>> = params.iter().map(h).collect();
    // Three ranks in threads.
    let table = std::sync::Arc::new((
        std::sync::Mutex::new(vec![Vec::new(); ranks]),
        std::sync::Barrier::new(ranks),
    ));
    let (part, to_tensors, start, info) = (&part, &to_tensors, &start, &info);
    type RankResult = (Vec<Vec<f64>>, Vec<(String, Vec<f64>)>, usize, Vec<bool>);
    let results: Vec<RankResult> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..ranks)
            .map(|rank| {
                let table = table.clone();
                scope.spawn(move || {
                    let split = std::rc::Rc::new(ThreadRanks {
                        rank,
                        size: ranks,
                        table,
                        sent: Default::default(),
                        calls: Default::default(),
                    });
                    let mut opt = CompositeOptimizer::new(config, info).unwrap();
                    opt.set_work_split(Some(split.clone()));
                    let local = opt.reduces_across_ranks();
                    let mut params = to_tensors(start);
                    for step in 0..steps {
                        // Summed gradients for the parameters the optimizer does not reduce.
                        let mut grads = part(step, rank);
                        for (k, g) in grads.iter_mut().enumerate() {
                            if !local[k] {
                                *g = vec![0.0; g.len()];
                                for r in 0..ranks {
                                    g.iter_mut()
                                        .zip(&part(step, r)[k])
                                        .for_each(|(a, b)| *a += b);
                                }
                            }
                        }
                        params = opt.step(params, to_tensors(&grads)).unwrap();
                    }
                    let sent = split.sent.get();
                    opt.consolidate().unwrap();
                    let state = opt
                        .state()
                        .tensors
                        .iter()
                        .map(|(n, t)| (n.clone(), h(t)))
                        .collect();
                    (params.iter().map(h).collect(), state, sent, local)
                })
            })
            .collect();
        handles.into_iter().map(|t| t.join().unwrap()).collect()
    });
    for (rank, (params, state, sent, local)) in results.iter().enumerate() {
        assert_eq!(local, &vec![true, false, true, false], "rank {rank}");
        // Equal up to the sums' reassociation.
        for (k, (a, b)) in params.iter().zip(&expected).enumerate() {
            let rel = frob_diff(a, b) / b.iter().map(|v| v * v).sum::<f64>().sqrt();
            assert!(
                rel < 1e-5,
                "rank {rank}, parameter {k}: relative difference {rel}"
            );
        }
        // After consolidation every rank holds the single optimizer's whole state.
        assert_eq!(state.len(), single_state.tensors.len());
        for ((name, v), (single_name, t)) in state.iter().zip(&single_state.tensors) {
            assert_eq!(name, single_name);
            let w = h(t);
            let rel = frob_diff(v, &w) / w.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
            assert!(rel < 1e-4, "rank {rank}, {name}: relative difference {rel}");
        }
        // Per step, the factors `P` (m x r) and `R` (n x r) of the two Dion matrices:
        // (40 + 64) * 10 + (30 + 48) * 7 values, not the 40 * 64 + 30 * 48 of their
        // gradients; the consolidation adds the momenta once.
        let factors = (40 + 64) * 10 + (30 + 48) * 7;
        assert_eq!(*sent, steps * factors, "rank {rank}");
        assert!(factors * 2 < 40 * 64 + 30 * 48);
    }
}

#[test]
fn the_in_place_step_takes_the_by_value_steps_bits_and_a_refused_one_changes_nothing() {
    // The training loop lends the model's own parameters (`step_in_place`), which are then
    // updated in their own buffers; callers that keep their tensors use the by-value step.
    // Both must give the same parameters over several steps, for every kind of rule, and a
    // step refused for a non-finite gradient must leave the lent parameters as they were.
    let (m, n) = (9, 6);
    let info = [matrix(n, m), vector("b")];
    let configs = [
        CompositeConfig::adam(0.01, 0.1),
        CompositeConfig {
            update: UpdateRule::muon(),
            constraint: Constraint::spectral(1.0),
            ..CompositeConfig::default()
        },
        CompositeConfig {
            update: UpdateRule::Dion {
                rank_frac: 0.5,
                threshold: 1,
                ns_steps: 5,
            },
            ..CompositeConfig::default()
        },
        CompositeConfig {
            feedback: Feedback::ErrorFeedback {
                beta: 1.0,
                rank_frac: Some(0.5),
            },
            ..CompositeConfig::default()
        },
    ];
    let grads = |s: u64| {
        vec![
            t(&gaussianish(m, n, 20 + s), [m, n]),
            t(&[0.3, -0.1 * s as f64, 0.2], [1, 3]),
        ]
    };
    for config in configs {
        let start = vec![
            t(&gaussianish(m, n, 4), [m, n]),
            t(&[0.1, 0.2, -0.3], [1, 3]),
        ];
        let mut by_value = CompositeOptimizer::new(config, &info).unwrap();
        let mut in_place = by_value.clone();
        let mut kept = start.clone();
        let mut lent = start;
        for s in 0..3 {
            kept = by_value.step(kept, grads(s)).unwrap();
            in_place.step_in_place(&mut lent, grads(s), &[]).unwrap();
        }
        for (a, b) in kept.iter().zip(&lent) {
            assert_eq!(h(a), h(b), "{:?}", config.update);
        }
        let before: Vec<Vec<f64>> = lent.iter().map(h).collect();
        let mut bad = grads(7);
        bad[0] = t(&vec![f64::INFINITY; m * n], [m, n]);
        let err = in_place.step_in_place(&mut lent, bad, &[]).unwrap_err();
        assert!(matches!(err, OptimError::NonFinite { .. }), "{err:?}");
        assert_eq!(lent.iter().map(h).collect::<Vec<_>>(), before);
        assert_eq!(in_place.steps_taken(), 3);
    }
}
