//! Matrix routines of the geometry-aware updates: Newton–Schulz orthogonalisation, power
//! iteration, and Cholesky-QR.
//!
//! Everything stays on the device except Cholesky-QR's `r x r` factorisation (`r` is a
//! low rank), which is done on the host in f64.

use burn::tensor::TensorData;
use rayon::prelude::*;

use super::{OptimError, WorkSplit};
use crate::device::{Tensor, to_host};
use crate::model::kernels::{MatRef, lane_dot, lane_sum_squares, matmul, matmul_into};

/// Which Newton–Schulz iteration orthogonalises a matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NsIteration {
    /// Keller Jordan's quintic `X <- a X + (b A + c A^2) X`, `A = X X^T`, with
    /// `(a, b, c) = (3.4445, -4.7750, 2.0315)`: drives every singular value into roughly
    /// `[0.7, 1.2]` in 5 steps.
    Quintic,
    /// The reference's cubic `X <- 1.5 X - 0.5 X X^T X`: converges to exactly 1, but small
    /// singular values grow only 1.5x per step.
    Cubic,
}

impl std::str::FromStr for NsIteration {
    type Err = String;

    /// `quintic` or `cubic`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "quintic" => Ok(Self::Quintic),
            "cubic" => Ok(Self::Cubic),
            other => Err(format!(
                "unknown Newton–Schulz iteration `{other}` (known: quintic, cubic)"
            )),
        }
    }
}

/// Quintic Newton–Schulz coefficients.
pub const QUINTIC: (f32, f32, f32) = (3.4445, -4.7750, 2.0315);

/// Cubic Newton–Schulz coefficients (`c = 0`: no `A^2` term).
pub const CUBIC: (f32, f32, f32) = (1.5, -0.5, 0.0);

impl NsIteration {
    /// Muon's iteration unless asked otherwise: the quintic, which trains short runs of
    /// convolutional nets better. The paper's presets use the cubic, as the reference does
    /// (see `Preset::smep`).
    pub const DEFAULT: Self = Self::Quintic;

    /// The iteration's name: `quintic` or `cubic`.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Quintic => "quintic",
            Self::Cubic => "cubic",
        }
    }

    /// `(a, b, c)` of the step `X <- a X + (b A + c A^2) X`, `A = X X^T`.
    pub const fn coefficients(self) -> (f32, f32, f32) {
        match self {
            Self::Quintic => QUINTIC,
            Self::Cubic => CUBIC,
        }
    }
}

/// `||x||_F` as a `[1, 1]` tensor (no host read).
pub(crate) fn frobenius(x: &Tensor<2>) -> Tensor<2> {
    x.clone().square().sum().sqrt().reshape([1, 1])
}

/// Approximately `U V^T` of `g = U S V^T`: Frobenius pre-normalisation, then `steps`
/// iterations on the wide orientation (the Gram matrix is the smaller one).
///
/// For a wide `r x c` matrix with `c >= 2r` and at most [`GRAM_SPACE_MAX_STEPS`] steps
/// (the presets use 5), the iterations run in the `r x r` Gram space
/// (see [`newton_schulz_direct`] for the textbook form, which gives the same result up to
/// rounding): each iterate is `X_k = Q_k X_0` with `Q_k` a polynomial in `G = X_0 X_0^T`,
/// so `A_k = X_k X_k^T = Q_k G Q_k`; all of them commute, so `A_{k+1} = p(A_k)^2 A_k` and
/// `Q_{k+1} = p(A_k) Q_k` need only `r x r` products, and `X_0` is multiplied once at the
/// end: the `r^2 c` products are paid twice in all instead of twice per step. (Forming
/// `Q G Q` instead costs as much but multiplies by `Q`, which grows like `3.44^k` on
/// directions with tiny singular values, and lost up to 8% of the result to rounding.)
/// For 784 x 256 and 5 quintic steps that is 0.78 instead of 1.20 GFLOP, for 5 cubic
/// steps 0.61 instead of 1.03 ([`newton_schulz_flops`]).
///
/// On a CPU device in f32 the Gram-space iteration runs on host buffers
/// ([`newton_schulz_host`]), where every `r x r` product is symmetric and only its blocks
/// on and above the diagonal are computed; elsewhere it runs on the device with burn's ops
/// ([`newton_schulz_on_device`]).
pub fn newton_schulz(g: Tensor<2>, steps: usize, iteration: NsIteration) -> Tensor<2> {
    if !uses_gram_space(g.dims(), steps, iteration) {
        return newton_schulz_direct(g, steps, iteration);
    }
    if crate::device::host_f32(&g) {
        let [rows, cols] = g.dims();
        let device = g.device();
        // The optimizer hands over its own copy of the momentum, which this moves without
        // a copy (a shared tensor is copied).
        let g = crate::device::into_host(g);
        let out = crate::device::on_workers(|| newton_schulz_host(g, rows, cols, steps, iteration));
        return Tensor::from_data(TensorData::new(out, [rows, cols]), &device);
    }
    newton_schulz_on_device(g, steps, iteration)
}

