//! `TrainRun`, the whole-run driver front-ends share: runs on arrays equal runs on the same
//! named data, directories record what `mep train` records, observers stop between
//! batches, and bad arrays are refused before anything runs.

mod common;

use common::{locator, scratch_dir};
use mep::data::download::NoProgress;
use mep::data::{Dataset, LoadOptions, Normalization, Split};
use mep::experiment::suites::Suite;
use mep::experiment::{DataSource, ExperimentError, RunRequest, TrainOptions, TrainRun};
use mep::train::{EpochMetrics, Silent, TrainError, TrainObserver};

fn small(preset: &str) -> TrainOptions {
    TrainOptions {
        dataset: Some("mnist".into()),
        model: Some("784-32-10".into()),
        preset: Some(preset.into()),
        train_samples: Some(512),
        test_samples: Some(256),
        standardize: Some(mep::experiment::Standardize::None),
        epochs: Some(2),
        ..TrainOptions::default()
    }
}

/// Starts `request` on the shared MNIST copy (never downloading).
fn start(request: RunRequest) -> Result<TrainRun, ExperimentError> {
    let locator = locator();
    let data = DataSource::Named {
        locator: &locator,
        fetch: false,
        progress: &mut NoProgress,
    };
    TrainRun::start(request, data)
}

fn named(options: TrainOptions, out: Option<std::path::PathBuf>) -> TrainRun {
    start(RunRequest {
        options,
        out,
        ..RunRequest::default()
    })
    .unwrap()
}

/// The request that resumes the run in `dir` with `options`.
fn resume(options: TrainOptions, dir: &std::path::Path) -> RunRequest {
    RunRequest {
        options,
        out: Some(dir.to_path_buf()),
        resume: true,
        ..RunRequest::default()
    }
}

fn all_epochs(run: &mut TrainRun) -> Vec<EpochMetrics> {
    while run.run_epoch(&mut Silent).unwrap().is_some() {}
    run.history().to_vec()
}

fn without_timing(history: &[EpochMetrics]) -> Vec<EpochMetrics> {
    history
        .iter()
        .map(|m| EpochMetrics {
            seconds: 0.0,
            samples_per_second: 0.0,
            ..m.clone()
        })
        .collect()
}

fn mnist_splits() -> Dataset {
    let options = LoadOptions {
        train_samples: Some(512),
        test_samples: Some(256),
        normalization: Normalization::UnitRange,
    };
    mep::data::load("mnist", &locator(), &options, 0).unwrap()
}

#[test]
fn a_run_on_arrays_equals_the_run_on_the_same_named_data() {
    let mnist = mnist_splits();
    let arrays = Dataset::from_splits(
        "arrays",
        mnist.input_shape,
        10,
        mnist.train.clone(),
        mnist.test.clone(),
    )
    .unwrap();
    let options = TrainOptions {
        dataset: None,
        train_samples: None,
        test_samples: None,
        standardize: None,
        ..small("smep")
    };
    let mut on_arrays = TrainRun::start(
        RunRequest {
            options,
            ..RunRequest::default()
        },
        DataSource::Arrays(arrays),
    )
    .unwrap();
    let mut on_named = named(small("smep"), None);
    let a = all_epochs(&mut on_arrays);
    let b = all_epochs(&mut on_named);
    assert_eq!(a.len(), 2);
    assert_eq!(without_timing(&a), without_timing(&b));
    assert_eq!(on_arrays.config_json()["dataset"], "arrays");
    assert!(on_arrays.dir().is_none() && on_arrays.is_done());
    assert!(on_arrays.run_epoch(&mut Silent).unwrap().is_none());
}

#[test]
fn a_recording_run_writes_what_mep_train_writes_and_resumes_exactly() {
    let dir = scratch_dir("session-record");
    let straight = all_epochs(&mut named(small("adam"), None));
    let mut first = named(
        TrainOptions {
            epochs: Some(1),
            ..small("adam")
        },
        Some(dir.clone()),
    );
    all_epochs(&mut first);
    // The directory is locked while the run is alive.
    let second = start(resume(small("adam"), &dir));
    assert!(second.is_err(), "a second run into a held directory");
    drop(first);
    let meta = mep::experiment::read_meta(&dir.join("checkpoint.safetensors")).unwrap();
    assert_eq!((meta.epoch, meta.input_shape), (1, Some([1, 28, 28])));
    let mut resumed = start(resume(small("adam"), &dir)).unwrap();
    assert_eq!(resumed.next_epoch(), 2);
    let history = all_epochs(&mut resumed);
    assert_eq!(without_timing(&history), without_timing(&straight));
    let lines = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 2);
}

/// Stops after `after` batches of the first epoch.
struct StopAfter {
    after: usize,
    seen: usize,
}

impl TrainObserver for StopAfter {
    fn batch_end(&mut self, _loss: f32, _correct: usize, _samples: usize) {
        self.seen += 1;
    }
    fn should_stop(&mut self) -> bool {
        self.seen >= self.after
    }
}

