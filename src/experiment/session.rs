//! A whole training run as front-ends drive it: options (or a stored run to resume), data
//! (a named set or in-memory arrays), an optional run directory with its lock, config,
//! checkpoints and metrics, then epochs one by one. `mep train` and the Python package
//! both run through [`TrainRun`], so a run started from either gives the same metrics.

use std::path::PathBuf;
use std::rc::Rc;

use super::{ExperimentError, Prepared, RunDir, RunLock, RunMeta, Standardize, TrainOptions};
use crate::data::download::DownloadProgress;
use crate::data::{Augment, DataLocator, Dataset};
use crate::device::{DeviceChoice, Workload};
use crate::loss::Loss;
use crate::train::parallel::{Collective, check_agreement, digest};
use crate::train::{EpochMetrics, Monitor, MonitorRecord, TrainObserver, Trainer};

/// The seed of a run that names none (a resumed run keeps its own).
pub const DEFAULT_SEED: u64 = 42;

/// The name a data set given as arrays runs under (in `config.json` and checkpoints).
pub const ARRAYS_DATASET: &str = "arrays";

/// What to train on.
pub enum DataSource<'a> {
    /// The options' named data set, found through the locator (fetched when missing and
    /// `fetch`).
    Named {
        /// Where data sets are looked for.
        locator: &'a DataLocator,
        /// Download a missing set.
        fetch: bool,
        /// Receives the download's progress.
        progress: &'a mut dyn DownloadProgress,
    },
    /// In-memory splits ([`Dataset::from_splits`]), used as given: the options may not
    /// name a data set, sample counts or a normalisation other than `none`, and
    /// augmentation is off unless the options ask for it.
    Arrays(Dataset),
}

/// How a run is asked for: `mep train`'s options and flags, as a library value.
#[derive(Debug, Clone, Default)]
pub struct RunRequest {
    /// The run's options.
    pub options: TrainOptions,
    /// Seed ([`DEFAULT_SEED`] when `None`; a resumed run checks a given one against its
    /// own).
    pub seed: Option<u64>,
    /// Device.
    pub device: DeviceChoice,
    /// Run directory for `config.json`, `metrics.jsonl` and the checkpoint; `None`
    /// records nothing.
    pub out: Option<PathBuf>,
    /// Continue the run in `out` from its checkpoint (only `epochs` may differ).
    pub resume: bool,
    /// Replace a run already in `out`.
    pub force: bool,
    /// Monitor every N steps (records in `out`'s `monitor.jsonl`).
    pub monitor: Option<usize>,
    /// Train data-parallel over these ranks (see [`Trainer::set_collective`]): every rank
    /// starts the same request; rank 0 alone writes to `out`, the others read a resumed
    /// run's checkpoint from it.
    pub collective: Option<Rc<dyn Collective>>,
}

/// A training run in progress: the prepared model and data, where it records, and the
/// epochs done so far.
pub struct TrainRun {
    prepared: Prepared,
    seed: u64,
    device: DeviceChoice,
    dir: Option<(RunDir, RunLock)>,
    monitor: bool,
    history: Vec<EpochMetrics>,
    records: Vec<MonitorRecord>,
}

impl TrainRun {
    /// Sets the run up: reads a resumed run's options and checkpoint, prepares data, model
    /// and recipe, then (with a directory) takes its lock and writes `config.json`.
    /// Nothing is written before every input has been read and checked.
    pub fn start(request: RunRequest, data: DataSource<'_>) -> Result<Self, ExperimentError> {
        let RunRequest {
            mut options,
            seed,
            device,
            out,
            resume,
            force,
            monitor,
            collective,
        } = request;
        let collective = collective.filter(|c| c.size() > 1);
        let writer = collective.as_ref().is_none_or(|c| c.rank() == 0);
        let run = out.map(RunDir::new);
        let mut seed_used = seed.unwrap_or(DEFAULT_SEED);
        let mut resumed = None;
        if resume {
            let Some(run) = &run else {
                return Err(ExperimentError::InvalidOption(
                    "resuming needs the run's directory".into(),
                ));
            };
            let meta = run.read_meta()?;
            (options, seed_used) = meta.resume(&options, seed)?;
            resumed = Some(meta);
        }
        let burn_device = device.resolve(Workload::Backprop)?;
        let mut prepared = match data {
            DataSource::Named {
                locator,
                fetch,
                progress,
            } => Prepared::new(options, seed_used, burn_device, locator, fetch, progress)?,
            DataSource::Arrays(dataset) => {
                Prepared::with_dataset(arrays_options(options)?, dataset, seed_used, burn_device)?
            }
        };
        if let Some(c) = &collective {
            if prepared.options.persistent == Some(true) {
                return Err(ExperimentError::InvalidOption(
                    "persistent EqProp states belong to one process's samples: train without mpirun, or without persistent".into(),
                ));
            }
            // Everything that decides the run: a rank started with other options would
            // otherwise train another model, or deadlock at a mismatched collective.
            let identity = serde_json::json!({
                "options": prepared.options,
                "seed": seed_used,
                "dataset": prepared.dataset.name,
                "train": prepared.dataset.train.len(),
                "test": prepared.dataset.test.len(),
                "epochs": resumed.as_ref().map(|m| m.epoch),
            });
            check_agreement(
                c.as_ref(),
                &[digest(identity.to_string().as_bytes())],
                "options, seed and data",
            )
            .map_err(crate::train::TrainError::from)?;
            prepared.trainer.set_collective(Some(c.clone()));
        }
        if let Some(every) = monitor {
            let loss = prepared
                .trainer
                .estimator()
                .loss()
                .unwrap_or(Loss::CrossEntropy { smoothing: 0.0 });
            prepared
                .trainer
                .set_monitor(Some(Monitor::new(every, loss)?));
        }
        if let (Some(run), Some(_)) = (&run, &resumed) {
            prepared.trainer.load_checkpoint(&run.checkpoint())?;
        }
        let dir = match run.filter(|_| writer) {
            Some(run) => {
                // Held until the run is dropped: a second run into this directory is
                // refused at once.
                let lock = run.lock()?;
                run.start(
                    &prepared.config_json(&device.to_string()),
                    resumed.as_ref(),
                    force,
                )?;
                if monitor.is_some() && resumed.is_none() {
                    run.clear_monitor();
                }
                Some((run, lock))
            }
            None => None,
        };
        Ok(Self {
            prepared,
            seed: seed_used,
            device,
            dir,
            monitor: monitor.is_some(),
            history: resumed.map(|m| m.history).unwrap_or_default(),
            records: Vec::new(),
        })
    }