/// Whether [`newton_schulz`] of `x` runs on host buffers ([`newton_schulz_host`]), whose
/// products the ranks of a data-parallel run can share ([`newton_schulz_shared`]).
pub fn runs_on_host(x: &Tensor<2>, steps: usize, iteration: NsIteration) -> bool {
    uses_gram_space(x.dims(), steps, iteration) && crate::device::host_f32(x)
}

/// [`newton_schulz`] of a matrix that [`runs_on_host`], its products shared among the
/// ranks of `split` ([`newton_schulz_host_shared`]): every rank must call it with the
/// same matrix; every rank gets the whole result, the same bits as one process. Runs on
/// the calling thread, which makes the exchanges.
pub fn newton_schulz_shared(
    g: Tensor<2>,
    steps: usize,
    iteration: NsIteration,
    split: &dyn WorkSplit,
) -> Result<Tensor<2>, OptimError> {
    let [rows, cols] = g.dims();
    let device = g.device();
    let g = crate::device::into_host(g);
    let out = newton_schulz_host_shared(g, rows, cols, steps, iteration, split)?;
    Ok(crate::device::from_host(out, [rows, cols], &device))
}

/// The Gram-space iteration of [`newton_schulz`] with burn's ops, on any device (for a
/// wide orientation `c >= 2r`; any shape gives the same map).
pub fn newton_schulz_on_device(g: Tensor<2>, steps: usize, iteration: NsIteration) -> Tensor<2> {
    let [rows, cols] = g.dims();
    let r = rows.min(cols);
    let tall = rows > cols;
    let x = if tall { g.transpose() } else { g };
    let x = x.clone() / frobenius(&x).add_scalar(1e-7);
    let mut a = x.clone().matmul(x.clone().transpose());
    let mut q: Option<Tensor<2>> = None;
    let (qa, qb, qc) = iteration.coefficients();
    for step in 0..steps {
        let mut p = a.clone().mul_scalar(qb);
        if qc != 0.0 {
            p = p + a.clone().matmul(a.clone()).mul_scalar(qc);
        }
        let p = p.add(Tensor::eye(r, &x.device()).mul_scalar(qa));
        q = Some(match q {
            None => p.clone(),
            Some(q) => p.clone().matmul(q),
        });
        if step + 1 < steps {
            // A_{k+1} = p(A_k)^2 A_k: every matrix here is a polynomial in G, so they
            // commute, and this recurrence never multiplies by the growing Q.
            a = p.clone().matmul(p.matmul(a));
        }
    }
    let out = q.expect("at least one step").matmul(x);
    if tall { out.transpose() } else { out }
}

/// `v` as a row-major `r x r` matrix.
fn square(v: &[f32], r: usize) -> MatRef<'_> {
    MatRef::new(v, r, r)
}

/// Block size of the symmetric products of [`newton_schulz_host`].
const SYMMETRIC_BLOCK: usize = 32;

/// `dst = lhs * rhs` (`r x r`, row-major) for a product known to be symmetric: only the
/// `SYMMETRIC_BLOCK`-sized blocks on and above the diagonal are multiplied (for `r = 256`,
/// 36 of 64 blocks), one product per row panel (8 calls instead of 36: about 4% faster on
/// the AVX-512 kernels), then the upper triangle is mirrored onto the lower one, so the result
/// is exactly symmetric. (Mirroring only the blocks below the diagonal left the diagonal
/// blocks' rounding asymmetric, and the Gram-space iteration amplified that: 3e-3 instead
/// of 3e-4 relative error on a rank-64 784 x 256 input.)
///
/// With `panels` sharing the work among ranks, each rank multiplies the row panels it owns
/// and every rank receives the others' (their upper parts) before mirroring: the same
/// products, so the same bits, as one process.
fn symmetric_product(
    dst: &mut [f32],
    lhs: MatRef<'_>,
    rhs: MatRef<'_>,
    panels: &Panels<'_>,
) -> Result<(), OptimError> {
    let r = lhs.rows();
    debug_assert_eq!(rhs.cols(), r);
    // Panel p multiplies its row of blocks from the diagonal on.
    let owners = panels.owners(r.div_ceil(SYMMETRIC_BLOCK), |p| {
        (r - p * SYMMETRIC_BLOCK) as f64
    });
    // One product per row panel, from its diagonal block to the right edge: the same
    // blocks, in calls wide enough to run at GEMM speed.
    owned_row_panels(dst, r, &owners, panels.rank(), |i, panel| {
        let bi = panel.len() / r;
        matmul_into(
            panel,
            r,
            0,
            i,
            lhs.sub_rows(i, bi),
            rhs.sub_cols(i, r - i),
            false,
        );
    });
    panels.share(dst, r, &owners, |p| p * SYMMETRIC_BLOCK)?;
    // Then each row panel takes its part of the lower triangle from the upper one, tile by
    // tile so that both the reads and the writes stay in cache.
    let n = r.div_ceil(SYMMETRIC_BLOCK);
    let base = SharedMut(dst.as_mut_ptr());
    let mirror = |panel: usize| {
        let i0 = panel * SYMMETRIC_BLOCK;
        for j0 in (0..=i0).step_by(SYMMETRIC_BLOCK) {
            for i in i0..(i0 + SYMMETRIC_BLOCK).min(r) {
                for j in j0..(j0 + SYMMETRIC_BLOCK).min(i) {
                    // SAFETY: `i, j < r`, so both offsets lie inside `dst` (`r x r`, checked
                    // by the products above). Every write is below the diagonal (`j < i`),
                    // every read above it, and each panel writes only its own rows: no
                    // element is written twice or both written and read, and `dst` itself
                    // is not used while the pointer is.
                    unsafe { *base.at(i * r + j) = *base.at(j * r + i) };
                }
            }
        }
    };
    // Largest first: panel `i` mirrors `i + 1` tiles.
    crate::device::self_scheduled(n, |t| mirror(n - 1 - t));
    Ok(())
}

