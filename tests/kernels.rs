//! The host convolution and pooling kernels against burn's own ops: forward values
//! against burn's convolution and max pooling, vector-Jacobian products against burn's
//! autodiff of `sum(op(x) * g)`.

mod common;

use burn::tensor::TensorData;
use burn::tensor::module::{conv2d, max_pool2d};
use burn::tensor::ops::ConvOptions;
use mep::device::{CpuBackend, Device, Tensor, autodiff, cpu_device, into_host};
use mep::model::kernels::{ConvGeometry, PoolGeometry};

/// Deterministic values in [-1, 1) with no ties (a splitmix64 stream).
fn random(shape: [usize; 4], seed: u64, _dev: &Device) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    (0..shape.iter().product::<usize>())
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

fn tensor(values: &[f32], shape: [usize; 4], dev: &Device) -> Tensor<4> {
    Tensor::from_data(TensorData::new(values.to_vec(), shape), dev)
}

fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-4 * scale,
            "{what}[{i}]: kernel {g} vs burn {w}"
        );
    }
}

#[test]
fn convolution_kernels_match_burn_for_strides_and_padding() {
    let dev = cpu_device(CpuBackend::Flex);
    let ad = autodiff(&dev);
    // (batch, in, h, w, out, kernel, stride, padding). Samples are multiplied in blocks of
    // ceil(512 / output pixels): the first cases fit one block; 9 samples of 10 x 10
    // outputs make blocks of 6 and 3, and 30 x 30 outputs a block per sample. Stride 1
    // with 2 * padding + 1 == kernel is a "same" convolution, which has its own im2col
    // (one flat move per tap): 3 x 3 with padding 1 and 5 x 5 with padding 2, on square
    // and non-square images; stride 1 without padding is a "valid" one, with its own
    // im2col too. The kernel gradient takes more samples per product while their im2col
    // stays within 2^17 values: 40 samples of `cnn`'s first convolution (25 x 576 values
    // each) make groups of 9, 9, 9, 9 and 4.
    let cases = [
        (5, 3, 7, 9, 4, 3, 1, 1),
        (3, 2, 6, 5, 3, 5, 1, 2),
        (3, 3, 9, 7, 4, 3, 1, 0),
        (2, 2, 8, 8, 3, 3, 2, 1),
        (2, 1, 6, 6, 2, 5, 1, 2),
        (4, 5, 11, 10, 6, 4, 3, 2),
        (9, 2, 12, 12, 3, 3, 1, 0),
        (3, 1, 30, 30, 2, 3, 1, 1),
        (40, 1, 28, 28, 4, 5, 1, 0),
    ];
    for (seed, &(b, ci, h, w, co, k, s, p)) in cases.iter().enumerate() {
        let out_h = (h + 2 * p - k) / s + 1;
        let out_w = (w + 2 * p - k) / s + 1;
        let geo = ConvGeometry {
            in_channels: ci,
            in_h: h,
            in_w: w,
            out_channels: co,
            kernel: k,
            stride: s,
            padding: p,
            out_h,
            out_w,
        };
        let seed = seed as u64;
        let x = random([b, ci, h, w], seed, &dev);
        let wt = random([co, ci, k, k], seed + 10, &dev);
        let bias = random([co, 1, 1, 1], seed + 20, &dev);
        let g = random([b, co, out_h, out_w], seed + 30, &dev);
        let options = ConvOptions::new([s, s], [p, p], [1, 1], 1);

        // Forward against burn's convolution.
        let mut y = vec![0.0; b * geo.out_len()];
        geo.forward(&x, &wt, &bias, &mut y);
        let want = conv2d(
            tensor(&x, [b, ci, h, w], &dev),
            tensor(&wt, [co, ci, k, k], &dev),
            Some(Tensor::from_data(TensorData::new(bias.clone(), [co]), &dev)),
            options.clone(),
        );
        assert_close("forward", &y, &into_host(want));

        // VJPs against burn autodiff of sum(conv(x, w, b) * g).
        let xa = tensor(&x, [b, ci, h, w], &ad).require_grad();
        let wa = tensor(&wt, [co, ci, k, k], &ad).require_grad();
        let ba = Tensor::<1>::from_data(TensorData::new(bias.clone(), [co]), &ad).require_grad();
        let out = conv2d(xa.clone(), wa.clone(), Some(ba.clone()), options);
        let grads = (out * tensor(&g, [b, co, out_h, out_w], &ad))
            .sum()
            .backward();
        let mut gx = vec![0.0; x.len()];
        geo.input_vjp(&wt, &g, &mut gx);
        assert_close("input vjp", &gx, &into_host(xa.grad(&grads).unwrap()));
        let (mut gw, mut gb) = (vec![0.0; wt.len()], vec![0.0; co]);
        geo.param_vjp(&x, &g, &mut gw, &mut gb);
        assert_close("kernel vjp", &gw, &into_host(wa.grad(&grads).unwrap()));
        assert_close("bias vjp", &gb, &into_host(ba.grad(&grads).unwrap()));
    }
}

