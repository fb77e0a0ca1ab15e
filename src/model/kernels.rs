//! Host CPU kernels for convolution and max pooling.
//!
//! burn-flex runs 4-D convolutions and pooling at a few GFLOP/s on this workload (its conv
//! returns channels-last views that every following op must gather, and its weight backward
//! reached 2.6 GFLOP/s on the first layer of `cnn`). These kernels do the same math on plain
//! row-major `NCHW` slices: im2col over a block of samples + one `gemm` product per block,
//! parallel over the blocks with rayon. [`super::Layer`] calls them on the CPU devices and keeps burn's ops for
//! autodiff and GPU tensors; `tests/model.rs` checks both paths agree.

use std::cell::RefCell;
use std::mem::MaybeUninit;

use rayon::prelude::*;

thread_local! {
    /// Each thread's two buffers for the block products (the im2col columns and the
    /// product), kept between calls: a settle or backprop step runs several convolutions,
    /// each of which allocated and zeroed megabytes before (a tenth of a `cnn` backprop
    /// step, with the page faults). Newton–Schulz keeps its `r x r` matrices in the first
    /// (`crate::optim::linalg::newton_schulz_host`).
    static SCRATCH: RefCell<[Vec<f32>; 2]> = const { RefCell::new([Vec::new(), Vec::new()]) };
}

/// Runs `f` on this thread's scratch buffers, grown to `a` and `b` values. Their contents
/// are whatever an earlier call left: `f` writes every value it reads.
pub(crate) fn with_scratch<R>(
    a: usize,
    b: usize,
    f: impl FnOnce(&mut [f32], &mut [f32]) -> R,
) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut bufs) => {
            let [x, y] = &mut *bufs;
            for (buf, len) in [(&mut *x, a), (&mut *y, b)] {
                if buf.len() < len {
                    buf.resize(len, 0.0);
                }
            }
            f(&mut x[..a], &mut y[..b])
        }
        // Not reached (the kernels and the iteration do not nest), but a nested call must
        // not panic.
        Err(_) => f(&mut vec![0.0; a], &mut vec![0.0; b]),
    })
}

/// A row-major matrix view: element `(i, j)` is `data[i * row_stride + j * col_stride]`.
#[derive(Clone, Copy)]
pub(crate) struct MatRef<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A contiguous row-major `rows x cols` matrix.
    pub(crate) fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose (no data movement).
    pub(crate) fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    /// Its number of rows.
    pub(crate) fn rows(&self) -> usize {
        self.rows
    }

    /// Its number of columns.
    pub(crate) fn cols(&self) -> usize {
        self.cols
    }

    /// Rows `start..start + count` (no data movement).
    pub(crate) fn sub_rows(self, start: usize, count: usize) -> Self {
        assert!(start + count <= self.rows, "rows out of range");
        Self {
            data: &self.data[start * self.row_stride..],
            rows: count,
            ..self
        }
    }

    /// Columns `start..start + count` (no data movement).
    pub(crate) fn sub_cols(self, start: usize, count: usize) -> Self {
        assert!(start + count <= self.cols, "columns out of range");
        Self {
            data: &self.data[start * self.col_stride..],
            cols: count,
            ..self
        }
    }

    /// Whether every element the view names lies inside `data`.
    fn in_bounds(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride
                < self.data.len()
    }
}

/// `dst = lhs * rhs` (or `dst += lhs * rhs` when `accumulate`), `dst` row-major
/// `lhs.rows x rhs.cols`, single-threaded (callers parallelise over samples).
pub(crate) fn matmul(dst: &mut [f32], lhs: MatRef<'_>, rhs: MatRef<'_>, accumulate: bool) {
    matmul_into(dst, rhs.cols, 0, 0, lhs, rhs, accumulate);
}

/// `lhs * rhs` written (or added, with `accumulate`) to the block at row `i`, column `j`
/// of a row-major `dst` with `dst_cols` columns (single-threaded).
pub(crate) fn matmul_into(
    dst: &mut [f32],
    dst_cols: usize,
    i: usize,
    j: usize,
    lhs: MatRef<'_>,
    rhs: MatRef<'_>,
    accumulate: bool,
) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert_eq!(k, rhs.rows, "inner dimensions differ");
    assert!(j + n <= dst_cols, "block past the destination's columns");
    assert!(
        m == 0 || n == 0 || (i + m - 1) * dst_cols + j + n <= dst.len(),
        "destination too small"
    );
    assert!(
        lhs.in_bounds() && rhs.in_bounds(),
        "matrix view out of bounds"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for row in i..i + m {
                dst[row * dst_cols + j..row * dst_cols + j + n].fill(0.0);
            }
        }
        return;
    }
    // SAFETY: the asserts above keep every index gemm reads from `lhs`/`rhs` and writes to
    // the block of `dst` (row stride `dst_cols`) inside its slice; `dst` is borrowed
    // mutably, so it aliases neither input.
    unsafe {
        gemm_block(
            dst.as_mut_ptr().add(i * dst_cols + j),
            dst_cols,
            accumulate,
            lhs,
            rhs,
        );
    }
}

