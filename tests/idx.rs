//! The IDX reader and data-set loading on the real files, and every bad-input case.

mod common;

use std::fs;

use common::{data_dir, gzip, idx_bytes, scratch_dir};
use mep::data::idx::{IMAGES_MAGIC, LABELS_MAGIC, read_images, read_labels};
use mep::data::{self, DataError, DataLocator, LoadOptions, Normalization};

use common::locator;

#[test]
fn mnist_real_files_have_the_published_counts_histograms_and_first_labels() {
    let ds = data::load("mnist", &locator(), &LoadOptions::default(), 0).unwrap();
    assert_eq!(ds.train.len(), 60_000);
    assert_eq!(ds.test.len(), 10_000);
    assert_eq!(ds.input_dim(), 784);
    assert_eq!(&ds.train.labels()[..5], &[5, 0, 4, 1, 9]);
    assert_eq!(&ds.test.labels()[..5], &[7, 2, 1, 0, 4]);
    // Class counts of the original distribution.
    assert_eq!(
        ds.train.class_histogram(10),
        vec![5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    );
    assert_eq!(
        ds.test.class_histogram(10),
        vec![980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    );
    // Unit-range normalisation: values in [0, 1], both ends reached.
    let (min, max) = ds
        .train
        .inputs()
        .iter()
        .fold((f32::MAX, f32::MIN), |(a, b), &x| (a.min(x), b.max(x)));
    assert_eq!((min, max), (0.0, 1.0));
}

#[test]
fn mnist_raw_reader_matches_known_pixels() {
    let imgs = read_images(&data_dir().join("mnist/train-images-idx3-ubyte.gz")).unwrap();
    assert_eq!((imgs.count, imgs.rows, imgs.cols), (60_000, 28, 28));
    // The first image is a "5": the top rows are blank and the total ink is known.
    assert!(imgs.pixels[..28 * 4].iter().all(|&p| p == 0));
    let ink: u64 = imgs.pixels[..784].iter().map(|&p| p as u64).sum();
    assert_eq!(ink, 27525);
}

#[test]
fn fashion_mnist_real_files_load() {
    let ds = data::load("fashion-mnist", &locator(), &LoadOptions::default(), 0).unwrap();
    assert_eq!((ds.train.len(), ds.test.len()), (60_000, 10_000));
    // Fashion-MNIST is balanced: 6000 / 1000 per class; first labels are known.
    assert_eq!(ds.train.class_histogram(10), vec![6000; 10]);
    assert_eq!(ds.test.class_histogram(10), vec![1000; 10]);
    assert_eq!(&ds.train.labels()[..5], &[9, 0, 0, 3, 0]);
    assert_eq!(&ds.test.labels()[..5], &[9, 2, 1, 1, 6]);
}

#[test]
fn subsets_take_the_first_samples_and_reject_bad_sizes() {
    let opts = LoadOptions {
        train_samples: Some(5000),
        test_samples: Some(1000),
        ..Default::default()
    };
    let ds = data::load("mnist", &locator(), &opts, 0).unwrap();
    assert_eq!((ds.train.len(), ds.test.len()), (5000, 1000));
    assert_eq!(&ds.train.labels()[..5], &[5, 0, 4, 1, 9]);
    for bad in [0, 60_001] {
        let opts = LoadOptions {
            train_samples: Some(bad),
            ..Default::default()
        };
        let err = data::load("mnist", &locator(), &opts, 0).unwrap_err();
        assert!(matches!(err, DataError::InvalidOption(_)), "{err}");
    }
}

#[test]
fn mean_std_normalisation_standardises() {
    let opts = LoadOptions {
        normalization: Normalization::MeanStd {
            mean: 0.1307,
            std: 0.3081,
        },
        ..Default::default()
    };
    let ds = data::load("mnist", &locator(), &opts, 0).unwrap();
    let x = ds.train.inputs();
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / x.len() as f64;
    let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / x.len() as f64;
    assert!(mean.abs() < 1e-3, "mean {mean}");
    assert!((var.sqrt() - 1.0).abs() < 1e-3, "std {}", var.sqrt());
    let bad = LoadOptions {
        normalization: Normalization::MeanStd {
            mean: 0.0,
            std: 0.0,
        },
        ..Default::default()
    };
    assert!(matches!(
        data::load("mnist", &locator(), &bad, 0),
        Err(DataError::InvalidOption(_))
    ));
}

#[test]
fn permuted_mnist_task_zero_is_identity_and_tasks_differ_by_seed() {
    let opts = LoadOptions {
        train_samples: Some(100),
        test_samples: Some(100),
        ..Default::default()
    };
    let base = data::load("mnist", &locator(), &opts, 7).unwrap();
    let t0 = data::load("permuted-mnist", &locator(), &opts, 7).unwrap();
    assert_eq!(t0.train.inputs(), base.train.inputs());
    let t1 = data::load("permuted-mnist:1", &locator(), &opts, 7).unwrap();
    let t1_again = data::load("permuted-mnist:1", &locator(), &opts, 7).unwrap();
    let t1_other_seed = data::load("permuted-mnist:1", &locator(), &opts, 8).unwrap();
    assert_eq!(t1.train.inputs(), t1_again.train.inputs());
    assert_ne!(t1.train.inputs(), base.train.inputs());
    assert_ne!(t1.train.inputs(), t1_other_seed.train.inputs());
    assert_eq!(t1.train.labels(), base.train.labels());
    // A permutation moves pixels, it does not change them.
    let perm = data::dataset::task_permutation(784, 1, 7);
    for (i, &src) in perm.iter().enumerate() {
        assert_eq!(t1.test.input(3)[i], base.test.input(3)[src]);
    }
    assert!(matches!(
        data::load("permuted-mnist:x", &locator(), &opts, 7),
        Err(DataError::InvalidOption(_))
    ));
}

#[test]
fn xor_is_built_in() {
    let ds = data::load(
        "xor",
        &DataLocator::new(None, None, None),
        &LoadOptions::default(),
        0,
    )
    .unwrap();
    assert_eq!(ds.train.len(), 4);
    assert_eq!(ds.train.labels(), &[0, 1, 1, 0]);
    assert_eq!(ds.train.input(2), &[1.0, 0.0]);
}

fn write(dir: &std::path::Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let p = dir.join(name);
    fs::write(&p, bytes).unwrap();
    p
}

fn corrupt_reason(err: DataError, path: &std::path::Path) -> String {
    match err {
        DataError::Corrupt { path: p, reason } => {
            assert_eq!(p, path, "the error names the file");
            reason
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[test]
fn bad_idx_files_give_typed_errors_naming_the_file() {
    let dir = scratch_dir("idx-bad");
    let good = idx_bytes(IMAGES_MAGIC, &[2, 2, 2], &[1, 2, 3, 4, 5, 6, 7, 8]);
    // Sanity: the hand-built file reads, raw and gzipped.
    let p = write(&dir, "ok", &good);
    assert_eq!(
        read_images(&p).unwrap().pixels,
        vec![1, 2, 3, 4, 5, 6, 7, 8]
    );
    let p = write(&dir, "ok.gz", &gzip(&good));
    assert_eq!(read_images(&p).unwrap().count, 2);

    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "labels-as-images",
            idx_bytes(LABELS_MAGIC, &[8], &[0; 8]),
            "bad magic number 2049",
        ),
        (
            "garbage-magic",
            idx_bytes(0xdead_beef, &[1, 1, 1], &[0]),
            "bad magic number",
        ),
        ("short-header", vec![0, 0, 8], "too short"),
        (
            "short-dims",
            idx_bytes(IMAGES_MAGIC, &[2], &[]),
            "header truncated",
        ),
        (
            "zero-dim",
            idx_bytes(IMAGES_MAGIC, &[2, 0, 2], &[]),
            "dimension 1 of the header is zero",
        ),
        (
            "truncated-raw",
            good[..good.len() - 3].to_vec(),
            "truncated: header [2, 2, 2] promises 8 data bytes, found 5",
        ),
        (
            "trailing",
            [good.clone(), vec![9]].concat(),
            "trailing bytes",
        ),
        (
            "truncated-gz",
            {
                let z = gzip(&good);
                z[..z.len() - 6].to_vec()
            },
            "damaged compressed stream",
        ),
        (
            "bad-gzip-crc",
            {
                let mut z = gzip(&good);
                let n = z.len();
                z[n - 8] ^= 0xff;
                z
            },
            "damaged compressed stream",
        ),
    ];
    for (name, bytes, expected) in cases {
        let p = write(&dir, name, &bytes);
        let reason = corrupt_reason(read_images(&p).unwrap_err(), &p);
        assert!(
            reason.contains(expected),
            "{name}: `{reason}` lacks `{expected}`"
        );
    }

    let missing = dir.join("does-not-exist.gz");
    match read_labels(&missing).unwrap_err() {
        DataError::Io { path, source } => {
            assert_eq!(path, missing);
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("expected Io, got {other:?}"),
    }
}

/// Writes a tiny 28x28 data set with the given label files under `root/mnist`.
fn fake_mnist(root: &std::path::Path, train_labels: &[u8], test_labels: &[u8], rows: u32) {
    let dir = root.join("mnist");
    fs::create_dir_all(&dir).unwrap();
    let images = |n: usize| {
        idx_bytes(
            IMAGES_MAGIC,
            &[n as u32, rows, 28],
            &vec![7; n * rows as usize * 28],
        )
    };
    fs::write(dir.join("train-images-idx3-ubyte.gz"), gzip(&images(3))).unwrap();
    fs::write(
        dir.join("train-labels-idx1-ubyte.gz"),
        gzip(&idx_bytes(
            LABELS_MAGIC,
            &[train_labels.len() as u32],
            train_labels,
        )),
    )
    .unwrap();
    // The test files are stored unpacked: the locator accepts both forms.
    fs::write(dir.join("t10k-images-idx3-ubyte"), images(2)).unwrap();
    fs::write(
        dir.join("t10k-labels-idx1-ubyte"),
        idx_bytes(LABELS_MAGIC, &[test_labels.len() as u32], test_labels),
    )
    .unwrap();
}

#[test]
fn mismatched_splits_wrong_shapes_and_bad_labels_are_rejected() {
    let loc = |root: &std::path::Path| DataLocator::new(Some(root.to_path_buf()), None, None);
    let opts = LoadOptions::default();

    let root = scratch_dir("idx-ok");
    fake_mnist(&root, &[1, 2, 3], &[4, 5], 28);
    let ds = data::load("mnist", &loc(&root), &opts, 0).unwrap();
    assert_eq!((ds.train.len(), ds.test.len()), (3, 2));

    let root = scratch_dir("idx-count");
    fake_mnist(&root, &[1, 2], &[4, 5], 28);
    match data::load("mnist", &loc(&root), &opts, 0).unwrap_err() {
        DataError::CountMismatch {
            images,
            labels,
            images_path,
            ..
        } => {
            assert_eq!((images, labels), (3, 2));
            assert!(images_path.ends_with("mnist/train-images-idx3-ubyte.gz"));
        }
        other => panic!("expected CountMismatch, got {other:?}"),
    }

    let root = scratch_dir("idx-shape");
    fake_mnist(&root, &[1, 2, 3], &[4, 5], 27);
    let err = data::load("mnist", &loc(&root), &opts, 0).unwrap_err();
    assert!(err.to_string().contains("images are 27x28"), "{err}");

    let root = scratch_dir("idx-label");
    fake_mnist(&root, &[1, 12, 3], &[4, 5], 28);
    let err = data::load("mnist", &loc(&root), &opts, 0).unwrap_err();
    assert!(err.to_string().contains("label 12 of sample 1"), "{err}");
}

#[test]
fn missing_and_unknown_data_sets_say_where_they_looked() {
    let empty = scratch_dir("idx-empty");
    let loc = DataLocator::new(Some(empty.clone()), None, Some(empty.join("cache")));
    match data::load("mnist", &loc, &LoadOptions::default(), 0).unwrap_err() {
        DataError::Missing {
            dataset, searched, ..
        } => {
            assert_eq!(dataset, "mnist");
            assert_eq!(
                searched,
                vec![empty.join("mnist"), empty.join("cache/mnist")]
            );
        }
        other => panic!("expected Missing, got {other:?}"),
    }
    let err = data::load("cifar-99", &loc, &LoadOptions::default(), 0).unwrap_err();
    assert!(matches!(err, DataError::UnknownDataset { .. }));
    assert!(
        err.to_string()
            .contains("mnist, fashion-mnist, xor, cifar-10, cifar-10-subset, permuted-mnist")
    );
}

#[test]
fn lookup_order_is_flag_then_env_then_cache() {
    let a = scratch_dir("idx-order-a");
    let b = scratch_dir("idx-order-b");
    fake_mnist(&b, &[1, 2, 3], &[4, 5], 28);
    let spec = data::find("mnist").unwrap();
    // Only the second place has it.
    let loc = DataLocator::new(Some(a.clone()), Some(b.clone()), None);
    assert_eq!(loc.locate(&spec).unwrap().dir, b.join("mnist"));
    // The first place wins when both have it.
    fake_mnist(&a, &[1, 2, 3], &[4, 5], 28);
    assert_eq!(loc.locate(&spec).unwrap().dir, a.join("mnist"));
    // The cache is last.
    let loc = DataLocator::new(None, None, Some(b.clone()));
    assert_eq!(loc.locate(&spec).unwrap().dir, b.join("mnist"));
}

#[test]
fn a_data_file_that_is_not_a_regular_file_is_an_error_not_a_fallback() {
    let a = scratch_dir("idx-irregular-a");
    let b = scratch_dir("idx-irregular-b");
    fake_mnist(&b, &[1, 2, 3], &[4, 5], 28);
    let spec = data::find("mnist").unwrap();
    // In the first place, the training images are a directory; the second has them all.
    let bad = a.join("mnist").join("train-images-idx3-ubyte.gz");
    std::fs::create_dir_all(&bad).unwrap();
    let loc = DataLocator::new(Some(a.clone()), Some(b.clone()), None);
    let err = loc.locate(&spec).unwrap_err();
    assert!(
        matches!(&err, DataError::Corrupt { path, .. } if *path == bad),
        "{err}"
    );
    assert!(err.to_string().contains("not a regular file"), "{err}");
}

#[test]
fn multi_member_gzip_reads_as_one_stream_and_trailing_garbage_is_corruption() {
    let dir = scratch_dir("idx-gzip-members");
    let good = idx_bytes(IMAGES_MAGIC, &[2, 2, 2], &[1, 2, 3, 4, 5, 6, 7, 8]);
    // Two members (as `cat a.gz b.gz` makes): the header in one, the pixels in the other.
    let mut two = gzip(&good[..10]);
    two.extend(gzip(&good[10..]));
    let p = write(&dir, "two.gz", &two);
    let images = read_images(&p).unwrap();
    assert_eq!(images.pixels, [1, 2, 3, 4, 5, 6, 7, 8]);
    // A valid member followed by bytes that are no gzip member.
    let mut tail = gzip(&good);
    tail.extend_from_slice(b"not gzip at all");
    let p = write(&dir, "tail.gz", &tail);
    let reason = corrupt_reason(read_images(&p).unwrap_err(), &p);
    assert!(reason.contains("damaged compressed stream"), "{reason}");
}