#[test]
fn max_pooling_kernels_match_burn_for_disjoint_and_overlapping_windows() {
    let dev = cpu_device(CpuBackend::Flex);
    let ad = autodiff(&dev);
    // (batch, channels, h, w, kernel, stride): the 2x2 fast path (with an odd edge that
    // floor mode drops) and overlapping 3x3 windows.
    for (seed, &(b, c, h, w, k, s)) in [(2, 3, 8, 9, 2, 2), (2, 2, 7, 7, 3, 2), (1, 2, 6, 5, 3, 1)]
        .iter()
        .enumerate()
    {
        let geo = PoolGeometry {
            channels: c,
            in_h: h,
            in_w: w,
            kernel: k,
            stride: s,
            out_h: (h - k) / s + 1,
            out_w: (w - k) / s + 1,
        };
        let x = random([b, c, h, w], seed as u64, &dev);
        let n = b * c * geo.out_h * geo.out_w;
        let g = random([b, c, geo.out_h, geo.out_w], seed as u64 + 5, &dev);
        let (mut y, mut idx) = (vec![0.0; n], vec![0u32; n]);
        geo.max_forward(&x, &mut y, &mut idx);
        let want = max_pool2d(
            tensor(&x, [b, c, h, w], &dev),
            [k, k],
            [s, s],
            [0, 0],
            [1, 1],
            false,
        );
        assert_close("pool forward", &y, &into_host(want));

        let xa = tensor(&x, [b, c, h, w], &ad).require_grad();
        let out = max_pool2d(xa.clone(), [k, k], [s, s], [0, 0], [1, 1], false);
        let grads = (out * tensor(&g, [b, c, geo.out_h, geo.out_w], &ad))
            .sum()
            .backward();
        let mut gx = vec![0.0; x.len()];
        geo.max_backward(&idx, &g, &mut gx);
        assert_close("pool vjp", &gx, &into_host(xa.grad(&grads).unwrap()));
    }
}

#[test]
fn a_nan_in_a_pooling_window_propagates() {
    let geo = PoolGeometry {
        channels: 1,
        in_h: 2,
        in_w: 4,
        kernel: 2,
        stride: 2,
        out_h: 1,
        out_w: 2,
    };
    let x = [1.0, f32::NAN, 0.5, 2.0, 3.0, 0.0, -1.0, 1.0];
    let (mut y, mut idx) = ([0.0; 2], [0u32; 2]);
    geo.max_forward(&x, &mut y, &mut idx);
    assert!(y[0].is_nan(), "NaN window gave {}", y[0]);
    assert_eq!((y[1], idx[1]), (2.0, 3));
}

#[test]
fn kernel_gradients_repeat_bit_for_bit_at_any_thread_count() {
    let geo = ConvGeometry {
        in_channels: 4,
        in_h: 10,
        in_w: 10,
        out_channels: 6,
        kernel: 3,
        stride: 1,
        padding: 1,
        out_h: 10,
        out_w: 10,
    };
    let dev = cpu_device(CpuBackend::Flex);
    let b = 37;
    let x = random([b, 4, 10, 10], 1, &dev);
    let g = random([b, 6, 10, 10], 2, &dev);
    let run = |threads: usize| {
        common::on_threads(threads, || {
            let (mut gw, mut gb) = (vec![0.0; 6 * geo.patch_len()], vec![0.0; 6]);
            geo.param_vjp(&x, &g, &mut gw, &mut gb);
            (gw, gb)
        })
    };
    let one = run(1);
    for threads in [2, 3, 4] {
        for _ in 0..3 {
            assert!(run(threads) == one, "{threads} threads changed the sum");
        }
    }
}