/// `dst = lhs * rhs` (or `dst += lhs * rhs` with `accumulate`) for the `lhs.rows x
/// rhs.cols` block at `dst`, row stride `dst_cols`, single-threaded.
///
/// # Safety
/// The views must lie in bounds ([`MatRef::in_bounds`]) with `lhs.cols == rhs.rows`, and
/// `dst` must be valid for writes (with `accumulate`, also reads) of the whole block and
/// alias neither input. Without `accumulate` gemm only writes the block, which may then be
/// uninitialised.
unsafe fn gemm_block(
    dst: *mut f32,
    dst_cols: usize,
    accumulate: bool,
    lhs: MatRef<'_>,
    rhs: MatRef<'_>,
) {
    // SAFETY: the caller's contract above is gemm's.
    unsafe {
        gemm::gemm(
            lhs.rows,
            rhs.cols,
            lhs.cols,
            dst,
            1,
            dst_cols as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// `src` (row-major `rows x cols`) transposed into a new `cols x rows` buffer
/// ([`transpose_rows_into`]).
///
/// The settle loops multiply by `W^T` at every step: as a transposed view the product
/// runs `gemm` on a strided right side, which on two threads cost a fifth of a
/// 784-256-128-10 settle step; a contiguous copy made once per settle does not.
pub(crate) fn transpose(src: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    assert_eq!(src.len(), rows * cols, "transpose: src is not rows x cols");
    let mut dst = vec![0.0; src.len()];
    transpose_rows_into(src, rows, cols, 1.0, 0, &mut dst);
    dst
}

/// Rows `first..first + dst.len() / rows` of `scale * src^T` (`src` row-major `rows x
/// cols`) into `dst`, in tiles of 32 source rows so that the strided side stays in cache.
pub(crate) fn transpose_rows_into(
    src: &[f32],
    rows: usize,
    cols: usize,
    scale: f32,
    first: usize,
    dst: &mut [f32],
) {
    const TILE: usize = 32;
    if rows == 0 {
        return;
    }
    let count = dst.len() / rows;
    assert!(
        first + count <= cols,
        "transpose: rows past the source's columns"
    );
    for i0 in (0..rows).step_by(TILE) {
        for j in first..first + count {
            let out = &mut dst[(j - first) * rows..][..rows];
            for i in i0..(i0 + TILE).min(rows) {
                out[i] = src[i * cols + j] * scale;
            }
        }
    }
}

/// Rows of the result that one task of [`product_by_panels`] multiplies.
const PANEL_ROWS: usize = 32;

/// `lhs * rhs` as a new row-major buffer, by panels of [`PANEL_ROWS`] rows on the pool's
/// workers when it has more than one ([`crate::device::self_scheduled`]). Each panel is
/// one single-threaded product, so the result does not depend on the number of workers;
/// the products write the buffer without its being zeroed first.
///
/// For the large outputs of a dense layer's weight gradient (`x^T g`, 784 x 256 from a
/// batch of 64): burn's product allocates its output zeroed, copies it once more to align
/// it and then writes it, three passes over 0.8 MB on the calling thread.
pub(crate) fn product_by_panels(lhs: MatRef<'_>, rhs: MatRef<'_>) -> Vec<f32> {
    let mut out = Vec::new();
    append_product(lhs, rhs, &mut out);
    out
}

/// [`product_by_panels`] appended to `out` (its earlier values kept).
pub(crate) fn append_product(lhs: MatRef<'_>, rhs: MatRef<'_>, out: &mut Vec<f32>) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert_eq!(k, rhs.rows, "inner dimensions differ");
    assert!(
        lhs.in_bounds() && rhs.in_bounds(),
        "matrix view out of bounds"
    );
    let len = m * n;
    if len == 0 {
        return;
    }
    out.reserve(len);
    let start = out.len();
    let panel = |p: usize, rows: &mut [MaybeUninit<f32>]| {
        let count = rows.len() / n;
        if k == 0 {
            rows.fill(MaybeUninit::new(0.0));
            return;
        }
        let lhs = lhs.sub_rows(p * PANEL_ROWS, count);
        // SAFETY: `rows` holds `count x n` values, the block gemm writes (row stride `n`);
        // the views' bounds were checked above (`sub_rows` keeps them). Without
        // accumulation gemm only writes `dst`, so its being uninitialised is fine, and
        // `rows` is borrowed mutably, aliasing neither input.
        unsafe { gemm_block(rows.as_mut_ptr().cast::<f32>(), n, false, lhs, rhs) }
    };
    let panels = out.spare_capacity_mut()[..len]
        .chunks_mut(PANEL_ROWS * n)
        .collect();
    crate::device::each_self_scheduled(panels, panel);
    // SAFETY: the panels cover the first `len` values of the spare capacity (reserved
    // above), and each panel's product (or its zero fill) wrote every one of its values.
    unsafe { out.set_len(start + len) };
}

/// Sample groups whose kernel gradients are summed separately (in parallel) and then in
/// order.
const PARAM_GROUPS: usize = 8;

/// Columns of the im2col matrix that a block of samples fills before its product
/// ([`ConvGeometry::block_samples`]).
const BLOCK_COLUMNS: usize = 512;

/// Most im2col values a block of [`ConvGeometry::param_vjp`] fills (512 KiB of `f32`,
/// about what the core's L2 cache holds beside the product's other operands).
const PARAM_BLOCK_VALUES: usize = 1 << 17;

/// The sizes of one 2-D convolution over a batch of `NCHW` images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeometry {
    /// Input channels.
    pub in_channels: usize,
    /// Input height.
    pub in_h: usize,
    /// Input width.
    pub in_w: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Square kernel size.
    pub kernel: usize,
    /// Stride.
    pub stride: usize,
    /// Zero padding on every side.
    pub padding: usize,
    /// Output height.
    pub out_h: usize,
    /// Output width.
    pub out_w: usize,
}

impl ConvGeometry {
    /// Values per input sample.
    pub fn in_len(&self) -> usize {
        self.in_channels * self.in_h * self.in_w
    }

    /// Values per output sample.
    pub fn out_len(&self) -> usize {
        self.out_channels * self.out_pixels()
    }

    /// Output pixels per channel.
    pub fn out_pixels(&self) -> usize {
        self.out_h * self.out_w
    }

    /// Length of one flattened receptive field (`in * k * k`), the kernel's row length.
    pub fn patch_len(&self) -> usize {
        self.in_channels * self.kernel * self.kernel
    }

    /// The input row read by kernel row `ki` at output row `oh`, if inside the image.
    fn in_row(&self, oh: usize, ki: usize) -> Option<usize> {
        (oh * self.stride + ki)
            .checked_sub(self.padding)
            .filter(|&r| r < self.in_h)
    }

    /// The output columns `lo..hi` whose kernel column `kj` reads inside the image
    /// (input column `ow * stride + kj - padding`).
    fn valid_cols(&self, kj: usize) -> (usize, usize) {
        let s = self.stride;
        let lo = self.padding.saturating_sub(kj).div_ceil(s);
        let hi = (self.in_w + self.padding)
            .saturating_sub(kj)
            .div_ceil(s)
            .min(self.out_w);
        (lo.min(hi), hi)
    }

    /// Checks slice lengths against the geometry; returns the batch size.
    fn batch(&self, input: usize, output: usize) -> usize {
        assert!(self.in_len() > 0 && self.out_len() > 0, "empty convolution");
        let batch = input / self.in_len();
        assert_eq!(input, batch * self.in_len(), "input length");
        assert_eq!(output, batch * self.out_len(), "output length");
        batch
    }

    /// Samples whose products are made together: enough that the im2col matrix of the
    /// group has at least [`BLOCK_COLUMNS`] columns (one sample where its own image is
    /// that large). Fixed by the geometry and the batch alone, so results do not depend on
    /// the thread count.
    fn block_samples(&self, batch: usize) -> usize {
        BLOCK_COLUMNS
            .div_ceil(self.out_pixels())
            .clamp(1, batch.max(1))
    }

    /// Samples whose kernel gradients are made in one product in [`Self::param_vjp`]:
    /// [`Self::block_samples`], or more while their im2col matrix stays within
    /// [`PARAM_BLOCK_VALUES`]. That product's output is only `patch x out`, so it runs
    /// at speed only with a long inner dimension (`cnn`'s first convolution, 25 x 32 from
    /// one sample's 576 pixels: 30 GFLOP/s).
    fn param_block_samples(&self, batch: usize) -> usize {
        let per_sample = (self.patch_len() * self.out_pixels()).max(1);
        (PARAM_BLOCK_VALUES / per_sample)
            .max(self.block_samples(batch))
            .clamp(1, batch.max(1))
    }

    /// Writes the receptive fields of one sample as columns: row `r` of `cols[patch,
    /// pixel]` starts at `r * row_stride` (a block of samples shares each row, one sample's
    /// pixels after another's).
    fn im2col(&self, x: &[f32], cols: &mut [f32], row_stride: usize) {
        if self.is_same() {
            return self.im2col_same(x, cols, row_stride);
        }
        if self.padding == 0 && self.stride == 1 {
            return self.im2col_valid(x, cols, row_stride);
        }
        let (k, pix) = (self.kernel, self.out_pixels());
        for c in 0..self.in_channels {
            let plane = &x[c * self.in_h * self.in_w..(c + 1) * self.in_h * self.in_w];
            for ki in 0..k {
                for kj in 0..k {
                    let row = &mut cols[((c * k + ki) * k + kj) * row_stride..][..pix];
                    let (lo, hi) = self.valid_cols(kj);
                    for oh in 0..self.out_h {
                        let out = &mut row[oh * self.out_w..(oh + 1) * self.out_w];
                        let Some(ih) = self.in_row(oh, ki) else {
                            out.fill(0.0);
                            continue;
                        };
                        out[..lo].fill(0.0);
                        out[hi..].fill(0.0);
                        if lo == hi {
                            continue;
                        }
                        let src = &plane[ih * self.in_w..(ih + 1) * self.in_w];
                        let first = lo * self.stride + kj - self.padding;
                        if self.stride == 1 {
                            copy_short(&mut out[lo..hi], &src[first..first + hi - lo]);
                        } else {
                            let picks = src[first..].iter().step_by(self.stride);
                            out[lo..hi].iter_mut().zip(picks).for_each(|(o, &v)| *o = v);
                        }
                    }
                }
            }
        }
    }

    /// Adds columns back into one sample's image (row `r` of the columns starts at
    /// `r * row_stride`): the adjoint of [`Self::im2col`].
    fn col2im(&self, cols: &mut [f32], row_stride: usize, x: &mut [f32]) {
        if self.is_same() {
            return self.col2im_same(cols, row_stride, x);
        }
        if self.padding == 0 && self.stride == 1 {
            return self.col2im_valid(cols, row_stride, x);
        }
        let (k, pix) = (self.kernel, self.out_pixels());
        x.fill(0.0);
        for c in 0..self.in_channels {
            let plane = &mut x[c * self.in_h * self.in_w..(c + 1) * self.in_h * self.in_w];
            for ki in 0..k {
                for kj in 0..k {
                    let row = &cols[((c * k + ki) * k + kj) * row_stride..][..pix];
                    let (lo, hi) = self.valid_cols(kj);
                    if lo == hi {
                        continue;
                    }
                    for oh in 0..self.out_h {
                        let Some(ih) = self.in_row(oh, ki) else {
                            continue;
                        };
                        let dst = &mut plane[ih * self.in_w..(ih + 1) * self.in_w];
                        let src = &row[oh * self.out_w + lo..oh * self.out_w + hi];
                        let first = lo * self.stride + kj - self.padding;
                        if self.stride == 1 {
                            // Contiguous: vectorises (a stepped iterator does not).
                            let dst = &mut dst[first..first + src.len()];
                            dst.iter_mut().zip(src).for_each(|(d, &v)| *d += v);
                        } else {
                            let targets = dst[first..].iter_mut().step_by(self.stride);
                            targets.zip(src).for_each(|(d, &v)| *d += v);
                        }
                    }
                }
            }
        }
    }

    /// [`Self::im2col`] without padding at stride 1 (a "valid" convolution, as `cnn`'s):
    /// every tap reads a whole `out_h x out_w` window of the plane, so each output row is
    /// one short copy with no bounds to work out (the general loop spent more on those
    /// than on the copies of `cnn`'s 8-value rows).
    fn im2col_valid(&self, x: &[f32], cols: &mut [f32], row_stride: usize) {
        let (k, pix, w, ow) = (self.kernel, self.out_pixels(), self.in_w, self.out_w);
        for (c, plane) in x.chunks_exact(self.in_h * w).enumerate() {
            for ki in 0..k {
                for kj in 0..k {
                    let row = &mut cols[((c * k + ki) * k + kj) * row_stride..][..pix];
                    let window = &plane[ki * w + kj..];
                    for (oh, out) in row.chunks_exact_mut(ow).enumerate() {
                        copy_short(out, &window[oh * w..oh * w + ow]);
                    }
                }
            }
        }
    }

    /// [`Self::col2im`] of a valid convolution ([`Self::im2col_valid`]): each output row
    /// of each tap adds into one window row of the plane.
    fn col2im_valid(&self, cols: &[f32], row_stride: usize, x: &mut [f32]) {
        let (k, pix, w, ow) = (self.kernel, self.out_pixels(), self.in_w, self.out_w);
        x.fill(0.0);
        for (c, plane) in x.chunks_exact_mut(self.in_h * w).enumerate() {
            for ki in 0..k {
                for kj in 0..k {
                    let row = &cols[((c * k + ki) * k + kj) * row_stride..][..pix];
                    let window = &mut plane[ki * w + kj..];
                    for (oh, src) in row.chunks_exact(ow).enumerate() {
                        let dst = &mut window[oh * w..oh * w + ow];
                        dst.iter_mut().zip(src).for_each(|(d, &v)| *d += v);
                    }
                }
            }
        }
    }

    /// Whether this is a "same" convolution (stride 1, `2 * padding + 1 == kernel`: the
    /// output has the input's size, as in VGG-style nets). Then the receptive-field row of
    /// kernel tap `(ki, kj)` is the whole input plane shifted by one flat offset, except
    /// where the tap reads the padding: [`Self::im2col_same`] copies each row in one move
    /// and zeroes the few padded values, where the general loop copies one image row at a
    /// time (a tenth of a `vgg5-small` settle step, mostly in `memcpy` calls).
    fn is_same(&self) -> bool {
        self.stride == 1 && 2 * self.padding + 1 == self.kernel
    }

    /// For tap `(ki, kj)` of a same convolution: the flat offset `d` of the input value
    /// each output pixel `q` reads (`q + d`), and the range `lo..hi` of `q` where `q + d`
    /// lies inside the plane. Inside that range, the pixels whose tap column falls outside
    /// the image are those of [`Self::valid_cols`]; the rest of the range reads the image.
    fn same_shift(&self, ki: usize, kj: usize) -> (isize, usize, usize) {
        let (w, p) = (self.in_w as isize, self.padding as isize);
        let plane = (self.in_h * self.in_w) as isize;
        let d = (ki as isize - p) * w + (kj as isize - p);
        let lo = (-d).max(0) as usize;
        let hi = (plane - d).min(plane) as usize;
        (d, lo, hi.max(lo))
    }

    /// Zeroes the values of one tap's row (`pix` values) whose tap column falls outside
    /// the image: strided stores, column by column (a handful per image row).
    fn zero_padded_columns(&self, row: &mut [f32], kj: usize) {
        let (lo, hi) = self.valid_cols(kj);
        let w = self.out_w;
        for col in (0..lo).chain(hi..w) {
            for v in row[col..].iter_mut().step_by(w) {
                *v = 0.0;
            }
        }
    }

    /// [`Self::im2col`] of a same convolution, one flat move per tap.
    fn im2col_same(&self, x: &[f32], cols: &mut [f32], row_stride: usize) {
        let (k, pix) = (self.kernel, self.out_pixels());
        for (c, plane) in x.chunks_exact(pix).enumerate() {
            for ki in 0..k {
                for kj in 0..k {
                    let row = &mut cols[((c * k + ki) * k + kj) * row_stride..][..pix];
                    let (d, lo, hi) = self.same_shift(ki, kj);
                    row[..lo].fill(0.0);
                    row[hi..].fill(0.0);
                    let start = (lo as isize + d) as usize;
                    row[lo..hi].copy_from_slice(&plane[start..start + hi - lo]);
                    self.zero_padded_columns(row, kj);
                }
            }
        }
    }

    /// [`Self::col2im`] of a same convolution: each tap's row, its padded values zeroed
    /// (the columns are scratch), is added to the plane in one flat pass.
    fn col2im_same(&self, cols: &mut [f32], row_stride: usize, x: &mut [f32]) {
        let (k, pix) = (self.kernel, self.out_pixels());
        x.fill(0.0);
        for (c, plane) in x.chunks_exact_mut(pix).enumerate() {
            for ki in 0..k {
                for kj in 0..k {
                    let row = &mut cols[((c * k + ki) * k + kj) * row_stride..][..pix];
                    self.zero_padded_columns(row, kj);
                    let (d, lo, hi) = self.same_shift(ki, kj);
                    let start = (lo as isize + d) as usize;
                    let dst = &mut plane[start..start + hi - lo];
                    dst.iter_mut().zip(&row[lo..hi]).for_each(|(d, &v)| *d += v);
                }
            }
        }
    }

    /// The im2col columns of a block of samples (`xs`, whole samples): `[patch, n * pix]`
    /// in `cols`, sample `b`'s pixels at columns `b * pix..`. Returns the width `n * pix`.
    fn block_columns(&self, xs: &[f32], cols: &mut [f32]) -> usize {
        let pix = self.out_pixels();
        let width = xs.len() / self.in_len() * pix;
        for (b, x) in xs.chunks(self.in_len()).enumerate() {
            self.im2col(x, &mut cols[b * pix..], width);
        }
        width
    }

    /// A block's `[B, out, pix]` output gradients as one `[out, B * pix]` matrix in `dst`.
    /// Returns the width `B * pix`.
    fn gather_outputs(&self, gys: &[f32], dst: &mut [f32]) -> usize {
        let pix = self.out_pixels();
        let width = gys.len() / self.out_len() * pix;
        for (b, g) in gys.chunks(self.out_len()).enumerate() {
            for (o, row) in g.chunks(pix).enumerate() {
                dst[o * width + b * pix..][..pix].copy_from_slice(row);
            }
        }
        width
    }

    /// `y = conv(x, w) + bias` for a batch: `x` `[B, in, H, W]`, `w` `[out, in*k*k]`,
    /// `bias` `[out]`, `y` `[B, out, OH, OW]`.
    ///
    /// Samples are taken in blocks (`Self::block_samples`) whose columns form one
    /// product `[out, patch] x [patch, block * pix]`: a late layer of a VGG-style net has
    /// a handful of output pixels per sample, and a product that narrow runs at a fraction
    /// of the kernel's speed.
    pub fn forward(&self, x: &[f32], w: &[f32], bias: &[f32], y: &mut [f32]) {
        let batch = self.batch(x.len(), y.len());
        let (patch, pix, out) = (self.patch_len(), self.out_pixels(), self.out_channels);
        assert_eq!(w.len(), out * patch, "kernel length");
        assert_eq!(bias.len(), out, "bias length");
        let kernel = MatRef::new(w, out, patch);
        let block = self.block_samples(batch);
        let each = |(ys, xs): (&mut [f32], &[f32])| {
            with_scratch(patch * block * pix, out * block * pix, |cols, product| {
                let width = self.block_columns(xs, cols);
                let product = &mut product[..out * width];
                matmul(
                    product,
                    kernel,
                    MatRef::new(&cols[..patch * width], patch, width),
                    false,
                );
                for (b, ys) in ys.chunks_mut(self.out_len()).enumerate() {
                    for (o, (row, &bias)) in ys.chunks_mut(pix).zip(bias).enumerate() {
                        let src = &product[o * width + b * pix..][..pix];
                        row.iter_mut().zip(src).for_each(|(d, &v)| *d = v + bias);
                    }
                }
            })
        };
        each_block(y, block * self.out_len(), x, block * self.in_len(), each);
    }

    /// The input's vector-Jacobian product: `gx = conv^T(gy)` for every sample, one
    /// product per block of samples as in [`Self::forward`].
    pub fn input_vjp(&self, w: &[f32], gy: &[f32], gx: &mut [f32]) {
        let batch = self.batch(gx.len(), gy.len());
        let (patch, pix, out) = (self.patch_len(), self.out_pixels(), self.out_channels);
        assert_eq!(w.len(), out * patch, "kernel length");
        let kernel_t = MatRef::new(w, out, patch).t();
        let block = self.block_samples(batch);
        let each = |(gxs, gys): (&mut [f32], &[f32])| {
            with_scratch(patch * block * pix, out * block * pix, |cols, grads| {
                let width = self.gather_outputs(gys, grads);
                matmul(
                    &mut cols[..patch * width],
                    kernel_t,
                    MatRef::new(&grads[..out * width], out, width),
                    false,
                );
                for (b, gx) in gxs.chunks_mut(self.in_len()).enumerate() {
                    self.col2im(&mut cols[b * pix..], width, gx);
                }
            })
        };
        each_block(gx, block * self.in_len(), gy, block * self.out_len(), each);
    }

    /// The parameters' vector-Jacobian products summed over the batch: `gw` `[out,
    /// in*k*k]` and `gb` `[out]` (both overwritten); one product per block of samples as
    /// in [`Self::forward`].
    pub fn param_vjp(&self, x: &[f32], gy: &[f32], gw: &mut [f32], gb: &mut [f32]) {
        let batch = self.batch(x.len(), gy.len());
        let (patch, pix, out) = (self.patch_len(), self.out_pixels(), self.out_channels);
        assert_eq!(gw.len(), out * patch, "kernel gradient length");
        assert_eq!(gb.len(), out, "bias gradient length");
        // Fixed groups of samples, summed in order: the result does not depend on how
        // rayon schedules the groups, so runs repeat bit for bit at any thread count.
        let block = self.param_block_samples(batch);
        let group = batch.div_ceil(PARAM_GROUPS).max(1).div_ceil(block) * block;
        // Each group sums its kernel gradient transposed, `[patch, out] += cols grads^T`:
        // with the long `patch` side as the product's rows, gemm runs at about twice the
        // speed of `grads cols^T` (measured: 97 against 43 GFLOP/s for `cnn`'s second
        // convolution on 8 samples, one thread).
        let sum_group = |(xs, gys): (&[f32], &[f32])| {
            let (mut w_acc, mut b_acc) = (vec![0.0; patch * out], vec![0.0; out]);
            with_scratch(patch * block * pix, out * block * pix, |cols, grads| {
                for (xs, gys) in xs
                    .chunks(block * self.in_len())
                    .zip(gys.chunks(block * self.out_len()))
                {
                    let width = self.block_columns(xs, cols);
                    self.gather_outputs(gys, grads);
                    let cols = MatRef::new(&cols[..patch * width], patch, width);
                    let grads = MatRef::new(&grads[..out * width], out, width);
                    matmul(&mut w_acc, cols, grads.t(), true);
                    for (b, row) in b_acc.iter_mut().zip(grads.data.chunks(width)) {
                        *b += lane_sum(row);
                    }
                }
            });
            (w_acc, b_acc)
        };
        let (xs, ys) = (group * self.in_len(), group * self.out_len());
        let partials: Vec<(Vec<f32>, Vec<f32>)> = if serial() {
            x.chunks(xs).zip(gy.chunks(ys)).map(sum_group).collect()
        } else {
            x.par_chunks(xs)
                .zip(gy.par_chunks(ys))
                .map(sum_group)
                .collect()
        };
        gw.fill(0.0);
        gb.fill(0.0);
        for (w_part, b_part) in &partials {
            for (p, row) in w_part.chunks_exact(out).enumerate() {
                for (o, &v) in row.iter().enumerate() {
                    gw[o * patch + p] += v;
                }
            }
            gb.iter_mut().zip(b_part).for_each(|(a, b)| *a += b);
        }
    }
}

/// Whether the kernels run on the calling thread: when rayon's pool has one worker, a
/// parallel loop hands its work to that thread and waits, two context switches per call,
/// which cost a tenth of a small convolution's settle step (`cnn-small`, in `perf`).
fn serial() -> bool {
    rayon::current_num_threads() == 1
}

/// `f` on each pair of `out`'s chunks of `out_len` and `input`'s of `in_len`, in
/// parallel (or on this thread: [`serial`]).
fn each_block<F>(out: &mut [f32], out_len: usize, input: &[f32], in_len: usize, f: F)
where
    F: Fn((&mut [f32], &[f32])) + Sync + Send,
{
    if serial() {
        out.chunks_mut(out_len)
            .zip(input.chunks(in_len))
            .for_each(f);
    } else {
        let blocks = out.par_chunks_mut(out_len).zip(input.par_chunks(in_len));
        blocks.for_each(f);
    }
}

crate::simd::multiversion! {
    /// The sum of `x` in sixteen running lanes, added up in a fixed order at the end: the
    /// same result on every run, at vector speed (a plain `sum` is one dependent addition
    /// after another; for the bias gradient of `cnn`'s first convolution that took 70% of
    /// its parameter VJP).
    pub fn lane_sum(x: &[f32]) -> f32 {
        let mut lanes = [0f32; 16];
        let mut chunks = x.chunks_exact(16);
        for c in &mut chunks {
            for (l, v) in lanes.iter_mut().zip(c) {
                *l += v;
            }
        }
        let tail: f32 = chunks.remainder().iter().sum();
        lanes.iter().sum::<f32>() + tail
    }
}

crate::simd::multiversion! {
    /// The squared Euclidean norm of `x`, in sixteen running lanes as [`lane_sum`].
    pub fn lane_sum_squares(x: &[f32]) -> f32 {
        let mut lanes = [0f32; 16];
        let mut chunks = x.chunks_exact(16);
        for c in &mut chunks {
            for (l, v) in lanes.iter_mut().zip(c) {
                *l += v * v;
            }
        }
        let tail: f32 = chunks.remainder().iter().map(|v| v * v).sum();
        lanes.iter().sum::<f32>() + tail
    }
}

crate::simd::multiversion! {
    /// The dot product of `x` and `y` (equal lengths) in sixteen running lanes, as
    /// [`lane_sum`].
    pub fn lane_dot(x: &[f32], y: &[f32]) -> f32 {
        debug_assert_eq!(x.len(), y.len());
        let mut lanes = [0f32; 16];
        let (xs, ys) = (x.chunks_exact(16), y.chunks_exact(16));
        let tail: f32 = xs
            .remainder()
            .iter()
            .zip(ys.remainder())
            .map(|(a, b)| a * b)
            .sum();
        for (a, b) in xs.zip(ys) {
            for ((l, p), q) in lanes.iter_mut().zip(a).zip(b) {
                *l += p * q;
            }
        }
        lanes.iter().sum::<f32>() + tail
    }
}

/// `dst.copy_from_slice(src)` for the short rows of small images: a late convolution's
/// output rows are a few values long, and a `memcpy` call per row cost more than the copy
/// (the rows go eight at a time through registers instead).
#[inline(always)]
fn copy_short(dst: &mut [f32], src: &[f32]) {
    if dst.len() >= 32 {
        return dst.copy_from_slice(src);
    }
    let mut d = dst.chunks_exact_mut(8);
    let mut s = src.chunks_exact(8);
    for (d, s) in (&mut d).zip(&mut s) {
        let v: [f32; 8] = s.try_into().expect("eight values");
        d.copy_from_slice(&v);
    }
    for (d, &s) in d.into_remainder().iter_mut().zip(s.remainder()) {
        *d = s;
    }
}

/// Whether `v` replaces `best` as a window's maximum: larger, or a NaN (which then stays).
#[inline(always)]
fn beats(v: f32, best: f32) -> bool {
    (v > best || v.is_nan()) && !best.is_nan()
}

/// The sizes of one max pooling (no padding, windows that fit: burn's floor mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolGeometry {
    /// Channels.
    pub channels: usize,
    /// Input height.
    pub in_h: usize,
    /// Input width.
    pub in_w: usize,
    /// Square window size.
    pub kernel: usize,
    /// Stride.
    pub stride: usize,
    /// Output height.
    pub out_h: usize,
    /// Output width.
    pub out_w: usize,
}