/// Who multiplies which row panels of [`newton_schulz_host`]'s products: this process
/// alone, or the ranks of a [`WorkSplit`], each its share of every product's panels
/// ([`super::assign_owners`] by the panels' costs), exchanged after each product through
/// buffers kept for the whole iteration.
struct Panels<'a> {
    split: Option<&'a dyn WorkSplit>,
    /// This rank's panels, packed; every rank's, gathered.
    buffers: std::cell::RefCell<(Vec<f32>, Vec<f32>)>,
}

impl<'a> Panels<'a> {
    fn new(split: Option<&'a dyn WorkSplit>) -> Self {
        Self {
            split,
            buffers: Default::default(),
        }
    }

    fn rank(&self) -> usize {
        self.split.map_or(0, |s| s.rank())
    }

    /// The owner of each of `n` panels costing `cost(p)`.
    fn owners(&self, n: usize, cost: impl Fn(usize) -> f64) -> Vec<usize> {
        match self.split {
            None => vec![0; n],
            Some(split) => {
                super::assign_owners(&(0..n).map(cost).collect::<Vec<_>>(), split.size())
            }
        }
    }

    /// Gives every rank the panels of `dst` (row-major, `cols` wide, panels of
    /// [`SYMMETRIC_BLOCK`] rows) that their owners computed: of panel `p`, columns
    /// `first(p)..cols` of each row.
    fn share(
        &self,
        dst: &mut [f32],
        cols: usize,
        owners: &[usize],
        first: impl Fn(usize) -> usize,
    ) -> Result<(), OptimError> {
        let Some(split) = self.split else {
            return Ok(());
        };
        let me = split.rank();
        let rows = dst.len() / cols.max(1);
        let rows_of = |p: usize| p * SYMMETRIC_BLOCK..((p + 1) * SYMMETRIC_BLOCK).min(rows);
        let mut buffers = self.buffers.borrow_mut();
        let (local, gathered) = &mut *buffers;
        local.clear();
        for (p, _) in owners.iter().enumerate().filter(|(_, o)| **o == me) {
            for row in rows_of(p) {
                local.extend_from_slice(&dst[row * cols + first(p)..(row + 1) * cols]);
            }
        }
        let counts = split.exchange_into(local, gathered)?;
        let all = super::split_parts(gathered, &counts);
        let mut at = vec![0; all.len()];
        for (p, &owner) in owners.iter().enumerate().filter(|(_, o)| **o != me) {
            for row in rows_of(p) {
                let len = cols - first(p);
                let part = all
                    .get(owner)
                    .and_then(|part| part.get(at[owner]..at[owner] + len))
                    .ok_or_else(|| {
                        OptimError::Exchange(format!(
                            "rank {owner} sent too few Newton–Schulz panel values"
                        ))
                    })?;
                dst[row * cols + first(p)..(row + 1) * cols].copy_from_slice(part);
                at[owner] += len;
            }
        }
        Ok(())
    }
}

/// [`row_panels`] restricted to the panels `owners` gives to `me`.
fn owned_row_panels(
    dst: &mut [f32],
    cols: usize,
    owners: &[usize],
    me: usize,
    f: impl Fn(usize, &mut [f32]) + Sync + Send,
) {
    row_panels(dst, cols, |i, panel| {
        if owners.get(i / SYMMETRIC_BLOCK) == Some(&me) {
            f(i, panel);
        }
    });
}

