//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use mep::data::download::{Downloader, NoProgress};
use mep::data::{DataLocator, LoadOptions};
use mep::device::{CpuBackend, Device, cpu_device};
use mep::estimate::TensorBatch;
use mep::model::{ModelSpec, Network, Shape};

/// The directory of real data sets, found as the CLI finds them: `$MEP_DATA_DIR` (CI sets it
/// to the shared copies), else `../shared/data` beside the checkout, else the user cache
/// (`mep data fetch`'s directory), into which MNIST and Fashion-MNIST are downloaded and
/// checked against their SHA-256 when missing, so `cargo test` passes on a fresh machine
/// with network.
pub fn data_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(find_data_dir).clone()
}

fn find_data_dir() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    if let Some(dir) = std::env::var_os("MEP_DATA_DIR").map(PathBuf::from) {
        let dir = if dir.is_relative() {
            root.join(dir)
        } else {
            dir
        };
        assert!(
            dir.join("mnist").is_dir(),
            "MEP_DATA_DIR={} holds no mnist folder",
            dir.display()
        );
        return dir;
    }
    let shared = root.join("../shared/data");
    if shared.join("mnist").is_dir() {
        return shared;
    }
    let locator = DataLocator::from_env(None);
    let cache = locator
        .download_dir()
        .expect("no MEP_DATA_DIR, no ../shared/data and no user cache directory");
    for name in ["mnist", "fashion-mnist"] {
        let spec = mep::data::find(name).unwrap();
        if mep::data::locate::locate_in(&cache, &spec).is_none() {
            Downloader::default()
                .fetch_dataset(&spec, None, &cache, &mut NoProgress)
                .unwrap_or_else(|e| panic!("fetching {name} for the tests: {e}"));
        }
    }
    cache
}

/// Runs the `mep` binary with `args`: data from `data` (none: no data directory at all)
/// and a scratch user cache, so runs never touch the user's files.
pub fn run_mep(args: &[&str], data: Option<&Path>) -> Output {
    run_mep_with(args, data, &[])
}

/// [`run_mep`] with the environment variables `env` set.
pub fn run_mep_with(args: &[&str], data: Option<&Path>, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mep"));
    cmd.args(args)
        .env_remove("MEP_DATA_DIR")
        .envs(env.iter().copied());
    // Shared by concurrent runs, so created, never emptied.
    let cache = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("mep-cache-home");
    std::fs::create_dir_all(&cache).expect("create the scratch cache");
    cmd.env("XDG_CACHE_HOME", cache);
    if let Some(d) = data {
        cmd.env("MEP_DATA_DIR", d);
    }
    cmd.output().expect("run mep")
}

/// What a run printed on stderr.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The CPU device the tests run on (burn-flex).
pub fn dev() -> Device {
    cpu_device(CpuBackend::Flex)
}

/// The network of a model spec on `input`, initialised from `seed`.
pub fn network(spec: &str, input: Shape, seed: u64, dev: &Device) -> Network {
    spec.parse::<ModelSpec>()
        .unwrap_or_else(|e| panic!("{spec}: {e}"))
        .build(input, seed, dev)
        .unwrap_or_else(|e| panic!("{spec} on {input}: {e}"))
}

/// The first `n` MNIST training samples as a batch (inputs in [0, 1], one-hot targets).
pub fn mnist_batch(n: usize, dev: &Device) -> TensorBatch {
    let options = LoadOptions {
        train_samples: Some(n),
        test_samples: Some(1),
        ..Default::default()
    };
    let data = mep::data::load("mnist", &locator(), &options, 0).unwrap();
    TensorBatch::new(data.train.inputs(), data.train.labels(), 10, dev)
}

/// Locates the test data as the CLI does with `MEP_DATA_DIR` = [`data_dir`].
pub fn locator() -> DataLocator {
    DataLocator::new(None, Some(data_dir()), None)
}

/// A fresh empty directory under the target dir, removed first if it exists.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// An IDX image file's bytes, built by hand: magic, dims, payload.
pub fn idx_bytes(magic: u32, dims: &[u32], payload: &[u8]) -> Vec<u8> {
    let mut out = magic.to_be_bytes().to_vec();
    for d in dims {
        out.extend_from_slice(&d.to_be_bytes());
    }
    out.extend_from_slice(payload);
    out
}

/// Gzips bytes.
pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

