//! Reader for the binary CIFAR-10 format (`data_batch_1..5.bin`, `test_batch.bin`,
//! gzipped or raw): records of one label byte followed by 3072 pixel bytes, the 32x32 red,
//! green and blue planes, each row-major. The reader checks that the length is a whole
//! number of records, that every label is a class (below 10) and that a gzip stream is
//! intact.

use std::io::Read;
use std::path::Path;

use super::DataError;
use super::stream::{open, read_error};

/// Pixel bytes of one image: 3 planes of 32x32.
pub const PIXELS: usize = 3 * 32 * 32;
/// Bytes of one record: the label, then the pixels.
pub const RECORD: usize = 1 + PIXELS;
/// Number of classes.
pub const CLASSES: usize = 10;
/// The training batch files of a CIFAR-10 folder (each also read gzipped, `NAME.gz`).
pub const TRAIN_FILES: [&str; 5] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
];
/// The test batch file.
pub const TEST_FILE: &str = "test_batch.bin";
/// Records of each official batch file.
pub const OFFICIAL_RECORDS: usize = 10_000;

/// The records of one batch file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CifarBatch {
    /// `count * 3072` pixel bytes, image after image, channel-major (`[3, 32, 32]`).
    pub pixels: Vec<u8>,
    /// One label per image, below [`CLASSES`].
    pub labels: Vec<u8>,
}

impl CifarBatch {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the batch holds no image.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// Reads one CIFAR-10 batch file.
pub fn read_batch(path: &Path) -> Result<CifarBatch, DataError> {
    let (reader, max_bytes) = open(path)?;
    // What the file can hold, not more (a gzip's bound can be large; the official files
    // are 30,730,000 bytes).
    let reserve = usize::try_from(max_bytes.min((OFFICIAL_RECORDS * RECORD) as u64)).unwrap_or(0);
    let mut bytes = Vec::with_capacity(reserve);
    reader
        .take((OFFICIAL_RECORDS * RECORD) as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| read_error(path, "the records", e))?;
    if bytes.is_empty() {
        return Err(DataError::corrupt(path, "no records"));
    }
    if bytes.len() > OFFICIAL_RECORDS * RECORD {
        return Err(DataError::corrupt(
            path,
            format!(
                "more than the {OFFICIAL_RECORDS} records of a CIFAR-10 batch file ({RECORD} bytes each)"
            ),
        ));
    }
    if bytes.len() % RECORD != 0 {
        return Err(DataError::corrupt(
            path,
            format!(
                "{} bytes is not a whole number of {RECORD}-byte records ({} records and {} bytes)",
                bytes.len(),
                bytes.len() / RECORD,
                bytes.len() % RECORD
            ),
        ));
    }
    let count = bytes.len() / RECORD;
    let mut labels = Vec::with_capacity(count);
    let mut pixels = Vec::with_capacity(count * PIXELS);
    for (i, record) in bytes.chunks_exact(RECORD).enumerate() {
        if usize::from(record[0]) >= CLASSES {
            return Err(DataError::corrupt(
                path,
                format!(
                    "record {i} has label {}, not a class below {CLASSES}",
                    record[0]
                ),
            ));
        }
        labels.push(record[0]);
        pixels.extend_from_slice(&record[1..]);
    }
    Ok(CifarBatch { pixels, labels })
}
