//! A data file as a byte stream: gzipped (one member or several) or raw, with the bound on
//! what it can hold and typed errors for damage. Shared by the IDX and CIFAR-10 readers.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use flate2::read::MultiGzDecoder;

use super::DataError;

/// Deflate expands at most about 1032:1, so a gzip file of `n` bytes holds at most
/// `1032 n` bytes.
const MAX_DEFLATE_RATIO: u64 = 1032;

/// The file as a byte stream (decompressed when it is gzipped), and the most bytes that
/// stream can hold (its length, or the deflate bound of a gzip file).
pub(crate) fn open(path: &Path) -> Result<(Box<dyn Read>, u64), DataError> {
    let mut file = File::open(path).map_err(|e| DataError::io(path, e))?;
    let len = file.metadata().map_err(|e| DataError::io(path, e))?.len();
    let mut first = [0u8; 2];
    let n = read_up_to(&mut file, &mut first).map_err(|e| DataError::io(path, e))?;
    let head = std::io::Cursor::new(first[..n].to_vec());
    let chained = BufReader::new(head.chain(file));
    if n == 2 && first == [0x1f, 0x8b] {
        let bound = len.saturating_mul(MAX_DEFLATE_RATIO);
        Ok((
            Box::new(BufReader::new(MultiGzDecoder::new(chained))),
            bound,
        ))
    } else {
        Ok((Box::new(chained), len))
    }
}

/// Reads as many bytes as are available up to `buf.len()`; returns how many were read.
pub(crate) fn read_up_to(reader: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Maps a read error to a typed error: a damaged gzip stream is corruption, not I/O.
pub(crate) fn read_error(path: &Path, what: &str, e: std::io::Error) -> DataError {
    use std::io::ErrorKind::*;
    match e.kind() {
        InvalidInput | InvalidData | UnexpectedEof => DataError::corrupt(
            path,
            format!("damaged compressed stream while reading {what}: {e}"),
        ),
        _ => DataError::io(path, e),
    }
}