/// Singular value decomposition of a row-major `m x n` matrix by one-sided Jacobi rotations
/// in f64 (independent of the library): `(u [m x k], s [k], v [n x k])` with `k = min(m, n)`,
/// singular values in decreasing order.
pub fn svd(a: &[f64], m: usize, n: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    if m < n {
        let t: Vec<f64> = (0..n * m).map(|i| a[(i % m) * n + i / m]).collect();
        let (u, s, v) = svd(&t, n, m);
        return (v, s, u);
    }
    // Columns of `w` are rotated until orthogonal; `v` accumulates the rotations.
    let mut w = a.to_vec();
    let mut v: Vec<f64> = (0..n * n)
        .map(|i| if i / n == i % n { 1.0 } else { 0.0 })
        .collect();
    for _sweep in 0..60 {
        let mut off = 0.0f64;
        for p in 0..n {
            for q in p + 1..n {
                let (mut alpha, mut beta, mut gamma) = (0.0, 0.0, 0.0);
                for i in 0..m {
                    let (x, y) = (w[i * n + p], w[i * n + q]);
                    alpha += x * x;
                    beta += y * y;
                    gamma += x * y;
                }
                if gamma.abs() < 1e-300 {
                    continue;
                }
                off = off.max(gamma.abs() / (alpha * beta).sqrt().max(1e-300));
                let zeta = (beta - alpha) / (2.0 * gamma);
                let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
                let t = if zeta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (1.0 + t * t).sqrt();
                let s = c * t;
                for i in 0..m {
                    let (x, y) = (w[i * n + p], w[i * n + q]);
                    w[i * n + p] = c * x - s * y;
                    w[i * n + q] = s * x + c * y;
                }
                for i in 0..n {
                    let (x, y) = (v[i * n + p], v[i * n + q]);
                    v[i * n + p] = c * x - s * y;
                    v[i * n + q] = s * x + c * y;
                }
            }
        }
        if off < 1e-14 {
            break;
        }
    }
    let mut order: Vec<(f64, usize)> = (0..n)
        .map(|j| ((0..m).map(|i| w[i * n + j].powi(2)).sum::<f64>().sqrt(), j))
        .collect();
    order.sort_by(|a, b| b.0.total_cmp(&a.0));
    let k = n;
    let mut u = vec![0.0; m * k];
    let mut vv = vec![0.0; n * k];
    let mut s = vec![0.0; k];
    for (col, &(sigma, j)) in order.iter().enumerate() {
        s[col] = sigma;
        for i in 0..m {
            u[i * k + col] = if sigma > 0.0 {
                w[i * n + j] / sigma
            } else {
                0.0
            };
        }
        for i in 0..n {
            vv[i * k + col] = v[i * n + j];
        }
    }
    (u, s, vv)
}

/// A random `m x k` matrix with orthonormal columns (Gram-Schmidt of a seeded Gaussian-ish
/// matrix), row-major.
pub fn random_orthonormal(m: usize, k: usize, seed: u64) -> Vec<f64> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64 - 0.5
    };
    let mut q = vec![0.0; m * k];
    for j in 0..k {
        let mut col: Vec<f64> = (0..m).map(|_| next()).collect();
        for _ in 0..2 {
            for p in 0..j {
                let dot: f64 = (0..m).map(|i| col[i] * q[i * k + p]).sum();
                for i in 0..m {
                    col[i] -= dot * q[i * k + p];
                }
            }
        }
        let norm = col.iter().map(|x| x * x).sum::<f64>().sqrt();
        for i in 0..m {
            q[i * k + j] = col[i] / norm;
        }
    }
    q
}

/// A seeded `m x n` matrix with roughly Gaussian entries (a random unit vector scaled by
/// `m n / 3`), row-major.
pub fn gaussianish(m: usize, n: usize, seed: u64) -> Vec<f64> {
    let q = random_orthonormal(m * n, 1, seed);
    q.iter().map(|x| x * (m * n) as f64 / 3.0).collect()
}

/// The quintic Newton–Schulz map in exact (f64) arithmetic through the SVD:
/// `U f(S / |G|_F) V^T` with `f` the scalar quintic iterated `steps` times.
pub fn exact_quintic(g: &[f64], m: usize, n: usize, steps: usize) -> Vec<f64> {
    exact_newton_schulz(g, m, n, steps, (3.4445, -4.7750, 2.0315))
}

/// `steps` Newton–Schulz steps `y <- a y + b y^3 + c y^5` applied in exact arithmetic to
/// the singular values of `g / ||g||_F`, through the SVD.
pub fn exact_newton_schulz(
    g: &[f64],
    m: usize,
    n: usize,
    steps: usize,
    (a, b, c): (f64, f64, f64),
) -> Vec<f64> {
    let (u, s, v) = svd(g, m, n);
    let k = m.min(n);
    let norm = s.iter().map(|x| x * x).sum::<f64>().sqrt();
    let f: Vec<f64> = s
        .iter()
        .map(|&x| {
            let mut y = x / norm;
            for _ in 0..steps {
                y = a * y + b * y.powi(3) + c * y.powi(5);
            }
            y
        })
        .collect();
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            out[i * n + j] = (0..k).map(|q| u[i * k + q] * f[q] * v[j * k + q]).sum();
        }
    }
    out
}

/// `f` run in a fresh rayon pool of `threads` workers (the kernels see that many threads).
pub fn on_threads<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("a rayon pool")
        .install(f)
}
