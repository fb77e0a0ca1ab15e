//! The named data sets mep knows: where they come from and how to check them.

use super::{DataError, Normalization};

/// Which part of a data set a file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileRole {
    /// Training images.
    TrainImages,
    /// Training labels.
    TrainLabels,
    /// Test images.
    TestImages,
    /// Test labels.
    TestLabels,
}

/// One downloadable file of a data set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSpec {
    /// What the file holds.
    pub role: FileRole,
    /// File name on the mirrors and on disk (the gzipped name).
    pub file_name: String,
    /// SHA-256 of the gzipped file, lower-case hex.
    pub sha256: String,
}

/// How a data set comes into being.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Four IDX files, fetched from the first mirror that serves them.
    Idx {
        /// Base URLs, tried in order; a file's URL is the base followed by its name.
        mirrors: Vec<String>,
        /// The four files (train/test images/labels).
        files: Vec<FileSpec>,
    },
    /// Built into the library (no files).
    BuiltIn,
    /// CIFAR-10's binary batch files (`data_batch_1..5.bin`, `test_batch.bin`, raw or
    /// gzipped) in the data set's folder, each holding `records` records.
    CifarBinary {
        /// Records of every batch file (10,000 in the official files).
        records: usize,
        /// The archive the batch files are unpacked from (`None`: a local copy only).
        archive: Option<Archive>,
    },
    /// Computed from another named data set.
    Derived {
        /// The data set it is computed from.
        from: String,
    },
}

/// A file's expected digest, lower-case hex.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checksum {
    /// SHA-256.
    Sha256(String),
    /// MD5: only where it is all a data set's authors publish (CIFAR-10); it still catches
    /// truncated and corrupted downloads.
    Md5(String),
}

impl Checksum {
    /// The algorithm's name, as error messages show it.
    pub fn algorithm(&self) -> &'static str {
        match self {
            Self::Sha256(_) => "sha256",
            Self::Md5(_) => "md5",
        }
    }

    /// The expected digest.
    pub fn hex(&self) -> &str {
        match self {
            Self::Sha256(h) | Self::Md5(h) => h,
        }
    }
}

/// A downloadable archive that holds a data set's files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Archive {
    /// Base URLs, tried in order; the archive's URL is the base followed by its name.
    pub mirrors: Vec<String>,
    /// Its file name on the mirrors, and in the data set's folder while it is unpacked.
    pub file_name: String,
    /// Its published checksum.
    pub checksum: Checksum,
}

/// A named data set: its source, sizes and shape.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetSpec {
    /// Name used on the command line (`mnist`, `fashion-mnist`, ...).
    pub name: String,
    /// One line for `mep data list`.
    pub description: String,
    /// Where its data comes from.
    pub source: Source,
    /// Number of training samples.
    pub train_count: usize,
    /// Number of test samples.
    pub test_count: usize,
    /// Shape of one input as (channels, height, width).
    pub input_shape: [usize; 3],
    /// Number of classes.
    pub classes: usize,
    /// Its own standardisation: the mean and standard deviation of its training split's
    /// pixels (scaled to [0, 1]), as PyTorch's examples and the paper's reference use them;
    /// built-in sets are used as they are.
    pub normalization: Normalization,
}

impl DatasetSpec {
    /// The files of an IDX data set (empty for built-in and derived sets).
    pub fn files(&self) -> &[FileSpec] {
        match &self.source {
            Source::Idx { files, .. } => files,
            _ => &[],
        }
    }

    /// The file that plays `role`, if this is an IDX data set.
    pub fn file(&self, role: FileRole) -> Option<&FileSpec> {
        self.files().iter().find(|f| f.role == role)
    }
}

fn idx_files(sums: [&str; 4]) -> Vec<FileSpec> {
    let names = [
        (FileRole::TrainImages, "train-images-idx3-ubyte.gz"),
        (FileRole::TrainLabels, "train-labels-idx1-ubyte.gz"),
        (FileRole::TestImages, "t10k-images-idx3-ubyte.gz"),
        (FileRole::TestLabels, "t10k-labels-idx1-ubyte.gz"),
    ];
    names
        .iter()
        .zip(sums)
        .map(|(&(role, name), sum)| FileSpec {
            role,
            file_name: name.to_string(),
            sha256: sum.to_string(),
        })
        .collect()
}

