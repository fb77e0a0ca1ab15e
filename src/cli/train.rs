//! `mep train` and `mep eval`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use mep::data::DataLocator;
use mep::device::Workload;
use mep::experiment::{
    DEFAULT_MODEL, EstimatorArg, OptimizerArg, Prepared, RunDir, RunMeta, Standardize,
    TrainOptions, read_meta,
};
use mep::loss::Loss;
use mep::train::Monitor;

use super::Globals;
use super::progress::{DownloadBar, EpochBar};

#[derive(Debug, Args)]
pub struct TrainArgs {
    #[command(flatten)]
    opts: TrainOptions,
    /// TOML file with any of the training options (flags override it).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Directory for config.json, metrics.jsonl and the checkpoint (default
    /// results/train/<data>-<model>-<method>-seed<N>-<digest of the options>).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Continue the run in --out (or the default directory) from its last checkpoint; only
    /// --epochs may differ from the stored options.
    #[arg(long, conflicts_with = "force")]
    resume: bool,
    /// Replace the run in --out (its checkpoint, metrics and monitor records) instead of
    /// refusing to overwrite it.
    #[arg(long)]
    force: bool,
    /// Do not download a missing data set.
    #[arg(long)]
    no_fetch: bool,
    /// Print each epoch's metrics as one JSON object per line on stdout.
    #[arg(long)]
    json: bool,
    /// Every N steps, record per-layer gradient norms, the cosine to backprop of the same
    /// loss, each phase's energy and the settle residual curve (monitor.jsonl and charts).
    #[arg(long, value_name = "N")]
    monitor: Option<usize>,
}

