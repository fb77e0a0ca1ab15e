//! Seeded shuffling and batching.

use mep::data::{Batcher, DataError, Split, epoch_order, one_hot_into};

fn split(n: usize, dim: usize) -> Split {
    let inputs = (0..n * dim).map(|i| i as f32).collect();
    let labels = (0..n as u32).map(|i| i % 3).collect();
    Split::new(inputs, labels, dim).unwrap()
}

#[test]
fn shuffling_is_a_deterministic_permutation_per_seed_and_epoch() {
    let a = epoch_order(1000, 42, 1, true);
    assert_eq!(
        a,
        epoch_order(1000, 42, 1, true),
        "same seed and epoch, same order"
    );
    assert_ne!(
        a,
        epoch_order(1000, 43, 1, true),
        "another seed, another order"
    );
    assert_ne!(
        a,
        epoch_order(1000, 42, 2, true),
        "another epoch, another order"
    );
    let mut sorted = a.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..1000).collect::<Vec<_>>(), "a permutation");
    assert_eq!(epoch_order(5, 42, 1, false), vec![0, 1, 2, 3, 4]);
    // Pinned so that a change of generator (which would change every published run) fails
    // here: this is the order xoshiro256++ gives for seed 42, epoch 1.
    assert_eq!(epoch_order(10, 42, 1, true), PINNED_ORDER);
}

const PINNED_ORDER: [usize; 10] = [1, 2, 0, 9, 5, 4, 8, 7, 6, 3];

#[test]
fn batches_cover_every_sample_once_with_a_short_last_batch() {
    let s = split(10, 3);
    let mut b = Batcher::new(&s, 4, 7, 1, true).unwrap();
    assert_eq!(b.num_batches(), 3);
    let order = epoch_order(10, 7, 1, true);
    let mut seen = Vec::new();
    let mut sizes = Vec::new();
    while let Some(batch) = b.next_batch() {
        sizes.push(batch.len());
        for (row, &label) in batch.inputs.chunks_exact(3).zip(&batch.labels) {
            let i = row[0] as usize / 3;
            assert_eq!(row, s.input(i));
            assert_eq!(label, s.labels()[i]);
            seen.push(i);
        }
    }
    assert_eq!(sizes, vec![4, 4, 2]);
    assert_eq!(seen, order);
}

#[test]
fn bad_batch_options_are_errors() {
    let s = split(4, 2);
    assert!(matches!(
        Batcher::new(&s, 0, 0, 0, true),
        Err(DataError::InvalidOption(_))
    ));
    assert!(Split::new(vec![0.0; 5], vec![0, 1], 2).is_err());
}

#[test]
fn one_hot_rows() {
    let mut out = vec![9.0; 3];
    one_hot_into(&[2, 0], 3, &mut out);
    assert_eq!(out, vec![0., 0., 1., 1., 0., 0.]);
}

#[test]
fn a_batch_larger_than_the_split_is_the_whole_split_without_overflow() {
    let s = split(5, 3);
    for size in [6, usize::MAX / 2, usize::MAX] {
        let mut b = Batcher::new(&s, size, 1, 1, false).unwrap();
        assert_eq!(b.num_batches(), 1);
        let batch = b.next_batch().unwrap();
        assert_eq!(batch.labels.len(), 5);
        assert_eq!(batch.inputs.len(), 15);
        assert!(b.next_batch().is_none());
    }
}