impl PoolGeometry {
    fn in_plane(&self) -> usize {
        self.in_h * self.in_w
    }

    fn out_plane(&self) -> usize {
        self.out_h * self.out_w
    }

    /// Max pooling of `x` `[B, C, H, W]` into `y` `[B, C, OH, OW]`, recording in
    /// `argmax` the in-plane index of each maximum. A NaN in a window wins, so NaNs
    /// propagate as in a plain maximum.
    pub fn max_forward(&self, x: &[f32], y: &mut [f32], argmax: &mut [u32]) {
        let (ip, op) = (self.in_plane(), self.out_plane());
        assert!(ip > 0 && op > 0, "empty pooling");
        assert_eq!(x.len() / ip * op, y.len(), "pooling output length");
        assert_eq!(x.len() % ip, 0, "pooling input length");
        assert_eq!(argmax.len(), y.len(), "argmax length");
        assert!(
            (self.out_h - 1) * self.stride + self.kernel <= self.in_h
                && (self.out_w - 1) * self.stride + self.kernel <= self.in_w,
            "pooling windows leave the image"
        );
        let fast = |((ys, idx), xs): ((&mut [f32], &mut [u32]), &[f32])| self.max_2x2(xs, ys, idx);
        let general = |((ys, idx), xs): ((&mut [f32], &mut [u32]), &[f32])| {
            for oh in 0..self.out_h {
                for ow in 0..self.out_w {
                    let first = oh * self.stride * self.in_w + ow * self.stride;
                    let (mut best, mut at) = (xs[first], first);
                    for ki in 0..self.kernel {
                        let row = first + ki * self.in_w;
                        for (kj, &v) in xs[row..row + self.kernel].iter().enumerate() {
                            // Branch-free select: the winner's position is data
                            // dependent.
                            let wins = beats(v, best);
                            best = if wins { v } else { best };
                            at = if wins { row + kj } else { at };
                        }
                    }
                    ys[oh * self.out_w + ow] = best;
                    idx[oh * self.out_w + ow] = at as u32;
                }
            }
        };
        let two = self.kernel == 2 && self.stride == 2;
        let plane = |p: ((&mut [f32], &mut [u32]), &[f32])| if two { fast(p) } else { general(p) };
        if serial() {
            let planes = y.chunks_mut(op).zip(argmax.chunks_mut(op));
            planes.zip(x.chunks(ip)).for_each(plane);
        } else {
            let planes = y.par_chunks_mut(op).zip(argmax.par_chunks_mut(op));
            planes.zip(x.par_chunks(ip)).for_each(plane);
        }
    }

