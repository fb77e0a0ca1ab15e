//! Mini-batches: seeded shuffling, gathering into reusable buffers, one-hot targets.

use rand::SeedableRng;
use rand::rngs::Xoshiro256PlusPlus;
use rand::seq::SliceRandom;

use super::DataError;
use super::dataset::{Split, mix};

/// The sample order of one epoch: a permutation of `0..n` drawn from `(seed, epoch)`, or
/// `0..n` in order when `shuffle` is false. The same seed and epoch give the same order on
/// every platform (xoshiro256++ seeded through SplitMix64).
pub fn epoch_order(n: usize, seed: u64, epoch: usize, shuffle: bool) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    if shuffle {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(mix(seed, 0x5EED_0000 + epoch as u64));
        order.shuffle(&mut rng);
    }
    order
}

/// One mini-batch, gathered into buffers that the [`Batcher`] reuses.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Batch {
    /// `len * dim` inputs, row-major.
    pub inputs: Vec<f32>,
    /// `len` class labels.
    pub labels: Vec<u32>,
    /// `len` indices of the samples in their split.
    pub indices: Vec<usize>,
}

impl Batch {
    /// Number of samples in the batch.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// Walks a split in mini-batches of a fixed size (the last one may be smaller).
#[derive(Debug)]
pub struct Batcher<'a> {
    split: &'a Split,
    order: Vec<usize>,
    pos: usize,
    batch_size: usize,
    batch: Batch,
}

impl<'a> Batcher<'a> {
    /// Batches of `split` in the order of [`epoch_order`].
    pub fn new(
        split: &'a Split,
        batch_size: usize,
        seed: u64,
        epoch: usize,
        shuffle: bool,
    ) -> Result<Self, DataError> {
        if batch_size == 0 {
            return Err(DataError::InvalidOption(
                "batch size must be at least 1".into(),
            ));
        }
        if split.is_empty() {
            return Err(DataError::InvalidOption(
                "cannot batch an empty split".into(),
            ));
        }
        // A batch never holds more than the split, whatever size was asked for.
        let rows = batch_size.min(split.len());
        Ok(Self {
            split,
            order: epoch_order(split.len(), seed, epoch, shuffle),
            pos: 0,
            batch_size,
            batch: Batch {
                inputs: Vec::with_capacity(rows * split.dim()),
                labels: Vec::with_capacity(rows),
                indices: Vec::with_capacity(rows),
            },
        })
    }

    /// Number of batches in one pass.
    pub fn num_batches(&self) -> usize {
        self.order.len().div_ceil(self.batch_size)
    }

    /// The next batch, or `None` at the end of the pass. The returned batch borrows the
    /// batcher's buffers, which are overwritten by the next call (no allocation per batch).
    pub fn next_batch(&mut self) -> Option<&Batch> {
        self.next_batch_mut().map(|b| &*b)
    }

    /// [`Batcher::next_batch`], writable (augmentation changes the inputs in place).
    pub fn next_batch_mut(&mut self) -> Option<&mut Batch> {
        if self.pos >= self.order.len() {
            return None;
        }
        let end = self
            .pos
            .saturating_add(self.batch_size)
            .min(self.order.len());
        self.batch.inputs.clear();
        self.batch.labels.clear();
        self.batch.indices.clear();
        for &i in &self.order[self.pos..end] {
            self.batch.indices.push(i);
            self.batch.inputs.extend_from_slice(self.split.input(i));
            self.batch.labels.push(self.split.labels()[i]);
        }
        self.pos = end;
        Some(&mut self.batch)
    }
}

/// Writes one-hot rows for `labels` (`labels.len() * classes` values) into `out`.
pub fn one_hot_into(labels: &[u32], classes: usize, out: &mut Vec<f32>) {
    out.clear();
    out.resize(labels.len() * classes, 0.0);
    for (row, &l) in out.chunks_exact_mut(classes).zip(labels) {
        row[l as usize] = 1.0;
    }
}
