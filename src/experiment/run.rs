//! One run's setup and records: data (fetched when missing), the checked network, the
//! recipe built into a trainer, the metadata a checkpoint keeps, resume checks and atomic
//! result files.

use std::fs;
use std::path::Path;

use super::{ExperimentError, Recipe, Standardize, TrainOptions};
use crate::data::download::{DownloadProgress, Downloader};
use crate::data::{self, DataError, DataLocator, Dataset, LoadOptions};
use crate::device::Device;
use crate::model::{ModelError, ModelSpec, Network, Shape};
use crate::train::{EpochMetrics, TrainConfig, Trainer};

/// The checkpoint file of a run directory (the latest epoch).
pub const CHECKPOINT: &str = "checkpoint.safetensors";

/// Loads a data set; if its files are missing and it can be downloaded, fetches it into the
/// user cache first (unless `fetch` is false), reporting the download to `progress`.
pub fn load_or_fetch(
    name: &str,
    locator: &DataLocator,
    options: &LoadOptions,
    seed: u64,
    fetch: bool,
    progress: &mut dyn DownloadProgress,
) -> Result<Dataset, ExperimentError> {
    match data::load(name, locator, options, seed) {
        Err(DataError::Missing { dataset, .. }) if fetch => {
            let spec = data::find(&dataset)?;
            Downloader::default().fetch_dataset(&spec, None, &locator.download_dir()?, progress)?;
            Ok(data::load(name, locator, options, seed)?)
        }
        other => Ok(other?),
    }
}

impl TrainOptions {
    /// The options' data set, with their normalisation and sample counts (fetched when
    /// missing and `fetch`).
    pub fn load_data(
        &self,
        locator: &DataLocator,
        seed: u64,
        fetch: bool,
        progress: &mut dyn DownloadProgress,
    ) -> Result<Dataset, ExperimentError> {
        let options = self.load_options()?;
        load_or_fetch(self.dataset(), locator, &options, seed, fetch, progress)
    }
}

/// The network for `spec` on `dataset`, checked against its input and classes.
pub fn build_network(
    spec: &ModelSpec,
    dataset: &Dataset,
    seed: u64,
    device: &Device,
) -> Result<Network, ExperimentError> {
    let net = spec.build(Shape::from_chw(dataset.input_shape), seed, device)?;
    if net.output_shape().numel() != dataset.classes {
        return Err(ModelError::Mismatch {
            model: spec.to_string(),
            dataset: dataset.name.clone(),
            reason: format!(
                "{} outputs but {} classes",
                net.output_shape().numel(),
                dataset.classes
            ),
        }
        .into());
    }
    Ok(net)
}

/// Everything one training run needs, set up from its options: what `mep train` does
/// before its first epoch.
pub struct Prepared {
    /// The options, validated.
    pub options: TrainOptions,
    /// The data.
    pub dataset: Dataset,
    /// The model spec.
    pub spec: ModelSpec,
    /// The resolved recipe.
    pub recipe: Recipe,
    /// Epochs, batch size and seed.
    pub config: TrainConfig,
    /// The model with its estimator and optimizer.
    pub trainer: Trainer,
}

impl Prepared {
    /// Validates `options`, loads (or fetches) the data, builds the network on `device`
    /// and the recipe's estimator and optimizer, all seeded from `seed`.
    pub fn new(
        options: TrainOptions,
        seed: u64,
        device: Device,
        locator: &DataLocator,
        fetch: bool,
        progress: &mut dyn DownloadProgress,
    ) -> Result<Self, ExperimentError> {
        options.validate()?;
        // The stored options name the normalisation even when it was left to the default,
        // so a run reads the same inputs after the default changes.
        let options = TrainOptions {
            standardize: Some(options.standardization()?),
            ..options
        };
        let dataset = options.load_data(locator, seed, fetch, progress)?;
        Self::with_dataset(options, dataset, seed, device)
    }

    /// [`Prepared::new`] on data already loaded (`options`' data-set fields are recorded,
    /// not read).
    pub fn with_dataset(
        options: TrainOptions,
        dataset: Dataset,
        seed: u64,
        device: Device,
    ) -> Result<Self, ExperimentError> {
        options.validate()?;
        let config = options.train_config(seed)?;
        let spec = options.model()?;
        let model = build_network(&spec, &dataset, seed, &device)?;
        let recipe = options.recipe(dataset.train.len())?;
        let (estimator, optimizer) = recipe.build(&model, dataset.train.len(), seed)?;
        let trainer = Trainer::new(model, estimator, optimizer, device);
        Ok(Self {
            options,
            dataset,
            spec,
            recipe,
            config,
            trainer,
        })
    }

