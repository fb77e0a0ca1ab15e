//! Typed errors of the data layer.

use std::path::PathBuf;

/// Everything that can go wrong while locating, downloading, reading or batching a data set.
///
/// Every variant that concerns a file names it, so a user can see which file to replace.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file could not be opened, read or written.
    #[error("{}", path.display())]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// A file exists but its contents are not a valid IDX file of the expected kind.
    #[error("{}: {reason}", path.display())]
    Corrupt {
        /// The file concerned.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Images and labels of one split disagree.
    #[error("{} has {images} images but {} has {labels} labels", images_path.display(), labels_path.display())]
    CountMismatch {
        /// The image file.
        images_path: PathBuf,
        /// Number of images it holds.
        images: usize,
        /// The label file.
        labels_path: PathBuf,
        /// Number of labels it holds.
        labels: usize,
    },
    /// A data set's files were found nowhere in the lookup order.
    #[error(
        "data set `{dataset}` not found (looked for {file} in: {}); run `mep data fetch {dataset}` or pass --data-dir",
        format_dirs(searched)
    )]
    Missing {
        /// Name of the data set.
        dataset: String,
        /// The first missing file.
        file: String,
        /// Directories searched, in order.
        searched: Vec<PathBuf>,
    },
    /// The name is not one of the known data sets.
    #[error("unknown data set `{name}` (known: {known})")]
    UnknownDataset {
        /// The name asked for.
        name: String,
        /// Comma-separated known names.
        known: String,
    },
    /// A data set that is built in or derived cannot be downloaded.
    #[error(
        "data set `{0}` cannot be downloaded (it is built in, derived from another set, or a local copy only)"
    )]
    NotDownloadable(String),
    /// A downloaded file's digest differs from the catalogue's.
    #[error(
        "{url}: checksum mismatch (expected {algorithm} {expected}, got {actual}); the file was discarded"
    )]
    Checksum {
        /// Where the file came from.
        url: String,
        /// The digest's algorithm (`sha256`, `md5`).
        algorithm: &'static str,
        /// The catalogue checksum.
        expected: String,
        /// The checksum of the bytes received.
        actual: String,
    },
    /// A download failed (network error, HTTP error status, short body).
    #[error("{url}: download failed: {reason}")]
    Download {
        /// The address tried.
        url: String,
        /// Why it failed.
        reason: String,
    },
    /// A batching or subset option is out of range.
    #[error("invalid data option: {0}")]
    InvalidOption(String),
    /// No cache directory could be determined for this user.
    #[error("no per-user cache directory is available; pass --data-dir or set MEP_DATA_DIR")]
    NoCacheDir,
}

fn format_dirs(dirs: &[PathBuf]) -> String {
    if dirs.is_empty() {
        return "no directory".to_string();
    }
    dirs.iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn corrupt(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Self::Corrupt {
            path: path.into(),
            reason: reason.into(),
        }
    }
}