/// A raw pointer into a buffer whose threads write disjoint elements (`Send` and `Sync`:
/// the caller keeps the writes disjoint from each other and from the reads).
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);

// SAFETY: see the type's documentation; every use states why its accesses are disjoint.
unsafe impl Send for SharedMut {}
// SAFETY: as above.
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// The element at `offset`.
    ///
    /// # Safety
    /// `offset` must lie inside the buffer.
    unsafe fn at(self, offset: usize) -> *mut f32 {
        // SAFETY: the caller keeps `offset` inside the buffer.
        unsafe { self.0.add(offset) }
    }
}

/// `f(first_row, panel)` on each panel of [`SYMMETRIC_BLOCK`] rows of the row-major `dst`
/// (`cols` wide), on the pool's workers when it has more than one
/// ([`crate::device::self_scheduled`], in row order: the upper-triangle panels of
/// [`symmetric_product`] shrink down the matrix). Each panel is one product whatever the
/// number of workers, so the result does not depend on it.
fn row_panels(dst: &mut [f32], cols: usize, f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    let len = SYMMETRIC_BLOCK * cols.max(1);
    crate::device::each_self_scheduled(dst.chunks_mut(len).collect(), |p, rows| {
        f(p * SYMMETRIC_BLOCK, rows);
    });
}

/// `sum v^2` in f64, in eight interleaved partial sums (which vectorise).
fn sum_of_squares(values: &[f32]) -> f64 {
    let mut partial = [0f64; 8];
    let chunks = values.chunks_exact(8);
    let tail: f64 = chunks
        .remainder()
        .iter()
        .map(|&v| f64::from(v).powi(2))
        .sum();
    for chunk in chunks {
        for (p, &v) in partial.iter_mut().zip(chunk) {
            *p += f64::from(v) * f64::from(v);
        }
    }
    partial.iter().sum::<f64>() + tail
}

/// [`sum_of_squares`] of `v` (row-major, `cols` wide) by panels of [`SYMMETRIC_BLOCK`]
/// rows on the pool's workers, the panels' sums added in order: the same value on any
/// number of workers.
fn panel_sum_of_squares(v: &[f32], cols: usize) -> f64 {
    let len = SYMMETRIC_BLOCK * cols.max(1);
    if crate::device::threads() == 1 {
        return v.chunks(len).map(sum_of_squares).sum();
    }
    let sums: Vec<f64> = v.par_chunks(len).map(sum_of_squares).collect();
    sums.iter().sum()
}

/// `src` (row-major `rows x cols`) transposed and scaled into `dst` (`cols x rows`), by
/// row panels of `dst` shared among the pool's workers
/// ([`crate::model::kernels::transpose_rows_into`]).
fn transpose_scaled(src: &[f32], rows: usize, cols: usize, scale: f32, dst: &mut [f32]) {
    row_panels(dst, rows, |j0, panel| {
        crate::model::kernels::transpose_rows_into(src, rows, cols, scale, j0, panel);
    });
}

/// The Newton–Schulz map of [`newton_schulz`] in the Gram space on host buffers (`g`
/// row-major `rows x cols`, wide or tall). `Q_k`, `G` and every `A_k` are polynomials
/// in `G`, so they are symmetric and commute, and each `r x r` product (`A^2`, `p(A) A`,
/// `p(A) (p(A) A)`, `p(A) Q`) is symmetric: `symmetric_product` computes 36 of its 64
/// blocks at `r = 256`, and `G = X X^T` likewise. Only the final `Q X` is a full product.
/// 784 x 256, 5 steps: 0.48 instead of 0.78 GFLOP; measured on one thread 4.7-4.8 ms
/// against 6.4-6.5 ms for [`newton_schulz_on_device`] on the CPU (blocks of 16, 64 and 128
/// took 5.0, 5.1-5.2 and 5.5 ms). On a pool of several workers every product, mirror,
/// transposition and `p(A)` is shared among them by row panels (see `row_panels`; call
/// it through [`crate::device::on_workers`]): `mep bench muon`, 784-256-128-10, cubic, one
/// update of all three matrices, 4.8-4.9 ms on one thread and 2.9-3.2 ms on two.
pub fn newton_schulz_host(
    g: Vec<f32>,
    rows: usize,
    cols: usize,
    steps: usize,
    iteration: NsIteration,
) -> Vec<f32> {
    newton_schulz_panels(g, rows, cols, steps, iteration, &Panels::new(None))
        .expect("no exchange without ranks")
}

