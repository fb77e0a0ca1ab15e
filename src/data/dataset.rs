//! In-memory data sets: inputs as `f32`, labels as class indices, a train and a test split.

use std::path::Path;

use rand::SeedableRng;
use rand::rngs::Xoshiro256PlusPlus;
use rand::seq::SliceRandom;

use super::DataError;
use super::catalog::{self, DatasetSpec, Source};
use super::idx;
use super::locate::DataLocator;

/// How raw pixel bytes become inputs.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Normalization {
    /// `x / 255`, so inputs lie in [0, 1].
    #[default]
    UnitRange,
    /// `(x / 255 - mean) / std` on every channel, for example MNIST's 0.1307 / 0.3081.
    MeanStd {
        /// Mean subtracted after scaling to [0, 1].
        mean: f32,
        /// Standard deviation divided by; must be positive.
        std: f32,
    },
    /// `(x / 255 - mean[c]) / std[c]` on channel `c` of an RGB image, for example
    /// CIFAR-10's training-set statistics.
    PerChannel {
        /// Per-channel means, after scaling to [0, 1].
        mean: [f32; 3],
        /// Per-channel standard deviations; each must be positive.
        std: [f32; 3],
    },
}

impl Normalization {
    /// Checks that every std is positive and finite and every mean finite, and that a
    /// per-channel normalisation meets a data set of three channels.
    pub fn validate(&self, channels: usize) -> Result<(), DataError> {
        let (means, stds): (&[f32], &[f32]) = match self {
            Self::UnitRange => (&[], &[]),
            Self::MeanStd { mean, std } => (std::slice::from_ref(mean), std::slice::from_ref(std)),
            Self::PerChannel { mean, std } => {
                if channels != 3 {
                    return Err(DataError::InvalidOption(format!(
                        "a per-channel normalisation needs 3 channels, the data set has {channels}"
                    )));
                }
                (mean, std)
            }
        };
        if let Some(std) = stds.iter().find(|s| !(**s > 0.0 && s.is_finite())) {
            return Err(DataError::InvalidOption(format!(
                "normalisation std must be positive, got {std}"
            )));
        }
        if let Some(mean) = means.iter().find(|m| !m.is_finite()) {
            return Err(DataError::InvalidOption(format!(
                "normalisation mean must be finite, got {mean}"
            )));
        }
        Ok(())
    }

    /// `(scale, shift)` such that a byte `p` of channel `channel` becomes
    /// `p * scale + shift`.
    pub fn affine(&self, channel: usize) -> (f32, f32) {
        let (mean, std) = match self {
            Self::UnitRange => (0.0, 1.0),
            Self::MeanStd { mean, std } => (*mean, *std),
            Self::PerChannel { mean, std } => (mean[channel.min(2)], std[channel.min(2)]),
        };
        (1.0 / (255.0 * std), -mean / std)
    }

    /// Normalises `bytes`, images of `channels` planes of `plane` pixels each laid out
    /// channel after channel (IDX, CIFAR-10), appending to `out`.
    fn extend(&self, out: &mut Vec<f32>, bytes: &[u8], plane: usize) {
        let per_channel: [(f32, f32); 3] = [self.affine(0), self.affine(1), self.affine(2)];
        let channels = if matches!(self, Self::PerChannel { .. }) {
            3
        } else {
            1
        };
        out.reserve(bytes.len());
        for (i, chunk) in bytes.chunks(plane).enumerate() {
            let (scale, shift) = per_channel[i % channels];
            out.extend(chunk.iter().map(|&p| f32::from(p) * scale + shift));
        }
    }
}

/// Options applied when a data set is loaded.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LoadOptions {
    /// Keep only the first N training samples (the paper's tables use subsets).
    pub train_samples: Option<usize>,
    /// Keep only the first N test samples.
    pub test_samples: Option<usize>,
    /// Pixel normalisation.
    pub normalization: Normalization,
}

/// One split (train or test): `len` samples of `dim` features each, with class labels.
#[derive(Debug, Clone, PartialEq)]
pub struct Split {
    inputs: Vec<f32>,
    labels: Vec<u32>,
    dim: usize,
}

