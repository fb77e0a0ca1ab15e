//! `mep train` and `mep eval`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use mep::data::DataLocator;
use mep::device::Workload;
use mep::experiment::{
    DataSource, Prepared, RunRequest, Standardize, TrainOptions, TrainRun, read_meta,
};

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

pub fn run(args: TrainArgs, globals: &Globals) -> Result<()> {
    let file = match &args.config {
        Some(path) => TrainOptions::from_toml(path)?,
        None => TrainOptions::default(),
    };
    let options = args.opts.clone().over(file);
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| options.default_run_dir(globals.seed));
    let request = RunRequest {
        options,
        seed: globals.seed_given,
        device: globals.device,
        out: Some(out.clone()),
        resume: args.resume,
        force: args.force,
        monitor: args.monitor,
        collective: globals.collective.clone(),
    };
    // Rank 0 reports; the other ranks of a data-parallel run only train.
    let rank = globals.collective.as_ref().map_or(0, |c| c.rank());
    let locator = DataLocator::from_env(globals.data_dir.clone());
    let mut bar = DownloadBar::default();
    let data = DataSource::Named {
        locator: &locator,
        fetch: !args.no_fetch,
        progress: &mut bar,
    };
    let mut run = TrainRun::start(request, data)
        .with_context(|| format!("setting up the run in {}", out.display()))?;
    let start = run.next_epoch();
    if rank == 0 {
        let Prepared {
            options: opts,
            dataset,
            spec,
            recipe,
            config,
            trainer,
        } = run.prepared();
        errln!(
            "training {spec} ({} parameters) on {} ({} train / {} test, {}) with {}, {} epochs{}, batch {}, device {}, {} threads{}",
            trainer.model().num_params(),
            dataset.name,
            dataset.train.len(),
            dataset.test.len(),
            match opts.standardize {
                Some(Standardize::Dataset) => "standardised".to_string(),
                Some(Standardize::MeanStd { mean, std }) =>
                    format!("standardised with {mean},{std}"),
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
            mep::device::threads(),
            match &globals.collective {
                Some(c) => format!(" per rank, {} ranks", c.size()),
                None => String::new(),
            }
        );
    }
    let epochs = run.prepared().config.epochs;
    let mut bar = EpochBar::new(epochs, false);
    let mut silent = mep::train::Silent;
    let observer: &mut dyn mep::train::TrainObserver =
        if rank == 0 { &mut bar } else { &mut silent };
    // Each epoch is on disk before it is printed: a reader that closes the pipe ends the
    // run after a complete epoch.
    while let Some(m) = run.run_epoch(observer)? {
        if args.json && rank == 0 {
            outln!("{}", serde_json::to_string(&m)?)?;
        }
    }
    if rank != 0 {
        return Ok(());
    }
    if let Some(c) = &globals.collective {
        let s = c.stats();
        errln!(
            "rank 0 communication: {} collectives, {:.1} MB sent, {:.1} MB received, {:.2} s ({:.2} s of it waiting for other ranks)",
            s.calls,
            s.bytes_sent as f64 / 1e6,
            s.bytes_received as f64 / 1e6,
            s.seconds,
            s.waiting
        );
    }
    let last = (start <= epochs)
        .then(|| run.history().last().cloned())
        .flatten();
    let dir = out.display();
    if args.monitor.is_some() {
        let charts = run.finish()?;
        errln!("monitor: {dir}/monitor.jsonl and {charts} charts");
    }
    match last {
        Some(last) => errln!(
            "final test accuracy {:.2}%; results in {dir}",
            100.0 * last.test_accuracy,
        ),
        None => errln!("nothing to do: the run already has {epochs} epochs"),
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