/// [`newton_schulz_host`] with every product's row panels shared among the ranks of
/// `split`: each rank multiplies its share of the panels ([`super::assign_owners`] by
/// cost) and receives the others' after each product, so every rank returns the whole
/// result, the same bits as one process. One exchange per product (14 for 5 cubic steps,
/// each of about half an `r x r` matrix in all), so it pays only on large matrices.
pub fn newton_schulz_host_shared(
    g: Vec<f32>,
    rows: usize,
    cols: usize,
    steps: usize,
    iteration: NsIteration,
    split: &dyn WorkSplit,
) -> Result<Vec<f32>, OptimError> {
    newton_schulz_panels(g, rows, cols, steps, iteration, &Panels::new(Some(split)))
}

fn newton_schulz_panels(
    g: Vec<f32>,
    rows: usize,
    cols: usize,
    steps: usize,
    iteration: NsIteration,
    panels: &Panels<'_>,
) -> Result<Vec<f32>, OptimError> {
    assert_eq!(
        g.len(),
        rows * cols,
        "newton_schulz_host: g is not rows x cols"
    );
    let (r, c) = (rows.min(cols), rows.max(cols));
    let tall = rows > cols;
    // In f64: the quintic is not scale-invariant, and an f32 running sum over 2e5 squares
    // is off by about 1e-5.
    let norm = (panel_sum_of_squares(&g, cols).sqrt() + 1e-7) as f32;
    // X: the scaled input in its wide orientation, row-major `r x c` (a tall input is
    // transposed once, so that every product below reads contiguous rows; a wide one is
    // scaled in its own buffer). The buffer X leaves behind takes the output.
    let (scaled, mut out) = if tall {
        let mut t = vec![0.0; r * c];
        transpose_scaled(&g, rows, cols, 1.0 / norm, &mut t);
        (t, g)
    } else {
        let mut t = g;
        row_panels(&mut t, c, |_, panel| {
            for v in panel {
                *v /= norm;
            }
        });
        (t, vec![0.0; rows * cols])
    };
    let x = MatRef::new(&scaled, r, c);
    let (qa, qb, qc) = iteration.coefficients();
    // The `r x r` matrices live in this thread's kernel scratch, kept between calls (an
    // optimizer step orthogonalises the same shapes every time; zeroing fresh ones cost a
    // serial pass over 1.3 MB per 784 x 256 matrix). Every value is written before read.
    crate::model::kernels::with_scratch(5 * r * r, 0, |scratch, _| {
        let (a, rest) = scratch.split_at_mut(r * r);
        let (a2, rest) = rest.split_at_mut(r * r);
        let (p, rest) = rest.split_at_mut(r * r);
        let (mut q, mut tmp) = rest.split_at_mut(r * r);
        symmetric_product(a, x, x.t(), panels)?;
        for step in 0..steps {
            if qc != 0.0 {
                symmetric_product(a2, square(a, r), square(a, r), panels)?;
            }
            // p = qa I + qb A (+ qc A^2), by row panels.
            row_panels(p, r, |i0, panel| {
                let at = i0 * r..i0 * r + panel.len();
                if qc != 0.0 {
                    for ((pi, &ai), &a2i) in panel.iter_mut().zip(&a[at.clone()]).zip(&a2[at]) {
                        *pi = qb * ai + qc * a2i;
                    }
                } else {
                    for (pi, &ai) in panel.iter_mut().zip(&a[at]) {
                        *pi = qb * ai;
                    }
                }
                for k in 0..panel.len() / r {
                    panel[k * r + i0 + k] += qa;
                }
            });
            if step == 0 {
                q.copy_from_slice(p);
            } else {
                symmetric_product(tmp, square(p, r), square(q, r), panels)?;
                std::mem::swap(&mut q, &mut tmp);
            }
            if step + 1 < steps {
                // A_{k+1} = p(A_k) (p(A_k) A_k).
                symmetric_product(tmp, square(p, r), square(a, r), panels)?;
                symmetric_product(a, square(p, r), square(tmp, r), panels)?;
            }
        }
        let q = MatRef::new(q, r, r);
        // By row panels of the output: out^T = Q X, i.e. a tall input's out = X^T Q
        // (c x r).
        let (lhs, rhs) = if tall { (x.t(), q) } else { (q, x) };
        let width = rhs.cols();
        let owners = panels.owners((out.len() / width).div_ceil(SYMMETRIC_BLOCK), |_| 1.0);
        owned_row_panels(&mut out, width, &owners, panels.rank(), |i, panel| {
            let rows = panel.len() / width;
            matmul(panel, lhs.sub_rows(i, rows), rhs, false);
        });
        panels.share(&mut out, width, &owners, |_| 0)
    })?;
    Ok(out)
}