fn default_dir(opts: &TrainOptions, seed: u64) -> PathBuf {
    let method = match (&opts.preset, opts.estimator, opts.optimizer) {
        (Some(p), _, _) => p.clone(),
        (None, None, None) => opts
            .preset()
            .ok()
            .flatten()
            .map_or_else(|| "default".into(), |p| p.to_string()),
        (None, e, o) => format!(
            "{}-{}",
            json_name(e.unwrap_or(EstimatorArg::Backprop)),
            json_name(o.unwrap_or(OptimizerArg::Adam))
        ),
    };
    // The options' digest tells apart runs that differ in anything else (lr, batch,
    // sample counts, ...).
    let digest = {
        use sha2::Digest;
        let text = serde_json::to_string(opts).unwrap_or_default();
        let hash = sha2::Sha256::digest(text.as_bytes());
        hash[..4]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    PathBuf::from("results/train").join(
        format!(
            "{}-{}-{method}-seed{seed}-{digest}",
            opts.dataset().replace(':', "_"),
            opts.model.as_deref().unwrap_or(DEFAULT_MODEL),
        )
        .to_lowercase(),
    )
}

fn json_name(v: impl serde::Serialize) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

pub fn run(args: TrainArgs, globals: &Globals) -> Result<()> {
    let file = match &args.config {
        Some(path) => TrainOptions::from_toml(path)?,
        None => TrainOptions::default(),
    };
    let mut opts = args.opts.clone().over(file);
    let mut seed = globals.seed;
    let run = RunDir::new(args.out.clone().unwrap_or_else(|| default_dir(&opts, seed)));
    let mut resumed: Option<RunMeta> = None;
    if args.resume {
        let meta = run
            .read_meta()
            .with_context(|| format!("resuming from {}", run.path().display()))?;
        (opts, seed) = meta.resume(&opts, globals.seed_given)?;
        resumed = Some(meta);
    }

    let locator = DataLocator::from_env(globals.data_dir.clone());
    let device = globals.device.resolve(Workload::Backprop)?;
    let mut bar = DownloadBar::default();
    let prepared = Prepared::new(opts, seed, device, &locator, !args.no_fetch, &mut bar)?;
    let run_config = prepared.config_json(&globals.device.to_string());
    let Prepared {
        options: opts,
        dataset,
        spec,
        recipe,
        config,
        mut trainer,
    } = prepared;
    let num_params = trainer.model().num_params();
    if let Some(every) = args.monitor {
        let loss = trainer
            .estimator()
            .loss()
            .unwrap_or(Loss::CrossEntropy { smoothing: 0.0 });
        trainer = trainer.with_monitor(Monitor::new(every, loss)?);
    }
    if resumed.is_some() {
        trainer
            .load_checkpoint(&run.checkpoint())
            .with_context(|| format!("resuming from {}", run.checkpoint().display()))?;
    }
    // Nothing is written before every input has been read and checked.
    // Held until the run ends: a second run into this directory is refused at once.
    let _lock = run.lock()?;
    run.start(&run_config, resumed.as_ref(), args.force)?;
    let (start, mut history) = match resumed {
        Some(meta) => (meta.epoch + 1, meta.history),
        None => (1, Vec::new()),
    };
    errln!(
        "training {spec} ({num_params} parameters) on {} ({} train / {} test, {}) with {}, {} epochs{}, batch {}, device {}, {} threads",
        dataset.name,
        dataset.train.len(),
        dataset.test.len(),
        match opts.standardize {
            Some(Standardize::Dataset) => "standardised".to_string(),
            Some(Standardize::MeanStd { mean, std }) => format!("standardised with {mean},{std}"),
            _ => "inputs in [0, 1]".to_string(),
        } + &if config.augment.is_off() {
            String::new()
        } else {
            format!(", augmented {}", config.augment)
        },
        recipe.label(),
        config.epochs,
        if start > 1 {
            format!(" (resuming at epoch {start})")
        } else {
            String::new()
        },
        config.batch_size,
        globals.device,
        mep::device::threads()
    );
    if args.monitor.is_some() && start == 1 {
        run.clear_monitor();
    }
    let mut bar = EpochBar::new(config.epochs, false);
    for epoch in start..=config.epochs {
        let m = trainer.run_epoch(&dataset, &config, epoch, &mut bar)?;
        run.append_monitor(&trainer.take_monitor_records())?;
        let line = serde_json::to_string(&m)?;
        history.push(m);
        let meta = RunMeta {
            options: opts.clone(),
            seed,
            epoch,
            history: history.clone(),
        };
        // The epoch is on disk before it is printed: a reader that closes the pipe ends
        // the run after a complete epoch.
        run.record_epoch(&trainer, &meta)
            .context("writing the checkpoint")?;
        if args.json {
            outln!("{line}")?;
        }
    }
    if args.monitor.is_some() {
        let charts = run.monitor_charts()?;
        errln!("monitor: {} and {charts} charts", run.monitor().display());
    }
    match history.last() {
        Some(last) => errln!(
            "final test accuracy {:.2}%; results in {}",
            100.0 * last.test_accuracy,
            run.path().display()
        ),
        None => errln!(
            "nothing to do: the run already has {} epochs",
            config.epochs
        ),
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// A checkpoint written by `mep train` (its run directory's checkpoint.safetensors).
    checkpoint: PathBuf,
    /// Evaluate on this data set instead of the run's.
    #[arg(long)]
    dataset: Option<String>,
    /// Use only the first N test samples.
    #[arg(long, value_name = "N")]
    test_samples: Option<usize>,
    /// Do not download a missing data set.
    #[arg(long)]
    no_fetch: bool,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

/// `mep eval`: test accuracy of a checkpoint.
pub fn eval(args: EvalArgs, globals: &Globals) -> Result<()> {
    let path = &args.checkpoint;
    let meta = read_meta(path)?;
    let mut opts = meta.options.clone();
    if let Some(d) = args.dataset {
        opts.dataset = Some(d);
    }
    opts.test_samples = args.test_samples.or(opts.test_samples);
    opts.train_samples = Some(1);
    let locator = DataLocator::from_env(globals.data_dir.clone());
    let device = globals.device.resolve(Workload::Backprop)?;
    let mut bar = DownloadBar::default();
    let Prepared {
        dataset,
        spec,
        mut trainer,
        ..
    } = Prepared::new(opts, meta.seed, device, &locator, !args.no_fetch, &mut bar)?;
    trainer
        .load_checkpoint(path)
        .with_context(|| format!("loading {}", path.display()))?;
    let accuracy = trainer.evaluate(&dataset.test, 256)?;
    if args.json {
        outln!(
            "{}",
            serde_json::json!({
                "checkpoint": path,
                "model": spec.to_string(),
                "dataset": dataset.name,
                "test_samples": dataset.test.len(),
                "epoch": meta.epoch,
                "test_accuracy": accuracy,
            })
        )?;
    } else {
        outln!(
            "{}: {spec} after epoch {}: test accuracy {:.2}% on {} ({} samples)",
            path.display(),
            meta.epoch,
            100.0 * accuracy,
            dataset.name,
            dataset.test.len()
        )?;
    }
    Ok(())
}