    /// One plane of 2x2, stride-2 max pooling (the common case, unrolled): pairs of input
    /// columns from the two rows of a window, compared with branch-free selects so that
    /// the loop vectorises.
    fn max_2x2(&self, xs: &[f32], ys: &mut [f32], idx: &mut [u32]) {
        let w = self.in_w;
        let ow_n = self.out_w;
        for oh in 0..self.out_h {
            let top = &xs[2 * oh * w..2 * oh * w + 2 * ow_n];
            let bottom = &xs[(2 * oh + 1) * w..(2 * oh + 1) * w + 2 * ow_n];
            let row_y = &mut ys[oh * ow_n..(oh + 1) * ow_n];
            let row_i = &mut idx[oh * ow_n..(oh + 1) * ow_n];
            let base = (2 * oh * w) as u32;
            let below = w as u32;
            let pairs = top.chunks_exact(2).zip(bottom.chunks_exact(2));
            for (ow, ((y, i), (t, b))) in row_y
                .iter_mut()
                .zip(row_i.iter_mut())
                .zip(pairs)
                .enumerate()
            {
                let c = base + 2 * ow as u32;
                let (mut best, mut at) = (t[0], c);
                for (v, o) in [(t[1], c + 1), (b[0], c + below), (b[1], c + below + 1)] {
                    let wins = beats(v, best);
                    best = if wins { v } else { best };
                    at = if wins { o } else { at };
                }
                *y = best;
                *i = at;
            }
        }
    }