impl Split {
    /// A split from row-major inputs (`labels.len() * dim` values) and labels.
    pub fn new(inputs: Vec<f32>, labels: Vec<u32>, dim: usize) -> Result<Self, DataError> {
        if dim == 0 || inputs.len() != labels.len() * dim {
            return Err(DataError::InvalidOption(format!(
                "split needs {} x {dim} inputs, got {}",
                labels.len(),
                inputs.len()
            )));
        }
        Ok(Self {
            inputs,
            labels,
            dim,
        })
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the split holds no sample.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Features per sample.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The features of sample `i`.
    pub fn input(&self, i: usize) -> &[f32] {
        &self.inputs[i * self.dim..(i + 1) * self.dim]
    }

    /// All labels, in sample order.
    pub fn labels(&self) -> &[u32] {
        &self.labels
    }

    /// All inputs, row-major.
    pub fn inputs(&self) -> &[f32] {
        &self.inputs
    }

    /// Number of samples of each class, for `classes` classes.
    pub fn class_histogram(&self, classes: usize) -> Vec<usize> {
        let mut h = vec![0; classes];
        for &l in &self.labels {
            h[l as usize] += 1;
        }
        h
    }

    fn truncate(&mut self, n: usize) {
        self.labels.truncate(n);
        self.inputs.truncate(n * self.dim);
    }

    /// Reorders every sample's features: feature `i` becomes the old feature `perm[i]`.
    pub(crate) fn permute_features(&mut self, perm: &[usize]) {
        let mut row = vec![0f32; self.dim];
        for sample in self.inputs.chunks_exact_mut(self.dim) {
            for (dst, &src) in row.iter_mut().zip(perm) {
                *dst = sample[src];
            }
            sample.copy_from_slice(&row);
        }
    }
}

/// A loaded data set.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// Name it was loaded under (with the task suffix for permuted MNIST).
    pub name: String,
    /// Shape of one input as (channels, height, width).
    pub input_shape: [usize; 3],
    /// Number of classes.
    pub classes: usize,
    /// Training split.
    pub train: Split,
    /// Test split.
    pub test: Split,
}

impl Dataset {
    /// A data set from in-memory splits (a front-end's arrays), checked: both splits hold
    /// samples of `input_shape`'s size, at least one each, every label below `classes`
    /// (at least 2) and every input finite. Inputs are used as given (no normalisation).
    pub fn from_splits(
        name: &str,
        input_shape: [usize; 3],
        classes: usize,
        train: Split,
        test: Split,
    ) -> Result<Self, DataError> {
        let invalid = |m: String| Err(DataError::InvalidOption(m));
        let dim: usize = input_shape.iter().product();
        if dim == 0 {
            return invalid(format!("input shape {input_shape:?} holds no feature"));
        }
        if classes < 2 {
            return invalid(format!("{classes} classes: a classifier needs at least 2"));
        }
        for (split, which) in [(&train, "train"), (&test, "test")] {
            if split.is_empty() {
                return invalid(format!("the {which} split holds no sample"));
            }
            if split.dim() != dim {
                return invalid(format!(
                    "the {which} split has {} features per sample, the input shape {input_shape:?} {dim}",
                    split.dim()
                ));
            }
            if let Some((i, &l)) = split
                .labels()
                .iter()
                .enumerate()
                .find(|&(_, &l)| l as usize >= classes)
            {
                return invalid(format!(
                    "{which} label {l} of sample {i} is not below the {classes} classes"
                ));
            }
            if let Some(i) = split.inputs().iter().position(|v| !v.is_finite()) {
                return invalid(format!(
                    "{which} sample {} holds a non-finite input",
                    i / dim
                ));
            }
        }
        Ok(Self {
            name: name.to_string(),
            input_shape,
            classes,
            train,
            test,
        })
    }

    /// Features per sample (`channels * height * width`).
    pub fn input_dim(&self) -> usize {
        self.input_shape.iter().product()
    }
}

/// Loads a named data set: `mnist`, `fashion-mnist`, `xor` or `permuted-mnist[:K]`.
///
/// `seed` only matters for `permuted-mnist`, whose task `K > 0` permutes pixels with a
/// permutation drawn from `(seed, K)`; task 0 is the identity.
pub fn load(
    name: &str,
    locator: &DataLocator,
    options: &LoadOptions,
    seed: u64,
) -> Result<Dataset, DataError> {
    let spec = catalog::find(name)?;
    let mut dataset = match &spec.source {
        Source::Idx { .. } => {
            let files = locator.locate(&spec)?;
            load_idx(
                &spec,
                &files.train_images,
                &files.train_labels,
                &files.test_images,
                &files.test_labels,
                options.normalization,
            )?
        }
        Source::BuiltIn => xor(options.normalization)?,
        Source::CifarBinary { records, .. } => {
            let (train, test) = locator.locate_cifar(&spec)?;
            load_cifar(&spec, &train, &test, *records, options.normalization)?
        }
        Source::Derived { from } => {
            let task = parse_task(name)?;
            let mut base = load(from, locator, options, seed)?;
            permute_pixels(&mut base, task, seed);
            base.name = format!("{}:{task}", spec.name);
            base
        }
    };
    apply_subset(&mut dataset, options)?;
    Ok(dataset)
}

fn parse_task(name: &str) -> Result<usize, DataError> {
    match name.split_once(':') {
        None => Ok(0),
        Some((_, k)) => k.parse().map_err(|_| {
            DataError::InvalidOption(format!("`{name}`: the task after ':' must be a number"))
        }),
    }
}

/// Loads an IDX data set from four explicit files (gzipped or raw).
pub fn load_idx(
    spec: &DatasetSpec,
    train_images: &Path,
    train_labels: &Path,
    test_images: &Path,
    test_labels: &Path,
    normalization: Normalization,
) -> Result<Dataset, DataError> {
    normalization.validate(spec.input_shape[0])?;
    let train = load_split(spec, train_images, train_labels, normalization)?;
    let test = load_split(spec, test_images, test_labels, normalization)?;
    Ok(Dataset {
        name: spec.name.clone(),
        input_shape: spec.input_shape,
        classes: spec.classes,
        train,
        test,
    })
}

