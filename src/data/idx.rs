//! Reader for the IDX format of the MNIST family (gzipped or raw).
//!
//! An IDX file is a big-endian header `0x00 0x00 <type> <ndim>`, then `ndim` 32-bit sizes,
//! then the data. Image files have magic 2051 (`u8`, 3 dimensions: count, rows, columns) and
//! label files magic 2049 (`u8`, 1 dimension: count). The reader checks the magic number, that
//! no dimension is zero, that the data is exactly as long as the header says (neither truncated
//! nor followed by trailing bytes) and that a gzip stream is intact.

use std::io::Read;
use std::path::Path;

use super::DataError;
use super::stream::{open, read_error, read_up_to};

/// Magic number of an IDX image file (`u8` data, 3 dimensions).
pub const IMAGES_MAGIC: u32 = 0x0000_0803;
/// Magic number of an IDX label file (`u8` data, 1 dimension).
pub const LABELS_MAGIC: u32 = 0x0000_0801;

/// Largest payload accepted, so that a corrupt header cannot ask for an absurd allocation.
const MAX_PAYLOAD_BYTES: usize = 1 << 32;

/// Images of an IDX image file, row-major, one byte per pixel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxImages {
    /// Number of images.
    pub count: usize,
    /// Rows per image.
    pub rows: usize,
    /// Columns per image.
    pub cols: usize,
    /// `count * rows * cols` pixels, image after image.
    pub pixels: Vec<u8>,
}

/// Labels of an IDX label file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxLabels {
    /// One label per sample.
    pub labels: Vec<u8>,
}

/// Reads an IDX image file (magic 2051), gzipped or raw.
pub fn read_images(path: &Path) -> Result<IdxImages, DataError> {
    let (dims, pixels) = read_idx(path, IMAGES_MAGIC, 3)?;
    Ok(IdxImages {
        count: dims[0],
        rows: dims[1],
        cols: dims[2],
        pixels,
    })
}

/// Reads an IDX label file (magic 2049), gzipped or raw.
pub fn read_labels(path: &Path) -> Result<IdxLabels, DataError> {
    let (_, labels) = read_idx(path, LABELS_MAGIC, 1)?;
    Ok(IdxLabels { labels })
}

fn read_idx(path: &Path, magic: u32, ndim: usize) -> Result<(Vec<usize>, Vec<u8>), DataError> {
    let (mut reader, max_bytes) = open(path)?;
    let kind = if magic == IMAGES_MAGIC {
        "image"
    } else {
        "label"
    };

    let mut header = [0u8; 4];
    let n = read_up_to(&mut reader, &mut header).map_err(|e| read_error(path, "the header", e))?;
    if n < 4 {
        return Err(DataError::corrupt(
            path,
            format!("file too short for an IDX header ({n} bytes)"),
        ));
    }
    let found = u32::from_be_bytes(header);
    if found != magic {
        return Err(DataError::corrupt(
            path,
            format!(
                "bad magic number {found} (expected {magic} for an IDX {kind} file{})",
                match found {
                    IMAGES_MAGIC => "; this is an image file",
                    LABELS_MAGIC => "; this is a label file",
                    _ => "",
                }
            ),
        ));
    }

    let mut dim_bytes = vec![0u8; 4 * ndim];
    let n =
        read_up_to(&mut reader, &mut dim_bytes).map_err(|e| read_error(path, "the header", e))?;
    if n < dim_bytes.len() {
        return Err(DataError::corrupt(
            path,
            format!(
                "header truncated: {ndim} dimensions need {} bytes, found {n}",
                4 * ndim
            ),
        ));
    }
    let dims: Vec<usize> = dim_bytes
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    if let Some(i) = dims.iter().position(|&d| d == 0) {
        return Err(DataError::corrupt(
            path,
            format!("dimension {i} of the header is zero"),
        ));
    }
    let payload = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .filter(|&p| p <= MAX_PAYLOAD_BYTES)
        .ok_or_else(|| DataError::corrupt(path, format!("implausible dimensions {dims:?}")))?;

    // Reserve what the file can hold, not what its header claims: a short file that
    // claims gigabytes is reported as truncated without asking for them.
    let reserve = payload.min(usize::try_from(max_bytes).unwrap_or(usize::MAX));
    let mut data = Vec::with_capacity(reserve);
    let got = reader
        .by_ref()
        .take(payload as u64)
        .read_to_end(&mut data)
        .map_err(|e| read_error(path, "the data", e))?;
    if got < payload {
        return Err(DataError::corrupt(
            path,
            format!("truncated: header {dims:?} promises {payload} data bytes, found {got}"),
        ));
    }
    let mut extra = [0u8; 1];
    let trailing =
        read_up_to(&mut reader, &mut extra).map_err(|e| read_error(path, "the end", e))?;
    if trailing > 0 {
        return Err(DataError::corrupt(
            path,
            format!("trailing bytes after the {payload} data bytes that header {dims:?} promises"),
        ));
    }
    Ok((dims, data))
}