#[test]
fn an_observer_stops_the_epoch_between_batches_and_nothing_is_recorded() {
    let dir = scratch_dir("session-stop");
    let mut run = named(small("adam"), Some(dir.clone()));
    let mut stop = StopAfter { after: 3, seen: 0 };
    match run.run_epoch(&mut stop) {
        Err(ExperimentError::Train(TrainError::Interrupted { epoch: 1, batch: 3 })) => {}
        other => panic!("expected an interruption after batch 3, got {other:?}"),
    }
    assert_eq!(stop.seen, 3);
    assert!(run.history().is_empty());
    assert!(!dir.join("checkpoint.safetensors").exists());
}

#[test]
fn bad_arrays_and_options_that_do_not_apply_to_arrays_are_refused() {
    let mnist = mnist_splits();
    let split = |labels: Vec<u32>, inputs: Vec<f32>| Split::new(inputs, labels, 2).unwrap();
    let ok = || split(vec![0, 1], vec![0.0; 4]);
    let cases: Vec<(Result<Dataset, _>, &str)> = vec![
        (
            Dataset::from_splits("a", [1, 1, 2], 2, split(vec![0, 2], vec![0.0; 4]), ok()),
            "train label 2 of sample 1 is not below the 2 classes",
        ),
        (
            Dataset::from_splits(
                "a",
                [1, 1, 2],
                2,
                ok(),
                split(vec![0, 1], vec![0.0, f32::NAN, 0.0, 0.0]),
            ),
            "test sample 0 holds a non-finite input",
        ),
        (
            Dataset::from_splits("a", [1, 1, 3], 2, ok(), ok()),
            "2 features per sample",
        ),
        (
            Dataset::from_splits("a", [1, 1, 2], 1, ok(), ok()),
            "at least 2",
        ),
        (
            Dataset::from_splits("a", [1, 1, 2], 2, split(vec![], vec![]), ok()),
            "the train split holds no sample",
        ),
    ];
    for (result, message) in cases {
        let e = result.expect_err(message).to_string();
        assert!(e.contains(message), "{e} lacks {message}");
    }
    let arrays = || {
        Dataset::from_splits(
            "arrays",
            mnist.input_shape,
            10,
            mnist.train.clone(),
            mnist.test.clone(),
        )
        .unwrap()
    };
    for (options, message) in [
        (small("adam"), "a data set name does not apply"),
        (
            TrainOptions {
                dataset: None,
                ..small("adam")
            },
            "a sample count does not apply",
        ),
        (
            TrainOptions {
                dataset: None,
                train_samples: None,
                test_samples: None,
                standardize: Some(mep::experiment::Standardize::Dataset),
                ..small("adam")
            },
            "standardize does not apply",
        ),
    ] {
        let request = RunRequest {
            options,
            ..RunRequest::default()
        };
        let e = TrainRun::start(request, DataSource::Arrays(arrays()))
            .err()
            .expect(message)
            .to_string();
        assert!(e.contains(message), "{e} lacks {message}");
    }
}

#[test]
fn suites_are_found_by_their_names() {
    for suite in Suite::ALL {
        assert_eq!(Suite::from_name(&suite.name()).unwrap(), suite);
    }
    // `ALL` lists every variant the CLI offers.
    use clap::ValueEnum;
    assert_eq!(Suite::ALL.as_slice(), Suite::value_variants());
    let e = Suite::from_name("tabel1").unwrap_err().to_string();
    assert!(
        e.contains("unknown suite `tabel1`") && e.contains("table1, table2, xor"),
        "{e}"
    );
}

#[test]
fn a_lock_left_by_a_zombie_is_stale() {
    // The ranks of a job whose launcher ended first can stay zombies where nothing reaps
    // orphans; their locks must not hold a run directory forever.
    let dir = scratch_dir("session-zombie-lock");
    std::fs::create_dir_all(&dir).unwrap();
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let stat = format!("/proc/{}/stat", child.id());
    let zombie = (0..200).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(10));
        std::fs::read_to_string(&stat).is_ok_and(|s| s.contains(") Z"))
    });
    assert!(zombie, "the unreaped child should be a zombie");
    std::fs::write(dir.join(".lock"), child.id().to_string()).unwrap();
    let run = mep::experiment::RunDir::new(&dir);
    assert!(run.lock().is_ok(), "a zombie's lock is stale");
    // A live process's lock holds.
    let mut live = std::process::Command::new("sleep")
        .arg("5")
        .spawn()
        .unwrap();
    std::fs::write(dir.join(".lock"), live.id().to_string()).unwrap();
    let e = run.lock().unwrap_err().to_string();
    assert!(e.contains("in use by another run"), "{e}");
    live.kill().unwrap();
    live.wait().unwrap();
    child.wait().unwrap();
}