    /// The prepared run: options, data, spec, recipe, config and trainer.
    pub fn prepared(&self) -> &Prepared {
        &self.prepared
    }

    /// The trainer (model, estimator, optimizer).
    pub fn trainer(&self) -> &Trainer {
        &self.prepared.trainer
    }

    /// The trainer, to change the model between epochs.
    pub fn trainer_mut(&mut self) -> &mut Trainer {
        &mut self.prepared.trainer
    }

    /// The run's seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The run's `config.json` (see [`Prepared::config_json`]).
    pub fn config_json(&self) -> serde_json::Value {
        self.prepared.config_json(&self.device.to_string())
    }

    /// The run directory, if the run records.
    pub fn dir(&self) -> Option<&RunDir> {
        self.dir.as_ref().map(|(d, _)| d)
    }

    /// Every finished epoch's metrics (a resumed run's stored ones first).
    pub fn history(&self) -> &[EpochMetrics] {
        &self.history
    }

    /// The next epoch to run (1-based).
    pub fn next_epoch(&self) -> usize {
        self.history.len() + 1
    }

    /// Whether every epoch of the options has run.
    pub fn is_done(&self) -> bool {
        self.history.len() >= self.prepared.config.epochs
    }

    /// Runs the next epoch (`None` when the run is done) and records it: the checkpoint
    /// with the run's metadata, then `metrics.jsonl` and the monitor's records. The epoch
    /// is on disk before this returns. An interrupted epoch
    /// ([`TrainObserver::should_stop`]) is not recorded.
    pub fn run_epoch(
        &mut self,
        observer: &mut dyn TrainObserver,
    ) -> Result<Option<EpochMetrics>, ExperimentError> {
        if self.is_done() {
            return Ok(None);
        }
        let epoch = self.next_epoch();
        let Prepared {
            dataset,
            config,
            trainer,
            options,
            ..
        } = &mut self.prepared;
        let metrics = trainer.run_epoch(dataset, config, epoch, observer)?;
        let records = trainer.take_monitor_records();
        self.history.push(metrics.clone());
        match &self.dir {
            Some((run, _)) => {
                run.append_monitor(&records)?;
                let meta = RunMeta {
                    options: options.clone(),
                    seed: self.seed,
                    epoch,
                    history: self.history.clone(),
                    input_shape: Some(dataset.input_shape),
                };
                run.record_epoch(trainer, &meta)?;
            }
            None => self.records.extend(records),
        }
        Ok(Some(metrics))
    }

    /// The monitor's records of a run without a directory (a recording run appends them
    /// to its `monitor.jsonl`), taken.
    pub fn take_monitor_records(&mut self) -> Vec<MonitorRecord> {
        std::mem::take(&mut self.records)
    }

    /// Ends the run: with a monitor and a directory, draws the monitor's charts (how many
    /// files were written). Dropping the run releases its directory.
    pub fn finish(self) -> Result<usize, ExperimentError> {
        match (&self.dir, self.monitor) {
            (Some((run, _)), true) => run.monitor_charts(),
            _ => Ok(0),
        }
    }
}

/// The options of a run on arrays: checked that they name no data set, sample counts or
/// normalisation (the arrays are used as given), then stored with the arrays' name, `none`
/// normalisation and the augmentation (off unless asked for).
fn arrays_options(options: TrainOptions) -> Result<TrainOptions, ExperimentError> {
    let refuse = |what: &str| {
        Err(ExperimentError::InvalidOption(format!(
            "{what} does not apply to a run on arrays: pass the arrays you want to train on"
        )))
    };
    if options
        .dataset
        .as_deref()
        .is_some_and(|d| d != ARRAYS_DATASET)
    {
        return refuse("a data set name");
    }
    if options.train_samples.is_some() || options.test_samples.is_some() {
        return refuse("a sample count");
    }
    if !matches!(options.standardize, None | Some(Standardize::None)) {
        return Err(ExperimentError::InvalidOption(
            "standardize does not apply to a run on arrays: they are used as given (standardise them first)"
                .into(),
        ));
    }
    Ok(TrainOptions {
        dataset: Some(ARRAYS_DATASET.into()),
        standardize: Some(Standardize::None),
        augment: Some(options.augment.unwrap_or(Augment::NONE)),
        ..options
    })
}