    /// The run's `config.json`: data, model, sizes, seed, options and the resolved
    /// recipe (`preset`, `estimator`, `estimator_config`, `optimizer`, `composite`).
    pub fn config_json(&self, device: &str) -> serde_json::Value {
        let mut value = serde_json::json!({
            "dataset": self.dataset.name,
            "model": self.spec.to_string(),
            "train_samples": self.dataset.train.len(),
            "test_samples": self.dataset.test.len(),
            "device": device,
            "threads": crate::device::threads(),
            "epochs": self.config.epochs,
            "batch_size": self.config.batch_size,
            "seed": self.config.seed,
            "options": self.options,
            "estimator": self.trainer.estimator().name(),
            // The first-order name for `optimizer`-flag runs, else the composite optimizer
            // (both are the composite optimizer, with the `sgd` or `adam` preset's rules).
            "optimizer": match (self.recipe.preset, self.options.optimizer) {
                (None, Some(o)) => serde_json::to_value(o).unwrap_or_default(),
                (None, None) => "adam".into(),
                (Some(_), _) => "composite".into(),
            },
            "ep": self.recipe.estimator.ep_config(),
        });
        if let (Some(obj), Ok(serde_json::Value::Object(recipe))) =
            (value.as_object_mut(), serde_json::to_value(self.recipe))
        {
            obj.extend(recipe);
        }
        value
    }
}

/// What a checkpoint's metadata records about its run.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RunMeta {
    /// The run's options.
    pub options: TrainOptions,
    /// Its seed.
    pub seed: u64,
    /// The last epoch the checkpoint holds (1-based).
    pub epoch: usize,
    /// Every epoch's metrics up to `epoch`.
    pub history: Vec<EpochMetrics>,
    /// Shape of one input, (channels, height, width): what the model was built for, so
    /// that the network can be rebuilt from the checkpoint alone (absent in checkpoints
    /// written before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_shape: Option<[usize; 3]>,
}

impl RunMeta {
    /// The options and seed of a run that continues this one with `given` (and `seed`, if
    /// one was given): every option set in `given` other than `epochs` must equal the
    /// stored one, as must a given seed; `epochs` may grow the run.
    pub fn resume(
        &self,
        given: &TrainOptions,
        seed: Option<u64>,
    ) -> Result<(TrainOptions, u64), ExperimentError> {
        let without_epochs = |o: &TrainOptions| TrainOptions {
            epochs: None,
            ..o.clone()
        };
        let stored = without_epochs(&self.options);
        if without_epochs(given).or(stored.clone()) != stored {
            return Err(ExperimentError::ResumeMismatch {
                stored: serde_json::to_string(&self.options).unwrap_or_default(),
            });
        }
        if let Some(s) = seed
            && s != self.seed
        {
            return Err(ExperimentError::InvalidOption(format!(
                "--resume continues the stored run with its seed {}; --seed {s} differs",
                self.seed
            )));
        }
        let options = TrainOptions {
            epochs: given.epochs.or(self.options.epochs),
            ..self.options.clone()
        };
        Ok((options, self.seed))
    }
}

/// Reads the run metadata of a checkpoint written by `mep train`.
pub fn read_meta(path: &Path) -> Result<RunMeta, ExperimentError> {
    let bad = |reason: String| ExperimentError::Checkpoint {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = fs::read(path).map_err(|e| ExperimentError::io("reading checkpoint", path, e))?;
    let (_, metadata) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
    let meta = metadata
        .metadata()
        .as_ref()
        .and_then(|m| m.get("meta"))
        .ok_or_else(|| bad("no run metadata".into()))?;
    let wrapped: serde_json::Value =
        serde_json::from_str(meta).map_err(|e| bad(format!("run metadata: {e}")))?;
    let mut meta: RunMeta = serde_json::from_value(wrapped["meta"].clone())
        .map_err(|e| bad(format!("run metadata: {e}")))?;
    // Runs store their normalisation since the default became `dataset`; one stored
    // without it ran on inputs in [0, 1].
    meta.options.standardize.get_or_insert(Standardize::None);
    Ok(meta)
}

/// [`crate::train::checkpoint::write_atomic`] with the path in its error.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ExperimentError> {
    crate::train::checkpoint::write_atomic(path, bytes)
        .map_err(|e| ExperimentError::io("writing", path, e))
}