/// Whether [`newton_schulz`] iterates in the Gram space: wide enough (`c >= 2r`) for the
/// saving, and only for at most [`GRAM_SPACE_MAX_STEPS`] steps. `Q_k` grows like
/// `a^k` (quintic a = 3.4445, cubic 1.5) on a direction with a tiny singular value while `G` is rounded
/// relative to its largest one, so `Q G Q` loses about `a^(2k)` f32 ulps there: 5 steps
/// lose about 1e-2 of `G`'s scale on such directions, whose output is that small anyway
/// (measured against exact arithmetic: 4e-4 relative error with singular values down to
/// 1e-4, against 5e-6 for the textbook form, and 3e-6 for both on Gaussian inputs; the
/// quintic itself is about 0.3 away from `U V^T`). The cubic grows `Q` far less (1.5^6 =
/// 11 at most here), but its 1.5^k over tens of steps would not be safe either.
fn uses_gram_space(dims: [usize; 2], steps: usize, _iteration: NsIteration) -> bool {
    let (r, c) = (dims[0].min(dims[1]), dims[0].max(dims[1]));
    c >= 2 * r && (1..=GRAM_SPACE_MAX_STEPS).contains(&steps)
}

/// Most steps that [`newton_schulz`] runs in the Gram space.
pub const GRAM_SPACE_MAX_STEPS: usize = 6;

/// The textbook Newton–Schulz iteration `X <- p(X X^T) X` on the wide orientation (what
/// [`newton_schulz`] computes, without the Gram-space shortcut).
pub fn newton_schulz_direct(g: Tensor<2>, steps: usize, iteration: NsIteration) -> Tensor<2> {
    let [rows, cols] = g.dims();
    let tall = rows > cols;
    let mut x = if tall { g.transpose() } else { g };
    x = x.clone() / frobenius(&x).add_scalar(1e-7);
    for _ in 0..steps {
        let a = x.clone().matmul(x.clone().transpose());
        x = match iteration {
            NsIteration::Quintic => {
                let (qa, qb, qc) = QUINTIC;
                let b = a.clone().mul_scalar(qb) + a.clone().matmul(a).mul_scalar(qc);
                x.clone().mul_scalar(qa) + b.matmul(x)
            }
            NsIteration::Cubic => x.clone().mul_scalar(1.5) - a.matmul(x).mul_scalar(0.5),
        };
    }
    if tall { x.transpose() } else { x }
}

/// Matrix-product FLOPs of [`newton_schulz`] on an `m x n` matrix.
pub fn newton_schulz_flops(m: usize, n: usize, steps: usize, iteration: NsIteration) -> f64 {
    let (r, c) = (m.min(n) as f64, m.max(n) as f64);
    let square = if iteration == NsIteration::Quintic {
        1.0
    } else {
        0.0
    };
    if !uses_gram_space([m, n], steps, iteration) {
        steps as f64 * (4.0 * r * r * c + square * 2.0 * r * r * r)
    } else {
        // G and the final product, then per step Q G Q, (A^2) and p(A) Q; the first step
        // has Q = I.
        4.0 * r * r * c
            + (steps as f64 - 1.0) * 6.0 * r * r * r
            + steps as f64 * square * 2.0 * r * r * r
    }
}

/// Matrix-product FLOPs that [`newton_schulz`] performs on an `m x n` matrix on a CPU
/// device in f32, where the Gram-space form multiplies only the blocks of its symmetric
/// products on and above the diagonal ([`newton_schulz_host`]); other paths as
/// [`newton_schulz_flops`].
pub fn newton_schulz_host_flops(m: usize, n: usize, steps: usize, iteration: NsIteration) -> f64 {
    if !uses_gram_space([m, n], steps, iteration) {
        return newton_schulz_flops(m, n, steps, iteration);
    }
    let (r, c) = (m.min(n), m.max(n));
    let blocks: Vec<usize> = (0..r)
        .step_by(SYMMETRIC_BLOCK)
        .map(|i| SYMMETRIC_BLOCK.min(r - i))
        .collect();
    // 2 b_i b_j k over the blocks on and above the diagonal.
    let symmetric = |k: usize| -> f64 {
        let mut total = 0.0;
        for (i, &bi) in blocks.iter().enumerate() {
            for &bj in &blocks[i..] {
                total += 2.0 * (bi * bj * k) as f64;
            }
        }
        total
    };
    // G; per step A^2 (quintic only); after the first, p(A) Q; before the last, p(A) A and
    // p(A) (p(A) A); then the full Q X.
    let squares = if iteration == NsIteration::Quintic {
        steps
    } else {
        0
    };
    let products = squares + 3 * (steps - 1);
    symmetric(c) + products as f64 * symmetric(r) + 2.0 * (r * r * c) as f64
}

