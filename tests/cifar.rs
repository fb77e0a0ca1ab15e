//! The CIFAR-10 binary reader against the genuine subset in the shared data (the first
//! 1,017 records of each official file; counts, class histograms and first labels from its
//! README) and against hand-made bad files.

mod common;

use common::{data_dir, gzip, scratch_dir};
use mep::data::DataError;
use mep::data::cifar::{CLASSES, PIXELS, RECORD, read_batch};

fn histogram(labels: &[u8]) -> Vec<usize> {
    let mut h = vec![0; CLASSES];
    for &l in labels {
        h[usize::from(l)] += 1;
    }
    h
}

#[test]
fn the_shared_subset_has_its_published_counts_histograms_and_first_labels() {
    let dir = data_dir().join("cifar-10-subset");
    // The subset is the shared copy (CI checks that it is there); a user's machine that
    // fetched MNIST into its cache has no subset to read.
    if !dir.is_dir() {
        eprintln!("skipped: no CIFAR-10 subset in {}", dir.display());
        return;
    }
    let mut train_labels = Vec::new();
    for k in 1..=5 {
        let batch = read_batch(&dir.join(format!("data_batch_{k}.bin.gz"))).unwrap();
        assert_eq!(batch.len(), 1017, "data_batch_{k}");
        assert_eq!(batch.pixels.len(), 1017 * PIXELS);
        if k == 1 {
            assert_eq!(batch.labels[..5], [6, 9, 9, 4, 1]);
        }
        train_labels.extend(batch.labels);
    }
    assert_eq!(
        histogram(&train_labels),
        [517, 524, 490, 493, 537, 475, 503, 516, 529, 501]
    );
    let test = read_batch(&dir.join("test_batch.bin.gz")).unwrap();
    assert_eq!(test.len(), 1017);
    assert_eq!(test.labels[..5], [3, 8, 8, 0, 6]);
    assert_eq!(
        histogram(&test.labels),
        [105, 93, 100, 104, 92, 87, 114, 102, 110, 110]
    );
    // The pixels are real images, not a constant: the first image's red plane varies.
    let red = &test.pixels[..32 * 32];
    assert!(red.iter().max() > red.iter().min());
}