fn load_split(
    spec: &DatasetSpec,
    images_path: &Path,
    labels_path: &Path,
    normalization: Normalization,
) -> Result<Split, DataError> {
    let images = idx::read_images(images_path)?;
    let labels = idx::read_labels(labels_path)?;
    let [_, h, w] = spec.input_shape;
    if (images.rows, images.cols) != (h, w) {
        return Err(DataError::corrupt(
            images_path,
            format!(
                "images are {}x{}, but {} images are {h}x{w}",
                images.rows, images.cols, spec.name
            ),
        ));
    }
    if images.count != labels.labels.len() {
        return Err(DataError::CountMismatch {
            images_path: images_path.to_path_buf(),
            images: images.count,
            labels_path: labels_path.to_path_buf(),
            labels: labels.labels.len(),
        });
    }
    if let Some((i, &l)) = labels
        .labels
        .iter()
        .enumerate()
        .find(|&(_, &l)| l as usize >= spec.classes)
    {
        return Err(DataError::corrupt(
            labels_path,
            format!(
                "label {l} of sample {i} is not below {} classes",
                spec.classes
            ),
        ));
    }
    let mut inputs = Vec::new();
    normalization.extend(&mut inputs, &images.pixels, h * w);
    let labels = labels.labels.into_iter().map(u32::from).collect();
    Split::new(inputs, labels, h * w)
}

/// Loads CIFAR-10 from its training batch files and test batch file; each must hold
/// exactly `records` records (the official files 10,000, the shared subset 1,017).
pub fn load_cifar(
    spec: &DatasetSpec,
    train: &[std::path::PathBuf],
    test: &Path,
    records: usize,
    normalization: Normalization,
) -> Result<Dataset, DataError> {
    normalization.validate(spec.input_shape[0])?;
    let [_, h, w] = spec.input_shape;
    let read = |paths: &[&Path]| -> Result<Split, DataError> {
        let (mut inputs, mut labels) = (Vec::new(), Vec::new());
        for path in paths {
            let batch = super::cifar::read_batch(path)?;
            if batch.len() != records {
                return Err(DataError::corrupt(
                    *path,
                    format!(
                        "{} records, but every {} batch file holds {records}",
                        batch.len(),
                        spec.name
                    ),
                ));
            }
            normalization.extend(&mut inputs, &batch.pixels, h * w);
            labels.extend(batch.labels.iter().map(|&l| u32::from(l)));
        }
        Split::new(inputs, labels, super::cifar::PIXELS)
    };
    let train_paths: Vec<&Path> = train.iter().map(|p| p.as_path()).collect();
    Ok(Dataset {
        name: spec.name.clone(),
        input_shape: spec.input_shape,
        classes: spec.classes,
        train: read(&train_paths)?,
        test: read(&[test])?,
    })
}

fn apply_subset(dataset: &mut Dataset, options: &LoadOptions) -> Result<(), DataError> {
    for (split, n, which) in [
        (&mut dataset.train, options.train_samples, "train"),
        (&mut dataset.test, options.test_samples, "test"),
    ] {
        if let Some(n) = n {
            if n == 0 || n > split.len() {
                return Err(DataError::InvalidOption(format!(
                    "--{which}-samples {n}: must be between 1 and {} for {}",
                    split.len(),
                    dataset.name
                )));
            }
            split.truncate(n);
        }
    }
    Ok(())
}

/// The XOR truth table as a two-class problem; train and test are the same 4 samples,
/// inputs 0 and 1 normalised as the bytes 0 and 255 would be.
pub fn xor(normalization: Normalization) -> Result<Dataset, DataError> {
    normalization.validate(1)?;
    let mut inputs = Vec::new();
    normalization.extend(&mut inputs, &[0, 0, 0, 255, 255, 0, 255, 255], 2);
    let labels = vec![0, 1, 1, 0];
    let split = Split {
        inputs,
        labels,
        dim: 2,
    };
    Ok(Dataset {
        name: "xor".into(),
        input_shape: [1, 1, 2],
        classes: 2,
        train: split.clone(),
        test: split,
    })
}

/// The pixel permutation of permuted-MNIST task `task` (identity for task 0).
pub fn task_permutation(dim: usize, task: usize, seed: u64) -> Vec<usize> {
    let mut perm: Vec<usize> = (0..dim).collect();
    if task > 0 {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(mix(seed, task as u64));
        perm.shuffle(&mut rng);
    }
    perm
}

/// Applies task `task`'s pixel permutation to both splits of `dataset`.
pub fn permute_pixels(dataset: &mut Dataset, task: usize, seed: u64) {
    let perm = task_permutation(dataset.input_dim(), task, seed);
    dataset.train.permute_features(&perm);
    dataset.test.permute_features(&perm);
}

/// Combines a seed with a stream index (SplitMix64 finaliser), so nearby seeds and indices
/// give unrelated generators.
pub(crate) fn mix(seed: u64, stream: u64) -> u64 {
    let mut z = seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