/// One warm-started power-iteration round for the largest singular value of `w`
/// (`[m, n]`): `v <- u W / |.|`, `u <- v W^T / |.|`. Returns `(u, v, sigma)` with
/// `sigma = u W v^T` as a `[1, 1]` tensor.
pub fn power_iteration(
    w: &Tensor<2>,
    mut u: Tensor<2>,
    iterations: usize,
) -> (Tensor<2>, Tensor<2>, Tensor<2>) {
    let mut v = u.clone().matmul(w.clone());
    v = v.clone() / frobenius(&v).add_scalar(1e-12);
    for _ in 0..iterations.max(1) {
        u = v.clone().matmul(w.clone().transpose());
        u = u.clone() / frobenius(&u).add_scalar(1e-12);
        v = u.clone().matmul(w.clone());
        v = v.clone() / frobenius(&v).add_scalar(1e-12);
    }
    let sigma = u.clone().matmul(w.clone()).matmul(v.clone().transpose());
    (u, v, sigma)
}

/// Most extra single rounds [`spectral_norm`] runs per requested round while the estimate
/// still moves by more than its tolerance.
const EXTRA_ROUNDS_PER_ROUND: usize = 9;

/// The largest singular value of `w` (`[m, n]`) by power iteration warm-started from `u`
/// (`[1, m]`): `rounds` rounds of [`power_iteration`], then, with `tol > 0`, single rounds
/// (at most nine per requested round) until the estimate changes by at most `tol` of
/// itself. Returns the new `u` and `sigma` (`[1, 1]`). On a CPU device in f32 it runs on
/// host buffers ([`spectral_norm_host`], the same rounds without the tensor overhead of
/// about ten small products each), elsewhere with burn's ops.
pub fn spectral_norm(
    w: &Tensor<2>,
    u: Tensor<2>,
    rounds: usize,
    tol: f64,
) -> (Tensor<2>, Tensor<2>) {
    if crate::device::host_f32(w) && crate::device::host_f32(&u) {
        let [m, n] = w.dims();
        let device = w.device();
        let mut u = crate::device::into_host(u);
        let sigma = spectral_norm_host(&to_host(w), m, n, &mut u, rounds, tol);
        return (
            crate::device::from_host(u, [1, m], &device),
            crate::device::from_host(vec![sigma], [1, 1], &device),
        );
    }
    spectral_norm_on_device(w, u, rounds, tol)
}

/// [`spectral_norm`] with burn's ops, on any device.
pub fn spectral_norm_on_device(
    w: &Tensor<2>,
    u: Tensor<2>,
    rounds: usize,
    tol: f64,
) -> (Tensor<2>, Tensor<2>) {
    let (mut u, _, mut sigma) = power_iteration(w, u, rounds);
    if tol <= 0.0 {
        // No host read: `tol = 0` means exactly the requested rounds.
        return (u, sigma);
    }
    let first = f64::from(to_host(&sigma)[0].abs());
    refine(rounds, tol, first, || {
        let (nu, _, ns) = power_iteration(w, u.clone(), 1);
        (u, sigma) = (nu, ns);
        f64::from(to_host(&sigma)[0].abs())
    });
    (u, sigma)
}

/// The tolerance rule of [`spectral_norm`]: from the estimate `first` after the requested
/// `rounds`, runs single rounds (`round` returns the new estimate's magnitude), at most
/// nine per requested round, until the estimate changes by at most `tol` of itself;
/// nothing with `tol = 0`.
fn refine(rounds: usize, tol: f64, first: f64, mut round: impl FnMut() -> f64) {
    if tol <= 0.0 {
        return;
    }
    let mut last = first;
    for _ in 0..EXTRA_ROUNDS_PER_ROUND * rounds {
        let now = round();
        if now - last <= tol * now {
            break;
        }
        last = now;
    }
}

/// [`spectral_norm`] on host buffers: `w` row-major `m x n`, `u` (`m` values) updated in
/// place; returns `sigma`. The rounds are [`power_iteration`]'s, except that a round's
/// first product `u W` is the previous round's last one (the same `u`), kept instead of
/// recomputed: two matrix-vector products per round instead of four.
pub fn spectral_norm_host(
    w: &[f32],
    m: usize,
    n: usize,
    u: &mut [f32],
    rounds: usize,
    tol: f64,
) -> f32 {
    assert_eq!(w.len(), m * n, "spectral_norm_host: w is not m x n");
    assert_eq!(u.len(), m, "spectral_norm_host: u is not m long");
    // `t = u W` for the current `u`, `v = t / (|t| + 1e-12)`.
    let mut t = vec![0.0; n];
    let mut v = vec![0.0; n];
    row_times(u, w, &mut t);
    let mut round = |u: &mut [f32], t: &mut [f32], count: usize| -> f32 {
        normalized_into(&mut v, t);
        for _ in 0..count.max(1) {
            for (ui, row) in u.iter_mut().zip(w.chunks_exact(n)) {
                *ui = lane_dot(row, &v);
            }
            let norm = lane_sum_squares(u).sqrt() + 1e-12;
            u.iter_mut().for_each(|x| *x /= norm);
            row_times(u, w, t);
            normalized_into(&mut v, t);
        }
        lane_dot(t, &v)
    };
    let mut sigma = round(u, &mut t, rounds);
    refine(rounds, tol, f64::from(sigma.abs()), || {
        sigma = round(u, &mut t, 1);
        f64::from(sigma.abs())
    });
    sigma
}