    /// The input's vector-Jacobian product of max pooling: each output gradient goes to
    /// its window's maximum (`gx` is overwritten).
    pub fn max_backward(&self, argmax: &[u32], gy: &[f32], gx: &mut [f32]) {
        let (ip, op) = (self.in_plane(), self.out_plane());
        assert_eq!(gy.len(), argmax.len(), "argmax length");
        assert_eq!(gx.len() / ip * op, gy.len(), "pooling gradient length");
        let each = |(gxs, (gys, idx)): (&mut [f32], (&[f32], &[u32]))| {
            gxs.fill(0.0);
            for (&g, &i) in gys.iter().zip(idx) {
                gxs[i as usize] += g;
            }
        };
        if serial() {
            gx.chunks_mut(ip)
                .zip(gy.chunks(op).zip(argmax.chunks(op)))
                .for_each(each);
        } else {
            gx.par_chunks_mut(ip)
                .zip(gy.par_chunks(op).zip(argmax.par_chunks(op)))
                .for_each(each);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every element lands at its transposed index, for sizes that leave partial tiles.
    #[test]
    fn transpose_moves_every_element_to_its_mirror_index() {
        let (rows, cols) = (33, 70);
        let src: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
        let dst = transpose(&src, rows, cols);
        for i in 0..rows {
            for j in 0..cols {
                assert_eq!(dst[j * rows + i], src[i * cols + j], "({i}, {j})");
            }
        }
        assert!(transpose(&[], 0, 5).is_empty());
    }

    /// `x^T g` by panels (the dense weight gradient's shape: a transposed, strided left
    /// side and a row count that is not a multiple of the panel) against the product
    /// summed in f64, with the same bits on one, two and three workers; an empty inner
    /// dimension gives zeros.
    #[test]
    fn panel_products_match_the_exact_sum_on_any_number_of_workers() {
        let (n, inputs, outputs) = (9, 2 * PANEL_ROWS + 5, 7);
        let value = |i: usize, scale: f32| ((i * 7919 % 113) as f32 / 113.0 - 0.5) * scale;
        let x: Vec<f32> = (0..n * inputs).map(|i| value(i, 2.0)).collect();
        let g: Vec<f32> = (0..n * outputs).map(|i| value(i + 17, 3.0)).collect();
        let product = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("a pool");
            pool.install(|| {
                product_by_panels(MatRef::new(&x, n, inputs).t(), MatRef::new(&g, n, outputs))
            })
        };
        let one = product(1);
        assert_eq!(one.len(), inputs * outputs);
        for i in 0..inputs {
            for j in 0..outputs {
                let exact: f64 = (0..n)
                    .map(|s| f64::from(x[s * inputs + i]) * f64::from(g[s * outputs + j]))
                    .sum();
                let got = f64::from(one[i * outputs + j]);
                assert!((got - exact).abs() <= 1e-5, "({i}, {j}): {got} vs {exact}");
            }
        }
        for threads in [2, 3] {
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&product(threads)), bits(&one), "{threads} workers");
        }
        let empty = product_by_panels(MatRef::new(&[], 0, inputs).t(), MatRef::new(&[], 0, 3));
        assert_eq!(empty, vec![0.0; inputs * 3]);
    }
}