fn reason(path: &std::path::Path) -> String {
    match read_batch(path).unwrap_err() {
        DataError::Corrupt { path: p, reason } => {
            assert_eq!(p, path, "the error names the file");
            reason
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[test]
fn bad_batch_files_give_typed_errors_naming_the_file() {
    let dir = scratch_dir("cifar-bad");
    let mut two = vec![0u8; 2 * RECORD];
    two[0] = 3;
    two[RECORD] = 9;
    two[RECORD + 1] = 200;
    // Raw and gzipped read the same.
    let raw = dir.join("two.bin");
    std::fs::write(&raw, &two).unwrap();
    let gz = dir.join("two.bin.gz");
    std::fs::write(&gz, gzip(&two)).unwrap();
    let a = read_batch(&raw).unwrap();
    assert_eq!(a, read_batch(&gz).unwrap());
    assert_eq!(a.labels, [3, 9]);
    assert_eq!(a.pixels[PIXELS], 200);
    let write = |name: &str, bytes: &[u8]| {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let r = reason(&write("short.bin", &two[..RECORD + 100]));
    assert!(r.contains("not a whole number of 3073-byte records"), "{r}");
    let mut bad_label = two.clone();
    bad_label[RECORD] = 10;
    let r = reason(&write("label.bin", &bad_label));
    assert!(r.contains("record 1 has label 10"), "{r}");
    let r = reason(&write("empty.bin", &[]));
    assert!(r.contains("no records"), "{r}");
    let mut damaged = gzip(&two);
    let n = damaged.len();
    damaged[n / 2] ^= 0xff;
    let r = reason(&write("damaged.bin.gz", &damaged));
    assert!(r.contains("damaged compressed stream"), "{r}");
    let r = reason(&write("long.bin", &vec![0u8; 10_001 * RECORD]));
    assert!(r.contains("more than the 10000 records"), "{r}");
}

#[test]
fn the_subset_loads_as_a_named_data_set_and_a_short_file_is_refused() {
    use mep::data::{DataLocator, LoadOptions, load};
    let shared = data_dir();
    if !shared.join("cifar-10-subset").is_dir() {
        eprintln!("skipped: no CIFAR-10 subset in {}", shared.display());
        return;
    }
    let ds = load(
        "cifar-10-subset",
        &common::locator(),
        &LoadOptions::default(),
        0,
    )
    .unwrap();
    assert_eq!((ds.train.len(), ds.test.len()), (5085, 1017));
    assert_eq!(ds.input_shape, [3, 32, 32]);
    assert_eq!(ds.train.dim(), PIXELS);
    assert_eq!(ds.test.labels()[..5], [3, 8, 8, 0, 6]);
    assert!(ds.train.inputs().iter().all(|v| (0.0..=1.0).contains(v)));
    // Per-channel standardisation with the catalog's statistics (CIFAR-10's full training
    // set): computed here from the raw bytes, the subset's own channel means and stds are
    // within 0.01 of them, and the loaded inputs are exactly (x / 255 - mean[c]) / std[c].
    let spec = mep::data::find("cifar-10-subset").unwrap();
    let mep::data::Normalization::PerChannel { mean, std } = spec.normalization else {
        panic!(
            "CIFAR-10 is standardised per channel: {:?}",
            spec.normalization
        );
    };
    let std_ds = load(
        "cifar-10-subset",
        &common::locator(),
        &LoadOptions {
            normalization: spec.normalization,
            ..LoadOptions::default()
        },
        0,
    )
    .unwrap();
    let plane = 32 * 32;
    for c in 0..3 {
        let values: Vec<f64> = ds
            .train
            .inputs()
            .chunks(PIXELS)
            .flat_map(|img| {
                img[c * plane..(c + 1) * plane]
                    .iter()
                    .map(|&v| f64::from(v))
            })
            .collect();
        let n = values.len() as f64;
        let m = values.iter().sum::<f64>() / n;
        let s = (values.iter().map(|v| (v - m).powi(2)).sum::<f64>() / n).sqrt();
        assert!(
            (m - f64::from(mean[c])).abs() < 0.01,
            "channel {c}: mean {m}"
        );
        assert!((s - f64::from(std[c])).abs() < 0.01, "channel {c}: std {s}");
        for (raw, standardised) in ds
            .train
            .inputs()
            .chunks(PIXELS)
            .zip(std_ds.train.inputs().chunks(PIXELS))
            .take(50)
        {
            for i in c * plane..(c + 1) * plane {
                let want = (raw[i] - mean[c]) / std[c];
                assert!(
                    (standardised[i] - want).abs() < 1e-4,
                    "channel {c} pixel {i}"
                );
            }
        }
    }
    // A folder whose files are whole but shorter than the subset's is refused by name.
    let root = scratch_dir("cifar-short");
    let dir = root.join("cifar-10-subset");
    std::fs::create_dir_all(&dir).unwrap();
    let two = vec![1u8; 2 * RECORD];
    for f in mep::data::cifar::TRAIN_FILES
        .iter()
        .chain([&mep::data::cifar::TEST_FILE])
    {
        std::fs::write(dir.join(f), &two).unwrap();
    }
    let err = load(
        "cifar-10-subset",
        &DataLocator::new(Some(root.clone()), None, None),
        &LoadOptions::default(),
        0,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("2 records, but every cifar-10-subset batch file holds 1017"),
        "{err}"
    );
    // Missing files say where they were looked for.
    let empty = scratch_dir("cifar-missing");
    let err = load(
        "cifar-10-subset",
        &DataLocator::new(Some(empty.clone()), None, None),
        &LoadOptions::default(),
        0,
    )
    .unwrap_err();
    assert!(matches!(err, DataError::Missing { .. }), "{err}");
}