/// `out = x W` for a row vector `x` (`m` values) and a row-major `m x n` matrix `W`: the
/// rows of `W` scaled and added, which runs along contiguous memory.
fn row_times(x: &[f32], w: &[f32], out: &mut [f32]) {
    out.fill(0.0);
    for (&a, row) in x.iter().zip(w.chunks_exact(out.len())) {
        for (o, &b) in out.iter_mut().zip(row) {
            *o += a * b;
        }
    }
}

/// `dst = src / (|src| + 1e-12)`.
fn normalized_into(dst: &mut [f32], src: &[f32]) {
    let norm = lane_sum_squares(src).sqrt() + 1e-12;
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = s / norm;
    }
}

/// Inverse of the upper Cholesky factor `R` of a symmetric positive-definite `r x r`
/// matrix (`G = R^T R`), with a relative jitter on the diagonal when `G` is
/// near-singular. Row-major.
fn inverse_cholesky_factor(g: &[f64], r: usize) -> Vec<f64> {
    let scale = (0..r).map(|i| g[i * r + i]).fold(0.0, f64::max).max(1e-30);
    // A non-finite Gram matrix has no factor (and an infinite scale made the jitter loop
    // below endless, found by fuzzing checkpoint loading): NaN out, which the trainer's
    // finiteness check reports.
    if !scale.is_finite() || g.iter().any(|v| !v.is_finite()) {
        return vec![f64::NAN; r * r];
    }
    let mut jitter = 0.0;
    for _ in 0..JITTER_ATTEMPTS {
        // G = L L^T with L lower; R = L^T.
        let mut l = vec![0.0; r * r];
        let mut ok = true;
        'outer: for i in 0..r {
            for j in 0..=i {
                let mut s = g[i * r + j] + if i == j { jitter } else { 0.0 };
                for k in 0..j {
                    s -= l[i * r + k] * l[j * r + k];
                }
                if i == j {
                    if s <= 1e-12 * scale {
                        ok = false;
                        break 'outer;
                    }
                    l[i * r + i] = s.sqrt();
                } else {
                    l[i * r + j] = s / l[j * r + j];
                }
            }
        }
        if ok {
            // Invert L (lower), then R^{-1} = (L^{-1})^T.
            let mut inv = vec![0.0; r * r];
            for col in 0..r {
                for i in col..r {
                    let mut s = if i == col { 1.0 } else { 0.0 };
                    for k in col..i {
                        s -= l[i * r + k] * inv[k * r + col];
                    }
                    inv[i * r + col] = s / l[i * r + i];
                }
            }
            let mut out = vec![0.0; r * r];
            for i in 0..r {
                for j in 0..r {
                    out[i * r + j] = inv[j * r + i];
                }
            }
            return out;
        }
        jitter = if jitter == 0.0 {
            1e-10 * scale
        } else {
            jitter * 100.0
        };
    }
    vec![f64::NAN; r * r]
}

/// Tries of [`inverse_cholesky_factor`]'s jitter, from `1e-10` to `1e46` times the
/// largest diagonal entry: a finite positive semi-definite matrix succeeds long before.
const JITTER_ATTEMPTS: usize = 30;

/// Orthonormal columns spanning `p` (`[m, r]`, `r <= m`) by Cholesky-QR applied twice
/// (`P <- P R^{-1}` with `P^T P = R^T R`).
pub fn orthonormalize_columns(p: Tensor<2>) -> Tensor<2> {
    let [_, r] = p.dims();
    let device = p.device();
    let mut q = p;
    for _ in 0..2 {
        let gram: Vec<f64> = to_host(&q.clone().transpose().matmul(q.clone()))
            .into_iter()
            .map(f64::from)
            .collect();
        let inv = inverse_cholesky_factor(&gram, r);
        let inv: Vec<f32> = inv.into_iter().map(|v| v as f32).collect();
        q = q.matmul(Tensor::from_data(TensorData::new(inv, [r, r]), &device));
    }
    q
}

/// Each column divided by its norm (`[n, r]`).
pub fn normalize_columns(r: Tensor<2>) -> Tensor<2> {
    let norms = r.clone().square().sum_dim(0).sqrt().add_scalar(1e-12);
    r / norms
}
