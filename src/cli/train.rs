//! `mep train`.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use mep::data::{self, DataError, DataLocator, LoadOptions, Normalization};
use mep::device::Workload;
use mep::model::{ModelSpec, Shape};
use mep::train::{BackpropTrainer, OptimizerKind, TrainConfig};
use serde::Serialize;

use super::Globals;
use super::progress::EpochBar;

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Data set: mnist, fashion-mnist, xor, permuted-mnist[:K].
    #[arg(long, default_value = "mnist")]
    dataset: String,
    /// Model spec: widths joined by '-' (784-256-128-10) or mlp-small / mlp.
    #[arg(long, default_value = "784-256-128-10")]
    model: ModelSpec,
    /// Optimizer of the backprop baseline.
    #[arg(long, value_enum, default_value = "adam")]
    optimizer: OptimizerArg,
    /// Epochs.
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    /// Batch size.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Learning rate (default: 0.1 for sgd, 0.001 for adam).
    #[arg(long)]
    lr: Option<f64>,
    /// Momentum of sgd.
    #[arg(long, default_value_t = 0.9)]
    momentum: f64,
    /// Decoupled weight decay.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Use only the first N training samples.
    #[arg(long, value_name = "N")]
    train_samples: Option<usize>,
    /// Use only the first N test samples.
    #[arg(long, value_name = "N")]
    test_samples: Option<usize>,
    /// Standardise inputs with this mean and std (after scaling to [0, 1]), e.g. 0.1307,0.3081.
    #[arg(long, value_name = "MEAN,STD", value_parser = parse_mean_std)]
    standardize: Option<(f32, f32)>,
    /// Directory for config.json and metrics.jsonl (default results/train/<run>).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Do not download a missing data set.
    #[arg(long)]
    no_fetch: bool,
    /// Print the run summary as one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum OptimizerArg {
    Sgd,
    Adam,
}

impl From<OptimizerArg> for OptimizerKind {
    fn from(o: OptimizerArg) -> Self {
        match o {
            OptimizerArg::Sgd => OptimizerKind::Sgd,
            OptimizerArg::Adam => OptimizerKind::Adam,
        }
    }
}

fn parse_mean_std(s: &str) -> Result<(f32, f32), String> {
    let (m, sd) = s.split_once(',').ok_or("expected MEAN,STD")?;
    let m: f32 = m.trim().parse().map_err(|_| format!("bad mean `{m}`"))?;
    let sd: f32 = sd.trim().parse().map_err(|_| format!("bad std `{sd}`"))?;
    Ok((m, sd))
}

#[derive(Debug, Serialize)]
struct RunConfig<'a> {
    dataset: &'a str,
    model: String,
    optimizer: OptimizerKind,
    lr: f64,
    momentum: f64,
    weight_decay: f64,
    train_samples: usize,
    test_samples: usize,
    device: String,
    threads: usize,
    #[serde(flatten)]
    train: &'a TrainConfig,
}

pub fn run(args: TrainArgs, globals: &Globals) -> Result<()> {
    let locator = DataLocator::from_env(globals.data_dir.clone());
    let options = LoadOptions {
        train_samples: args.train_samples,
        test_samples: args.test_samples,
        normalization: match args.standardize {
            Some((mean, std)) => Normalization::MeanStd { mean, std },
            None => Normalization::UnitRange,
        },
    };
    let dataset = load_or_fetch(
        &args.dataset,
        &locator,
        &options,
        globals.seed,
        !args.no_fetch,
    )?;

    let device = globals.device.resolve(Workload::Backprop)?;
    let kind: OptimizerKind = args.optimizer.into();
    let lr = args.lr.unwrap_or(kind.default_lr());
    let optimizer = kind.build(lr, args.momentum, args.weight_decay)?;
    let model = args
        .model
        .builder(Shape::from_chw(dataset.input_shape))?
        .build(globals.seed, &device)?;
    let config = TrainConfig {
        epochs: args.epochs,
        batch_size: args.batch,
        seed: globals.seed,
    };
    let out = args.out.clone().unwrap_or_else(|| {
        PathBuf::from("results/train").join(
            format!(
                "{}-{}-{:?}-seed{}",
                dataset.name.replace(':', "_"),
                args.model,
                kind,
                globals.seed
            )
            .to_lowercase(),
        )
    });
    let run_config = RunConfig {
        dataset: &dataset.name,
        model: args.model.to_string(),
        optimizer: kind,
        lr,
        momentum: args.momentum,
        weight_decay: args.weight_decay,
        train_samples: dataset.train.len(),
        test_samples: dataset.test.len(),
        device: globals.device.to_string(),
        threads: mep::device::threads(),
        train: &config,
    };
    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    write_atomic(
        &out.join("config.json"),
        serde_json::to_string_pretty(&run_config)?.as_bytes(),
    )?;

    eprintln!(
        "training {} ({} parameters) on {} ({} train / {} test) with backprop+{:?}, lr {lr}, {} epochs, batch {}, device {}, {} threads",
        args.model,
        model.num_params(),
        dataset.name,
        dataset.train.len(),
        dataset.test.len(),
        kind,
        config.epochs,
        config.batch_size,
        globals.device,
        mep::device::threads()
    );
    let mut trainer = BackpropTrainer::new(model, optimizer, device);
    let mut bar = EpochBar::new(config.epochs, false);
    let history = trainer.fit(&dataset, &config, &mut bar)?;

    let mut lines = String::new();
    for m in &history {
        lines.push_str(&serde_json::to_string(m)?);
        lines.push('\n');
    }
    write_atomic(&out.join("metrics.jsonl"), lines.as_bytes())?;
    let last = history.last().expect("at least one epoch");
    eprintln!(
        "final test accuracy {:.2}%; results in {}",
        100.0 * last.test_accuracy,
        out.display()
    );
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&serde_json::json!({
                "config": run_config,
                "epochs": history,
                "final_test_accuracy": last.test_accuracy,
                "results_dir": out,
            }))?
        );
    }
    Ok(())
}

/// Loads a data set; if its files are missing and it can be downloaded, fetches it into the
/// user cache first (unless `fetch` is false).
fn load_or_fetch(
    name: &str,
    locator: &DataLocator,
    options: &LoadOptions,
    seed: u64,
    fetch: bool,
) -> Result<data::Dataset> {
    match data::load(name, locator, options, seed) {
        Err(DataError::Missing { dataset, .. }) if fetch => {
            let spec = data::find(&dataset)?;
            eprintln!("data set `{dataset}` not found locally; downloading it");
            super::data::fetch(&spec, None, &locator.download_dir()?)?;
            data::load(name, locator, options, seed)
                .with_context(|| format!("loading data set `{name}` after download"))
        }
        other => other.with_context(|| format!("loading data set `{name}`")),
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}