/// Every data set mep knows, in the order `mep data list` shows them.
pub fn catalog() -> Vec<DatasetSpec> {
    vec![
        DatasetSpec {
            name: "mnist".into(),
            description: "MNIST handwritten digits, 28x28 grey, 10 classes".into(),
            source: Source::Idx {
                mirrors: vec![
                    "https://ossci-datasets.s3.amazonaws.com/mnist/".into(),
                    "https://storage.googleapis.com/cvdf-datasets/mnist/".into(),
                ],
                // SHA-256 of the original gzipped distribution files.
                files: idx_files([
                    "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
                    "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
                    "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
                    "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
                ]),
            },
            train_count: 60_000,
            test_count: 10_000,
            input_shape: [1, 28, 28],
            classes: 10,
            normalization: Normalization::MeanStd {
                mean: 0.1307,
                std: 0.3081,
            },
        },
        DatasetSpec {
            name: "fashion-mnist".into(),
            description: "Fashion-MNIST (Zalando) article images, 28x28 grey, 10 classes".into(),
            source: Source::Idx {
                mirrors: vec!["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/".into()],
                files: idx_files([
                    "08dc20ab1689590a0bcd66e874647b6ee8464e2d501b5a3f1f78831db19a3fdc",
                    "b0197879cbda89f3dc7b894f9fd52b858e68ea4182b6947c9d8c2b67e5f18dcc",
                    "78dcbbfb5a27efaf1b6c1d616caca68560be8766c5bffcb2791df9273a534229",
                    "42bd18137a62d5998cdeae52bf3a0676ac6b706f5cf8439b47bb5b151ae3dccf",
                ]),
            },
            train_count: 60_000,
            test_count: 10_000,
            input_shape: [1, 28, 28],
            classes: 10,
            normalization: Normalization::MeanStd {
                mean: 0.2860,
                std: 0.3530,
            },
        },
        DatasetSpec {
            name: "xor".into(),
            description: "XOR truth table, 4 samples of 2 inputs, 2 classes (built in)".into(),
            source: Source::BuiltIn,
            train_count: 4,
            test_count: 4,
            input_shape: [1, 1, 2],
            classes: 2,
            normalization: Normalization::UnitRange,
        },
        DatasetSpec {
            name: "cifar-10".into(),
            description: "CIFAR-10 (Krizhevsky), 32x32 RGB photographs, 10 classes; the official binary archive (170 MB)".into(),
            source: Source::CifarBinary {
                records: super::cifar::OFFICIAL_RECORDS,
                archive: Some(Archive {
                    mirrors: vec!["https://www.cs.toronto.edu/~kriz/".into()],
                    file_name: "cifar-10-binary.tar.gz".into(),
                    // The only checksum the authors publish (170,052,171 bytes).
                    checksum: Checksum::Md5("c32a1d4ab5d03f1284b67883e8d87530".into()),
                }),
            },
            train_count: 5 * super::cifar::OFFICIAL_RECORDS,
            test_count: super::cifar::OFFICIAL_RECORDS,
            input_shape: [3, 32, 32],
            classes: 10,
            normalization: CIFAR10_NORMALIZATION,
        },
        DatasetSpec {
            name: "cifar-10-subset".into(),
            description: "CIFAR-10, the first 1,017 records of each official batch file (a genuine subset, local copy only), 32x32 RGB, 10 classes".into(),
            source: Source::CifarBinary {
                records: 1017,
                archive: None,
            },
            train_count: 5 * 1017,
            test_count: 1017,
            input_shape: [3, 32, 32],
            classes: 10,
            normalization: CIFAR10_NORMALIZATION,
        },
        DatasetSpec {
            name: "permuted-mnist".into(),
            description: "MNIST with a seeded pixel permutation per task; `permuted-mnist:K` is task K (task 0 = identity)".into(),
            source: Source::Derived {
                from: "mnist".into(),
            },
            train_count: 60_000,
            test_count: 10_000,
            input_shape: [1, 28, 28],
            classes: 10,
            normalization: Normalization::MeanStd {
                mean: 0.1307,
                std: 0.3081,
            },
        },
    ]
}

/// CIFAR-10's per-channel training-set statistics (R, G, B), the values PyTorch examples
/// use. The shared subset's own statistics are within 0.01 of them (tested).
pub const CIFAR10_NORMALIZATION: Normalization = Normalization::PerChannel {
    mean: [0.4914, 0.4822, 0.4465],
    std: [0.2470, 0.2435, 0.2616],
};

/// Looks a data set up by name (a `permuted-mnist:K` task suffix is accepted and ignored here).
pub fn find(name: &str) -> Result<DatasetSpec, DataError> {
    let base = name.split(':').next().unwrap_or(name);
    catalog()
        .into_iter()
        .find(|d| d.name == base)
        .ok_or_else(|| DataError::UnknownDataset {
            name: name.to_string(),
            known: catalog()
                .iter()
                .map(|d| d.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })
}
